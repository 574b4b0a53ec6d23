"""Latent refinement variants side by side: none, against the float decode, through the quantizer.

For each image and quality: bits per pixel of the .sdl file (as Image.save(..., preview=False) writes it) and
PSNR of its decode, for

- ``none``: the encoder's latents;
- ``float``: refined against the float decode (``encode_latents(refine=N)``), then quantized;
- ``noise``: refined against the decode of latents plus uniform noise of one quantizer step (quality 60's),
  the usual training stand-in for rounding (this script's own loop; not shipped);
- ``quantizer``: refined through the quantizer (straight-through, best iterate) on the distortion (pixel MSE at
  full and ``POOLED_LEVELS`` (4) coarser scales) plus ``RATE_WEIGHT`` (0.04) times the rate proxy
  ``step^2 * mean |latent/step - phase - centre|`` (transform quantizer, the default: ``step^2 * mean
  |coefficient/its step|`` over the AC coefficients): what ``refine=N`` does (``--method`` picks the save method);
- ``rate K``: the same with the rate weight set to K (``rate 0``: no rate term, as before it);
- ``pooled L, rate K`` (with ``--pooled-levels``): also with ``POOLED_LEVELS`` set to L, the coarser scales in
  the distortion (``pooled 0``: the pixel MSE alone, as before them);
- ``float msssim W`` (with ``--perceptual-weights``): ``float`` with ``PERCEPTUAL_WEIGHT`` set to W (``float
  msssim 0``: the pooled MSE alone, as before the MS-SSIM term).

Prints a markdown table per image and the means (bpp of the file, PSNR and, with ``--jod`` where pycvvdp
imports, ColorVideoVDP JOD as benchmarks/rd.py measures it).

    python benchmarks/refine.py --crop 256 --steps 10 --quality 40 60
    ../benchvenv/bin/python benchmarks/refine.py --crop 256 --quality 45 60 75 --rate-weights 0 0.01 0.035 0.05 --jod
    ../benchvenv/bin/python benchmarks/refine.py --crop 256 --variants none --pooled-levels 0 4 \
        --rate-weights 0.02 0.04 --jod
    ../benchvenv/bin/python benchmarks/refine.py --crop 256 --variants none --rate-weights \
        --perceptual-weights 0 0.03 --jod
    python benchmarks/refine.py --timing      # seconds per refinement step next to a decode

``--search`` compares versions of the search itself on the issue's three 256x256 crops (kodim03, kodim15,
kodim23 at (256, 128)-(512, 384)) through ``latents_for_file`` (what ``Image.save`` writes), each variant
``label:NAME=value,...`` patching constants of pillow_sdlatent.models.refine (or ``effort.NAME``) for its run,
next to AVIF (Pillow, speed 6) at the highest quality not larger than the .sdl file:

    ../benchvenv/bin/python benchmarks/refine.py --search --threads 1 --quality 60 75 --stages 10 \
        --variants "constant:SCHEDULE=constant" "cosine:" "bits:RATE=bits"
    ../benchvenv/bin/python benchmarks/refine.py --search --threads 1 --quality 60 75 --stages 2 3 5 \
        --variants "adam:OPTIMIZER=adam,STEP_PRECISION=float32" "ngd:STEP_PRECISION=float32" "ngd-bf16:" \
        "soft:GRADIENT=soft,SOFT_TEMPERATURE=0.5" "feedback:feedback.k=2"
    ../benchvenv/bin/python benchmarks/refine.py --search --threads 1 --target-bpp 0.1 0.15 0.2 --stages 2 3 5

Besides the constants, ``rdo.lambda=K`` (coefficient RDO without the decoder, :func:`rdo_latents`) and
``feedback.k=K,feedback.alpha=A`` (encoder feedback instead of gradient steps, :func:`feedback_latents`) are
variants this script implements, neither shipped.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from unittest.mock import patch

import numpy as np
import torch
from PIL import Image

from pillow_sdlatent.core import rangecode as rc
from pillow_sdlatent.core import transform_coder as tc

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def noise_loop(model, x: torch.Tensor, z0: torch.Tensor, steps: int, lr: float, noise: torch.Tensor) -> torch.Tensor:
    """Refinement against the decode of latents plus uniform noise (this script's own loop; not shipped)."""
    z = z0.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        zin = z + (torch.rand(z.shape, generator=gen) - 0.5) * noise
        loss = (model._decode_differentiable(zin).clamp(0, 1) - x).square().mean()
        loss.backward()
        opt.step()
    return z.detach()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--method", default="auto", help="save method of the files (auto = transform)")
    ap.add_argument("--model", default=str(SHARED / "models" / "taesd"))
    ap.add_argument("--images", nargs="+", type=Path, help="image files (default: Kodak 1, 5, 9, 13, 17, 21)")
    ap.add_argument("--crop", type=int, help="top-left NxN crop of every image")
    ap.add_argument("--quality", nargs="+", type=int, default=[40, 60])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rate-weights", nargs="*", type=float, default=[0.0], help="K of the rate variants")
    ap.add_argument("--pooled-levels", nargs="*", type=int, default=[],
                    help="each rate variant once per POOLED_LEVELS value L (default: the shipped one)")  # fmt: skip
    ap.add_argument("--perceptual-weights", nargs="*", type=float, default=[],
                    help="a 'float msssim W' variant per PERCEPTUAL_WEIGHT value W")  # fmt: skip
    ap.add_argument("--jod", action="store_true", help="also ColorVideoVDP JOD (needs pycvvdp: docs/benchmarks.md)")
    ap.add_argument("--variants", nargs="+",
                    help="which of none, float, noise, quantizer to run (default: all four; the rate variants always "
                    "run); with --search, label:NAME=value,... (default: the shipped search alone)")  # fmt: skip
    ap.add_argument("--timing", action="store_true", help="only time a decode and refinement steps (TAESD 768x512, "
                    "SD VAE architecture with random weights at 256x256 and 512x512)")  # fmt: skip
    ap.add_argument("--save-timing", nargs="*", type=int, metavar="EFFORT",
                    help="only time Image.save of kodim01 (768x512, quality 60) at these efforts (default 0 1 2), "
                    "the faster of two saves each, side by side in this one run")  # fmt: skip
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--search", action="store_true", help="compare search variants (see the module's docstring)")
    ap.add_argument("--crops", nargs="+", metavar="kodimNN:X0,Y0,X1,Y1",
                    help="--search: these Kodak crops instead of the issue's three")  # fmt: skip
    ap.add_argument("--stages", nargs="+", type=int, default=[10], help="--search: refinement steps of each stage")
    ap.add_argument("--target-bpp", nargs="+", type=float, help="--search: save at these budgets (bits per pixel, "
                    "target_bpp) instead of --quality, the joint choice of quality and search with 1, 2 and 3 searches "
                    "(1: how budgets were met before it)")  # fmt: skip
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.timing:
        return timing(args)
    if args.save_timing is not None:
        return save_timing(args.save_timing or [0, 1, 2], args.model)
    if args.search:
        args.variants = args.variants or ["ships:"]
        return search(args)
    args.variants = args.variants or ["none", "float", "noise", "quantizer"]

    import pillow_sdlatent  # noqa: F401  (registers the plugin)
    from pillow_sdlatent.core import transform_coder
    from pillow_sdlatent.core.codec import decode_bytes
    from pillow_sdlatent.core.settings import settings_for
    from pillow_sdlatent.models import load_model
    from pillow_sdlatent.models import refine as refine_module
    from pillow_sdlatent.pipeline import (
        decode_rgb,
        encode_chunks,
        encode_latents,
        file_bytes,
        latents_for_file,
        to_tensor,
    )

    model = load_model(args.model, "cpu")
    images = args.images or [SHARED / "data" / "kodak" / f"kodim{i:02d}.png" for i in (1, 5, 9, 13, 17, 21)]

    def file_of(z: np.ndarray, settings, size) -> tuple[int, np.ndarray]:
        data = file_bytes(encode_chunks(z, model, size=size, settings=settings))  # no prVw: preview=False
        return len(data), decode_rgb(decode_bytes(data), model)

    metrics = None
    if args.jod:
        sys.path.insert(0, str(Path(__file__).parent))
        import rd_metrics

        metrics = rd_metrics.Metrics()
        if not metrics.has_jod:
            print(f"no JOD: {metrics.jod_reason}", file=sys.stderr)
            return 2
    print(f"model {model.model_id}, {args.steps} steps, {cpu_name()}, "
          f"{args.threads} thread(s), torch {torch.__version__}")  # fmt: skip
    print()
    # (label, POOLED_LEVELS or None for the shipped one, RATE_WEIGHT) of each rate variant
    rated = [
        (f"rate {k:g}" if lev is None else f"pooled {lev}, rate {k:g}", lev, k)
        for lev in (args.pooled_levels or [None])
        for k in args.rate_weights
    ]
    weighted = [(f"float msssim {w:g}", w) for w in args.perceptual_weights]
    variants = [*args.variants, *(label for label, _, _ in rated), *(label for label, _ in weighted)]
    unit = "bpp / dB / JOD" if metrics else "bpp / dB"
    print(f"| image | quality | {' | '.join(f'{v}: {unit}' for v in variants)} | s (quantizer) |")
    print("|---|---|" + "---|" * (len(variants) + 1))
    sums: dict[tuple[int, str], list[list[float]]] = {}
    for path in images:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if args.crop:
                im = im.crop((0, 0, min(args.crop, im.width), min(args.crop, im.height)))
            rgb = np.asarray(im)
        x = to_tensor(rgb, model.downscale)
        z = encode_latents(model, rgb, 0)
        zf = encode_latents(model, rgb, args.steps) if "float" in variants else z  # quality-independent
        zw = {}
        for label, w in weighted:
            with patch.multiple(refine_module, PERCEPTUAL_WEIGHT=w):
                zw[label] = encode_latents(model, rgb, args.steps)
        if "noise" in variants:
            w4 = torch.tensor(transform_coder.channel_multipliers(z.shape[0])).view(1, -1, 1, 1)
            noise = transform_coder.quality_to_step(60) * w4
            zn = noise_loop(model, x, torch.from_numpy(z)[None], args.steps, 0.05, noise)[0].numpy()
        for q in args.quality:
            s = settings_for(q, args.method, model.latent_channels)
            t0 = time.perf_counter()
            zq, sq = latents_for_file(model, rgb, z, s, args.steps) if "quantizer" in variants else (z, s)
            secs = time.perf_counter() - t0
            cands = {"none": (z, s), "float": (zf, s), "quantizer": (zq, sq), **{k: (v, s) for k, v in zw.items()}}
            if "noise" in variants:
                cands["noise"] = (zn, s)
            for label, lev, k in rated:  # what refine=N writes, with the rate weight (and pooled levels) set
                levels = refine_module.POOLED_LEVELS if lev is None else lev
                with patch.multiple(refine_module, RATE_WEIGHT=k, POOLED_LEVELS=levels):
                    cands[label] = latents_for_file(model, rgb, z, s, args.steps)
            cells = []
            for name in variants:
                nbytes, out = file_of(*cands[name], im.size)
                row = [nbytes * 8 / (rgb.shape[0] * rgb.shape[1]), psnr(rgb, out)]
                if metrics:
                    row.append(metrics.jod(rgb, out))
                sums.setdefault((q, name), []).append(row)
                cells.append(f"{row[0]:.4f} / {row[1]:.2f}" + (f" / {row[2]:.2f}" if metrics else ""))
            print(f"| {path.stem} | {q} | {' | '.join(cells)} | {secs:.1f} |", flush=True)
    print()
    print(f"| quality | variant | mean bpp | mean PSNR dB |{' mean JOD |' if metrics else ''}")
    print("|---|---|---|---|" + ("---|" if metrics else ""))
    for (q, name), rows in sorted(sums.items(), key=lambda kv: (kv[0][0], variants.index(kv[0][1]))):
        m = np.mean(rows, axis=0)
        print(f"| {q} | {name} | {m[0]:.4f} | {m[1]:.2f} |" + (f" {m[2]:.3f} |" if metrics else ""))
    return 0


# ---------------------------------------------------------------- RDO of the coefficients (measured, not shipped)
# Variant "rdo.lambda=K" of --search: after the search, each AC coefficient may be lowered one step towards zero
# and a channel's trailing bands dropped where K x the bits saved (under the coder's own models) outweigh the
# added distortion in squared quantizer steps. It did not beat the quality curve (docs/refine.md).
#: RDO's Lagrange multiplier: bits are worth RDO_LAMBDA squared quantizer steps of distortion.
RDO_LAMBDA = 0.12
#: Exponent of the band weight in RDO's distortion: 0 counts the error in each coefficient's own step
#: (the steps already follow the decoder's sensitivity), 1 in latent units (the channel weights only).
RDO_BAND_EXPONENT = 0.0
#: Passes of RDO (the coder's models are chosen again from the new symbols before each).
RDO_PASSES = 2


def value_bits(values: np.ndarray, L: int, sh: int, shape: int) -> np.ndarray:
    """Bits the range coder spends on each residual of ``values`` (int64) under model (sh, shape), escapes
    included (as :func:`.rangecode.model_costs` counts them)."""
    b = np.clip((values >> sh) + rc.R + 1, 0, rc.NB - 1)
    bits = -rc.log2_probabilities()[shape][b] + sh
    return bits + np.where((b == 0) | (b == rc.NB - 1), np.log2(rc.escape_alphabet(L, sh)), 0.0)


def best_model(r: np.ndarray, L: int) -> tuple[int, int, float]:
    """(sh, shape, bits) of the model with the fewest bits for residuals ``r`` (its own change not counted)."""
    t = rc.model_costs(r, L)
    sh, shape = np.unravel_index(int(np.argmin(t)), t.shape)
    return int(sh), int(shape), float(t[sh, shape])


def rdo_symbols(
    X: np.ndarray, q: np.ndarray, steps: np.ndarray, wp: np.ndarray, levels: np.ndarray, lam: float
) -> np.ndarray:
    """The signed indices ``q`` (C, H, W) of coefficients ``X`` after RDO (a new array; DC untouched).

    ``steps``: (C,) the channels' steps; ``wp``: (H, W) band weight plane; ``levels``: (C,) alphabets."""
    q = q.copy()
    C = q.shape[0]
    band_w = wp[:4, :4]
    for c in range(C):
        L = int(levels[c])
        for _ in range(RDO_PASSES):
            for u, v in tc.ZIGZAG[1:]:
                qb = q[c, u::4, v::4]
                if not qb.any():
                    continue
                t = X[c, u::4, v::4] / (steps[c] * band_w[u, v])
                dw = band_w[u, v] ** (2 * RDO_BAND_EXPONENT)
                sh, shape, _ = best_model(qb.ravel().astype(np.int64), L)
                lower = qb - np.sign(qb)
                cost_now = dw * (t - qb) ** 2 + lam * value_bits(qb.astype(np.int64), L, sh, shape)
                cost_low = dw * (t - lower) ** 2 + lam * value_bits(lower.astype(np.int64), L, sh, shape)
                q[c, u::4, v::4] = np.where(cost_low < cost_now, lower, qb)
        # trailing bands: drop the last coded band while its bits are worth more than its distortion
        for u, v in reversed(tc.ZIGZAG[1:]):
            qb = q[c, u::4, v::4]
            if not qb.any():
                continue
            t = X[c, u::4, v::4] / (steps[c] * band_w[u, v])
            dw = band_w[u, v] ** (2 * RDO_BAND_EXPONENT)
            _, _, bits = best_model(qb.ravel().astype(np.int64), L)
            if dw * float(((t**2) - (t - qb) ** 2).sum()) < lam * bits:
                q[c, u::4, v::4] = 0
            else:
                break
    return q


def rdo_latents(latents: np.ndarray, params: tc.Params, lam: float | None = None) -> np.ndarray:
    """Latents (C, h, w) float32 that the transform quantizer on ``params`` turns into the RDO'd symbols of
    ``latents``: each whole 4x4 block's latents become the dequantized values of its chosen coefficients (the
    quantizer then gives back exactly those); blocks cut by the latents' edge keep their latents."""
    lam = RDO_LAMBDA if lam is None else lam
    z = np.asarray(latents, np.float32)
    _, offsets, weights = params
    h, w = z.shape[1:]
    H, W = tc.coefficient_shape(h, w)
    syms, _, scale, levels, _ = tc.quantize(z, 0, params)
    zero = ((levels.astype(np.int64) - 1) // 2)[:, None, None]
    q = syms.astype(np.int64) - zero
    zc = np.nan_to_num(z.astype(np.float64), nan=0.0, posinf=1e6, neginf=-1e6)
    x = np.pad(zc, ((0, 0), (0, H - h), (0, W - w)), mode="edge") - np.asarray(offsets)[:, None, None]
    X = tc.forward(x)
    wp = np.tile(np.asarray(weights, np.float64).reshape(4, 4), (H // 4, W // 4)) / 16.0
    sc = scale.astype(np.float64)
    q2 = rdo_symbols(X, q, sc, wp, levels, lam)
    y = tc.inverse(q2 * sc[:, None, None] * wp) + np.asarray(offsets)[:, None, None]
    out = z.copy()
    hf, wf = h - h % 4, w - w % 4  # whole blocks only
    out[:, :hf, :wf] = y[:, :hf, :wf].astype(np.float32)
    csyms, _, _, clevels, _ = tc.quantize(out, 0, params)
    check = csyms.astype(np.int64) - ((clevels.astype(np.int64) - 1) // 2)[:, None, None]
    want = np.where(np.arange(H)[:, None] < hf, 1, 0) * np.where(np.arange(W)[None, :] < wf, 1, 0)
    if not np.array_equal(np.where(want > 0, check, 0), np.where(want > 0, q2, 0)):
        return z  # float rounding moved a symbol (never seen): keep the encoder's latents
    return out


SEARCH_CROPS = (("kodim03", (256, 128, 512, 384)), ("kodim15", (256, 128, 512, 384)), ("kodim23", (256, 128, 512, 384)))


def _crops(specs: list[str]) -> list[tuple[str, tuple[int, ...]]]:
    """``kodimNN:X0,Y0,X1,Y1`` -> (name, box): --crops instead of the issue's three."""
    out = []
    for spec in specs:
        name, _, box = spec.partition(":")
        out.append((name, tuple(int(v) for v in box.split(","))))
    return out


def _patches(spec: str) -> tuple[str, dict[str, dict[str, object]]]:
    """``label:NAME=value,effort.NAME=value`` -> (label, {module: {NAME: value}}); values are Python literals
    or bare words (strings)."""
    import ast

    label, _, rest = spec.partition(":")
    out: dict[str, dict[str, object]] = {"refine": {}, "effort": {}, "rdo": {}, "feedback": {}}
    for item in filter(None, rest.split(",")):
        name, _, text = item.partition("=")
        module, _, name = name.rpartition(".")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        out[module or "refine"][name] = value
    return label, out


def search(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    import rd_metrics
    from rd import decode_any, encode_codec, highest_fitting

    import pillow_sdlatent.effort as effort_module
    from pillow_sdlatent.core import transform_coder
    from pillow_sdlatent.core.codec import decode_bytes
    from pillow_sdlatent.core.settings import settings_for
    from pillow_sdlatent.models import load_model
    from pillow_sdlatent.models import refine as refine_module
    from pillow_sdlatent.pipeline import decode_rgb, encode_chunks, encode_latents, file_bytes, latents_for_file

    metrics = rd_metrics.Metrics()
    model = load_model(args.model, "cpu")
    print(f"model {model.model_id}, stages {args.stages}, {cpu_name()}, {args.threads} thread(s), "
          f"torch {torch.__version__}")  # fmt: skip
    crops = []
    for name, box in _crops(args.crops) if args.crops else SEARCH_CROPS:
        with Image.open(SHARED / "data" / "kodak" / f"{name}.png") as im:
            rgb = np.asarray(im.convert("RGB").crop(box))
        crops.append((name, rgb, encode_latents(model, rgb, 0)))
    avif: dict[tuple[str, int], tuple[int, np.ndarray]] = {}

    def avif_at(name: str, rgb: np.ndarray, budget: int) -> tuple[float, float] | None:
        size = {}

        def size_of(q: int) -> int:
            if (name, q) not in avif:
                data = encode_codec("AVIF", rgb, q)
                avif[(name, q)] = (len(data), decode_any(data))
            size[q] = avif[(name, q)][0]
            return size[q]

        q = highest_fitting(size_of, budget)
        if q is None:
            return None
        out = avif[(name, q)][1]
        return rd_metrics.psnr(rgb, out), metrics.jod(rgb, out) if metrics.has_jod else float("nan")

    rows: dict[tuple[str, int], list[list[float]]] = {}
    for spec in args.variants:
        label, patch_sets = _patches(spec)
        with contextlib.ExitStack() as stack:
            for module, values in ((refine_module, patch_sets["refine"]), (effort_module, patch_sets["effort"])):
                if values:
                    stack.enter_context(patch.multiple(module, **values))
            rdo = float(patch_sets["rdo"].get("lambda", 0))
            for name, rgb, z in crops:
                if args.target_bpp:
                    for b in args.target_bpp:
                        for how, secs, data in budget_files(model, rgb, z, b, tuple(args.stages)):
                            out = decode_rgb(decode_bytes(data), model)
                            jod = metrics.jod(rgb, out) if metrics.has_jod else float("nan")
                            a = avif_at(name, rgb, len(data)) or (float("nan"), float("nan"))
                            row = [len(data) * 8 / rgb[..., 0].size, rd_metrics.psnr(rgb, out), jod, *a, secs]
                            rows.setdefault((f"{label} {how}", b), []).append(row)
                            print(f"{label} {how} {name} {b} bpp: " + " ".join(f"{v:.4f}" for v in row),
                                  file=sys.stderr, flush=True)  # fmt: skip
                    continue
                for q in args.quality:
                    s = settings_for(q, "auto", model.latent_channels)
                    t0 = time.perf_counter()
                    if patch_sets["feedback"]:
                        zq, sq = feedback_latents(model, rgb, z, s, **patch_sets["feedback"])  # type: ignore[arg-type]
                    else:
                        zq, sq = latents_for_file(model, rgb, z, s, tuple(args.stages))
                    if rdo:
                        sq = replace(sq, grid=sq.grid or transform_coder.params(zq, q))
                        zq = rdo_latents(zq, sq.grid, rdo)
                    secs = time.perf_counter() - t0
                    data = file_bytes(encode_chunks(zq, model, size=(rgb.shape[1], rgb.shape[0]), settings=sq, rgb=rgb))
                    out = decode_rgb(decode_bytes(data), model)
                    jod = metrics.jod(rgb, out) if metrics.has_jod else float("nan")
                    a = avif_at(name, rgb, len(data)) or (float("nan"), float("nan"))
                    row = [len(data) * 8 / (rgb.shape[0] * rgb.shape[1]), rd_metrics.psnr(rgb, out), jod, *a, secs]
                    rows.setdefault((label, q), []).append(row)
                    print(f"{label} {name} q{q}: " + " ".join(f"{v:.4f}" for v in row), file=sys.stderr, flush=True)
    print()
    print(f"| variant | {'target bpp' if args.target_bpp else 'quality'} | bpp | PSNR dB | JOD "
          "| AVIF at <= bytes, PSNR / JOD | JOD gap to AVIF | s per crop |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for (label, q), rs in rows.items():
        m = np.mean(rs, axis=0)
        print(f"| {label} | {q} | {m[0]:.4f} | {m[1]:.2f} | {m[2]:.3f} | {m[3]:.2f} / {m[4]:.2f} | {m[4] - m[2]:.2f} "
              f"| {m[5]:.1f} |")  # fmt: skip
    return 0


def feedback_latents(model, rgb: np.ndarray, z: np.ndarray, s, k: int = 2, alpha: float = 1.0) -> tuple:
    """Encoder feedback (variant ``feedback.k=K,feedback.alpha=A``; not shipped): ``z += A * (E(x) - E(D(Q(z))))``
    K times, the encoder standing in for the decoder's inverse (a decode and an encode per round, no backward
    pass); the latents of lowest refinement cost (:func:`search_cost`) among the start and the K rounds kept."""
    from dataclasses import replace

    from pillow_sdlatent.core import transform_coder
    from pillow_sdlatent.models.refine import search_cost, transform_quantizer
    from pillow_sdlatent.pipeline import to_tensor

    params = transform_coder.params(z, s.quality)
    quantizer = transform_quantizer(params)
    x = to_tensor(rgb, model.downscale)
    start = torch.from_numpy(z)[None]
    rounds, zt = [start], start
    with torch.no_grad():
        for _ in range(k):
            zt = zt + alpha * (start - model.encode(model.decode(quantizer(zt))))
            rounds.append(zt)
    costs = [search_cost(model, x, start, r, quantizer) for r in rounds]
    return rounds[int(np.argmin(costs))][0].numpy().astype(np.float32), replace(s, grid=params)


def budget_files(model, rgb: np.ndarray, z: np.ndarray, bpp: float, stages: tuple[int, ...]) -> list[tuple]:
    """(how, seconds, file bytes) of ``rgb`` saved at ``bpp`` with the search ``stages`` as ``Image.save`` does
    (:func:`pipeline.refined_within`) with 1, 2 and 3 searches (:data:`pipeline.BUDGET_SEARCHES`; 3 ships). One
    search is how budgets were met before the joint choice: refined at the quality the unrefined files'
    bisection finds, kept if it fits, else the unrefined file. Each quality is refined once for the three (the
    search is deterministic); a row's seconds are its own bisection plus the searches it ran."""
    from pillow_sdlatent import pipeline

    searched: dict = {}  # settings -> (refined latents and settings, seconds)
    shipped = pipeline.latents_for_file

    def latents_for_file(model, rgb, latents, s, steps):
        if s not in searched:
            t = time.perf_counter()
            searched[s] = (shipped(model, rgb, latents, s, steps), time.perf_counter() - t)
        used.append(searched[s][1])
        return searched[s][0]

    out = []
    for searches in (1, 2, 3):
        used: list[float] = []
        t0, before = time.perf_counter(), sum(secs for _, secs in searched.values())
        with patch.multiple(pipeline, BUDGET_SEARCHES=searches, latents_for_file=latents_for_file):
            chunks = pipeline.encode_chunks(z, model, size=(rgb.shape[1], rgb.shape[0]), rgb=rgb, target_bpp=bpp,
                                            refine=stages)  # fmt: skip
        fresh = sum(secs for _, secs in searched.values()) - before  # searches first run in this call
        secs = time.perf_counter() - t0 - fresh + sum(used)
        out.append((f"{searches} search{'es' if searches > 1 else ''}", secs, pipeline.file_bytes(chunks)))
    return out


def save_timing(efforts: list[int], model: str) -> int:
    """Seconds of ``Image.save(kodim01, "SDL", quality=60, effort=E)`` (the model loaded and warmed first), the
    faster of two saves per level, and seconds per megapixel; what docs/refine.md's levels table gives."""
    import io

    import pillow_sdlatent  # noqa: F401  (registers the plugin)

    with Image.open(SHARED / "data" / "kodak" / "kodim01.png") as im:
        rgb = im.convert("RGB")
    mpx = rgb.width * rgb.height / 1e6

    def save(effort: int) -> tuple[float, int]:
        buf = io.BytesIO()
        t0 = time.perf_counter()
        rgb.save(buf, "SDL", quality=60, effort=effort, model=model)
        return time.perf_counter() - t0, len(buf.getvalue())

    save(0)  # loads the model and compiles what compiles once
    print(f"{cpu_name()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, kodim01 {rgb.size}")
    print()
    print("| effort | s per save | s per megapixel | bytes |")
    print("|---|---|---|---|")
    for e in efforts:
        runs = [save(e) for _ in range(2)]
        secs = min(r[0] for r in runs)
        print(f"| {e} | {secs:.2f} | {secs / mpx:.1f} | {runs[0][1]} |", flush=True)
    return 0


def timing(args: argparse.Namespace) -> int:
    """Seconds of a decode and of a refinement step through the quantizer, the steps in float32 and under the
    bf16 autocast (``STEP_PRECISION``) side by side in this one run (on the CPU; a GPU runs the model's dtype)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from speed import build  # the SD VAE architecture with random weights: honest for speed, not quality

    from pillow_sdlatent.core import transform_coder
    from pillow_sdlatent.models import refine as refine_module
    from pillow_sdlatent.models.device import cpu_has_native_bf16
    from pillow_sdlatent.models.refine import transform_quantizer

    device = torch.device(args.device)
    precisions = ("float32", "bfloat16") if device.type == "cpu" else ("auto",)
    print(f"{cpu_name() if device.type == 'cpu' else torch.cuda.get_device_name(device)}, {args.threads} thread(s), "
          f"torch {torch.__version__}, native bf16: {'yes' if cpu_has_native_bf16() else 'no'}; {args.steps} "
          f"steps in one stage, each with its share of the scoring (bf16: also the float32 re-scoring)")  # fmt: skip
    print()
    cols = " | ".join(f"refine s/step {p}" for p in precisions)
    print(f"| model | size | decode s | {cols} |{' bf16 speed-up |' if len(precisions) == 2 else ''}")
    print("|---|---|---|" + "---|" * (len(precisions) + (len(precisions) == 2)))
    for name, (h, w) in (("taesd", (512, 768)), ("sd", (256, 256)), ("sd", (512, 512))):
        model = build(name, device, torch.float32)
        x = torch.rand(1, 3, h, w, device=device)
        z = model.encode(x)
        model.decode(z)  # warm-up
        t0 = time.perf_counter()
        model.decode(z)
        dec = time.perf_counter() - t0
        q = transform_quantizer(transform_coder.params(z[0].cpu().numpy(), 60))
        per = []
        for precision in precisions:
            with patch.object(refine_module, "STEP_PRECISION", precision):
                model.refine(x, z, 1, quantizer=q, tile_size=0)  # warm-up
                t0 = time.perf_counter()
                model.refine(x, z, args.steps, quantizer=q, tile_size=0)
                per.append((time.perf_counter() - t0) / args.steps)
        label = "TAESD" if name == "taesd" else "SD VAE (random weights)"
        ratio = f" {per[0] / per[1]:.2f}x |" if len(per) == 2 else ""
        print(f"| {label} | {w}x{h} | {dec:.2f} | {' | '.join(f'{p:.2f}' for p in per)} |{ratio}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
