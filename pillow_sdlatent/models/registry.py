"""Model specs -> loaded autoencoders, cached once per (spec, device, dtype) behind a lock.

A spec is one of: an alias (``sd``, ``sdxl``, ``taesd``...), a Hugging Face
hub id (``stabilityai/sd-vae-ft-mse``, or ``org/name/vae`` for a pipeline
repository; loaded with diffusers through the Hugging Face cache, the cache
only when ``HF_HUB_OFFLINE=1``), a local diffusers folder (or a pipeline
folder with ``vae/``), a single-file checkpoint (``.safetensors``/``.ckpt``),
or a TAESD-family folder of ``NAME_encoder``/``NAME_decoder`` weights.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch

from .. import options
from ..errors import ModelLoadError, ModelNotFoundError
from .base import Autoencoder
from .device import choose_backend, pick_device, pick_dtype
from .taesd import TaesdAutoencoder, is_taesd_folder

DEFAULT_MODEL = "stabilityai/sd-vae-ft-mse"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")

#: Short names -> (hub id, subfolder).
ALIASES: dict[str, tuple[str, str | None]] = {
    "sd": ("stabilityai/sd-vae-ft-mse", None),  # SD 1.x and 2.x share this latent space
    "sd-ema": ("stabilityai/sd-vae-ft-ema", None),
    "sdxl": ("stabilityai/sdxl-vae", None),
    "sdxl-fp16": ("madebyollin/sdxl-vae-fp16-fix", None),
    "sd3": ("stabilityai/stable-diffusion-3-medium-diffusers", "vae"),
    "sd3.5": ("stabilityai/stable-diffusion-3.5-large", "vae"),
    "flux": ("black-forest-labs/FLUX.1-dev", "vae"),
    "flux-schnell": ("black-forest-labs/FLUX.1-schnell", "vae"),
    "taesd": ("madebyollin/taesd", None),
    "taesdxl": ("madebyollin/taesdxl", None),
    "taesd3": ("madebyollin/taesd3", None),
    "taef1": ("madebyollin/taef1", None),
}

#: The hub repositories of the aliases: the only ones a file can make this package download, and only where
#: the hub is reachable (:func:`download_allowed`); any other id a file names is looked up locally.
KNOWN_REPOS = frozenset(hub for hub, _ in ALIASES.values())

_cache: dict[tuple[str, str, str, str], Autoencoder] = {}
_locks: dict[tuple[str, str, str, str], threading.Lock] = {}
_guard = threading.Lock()


#: How to make a missing model available; said once at the end of every missing-model message.
FIX = (
    "Download it once with network access, or point options.MODEL / SDLATENT_MODEL (or model=...) at a local "
    "diffusers or TAESD folder (e.g. ../shared/models/taesd)"
)


@contextlib.contextmanager
def quiet_hub() -> Iterator[None]:
    """Around (or decorating) diffusers' loaders: they pass huggingface_hub an argument it deprecated, and every
    missing-model path would print that ``local_dir_use_symlinks`` warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks", category=UserWarning)
        yield


def default_spec() -> str:
    return options.resolve("MODEL") or DEFAULT_MODEL


def load_model(
    spec: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    backend: str | None = None,
    *,
    download: bool = True,
) -> Autoencoder:
    """Load (once per process) the autoencoder a spec names, run by ``backend`` (see
    :func:`~.device.choose_backend`) at ``dtype`` (see :func:`~.device.choose_dtype`). ``download=False``:
    from local files and the Hugging Face cache only (what decoding a file uses for ids it may not download,
    see :func:`download_allowed`)."""
    spec = str(spec or default_spec())
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    runs_on = choose_backend(dev, backend)[0]
    chosen = dev.type == "cpu" and dt != torch.float32 and options.resolve("DTYPE", dtype) is None
    key = (spec, str(dev), str(dt), runs_on + ("|chosen" if chosen else ""))
    with _guard:
        if key in _cache:
            return _cache[key]
        lock = _locks.setdefault(key, threading.Lock())
    with lock:  # one loader per key; other keys load in parallel
        if key not in _cache:
            model = _load_uncached(spec, dev, dt, download)
            model.spec = spec
            model.float32_loader = partial(load_model, spec, dev, torch.float32, runs_on)
            if chosen:  # bf16 chosen for an AMX CPU, not asked for: decoding only (Autoencoder.float32_ops)
                model.float32_ops = frozenset({"encode"})
            if runs_on == "openvino":
                from .ov_backend import OpenVinoRunner

                model.runner = OpenVinoRunner(model, dt)
            _cache[key] = model
        return _cache[key]


