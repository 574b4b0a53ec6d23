"""Decompression bombs: forged sizes are refused from the header, inflating payloads are cut off.

Every check here also measures the memory the reader allocated (tracemalloc
sees Python and NumPy allocations): a tiny file must never make it reserve
what its header merely declares.
"""

from __future__ import annotations

import io
import struct
import tracemalloc
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import zstandard
from PIL import Image, ImageFile

import pillow_sdlatent  # noqa: F401  (registers the format)
from pillow_sdlatent.core import entropy
from pillow_sdlatent.core.codec import decode_bytes
from pillow_sdlatent.core.container import FormatError
from pillow_sdlatent.core.settings import QuantSettings
from pillow_sdlatent.testing import HEAD_FIELDS, build_file, join_chunks, sealed, split_chunks

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _pillow_limits_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests hold files to Pillow's MAX_IMAGE_PIXELS; the decode budget, tighter by default, is
    tests/test_hostile.py's."""
    from pillow_sdlatent import options

    monkeypatch.setattr(options, "DECODE_BUDGET", 0)

BASE = build_file(16, 16, "RGB", 4, QuantSettings("scalar", 64), 21)


def forge(data: bytes, ldat: bytes | None = None, alph: bytes | None = None, **fields: int) -> bytes:
    """``data`` with HEAD fields replaced (and LDAT/ALPH payloads), every CRC recomputed."""
    chunks = split_chunks(data)
    assert chunks is not None
    head = bytearray(chunks[0][2])
    for name, value in fields.items():
        offset, fmt = HEAD_FIELDS[name]
        struct.pack_into(fmt, head, offset, value)
    chunks[0] = sealed(b"HEAD", bytes(head))
    for ctype, payload in ((b"LDAT", ldat), (b"ALPH", alph)):
        if payload is not None:
            chunks = [sealed(ctype, payload) if c[1] == ctype else c for c in chunks]
    return join_chunks(chunks)


def sized(data: bytes, width: int, height: int, downscale: int = 8) -> bytes:
    """A consistent forged image size (passes header validation)."""
    return forge(data, width=width, height=height, downscale=downscale)


def peak_of(fn: Callable[[], object]) -> tuple[object, int]:
    """(result or raised exception, peak traced bytes) of ``fn()``."""
    tracemalloc.start()
    try:
        try:
            result: object = fn()
        except Exception as exc:
            result = exc
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def open_sdl(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data), formats=["SDL"])


# ------------------------------------------------------------------ declared dimensions


def test_huge_declared_size_is_a_bomb_error_from_the_header() -> None:
    limit = Image.MAX_IMAGE_PIXELS
    data = sized(BASE, 1 << 16, 1 << 16)  # 4.3 G pixels, in a ~300-byte file
    assert len(data) < 512 and 2 * limit < (1 << 32)
    err, peak = peak_of(lambda: open_sdl(data))
    assert isinstance(err, Image.DecompressionBombError)
    assert peak < MiB


def test_size_between_limit_and_twice_warns_and_reads_nothing() -> None:
    side = int((1.5 * Image.MAX_IMAGE_PIXELS) ** 0.5)
    data = sized(BASE, side, side)
    with pytest.warns(Image.DecompressionBombWarning):
        (im, peak) = peak_of(lambda: open_sdl(data))
    assert isinstance(im, Image.Image) and im.size == (side, side) and peak < MiB
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(Image.DecompressionBombWarning):
            open_sdl(data)


def test_padded_size_counts_for_the_bomb_check() -> None:
    # 2**24 x 1 pixels is under Pillow's limit, but factor 64 decodes 64 rows: 2**30 pixels.
    data = sized(BASE, 1 << 24, 1, downscale=64)
    assert Image.MAX_IMAGE_PIXELS > (1 << 24)
    with pytest.raises(Image.DecompressionBombError, match="padded pixels"):
        open_sdl(data)


def test_latent_values_count_for_the_bomb_check() -> None:
    # Factor 1 with 4 channels: 50 M pixels (under the limit) hold 200 M latent values.
    data = forge(sized(build_file(8, 8, "RGB", 4, QuantSettings("scalar", 16), 22, downscale=1), 10_000, 5_000, 1))
    assert 50_000_000 < Image.MAX_IMAGE_PIXELS < 200_000_000 // 2 + 1
    with pytest.raises(Image.DecompressionBombError, match="latent values"):
        open_sdl(data)


