"""Byte-level coders for payloads: raw and zstd, with decompression bounded by the header."""

from __future__ import annotations

import contextlib
import io

import zstandard

from .container import FormatError

ZSTD_LEVEL = 19


def zstd_compress(data: bytes, level: int = ZSTD_LEVEL) -> bytes:
    # threads=0 (single-threaded) and a fixed level: the same input gives the same bytes.
    return zstandard.ZstdCompressor(level=level, write_content_size=True, threads=0).compress(data)


#: Output is produced in blocks of this size, so memory grows with the bytes that
#: really decompress, never with what a (possibly forged) header declares.
READ_BLOCK = 1 << 20

#: Largest zstd window a reader accepts when the payload itself is smaller (spec, "Limits"):
#: enough for any level-19 stream, small enough that a tiny file cannot make the
#: decompressor reserve libzstd's default 128 MiB.
MAX_ZSTD_WINDOW = 1 << 23


def _zstd_read(data: bytes, limit: int, out: bytearray) -> None:
    """Append up to ``limit`` decompressed bytes of the first frame to ``out``.

    Raises ``zstandard.ZstdError`` on corrupt data, with what decoded so far in ``out``.
    """
    window = min(max(MAX_ZSTD_WINDOW, limit), 1 << 31)
    dctx = zstandard.ZstdDecompressor(max_window_size=window)
    with dctx.stream_reader(io.BytesIO(data), read_across_frames=False) as reader:
        while len(out) < limit and (block := reader.read(min(READ_BLOCK, limit - len(out)))):
            out += block


def zstd_decompress(data: bytes, size: int, what: str = "payload") -> bytes:
    """Decompress exactly ``size`` bytes; never hold more than ``size + 1``.

    The declared content size in the zstd frame is not trusted: reading stops
    after ``size + 1`` bytes, so a payload that inflates beyond what the header
    allows is cut off and rejected.
    """
    out = bytearray()
    try:
        _zstd_read(data, size + 1, out)
    except zstandard.ZstdError as exc:
        raise FormatError(f"corrupt zstd data in {what}: {exc}") from exc
    if len(out) != size:
        raise FormatError(
            f"{what} decompresses to {'more than' if len(out) > size else len(out)} bytes; header requires {size}"
        )
    return bytes(out)


def encode(data: bytes, coder: str) -> bytes:
    if coder == "raw":
        return data
    if coder == "zstd":
        return zstd_compress(data)
    raise ValueError(f"unknown byte coder {coder!r}")


def decode(data: bytes, coder: str, size: int, what: str = "payload") -> bytes:
    if coder == "raw":
        if len(data) != size:
            raise FormatError(f"{what} holds {len(data)} bytes; header requires {size}")
        return data
    if coder == "zstd":
        return zstd_decompress(data, size, what)
    raise FormatError(f"unknown coder {coder!r} for {what}")


def decode_prefix(data: bytes, coder: str, size: int) -> bytes:
    """Best-effort decoding of a truncated payload: the bytes that decode, at most ``size``."""
    if coder == "raw":
        return data[:size]
    out = bytearray()
    with contextlib.suppress(zstandard.ZstdError):  # what decoded before the cut is kept
        _zstd_read(data, size, out)
    return bytes(out)