def _load_uncached(spec: str, device: torch.device, dtype: torch.dtype, download: bool = True) -> Autoencoder:
    path = Path(spec).expanduser()
    if path.is_dir():
        if is_taesd_folder(path):
            return TaesdAutoencoder(path, device, dtype)
        return _load_diffusers(str(path), None, path.name, device, dtype)
    if path.suffix in SINGLE_FILE_SUFFIXES:
        if not path.is_file():
            raise ModelNotFoundError(f"single-file checkpoint {spec!r} does not exist")
        return _load_single_file(path, device, dtype, download)
    if (hub := hub_repo(spec)) is not None:
        hub_id, sub = hub
        model_id = spec if spec not in ALIASES else hub_id if sub is None else f"{hub_id}/{sub}"
        return _load_diffusers(hub_id, sub, model_id, device, dtype, download)
    raise ModelNotFoundError(
        f"model {spec!r} is neither a folder, a .safetensors/.ckpt file, an alias "
        f"({', '.join(ALIASES)}) nor a Hugging Face hub id; set SDLATENT_MODEL or pass model=..."
    )


def hub_repo(spec: str) -> tuple[str, str | None] | None:
    """(repository, subfolder) of an alias or a hub id ("org/name" or "org/name/subfolder"), else None."""
    if spec in ALIASES:
        return ALIASES[spec]
    parts = spec.split("/")
    if len(parts) not in (2, 3) or not all(p and p not in (".", "..") for p in parts) or spec.startswith("~"):
        return None
    return None if Path(spec).exists() else ("/".join(parts[:2]), parts[2] if len(parts) == 3 else None)


def download_allowed(spec: str) -> bool:
    """May decoding a file that names ``spec`` download it? Only a repository the package knows (its
    aliases), and only where the hub answers; any other id with ``options.ALLOW_DOWNLOAD`` /
    ``SDLATENT_ALLOW_DOWNLOAD`` set for the process (then too only where the hub answers)."""
    hub = hub_repo(spec)
    if hub is None or hub_offline():
        return False
    return (hub[0] in KNOWN_REPOS or bool(options.resolve("ALLOW_DOWNLOAD"))) and hub_reachable()


_reachable: dict[str, bool] = {}


