"""What opening a file may cost, decided from its header alone before any data is read.

Pillow checks ``width * height`` against ``Image.MAX_IMAGE_PIXELS`` after ``_open``. Decoding an .sdl file
costs more than that says: the autoencoder decodes the image padded to whole latent cells (a 1-pixel-high
image at factor 64 decodes 64 rows), the reader holds every latent value, and a neural decoder spends about
a thousand times what PNG decoding does per pixel. So both the padded pixels and the latent values are held
to ``MAX_IMAGE_PIXELS`` as Pillow holds the image size (an error past twice the limit, a warning past it),
and the padded pixels to the decode budget (``options.DECODE_BUDGET``, default 64 M: photos up to about
60 Mpx). ``Image.open`` and :func:`pillow_sdlatent.read_latents` both apply :func:`check_decode_cost`.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from PIL import Image

from . import options
from .errors import DecodeBudgetError

if TYPE_CHECKING:
    from .core.header import Header


def check_decode_cost(header: Header, budget: int | None = None, *, stacklevel: int = 3) -> None:
    """Raise ``DecompressionBombError`` (``DecodeBudgetError`` for the budget) or warn, from the header alone."""
    f = header.downscale
    padded = header.latent_width * f * header.latent_height * f
    values = header.channels * header.latent_height * header.latent_width
    allowed = options.resolve("DECODE_BUDGET", budget)
    if allowed and padded > allowed:
        raise DecodeBudgetError(
            f"decoding this {header.width}x{header.height} image costs {padded} pixels at the autoencoder, over "
            f"the decode budget of {allowed} (options.DECODE_BUDGET / SDLATENT_DECODE_BUDGET; 0 turns it off)"
        )
    limit = Image.MAX_IMAGE_PIXELS
    if not limit:
        return
    what, cost = max((("padded pixels", padded), ("latent values", values)), key=lambda x: x[1])
    if cost > 2 * limit:
        raise Image.DecompressionBombError(
            f"decoding this {header.width}x{header.height} image needs {cost} {what}, more than twice the "
            f"limit of {limit} (Image.MAX_IMAGE_PIXELS); it could be a decompression bomb DOS attack"
        )
    if cost > limit and header.width * header.height <= limit:  # else Pillow's own check warns
        warnings.warn(
            f"decoding this image needs {cost} {what}, more than the limit of {limit}; "
            "it could be a decompression bomb DOS attack",
            Image.DecompressionBombWarning,
            stacklevel=stacklevel,
        )
