"""File forging and fuzzing utilities, for this package's tests and benchmarks/fuzz.py (model-free except
the ``load`` target and :func:`model_seeds`).

Seeds are valid small files (the spec's test vectors, when the source tree is there, plus a few built
here). Mutations: bit flips, byte edits, truncations, inserted/deleted ranges, chunk reorders/drops/
duplicates/splices, length-field edits, chunk-type edits, and structure-aware edits whose CRC is
recomputed so that they reach the parser behind the checksum: header fields set to boundary values,
consistent forged image sizes, per-channel table entries, zstd bombs and coder swaps.

Targets (each an entry of :data:`TARGETS`):

* ``reader``: ``core.codec.decode_bytes`` (strict, model-free);
* ``pillow``: ``Image.open`` + ``verify()`` through the plugin (model-free);
* ``tolerant``: ``Image.open`` + ``read_latent_file()`` with ``LOAD_TRUNCATED_IMAGES``;
* ``load``: ``Image.open`` + ``load()``, decoding pixels with a model (TAESD on tiny images).

Allowed outcomes: a consistent result, or one of :data:`ALLOWED` (the exceptions the README documents).
Anything else, a run longer than :data:`HANG_SECONDS`, or a ``MemoryError`` is a :class:`Crash`.
"""

from __future__ import annotations

import hashlib
import io
import random
import signal
import struct
import time
import traceback
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import zstandard
from PIL import Image, ImageFile, UnidentifiedImageError

import pillow_sdlatent

from .core import transform_coder
from .core.codec import LatentFile, build_chunks, decode_bytes, quantize
from .core.container import SIGNATURE, write_chunks
from .core.header import _CHANNEL, _FIXED, FINGERPRINT_SIZE, Header
from .core.settings import QuantSettings

#: The spec's test vectors, where this is a source checkout.
VECTORS = Path(__file__).resolve().parents[1] / "spec" / "vectors"
HEAD_FIXED = _FIXED.size  # the model id's length is its last byte
CHANNEL_ROW = _CHANNEL.itemsize

#: What a reader may raise on bad input (README, "Errors"). UnidentifiedImageError is
#: an OSError; DecompressionBombError is Pillow's own.
ALLOWED: tuple[type[BaseException], ...] = (
    UnidentifiedImageError,
    SyntaxError,
    OSError,
    ValueError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,  # the harness turns the warning into an error: past it, sizes are legal
)

#: A small file must be decided within this time (issue 7).
HANG_SECONDS = 2.0

#: Largest zstd bomb the mutator builds: enough to overflow any declared size of
#: the seeds, small enough to stay inside the address-space cap.
MAX_BOMB = 1 << 26

PKG_DIR = str(Path(pillow_sdlatent.__file__).resolve().parent)


class Crash(Exception):
    """An input made the reader misbehave: wrong exception, inconsistent result, hang."""


class Hang(BaseException):  # BaseException: no ``except Exception`` in the reader swallows it
    pass


# ------------------------------------------------------------------ seeds


def forge_head(data: bytes, model_id: bytes | None = None, extra_rows: int = 0, **fields: int) -> bytes:
    """``data`` with HEAD fields (names of :data:`HEAD_FIELDS`), the model id and ``extra_rows`` copies of the
    last channel-table row changed, every CRC recomputed: forged files that pass the chunk layer."""
    chunks = split_chunks(data)
    if chunks is None:
        raise ValueError("not a well-framed .sdl file")
    head = bytearray(chunks[0][2])
    for name, value in fields.items():
        offset, fmt = HEAD_FIELDS[name]
        struct.pack_into(fmt, head, offset, value)
    if model_id is not None:
        at = HEAD_FIELDS["model_id_length"][0]
        head[at + 1 : at + 1 + head[at]] = model_id
        head[at] = len(model_id)
    head += head[-CHANNEL_ROW:] * extra_rows
    chunks[0] = sealed(b"HEAD", bytes(head))
    return join_chunks(chunks)


