"""Rate control: the highest ``quality`` whose file fits a byte budget.

The autoencoder runs once; only quantization and entropy coding repeat, once
per distinct setting a bisection over ``quality`` 0..100 visits (at most 9).
The search relies on file size growing with ``quality`` (as
:func:`settings.settings_for` promises); whatever it returns is measured and
fits the budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .container import SIGNATURE, Chunk
from .settings import QuantSettings

MIN_QUALITY, MAX_QUALITY = 0, 100


class BudgetError(ValueError):
    """Even the coarsest setting makes a file larger than the budget."""


def file_size(chunks: list[Chunk]) -> int:
    """Bytes of the file these chunks make: signature, then length, type, payload and CRC per chunk."""
    return len(SIGNATURE) + sum(12 + len(c.payload) for c in chunks)


def budget_bytes(width: int, height: int, target_size: object = None, target_bpp: object = None) -> int | None:
    """The byte budget that ``target_size`` or ``target_bpp`` asks for (None: no rate control)."""
    if target_size is not None and target_bpp is not None:
        raise ValueError("give target_size or target_bpp, not both")
    if target_size is not None:
        if isinstance(target_size, bool) or not isinstance(target_size, int) or target_size <= 0:
            raise ValueError(f"target_size must be a positive number of bytes, got {target_size!r}")
        return target_size
    if target_bpp is not None:
        if isinstance(target_bpp, bool) or not isinstance(target_bpp, (int, float)) or not target_bpp > 0:
            raise ValueError(f"target_bpp must be a positive number of bits per pixel, got {target_bpp!r}")
        if not math.isfinite(target_bpp):
            raise ValueError("target_bpp must be finite")
        return max(1, math.floor(target_bpp * width * height / 8))
    return None


def fit_budget(
    settings_for_quality: Callable[[int], QuantSettings],
    build: Callable[[QuantSettings], list[Chunk]],
    budget: int,
) -> tuple[int, list[Chunk]]:
    """(quality, chunks) of the highest quality whose file is at most ``budget`` bytes.

    ``build`` runs once per distinct setting. Raises :class:`BudgetError` when
    quality 0 does not fit.
    """
    built: dict[QuantSettings, list[Chunk]] = {}

    def chunks_at(quality: int) -> list[Chunk]:
        s = settings_for_quality(quality)
        if s not in built:
            built[s] = build(s)
        return built[s]

    def fits(quality: int) -> bool:
        return file_size(chunks_at(quality)) <= budget

    if fits(MAX_QUALITY):
        return MAX_QUALITY, chunks_at(MAX_QUALITY)
    if not fits(MIN_QUALITY):
        smallest = file_size(chunks_at(MIN_QUALITY))
        raise BudgetError(
            f"even quality {MIN_QUALITY} makes a {smallest}-byte file, over the budget of {budget} bytes; "
            f"raise target_size/target_bpp, save a smaller image, or pass preview=False to drop the preview chunk"
        )
    lo, hi = MIN_QUALITY, MAX_QUALITY  # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, chunks_at(lo)
