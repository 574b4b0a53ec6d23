"""Byte-level coders for payloads: raw and zstd, with decompression bounded by the header."""

from __future__ import annotations

import io

import zstandard

from .container import FormatError

ZSTD_LEVEL = 19


def zstd_compress(data: bytes, level: int = ZSTD_LEVEL) -> bytes:
    # threads=0 (single-threaded) and a fixed level: the same input gives the same bytes.
    return zstandard.ZstdCompressor(level=level, write_content_size=True, threads=0).compress(data)


def zstd_decompress(data: bytes, size: int, what: str = "payload") -> bytes:
    """Decompress exactly ``size`` bytes; never allocate more than ``size + 1``.

    The declared content size in the zstd frame is not trusted: the stream reader
    stops after ``size + 1`` bytes, so a payload that inflates beyond what the
    header allows is cut off and rejected.
    """
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=False) as reader:
            out = reader.read(size + 1)
    except zstandard.ZstdError as exc:
        raise FormatError(f"corrupt zstd data in {what}: {exc}") from exc
    if len(out) != size:
        raise FormatError(
            f"{what} decompresses to {'more than' if len(out) > size else len(out)} bytes; header requires {size}"
        )
    return out


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
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=False) as reader:
            while len(out) < size and (block := reader.read(min(65536, size - len(out)))):
                out += block
    except zstandard.ZstdError:
        pass  # what decoded before the cut is kept
    return bytes(out)
