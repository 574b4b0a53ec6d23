"""The small interface every autoencoder backend implements."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable

import torch


class Autoencoder(ABC):
    """An image autoencoder seen through the codec's eyes.

    ``encode`` takes RGB images as float tensors (N, 3, H, W) in [0, 1] with H
    and W multiples of ``downscale`` and returns latents (N, C, H/f, W/f) in the
    model's *scaled* latent space (what a diffusion model consumes: for
    ``AutoencoderKL`` ``(mean - shift_factor) * scaling_factor``); ``decode``
    is its inverse and returns images in [0, 1].
    """

    model_id: str
    latent_channels: int
    downscale: int = 8
    fingerprint: bytes
    device: torch.device
    dtype: torch.dtype

    @abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.model_id!r} C={self.latent_channels} "
            f"fp={self.fingerprint.hex()[:12]} {self.device} {self.dtype}>"
        )


def fingerprint_tensors(tensors: Iterable[torch.Tensor], extra: bytes = b"") -> bytes:
    """SHA-256 over a set of weight tensors, independent of their names and order.

    Each tensor is hashed as its shape and float32 little-endian values; the
    sorted digests are hashed together with ``extra`` (e.g. the scaling
    factors). So the same weights loaded from a diffusers folder, a
    safetensors file or a differently named state dict share one fingerprint,
    and a cast to float16 after loading does not change it.
    """
    digests = []
    for t in tensors:
        arr = t.detach().to("cpu", torch.float32).contiguous().numpy()
        h = hashlib.sha256(repr(tuple(arr.shape)).encode())
        h.update(arr.astype("<f4", copy=False).tobytes())
        digests.append(h.digest())
    top = hashlib.sha256(b"sdlatent-fingerprint-v1")
    for d in sorted(digests):
        top.update(d)
    top.update(extra)
    return top.digest()
