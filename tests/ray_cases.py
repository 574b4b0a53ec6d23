"""Conversion on Ray Data (pillow_sdlatent.ray, ``sdlatent convert --ray``) on a local 2-CPU Ray.

Not collected by the main run: tests/test_ray.py runs this module in a pytest of its own (why: there).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

ray = pytest.importorskip("ray", reason="the [ray] extra is not installed")

import pillow_sdlatent  # noqa: E402
from pillow_sdlatent import cli  # noqa: E402
from pillow_sdlatent import ray as sdl_ray  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A local Ray of 2 CPUs, shut down after this module; yields its address."""
    ctx = ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ctx.address_info["address"]
    ray.shutdown()


def _sdl_bytes(path: Path, taesd: Path) -> bytes:
    """What single-process ``Image.save`` writes for this image (model and device as the Ray run's)."""
    buf = io.BytesIO()
    with Image.open(path) as im:
        pillow_sdlatent.save(im, buf, model=str(taesd), device="cpu")
    return buf.getvalue()


@pytest.fixture
def images(tmp_path: Path, kodak_crop: Image.Image, taesd_dir: Path) -> Path:
    """8 small images in src/ (two sizes, RGB/RGBA/L, PNG/JPEG, an ICC profile, a subfolder), one corrupt
    file; out/done.sdl already converted, out/cut.sdl a truncated earlier output."""
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    crop = kodak_crop.crop
    crop((0, 0, 48, 40)).save(src / "a.png")
    crop((40, 10, 88, 50)).save(src / "sub" / "b.jpg", quality=95)
    rgba = crop((20, 20, 68, 60)).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((48, 40)))
    rgba.save(src / "c.png")
    crop((8, 8, 56, 48)).convert("L").save(src / "sub" / "d.png")
    crop((0, 0, 64, 32)).save(src / "sub" / "deeper" / "e.png", icc_profile=b"not a real profile, kept as data")
    crop((30, 30, 94, 62)).save(src / "f.version.2.png")  # dots in the name: a WebDataset key needs care
    crop((10, 20, 58, 60)).save(src / "done.png")
    crop((12, 22, 60, 62)).save(src / "cut.png")
    (src / "broken.png").write_bytes((src / "a.png").read_bytes()[:60])  # a cut PNG
    out = tmp_path / "out"
    out.mkdir()
    (out / "done.sdl").write_bytes(_sdl_bytes(src / "done.png", taesd_dir))
    (out / "cut.sdl").write_bytes(_sdl_bytes(src / "cut.png", taesd_dir)[:-20])  # killed mid-write, no atomic
    return src


def _single_process(src: Path, dst: Path, taesd: Path) -> None:
    """The plain converter, one forward pass per image (the bytes of Image.save)."""
    code = cli.main(["convert", str(src), "-o", str(dst), "-b", "1", "--model", str(taesd), "--device", "cpu",
                     "--quiet"])  # fmt: skip
    assert code == 1  # broken.png


def test_convert_matches_single_process(cluster: str, tmp_path: Path, images: Path, taesd_dir: Path) -> None:
    out = images.parent / "out"
    done_before = (out / "done.sdl").stat().st_mtime_ns
    jobs, errors = cli.collect_jobs([str(images)], str(out), None)
    assert not errors
    report = tmp_path / "report.jsonl"
    result = sdl_ray.convert(
        [(j.src, j.dst) for j in jobs], sdl_ray.EncodeOptions(model=str(taesd_dir), device="cpu"), report=report,
        shards=tmp_path / "shards", output_root=out, batch_size=3, read_cpus=0.5, num_cpus=1,
    )  # fmt: skip

    assert (result.converted, result.skipped) == (7, 1)
    assert [(Path(p).name, e.split(":")[0]) for p, e in result.failures] == [("broken.png", "cannot read image")]
    rows = {Path(r["path"]).relative_to(images).as_posix(): r for r in map(json.loads, report.open())}
    assert len(rows) == 9 and all(set(r) == set(sdl_ray.REPORT_COLUMNS) for r in rows.values())
    assert rows["broken.png"]["status"] == "error" and "truncated" in rows["broken.png"]["error"].lower()
    assert rows["done.png"]["status"] == "skipped" and (out / "done.sdl").stat().st_mtime_ns == done_before
    assert rows["cut.png"]["status"] == "ok"  # an output that does not read back is redone

    # byte-identical to the single-process converter and to Image.save
    ref = tmp_path / "ref"
    _single_process(images, ref, taesd_dir)
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.sdl"))
    assert written == sorted(p.relative_to(ref).as_posix() for p in ref.rglob("*.sdl"))
    assert written == ["a.sdl", "c.sdl", "cut.sdl", "done.sdl", "f.version.2.sdl", "sub/b.sdl", "sub/d.sdl",
                       "sub/deeper/e.sdl"]  # fmt: skip
    for name in written:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
        r = rows[str(Path(name).with_suffix(".jpg" if name == "sub/b.sdl" else ".png"))]
        assert r["status"] == "skipped" or r["bytes"] == (out / name).stat().st_size
    assert (out / "c.sdl").read_bytes() == _sdl_bytes(images / "c.png", taesd_dir)
    with Image.open(out / "sub" / "deeper" / "e.sdl") as im:
        assert im.mode == "RGB" and im.info["icc_profile"] == b"not a real profile, kept as data"
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temporary file left

    # the tar shards hold the converted files under WebDataset keys
    import webdataset

    shards = sorted(str(p) for p in (tmp_path / "shards").glob("*.tar"))
    samples = {s["__key__"]: s for s in webdataset.WebDataset(shards, shardshuffle=False)}
    assert sorted(samples) == ["a", "c", "cut", "f_version_2", "sub/b", "sub/d", "sub/deeper/e"]
    assert samples["sub/b"]["sdl"] == (out / "sub" / "b.sdl").read_bytes()
    assert json.loads(samples["f_version_2"]["json"])["name"] == "f.version.2.sdl"

    # resume: a second run skips everything that reads back
    again = sdl_ray.convert([(j.src, j.dst) for j in jobs], sdl_ray.EncodeOptions(model=str(taesd_dir), device="cpu"),
                            read_cpus=0.5)  # fmt: skip
    assert (again.converted, again.skipped, len(again.failures)) == (0, 8, 1)


