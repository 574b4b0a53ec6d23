"""Quantizer and context-model variants of coder 2 against what ships, on the encoder's latents (no refinement).

    ../benchvenv/bin/python benchmarks/quantizer_variants.py --jod        # 12 Kodak images, TAESD
    python benchmarks/quantizer_variants.py --images ../shared/data/kodak/kodim23.png --quality 60   # smoke run

Each variant quantizes the same latents at each quality and codes the symbols with coder 2 (spec section 5.1);
the table gives mean bpp of the coded latents (LDAT payload, without the header and preview chunks), PSNR and,
with ``--jod`` where pycvvdp imports, ColorVideoVDP JOD of the decode, then the BD-rate of each variant against
``base`` (coder 2 as it ships: dead-zone offset RHO 0.30, plain rounding into the dead zone, one step per channel).

- ``rho R``: dead-zone rounding offset R instead of RHO (0.5: plain rounding).
- ``ed S``: Floyd-Steinberg error diffusion of strength S in each channel's step units before the dead zone
  (scalar dithering: the local mean is kept, the error pushed to high frequencies).
- ``aq A``: steps scaled per 4x4-latent block by (pixel variance of the block / its geometric mean) ** A, in
  quarter octaves (x264-style adaptive quantization: coarser where texture masks the error). *Simulated*: the
  format has one step per channel, so the side information is not counted, and the symbols are coded as if
  they shared one grid.

- ``transform``: coder 3 as it ships (4x4 DCT, band weights 1 + WEIGHT_SLOPE (u + v) / 6, dead zone RHO on the
  AC coefficients; its quality scale sits QUALITY_SHIFT points above coder 2's), ``transform slope S`` and
  ``transform rho R`` with the band-weight slope (0: every band the same step) or dead zone changed.

``--entropy`` instead prints the ideal code length of coder 2's residuals when each (channel, phase) batch is
split into four classes of local activity (mean absolute residual of the decoded neighbours, of the previous
channels, or both), each class with its own model parameters: what a context model of the residuals' scale
would save over coder 2's one model per batch.
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

from pillow_sdlatent.core import context_coder as cc
from pillow_sdlatent.core import transform_coder as tc
from pillow_sdlatent.models import load_model
from pillow_sdlatent.pipeline import encode_latents, to_uint8

SHARED = Path(__file__).resolve().parents[2] / "shared"
KODAK = SHARED / "data" / "kodak"
DEFAULT_IMAGES = [KODAK / f"kodim{i:02d}.png" for i in (1, 3, 5, 8, 11, 13, 15, 19, 20, 21, 23, 24)]
Quantizer = tuple[np.ndarray, np.ndarray]  # (symbols (C,h,w) int64 >= 0, dequantized latents (C,h,w) float32)


def base(z: np.ndarray, q: int, rgb: np.ndarray, rho: float | None = None) -> Quantizer:
    with patch.object(cc, "RHO", cc.RHO if rho is None else rho):
        s, off, sc, _ = cc.quantize(z, q)
    return s.astype(np.int64), cc.dequantize(s, off, sc)


def error_diffused(z: np.ndarray, q: int, rgb: np.ndarray, strength: float) -> Quantizer:
    steps, phases, centres = cc.grid(z, q)
    out = np.empty(z.shape, np.float64)
    for c in range(z.shape[0]):
        t = z[c].astype(np.float64) / steps[c] - phases[c]
        h, w = t.shape
        for y in range(h):
            for x in range(w):
                v = t[y, x]
                qv = cc._dead_zone(np.array(v), centres[c]).item()  # the writer's rounding
                e = (v - qv) * strength
                out[c, y, x] = qv
                if x + 1 < w:
                    t[y, x + 1] += e * 7 / 16
                if y + 1 < h:
                    if x > 0:
                        t[y + 1, x - 1] += e * 3 / 16
                    t[y + 1, x] += e * 5 / 16
                    if x + 1 < w:
                        t[y + 1, x + 1] += e / 16
    symbols = (out - out.min(axis=(1, 2), keepdims=True)).astype(np.int64)
    zq = (out + np.array(phases)[:, None, None]) * np.array(steps)[:, None, None]
    return symbols, zq.astype(np.float32)


def adaptive(z: np.ndarray, q: int, rgb: np.ndarray, alpha: float, block: int = 4) -> Quantizer:
    c, h, w = z.shape
    luma = rgb.astype(np.float64) @ [0.299, 0.587, 0.114]
    px = 8 * block
    act = np.array(
        [[luma[y : y + px, x : x + px].var() + 4.0 for x in range(0, w * 8, px)] for y in range(0, h * 8, px)]
    )
    la = np.log2(act)
    mult = np.kron(2.0 ** (np.round(alpha * (la - la.mean()) * 4) / 4), np.ones((block, block)))[:h, :w]
    steps = cc.grid(z, q)[0]
    symbols = np.empty(z.shape, np.int64)
    zq = np.empty(z.shape, np.float32)
    for ch in range(c):
        d = steps[ch] * mult
        mu = float(z[ch].mean())
        qi = cc._dead_zone((z[ch] - mu) / d, 0.0)
        zq[ch] = mu + qi * d
        symbols[ch] = qi - qi.min()
    return symbols, zq


def transform(
    z: np.ndarray, q: int, rgb: np.ndarray, slope: float | None = None, rho: float | None = None
) -> tuple[int, np.ndarray]:
    """Coder 3 (core/transform_coder.py) with band-weight slope and dead zone as given: (coded bits, latents)."""
    with (
        patch.object(tc, "WEIGHT_SLOPE", tc.WEIGHT_SLOPE if slope is None else slope),
        patch.object(tc, "RHO", tc.RHO if rho is None else rho),
    ):
        s, off, sc, lev, w = tc.quantize(z, q)
    return 8 * len(tc.encode_symbols(s, lev, w)), tc.dequantize(s, off, sc, lev, w, z.shape[1:])


VARIANTS: dict[str, Callable[[np.ndarray, int, np.ndarray], Quantizer | tuple[int, np.ndarray]]] = {
    "base": base,
    **{f"rho {r:g}": partial(base, rho=r) for r in (0.2, 0.4, 0.5)},
    **{f"ed {s:g}": partial(error_diffused, strength=s) for s in (0.5, 1.0)},
    **{f"aq {a:g}": partial(adaptive, alpha=a) for a in (0.15, 0.3)},
    "transform": transform,
    **{f"transform slope {a:g}": partial(transform, slope=a) for a in (0.0, 1.0, 3.0)},
    **{f"transform rho {r:g}": partial(transform, rho=r) for r in (0.2, 0.4)},
}


def coded_bits(symbols: np.ndarray) -> int:
    levels = np.maximum(2, symbols.max(axis=(1, 2)) + 1)
    return 8 * len(cc.encode_symbols(symbols.astype(np.uint16), levels))


def batch_bits(r: np.ndarray, levels: int) -> float:
    """Ideal bits of residuals ``r`` under coder 2's best (shift, shape) for them, 16 bits of parameters."""
    return cc.model_bits(r, levels)[0] + 16


