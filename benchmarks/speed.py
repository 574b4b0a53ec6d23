"""Encode/decode time, achieved TFLOP/s and peak memory: the SD VAE architecture and TAESD.

    python benchmarks/speed.py                    # CPU table (about an hour on 2 cores; --quick: minutes)
    python benchmarks/speed.py --device cuda      # GPU table: 512..4096 px, batch 1 and 8, fp16 and bf16
    python benchmarks/speed.py --only taesd --sizes 2048 8192 --ops decode
    python benchmarks/speed.py --tiling-psnr 256 384   # TAESD on Kodak, tiled vs untiled (a few minutes)

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
    ap.add_argument("--threads", type=int, default=2)
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
        tiling_psnr(args.tiling_psnr or [256, 384], args.threads)
        return
    if args.worker:
        print(json.dumps(asdict(run_config(Config(**json.loads(args.worker))))))
        return

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
