"""Model-free previews on Kodak: PSNR against the 8x box-reduced original, and open+draft+load time.

Usage: python benchmarks/preview.py [--model ../shared/models/taesd] [--kodak ../shared/data/kodak]

Per image it saves a .sdl (the real plugin path, default quality) and reports
the preview's PSNR against the original box-reduced by 8 (what the map is
fitted to), next to an affine-only map fitted to the same latents (what the
Laplacian terms buy). The timing part runs in a subprocess on one CPU core
with torch made unimportable: ``import pillow_sdlatent``, then, repeated,
``Image.open`` + ``draft("RGB", (w // 8, h // 8))`` + ``load()`` of a 768x512 file.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"

TIMING = textwrap.dedent("""
    import os, sys, time, json
    os.sched_setaffinity(0, {0})
    sys.modules["torch"] = None  # prove the preview path never imports torch
    t0 = time.perf_counter()
    import pillow_sdlatent
    from PIL import Image
    t_import = time.perf_counter() - t0
    path, repeat = sys.argv[1], int(sys.argv[2])
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        with Image.open(path) as im:
            w, h = im.size
            im.draft("RGB", (w // 8, h // 8))
            im.load()
        times.append(time.perf_counter() - t)
    assert im.size == ((w + 7) // 8, (h + 7) // 8)
    print(json.dumps({"import_s": t_import, "times": times, "size": [w, h]}))
""")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SHARED / "models" / "taesd"))
    parser.add_argument("--kodak", default=str(SHARED / "data" / "kodak"))
    parser.add_argument("--quality", type=int, default=None, help="save quality (default: the plugin's)")
    parser.add_argument("--repeat", type=int, default=50, help="timed open+draft+load repetitions")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    import pillow_sdlatent  # noqa: F401
    from pillow_sdlatent.core import preview
    from pillow_sdlatent.core.codec import decode_bytes

    paths = sorted(Path(args.kodak).glob("kodim*.png"))
    if not paths:
        sys.exit(f"no Kodak images in {args.kodak}")
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores; model {args.model}")
    print("| image | size | file bytes | prVw bytes | preview PSNR (affine+Laplacian) | affine only |")
    print("|---|---|---|---|---|---|")
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="sdl-preview-"))
    timed = None
    for path in paths:
        with Image.open(path) as src:
            rgb_im = src.convert("RGB")
        buf = io.BytesIO()
        opts = {} if args.quality is None else {"quality": args.quality}
        rgb_im.save(buf, "SDL", model=args.model, **opts)
        data = buf.getvalue()
        (tmp / f"{path.stem}.sdl").write_bytes(data)
        if timed is None and rgb_im.size == (768, 512):
            timed = tmp / f"{path.stem}.sdl"
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (im.width // 8, im.height // 8))
            im.load()
            got = np.asarray(im)
        rgb = np.asarray(rgb_im)
        ref = np.clip(np.rint(preview.box_reduce(rgb, 8)), 0, 255).astype(np.uint8)
        lf = decode_bytes(data)
        z = lf.latents()
        c = z.shape[0]
        feats = preview.features(z)[: 1 + c]  # the affine part of the basis
        x = feats.reshape(1 + c, -1).T.astype(np.float64)
        m, *_ = np.linalg.lstsq(x, ref.reshape(-1, 3).astype(np.float64), rcond=None)
        aff = np.clip(np.rint(x @ m), 0, 255).reshape(ref.shape)
        row = (psnr(got, ref), psnr(aff, ref))
        rows.append(row)
        prvw = len(lf.preview) + 12
        print(f"| {path.stem} | {rgb_im.width}x{rgb_im.height} | {len(data)} | {prvw} | {row[0]:.2f} | {row[1]:.2f} |")
    mean = np.mean(rows, axis=0)
    print(f"| mean of {len(rows)} | | | | {mean[0]:.2f} | {mean[1]:.2f} |")
    print(f"min preview PSNR {min(r[0] for r in rows):.2f} dB")

    if timed is None:
        sys.exit("no 768x512 image to time")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", TIMING, str(timed), str(args.repeat)], env=env, check=True,
                         capture_output=True, text=True)  # fmt: skip
    res = json.loads(out.stdout)
    t = np.array(res["times"]) * 1000
    print(f"\nopen + draft + load of {timed.name} ({res['size'][0]}x{res['size'][1]}), one core, torch unimportable:")
    print(f"median {np.median(t):.2f} ms, min {t.min():.2f} ms, max {t.max():.2f} ms over {len(t)} runs; "
          f"first (cold) {t[0]:.2f} ms; import pillow_sdlatent {res['import_s'] * 1000:.0f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
