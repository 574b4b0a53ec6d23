"""Rate control on Kodak: how close ``save(target_bpp=...)`` files land to their budgets.

Usage: python benchmarks/ratecontrol.py [--model ../shared/models/taesd] [--bpp 0.05 0.1 0.15 0.25 0.5]

Each image is encoded once; for each budget the same search ``save`` runs
(core.ratecontrol.fit_budget over pipeline.latents_to_chunks, preview chunk
included) picks the highest quality that fits. Reported per budget: images
that fit (the rest raise: even quality 0 is too big), the mean and lowest
file/budget ratio, the mean chosen quality, settings built per search and the
search time (quantize + code, no model).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SHARED / "models" / "taesd"))
    parser.add_argument("--kodak", default=str(SHARED / "data" / "kodak"))
    parser.add_argument("--bpp", type=float, nargs="+", default=[0.05, 0.1, 0.15, 0.25, 0.5, 1.0])
    parser.add_argument("--method", default="auto")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from pillow_sdlatent.core import ratecontrol
    from pillow_sdlatent.core.settings import settings_for
    from pillow_sdlatent.models import load_model
    from pillow_sdlatent.pipeline import encode_chunks, encode_latents, split_image

    model = load_model(args.model, "cpu")
    paths = sorted(Path(args.kodak).glob("kodim*.png"))
    if not paths:
        sys.exit(f"no Kodak images in {args.kodak}")
    encoded = []
    for path in paths:
        with Image.open(path) as im:
            stored, rgb, alpha = split_image(im.convert("RGB"))
        encoded.append((stored, rgb, alpha, encode_latents(model, rgb)))

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; model {model.model_id}; method {args.method}")
    print("| budget | fit | file/budget mean | file/budget min | quality mean | builds/search | search ms |")
    print("|---|---|---|---|---|---|---|")
    for bpp in args.bpp:
        ratios, qualities, builds, times, fails = [], [], [], [], 0
        for stored, rgb, alpha, z in encoded:
            h, w = rgb.shape[:2]
            budget = ratecontrol.budget_bytes(w, h, target_bpp=bpp)
            count = [0]

            def build(s, stored=stored, rgb=rgb, alpha=alpha, z=z, count=count):
                count[0] += 1
                return encode_chunks(z, model, size=rgb.shape[1::-1], mode=stored, alpha=alpha, rgb=rgb, settings=s)

            def settings(q):
                return settings_for(q, args.method, model.latent_channels)

            t = time.perf_counter()
            try:
                quality, chunks = ratecontrol.fit_budget(settings, build, budget)
            except ratecontrol.BudgetError:
                fails += 1
                continue
            times.append(time.perf_counter() - t)
            size = ratecontrol.file_size(chunks)
            assert size <= budget
            ratios.append(size / budget)
            qualities.append(quality)
            builds.append(count[0])
        n = len(encoded)
        if ratios:
            print(f"| {bpp} bpp | {n - fails}/{n} | {np.mean(ratios):.3f} | {np.min(ratios):.3f} | "
                  f"{np.mean(qualities):.1f} | {np.mean(builds):.1f} | {np.mean(times) * 1000:.0f} |")  # fmt: skip
        else:
            print(f"| {bpp} bpp | 0/{n} | - | - | - | - | - |")


if __name__ == "__main__":
    main()
