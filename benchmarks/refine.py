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
  the distortion (``pooled 0``: the pixel MSE alone, as before them).

Prints a markdown table per image and the means (bpp of the file, PSNR and, with ``--jod`` where pycvvdp
imports, ColorVideoVDP JOD as benchmarks/rd.py measures it).

    python benchmarks/refine.py --crop 256 --steps 10 --quality 40 60
    ../benchvenv/bin/python benchmarks/refine.py --crop 256 --quality 45 60 75 --rate-weights 0 0.01 0.035 0.05 --jod
    ../benchvenv/bin/python benchmarks/refine.py --crop 256 --variants none --pooled-levels 0 4 \
        --rate-weights 0.02 0.04 --jod
    python benchmarks/refine.py --timing      # seconds per refinement step next to a decode
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from unittest.mock import patch

import numpy as np
import torch
from PIL import Image

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
    ap.add_argument("--method", default="auto", help="save method of the files (auto = transform; context: coder 2)")
    ap.add_argument("--model", default=str(SHARED / "models" / "taesd"))
    ap.add_argument("--images", nargs="+", type=Path, help="image files (default: Kodak 1, 5, 9, 13, 17, 21)")
    ap.add_argument("--crop", type=int, help="top-left NxN crop of every image")
    ap.add_argument("--quality", nargs="+", type=int, default=[40, 60])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rate-weights", nargs="*", type=float, default=[0.0], help="K of the rate variants")
    ap.add_argument("--pooled-levels", nargs="*", type=int, default=[],
                    help="each rate variant once per POOLED_LEVELS value L (default: the shipped one)")  # fmt: skip
    ap.add_argument("--jod", action="store_true", help="also ColorVideoVDP JOD (needs pycvvdp: docs/benchmarks.md)")
    ap.add_argument("--variants", nargs="+", default=["none", "float", "noise", "quantizer"],
                    help="which of none, float, noise, quantizer to run (the rate variants always run)")  # fmt: skip
    ap.add_argument("--timing", action="store_true", help="only time a decode and refinement steps (TAESD 768x512, "
                    "SD VAE architecture with random weights at 256x256 and 512x512)")  # fmt: skip
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.timing:
        return timing(args)

    import pillow_sdlatent  # noqa: F401  (registers the plugin)
    from pillow_sdlatent.core import context_coder
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
    variants = [*args.variants, *(label for label, _, _ in rated)]
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
        if "noise" in variants:
            w4 = torch.tensor(context_coder.CH_WEIGHT_4 if z.shape[0] == 4 else [1.0] * z.shape[0]).view(1, -1, 1, 1)
            noise = context_coder.quality_to_step(60) * w4
            zn = noise_loop(model, x, torch.from_numpy(z)[None], args.steps, 0.05, noise)[0].numpy()
        for q in args.quality:
            s = settings_for(q, args.method, model.latent_channels)
            t0 = time.perf_counter()
            zq, sq = latents_for_file(model, rgb, z, s, args.steps) if "quantizer" in variants else (z, s)
            secs = time.perf_counter() - t0
            cands = {"none": (z, s), "float": (zf, s), "quantizer": (zq, sq)}
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


def timing(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    from speed import build  # the SD VAE architecture with random weights: honest for speed, not quality

    from pillow_sdlatent.core import context_coder
    from pillow_sdlatent.models.refine import dead_zone_quantizer

    device = torch.device(args.device)
    print(f"{cpu_name() if device.type == 'cpu' else torch.cuda.get_device_name(device)}, {args.threads} thread(s), "
          f"torch {torch.__version__}, float32")  # fmt: skip
    print()
    print("| model | size | decode s | refine s/step | steps per decode |")
    print("|---|---|---|---|---|")
    for name, (h, w) in (("taesd", (512, 768)), ("sd", (256, 256)), ("sd", (512, 512))):
        model = build(name, device, torch.float32)
        x = torch.rand(1, 3, h, w, device=device)
        z = model.encode(x)
        t0 = time.perf_counter()
        model.decode(z)
        dec = time.perf_counter() - t0
        q = dead_zone_quantizer(context_coder.grid(z[0].cpu().numpy(), 60))
        model.refine(x, z, 1, quantizer=q, tile_size=0)  # warm-up
        t0 = time.perf_counter()
        model.refine(x, z, 3, quantizer=q, tile_size=0)
        per = (time.perf_counter() - t0) / 3  # 3 steps (the scoring pass of the last one included)
        label = "TAESD" if name == "taesd" else "SD VAE (random weights)"
        print(f"| {label} | {w}x{h} | {dec:.2f} | {per:.2f} | {per / dec:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
