"""The latent API: read_latents / write_latents exactness, batched encode/decode, atomic writes."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pillow_sdlatent
from pillow_sdlatent._atomic import atomic_write, write_bytes_atomic
from pillow_sdlatent.core import transform_coder
from pillow_sdlatent.core.codec import quantize
from pillow_sdlatent.core.settings import QuantSettings, settings_for
from pillow_sdlatent.latents import (
    decode_latents,
    encode_images,
    image_loader,
    latent_loader,
    read_latent_file,
    read_latents,
    write_latents,
)
from pillow_sdlatent.models import load_model


@pytest.fixture(autouse=True)
def _model(monkeypatch: pytest.MonkeyPatch, taesd_dir: Path) -> None:
    monkeypatch.setenv("SDLATENT_MODEL", str(taesd_dir))


@pytest.fixture(scope="module")
def taesd(taesd_dir: Path):
    return load_model(taesd_dir, "cpu")


@pytest.fixture(scope="module")
def crop_latents(taesd, kodak_crop: Image.Image) -> torch.Tensor:
    return encode_images([kodak_crop], taesd)[0]


def taesd_dir_spec(model) -> str:
    return model.source  # a spec string: write_latents loads it to read id and fingerprint


def _expected(latents: torch.Tensor, settings: QuantSettings) -> np.ndarray:
    """The quantized latents, computed by the quantizer alone (no container, no coder)."""
    return quantize(latents.numpy(), settings).latents(tuple(latents.shape[1:]))


def _error_bound(settings: QuantSettings, scale: np.ndarray) -> np.ndarray:
    """Largest quantization error of a latent: half a step, 1 - RHO steps in the dead zone, and for the
    transform the coefficients' bounds carried through the inverse DCT (largest basis products)."""
    if settings.quantizer == "transform":
        w = np.asarray(transform_coder.default_weights(), np.float64).reshape(4, 4) / 16
        per = np.full((4, 4), 1 - transform_coder.RHO)
        per[0, 0] = 0.5
        peak = np.abs(transform_coder.BASIS).max(axis=1)
        return scale * float((np.outer(peak, peak) * w * per).sum())
    return scale * 0.5


@pytest.mark.parametrize(
    ("options", "settings"),
    [
        ({}, settings_for(None)),  # the default quality and coder
        ({"quality": 100}, settings_for(100)),
        ({"settings": QuantSettings(levels=65536)}, QuantSettings(levels=65536)),  # 16-bit storage for datasets
    ],
)
def test_write_then_read_gives_quantized_latents_bit_for_bit(tmp_path, taesd, crop_latents, options, settings) -> None:
    path = tmp_path / "z.sdl"
    write_latents(path, crop_latents, taesd_dir_spec(taesd), **options)
    z, header = read_latents(path)
    assert z.dtype == torch.float32 and tuple(z.shape) == tuple(crop_latents.shape)
    expected = _expected(crop_latents, settings)
    assert z.numpy().tobytes() == expected.tobytes()  # bit for bit, not approximately
    assert header.model_id == "taesd" and header.fingerprint == taesd.fingerprint
    assert header.coder == settings.coder
    # quantization error is bounded per channel (see _error_bound)
    err = (z - crop_latents).abs().amax(dim=(1, 2)).numpy()
    assert np.all(err <= _error_bound(settings, header.scale) + 1e-6)


def test_write_latents_accepts_loaded_model_file_object_and_4d(taesd, crop_latents) -> None:
    buf = io.BytesIO()
    write_latents(buf, crop_latents[None], taesd, quality=90)
    z, header = read_latents(io.BytesIO(buf.getvalue()))
    assert tuple(z.shape) == tuple(crop_latents.shape)
    assert (header.width, header.height) == (crop_latents.shape[2] * 8, crop_latents.shape[1] * 8)


def test_write_latents_with_explicit_identity_loads_no_model(tmp_path) -> None:
    z = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0))
    fp = bytes(range(16))
    path = tmp_path / "z.sdl"
    write_latents(path, z, model_id="my-vae", fingerprint=fp.hex(), size=(37, 20))
    back, header = read_latents(path)
    assert header.model_id == "my-vae" and header.fingerprint == fp
    assert back.numpy().tobytes() == _expected(z, settings_for(None)).tobytes()
    assert (header.width, header.height, header.latent_shape) == (37, 20, (4, 3, 5))
    with Image.open(path) as im:  # a valid .sdl: Pillow reads its header
        assert im.format == "SDL" and im.size == (37, 20) and im.info["model"] == "my-vae"


