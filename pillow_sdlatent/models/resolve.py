"""Finding the right model for a file and refusing the wrong one."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .. import options
from ..core.header import FINGERPRINT_SIZE, Header
from ..errors import ModelMismatchError, ModelNotFoundError
from .base import Autoencoder
from .registry import ALIASES, FIX, load_model, loaded_sources


def candidate_specs(model_id: str) -> list[tuple[str, bool]]:
    """Where a file's model id may be found, in order, each with "must its id match?".

    Models this process already loaded under that id first (a file saved with
    ``model=folder`` opens again without naming the folder), then
    ``options.MODEL``/``SDLATENT_MODEL`` (taken only if its id is the file's), then folders named
    by the id under each directory of ``options.MODEL_PATH``/``SDLATENT_MODEL_PATH``, then the id
    itself as an alias, hub id or path.
    """
    specs = [(spec, True) for spec in loaded_sources(model_id)]
    if spec := options.resolve("MODEL"):
        specs.append((spec, True))
    for root in options.resolve("MODEL_PATH"):
        folder = Path(root).expanduser() / model_id
        if folder.exists():
            specs.append((str(folder), False))
    specs.append((model_id, False))
    return specs


def model_for_file(
    header: Header,
    override: str | None = None,
    *,
    allow_mismatch: bool = False,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> Autoencoder:
    """The model that decodes ``header``'s latents; never silently a different one."""
    unknown = header.fingerprint == bytes(FINGERPRINT_SIZE)
    if override is not None:
        model = load_model(override, device, dtype)
        _check(header, model, override, allow_mismatch or unknown)
        return model
    tried: list[str] = []
    for spec, must_match in candidate_specs(header.model_id):
        try:
            model = load_model(spec, device, dtype)
        except (ModelNotFoundError, FileNotFoundError) as exc:
            tried.append(f"{spec}: {str(exc).replace(FIX, '').strip().rstrip('.')}")
            continue
        if model.model_id == header.model_id or not must_match:
            _check(header, model, spec, allow_mismatch or unknown)
            if unknown:
                warnings.warn(f"file records no weights fingerprint; decoding with {spec}", stacklevel=3)
            return model
        tried.append(f"{spec}: model id {model.model_id!r} is not the file's {header.model_id!r}")
    hint = " (an alias of the hub id " + ALIASES[header.model_id][0] + ")" if header.model_id in ALIASES else ""
    raise ModelNotFoundError(
        f"model {header.model_id!r}{hint} that this file was written with is not available here. Tried: "
        + "; ".join(tried)
        + f". {FIX}; or add a folder holding it under its id to options.MODEL_PATH / SDLATENT_MODEL_PATH"
    )


def _check(header: Header, model: Autoencoder, spec: str, allow: bool) -> None:
    if model.latent_channels != header.channels or model.downscale != header.downscale:
        raise ModelMismatchError(
            f"model {spec!r} has {model.latent_channels} latent channels at 1/{model.downscale} scale; "
            f"the file holds {header.channels} at 1/{header.downscale} (written with {header.model_id!r})"
        )
    if model.fingerprint != header.fingerprint and not allow:
        raise ModelMismatchError(
            f"model {spec!r} (weights {model.fingerprint.hex()[:16]}) is not the one this file was written "
            f"with ({header.model_id!r}, weights {header.fingerprint.hex()[:16]}); decoding would give a "
            f"different image. Pass the right model=..., or allow_model_mismatch=True to decode anyway"
        )
