"""Bytes, bits per pixel and PSNR of .sdl files at several settings, next to the model's float ceiling.

    python benchmarks/quality_table.py [--model SPEC] [--images a.png b.png ...] [--quality 25 50 75 90]
                                       [--methods auto original]

The autoencoder encodes each image once; every setting then only re-quantizes,
codes and decodes. "float" is the model's own round trip without quantization.
Files are produced by the encode path ``Image.save`` takes (pipeline.encode_chunks), without the
``prVw`` preview chunk (as ``Image.save(..., preview=False)`` writes them).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pillow_sdlatent.core.codec import decode_bytes
from pillow_sdlatent.core.settings import settings_for
from pillow_sdlatent.models import load_model
from pillow_sdlatent.pipeline import decode_rgb, encode_chunks, file_bytes, split_image, to_tensor, to_uint8

KODAK = Path(__file__).resolve().parents[2] / "shared" / "data" / "kodak"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255**2 / np.mean((a.astype(np.float64) - b) ** 2)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(KODAK.parents[1] / "models" / "taesd"))
    ap.add_argument("--images", nargs="*", type=Path, default=[KODAK / f"kodim{i:02d}.png" for i in (1, 5, 23)])
    ap.add_argument("--quality", nargs="*", type=int, default=[25, 50, 75, 90])
    ap.add_argument("--methods", nargs="*", default=["auto", "original"])
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    model = load_model(args.model, "cpu")
    print(
        f"model {model.model_id} ({args.model}), {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print("| image | setting | bytes | bpp | PSNR dB | decode s |")
    print("|---|---|---|---|---|---|")
    rows: dict[str, list[tuple[float, float]]] = {}
    for path in args.images:
        im = Image.open(path).convert("RGB")
        _, rgb, _ = split_image(im)
        z = model.encode(to_tensor(rgb, model.downscale))
        ceiling = psnr(rgb, to_uint8(model.decode(z), im.height, im.width))
        print(f"| {path.name} | float (no quantization) | - | - | {ceiling:.2f} | - |")
        rows.setdefault("float", []).append((0.0, ceiling))
        for method in args.methods:
            for q in args.quality if method in ("auto", "scalar") else [75]:
                settings = settings_for(q, method, model.latent_channels)
                data = file_bytes(encode_chunks(z[0].numpy(), model, size=im.size, settings=settings))
                t = time.perf_counter()
                out = decode_rgb(decode_bytes(data), model)
                dt = time.perf_counter() - t
                bpp = len(data) * 8 / (im.width * im.height)
                name = f"{method} q={q}" if method in ("auto", "scalar") else method
                rows.setdefault(name, []).append((bpp, psnr(rgb, out)))
                print(f"| {path.name} | {name} | {len(data)} | {bpp:.4f} | {psnr(rgb, out):.2f} | {dt:.2f} |")
    print("\nmean over images:")
    print("| setting | bpp | PSNR dB |")
    print("|---|---|---|")
    for name, vals in rows.items():
        b, p = np.mean(vals, axis=0)
        print(f"| {name} | {b:.4f} | {p:.2f} |" if name != "float" else f"| {name} | - | {p:.2f} |")


if __name__ == "__main__":
    main()
