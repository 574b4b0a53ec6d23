"""diffusers autoencoders: ``AutoencoderKL`` (SD 1.x/2.x, SDXL, SD3, FLUX.1) and ``AutoencoderTiny``."""

from __future__ import annotations

import copy

import torch

from .base import Autoencoder, fingerprint_tensors

#: ``extra`` of the fingerprint of tiny autoencoders, shared with :class:`TaesdAutoencoder`: the same
#: TAESD weights give the same fingerprint from a TAESD folder or a diffusers ``AutoencoderTiny``.
TINY_FINGERPRINT_EXTRA = b"taesd-scaled"


class DiffusersAutoencoder(Autoencoder):
    """Wraps a loaded diffusers VAE; images in [0, 1] here, [-1, 1] inside diffusers.

    Latents are ``(mean - shift_factor) * scaling_factor`` (the posterior mean,
    never a sample, so encoding is deterministic). ``AutoencoderTiny`` latents
    are already scaled (its ``scaling_factor`` is 1).
    """

    def __init__(self, vae: torch.nn.Module, model_id: str, device: torch.device, dtype: torch.dtype,
                 fingerprint: bytes | None = None) -> None:  # fmt: skip
        cfg = vae.config
        self.vae = vae
        self.model_id = model_id
        self.kind = type(vae).__name__
        self.tiny = self.kind == "AutoencoderTiny"
        self.global_norm = not self.tiny  # AutoencoderKL's GroupNorms see the whole tile
        self.latent_channels = int(cfg.latent_channels)
        blocks = cfg.encoder_block_out_channels if self.tiny else cfg.block_out_channels
        self.downscale = 2 ** (len(blocks) - 1)
        self.scaling = 1.0 if self.tiny else float(getattr(cfg, "scaling_factor", None) or 1.0)
        self.shift = 0.0 if self.tiny else float(getattr(cfg, "shift_factor", None) or 0.0)
        if fingerprint is None:
            # What decoding depends on: decoder weights and the latent scaling.
            parts = [vae.decoder]
            if getattr(vae, "post_quant_conv", None) is not None:
                parts.append(vae.post_quant_conv)
            tensors = [t for p in parts for t in p.state_dict().values() if t.is_floating_point()]
            extra = TINY_FINGERPRINT_EXTRA if self.tiny else f"{self.kind}:{self.scaling!r}:{self.shift!r}".encode()
            fingerprint = fingerprint_tensors(tensors, extra)
        self.fingerprint = fingerprint
        self.device, self.dtype = device, dtype
        vae.eval().requires_grad_(False).to(device=device, dtype=dtype)

    def float32_copy(self) -> DiffusersAutoencoder:
        vae = copy.deepcopy(self.vae).float()
        return DiffusersAutoencoder(vae, self.model_id, self.device, torch.float32, self.fingerprint)

    @torch.inference_mode()
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, self.dtype) * 2 - 1
        out = self.vae.encode(x)
        z = out.latents if self.tiny else out.latent_dist.mean
        return (z.float() - self.shift) * self.scaling

    @torch.inference_mode()
    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._decode_differentiable(latents)

    def _decode_differentiable(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.device, torch.float32) / self.scaling + self.shift
        x = self.vae.decode(z.to(self.dtype)).sample
        return (x.float() + 1) / 2
