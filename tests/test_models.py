"""Model specs (folders, single files, hub cache, aliases), identity and the NaN/inf guard."""

from __future__ import annotations

import io
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_KL_CONFIG
from PIL import Image

import pillow_sdlatent
from pillow_sdlatent.models import ModelMismatchError, ModelNotFoundError, clear_cache, load_model
from pillow_sdlatent.models.base import NonFiniteOutputError

TINY_TAE_CONFIG = {
    "encoder_block_out_channels": [8, 8, 8, 8],
    "decoder_block_out_channels": [8, 8, 8, 8],
    "latent_channels": 4,
}
#: An SD3/FLUX.1-like layout: 16 channels, shift_factor, no quant convs.
TINY_KL16_CONFIG = {
    **TINY_KL_CONFIG,
    "latent_channels": 16,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every test resolves its own specs; never reach for the network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("SDLATENT_MODEL", raising=False)
    monkeypatch.delenv("SDLATENT_MODEL_PATH", raising=False)
    clear_cache()


def _save_kl(folder: Path, seed: int, **overrides: object) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    AutoencoderKL(**{**TINY_KL_CONFIG, **overrides}).save_pretrained(folder)
    return folder


def _image(h: int = 32, w: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(1, 3, h, w, generator=g)


def _fake_hub_cache(cache: Path, repo_id: str, folder: Path, subfolder: str | None = None) -> None:
    """The layout huggingface_hub leaves after a download: refs/main -> snapshots/<commit>/..."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit / (subfolder or ""))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def _taesd_as_diffusers(taesd_dir: Path, out: Path) -> Path:
    """The shared TAESD weights as a diffusers ``AutoencoderTiny`` folder (what madebyollin/taesd holds)."""
    from diffusers import AutoencoderTiny

    from pillow_sdlatent.models.taesd import find_weights, load_state

    _, enc, dec = find_weights(taesd_dir)
    state = {f"encoder.layers.{k}": v.float() for k, v in load_state(enc).items()}
    for k, v in load_state(dec).items():  # diffusers keeps the input clamp out of its layer list
        idx, rest = k.split(".", 1)
        state[f"decoder.layers.{int(idx) - 1}.{rest}"] = v.float()
    vae = AutoencoderTiny()
    vae.load_state_dict(state)
    vae.save_pretrained(out)
    return out


# --- spec kinds ------------------------------------------------------------------------------


def test_diffusers_folder(tiny_kl_dir: Path) -> None:
    model = load_model(str(tiny_kl_dir), "cpu")
    assert model.model_id == tiny_kl_dir.name
    assert (model.latent_channels, model.downscale, model.dtype) == (4, 8, torch.float32)
    z = model.encode(_image())
    assert z.shape == (1, 4, 4, 6) and z.dtype == torch.float32
    assert model.decode(z).shape == (1, 3, 32, 48)
    assert load_model(str(tiny_kl_dir), "cpu") is model  # cached per (spec, device, dtype)


def test_pipeline_folder_uses_vae_subfolder(tmp_path: Path) -> None:
    _save_kl(tmp_path / "pipe" / "vae", 0)
    model = load_model(str(tmp_path / "pipe"), "cpu")
    assert model.model_id == "pipe" and model.latent_channels == 4


def test_folder_without_model_names_it(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="neither a diffusers nor a TAESD"):
        load_model(str(tmp_path / "empty"), "cpu")


def test_autoencoder_tiny_folder(tmp_path: Path) -> None:
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny(**TINY_TAE_CONFIG).save_pretrained(tmp_path / "tae")
    model = load_model(str(tmp_path / "tae"), "cpu")
    assert model.latent_channels == 4 and model.downscale == 8
    x = _image()
    z = model.encode(x)
    with torch.no_grad():  # AutoencoderTiny latents are used as they come (scaling 1, no shift)
        ref = model.vae.encode(x * 2 - 1).latents
    torch.testing.assert_close(z, ref)


def test_sixteen_channel_kl_with_shift_factor(tmp_path: Path) -> None:
    model = load_model(str(_save_kl(tmp_path / "kl16", 0, **{k: v for k, v in TINY_KL16_CONFIG.items()})), "cpu")
    assert model.latent_channels == 16
    x = _image()
    with torch.no_grad():
        mean = model.vae.encode(x * 2 - 1).latent_dist.mean
        ref_img = (model.vae.decode(mean).sample + 1) / 2
    z = model.encode(x)
    torch.testing.assert_close(z, (mean - 0.1159) * 0.3611)
    torch.testing.assert_close(model.decode(z), ref_img.clamp(0, 1), atol=1e-5, rtol=1e-5)


def test_single_file_with_config_beside(tmp_path: Path, tiny_kl_dir: Path) -> None:
    from safetensors.torch import save_file

    folder_model = load_model(str(tiny_kl_dir), "cpu")
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(tiny_kl_dir / "config.json", single / "config.json")
    save_file(folder_model.vae.state_dict(), str(single / "my-vae.safetensors"))
    model = load_model(str(single / "my-vae.safetensors"), "cpu")
    assert model.model_id == "my-vae"
    assert model.fingerprint == folder_model.fingerprint  # same weights, same identity
    x = _image()
    torch.testing.assert_close(model.encode(x), folder_model.encode(x))


def test_single_file_without_config_offline_says_what_to_do(tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub.constants as hf_constants
    from safetensors.torch import save_file

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    save_file(AutoencoderKL(**TINY_KL_CONFIG).state_dict(), str(tmp_path / "vae.safetensors"))
    with pytest.raises(ModelNotFoundError, match=r"vae\.safetensors.*config\.json beside it"):
        load_model(str(tmp_path / "vae.safetensors"), "cpu")


def test_missing_single_file() -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model("/nonexistent/vae.safetensors", "cpu")


def test_hub_id_missing_from_offline_cache_names_the_id(tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelNotFoundError, match=r"'stabilityai/sd-vae-ft-mse'.*HF_HUB_OFFLINE"):
        load_model("stabilityai/sd-vae-ft-mse", "cpu")
    with pytest.raises(ModelNotFoundError, match=r"'stabilityai/sdxl-vae'"):
        load_model("sdxl", "cpu")  # aliases name the hub id they stand for


def test_hub_id_and_subfolder_from_cache(tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "example/sd-vae", _save_kl(tmp_path / "a", 0))
    _fake_hub_cache(cache, "black-forest-labs/FLUX.1-dev", _save_kl(tmp_path / "b", 1, **TINY_KL16_CONFIG), "vae")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    model = load_model("example/sd-vae", "cpu")
    assert model.model_id == "example/sd-vae" and model.latent_channels == 4
    flux = load_model("flux", "cpu")
    assert flux.model_id == "black-forest-labs/FLUX.1-dev/vae" and flux.latent_channels == 16
    assert load_model("black-forest-labs/FLUX.1-dev/vae", "cpu").fingerprint == flux.fingerprint


def test_taesd_alias_from_cache_matches_taesd_folder(tmp_path: Path, monkeypatch, taesd_dir: Path) -> None:
    """Files written with the TAESD folder decode with diffusers' madebyollin/taesd: same weights, same identity."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "madebyollin/taesd", _taesd_as_diffusers(taesd_dir, tmp_path / "tae"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    folder_model = load_model(str(taesd_dir), "cpu")
    hub_model = load_model("taesd", "cpu")
    assert hub_model.model_id == "madebyollin/taesd"
    assert hub_model.fingerprint == folder_model.fingerprint
    x = _image(64, 64)
    z = folder_model.encode(x)
    torch.testing.assert_close(hub_model.encode(x), z, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hub_model.decode(z), folder_model.decode(z), atol=1e-4, rtol=1e-4)


def test_unknown_spec() -> None:
    with pytest.raises(ModelNotFoundError, match="neither a folder"):
        load_model("no such model", "cpu")


# --- identity ---------------------------------------------------------------------------------


def test_fingerprint_follows_weights_not_precision(tmp_path: Path) -> None:
    a = load_model(str(_save_kl(tmp_path / "a", 0)), "cpu")
    b = load_model(str(_save_kl(tmp_path / "b", 1)), "cpu")
    a16 = load_model(str(tmp_path / "a"), "cpu", "bfloat16")
    assert len(a.fingerprint) == 32
    assert a.fingerprint != b.fingerprint
    assert a16.fingerprint == a.fingerprint and a16 is not a


def _save_sdl(im: Image.Image, model: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "SDL", model=model, device="cpu")
    return buf.getvalue()


def test_wrong_weights_are_refused_unless_allowed(tmp_path: Path) -> None:
    a = _save_kl(tmp_path / "vae", 0)
    b = _save_kl(tmp_path / "other" / "vae", 1)  # same name and architecture, other weights
    im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    data = _save_sdl(im, str(a))
    with pytest.raises(ModelMismatchError, match="allow_model_mismatch"):
        pillow_sdlatent.open(io.BytesIO(data), model=str(b)).load()
    out = pillow_sdlatent.open(io.BytesIO(data), model=str(b), allow_model_mismatch=True)
    out.load()
    assert out.size == im.size
    right = pillow_sdlatent.open(io.BytesIO(data), model=str(a))
    right.load()
    assert right.size == im.size


def test_file_finds_its_model_by_id_and_refuses_impostor(tmp_path: Path, monkeypatch) -> None:
    _save_kl(tmp_path / "good" / "vae", 0)
    _save_kl(tmp_path / "bad" / "vae", 1)
    im = Image.new("RGB", (24, 16), (200, 100, 50))
    data = _save_sdl(im, str(tmp_path / "good" / "vae"))
    monkeypatch.setenv("SDLATENT_MODEL_PATH", str(tmp_path / "good"))
    with Image.open(io.BytesIO(data)) as ok:
        ok.load()
    clear_cache()
    monkeypatch.setenv("SDLATENT_MODEL_PATH", str(tmp_path / "bad"))
    with pytest.raises(ModelMismatchError), Image.open(io.BytesIO(data)) as impostor:
        impostor.load()


def test_channel_count_mismatch_is_refused_even_when_allowed(tmp_path: Path) -> None:
    data = _save_sdl(Image.new("RGB", (16, 16)), str(_save_kl(tmp_path / "kl4", 0)))
    kl16 = _save_kl(tmp_path / "kl16", 0, **TINY_KL16_CONFIG)
    with pytest.raises(ModelMismatchError, match="16 latent channels"):
        pillow_sdlatent.open(io.BytesIO(data), model=str(kl16), allow_model_mismatch=True).load()


# --- precision --------------------------------------------------------------------------------


def _nan_in_low_precision(module: torch.nn.Module) -> torch.utils.hooks.RemovableHandle:
    """A forward hook that poisons outputs in bfloat16 only, like an fp16 overflow would."""

    def hook(_mod, _inp, out):
        return out if out.dtype == torch.float32 else torch.full_like(out, float("nan"))

    return module.register_forward_hook(hook)


def test_nan_guard_redoes_in_float32_and_warns_once(tiny_kl_dir: Path) -> None:
    ref = load_model(str(tiny_kl_dir), "cpu", "float32")
    model = load_model(str(tiny_kl_dir), "cpu", "bfloat16")
    _nan_in_low_precision(model.vae.decoder.conv_out)
    _nan_in_low_precision(model.vae.encoder.conv_out)
    x = _image()
    with pytest.warns(RuntimeWarning, match="NaN/inf in torch.bfloat16 during encode; redoing in float32"):
        z = model.encode(x)
    torch.testing.assert_close(z, ref.encode(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once already: silent now
        img = model.decode(z)
    assert bool(torch.isfinite(img).all())
    torch.testing.assert_close(img, ref.decode(z))


def test_nan_in_float32_is_an_error(tiny_kl_dir: Path) -> None:
    model = load_model(str(tiny_kl_dir), "cpu", "float32")
    handle = model.vae.decoder.conv_out.register_forward_hook(lambda _m, _i, out: out * float("inf"))
    try:
        with pytest.raises(NonFiniteOutputError, match="NaN/inf"):
            model.decode(torch.zeros(1, 4, 2, 2))
    finally:
        handle.remove()


def test_encoding_is_deterministic(tiny_kl_dir: Path) -> None:
    model = load_model(str(tiny_kl_dir), "cpu")
    x = _image()
    assert torch.equal(model.encode(x), model.encode(x))  # the posterior mean, never a sample


def test_model_layer_has_no_import_cycles() -> None:
    """Every import between the modules of models/ (function-level and TYPE_CHECKING ones included) goes one way."""
    import ast

    import pillow_sdlatent.models as pkg

    folder = Path(pkg.__file__).parent
    edges: dict[str, set[str]] = {}
    for path in folder.glob("*.py"):
        deps = edges.setdefault(path.stem, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]
                deps.update(n.split(".")[0] for n in names if (folder / f"{n.split('.')[0]}.py").exists())
    edges.pop("__init__")

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(d == goal or (d not in seen and reaches(d, goal, seen | {d})) for d in edges.get(start, ()))

    assert [m for m in edges if reaches(m, m, set())] == []