def entropy_split(z: np.ndarray, q: int, classes: int = 4) -> dict[str, float]:
    """Ideal bits of coder 2's residuals with one model per batch ('base') and per activity class."""
    s, _, _, lev = cc.quantize(z, q)
    S = s.astype(np.int64)
    C, h, w = S.shape
    mu = np.array([round(float(S[c].mean())) for c in range(C)])
    D = S - mu[:, None, None]
    res = np.zeros_like(D)
    known = np.zeros((h, w), bool)
    tot = dict.fromkeys(("base", "neighbours", "channels", "both"), 0.0)
    for c in range(C):
        L = int(lev[c])
        known[:] = False
        for k in range(4):
            ys, xs = cc._phase_pos(h, w, k)
            _, pred = cc.fit_predictor(D, c, k, ys, xs, int(mu[c]), L)  # coder 2's own predictor
            r = S[c][np.ix_(ys, xs)].ravel() - pred
            res[c][np.ix_(ys, xs)] = r.reshape(ys.size, xs.size)
            acc = np.zeros((ys.size, xs.size))
            cnt = np.zeros_like(acc)
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy, xx = np.clip(ys + dy, 0, h - 1), np.clip(xs + dx, 0, w - 1)
                    kn = known[np.ix_(yy, xx)]
                    acc += np.abs(res[c][np.ix_(yy, xx)]) * kn
                    cnt += kn
            act_n = (acc / np.maximum(cnt, 1)).ravel()
            act_c = sum((np.abs(res[p][np.ix_(ys, xs)]).ravel() for p in range(c)), np.zeros(r.size))
            known[np.ix_(ys, xs)] = True
            tot["base"] += batch_bits(r, L)
            for name, act in (("neighbours", act_n), ("channels", act_c),
                              ("both", act_n / (act_n.mean() + 1e-9) + act_c / (act_c.mean() + 1e-9))):  # fmt: skip
                if not act.any():
                    tot[name] += batch_bits(r, L)
                    continue
                cls = np.searchsorted(np.quantile(act, np.linspace(0, 1, classes + 1)[1:-1]), act, side="right")
                tot[name] += sum(batch_bits(r[cls == j], L) for j in range(classes) if (cls == j).any())
    return tot


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "taesd"))
    ap.add_argument("--images", nargs="+", type=Path, default=DEFAULT_IMAGES)
    ap.add_argument("--quality", nargs="+", type=int, default=[40, 50, 60, 70, 80])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT",
                    help=f"of: {', '.join(VARIANTS)}")  # fmt: skip
    ap.add_argument("--jod", action="store_true", help="also ColorVideoVDP JOD (needs pycvvdp: docs/benchmarks.md)")
    ap.add_argument("--entropy", action="store_true", help="only the residual-scale context analysis (no decoding)")
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
    if args.entropy:
        print("\n| quality | coder 2 (one model per batch), bits/latent | activity of neighbours "
              "| of previous channels | both |\n|---|---|---|---|---|")  # fmt: skip
        for q in args.quality:
            tot = dict.fromkeys(("base", "neighbours", "channels", "both"), 0.0)
            for _, z in images:
                for k, v in entropy_split(z, q).items():
                    tot[k] += v
            n = sum(z.size for _, z in images)
            cells = [f"{tot[k] / n:.4f} ({100 * (tot[k] / tot['base'] - 1):+.1f}%)" for k in tot]
            print(f"| {q} | {' | '.join(cells)} |")
        return 0
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
                coded, zq = VARIANTS[name](z, q, rgb)
                bits = coded if isinstance(coded, int) else coded_bits(coded)  # transform variants code themselves
                with torch.inference_mode():
                    out = to_uint8(model.decode(torch.from_numpy(zq)[None]), rgb.shape[0], rgb.shape[1])
                jod = metrics.jod(rgb, out) if args.jod else float("nan")
                vals.append((bits / (rgb.shape[0] * rgb.shape[1]), rm.psnr(rgb, out), jod))
            m = np.mean(vals, axis=0)
            rows.append(m)
            print(f"| {name} | {q} | {m[0]:.4f} | {m[1]:.2f} | {m[2]:.3f} |", flush=True)
        curves[name] = tuple(list(col) for col in np.array(rows).T)
    if "base" in curves:
        print("\n| variant | BD-rate vs base, PSNR | BD-rate vs base, JOD |\n|---|---|---|")
        b = curves["base"]
        for name, (r, p, j) in curves.items():
            if name != "base":
                cells = [rm.bd_rate((b[0], b[k]), (r, v)).text() for k, v in ((1, p), (2, j)) if args.jod or k == 1]
                print(f"| {name} | {' | '.join(cells + ([] if args.jod else ['n/a']))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
