"""Bytes of the float quantizer's lossless stream (spec section 5.4) against raw values, and the layouts and
filters it was chosen over.

    python benchmarks/float_planes.py                        # TAESD, TAESDXL, TAEF2 on the 24 Kodak images
    python benchmarks/float_planes.py --images 6 --models taesd

For each model (../shared/models) and element format, the latents of 512x512 centre crops of Kodak
(``encode_images``, rounded to the format as ``method=...`` rounds them) are written with
``write_latents(..., method=FORMAT)``; "LDAT" is the stream's bytes, "file" the whole file's, both per image,
and "x raw" the LDAT bytes over the raw values' (2 or 4 bytes a value). The other columns are the same values
coded otherwise, each as one zstd frame at the package's level (entropy.ZSTD_LEVEL), as x raw:

* one block: the same byte planes without a block boundary between planes;
* no planes: the values' big-endian bytes in order (what a raw fp16/bf16 array through zstd is);
* sub, xor: before the split, each value's bit pattern minus (mod 2^bits), or XOR, its left neighbour's;
* ordered sub: the same difference of the patterns mapped to order-preserving integers (sign-magnitude to
  two's complement).
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import zstandard
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"

from pillow_sdlatent.core import entropy, floats  # noqa: E402
from pillow_sdlatent.core.codec import decode_bytes  # noqa: E402
from pillow_sdlatent.latents import encode_images, write_latents  # noqa: E402
from pillow_sdlatent.models import load_model  # noqa: E402

FORMATS = ("float16", "bfloat16", "float32")


def _filtered(bits: np.ndarray, kind: str) -> np.ndarray:
    """``bits`` (C, h, w) with a left-neighbour filter along each row (the first column as is)."""
    if kind == "ordered sub":
        top = bits.dtype.type(1 << (8 * bits.dtype.itemsize - 1))
        bits = np.where(bits & top, ~bits, bits | top)  # order-preserving: negatives below positives
    out = bits.copy()
    if kind == "xor":
        out[..., 1:] ^= bits[..., :-1]
    else:
        out[..., 1:] -= bits[..., :-1]  # unsigned arithmetic wraps mod 2^bits
    return out


def variants(bits: np.ndarray) -> dict[str, int]:
    """Bytes of the alternatives for one latent's bit patterns."""
    zc = zstandard.ZstdCompressor(level=entropy.ZSTD_LEVEL, write_content_size=True, threads=0)
    be = bits.astype(bits.dtype.newbyteorder(">")).tobytes()
    out = {"one block": len(zc.compress(b"".join(floats.planes(bits)))), "no planes": len(zc.compress(be))}
    for kind in ("sub", "xor", "ordered sub"):
        out[kind] = len(entropy.zstd_compress_parts(floats.planes(_filtered(bits, kind))))
    return out


def run_model(name: str, images: list[Image.Image]) -> None:
    ae = load_model(str(SHARED / "models" / name), "cpu")
    identity = {"model_id": ae.model_id, "fingerprint": ae.fingerprint, "downscale": ae.downscale}
    zs = [z.numpy() for z in encode_images(images, ae)]
    for fmt in FORMATS:
        files, ldat, alt = [], [], {}
        for z in zs:
            buf = io.BytesIO()
            write_latents(buf, z, **identity, method=fmt)
            data = buf.getvalue()
            files.append(len(data))
            at = data.index(b"LDAT")
            ldat.append(int.from_bytes(data[at - 4 : at], "big"))
            lf = decode_bytes(data)
            for k, v in variants(lf.symbols).items():
                alt[k] = alt.get(k, 0) + v
        raw = zs[0].size * floats.width(fmt)
        n = len(zs)
        cols = " | ".join(f"{v / n / raw:.3f}" for v in alt.values())
        print(f"| {name} | {fmt} | {raw:,} | {np.mean(ldat):,.0f} | {np.mean(files):,.0f} | "
              f"{np.mean(ldat) / raw:.3f} | {cols} |", flush=True)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["taesd", "taesdxl", "taef2"])
    p.add_argument("--images", type=int, default=24, help="the first N Kodak images")
    args = p.parse_args()
    torch.set_num_threads(1)
    paths = sorted((SHARED / "data" / "kodak").glob("kodim*.png"))[: args.images]
    if not paths:
        sys.exit(f"no Kodak images in {SHARED / 'data' / 'kodak'}")
    images = []
    for path in paths:
        im = Image.open(path).convert("RGB")
        left, top = (im.width - 512) // 2, (im.height - 512) // 2
        images.append(im.crop((left, top, left + 512, top + 512)))
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line), "?")
    print(f"512x512 centre crops of {len(images)} Kodak images; {model_name}; zstd {zstandard.ZSTD_VERSION}\n")
    print("| model | format | raw bytes | LDAT | file | x raw | one block | no planes | sub | xor | ordered sub |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        run_model(name, images)


if __name__ == "__main__":
    main()
