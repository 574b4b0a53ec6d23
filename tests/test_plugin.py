"""Pillow round trips through the plugin with real and tiny models."""

from __future__ import annotations

import pytest
from conftest import psnr, roundtrip
from PIL import Image

import pillow_sdlatent  # noqa: F401  (registers the format)


@pytest.fixture(autouse=True)
def _model(monkeypatch: pytest.MonkeyPatch, taesd_dir) -> None:
    monkeypatch.setenv("SDLATENT_MODEL", str(taesd_dir))


def test_roundtrip_bytesio(kodak_crop: Image.Image) -> None:
    data, out = roundtrip(kodak_crop, quality=90)
    assert data[:8] == b"\x89SDL\r\n\x1a\n"
    assert out.format == "SDL" and out.mode == "RGB" and out.size == kodak_crop.size
    assert psnr(kodak_crop, out) > 20


def test_roundtrip_path(tmp_path, kodak_crop: Image.Image) -> None:
    path = tmp_path / "a.sdl"
    kodak_crop.save(path)  # format from the extension
    with Image.open(path) as im:
        assert im.format == "SDL" and im.info["model"] == "taesd"
        im.load()
        assert psnr(kodak_crop, im) > 20
