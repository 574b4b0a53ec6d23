"""Rate-distortion benchmark: .sdl against the original SD method, JPEG, WebP, AVIF and JPEG XL.

    python benchmarks/rd.py [--model SPEC ...] [--images DIR|FILE ...] [--quality Q ...] [--out bench-out]
                            [--docs docs/benchmarks.md] [--quick] [--crop N] [--limit N] [--jobs N]
    sdlatent bench ARGS            (the same script)

For every image and model the autoencoder encodes once; each .sdl quality setting (default method,
``method="auto"``) then only re-quantizes and codes those latents into the bytes ``Image.save`` writes
(preview chunk included unless --no-preview). Each .sdl file size is a budget: the original SD method
takes its largest palette (256, 128, .., 16) whose file fits, JPEG/WebP/AVIF/JPEG XL their highest
quality that fits (bisection). A codec that cannot fit is a "does not fit" row, counted in "fits k/N".

Outputs under --out (default bench-out/): cache.jsonl (encode sizes and metrics; an interrupted run
resumes, and the model-independent codec results are shared between models), and per model a folder
with per_image.csv, coding.csv, summary.md (also printed), results.json and rd_<model>.png.
``--docs PATH`` writes the report of every model found under --out (docs/benchmarks.md). The
results.json (and summary.md) of the runs that docs/ quotes are committed under benchmarks/results/<section>/,
so ``--docs-only --out benchmarks/results --docs PATH`` re-makes their reports and plots without a run.

JOD (ColorVideoVDP) needs pycvvdp, which needs torchvision: where it does not import, the JOD columns
read "n/a (reason)" and everything else still runs; docs/benchmarks.md describes the venv that has it.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import multiprocessing
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import rd_metrics as rm
from PIL import Image, features

REPO = Path(__file__).resolve().parents[1]


def _find_shared() -> Path:
    """``../shared`` beside the checkout (``SDLATENT_SHARED`` overrides), as tests/conftest.py finds it."""
    if env := os.environ.get("SDLATENT_SHARED"):
        return Path(env)
    for parent in (REPO.parent, REPO.parent.parent):
        if (parent / "shared").is_dir():
            return parent / "shared"
    return REPO.parent / "shared"


SHARED = _find_shared()
KODAK = SHARED / "data" / "kodak"
DEFAULT_MODEL = SHARED / "models" / "taesd"

#: .sdl quality settings by latent channel count: ~0.02..0.27 bpp on Kodak for the 4-channel models with the
#: transform coder (quality 90: 0.03 JOD below TAESD's float ceiling, 0.19 below TAESDXL's, in the draft format's
#: runs); for TAEF2's 32 channels the range chosen with the draft's context coder, 0.1..2 bpp.
QUALITIES = {4: (30, 40, 50, 60, 75, 90)}
#: The .sdl format version the files of a run are written in (part of the cache key).
FORMAT_VERSION = "1.0"
QUALITIES_WIDE = (25, 30, 40, 50, 60, 75)
QUICK = {4: (50, 75)}
QUICK_WIDE = (30, 40)
PALETTES = (256, 128, 64, 32, 16)
LABELS = {"taesd": "TAESD", "taesdxl": "TAESDXL", "taef2": "TAEF2"}

#: name -> (Pillow format, save options); quality 0..QMAX is searched. Pillow defaults otherwise (JPEG 4:2:0).
CODECS: dict[str, tuple[str, dict[str, Any]]] = {
    "JPEG": ("JPEG", {}),
    "WebP": ("WEBP", {"method": 4}),
    "AVIF": ("AVIF", {"speed": 6}),
    "JPEG XL": ("JXL", {"effort": 7}),
}
#: pillow_jxl treats quality 100 as lossless and refuses it without lossless=True (far above any budget here)
QMAX = {"JPEG XL": 99}
METRICS = ("psnr", "ssim", "msssim", "jod")
ROW_FIELDS = (
    "model",
    "image",
    "width",
    "height",
    "kind",
    "setting",
    "codec",
    "param",
    "status",
    "budget_bytes",
    "bytes",
    "bpp",
    *METRICS,
    "psnr_vs_float",
)
CODING_FIELDS = (
    "model",
    "image",
    "quality",
    "values",
    "file_bits",
    "ldat_bits",
    "header_bits",
    "payload_bits",
    "ideal_bits",
    "categorical_bits",
    "residual_order0_bits",
    "h0_bits",
    "ctx_bits",
    "ctx_kt_bits",
)


# ---------------------------------------------------------------- small helpers


def model_label(model_id: str, refine: int = 0, effort: int = 0) -> str:
    label = LABELS.get(model_id, model_id.rsplit("/", 1)[-1])
    label = f"{label} effort {effort}" if effort else label
    return f"{label} +refine {refine}" if refine else label


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def list_images(sources: list[Path]) -> list[Path]:
    out: list[Path] = []
    for src in sources:
        out += (
            sorted(p for p in src.iterdir() if p.suffix.lower() in (".png", ".ppm", ".bmp", ".tif", ".tiff"))
            if src.is_dir()
            else [src]
        )
    return out


def load_rgb(path: Path, crop: int | None) -> np.ndarray:
    """The image as (H, W, 3) uint8; ``crop``: its central crop x crop pixels."""
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    if crop:
        h, w = rgb.shape[:2]
        y, x = max(0, (h - crop) // 2), max(0, (w - crop) // 2)
        rgb = rgb[y : y + crop, x : x + crop]
    return np.ascontiguousarray(rgb)


def codec_available(name: str) -> str | None:
    """None when the codec can encode here, else why not."""
    fmt = CODECS[name][0]
    if fmt == "JXL":
        try:
            import pillow_jxl  # noqa: F401  (registers the JXL format with Pillow)
        except Exception as exc:
            return f"pillow_jxl not importable: {type(exc).__name__}"
        return None
    Image.init()  # Image.SAVE lists only the plugins loaded so far until init()
    return None if fmt in Image.SAVE else f"Pillow has no {fmt} encoder"


def codec_version(name: str) -> str:
    fmt = CODECS[name][0]
    try:
        if fmt == "JXL":
            return "pillow-jxl-plugin " + metadata.version("pillow-jxl-plugin")
        feature = {"JPEG": "jpg", "WEBP": "webp", "AVIF": "avif"}[fmt]
        return f"{feature} {features.version(feature)}"
    except Exception:
        return "unknown"


def encode_codec(name: str, rgb: np.ndarray, quality: int) -> bytes:
    fmt, opts = CODECS[name]
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt, quality=quality, **opts)
    return buf.getvalue()


def decode_any(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def highest_fitting(size_of: Callable[[int], int], budget: int, lo: int = 0, hi: int = 100) -> int | None:
    """Highest quality in lo..hi whose size is <= budget, by bisection (assumes size grows with quality)."""
    if size_of(lo) > budget:
        return None
    if size_of(hi) <= budget:
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if size_of(mid) <= budget else (lo, mid)
    return lo


def environment() -> dict[str, str]:
    """Machine and library versions, recorded in results.json and in the report."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
        commit += ", with uncommitted changes" if commit and dirty else ""
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "cpu": f"{cpu}, {os.cpu_count()} logical cores ({platform.machine()}, {platform.system()})",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": version("torchvision"),
        "Pillow": version("pillow"),
        "libjpeg": str(features.version("libjpeg_turbo") or features.version("jpg")),
        "libwebp": str(features.version("webp")),
        "libavif": str(features.version("avif")),
        "pillow-jxl-plugin": version("pillow-jxl-plugin"),
        "pytorch-msssim": version("pytorch-msssim"),
        "cvvdp": version("cvvdp"),
        "numpy": version("numpy"),
        "pillow-sdlatent": f"{version('pillow-sdlatent')} (commit {commit or '?'})",
    }


