"""Every exception pillow-sdlatent raises, in one place (all exported from :mod:`pillow_sdlatent`).

Each derives from the built-in exception a caller would already catch:

========================  ==========================  ==================================================
class                     derives from                raised when
========================  ==========================  ==================================================
``FormatError``           ``OSError``, ``ValueError`` the bytes are not a valid .sdl stream
``TruncatedError``        ``FormatError``             the stream ends inside a chunk
``PreviewError``          ``FormatError``             a ``prVw`` chunk this reader cannot use
``BudgetError``           ``ValueError``              no setting fits ``target_size``/``target_bpp``
``ModelNotFoundError``    ``FileNotFoundError``       the model a file or option names cannot be loaded
``ModelMismatchError``    ``ValueError``              the weights at hand are not the file's
``NonFiniteOutputError``  ``RuntimeError``            the autoencoder gives NaN/inf even in float32
``UNetNotFoundError``     ``FileNotFoundError``       the denoising U-Net cannot be loaded
========================  ==========================  ==================================================

This module imports nothing but the standard library, so ``except pillow_sdlatent.ModelNotFoundError``
costs no torch import. ``PreviewError`` and ``BudgetError`` are still defined by the model-free core
(:mod:`.core.preview`, :mod:`.core.ratecontrol`) and served from here on first access.
"""

from __future__ import annotations

from typing import Any


class FormatError(OSError, ValueError):
    """The bytes are not a valid .sdl stream (corrupt, truncated or out of the spec's limits).

    Both an ``OSError`` (what Pillow raises for broken image data) and a
    ``ValueError`` (what a data parser raises), so either ``except`` catches it.
    """


class TruncatedError(FormatError):
    """The stream ended before a complete chunk was read."""

    partial: Any = None  # the incomplete chunk (core.container.Chunk) when one was read


class ModelNotFoundError(FileNotFoundError):
    """The model a file or option names cannot be loaded here."""


class ModelMismatchError(ValueError):
    """The model at hand is not the one the file was written with."""


class NonFiniteOutputError(RuntimeError):
    """The autoencoder produced NaN or inf even in float32."""


class UNetNotFoundError(FileNotFoundError):
    """The denoising U-Net (or its conditioning) cannot be loaded here."""


_CORE = {"PreviewError": "preview", "BudgetError": "ratecontrol"}


def __getattr__(name: str) -> Any:
    if name in _CORE:
        import importlib

        return getattr(importlib.import_module(f".core.{_CORE[name]}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BudgetError",  # noqa: F822  (served by __getattr__)
    "FormatError",
    "ModelMismatchError",
    "ModelNotFoundError",
    "NonFiniteOutputError",
    "PreviewError",  # noqa: F822  (served by __getattr__)
    "TruncatedError",
    "UNetNotFoundError",
]
