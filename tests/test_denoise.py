"""Diffusion denoising on decode: real diffusers loading, exercised with tiny random U-Nets."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pillow_sdlatent
from pillow_sdlatent import denoise

TINY_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "cross_attention_dim": 8,
    "attention_head_dim": 2,
    "norm_num_groups": 4,
}

#: Stable Diffusion 1.5's scheduler config (a PNDM one, as the real folder has: loading turns it into DDIM).
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
}


def _pipeline_folder(root: Path, with_embedding: bool = True) -> Path:
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    torch.manual_seed(0)
    UNet2DConditionModel(**TINY_UNET).save_pretrained(root / "unet")
    (root / "scheduler").mkdir(parents=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER))
    if with_embedding:
        save_file({denoise.EMBEDDING_KEY: torch.randn(1, 77, 8)}, str(root / denoise.EMBEDDING_FILE))
    return root


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _pipeline_folder(tmp_path_factory.mktemp("tiny-sd") / "tiny-sd")


@pytest.fixture(autouse=True)
def _fresh_cache():
    denoise.clear_cache()
    yield
    denoise.clear_cache()


def _latents(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(4, 8, 12)).astype(np.float32)


def test_loads_unet_ddim_and_cached_embedding(unet_dir: Path) -> None:
    d = denoise.load_denoiser(unet_dir, "cpu")
    assert type(d.unet).__name__ == "UNet2DConditionModel"
    assert type(d.scheduler).__name__ == "DDIMScheduler"
    assert d.embedding.shape == (1, 77, 8)
    assert denoise.load_denoiser(unet_dir, "cpu") is d  # once per process


def test_denoise_is_deterministic_and_moves_latents_a_little(unet_dir: Path) -> None:
    d = denoise.load_denoiser(unet_dir, "cpu")
    z = _latents()
    a, b = d(z, 0.04), d(z, 0.04)
    assert a.shape == z.shape and a.dtype == np.float32 and np.all(np.isfinite(a))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, z)
    assert np.abs(a - z).mean() < 0.5 * np.abs(z).mean()


def test_a_unet_predicting_no_noise_leaves_latents_unchanged(unet_dir: Path) -> None:
    d = denoise.load_denoiser(unet_dir, "cpu")
    unet = copy.deepcopy(d.unet)
    torch.nn.init.zeros_(unet.conv_out.weight)
    torch.nn.init.zeros_(unet.conv_out.bias)
    zero = denoise.Denoiser(unet, d.scheduler, d.embedding, "zero", d.device, d.dtype)
    z = _latents(1)
    for strength in (0.04, 0.3):  # 2 and 15 DDIM steps: the signal scaling round-trips exactly
        assert np.allclose(zero(z, strength), z, atol=1e-5)


def test_bad_strength_and_channel_mismatch(unet_dir: Path) -> None:
    d = denoise.load_denoiser(unet_dir, "cpu")
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="strength"):
            d(_latents(), bad)
    with pytest.raises(ValueError, match="takes 4 latent channels, the file has 3"):
        d(_latents()[:3], 0.04)


def test_missing_unet_is_a_clear_error_and_a_skip_on_decode(tmp_path: Path) -> None:
    with pytest.raises(denoise.UNetNotFoundError, match="DENOISE_MODEL"):
        denoise.load_denoiser(tmp_path / "nothing-here", "cpu")
    z = _latents()
    with pytest.warns(UserWarning, match="denoising skipped"):
        assert denoise.maybe_denoise(z, 0.04, str(tmp_path / "nothing-here"), "cpu") is z


def test_embedding_width_must_fit_the_unet(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    folder = _pipeline_folder(tmp_path / "p", with_embedding=False)
    save_file({denoise.EMBEDDING_KEY: torch.zeros(1, 77, 16)}, str(folder / denoise.EMBEDDING_FILE))
    with pytest.raises(denoise.UNetNotFoundError, match="cross_attention_dim 8"):
        denoise.load_denoiser(folder, "cpu")


def test_empty_prompt_through_a_clip_text_encoder(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    folder = _pipeline_folder(tmp_path / "p", with_embedding=False)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=77)
    tok.save_pretrained(folder / "tokenizer")
    config = transformers.CLIPTextConfig(
        vocab_size=4, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.CLIPTextModel(config).save_pretrained(folder / "text_encoder")

    d = denoise.load_denoiser(folder, "cpu")
    assert d.embedding.shape == (1, 77, 8)
    path = denoise.save_empty_prompt_embedding(str(folder))
    assert path == folder / denoise.EMBEDDING_FILE
    denoise.clear_cache()
    assert torch.equal(denoise.load_denoiser(folder, "cpu").embedding, d.embedding)  # now read from the file


def test_real_sd_unet_when_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        d = denoise.load_denoiser(denoise.DEFAULT_UNET, "cpu")
    except denoise.UNetNotFoundError as exc:
        pytest.skip(f"Stable Diffusion 1.5 U-Net not in the local cache: {str(exc)[:80]}")
    assert d.unet.config.in_channels == 4 and d.embedding.shape == (1, 77, 768)


# ---------------------------------------------------------------- decode option


@pytest.fixture(scope="module")
def sdl_bytes(kodak_dir: Path, taesd_dir: Path) -> bytes:
    with Image.open(kodak_dir / "kodim23.png") as im:
        crop = im.convert("RGB").crop((300, 100, 332, 132))
    buf = io.BytesIO()
    crop.save(buf, "SDL", model=str(taesd_dir), quality=50)
    return buf.getvalue()


def _decode(data: bytes, **opts: object) -> np.ndarray:
    im = pillow_sdlatent.open(io.BytesIO(data), **opts)
    im.load()
    return np.asarray(im)


def test_open_with_denoise(sdl_bytes: bytes, unet_dir: Path, taesd_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("SDLATENT_MODEL", str(taesd_dir))
    plain = _decode(sdl_bytes)
    once = _decode(sdl_bytes, denoise=0.04, denoise_model=str(unet_dir))
    assert once.shape == plain.shape and not np.array_equal(once, plain)
    # the process-wide default, and a per-file 0 that turns it off
    monkeypatch.setattr(pillow_sdlatent.options, "DENOISE", 0.04)
    monkeypatch.setattr(pillow_sdlatent.options, "DENOISE_MODEL", str(unet_dir))
    assert np.array_equal(_decode(sdl_bytes), once)
    assert np.array_equal(_decode(sdl_bytes, denoise=0), plain)


def test_denoise_without_the_unet_decodes_plainly(sdl_bytes: bytes, taesd_dir: Path, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SDLATENT_MODEL", str(taesd_dir))
    plain = _decode(sdl_bytes)
    with pytest.warns(UserWarning, match="denoising skipped"):
        out = _decode(sdl_bytes, denoise=0.04, denoise_model=str(tmp_path / "no-unet"))
    assert np.array_equal(out, plain)
