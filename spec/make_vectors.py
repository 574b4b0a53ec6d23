"""Regenerate the test vectors in spec/vectors/ (model-free; run from the repository root).

Each ``NAME.sdl`` decodes, by the rules of sdl-v1.md alone, to the float32 latents in ``NAME.latents.npy``
(and ``NAME.alpha.npy`` where the mode has alpha). The files are committed: a reader proves itself by
decoding them, not by regenerating them (zstd's encoder output may change between versions).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import replace
from pathlib import Path

import numpy as np

from pillow_sdlatent.core import entropy, transform_coder
from pillow_sdlatent.core.codec import build_chunks, decode_bytes, quantize
from pillow_sdlatent.core.container import Chunk, write_chunks
from pillow_sdlatent.core.header import Header
from pillow_sdlatent.core.settings import QuantSettings

OUT = Path(__file__).parent / "vectors"
FINGERPRINT = hashlib.sha256(b"sdl test vector weights").digest()[:16]
TRANSFORM = QuantSettings("transform", coder="transform")


def latents(seed: int, shape: tuple[int, int, int]) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = np.cumsum(rng.normal(size=shape), axis=2) * 0.4
    return (smooth + rng.normal(scale=0.3, size=shape)).astype(np.float32)


def alpha(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return ((x * 37 + y * 11) % 256).astype(np.uint8)


VECTORS = {
    # name: (width, height, mode, channels, settings, what it covers)
    "scalar-raw-rgb": (40, 24, "RGB", 4, QuantSettings("scalar", 256, coder="raw"),
                       "scalar quantizer, raw coder, u8 symbols, RGB, `eXIf`"),
    "scalar-zstd-l-u16": (17, 9, "L", 1, QuantSettings("scalar", 1000, coder="zstd"),
                          "1000 levels (u16 symbols), zstd, mode L, one channel"),
    "palette-zstd-rgba": (64, 48, "RGBA", 4, QuantSettings("palette", 256, 16, "kmeans", 1.0, "zstd"),
                          "palette of 16 entries (u8 indices), zstd, RGBA with `ALPH` filter 1 (sub)"),
    "palette-raw-la-c32": (160, 128, "LA", 32, QuantSettings("palette", 256, 300, "kmeans", 0.0, "raw"),
                           "32 channels, a palette of more than 256 entries (u16 indices), raw coder, LA with "
                           "`ALPH` filter 0 (none)"),
    "transform-rgb": (120, 72, "RGB", 4, replace(TRANSFORM, quality=75),
                      "transform quantizer and coder, 4 channels, latent 9 x 15 (coefficient planes 12 x 16), "
                      "RGB, `prVw` preview"),
    "transform-l-c16": (33, 41, "L", 16, replace(TRANSFORM, quality=20),
                        "16 channels (DC features of 3 previous channels; their coefficients are 0 here), "
                        "quality 20 (few coded bands, some channels DC only), explicit band weights (code 255), "
                        "mode L"),
    "transform-1x1-c32": (5, 7, "RGB", 32, replace(TRANSFORM, quality=60),
                          "32 channels of 1 x 1 latents: one block per channel, DC phases 1-3 empty, every channel "
                          "DC only (a 1 x 1 latent pads to a constant block), channel 0 at its offset"),
    "transform-smooth-c4": (200, 176, "RGB", 4, replace(TRANSFORM, quality=95),
                            "smooth latents correlated across channels (non-zero spatial and inter-channel DC "
                            "predictors), DC planes of 6 x 7 (mirrored neighbours at every edge), weight code 27 "
                            "(band weights with halves to round), an even alphabet (channel 1), many coefficients"),
    "float-zstd-fp16-c4": (40, 24, "RGB", 4, QuantSettings("float", coder="zstd", element="float16"),
                           "float quantizer, binary16 (element 1), zstd, 4 channels; negative zero, the smallest "
                           "and the largest subnormal, the largest finite value"),
    "float-raw-bf16-la": (24, 16, "LA", 4, QuantSettings("float", coder="raw", element="bfloat16"),
                          "bfloat16 (element 2), raw coder, LA with `ALPH`; negative zero, subnormals, the "
                          "largest finite value"),
    "float-zstd-fp32-l-c16": (17, 9, "L", 16, QuantSettings("float", coder="zstd", element="float32"),
                              "binary32 (element 3), zstd, 16 channels, mode L; negative zero, subnormals, the "
                              "largest finite value"),
}  # fmt: skip
#: Band weights instead of the quantizer's own (the first: no weight code gives them, the stream stores all 16).
WEIGHTS = {"transform-l-c16": tuple(16 + 3 * u + 5 * v for u in range(4) for v in range(4)),
           "transform-smooth-c4": transform_coder.weights_of_code(27)}  # fmt: skip
#: The float vectors' first values: negative zero, the smallest subnormal, the largest subnormal (negated), the
#: largest finite value (negated), each of the vector's element format.
SPECIAL = {"float16": (0x8000, 0x0001, 0x83FF, 0xFBFF), "bfloat16": (0x8000, 0x0001, 0x807F, 0xFF7F),
           "float32": (0x80000000, 0x00000001, 0x807FFFFF, 0xFF7FFFFF)}  # fmt: skip
#: Vectors whose ALPH chunk is written without a filter (the writer's own choice is filter 1).
ALPHA_UNFILTERED = {"palette-raw-la-c32"}


def preview_map(channels: int, k: int) -> Chunk:
    """A fixed prVw chunk (version 1, basis 1): grey from the latent mean plus a little Laplacian."""
    m = np.zeros((k, 1 + 2 * channels), np.float16)
    m[:, 0] = 128
    m[:, 1 : 1 + channels] = 20 / channels
    m[:, 1 + channels :] = -3
    return Chunk(b"prVw", bytes([1, 1, k]) + m.astype(">f2").tobytes())


def make(i: int, name: str) -> bytes:
    w, h, mode, c, settings, _ = VECTORS[name]
    shape = (c, -(-h // 8), -(-w // 8))
    z = latents(i, shape)
    if name == "transform-1x1-c32":
        z[0] = 0.75
    if name == "transform-smooth-c4":
        base = np.cumsum(np.cumsum(np.random.default_rng(i).normal(size=shape[1:]), 0), 1) * 0.15
        z = np.stack([base * (1 + 0.3 * c) + 0.2 * z[c] for c in range(c)]).astype(np.float32) * 3
    if settings.quantizer == "float":
        special = np.array(SPECIAL[settings.element], np.uint32)
        if settings.element == "float16":
            values = special.astype(np.uint16).view(np.float16).astype(np.float32)
        else:
            values = (special << (16 if settings.element == "bfloat16" else 0)).astype(np.uint32).view(np.float32)
        z.reshape(-1)[: len(values)] = values
    if name in WEIGHTS:
        steps, offsets, _ = transform_coder.params(z, settings.quality)
        settings = replace(settings, grid=(steps, offsets, WEIGHTS[name]))
    q = quantize(z, settings)
    if name == "transform-smooth-c4":
        q.fields["levels"][1] += 1  # an even alphabet: the centre (levels - 1) // 2 and the symbols stay
    if name == "palette-raw-la-c32":
        assert len(q.palette) > 256, "the vector must need u16 indices"
    header = Header(width=w, height=h, mode=mode, channels=c, latent_height=shape[1], latent_width=shape[2],
                    model_id="sdl-test-vector", fingerprint=FINGERPRINT, coder=settings.coder, **q.fields)  # fmt: skip
    a = alpha(h, w) if mode in ("LA", "RGBA") else None
    info = {"exif": b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x00"} if i == 0 else None
    extra = [preview_map(c, 3)] if name == "transform-rgb" else None
    chunks = build_chunks(header, q, a, info, extra)
    if name in ALPHA_UNFILTERED:
        chunks = [Chunk(b"ALPH", b"\x00" + entropy.zstd_compress(a.tobytes())) if ch.type == b"ALPH" else ch
                  for ch in chunks]  # fmt: skip
    buf = io.BytesIO()
    write_chunks(buf, chunks)
    return buf.getvalue()


def main(only: set[str] | None = None) -> None:
    """Write the vectors (all, or the names in ``only``)."""
    OUT.mkdir(exist_ok=True)
    for i, name in enumerate(VECTORS):
        if only is not None and name not in only:
            continue
        data = make(i, name)
        (OUT / f"{name}.sdl").write_bytes(data)
        lf = decode_bytes(data)
        np.save(OUT / f"{name}.latents.npy", lf.latents().astype("<f4"))
        if lf.alpha is not None:
            np.save(OUT / f"{name}.alpha.npy", lf.alpha)
        print(f"{name}: {len(data)} bytes, latents {lf.latents().shape}")


if __name__ == "__main__":
    import sys

    main(set(sys.argv[1:]) or None)
