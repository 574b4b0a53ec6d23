"""The fast paths and how they are chosen: precision by AMX, bfloat16 autocast under the NaN/inf guard,
and the OpenVINO backend (skipped without the [openvino] extra). No timing here: see benchmarks/speed.py."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pillow_sdlatent
from pillow_sdlatent import options
from pillow_sdlatent.models import clear_cache, device, load_model
from pillow_sdlatent.models.taesd import build_decoder, build_encoder

CPU = torch.device("cpu")
#: Finite in float32 (max 3.4028e38), inf once rounded to bfloat16 (max 3.3895e38).
BF16_OVERFLOW = 3.398e38


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SDLATENT_DTYPE", raising=False)
    monkeypatch.delenv("SDLATENT_BACKEND", raising=False)
    monkeypatch.setattr(options, "BACKEND", None)
    clear_cache()


def _tiny_taesd(folder: Path, seed: int = 0, overflow: bool = False) -> Path:
    """A TAESD-layout folder with 8-channel random weights; ``overflow``: latent channel 0 is
    :data:`BF16_OVERFLOW` for every image (finite in float32, inf in bfloat16)."""
    torch.manual_seed(seed)
    enc = build_encoder({"0.weight": torch.empty(8, 3, 3, 3), "14.weight": torch.empty(4, 8, 3, 3)})
    dec = build_decoder({"1.weight": torch.empty(8, 4, 3, 3)})
    enc_state = {k: v.clone() for k, v in enc.state_dict().items()}
    if overflow:
        enc_state["14.weight"][0] = 0
        enc_state["14.bias"][0] = BF16_OVERFLOW
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(enc_state, folder / "tiny_encoder.pth")
    torch.save(dec.state_dict(), folder / "tiny_decoder.pth")
    return folder


def _images(n: int = 1, h: int = 32, w: int = 48) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(3))


# --- precision: bfloat16 by default only with AMX -------------------------------------------------


@pytest.mark.parametrize("amx", [True, False])
def test_cpu_precision_follows_amx(monkeypatch: pytest.MonkeyPatch, amx: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert device.cpu_has_amx() is amx
    dtype, why = device.choose_dtype(CPU)
    assert dtype == (torch.bfloat16 if amx else torch.float32)
    assert ("with AMX" if amx else "without AMX") in why
    monkeypatch.setenv("SDLATENT_DTYPE", "float32" if amx else "bfloat16")  # the option decides over detection
    assert device.choose_dtype(CPU) == (torch.float32 if amx else torch.bfloat16,
                                        f"asked for (SDLATENT_DTYPE={'float32' if amx else 'bfloat16'})")  # fmt: skip
    assert device.choose_dtype(CPU, "fp32")[0] == torch.float32


def test_amx_probe_failing_or_missing_means_no_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> bool:
        raise RuntimeError("no oneDNN")

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", broken)
    assert not device.cpu_has_amx()
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert not device.cpu_has_amx()
    assert device.pick_dtype(CPU) == torch.float32


def test_auto_bfloat16_on_amx_is_an_autocast_over_float32_weights(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    model = load_model(str(_tiny_taesd(tmp_path / "t")), "cpu", backend="torch")
    assert (model.dtype, model.autocast_dtype, model.compute_dtype) == (torch.float32, torch.bfloat16, torch.bfloat16)
    ref = load_model(str(tmp_path / "t"), "cpu", "float32", backend="torch")
    x = _images()
    # chosen, not asked for: encoding stays float32 (bf16 encoding breaks the 0.05 dB round-trip bound),
    # decoding runs in bf16
    assert model.float32_ops == {"encode"} and torch.equal(model.encode(x), ref.encode(x))
    z = ref.encode(x)
    out, out_ref = model.decode(z), ref.decode(z)
    assert not torch.equal(out, out_ref)  # it ran in bf16...
    torch.testing.assert_close(out, out_ref, atol=0.05, rtol=0.05)  # ...close to float32
    asked = load_model(str(tmp_path / "t"), "cpu", "bfloat16", backend="torch")
    assert asked.float32_ops == frozenset()  # asked for bf16: both ways
    assert not torch.equal(asked.encode(x), z)


def test_nan_guard_covers_autocast(tmp_path: Path) -> None:
    """A real bfloat16 overflow, on the CPU: the encoder's latent is finite in float32 and inf in bf16."""
    folder = str(_tiny_taesd(tmp_path / "o", overflow=True))
    ref = load_model(folder, "cpu", "float32", backend="torch")
    model = load_model(folder, "cpu", "bfloat16", backend="torch")
    assert model.autocast_dtype == torch.bfloat16
    x = _images()
    z_ref = ref.encode(x)
    assert bool(torch.isfinite(z_ref).all()) and float(z_ref[0, 0].min()) > 3e38
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what the guard saw
        assert not bool(torch.isfinite(model._encode(x)).all())
    with pytest.warns(RuntimeWarning, match="NaN/inf in torch.bfloat16 during encode; redoing in float32"):
        z = model.encode(x)
    assert torch.equal(z, z_ref)


# --- backend choice ---------------------------------------------------------------------------------


