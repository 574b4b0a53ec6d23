"""The ``effort`` save option (0..9): how hard the writer searches for the latents it quantizes.

Every level writes an ordinary format 1.0 file (any reader decodes it at the same cost); only the encoder
works harder. A level is a budget of refinement (:mod:`pillow_sdlatent.models.refine`): gradient steps on
the latents through the quantizer's torch twin and the decoder (each step costs two to three decodes), in
*stages*. Each stage restarts the optimizer (normalized gradient steps) from the best latents seen so far
with a learning rate that decays on a cosine, and keeps the best iterate it sees, scored on the refinement's
own cost (distortion + rate; in float32 where the steps run in bf16). Level ``e + 1`` runs the stages of level
``e`` and one more, so a higher level never scores worse on that cost than a lower one at the same quality.

Level 0 (the default) does not search: the encoder's latents, the quantizer's dead-zone rounding, today's
save time. Rate-distortion optimized quantization of the coefficients without the decoder (lowering or
zeroing a coefficient where the coder's bits saved outweigh its distortion in quantizer steps) was measured
for a cheap level and did not beat the quality curve (docs/refine.md), so no level uses it.

``refine=N`` (``options.REFINE``, ``SDLATENT_REFINE``, ``--refine``) is the expert override: one stage of
``N`` steps instead of the level's stages (:func:`pillow_sdlatent.pipeline.search_stages`).
"""

from __future__ import annotations

from typing import NamedTuple


class Level(NamedTuple):
    """What one effort level searches."""

    stages: tuple[int, ...]  #: refinement steps of each stage (each a cosine decay of the learning rate)

    @property
    def steps(self) -> int:
        return sum(self.stages)


#: Level -> budget; about twice the steps of the level below from level 4 on (docs/refine.md has the seconds
#: per megapixel on this project's CPU).
LEVELS: dict[int, Level] = {
    0: Level(()),
    1: Level((2,)),
    2: Level((2, 3)),
    3: Level((2, 3, 5)),
    4: Level((2, 3, 5, 10)),
    5: Level((2, 3, 5, 10, 20)),
    6: Level((2, 3, 5, 10, 20, 40)),
    7: Level((2, 3, 5, 10, 20, 40, 80)),
    8: Level((2, 3, 5, 10, 20, 40, 80, 160)),
    9: Level((2, 3, 5, 10, 20, 40, 80, 160, 320)),
}
DEFAULT_EFFORT = 0


def level(effort: int) -> Level:
    """The budget of an effort level (ValueError outside 0..9)."""
    if isinstance(effort, bool) or not isinstance(effort, int) or effort not in LEVELS:
        raise ValueError(f"effort must be an integer 0..9, got {effort!r}")
    return LEVELS[effort]
