"""Encode/decode speed of each backend and precision, and the memory table: the SD VAE architecture and TAESD.

    python benchmarks/speed.py                    # backend x precision x model table, and the codecs' decode row
    python benchmarks/speed.py --only taesd --repeat 5 --kodak 24
    python benchmarks/speed.py --memory           # CPU memory table (about an hour on 2 cores; --quick: minutes)
    python benchmarks/speed.py --memory --device cuda   # GPU table: 512..4096 px, batch 1 and 8, fp16 and bf16
    python benchmarks/speed.py --memory --only taesd --sizes 2048 8192 --ops decode
    python benchmarks/speed.py --tiling-psnr 256 384   # TAESD on Kodak, tiled vs untiled (a few minutes)

The default table (:func:`backend_table`) runs every (backend, precision) of :data:`VARIANTS` side by side in
one process through ``load_model(spec, "cpu", precision, backend)``: one warm-up each (OpenVINO converts
and compiles there), then ``--repeat`` rounds timing every variant once in a rotating order; "ms/image" is
the median, "x portable fp32" the median of the per-round ratios to torch float32. "PSNR change" (TAESD,
``--kodak`` Kodak images at 768x512): decode rows decode the portable encoder's files, the change of their
PSNR against the original from the portable decode's; encode rows write files at the default quality,
decoded by the portable path ("file size": against the portable encoder's file). "% peak": the rows' conv
and matmul FLOPs (counted as direct convolutions: OpenVINO's Winograd kernels do fewer) per second against
float32 and bfloat16 GEMMs (:func:`gemm_probes`) timed in the same round at that thread count (the median
over the rounds), so other processes sharing the cores slow both alike. The SD VAE has random weights (no
download): speed only.

The memory table (``--memory``):

The SD VAE is ``stabilityai/sd-vae-ft-mse``'s architecture (its real config,
34M encoder + 49M decoder parameters) with random weights: speed and memory
do not depend on the values, and no download is needed. TAESD is
``../shared/models/taesd``. Both run through ``Autoencoder.encode/decode``, the
product path, so images larger than a tile are tiled (the "tiles" column).

Each configuration runs in a fresh subprocess so that its peak memory is its
own: on the CPU the process's peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs`` just before the timed call, so "peak" is the whole
process at its fullest and "delta" what the call added on top of the loaded
model and its input); on CUDA ``torch.cuda.max_memory_allocated``. FLOPs
(convolutions and matmuls) are counted once per configuration with
``FlopCounterMode`` on a meta-device twin of the model, tile by tile, and set
against the machine's measured GEMM peak (fp32 on the CPU, bf16 on GPUs; see matmul_peak).
Times are the best of ``--repeat`` runs (one run when a run takes over 30 s
on the CPU); the first run is the one whose memory is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TAESD = ROOT.parent / "shared" / "models" / "taesd"

#: ``stabilityai/sd-vae-ft-mse``'s config (what diffusers reads from its config.json), minus the weights.
SD_VAE_CONFIG = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
MODELS = ("sd", "taesd")
CPU_SIZES = {"sd": (512, 1024, 2048), "taesd": (512, 1024, 2048, 4096, 8192)}
GPU_SIZES = (512, 1024, 2048, 4096)
#: Targets reported against (never asserted).
CPU_PEAK_SHARE = 0.70
GPU_SD_DECODE_512_MS = 10.0
GPU_BATCH8_PEAK_SHARE = 0.40
CPU_SD_MEMORY_GIB = 6.0
SD_DEC_512 = ("sd", "decode", 512, 1)


@dataclass
class Config:
    model: str  # "sd" or "taesd"
    op: str  # "encode" or "decode"
    size: int  # image side in pixels
    batch: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    tile_size: int | None = None  # None: the model's auto tile size
    repeat: int = 3
    threads: int = 2


@dataclass
class Result:
    config: Config
    seconds: list[float] = field(default_factory=list)
    tiles: int = 1
    flops: float = 0.0
    peak_bytes: int = 0  # CPU: process peak RSS; CUDA: max allocated
    delta_bytes: int = 0  # what the timed call added
    output_bytes: int = 0
    error: str | None = None
    note: str | None = None  # e.g. the NaN guard redid a tile in float32


# --- models ----------------------------------------------------------------------------------


def build(model: str, device: torch.device, dtype: torch.dtype):  # -> Autoencoder
    if model == "sd":
        from diffusers import AutoencoderKL

        from pillow_sdlatent.models.diffusers_vae import DiffusersAutoencoder

        torch.manual_seed(0)
        vae = AutoencoderKL(**SD_VAE_CONFIG)
        with warnings.catch_warnings():  # diffusers' advice on casting with .to(): nothing to keep in fp32 here
            warnings.simplefilter("ignore")
            return DiffusersAutoencoder(vae, "sd-vae-ft-mse-architecture", device, dtype, fingerprint=bytes(32))
    from pillow_sdlatent.models.taesd import TaesdAutoencoder

    return TaesdAutoencoder(TAESD, device, dtype)


def meta_twin(model):  # -> Autoencoder on the meta device: shapes only, for counting FLOPs
    twin = copy.copy(model)
    for name, value in vars(model).items():
        if isinstance(value, torch.nn.Module):
            setattr(twin, name, copy.deepcopy(value).to("meta"))
    twin.device = torch.device("meta")
    return twin


def count_flops(model, op: str, shapes: list[tuple[int, ...]]) -> float:
    """Convolution and matmul FLOPs of ``op`` over input tiles of these shapes (each counted once per shape)."""
    from torch.utils.flop_counter import FlopCounterMode

    twin = meta_twin(model)
    fn = twin._encode if op == "encode" else twin._decode
    per_shape: dict[tuple[int, ...], float] = {}
    for shape in set(shapes):
        with FlopCounterMode(display=False) as counter:
            fn(torch.empty(shape, device="meta"))
        per_shape[shape] = float(counter.get_total_flops())
    return sum(per_shape[s] for s in shapes)


# --- one configuration, in its own process --------------------------------------------------------


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _rss_bytes() -> int:
    try:
        return _status_kib("VmRSS") * 1024
    except (OSError, KeyError):
        return 0


def _peak_rss_bytes() -> int:
    try:
        return _status_kib("VmHWM") * 1024
    except (OSError, KeyError):  # not Linux: the lifetime peak (kiB on Linux, bytes on macOS)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def _tile_shapes(model, cfg: Config) -> tuple[int, list[tuple[int, ...]]]:
    """(number of tiles, input shape of every model call) as ``Autoencoder`` cuts the batch."""
    from pillow_sdlatent.models.tiling import images_per_run

    f = model.downscale
    h = w = cfg.size // f
    plan = model.tile_plan(h, w, cfg.tile_size)
    rows = plan.rows if plan else ((0, h),)
    cols = plan.cols if plan else ((0, w),)
    per_run = images_per_run(plan, h, w, model._tile_pixels(cfg.tile_size), f, cfg.batch)
    runs = [min(per_run, cfg.batch - i) for i in range(0, cfg.batch, per_run)]
    scale = f if cfg.op == "encode" else 1
    ch = 3 if cfg.op == "encode" else model.latent_channels
    shapes = [(n, ch, (y1 - y0) * scale, (x1 - x0) * scale) for n in runs for y0, y1 in rows for x0, x1 in cols]
    return len(rows) * len(cols), shapes


def run_config(cfg: Config) -> Result:
    from pillow_sdlatent.models.device import DTYPES

    torch.set_num_threads(cfg.threads)
    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    model = build(cfg.model, device, dtype)
    res = Result(cfg)
    res.tiles, shapes = _tile_shapes(model, cfg)
    res.flops = count_flops(model, cfg.op, shapes)
    g = torch.Generator().manual_seed(0)
    if cfg.op == "encode":
        x = torch.rand(cfg.batch, 3, cfg.size, cfg.size, generator=g)
    else:
        f = model.downscale
        x = torch.randn(cfg.batch, model.latent_channels, cfg.size // f, cfg.size // f, generator=g)
    x = x.to(device)
    run = model.encode if cfg.op == "encode" else model.decode
    cuda = device.type == "cuda"
    if cuda:
        for _ in range(2):  # warm-up: cuDNN algorithm choice, allocator
            run(x, tile_size=cfg.tile_size)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
        _reset_peak_rss()
    for i in range(max(1, cfg.repeat)):
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = run(x, tile_size=cfg.tile_size)
        if caught:  # the NaN guard redid work in float32: the time is not the dtype's
            res.note = str(caught[0].message)
        if cuda:
            torch.cuda.synchronize()
        res.seconds.append(time.perf_counter() - t0)
        if i == 0:
            res.output_bytes = out.numel() * out.element_size()
            res.peak_bytes = torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes()
            res.delta_bytes = res.peak_bytes - before
        del out
        if not cuda and res.seconds[-1] > 30:
            break
    return res


def run_isolated(cfg: Config) -> Result:
    """``run_config`` in a fresh interpreter: its own peak memory, no allocator state from the last one."""
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg.threads), MKL_NUM_THREADS=str(cfg.threads))
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(asdict(cfg))], capture_output=True, text=True, env=env
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return Result(cfg, error=f"exit {proc.returncode}: {tail}")
    data = json.loads(lines[-1])
    data["config"] = cfg
    return Result(**data)


# --- machine peak -------------------------------------------------------------------------------


def _best_seconds(fn, device: torch.device, runs: int) -> float:
    fn()  # warm-up: kernel choice, allocation
    best = float("inf")
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak(device: torch.device, dtype: torch.dtype, threads: int) -> dict[str, float]:
    """FLOP/s of large GEMMs at this precision: the best this machine does, by engine.

    On the CPU two engines do fp32 GEMMs: MKL (``torch.mm``), which on AMD CPUs takes its AVX2
    path, and oneDNN (the convolutions' engine, here a 1x1 convolution, i.e. a 4096x2048x2048
    GEMM), which uses AVX-512. The peak is the better of the two.
    """
    torch.set_num_threads(threads)
    n = 8192 if device.type == "cuda" else 4096
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    runs = 12 if device.type == "cuda" else 5
    peaks = {"torch.mm": 2 * n**3 / _best_seconds(lambda: a @ b, device, runs)}
    if device.type == "cpu":
        c, hw = 2048, 64
        conv = torch.nn.Conv2d(c, c, 1, bias=False).requires_grad_(False).to(dtype, memory_format=torch.channels_last)
        x = torch.randn(1, c, hw, hw).to(dtype, memory_format=torch.channels_last)
        with torch.inference_mode():
            peaks["oneDNN 1x1 conv"] = 2 * c * c * hw * hw / _best_seconds(lambda: conv(x), device, runs)
    return peaks


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        return f"{names[0]}, {os.cpu_count()} logical CPUs"
    except (OSError, IndexError):
        return platform.processor() or platform.machine()


# --- tiled vs untiled quality ---------------------------------------------------------------------


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)


def tiling_psnr(tile_sizes: list[int], threads: int) -> None:
    """TAESD round trips (no quantization) of the Kodak images, untiled and in forced small tiles."""
    import numpy as np
    from PIL import Image

    from pillow_sdlatent.models import load_model
    from pillow_sdlatent.pipeline import to_tensor, to_uint8

    torch.set_num_threads(threads)
    model = load_model(str(TAESD), "cpu")
    paths = sorted((ROOT.parent / "shared" / "data" / "kodak").glob("kodim*.png"))
    rows: dict[int, list[tuple[float, float, float, int]]] = {t: [] for t in tile_sizes}
    base: list[float] = []
    for path in paths:
        rgb = np.array(Image.open(path).convert("RGB"))
        src, x = torch.from_numpy(rgb), to_tensor(rgb, model.downscale)
        h, w = rgb.shape[:2]
        untiled = torch.from_numpy(to_uint8(model.decode(model.encode(x, tile_size=0), tile_size=0), h, w))
        base.append(_psnr(src, untiled))
        for t in tile_sizes:
            tiled = torch.from_numpy(to_uint8(model.decode(model.encode(x, tile_size=t), tile_size=t), h, w))
            n = len(model.tile_plan(h // model.downscale, w // model.downscale, t) or [0])
            rows[t].append((base[-1], _psnr(src, tiled), _psnr(untiled, tiled), n))
    print(f"TAESD on {len(paths)} Kodak images (768x512), encode + decode without quantization, tiled vs untiled:")
    print()
    print("| tile | tiles | PSNR untiled dB | PSNR tiled dB | loss mean dB | loss worst dB | tiled vs untiled dB |")
    print("|---|---|---|---|---|---|---|")
    for t, r in rows.items():
        loss = [a - b for a, b, _, _ in r]
        print(f"| {t}² | {r[0][3]} | {statistics.fmean(a for a, *_ in r):.2f} | "
              f"{statistics.fmean(b for _, b, _, _ in r):.2f} | {statistics.fmean(loss):+.3f} | {max(loss):+.3f} | "
              f"{statistics.fmean(c for _, _, c, _ in r):.1f} |")  # fmt: skip


# --- backend x precision table (the default mode) ------------------------------------------------

#: (backend, precision) rows; the first is the portable path every ratio is paired against.
VARIANTS = (("torch", "float32"), ("torch", "bfloat16"), ("openvino", "float32"), ("openvino", "bfloat16"))
#: (model, image size (width, height), threads) of the table: the issue's figures (TAESD at 768x512 on one
#: core, the SD VAE at 512² on two).
BACKEND_CASES = (("taesd", (768, 512), 1), ("sd", (512, 512), 2))
KODAK = ROOT.parent / "shared" / "data" / "kodak"


@dataclass
class VariantRow:
    model: str
    op: str
    size: tuple[int, int]
    threads: int
    backend: str
    precision: str
    seconds: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)  # paired: portable fp32 time / this time, per repetition
    psnr_change: list[float] = field(default_factory=list)  # dB, against the portable fp32 path, per image
    psnr_vs_fp32: list[float] = field(default_factory=list)  # dB between this path's pixels and fp32's
    size_change: list[float] = field(default_factory=list)  # encode: file size / the fp32 file's - 1
    peaks: dict[str, list[float]] = field(default_factory=dict)  # GEMM FLOP/s per precision, per round
    flops: float = 0.0
    error: str | None = None


def _sd_folder() -> Path:
    """The SD VAE architecture with random weights as a diffusers folder (loaded through the package)."""
    import tempfile

    from diffusers import AutoencoderKL

    folder = Path(tempfile.gettempdir()) / "sdlatent-speed-sd-vae-random"
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        AutoencoderKL(**SD_VAE_CONFIG).save_pretrained(folder)
    return folder


def _spec(model: str) -> str:
    return str(TAESD if model == "taesd" else _sd_folder())


def _load_variants(model: str) -> dict[tuple[str, str], object]:
    from pillow_sdlatent.models import load_model
    from pillow_sdlatent.models.device import openvino_installed

    out: dict[tuple[str, str], object] = {}
    for backend, precision in VARIANTS:
        if backend == "openvino" and not openvino_installed():
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[backend, precision] = load_model(_spec(model), "cpu", precision, backend)
    return out


def _psnr_u8(a, b) -> float:  # numpy uint8 arrays
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)


def _quality(models: dict, n_images: int) -> dict[tuple[str, str, str], dict[str, list[float]]]:
    """TAESD on Kodak through the package: decode rows decode the portable encoder's files; encode rows write
    files (default quality), compared in size and in round trip (decoded by the portable path) with fp32's."""
    import io

    import numpy as np
    from PIL import Image

    from pillow_sdlatent.core.container import write_chunks
    from pillow_sdlatent.core.settings import settings_for
    from pillow_sdlatent.latents import read_latent_file
    from pillow_sdlatent.pipeline import decode_rgb, encode_image

    base = models[VARIANTS[0]]
    settings = settings_for(None, "auto", base.latent_channels)
    out: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    for path in sorted(KODAK.glob("kodim*.png"))[:n_images]:
        with Image.open(path) as im:
            im = im.convert("RGB")
        src = np.asarray(im)
        files = {}
        for key, model in models.items():
            buf = io.BytesIO()
            write_chunks(buf, encode_image(im, settings, model, preview=False))
            files[key] = buf.getvalue()
        lf = read_latent_file(io.BytesIO(files[VARIANTS[0]]))
        pixels = {key: decode_rgb(lf, model) for key, model in models.items()}
        trips = {key: decode_rgb(read_latent_file(io.BytesIO(b)), base) for key, b in files.items()}
        for key in models:
            d = out.setdefault(("decode", *key), {"change": [], "vs": [], "size": []})
            d["change"].append(_psnr_u8(src, pixels[key]) - _psnr_u8(src, pixels[VARIANTS[0]]))
            d["vs"].append(_psnr_u8(pixels[key], pixels[VARIANTS[0]]))
            e = out.setdefault(("encode", *key), {"change": [], "vs": [], "size": []})
            e["change"].append(_psnr_u8(src, trips[key]) - _psnr_u8(src, trips[VARIANTS[0]]))
            e["vs"].append(_psnr_u8(trips[key], trips[VARIANTS[0]]))
            e["size"].append(len(files[key]) / len(files[VARIANTS[0]]) - 1)
    return out


