"""Encoder-side latent refinement: gradient steps on the latents through the decoder.

The encoder of an autoencoder is an amortised, approximate inverse of its
decoder: the latents it gives are not the ones the decoder turns back into
the closest image, and it knows nothing of the quantizer that follows. The
writer knows the quantizer's grid before it writes (quality -> steps; for the
transform quantizer, :class:`TransformQuantizer`, the steps and offsets of its
DCT coefficients), so
refinement starts from the encoder's latents and takes Adam steps on the
pixel error of ``decoder(quantize(latents))`` (:func:`distortion`: the MSE
at full and coarser scales), with the straight-through gradient through the
rounding, plus a rate term (each latent's distance from
the dead zone's centre, in steps, which the coder's bits follow), and keeps
the best iterate it has *seen*: the forward pass is the file's own decode, so
the result is never worse (in distortion + weight x rate proxy) than the encoder's
latents on the same grid. Without a quantizer (latents stored at high
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
from collections.abc import Callable
from typing import Protocol

import torch


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
LEARNING_RATE_QUANTIZED = 0.03
#: Latents of context kept around each refined tile (the decoder sees about +-15; the halo's own
#: values are optimised too but thrown away). A multiple of 4, so tiles start on the 4x4 transform's blocks.
HALO = 8
#: Backward passes keep every activation: a refined tile gets this share of the decode tile's pixels
#: (measured: TAESD refining 768x512 untiled peaks 1.3 GB above the idle process, 3.3x its forward estimate).
MEMORY_SHARE = 0.25
#: Lagrange weight of the quantizer's rate proxy (DeadZoneQuantizer.rate) against the distortion. Measured with
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


def refine_latents(
    model: Autoencoder,
    images: torch.Tensor,
    latents: torch.Tensor,
    steps: int,
    *,
    height: int | None = None,
    width: int | None = None,
    tile_size: int | None = None,
    quantizer: Callable[[torch.Tensor], torch.Tensor] | None = None,
    rate_weight: float | None = None,
) -> torch.Tensor:
    """Latents (N, C, h, w) refined for ``steps`` steps towards ``images`` (N, 3, H, W) in [0, 1].

    ``quantizer``: the elementwise map from latents to what a reader dequantizes (e.g.
    :func:`dead_zone_quantizer`); the loss is then on the quantized decode, with straight-through
    gradients, and the best iterate seen is kept (the starting latents included). A quantizer with a
    ``rate`` proxy (:class:`DeadZoneQuantizer`) adds ``rate_weight`` (default :data:`RATE_WEIGHT`) times
    it to the loss, so "best" is the lowest distortion + rate cost, not the lowest distortion alone.

    ``height``/``width``: the image's size before padding to the model's multiple (the loss
    ignores the padding). Returns float32 latents on the latents' device; ``steps=0`` returns them
    unchanged. A step that makes the decoder's output non-finite stops the refinement with a
    warning and keeps the latents of the last finite step.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"refine must be a number of steps >= 0, got {steps!r}")
    if steps == 0:
        return latents
    f = model.downscale
    n, _, lh, lw = latents.shape
    if images.shape[0] != n or images.shape[-2:] != (lh * f, lw * f):
        raise ValueError(f"images {tuple(images.shape)} do not match latents {tuple(latents.shape)} (x{f})")
    height, width = height or lh * f, width or lw * f
    tile = _tile_latents(model, tile_size)
    out = latents.detach().to(torch.float32).clone()
    for y0 in range(0, lh, tile):
        for x0 in range(0, lw, tile):
            y1, x1 = min(lh, y0 + tile), min(lw, x0 + tile)
            a, b = max(0, y0 - HALO), min(lh, y1 + HALO)  # the tile with its halo
            c, d = max(0, x0 - HALO), min(lw, x1 + HALO)
            target = images[:, :, a * f : b * f, c * f : d * f].to(model.device, torch.float32)
            # the loss counts only real pixels (not the edge padding up to the model's multiple)
            mask_h, mask_w = max(0, min(b * f, height) - a * f), max(0, min(d * f, width) - c * f)
            z = _refine_tile(model, target, latents[:, :, a:b, c:d], steps, mask_h, mask_w, quantizer, rate_weight)
            out[:, :, y0:y1, x0:x1] = z[:, :, y0 - a : y1 - a, x0 - c : x1 - c].to(out.device)
    return out


