"""Tiled encoding and decoding: tile plans, blend weights, closeness to the untiled result, hooks."""

from __future__ import annotations

import io
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import psnr
from PIL import Image

import pillow_sdlatent
from pillow_sdlatent import options
from pillow_sdlatent.latents import decode_latents, encode_images
from pillow_sdlatent.models import clear_cache, load_model
from pillow_sdlatent.models.tiling import TilePlan, axis_weights, overlap_for, plan_tiles, run_tiled, spans
from pillow_sdlatent.pipeline import to_tensor, to_uint8


@pytest.fixture(autouse=True)
def _auto_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(options, "TILE_SIZE", None)
    monkeypatch.delenv("SDLATENT_TILE_SIZE", raising=False)


def _count_calls(monkeypatch: pytest.MonkeyPatch, model: object) -> dict[str, int]:
    """Counts the model's forward passes (one per tile), still running them."""
    calls = {"_encode": 0, "_decode": 0}
    for name in calls:
        fn = getattr(model, name)

        def counted(x: torch.Tensor, _fn=fn, _name=name) -> torch.Tensor:
            calls[_name] += 1
            return _fn(x)

        monkeypatch.setattr(model, name, counted)
    return calls


@pytest.fixture(scope="module")
def parrots(kodak_dir: Path) -> np.ndarray:
    """A 256x192 crop of kodim23: big enough for several 128-pixel tiles, fast with TAESD."""
    with Image.open(kodak_dir / "kodim23.png") as im:
        return np.asarray(im.convert("RGB").crop((240, 60, 496, 252)))


# --- plans and weights ---------------------------------------------------------------------------


@pytest.mark.parametrize(("h", "w"), [(42, 65), (8, 200), (333, 17), (16, 16), (100, 9)])
@pytest.mark.parametrize("tile_size", [64, 128, 200])
def test_plan_covers_grid_and_weights_sum_to_one(h: int, w: int, tile_size: int) -> None:
    plan = plan_tiles(h, w, tile_size * tile_size, 8)
    area = (tile_size * tile_size) // 64
    if h * w <= area:
        assert plan is None
        return
    assert plan is not None
    for axis, length in ((plan.rows, h), (plan.cols, w)):
        assert axis[0][0] == 0 and axis[-1][1] == length
        (tile,) = {stop - start for start, stop in axis}  # one tile size per axis
        for (_, prev_stop), (start, _) in pairwise(axis):
            assert prev_stop - start >= overlap_for(tile)
        for scale in (1, 8):
            total = torch.zeros(length * scale, dtype=torch.float64)
            for (start, _), wt in zip(axis, axis_weights(axis, scale), strict=True):
                assert bool((wt >= 0).all())
                total[start * scale : start * scale + len(wt)] += wt
            torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-12)
    tile_px = (plan.rows[0][1] - plan.rows[0][0]) * (plan.cols[0][1] - plan.cols[0][0]) * 64
    assert tile_px <= max(tile_size * tile_size, 64 * 64)  # the budget, or the smallest tile


def test_spans_spread_evenly() -> None:
    assert spans(10, 16, 4) == ((0, 10),)
    s = spans(100, 32, 8)
    overlaps = [a[1] - b[0] for a, b in pairwise(s)]
    assert min(overlaps) >= 8 and max(overlaps) - min(overlaps) <= 1


def test_one_tile_plan_is_exact() -> None:
    """Blending a single tile multiplies by exactly 1: the machinery adds no rounding."""
    x = torch.rand(2, 3, 40, 24)
    out = run_tiled(lambda t: t * 3, x, TilePlan(((0, 5),), ((0, 3),)), 8, 8)
    assert torch.equal(out, x * 3)


# --- TAESD: close to the untiled result -----------------------------------------------------------


