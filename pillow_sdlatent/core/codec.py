"""Whole-file encoding and decoding of the latent layer (no model involved): one codec object per quantizer id.

Writing order: ``HEAD``, metadata (``iCCP``, ``eXIf``, ``xMPt``), ``prVw``, ``PLTE``, ``ALPH``, ``LDAT``,
``SEND``. :func:`read_head` stops before the first data chunk so that opening a file costs one header's worth
of I/O. Each codec (:data:`CODECS`) quantizes latents, codes its chunks, decodes them and dequantizes, as
spec section 5 defines for its quantizer; the reader rules for odd files are spec section 10's.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np

from . import entropy, floats, transform_coder
from .container import (
    SIGNATURE,
    Chunk,
    FormatError,
    TruncatedError,
    peek_type,
    read_chunk,
    write_chunks,
)
from .header import MAX_LEVELS, Header
from .palette import imagequant_palette, kmeans_palette
from .scalar import dequantize, range_quantize
from .settings import QuantSettings

DATA_CHUNKS = {b"PLTE", b"ALPH", b"LDAT", b"SEND"}
METADATA_CHUNKS = {b"eXIf": "exif", b"iCCP": "icc_profile", b"xMPt": "xmp"}
PREVIEW_CHUNK = b"prVw"
#: Ancillary chunks this reader knows (spec section 3): each counts once, the first copy wins.
KNOWN_ANCILLARY = {*METADATA_CHUNKS, PREVIEW_CHUNK}
EXIF_PREFIX = b"Exif\x00\x00"

#: ``ALPH`` filter ids: 0 none, 1 "sub" (each byte minus its left neighbour, mod 256).
ALPHA_FILTERS = (0, 1)


def look_up(palette: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """The (C, h, w) symbols of palette indices (h, w) into a (K, C) palette (spec section 5.2)."""
    return np.ascontiguousarray(palette[indices].transpose(2, 0, 1))


@dataclass
class Quantized:
    """What a quantizer makes of latents: the ``HEAD`` fields it sets and the symbols its chunks code."""

    fields: dict  # quantizer, palette_size, offset, scale, levels (and element, for the float quantizer)
    payload: np.ndarray  # scalar: (C, h, w) symbols; palette: (h, w) indices; transform: (C, H, W) coefficients;
    # float: (C, h, w) bit patterns
    palette: np.ndarray | None = None  # (K, C) symbols
    weights: tuple[int, ...] | None = None  # transform: the 16 band weights

    def latents(self, shape: tuple[int, int]) -> np.ndarray:
        """The float32 latents (C, h, w) a reader will dequantize from these symbols; ``shape``: (h, w)."""
        return codec_of(self.fields["quantizer"]).dequantize(self._as_decoded(shape))

    def _as_decoded(self, shape: tuple[int, int]) -> Decoded:
        f = self.fields
        symbols = self.payload if self.palette is None else look_up(self.palette, self.payload)
        return Decoded(f["offset"], f["scale"], f["levels"], symbols, self.weights, shape, element=f.get("element"))


@dataclass
class Decoded:
    """A file's decoded symbols with what dequantizing them needs (decode state; ``Header`` stays as read)."""

    offset: np.ndarray
    scale: np.ndarray
    levels: np.ndarray
    symbols: np.ndarray  # (C, h, w) uint16 with the palette looked up; transform: (C, H, W) coefficients;
    # float: (C, h, w) bit patterns (uint16, or uint32 for float32)
    weights: tuple[int, ...] | None
    shape: tuple[int, int]  # latent (h, w)
    latents: np.ndarray | None = None  # the dequantized latents, where decoding already computed them
    element: str | None = None  # the float quantizer's element format


@dataclass
class LatentFile:
    """Everything a file holds below the model: header, symbols, alpha, metadata."""

    header: Header
    decoded: Decoded
    alpha: np.ndarray | None = None  # (height, width) uint8
    info: dict[str, bytes] = field(default_factory=dict)
    truncated: bool = False
    preview: bytes | None = None  # the prVw payload, if any

    @property
    def symbols(self) -> np.ndarray:
        return self.decoded.symbols

    @property
    def weights(self) -> tuple[int, ...] | None:
        return self.decoded.weights

    def latents(self) -> np.ndarray:
        """Dequantized float32 latents (C, h, w), bit-exact as the spec defines (computed once)."""
        if self.decoded.latents is None:
            self.decoded.latents = codec_of(self.header.quantizer).dequantize(self.decoded)
        return self.decoded.latents