def test_write_latents_errors_write_nothing(tmp_path, taesd) -> None:
    path = tmp_path / "z.sdl"
    with pytest.raises(ValueError, match="4"):  # TAESD has 4 latent channels
        write_latents(path, torch.zeros(16, 2, 2), taesd)
    with pytest.raises(ValueError, match="NaN"):
        write_latents(path, torch.full((4, 2, 2), float("nan")), taesd)
    with pytest.raises(TypeError, match="fingerprint"):
        write_latents(path, torch.zeros(4, 2, 2), model_id="x")
    with pytest.raises(ValueError, match="16 bytes"):
        write_latents(path, torch.zeros(4, 2, 2), model_id="x", fingerprint=b"short")
    with pytest.raises(ValueError, match="latent size"):  # 2x2 latents cannot make a 100x100 image
        write_latents(path, torch.zeros(4, 2, 2), taesd, size=(100, 100))
    assert list(tmp_path.iterdir()) == []


def test_rgba_with_alpha_plane(tmp_path, taesd, crop_latents) -> None:
    _, h, w = crop_latents.shape
    alpha = np.tile(np.arange(w * 8, dtype=np.uint8), (h * 8, 1))
    path = tmp_path / "a.sdl"
    write_latents(path, crop_latents, taesd, mode="RGBA", alpha=alpha)
    assert read_latents(path)[1].mode == "RGBA"
    with Image.open(path) as im:
        im.load()
        assert im.mode == "RGBA" and np.array_equal(np.asarray(im.getchannel("A")), alpha)


def test_decode_latents_matches_the_plugin(tmp_path, taesd, kodak_crop) -> None:
    path = tmp_path / "k.sdl"
    kodak_crop.save(path, quality=90)
    z, header = read_latents(path)
    (im,) = decode_latents([z], taesd, sizes=[(header.width, header.height)])
    with Image.open(path) as ref:
        assert np.array_equal(np.asarray(im), np.asarray(ref.convert("RGB")))
    assert im.size == kodak_crop.size


def test_batched_encode_decode_agree_with_single(taesd, kodak_crop) -> None:
    crops = [kodak_crop.crop((i * 8, 0, i * 8 + 48, 40)) for i in range(3)] + [kodak_crop.crop((0, 0, 32, 24))]
    batched = encode_images(crops, taesd, batch_size=8)
    single = [encode_images([c], taesd, batch_size=1)[0] for c in crops]
    assert [tuple(z.shape) for z in batched] == [(4, 5, 6)] * 3 + [(4, 3, 4)]
    for a, b in zip(batched, single, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    images = decode_latents(batched, taesd, sizes=[c.size for c in crops], batch_size=3)
    assert [im.size for im in images] == [c.size for c in crops]
    # a tensor batch in [0, 1] gives a tensor batch of the same latents
    x = torch.stack([torch.from_numpy(np.array(c)).permute(2, 0, 1).float() / 255 for c in crops[:3]])
    zt = encode_images(x, taesd, batch_size=2)
    assert isinstance(zt, torch.Tensor) and tuple(zt.shape) == (3, 4, 5, 6)
    torch.testing.assert_close(zt, torch.stack(batched[:3]), atol=1e-4, rtol=1e-4)


def test_lazy_exports() -> None:
    assert pillow_sdlatent.read_latents is read_latents
    assert pillow_sdlatent.write_latents is write_latents
    assert pillow_sdlatent.encode_images is encode_images
    assert pillow_sdlatent.decode_latents is decode_latents
    with pytest.raises(AttributeError):
        _ = pillow_sdlatent.no_such_name


def test_loaders(tmp_path, kodak_crop) -> None:
    path = tmp_path / "k.sdl"
    kodak_crop.save(path)
    assert tuple(latent_loader(path).shape) == (4, 8, 12)
    im = image_loader(path)
    assert im.mode == "RGB" and im.size == kodak_crop.size
    assert read_latent_file(path).header.width == kodak_crop.width


# ---------------------------------------------------------------- atomic writes


def test_atomic_write_replaces_only_on_success(tmp_path) -> None:
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write(b"half of the new")
        raise RuntimeError("disk on fire")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]  # the temporary file is gone
    write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_atomic_write_keyboard_interrupt_and_permissions(tmp_path) -> None:
    target = tmp_path / "g.bin"
    with pytest.raises(KeyboardInterrupt), atomic_write(target) as f:
        f.write(b"x")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    write_bytes_atomic(target, b"y")
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"y")
    # permissions as a plain open() gives them, not mkstemp's private 0600
    assert stat.S_IMODE(os.stat(target).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)
