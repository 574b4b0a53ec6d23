"""Encoder-side latent refinement: gradient steps on the latents through the decoder.

The encoder of an autoencoder is an amortised, approximate inverse of its
decoder: the latents it gives are not the ones the decoder turns back into
the closest image, and it knows nothing of the quantizer that follows. The
writer knows the quantizer's grid before it writes (quality -> steps; for the
transform quantizer, :class:`TransformQuantizer`, the steps and offsets of its
DCT coefficients), so
refinement starts from the encoder's latents and takes gradient steps on the
pixel error of ``decoder(quantize(latents))`` (:func:`distortion`: the MSE
at full and coarser scales), with the straight-through gradient through the
rounding, plus a rate term (:data:`RATE`: the range coder's own bits of the
AC coefficients under the models the start latents choose), and keeps
the best iterate it has *seen*: the forward pass is the file's own decode, so
the result is never worse (in distortion + rate term) than the encoder's
latents on the same grid. The steps run in stages (:mod:`pillow_sdlatent.effort`),
each a cosine decay of the learning rate from the best latents so far. Without a quantizer (latents stored at high
precision) the loss is the distortion of the float latents' decode.

Measured (benchmarks/rd.py --refine, docs/refine.md): refining against the
float decode helps little once the latents are quantized coarsely and can
hurt (a smooth 96x64 crop lost 3 dB at quality 60); refining through the
quantizer gained 1.4 dB at quality 50 on kodim01 for 3% more bytes (MSE
alone); with the rate term, Kodak's BD-rate on JOD against the original SD
method went from -7.3% (MSE alone) to -11.0% (refine=10, TAESD). The
multi-scale distortion (:data:`POOLED_LEVELS`) then raised JOD at qualities 60
and 75 (7.48 -> 7.59 and 8.17 -> 8.24 for 2% and 0.5% more bytes) and left the
lower qualities where they were on the curve (BD-rate on JOD -10.1%).

Only the encoder changes: files stay valid for every reader, and decoding
costs nothing more. Encoding costs ``steps`` forward and backward passes of
the decoder (2-3 decodes each, docs/refine.md), so it is opt-in (``refine=`` save option,
``options.REFINE``, ``SDLATENT_REFINE``) and meant for GPUs or patient CPUs.
Large images are refined in tiles with a halo of latents around each (only
the tile's own latents are kept), so memory stays bounded by the tile.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from .msssim import ms_ssim


class Autoencoder(Protocol):
    """What refinement needs of a :class:`.base.Autoencoder` (a protocol, so that base can import this module)."""

    model_id: str
    device: torch.device
    dtype: torch.dtype
    downscale: int

    def _decode_differentiable(self, latents: torch.Tensor) -> torch.Tensor: ...

    def _tile_pixels(self, tile_size: int | None) -> int: ...


#: Adam's learning rate (latent units; SD latents have a std of about 1) against the float decode.
#: Measured on kodim01 with TAESD, 20 steps, then quantized at quality 60: 0.05 gave 22.29 dB at
#: 0.137 bpp; 0.02: 22.00 dB; 0.1: 22.51 dB but 0.141 bpp; 0.08 with cosine decay: 22.21 dB; unrefined 21.25 dB.
LEARNING_RATE = 0.05
#: ... and through the quantizer (straight-through). kodim23 256x256, 10 steps, quality 60: 0.02: 25.88 dB,
#: 0.03: 26.10 dB, 0.04: 25.94 dB (unrefined 24.53 dB); at quality 40 0.04 spent 25% more bytes, 0.02 7%.
#: With :data:`OPTIMIZER` "ngd" (the step's root mean square): 0.03 against 0.06 and 0.12 at 2 steps (gap to AVIF at
#: quality 60 / 75: 0.54 / 0.57, 0.52 / 0.58, 0.58 / 0.67) and 0.06 at 2 + 3 + 5 (0.34 / 0.42 against 0.36 / 0.41).
LEARNING_RATE_QUANTIZED = 0.03
#: Latents of context kept around each refined tile (the decoder sees about +-15; the halo's own
#: values are optimised too but thrown away). A multiple of 4, so tiles start on the 4x4 transform's blocks.
HALO = 8
#: Backward passes keep every activation: a refined tile gets this share of the decode tile's pixels
#: (measured: TAESD refining 768x512 untiled peaks 1.3 GB above the idle process, 3.3x its forward estimate).
MEMORY_SHARE = 0.25
#: Lagrange weight of the quantizer's rate proxy (the twin's ``rate``) against the distortion. Measured with
#: the pixel MSE alone (benchmarks/refine.py --jod, TAESD, 6 Kodak 256x256 crops, 10 steps; bpp / JOD at quality
#: 60): 0: 0.153 / 7.55, 0.01: 0.148 / 7.53, 0.02: 0.143 / 7.47, 0.035: 0.138 / 7.35, 0.05: 0.133 / 7.22. The
#: curve's slope there is about 21 JOD per bpp, so 0.02 gains about 0.14 JOD at equal rate; at quality 75 0.035
#: already loses. The multi-scale distortion is 2-3 times the MSE (Kodak 1, 5, 9, 13, 17, 21 with TAESD, the
#: encoder's latents quantized: 3.2 at quality 45, 2.4 at 60, 2.0 at 75; the decoders' quantization error is
#: mostly low-frequency), so twice the weight still weighs the rate a little less, most at low qualities.
RATE_WEIGHT = 0.04
#: Coarser levels in the refinement's distortion (:func:`distortion`; 0: the pixel MSE alone). Measured on
#: Kodak (benchmarks/rd.py --refine 10, docs/refine.md), 4 levels (RATE_WEIGHT 0.04) against the MSE alone
#: (0.02), bpp / JOD: TAESD quality 60 0.136 / 7.48 -> 0.139 / 7.59, 75 0.209 / 8.17 -> 0.210 / 8.24, 40
#: 0.055 / 5.63 -> 0.058 / 5.68; TAESDXL 75 0.214 / 7.72 -> 0.215 / 7.80.
POOLED_LEVELS = 4
#: Weight of the perceptual term in the distortion: (1 - MS-SSIM) of the decode (:func:`.msssim.ms_ssim`) added to
#: the pooled MSE (0: none). Measured (benchmarks/refine.py --search, TAESD, effort 3's stages; JOD gap to AVIF at
#: <= bytes, quality 60 / 75, the issue's three crops): 0: 0.34 / 0.42, 0.01: 0.29 / 0.39, 0.03: 0.25 / 0.36, 0.1:
#: 0.31 / 0.37 (more bytes); on six other crops 0.03 raised JOD on all twelve points, by 0.047 / 0.033 for 0.6% /
#: 0.1% more bytes; at 2 steps 0.55 / 0.56 -> 0.55 / 0.54 (docs/refine.md).
PERCEPTUAL_WEIGHT = 0.03
#: Learning rate over a stage through the quantizer (:func:`learning_rate`): "cosine" or "constant" (the search
#: before the effort levels). Measured (benchmarks/refine.py --search, the issue's three 256x256 crops, TAESD, 10
#: steps, JOD gap to AVIF at <= bytes at quality 60 / 75): constant 0.51 / 0.51, cosine 0.46 / 0.50; a cosine from
#: 0.06 0.50 / 0.52 (docs/refine.md).
SCHEDULE = "cosine"
#: The rate term through the transform quantizer: "bits" (the coder's code length under the models the
#: start latents choose, :meth:`~pillow_sdlatent.core.twins.TransformQuantizer.code_length`) or "proxy"
#: (:data:`RATE_WEIGHT` x the twin's ``rate``).
RATE = "bits"
#: With RATE "bits": bits per pixel are worth RATE_LAMBDA x (the quality's base step)^2 of distortion. Measured
#: as SCHEDULE (cosine, 10 steps), gap to AVIF at quality 60 / 75: 0.5: 0.45 / 0.51, 1: 0.43 / 0.50, 2: 0.49 /
#: 0.49, 4: 0.61 / 0.52; with the stages of effort 5 (40 steps) 0.24 / 0.29 against the old search's 0.33 / 0.31.
RATE_LAMBDA = 1.0
#: The optimizer of the steps through the quantizer: "ngd" (:class:`NormalizedGradient`: every latent moves by
#: its gradient over the gradients' root mean square, times the learning rate) or "adam" (the search before
#: it). Adam's first steps move every latent by about the learning rate whatever its gradient (a sign step),
#: which is most of what the low levels run. Measured in docs/refine.md (benchmarks/refine.py --search).
OPTIMIZER = "ngd"
#: The gradient through the quantizer's rounding: "straight" (straight-through: the identity) or "soft" (the
#: gradient of the twin's soft rounding, its temperature annealed over each stage from SOFT_TEMPERATURE to a
#: tenth of it on a geometric scale; the forward pass stays the file's hard rounding). Measured in docs/refine.md.
GRADIENT = "straight"
SOFT_TEMPERATURE = 0.5
#: Precision of the steps through the quantizer on the CPU: "auto" runs their forward and backward passes under a
#: bfloat16 autocast where the CPU multiplies bf16 natively (:func:`.device.cpu_has_native_bf16`: AVX512-BF16 or
#: AMX) and the model is float32, else float32; "bfloat16" always, "float32" never. In bf16 the steps only
#: propose: the start latents and each stage's best iterate are scored again in float32, and only that score
#: picks the latents a stage restarts from and the ones written (so "never worse than the encoder's latents",
#: and levels that nest, hold in float32). Measured in docs/refine.md (benchmarks/refine.py --timing, --search).
STEP_PRECISION = "auto"


def refine_latents(
    model: Autoencoder,
    images: torch.Tensor,
    latents: torch.Tensor,
    steps: int | Sequence[int],
    *,
    height: int | None = None,
    width: int | None = None,
    tile_size: int | None = None,
    quantizer: Callable[[torch.Tensor], torch.Tensor] | None = None,
    rate_weight: float | None = None,
) -> torch.Tensor:
    """Latents (N, C, h, w) refined for ``steps`` steps towards ``images`` (N, 3, H, W) in [0, 1].

    ``quantizer``: the elementwise map from latents to what a reader dequantizes (e.g.
    :func:`transform_quantizer`); the loss is then on the quantized decode, with straight-through
    gradients, and the best iterate seen is kept (the starting latents included). A quantizer with a rate
    (:func:`transform_quantizer`) adds its rate term to the loss (:func:`_cost`; ``rate_weight`` replaces
    :data:`RATE_LAMBDA`, or :data:`RATE_WEIGHT` with ``RATE = "proxy"``; 0: none), so "best" is the lowest
    distortion + rate cost, not the lowest distortion alone.

    ``steps``: a number of steps, or the steps of each stage (:mod:`pillow_sdlatent.effort`): through a
    quantizer, each stage restarts the optimizer (:data:`OPTIMIZER`) from the best latents seen so far with the
    learning rate decaying from :data:`LEARNING_RATE_QUANTIZED` to 0 on a cosine (:func:`learning_rate`), the
    steps in :data:`STEP_PRECISION`; against the float decode the stages are one run of Adam for their total
    steps at :data:`LEARNING_RATE`.

    ``height``/``width``: the image's size before padding to the model's multiple (the loss
    ignores the padding). Returns float32 latents on the latents' device; ``steps=0`` returns them
    unchanged. A step that makes the decoder's output non-finite stops the refinement with a
    warning and keeps the latents of the last finite step.
    """
    stages = stage_lengths(steps)
    if not stages:
        return latents
    f = model.downscale
    n, _, lh, lw = latents.shape
    if images.shape[0] != n or images.shape[-2:] != (lh * f, lw * f):
        raise ValueError(f"images {tuple(images.shape)} do not match latents {tuple(latents.shape)} (x{f})")
    height, width = height or lh * f, width or lw * f
    tile = _tile_latents(model, tile_size, lh, lw)
    out = latents.detach().to(torch.float32).clone()
    for y0 in range(0, lh, tile):
        for x0 in range(0, lw, tile):
            y1, x1 = min(lh, y0 + tile), min(lw, x0 + tile)
            a, b = max(0, y0 - HALO), min(lh, y1 + HALO)  # the tile with its halo
            c, d = max(0, x0 - HALO), min(lw, x1 + HALO)
            target = images[:, :, a * f : b * f, c * f : d * f].to(model.device, torch.float32)
            # the loss counts only real pixels (not the edge padding up to the model's multiple)
            mask_h, mask_w = max(0, min(b * f, height) - a * f), max(0, min(d * f, width) - c * f)
            z = _refine_tile(model, target, latents[:, :, a:b, c:d], stages, mask_h, mask_w, quantizer, rate_weight)
            out[:, :, y0:y1, x0:x1] = z[:, :, y0 - a : y1 - a, x0 - c : x1 - c].to(out.device)
    return out


def distortion(out: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
    """The refinement's distortion of ``out`` against ``goal`` (N, 3, H, W): the mean squared error of the
    pixels plus that of the images averaged over 2x2, 4x4, .. blocks, :data:`POOLED_LEVELS` of them, plus
    :data:`PERCEPTUAL_WEIGHT` x (1 - MS-SSIM).

    Each coarser level counts the error again at a lower frequency, so errors the eye sees from a normal
    viewing distance (colour and brightness over areas, not single-pixel noise) weigh more than in the MSE
    alone; see :data:`POOLED_LEVELS` for what it buys. MS-SSIM adds what squared errors miss: lost local
    contrast and structure (a blur costs more than noise of the same MSE)."""
    diff = out - goal
    loss = diff.square().mean()
    if PERCEPTUAL_WEIGHT:
        loss = loss + PERCEPTUAL_WEIGHT * (1 - ms_ssim(out, goal))
    for _ in range(POOLED_LEVELS):
        if min(diff.shape[-2:]) < 2:
            break
        diff = torch.nn.functional.avg_pool2d(diff, 2)  # pooling is linear: the pooled error of the pair
        loss = loss + diff.square().mean()
    return loss


def _tile_latents(model: Autoencoder, tile_size: int | None, lh: int, lw: int) -> int:
    """Side of a refined tile in latents, halo excluded, for ``lh`` x ``lw`` latents: all of them when their
    image fits the refinement's share of a tile (a 768x512 Kodak image on the CPU: halos would add 17% to every
    step), else squares (tile size 0: never tile)."""
    pixels = model._tile_pixels(tile_size) * MEMORY_SHARE
    if pixels == 0 or lh * lw * model.downscale**2 <= pixels:
        return 1 << 30
    side = int(math.isqrt(int(pixels)) // model.downscale) - 2 * HALO
    return max(8, side - side % 4)  # a multiple of 4 (as HALO): tiles start on the transform's block grid


def stage_lengths(steps: int | Sequence[int]) -> tuple[int, ...]:
    """``steps`` (a count or the steps of each stage) as the non-empty stages; ValueError on anything else."""
    parts = (steps,) if isinstance(steps, int) and not isinstance(steps, bool) else steps
    try:
        stages = tuple(parts)
    except TypeError:
        stages = (None,)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in stages):
        raise ValueError(f"refine must be a number of steps >= 0, got {steps!r}")
    return tuple(n for n in stages if n)


def learning_rate(i: int, n: int) -> float:
    """The learning rate at step ``i`` of a stage of ``n`` steps through the quantizer: a cosine decay from
    :data:`LEARNING_RATE_QUANTIZED` (its first step) towards 0 (``SCHEDULE`` "constant": the peak throughout)."""
    if SCHEDULE == "constant":
        return LEARNING_RATE_QUANTIZED
    return LEARNING_RATE_QUANTIZED * 0.5 * (1 + math.cos(math.pi * i / n))


def transform_quantizer(params: tuple):
    """The transform codec's torch twin on ``params`` (core/transform_coder.params), for :func:`refine_latents`."""
    from ..core.codec import codec_of

    return codec_of("transform").twin(params)


