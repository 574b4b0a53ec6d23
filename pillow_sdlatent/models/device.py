"""Device and precision choice: CUDA, then MPS, then CPU, unless ``options.resolve("DEVICE")`` names one."""

from __future__ import annotations

import torch

from .. import options

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def pick_device(device: str | torch.device | None = None) -> torch.device:
    name = options.resolve("DEVICE", device) or "auto"
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {name!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA GPU; use device='cpu'")
    return dev


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """float32 on the CPU; float16 on GPUs (bfloat16 where the GPU supports it) unless asked otherwise."""
    name = options.resolve("DTYPE", dtype)
    if isinstance(name, torch.dtype):
        return name
    if name:
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32
