"""One encode path: Image.save, the latent API and pipeline.encode_chunks write the same bytes."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from pillow_sdlatent import pipeline, write_latents
from pillow_sdlatent.models import load_model


@pytest.fixture(scope="module")
def taesd(taesd_dir: Path):
    return load_model(str(taesd_dir), "cpu")


@pytest.mark.parametrize("options", [{"quality": 40}, {"target_bpp": 4.0}, {"method": "scalar", "preview": False}])
def test_image_save_is_encode_image(gradient: Image.Image, taesd, taesd_dir: Path, options: dict) -> None:
    buf = io.BytesIO()
    gradient.save(buf, "SDL", model=str(taesd_dir), **options)
    assert buf.getvalue() == pipeline.file_bytes(pipeline.encode_image(gradient, taesd, **options))


def test_write_latents_is_encode_chunks(gradient: Image.Image, taesd) -> None:
    _, rgb, _ = pipeline.split_image(gradient)
    z = pipeline.encode_latents(taesd, rgb, 0)
    buf = io.BytesIO()
    write_latents(buf, z, taesd, size=gradient.size, quality=55)
    assert buf.getvalue() == pipeline.file_bytes(pipeline.encode_chunks(z, taesd, size=gradient.size, quality=55))
    with_preview = pipeline.file_bytes(pipeline.encode_chunks(z, taesd, size=gradient.size, quality=55, rgb=rgb))
    assert len(with_preview) > len(buf.getvalue())  # the prVw chunk needs the image


def test_options_are_checked_before_the_encoder_runs(gradient: Image.Image, taesd, monkeypatch) -> None:
    monkeypatch.setattr(pipeline, "encode_latents", lambda *a, **k: pytest.fail("the encoder ran"))
    for bad, match in [({"quality": 50, "target_size": 900}, "not both"), ({"quality": 101}, "quality"),
                       ({"refine": -1}, "refine"), ({"method": "nope"}, "method")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            pipeline.encode_image(gradient, taesd, **bad)


def test_refining_needs_the_image(taesd) -> None:
    import numpy as np

    with pytest.raises(ValueError, match="refine needs the image"):
        pipeline.encode_chunks(np.zeros((4, 3, 5), np.float32), taesd, refine=2)