# ---------------------------------------------------------------- the codecs


def _ldat(data: dict[bytes, bytes], truncated: bool) -> bytes | None:
    if b"LDAT" not in data and not truncated:
        raise FormatError("file has no LDAT chunk")
    return data.get(b"LDAT")


def _zero_symbols(header: Header) -> np.ndarray:
    """Per channel, the symbol nearest latent 0 (tolerant mode's fill)."""
    safe = np.where(header.scale > 0, header.scale, 1)
    return np.clip(np.rint(-header.offset / safe), 0, header.levels.astype(np.int64) - 1).astype(np.uint16)


def _byte_payload(header: Header, payload: bytes | None, count: int, dtype: np.dtype, truncated: bool) -> np.ndarray:
    """``count`` values of ``dtype`` from a raw or zstd ``LDAT`` (fewer when tolerant mode meets a cut)."""
    size = count * dtype.itemsize
    if payload is None:
        raw = b""
    elif truncated:
        raw = entropy.decode_prefix(payload, header.coder, size)
    else:
        raw = entropy.decode(payload, header.coder, size, "LDAT")
    return np.frombuffer(raw[: len(raw) // dtype.itemsize * dtype.itemsize], dtype)


def _fields(quantizer: str, offset: np.ndarray, scale: np.ndarray, levels: np.ndarray, palette_size: int = 0) -> dict:
    """The HEAD fields a quantizer sets."""
    return {"quantizer": quantizer, "palette_size": palette_size, "offset": offset, "scale": scale, "levels": levels}


class ScalarCodec:
    """Quantizer 0: one symbol per latent value, ``LDAT`` raw or zstd (spec section 5.1)."""

    quantizer = "scalar"
    coders = ("raw", "zstd")

    def quantize(self, latents: np.ndarray, settings: QuantSettings) -> Quantized:
        symbols, offset, scale, levels = range_quantize(latents, settings.levels, settings.span)
        return Quantized(_fields(self.quantizer, offset, scale, levels), symbols)


    def encode(self, header: Header, q: Quantized) -> list[Chunk]:
        data = np.ascontiguousarray(q.payload, header.symbol_dtype).tobytes()
        return [Chunk(b"LDAT", entropy.encode(data, header.coder))]

    def decode(self, header: Header, data: dict[bytes, bytes], truncated: bool) -> Decoded:
        c, h, w = header.latent_shape
        values = _byte_payload(header, _ldat(data, truncated), c * h * w, header.symbol_dtype, truncated)
        if len(values) < c * h * w:  # tolerant mode: the symbol nearest latent 0
            fill = np.empty((c, h * w), np.uint16)
            fill[...] = _zero_symbols(header)[:, None]  # a broadcast fill (np.repeat builds index temporaries)
            fill = fill.reshape(-1)
            fill[: len(values)] = values
            values = fill
        symbols = values.astype(np.uint16).reshape(c, h, w)
        if np.any(symbols >= header.levels[:, None, None]):
            raise FormatError("latent symbol out of its channel's range")
        return Decoded(header.offset, header.scale, header.levels, symbols, None, (h, w))

    def dequantize(self, d: Decoded) -> np.ndarray:
        return dequantize(d.symbols, d.offset, d.scale)


class PaletteCodec(ScalarCodec):
    """Quantizer 1: a palette of latent vectors (``PLTE``) and an index per latent position (spec section 5.2)."""

    quantizer = "palette"

    def quantize(self, latents: np.ndarray, settings: QuantSettings) -> Quantized:
        symbols, offset, scale, levels = range_quantize(latents, settings.levels, settings.span)
        if settings.palette_method == "imagequant":
            palette, indices = imagequant_palette(symbols, settings.palette_size, settings.dither)
        else:
            palette, indices = kmeans_palette(symbols, levels, settings.palette_size, settings.dither)
        return Quantized(_fields(self.quantizer, offset, scale, levels, len(palette)), indices, palette)

    def encode(self, header: Header, q: Quantized) -> list[Chunk]:
        if q.palette is None or len(q.palette) != header.palette_size:
            raise ValueError("palette quantizer needs a palette of palette_size entries")
        plte = Chunk(b"PLTE", np.ascontiguousarray(q.palette, header.symbol_dtype).tobytes())
        data = np.ascontiguousarray(q.payload, header.index_dtype).tobytes()
        return [plte, Chunk(b"LDAT", entropy.encode(data, header.coder))]

    def decode(self, header: Header, data: dict[bytes, bytes], truncated: bool) -> Decoded:
        c, h, w = header.latent_shape
        if b"PLTE" not in data:
            raise FormatError("palette-quantized file has no PLTE chunk")
        need = header.palette_size * c * header.symbol_dtype.itemsize
        if len(data[b"PLTE"]) != need:
            raise FormatError(f"PLTE holds {len(data[b'PLTE'])} bytes; header requires {need}")
        palette = np.frombuffer(data[b"PLTE"], header.symbol_dtype).reshape(header.palette_size, c).astype(np.uint16)
        if np.any(palette >= header.levels[None, :]):
            raise FormatError("palette entry out of its channel's range")
        values = _byte_payload(header, _ldat(data, truncated), h * w, header.index_dtype, truncated)
        if np.any(values >= header.palette_size):
            raise FormatError(f"palette index out of range (palette has {header.palette_size} entries)")
        if len(values) < h * w:  # tolerant mode: the entry nearest latent 0
            lat = dequantize(palette.T, header.offset, header.scale)
            values = np.concatenate([values, np.full(h * w - len(values), (lat**2).sum(0).argmin())])
        symbols = look_up(palette, values.astype(np.intp).reshape(h, w))
        return Decoded(header.offset, header.scale, header.levels, symbols, None, (h, w))


class TransformCodec:
    """Quantizer 2: 4x4 DCT coefficients of each channel, range coded per band (spec sections 5.3, 6)."""

    quantizer = "transform"
    coders = ("transform",)

    def quantize(self, latents: np.ndarray, settings: QuantSettings) -> Quantized:
        symbols, offset, scale, levels, weights = transform_coder.quantize(latents, settings.quality, settings.grid)
        return Quantized(_fields(self.quantizer, offset, scale, levels), symbols, None, weights)

    def encode(self, header: Header, q: Quantized) -> list[Chunk]:
        if q.weights is None:
            raise ValueError("the transform coder needs the quantizer's band weights")
        return [Chunk(b"LDAT", transform_coder.encode_symbols(q.payload, header.levels, q.weights))]

    def decode(self, header: Header, data: dict[bytes, bytes], truncated: bool) -> Decoded:
        c, h, w = header.latent_shape
        shape = (c, *transform_coder.coefficient_shape(h, w))
        payload = _ldat(data, truncated)
        try:
            if payload is None:
                raise ValueError("no LDAT chunk")
            symbols, weights = transform_coder.decode_symbols(payload, shape, header.levels)
        except ValueError as exc:
            if not truncated:
                raise FormatError(f"corrupt LDAT (transform coder): {exc}") from exc
            # Tolerant mode: a cut range-coded stream has no usable prefix; every coefficient is Z_c.
            zero = ((header.levels.astype(np.int64) - 1) // 2).astype(np.uint16)
            symbols, weights = np.empty(shape, np.uint16), (16,) * 16
            symbols[...] = zero[:, None, None]
        d = Decoded(header.offset, header.scale, header.levels, symbols, weights, (h, w))
        d.latents = self.dequantize(d)  # once: the check needs them, and so will the caller
        if not np.isfinite(d.latents).all():  # large steps x weights can overflow float32 (spec section 5.3)
            raise FormatError("transform coefficients dequantize beyond float32")
        return d

    def dequantize(self, d: Decoded) -> np.ndarray:
        return transform_coder.dequantize(d.symbols, d.offset, d.scale, d.levels, d.weights or (16,) * 16, d.shape)

    def twin(self, params: transform_coder.Params):
        """The differentiable torch twin of :meth:`quantize` on fixed ``params`` (imports torch)."""
        from .twins import TransformQuantizer

        return TransformQuantizer(params)


class FloatCodec:
    """Quantizer 3: each latent's bit pattern in a float format (``HEAD`` names it), exactly, as byte planes,
    ``LDAT`` raw or zstd (spec section 5.4)."""

    quantizer = "float"
    coders = ("raw", "zstd")

    def quantize(self, latents: np.ndarray, settings: QuantSettings) -> Quantized:
        if np.ndim(latents) != 3:
            raise ValueError(f"latents must have shape (C, h, w), got {np.shape(latents)}")
        bits = floats.to_bits(latents, settings.element)
        c = bits.shape[0]
        table = np.zeros(c, np.float32), np.ones(c, np.float32), np.full(c, MAX_LEVELS, np.uint32)
        return Quantized({**_fields(self.quantizer, *table), "element": settings.element}, bits)

    def encode(self, header: Header, q: Quantized) -> list[Chunk]:
        return [Chunk(b"LDAT", entropy.encode_parts(floats.planes(q.payload), header.coder))]

    def decode(self, header: Header, data: dict[bytes, bytes], truncated: bool) -> Decoded:
        c, h, w = header.latent_shape
        element = header.element or ""
        size = c * h * w * floats.width(element)
        raw = _byte_payload(header, _ldat(data, truncated), size, np.dtype(np.uint8), truncated).tobytes()
        if len(raw) < size:  # tolerant mode: missing plane bytes are 0 (a cut keeps the top planes)
            raw += bytes(size - len(raw))
        bits = floats.from_planes(raw, c * h * w, element).reshape(c, h, w)
        if not floats.finite(bits, element):
            raise FormatError(f"LDAT holds an infinite or NaN {element} value (spec section 5.4: finite only)")
        return Decoded(header.offset, header.scale, header.levels, bits, None, (h, w), element=element)

    def dequantize(self, d: Decoded) -> np.ndarray:
        return floats.from_bits(d.symbols, d.element or "")


CODECS = {codec.quantizer: codec for codec in (ScalarCodec(), PaletteCodec(), TransformCodec(), FloatCodec())}


def codec_of(quantizer: str) -> ScalarCodec | PaletteCodec | TransformCodec | FloatCodec:
    return CODECS[quantizer]


# ---------------------------------------------------------------- writing


def quantize(latents: np.ndarray, settings: QuantSettings) -> Quantized:
    """Quantize float latents with the settings' quantizer."""
    return codec_of(settings.quantizer).quantize(latents, settings)


def _alpha_payload(alpha: np.ndarray) -> bytes:
    a = np.ascontiguousarray(alpha, dtype=np.uint8)
    sub = a.copy()
    sub[:, 1:] -= a[:, :-1]  # uint8 arithmetic wraps mod 256
    return bytes([1]) + entropy.zstd_compress(sub.tobytes())


def build_chunks(
    header: Header,
    q: Quantized,
    alpha: np.ndarray | None = None,
    info: dict[str, bytes | str] | None = None,
    extra: list[Chunk] | None = None,
) -> list[Chunk]:
    """Chunks of a complete file: ``HEAD``, metadata, ``extra`` (the preview), the codec's chunks, ``SEND``."""
    header.validate()
    codec = codec_of(header.quantizer)
    if header.coder not in codec.coders:
        raise ValueError(f"the {header.quantizer} quantizer codes with {' or '.join(codec.coders)}, not {header.coder}")
    chunks = [Chunk(b"HEAD", header.pack())]
    for ctype, key in METADATA_CHUNKS.items():
        value = (info or {}).get(key)
        if value:
            data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
            if key == "exif" and data.startswith(EXIF_PREFIX):
                data = data[len(EXIF_PREFIX) :]
            chunks.append(Chunk(ctype, data))
    chunks.extend(extra or [])
    if header.mode in ("LA", "RGBA"):
        if alpha is None or alpha.shape != (header.height, header.width):
            raise ValueError(f"mode {header.mode} needs an alpha plane of {header.height}x{header.width}")
        chunks.append(Chunk(b"ALPH", _alpha_payload(alpha)))
    chunks.extend(codec.encode(header, q))
    chunks.append(Chunk(b"SEND", b""))
    return chunks


def write(fp: BinaryIO, chunks: list[Chunk]) -> None:
    write_chunks(fp, chunks)


# ---------------------------------------------------------------- reading


@dataclass
class Head:
    """What :func:`read_head` found before the first data chunk."""

    header: Header
    info: dict[str, bytes]  # exif, icc_profile, xmp
    preview: bytes | None = None
    seen: set[bytes] = field(default_factory=set)  # known ancillary chunk types already taken


def read_head(fp: BinaryIO) -> Head:
    """Read signature, ``HEAD`` and the ancillary chunks before the first data chunk."""
    if fp.read(8) != SIGNATURE:
        raise FormatError("not an SDL file (bad signature)")
    first = read_chunk(fp)
    if first is None or first.type != b"HEAD":
        raise FormatError("first chunk of an SDL file must be HEAD")
    head = Head(Header.unpack(first.payload), {})
    while (ctype := peek_type(fp)) is not None and ctype not in DATA_CHUNKS:
        chunk = read_chunk(fp)
        if chunk is not None:
            _take_ancillary(chunk, head)
    return head


def _take_ancillary(chunk: Chunk, head: Head) -> None:
    """Spec section 3: unknown critical chunks reject the file, unknown ancillary ones are skipped, and a
    known ancillary chunk counts once (a later copy is ignored, with a warning)."""
    if chunk.critical:
        raise FormatError(f"unknown critical chunk {chunk.type.decode()}: the file needs a newer reader")
    if chunk.type not in KNOWN_ANCILLARY:
        return
    if chunk.type in head.seen:
        warnings.warn(f"second {chunk.type.decode()} chunk ignored (the first one counts)", stacklevel=4)
        return
    head.seen.add(chunk.type)
    key = METADATA_CHUNKS.get(chunk.type)
    if key == "exif":
        head.info[key] = EXIF_PREFIX + chunk.payload
    elif key:
        head.info[key] = chunk.payload
    else:
        head.preview = chunk.payload


def _allowed_data_chunks(header: Header) -> set[bytes]:
    """The data chunks a file of this header holds (spec section 3): PLTE only with the palette quantizer,
    ALPH only in modes with alpha."""
    allowed = {b"LDAT"}
    if header.quantizer == "palette":
        allowed.add(b"PLTE")
    if header.mode in ("LA", "RGBA"):
        allowed.add(b"ALPH")
    return allowed


def read_body(fp: BinaryIO, head: Head, *, allow_truncated: bool = False) -> LatentFile:
    """Read the data chunks after :func:`read_head` and decode the symbols.

    With ``allow_truncated`` (Pillow's ``LOAD_TRUNCATED_IMAGES``), a stream cut
    short yields what could be decoded; missing latents decode to the symbol
    nearest 0 in each channel and a missing alpha plane to opaque.
    """
    header = head.header
    allowed = _allowed_data_chunks(header)
    data: dict[bytes, bytes] = {}
    truncated = False
    while True:
        try:
            chunk = read_chunk(fp)
        except TruncatedError as exc:
            if not allow_truncated:
                raise
            truncated = True
            if exc.partial is not None and exc.partial.type in allowed and exc.partial.type not in data:
                data[exc.partial.type] = exc.partial.payload
            break
        if chunk is None:
            continue
        if chunk.type == b"SEND":
            if chunk.payload:
                raise FormatError(f"SEND chunk holds {len(chunk.payload)} bytes; it must be empty")
            break
        if chunk.type in DATA_CHUNKS:
            if chunk.type not in allowed:
                raise FormatError(f"{chunk.type.decode()} chunk in a {header.mode} {header.quantizer} file")
            if chunk.type in data:
                raise FormatError(f"duplicate {chunk.type.decode()} chunk")
            data[chunk.type] = chunk.payload
        else:
            _take_ancillary(chunk, head)
    decoded = codec_of(header.quantizer).decode(header, data, truncated)
    alpha = _decode_alpha(header, data.get(b"ALPH"), truncated) if b"ALPH" in allowed else None
    return LatentFile(header, decoded, alpha, head.info, truncated, head.preview)


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
    return read_body(fp, read_head(fp))