class Cache:
    """Append-only JSON-lines store of measured values; later lines win. Written by the parent process only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by an interrupted run
                    continue
                self.data[rec["k"]] = rec["v"]

    def update(self, entries: dict[str, Any]) -> None:
        if not entries:
            return
        self.data.update(entries)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.writelines(json.dumps({"k": k, "v": v}) + "\n" for k, v in entries.items())


# ---------------------------------------------------------------- per-image work (runs in workers)


@dataclass
class Options:
    """What a worker needs (picklable)."""

    spec: str
    crop: int | None
    qualities: list[int]
    codecs: list[str]
    preview: bool
    jod: bool
    anchor_qualities: list[int]
    threads: int
    refine: int = 0  # latent refinement steps of the .sdl series (the original method keeps the encoder's latents)
    effort: int = 0  # the .sdl series' effort level (refine, when set, overrides its steps)


_W: dict[str, Any] = {}  # per-process state: options, model, metrics, cache snapshot


def init_worker(opts: Options, cache: dict[str, Any]) -> None:
    import torch

    from pillow_sdlatent.models import load_model

    torch.set_num_threads(opts.threads)  # 1 by default: two threads on a busy 2-core machine run slower than one
    _W.update(opts=opts, model=load_model(opts.spec, "cpu"), metrics=rm.Metrics(jod_enabled=opts.jod), cache=cache)


def model_key(model: Any) -> str:
    import torch

    return f"{model.model_id}:{model.fingerprint.hex()[:16]}:torch{torch.__version__}"


@dataclass
class ImageResult:
    rows: list[dict[str, Any]]
    coding: list[dict[str, Any]]
    new: dict[str, Any]  # cache entries made here
    seconds: float
    reused: int = 0


@dataclass
class _Image:
    """One image under one model: lazy latents and float round trip, cached measurements."""

    path: Path
    ref: np.ndarray
    key: str
    new: dict[str, Any] = field(default_factory=dict)
    reused: int = 0
    _z: np.ndarray | None = None
    _float: np.ndarray | None = None

    @property
    def z(self) -> np.ndarray:
        if self._z is None:
            from pillow_sdlatent.pipeline import encode_latents

            self._z = encode_latents(_W["model"], self.ref)
        return self._z

    @property
    def float_rgb(self) -> np.ndarray:
        if self._float is None:
            import torch

            from pillow_sdlatent.pipeline import to_uint8

            out = _W["model"].decode(torch.from_numpy(self.z)[None])
            self._float = to_uint8(out, *self.ref.shape[:2])
        return self._float

    def get(self, key: str) -> Any:
        return self.new[key] if key in self.new else _W["cache"].get(key)

    def measured(self, key: str, produce: Callable[[], tuple[int, np.ndarray, dict[str, Any]]]) -> dict[str, Any]:
        """Cached {bytes, psnr, ssim, msssim, jod, ...}; only JOD is added when a cached entry lacks it."""
        met: rm.Metrics = _W["metrics"]
        ent = self.get(key)
        if ent is not None and (ent.get("jod") is not None or not met.has_jod):
            self.reused += 1
            return ent
        nbytes, out, extra = produce()
        ent = (
            {"bytes": nbytes, **met.all(self.ref, out), **extra}
            if ent is None
            else {**ent, "jod": met.jod(self.ref, out)}
        )
        self.new[key] = ent
        return ent

    def size(self, codec: str, quality: int) -> int:
        key = f"size|{self.key}|{codec}|{codec_version(codec)}|{quality}"
        if (n := self.get(key)) is None:
            n = self.new[key] = len(encode_codec(codec, self.ref, quality))
        return int(n)


def sdl_file(z: np.ndarray, ref: np.ndarray, settings: Any = None, **options: Any) -> tuple[bytes, Any]:
    """(file bytes, chunks) of the .sdl file Image.save writes for the encoder's latents ``z`` of ``ref``
    (the package's encode path, pipeline.encode_chunks, with these save ``options`` or ``settings``)."""
    from pillow_sdlatent.pipeline import encode_chunks, file_bytes

    model, opts = _W["model"], _W["opts"]
    size = (ref.shape[1], ref.shape[0])
    chunks = encode_chunks(z, model, size=size, rgb=ref, settings=settings, preview=opts.preview, **options)
    return file_bytes(chunks), chunks


def process_image(path: Path) -> ImageResult:
    """Every measurement of one image under the worker's model."""
    from pillow_sdlatent.core.codec import decode_bytes
    from pillow_sdlatent.core.settings import settings_for
    from pillow_sdlatent.models import refine as rf
    from pillow_sdlatent.pipeline import decode_rgb

    t0 = time.perf_counter()
    opts: Options = _W["opts"]
    model = _W["model"]
    ref = load_rgb(path, opts.crop)
    h, w = ref.shape[:2]
    img = _Image(path, ref, f"{path.name}:{opts.crop or 'full'}:{path.stat().st_size}")
    mk = f"{model_key(model)}:preview{int(opts.preview)}"
    label = model_label(model.model_id, opts.refine, opts.effort)
    rows: list[dict[str, Any]] = []
    coding: list[dict[str, Any]] = []

    def add(kind: str, setting: str, codec: str, param: Any, budget: int | None, ent: dict | None, status: str = "ok"):
        row = dict.fromkeys(ROW_FIELDS, "")
        row.update(
            model=label,
            image=path.name,
            width=w,
            height=h,
            kind=kind,
            setting=setting,
            codec=codec,
            param=param,
            status=status,
            budget_bytes=budget if budget is not None else "",
        )
        if ent is not None:
            row.update({k: ent.get(k) for k in (*METRICS, "psnr_vs_float")}, bytes=ent["bytes"])
            row["bpp"] = ent["bytes"] * 8 / (w * h) if ent["bytes"] else ""
        rows.append(row)

    add("ceiling", "float", "float", "", None, img.measured(f"float|{img.key}|{mk}", lambda: (0, img.float_rgb, {})))

    def sdl(q: int) -> tuple[int, np.ndarray, dict[str, Any]]:
        # as Image.save(..., quality=q, refine=N) writes it: refined through the quantizer of this quality
        data, chunks = sdl_file(img.z, ref, quality=q, refine=opts.refine or None, effort=opts.effort)
        lf = decode_bytes(data)
        out = decode_rgb(lf, model)
        ldat = next(c.payload for c in chunks if c.type == b"LDAT")
        stats = rm.transform_coder_stats(lf.symbols, lf.header.levels, lf.weights, ldat)
        ctx, ctx_kt = rm.context_bits(lf.symbols, lf.header.levels)
        stats.update(file_bits=8.0 * len(data), h0_bits=rm.order0_bits(lf.symbols), ctx_bits=ctx, ctx_kt_bits=ctx_kt)
        return len(data), out, {"psnr_vs_float": rm.psnr(img.float_rgb, out), "coding": stats}

    budgets: dict[int, int] = {}
    for q in opts.qualities:
        # the rate weight joins the key: refinement's loss changed with it (files of another weight differ)
        search = f"|rate{rf.RATE_WEIGHT:g}|pooled{rf.POOLED_LEVELS}|{rf.SCHEDULE}{rf.LEARNING_RATE_QUANTIZED:g}"
        search += f"|{rf.RATE}{rf.RATE_LAMBDA:g}" if rf.RATE != "proxy" else ""
        search += f"|msssim{rf.PERCEPTUAL_WEIGHT:g}" if rf.PERCEPTUAL_WEIGHT else ""  # absent: the loss without it
        rtag = f"|refine{opts.refine}{search}" if opts.refine else ""
        rtag += f"|effort{opts.effort}{search}" if opts.effort and not opts.refine else ""
        coder = settings_for(q, "auto", model.latent_channels).coder  # the method "auto" stands for
        rtag += f"|{coder}-format{FORMAT_VERSION}"  # files of the draft streams are another cache entry
        ent = img.measured(f"sdl|{img.key}|{mk}{rtag}|{q}", lambda q=q: sdl(q))
        budgets[q] = ent["bytes"]
        add("sdl", f"q{q}", "sdl", q, ent["bytes"], ent)
        coding.append({"model": label, "image": path.name, "quality": q, **ent["coding"]})

    # the original SD method at its own palette sizes (its RD curve), then the largest palette fitting each budget
    original: dict[int, dict[str, Any]] = {}
    trimmed: dict[int, dict[str, Any]] = {}  # the same files with PLTE cut to palette_size entries (see PLTE_NOTE)
    if model.latent_channels == 4:
        for p in PALETTES:
            pal_key = f"origpal3|{img.key}|{mk}|{p}"  # 3: latents mapped from [-3, 3], as the taesd README

            def orig(p: int = p, pal_key: str = pal_key, decode: bool = True) -> tuple[int, np.ndarray, dict[str, Any]]:
                data, chunks = sdl_file(img.z, ref, settings_for(None, "original", 4, palette_size=p))
                lf = decode_bytes(data)
                plte = next(c.payload for c in chunks if c.type == b"PLTE")
                img.new[pal_key] = {"plte_bytes": len(plte), "entries": int(lf.header.palette_size)}
                return len(data), decode_rgb(lf, model) if decode else ref, {}

            original[p] = img.measured(f"orig3|{img.key}|{mk}|{p}", orig)
            add("original-curve", f"palette{p}", "original", p, None, original[p])
            if img.get(pal_key) is None:  # cached by a run that did not record the palette chunk yet
                orig(decode=False)
            pal = img.get(pal_key)
            waste = pal["plte_bytes"] - pal["plte_bytes"] * p // pal["entries"]
            trimmed[p] = {**original[p], "bytes": original[p]["bytes"] - waste}
        if all(trimmed[p]["bytes"] == original[p]["bytes"] for p in PALETTES):
            trimmed = {}  # palettes stored at their size: nothing to trim
        for p, ent in trimmed.items():
            add("original-curve", f"palette{p}", "original-trimmed", p, None, ent)

    for q, budget in budgets.items():
        if not original:
            add("matched", f"q{q}", "original", "", budget, None, "n/a (4-channel models only)")
        for name, variant in (("original", original), ("original-trimmed", trimmed)):
            if not variant:
                continue
            p = next((p for p in PALETTES if variant[p]["bytes"] <= budget), None)
            why = f"does not fit (palette {PALETTES[-1]}: {variant[PALETTES[-1]]['bytes']} bytes)"
            add("matched", f"q{q}", name, p or "", budget, variant.get(p or 0), "ok" if p else why)
        for codec in opts.codecs:
            add_codec(img, add, codec, "matched", f"q{q}", budget)
    for codec in opts.codecs:  # the smallest file each codec can make: why it does not fit the low budgets
        if codec_available(codec) is None:
            add("floor", "quality0", codec, 0, None, {"bytes": img.size(codec, 0)})
    if "AVIF" in opts.codecs and codec_available("AVIF") is None:
        for q in opts.anchor_qualities:  # AVIF at fixed qualities: the BD-rate anchor, like the palette sizes above

            def avif(q: int = q) -> tuple[int, np.ndarray, dict[str, Any]]:
                data = encode_codec("AVIF", ref, q)
                return len(data), decode_any(data), {}

            add(
                "anchor-curve",
                f"q{q}",
                "AVIF",
                q,
                None,
                img.measured(f"m|{img.key}|AVIF|{codec_version('AVIF')}|{q}", avif),
            )
    return ImageResult(rows, coding, img.new, time.perf_counter() - t0, img.reused)


def add_codec(img: _Image, add: Callable[..., None], codec: str, kind: str, setting: str, budget: int) -> None:
    if (why := codec_available(codec)) is not None:
        add(kind, setting, codec, "", budget, None, f"n/a ({why})")
        return
    q = highest_fitting(lambda qq: img.size(codec, qq), budget, 0, QMAX.get(codec, 100))
    if q is None:
        add(kind, setting, codec, "", budget, None, f"does not fit (quality 0: {img.size(codec, 0)} bytes)")
        return

    def produce() -> tuple[int, np.ndarray, dict[str, Any]]:
        data = encode_codec(codec, img.ref, q)
        return len(data), decode_any(data), {}

    add(kind, setting, codec, q, budget, img.measured(f"m|{img.key}|{codec}|{codec_version(codec)}|{q}", produce))


# ---------------------------------------------------------------- driver


def run_model(spec: str, images: list[Path], args: argparse.Namespace, cache: Cache) -> dict[str, Any]:
    from pillow_sdlatent.models import load_model

    model = load_model(spec, "cpu")
    label = model_label(model.model_id, args.refine, args.effort)
    c = model.latent_channels
    qualities = args.quality or list(QUICK.get(c, QUICK_WIDE) if args.quick else QUALITIES.get(c, QUALITIES_WIDE))
    opts = Options(
        spec,
        args.crop,
        sorted(qualities),
        args.codecs,
        not args.no_preview,
        not args.no_jod,
        args.anchor_qualities if args.anchor_qualities is not None else ([0, 16] if args.quick else [0, 8, 16, 24, 32]),
        args.threads,
        args.refine,
        args.effort,
    )
    probe = rm.Metrics(jod_enabled=opts.jod)
    print(
        f"== {label} ({spec}): {len(images)} images, .sdl qualities {opts.qualities}, crop {args.crop or 'none'}, "
        f"{args.jobs} job(s) x {args.threads} thread(s); JOD: {'cvvdp' if probe.has_jod else probe.jod_reason}",
        flush=True,
    )
    del probe
    results: list[ImageResult] = []
    t0 = time.perf_counter()

    def collect(res: ImageResult) -> None:
        cache.update(res.new)
        results.append(res)
        print(
            f"[{label} {len(results)}/{len(images)}] {res.rows[0]['image']}: {res.seconds:.1f} s "
            f"({len(res.new)} new, {res.reused} cached measurements)",
            flush=True,
        )

    if args.jobs > 1:
        ctx = multiprocessing.get_context("spawn")  # fork after torch has started threads can hang
        with ctx.Pool(args.jobs, init_worker, (opts, cache.data)) as pool:
            for res in pool.imap_unordered(process_image, images):
                collect(res)
            pool.close()  # a clean shutdown: terminate() leaves a semaphore to the resource tracker
            pool.join()
    else:
        init_worker(opts, cache.data)
        for path in images:
            collect(process_image(path))
    order = {p.name: i for i, p in enumerate(images)}
    results.sort(key=lambda r: order[r.rows[0]["image"]])
    rows = [r for res in results for r in res.rows]
    met = _W.get("metrics") or rm.Metrics(jod_enabled=opts.jod)
    return {
        "model": label,
        "model_id": model.model_id,
        "spec": spec,
        "channels": c,
        "images": [p.name for p in images],
        "image_source": str(images[0].parent) if images else "",
        "crop": args.crop,
        "quick": args.quick,
        "qualities": opts.qualities,
        "preview": opts.preview,
        "codecs": {name: codec_version(name) for name in opts.codecs},
        "jod_note": met.jod_reason if opts.jod and not met.has_jod else (None if opts.jod else "JOD disabled"),
        "ssim_note": met.ssim_reason,
        "env": environment(),
        "threads": args.threads,
        "jobs": args.jobs,
        "seconds": time.perf_counter() - t0,
        "measured": sum(len(r.new) for r in results),  # new cache entries: 0 when everything came from the cache
        "rows": rows,
        "coding": [c for res in results for c in res.coding],
    }


def write_outputs(res: dict[str, Any], out: Path) -> Path:
    folder = out / slug(res["model"])
    folder.mkdir(parents=True, exist_ok=True)
    prev = folder / "results.json"
    if prev.exists():  # "seconds": compute summed over the runs that filled the cache for these images
        old = json.loads(prev.read_text())
        if (old["images"], old["crop"]) == (res["images"], res["crop"]):
            res["seconds"] = old["seconds"] + (res["seconds"] if res["measured"] else 0.0)  # cache reruns: free
    for name, fields, data in (
        ("per_image.csv", ROW_FIELDS, res["rows"]),
        ("coding.csv", CODING_FIELDS, res["coding"]),
    ):
        with (folder / name).open("w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            wr.writeheader()
            wr.writerows({k: _csv(v) for k, v in row.items()} for row in data)
    (folder / "results.json").write_text(json.dumps(res, default=_json) + "\n")
    summary = summarize(res)
    (folder / "summary.md").write_text(summary + "\n")
    plot_note = plot(res, folder / f"rd_{slug(res['model'])}.png")
    if plot_note:
        print(plot_note)
    return folder


def _csv(v: Any) -> Any:
    if v is None:
        return "n/a"
    return f"{v:.6g}" if isinstance(v, float) else v


def _json(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(type(v))


# ---------------------------------------------------------------- summaries


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and r[key] != ""]
    return float(np.mean(vals)) if vals and len(vals) == len(rows) else None


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over the rows that hold a result; ``fits``/``n`` count them."""
    ok = [r for r in rows if r["status"] == "ok"]
    agg: dict[str, Any] = {"n": len(rows), "fits": len(ok), "status": rows[0]["status"] if rows else ""}
    for key in ("bpp", *METRICS, "psnr_vs_float"):
        agg[key] = _mean(ok, key) if ok else None
    return agg


def groups(res: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """(kind, setting, codec) -> aggregate over the images."""
    by: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in res["rows"]:
        by.setdefault((r["kind"], r["setting"], r["codec"]), []).append(r)
    return {k: aggregate(v) for k, v in by.items()}


def _f(v: float | None, fmt: str, na: str = "n/a") -> str:
    return na if v is None else format(v, fmt)


def curves(res: dict[str, Any]) -> dict[str, tuple[list[float], dict[str, list[float | None]]]]:
    """Mean RD curves per codec: name -> (bpp list, {metric: values}). Matched codec points use the budgets that
    every image fits (a mean over a subset would not be comparable). "AVIF fixed quality" is AVIF's own curve."""
    g = groups(res)
    out: dict[str, tuple[list[float], dict[str, list[float | None]]]] = {}

    def put(name: str, aggs: Iterable[dict[str, Any]]) -> None:
        pts = sorted((a for a in aggs if a["fits"] == a["n"] and a["bpp"] is not None), key=lambda a: a["bpp"])
        if pts:
            out[name] = ([a["bpp"] for a in pts], {m: [a[m] for a in pts] for m in METRICS})

    put(".sdl", [g[("sdl", f"q{q}", "sdl")] for q in res["qualities"]])
    for name in ("original", "original-trimmed"):
        put(name, [a for (kind, _, cc), a in g.items() if kind == "original-curve" and cc == name])
    for codec in res["codecs"]:
        put(codec, [a for (kind, _, cc), a in g.items() if cc == codec and kind == "matched"])
    put("AVIF fixed quality", [a for (kind, _, cc), a in g.items() if cc == "AVIF" and kind == "anchor-curve"])
    return out


ANCHORS = ("original", "original-trimmed", "AVIF fixed quality")
ANCHOR_NAMES = {
    "original": "vs original SD method",
    "original-trimmed": "vs original, PLTE trimmed",
    "AVIF fixed quality": "vs AVIF",
}
#: Why the "PLTE trimmed" variant exists; printed under the tables whenever a file wastes palette entries.
PLTE_NOTE = (
    "The original method's files store a 256-entry PLTE chunk whatever palette_size is (libimagequant hands back "
    "a palette padded to 256 entries and pillow_sdlatent/core/palette.py keeps all of it): 4 bytes per unused "
    "entry, 768 bytes at 64 colours, 960 at 16 (0.016 / 0.020 bpp at 768x512). 'PLTE trimmed' subtracts that "
    "padding from each file (same pixels): what the method costs once the palette is cut to its size."
)


def bd_table(res: dict[str, Any]) -> list[tuple[str, str, rm.BDResult]]:
    cv = curves(res)
    out = []
    for metric in ("jod", "psnr", "msssim"):
        for anchor in ANCHORS:
            if ".sdl" not in cv or anchor not in cv:
                why = "4-channel models only" if anchor.startswith("original") and res["channels"] != 4 else None
                out.append((metric, anchor, rm.BDResult(None, note=why or f"no {anchor} curve")))
                continue
            out.append((metric, anchor, curve_bd(cv[anchor], cv[".sdl"], metric)))
    return out


def curve_bd(anchor: Any, test: Any, metric: str) -> rm.BDResult:
    """BD-rate of two of ``curves``' curves (rates, {metric: values}) on one metric; n/a where a point
    lacks it (JOD without cvvdp)."""
    (ra, ma), (rt, mt) = (anchor[0], anchor[1][metric]), (test[0], test[1][metric])
    if any(v is None for v in (*ma, *mt)):
        return rm.BDResult(None, note=f"{metric} not measured")
    return rm.bd_rate((ra, ma), (rt, mt))


def describe_run(res: dict[str, Any]) -> str:
    n = len(res["images"])
    crop = f", central {res['crop']}x{res['crop']} crops" if res["crop"] else ""
    src = Path(res["image_source"]).name or res["image_source"]
    return f"{res['model']} ({res['spec']}), {n} images from {src}{crop}"


def summarize(res: dict[str, Any]) -> str:
    """The markdown report of one model: RD table, original method curve, overhead, coding efficiency, BD-rate."""
    g = groups(res)
    lab = res["model"]
    jod_na = ssim_na = "n/a"  # the reason is stated once above the tables
    n = len(res["images"])

    def cells(a: dict[str, Any]) -> str:
        return (
            f"{_f(a['bpp'], '.4f')} | {_f(a['psnr'], '.2f')} | {_f(a['ssim'], '.3f', ssim_na)} | "
            f"{_f(a['msssim'], '.3f', ssim_na)} | {_f(a['jod'], '.2f', jod_na)}"
        )

    out = [f"### {lab}: rate-distortion, {describe_run(res)}", ""]
    out += [f"{name}: n/a ({note})." for name, note in (("JOD", res["jod_note"]), ("SSIM", res["ssim_note"])) if note]
    out += [""] if res["jod_note"] or res["ssim_note"] else []
    out += [
        f"Each codec at the highest setting whose file is not larger than the .sdl file of the same image "
        f"(means over the images that fit; 'fits k/{n}'). Model: **{lab}**.",
        "",
        f"| {lab}: budget = .sdl file at | codec | fits | bpp | PSNR dB | SSIM | MS-SSIM | JOD |",
        "|---|---|---|---|---|---|---|---|",
        f"| - | {lab} float round trip (no quantization) | {n}/{n} | - | "
        + cells(g[("ceiling", "float", "float")]).split(" | ", 1)[1]
        + " |",
    ]
    for q in res["qualities"]:
        a = g[("sdl", f"q{q}", "sdl")]
        out.append(f"| quality {q} | **.sdl** ({lab}, auto) | {n}/{n} | {cells(a)} |")
        for codec in ("original", "original-trimmed", *res["codecs"]):
            a = g.get(("matched", f"q{q}", codec))
            if a is None:
                continue
            name = {
                "original": f"original SD method ({lab}, largest palette that fits)",
                "original-trimmed": f"original SD method ({lab}), PLTE trimmed",
            }.get(codec, codec)
            if a["fits"] == 0:
                na = a["status"].startswith("n/a")
                why = a["status"] if na else "does not fit"
                out.append(f"| quality {q} | {name} | {'n/a' if na else f'0/{n}'} | {why} | - | - | - | - |")
            else:
                out.append(f"| quality {q} | {name} | {a['fits']}/{n} | {cells(a)} |")
    if res["channels"] == 4:
        out += [
            "",
            f"Original SD method (libimagequant palette + dithering + zstd) with {lab}, at its own palette sizes:",
            "",
            f"| {lab}: palette | bpp | bpp, PLTE trimmed | PSNR dB | SSIM | MS-SSIM | JOD |",
            "|---|---|---|---|---|---|---|",
        ]
        for p in PALETTES:
            a = g[("original-curve", f"palette{p}", "original")]
            t = g.get(("original-curve", f"palette{p}", "original-trimmed"), a)
            out.append(f"| {p} | {_f(a['bpp'], '.4f')} | {_f(t['bpp'], '.4f')} | " + cells(a).split(" | ", 1)[1] + " |")
        if any(kind == "original-curve" and cc == "original-trimmed" for kind, _, cc in g):
            out += ["", PLTE_NOTE]
    anchor = [(int(s[1:]), a) for (kind, s, cc), a in g.items() if kind == "anchor-curve" and cc == "AVIF"]
    if anchor:
        out += [
            "",
            f"AVIF (speed 6) at fixed qualities, the BD-rate anchor (same images as {lab}'s rows):",
            "",
            "| AVIF quality | bpp | PSNR dB | SSIM | MS-SSIM | JOD |",
            "|---|---|---|---|---|---|",
        ]
        out += [f"| {q} | {cells(a)} |" for q, a in sorted(anchor, key=lambda t: t[0])]
    floors = [f"{cc} {a['bpp']:.4f} bpp" for (kind, _, cc), a in g.items() if kind == "floor"]
    if floors and res["channels"] == 4:
        smallest = g[("original-curve", f"palette{PALETTES[-1]}", "original")]["bpp"]
        trim = g.get(("original-curve", f"palette{PALETTES[-1]}", "original-trimmed"))
        floors.append(
            f"original SD method (palette {PALETTES[-1]}) {smallest:.4f} bpp"
            + (f" ({trim['bpp']:.4f} with PLTE trimmed)" if trim else "")
        )
    if floors:
        out += ["", "Smallest file each codec makes (quality 0), mean over the images: " + ", ".join(floors) + "."]

    fl = g[("ceiling", "float", "float")]
    out += [
        "",
        f"Pipeline overhead of .sdl ({lab}): loss against the model's own float round trip "
        f"(PSNR {_f(fl['psnr'], '.2f')} dB, JOD {_f(fl['jod'], '.2f', jod_na)}); 'PSNR vs float decode' compares "
        "the .sdl decode with the float decode instead of the original.",
        "",
        f"| {lab}: .sdl quality | bpp | PSNR dB | ΔPSNR vs float | PSNR vs float decode | JOD | ΔJOD vs float |",
        "|---|---|---|---|---|---|---|",
    ]
    for q in res["qualities"]:
        a = g[("sdl", f"q{q}", "sdl")]
        dp = None if a["psnr"] is None or fl["psnr"] is None else a["psnr"] - fl["psnr"]
        dj = None if a["jod"] is None or fl["jod"] is None else a["jod"] - fl["jod"]
        out.append(
            f"| {q} | {_f(a['bpp'], '.4f')} | {_f(a['psnr'], '.2f')} | {_f(dp, '+.2f')} | "
            f"{_f(a['psnr_vs_float'], '.2f')} | {_f(a['jod'], '.2f', jod_na)} | {_f(dj, '+.2f', 'n/a')} |"
        )

    out += [
        "",
        f"Coding efficiency of .sdl ({lab}, the default method's transform coder), bits per value of the coded "
        "array (per DCT coefficient, the padded planes) summed over all images. "
        "'own model': the ideal code length of the symbols under the coder's own probability model (categorical "
        "bins + uniform low parts and escapes); 'order-0': per-channel histogram entropy; 'context': empirical "
        "conditional entropy given the terciles of the left and top neighbours (9 contexts per channel), and the "
        "same model coded adaptively (KT estimator, learning cost included). Ratios: LDAT payload (range-coded "
        "words, without the stream header) over each.",
        "",
        f"| {lab}: quality | file | LDAT | header | payload | own model | payload/own | order-0 | payload/order-0 "
        "| context | payload/context | context (adaptive) | payload/adaptive | coder residuals, order-0 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for q in res["qualities"]:
        cs = [c for c in res["coding"] if c["quality"] == q]
        t = {k: sum(c[k] for c in cs) for k in CODING_FIELDS[3:]}
        v = t["values"]
        out.append(
            f"| {q} | {t['file_bits'] / v:.3f} | {t['ldat_bits'] / v:.3f} | {t['header_bits'] / v:.3f} | "
            f"{t['payload_bits'] / v:.3f} | {t['ideal_bits'] / v:.3f} | {t['payload_bits'] / t['ideal_bits']:.4f} | "
            f"{t['h0_bits'] / v:.3f} | {t['payload_bits'] / t['h0_bits']:.3f} | {t['ctx_bits'] / v:.3f} | "
            f"{t['payload_bits'] / t['ctx_bits']:.3f} | {t['ctx_kt_bits'] / v:.3f} | "
            f"{t['payload_bits'] / t['ctx_kt_bits']:.3f} | {t['residual_order0_bits'] / v:.3f} |"
        )

    out += [
        "",
        f"BD-rate of .sdl ({lab}) against each anchor (negative: .sdl needs fewer bits for the same quality; "
        "pchip fit of log-rate vs metric on the mean curves, overlapping metric range; curve points where the "
        "metric stops rising are dropped):",
        "",
        f"| {lab}: metric | " + " | ".join(ANCHOR_NAMES[a] for a in ANCHORS) + " |",
        "|---|---|---|---|",
    ]
    bd = bd_table(res)
    for metric in ("jod", "psnr", "msssim"):
        cellv = [r.text(" dB" if metric == "psnr" else "") for m, _, r in bd if m == metric]
        out.append(f"| {dict(jod='JOD', psnr='PSNR', msssim='MS-SSIM')[metric]} | {' | '.join(cellv)} |")
    return "\n".join(out)


# ---------------------------------------------------------------- plots


STYLE = {
    ".sdl": ("C3", "o", "-"),
    "original": ("k", "s", "-"),
    "original-trimmed": ("k", "s", "--"),
    "JPEG": ("C1", "v", "-"),
    "WebP": ("C2", "^", "-"),
    "AVIF": ("C0", "D", "-"),
    "AVIF fixed quality": ("C0", "d", ":"),
    "JPEG XL": ("C4", "P", "-"),
}


def plot(res: dict[str, Any], path: Path) -> str | None:
    """bpp vs PSNR and bpp vs JOD, one curve per codec; returns a note when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        return f"plots skipped: matplotlib not importable ({type(exc).__name__}: {exc})"
    g = groups(res)
    cv = curves(res)
    metrics = [("psnr", "PSNR (dB, RGB)")] + (
        [("jod", "ColorVideoVDP JOD (standard_4k)")] if not res["jod_note"] else []
    )
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.6), dpi=80, squeeze=False)
    fl = g[("ceiling", "float", "float")]
    for ax, (m, title) in zip(axes[0], metrics, strict=True):
        for name, (bpp, vals) in cv.items():
            color, marker, ls = STYLE.get(name, ("k", "x", "-"))
            lab = {
                ".sdl": f".sdl ({res['model']}, quality {res['qualities'][0]}..{res['qualities'][-1]})",
                "original": f"original SD method ({res['model']}, palette 16..256)",
                "original-trimmed": "original, PLTE trimmed",
                "AVIF": "AVIF at the .sdl sizes",
                "AVIF fixed quality": "AVIF quality 0..32 (anchor)",
            }.get(name, f"{name} at the .sdl sizes")
            pts = [(b, v) for b, v in zip(bpp, vals[m], strict=True) if v is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=marker, color=color, ls=ls, label=lab, ms=4, lw=1.3)
        for codec in ("original", *res["codecs"]):  # budgets only some images fit: hollow, not joined
            color, marker, _ = STYLE.get(codec, ("k", "x", "-"))
            part = [a for (kind, _, cc), a in g.items() if kind == "matched" and cc == codec and 0 < a["fits"] < a["n"]]
            pts = [(a["bpp"], a[m]) for a in part if a[m] is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), ls="none", marker=marker, color=color, mfc="none", ms=5)
        if fl[m] is not None:
            ax.axhline(fl[m], color="C3", ls="--", lw=0.9, label=f"{res['model']} float ceiling")
        ax.set_xlabel("bits per pixel")
        ax.set_ylabel(title)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4 if len(metrics) > 1 else 2, fontsize=7, frameon=False)
    crop = f", {res['crop']}x{res['crop']} crops" if res["crop"] else ""
    fig.suptitle(
        f"{res['model']}: Kodak, {len(res['images'])} images{crop}; means over images "
        "(hollow: a budget only some images fit, mean over those)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.11 if len(metrics) > 1 else 0.2, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return None


# ---------------------------------------------------------------- report (docs/benchmarks.md)


REFERENCES = """\
From `../shared/data/kodak/README.md` (Pillow 13, each codec at the highest quality whose file fits the budget;
PSNR on RGB, JOD with display "standard_4k"):

| budget | codec | images that fit | bpp | PSNR | SSIM | JOD |
|---|---|---|---|---|---|---|
| 0.15 bpp | JPEG | 0/24 | - | - | - | - |
| 0.15 bpp | WebP | 21/24 | 0.137 | 27.75 | 0.724 | 8.21 |
| 0.15 bpp | AVIF (speed 6) | 24/24 | 0.143 | 27.90 | 0.757 | 8.64 |
| 0.15 bpp | JPEG XL | 16/24 | 0.145 | 27.59 | 0.741 | 8.38 |
| 0.5 bpp | JPEG | 24/24 | 0.489 | 29.27 | 0.821 | 9.30 |
| 0.5 bpp | WebP | 24/24 | 0.494 | 31.75 | 0.867 | 9.42 |
| 0.5 bpp | AVIF (speed 6) | 24/24 | 0.481 | 32.49 | 0.890 | 9.62 |
| 0.5 bpp | JPEG XL | 24/24 | 0.495 | 31.12 | 0.858 | 9.46 |

"the Stable Diffusion 1.5 VAE round trip alone (no quantization) reaches about 25.7 dB PSNR; at about 0.12 bpp
the learned codec cheng2020-anchor reaches 28.6 dB and VVC (VTM) 28.5 dB."

From `../shared/models/taesd/README.md` (Kodak, 24 images, the original SD method run with TAESD / TAESDXL in
place of the SD VAE, each compared with AVIF at the same file size):

| model | pipeline | bpp | PSNR | JOD | AVIF at the same size: PSNR / JOD |
|---|---|---|---|---|---|
| TAESD | float latents (the model's ceiling) | - | 24.77 | 8.15 | - |
| TAESD | palette 256 + dither + zstd (the original method) | 0.144 | 23.24 | 7.30 | 27.79 / 8.61 |
| TAESD | palette 64 + dither + zstd | 0.097 | 22.04 | 6.62 | 27.10 / 8.26 |
| TAESDXL | float latents (the model's ceiling) | - | 24.90 | 8.22 | - |
| TAESDXL | palette 256 + dither + zstd | 0.144 | 21.82 | 6.56 | 27.78 / 8.60 |
| TAESDXL | palette 64 + dither + zstd | 0.099 | 20.30 | 5.80 | 27.19 / 8.28 |
"""


#: Figures of ../shared/models/taesd/README.md (Kodak, 24 images): float (PSNR, JOD), palettes (bpp, PSNR, JOD).
REFERENCE: dict[str, dict[str, tuple[float, ...]]] = {
    "TAESD": {"float": (24.77, 8.15), "palette256": (0.144, 23.24, 7.30), "palette64": (0.097, 22.04, 6.62)},
    "TAESDXL": {"float": (24.90, 8.22), "palette256": (0.144, 21.82, 6.56), "palette64": (0.099, 20.30, 5.80)},
}


def headline(res: dict[str, Any]) -> list[str]:
    """A few sentences computed from the numbers: where .sdl stands at equal size."""
    g = groups(res)
    lab = res["model"]
    out = []
    fl = g[("ceiling", "float", "float")]
    for q in res["qualities"]:
        a = g[("sdl", f"q{q}", "sdl")]
        parts = [
            f".sdl quality {q}: {a['bpp']:.3f} bpp, {a['psnr']:.2f} dB"
            + (f", JOD {a['jod']:.2f}" if a["jod"] is not None else "")
        ]
        for codec in ("original", "AVIF"):
            b = g.get(("matched", f"q{q}", codec))
            if b and b["fits"]:
                name = "original method" if codec == "original" else codec
                parts.append(
                    f"{name} at the same size ({b['fits']}/{b['n']} fit): {b['bpp']:.3f} bpp, "
                    f"{b['psnr']:.2f} dB" + (f", JOD {b['jod']:.2f}" if b["jod"] is not None else "")
                )
        out.append(f"- {lab}, " + "; ".join(parts) + ".")
    jod = f", JOD {fl['jod']:.2f}" if fl["jod"] is not None else ""
    full_kodak = len(res["images"]) == 24 and not res["crop"]
    ref = REFERENCE.get(lab) if full_kodak else None
    base = REFERENCE.get(model_label(res["model_id"])) if full_kodak else None  # the same model, +refine or not
    out.append(
        f"- {lab} float round trip (no quantization): {fl['psnr']:.2f} dB{jod}"
        + (f" (../shared/models/taesd/README.md: {ref['float'][0]:.2f} dB, JOD {ref['float'][1]:.2f})." if ref else ".")
    )
    bd = {(m, a): r for m, a, r in bd_table(res)}
    out.append(
        f"- {lab} BD-rate of .sdl: "
        + "; ".join(
            f"{name} {' / '.join(bd[(m, a)].text(' dB' if m == 'psnr' else '') for m in ('jod', 'psnr'))}"
            for a, name in (
                ("original", "vs original (JOD / PSNR)"),
                ("original-trimmed", "vs original, PLTE trimmed"),
                ("AVIF fixed quality", "vs AVIF"),
            )
            if bd[("jod", a)].rate_pct is not None or bd[("psnr", a)].rate_pct is not None
        )
        + "."
    )
    sdl_jod = curves(res).get(".sdl", ([], {}))
    orig = g.get(("original-curve", "palette256", "original"))
    if orig and orig["jod"] is not None and fl["jod"] is not None and sdl_jod[1].get("jod"):
        # the issue's target: JOD at the original method's rate, against the model's float ceiling
        at = [
            (f"the original method's file ({orig['bpp']:.3f} bpp, palette 256)", orig["bpp"]),
            *([("the README's 0.144 bpp", base["palette256"][0])] if base else []),
        ]
        cells = []
        for what, rate in at:
            j = rm.metric_at_rate((sdl_jod[0], sdl_jod[1]["jod"]), rate)
            cells.append(f"at {what}: " + (f"JOD {j:.2f}, {fl['jod'] - j:.2f} below" if j is not None else "n/a"))
        out.append(
            f"- {lab} .sdl against its float ceiling (JOD {fl['jod']:.2f}; pchip in log-rate over the .sdl curve): "
            + "; ".join(cells)
            + "."
        )
    for p in (256, 64) if ref else ():
        a = g[("original-curve", f"palette{p}", "original")]
        t = g.get(("original-curve", f"palette{p}", "original-trimmed"), a)
        r = ref[f"palette{p}"]
        out.append(
            f"- {lab} original method, palette {p}: {a['bpp']:.3f} bpp"
            + (f" ({t['bpp']:.3f} with PLTE trimmed)" if t["bpp"] != a["bpp"] else "")
            + f", {a['psnr']:.2f} dB"
            + (f", JOD {a['jod']:.2f}" if a["jod"] is not None else "")
            + f" (README: {r[0]:.3f} bpp, {r[1]:.2f} dB, JOD {r[2]:.2f}; the .sdl container around palette and "
            "indices adds about 207 bytes, 0.004 bpp at 768x512, 69 of them the preview chunk)."
        )
    return out


def between_runs(found: list[dict[str, Any]]) -> list[str]:
    """BD-rate of each effort / refine section's .sdl curve against the plain section of the same model on
    the same images: what the search buys at equal quality, from the kept results alone."""
    out = []
    for base in found:
        if base["model"] != model_label(base["model_id"]):
            continue  # not a plain (effort 0, no refine) section
        b = curves(base).get(".sdl")
        for r in found:
            same = r["model_id"] == base["model_id"] and r["images"] == base["images"] and r["crop"] == base["crop"]
            t = curves(r).get(".sdl") if same and r is not base else None
            if b is None or t is None:
                continue
            cells = [f"{m.upper()} {curve_bd(b, t, m).text(' dB' if m == 'psnr' else '')}" for m in ("jod", "psnr")]
            out.append(f"- {r['model']} against {base['model']} (the same {len(r['images'])} images), BD-rate of "
                       f"the .sdl curves: " + "; ".join(cells) + ".")  # fmt: skip
    return out


def write_docs(path: Path, out: Path) -> None:
    found = [json.loads(p.read_text()) for p in sorted(out.glob("*/results.json"))]
    found = [r for r in found if "rows" in r and "model_id" in r]  # rd.py's runs: pictures.py keeps its own beside them
    rank = {"TAESD": 0, "TAESDXL": 1, "TAEF2": 2}
    found.sort(key=lambda r: (rank.get(model_label(r["model_id"]), 9), r["model"]))
    if not found:
        raise SystemExit(f"--docs: no results under {out} (run the benchmark first)")
    img_dir = path.parent / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    envs = {json.dumps(r["env"], sort_keys=True) for r in found}
    lines = [
        "# Rate-distortion benchmark",
        "",
        "<!-- Generated by benchmarks/rd.py --docs; edit the script, not this file. -->",
        "",
        "`benchmarks/rd.py` (also `sdlatent bench ...`) encodes every Kodak image as .sdl at several quality "
        'settings of the default method (`method="auto"`) and, for each resulting file size, encodes the same '
        "image with the original Stable Diffusion method (libimagequant palette + dithering + zstd: the largest of "
        "256/128/64/32/16 colours whose file is not larger), JPEG, WebP, AVIF (speed 6) and JPEG XL (effort 7), each "
        "at the highest quality whose file is not larger (bisection over quality 0..100). Codecs that cannot reach "
        "a size are counted ('fits k/N'), not dropped. Metrics against the original PNG: bits per pixel (whole "
        "file), PSNR (RGB, 8 bit), SSIM and MS-SSIM (pytorch_msssim, data_range=255), ColorVideoVDP JOD "
        '(`pycvvdp.cvvdp(display_name="standard_4k")`, 10 = indistinguishable). The autoencoder encodes each image '
        "once; every setting re-quantizes and codes the same latents into the bytes `Image.save` writes "
        "(header, `prVw` preview chunk and all). The Stable Diffusion VAE cannot be downloaded on the machine these "
        "numbers come from: the models are the trained tiny autoencoders TAESD / TAESDXL (the SD / SDXL latent "
        "spaces, much smaller decoders) and TAEF2 (FLUX.2's 32-channel latent space); **every figure below names "
        "its model**.",
        "",
        "## Reproduce",
        "",
        "JOD needs `pycvvdp`, which imports `torchvision`; no torchvision build imports against the project's "
        "pinned CPU torch (PyPI has no CPU torchvision; the CUDA-built 0.28 fails with `operator torchvision::nms "
        "does not exist`). The tables therefore come from a second virtualenv whose torch and torchvision are the "
        "newest PyPI builds (CUDA builds; they run on the CPU). `.[bench]` holds the benchmark's extras (cvvdp, "
        "pytorch-msssim, pillow-jxl-plugin, matplotlib); installed into its own venv it pulls torchvision and a "
        "torch to match, which is why it must not go into the venv with the pinned CPU torch:",
        "",
        "```sh",
        "python -m venv ../benchvenv",
        '../benchvenv/bin/pip install -e ".[bench]"     # this checkout + newest torch/torchvision + cvvdp etc.',
        "../benchvenv/bin/python benchmarks/rd.py --model ../shared/models/taesd --jobs 2 --docs docs/benchmarks.md",
        "../benchvenv/bin/python benchmarks/rd.py --model ../shared/models/taesdxl --jobs 2 --docs docs/benchmarks.md",
        "../benchvenv/bin/python benchmarks/rd.py --model ../shared/models/taef2 --jobs 2 --docs docs/benchmarks.md",
        "# the .sdl series with encoder-side latent refinement (save option refine=10), its own section:",
        "../benchvenv/bin/python benchmarks/rd.py --model ../shared/models/taesd --refine 10 --quality 30 40 50 60 75 "
        "--jobs 2 --docs docs/benchmarks.md",
        "../benchvenv/bin/python benchmarks/rd.py --model ../shared/models/taesdxl --refine 10 --quality 40 50 60 75 "
        "--jobs 2 --docs docs/benchmarks.md",
        "# the .sdl series at an effort level (save option effort=E; only AVIF beside it, the rest is in the cache):",
        "../benchvenv/bin/python benchmarks/rd.py --model ../shared/models/taesd --effort 1 --quality 40 50 60 75 90 "
        "--codecs AVIF --jobs 2 --docs docs/benchmarks.md",
        "```",
        "",
        "(The runs below used `/work/benchvenv`, made as above or with the dependencies first and then "
        "`pip install -e . --no-deps` of this checkout. The sections come from runs on different days, commits "
        "and 2-core VMs: each names its own under Machine and versions.) Each run adds its model's folder under "
        "`bench-out/` (per_image.csv, coding.csv, summary.md, results.json, the plot) and rewrites this file from "
        "all of them (`--docs-only` rewrites it without running anything; the results.json of every run that docs/ "
        "quotes is committed under `benchmarks/results/`, and `--docs-only --out benchmarks/results` re-makes its "
        "report and plot); `bench-out/cache.jsonl` keeps every "
        "encode size and metric, so an interrupted run resumes and a second model reuses the codec measurements of "
        "the first. `--jobs 2` runs two images at once with one torch thread each (on a busy 2-core machine, two "
        "threads in one process were slower than one). In the project venv (`.[test]` brings pytorch-msssim, "
        "pillow-jxl-plugin and matplotlib) the same commands run with the JOD columns reading "
        '"n/a (cvvdp not importable: ...)"; `--quick` (3 images, 2 settings) and `--crop 256` make a smoke run '
        "(tests/test_rd_benchmark.py).",
        "",
        "With the Stable Diffusion VAE (downloaded once by diffusers, or any local copy) the same table is one "
        "command: `sdlatent bench --model sd --docs docs/benchmarks.md` (`--model` takes any spec `load_model` "
        "accepts: `sd`, `sdxl`, a hub id, a local diffusers folder or .safetensors file).",
        "",
        "## Machine and versions",
        "",
    ]
    for r in found if len(envs) > 1 else found[:1]:
        e = r["env"]
        who = f"{r['model']} run" if len(envs) > 1 else "All runs"
        lines += [
            f"{who}: {e['cpu']}; Python {e['python']}, torch {e['torch']}, torchvision {e.get('torchvision', '?')} "
            f"({r['jobs']} process(es) x {r['threads']} thread(s)), Pillow {e['Pillow']} (libjpeg {e['libjpeg']}, "
            f"libwebp {e['libwebp']}, libavif {e['libavif']}), pillow-jxl-plugin {e['pillow-jxl-plugin']}, "
            f"pytorch-msssim {e['pytorch-msssim']}, cvvdp {e['cvvdp']}, numpy {e['numpy']}, pillow-sdlatent "
            f"{e['pillow-sdlatent']}.",
            "",
        ]
    lines += [
        "Runs: "
        + "; ".join(
            f"{describe_run(r)}, .sdl qualities {r['qualities']}, {r['seconds'] / 60:.0f} min of compute" for r in found
        )
        + ". Times were taken while other jobs shared the CPU.",
        "",
    ]
    lines += ["## At a glance", ""]
    for r in found:
        lines += headline(r)
    lines += between_runs(found)
    lines += ["", "## Reference numbers", "", REFERENCES, "## Results", ""]
    for r in found:
        name = f"rd_{slug(r['model'])}.png"
        src = out / slug(r["model"]) / name
        if src.exists():
            shutil.copyfile(src, img_dir / name)
            drawn = True
        else:  # a folder of results.json alone (benchmarks/results/, committed): draw the plot from it
            drawn = plot(r, img_dir / name) is None
        if drawn:
            lines += [f"![{r['model']}: bpp vs PSNR and JOD on {describe_run(r)}](img/{name})", ""]
        summary = summarize(r)
        (out / slug(r["model"]) / "summary.md").write_text(summary + "\n")  # current code's view of the results
        lines += [summary, ""]
    lines += [
        "## Method notes",
        "",
        "- bpp counts the whole file of every codec (container, headers, .sdl's preview chunk) over the image's "
        "pixels. .sdl files are what `Image.save` writes by default, `prVw` preview chunk included: 69 bytes with "
        "4 latent channels (0.0014 bpp at 768x512), 405 bytes with TAEF2's 32 (0.008 bpp); `--no-preview` drops it.",
        "- Means of a codec at a budget are over the images that fit ('fits k/N'); in the plots, budgets that "
        "every image fits are joined by lines and the others are hollow markers (a mean over the images that fit, "
        "biased towards the easier ones).",
        "- BD-rate: log-rate as a pchip function of the metric, for .sdl and the anchor, averaged over the metric "
        "range both curves cover (Bjøntegaard, pchip variant), on mean curves at fixed settings over all images: "
        ".sdl at its quality settings; the original method at its five palette sizes, as stored and with the PLTE "
        "padding removed; AVIF at qualities 0, 8, 16, 24, 32 (`--anchor-qualities`). Points where a curve's metric "
        "stops rising (the model's ceiling) are dropped. 'n/a (no overlap ...)' means the two curves share no "
        "metric range: AVIF's lowest quality is already above .sdl's ceiling.",
        "- The original method maps latents from [-3, 3] to 8 bits before the palette, as the taesd README's "
        "measurement does (until 2026-11-23 ours used each channel's min..max, which scored about 0.2 JOD lower).",
        "- '+refine N' sections: the .sdl series is written from latents refined N steps through the decoder "
        "(`refine=N`, as `Image.save` writes them: Adam steps through the quantizer of each quality on the pixel "
        "MSE at full and `POOLED_LEVELS` coarser scales plus `RATE_WEIGHT` times a rate proxy, the best iterate "
        "kept); the original method and the float ceiling "
        "keep the encoder's latents, "
        "so 'ΔJOD vs float' can be positive there.",
        "- 'effort E' sections: the .sdl series is written as `Image.save(..., quality=q, effort=E)` writes it "
        "(docs/refine.md: refinement in the level's stages, a cosine learning rate each, the coder's own bits as "
        "the rate term, and since 2026-12-02 MS-SSIM in the distortion, `PERCEPTUAL_WEIGHT`); the original "
        "method, AVIF and the float ceiling keep the encoder's latents.",
        "- Bisection assumes file size grows with quality; the chosen setting is always measured against the budget.",
        "- Coding efficiency: `transform_coder_stats` in benchmarks/rd_metrics.py re-runs the coder's probability "
        "model (pillow_sdlatent/core/transform_coder.py) on the decoded symbols.",
        "",
    ]
    path.write_text("\n".join(lines))
    print(f"wrote {path} and {img_dir}/rd_*.png")


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rd.py", description=(__doc__ or "").splitlines()[0])
    ap.add_argument(
        "--model",
        nargs="+",
        default=[str(DEFAULT_MODEL)],
        help="model spec(s): folder, alias (sd, sdxl, ...) or hub id; one table per model",
    )
    ap.add_argument("--images", nargs="+", type=Path, default=[KODAK], help="folders (their PNGs) or image files")
    ap.add_argument("--limit", type=int, help="only the first N images")
    ap.add_argument("--crop", type=int, help="central NxN crop of every image (smoke runs)")
    ap.add_argument(
        "--quality",
        nargs="+",
        type=int,
        help=".sdl qualities (default by model: 30 40 50 60 75 90 for 4 latent channels, 25 30 40 50 60 75 otherwise)",
    )
    ap.add_argument("--quick", action="store_true", help="3 images, 2 settings, 2 AVIF anchor qualities")
    ap.add_argument(
        "--codecs",
        nargs="+",
        default=list(CODECS),
        choices=list(CODECS),
        metavar="CODEC",
        help=f"reference codecs (default: {', '.join(CODECS)})",
    )
    ap.add_argument(
        "--anchor-qualities",
        nargs="*",
        type=int,
        help="AVIF qualities of the BD-rate anchor curve (default 0 8 16 24 32; --quick: 0 16)",
    )
    ap.add_argument(
        "--refine",
        type=int,
        default=0,
        metavar="STEPS",
        help="refine the .sdl series' latents this many steps through the decoder (separate report per model)",
    )
    ap.add_argument("--effort", type=int, default=0, choices=range(10), metavar="0-9",
                    help="the .sdl series' effort level (save option effort; separate report per model)")  # fmt: skip
    ap.add_argument("--no-preview", action="store_true", help="write .sdl files without the prVw preview chunk")
    ap.add_argument("--no-jod", action="store_true", help="skip ColorVideoVDP even where it imports")
    ap.add_argument("--jobs", type=int, default=1, help="images processed in parallel (processes)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--out", type=Path, default=REPO / "bench-out", help="output folder (default bench-out/)")
    ap.add_argument("--docs", type=Path, help="write the report of every model under --out here (and img/ beside)")
    ap.add_argument("--docs-only", action="store_true", help="only rewrite --docs from results already under --out")
    args = ap.parse_args(argv)
    if args.docs_only:
        if not args.docs:
            ap.error("--docs-only needs --docs PATH")
        write_docs(args.docs, args.out)
        return 0
    images = list_images(args.images)
    if args.quick:
        images = [images[i] for i in sorted({0, len(images) // 2, len(images) - 1})] if len(images) > 3 else images
    if args.limit:
        images = images[: args.limit]
    if not images:
        ap.error(f"no images found in {', '.join(map(str, args.images))}")
    cache = Cache(args.out / "cache.jsonl")
    for spec in args.model:
        res = run_model(spec, images, args, cache)
        folder = write_outputs(res, args.out)
        print()
        print(summarize(res))
        print(f"\n{res['model']}: {res['seconds']:.0f} s; outputs in {folder}\n", flush=True)
    if args.docs:
        write_docs(args.docs, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
