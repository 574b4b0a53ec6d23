"""Eight threads encoding and decoding at once give the bytes and pixels one thread gives."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pillow_sdlatent
from pillow_sdlatent import options
from pillow_sdlatent.models import clear_cache

THREADS = 8


def _roundtrip(im: Image.Image, model: str) -> tuple[bytes, np.ndarray]:
    buf = io.BytesIO()
    im.save(buf, "SDL", model=model, device="cpu")
    out = pillow_sdlatent.open(io.BytesIO(buf.getvalue()), model=model, device="cpu")
    out.load()
    return buf.getvalue(), np.asarray(out)


@pytest.mark.parametrize("tile_size", [None, 64], ids=["untiled", "tiled"])
def test_threads_match_one_thread(
    taesd_dir: Path, kodak_crop: Image.Image, monkeypatch: pytest.MonkeyPatch, tile_size: int | None
) -> None:
    monkeypatch.setattr(options, "TILE_SIZE", tile_size)
    images = [kodak_crop, kodak_crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    want = [_roundtrip(im, str(taesd_dir)) for im in images]
    clear_cache()  # the threads race to load the model and prepare its weights too
    with ThreadPoolExecutor(THREADS) as pool:
        got = list(pool.map(lambda i: _roundtrip(images[i % 2], str(taesd_dir)), range(THREADS)))
    for i, (data, pixels) in enumerate(got):
        assert data == want[i % 2][0]
        assert np.array_equal(pixels, want[i % 2][1])


def test_eight_threads_save_and_open_two_hundred_files(tmp_path: Path, taesd_dir: Path, kodak_dir: Path) -> None:
    """Issue 7: 8 threads saving 200 files to disk and opening them again, against one thread, byte for byte."""
    with Image.open(kodak_dir / "kodim05.png") as im:
        source = im.convert("RGB")
    crops = [source.crop((x, y, x + 32, y + 24)) for y in range(0, 480, 48) for x in range(0, 760, 38)][:200]
    assert len(crops) == 200
    model = str(taesd_dir)

    def save_and_open(i: int, folder: Path) -> tuple[bytes, bytes]:
        path = folder / f"{i:03d}.sdl"
        pillow_sdlatent.save(crops[i], path, model=model, device="cpu", quality=60)
        with pillow_sdlatent.open(path, model=model, device="cpu") as out:
            return path.read_bytes(), out.tobytes()

    # One torch thread per worker: 8 workers x the default intra-op threads would oversubscribe 2 cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    (tmp_path / "one").mkdir()
    (tmp_path / "eight").mkdir()
    try:
        want = [save_and_open(i, tmp_path / "one") for i in range(200)]
        with ThreadPoolExecutor(THREADS) as pool:
            got = list(pool.map(lambda i: save_and_open(i, tmp_path / "eight"), range(200)))
    finally:
        torch.set_num_threads(threads)
    assert got == want
    assert sorted(p.name for p in (tmp_path / "eight").iterdir()) == [f"{i:03d}.sdl" for i in range(200)]