def distortion(out: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
    """The refinement's distortion of ``out`` against ``goal`` (N, 3, H, W): the mean squared error of the
    pixels plus that of the images averaged over 2x2, 4x4, .. blocks, :data:`POOLED_LEVELS` of them.

    Each coarser level counts the error again at a lower frequency, so errors the eye sees from a normal
    viewing distance (colour and brightness over areas, not single-pixel noise) weigh more than in the MSE
    alone; see :data:`POOLED_LEVELS` for what it buys."""
    diff = out - goal
    loss = diff.square().mean()
    for _ in range(POOLED_LEVELS):
        if min(diff.shape[-2:]) < 2:
            break
        diff = torch.nn.functional.avg_pool2d(diff, 2)  # pooling is linear: the pooled error of the pair
        loss = loss + diff.square().mean()
    return loss


def _tile_latents(model: Autoencoder, tile_size: int | None) -> int:
    """Side of a refined tile in latents, halo excluded (tile size 0: never tile)."""
    pixels = model._tile_pixels(tile_size) * MEMORY_SHARE
    if pixels == 0:
        return 1 << 30
    side = int(math.isqrt(int(pixels)) // model.downscale) - 2 * HALO
    return max(8, side - side % 4)  # a multiple of 4 (as HALO): tiles start on the transform's block grid


class DeadZoneQuantizer:
    """The context quantizer's rounding (core/context_coder.py) on a fixed per-channel grid
    (steps, phases, centres), as a torch map from latents to dequantized latents, with a rate proxy."""

    def __init__(self, grid: tuple) -> None:
        self.grid = grid
        self._step, self._phase, self._centre = (torch.tensor(v, dtype=torch.float64).view(1, -1, 1, 1) for v in grid)

    def _params(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype]:
        # float64 as the writer computes (MPS has none: float32 there, which can move a value sitting
        # on a rounding boundary; the file is still quantized by the writer, only the aim differs)
        dt = torch.float32 if z.device.type == "mps" else torch.float64
        return *(v.to(z.device, dt) for v in (self._step, self._phase, self._centre)), dt

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        from ..core.context_coder import RHO

        d, ph, m, dt = self._params(z)
        u = z.to(dt) / d - ph - m
        q = m + torch.sign(u) * torch.floor(u.abs() + RHO)
        return ((q + ph) * d).to(z.dtype)

    def rate(self, z: torch.Tensor) -> torch.Tensor:
        """Mean of ``step^2 * |z / step - phase - centre|``: the distance from the dead zone's centre in
        steps (the coder's bits grow about linearly with it), in squared latent units like the MSE."""
        d, ph, m, _ = self._params(z)
        d, ph, m = (v.to(z.dtype) for v in (d, ph, m))
        return (d * d * (z / d - ph - m).abs()).mean()


class TransformQuantizer:
    """The transform quantizer (core/transform_coder.py) with fixed parameters (steps, offsets, band weights),
    as a torch map from latents (N, C, h, w) to what a reader dequantizes, with a rate proxy.

    Works on any crop whose top-left corner sits on the 4x4 block grid: planes that are not a multiple of 4
    are padded by repeating the last row and column, as the writer pads the image's latents at their edge."""

    def __init__(self, params: tuple) -> None:
        from ..core import transform_coder as tc

        steps, offsets, weights = params
        self.params = params
        self._basis = torch.tensor(tc.BASIS, dtype=torch.float64)
        self._step = torch.tensor(steps, dtype=torch.float64).view(1, -1, 1, 1, 1, 1)
        self._offset = torch.tensor(offsets, dtype=torch.float64).view(1, -1, 1, 1)
        self._weight = torch.tensor(weights, dtype=torch.float64).view(1, 1, 1, 1, 4, 4) / 16.0
        self._rho = tc.RHO

    def _coefficients(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
        dt = torch.float32 if z.device.type == "mps" else torch.float64  # MPS has no float64
        n, c, h, w = z.shape
        x = z.to(dt) - self._offset.to(z.device, dt)
        x = torch.nn.functional.pad(x, (0, -w % 4, 0, -h % 4), mode="replicate")
        b = x.view(n, c, x.shape[2] // 4, 4, x.shape[3] // 4, 4).transpose(3, 4)  # (n, c, hb, wb, 4, 4)
        T = self._basis.to(z.device, dt)
        X = T @ b @ T.T
        return X, (self._step * self._weight).to(z.device, dt), dt

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        X, s, dt = self._coefficients(z)
        t = X / s
        q = torch.sign(t) * torch.floor(t.abs() + self._rho)
        q[..., 0, 0] = torch.round(t[..., 0, 0])  # the DC rounds to nearest (no gradient flows here)
        T = self._basis.to(z.device, dt)
        y = T.T @ (q * s) @ T
        n, c, hb, wb = y.shape[:4]
        y = y.transpose(3, 4).reshape(n, c, hb * 4, wb * 4)[:, :, : z.shape[2], : z.shape[3]]
        return (y + self._offset.to(z.device, dt)).to(z.dtype)

    def rate(self, z: torch.Tensor) -> torch.Tensor:
        """Mean of ``step^2 * |coefficient / its step|`` over the AC coefficients (the DC is predicted from its
        neighbours, its size says little about its bits), in squared latent units like
        :meth:`DeadZoneQuantizer.rate` at band weight 1."""
        X, s, _ = self._coefficients(z)
        d = self._step.to(z.device, X.dtype)
        ac = torch.ones(4, 4, dtype=X.dtype, device=z.device)
        ac[0, 0] = 0
        return (d * d * (X / s).abs() * ac).mean().to(z.dtype)


def transform_quantizer(params: tuple) -> TransformQuantizer:
    """:class:`TransformQuantizer` of ``params`` (core/transform_coder.params), for :func:`refine_latents`."""
    return TransformQuantizer(params)


def dead_zone_quantizer(grid: tuple) -> DeadZoneQuantizer:
    """:class:`DeadZoneQuantizer` of ``grid`` (what :func:`refine_latents` takes as ``quantizer``)."""
    return DeadZoneQuantizer(grid)


def _refine_tile(
    model: Autoencoder,
    target: torch.Tensor,
    start: torch.Tensor,
    steps: int,
    mask_h: int,
    mask_w: int,
    quantizer: Callable[[torch.Tensor], torch.Tensor] | None = None,
    rate_weight: float | None = None,
) -> torch.Tensor:
    rate = getattr(quantizer, "rate", None)
    weight = RATE_WEIGHT if rate_weight is None else rate_weight
    z = start.detach().to(model.device, torch.float32).clone().requires_grad_(True)
    best, best_loss = z.detach().clone(), math.inf
    if mask_h == 0 or mask_w == 0:  # only padding in this tile: nothing to fit
        return best
    opt = torch.optim.Adam([z], lr=LEARNING_RATE if quantizer is None else LEARNING_RATE_QUANTIZED)
    goal = target[:, :, :mask_h, :mask_w]
    with torch.enable_grad():
        for i in range(steps + (quantizer is not None)):  # quantized: one more forward pass to score the last step
            opt.zero_grad(set_to_none=True)
            zin = z if quantizer is None else z + (quantizer(z) - z).detach()  # straight-through rounding
            # clamped as decode() clamps: pixels the decoder overshoots into black or white are already right
            out = model._decode_differentiable(zin)[:, :, :mask_h, :mask_w].clamp(0, 1)
            loss = distortion(out, goal)
            if rate is not None and weight:
                loss = loss + weight * rate(z)
            if not bool(torch.isfinite(loss)):
                warnings.warn(
                    f"{model.model_id!r} gave NaN/inf while refining latents in {model.dtype}; kept the last "
                    f"finite step (pass dtype='float32' or refine=0)",
                    RuntimeWarning,
                    stacklevel=4,
                )
                break
            if quantizer is None:
                best = z.detach().clone()  # the latents this finite loss belongs to
            elif float(loss.detach()) < best_loss:
                best, best_loss = z.detach().clone(), float(loss.detach())
            if i == steps:
                break
            loss.backward()
            opt.step()
        else:  # only the float loop ends without a break: its last step is kept unscored
            best = z.detach().clone()
    return best