def test_taesd_tiled_within_half_a_db(taesd_dir: Path, parrots: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_model(str(taesd_dir), "cpu")
    h, w = parrots.shape[:2]
    x = to_tensor(parrots, 8)
    untiled = to_uint8(model.decode(model.encode(x, tile_size=0), tile_size=0), h, w)
    calls = _count_calls(monkeypatch, model)
    z = model.encode(x, tile_size=128)
    tiled = to_uint8(model.decode(z, tile_size=128), h, w)
    assert calls == {"_encode": 6, "_decode": 6}  # a 24x32 latent grid in 16x16 tiles: 2 rows, 3 columns
    ref = Image.fromarray(parrots)
    gap = psnr(ref, Image.fromarray(untiled)) - psnr(ref, Image.fromarray(tiled))
    assert abs(gap) < 0.5, gap
    assert psnr(Image.fromarray(untiled), Image.fromarray(tiled)) > 30  # no visible seams either


def test_single_tile_is_bit_identical(taesd_dir: Path, kodak_crop: Image.Image) -> None:
    model = load_model(str(taesd_dir), "cpu")
    x = to_tensor(np.asarray(kodak_crop), 8)
    assert model.tile_plan(8, 12, 96) is None and model.tile_plan(8, 12) is None
    z = model.encode(x, tile_size=0)
    for tile_size in (None, 96, 4096):  # auto, exactly the image, larger
        assert torch.equal(model.encode(x, tile_size=tile_size), z)
        assert torch.equal(model.decode(z, tile_size=tile_size), model.decode(z, tile_size=0))


def test_odd_size_through_pillow(taesd_dir: Path, kodak_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 211x157 image, tiled on save and load by ``options.TILE_SIZE``, keeps its size and quality."""
    with Image.open(kodak_dir / "kodim05.png") as im:
        src = im.convert("RGB").crop((100, 50, 311, 207))
    model = load_model(str(taesd_dir), "cpu")

    def roundtrip() -> Image.Image:
        buf = io.BytesIO()
        src.save(buf, "SDL", model=str(taesd_dir), device="cpu", preview=False)
        out = pillow_sdlatent.open(io.BytesIO(buf.getvalue()), model=str(taesd_dir), device="cpu")
        out.load()
        return out

    untiled = roundtrip()
    calls = _count_calls(monkeypatch, model)
    monkeypatch.setattr(options, "TILE_SIZE", 128)
    tiled = roundtrip()
    assert tiled.size == src.size == (211, 157)
    assert calls["_encode"] > 1 and calls["_decode"] > 1
    assert abs(psnr(src, untiled) - psnr(src, tiled)) < 0.5


def test_batches_tile_each_image_alone(taesd_dir: Path, kodak_crop: Image.Image) -> None:
    model = load_model(str(taesd_dir), "cpu")
    x = to_tensor(np.asarray(kodak_crop), 8)
    batch = torch.cat([x, x.flip(-1), x])
    z = model.encode(batch, tile_size=64)
    assert torch.equal(z[0:1], model.encode(x, tile_size=64))
    assert torch.equal(z[0], z[2])


# --- diffusers AutoencoderKL and the hooks ----------------------------------------------------------


def test_tiny_kl_tiled_through_latent_api(tiny_kl_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_model(str(tiny_kl_dir), "cpu")
    assert model.global_norm
    rng = np.random.default_rng(0)
    rgb = np.clip(np.cumsum(rng.normal(0, 8, (80, 136, 3)), axis=1) + 128, 0, 255).astype(np.uint8)
    calls = _count_calls(monkeypatch, model)
    monkeypatch.setattr(options, "TILE_SIZE", 64)
    (z,) = encode_images([rgb], model)
    (im,) = decode_latents([z], model, sizes=[(136, 80)])
    assert z.shape == (4, 10, 17) and im.size == (136, 80)
    assert calls["_encode"] > 1 and calls["_decode"] > 1
    assert bool(torch.isfinite(z).all())
    monkeypatch.setattr(options, "TILE_SIZE", 0)
    (z0,) = encode_images([rgb], model)
    assert not torch.equal(z, z0)  # GroupNorm sees each tile alone: close, not equal
    assert float((z - z0).abs().mean()) < float(z0.abs().mean())


def test_tile_size_sources(tiny_kl_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_model(str(tiny_kl_dir), "cpu")
    assert model.tile_plan(32, 32) is None  # auto: 256x256 pixels fit the CPU budget
    monkeypatch.setenv("SDLATENT_TILE_SIZE", "128")
    assert len(model.tile_plan(32, 32)) > 1
    monkeypatch.setattr(options, "TILE_SIZE", 0)  # the option beats the environment
    assert model.tile_plan(32, 32) is None
    assert len(model.tile_plan(32, 32, tile_size=64)) > 1  # the argument beats both
    with pytest.raises(ValueError, match="tile_size"):
        model.tile_plan(32, 32, tile_size=-1)


def test_nan_guard_runs_per_tile(tiny_kl_dir: Path) -> None:
    clear_cache()  # a fresh bfloat16 model: it warns once
    ref = load_model(str(tiny_kl_dir), "cpu", "float32")
    model = load_model(str(tiny_kl_dir), "cpu", "bfloat16")
    handle = model.vae.decoder.conv_out.register_forward_hook(
        lambda _m, _i, out: out if out.dtype == torch.float32 else out * float("nan")
    )
    try:
        z = torch.randn(1, 4, 12, 16, generator=torch.Generator().manual_seed(0))
        with pytest.warns(RuntimeWarning, match="redoing in float32"):
            img = model.decode(z, tile_size=64)
    finally:
        handle.remove()
    torch.testing.assert_close(img, ref.decode(z, tile_size=64))
