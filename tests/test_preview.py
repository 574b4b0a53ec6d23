"""Model-free previews: the prVw chunk, Pillow draft semantics, and decoding without torch or the model."""

from __future__ import annotations

import io
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import psnr
from PIL import Image

import pillow_sdlatent  # noqa: F401  (registers the format)
from pillow_sdlatent.core import preview
from pillow_sdlatent.core.codec import decode_bytes

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- model-free layer


def test_features_layout() -> None:
    z = np.arange(2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3)
    f = preview.features(z)
    assert f.shape == (5, 2, 3) and f.dtype == np.float32
    assert np.all(f[0] == 1) and np.array_equal(f[1:3], z)
    # channel 0 = [[0, 1, 2], [3, 4, 5]]; at (0, 0) the neighbours (edge-replicated) are 0 (up), 3, 0 (left), 1
    assert f[3, 0, 0] == pytest.approx((0 + 3 + 0 + 1) / 4 - 0)
    assert f[3, 1, 1] == pytest.approx((1 + 4 + 3 + 5) / 4 - 4)


def test_box_reduce_averages_partial_blocks() -> None:
    a = np.arange(15, dtype=np.uint8).reshape(3, 5)
    r = preview.box_reduce(a, 2)
    assert r.shape == (2, 3)
    assert r[0, 0] == pytest.approx((0 + 1 + 5 + 6) / 4)
    assert r[0, 2] == pytest.approx((4 + 9) / 2)
    assert r[1, 2] == pytest.approx(14)
    rgb = np.stack([a, a, a], -1)
    assert np.array_equal(preview.box_reduce(rgb, 2)[..., 1], r)


def test_fit_recovers_an_exact_map() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4, 12, 16)).astype(np.float32)
    truth = rng.normal(scale=20, size=(3, 9)).astype(np.float32)
    truth[:, 0] = 128
    target = (truth @ preview.features(z).reshape(9, -1)).T.reshape(12, 16, 3)
    assert np.allclose(preview.fit(z, target), truth, atol=1e-2)


def test_fit_survives_a_constant_channel() -> None:
    z = np.zeros((4, 6, 6), np.float32)
    z[1] = np.linspace(-1, 1, 36).reshape(6, 6)
    target = np.full((6, 6, 1), 77.0)
    m = preview.fit(z, target)
    assert np.all(np.isfinite(m))
    assert np.array_equal(preview.render(z, m), np.full((6, 6, 1), 77, np.uint8))


def test_payload_bytes_and_roundtrip() -> None:
    m = np.array([[1.0, 2.0, -0.5]], np.float32)
    payload = preview.pack(m)
    assert payload == bytes([1, 1, 1, 0]) + bytes.fromhex("3f800000 40000000 bf000000")
    assert np.array_equal(preview.unpack(payload, 1), m)


@pytest.mark.parametrize(
    "payload",
    [b"", bytes([2, 1, 1, 0]) + bytes(12), bytes([1, 9, 1, 0]) + bytes(12), bytes([1, 1, 2, 0]) + bytes(24),
     bytes([1, 1, 1, 0]) + bytes(8), bytes([1, 1, 1, 0]) + bytes.fromhex("7fc00000") + bytes(8)],
)  # fmt: skip
def test_unusable_payloads_are_rejected(payload: bytes) -> None:
    with pytest.raises(preview.PreviewError):
        preview.unpack(payload, 1)


def test_render_clips_and_rounds() -> None:
    z = np.array([[[0.0, 1.0, 2.0]]], np.float32)  # (1, 1, 3)
    m = np.array([[100.0, 100.4, 0.0]], np.float32)
    assert preview.render(z, m)[..., 0].tolist() == [[100, 200, 255]]


# ---------------------------------------------------------------- through Pillow, with TAESD


@pytest.fixture
def _taesd(monkeypatch: pytest.MonkeyPatch, taesd_dir: Path) -> None:
    monkeypatch.setenv("SDLATENT_MODEL", str(taesd_dir))


