"""diffusers autoencoders: ``AutoencoderKL`` (SD 1.x/2.x, SDXL, SD3, FLUX.1) and ``AutoencoderTiny``."""

from __future__ import annotations

import torch

from .base import Autoencoder, fingerprint_tensors


class DiffusersAutoencoder(Autoencoder):
    """Wraps a loaded diffusers VAE; images in [0, 1] here, [-1, 1] inside diffusers.

    Latents are ``(mean - shift_factor) * scaling_factor`` (the posterior mean,
    never a sample, so encoding is deterministic).
    """

    def __init__(self, vae: torch.nn.Module, model_id: str, device: torch.device, dtype: torch.dtype) -> None:
        cfg = vae.config
        self.vae = vae
        self.model_id = model_id
        self.kind = type(vae).__name__
        self.tiny = self.kind == "AutoencoderTiny"
        self.latent_channels = int(cfg.latent_channels)
        blocks = cfg.encoder_block_out_channels if self.tiny else cfg.block_out_channels
        self.downscale = 2 ** (len(blocks) - 1)
        self.scaling = float(getattr(cfg, "scaling_factor", 1.0) or 1.0)
        self.shift = float(getattr(cfg, "shift_factor", None) or 0.0)
        # The fingerprint covers what decoding depends on: decoder weights and the latent scaling.
        parts = [vae.decoder] + ([vae.post_quant_conv] if getattr(vae, "post_quant_conv", None) is not None else [])
        tensors = [t for p in parts for t in p.state_dict().values() if t.is_floating_point()]
        self.fingerprint = fingerprint_tensors(tensors, f"{self.kind}:{self.scaling!r}:{self.shift!r}".encode())
        self.device, self.dtype = device, dtype
        vae.eval().requires_grad_(False).to(device=device, dtype=dtype)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, self.dtype) * 2 - 1
        out = self.vae.encode(x)
        z = out.latents if self.tiny else out.latent_dist.mean
        return ((z.float() - self.shift) * self.scaling).float()

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.float() / self.scaling + self.shift
        x = self.vae.decode(z.to(self.device, self.dtype)).sample
        return ((x.float() + 1) / 2).clamp(0, 1)