def _inputs(model: str, op: str, size: tuple[int, int], base) -> torch.Tensor:
    """A Kodak image (TAESD) or noise (the random-weight SD VAE) of ``size``; latents: the portable encoder's."""
    import numpy as np
    from PIL import Image

    from pillow_sdlatent.pipeline import to_tensor

    w, h = size
    paths = sorted(KODAK.glob("kodim*.png"))
    if model == "taesd" and paths:
        with Image.open(paths[min(22, len(paths) - 1)]) as im:  # kodim23, the image
            x = to_tensor(np.asarray(im.convert("RGB").resize((w, h))), base.downscale)
    else:
        x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    return x if op == "encode" else base.encode(x)


def gemm_probes(dtype: torch.dtype) -> list[tuple[float, object]]:
    """(FLOPs, callable) of convolutions oneDNN runs at its best here, the engine's peak in practice: a 1x1
    convolution, 1024 channels on 32x32 (a 1024x1024x1024 GEMM), and a 3x3 one, 64 channels on 128x128 (the
    implicit GEMM of TAESD's layers); on this machine the 3x3 one is the faster in float32, by 1.4x."""
    probes = []
    for c, k, hw in ((1024, 1, 32), (64, 3, 128)):
        conv = torch.nn.Conv2d(c, c, k, padding=k // 2, bias=False).requires_grad_(False)
        conv = conv.to(dtype, memory_format=torch.channels_last)
        x = torch.randn(1, c, hw, hw).to(dtype, memory_format=torch.channels_last)

        def run(conv: torch.nn.Module = conv, x: torch.Tensor = x) -> None:
            with torch.inference_mode():
                conv(x)

        probes.append((2.0 * c * c * k * k * hw * hw, run))
    return probes


def time_variants(model: str, size: tuple[int, int], threads: int, ops: list[str], repeat: int,
                  n_quality: int) -> list[VariantRow]:  # fmt: skip
    """Every variant of ``model`` timed side by side: warm-up (OpenVINO compiles), then ``repeat`` rounds,
    each timing every variant once, in an order that rotates; ratios are paired within a round."""
    from pillow_sdlatent.models import clear_cache

    clear_cache()
    torch.set_num_threads(threads)
    models = _load_variants(model)
    base = models[VARIANTS[0]]
    quality = _quality(models, n_quality) if model == "taesd" and n_quality and KODAK.is_dir() else {}
    rows = []
    for op in ops:
        x = _inputs(model, op, size, base)
        flops = count_flops(base, op, [tuple(x.shape)])
        run = {key: (m.encode if op == "encode" else m.decode) for key, m in models.items()}
        group = {key: VariantRow(model, op, size, threads, *key, flops=flops) for key in models}
        for key, fn in run.items():
            try:
                fn(x)  # warm-up: OpenVINO converts and compiles, oneDNN picks its kernels
            except Exception as exc:  # a backend that cannot run this model: reported, not fatal
                group[key].error = f"{type(exc).__name__}: {exc}"[:120]
        keys = [k for k in models if group[k].error is None]
        probes = {p: gemm_probes(getattr(torch, p)) for p in ("float32", "bfloat16")}
        for r in range(repeat):
            for p, pairs in probes.items():  # the peak, under the same load as this round's rows
                best = 0.0
                for gemm_flops, fn in pairs:
                    fn()
                    for _ in range(3):
                        t0 = time.perf_counter()
                        fn()
                        best = max(best, gemm_flops / (time.perf_counter() - t0))
                for key in keys:
                    group[key].peaks.setdefault(p, []).append(best)
            times = {}
            for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
                t0 = time.perf_counter()
                run[key](x)
                times[key] = time.perf_counter() - t0
            for key in keys:
                group[key].seconds.append(times[key])
                group[key].ratios.append(times[VARIANTS[0]] / times[key])
        for key, row_ in group.items():
            q = quality.get((op, *key), {})
            row_.psnr_change, row_.psnr_vs_fp32 = q.get("change", []), q.get("vs", [])
            row_.size_change = q.get("size", [])
        rows += group.values()
    clear_cache()
    return rows


def _span(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return format(lo, fmt) if lo == hi or format(lo, fmt) == format(hi, fmt) else f"{lo:{fmt}}..{hi:{fmt}}"


def variant_line(r: VariantRow) -> str:
    head = f"| {r.model} | {r.op} | {r.size[0]}x{r.size[1]} | {r.threads} | {r.backend} | {r.precision} |"
    if r.error:
        return f"{head} error: {r.error} | | | | | | |"
    ms = statistics.median(r.seconds) * 1e3
    fractions = {p: statistics.median(r.flops / t / peak for t, peak in zip(r.seconds, v, strict=True))
                 for p, v in r.peaks.items()}  # fmt: skip
    finite = [v for v in r.psnr_vs_fp32 if math.isfinite(v)]
    vs = _span(finite, ".1f") if finite else ("identical" if r.psnr_vs_fp32 else "-")
    size = _span([100 * v for v in r.size_change], "+.2f") + "%" if r.size_change else "-"
    fp32, bf16 = fractions["float32"], fractions["bfloat16"]
    return (f"{head} {ms:,.0f} | {statistics.median(r.ratios):.2f}x | {_span(r.psnr_change, '+.3f')} | {vs} | "
            f"{size} | {fp32:.0%} | {bf16:.0%} |")  # fmt: skip


def codec_decode_row(repeat: int) -> str:
    """kodim23 in JPEG, WebP, AVIF and JPEG XL at the bit rate of its .sdl file (TAESD, default quality),
    each decoded with ``Image.open(bytes).load()``; and the .sdl file itself, portable and as chosen here."""
    import io

    from PIL import Image

    import pillow_sdlatent  # registers .sdl
    from pillow_sdlatent import options

    with contextlib.suppress(ImportError):
        import pillow_jxl  # noqa: F401  (registers JPEG XL)
    path = KODAK / "kodim23.png"
    with Image.open(path) as im:
        im = im.convert("RGB")
    pixels = im.width * im.height
    torch.set_num_threads(1)
    buf = io.BytesIO()
    options.BACKEND = "torch"
    im.save(buf, "SDL", model=str(TAESD), device="cpu", preview=False)
    sdl = buf.getvalue()
    target = len(sdl) * 8 / pixels

    def at_quality(fmt: str, q: int) -> bytes:
        b = io.BytesIO()
        im.save(b, fmt, quality=q)
        return b.getvalue()

    def closest(fmt: str) -> bytes:
        lo, hi = 1, 95
        while hi - lo > 1:  # sizes grow with quality
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if len(at_quality(fmt, mid)) * 8 / pixels < target else (lo, mid)
        return min((at_quality(fmt, q) for q in (lo, hi)), key=lambda b: abs(len(b) * 8 / pixels - target))

    def decode_ms(data: bytes, n: int) -> float:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            with Image.open(io.BytesIO(data)) as d:
                d.load()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:] if n > 1 else times) * 1e3

    cells = []
    for name, fmt in (("JPEG", "JPEG"), ("WebP", "WEBP"), ("AVIF", "AVIF"), ("JPEG XL", "JXL")):
        try:
            data = closest(fmt)
        except (KeyError, OSError, ValueError) as exc:
            cells.append(f"{name}: not available ({type(exc).__name__})")
            continue
        cells.append(f"{name} {decode_ms(data, 20):.1f} ms ({len(data) * 8 / pixels:.3f} bpp)")
    for backend, label in (("torch", "portable fp32"), (None, "as chosen here")):
        options.BACKEND = backend
        first = decode_ms(sdl, 1)  # as chosen here: loads the model, converts and compiles (OpenVINO) first
        cell = f".sdl TAESD {label} {decode_ms(sdl, max(3, repeat)):,.0f} ms ({target:.3f} bpp)"
        cells.append(cell + (f"; its first decode {first:,.0f} ms" if backend is None else ""))
    options.BACKEND = None
    assert pillow_sdlatent
    return "| kodim23 768x512, Image.open(bytes).load(), 1 thread | " + " | ".join(cells) + " |"