def test_more_latent_values_than_pixels_is_invalid() -> None:
    # No autoencoder stores more than 4 values per pixel: 5 channels at factor 1 are refused.
    four = build_file(4, 4, "RGB", 4, QuantSettings("scalar", 16), 24, downscale=1)
    decode_bytes(four)  # 4 channels at factor 1: the limit itself is valid
    chunks = split_chunks(four)
    head = bytearray(chunks[0][2])
    struct.pack_into(">H", head, HEAD_FIELDS["channels"][0], 5)
    chunks[0] = sealed(b"HEAD", bytes(head + head[-10:]))  # a fifth channel-table row
    with pytest.raises(FormatError, match="values per pixel"):
        decode_bytes(join_chunks(chunks))


def test_tolerant_mode_checks_sizes_before_filling_in() -> None:
    data = sized(BASE, 1 << 15, 1 << 15)[:200]  # truncated in LDAT: tolerant mode would zero-fill
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        err, peak = peak_of(lambda: open_sdl(data).read_latent_file())
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    assert isinstance(err, Image.DecompressionBombError) and peak < MiB


# ------------------------------------------------------------------ inflating payloads


def declared_bytes(data: bytes) -> int:
    return decode_bytes(data).symbols.size  # u8 symbols: one byte each


@pytest.mark.parametrize("content_size", [True, False], ids=["frame-declares-size", "frame-silent"])
def test_zstd_payload_beyond_header_is_cut_off(content_size: bool) -> None:
    need = declared_bytes(BASE)
    bomb = zstandard.ZstdCompressor(level=3, write_content_size=content_size).compress(bytes(64 * MiB))
    assert len(bomb) < 4096  # 64 MiB of zeros in a few KiB
    err, peak = peak_of(lambda: decode_bytes(forge(BASE, ldat=bomb)))
    assert isinstance(err, FormatError) and "content size" in str(err)  # refused from the frame header
    assert peak < 3 * MiB, f"{peak} bytes allocated to reject a {need}-byte latent"


def _declare(frame: bytes, size: int) -> bytes:
    """``frame`` (single segment, 4-byte content size) with its declared content size set to ``size``."""
    assert frame[4] >> 6 == 2 and frame[4] & 0x20 and not frame[4] & 3
    return frame[:5] + struct.pack("<I", size) + frame[9:]


def test_zstd_frame_lying_about_its_size() -> None:
    # A frame header that declares the right size but inflates further is cut off all the same.
    need = declared_bytes(BASE)
    frame = _declare(zstandard.ZstdCompressor(write_content_size=True).compress(bytes(70_000 + need)), need)
    assert zstandard.get_frame_parameters(frame).content_size == need
    err, peak = peak_of(lambda: entropy.zstd_decompress(frame, need, "LDAT"))
    assert isinstance(err, FormatError) and "LDAT" in str(err) and peak < 3 * MiB


def test_declared_latent_far_beyond_payload_allocates_nothing() -> None:
    # The header's latent (within the spec's 2**30 values) is only a bound: memory follows the data.
    data = sized(BASE, 1 << 14, 1 << 14)  # 4 x 2048 x 2048 = 16 M values declared, 100 bytes present
    err, peak = peak_of(lambda: decode_bytes(data))
    assert isinstance(err, FormatError) and peak < 3 * MiB


def test_zstd_window_larger_than_payload_is_accepted_in_little_memory() -> None:
    # Spec section 5: any window; with the content size declared, libzstd's buffer follows the content.
    base = build_file(1040, 1040, "RGB", 4, QuantSettings("scalar", 64), 25)  # 67,600 symbols: 4-byte size
    raw = decode_bytes(base).symbols.astype(np.uint8).tobytes()
    frame = entropy.zstd_compress(raw)
    assert frame[4] == 0xA0  # single segment, 4-byte content size: rewrite as a 128 MiB window
    big = frame[:4] + bytes([0x80, (27 - 10) << 3]) + frame[5:]
    assert zstandard.get_frame_parameters(big).window_size == 128 * MiB
    lf, peak = peak_of(lambda: decode_bytes(forge(base, ldat=big)))
    assert not isinstance(lf, Exception), lf
    assert np.array_equal(lf.symbols, decode_bytes(base).symbols) and peak < 8 * MiB


def test_alpha_bomb_is_cut_off() -> None:
    rgba = build_file(16, 16, "RGBA", 4, QuantSettings("scalar", 64), 23)
    bomb = bytes([0]) + zstandard.ZstdCompressor().compress(bytes(32 * MiB))
    err, peak = peak_of(lambda: decode_bytes(forge(rgba, alph=bomb)))
    assert isinstance(err, FormatError) and "ALPH" in str(err) and peak < 3 * MiB


def test_valid_large_enough_payload_still_decodes() -> None:
    # The block-wise reader returns the same bytes as a one-shot decompression.
    raw = np.random.default_rng(0).integers(0, 200, 3 * MiB + 123, dtype=np.uint8).tobytes()
    assert entropy.zstd_decompress(entropy.zstd_compress(raw, 1), len(raw)) == raw
