"""Variants of the transform quantizer against what ships, on the encoder's latents (no refinement).

    ../benchvenv/bin/python benchmarks/transform_variants.py --jod        # 12 Kodak images, TAESD
    python benchmarks/transform_variants.py --images ../shared/data/kodak/kodim23.png --quality 60   # smoke run

Each variant quantizes the same latents at each quality and codes them with the transform coder (spec
section 5.3); the table gives mean bpp of the coded latents (LDAT payload, without the header and preview
chunks), PSNR and, with ``--jod`` where pycvvdp imports, ColorVideoVDP JOD of the decode, then the BD-rate of
each variant against ``transform`` (as it ships: band weights 1 + WEIGHT_SLOPE (u + v) / 6, dead zone RHO on
the AC coefficients).

- ``transform slope S``: the band-weight slope S (0: every band the same step);
- ``transform rho R``: the AC dead-zone offset R (0.5: plain rounding).

(The scalar-quantizer variants this script once measured, for the draft format's coder 2, are in
docs/quantizer-variants.md with their figures; that coder is not part of format 1.0.)
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from unittest.mock import patch

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import rd_metrics as rm

from pillow_sdlatent.core import transform_coder as tc
from pillow_sdlatent.models import load_model
from pillow_sdlatent.pipeline import encode_latents, to_uint8

SHARED = Path(__file__).resolve().parents[2] / "shared"
KODAK = SHARED / "data" / "kodak"
DEFAULT_IMAGES = [KODAK / f"kodim{i:02d}.png" for i in (1, 3, 5, 8, 11, 13, 15, 19, 20, 21, 23, 24)]


def transform(
    z: np.ndarray, q: int, rgb: np.ndarray, slope: float | None = None, rho: float | None = None
) -> tuple[int, np.ndarray]:
    """The transform quantizer with band-weight slope and dead zone as given: (coded bits, latents)."""
    with (
        patch.object(tc, "WEIGHT_SLOPE", tc.WEIGHT_SLOPE if slope is None else slope),
        patch.object(tc, "RHO", tc.RHO if rho is None else rho),
    ):
        s, off, sc, lev, w = tc.quantize(z, q)
    return 8 * len(tc.encode_symbols(s, lev, w)), tc.dequantize(s, off, sc, lev, w, z.shape[1:])


VARIANTS: dict[str, Callable[[np.ndarray, int, np.ndarray], tuple[int, np.ndarray]]] = {
    "transform": transform,
    **{f"transform slope {a:g}": partial(transform, slope=a) for a in (0.0, 1.0, 3.0)},
    **{f"transform rho {r:g}": partial(transform, rho=r) for r in (0.2, 0.4)},
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "taesd"))
    ap.add_argument("--images", nargs="+", type=Path, default=DEFAULT_IMAGES)
    ap.add_argument("--quality", nargs="+", type=int, default=[40, 50, 60, 70, 80])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT",
                    help=f"of: {', '.join(VARIANTS)}")  # fmt: skip
    ap.add_argument("--jod", action="store_true", help="also ColorVideoVDP JOD (needs pycvvdp: docs/benchmarks.md)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.model, "cpu")
    print(f"model {model.model_id}, {len(args.images)} images, {platform.machine()}, torch {torch.__version__}")
    images = []
    for path in args.images:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
        images.append((rgb, encode_latents(model, rgb, 0)))
    metrics = rm.Metrics(jod_enabled=args.jod)
    if args.jod and not metrics.has_jod:
        print(f"no JOD: {metrics.jod_reason}", file=sys.stderr)
        return 2
    curves: dict[str, tuple[list[float], list[float], list[float]]] = {}
    print("\n| variant | quality | bpp (LDAT) | PSNR dB | JOD |\n|---|---|---|---|---|")
    for name in args.variants:
        rows = []
        for q in args.quality:
            vals = []
            for rgb, z in images:
                bits, zq = VARIANTS[name](z, q, rgb)
                with torch.inference_mode():
                    out = to_uint8(model.decode(torch.from_numpy(zq)[None]), rgb.shape[0], rgb.shape[1])
                jod = metrics.jod(rgb, out) if args.jod else float("nan")
                vals.append((bits / (rgb.shape[0] * rgb.shape[1]), rm.psnr(rgb, out), jod))
            m = np.mean(vals, axis=0)
            rows.append(m)
            print(f"| {name} | {q} | {m[0]:.4f} | {m[1]:.2f} | {m[2]:.3f} |", flush=True)
        curves[name] = tuple(list(col) for col in np.array(rows).T)
    if "transform" in curves:
        print("\n| variant | BD-rate vs transform, PSNR | BD-rate vs transform, JOD |\n|---|---|---|")
        b = curves["transform"]
        for name, (r, p, j) in curves.items():
            if name != "transform":
                cells = [rm.bd_rate((b[0], b[k]), (r, v)).text() for k, v in ((1, p), (2, j)) if args.jod or k == 1]
                print(f"| {name} | {' | '.join(cells + ([] if args.jod else ['n/a']))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
