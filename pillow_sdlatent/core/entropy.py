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


def zstd_compress_parts(parts: list[bytes], level: int = ZSTD_LEVEL) -> bytes:
    """One zstd frame of the concatenated ``parts`` (content size declared) with a block ending at each part's
    end, so that each part gets its own literal statistics (the float quantizer's byte planes); a reader
    sees an ordinary frame."""
    cctx = zstandard.ZstdCompressor(level=level, write_content_size=True, threads=0)
    co = cctx.compressobj(size=sum(len(p) for p in parts))
    out = bytearray()
    for i, part in enumerate(parts):
        out += co.compress(part)
        if i < len(parts) - 1:
            out += co.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    out += co.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)
    return bytes(out)


#: Output is produced in blocks of this size, so memory grows with the bytes that
#: really decompress, never with what a (possibly forged) header declares.
READ_BLOCK = 1 << 20

#: Largest window libzstd may declare (2**31). Any window is accepted: the frame must declare its content
#: size (spec section 5), and libzstd sizes its buffer by the smaller of window and content.
MAX_ZSTD_WINDOW = 1 << 31
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def zstd_frame_end(data: bytes) -> tuple[int | None, int]:
    """(declared content size or None, offset just past the frame) of the zstd frame at the start of
    ``data`` (RFC 8878 section 3.1.1), from its header and block headers alone; FormatError if there is none."""
    if data[:4] != ZSTD_MAGIC:
        raise FormatError("payload does not start with a zstd frame (skippable frames are not allowed)")
    if len(data) < 5:
        raise FormatError("zstd frame header cut short")
    desc = data[4]
    fcs_flag, single, checksum, did_flag = desc >> 6, (desc >> 5) & 1, (desc >> 2) & 1, desc & 3
    if desc & 0x08:
        raise FormatError("zstd frame header sets its reserved bit")
    fcs_len = (1 if single else 0, 2, 4, 8)[fcs_flag]
    p = 5 + (0 if single else 1) + (0, 1, 2, 4)[did_flag]
    if len(data) < p + fcs_len:
        raise FormatError("zstd frame header cut short")
    if did_flag and any(data[p - (0, 1, 2, 4)[did_flag] : p]):
        raise FormatError("zstd frame needs a dictionary")
    size = int.from_bytes(data[p : p + fcs_len], "little") + (256 if fcs_len == 2 else 0) if fcs_len else None
    p += fcs_len
    while True:  # block headers: bit 0 last block, bits 1-2 type, bits 3-23 size
        if len(data) < p + 3:
            raise FormatError("zstd frame cut short")
        bh = int.from_bytes(data[p : p + 3], "little")
        kind, n = (bh >> 1) & 3, bh >> 3
        if kind == 3:
            raise FormatError("zstd block of the reserved type")
        p += 3 + (1 if kind == 1 else n)
        if bh & 1:
            break
    return size, p + 4 * checksum


def check_zstd_frame(data: bytes, size: int, what: str) -> None:
    """Spec section 5: the payload is exactly one zstd frame that declares its content size, ``size``."""
    declared, end = zstd_frame_end(data)
    if declared != size:
        got = "no content size" if declared is None else f"a content size of {declared}"
        raise FormatError(f"zstd frame in {what} declares {got}; the header requires {size}")
    if end != len(data):
        raise FormatError(f"{what} holds {len(data) - end} bytes after its zstd frame")


def _zstd_read(data: bytes, limit: int, out: bytearray) -> None:
    """Append up to ``limit`` decompressed bytes of the first frame to ``out``.

    Raises ``zstandard.ZstdError`` on corrupt data, with what decoded so far in ``out``.
    """
    dctx = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW)
    with dctx.stream_reader(io.BytesIO(data), read_across_frames=False) as reader:
        while len(out) < limit and (block := reader.read(min(READ_BLOCK, limit - len(out)))):
            out += block


def zstd_decompress(data: bytes, size: int, what: str = "payload") -> bytes:
    """Decompress exactly ``size`` bytes; never hold more than ``size + 1``.

    The frame must declare ``size`` as its content size and end the payload; the
    declaration is still not trusted: reading stops after ``size + 1`` bytes, so a
    payload that inflates beyond what the header allows is cut off and rejected.
    """
    check_zstd_frame(data, size, what)
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


def encode_parts(parts: list[bytes], coder: str) -> bytes:
    """:func:`encode` of the concatenated ``parts``, zstd closing a block at each part boundary."""
    if coder == "zstd":
        return zstd_compress_parts(parts)
    return encode(b"".join(parts), coder)


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
