"""benchmarks/pictures.py's results file, tested beside it: the crops run as separate processes and merge."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import pictures


def strip(crop: str, bpp: float, nbytes: int) -> dict:
    sdl = {"panel": ".sdl, effort 9", "bytes": nbytes, "bpp": 8 * nbytes / 384**2, "psnr": 26.5, "jod": None}
    panels = [{"panel": "original", "bytes": 0}, sdl]
    return {"crop": crop, "bpp": bpp, "effort": 9, "panels": panels, "seconds": 1.0}


def test_results_merge_per_crop_and_rate(tmp_path: Path) -> None:
    pictures.save_results(tmp_path, [strip("kodim15", 0.1, 1500), strip("kodim15", 0.2, 3000)])
    kept = pictures.save_results(tmp_path, [strip("kodim23", 0.1, 1700), strip("kodim15", 0.2, 3100)])
    # kodim23 first (CROPS order), the re-made kodim15 0.2 strip replaces the old one, kodim15 0.1 stays
    assert [(s["crop"], s["bpp"], s["panels"][1]["bytes"]) for s in kept] == [
        ("kodim23", 0.1, 1700), ("kodim15", 0.1, 1500), ("kodim15", 0.2, 3100)]  # fmt: skip
    assert json.loads((tmp_path / "results.json").read_text())["strips"] == kept
    table = (tmp_path / "summary.md").read_text().splitlines()
    assert table[2] == "| kodim23 | 0.1 | .sdl, effort 9 | 1700 | 0.092 | 26.50 | - |"
    assert len(table) == 2 + 3  # the original has no file, so no row
