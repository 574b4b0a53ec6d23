"""The ``HEAD`` chunk: image, latent shape, model identity, quantizer and coder.

See ``spec/sdl-v1.md`` for the byte layout; this module is its reference
implementation, and :func:`Header.validate` enforces the limits the spec states.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

import numpy as np

from .container import FormatError

VERSION = (1, 0)

#: Image modes by their code in the header.
MODES = {0: "L", 1: "RGB", 2: "LA", 3: "RGBA"}
MODE_CODES = {v: k for k, v in MODES.items()}

#: Quantizer ids. 0: one symbol per latent value; 1: palette of latent vectors; 2: one symbol per coefficient
#: of a 4x4 DCT of each channel (core/transform_coder.py); 3: each value's bit pattern in a float format, stored
#: exactly (core/floats.py).
QUANTIZERS = {0: "scalar", 1: "palette", 2: "transform", 3: "float"}
QUANTIZER_CODES = {v: k for k, v in QUANTIZERS.items()}

#: Entropy coder ids for the ``LDAT`` payload. 0: none; 1: zstd (scalar, palette and float quantizers); 2: range coder
#: of DCT bands (transform quantizer only, and its only coder; see core/transform_coder.py).
CODERS = {0: "raw", 1: "zstd", 2: "transform"}
CODER_CODES = {v: k for k, v in CODERS.items()}

#: Element formats of the float quantizer, by their code in HEAD's ``palette_size`` field (spec section 5.4):
#: 1 IEEE binary16, 2 bfloat16, 3 IEEE binary32.
ELEMENTS = {1: "float16", 2: "bfloat16", 3: "float32"}
ELEMENT_CODES = {v: k for k, v in ELEMENTS.items()}

# Limits every reader enforces (spec section "Limits").
MAX_DIMENSION = 1 << 24
MAX_CHANNELS = 1024
MAX_LEVELS = 1 << 16
MAX_PALETTE = 1 << 16
MAX_LATENT_VALUES = 1 << 30
MAX_VALUES_PER_PIXEL = 4  # channels <= 4 * downscale**2
MAX_MODEL_ID = 255
#: Bytes of the weights fingerprint kept in HEAD: the first 16 of its SHA-256 (spec section 9).
FINGERPRINT_SIZE = 16

_FIXED = struct.Struct(">BBIIBBHBBI16sB")
_CHANNEL = np.dtype([("offset", ">f4"), ("scale", ">f4"), ("levels_minus_1", ">u2")])


@dataclass
class Header:
    width: int
    height: int
    mode: str
    channels: int
    latent_height: int
    latent_width: int
    model_id: str
    fingerprint: bytes = bytes(FINGERPRINT_SIZE)
    downscale: int = 8
    quantizer: str = "scalar"
    coder: str = "zstd"
    palette_size: int = 0
    offset: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    scale: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    levels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    version: tuple[int, int] = VERSION
    #: The float quantizer's element format (``ELEMENTS``); None for the other quantizers. Stored in the
    #: bytes of ``palette_size``, which is 0 for every quantizer but the palette.
    element: str | None = None

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.latent_height, self.latent_width)

    @property
    def symbol_dtype(self) -> np.dtype:
        """uint8 when every channel's alphabet fits a byte, else big-endian uint16."""
        return np.dtype(np.uint8) if int(self.levels.max()) <= 256 else np.dtype(">u2")

    @property
    def index_dtype(self) -> np.dtype:
        return np.dtype(np.uint8) if self.palette_size <= 256 else np.dtype(">u2")

    def validate(self) -> None:
        """Raise :class:`FormatError` unless every field is within the spec's limits."""

        def bad(msg: str) -> FormatError:
            return FormatError(f"invalid SDL header: {msg}")

        if self.version[0] != VERSION[0]:
            raise bad(f"unsupported major version {self.version[0]} (this reader knows {VERSION[0]})")
        if not (1 <= self.width <= MAX_DIMENSION and 1 <= self.height <= MAX_DIMENSION):
            raise bad(f"image size {self.width}x{self.height} outside 1..{MAX_DIMENSION}")
        if self.mode not in MODE_CODES:
            raise bad(f"unknown mode {self.mode!r}")
        if not 1 <= self.downscale <= 64:
            raise bad(f"downscale factor {self.downscale} outside 1..64")
        if not 1 <= self.channels <= MAX_CHANNELS:
            raise bad(f"{self.channels} latent channels, outside 1..{MAX_CHANNELS}")
        if self.channels > MAX_VALUES_PER_PIXEL * self.downscale**2:
            # No compressing autoencoder stores more values than the pixels it covers; the rule
            # bounds the latent's memory by the (padded) image size that bomb checks see.
            raise bad(
                f"{self.channels} latent channels at factor {self.downscale} hold more than "
                f"{MAX_VALUES_PER_PIXEL} values per pixel"
            )
        want = (math.ceil(self.height / self.downscale), math.ceil(self.width / self.downscale))
        if (self.latent_height, self.latent_width) != want:
            raise bad(
                f"latent size {self.latent_height}x{self.latent_width} does not match "
                f"image {self.width}x{self.height} at factor {self.downscale} (expected {want[0]}x{want[1]})"
            )
        if self.channels * self.latent_height * self.latent_width > MAX_LATENT_VALUES:
            raise bad(f"latent of shape {self.latent_shape} exceeds {MAX_LATENT_VALUES} values")
        if self.quantizer not in QUANTIZER_CODES:
            raise bad(f"unknown quantizer {self.quantizer!r}")
        if self.coder not in CODER_CODES:
            raise bad(f"unknown coder {self.coder!r}")
        if self.quantizer == "palette":
            if not 1 <= self.palette_size <= MAX_PALETTE:
                raise bad(f"palette size {self.palette_size} outside 1..{MAX_PALETTE}")
        elif self.palette_size != 0:
            raise bad(f"palette size must be 0 for the {self.quantizer} quantizer")
        if (self.quantizer == "float") != (self.element is not None):
            raise bad("an element format goes with the float quantizer, and only with it")
        if self.quantizer == "float" and self.element not in ELEMENT_CODES:
            raise bad(f"unknown element format {self.element!r}; the float quantizer knows {', '.join(ELEMENT_CODES)}")
        if (self.quantizer == "transform") != (self.coder == "transform"):
            raise bad("the transform quantizer and the transform coder (2) go together, and only together")
        raw_id = self.model_id.encode("utf-8")
        if len(raw_id) > MAX_MODEL_ID or "\x00" in self.model_id:
            raise bad("model id longer than 255 bytes or containing NUL")
        if len(self.fingerprint) != FINGERPRINT_SIZE:
            raise bad(f"fingerprint must be {FINGERPRINT_SIZE} bytes")
        for name in ("offset", "scale", "levels"):
            if getattr(self, name).shape != (self.channels,):
                raise bad(f"{name} must hold one value per channel")
        if not (np.all(np.isfinite(self.offset)) and np.all(np.isfinite(self.scale))):
            raise bad("dequantization offset/scale must be finite")
        if np.any(self.levels < 2) or np.any(self.levels > MAX_LEVELS):
            raise bad(f"per-channel levels must be in 2..{MAX_LEVELS}")
        # The top symbol must dequantize to a finite float32 too, or a model would decode inf/NaN.
        with np.errstate(over="ignore", invalid="ignore"):
            top = self.scale.astype(np.float32) * (self.levels - 1).astype(np.float32) + self.offset.astype(np.float32)
        if not np.all(np.isfinite(top)):
            raise bad("offset + scale * (levels - 1) overflows float32 in some channel")
        if self.quantizer == "float" and not (
            np.all(self.offset.astype(np.float32).view(np.uint32) == 0)
            and np.all(self.scale == 1)
            and np.all(self.levels == MAX_LEVELS)
        ):
            raise bad("the float quantizer's channel table must hold offset +0.0, scale 1.0, levels 65536")

    def pack(self) -> bytes:
        self.validate()
        raw_id = self.model_id.encode("utf-8")
        fixed = _FIXED.pack(
            self.version[0],
            self.version[1],
            self.width,
            self.height,
            MODE_CODES[self.mode],
            self.downscale,
            self.channels,
            QUANTIZER_CODES[self.quantizer],
            CODER_CODES[self.coder],
            ELEMENT_CODES[self.element] if self.element is not None else self.palette_size,
            self.fingerprint,
            len(raw_id),
        )
        table = np.empty(self.channels, _CHANNEL)
        table["offset"], table["scale"], table["levels_minus_1"] = self.offset, self.scale, self.levels - 1
        return fixed + raw_id + table.tobytes()

    @classmethod
    def unpack(cls, payload: bytes) -> Header:
        if len(payload) < _FIXED.size:
            raise FormatError(f"HEAD chunk of {len(payload)} bytes is shorter than the fixed {_FIXED.size}")
        (vmaj, vmin, width, height, mode, downscale, channels, quant, coder, psize, fp, idlen) = _FIXED.unpack_from(
            payload
        )
        if vmaj != VERSION[0]:
            raise FormatError(f"unsupported SDL major version {vmaj} (this reader knows {VERSION[0]})")
        if mode not in MODES or quant not in QUANTIZERS or coder not in CODERS:
            raise FormatError(f"invalid SDL header: unknown mode {mode}, quantizer {quant} or coder {coder}")
        if not (1 <= width <= MAX_DIMENSION and 1 <= height <= MAX_DIMENSION and 1 <= downscale <= 64):
            raise FormatError(f"invalid SDL header: image {width}x{height} or factor {downscale} out of range")
        element = None
        if QUANTIZERS[quant] == "float":
            if psize not in ELEMENTS:
                raise FormatError(f"invalid SDL header: unknown element format {psize} of the float quantizer")
            element, psize = ELEMENTS[psize], 0
        end_id = _FIXED.size + idlen
        expected = end_id + _CHANNEL.itemsize * channels
        if len(payload) != expected:
            raise FormatError(f"HEAD chunk is {len(payload)} bytes; its fields call for {expected}")
        try:
            model_id = payload[_FIXED.size : end_id].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FormatError("model id in HEAD is not valid UTF-8") from exc
        table = np.frombuffer(payload[end_id:], _CHANNEL)
        header = cls(
            width=width,
            height=height,
            mode=MODES[mode],
            channels=channels,
            latent_height=-(-height // downscale),
            latent_width=-(-width // downscale),
            model_id=model_id,
            fingerprint=fp,
            downscale=downscale,
            quantizer=QUANTIZERS[quant],
            coder=CODERS[coder],
            palette_size=psize,
            offset=table["offset"].astype(np.float32),
            scale=table["scale"].astype(np.float32),
            levels=table["levels_minus_1"].astype(np.uint32) + 1,
            version=(vmaj, vmin),
            element=element,
        )
        header.validate()
        return header
