"""OpenVINO runner of an autoencoder's nets on the CPU (the ``[openvino]`` extra).

Each net (:meth:`Autoencoder._nets`) is converted once, lazily, from the model's float32 torch module
(``openvino.convert_model`` traces it on a small example with dynamic batch, height and width), then
compiled for each input shape it meets, the last :data:`CACHE_SIZE` shapes kept per net. Conversion takes
about 1-2 s per net on one core, compiling 0.1 s per shape. Nothing is written to disk.

Precision: ``INFERENCE_PRECISION_HINT`` is set from the model's precision, always (OpenVINO's own default
on CPUs with AVX512-BF16 or AMX is bf16, which would change the decoded pixels silently); the NaN/inf
guard of :class:`~.base.Autoencoder` redoes a non-finite bf16 result in float32.

Importing OpenVINO imports its model converter, which sends usage telemetry unless the user opted out;
:func:`import_openvino` imports it with the telemetry package hidden, so OpenVINO falls back to its
built-in no-op stub (reading or writing a file never reaches the network).
"""

from __future__ import annotations

import sys
import threading
import warnings
from collections import OrderedDict
from types import ModuleType
from typing import Any

import numpy as np
import torch

#: Compiled shapes kept per net.
CACHE_SIZE = 4
#: Side (in the net's input pixels) of the example the nets are traced on: small, so tracing is quick.
EXAMPLE_SIDE = 8
_PRECISION_HINTS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def import_openvino() -> ModuleType:
    """``openvino``, imported without its telemetry (see the module docstring)."""
    if "openvino" in sys.modules:
        return sys.modules["openvino"]
    hide = "openvino_telemetry" not in sys.modules
    if hide:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]  # makes its import fail
    try:
        import openvino
    except ImportError as exc:
        raise ImportError(f"OpenVINO is not installed: pip install 'pillow-sdlatent[openvino]' ({exc})") from exc
    finally:
        if hide and sys.modules.get("openvino_telemetry", 0) is None:
            del sys.modules["openvino_telemetry"]
    return openvino


class OpenVinoRunner:
    """``runner(op, x)``: the model's ``op`` net run by OpenVINO at ``dtype`` with ``threads`` threads
    (default: torch's count at each compile)."""

    backend = "openvino"

    def __init__(self, model: Any, dtype: torch.dtype, threads: int | None = None) -> None:
        if dtype not in _PRECISION_HINTS:
            raise ValueError(f"OpenVINO runs in {', '.join(map(str, _PRECISION_HINTS))}, not {dtype}")
        self.ov = import_openvino()
        self.core = self.ov.Core()
        self.model = model
        self.dtype = dtype
        self.threads = threads
        self._converted: dict[str, Any] = {}
        self._compiled: dict[str, OrderedDict[tuple[int, ...], Any]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"openvino {self.ov.get_version().split('-')[0]} {str(self.dtype).removeprefix('torch.')}"

    def _convert(self, op: str, channels: int) -> Any:
        ov = self.ov
        net = self.model._nets()[op]
        example = torch.zeros(1, channels, EXAMPLE_SIDE, EXAMPLE_SIDE, dtype=torch.float32)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks and size-based branches
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace, which convert_model uses
            return ov.convert_model(net, example_input=example, input=[ov.PartialShape([-1, channels, -1, -1])])

    def compiled(self, op: str, shape: tuple[int, ...]) -> Any:
        """The compiled net of ``op`` for inputs of ``shape`` (converted and compiled on first use)."""
        with self._lock:
            cache = self._compiled.setdefault(op, OrderedDict())
            if shape in cache:
                cache.move_to_end(shape)
                return cache[shape]
            if op not in self._converted:
                self._converted[op] = self._convert(op, shape[1])
            graph = self._converted[op].clone()
            graph.reshape(list(shape))
            config = {
                "INFERENCE_PRECISION_HINT": _PRECISION_HINTS[
                    torch.float32 if op in getattr(self.model, "float32_ops", ()) else self.dtype
                ],
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": self.threads or torch.get_num_threads(),
            }
            cache[shape] = self.core.compile_model(graph, "CPU", config)
            while len(cache) > CACHE_SIZE:
                cache.popitem(last=False)
            return cache[shape]

    def __call__(self, op: str, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to("cpu", torch.float32).contiguous()
        request = self.compiled(op, tuple(x.shape)).create_infer_request()
        out = request.infer([x.numpy()])
        return torch.from_numpy(np.array(next(iter(out.values())), dtype=np.float32, copy=True))
