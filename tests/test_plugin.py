"""Pillow round trips through the plugin with real and tiny models."""

from __future__ import annotations

import io
import sys

import pytest
from conftest import psnr, roundtrip
from PIL import Image

import pillow_sdlatent


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


def test_format_registered() -> None:
    assert Image.registered_extensions()[".sdl"] == "SDL"
    assert Image.MIME["SDL"] == "image/x-sdlatent"
    assert "SDL" in Image.SAVE


def test_import_does_not_load_torch() -> None:
    import subprocess

    code = "import sys, pillow_sdlatent; from PIL import Image; assert 'torch' not in sys.modules; "
    code += "assert 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))


def test_open_reads_header_only(tmp_path, kodak_crop: Image.Image) -> None:
    path = tmp_path / "a.sdl"
    kodak_crop.save(path, quality=50)
    with Image.open(path) as im:
        assert (im.size, im.mode, im.format_description) == ((96, 64), "RGB", "Stable Diffusion latent image")
        assert im.tile and im._im is None  # nothing decoded yet


def test_non_sdl_is_unidentified() -> None:
    with pytest.raises(Image.UnidentifiedImageError):
        Image.open(io.BytesIO(b"\x89SDX\r\n\x1a\n" + b"\x00" * 40), formats=["SDL"])


def test_text_mode_mangled_signature_rejected(kodak_crop: Image.Image) -> None:
    data, _ = roundtrip(kodak_crop)
    with pytest.raises(Image.UnidentifiedImageError):
        Image.open(io.BytesIO(data.replace(b"\r\n", b"\n", 1)))


def test_corrupt_payload_raises_on_load(kodak_crop: Image.Image) -> None:
    data = bytearray(roundtrip(kodak_crop)[0])
    data[-30] ^= 0x40  # inside LDAT
    im = Image.open(io.BytesIO(bytes(data)))
    with pytest.raises(OSError, match="CRC mismatch"):
        im.load()


def test_verify_checks_crcs_without_model(kodak_crop: Image.Image, monkeypatch) -> None:
    data = bytearray(roundtrip(kodak_crop)[0])
    monkeypatch.setenv("SDLATENT_MODEL", "/nonexistent")  # verify must not need the model
    Image.open(io.BytesIO(bytes(data))).verify()
    data[-30] ^= 0x40
    with pytest.raises(OSError, match="CRC mismatch"):
        Image.open(io.BytesIO(bytes(data))).verify()


def test_truncated_file(kodak_crop: Image.Image) -> None:
    from PIL import ImageFile

    data = roundtrip(kodak_crop, quality=90)[0][:-40]
    with pytest.raises(OSError, match="truncated"):
        Image.open(io.BytesIO(data)).load()
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
        assert im.size == kodak_crop.size
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def test_decompression_bomb_check_before_decode(kodak_crop: Image.Image, monkeypatch) -> None:
    data = roundtrip(kodak_crop)[0]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))


def test_metadata_roundtrip(kodak_crop: Image.Image) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: kept as metadata, not applied
    icc = b"\x00\x00\x02\x0cfake-icc"
    _, out = roundtrip(kodak_crop, exif=exif, icc_profile=icc, xmp=b"<x:xmpmeta/>")
    assert out.getexif()[0x0112] == 6 and out.size == kodak_crop.size
    assert out.info["icc_profile"] == icc and out.info["xmp"] == b"<x:xmpmeta/>"
    # Re-saving keeps the metadata without asking.
    _, again = roundtrip(out)
    assert again.info["icc_profile"] == icc and again.getexif()[0x0112] == 6


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA"])
def test_modes_keep_alpha_and_grey(kodak_crop: Image.Image, mode: str) -> None:
    src = kodak_crop.convert(mode)
    if "A" in mode:
        a = Image.linear_gradient("L").resize(src.size)
        src.putalpha(a)
    _, out = roundtrip(src, quality=90)
    assert out.mode == mode
    if "A" in mode:
        assert out.getchannel("A").tobytes() == src.getchannel("A").tobytes()  # lossless


def test_quality_monotone_size(kodak_crop: Image.Image) -> None:
    sizes = [len(roundtrip(kodak_crop, quality=q)[0]) for q in (10, 40, 75, 100)]
    assert sizes == sorted(sizes)


def test_failed_save_leaves_no_file(tmp_path, kodak_crop: Image.Image) -> None:
    path = tmp_path / "x.sdl"
    with pytest.raises(ValueError, match="quality"):
        kodak_crop.save(path, quality=500)
    assert not path.exists()
    with pytest.raises(FileNotFoundError, match="SDLATENT_MODEL"):
        kodak_crop.save(path, model=str(tmp_path / "no-such-model"))
    assert not path.exists()


def test_save_helper_replaces_an_existing_file_atomically(tmp_path, kodak_crop: Image.Image) -> None:
    path = tmp_path / "x.sdl"
    path.write_bytes(b"precious")
    with pytest.raises(FileNotFoundError, match="SDLATENT_MODEL"):
        pillow_sdlatent.save(kodak_crop, path, model=str(tmp_path / "no-such-model"))
    assert path.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["x.sdl"]  # no temporary file left behind
    pillow_sdlatent.save(kodak_crop, path, quality=50)
    buffer = io.BytesIO()
    kodak_crop.save(buffer, "SDL", quality=50)
    assert path.read_bytes() == buffer.getvalue()
    # The risk the helper exists for: Pillow itself truncates an existing target before the plugin runs.
    with pytest.raises(FileNotFoundError):
        kodak_crop.save(path, model=str(tmp_path / "no-such-model"))
    assert path.read_bytes() == b""


def test_original_method_and_palette(kodak_crop: Image.Image) -> None:
    for method in ("original", "palette"):
        _, out = roundtrip(kodak_crop, method=method)
        assert psnr(kodak_crop, out) > 18


def test_taef2_32_channels(taef2_dir, kodak_crop: Image.Image) -> None:
    data, out = roundtrip(kodak_crop, model=str(taef2_dir), quality=90)
    from pillow_sdlatent.core.codec import decode_bytes

    assert decode_bytes(data).header.channels == 32
    assert psnr(kodak_crop, out) > 22
    _, pal = roundtrip(kodak_crop, model=str(taef2_dir), method="palette")
    assert pal.size == kodak_crop.size


def test_tiny_autoencoderkl(tiny_kl_dir, gradient: Image.Image) -> None:
    data, out = roundtrip(gradient, model=str(tiny_kl_dir))
    from pillow_sdlatent.core.codec import decode_bytes

    header = decode_bytes(data).header
    assert header.model_id == "tiny-sd-vae" and header.latent_shape == (4, 3, 5)
    assert out.size == gradient.size  # random weights: only shape and plumbing are meaningful


def test_model_missing_error_names_fix(tmp_path, kodak_crop: Image.Image, monkeypatch) -> None:
    data = roundtrip(kodak_crop)[0]
    monkeypatch.delenv("SDLATENT_MODEL")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from pillow_sdlatent.models import clear_cache

    clear_cache()  # a model loaded earlier in this process would be found by its id
    im = Image.open(io.BytesIO(data))
    with pytest.raises(FileNotFoundError, match=r"'taesd'.*SDLATENT_MODEL"):
        im.load()
    ok = pillow_sdlatent.open(io.BytesIO(data), model=str(__import__("conftest").MODELS / "taesd"))
    ok.load()
