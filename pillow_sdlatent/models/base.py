"""The small interface every autoencoder backend implements, with the NaN/inf guard."""

from __future__ import annotations

import hashlib
import threading
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable

import torch


class NonFiniteOutputError(RuntimeError):
    """The autoencoder produced NaN or inf even in float32."""


class Autoencoder(ABC):
    """An image autoencoder seen through the codec's eyes.

    ``encode`` takes RGB images as float tensors (N, 3, H, W) in [0, 1] with H
    and W multiples of ``downscale`` and returns float32 latents (N, C, H/f, W/f)
    on the model's device, in the model's *scaled* latent space (what a
    diffusion model consumes: for ``AutoencoderKL`` ``(mean - shift_factor) *
    scaling_factor``); ``decode`` is its inverse and returns float32 images in [0, 1].

    Backends implement ``_encode``/``_decode`` (run in the model's dtype) and
    ``float32_copy``. When a reduced-precision run gives NaN or inf (the SDXL
    VAE overflows in float16), the work is redone on a float32 copy of the
    weights and a warning is given once per model.
    """

    model_id: str
    latent_channels: int
    downscale: int = 8
    fingerprint: bytes
    device: torch.device
    dtype: torch.dtype
    #: Whether outputs depend on statistics over the whole image (GroupNorm): tiles then differ more.
    global_norm: bool = False

    @abstractmethod
    def _encode(self, images: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    #: The spec the registry loaded this model from (None when built directly).
    spec: str | None = None

    @abstractmethod
    def float32_copy(self) -> Autoencoder:
        """The same model with its weights cast to float32 (the NaN/inf guard's fallback without a spec)."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._guarded("encode", images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        # Clamped only after the guard looked: clamping would hide an inf.
        return self._guarded("decode", latents).clamp(0, 1)

    def _guarded(self, op: str, x: torch.Tensor) -> torch.Tensor:
        fn: Callable[[torch.Tensor], torch.Tensor] = getattr(self, "_" + op)
        out = fn(x)
        if bool(torch.isfinite(out).all()):
            return out
        if self.dtype != torch.float32:
            self._warn_once(op)
            out = getattr(self._fp32_twin(), "_" + op)(x)
            if bool(torch.isfinite(out).all()):
                return out
        raise NonFiniteOutputError(
            f"{self.model_id!r} gave NaN/inf while trying to {op} in float32; the input is out of the model's "
            f"range or its weights are broken"
        )

    def _fp32_twin(self) -> Autoencoder:
        if spec := getattr(self, "spec", None):  # the registry's float32 model: the original weights, shared
            from .registry import load_model

            return load_model(spec, self.device, torch.float32)
        with _twin_lock:
            twin = self.__dict__.get("_twin")
            if twin is None:
                twin = self.__dict__["_twin"] = self.float32_copy()
            return twin

    def _warn_once(self, op: str) -> None:
        if not self.__dict__.get("_warned"):
            self.__dict__["_warned"] = True
            warnings.warn(
                f"{self.model_id!r} gave NaN/inf in {self.dtype} during {op}; redoing in float32 "
                f"(slower; pass dtype='float32' or SDLATENT_DTYPE=float32 to skip the first attempt)",
                RuntimeWarning,
                stacklevel=4,
            )

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.model_id!r} C={self.latent_channels} "
            f"fp={self.fingerprint.hex()[:12]} {self.device} {self.dtype}>"
        )


_twin_lock = threading.Lock()


def fingerprint_tensors(tensors: Iterable[torch.Tensor], extra: bytes = b"") -> bytes:
    """SHA-256 over a set of weight tensors, independent of their names and order.

    Each tensor is hashed as its shape and float32 little-endian values; the
    sorted digests are hashed together with ``extra`` (e.g. the scaling
    factors). So the same weights loaded from a diffusers folder, a
    safetensors file or a differently named state dict share one fingerprint,
    and a cast to float16 after loading does not change it. About 0.14 s for
    the SD VAE decoder (49 M parameters) on one CPU core; computed once per
    loaded model (the registry caches models).
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