def build_file(width: int, height: int, mode: str, channels: int, settings: QuantSettings, seed: int,
               info: dict | None = None, downscale: int = 8, model_id: str = "sdl-fuzz") -> bytes:  # fmt: skip
    """A valid model-free file with random smooth latents (the writer's own code path)."""
    rng = np.random.default_rng(seed)
    shape = (channels, -(-height // downscale), -(-width // downscale))
    latents = (np.cumsum(rng.normal(size=shape), axis=2) * 0.5).astype(np.float32)
    q = quantize(latents, settings)
    header = Header(
        width=width, height=height, mode=mode, channels=channels, latent_height=shape[1], latent_width=shape[2],
        model_id=model_id, fingerprint=hashlib.sha256(model_id.encode()).digest()[:FINGERPRINT_SIZE],
        downscale=downscale, coder=settings.coder, **q.fields,
    )  # fmt: skip
    alpha = rng.integers(0, 256, (height, width), dtype=np.uint8) if mode in ("LA", "RGBA") else None
    buf = io.BytesIO()
    write_chunks(buf, build_chunks(header, q, alpha, info))
    return buf.getvalue()


def built_seeds() -> dict[str, bytes]:
    """Seeds that need neither the spec folder nor a model."""
    meta = {"exif": b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x00", "icc_profile": b"icc" * 5, "xmp": "<x/>"}
    return {
        "scalar-rgb-16": build_file(16, 16, "RGB", 4, QuantSettings("scalar", 76), 1),
        "scalar-rgba-meta": build_file(24, 16, "RGBA", 4, QuantSettings("scalar", 256, coder="raw"), 2, meta),
        "scalar-l-u16": build_file(9, 7, "L", 2, QuantSettings("scalar", 300), 3),
        "palette-la-8": build_file(16, 24, "LA", 4, QuantSettings("palette", 64, 8, dither=0.0), 4),
        "palette-u16-c6": build_file(40, 40, "RGB", 6, QuantSettings("palette", 32, 260, dither=0.0), 5),
        "scalar-ds1": build_file(5, 3, "RGB", 3, QuantSettings("scalar", 16), 6, downscale=1),
        "transform-c5": build_file(40, 24, "RGB", 5, QuantSettings("transform", coder="transform", quality=50), 7),
        "float-bf16-la": build_file(24, 16, "LA", 3, QuantSettings("float", coder="zstd", element="bfloat16"), 8),
        "float-f32-raw": build_file(16, 8, "RGB", 4, QuantSettings("float", coder="raw", element="float32"), 9),
    }


def model_seeds(model: str | None = None) -> dict[str, bytes]:
    """Tiny files written through Pillow with a real model (default: ``SDLATENT_MODEL``)."""
    y, x = np.mgrid[0:40, 0:48]
    rgba = np.stack([x * 5, y * 6, (x + y) * 3, 255 - x * 4], axis=-1).astype(np.uint8)
    base = Image.fromarray(rgba, "RGBA")
    cases = {
        "taesd-rgb-16": (base.convert("RGB").crop((0, 0, 16, 16)), {"quality": 60}),
        "taesd-rgba-48x40": (base, {"quality": 90}),
        "taesd-l-24x16": (base.convert("L").crop((3, 5, 27, 21)), {"quality": 30}),
        "taesd-rgb-scalar": (base.convert("RGB").crop((0, 0, 40, 24)), {"quality": 60, "method": "scalar"}),
        "taesd-la-palette": (base.convert("LA").crop((0, 0, 32, 24)), {"method": "palette", "palette_size": 16}),
    }
    out = {}
    for name, (im, opts) in cases.items():
        buf = io.BytesIO()
        im.save(buf, "SDL", model=model, **opts)
        out[name] = buf.getvalue()
    return out


def seed_files(extra_dirs: tuple[Path, ...] = ()) -> dict[str, bytes]:
    """Built seeds, the spec's test vectors and any ``.sdl`` in ``extra_dirs``."""
    seeds = built_seeds()
    for folder in (VECTORS, *extra_dirs):
        for path in sorted(Path(folder).glob("*.sdl")):
            seeds[path.stem] = path.read_bytes()
    return seeds


# ------------------------------------------------------------------ chunk view


def split_chunks(data: bytes) -> list[list[bytes]] | None:
    """``[[length, type, payload, crc], ...]`` of a well-framed file, else None."""
    if data[:8] != SIGNATURE:
        return None
    out, pos = [], 8
    while pos < len(data):
        if pos + 12 > len(data):
            return None
        (length,) = struct.unpack_from(">I", data, pos)
        if pos + 12 + length > len(data):
            return None
        out.append([data[pos : pos + 4], data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length],
                    data[pos + 8 + length : pos + 12 + length]])  # fmt: skip
        pos += 12 + length
    return out


def join_chunks(chunks: list[list[bytes]]) -> bytes:
    return SIGNATURE + b"".join(b"".join(c) for c in chunks)


def sealed(ctype: bytes, payload: bytes) -> list[bytes]:
    """A chunk with a correct length and CRC."""
    crc = zlib.crc32(payload, zlib.crc32(ctype))
    return [struct.pack(">I", len(payload)), ctype, payload, struct.pack(">I", crc)]


# ------------------------------------------------------------------ mutators

INTERESTING_U8 = (0, 1, 2, 3, 4, 7, 8, 16, 63, 64, 65, 127, 128, 254, 255)
INTERESTING_U16 = (0, 1, 2, 255, 256, 257, 1023, 1024, 1025, 32767, 32768, 65535)
INTERESTING_U32 = (0, 1, 2, 255, 256, 257, 65535, 65536, 65537, (1 << 24) - 1, 1 << 24, (1 << 24) + 1,
                   1 << 30, (1 << 31) - 1, 1 << 31, (1 << 32) - 1)  # fmt: skip
INTERESTING_F32 = (0.0, -0.0, 1e-45, 1e-38, 1.0, -1.0, 3.4e38, -3.4e38, 1e30, float("inf"), float("-inf"),
                   float("nan"))  # fmt: skip

#: HEAD fields: name -> (offset, struct format), after spec section 4.
HEAD_FIELDS = {
    "version_major": (0, "B"), "version_minor": (1, "B"), "width": (2, ">I"), "height": (6, ">I"),
    "mode": (10, "B"), "downscale": (11, "B"), "channels": (12, ">H"), "quantizer": (14, "B"), "coder": (15, "B"),
    "palette_size": (16, ">I"), "model_id_length": (36, "B"),
}  # fmt: skip


def _interesting(fmt: str, rng: random.Random) -> int:
    pool = {"B": INTERESTING_U8, ">H": INTERESTING_U16, ">I": INTERESTING_U32}[fmt]
    return rng.choice(pool) if rng.random() < 0.8 else rng.randrange(1 << (8 * struct.calcsize(fmt)))


def m_bitflip(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 4, 8))):
        i = rng.randrange(len(b) * 8)
        b[i // 8] ^= 1 << (i % 8)
    return bytes(b)


def m_byte(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    b[rng.randrange(len(b))] = rng.choice(INTERESTING_U8) if rng.random() < 0.5 else rng.randrange(256)
    return bytes(b)


def m_word(data: bytes, rng: random.Random) -> bytes:
    """Overwrite a big-endian u32 anywhere (length fields, header sizes, table entries)."""
    if len(data) < 4:
        return data
    i = rng.randrange(len(data) - 3)
    return data[:i] + struct.pack(">I", _interesting(">I", rng)) + data[i + 4 :]


def m_truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data))]


