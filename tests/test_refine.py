"""Encoder-side latent refinement (models/refine.py): it must lower the decoder's error, stay in bounds
on tiles, refuse bad step counts before writing anything, and leave refine=0 files unchanged."""

from __future__ import annotations

import io
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import psnr, roundtrip
from PIL import Image

from pillow_sdlatent import options
from pillow_sdlatent.models import load_model
from pillow_sdlatent.models.refine import refine_latents
from pillow_sdlatent.pipeline import encode_latents, refine_steps, to_tensor


def _decoded_mse(model, x: torch.Tensor, z: torch.Tensor) -> float:
    with torch.inference_mode():
        return float((model.decode(z) - x).square().mean())


@pytest.fixture
def crop_tensor(kodak_crop: Image.Image) -> torch.Tensor:
    return to_tensor(np.asarray(kodak_crop), 8)


def test_refinement_lowers_decoder_error_taesd(taesd_dir: Path, crop_tensor: torch.Tensor) -> None:
    model = load_model(str(taesd_dir), "cpu")
    z = model.encode(crop_tensor)
    before = _decoded_mse(model, crop_tensor, z)
    zr = model.refine(crop_tensor, z, 8)
    assert zr.shape == z.shape and zr.dtype == torch.float32
    after = _decoded_mse(model, crop_tensor, zr)
    assert after < 0.8 * before  # measured: about half (+3 dB) after 8 steps on this crop
    assert torch.equal(z, model.encode(crop_tensor))  # the input latents are not modified in place


def test_refinement_works_for_diffusers_backend(tiny_kl_dir: Path, crop_tensor: torch.Tensor) -> None:
    model = load_model(str(tiny_kl_dir), "cpu")
    z = model.encode(crop_tensor)
    zr = model.refine(crop_tensor, z, 5)
    assert _decoded_mse(model, crop_tensor, zr) < _decoded_mse(model, crop_tensor, z)


def test_tiled_refinement_touches_every_latent(taesd_dir: Path, kodak_dir: Path) -> None:
    model = load_model(str(taesd_dir), "cpu")
    with Image.open(kodak_dir / "kodim23.png") as im:
        x = to_tensor(np.asarray(im.convert("RGB").crop((200, 100, 456, 164))), 8)
    z = model.encode(x)  # 256x64 px -> 32x8 latents; tile_size 64 -> 8-latent tiles (+8 halo): 4 tiles
    zr = refine_latents(model, x, z, 4, tile_size=64)
    assert (zr != z).float().mean() > 0.95
    assert _decoded_mse(model, x, zr) < 0.9 * _decoded_mse(model, x, z)
    whole = refine_latents(model, x, z, 4, tile_size=0)  # 0: never tile
    assert not torch.equal(whole, zr)
    assert _decoded_mse(model, x, zr) < 1.1 * _decoded_mse(model, x, whole)  # tiles cost little


def test_padding_is_not_fitted(taesd_dir: Path) -> None:
    model = load_model(str(taesd_dir), "cpu")
    rgb = np.zeros((20, 20, 3), np.uint8)
    rgb[:, :, 0] = 200
    x = to_tensor(rgb, 8)  # 24x24 after edge padding
    x_fake = x.clone()
    x_fake[:, :, 20:, :] = 1.0  # different padding: the loss must not see it
    x_fake[:, :, :, 20:] = 1.0
    z = model.encode(x)
    a = model.refine(x, z, 3, height=20, width=20)
    b = model.refine(x_fake, z, 3, height=20, width=20)
    assert torch.equal(a, b)


def test_zero_steps_is_identity_and_files_unchanged(taesd_dir: Path, kodak_crop: Image.Image) -> None:
    model = load_model(str(taesd_dir), "cpu")
    z = model.encode(to_tensor(np.asarray(kodak_crop), 8))
    assert model.refine(to_tensor(np.asarray(kodak_crop), 8), z, 0) is z
    plain, _ = roundtrip(kodak_crop, model=str(taesd_dir))
    zero, _ = roundtrip(kodak_crop, model=str(taesd_dir), refine=0)
    assert plain == zero


