"""Overlapping tiles for encoding and decoding: memory bounded by the tile, not by the image.

One implementation for every backend (TAESD-family nets and diffusers VAEs
alike), so tiled results are consistent across backends. Tiles are laid out
on the *latent* grid, which both directions share: encoding cuts the image
into pixel tiles ``f`` times the latent tile and blends the latent tiles;
decoding cuts the latents and blends the pixel tiles. Neighbouring tiles
overlap by a few latents; in the overlap each tile's weight falls off along a
cosine ramp, after a margin next to the tile's edge where it is zero (the
outputs there see the tile's zero padding instead of the neighbouring
image). The weights of each axis are normalized to sum to one, so their
products do too.

Models whose outputs depend on whole-image statistics (the GroupNorms of
``AutoencoderKL``; see ``Autoencoder.global_norm``) give tiles that differ
more from the untiled result; the blend hides the seams, not the difference.
An image that fits in one tile is never tiled: its result is bit-identical to
the untiled path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import options

#: Overlap between neighbouring tiles, in latents (at most a quarter of the tile). The nets see about
#: +-15 latents (TAESD's receptive field); 16 keeps tiled TAESD within ~0.1 dB of untiled on Kodak.
OVERLAP = 16
#: Share of each overlap next to a tile's edge that the tile gives no weight (its padded border).
MARGIN = 0.25
#: Smallest tile side, in latents (forced tile sizes are rounded up to it).
MIN_TILE = 8
#: Activation memory one tile may use, by device type (bytes; CUDA: a quarter of the GPU's memory).
CPU_BUDGET = 2 << 30


@dataclass(frozen=True)
class TilePlan:
    """Tile spans along each axis, ``(start, stop)`` in latents; the tiles are their products."""

    rows: tuple[tuple[int, int], ...]
    cols: tuple[tuple[int, int], ...]

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)


def spans(length: int, tile: int, overlap: int) -> tuple[tuple[int, int], ...]:
    """Spans of at most ``tile`` covering ``[0, length)``, neighbours overlapping by at least ``overlap``.

    As few tiles as fit, each shrunk to the least size that still covers the length with those
    overlaps (less work than full tiles overlapping more), their starts spread evenly.
    """
    if length <= tile:
        return ((0, length),)
    n = math.ceil((length - overlap) / (tile - overlap))
    tile = min(tile, math.ceil((length + (n - 1) * overlap) / n))
    return tuple((s, s + tile) for s in (round(i * (length - tile) / (n - 1)) for i in range(n)))


def plan_tiles(height: int, width: int, max_pixels: int, downscale: int) -> TilePlan | None:
    """Tiles for a latent grid of ``height`` x ``width``, each at most ``max_pixels`` image pixels.

    None when the whole image fits in one tile (or ``max_pixels`` is 0): the caller runs it untiled.
    A long thin image gets tiles as long as the budget allows across its short side.
    """
    area = max_pixels // (downscale * downscale)  # in latents
    if max_pixels <= 0 or height * width <= area:
        return None
    side = max(MIN_TILE, math.isqrt(area))
    area = max(area, side * side)
    if height <= side:
        th, tw = height, max(side, area // height)
    elif width <= side:
        th, tw = max(side, area // width), width
    else:
        th = tw = side
    th, tw = min(th, height), min(tw, width)
    return TilePlan(spans(height, th, overlap_for(th)), spans(width, tw, overlap_for(tw)))


def images_per_run(plan: TilePlan | None, height: int, width: int, max_pixels: int, downscale: int, n: int) -> int:
    """How many images of a batch of ``n`` go through the model together: as many tiles as fit the budget."""
    if max_pixels <= 0:
        return n
    th, tw = (plan.rows[0][1] - plan.rows[0][0], plan.cols[0][1] - plan.cols[0][0]) if plan else (height, width)
    return max(1, max_pixels // (th * tw * downscale * downscale))


def overlap_for(tile: int) -> int:
    return max(1, min(OVERLAP, tile // 4))


def _ramp(n: int, margin: int, rising: bool, dtype: torch.dtype) -> torch.Tensor:
    """``n`` weights: ``margin`` zeros, a cosine ramp, ``margin`` ones (reversed when falling).

    A rising and a falling ramp of the same ``n`` and ``margin`` sum to one everywhere.
    """
    k = n - 2 * margin
    t = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    w = torch.cat([torch.zeros(margin, dtype=torch.float64), 0.5 - 0.5 * torch.cos(math.pi * t),
                   torch.ones(margin, dtype=torch.float64)])  # fmt: skip
    return (w if rising else w.flip(0)).to(dtype)


def axis_weights(spans_: tuple[tuple[int, int], ...], scale: int) -> list[torch.Tensor]:
    """Blend weights of each span along one axis, in output units (``scale`` per latent); they sum to one."""
    weights = []
    for i, (start, stop) in enumerate(spans_):
        w = torch.ones((stop - start) * scale, dtype=torch.float64)
        if i > 0:
            n = (spans_[i - 1][1] - start) * scale
            w[:n] *= _ramp(n, int(n * MARGIN), True, torch.float64)
        if i + 1 < len(spans_):
            n = (stop - spans_[i + 1][0]) * scale
            w[len(w) - n :] *= _ramp(n, int(n * MARGIN), False, torch.float64)
        weights.append(w)
    total = torch.zeros(spans_[-1][1] * scale, dtype=torch.float64)
    for (start, _), w in zip(spans_, weights, strict=True):
        total[start * scale : start * scale + len(w)] += w
    # Exactly one already unless three tiles overlap (a budget far below the overlap); then it fixes the sum.
    return [w / total[s * scale : s * scale + len(w)] for (s, _), w in zip(spans_, weights, strict=True)]


def run_tiled(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, plan: TilePlan, in_scale: int, out_scale: int
) -> torch.Tensor:
    """``fn`` applied tile by tile to ``x`` (N, C, H, W) and the outputs blended.

    ``in_scale``/``out_scale``: input and output units per latent (encode: ``f``
    and 1, decode: 1 and ``f``). Only one tile's activations are alive at a
    time; the output is accumulated in one float32 buffer.
    """
    row_w = axis_weights(plan.rows, out_scale)
    col_w = axis_weights(plan.cols, out_scale)
    out: torch.Tensor | None = None
    for (y0, y1), wy in zip(plan.rows, row_w, strict=True):
        for (x0, x1), wx in zip(plan.cols, col_w, strict=True):
            tile = fn(x[:, :, y0 * in_scale : y1 * in_scale, x0 * in_scale : x1 * in_scale])
            if out is None:
                n, c = tile.shape[:2]
                out = tile.new_zeros((n, c, plan.rows[-1][1] * out_scale, plan.cols[-1][1] * out_scale))
            weight = (wy[:, None] * wx[None, :]).to(tile.device, tile.dtype)
            out[:, :, y0 * out_scale : y1 * out_scale, x0 * out_scale : x1 * out_scale].addcmul_(tile, weight)
            del tile
    assert out is not None
    return out


def budget_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4
    return CPU_BUDGET


def tile_pixels(model_bytes_per_pixel: float, device: torch.device, tile_size: int | None = None) -> int:
    """Most image pixels per tile: the square of ``options.resolve("TILE_SIZE", tile_size)``
    (the argument, ``options.TILE_SIZE``, then ``SDLATENT_TILE_SIZE``; 0: never tile), else the
    device's activation budget over the model's bytes per pixel."""
    tile_size = options.resolve("TILE_SIZE", tile_size)
    if tile_size is not None:
        return tile_size * tile_size
    return int(budget_bytes(device) // model_bytes_per_pixel)
