"""Palette (vector) quantization of latent vectors, with optional error-diffusion dithering.

Two palette builders:

* ``imagequant``: libimagequant, as the original Stable Diffusion compression
  method used it. Only for 4-channel latents with 256 levels, treated as RGBA
  (it weights the 4th channel as alpha; see ../shared/notes/latent-palettes.md).
* ``kmeans``: k-means with a uniform L2 distance in symbol units, any channel
  count, with Floyd-Steinberg vector error diffusion when ``dither > 0``.

Both return ``(palette (K, C) uint16, indices (h, w))``; a reader only looks
entries up, so decoding is bit-exact whichever builder wrote the file.
"""

from __future__ import annotations

import numpy as np

KMEANS_ITERATIONS = 20
KMEANS_SAMPLE = 1 << 16


def imagequant_palette(symbols: np.ndarray, colors: int = 256, dither: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    import imagequant

    c, h, w = symbols.shape
    if c != 4 or int(symbols.max(initial=0)) > 255:
        raise ValueError("libimagequant palettes need 4-channel latents quantized to 8 bits; use method='kmeans'")
    if not 2 <= colors <= 256:
        raise ValueError(f"libimagequant builds 2..256 colours, not {colors}")
    rgba = np.ascontiguousarray(symbols.transpose(1, 2, 0).astype(np.uint8)).tobytes()
    indices, flat = imagequant.quantize_raw_rgba_bytes(rgba, w, h, dithering_level=float(dither), max_colors=colors)
    index_plane = np.frombuffer(indices, dtype=np.uint8).reshape(h, w).astype(np.uint16)
    # libimagequant returns 256 entries whatever max_colors says (the tail zero-filled): store only those
    # up to the last index used, not 4 bytes of padding per missing colour.
    used = int(index_plane.max(initial=0)) + 1
    palette = np.asarray(flat, dtype=np.uint16).reshape(-1, 4)[:used]
    return palette, index_plane


def _nearest(vectors: np.ndarray, centres: np.ndarray) -> np.ndarray:
    d = (vectors**2).sum(1)[:, None] - 2.0 * vectors @ centres.T + (centres**2).sum(1)[None, :]
    return d.argmin(1)


def _kmeans(vectors: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    if len(vectors) > KMEANS_SAMPLE:
        vectors = vectors[rng.choice(len(vectors), KMEANS_SAMPLE, replace=False)]
    unique = np.unique(vectors, axis=0)
    if len(unique) <= k:
        return unique
    # k-means++ seeding, then Lloyd iterations; a fixed seed makes the palette reproducible.
    centres = [vectors[rng.integers(len(vectors))]]
    d2 = ((vectors - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        idx = rng.choice(len(vectors), p=d2 / total) if total > 0 else rng.integers(len(vectors))
        centres.append(vectors[idx])
        d2 = np.minimum(d2, ((vectors - vectors[idx]) ** 2).sum(1))
    cent = np.array(centres)
    for _ in range(KMEANS_ITERATIONS):
        assign = _nearest(vectors, cent)
        sums = np.zeros_like(cent)
        np.add.at(sums, assign, vectors)
        counts = np.bincount(assign, minlength=k)[:, None]
        cent = np.where(counts > 0, sums / np.maximum(counts, 1), cent)
    return cent


def kmeans_palette(
    symbols: np.ndarray, levels: np.ndarray, colors: int = 256, dither: float = 1.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    c, h, w = symbols.shape
    vectors = symbols.reshape(c, -1).T.astype(np.float64)
    cent = _kmeans(vectors, colors, np.random.default_rng(seed))
    palette = np.clip(np.rint(cent), 0, levels.astype(np.int64) - 1).astype(np.uint16)
    palette = np.unique(palette, axis=0)
    pal = palette.astype(np.float64)
    if dither <= 0:
        return palette, _nearest(vectors, pal).reshape(h, w).astype(np.uint16)
    return palette, _diffuse(symbols.transpose(1, 2, 0).astype(np.float64), pal, float(dither))


def _diffuse(image: np.ndarray, pal: np.ndarray, strength: float) -> np.ndarray:
    """Floyd-Steinberg error diffusion of (h, w, C) vectors onto the palette, serpentine scan."""
    h, w, _ = image.shape
    work = image.copy()
    out = np.empty((h, w), np.uint16)
    pal_sq = (pal**2).sum(1)
    for y in range(h):
        step = 1 if y % 2 == 0 else -1
        for x in range(0, w) if step == 1 else range(w - 1, -1, -1):
            v = work[y, x]
            i = int((pal_sq - 2.0 * pal @ v).argmin())
            out[y, x] = i
            err = (v - pal[i]) * strength
            if 0 <= x + step < w:
                work[y, x + step] += err * (7 / 16)
            if y + 1 < h:
                if 0 <= x - step < w:
                    work[y + 1, x - step] += err * (3 / 16)
                work[y + 1, x] += err * (5 / 16)
                if 0 <= x + step < w:
                    work[y + 1, x + step] += err * (1 / 16)
    return out
