"""Model layer: autoencoder backends, device choice, model resolution for files.

Importing this package imports torch; the plugin does so only on encode/decode.
"""

from __future__ import annotations

from ..errors import ModelMismatchError, ModelNotFoundError
from .base import Autoencoder, fingerprint_tensors
from .registry import ALIASES, DEFAULT_MODEL, clear_cache, default_spec, load_model
from .resolve import model_for_file

__all__ = [
    "ALIASES",
    "DEFAULT_MODEL",
    "Autoencoder",
    "ModelMismatchError",
    "ModelNotFoundError",
    "clear_cache",
    "default_spec",
    "fingerprint_tensors",
    "load_model",
    "model_for_file",
]