def _refine_tile(
    model: Autoencoder,
    target: torch.Tensor,
    start: torch.Tensor,
    stages: tuple[int, ...],
    mask_h: int,
    mask_w: int,
    quantizer: Callable[[torch.Tensor], torch.Tensor] | None = None,
    rate_weight: float | None = None,
) -> torch.Tensor:
    z = start.detach().to(model.device, torch.float32).clone()
    if mask_h == 0 or mask_w == 0:  # only padding in this tile: nothing to fit
        return z
    goal = target[:, :, :mask_h, :mask_w]

    def decode(zin: torch.Tensor) -> torch.Tensor:
        # clamped as decode() clamps: pixels the decoder overshoots into black or white are already right
        return model._decode_differentiable(zin)[:, :, :mask_h, :mask_w].clamp(0, 1)

    if quantizer is None:
        return _refine_float(model, z, sum(stages), lambda zz: distortion(decode(zz), goal))
    cost = _cost(quantizer, z, rate_weight, mask_h * mask_w)
    low = step_autocast(model)

    def score(zz: torch.Tensor) -> float:  # the float32 cost: what picks the latents when the steps run in bf16
        with torch.no_grad():
            return float(distortion(decode(quantizer(zz)), goal) + cost(zz))

    best, best_loss = (z, score(z)) if low else (z, math.inf)

    def settle(found: torch.Tensor, found_loss: float) -> tuple[torch.Tensor, float]:
        """The better of ``best`` and a stage's pick, on the cost that decides (float32 where the steps ran in bf16)."""
        if low:
            found_loss = score(found) if found is not best else best_loss
        return (found, found_loss) if found_loss < best_loss else (best, best_loss)

    with torch.enable_grad():
        for n in stages:  # each stage restarts from the best latents seen, with a fresh optimizer
            z = best.clone().requires_grad_(True)
            opt = _optimizer(z, learning_rate(0, n))
            found, found_loss = best, best_loss if not low else math.inf  # the stage's best, on the steps' cost
            for i in range(n + 1):  # one more forward pass to score the stage's last step
                opt.zero_grad(set_to_none=True)
                zin = _surrogate(quantizer, z, i, n)
                with torch.autocast("cpu", dtype=low or torch.bfloat16, enabled=low is not None):
                    out = decode(zin)
                loss = distortion(out.float(), goal) + cost(z)
                if not bool(torch.isfinite(loss)):
                    _warn_nonfinite(model)
                    return settle(found, found_loss)[0]
                if float(loss.detach()) < found_loss:  # (step 0 is the restart point: ``best`` itself)
                    found, found_loss = best if i == 0 else z.detach().clone(), float(loss.detach())
                if i == n:
                    break
                loss.backward()
                for group in opt.param_groups:
                    group["lr"] = learning_rate(i, n)
                opt.step()
            best, best_loss = settle(found, found_loss)
    return best


