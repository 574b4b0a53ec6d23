"""Regenerate the test vectors in spec/vectors/ (model-free; run from the repository root).

Each ``NAME.sdl`` decodes, by the rules of sdl-v1.md alone, to the float32
latents in ``NAME.latents.npy`` (and ``NAME.alpha.npy`` where the mode has
alpha). The files are committed: a reader proves itself by decoding them, not
by regenerating them (zstd's encoder output may change between versions).

Vectors of streams no writer writes any more stay as committed and are not listed here:
``transform-st1-rgb`` and ``transform-st1-l-c16`` are the ``transform-*`` vectors as coder 3's stream
version 1 (b"ST1") wrote them.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import replace
from pathlib import Path

import numpy as np

from pillow_sdlatent.core import transform_coder
from pillow_sdlatent.core.codec import build_chunks, decode_bytes, quantize
from pillow_sdlatent.core.container import write_chunks
from pillow_sdlatent.core.header import Header
from pillow_sdlatent.core.settings import QuantSettings

OUT = Path(__file__).parent / "vectors"
FINGERPRINT = hashlib.sha256(b"sdl test vector weights").digest()


def latents(seed: int, shape: tuple[int, int, int]) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = np.cumsum(rng.normal(size=shape), axis=2) * 0.4
    return (smooth + rng.normal(scale=0.3, size=shape)).astype(np.float32)


def alpha(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return ((x * 37 + y * 11) % 256).astype(np.uint8)


VECTORS = {
    # name: (width, height, mode, channels, settings)
    "scalar-raw-rgb": (40, 24, "RGB", 4, QuantSettings("scalar", 256, coder="raw")),
    "scalar-zstd-l-u16": (17, 9, "L", 1, QuantSettings("scalar", 1000, coder="zstd")),
    "palette-zstd-rgba": (64, 48, "RGBA", 4, QuantSettings("palette", 256, 16, "kmeans", 1.0, "zstd")),
    "palette-u16-la-c32": (96, 72, "LA", 32, QuantSettings("palette", 256, 300, "kmeans", 0.0, "zstd")),
    "context-rgb": (120, 72, "RGB", 4, QuantSettings(coder="context", quality=75)),
    "context-l-c16": (33, 41, "L", 16, QuantSettings(coder="context", quality=100)),
    "transform-rgb": (120, 72, "RGB", 4, QuantSettings("transform", coder="transform", quality=75)),
    "transform-l-c16": (33, 41, "L", 16, QuantSettings("transform", coder="transform", quality=20)),
}
#: Band weights instead of the quantizer's own (no weight code gives them: the stream stores all 16).
WEIGHTS = {"transform-l-c16": tuple(16 + 3 * u + 5 * v for u in range(4) for v in range(4))}


def main(only: set[str] | None = None) -> None:
    """Write the vectors (all, or the names in ``only``: existing ones stay as committed)."""
    OUT.mkdir(exist_ok=True)
    for i, (name, (w, h, mode, c, settings)) in enumerate(VECTORS.items()):
        if only is not None and name not in only:
            continue
        shape = (c, -(-h // 8), -(-w // 8))
        z = latents(i, shape)
        if name in WEIGHTS:
            steps, offsets, _ = transform_coder.params(z, settings.quality)
            settings = replace(settings, grid=(steps, offsets, WEIGHTS[name]))
        fields, payload, palette = quantize(z, settings)
        header = Header(
            width=w,
            height=h,
            mode=mode,
            channels=c,
            latent_height=shape[1],
            latent_width=shape[2],
            model_id="sdl-test-vector",
            fingerprint=FINGERPRINT,
            coder=settings.coder,
            **fields,
        )
        a = alpha(h, w) if mode in ("LA", "RGBA") else None
        info = {"exif": b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x00"} if i == 0 else None
        buf = io.BytesIO()
        write_chunks(buf, build_chunks(header, payload, palette, a, info))
        (OUT / f"{name}.sdl").write_bytes(buf.getvalue())
        lf = decode_bytes(buf.getvalue())
        np.save(OUT / f"{name}.latents.npy", lf.latents().astype("<f4"))
        if a is not None:
            np.save(OUT / f"{name}.alpha.npy", a)
        print(f"{name}: {len(buf.getvalue())} bytes, latents {lf.latents().shape}")


if __name__ == "__main__":
    import sys

    main(set(sys.argv[1:]) or None)
