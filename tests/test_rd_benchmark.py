"""The rate-distortion benchmark (benchmarks/rd.py) run as a program on Kodak crops (its maths is tested beside it,
in benchmarks/test_rd_metrics.py: tests never import benchmarks)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:
        return False
    return True


@pytest.mark.slow
def test_quick_run_on_crops(tmp_path: Path, kodak_dir: Path, taesd_dir: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, str(BENCH / "rd.py"), "--quick", "--crop", "256", "--images", str(kodak_dir)]
    cmd += ["--model", str(taesd_dir), "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    folder = out / "taesd"
    summary = (folder / "summary.md").read_text()
    assert "| TAESD: budget" in summary and "fits" in summary and "BD-rate" in summary
    assert summary in run.stdout  # printed too

    with (folder / "per_image.csv").open() as f:
        rows = list(csv.DictReader(f))
    images = {r["image"] for r in rows}
    assert len(images) == 3
    assert {r["width"] for r in rows} == {"256"} and {r["height"] for r in rows} == {"256"}
    sdl = [r for r in rows if r["kind"] == "sdl"]
    assert len(sdl) == 3 * 2 and {r["param"] for r in sdl} == {"50", "75"}
    for r in sdl:
        assert float(r["bpp"]) > 0 and math.isfinite(float(r["psnr"]))
        assert 0 < float(r["ssim"]) <= 1 if _importable("pytorch_msssim") else r["ssim"] == "n/a"
    matched = [r for r in rows if r["kind"] == "matched"]
    # every (image, setting) has one row per codec: a result that fits, or an explicit reason
    # ("original-trimmed" is there while the original method's palette chunk is padded, see rd.PLTE_NOTE)
    codecs = {"original", "JPEG", "WebP", "AVIF", "JPEG XL"}
    for image in images:
        for q in ("q50", "q75"):
            got = [r["codec"] for r in matched if r["image"] == image and r["setting"] == q]
            assert sorted(got) == sorted(set(got)) and codecs <= set(got) <= codecs | {"original-trimmed"}
    for r in matched:
        if r["status"] == "ok":
            assert 0 < int(r["bytes"]) <= int(r["budget_bytes"])
            assert float(r["bpp"]) > 0 and math.isfinite(float(r["psnr"]))
        else:
            assert r["status"].startswith(("does not fit", "n/a ("))
    assert any(r["status"] == "ok" and r["codec"] == "AVIF" for r in matched)
    if not _importable("pycvvdp"):
        assert {r["jod"] for r in rows if r["status"] == "ok" and r["kind"] != "floor"} == {"n/a"}
        assert "JOD: n/a (cvvdp not importable" in summary

    with (folder / "coding.csv").open() as f:
        coding = list(csv.DictReader(f))
    assert len(coding) == 3 * 2
    for c in coding:
        # the range coder spends what its own model says, up to the flush and word rounding
        assert 0.99 < float(c["payload_bits"]) / float(c["ideal_bits"]) < 1.05
        assert 0 < float(c["h0_bits"]) <= float(c["values"]) * 16
    res = json.loads((folder / "results.json").read_text())
    assert res["model"] == "TAESD" and res["crop"] == 256 and len(res["images"]) == 3

    docs = tmp_path / "docs" / "benchmarks.md"
    run = subprocess.run([sys.executable, str(BENCH / "rd.py"), "--docs-only", "--docs", str(docs), "--out", str(out)],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    text = docs.read_text()
    assert "TAESD" in text and "../shared/models/taesd/README.md" in text and "sdlatent bench --model sd" in text
    if (folder / "rd_taesd.png").exists():  # matplotlib installed
        assert (docs.parent / "img" / "rd_taesd.png").stat().st_size < 150_000

    # a folder of results.json alone, as benchmarks/results/ commits them, re-makes the same report and its plot
    kept = tmp_path / "kept"
    (kept / "taesd").mkdir(parents=True)
    (kept / "taesd" / "results.json").write_bytes((folder / "results.json").read_bytes())
    (kept / "pictures").mkdir()  # pictures.py's results, kept beside rd.py's: not a section
    (kept / "pictures" / "results.json").write_text(json.dumps({"strips": []}))
    docs2 = tmp_path / "docs2" / "benchmarks.md"
    cmd = [sys.executable, str(BENCH / "rd.py"), "--docs-only", "--docs", str(docs2), "--out", str(kept)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-4000:]
    assert docs2.read_text() == text
    assert (kept / "taesd" / "summary.md").read_text() == summary
    if (folder / "rd_taesd.png").exists():
        assert 0 < (docs2.parent / "img" / "rd_taesd.png").stat().st_size < 150_000

    # a second section of the same model on the same images, whose .sdl files are 10% smaller at the same
    # quality, is 10% cheaper by BD-rate against the plain section
    res["model"], res["rows"] = "TAESD effort 1", [r | {"bpp": r["bpp"] * 0.9} if r["kind"] == "sdl" else r
                                                   for r in res["rows"]]  # fmt: skip
    (kept / "taesd-effort-1").mkdir()
    (kept / "taesd-effort-1" / "results.json").write_text(json.dumps(res))
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-4000:]
    between = [ln for ln in docs2.read_text().splitlines() if ln.startswith("- TAESD effort 1 against TAESD ")]
    assert len(between) == 1 and "PSNR -10.0% (over" in between[0], between


def test_refine_series_never_below_plain(tmp_path: Path, kodak_dir: Path, taesd_dir: Path) -> None:
    out = tmp_path / "out"
    base = [sys.executable, str(BENCH / "rd.py"), "--crop", "128", "--limit", "2", "--images", str(kodak_dir)]
    base += ["--model", str(taesd_dir), "--out", str(out), "--quality", "50", "75", "--codecs", "AVIF", "--no-jod"]
    for extra in ([], ["--refine", "3"]):
        run = subprocess.run(base + extra, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    psnr, size = {}, {}
    for folder in ("taesd", "taesd-refine-3"):
        with (out / folder / "per_image.csv").open() as f:
            rows = [r for r in csv.DictReader(f) if r["kind"] == "sdl"]
        psnr[folder] = {(r["image"], r["param"]): float(r["psnr"]) for r in rows}
        size[folder] = {(r["image"], r["param"]): int(r["bytes"]) for r in rows}
    assert psnr["taesd"].keys() == psnr["taesd-refine-3"].keys() and len(psnr["taesd"]) == 4
    for key, plain in psnr["taesd"].items():
        # best iterate of MSE + rate: never both worse and larger than the encoder's latents
        assert psnr["taesd-refine-3"][key] >= plain - 0.01 or size["taesd-refine-3"][key] < size["taesd"][key]
    assert sum(psnr["taesd-refine-3"].values()) > sum(psnr["taesd"].values()) + 4 * 0.3
    assert "TAESD +refine 3" in (out / "taesd-refine-3" / "summary.md").read_text()
