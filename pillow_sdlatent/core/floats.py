"""The float quantizer's model-free layer (spec section 5.4): latents stored as the bit patterns of a float
format, exactly, split into byte planes.

Element formats: ``float16`` (IEEE binary16), ``bfloat16`` (the top half of a binary32) and ``float32`` (IEEE
binary32). A value's bit pattern is a ``b``-byte unsigned integer (``b`` = 2, 2, 4); the ``LDAT`` bytes are its
byte planes, most significant first: byte 0 of every value (channel-major, row-major), then byte 1, and so on.
Each plane is about as compressible as its own order-0 entropy (the top plane holds sign and exponent), so the
writer closes a zstd block at each plane boundary (:func:`pillow_sdlatent.core.entropy.zstd_compress_parts`).
"""

from __future__ import annotations

import numpy as np

#: element format -> its bit pattern's (unsigned) dtype; the byte width is its itemsize.
BITS = {"float16": np.dtype(np.uint16), "bfloat16": np.dtype(np.uint16), "float32": np.dtype(np.uint32)}
#: Exponent fields all ones (infinity or NaN): the masks a reader rejects (spec section 5.4).
EXPONENT = {"float16": 0x7C00, "bfloat16": 0x7F80, "float32": 0x7F800000}
#: Largest finite value of each format.
LARGEST = {"float16": 65504.0, "bfloat16": 3.3895313892515355e38, "float32": 3.4028234663852886e38}


def width(element: str) -> int:
    """Bytes per value."""
    return BITS[element].itemsize


def to_bits(latents: np.ndarray, element: str) -> np.ndarray:
    """The bit patterns (same shape, uint16 or uint32) of float32 ``latents`` rounded to ``element``
    (to nearest, ties to even; exact for values that are already in the format, negative zero and subnormals
    included). Raises ValueError for non-finite values or values beyond the format's range."""
    x = np.ascontiguousarray(latents, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError("latents contain NaN or infinity; the float quantizer stores finite values only")
    if element == "float32":
        return x.view(np.uint32).copy()
    if element == "float16":
        with np.errstate(over="ignore"):
            bits = x.astype(np.float16).view(np.uint16)
    elif element == "bfloat16":
        u = x.view(np.uint32).astype(np.uint64)
        bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest, ties to even
    else:
        raise ValueError(f"unknown element format {element!r}; choose one of {', '.join(BITS)}")
    if np.any(bits & EXPONENT[element] == EXPONENT[element]):
        big = float(np.abs(x).max())
        raise ValueError(
            f"latent value {big:g} is beyond {element}'s range (largest {LARGEST[element]:g}); store as "
            f"{'bfloat16 or float32' if element == 'float16' else 'float32'}"
        )
    return bits


def from_bits(bits: np.ndarray, element: str) -> np.ndarray:
    """float32 values of bit patterns of ``element`` (exact: every value of the three formats is a binary32)."""
    if element == "float32":
        return bits.astype(np.uint32, copy=False).view(np.float32)
    if element == "float16":
        return bits.astype(np.uint16, copy=False).view(np.float16).astype(np.float32)
    return (bits.astype(np.uint32) << 16).view(np.float32)


def finite(bits: np.ndarray, element: str) -> bool:
    """Whether every pattern is a finite value (its exponent field not all ones)."""
    mask = BITS[element].type(EXPONENT[element])
    return not np.any(bits & mask == mask)


def planes(bits: np.ndarray) -> list[bytes]:
    """The byte planes of the patterns, most significant first, each in the patterns' (row-major) order."""
    be = np.ascontiguousarray(bits).astype(bits.dtype.newbyteorder(">"), copy=False).reshape(-1)
    by = be.view(np.uint8).reshape(-1, bits.dtype.itemsize)
    return [by[:, k].tobytes() for k in range(bits.dtype.itemsize)]


def from_planes(data: bytes, count: int, element: str) -> np.ndarray:
    """``count`` bit patterns (uint16/uint32, flat) from their ``width * count`` plane bytes."""
    b = width(element)
    if len(data) != b * count:
        raise ValueError(f"{len(data)} plane bytes for {count} values of {b} bytes")
    by = np.frombuffer(data, np.uint8).reshape(b, count)
    out = by[0].astype(BITS[element])
    for k in range(1, b):  # shift in the next plane: about 10x faster than a transposing copy
        out <<= 8
        out |= by[k]
    return out