def m_delete(data: bytes, rng: random.Random) -> bytes:
    i = rng.randrange(len(data))
    return data[:i] + data[i + rng.randint(1, 32) :]


def m_insert(data: bytes, rng: random.Random) -> bytes:
    i = rng.randrange(len(data) + 1)
    chunk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    if rng.random() < 0.5 and len(data) > 1:  # duplicate a slice of the file itself
        j = rng.randrange(len(data))
        chunk = data[j : j + rng.randint(1, 64)]
    return data[:i] + chunk + data[i:]


def _chunk_op(fn: Callable[[list[list[bytes]], random.Random], None]) -> Callable[[bytes, random.Random], bytes]:
    def op(data: bytes, rng: random.Random) -> bytes:
        chunks = split_chunks(data)
        if not chunks:
            return m_bitflip(data, rng) if data else data
        fn(chunks, rng)
        return join_chunks(chunks)

    op.__name__ = fn.__name__
    return op


@_chunk_op
def m_swap_chunks(chunks: list[list[bytes]], rng: random.Random) -> None:
    i, j = rng.randrange(len(chunks)), rng.randrange(len(chunks))
    chunks[i], chunks[j] = chunks[j], chunks[i]


@_chunk_op
def m_drop_chunk(chunks: list[list[bytes]], rng: random.Random) -> None:
    del chunks[rng.randrange(len(chunks))]


@_chunk_op
def m_dup_chunk(chunks: list[list[bytes]], rng: random.Random) -> None:
    c = chunks[rng.randrange(len(chunks))]
    chunks.insert(rng.randrange(len(chunks) + 1), list(c))


