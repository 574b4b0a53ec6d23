"""The small interface every autoencoder backend implements, with the NaN/inf guard."""

from __future__ import annotations

import hashlib
import threading
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch

from ..core.header import FINGERPRINT_SIZE
from ..errors import NonFiniteOutputError
from .refine import refine_latents
from .tiling import TilePlan, images_per_run, plan_tiles, run_tiled, tile_pixels


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
    weights and a warning is given once per model: reduced precision is the
    weights' dtype, an autocast (bfloat16 on the CPU) or a runner's (OpenVINO).

    The nets that ``_encode``/``_decode`` call through :meth:`_run_net` (``_nets``)
    run in torch, or in a ``runner`` (see :mod:`.ov_backend`) when one is attached.

    Images larger than a tile (see :mod:`.tiling`; ``tile_size`` or
    ``options.TILE_SIZE`` overrides the size set by ``bytes_per_pixel``) are
    encoded and decoded in overlapping, blended tiles, each guarded alone.
    """

    model_id: str
    latent_channels: int
    downscale: int = 8
    fingerprint: bytes
    device: torch.device
    #: The weights' dtype.
    dtype: torch.dtype
    #: Precision of an autocast around encode/decode (bfloat16 on the CPU: float32 weights, oneDNN bf16
    #: convolutions); None: none.
    autocast_dtype: torch.dtype | None = None
    #: Ops ("encode", "decode") that run in float32 whatever the precision above: the registry puts "encode"
    #: here when it chose bfloat16 for an AMX CPU by itself, since bf16 encoding moved the round trip of some
    #: Kodak images by up to 0.09 dB (torch) / 0.13 dB (OpenVINO), past the 0.05 dB bound (docs/speed.md),
    #: while bf16 decoding stays within 0.1 dB of float32.
    float32_ops: frozenset[str] = frozenset()
    #: Runs the nets instead of torch (``runner(op, x)``, e.g. OpenVINO); None: torch.
    runner: Callable[[str, torch.Tensor], torch.Tensor] | None = None
    #: Whether outputs depend on statistics over the whole image (GroupNorm): tiles then differ more.
    global_norm: bool = False
    #: Peak activation bytes per image pixel in float32, the worse of encode and decode; with the device's
    #: budget it sets the auto tile size. None: estimated by :meth:`activation_bytes`.
    bytes_per_pixel: float | None = None

    @abstractmethod
    def _encode(self, images: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def _nets(self) -> dict[str, torch.nn.Module]:
        """The nets of ``"encode"`` and ``"decode"``, tensor to tensor in the model's own space (what a runner
        exports); the pre- and post-processing of ``_encode``/``_decode`` stays outside."""
        raise NotImplementedError(f"{type(self).__name__} exposes no nets to export")

    def _run_net(self, op: str, x: torch.Tensor) -> torch.Tensor:
        if self.runner is not None:
            return self.runner(op, x)
        return self._nets()[op](x)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The precision the convolutions run in: the runner's, the autocast's, else the weights'."""
        return getattr(self.runner, "dtype", None) or self.autocast_dtype or self.dtype

    def _decode_differentiable(self, latents: torch.Tensor) -> torch.Tensor:
        """``_decode`` with autograd on (for :mod:`.refine`): float32 images, not clamped, not guarded."""
        raise NotImplementedError(f"{type(self).__name__} ({self.model_id!r}) cannot refine latents; pass refine=0")

    def refine(self, images: torch.Tensor, latents: torch.Tensor, steps: int, **kwargs: Any) -> torch.Tensor:
        """``latents`` of ``images`` after ``steps`` gradient steps through the decoder (see :mod:`.refine`)."""
        self._prepare()
        return refine_latents(self, images, latents, steps, **kwargs)

    #: The spec the registry loaded this model from (None when built directly).
    spec: str | None = None
    #: The registry's float32 copy of this model (same spec and device), when the registry loaded it.
    float32_loader: Callable[[], Autoencoder] | None = None

    @abstractmethod
    def float32_copy(self) -> Autoencoder:
        """The same model with its weights cast to float32 (the NaN/inf guard's fallback without a spec)."""

    def encode(self, images: torch.Tensor, *, tile_size: int | None = None) -> torch.Tensor:
        return self._in_tiles("encode", images, self.downscale, 1, tile_size)

    def decode(self, latents: torch.Tensor, *, tile_size: int | None = None) -> torch.Tensor:
        # Clamped only after the guard looked: clamping would hide an inf.
        out = self._in_tiles("decode", latents, 1, self.downscale, tile_size)
        return out.clamp(0, 1) if out.is_inference() else out.clamp_(0, 1)  # a fresh buffer is ours to clamp

    def tile_plan(self, height: int, width: int, tile_size: int | None = None) -> TilePlan | None:
        """The tiles for a latent grid of ``height`` x ``width`` (None: one piece, untiled).

        ``tile_size``: tile side in pixels (tiles hold at most its square), 0 never tiles;
        default ``options.TILE_SIZE``, ``SDLATENT_TILE_SIZE``, then the auto size.
        """
        return plan_tiles(height, width, self._tile_pixels(tile_size), self.downscale)

    def _tile_pixels(self, tile_size: int | None) -> int:
        return tile_pixels(self.activation_bytes(), self.device, tile_size)

    def _in_tiles(self, op: str, x: torch.Tensor, in_scale: int, out_scale: int, tile_size: int | None) -> torch.Tensor:
        """``op`` on ``x``, tiled as :meth:`tile_plan` says; batches whose tiles together exceed the
        tile budget run a few images at a time (the plan is per image, so results do not depend on N)."""
        budget = self._tile_pixels(tile_size)
        h, w = x.shape[-2] // in_scale, x.shape[-1] // in_scale
        plan = plan_tiles(h, w, budget, self.downscale)
        per_run = images_per_run(plan, h, w, budget, self.downscale, len(x))
        self._prepare()
        if len(x) > per_run:
            return torch.cat([self._in_tiles(op, x[i : i + per_run], in_scale, out_scale, tile_size)
                              for i in range(0, len(x), per_run)])  # fmt: skip
        if plan is None:
            return self._guarded(op, x).contiguous()
        return run_tiled(partial(self._guarded, op), x, plan, in_scale, out_scale)

    def _prepare(self) -> None:
        """Once per model: on the CPU, weights in channels-last layout.

        oneDNN's convolutions then run in NHWC: measured on 2 Zen 5 cores, SD VAE decode 16% and encode
        17% faster, TAESD decode 17% and encode 2x faster. Results move only by float rounding (1e-5).
        """
        if self.__dict__.get("_prepared"):
            return
        with _prepare_lock:
            if not self.__dict__.get("_prepared"):
                if self.device.type == "cpu":
                    for net in vars(self).values():
                        if isinstance(net, torch.nn.Module):
                            net.to(memory_format=torch.channels_last)
                self.__dict__["_prepared"] = True

    def activation_bytes(self) -> float:
        """Peak activation memory per image pixel in this model's dtype (bytes).

        Unless a backend sets ``bytes_per_pixel``: measured on the CPU, about 16 float32 values per
        pixel of the full-resolution width (the channels of the conv that makes RGB) for TAESD-like
        nets (1 KiB at 64 channels), 32 for nets with GroupNorms (the SD VAE: 4 KiB at 128).
        """
        per_px = self.bytes_per_pixel or self.__dict__.get("_bytes_per_pixel")
        if per_px is None:
            rgb_convs = (
                m.in_channels
                for net in vars(self).values()
                if isinstance(net, torch.nn.Module)
                for m in net.modules()
                if isinstance(m, torch.nn.Conv2d) and m.out_channels == 3
            )
            width = max(rgb_convs, default=128)
            per_px = self.__dict__["_bytes_per_pixel"] = (32.0 if self.global_norm else 16.0) * width
        return per_px * self.dtype.itemsize / 4

    def _guarded(self, op: str, x: torch.Tensor) -> torch.Tensor:
        fn: Callable[[torch.Tensor], torch.Tensor] = getattr(self, "_" + op)
        if self.autocast_dtype is not None and self.runner is None and op not in self.float32_ops:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                out = fn(x)
        else:
            out = fn(x)
        if bool(torch.isfinite(out).all()):
            return out
        if self.compute_dtype != torch.float32:
            self._warn_once(op)
            out = getattr(self._fp32_twin(), "_" + op)(x)
            if bool(torch.isfinite(out).all()):
                return out
        raise NonFiniteOutputError(
            f"{self.model_id!r} gave NaN/inf while trying to {op} in float32; the input is out of the model's "
            f"range or its weights are broken"
        )

    def _fp32_twin(self) -> Autoencoder:
        if self.float32_loader is not None:  # the registry's float32 model: the original weights, shared
            return self.float32_loader()
        with _twin_lock:
            twin = self.__dict__.get("_twin")
            if twin is None:
                twin = self.__dict__["_twin"] = self.float32_copy()
            return twin

    def _warn_once(self, op: str) -> None:
        if not self.__dict__.get("_warned"):
            self.__dict__["_warned"] = True
            warnings.warn(
                f"{self.model_id!r} gave NaN/inf in {self.compute_dtype} during {op}; redoing in float32 "
                f"(slower; pass dtype='float32' or SDLATENT_DTYPE=float32 to skip the first attempt)",
                RuntimeWarning,
                stacklevel=4,
            )

    def __repr__(self) -> str:
        how = f"{self.dtype}" + (f" autocast {self.autocast_dtype}" if self.autocast_dtype else "")
        if self.runner is not None:
            how = f"{self.runner}"
        return (
            f"<{type(self).__name__} {self.model_id!r} C={self.latent_channels} "
            f"fp={self.fingerprint.hex()[:12]} {self.device} {how}>"
        )


def split_precision(device: torch.device, dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype | None]:
    """(weights' dtype, autocast dtype) for running at ``dtype`` on ``device``.

    bfloat16 on the CPU is an autocast over float32 weights: oneDNN runs the convolutions in bf16 and the
    ops autocast keeps in float32 (normalisations) stay there, and the float32 weights are at hand for the
    NaN/inf guard. Elsewhere the weights are cast.
    """
    if device.type == "cpu" and dtype == torch.bfloat16:
        return torch.float32, torch.bfloat16
    return dtype, None


_twin_lock = threading.Lock()
_prepare_lock = threading.Lock()


def fingerprint_tensors(tensors: Iterable[torch.Tensor], extra: bytes = b"") -> bytes:
    """The first 16 bytes of a SHA-256 over a set of weight tensors, independent of their names and order
    (spec section 9; 128 bits tell weights apart with room to spare, and are what ``HEAD`` stores).

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
    return top.digest()[:FINGERPRINT_SIZE]
