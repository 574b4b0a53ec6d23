"""pillow-sdlatent: images stored as compressed autoencoder latents, as a Pillow plugin.

``import pillow_sdlatent`` registers the ``SDL`` format (``.sdl``) with Pillow.
This import is cheap (Pillow and the standard library): numpy, zstandard and the
range coder load when the first file is opened, torch and diffusers when an
image is encoded or fully decoded.
"""

from __future__ import annotations

import io
import os
from typing import IO, Any

from PIL import Image

from . import options
from .errors import (
    DecodeBudgetError,
    FormatError,
    ModelLoadError,
    ModelMismatchError,
    ModelNotFoundError,
    NonFiniteOutputError,
    TruncatedError,
    UNetNotFoundError,
)
from .plugin import SdlImageFile, register_sdlatent_opener

__version__ = "0.1.0"


def open(
    fp: str | os.PathLike | IO[bytes],
    *,
    model: str | None = None,
    allow_model_mismatch: bool | None = None,
    device: str | None = None,
    denoise: float | None = None,
    denoise_model: str | None = None,
) -> SdlImageFile:
    """``Image.open`` for .sdl files with decode options.

    model: decode with this model spec instead of the one the file names (its
        weights must still match the file's fingerprint).
    allow_model_mismatch: decode even with weights that differ from the file's (default
        ``options.ALLOW_MODEL_MISMATCH``, else False).
    device: ``"cpu"``, ``"cuda"``, ... (default: ``options.DEVICE``, then auto).
    denoise: diffusion denoising strength before decoding, e.g. 0.04 (default
        ``options.DENOISE``, 0 = off). Generative: it may alter content.
    denoise_model: the U-Net's pipeline folder or hub id (default ``options.DENOISE_MODEL``).
    """
    im = Image.open(fp, formats=["SDL"])
    assert isinstance(im, SdlImageFile)
    im.decoder_options = {"model": model, "allow_model_mismatch": allow_model_mismatch, "device": device,
                          "denoise": denoise, "denoise_model": denoise_model}  # fmt: skip
    return im


def save(im: Image.Image, fp: str | os.PathLike | IO[bytes], **options: Any) -> None:
    """``im.save(fp, "SDL", **options)``, except that a path is replaced atomically.

    ``Image.save(path)`` truncates an existing file before any plugin runs, so a
    failed encode (a missing model, a bad option, Ctrl-C) leaves it empty. Here
    the file is encoded in memory, written to a temporary file beside the target
    and renamed over it: the target is either the complete new file or untouched.
    """
    if not isinstance(fp, (str, os.PathLike)):
        im.save(fp, "SDL", **options)
        return
    from ._atomic import write_bytes_atomic

    buffer = io.BytesIO()
    im.save(buffer, "SDL", **options)
    write_bytes_atomic(fp, buffer.getvalue())


register_sdlatent_opener()

__all__ = [
    "BudgetError",
    "DecodeBudgetError",
    "FormatError",
    "ModelLoadError",
    "ModelMismatchError",
    "ModelNotFoundError",
    "NonFiniteOutputError",
    "PreviewError",
    "SdlImageFile",
    "TruncatedError",
    "UNetNotFoundError",
    "open",
    "options",
    "register_sdlatent_opener",
    "save",
]


#: Names served by torch-backed modules, imported on first access (``import pillow_sdlatent`` stays torch-free).
_LAZY = {
    "load_model": "models",
    "read_latents": "latents",
    "read_latents_batch": "latents",
    "write_latents": "latents",
    "encode_images": "latents",
    "decode_latents": "latents",
    "latent_loader": "latents",
    "image_loader": "latents",
    "LatentDataset": "dataset",
    "LatentIterableDataset": "dataset",
    "PreviewError": "errors",  # defined by the model-free core, served by errors.py
    "BudgetError": "errors",
}


def __getattr__(name: str) -> Any:  # lazy access to torch-backed helpers
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
