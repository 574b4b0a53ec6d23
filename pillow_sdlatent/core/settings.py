"""Quantizer settings and the mapping from Pillow-style ``quality`` to them."""

from __future__ import annotations

from dataclasses import dataclass, replace

DEFAULT_QUALITY = 75

#: Named methods a user can ask for instead of ``quality``.
METHODS = ("auto", "scalar", "palette", "original")


@dataclass(frozen=True)
class QuantSettings:
    """How latents become symbols and bytes.

    quantizer: ``"scalar"`` (one symbol per latent value) or ``"palette"``.
    levels: symbols per channel on the range grid (2..65536).
    palette_size: entries of a palette (palette quantizer only).
    palette_method: ``"kmeans"`` (uniform L2, any channel count) or
        ``"imagequant"`` (libimagequant, 4 channels, as the original method).
    dither: error-diffusion strength 0..1 for palettes.
    coder: entropy coder of the symbol payload.
    """

    quantizer: str = "scalar"
    levels: int = 256
    palette_size: int = 256
    palette_method: str = "kmeans"
    dither: float = 1.0
    coder: str = "zstd"


def settings_for(
    quality: int | None = None,
    method: str = "auto",
    channels: int = 4,
    dither: float | None = None,
    palette_size: int | None = None,
) -> QuantSettings:
    """Resolve save options to settings.

    ``auto``/``scalar``: scalar quantization whose level count doubles every
    100/7 quality points, ``levels = round(2 ** (1 + 7 * quality / 100))``
    (quality 0: 2 levels, 75: 76, 100: 256), then zstd; more levels never make
    the symbol stream cheaper, so file size grows with quality.
    ``palette``: k-means palette of ``palette_size`` (default 256) entries with
    dithering. ``original``: the original Stable Diffusion method, a 256-colour
    libimagequant palette with dithering (4-channel latents only).
    """
    q = DEFAULT_QUALITY if quality is None else quality
    if isinstance(q, bool) or not isinstance(q, int) or not 0 <= q <= 100:
        raise ValueError(f"quality must be an integer 0..100, got {quality!r}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if dither is not None and not 0.0 <= float(dither) <= 1.0:
        raise ValueError(f"dither must be in 0..1, got {dither!r}")
    if palette_size is not None and not 2 <= palette_size <= 65536:
        raise ValueError(f"palette_size must be in 2..65536, got {palette_size!r}")
    if method == "original":
        if channels != 4:
            raise ValueError(f"method='original' (libimagequant) needs 4 latent channels, this model has {channels}")
        s = QuantSettings("palette", 256, palette_size or 256, "imagequant", 1.0, "zstd")
    elif method == "palette":
        s = QuantSettings("palette", 256, palette_size or 256, "kmeans", 1.0, "zstd")
    else:
        s = QuantSettings("scalar", max(2, round(2 ** (1 + 7 * q / 100))))
    return s if dither is None else replace(s, dither=float(dither))