def test_refined_file_is_better_at_equal_settings(taesd_dir: Path, kodak_dir: Path) -> None:
    with Image.open(kodak_dir / "kodim23.png") as im:
        crop = im.convert("RGB").crop((0, 0, 256, 256))
    data0, im0 = roundtrip(crop, model=str(taesd_dir), quality=60)
    data1, im1 = roundtrip(crop, model=str(taesd_dir), quality=60, refine=10)
    assert psnr(crop, im1) > psnr(crop, im0) + 0.8  # measured +1.5 dB for 3.7% more bytes
    assert len(data1) < 1.1 * len(data0)


@pytest.mark.parametrize("quality", [40, 60, 90])
def test_refinement_never_loses_to_the_encoder(taesd_dir: Path, kodak_crop: Image.Image, quality: int) -> None:
    # On this small smooth crop, latents refined against the float decode decode 3 dB worse once
    # quantized at quality 60; through the quantizer, the best iterate seen (the start included) is kept
    # (best in MSE + rate proxy, test_rate_term_spends_fewer_bits; here the MSE alone is no worse either).
    model = load_model(str(taesd_dir), "cpu")
    x = to_tensor(np.asarray(kodak_crop), 8)
    z = model.encode(x)
    assert _decoded_mse(model, x, model.refine(x, z, 10)) < _decoded_mse(model, x, z)  # float: better...
    _, plain = roundtrip(kodak_crop, model=str(taesd_dir), quality=quality)
    _, refined = roundtrip(kodak_crop, model=str(taesd_dir), quality=quality, refine=10)
    assert psnr(kodak_crop, refined) >= psnr(kodak_crop, plain) - 0.01  # ...and the file never worse


@pytest.mark.parametrize("quality", [10, 30, 60, 95])
def test_every_codec_twin_matches_its_numpy_quantizer(quality: int) -> None:
    # One torch twin per quantizer that refinement aims at (core.codec: each codec with a twin), equal to
    # what a reader dequantizes from the numpy quantizer's symbols, on parameters the latents chose.
    from pillow_sdlatent.core import transform_coder
    from pillow_sdlatent.core.codec import CODECS
    from pillow_sdlatent.core.settings import QuantSettings

    rng = np.random.default_rng(quality)
    z = (np.cumsum(rng.normal(size=(4, 9, 13)), axis=2) * 0.3).astype(np.float32)
    twins = {name: codec for name, codec in CODECS.items() if hasattr(codec, "twin")}
    assert set(twins) == {"transform"}
    params = transform_coder.params(z, quality)
    settings = QuantSettings("transform", coder="transform", quality=quality, grid=params)
    want = twins["transform"].quantize(z, settings).latents(z.shape[1:])
    got = twins["transform"].twin(params)(torch.from_numpy(z)[None])[0].numpy()
    assert np.allclose(got, want, atol=1e-6, rtol=0)
    moved = z + 0.05  # other latents on pinned parameters keep the steps and offsets
    q = twins["transform"].quantize(moved, settings)
    assert q.fields["scale"].tobytes() == np.float32(params[0]).tobytes()
    assert np.allclose(twins["transform"].twin(params)(torch.from_numpy(moved)[None])[0].numpy(),
                       q.latents(z.shape[1:]), atol=1e-6, rtol=0)  # fmt: skip


def test_refine_with_budget_fits(taesd_dir: Path, kodak_crop: Image.Image) -> None:
    budget = 400
    data, out = roundtrip(kodak_crop, model=str(taesd_dir), target_size=budget, refine=4)
    assert len(data) <= budget and out.size == kodak_crop.size


def test_refine_with_other_methods_never_worse(taesd_dir: Path, kodak_crop: Image.Image) -> None:
    for method in ("scalar", "palette"):
        _, plain = roundtrip(kodak_crop, model=str(taesd_dir), method=method, quality=30)
        _, refined = roundtrip(kodak_crop, model=str(taesd_dir), method=method, quality=30, refine=4)
        assert psnr(kodak_crop, refined) >= psnr(kodak_crop, plain) - 0.01


@pytest.mark.parametrize("bad", [-1, True, 2.5, "3"])
def test_bad_step_counts_rejected_before_writing(taesd_dir: Path, kodak_crop: Image.Image, tmp_path: Path,
                                                 bad: object) -> None:  # fmt: skip
    target = tmp_path / "out.sdl"
    with pytest.raises(ValueError, match="refine must be a number of steps >= 0"):
        kodak_crop.save(target, model=str(taesd_dir), refine=bad)
    assert not target.exists() or target.stat().st_size == 0  # Pillow may have created it; nothing written


