""".sdl through standard tools: imageio, torchvision datasets, torch DataLoader, a plain Pillow script."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pillow_sdlatent
from pillow_sdlatent.latents import image_loader, latent_loader, read_latents

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _model(monkeypatch: pytest.MonkeyPatch, taesd_dir: Path) -> None:
    monkeypatch.setenv("SDLATENT_MODEL", str(taesd_dir))


@pytest.fixture
def sdl_file(tmp_path: Path, kodak_crop: Image.Image) -> Path:
    path = tmp_path / "k.sdl"
    kodak_crop.save(path)
    return path


@pytest.fixture
def dataset_root(tmp_path: Path, kodak_crop: Image.Image) -> Path:
    """root/{birds,leaves}/*.sdl: two classes of 48x40 crops, as ImageFolder expects."""
    root = tmp_path / "ds"
    for cls, boxes in {"birds": [(0, 0), (40, 16)], "leaves": [(8, 8)]}.items():
        (root / cls).mkdir(parents=True)
        for i, (x, y) in enumerate(boxes):
            kodak_crop.crop((x, y, x + 48, y + 40)).save(root / cls / f"{i}.sdl")
    return root


def test_imageio_reads_and_writes_through_pillow(tmp_path: Path, sdl_file: Path, kodak_crop: Image.Image) -> None:
    iio = pytest.importorskip("imageio.v3")
    arr = iio.imread(sdl_file, plugin="pillow")
    with Image.open(sdl_file) as im:
        assert arr.dtype == np.uint8 and arr.shape == (64, 96, 3)
        assert np.array_equal(arr, np.asarray(im))
    out = tmp_path / "w.sdl"
    iio.imwrite(out, np.asarray(kodak_crop), plugin="pillow", extension=".sdl")
    with Image.open(out) as im:
        assert im.format == "SDL" and im.size == (96, 64)


def _torchvision():
    # torchvision's PyPI wheels are built against CUDA torch; beside a CPU-only torch build of another version
    # they fail at import ("operator torchvision::nms does not exist"), which is a RuntimeError, not ImportError.
    try:
        import torchvision.datasets
    except ModuleNotFoundError:
        pytest.skip("torchvision is not installed")
    except Exception as exc:
        pytest.skip(f"torchvision does not import beside torch {torch.__version__} here: {type(exc).__name__}: {exc}")
    return torchvision.datasets


def test_torchvision_image_folder(dataset_root: Path) -> None:
    datasets = _torchvision()
    # ImageFolder's extension list is fixed (without .sdl): select files with is_valid_file instead
    ds = datasets.ImageFolder(str(dataset_root), loader=image_loader, is_valid_file=lambda p: p.endswith(".sdl"))
    assert ds.classes == ["birds", "leaves"] and len(ds) == 3
    im, label = ds[2]
    assert isinstance(im, Image.Image) and im.mode == "RGB" and im.size == (48, 40) and label == 1


def test_torchvision_dataset_folder_of_latents(dataset_root: Path) -> None:
    datasets = _torchvision()
    extensions = tuple(pillow_sdlatent.plugin.EXTENSIONS)
    ds = datasets.DatasetFolder(str(dataset_root), loader=latent_loader, extensions=extensions)
    z, label = ds[0]
    assert isinstance(z, torch.Tensor) and tuple(z.shape) == (4, 5, 6) and label == 0
    assert torch.equal(z, read_latents(dataset_root / "birds" / "0.sdl")[0])


def test_dataloader_reads_latents_straight_from_files(dataset_root: Path) -> None:
    """A training loop's input pipeline without torchvision: latents batched by a DataLoader."""
    files = sorted(dataset_root.rglob("*.sdl"))

    class Latents(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(files)

        def __getitem__(self, i: int) -> torch.Tensor:
            return latent_loader(files[i])

    batches = list(torch.utils.data.DataLoader(Latents(), batch_size=2))
    assert [tuple(b.shape) for b in batches] == [(2, 4, 5, 6), (1, 4, 5, 6)]
    assert torch.equal(batches[1][0], read_latents(files[2])[0])


PLAIN_SCRIPT = textwrap.dedent(
    """
    import sys
    from PIL import Image
    import pillow_sdlatent  # registers .sdl

    Image.open(sys.argv[1]).save(sys.argv[2])
    """
)


def test_plain_pillow_script_converts_both_ways(tmp_path: Path, kodak_crop: Image.Image, taesd_dir: Path) -> None:
    src = tmp_path / "src.png"
    kodak_crop.save(src)
    script = tmp_path / "convert.py"
    script.write_text(PLAIN_SCRIPT)
    env = dict(os.environ, SDLATENT_MODEL=str(taesd_dir), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    for a, b in (("src.png", "mid.sdl"), ("mid.sdl", "out.png")):
        r = subprocess.run([sys.executable, str(script), a, b], cwd=tmp_path, env=env, capture_output=True, timeout=300)
        assert r.returncode == 0, r.stderr.decode()
    with Image.open(tmp_path / "mid.sdl") as sdl, Image.open(tmp_path / "out.png") as png:
        assert sdl.format == "SDL" and png.format == "PNG" and png.size == (96, 64)
        assert np.array_equal(np.asarray(sdl), np.asarray(png))