def test_backend_choice_and_clean_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "openvino_installed", lambda: False)
    backend, why = device.choose_backend(CPU)
    assert backend == "torch" and why.startswith("auto: OpenVINO not installed")
    with pytest.raises(ValueError, match=r"pip install 'pillow-sdlatent\[openvino\]'"):
        device.choose_backend(CPU, "openvino")
    monkeypatch.setattr(device, "openvino_installed", lambda: True)
    assert device.choose_backend(CPU) == ("openvino", "auto: CPU and OpenVINO installed")
    assert device.choose_backend(torch.device("cuda")) == ("torch", "auto: cuda device")
    with pytest.raises(ValueError, match="CPU only"):
        device.choose_backend(torch.device("cuda"), "openvino")
    monkeypatch.setenv("SDLATENT_BACKEND", "torch")
    assert device.choose_backend(CPU)[0] == "torch"
    monkeypatch.setattr(options, "BACKEND", "openvino")  # options over the environment, arguments over both
    assert device.choose_backend(CPU)[0] == "openvino"
    assert device.choose_backend(CPU, "torch")[0] == "torch"
    with pytest.raises(ValueError, match="unknown backend 'onnx'"):
        device.choose_backend(CPU, "onnx")


# --- OpenVINO -------------------------------------------------------------------------------------------

needs_openvino = pytest.mark.skipif(not device.openvino_installed(), reason="the [openvino] extra is not installed")


@needs_openvino
def test_openvino_matches_torch_float32_taesd_and_diffusers(tmp_path: Path, tiny_kl_dir: Path) -> None:
    from pillow_sdlatent.models.ov_backend import CACHE_SIZE

    for spec in (str(_tiny_taesd(tmp_path / "t")), str(tiny_kl_dir)):
        ov = load_model(spec, "cpu", "float32", backend="openvino")
        pt = load_model(spec, "cpu", "float32", backend="torch")
        assert ov is not pt and ov.runner is not None and pt.runner is None
        x = _images(2)
        z = ov.encode(x)
        torch.testing.assert_close(z, pt.encode(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ov.decode(z), pt.decode(z), atol=1e-4, rtol=1e-4)
    runner = ov.runner
    for side in range(1, CACHE_SIZE + 3):  # one compile per shape, the last CACHE_SIZE kept
        ov.decode(torch.zeros(1, 4, side, 2))
    assert list(runner._compiled["decode"]) == [(1, 4, s, 2) for s in range(3, CACHE_SIZE + 3)]
    assert runner.compiled("decode", (1, 4, 3, 2)) is runner.compiled("decode", (1, 4, 3, 2))


@needs_openvino
def test_openvino_is_the_default_on_the_cpu_and_files_decode_alike(tmp_path: Path) -> None:
    folder = str(_tiny_taesd(tmp_path / "t"))
    im = Image.fromarray((np.asarray(_images(1, 40, 56)[0].permute(1, 2, 0)) * 255).astype(np.uint8))
    bufs = {}
    for backend in ("torch", None):  # None: auto
        options.BACKEND = backend
        buf = io.BytesIO()
        im.save(buf, "SDL", model=folder, device="cpu")
        bufs[backend] = buf.getvalue()
    auto = load_model(folder, "cpu")
    assert auto.runner is not None and auto.compute_dtype == device.pick_dtype(CPU)
    with Image.open(io.BytesIO(bufs[None])) as a:
        a.load()
        options.BACKEND = "torch"
        with Image.open(io.BytesIO(bufs[None])) as b:
            b.load()
    assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1
    assert abs(len(bufs[None]) - len(bufs["torch"])) <= 0.005 * len(bufs["torch"]) + 2


@needs_openvino
def test_openvino_bfloat16_nan_is_redone_in_float32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenVINO saturates the overflow above instead of giving inf; a NaN from its bf16 run stands in."""
    from pillow_sdlatent.models.ov_backend import OpenVinoRunner

    real = OpenVinoRunner.__call__

    def nan_in_bf16(self: OpenVinoRunner, op: str, x: torch.Tensor) -> torch.Tensor:
        out = real(self, op, x)
        return out.fill_(float("nan")) if self.dtype == torch.bfloat16 else out

    monkeypatch.setattr(OpenVinoRunner, "__call__", nan_in_bf16)
    folder = str(_tiny_taesd(tmp_path / "t"))
    model = load_model(folder, "cpu", "bfloat16", backend="openvino")
    twin = load_model(folder, "cpu", "float32", backend="openvino")
    with pytest.warns(RuntimeWarning, match="NaN/inf in torch.bfloat16 during decode; redoing in float32"):
        img = model.decode(torch.zeros(1, 4, 3, 5))
    assert torch.equal(img, twin.decode(torch.zeros(1, 4, 3, 5)))


@needs_openvino
def test_openvino_is_imported_without_its_telemetry() -> None:
    code = (
        "import sys; from pillow_sdlatent.models.ov_backend import import_openvino; import_openvino()\n"
        "from openvino.tools.ovc import telemetry_utils\n"
        "print(telemetry_utils.tm.__name__, 'openvino_telemetry' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["openvino.tools.ovc.telemetry_stub", "False"]


def test_plugin_import_stays_free_of_openvino() -> None:
    code = "import sys, pillow_sdlatent; print('openvino' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    assert pillow_sdlatent  # registered in this process too
