"""Chunked container: signature, chunks with CRC-32, and the rules for reading them.

Layout (all integers big-endian)::

    signature  8 bytes  89 53 44 4C 0D 0A 1A 0A   ("\\x89SDL\\r\\n\\x1a\\n")
    chunk*     u32 length | 4-byte type | payload[length] | u32 CRC-32(type + payload)

As in PNG, a chunk type whose first letter is lower case is *ancillary*: a reader
that does not know it skips it, and one whose CRC fails is dropped with a warning.
Upper-case types are *critical*: unknown ones and CRC failures are errors.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import BinaryIO

from ..errors import FormatError, TruncatedError

SIGNATURE = b"\x89SDL\r\n\x1a\n"

#: Largest payload a reader accepts for one chunk (as PNG: 2**31 - 1).
MAX_CHUNK_LENGTH = 2**31 - 1


@dataclass(frozen=True)
class Chunk:
    type: bytes
    payload: bytes

    @property
    def critical(self) -> bool:
        return is_critical(self.type)


def is_critical(chunk_type: bytes) -> bool:
    return not chunk_type[0] & 0x20


def _check_type(chunk_type: bytes) -> None:
    if len(chunk_type) != 4 or not chunk_type.isalpha() or not chunk_type.isascii():
        raise FormatError(f"invalid chunk type {chunk_type!r}: 4 ASCII letters expected")


def pack_chunk(chunk_type: bytes, payload: bytes) -> bytes:
    _check_type(chunk_type)
    if len(payload) > MAX_CHUNK_LENGTH:
        raise ValueError(f"chunk {chunk_type.decode()} payload of {len(payload)} bytes exceeds 2**31-1")
    crc = zlib.crc32(payload, zlib.crc32(chunk_type))
    return struct.pack(">I", len(payload)) + chunk_type + payload + struct.pack(">I", crc)


def write_chunks(fp: BinaryIO, chunks: list[Chunk]) -> None:
    fp.write(SIGNATURE + b"".join(pack_chunk(c.type, c.payload) for c in chunks))


def check_signature(prefix: bytes) -> bool:
    return prefix[:8] == SIGNATURE


def _read_exact(fp: BinaryIO, n: int, what: str) -> bytes:
    data = fp.read(n)
    if len(data) != n:
        raise TruncatedError(f"file truncated in {what}: expected {n} bytes, got {len(data)}")
    return data


def read_chunk(fp: BinaryIO, *, max_length: int = MAX_CHUNK_LENGTH) -> Chunk | None:
    """Read one chunk; ``None`` for an ancillary chunk dropped for a bad CRC.

    The payload is read in one call only after its length has been checked
    against ``max_length``, and ``fp.read`` returns no more than the stream
    holds, so a forged length cannot make the reader allocate beyond the file.
    A stream that ends inside the chunk raises :class:`TruncatedError` whose
    ``partial`` attribute holds ``Chunk(type, bytes read so far)``.
    """
    head = _read_exact(fp, 8, "chunk header")
    length, chunk_type = struct.unpack(">I", head[:4])[0], head[4:]
    _check_type(chunk_type)
    name = chunk_type.decode("ascii")
    if length > max_length:
        raise FormatError(f"chunk {name} declares {length} bytes, more than the limit {max_length}")
    payload = fp.read(length)
    crc_bytes = fp.read(4) if len(payload) == length else b""
    if len(crc_bytes) != 4:
        err = TruncatedError(f"file truncated in chunk {name}: {len(payload)} of {length} bytes present")
        err.partial = Chunk(chunk_type, payload)
        raise err
    if zlib.crc32(payload, zlib.crc32(chunk_type)) != struct.unpack(">I", crc_bytes)[0]:
        if is_critical(chunk_type):
            raise FormatError(f"CRC mismatch in critical chunk {name}: the file is corrupt")
        warnings.warn(f"CRC mismatch in ancillary chunk {name}; chunk ignored", stacklevel=3)
        return None
    return Chunk(chunk_type, payload)


def peek_type(fp: BinaryIO) -> bytes | None:
    """Type of the next chunk without consuming it (``None`` at end of stream)."""
    pos = fp.tell()
    head = fp.read(8)
    fp.seek(pos)
    return head[4:] if len(head) == 8 else None
