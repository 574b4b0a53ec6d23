"""Convert an image to .sdl and back; print bytes, bits per pixel and PSNR.

    python examples/roundtrip.py IMAGE [--quality Q] [--model SPEC] [--method M]

Writes IMAGE-stem.sdl and IMAGE-stem.sdl.png beside the current directory.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image

import pillow_sdlatent  # noqa: F401  (registers .sdl with Pillow)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("image", type=Path)
    ap.add_argument("--quality", type=int, default=None)
    ap.add_argument("--model", default=None, help="model spec (default: SDLATENT_MODEL or the SD VAE)")
    ap.add_argument("--method", default="auto")
    args = ap.parse_args()

    src = Image.open(args.image).convert("RGB")
    sdl, png = Path(args.image.stem + ".sdl"), Path(args.image.stem + ".sdl.png")
    opts = {k: v for k, v in (("quality", args.quality), ("model", args.model)) if v is not None}
    t0 = time.perf_counter()
    src.save(sdl, method=args.method, **opts)
    t1 = time.perf_counter()
    with Image.open(sdl) as im:
        im.save(png)
        out = im.convert("RGB")
    t2 = time.perf_counter()
    n = sdl.stat().st_size
    mse = np.mean((np.asarray(src, np.float64) - np.asarray(out, np.float64)) ** 2)
    print(f"{args.image.name}: {src.width}x{src.height} -> {sdl} ({out.info.get('model', '?')})")
    print(f"  bytes {n}  bpp {n * 8 / (src.width * src.height):.4f}  PSNR {10 * np.log10(255**2 / mse):.2f} dB")
    print(f"  encode {t1 - t0:.2f} s  decode {t2 - t1:.2f} s  (first call includes loading the model)")
    print(f"  decoded image: {png}")


if __name__ == "__main__":
    main()