@_chunk_op
def m_length_field(chunks: list[list[bytes]], rng: random.Random) -> None:
    c = chunks[rng.randrange(len(chunks))]
    (n,) = struct.unpack(">I", c[0])
    new = rng.choice((n - 1, n + 1, n + 4, 0, n * 2, _interesting(">I", rng)))
    c[0] = struct.pack(">I", new % (1 << 32))


@_chunk_op
def m_chunk_type(chunks: list[list[bytes]], rng: random.Random) -> None:
    c = chunks[rng.randrange(len(chunks))]
    t = bytearray(c[1])
    choice = rng.random()
    if choice < 0.4:
        t[0] ^= 0x20  # critical <-> ancillary
    elif choice < 0.7:
        t = bytearray(rng.choice((b"HEAD", b"PLTE", b"ALPH", b"LDAT", b"SEND", b"eXIf", b"iCCP", b"xMPt")))
    else:
        t[rng.randrange(4)] = rng.randrange(256)
    c[1] = bytes(t)
    if rng.random() < 0.7:  # mostly keep the CRC right so the type itself is tested
        c[:] = sealed(c[1], c[2])


@_chunk_op
def m_payload(chunks: list[list[bytes]], rng: random.Random) -> None:
    """Edit a payload and recompute its CRC: reaches the parsers behind the checksum."""
    c = chunks[rng.randrange(len(chunks))]
    p = bytearray(c[2])
    kind = rng.random()
    if p and kind < 0.5:
        for _ in range(rng.randint(1, 4)):
            p[rng.randrange(len(p))] = rng.randrange(256)
    elif kind < 0.7:
        p = p[: rng.randrange(len(p) + 1)]
    elif kind < 0.85:
        p += bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    elif p:
        i = rng.randrange(len(p))
        p[i:i] = p[i : i + rng.randint(1, 32)]
    c[:] = sealed(c[1], bytes(p))


@_chunk_op
def m_unknown_chunk(chunks: list[list[bytes]], rng: random.Random) -> None:
    ctype = rng.choice((b"prVw", b"zZzZ", b"Xtra", b"tEXt", b"HEAD", b"SEND"))
    payload = bytes(rng.randrange(256) for _ in range(rng.randint(0, 24)))
    chunks.insert(rng.randint(1, len(chunks)) if len(chunks) > 1 else 0, sealed(ctype, payload))


def _head_index(chunks: list[list[bytes]]) -> int | None:
    for i, c in enumerate(chunks):
        if c[1] == b"HEAD" and len(c[2]) >= HEAD_FIXED:
            return i
    return None


def _head_op(fn: Callable[[bytearray, random.Random], None]) -> Callable[[bytes, random.Random], bytes]:
    def op(data: bytes, rng: random.Random) -> bytes:
        chunks = split_chunks(data)
        i = _head_index(chunks) if chunks else None
        if i is None:
            return m_word(data, rng)
        payload = bytearray(chunks[i][2])
        fn(payload, rng)
        chunks[i] = sealed(b"HEAD", bytes(payload))
        return join_chunks(chunks)

    op.__name__ = fn.__name__
    return op


@_head_op
def m_head_field(p: bytearray, rng: random.Random) -> None:
    off, fmt = HEAD_FIELDS[rng.choice(list(HEAD_FIELDS))]
    struct.pack_into(fmt, p, off, _interesting(fmt, rng))


@_head_op
def m_head_resize(p: bytearray, rng: random.Random) -> None:
    """Forge a consistent image size (passes validation): oversized counts and bombs."""
    ds = rng.choice((p[11] or 8, 1, 8, 64))
    w = rng.choice((1, 2, 7, 100, 5000, 65535, 1 << 16, 1 << 20, 1 << 24))
    h = rng.choice((1, 3, 64, 10000, 1 << 14, 1 << 24))
    p[11] = ds
    struct.pack_into(">II", p, 2, w, h)


@_head_op
def m_head_table(p: bytearray, rng: random.Random) -> None:
    """Set one per-channel offset, scale or levels entry to a boundary value."""
    start = HEAD_FIXED + p[HEAD_FIXED - 1]
    channels = (len(p) - start) // CHANNEL_ROW
    if channels <= 0:
        return
    base = start + CHANNEL_ROW * rng.randrange(channels)
    which = rng.randrange(3)
    if which < 2:
        struct.pack_into(">f", p, base + 4 * which, rng.choice(INTERESTING_F32))
    else:
        struct.pack_into(">H", p, base + 8, _interesting(">H", rng))


