"""Whole-file encoding and decoding of the latent layer (no model involved).

Writing order: ``HEAD``, metadata (``iCCP``, ``eXIf``, ``xMPt``), ``PLTE``,
``ALPH``, ``LDAT``, ``SEND``. :func:`read_head` stops before the first data
chunk so that opening a file costs one header's worth of I/O.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np

from . import context_coder, entropy, transform_coder
from .container import (
    SIGNATURE,
    Chunk,
    FormatError,
    TruncatedError,
    peek_type,
    read_chunk,
    write_chunks,
)
from .header import Header
from .palette import imagequant_palette, kmeans_palette
from .scalar import dequantize, range_quantize
from .settings import QuantSettings

DATA_CHUNKS = {b"PLTE", b"ALPH", b"LDAT", b"SEND"}
METADATA_CHUNKS = {b"eXIf": "exif", b"iCCP": "icc_profile", b"xMPt": "xmp"}
EXIF_PREFIX = b"Exif\x00\x00"

#: ``ALPH`` filter ids: 0 none, 1 "sub" (each byte minus its left neighbour, mod 256).
ALPHA_FILTERS = (0, 1)


@dataclass
class LatentFile:
    """Everything a file holds below the model: header, symbols, alpha, metadata."""

    header: Header
    symbols: np.ndarray  # (C, h, w) uint16, palette already looked up; transform: (C, H, W) coefficients
    alpha: np.ndarray | None = None  # (height, width) uint8
    info: dict[str, bytes] = field(default_factory=dict)
    truncated: bool = False

    def latents(self) -> np.ndarray:
        """Dequantized float32 latents (C, h, w), bit-exact as the spec defines."""
        h = self.header
        if h.quantizer == "transform":
            return transform_coder.dequantize(
                self.symbols, h.offset, h.scale, h.levels, h.weights or (), (h.latent_height, h.latent_width)
            )
        return dequantize(self.symbols, h.offset, h.scale)


# ---------------------------------------------------------------- writing


def quantize(latents: np.ndarray, settings: QuantSettings) -> tuple[dict, np.ndarray, np.ndarray | None]:
    """Quantize float latents; returns header fields, the LDAT symbol array and the palette."""
    if settings.quantizer == "transform":
        symbols, offset, scale, levels, weights = transform_coder.quantize(latents, settings.quality, settings.grid)
        fields = {"offset": offset, "scale": scale, "levels": levels, "weights": weights}
        return fields | {"quantizer": "transform", "palette_size": 0}, symbols, None
    if settings.coder == "context":
        symbols, offset, scale, levels = context_coder.quantize(latents, settings.quality, grid_=settings.grid)
    else:
        symbols, offset, scale, levels = range_quantize(latents, settings.levels, settings.span)
    fields = {"offset": offset, "scale": scale, "levels": levels, "quantizer": settings.quantizer}
    if settings.quantizer == "scalar":
        return fields | {"palette_size": 0}, symbols, None
    if settings.palette_method == "imagequant":
        palette, indices = imagequant_palette(symbols, settings.palette_size, settings.dither)
    else:
        palette, indices = kmeans_palette(symbols, levels, settings.palette_size, settings.dither)
    return fields | {"palette_size": len(palette)}, indices, palette


def _alpha_payload(alpha: np.ndarray) -> bytes:
    a = np.ascontiguousarray(alpha, dtype=np.uint8)
    sub = a.copy()
    sub[:, 1:] -= a[:, :-1]  # uint8 arithmetic wraps mod 256
    return bytes([1]) + entropy.zstd_compress(sub.tobytes())


def build_chunks(
    header: Header,
    payload_symbols: np.ndarray,
    palette: np.ndarray | None = None,
    alpha: np.ndarray | None = None,
    info: dict[str, bytes | str] | None = None,
    extra: list[Chunk] | None = None,
) -> list[Chunk]:
    """Chunks of a complete file; ``payload_symbols`` is the symbol or index array."""
    header.validate()
    chunks = [Chunk(b"HEAD", header.pack())]
    for ctype, key in METADATA_CHUNKS.items():
        value = (info or {}).get(key)
        if value:
            data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
            if key == "exif" and data.startswith(EXIF_PREFIX):
                data = data[len(EXIF_PREFIX) :]
            chunks.append(Chunk(ctype, data))
    chunks.extend(extra or [])
    if header.quantizer == "palette":
        if palette is None or len(palette) != header.palette_size:
            raise ValueError("palette quantizer needs a palette of palette_size entries")
        chunks.append(Chunk(b"PLTE", np.ascontiguousarray(palette, header.symbol_dtype).tobytes()))
    if header.mode in ("LA", "RGBA"):
        if alpha is None or alpha.shape != (header.height, header.width):
            raise ValueError(f"mode {header.mode} needs an alpha plane of {header.height}x{header.width}")
        chunks.append(Chunk(b"ALPH", _alpha_payload(alpha)))
    if header.coder == "context":
        ldat = context_coder.encode_symbols(payload_symbols, header.levels)
    elif header.coder == "transform":
        if header.weights is None:
            raise ValueError("the transform coder needs the quantizer's band weights (Header.weights)")
        ldat = transform_coder.encode_symbols(payload_symbols, header.levels, header.weights)
    else:
        dtype = header.index_dtype if header.quantizer == "palette" else header.symbol_dtype
        ldat = entropy.encode(np.ascontiguousarray(payload_symbols, dtype).tobytes(), header.coder)
    chunks.append(Chunk(b"LDAT", ldat))
    chunks.append(Chunk(b"SEND", b""))
    return chunks


def write(fp: BinaryIO, chunks: list[Chunk]) -> None:
    write_chunks(fp, chunks)


# ---------------------------------------------------------------- reading


def read_head(fp: BinaryIO) -> tuple[Header, dict[str, bytes]]:
    """Read signature, ``HEAD`` and the metadata chunks before the first data chunk."""
    if fp.read(8) != SIGNATURE:
        raise FormatError("not an SDL file (bad signature)")
    first = read_chunk(fp)
    if first is None or first.type != b"HEAD":
        raise FormatError("first chunk of an SDL file must be HEAD")
    header = Header.unpack(first.payload)
    info: dict[str, bytes] = {}
    while (ctype := peek_type(fp)) is not None and ctype not in DATA_CHUNKS:
        chunk = read_chunk(fp)
        if chunk is not None:
            _take_ancillary(chunk, info)
    return header, info


def _take_ancillary(chunk: Chunk, info: dict[str, bytes]) -> None:
    if chunk.critical:
        raise FormatError(f"unknown critical chunk {chunk.type.decode()}: the file needs a newer reader")
    key = METADATA_CHUNKS.get(chunk.type)
    if key == "exif":
        info[key] = EXIF_PREFIX + chunk.payload
    elif key:
        info[key] = chunk.payload
    else:
        info.setdefault("_ancillary", {})[chunk.type.decode()] = chunk.payload  # type: ignore[index]


def read_body(fp: BinaryIO, header: Header, info: dict, *, allow_truncated: bool = False) -> LatentFile:
    """Read the data chunks after :func:`read_head` and decode the symbols.

    With ``allow_truncated`` (Pillow's ``LOAD_TRUNCATED_IMAGES``), a stream cut
    short yields what could be decoded; missing latents decode to the symbol
    nearest 0 in each channel and a missing alpha plane to opaque.
    """
    data: dict[bytes, bytes] = {}
    truncated = False
    while True:
        try:
            chunk = read_chunk(fp)
        except TruncatedError as exc:
            if not allow_truncated:
                raise
            truncated = True
            if exc.partial is not None and exc.partial.type in DATA_CHUNKS and exc.partial.type not in data:
                data[exc.partial.type] = exc.partial.payload
            break
        if chunk is None:
            continue
        if chunk.type == b"SEND":
            break
        if chunk.type in DATA_CHUNKS:
            if chunk.type in data:
                raise FormatError(f"duplicate {chunk.type.decode()} chunk")
            data[chunk.type] = chunk.payload
        else:
            _take_ancillary(chunk, info)
    symbols = _decode_symbols(header, data, truncated)
    alpha = _decode_alpha(header, data.get(b"ALPH"), truncated) if header.mode in ("LA", "RGBA") else None
    return LatentFile(header, symbols, alpha, info, truncated)


def _zero_symbols(header: Header) -> np.ndarray:
    safe = np.where(header.scale > 0, header.scale, 1)
    return np.clip(np.rint(-header.offset / safe), 0, header.levels.astype(np.int64) - 1).astype(np.uint16)


def _decode_symbols(header: Header, data: dict[bytes, bytes], truncated: bool) -> np.ndarray:
    c, h, w = header.latent_shape
    sym_dtype = header.symbol_dtype
    if header.quantizer == "palette":
        if b"PLTE" not in data:
            raise FormatError("palette-quantized file has no PLTE chunk")
        need = header.palette_size * c * sym_dtype.itemsize
        if len(data[b"PLTE"]) != need:
            raise FormatError(f"PLTE holds {len(data[b'PLTE'])} bytes; header requires {need}")
        palette = np.frombuffer(data[b"PLTE"], sym_dtype).reshape(header.palette_size, c).astype(np.uint16)
        if np.any(palette >= header.levels[None, :]):
            raise FormatError("palette entry out of its channel's range")
        count, dtype, limit = h * w, header.index_dtype, header.palette_size
    else:
        count, dtype, limit = c * h * w, sym_dtype, None
    if header.coder == "context":
        return _decode_context(header, data.get(b"LDAT"), truncated)
    if header.coder == "transform":
        return _decode_transform(header, data.get(b"LDAT"), truncated)
    size = count * dtype.itemsize
    if b"LDAT" not in data:
        if not truncated:
            raise FormatError("file has no LDAT chunk")
        raw = b""
    elif truncated:
        raw = entropy.decode_prefix(data[b"LDAT"], header.coder, size)
    else:
        raw = entropy.decode(data[b"LDAT"], header.coder, size, "LDAT")
    values = np.frombuffer(raw[: len(raw) // dtype.itemsize * dtype.itemsize], dtype).astype(np.uint16)
    if header.quantizer == "palette":
        if np.any(values >= limit):
            raise FormatError(f"palette index out of range (palette has {limit} entries)")
        if len(values) < count:  # truncated: fill with the entry nearest latent 0
            lat = dequantize(palette.T, header.offset, header.scale)
            values = np.concatenate([values, np.full(count - len(values), (lat**2).sum(0).argmin(), np.uint16)])
        return palette[values.reshape(h, w)].transpose(2, 0, 1).copy()
    if len(values) < count:
        fill = np.repeat(_zero_symbols(header)[:, None], h * w, axis=1).reshape(-1)
        fill[: len(values)] = values
        values = fill
    symbols = values.reshape(c, h, w)
    if np.any(symbols >= header.levels[:, None, None]):
        raise FormatError("latent symbol out of its channel's range")
    return symbols


def _decode_context(header: Header, payload: bytes | None, truncated: bool) -> np.ndarray:
    """Coder 2: the range-coded stream decodes as a whole or not at all."""
    try:
        if payload is None:
            raise FormatError("file has no LDAT chunk")
        return context_coder.decode_symbols(payload, header.latent_shape, header.levels)
    except ValueError as exc:  # FormatError is a ValueError too
        if not truncated:
            raise FormatError(f"corrupt LDAT (context coder): {exc}") from exc
        # Tolerant mode: a cut range-coded stream has no usable prefix; every value decodes to latent 0.
        c, h, w = header.latent_shape
        return np.repeat(_zero_symbols(header)[:, None], h * w, axis=1).reshape(c, h, w)


def _decode_transform(header: Header, payload: bytes | None, truncated: bool) -> np.ndarray:
    """Coder 3, like coder 2, decodes as a whole or not at all; tolerant mode falls back to the channel means."""
    c, h, w = header.latent_shape
    shape = (c, *transform_coder.coefficient_shape(h, w))
    try:
        if payload is None:
            raise FormatError("file has no LDAT chunk")
        symbols, header.weights = transform_coder.decode_symbols(payload, shape, header.levels)
        with np.errstate(over="ignore", invalid="ignore"):
            z = transform_coder.dequantize(symbols, header.offset, header.scale, header.levels, header.weights, (h, w))
        if not np.all(np.isfinite(z)):  # large steps x weights can overflow float32 where the header's check cannot see
            raise FormatError("transform coefficients dequantize beyond float32")
        return symbols
    except ValueError as exc:
        if not truncated:
            raise FormatError(f"corrupt LDAT (transform coder): {exc}") from exc
        header.weights = (16,) * (transform_coder.BLOCK**2)  # only the zero coefficients remain: any weight
        zero = ((header.levels.astype(np.int64) - 1) // 2).astype(np.uint16)
        return np.repeat(zero[:, None], shape[1] * shape[2], axis=1).reshape(shape)


def _decode_alpha(header: Header, payload: bytes | None, truncated: bool) -> np.ndarray:
    size = header.width * header.height
    if payload is None:
        if not truncated:
            raise FormatError(f"mode {header.mode} file has no ALPH chunk")
        return np.full((header.height, header.width), 255, np.uint8)
    if len(payload) < 1 or payload[0] not in ALPHA_FILTERS:
        raise FormatError("ALPH chunk has an unknown filter")
    if truncated:
        raw = entropy.decode_prefix(payload[1:], "zstd", size)
    else:
        raw = entropy.decode(payload[1:], "zstd", size, "ALPH")
    plane = np.full(size, 0 if payload[0] == 1 else 255, np.uint8)
    plane[: len(raw)] = np.frombuffer(raw, np.uint8)
    plane = plane.reshape(header.height, header.width)
    if payload[0] == 1:
        plane = np.cumsum(plane, axis=1, dtype=np.uint8)
    return plane


def decode_bytes(data: bytes) -> LatentFile:
    """Decode a complete in-memory file (strict: no truncation allowed)."""
    fp = io.BytesIO(data)
    header, info = read_head(fp)
    return read_body(fp, header, info)
