"""Scalar quantization: each latent value becomes an integer symbol on a per-channel grid.

Dequantization is the only part a reader runs and is fixed by the spec:
``x = offset[c] + scale[c] * q`` in IEEE float32 (one multiply, then one add),
which every platform computes to the same bits.
"""

from __future__ import annotations

import numpy as np


def dequantize(symbols: np.ndarray, offset: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Map symbols (C, ...) back to float32 latents, bit-exactly as the spec defines."""
    shape = (-1,) + (1,) * (symbols.ndim - 1)
    x = symbols.astype(np.float32)  # in place from here: one float32 plane beside the symbols, no temporaries
    x *= scale.astype(np.float32).reshape(shape)
    x += offset.astype(np.float32).reshape(shape)
    return x


def range_quantize(
    latents: np.ndarray, levels: int = 256, span: float | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Quantize (C, h, w) float latents to ``levels`` steps spanning each channel's min..max,
    or the fixed range ``[-span, span]`` (values outside clipped), as the original SD method does.

    Returns ``(symbols uint16, offset, scale, levels)`` with one entry per channel.
    A constant channel gets scale 0 (every symbol decodes to the constant).
    """
    if not 2 <= levels <= 1 << 16:
        raise ValueError(f"levels must be in 2..65536, got {levels}")
    x = np.asarray(latents, dtype=np.float32)
    if x.ndim != 3 or not np.all(np.isfinite(x)):
        raise ValueError("latents must be a finite float array of shape (C, h, w)")
    if span is not None:
        if not span > 0:
            raise ValueError(f"span must be positive, got {span}")
        lo = np.full(x.shape[0], -span, np.float32)
        hi = np.full(x.shape[0], span, np.float32)
    else:
        lo = x.min(axis=(1, 2))
        hi = x.max(axis=(1, 2))
    scale = ((hi - lo) / np.float32(levels - 1)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1))
    q = np.rint((x - lo[:, None, None]) / safe[:, None, None])
    symbols = np.clip(q, 0, levels - 1).astype(np.uint16)
    return symbols, lo.astype(np.float32), scale, np.full(x.shape[0], levels, np.uint32)