def _surrogate(quantizer: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, i: int, n: int) -> torch.Tensor:
    """``quantizer(z)`` in the forward pass, with the gradient :data:`GRADIENT` says at step ``i`` of ``n``."""
    if GRADIENT not in ("straight", "soft"):
        raise ValueError(f"GRADIENT must be 'straight' or 'soft', got {GRADIENT!r}")
    hard = quantizer(z)
    soft_of = getattr(quantizer, "soft", None)
    if GRADIENT == "straight" or soft_of is None:
        return z + (hard - z).detach()
    soft = soft_of(z, SOFT_TEMPERATURE * 0.1 ** (i / max(1, n - 1)))
    return soft + (hard - soft).detach()


class NormalizedGradient(torch.optim.Optimizer):
    """Gradient descent with the step scaled to the learning rate in root mean square over the tensor:
    ``z -= lr * grad / rms(grad)``; latents move in proportion to their gradient, and the step's size does not
    depend on the loss's scale (which the rate term and the quality change)."""

    def __init__(self, params: list[torch.Tensor], lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    rms = p.grad.square().mean().sqrt()
                    if float(rms) > 0:
                        p.add_(p.grad / rms, alpha=-group["lr"])


def _optimizer(z: torch.Tensor, lr: float) -> torch.optim.Optimizer:
    if OPTIMIZER == "adam":
        return torch.optim.Adam([z], lr=lr)
    if OPTIMIZER == "ngd":
        return NormalizedGradient([z], lr)
    raise ValueError(f"OPTIMIZER must be 'ngd' or 'adam', got {OPTIMIZER!r}")


def step_autocast(model: Autoencoder) -> torch.dtype | None:
    """The autocast dtype of the steps through the quantizer (:data:`STEP_PRECISION`), None for float32."""
    if STEP_PRECISION not in ("auto", "bfloat16", "float32"):
        raise ValueError(f"STEP_PRECISION must be 'auto', 'bfloat16' or 'float32', got {STEP_PRECISION!r}")
    if STEP_PRECISION == "float32" or model.device.type != "cpu" or model.dtype != torch.float32:
        return None
    if STEP_PRECISION == "bfloat16":
        return torch.bfloat16
    from .device import cpu_has_native_bf16

    return torch.bfloat16 if cpu_has_native_bf16() else None


def search_cost(
    model: Autoencoder,
    images: torch.Tensor,
    start: torch.Tensor,
    latents: torch.Tensor,
    quantizer: Callable[[torch.Tensor], torch.Tensor],
    rate_weight: float | None = None,
) -> float:
    """The cost refinement through ``quantizer`` minimises, of ``latents`` refined from ``start`` (one untiled
    image (N, 3, H, W) whose size is a multiple of the model's): :func:`distortion` of the quantized decode
    plus the rate term (whose models ``start`` chooses). What "best iterate" and the effort levels compare."""
    z0 = start.detach().to(model.device, torch.float32)
    z = latents.detach().to(model.device, torch.float32)
    cost = _cost(quantizer, z0, rate_weight, images.shape[-2] * images.shape[-1])
    with torch.no_grad():
        out = model._decode_differentiable(quantizer(z)).clamp(0, 1)
        return float(distortion(out, images.to(model.device, torch.float32)) + cost(z))


def _cost(
    quantizer: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, rate_weight: float | None, pixels: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The rate part of the refinement's loss for latents like ``z``: :data:`RATE_WEIGHT` (or ``rate_weight``)
    times the quantizer's ``rate`` proxy ("proxy"), or ``RATE_LAMBDA x step^2`` times its code length in bits
    per pixel ("bits", :data:`RATE`); nothing for a quantizer without a rate."""
    if RATE == "bits" and hasattr(quantizer, "code_length"):
        bits = quantizer.code_length(z.detach())
        lam = (RATE_LAMBDA if rate_weight is None else rate_weight) * quantizer.base_step**2 / pixels
        return lambda zz: lam * bits(zz)
    rate = getattr(quantizer, "rate", None)
    weight = RATE_WEIGHT if rate_weight is None else rate_weight
    if rate is None or not weight:
        return lambda zz: zz.new_zeros(())
    return lambda zz: weight * rate(zz)


def _refine_float(
    model: Autoencoder, z: torch.Tensor, steps: int, loss_of: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Refinement against the float decode: ``steps`` Adam steps at :data:`LEARNING_RATE`, the last finite kept."""
    z = z.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=LEARNING_RATE)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = loss_of(z)
            if not bool(torch.isfinite(loss)):
                _warn_nonfinite(model)
                break
            best = z.detach().clone()  # the latents this finite loss belongs to
            loss.backward()
            opt.step()
        else:  # its last step is kept unscored
            best = z.detach().clone()
    return best


def _warn_nonfinite(model: Autoencoder) -> None:
    warnings.warn(
        f"{model.model_id!r} gave NaN/inf while refining latents in {model.dtype}; kept the last "
        f"finite step (pass dtype='float32' or refine=0)",
        RuntimeWarning,
        stacklevel=5,
    )
