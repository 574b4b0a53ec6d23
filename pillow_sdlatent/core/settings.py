"""Quantizer settings and the mapping from Pillow-style ``quality`` to them."""

from __future__ import annotations

from dataclasses import dataclass, replace

DEFAULT_QUALITY = 75
#: The original method's fixed latent range, [-3, 3] (../shared/models/taesd/README.md).
ORIGINAL_SPAN = 3.0

#: Named methods (``method=`` save option); ``quality`` tunes each of them except ``original``.
METHODS = ("auto", "transform", "scalar", "palette", "original", "float16", "bfloat16", "float32")
#: The lossless methods: each stores latents bit-exactly in the float format it names (quantizer 3).
FLOAT_METHODS = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class QuantSettings:
    """How latents become symbols and bytes.

    quantizer: ``"scalar"`` (one symbol per latent value), ``"palette"``, ``"transform"`` (one symbol per
        coefficient of a 4x4 DCT of each channel; coder ``transform`` only) or ``"float"`` (each value's bit
        pattern in the float format ``element``, exactly).
    levels: symbols per channel on the range grid (2..65536).
    palette_size: entries of a palette (palette quantizer only).
    palette_method: ``"kmeans"`` (uniform L2, any channel count) or
        ``"imagequant"`` (libimagequant, 4 channels, as the original method).
    dither: error-diffusion strength 0..1 for palettes.
    coder: entropy coder of the symbol payload (``raw``, ``zstd``; ``transform`` for the transform quantizer).
    quality: the transform quantizer's knob (its step size, see core/transform_coder.py).
    span: scalar grid over the fixed range [-span, span] for every channel (None: each channel's min..max).
    grid: the transform quantizer's (steps, offsets, band weights) to use instead of those the latents
        choose (set by latent refinement, which aims at a fixed quantizer; see transform_coder.params).
    element: the float quantizer's format: ``"float16"`` (IEEE binary16), ``"bfloat16"`` or ``"float32"``.
    """

    quantizer: str = "scalar"
    levels: int = 256
    palette_size: int = 256
    palette_method: str = "kmeans"
    dither: float = 1.0
    coder: str = "zstd"
    quality: int = DEFAULT_QUALITY
    span: float | None = None
    grid: tuple[tuple[float, ...], tuple[float, ...], tuple[int, ...]] | None = None  # transform_coder.Params
    element: str = "float16"


def settings_for(
    quality: int | None = None,
    method: str = "auto",
    channels: int = 4,
    dither: float | None = None,
    palette_size: int | None = None,
) -> QuantSettings:
    """Resolve save options to settings.

    ``auto`` = ``transform`` (the default): a 4x4 DCT of each latent channel, its coefficients quantized
    with a step of ``0.28 * 2 ** ((60 - quality) / 13)`` latent units (quality 75: 0.113) times a band
    weight that grows with frequency (1 at DC, 3 at the highest band), per-channel weights for 4-channel
    latents and dead-zone rounding, each band range coded (the range coder, id 2).
    ``scalar``: scalar quantization of each channel's min..max range to
    ``round(2 ** (1 + 7 * quality / 100))`` levels (quality 0: 2, 75: 76,
    100: 256), then zstd.
    ``palette``: k-means palette of ``palette_size`` entries (default
    ``round(2 ** (3 + 5 * quality / 100))``: quality 0: 8, 75: 114, 100: 256)
    with error-diffusion dithering, then zstd.
    ``original``: the original Stable Diffusion method: latents mapped from
    [-3, 3] to 8 bits, a 256-colour libimagequant palette with dithering, zstd
    (4-channel latents only; ``quality`` does not change it). In every method but ``original`` and the float
    methods file size grows with quality.
    ``float16``, ``bfloat16``, ``float32``: lossless, the float quantizer (id 3): every latent rounded to that
    format (to nearest, ties to even; exact for latents already in it) and stored bit-exactly, as byte planes
    through zstd (``quality`` does not change it; ``write_latents(..., lossless=True)`` picks the format of
    the tensor's dtype).
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
    if method in FLOAT_METHODS:
        s = QuantSettings("float", coder="zstd", element=method)
    elif method == "original":
        if channels != 4:
            raise ValueError(f"method='original' (libimagequant) needs 4 latent channels, this model has {channels}")
        s = QuantSettings("palette", 256, palette_size or 256, "imagequant", 1.0, "zstd", span=ORIGINAL_SPAN)
    elif method == "palette":
        s = QuantSettings("palette", 256, palette_size or round(2 ** (3 + 5 * q / 100)), "kmeans", 1.0, "zstd")
    elif method == "scalar":
        s = QuantSettings("scalar", max(2, round(2 ** (1 + 7 * q / 100))))
    else:
        s = QuantSettings("transform", coder="transform", quality=q)
    return s if dither is None else replace(s, dither=float(dither))