def backend_table(args: argparse.Namespace) -> None:
    from pillow_sdlatent.models.device import describe_system

    system = describe_system("cpu")
    load = _load()
    cases = [c for c in BACKEND_CASES if not args.only or c[0] in args.only]
    if args.threads:
        cases = [(m, size, args.threads) for m, size, _ in cases]
    if args.codecs_only:
        cases = []
    rows = [r for model, size, t in cases for r in time_variants(model, size, t, args.ops, args.repeat, args.kodak)]
    if rows:
        print(f"{machine_name(torch.device('cpu'))}; torch {torch.__version__}; OpenVINO {system['openvino']}; "
              f"AMX: {system['amx']}; torch CPU capability {system['cpu_capability']}; at the start {load}")
        seen: dict[tuple[str, int], list[float]] = {}
        for r in rows:
            for p, v in r.peaks.items():
                seen.setdefault((p, r.threads), []).extend(v)
        print("GEMM peaks (oneDNN's best of a 1x1 and a 3x3 conv, timed in every round beside the rows; median): "
              + ", ".join(
            f"{p} {t} thread{'s' * (t > 1)} {statistics.median(v) / 1e9:,.0f} GFLOP/s" for (p, t), v in seen.items()))
        print(f"Chosen here: {system['backend']} ({system['backend_reason']}), {system['precision']} "
              f"({system['precision_reason']})")  # fmt: skip
        print()
        print("| model | op | size | threads | backend | precision | ms/image | x portable fp32 | PSNR change dB | "
              "vs fp32 dB | file size | % fp32 peak | % bf16 peak |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(variant_line(r))
        print()
    if not args.no_codecs and KODAK.is_dir() and TAESD.is_dir():
        if not rows:
            print(f"{machine_name(torch.device('cpu'))}; torch {torch.__version__}; at the start {load}\n")
        print("| image | JPEG | WebP | AVIF | JPEG XL | .sdl portable | .sdl as chosen here |")
        print("|---|---|---|---|---|---|---|")
        print(codec_decode_row(args.repeat), flush=True)
    print(f"\nAt the end: {_load()}.")


def _load() -> str:
    """The machine's load average: other processes share the cores the figures assume."""
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "load average unknown"
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} logical CPUs"


