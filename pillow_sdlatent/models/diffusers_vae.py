"""diffusers autoencoders: ``AutoencoderKL`` (SD 1.x/2.x, SDXL, SD3, FLUX.1) and ``AutoencoderTiny``."""

from __future__ import annotations

import copy

import torch

from .base import Autoencoder, fingerprint_tensors, split_precision

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
        self.device = device
        self.dtype, self.autocast_dtype = split_precision(device, dtype)
        vae.eval().requires_grad_(False).to(device=device, dtype=self.dtype)

    def float32_copy(self) -> DiffusersAutoencoder:
        vae = copy.deepcopy(self.vae).float()
        return DiffusersAutoencoder(vae, self.model_id, self.device, torch.float32, self.fingerprint)

    def _nets(self) -> dict[str, torch.nn.Module]:
        vae, nets = self.__dict__.get("_net_modules", (None, None))
        if vae is not self.vae or nets is None:  # built once per vae (a copy of this model may hold another)
            nets = {"encode": _EncoderNet(self.vae), "decode": _DecoderNet(self.vae)}
            self.__dict__["_net_modules"] = (self.vae, nets)
        return nets

    @torch.inference_mode()
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        z = self._run_net("encode", images.to(self.device, self.dtype) * 2 - 1)
        return (z.float() - self.shift) * self.scaling

    @torch.inference_mode()
    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.device, torch.float32) / self.scaling + self.shift
        return (self._run_net("decode", z.to(self.dtype)).float() + 1) / 2

    def _decode_differentiable(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.device, torch.float32) / self.scaling + self.shift
        return (_DecoderNet(self.vae)(z.to(self.dtype)).float() + 1) / 2


class _EncoderNet(torch.nn.Module):
    """Images in [-1, 1] -> unscaled latents: the posterior mean (``AutoencoderKL``) or ``AutoencoderTiny``'s."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.tiny = type(vae).__name__ == "AutoencoderTiny"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.vae.encode(x)
        return out.latents if self.tiny else out.latent_dist.mean


class _DecoderNet(torch.nn.Module):
    """Unscaled latents -> images in [-1, 1]."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).sample
