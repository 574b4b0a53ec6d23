"""Side-by-side pictures: what .sdl looks like next to the codecs people know, at the same bytes.

    ../benchvenv/bin/python benchmarks/pictures.py                       # both crops, both rates (docs/img/)
    ../benchvenv/bin/python benchmarks/pictures.py --crops kodim23 --effort 6

For each Kodak crop (a centre crop of ``--side``, 384 by default: at 256x256, 0.1 bpp is 819 bytes, below
the smallest AVIF or JPEG file of that size) and each rate (about 0.1 and 0.2 bpp), one PNG strip of panels:
the original; the original SD method (the largest libimagequant palette whose file fits); .sdl at the
default effort and at ``--effort``, each the highest quality that fits the rate (``target_bpp``); then
AVIF, JPEG XL and JPEG, each at the highest quality whose file is not larger than the default .sdl file.
Every panel is labelled with its bytes, PSNR and JOD (ColorVideoVDP, standard_4k; needs the benchmark
venv, see docs/benchmarks.md). The model is TAESD (../shared/models/taesd). Everything goes through the
package's encode path (``pipeline.encode_image``) and decoder, and rd.py's codec helpers.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import rd  # noqa: E402
import rd_metrics as rm  # noqa: E402

#: Two of the issue's crop images: a parrot (smooth areas, feathers) and a face with hair and beads.
CROPS = ("kodim23", "kodim15")
LABEL_H = 46


def crop_box(name: str, side: int) -> tuple[int, int, int, int]:
    with Image.open(rd.KODAK / f"{name}.png") as im:
        left, top = (im.width - side) // 2, (im.height - side) // 2
    return left, top, left + side, top + side


def crop_of(name: str, side: int) -> Image.Image:
    with Image.open(rd.KODAK / f"{name}.png") as im:
        return im.convert("RGB").crop(crop_box(name, side))


def panels(name: str, side: int, bpp: float, effort: int, model) -> list[tuple[str, np.ndarray, int]]:
    """(label, RGB, bytes) of every panel of one strip."""
    from pillow_sdlatent.core.codec import decode_bytes
    from pillow_sdlatent.pipeline import decode_rgb, encode_image, file_bytes

    img = crop_of(name, side)
    ref = np.asarray(img)

    def sdl(**options) -> tuple[bytes, np.ndarray]:
        data = file_bytes(encode_image(img, model, **options))
        return data, decode_rgb(decode_bytes(data), model)

    out: list[tuple[str, np.ndarray, int]] = [("original", ref, 0)]
    t = time.perf_counter()
    default, default_rgb = sdl(target_bpp=bpp, effort=0)
    budget = len(default)
    for p in rd.PALETTES:
        data, rgb = sdl(method="original", palette_size=p)
        if len(data) <= budget:
            out.append((f"original SD method ({p} colours)", rgb, len(data)))
            break
    else:
        out.append(("original SD method: no palette fits", np.full_like(ref, 128), 0))
    out.append((".sdl, default effort 0", default_rgb, budget))
    searched, searched_rgb = sdl(target_bpp=bpp, effort=effort)
    out.append((f".sdl, effort {effort}", searched_rgb, len(searched)))
    print(f"{name} {bpp} bpp: .sdl {budget} / {len(searched)} bytes, {time.perf_counter() - t:.0f} s", flush=True)
    for codec in ("AVIF", "JPEG XL", "JPEG"):
        if (why := rd.codec_available(codec)) is not None:  # (also registers JPEG XL with Pillow)
            out.append((f"{codec}: {why}", np.full_like(ref, 128), 0))
            continue
        q = rd.highest_fitting(lambda qq, c=codec: len(rd.encode_codec(c, ref, qq)), budget, 0, rd.QMAX.get(codec, 100))
        if q is None:
            smallest = len(rd.encode_codec(codec, ref, 0))
            out.append((f"{codec}: cannot fit\n(quality 0: {smallest} B)", np.full_like(ref, 128), 0))
            continue
        data = rd.encode_codec(codec, ref, q)
        out.append((f"{codec} (quality {q})", rd.decode_any(data), len(data)))
    return out


def strip(items: list[tuple[str, np.ndarray, int]], ref: np.ndarray, metrics: rm.Metrics, title: str) -> Image.Image:
    side = ref.shape[1]
    canvas = Image.new("RGB", (len(items) * side, 18 + ref.shape[0] + LABEL_H), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 3), title, fill="black")
    for i, (label, rgb, nbytes) in enumerate(items):
        canvas.paste(Image.fromarray(rgb), (i * side, 18))
        if nbytes:
            jod = metrics.jod(ref, rgb)
            stats = f"{nbytes} B, {8 * nbytes / ref.shape[0] / ref.shape[1]:.3f} bpp\n{rm.psnr(ref, rgb):.2f} dB"
            stats += f", JOD {jod:.2f}" if jod is not None else ""
        else:
            stats = "" if label == "original" else "-"
        draw.text((i * side + 4, 20 + ref.shape[0]), f"{label}\n{stats}", fill="black")
    return canvas


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--crops", nargs="+", default=list(CROPS), help="Kodak image names")
    ap.add_argument("--side", type=int, default=384, help="side of the centre crop")
    ap.add_argument("--bpp", nargs="+", type=float, default=[0.1, 0.2])
    ap.add_argument("--effort", type=int, default=9, help="the searching .sdl panel's effort (9: the top)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = ap.parse_args(argv)
    import torch

    from pillow_sdlatent.models import load_model

    torch.set_num_threads(1)
    model = load_model(str(rd.SHARED / "models" / "taesd"), "cpu")
    metrics = rm.Metrics()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.crops:
        ref = np.asarray(crop_of(name, args.side))
        for bpp in args.bpp:
            items = panels(name, args.side, bpp, args.effort, model)
            box = crop_box(name, args.side)
            title = (f"{name} {box}, about {bpp} bpp, TAESD; "
                     "AVIF / JPEG XL / JPEG at no more bytes than the default .sdl file")  # fmt: skip
            path = args.out / f"pictures-{name}-{round(bpp * 100):03d}.png"
            buf = io.BytesIO()
            strip(items, ref, metrics, title).save(buf, "PNG", optimize=True)
            path.write_bytes(buf.getvalue())
            print(f"wrote {path} ({len(buf.getvalue())} bytes)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
