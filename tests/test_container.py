"""Container layer: exact bytes, CRC checks, critical vs ancillary chunks."""

from __future__ import annotations

import io
import struct
import zlib

import pytest

from pillow_sdlatent.core.container import (
    SIGNATURE,
    Chunk,
    FormatError,
    TruncatedError,
    pack_chunk,
    read_chunk,
    write_chunks,
)


def test_signature_is_png_style() -> None:
    # High bit set, CR LF, ^Z, LF: detects 7-bit transfer and line-ending mangling.
    assert bytes([0x89, 0x53, 0x44, 0x4C, 0x0D, 0x0A, 0x1A, 0x0A]) == SIGNATURE


def test_chunk_exact_bytes() -> None:
    packed = pack_chunk(b"LDAT", b"\x01\x02\x03")
    crc = zlib.crc32(b"LDAT\x01\x02\x03")
    assert packed == b"\x00\x00\x00\x03LDAT\x01\x02\x03" + struct.pack(">I", crc)
    assert pack_chunk(b"SEND", b"") == b"\x00\x00\x00\x00SEND" + struct.pack(">I", zlib.crc32(b"SEND"))


def test_write_then_read() -> None:
    buf = io.BytesIO()
    write_chunks(buf, [Chunk(b"HEAD", b"abc"), Chunk(b"eXIf", b"x"), Chunk(b"SEND", b"")])
    buf.seek(8)
    types = [read_chunk(buf).type for _ in range(3)]
    assert types == [b"HEAD", b"eXIf", b"SEND"]


def test_critical_crc_error() -> None:
    data = bytearray(pack_chunk(b"LDAT", b"payload"))
    data[9] ^= 0x01
    with pytest.raises(FormatError, match="CRC mismatch in critical chunk LDAT"):
        read_chunk(io.BytesIO(bytes(data)))


def test_ancillary_crc_error_is_dropped_with_warning() -> None:
    data = bytearray(pack_chunk(b"eXIf", b"payload"))
    data[9] ^= 0x01
    with pytest.warns(UserWarning, match="ancillary chunk eXIf"):
        assert read_chunk(io.BytesIO(bytes(data))) is None


def test_truncated_chunk_keeps_partial_payload() -> None:
    data = pack_chunk(b"LDAT", b"0123456789")[:-6]
    with pytest.raises(TruncatedError) as info:
        read_chunk(io.BytesIO(data))
    assert info.value.partial == Chunk(b"LDAT", b"01234567")


def test_forged_length_does_not_allocate() -> None:
    # A declared 2 GiB chunk in a 20-byte stream: read what is there and report truncation.
    data = struct.pack(">I", 2**31 - 1) + b"LDAT" + b"x" * 8
    with pytest.raises(TruncatedError):
        read_chunk(io.BytesIO(data))
    with pytest.raises(FormatError, match="more than the limit"):
        read_chunk(io.BytesIO(struct.pack(">I", 2**31) + b"LDAT"))


@pytest.mark.parametrize("bad", [b"LD4T", b"LDA", b"\xffDAT"])
def test_invalid_chunk_type(bad: bytes) -> None:
    with pytest.raises((FormatError, ValueError)):
        pack_chunk(bad, b"")


def test_format_error_is_oserror_and_valueerror() -> None:
    assert issubclass(FormatError, OSError) and issubclass(FormatError, ValueError)
