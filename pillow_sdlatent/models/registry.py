"""Model specs -> loaded autoencoders, cached once per (spec, device, dtype) behind a lock.

A spec is one of: an alias (``sd``, ``sdxl``, ``taesd``...), a Hugging Face
hub id (``stabilityai/sd-vae-ft-mse``, loaded through the local cache with
diffusers), a local diffusers folder (or a pipeline folder with ``vae/``), or a
TAESD-family folder of ``NAME_encoder``/``NAME_decoder`` weights.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from .base import Autoencoder
from .device import pick_device, pick_dtype
from .taesd import TaesdAutoencoder, is_taesd_folder

DEFAULT_MODEL = "stabilityai/sd-vae-ft-mse"

#: Short names -> (hub id, subfolder).
ALIASES: dict[str, tuple[str, str | None]] = {
    "sd": ("stabilityai/sd-vae-ft-mse", None),
    "sd-ema": ("stabilityai/sd-vae-ft-ema", None),
    "sdxl": ("stabilityai/sdxl-vae", None),
    "sdxl-fp16": ("madebyollin/sdxl-vae-fp16-fix", None),
    "sd3": ("stabilityai/stable-diffusion-3-medium-diffusers", "vae"),
    "flux": ("black-forest-labs/FLUX.1-dev", "vae"),
    "taesd": ("madebyollin/taesd", None),
    "taesdxl": ("madebyollin/taesdxl", None),
}

_cache: dict[tuple[str, str, str], Autoencoder] = {}
_locks: dict[tuple[str, str, str], threading.Lock] = {}
_guard = threading.Lock()


class ModelNotFoundError(FileNotFoundError):
    """The model a file or option names cannot be loaded here."""


def default_spec() -> str:
    return os.environ.get("SDLATENT_MODEL") or DEFAULT_MODEL


def load_model(
    spec: str | Path | None = None, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> Autoencoder:
    """Load (once per process) the autoencoder a spec names."""
    spec = str(spec or default_spec())
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    key = (spec, str(dev), str(dt))
    with _guard:
        if key in _cache:
            return _cache[key]
        lock = _locks.setdefault(key, threading.Lock())
    with lock:  # one loader per key; other keys load in parallel
        if key not in _cache:
            _cache[key] = _load_uncached(spec, dev, dt)
        return _cache[key]


def _load_uncached(spec: str, device: torch.device, dtype: torch.dtype) -> Autoencoder:
    path = Path(spec).expanduser()
    if path.is_dir():
        if is_taesd_folder(path):
            return TaesdAutoencoder(path, device, dtype)
        return _load_diffusers(str(path), None, path.name, device, dtype)
    if path.suffix in (".safetensors", ".ckpt") and path.is_file():
        return _load_single_file(path, device, dtype)
    if spec in ALIASES:
        hub_id, sub = ALIASES[spec]
        return _load_diffusers(hub_id, sub, hub_id if sub is None else f"{hub_id}/{sub}", device, dtype)
    if spec.count("/") == 1 and not path.exists() and not spec.startswith((".", "/", "~")):
        return _load_diffusers(spec, None, spec, device, dtype)
    raise ModelNotFoundError(
        f"model {spec!r} is neither a folder, a .safetensors/.ckpt file, an alias "
        f"({', '.join(ALIASES)}) nor a Hugging Face hub id; set SDLATENT_MODEL or pass model=..."
    )


def _vae_class(config: dict) -> type:
    import diffusers

    name = config.get("_class_name", "AutoencoderKL")
    if name not in ("AutoencoderKL", "AutoencoderTiny"):
        raise ModelNotFoundError(f"unsupported autoencoder class {name!r}; AutoencoderKL or AutoencoderTiny expected")
    return getattr(diffusers, name)


def _load_diffusers(
    source: str, subfolder: str | None, model_id: str, device: torch.device, dtype: torch.dtype
) -> Autoencoder:
    from .diffusers_vae import DiffusersAutoencoder

    local = Path(source).is_dir()
    if local and subfolder is None and not (Path(source) / "config.json").exists():
        if (Path(source) / "vae" / "config.json").exists():
            subfolder = "vae"
        else:
            raise ModelNotFoundError(
                f"{source} holds no config.json (nor vae/config.json): not a diffusers model folder"
            )
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        import diffusers

        config = diffusers.AutoencoderKL.load_config(source, subfolder=subfolder, local_files_only=offline or local)
        cls = _vae_class(config)
        vae = cls.from_pretrained(
            source, subfolder=subfolder, local_files_only=offline or local, torch_dtype=torch.float32
        )
    except ModelNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        where = "folder" if local else "Hugging Face cache" if offline else "Hugging Face hub or cache"
        raise ModelNotFoundError(
            f"model {model_id!r} could not be loaded from the {where} ({type(exc).__name__}: {exc}). "
            f"Download it once with network access, or set SDLATENT_MODEL / pass model=... to a local "
            f"diffusers or TAESD folder (e.g. ../shared/models/taesd)"
        ) from exc
    return DiffusersAutoencoder(vae, model_id, device, dtype)


def _load_single_file(path: Path, device: torch.device, dtype: torch.dtype) -> Autoencoder:
    import diffusers

    from .diffusers_vae import DiffusersAutoencoder

    try:
        vae = diffusers.AutoencoderKL.from_single_file(str(path), torch_dtype=torch.float32)
    except Exception as exc:  # diffusers raises many kinds here
        raise ModelNotFoundError(f"could not load single-file checkpoint {path}: {exc}") from exc
    return DiffusersAutoencoder(vae, path.stem, device, dtype)


def loaded_sources(model_id: str) -> list[str]:
    """Specs of the models already loaded in this process whose id is ``model_id``."""
    with _guard:
        return list(dict.fromkeys(spec for (spec, _, _), m in _cache.items() if m.model_id == model_id))


def clear_cache() -> None:
    with _guard:
        _cache.clear()
        _locks.clear()