def _save(im: Image.Image, **options: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "SDL", **options)
    return buf.getvalue()


@pytest.fixture(scope="module")
def crop(kodak_dir: Path) -> Image.Image:
    """90x60: neither side a multiple of 8, so the preview is ceil-sized (12x8)."""
    with Image.open(kodak_dir / "kodim23.png") as im:
        return im.convert("RGB").crop((300, 100, 390, 160))


@pytest.fixture(scope="module")
def files(crop: Image.Image, taesd_dir: Path) -> dict[str, bytes]:
    """One file per stored mode."""
    alpha = Image.linear_gradient("L").resize(crop.size)
    rgba = crop.copy()
    rgba.putalpha(alpha)
    images = {"RGB": crop, "L": crop.convert("L"), "RGBA": rgba, "LA": rgba.convert("LA")}
    return {mode: _save(im, model=str(taesd_dir), quality=75) for mode, im in images.items()}


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA"])
def test_preview_for_every_mode(files: dict[str, bytes], crop: Image.Image, mode: str) -> None:
    lf = decode_bytes(files[mode])
    payload = lf.info["_ancillary"]["prVw"]
    outputs = 1 if mode in ("L", "LA") else 3
    assert payload[:4] == bytes([1, 1, outputs, 0]) and len(payload) == 4 + 4 * outputs * 9

    im = Image.open(io.BytesIO(files[mode]))
    w, h = im.size
    assert im.draft("RGB", (w // 8, h // 8)) == (mode, (0, 0, w / 8, h / 8))
    assert im.size == (math.ceil(w / 8), math.ceil(h / 8)) == (12, 8)
    im.load()
    assert im.mode == mode and im.size == (12, 8)
    ref = crop.reduce(8)
    assert psnr(im.convert("RGB"), ref.convert("L").convert("RGB") if outputs == 1 else ref) > 22
    if "A" in mode:
        # a vertical gradient box-reduced: increasing top to bottom, as the original alpha
        col = np.asarray(im.getchannel("A"))[:, 0].astype(int)
        assert np.all(np.diff(col) > 0)


@pytest.mark.parametrize("size", [(23, 14), (22, 15), (90, 60)])
def test_draft_larger_than_twice_the_preview_keeps_full_size(files: dict[str, bytes], _taesd: None, size) -> None:
    im = Image.open(io.BytesIO(files["RGB"]))
    assert im.draft("RGB", size) == ("RGB", (0, 0, 90, 60))  # preview 11x7 (90 // 8, 60 // 8): 2x is 22x14
    assert im.size == (90, 60)
    im.load()
    assert im.size == (90, 60)


def test_draft_up_to_twice_the_preview_gives_it(files: dict[str, bytes]) -> None:
    im = Image.open(io.BytesIO(files["RGB"]))
    assert im.draft("RGB", (22, 14)) == ("RGB", (0, 0, 11.25, 7.5))
    assert im.size == (12, 8)


def test_draft_only_once_and_only_before_load(files: dict[str, bytes], _taesd: None) -> None:
    im = Image.open(io.BytesIO(files["RGB"]))
    assert im.draft(None, (11, 7)) == ("RGB", (0, 0, 11.25, 7.5))
    assert im.draft(None, (90, 60)) is None  # second call: no effect, as JPEG
    assert im.size == (12, 8)
    loaded = Image.open(io.BytesIO(files["RGB"]))
    loaded.load()
    assert loaded.draft("RGB", (11, 7)) is None and loaded.size == (90, 60)


def test_draft_mode_l_on_rgb(files: dict[str, bytes], _taesd: None) -> None:
    im = Image.open(io.BytesIO(files["RGB"]))
    assert im.draft("L", (11, 7)) == ("L", (0, 0, 11.25, 7.5))
    im.load()
    assert im.mode == "L" and im.size == (12, 8)
    full = Image.open(io.BytesIO(files["RGB"]))
    assert full.draft("L", None) == ("L", (0, 0, 90, 60))
    full.load()
    assert full.mode == "L" and full.size == (90, 60)


def test_thumbnail_uses_the_preview_without_the_model(files: dict[str, bytes], monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SDLATENT_MODEL", str(tmp_path / "no-such-model"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    im = Image.open(io.BytesIO(files["RGB"]))
    im.thumbnail((3, 3))  # draft(None, (6, 6)): within twice the 11x7 preview, so the preview, then a resize
    assert im.size == (3, 2)
    im = Image.open(io.BytesIO(files["RGB"]))
    im.thumbnail((11, 7))  # a thumbnail of 1/8 scale: draft(None, (22, 14)), still the preview
    assert im.size == (10, 7)  # 90x60's aspect in 11x7


def test_thumbnail_above_one_eighth_needs_the_model(files: dict[str, bytes], no_model: None) -> None:
    im = Image.open(io.BytesIO(files["RGB"]))
    with pytest.raises(FileNotFoundError, match=r"im\.thumbnail\(size\) for any size up to 11x7"):
        im.thumbnail((12, 8))


def test_missing_model_error_points_to_the_preview(files: dict[str, bytes], no_model: None) -> None:
    from pillow_sdlatent import ModelNotFoundError

    im = Image.open(io.BytesIO(files["RGB"]))
    with pytest.raises(ModelNotFoundError, match=r"not available here.*preview.*im\.draft\('RGB', \(11, 7\)\)"):
        im.load()
    im = Image.open(io.BytesIO(files["RGB"]))
    im.draft("RGB", (11, 7))
    im.load()
    assert im.size == (12, 8)


def test_save_without_preview(crop: Image.Image, taesd_dir: Path, _taesd: None) -> None:
    data = _save(crop, model=str(taesd_dir), preview=False)
    assert b"prVw" not in data
    im = Image.open(io.BytesIO(data))
    assert im.draft("RGB", (11, 7)) == ("RGB", (0, 0, 90, 60))
    assert im.size == (90, 60)


def test_corrupt_preview_is_ignored_with_a_warning(files: dict[str, bytes], _taesd: None) -> None:
    from pillow_sdlatent.core.container import SIGNATURE, Chunk, pack_chunk, read_chunk

    fp = io.BytesIO(files["RGB"][8:])
    chunks = []
    while fp.tell() < len(files["RGB"]) - 8:
        c = read_chunk(fp)
        chunks.append(Chunk(c.type, bytes([1, 7, 3, 0]) + c.payload[4:]) if c.type == b"prVw" else c)
    data = SIGNATURE + b"".join(pack_chunk(c.type, c.payload) for c in chunks)
    im = Image.open(io.BytesIO(data))
    with pytest.warns(UserWarning, match="ignoring the preview chunk"):
        assert im.draft("RGB", (11, 7)) == ("RGB", (0, 0, 90, 60))
    assert im.size == (90, 60)


def test_preview_without_torch(files: dict[str, bytes], tmp_path: Path) -> None:
    path = tmp_path / "a.sdl"
    path.write_bytes(files["RGBA"])
    im = Image.open(path)
    im.draft("RGB", (11, 7))
    im.load()
    expected = im.tobytes().hex()
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any "import torch" now raises ImportError
        import pillow_sdlatent
        from PIL import Image
        im = Image.open({str(path)!r})
        im.draft("RGB", (11, 7))
        im.load()
        assert im.size == (12, 8) and im.mode == "RGBA", (im.size, im.mode)
        assert im.tobytes().hex() == {expected!r}, "preview differs from the in-process one"
        full = Image.open({str(path)!r})
        try:
            full.load()
        except ImportError as exc:
            assert "needs torch" in str(exc) and "preview" in str(exc), exc
        else:
            raise AssertionError("full load without torch should fail")
        assert all(not m.startswith(("torch", "diffusers")) for m in sys.modules if sys.modules[m] is not None)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
