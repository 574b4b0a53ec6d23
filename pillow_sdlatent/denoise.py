"""Optional diffusion denoising of latents before the autoencoder decodes them.

Quantized (above all palettized) latents carry quantization noise. As the
original Stable Diffusion compression method did, a few steps of the matching
diffusion U-Net with empty-prompt conditioning, started at a small noise level
(``strength``, a fraction of the diffusion schedule), pull them back towards
latents of natural images before decoding.

WARNING: denoising is generative. It can alter content — textures, small
text, faces — in ways that look plausible, and its output depends on the
U-Net. It is off by default; turn it on per file
(``pillow_sdlatent.open(path, denoise=0.04)``) or for the process
(``pillow_sdlatent.options.DENOISE = 0.04``).

The U-Net comes from a diffusers pipeline folder or hub id (``unet/``,
``scheduler/``; the default is Stable Diffusion 1.5, whose U-Net works in the
SD VAE's latent space) or from ``options.DENOISE_MODEL`` /
``SDLATENT_DENOISE_MODEL``. The empty-prompt conditioning is read from
``empty_prompt_embedding.safetensors`` in that folder when present, else
computed once per process with the pipeline's CLIP text encoder
(``text_encoder/``, ``tokenizer/``; needs ``transformers``);
:func:`save_empty_prompt_embedding` writes the file so that later runs need
neither the text encoder nor ``transformers``.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import options
from .errors import UNetNotFoundError
from .models.device import pick_device, pick_dtype
from .models.registry import quiet_hub

DEFAULT_UNET = "stable-diffusion-v1-5/stable-diffusion-v1-5"
EMBEDDING_FILE = "empty_prompt_embedding.safetensors"
EMBEDDING_KEY = "empty_prompt_embedding"

#: Scheduler steps over the whole schedule; ``strength`` picks how many of the last ones run.
DEFAULT_STEPS = 50


@dataclass
class Denoiser:
    unet: torch.nn.Module
    scheduler: object
    embedding: torch.Tensor  # (1, tokens, cross_attention_dim)
    spec: str
    device: torch.device
    dtype: torch.dtype

    @torch.inference_mode()
    def __call__(self, latents: np.ndarray, strength: float, steps: int = DEFAULT_STEPS) -> np.ndarray:
        """Denoised (C, h, w) float32 latents; ``strength`` in (0, 1] is the starting noise level."""
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"denoise strength must be in (0, 1], got {strength!r}")
        c = latents.shape[0]
        if c != self.unet.config.in_channels:
            raise ValueError(
                f"U-Net {self.spec!r} takes {self.unet.config.in_channels} latent channels, the file has {c}: "
                f"pass denoise_model=... matching the file's model"
            )
        sched = type(self.scheduler).from_config(self.scheduler.config)  # a fresh one: calls may run in threads
        sched.set_timesteps(steps)
        count = max(1, min(steps, int(steps * strength)))
        timesteps = sched.timesteps[steps - count :]
        alpha = sched.alphas_cumprod[int(timesteps[0])]
        # Read the quantized latents as a sample at the first timestep: signal scaled as the
        # forward process scales it, the quantization error standing in for the added noise.
        x = torch.from_numpy(latents)[None].to(self.device, torch.float32) * alpha.sqrt()
        cond = self.embedding.to(self.device, self.dtype)
        for t in timesteps:
            inp = sched.scale_model_input(x, t).to(self.dtype)
            eps = self.unet(inp, t, encoder_hidden_states=cond).sample.float()
            out = sched.step(eps, t, x)
            x = out.prev_sample
        # The last step's clean-latent estimate: prev_sample would still carry sqrt(alphas_cumprod[0]).
        return out.pred_original_sample[0].cpu().numpy().astype(np.float32)


_cache: dict[tuple[str, str, str], Denoiser] = {}
_lock = threading.Lock()


def default_spec() -> str:
    return options.resolve("DENOISE_MODEL") or DEFAULT_UNET


def load_denoiser(spec: str | Path | None = None, device: str | None = None, dtype: str | None = None) -> Denoiser:
    """Load (once per process) the U-Net, a DDIM scheduler and the empty-prompt embedding of ``spec``."""
    spec = str(spec or default_spec())
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    key = (spec, str(dev), str(dt))
    with _lock:
        if key not in _cache:
            _cache[key] = _load(spec, dev, dt)
        return _cache[key]


@quiet_hub()
def _load(spec: str, device: torch.device, dtype: torch.dtype) -> Denoiser:
    from diffusers import DDIMScheduler, UNet2DConditionModel

    local = Path(spec).is_dir()
    offline = local or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        unet = UNet2DConditionModel.from_pretrained(
            spec, subfolder="unet", local_files_only=offline, torch_dtype=torch.float32
        )
        config = DDIMScheduler.load_config(spec, subfolder="scheduler", local_files_only=offline)
    except (OSError, ValueError) as exc:
        raise UNetNotFoundError(
            f"denoising U-Net {spec!r} could not be loaded ({type(exc).__name__}: {exc}). Set "
            f"pillow_sdlatent.options.DENOISE_MODEL or SDLATENT_DENOISE_MODEL to a diffusers pipeline "
            f"folder with unet/ and scheduler/, or pass denoise_model=..."
        ) from exc
    # DDIM whatever the folder names: deterministic, and exact at the few steps used here.
    scheduler = DDIMScheduler.from_config(config)
    embedding = _empty_prompt_embedding(spec, offline)
    if embedding.shape[-1] != unet.config.cross_attention_dim:
        raise UNetNotFoundError(
            f"empty-prompt embedding of width {embedding.shape[-1]} does not fit U-Net {spec!r} "
            f"(cross_attention_dim {unet.config.cross_attention_dim})"
        )
    unet.eval().requires_grad_(False).to(device=device, dtype=dtype)
    return Denoiser(unet, scheduler, embedding, spec, device, dtype)


def _empty_prompt_embedding(spec: str, offline: bool) -> torch.Tensor:
    cached = Path(spec) / EMBEDDING_FILE
    if cached.is_file():
        from safetensors.torch import load_file

        return load_file(str(cached))[EMBEDDING_KEY].float()
    return encode_empty_prompt(spec, offline)


@torch.inference_mode()
def encode_empty_prompt(spec: str, offline: bool = False) -> torch.Tensor:
    """The CLIP text encoder's last hidden state for ``""``, padded to the tokenizer's length."""
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError as exc:
        raise UNetNotFoundError(
            f"{spec!r} has no {EMBEDDING_FILE}, and computing the empty-prompt embedding needs the "
            f"'transformers' package (pip install transformers)"
        ) from exc
    try:
        tokenizer = CLIPTokenizer.from_pretrained(spec, subfolder="tokenizer", local_files_only=offline)
        encoder = CLIPTextModel.from_pretrained(spec, subfolder="text_encoder", local_files_only=offline)
    except (OSError, ValueError) as exc:
        raise UNetNotFoundError(f"text encoder of {spec!r} could not be loaded ({exc})") from exc
    ids = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    return encoder.eval()(ids)[0].float()


def save_empty_prompt_embedding(spec: str, path: str | Path | None = None) -> Path:
    """Compute the empty-prompt embedding of ``spec`` and store it (default: in the folder itself)."""
    from safetensors.torch import save_file

    offline = Path(spec).is_dir() or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    target = Path(path) if path is not None else Path(spec) / EMBEDDING_FILE
    save_file({EMBEDDING_KEY: encode_empty_prompt(spec, offline).contiguous()}, str(target))
    return target


def maybe_denoise(latents: np.ndarray, strength: float, spec: str | None = None, device: str | None = None
                  ) -> np.ndarray:  # fmt: skip
    """Denoised latents, or the latents unchanged with a warning when the U-Net is not available."""
    try:
        denoiser = load_denoiser(spec, device)
    except UNetNotFoundError as exc:
        warnings.warn(f"denoising skipped: {exc}", stacklevel=4)
        return latents
    return denoiser(latents, float(strength))


def clear_cache() -> None:
    with _lock:
        _cache.clear()
