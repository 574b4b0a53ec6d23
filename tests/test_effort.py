"""The ``effort`` save option (pillow_sdlatent/effort.py): resolved by the one options resolver, each level a
budget of refinement stages that extends the level below (so a higher level never scores worse on the
refinement's own cost), ``refine=`` its expert override, ``--effort`` on the command line, errors before
anything is written."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pillow_sdlatent import cli, effort, options
from pillow_sdlatent.core import transform_coder
from pillow_sdlatent.core.settings import settings_for
from pillow_sdlatent.models import load_model, refine
from pillow_sdlatent.models.refine import search_cost, transform_quantizer
from pillow_sdlatent.pipeline import encode_latents, latents_for_file, search_stages, to_tensor


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("EFFORT", "REFINE"):
        monkeypatch.setattr(options, name, None)
        monkeypatch.delenv(f"SDLATENT_{name}", raising=False)


def test_each_level_extends_the_level_below() -> None:
    assert effort.DEFAULT_EFFORT == 0 and effort.level(0).stages == ()  # the default searches nothing
    for e in range(1, 10):
        below, here = effort.level(e - 1).stages, effort.level(e).stages
        assert here[: len(below)] == below and len(here) == len(below) + 1


def test_resolution_order(monkeypatch: pytest.MonkeyPatch) -> None:
    assert search_stages() == ()
    monkeypatch.setenv("SDLATENT_EFFORT", "2")
    assert search_stages() == effort.level(2).stages
    monkeypatch.setattr(options, "EFFORT", 3)
    assert search_stages() == effort.level(3).stages
    assert search_stages(effort=1) == effort.level(1).stages
    # refine= overrides the effort's stages where it is set at least as close to the call
    assert search_stages(refine=7, effort=1) == (7,)
    assert search_stages(refine=0, effort=5) == ()
    monkeypatch.setenv("SDLATENT_REFINE", "7")
    assert search_stages() == effort.level(3).stages  # options.EFFORT is closer than the environment's refine
    monkeypatch.setattr(options, "REFINE", 4)
    assert search_stages() == (4,)
    assert search_stages(effort=2) == effort.level(2).stages  # an argument beats options.REFINE


@pytest.mark.parametrize("bad", [-1, 10, True, 2.5, "3"])
def test_bad_effort_rejected_before_writing(taesd_dir: Path, kodak_crop: Image.Image, tmp_path: Path,
                                            bad: object) -> None:  # fmt: skip
    target = tmp_path / "out.sdl"
    with pytest.raises(ValueError, match=r"effort must be an integer 0\.\.9"):
        kodak_crop.save(target, model=str(taesd_dir), effort=bad)
    assert not target.exists() or target.stat().st_size == 0


def test_bad_environment_effort_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDLATENT_EFFORT", "max")
    with pytest.raises(ValueError, match=r"SDLATENT_EFFORT must be an integer 0\.\.9, got 'max'"):
        search_stages()


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_higher_effort_never_scores_worse(taesd_dir: Path, kodak_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                          precision: str) -> None:  # fmt: skip
    # bfloat16: the steps run under the autocast and only propose; the float32 cost still picks (STEP_PRECISION)
    monkeypatch.setattr(refine, "STEP_PRECISION", precision)
    model = load_model(str(taesd_dir), "cpu")
    with Image.open(kodak_dir / "kodim23.png") as im:
        rgb = np.asarray(im.convert("RGB").crop((256, 128, 320, 192)))
    z = encode_latents(model, rgb, 0)
    settings = settings_for(60, "auto", model.latent_channels)
    quantizer = transform_quantizer(transform_coder.params(z, 60))
    x, start = to_tensor(rgb, 8), torch.from_numpy(z)[None]
    costs = []
    for e in range(4):
        zr, s = latents_for_file(model, rgb, z, settings, effort=e)
        assert s.grid == transform_coder.params(z, 60) or e == 0
        costs.append(search_cost(model, x, start, torch.from_numpy(zr)[None], quantizer))
    assert all(b <= a for a, b in itertools.pairwise(costs)), costs
    assert costs[3] < 0.95 * costs[0], costs


def test_effort_0_writes_todays_file_and_levels_decode_anywhere(taesd_dir: Path, kodak_crop: Image.Image) -> None:
    def save(**kw: object) -> bytes:
        buf = io.BytesIO()
        kodak_crop.save(buf, "SDL", model=str(taesd_dir), quality=60, **kw)
        return buf.getvalue()

    plain = save()
    assert save(effort=0) == plain
    searched = save(effort=1)
    assert searched != plain
    with Image.open(io.BytesIO(searched)) as im:  # an ordinary file: nothing new to decode it
        assert im.size == kodak_crop.size and im.convert("RGB").getbbox() is not None


def test_cli_effort(taesd_dir: Path, kodak_crop: Image.Image, tmp_path: Path) -> None:
    src = tmp_path / "in.png"
    kodak_crop.save(src)
    out = tmp_path / "out.sdl"
    assert cli.main(["convert", str(src), "-o", str(out), "--model", str(taesd_dir), "--device", "cpu",
                     "--effort", "1", "--quiet", "-q", "60"]) == 0  # fmt: skip
    buf = io.BytesIO()
    kodak_crop.save(buf, "SDL", model=str(taesd_dir), device="cpu", quality=60, effort=1)
    assert out.read_bytes() == buf.getvalue()
    with pytest.raises(SystemExit) as exc:
        cli.main(["convert", str(src), "-o", str(tmp_path / "x.sdl"), "--effort", "12"])
    assert exc.value.code == 2


def test_latents_written_as_they_are_whatever_the_effort(monkeypatch: pytest.MonkeyPatch) -> None:
    # write_latents has no image to search against: an effort set for Image.save must not break it
    from pillow_sdlatent.latents import write_latents

    z = torch.from_numpy(np.random.default_rng(0).normal(size=(4, 8, 8)).astype(np.float32))
    monkeypatch.setenv("SDLATENT_EFFORT", "5")
    a = io.BytesIO()
    write_latents(a, z, model_id="my-vae", fingerprint=bytes(16).hex(), quality=60)
    monkeypatch.delenv("SDLATENT_EFFORT")
    b = io.BytesIO()
    write_latents(b, z, model_id="my-vae", fingerprint=bytes(16).hex(), quality=60)
    assert a.getvalue() == b.getvalue()


def test_step_precision(taesd_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pillow_sdlatent.models import device

    model = load_model(str(taesd_dir), "cpu")
    for native, want in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(device, "cpu_has_native_bf16", lambda native=native: native)
        assert refine.step_autocast(model) is want  # "auto": bf16 only where the CPU multiplies it natively
    monkeypatch.setattr(refine, "STEP_PRECISION", "float32")
    assert refine.step_autocast(model) is None
    monkeypatch.setattr(refine, "STEP_PRECISION", "fp8")
    with pytest.raises(ValueError, match="STEP_PRECISION must be"):
        refine.step_autocast(model)