@_head_op
def m_head_channels(p: bytearray, rng: random.Random) -> None:
    """Change the channel count and resize the table to match (oversized counts)."""
    start = HEAD_FIXED + p[HEAD_FIXED - 1]
    new = rng.choice((1, 2, 3, 5, 32, 1024, 1025, 65535))
    row = bytes(p[start : start + CHANNEL_ROW]) or struct.pack(">ffH", 0.0, 1.0, 255)
    struct.pack_into(">H", p, 12, new)
    p[start:] = row * min(new, 2048)


@_head_op
def m_model_id(p: bytearray, rng: random.Random) -> None:
    n = p[HEAD_FIXED - 1]
    new = rng.choice((b"", b"taesd", b"\x00", b"\xff\xfe", b"x" * 255, b"../..", b"sd", b"a/b/c/d"))
    p[HEAD_FIXED : HEAD_FIXED + n] = new
    p[HEAD_FIXED - 1] = len(new) if rng.random() < 0.8 else rng.randrange(256)


def _declared_size(p: bytes) -> int:
    """Bytes the LDAT of header payload ``p`` must decompress to (0 when unreadable)."""
    try:
        _, _, width, height, _, ds, c, quant, _, psize = struct.unpack_from(">BBIIBBHBBI", p)
        start = HEAD_FIXED + p[HEAD_FIXED - 1]
        levels = [struct.unpack_from(">H", p, start + CHANNEL_ROW * i + 8)[0] + 1 for i in range(c)]
    except (struct.error, IndexError):
        return 0
    if not ds:
        return 0
    sym = 2 if levels and max(levels) > 256 else 1
    if quant == 3:  # the float quantizer: the element format's bytes per value (spec section 5.4)
        sym = 4 if psize == 3 else 2
    return -(-height // ds) * -(-width // ds) * ((2 if psize > 256 else 1) if quant == 1 else c * sym)


@_chunk_op
def m_ldat(chunks: list[list[bytes]], rng: random.Random) -> None:
    """Replace LDAT: zstd bombs past the declared size, wrong sizes, garbage frames, coder swaps."""
    hi = _head_index(chunks)
    size = _declared_size(chunks[hi][2]) if hi is not None else 64
    kind = rng.randrange(5)
    if kind == 0:  # a bomb: zeros well past what the header allows
        raw = bytes(min(MAX_BOMB, max(1, size) * rng.choice((2, 64, 4096))))
    elif kind == 1:
        raw = bytes(min(MAX_BOMB, max(0, size + rng.choice((-1, 1, -size)))))
    elif kind == 2:
        raw = bytes(rng.randrange(256) for _ in range(min(size, 4096)))
    else:
        raw = b""
    if kind == 3:
        payload = b"\x28\xb5\x2f\xfd" + bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))
    elif kind == 4 and hi is not None:  # swap the coder byte, payload unchanged
        head = bytearray(chunks[hi][2])
        head[HEAD_FIELDS["coder"][0]] = rng.choice((0, 1, 2, 255))
        chunks[hi] = sealed(b"HEAD", bytes(head))
        return
    else:
        payload = zstandard.ZstdCompressor(level=1, write_content_size=rng.random() < 0.5).compress(raw)
    for i, c in enumerate(chunks):
        if c[1] == b"LDAT":
            chunks[i] = sealed(b"LDAT", payload)
            return
    chunks.insert(max(0, len(chunks) - 1), sealed(b"LDAT", payload))


MUTATORS: tuple[Callable[[bytes, random.Random], bytes], ...] = (
    m_bitflip, m_byte, m_word, m_truncate, m_delete, m_insert, m_swap_chunks, m_drop_chunk, m_dup_chunk,
    m_length_field, m_chunk_type, m_payload, m_unknown_chunk, m_head_field, m_head_resize, m_head_table,
    m_head_channels, m_model_id, m_ldat,
)  # fmt: skip
MUTATOR_NAMES = {m.__name__: m for m in MUTATORS}


def mutate(data: bytes, rng: random.Random, steps: int | None = None) -> bytes:
    for _ in range(steps or rng.choice((1, 1, 1, 2, 3))):
        if not data:
            break
        data = rng.choice(MUTATORS)(data, rng)
    return data


# ------------------------------------------------------------------ targets and oracle