# --- table ----------------------------------------------------------------------------------------

GIB = 2**30


def row(res: Result, peak: float) -> str:
    c = res.config
    head = f"| {c.model} | {c.op} | {c.size}² | {c.batch} | {c.dtype} |"
    if res.error:
        return f"{head} - | error: {res.error} | | | | | |"
    best = min(res.seconds)
    achieved = res.flops / best
    ms = f"{best * 1e3:.1f} ms" if best < 1 else f"{best:.2f} s"
    return (
        f"{head} {res.tiles} | {ms} | {res.flops / 1e12:.2f} | {achieved / 1e12:.3f} | {achieved / peak:.0%} | "
        f"{res.peak_bytes / GIB:.2f} | {res.delta_bytes / GIB:.2f} |" + (f" {res.note}" if res.note else "")
    )


def configs(args: argparse.Namespace) -> list[Config]:
    cuda = args.device.startswith("cuda")
    out = []
    for model in args.only or MODELS:
        sizes = args.sizes or (GPU_SIZES if cuda else CPU_SIZES[model])
        if args.quick and not args.sizes:
            sizes = sizes[:1] if model == "sd" else sizes[:3]
        for size in sizes:
            for op in args.ops:
                for batch in args.batches or ((1, 8) if cuda else (1,)):
                    for dtype in args.dtypes or (("float16", "bfloat16") if cuda else ("float32",)):
                        out.append(Config(model, op, size, batch, args.device, dtype, args.tile, args.repeat,
                                          args.threads))  # fmt: skip
    return out


