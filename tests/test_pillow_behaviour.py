"""Pillow-citizen behaviour (issue 22): what image tools expect of a plugin, as README's "Pillow behaviour" says."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

import pillow_sdlatent
from pillow_sdlatent.core.settings import QuantSettings
from pillow_sdlatent.fuzzing import build_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def _taesd(monkeypatch: pytest.MonkeyPatch, taesd_dir: Path) -> None:
    monkeypatch.setenv("SDLATENT_MODEL", str(taesd_dir))


@pytest.fixture
def sdl_bytes(gradient: Image.Image, _taesd: None) -> bytes:
    buf = io.BytesIO()
    gradient.save(buf, "SDL", quality=50)
    return buf.getvalue()


def test_import_is_cheap() -> None:
    """Registering the plugin imports neither numpy nor the codec's compiled dependencies (nor torch)."""
    code = (
        "import sys, pillow_sdlatent; from PIL import Image; assert '.sdl' in Image.registered_extensions(); "
        "print(sorted(m for m in ('numpy', 'torch', 'zstandard', 'constriction', 'diffusers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("piece", [100, 4096])
def test_image_file_parser(sdl_bytes: bytes, piece: int, gradient: Image.Image) -> None:
    p = ImageFile.Parser()
    known_at = None
    for start in range(0, len(sdl_bytes), piece):
        p.feed(sdl_bytes[start : start + piece])
        if known_at is None and p.image is not None:
            known_at = start + piece
            assert p.image.size == gradient.size and p.image.mode == "RGB" and p.image.format == "SDL"
    assert known_at is not None and known_at <= max(piece, 512)  # the header is enough for size sniffers
    im = p.close()
    assert im.size == gradient.size and np.asarray(im).std() > 0  # decoded once the whole file was fed


def test_load_after_close_is_pillows_value_error(sdl_bytes: bytes) -> None:
    im = Image.open(io.BytesIO(sdl_bytes))
    im.close()
    with pytest.raises(ValueError, match="Operation on closed image"):
        im.load()


def test_load_after_verify_says_so(sdl_bytes: bytes) -> None:
    im = Image.open(io.BytesIO(sdl_bytes))
    im.verify()
    with pytest.raises(ValueError, match="verified or closed"):
        im.load()


@pytest.mark.parametrize("size", [(0, 0), (0, 5), (5, 0)])
def test_empty_image_is_refused_like_png(size: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="cannot write empty image"):
        Image.new("RGB", size).save(io.BytesIO(), "SDL")


def test_save_all_single_frame_and_clear_error_for_many(gradient: Image.Image, _taesd: None) -> None:
    buf = io.BytesIO()
    gradient.save(buf, "SDL", save_all=True, quality=30)  # one frame: an ordinary file
    assert Image.open(io.BytesIO(buf.getvalue())).size == gradient.size
    with pytest.raises(ValueError, match="SDL files hold one image, not 2 frames"):
        gradient.save(io.BytesIO(), "SDL", save_all=True, append_images=[gradient])


def test_info_holds_no_private_keys(sdl_bytes: bytes) -> None:
    im = Image.open(io.BytesIO(sdl_bytes))  # with a prVw chunk, once exposed as info["_ancillary"]
    assert set(im.info) == {"model"}
    data = build_file(16, 16, "RGB", 4, QuantSettings("scalar", 16), 1, {"xmp": "<x/>"})
    assert set(Image.open(io.BytesIO(data)).info) == {"xmp", "model"}


def test_ancillary_chunks_stay_reachable(gradient: Image.Image, _taesd: None) -> None:
    buf = io.BytesIO()
    gradient.save(buf, "SDL")
    im = Image.open(io.BytesIO(buf.getvalue()))
    assert set(im.ancillary) == {"prVw"} and im.preview_map() is not None


def _stored_grey(im: Image.Image) -> np.ndarray:
    from pillow_sdlatent.pipeline import split_image

    with pytest.warns(UserWarning, match="stored as 8-bit L"):
        stored, rgb, _ = split_image(im)
    assert stored == "L"
    return rgb[..., 0]


@pytest.mark.parametrize(
    ("mode", "values"),
    [
        ("I", [0, 1, 128, 254, 255, 256, 1000, -3]),
        ("F", [0.0, 0.5, 1.0, 1.5, 128.4, 255.0, 256.0, -1.0]),
    ],
)
def test_high_bit_depth_grey_is_stored_as_convert_l(mode: str, values: list[float]) -> None:
    """The stored grey of each value does not depend on the rest of the image: Pillow's convert("L")."""
    arr = np.array([values], dtype=np.int32 if mode == "I" else np.float32)
    im = Image.fromarray(arr, mode)
    expected = np.asarray(im.convert("L"))[0]
    assert list(_stored_grey(im)[0]) == list(expected)
    for i, v in enumerate(values):  # each value alone gives the same grey: nothing data-dependent
        alone = Image.fromarray(np.full((1, 2), v, arr.dtype), mode)
        assert int(_stored_grey(alone)[0, 0]) == int(expected[i])
    if mode == "I":
        assert list(expected[4:6]) == [255, 255]  # 255 and 256 both white, as Pillow


def test_16_bit_grey_is_scaled_from_its_range() -> None:
    im = Image.new("I;16", (3, 1))
    im.putdata([0, 257 * 100, 65535])
    assert list(_stored_grey(im)[0]) == [0, 100, 255]
    assert int(_stored_grey(Image.new("I;16", (1, 1), 256))[0, 0]) == 1  # not data-dependent: 256 is 1, not white


def test_no_plugin_entry_point() -> None:
    """No Pillow reads a "PIL.plugins" entry point; registration is import or register_sdlatent_opener()."""
    text = (ROOT / "pyproject.toml").read_text()
    assert "PIL.plugins" not in text
    assert callable(pillow_sdlatent.register_sdlatent_opener)


def test_missing_model_message_says_each_thing_once(no_model: None) -> None:
    import warnings

    data = build_file(64, 64, "RGB", 4, QuantSettings("scalar", 16), 1, model_id="stabilityai/sd-vae-ft-mse")
    for action in (lambda: Image.new("RGB", (16, 16)).save(io.BytesIO(), "SDL"),
                   lambda: Image.open(io.BytesIO(data)).load()):  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(pillow_sdlatent.ModelNotFoundError) as info:
                action()
        text = str(info.value)
        assert text.count("Download it once") == 1 and text.count("model=...") == 1, text
        assert ".." not in text.replace("model=...", "").replace("../shared", ""), text
        assert not [w for w in caught if "local_dir_use_symlinks" in str(w.message)]


def test_sitecustomize_recipe_registers_for_tools_you_cannot_edit(tmp_path: Path) -> None:
    """README's recipe: a sitecustomize.py importing pillow_sdlatent makes every Python process read .sdl."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text("import pillow_sdlatent  # noqa: F401\n")
    sdl = tmp_path / "a.sdl"
    sdl.write_bytes(build_file(24, 16, "RGB", 4, QuantSettings("scalar", 16), 1))
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{ROOT}"}
    code = f"from PIL import Image; im = Image.open({str(sdl)!r}); print(im.format, im.size)"  # a tool's own code
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "SDL (24, 16)"
