"""The hostile files of issue 17, each opened in a fresh process: outcome, wall time and peak RSS.

    SDLATENT_MODEL_PATH=../shared/models python benchmarks/hostile_cases.py

Cases are forged with pillow_sdlatent.testing from small valid files (TAESD's id and channel count where a
model is involved). The peak RSS is the child's ``ru_maxrss`` minus what the same child had after its
imports, so it counts what the case itself made the reader allocate.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

CHILD = r"""
import io, json, resource, sys, time, warnings
import pillow_sdlatent, torch, diffusers  # imported before the baseline: the cases are timed, not the imports
from PIL import Image
import pillow_sdlatent.core.codec  # noqa: F401
data = open(sys.argv[1], "rb").read()
how = sys.argv[2]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
try:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        if how == "load":
            with Image.open(io.BytesIO(data)) as im:
                im.load()
        elif how == "read_latents":
            pillow_sdlatent.read_latents(io.BytesIO(data))
        else:
            from pillow_sdlatent.models import load_model
            load_model(how, "cpu")
    outcome = "ok"
except Exception as exc:
    outcome = f"{type(exc).__name__}: {str(exc)[:110]}"
print(json.dumps({"outcome": outcome, "seconds": time.perf_counter() - t0,
                  "rss_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}))
"""


def cases(tmp: Path) -> list[tuple[str, bytes | None, str, dict[str, str]]]:
    import io

    import numpy as np

    import pillow_sdlatent
    from pillow_sdlatent.core.settings import QuantSettings
    from pillow_sdlatent.testing import build_file, forge_head

    transform = QuantSettings("transform", coder="transform", quality=60)
    small = build_file(32, 24, "RGB", 4, transform, 1, model_id="taesd")
    wide = build_file(64, 64, "RGB", 256, QuantSettings("transform", coder="transform", quality=0), 2,
                      model_id="taesd")  # fmt: skip
    buf = io.BytesIO()  # a legitimate 2048x2048 file of flat latents, TAESD's fingerprint (no encoder run)
    pillow_sdlatent.write_latents(buf, np.zeros((4, 256, 256), np.float32), str(SHARED / "models" / "taesd"))
    flat = buf.getvalue()
    garbage = tmp / "garbage-taesd"
    shutil.copytree(SHARED / "models" / "taesd", garbage)
    next(garbage.glob("*_decoder.*")).write_bytes(os.urandom(4096))
    budget = {"SDLATENT_DECODE_BUDGET": "1000000"}
    return [
        ("model id attacker-org/tracking-pixel, load()", forge_head(small, b"attacker-org/tracking-pixel"), "load", {}),
        ("4704x4704, 256 channels, almost nothing coded, load()", forge_head(wide, width=4704, height=4704), "load",
         {}),
        ("2048x2048 flat latents (legitimate), load(), default budget", flat, "load", {}),
        ("the same, SDLATENT_DECODE_BUDGET=1000000", flat, "load", budget),
        ("32768x32768, read_latents()", forge_head(small, width=32768, height=32768), "read_latents", {}),
        ("TAESD folder with a garbage decoder, load_model()", None, str(garbage), {}),
    ]  # fmt: skip


def main() -> int:
    print(f"{sys.platform}, python {sys.version.split()[0]}; model folders: {os.environ.get('SDLATENT_MODEL_PATH')}")
    print("| case | bytes | outcome | seconds | peak RSS above the imports |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for i, (label, data, how, extra_env) in enumerate(cases(tmp)):
            path = tmp / f"case{i}.sdl"
            path.write_bytes(data or b"")
            env = {**os.environ, "PYTHONPATH": str(ROOT), **extra_env}
            out = subprocess.run([sys.executable, "-c", CHILD, str(path), how], capture_output=True, text=True,
                                 env=env, timeout=600)  # fmt: skip
            r = json.loads(out.stdout.strip().splitlines()[-1])
            size = len(data) if data else "-"
            print(f"| {label} | {size} | {r['outcome']} | {r['seconds']:.2f} | {r['rss_mib']:.0f} MiB |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