def report_targets(results: list[Result], peak: float, cuda: bool) -> list[str]:
    ok = [r for r in results if not r.error]
    lines = []
    if cuda:
        for r in (r for r in ok if (r.config.model, r.config.op, r.config.size, r.config.batch) == SD_DEC_512):
            ms = min(r.seconds) * 1e3
            verdict = "met" if ms < GPU_SD_DECODE_512_MS else "not met"
            lines.append(f"- SD VAE decode 512² batch 1 {r.config.dtype}: {ms:.1f} ms (target < 10 ms: {verdict})")
        for r in (r for r in ok if r.config.batch == 8):
            share = r.flops / min(r.seconds) / peak
            verdict = "met" if share >= GPU_BATCH8_PEAK_SHARE else "not met"
            lines.append(f"- {r.config.model} {r.config.op} {r.config.size}² batch 8 {r.config.dtype}: "
                         f"{share:.0%} of bf16 peak (target >= 40%: {verdict})")  # fmt: skip
        return lines
    for r in ok:
        share = r.flops / min(r.seconds) / peak
        verdict = "met" if share >= CPU_PEAK_SHARE else "not met"
        lines.append(f"- {r.config.model} {r.config.op} {r.config.size}²: {share:.0%} of the fp32 GEMM peak "
                     f"(target >= 70%: {verdict})")  # fmt: skip
    for r in (r for r in ok if r.config.model == "sd" and r.config.size >= 2048):
        verdict = "met" if r.peak_bytes < CPU_SD_MEMORY_GIB * GIB else "not met"
        lines.append(f"- SD VAE {r.config.op} {r.config.size}² peak RSS {r.peak_bytes / GIB:.2f} GiB "
                     f"(target < 6 GiB: {verdict})")  # fmt: skip
    taesd = sorted((r for r in ok if r.config.model == "taesd"), key=lambda r: (r.config.op, r.config.size))
    for op in ("encode", "decode"):
        parts = [f"{r.config.size}²: {(r.delta_bytes - r.output_bytes) / GIB:.2f}" for r in taesd if r.config.op == op]
        if parts:
            lines.append(f"- TAESD {op}, delta minus the output buffer (GiB; flat = bounded by the tile): "
                         + ", ".join(parts))  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda: the GPU table)")
    ap.add_argument("--only", nargs="*", choices=MODELS)
    ap.add_argument("--sizes", nargs="*", type=int)
    ap.add_argument("--ops", nargs="*", default=["encode", "decode"], choices=["encode", "decode"])
    ap.add_argument("--batches", nargs="*", type=int)
    ap.add_argument("--dtypes", nargs="*")
    ap.add_argument("--tile", type=int, default=None, help="tile side in pixels (0: never tile; default: auto)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, help="threads (default: the table's per model; --memory: 2)")
    ap.add_argument("--memory", action="store_true", help="the memory and FLOP table of each configuration instead")
    ap.add_argument("--kodak", type=int, default=3, help="Kodak images for the PSNR columns (0: none)")
    ap.add_argument("--no-codecs", action="store_true", help="leave out the JPEG/WebP/AVIF/JPEG XL decode row")
    ap.add_argument("--codecs-only", action="store_true", help="only the codecs' decode row")
    ap.add_argument("--quick", action="store_true", help="the smallest sizes only")
    ap.add_argument(
        "--tiling-psnr",
        nargs="*",
        type=int,
        metavar="TILE",
        help="instead: TAESD tiled vs untiled PSNR on Kodak at these tile sizes (default 256 384)",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tiling_psnr is not None:
        tiling_psnr(args.tiling_psnr or [256, 384], args.threads or 2)
        return
    if args.worker:
        print(json.dumps(asdict(run_config(Config(**json.loads(args.worker))))))
        return
    if not args.memory:
        backend_table(args)
        return
    args.threads = args.threads or 2

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        print("No CUDA GPU here: the GPU table (512² to 4096², batch 1 and 8, fp16/bf16) is not measured.")
        return
    peak_dtype = torch.bfloat16 if cuda else torch.float32
    peaks = matmul_peak(device, peak_dtype, args.threads)
    peak = max(peaks.values())
    engines = ", ".join(f"{k} {v / 1e12:.3f}" for k, v in peaks.items())
    print(f"{machine_name(device)}; torch {torch.__version__}, {args.threads} threads; measured "
          f"{str(peak_dtype).removeprefix('torch.')} GEMM peak {peak / 1e12:.3f} TFLOP/s ({engines})")  # fmt: skip
    print()
    print("| model | op | size | batch | dtype | tiles | time | TFLOP | TFLOP/s | % of peak | peak GiB | delta GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for cfg in configs(args):
        res = run_isolated(cfg)
        results.append(res)
        print(row(res, peak), flush=True)
    print()
    print("\n".join(report_targets(results, peak, cuda)))
    if not cuda:
        print("\nGPU table (512² to 4096², batch 1 and 8, fp16/bf16): not measured here; run with --device cuda.")
    times = [min(r.seconds) for r in results if not r.error]
    if times:
        print(f"\n{len(results)} configurations, {statistics.fsum(times):.0f} s of timed work.")


if __name__ == "__main__":
    main()
