"""Device, precision and backend choice: CUDA, then MPS, then CPU, unless ``options.resolve("DEVICE")`` names
one; bfloat16 only on CPUs with AMX; OpenVINO on the CPU where it is installed."""

from __future__ import annotations

import importlib.util

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


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Sapphire Rapids and later), as torch's oneDNN sees them.

    Only there do bf16 convolutions beat float32 by a wide margin (3.6x on TAESD, issue 18); with oneDNN capped
    at AVX512-BF16 (Zen 4/5) bf16 ran at 0.78x, at AVX-512 at 0.29x, at AVX2 at 0.07x of float32.
    """
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:  # no oneDNN in this build
        return False


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 on Zen 4/5 and Cooper Lake on, or AMX), as
    torch's oneDNN sees it: there the refinement's steps run under a bf16 autocast
    (:data:`.refine.STEP_PRECISION`; effort 3 ran 1.5-1.7x faster than in float32 on a Zen 4 core, docs/refine.md)."""
    if cpu_has_amx():
        return True
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:  # no oneDNN in this build
        return False


def choose_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> tuple[torch.dtype, str]:
    """(precision, why): ``options.resolve("DTYPE", dtype)`` if set (argument, ``options.DTYPE``,
    ``SDLATENT_DTYPE``), else bfloat16 on CPUs with AMX and float32 on other CPUs, bfloat16/float16 on GPUs.
    On the CPU bfloat16 runs under autocast (float32 weights; see
    :attr:`~pillow_sdlatent.models.base.Autoencoder.autocast_dtype`)."""
    name, where = options.resolve_with_source("DTYPE", dtype)
    if isinstance(name, torch.dtype):
        return name, f"asked for ({where}={name})"
    if name:
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
        return DTYPES[name], f"asked for ({where}={name})"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "CUDA GPU with bfloat16"
        return torch.float16, "CUDA GPU without bfloat16"
    if device.type == "mps":
        return torch.float16, "Apple GPU (MPS)"
    if device.type == "cpu" and cpu_has_amx():
        return torch.bfloat16, "CPU with AMX: bfloat16 autocast (oneDNN AMX kernels, about 3.6x float32)"
    return torch.float32, "CPU without AMX: float32, the portable path (SDLATENT_DTYPE=bfloat16 forces bf16)"


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """The precision :func:`choose_dtype` chooses."""
    return choose_dtype(device, dtype)[0]


#: Backends that run the models: ``torch`` everywhere, ``openvino`` on the CPU (the ``[openvino]`` extra).
BACKENDS = ("auto", "torch", "openvino")


def openvino_installed() -> bool:
    """Whether the ``openvino`` package can be imported (looked up without importing it)."""
    return importlib.util.find_spec("openvino") is not None


def choose_backend(device: torch.device, backend: str | None = None) -> tuple[str, str]:
    """(backend, why): ``options.resolve("BACKEND", backend)`` (argument, ``options.BACKEND``,
    ``SDLATENT_BACKEND``), else ``auto``: OpenVINO on the CPU where it is installed (same precision, faster
    kernels: 1.5x float32 and, with AMX, 9x in bfloat16 on TAESD, issue 18), torch everywhere else."""
    name, where = options.resolve_with_source("BACKEND", backend)
    name = str(name or "auto").strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}")
    if name == "torch":
        return "torch", f"asked for ({where}=torch)"
    if name == "openvino":
        if device.type != "cpu":
            raise ValueError(f"the openvino backend runs on the CPU only, not on {device}; use backend='torch'")
        if not openvino_installed():
            raise ValueError("backend 'openvino' asked for, but OpenVINO is not installed: "
                             "pip install 'pillow-sdlatent[openvino]', or use backend='torch'")  # fmt: skip
        return "openvino", f"asked for ({where}=openvino)"
    if device.type != "cpu":
        return "torch", f"auto: {device.type} device"
    if openvino_installed():
        return "openvino", "auto: CPU and OpenVINO installed"
    return "torch", "auto: OpenVINO not installed (pip install 'pillow-sdlatent[openvino]')"


def describe_system(device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                    backend: str | None = None) -> dict[str, str]:  # fmt: skip
    """What encoding and decoding would run on here, and why (``sdlatent info --system``)."""
    dev = pick_device(device)
    dt, dt_why = choose_dtype(dev, dtype)
    runs_on, backend_why = choose_backend(dev, backend)
    info = {
        "torch": torch.__version__,
        "device": str(dev),
        "precision": str(dt).removeprefix("torch."),
        "precision_reason": dt_why,
        "backend": runs_on,
        "backend_reason": backend_why,
        "threads": str(torch.get_num_threads()),
    }
    if dev.type == "cpu":
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["amx"] = "yes" if cpu_has_amx() else "no"
        if dt == torch.bfloat16:
            info["precision"] += " (autocast over float32 weights)" if runs_on == "torch" else ""
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    if openvino_installed():
        from importlib.metadata import PackageNotFoundError, version

        try:
            info["openvino"] = version("openvino")
        except PackageNotFoundError:
            info["openvino"] = "installed (version unknown)"
    else:
        info["openvino"] = "not installed"
    return info
