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
import json
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
    out += codec_panels(ref, budget)
    return out


def codec_panels(ref: np.ndarray, budget: int) -> list[tuple[str, np.ndarray, int]]:
    """AVIF, JPEG XL and JPEG, each at the highest quality whose file is not larger than ``budget`` bytes."""
    out: list[tuple[str, np.ndarray, int]] = []
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


def panel_stats(items: list[tuple[str, np.ndarray, int]], ref: np.ndarray, metrics: rm.Metrics) -> list[dict]:
    """Bytes, bpp, PSNR and JOD of each panel that has a file (the original and refusals have none)."""
    rows = []
    for label, rgb, nbytes in items:
        row: dict = {"panel": label, "bytes": nbytes}
        if nbytes:
            jod = metrics.jod(ref, rgb)
            row |= {"bpp": 8 * nbytes / ref.shape[0] / ref.shape[1], "psnr": rm.psnr(ref, rgb), "jod": jod}
        rows.append(row)
    return rows


def strip(items: list[tuple[str, np.ndarray, int]], stats: list[dict], ref: np.ndarray, title: str) -> Image.Image:
    side = ref.shape[1]
    canvas = Image.new("RGB", (len(items) * side, 18 + ref.shape[0] + LABEL_H), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 3), title, fill="black")
    for i, ((label, rgb, nbytes), row) in enumerate(zip(items, stats, strict=True)):
        canvas.paste(Image.fromarray(rgb), (i * side, 18))
        if nbytes:
            text = f"{nbytes} B, {row['bpp']:.3f} bpp\n{row['psnr']:.2f} dB"
            text += f", JOD {row['jod']:.2f}" if row["jod"] is not None else ""
        else:
            text = "" if label == "original" else "-"
        draw.text((i * side + 4, 20 + ref.shape[0]), f"{label}\n{text}", fill="black")
    return canvas


def summary(strips: list[dict]) -> str:
    """The Markdown table docs/pictures.md quotes: every panel with a file, per strip."""
    lines = ["| crop | rate | panel | bytes | bpp | PSNR dB | JOD |", "|---|---|---|---|---|---|---|"]
    for s in strips:
        for row in s["panels"]:
            if row["bytes"]:
                jod = "-" if row["jod"] is None else f"{row['jod']:.2f}"
                panel = row["panel"].replace("\n", " ")
                lines.append(f"| {s['crop']} | {s['bpp']} | {panel} | {row['bytes']} | {row['bpp']:.3f} "
                             f"| {row['psnr']:.2f} | {jod} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--crops", nargs="+", default=list(CROPS), help="Kodak image names")
    ap.add_argument("--side", type=int, default=384, help="side of the centre crop")
    ap.add_argument("--bpp", nargs="+", type=float, default=[0.1, 0.2])
    ap.add_argument("--effort", type=int, default=9, help="the searching .sdl panel's effort (9: the top)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "pictures",
                    help="folder for results.json and summary.md (every panel's bytes, PSNR and JOD)")  # fmt: skip
    ap.add_argument("--fit", type=int, metavar="BYTES",
                    help="only the reference codecs at no more than BYTES on each crop: a table, no strip (e.g. "
                    "at the searched .sdl file's size, above the default file, which sizes them)")  # fmt: skip
    args = ap.parse_args(argv)
    import torch

    from pillow_sdlatent.models import load_model

    torch.set_num_threads(1)
    metrics = rm.Metrics()
    if args.fit is not None:
        fitted = []
        for name in args.crops:
            ref = np.asarray(crop_of(name, args.side))
            stats = panel_stats(codec_panels(ref, args.fit), ref, metrics)
            fitted.append({"crop": name, "bpp": f"<= {args.fit} B", "panels": stats})
        print(summary(fitted), flush=True)
        return 0
    model = load_model(str(rd.SHARED / "models" / "taesd"), "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    strips: list[dict] = []
    for name in args.crops:
        ref = np.asarray(crop_of(name, args.side))
        for bpp in args.bpp:
            t = time.perf_counter()
            items = panels(name, args.side, bpp, args.effort, model)
            stats = panel_stats(items, ref, metrics)
            box = crop_box(name, args.side)
            title = (f"{name} {box}, about {bpp} bpp, TAESD; "
                     "AVIF / JPEG XL / JPEG at no more bytes than the default .sdl file")  # fmt: skip
            path = args.out / f"pictures-{name}-{round(bpp * 100):03d}.png"
            buf = io.BytesIO()
            strip(items, stats, ref, title).save(buf, "PNG", optimize=True)
            path.write_bytes(buf.getvalue())
            print(f"wrote {path} ({len(buf.getvalue())} bytes)", flush=True)
            made = {"crop": name, "box": list(box), "bpp": bpp, "effort": args.effort, "panels": stats,
                    "seconds": round(time.perf_counter() - t, 1)}  # fmt: skip
            strips = save_results(args.results, [made])  # after each strip: a stopped run keeps what it made
    print(summary(strips), flush=True)
    return 0


def save_results(folder: Path, strips: list[dict]) -> list[dict]:
    """Merge this run's strips into ``folder``'s results.json (a strip re-made replaces its old row, so
    the crops can run as separate processes) and rewrite summary.md; returns every strip kept."""
    env = rd.environment()
    for s in strips:
        s["environment"] = env
    path = folder / "results.json"
    old = json.loads(path.read_text())["strips"] if path.exists() else []
    made = {(s["crop"], s["bpp"]) for s in strips}
    kept = [s for s in old if (s["crop"], s["bpp"]) not in made] + strips
    kept.sort(key=lambda s: (CROPS.index(s["crop"]) if s["crop"] in CROPS else len(CROPS), s["crop"], s["bpp"]))
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"strips": kept}, indent=1) + "\n")
    (folder / "summary.md").write_text(summary(kept))
    return kept


if __name__ == "__main__":
    sys.exit(main())