def test_encode_dataset_of_bytes(cluster: str, images: Path, taesd_dir: Path) -> None:
    rows = [{"path": name, "bytes": (images / name).read_bytes()} for name in ("a.png", "broken.png", "sub/b.jpg")]
    rows.append({"path": "empty", "bytes": b""})
    rows.append({"path": "done.sdl", "bytes": (images.parent / "out" / "done.sdl").read_bytes()})
    ds = sdl_ray.encode_dataset(ray.data.from_items(rows), sdl_ray.EncodeOptions(model=str(taesd_dir), device="cpu"),
                                batch_size=2, read_cpus=0.5, forward_batch=1)  # fmt: skip
    got = {r["path"]: r for r in ds.take_all()}
    assert {k: r["status"] for k, r in got.items()} == {"a.png": "ok", "broken.png": "error", "sub/b.jpg": "ok",
                                                        "empty": "error", "done.sdl": "error"}  # fmt: skip
    assert "is already .sdl" in got["done.sdl"]["error"]
    assert got["a.png"]["sdl"] == _sdl_bytes(images / "a.png", taesd_dir)
    assert got["sub/b.jpg"]["sdl"] == _sdl_bytes(images / "sub" / "b.jpg", taesd_dir)
    assert got["sub/b.jpg"]["bytes"] == len(got["sub/b.jpg"]["sdl"]) and got["sub/b.jpg"]["seconds"] > 0
    assert got["empty"]["sdl"] == b"" and got["empty"]["error"].startswith("cannot read image")


def test_cli_on_an_existing_cluster(cluster: str, tmp_path: Path, images: Path, taesd_dir: Path) -> None:
    out = images.parent / "out"
    env = dict(os.environ, SDLATENT_MODEL=str(taesd_dir), SDLATENT_DEVICE="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    report = tmp_path / "r.jsonl"
    r = subprocess.run(
        [sys.executable, "-m", "pillow_sdlatent", "convert", str(images), "-o", str(out), f"--ray={cluster}",
         "--report", str(report), "--quiet"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 1, r.stderr  # broken.png failed
    assert "7 converted, 1 skipped" in r.stdout and "1 failed" in r.stdout, r.stdout
    assert "broken.png" in r.stderr
    assert len(report.read_text().splitlines()) == 9
    ref = tmp_path / "ref"
    _single_process(images, ref, taesd_dir)
    for p in ref.rglob("*.sdl"):
        assert (out / p.relative_to(ref)).read_bytes() == p.read_bytes(), p


def test_documented_parquet_recipe(cluster: str, tmp_path: Path, images: Path, taesd_dir: Path) -> None:
    """examples/ray_dataset.py (the recipe of docs/dataset.md) on a Parquet table of image bytes."""
    import importlib.util

    import pyarrow as pa
    import pyarrow.parquet as pq

    names = ["a.png", "broken.png", "sub/b.jpg"]
    table = pa.table({"key": names, "jpg": [(images / n).read_bytes() for n in names], "caption": ["x"] * 3})
    pq.write_table(table, tmp_path / "part-0.parquet")
    spec = importlib.util.spec_from_file_location("ray_dataset", ROOT / "examples" / "ray_dataset.py")
    assert spec and spec.loader
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    out = tmp_path / "sdl"
    code = recipe.main(["parquet", str(tmp_path / "part-0.parquet"), str(out), "--model", str(taesd_dir),
                        "--batch-size", "2"])  # fmt: skip
    assert code == 1  # broken.png failed
    rows = {r["path"]: r for r in pq.read_table(out).to_pylist()}
    assert {k: r["status"] for k, r in rows.items()} == {"a.png": "ok", "broken.png": "error", "sub/b.jpg": "ok"}
    assert rows["sub/b.jpg"]["sdl"] == _sdl_bytes(images / "sub" / "b.jpg", taesd_dir)


def test_refined_files_are_coded_by_the_actor(cluster: str, images: Path, taesd_dir: Path) -> None:
    """Refinement needs the model: the actor runs the rest of the encode path; still Image.save's bytes."""
    rows = [{"path": "a.png", "bytes": (images / "a.png").read_bytes()}]
    options = sdl_ray.EncodeOptions(model=str(taesd_dir), device="cpu", refine=1, quality=60)
    (got,) = sdl_ray.encode_dataset(ray.data.from_items(rows), options, read_cpus=0.5).take_all()
    buf = io.BytesIO()
    with Image.open(images / "a.png") as im:
        pillow_sdlatent.save(im, buf, model=str(taesd_dir), device="cpu", refine=1, quality=60)
    assert got["status"] == "ok" and got["sdl"] == buf.getvalue()
    assert got["sdl"] != _sdl_bytes(images / "a.png", taesd_dir)  # the options reached the workers
