"""Shared fixtures: paths into ../shared (skipped when absent) and tiny random models."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _find_shared() -> Path:
    """``../shared`` beside the checkout (``SDLATENT_SHARED`` overrides; worktrees one level deeper also work)."""
    if env := os.environ.get("SDLATENT_SHARED"):
        return Path(env)
    root = Path(__file__).resolve().parents[1]
    for parent in (root.parent, root.parent.parent):
        if (parent / "shared").is_dir():
            return parent / "shared"
    return root.parent / "shared"


#: The suite runs the models in torch, at the precision each test names, whatever this machine would choose:
#: results then do not depend on whether the [openvino] extra is installed or the CPU has AMX. The choices
#: themselves, and the OpenVINO backend, are tested in test_speed_paths.py.
os.environ["SDLATENT_BACKEND"] = "torch"
os.environ.setdefault("SDLATENT_DTYPE", "float32")

SHARED = _find_shared()
KODAK = SHARED / "data" / "kodak"
MODELS = SHARED / "models"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not available (../shared is absent)")
    return path


@pytest.fixture(scope="session")
def taesd_dir() -> Path:
    return _need(MODELS / "taesd")


@pytest.fixture(scope="session")
def taesdxl_dir() -> Path:
    return _need(MODELS / "taesdxl")


@pytest.fixture(scope="session")
def taef2_dir() -> Path:
    return _need(MODELS / "taef2")


@pytest.fixture(scope="session")
def kodak_dir() -> Path:
    return _need(KODAK)


@pytest.fixture(scope="session")
def kodak_crop(kodak_dir: Path) -> Image.Image:
    """A 96x64 RGB crop of kodim23 (parrots): real image statistics, fast to encode."""
    with Image.open(kodak_dir / "kodim23.png") as im:
        return im.convert("RGB").crop((300, 100, 396, 164))


@pytest.fixture
def gradient() -> Image.Image:
    """A synthetic 40x24 RGB image that needs no shared data."""
    y, x = np.mgrid[0:24, 0:40]
    arr = np.stack([x * 6, y * 10, (x + y) * 4], axis=-1).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


TINY_KL_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 8, 16, 16],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 32,
    "scaling_factor": 0.18215,
}


@pytest.fixture(scope="session")
def tiny_kl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers AutoencoderKL folder with the SD VAE's architecture shape (4 channels, 1/8), tiny widths."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-kl") / "tiny-sd-vae"
    AutoencoderKL(**TINY_KL_CONFIG).save_pretrained(folder)
    return folder


def roundtrip(im: Image.Image, **save_options: object) -> tuple[bytes, Image.Image]:
    """Save ``im`` as SDL to memory and open it again (loaded)."""
    buf = io.BytesIO()
    im.save(buf, "SDL", **save_options)
    data = buf.getvalue()
    out = Image.open(io.BytesIO(data))
    out.load()
    return data, out


def psnr(a: Image.Image, b: Image.Image) -> float:
    x = np.asarray(a.convert("RGB"), np.float64)
    y = np.asarray(b.convert("RGB"), np.float64)
    mse = ((x - y) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No model can be found: none named by the environment, none cached, none loaded in this process."""
    monkeypatch.delenv("SDLATENT_MODEL", raising=False)
    monkeypatch.delenv("SDLATENT_MODEL_PATH", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    from pillow_sdlatent.models import clear_cache

    clear_cache()  # a model loaded earlier in this process would be found by its id
