"""Scalar and palette quantizers, the entropy layer and quality settings (no model)."""

from __future__ import annotations

import numpy as np
import pytest

from pillow_sdlatent.core import entropy
from pillow_sdlatent.core.container import FormatError
from pillow_sdlatent.core.palette import imagequant_palette, kmeans_palette
from pillow_sdlatent.core.scalar import dequantize, range_quantize
from pillow_sdlatent.core.settings import settings_for


def _latents(c: int = 4, h: int = 12, w: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (np.cumsum(rng.normal(size=(c, h, w)), axis=2) * 0.5).astype(np.float32)


def test_scalar_error_bounded_by_half_step() -> None:
    x = _latents()
    sym, off, scale, levels = range_quantize(x, 256)
    assert sym.dtype == np.uint16 and sym.max() <= 255 and list(levels) == [256] * 4
    err = np.abs(dequantize(sym, off, scale) - x)
    assert np.all(err <= scale[:, None, None] * 0.5 + 1e-6)
    # Channel extremes are representable exactly (up to float32 rounding).
    assert np.allclose(dequantize(sym, off, scale).min(axis=(1, 2)), x.min(axis=(1, 2)))


def test_dequantize_is_float32_multiply_then_add() -> None:
    sym = np.array([[[0, 1, 255]]], np.uint16)
    off, scale = np.array([-1.5], np.float32), np.array([0.1], np.float32)
    got = dequantize(sym, off, scale)
    want = (np.float32(0.1) * sym.astype(np.float32)) + np.float32(-1.5)
    assert got.dtype == np.float32 and got.tobytes() == want.tobytes()


def test_constant_channel() -> None:
    x = np.full((2, 3, 3), 0.25, np.float32)
    sym, off, scale, _ = range_quantize(x, 16)
    assert np.all(scale == 0) and np.all(dequantize(sym, off, scale) == np.float32(0.25))


def test_scalar_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="finite"):
        range_quantize(np.array([[[np.nan]]], np.float32))
    with pytest.raises(ValueError, match="levels"):
        range_quantize(_latents(), 1)


def test_original_method_maps_fixed_range_to_8_bits() -> None:
    # The original SD method (../shared/models/taesd/README.md): latents mapped from [-3, 3] to uint8, clipped.
    s = settings_for(None, "original", 4)
    assert (s.span, s.levels, s.palette_method) == (3.0, 256, "imagequant")
    x = np.array([[[-4.0, -3.0, 1.0, 3.0, 3.5]]], np.float32)
    sym, off, scale, levels = range_quantize(x, 256, span=3.0)
    assert sym.tolist() == [[[0, 0, 170, 255, 255]]] and list(levels) == [256]
    assert off.tobytes() == np.float32(-3).tobytes() and scale.tobytes() == np.float32(6 / 255).tobytes()
    with pytest.raises(ValueError, match="span"):
        range_quantize(x, 256, span=0.0)


def test_kmeans_palette_deterministic_and_in_range() -> None:
    sym, *_, levels = range_quantize(_latents(c=6), 256)
    p1, i1 = kmeans_palette(sym, levels, colors=32, dither=1.0)
    p2, i2 = kmeans_palette(sym, levels, colors=32, dither=1.0)
    assert np.array_equal(p1, p2) and np.array_equal(i1, i2)
    assert p1.shape[1] == 6 and len(p1) <= 32 and i1.max() < len(p1)


def test_kmeans_beats_imagequant_on_latent_error() -> None:
    # ../shared/notes/latent-palettes.md: libimagequant weights the 4th channel as alpha.
    sym, *_, levels = range_quantize(_latents(h=32, w=32, seed=3), 256)
    errs = []
    for pal, idx in (kmeans_palette(sym, levels, 64, 0.0), imagequant_palette(sym, 64, 0.0)):
        recon = pal[idx].transpose(2, 0, 1).astype(float)
        errs.append(((recon - sym) ** 2).mean())
    assert errs[0] < errs[1]


def test_imagequant_palette_stores_only_the_colours_asked_for() -> None:
    """libimagequant pads its palette to 256 entries; a 16-colour file must not carry 240 padding entries."""
    sym, *_ = range_quantize(_latents(h=32, w=32, seed=5), 256)
    for colors in (16, 64):
        pal, idx = imagequant_palette(sym, colors, 1.0)
        assert len(pal) <= colors and int(idx.max()) == len(pal) - 1


def test_imagequant_needs_four_channels() -> None:
    sym, *_ = range_quantize(_latents(c=3), 256)
    with pytest.raises(ValueError, match="4-channel"):
        imagequant_palette(sym)


def test_zstd_bounded() -> None:
    data = entropy.zstd_compress(b"\x00" * 10_000)
    assert entropy.zstd_decompress(data, 10_000) == b"\x00" * 10_000
    with pytest.raises(FormatError, match="declares a content size of 10000; the header requires 100"):
        entropy.zstd_decompress(data, 100)
    with pytest.raises(FormatError, match="header requires"):
        entropy.zstd_decompress(data, 20_000)
    with pytest.raises(FormatError, match="reserved bit"):
        entropy.zstd_decompress(b"\x28\xb5\x2f\xfd" + b"\xff" * 20, 100)
    with pytest.raises(FormatError, match="corrupt zstd"):  # a well-formed frame whose block is garbage
        entropy.zstd_decompress(b"\x28\xb5\x2f\xfd\x20\x64" + bytes([0x05 | (4 << 3), 0, 0]) + b"\xff" * 4, 100)


def test_zstd_deterministic() -> None:
    payload = np.random.default_rng(1).integers(0, 30, 5000, dtype=np.uint8).tobytes()
    assert entropy.zstd_compress(payload) == entropy.zstd_compress(payload)


def test_quality_validation() -> None:
    for bad in (-1, 101, 50.5, "75", True):
        with pytest.raises(ValueError, match="quality"):
            settings_for(bad)
    with pytest.raises(ValueError, match="method"):
        settings_for(50, method="jpeg")
    with pytest.raises(ValueError, match="4 latent channels"):
        settings_for(50, method="original", channels=32)
    with pytest.raises(ValueError, match="dither"):
        settings_for(50, dither=2)


def test_scalar_dequantize_needs_no_temporaries() -> None:
    # a reader's peak for a large declared image (the fuzzer's tolerant case: 48 M values from 127 bytes) is
    # the symbols plus one float32 plane, not three more planes of products and sums
    import tracemalloc

    sym = np.zeros((3, 512, 512), np.uint16)
    tracemalloc.start()
    try:
        out = dequantize(sym, np.ones(3, np.float32), np.full(3, 0.5, np.float32))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.dtype == np.float32 and np.all(out == 1.0)
    assert peak < 1.1 * out.nbytes