def test_step_count_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SDLATENT_REFINE", raising=False)
    assert refine_steps() == 0
    monkeypatch.setenv("SDLATENT_REFINE", "7")
    assert refine_steps() == 7
    monkeypatch.setattr(options, "REFINE", 3)
    assert refine_steps() == 3
    assert refine_steps(5) == 5
    monkeypatch.setattr(options, "REFINE", None)
    monkeypatch.setenv("SDLATENT_REFINE", "many")
    with pytest.raises(ValueError, match="SDLATENT_REFINE"):
        refine_steps()


def test_options_refine_reaches_encoder(taesd_dir: Path, kodak_crop: Image.Image,
                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    model = load_model(str(taesd_dir), "cpu")
    rgb = np.asarray(kodak_crop)
    monkeypatch.setattr(options, "REFINE", 2)
    a = encode_latents(model, rgb)
    assert np.array_equal(a, encode_latents(model, rgb, 2))
    assert not np.array_equal(a, encode_latents(model, rgb, 0))


def test_non_finite_step_keeps_last_finite_latents(taesd_dir: Path, crop_tensor: torch.Tensor,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    model = load_model(str(taesd_dir), "cpu")
    z = model.encode(crop_tensor)
    real = type(model)._decode_differentiable
    calls = {"n": 0}

    def flaky(self, latents):
        calls["n"] += 1
        out = real(self, latents)
        return out * float("nan") if calls["n"] >= 3 else out

    monkeypatch.setattr(type(model), "_decode_differentiable", flaky)
    with pytest.warns(RuntimeWarning, match="NaN/inf while refining"):
        zr = model.refine(crop_tensor, z, 10, tile_size=0)
    assert calls["n"] == 3 and bool(torch.isfinite(zr).all())
    monkeypatch.setattr(type(model), "_decode_differentiable", real)
    assert torch.equal(zr, model.refine(crop_tensor, z, 1, tile_size=0))  # z after 1 step decoded finite, after 2 not


def test_cli_refine(taesd_dir: Path, kodak_crop: Image.Image, tmp_path: Path) -> None:
    src = tmp_path / "a.png"
    kodak_crop.save(src)
    base = [sys.executable, "-m", "pillow_sdlatent", "convert", str(src), "--model", str(taesd_dir), "--quiet"]
    bad = subprocess.run([*base, "--refine", "-2"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--refine" in bad.stderr
    ok = subprocess.run([*base, "--refine", "2", "-o", str(tmp_path / "a.sdl")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    ref = io.BytesIO()
    kodak_crop.save(ref, "SDL", model=str(taesd_dir), refine=2)
    out = (tmp_path / "a.sdl").read_bytes()
    assert Image.open(io.BytesIO(out)).size == kodak_crop.size
    assert abs(len(out) - len(ref.getvalue())) <= 0.02 * len(out)  # same encoder (float sums may differ by threads)


def test_latent_api_refines_against_float_decode(taesd_dir: Path, kodak_crop: Image.Image) -> None:
    from pillow_sdlatent import encode_images

    model = load_model(str(taesd_dir), "cpu")
    x = to_tensor(np.asarray(kodak_crop), 8)
    plain, refined = (encode_images([kodak_crop], model, refine=r)[0][None] for r in (0, 3))
    assert _decoded_mse(model, x, refined) < _decoded_mse(model, x, plain)
    tensor_refined = encode_images(x, model, refine=3)
    assert torch.allclose(tensor_refined, refined, atol=1e-4)


def test_rate_term_spends_fewer_bits(taesd_dir: Path, kodak_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The rate term is the coder's own code length of the AC bands (the twin's code_length, within a few percent
    # of what encode_symbols counts for them): refining with it spends fewer of the coder's bits than on the
    # distortion alone, and the kept iterate's cost (distortion + rate term) is never above the start's.
    # float32 steps on every CPU: the margin on this small crop (4%) is within what the bf16 autocast's noise moves.
    from dataclasses import replace

    from pillow_sdlatent.models import refine

    monkeypatch.setattr(refine, "STEP_PRECISION", "float32")

    from pillow_sdlatent.core import transform_coder
    from pillow_sdlatent.core.settings import settings_for
    from pillow_sdlatent.models.refine import search_cost, transform_quantizer

    model = load_model(str(taesd_dir), "cpu")
    with Image.open(kodak_dir / "kodim23.png") as im:
        crop = im.convert("RGB").crop((0, 0, 128, 128))
    x = to_tensor(np.asarray(crop), 8)
    z = model.encode(x)
    grid = transform_coder.params(z[0].numpy(), 60)
    quantizer = transform_quantizer(grid)
    settings = replace(settings_for(60, "transform", 4), grid=grid)

    def nbits(latents: torch.Tensor, ac_only: bool = False) -> float:  # the coder's own ideal code length
        from pillow_sdlatent.core.codec import quantize

        q = quantize(latents[0].numpy(), settings)
        costs: list[float] = []
        transform_coder.encode_symbols(q.payload, q.fields["levels"], q.weights, costs)
        if not ac_only:
            return sum(costs)
        zero = (q.fields["levels"].astype(np.int64) - 1) // 2
        ac, k = 0.0, 3  # the three parameter batches, then per channel 4 DC phases and its coded AC bands
        for c in range(q.payload.shape[0]):
            zz = transform_coder.ZIGZAG
            bands = [i for i, (u, v) in enumerate(zz) if (q.payload[c, u::4, v::4] != zero[c]).any()]
            nb = max(1, max(bands, default=0) + 1)
            ac += sum(costs[k + 4 : k + 4 + nb - 1])
            k += 4 + nb - 1
        return ac

    twin_bits = float(quantizer.code_length(z)(z))
    assert twin_bits == pytest.approx(nbits(z, ac_only=True), rel=0.06)  # measured: 666 against 693 bits
    mse_only = refine_latents(model, x, z, 6, quantizer=quantizer, rate_weight=0)
    with_rate = refine_latents(model, x, z, 6, quantizer=quantizer)
    assert search_cost(model, x, z, with_rate, quantizer) <= search_cost(model, x, z, z, quantizer)
    assert nbits(with_rate) < nbits(mse_only), (nbits(with_rate), nbits(mse_only))


def test_distortion_weighs_area_errors_above_pixel_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    # The pooled MSE: an error the eye sees from a normal distance (a colour cast over an area) must cost more
    # than pixel noise of the same MSE; with no pooled levels the distortion is the plain MSE. (The perceptual
    # term is off here: on a flat image MS-SSIM rightly counts noise as lost structure; test_ms_ssim_values.)
    from pillow_sdlatent.models import refine

    monkeypatch.setattr(refine, "PERCEPTUAL_WEIGHT", 0)
    goal = torch.full((1, 3, 64, 64), 0.5)
    cast = goal + 0.05
    noise = goal + 0.05 * torch.where(torch.rand(goal.shape, generator=torch.Generator().manual_seed(0)) < 0.5, -1, 1)
    assert torch.isclose((cast - goal).square().mean(), (noise - goal).square().mean())
    assert float(refine.distortion(cast, goal)) == pytest.approx((1 + refine.POOLED_LEVELS) * 0.05**2)
    assert float(refine.distortion(noise, goal)) < 1.5 * 0.05**2  # pooling averages the noise away
    monkeypatch.setattr(refine, "POOLED_LEVELS", 0)
    for test in (cast, noise):
        assert float(refine.distortion(test, goal)) == pytest.approx(float((test - goal).square().mean()))


def test_distortion_of_images_smaller_than_the_pooling() -> None:
    # tiles at the image border can be a few pixels wide: pooling stops at a side of 1, and MS-SSIM, whose
    # window is 11 pixels, adds nothing
    from pillow_sdlatent.models.refine import distortion

    goal = torch.zeros((1, 3, 3, 40))
    assert float(distortion(goal + 0.1, goal)) == pytest.approx(2 * 0.1**2)  # full scale + one 2x2 level


def test_ms_ssim_values() -> None:
    # The perceptual term of the distortion (1 - MS-SSIM): 1 for identical images, lower for a blur than for
    # noise of the same MSE (what the pooled MSE cannot tell apart), differentiable, and the published
    # definition: the values pytorch_msssim gives these pairs (0.994565 and 0.997399 there; it averages the
    # coarsest scale's luminance x contrast map where this multiplies their means).
    from pillow_sdlatent.models.msssim import ms_ssim
    from pillow_sdlatent.models.refine import PERCEPTUAL_WEIGHT, distortion

    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 1, 256)
    a = torch.stack([ramp[None, :].expand(256, 256), ramp[:, None].expand(256, 256), (ramp[None, :] * ramp[:, None])])
    a = (0.25 + 0.5 * a + 0.2 * torch.sin(torch.arange(256) / 3.0)[None, :])[None].clamp(0, 1)
    assert float(ms_ssim(a, a)) == pytest.approx(1.0)
    blur = torch.nn.functional.avg_pool2d(a, 5, 1, 2, count_include_pad=False)
    noise = a + torch.randn(a.shape, generator=g) * (blur - a).square().mean().sqrt()
    assert torch.isclose((blur - a).square().mean(), (noise - a).square().mean(), rtol=0.05)
    assert float(ms_ssim(blur, a)) == pytest.approx(0.994565, abs=2e-6)
    assert float(ms_ssim(noise, a)) == pytest.approx(0.997399, abs=2e-6)
    assert PERCEPTUAL_WEIGHT > 0 and float(distortion(blur, a)) > float(distortion(noise, a))
    b = noise.clone().requires_grad_(True)
    (1 - ms_ssim(b, a)).backward()
    assert b.grad is not None and bool(torch.isfinite(b.grad).all()) and float(b.grad.abs().sum()) > 0


def test_soft_rounding_is_continuous_and_cools_to_the_quantizer() -> None:
    # GRADIENT = "soft": the soft dead-zone rounding has no jumps (a usable gradient everywhere, through t = 0
    # included), cools to the file's own rounding, and the twin's soft map cools to the twin.
    from pillow_sdlatent.core import transform_coder
    from pillow_sdlatent.core.twins import soft_dead_zone
    from pillow_sdlatent.models.refine import transform_quantizer

    t = torch.linspace(-3, 3, 60001, dtype=torch.float64)
    hard = torch.sign(t) * torch.floor(t.abs() + transform_coder.RHO)
    for temperature in (100.0, 0.5, 0.1):
        q = soft_dead_zone(t, transform_coder.RHO, temperature)
        slope = 1 / (2 * temperature * math.tanh(1 / (2 * temperature)))  # its steepest; a jump is >= 0.2
        assert q.diff().abs().max() <= 1.01 * slope * 1e-4, temperature
    cold = soft_dead_zone(t, transform_coder.RHO, 1e-3)
    assert ((cold - hard).abs() < 1e-3).double().mean() > 0.99  # all but points on a bin's edge

    z = torch.randn(1, 4, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    quantizer = transform_quantizer(transform_coder.params(z[0].float().numpy(), 60))
    assert ((quantizer.soft(z, 1e-4) - quantizer(z)).abs() < 1e-3).double().mean() > 0.95
    z.requires_grad_(True)
    quantizer.soft(z, 0.1).sum().backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_normalized_gradient_step_moves_by_the_learning_rate_in_rms() -> None:
    # OPTIMIZER = "ngd": each latent moves in proportion to its gradient, the step's rms is the learning rate
    # whatever the loss's scale; a zero gradient moves nothing.
    from pillow_sdlatent.models.refine import NormalizedGradient

    for scale in (1e-6, 1.0, 1e6):
        z = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
        opt = NormalizedGradient([z], 0.1)
        (scale * z * torch.tensor([3.0, -4.0, 0.0, 1.0])).sum().backward()
        before = z.detach().clone()
        opt.step()
        step = z.detach() - before
        assert torch.allclose(step.square().mean().sqrt(), torch.tensor(0.1), rtol=1e-5)
        assert torch.allclose(step / step.abs().max(), -torch.tensor([3.0, -4.0, 0.0, 1.0]) / 4, atol=1e-6)
    z = torch.ones(3, requires_grad=True)
    (z * 0).sum().backward()
    NormalizedGradient([z], 0.1).step()
    assert torch.equal(z.detach(), torch.ones(3))