def _check_latent_file(lf: LatentFile) -> None:
    h = lf.header
    want = h.latent_shape
    if h.quantizer == "transform":  # coefficient planes, padded to the 4x4 blocks
        want = (h.channels, *transform_coder.coefficient_shape(h.latent_height, h.latent_width))
    dtype = np.uint32 if h.element == "float32" else np.uint16  # the float quantizer's bit patterns
    if lf.symbols.shape != want or lf.symbols.dtype != dtype:
        raise Crash(f"symbols of shape {lf.symbols.shape} {lf.symbols.dtype}, header says {want}")
    if h.quantizer != "float" and np.any(lf.symbols >= h.levels[:, None, None]):
        raise Crash("symbol beyond its channel's levels returned")
    if not np.all(np.isfinite(lf.latents())):
        raise Crash("non-finite latents returned")
    if (lf.alpha is None) != (h.mode not in ("LA", "RGBA")) or (
        lf.alpha is not None and lf.alpha.shape != (h.height, h.width)
    ):
        raise Crash("alpha plane missing or of the wrong shape")


def target_reader(data: bytes) -> None:
    _check_latent_file(decode_bytes(data))


def target_pillow(data: bytes) -> None:
    with Image.open(io.BytesIO(data), formats=["SDL"]) as im:
        size = im.size
        im.verify()
    if size != (im.header.width, im.header.height):
        raise Crash("Image size differs from the header")


def target_tolerant(data: bytes) -> None:
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        with Image.open(io.BytesIO(data), formats=["SDL"]) as im:
            _check_latent_file(im.read_latent_file())
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def target_load(data: bytes) -> None:
    with Image.open(io.BytesIO(data), formats=["SDL"]) as im:
        im.load()
        if im.im is None or im.size != (im.header.width, im.header.height) or im.mode != im.header.mode:
            raise Crash("loaded image inconsistent with its header")


TARGETS: dict[str, Callable[[bytes], None]] = {
    "reader": target_reader,
    "pillow": target_pillow,
    "tolerant": target_tolerant,
    "load": target_load,
}


def _where(exc: BaseException) -> str:
    """``file:line`` of the innermost frame in our package (else the innermost frame)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if f.filename.startswith(PKG_DIR)] or frames
    if not ours:
        return "?"
    f = ours[-1]
    return f"{Path(f.filename).name}:{f.lineno}"


@contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    def fire(signum: int, frame: object) -> None:
        raise Hang(f"no result after {seconds} s")

    if not hasattr(signal, "setitimer") or signal.getsignal(signal.SIGALRM) not in (signal.SIG_DFL, None):
        yield  # not the main thread or an alarm already in use: time afterwards instead
        return
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_one(target: Callable[[bytes], None], data: bytes, hang_seconds: float = HANG_SECONDS) -> str:
    """Run one input; return its outcome (``ok`` or ``Exc@file:line``), raise :class:`Crash` otherwise."""
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ancillary CRC warnings, numpy notes
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _alarm(hang_seconds * 4):
                target(data)
        outcome = "ok"
    except Crash:
        raise
    except Hang as exc:
        raise Crash(f"hang: {exc}") from exc
    except MemoryError as exc:
        raise Crash(f"allocation beyond the limit at {_where(exc)}") from exc
    except ALLOWED as exc:
        outcome = f"{type(exc).__name__}@{_where(exc)}"
    except Exception as exc:
        raise Crash(f"{type(exc).__name__} at {_where(exc)}: {exc}") from exc
    elapsed = time.perf_counter() - start
    if elapsed > hang_seconds:
        raise Crash(f"took {elapsed:.2f} s (limit {hang_seconds} s)")
    return outcome


def warm_hub_stack() -> None:
    """Import diffusers and the hub client once, so that the first file naming a hub model
    is timed for reading, not for a multi-second import."""
    from pillow_sdlatent.models import load_model

    with suppress(OSError):  # offline: the weights are absent, the import is done
        load_model("sd", "cpu")


def warm_decoder() -> None:
    """Load (or, on a fresh checkout, compile: seconds) the numba transform decoder once, so that no timed case
    pays for it: the hang limit and the address-space cap are there for what a file costs, not for the
    decoder's code."""
    s, _, _, lev, w = transform_coder.quantize(np.zeros((1, 4, 4), np.float32), 60)
    transform_coder.decode_symbols(transform_coder.encode_symbols(s, lev, w), s.shape, lev)