def hub_reachable(timeout: float = 1.0) -> bool:
    """Whether the Hugging Face endpoint (``HF_ENDPOINT``, else huggingface.co) accepts a TCP connection
    within ``timeout`` seconds; asked once per process. Without it huggingface_hub would retry for half a
    minute before a missing model's error."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    address = (url.hostname or "", url.port or (443 if url.scheme == "https" else 80))
    key = f"{address[0]}:{address[1]}"
    if key not in _reachable:
        try:
            socket.create_connection(address, timeout).close()
            _reachable[key] = True
        except OSError:
            _reachable[key] = False
    return _reachable[key]


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (huggingface_hub reads it only once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _vae_class(config: dict) -> type:
    import diffusers

    name = config.get("_class_name", "AutoencoderKL")
    if name not in ("AutoencoderKL", "AutoencoderTiny"):
        raise ModelNotFoundError(f"unsupported autoencoder class {name!r}; AutoencoderKL or AutoencoderTiny expected")
    return getattr(diffusers, name)


@quiet_hub()
def _load_diffusers(
    source: str, subfolder: str | None, model_id: str, device: torch.device, dtype: torch.dtype, download: bool = True
) -> Autoencoder:
    from .diffusers_vae import DiffusersAutoencoder

    local = Path(source).is_dir()
    if local and subfolder is None and not (Path(source) / "config.json").exists():
        if (Path(source) / "vae" / "config.json").exists():
            subfolder = "vae"
        else:
            raise ModelNotFoundError(
                f"{source} holds no config.json (nor vae/config.json) and no NAME_encoder/NAME_decoder weights: "
                f"neither a diffusers nor a TAESD-family model folder"
            )
    offline = hub_offline()
    try:
        import diffusers

        only_local = offline or local or not download
        config = diffusers.AutoencoderKL.load_config(source, subfolder=subfolder, local_files_only=only_local)
        cls = _vae_class(config)
        vae = cls.from_pretrained(  # safetensors only: weights that cannot carry code
            source, subfolder=subfolder, local_files_only=only_local, use_safetensors=True, torch_dtype=torch.float32
        )
    except ModelNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        if local:  # the folder is there: say which and why
            raise ModelLoadError(f"{source}: not a loadable diffusers VAE ({type(exc).__name__}: {exc})") from exc
        where = (
            "folder" if local else "Hugging Face cache (HF_HUB_OFFLINE is set)" if offline
            else "Hugging Face cache (no download for this id)" if not download else "Hugging Face hub"
        )  # fmt: skip
        detail = str(exc).strip().rstrip(".")
        raise ModelNotFoundError(
            f"model {model_id!r} could not be loaded from the {where} ({type(exc).__name__}: {detail}). {FIX}"
        ) from exc
    except Exception as exc:  # safetensors and torch raise their own types on a garbage weight file
        raise ModelLoadError(f"{source}: its weights cannot be loaded ({type(exc).__name__}: {exc})") from exc
    return DiffusersAutoencoder(vae, model_id, device, dtype)


@quiet_hub()
def _load_single_file(path: Path, device: torch.device, dtype: torch.dtype, download: bool = True) -> Autoencoder:
    """A ``.safetensors``/``.ckpt`` VAE checkpoint (original LDM or diffusers key names).

    Its architecture comes from a diffusers ``config.json`` in the same folder
    when there is one, else diffusers infers it from the keys and fetches the
    matching config from the hub (the cache only, with ``HF_HUB_OFFLINE=1``).
    """
    import diffusers

    from .diffusers_vae import DiffusersAutoencoder

    config_dir = path.parent if (path.parent / "config.json").is_file() else None
    try:
        cls = diffusers.AutoencoderKL
        if config_dir is not None:
            cls = _vae_class(diffusers.AutoencoderKL.load_config(str(config_dir), local_files_only=True))
        if cls is diffusers.AutoencoderTiny:  # diffusers has no single-file loader for it
            vae = cls.from_config(cls.load_config(str(config_dir)))
            vae.load_state_dict(_read_state(path))
        else:
            vae = cls.from_single_file(
                str(path),
                config=str(config_dir) if config_dir else None,
                local_files_only=hub_offline() or not download or None,
                torch_dtype=torch.float32,
            )
    except ModelNotFoundError:
        raise
    except Exception as exc:  # diffusers raises many kinds here
        hint = "" if config_dir else " (put the VAE's diffusers config.json beside it to skip the hub look-up)"
        raise ModelNotFoundError(
            f"could not load single-file checkpoint {path}{hint}: {type(exc).__name__}: {exc}"
        ) from exc
    return DiffusersAutoencoder(vae, path.stem, device, dtype)


def loaded_sources(model_id: str) -> list[str]:
    """Specs of the models already loaded in this process whose id is ``model_id``."""
    with _guard:
        return list(dict.fromkeys(spec for (spec, *_), m in _cache.items() if m.model_id == model_id))


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state)


def clear_cache() -> None:
    with _guard:
        _cache.clear()
        _locks.clear()
