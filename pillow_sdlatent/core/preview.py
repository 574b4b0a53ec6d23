"""Model-free previews: a per-file linear map from latents to 1/8-scale pixels (the ``prVw`` chunk).

At encode time the writer fits, by least squares, a small matrix ``M`` that
maps per-position latent *features* to the pixels of the image box-reduced by
the latent downscale factor. A reader then computes ``M @ features(z)`` with
numpy alone and gets a preview of ``latent_width x latent_height`` pixels:
no model, no torch, no GPU.

Features (basis 1), for the dequantized latents ``z`` of shape (C, h, w)::

    1, z[0..C-1], lap[0..C-1]     with  lap[c] = mean of z[c]'s 4 neighbours - z[c]

(neighbours outside the grid replicate the edge). The Laplacian term is what
the 8x8 block's sharpness and local contrast leave in the latent's
surroundings; on Kodak with TAESD it lifts the preview from 23.6 dB (affine
only) to 27.8 dB for 4 more floats per output (see ``benchmarks/preview.py``).

Payload (all big-endian)::

    u8  version   = 1
    u8  basis     = 1          (the features above; other values: skip the chunk)
    u8  outputs   = 1 or 3     (L or RGB)
    f16 matrix[outputs][1 + 2C]   row-major, predicting 0..255 sample values

Readers compute in float64 (a float16 map on float32 latents cannot overflow it), round, clip to 0..255 and,
for LA/RGBA files, box-reduce the ``ALPH`` plane by the same factor. A reader that meets an unknown version
or basis, a payload of the wrong length or a non-finite coefficient ignores the chunk (it is ancillary).
Why float16: rounding the fitted map to 11 significant bits moved preview samples by at most one level (2.3% of
them, 8 Kodak images with TAESD at quality 75, measured once on 2026-12-01), and halves the chunk (69 instead of
124 bytes with its framing at C = 4).
"""

from __future__ import annotations

import struct

import numpy as np

from .container import Chunk, FormatError

CHUNK_TYPE = b"prVw"
VERSION = 1
BASIS_AFFINE_LAPLACIAN = 1
_HEAD = struct.Struct(">BBB")

#: Tikhonov weight (relative to the feature energy) that keeps the map bounded
#: when features are collinear, e.g. a constant latent channel.
RIDGE = 1e-6


class PreviewError(FormatError):
    """A ``prVw`` chunk this reader cannot use (unknown version/basis, wrong size)."""


def feature_count(channels: int) -> int:
    return 1 + 2 * channels


def features(latents: np.ndarray) -> np.ndarray:
    """(1 + 2C, h, w) features of (C, h, w) latents (see the module docstring), in the latents' float dtype
    (float32 unless they are float64)."""
    z = np.asarray(latents)
    z = z if z.dtype == np.float64 else z.astype(np.float32)
    c, h, w = z.shape
    p = np.pad(z, ((0, 0), (1, 1), (1, 1)), mode="edge")
    neighbours = p[:, :-2, 1:-1] + p[:, 2:, 1:-1] + p[:, 1:-1, :-2] + p[:, 1:-1, 2:]
    out = np.empty((1 + 2 * c, h, w), z.dtype)
    out[0] = 1.0
    out[1 : 1 + c] = z
    out[1 + c :] = neighbours * 0.25 - z
    return out


def box_reduce(plane: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor x factor`` blocks of (H, W[, k]); edge blocks average the pixels they hold.

    Output shape (ceil(H/f), ceil(W/f)[, k]), float32.
    """
    a = np.asarray(plane, np.float32)
    rows = np.arange(0, a.shape[0], factor)
    cols = np.arange(0, a.shape[1], factor)
    sums = np.add.reduceat(np.add.reduceat(a, rows, axis=0), cols, axis=1)
    counts = np.minimum(factor, a.shape[0] - rows)[:, None] * np.minimum(factor, a.shape[1] - cols)[None, :]
    if a.ndim == 3:
        counts = counts[..., None]
    return sums / counts.astype(np.float32)


def fit(latents: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least-squares map (k, 1 + 2C) from features of ``latents`` to ``target`` (h, w, k) values, rounded to
    the float16 values the chunk stores."""
    feats = features(latents)
    f = feats.shape[0]
    x = feats.reshape(f, -1).T.astype(np.float64)
    y = np.asarray(target, np.float64).reshape(x.shape[0], -1)
    gram = x.T @ x
    gram[np.diag_indices(f)] += RIDGE * max(float(np.trace(gram)) / f, 1e-12)
    matrix = np.linalg.solve(gram, x.T @ y).T
    return np.clip(matrix, -65504, 65504).astype(np.float16).astype(np.float32)


def render(latents: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """(h, w, k) uint8 preview pixels of (C, h, w) latents under a (k, 1 + 2C) map, in binary64 (spec 13)."""
    feats = features(np.asarray(latents, np.float64))
    f, h, w = feats.shape
    if matrix.shape[1] != f:
        raise PreviewError(f"preview map has {matrix.shape[1]} terms; {f} expected for {(f - 1) // 2} channels")
    out = np.asarray(matrix, np.float64) @ feats.reshape(f, -1).astype(np.float64)  # finite: |map| <= 65504
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).T.reshape(h, w, -1)


def pack(matrix: np.ndarray) -> bytes:
    k, f = matrix.shape
    if k not in (1, 3) or f < 3 or f % 2 == 0:
        raise ValueError(f"preview map must be (1 or 3, 1 + 2C), got {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise ValueError("preview map must be finite")
    return _HEAD.pack(VERSION, BASIS_AFFINE_LAPLACIAN, k) + np.ascontiguousarray(matrix, ">f2").tobytes()


def unpack(payload: bytes, channels: int) -> np.ndarray:
    """The (k, 1 + 2C) float32 map of a ``prVw`` payload; :class:`PreviewError` if unusable."""
    if len(payload) < _HEAD.size:
        raise PreviewError(f"prVw chunk of {len(payload)} bytes is shorter than its {_HEAD.size}-byte header")
    version, basis, k = _HEAD.unpack_from(payload)
    if version != VERSION or basis != BASIS_AFFINE_LAPLACIAN:
        raise PreviewError(f"prVw version {version} basis {basis} is not known to this reader")
    if k not in (1, 3):
        raise PreviewError(f"prVw declares {k} outputs; 1 or 3 expected")
    f = feature_count(channels)
    need = _HEAD.size + 2 * k * f
    if len(payload) != need:
        raise PreviewError(f"prVw chunk holds {len(payload)} bytes; {need} expected for {channels} channels")
    matrix = np.frombuffer(payload, ">f2", offset=_HEAD.size).reshape(k, f).astype(np.float32)
    if not np.all(np.isfinite(matrix)):
        raise PreviewError("prVw map holds non-finite values")
    return matrix


def preview_chunk(latents: np.ndarray, rgb: np.ndarray, mode: str, factor: int) -> Chunk:
    """The ``prVw`` chunk for an image: ``latents`` as the reader sees them, ``rgb`` (H, W, 3) uint8.

    L/LA images get one output (grey), RGB/RGBA three.
    """
    target = box_reduce(rgb[..., :1] if mode in ("L", "LA") else rgb, factor)
    h, w = latents.shape[1:]
    if target.shape[:2] != (h, w):
        raise ValueError(f"latent grid {h}x{w} does not match the image reduced by {factor}: {target.shape[:2]}")
    return Chunk(CHUNK_TYPE, pack(fit(latents, target)))
