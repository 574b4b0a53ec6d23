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


def test_encode_each_retries_a_failed_batch_one_image_at_a_time() -> None:
    """What sdlatent convert and the Ray actors rely on: one bad image costs only itself."""
    import numpy as np
    import torch

    class Flaky:  # batches of more than one image run out of memory; 16-pixel-wide images always fail
        downscale = 8

        def encode(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[-1] == 16:
                raise RuntimeError("no memory for this size")
            if x.shape[0] > 1:
                raise MemoryError("no memory for this batch")
            return torch.full((1, 4, x.shape[2] // 8, x.shape[3] // 8), float(x.mean()))

    images = [np.full((8, 8, 3), v, np.uint8) for v in (0, 255)] + [np.zeros((8, 16, 3), np.uint8)]
    out = pipeline.encode_each(Flaky(), images, 3)  # type: ignore[arg-type]
    assert [type(z).__name__ for z in out] == ["ndarray", "ndarray", "RuntimeError"]
    assert out[0].shape == (4, 1, 1) and float(out[1].mean()) > float(out[0].mean())
    assert isinstance(pipeline.encode_each(Flaky(), images[2:], 1)[0], RuntimeError)  # alone: no second try
