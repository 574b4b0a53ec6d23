"""Images/s of dataset conversion: the single-process ``sdlatent convert`` vs Ray Data with 1, 2, ... actors.

    python benchmarks/ray_convert.py                          # Kodak (24 images, 768x512), TAESD, the CPU
    python benchmarks/ray_convert.py --images 8 --actors 1    # a quick look
    python benchmarks/ray_convert.py --device cuda --model sd --actors 1 2 4 --images 2000 --src DIR

Needs the ``[ray]`` extra. Every configuration converts the same files into a fresh folder with the same
model, device and options; the time is the whole conversion (model loading, reading, encoding, writing),
images/s = images / that time. The Ray rows run on a local cluster of all this machine's CPUs (and GPUs),
started once beforehand (its start-up is reported on its own), with the actor sizes ``sdlatent convert
--ray`` uses (:func:`pillow_sdlatent.ray.actor_resources`). The single-process converter runs with one
forward pass per image (``-b 1``), as the Ray actors do, and every Ray output is checked byte for byte
against its file; one more Ray row shares forward passes (``--forward-batch``), whose files need not be
identical. ``--repeat`` runs each configuration that many times and keeps the fastest. Last, the cost
of each stage per image, in this process: what sizes the CPUs of a cluster (docs/dataset.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pillow_sdlatent import cli  # noqa: E402


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs"


def single_process(files: list[Path], out: Path, args: argparse.Namespace) -> float:
    t0 = time.perf_counter()
    code = cli.main(["convert", *map(str, files), "-o", str(out), "-b", "1", "--model", args.model,
                     "--device", args.device, "--quiet", "--overwrite"])  # fmt: skip
    seconds = time.perf_counter() - t0
    if code:
        raise SystemExit(f"the single-process converter failed (exit {code})")
    return seconds


def on_ray(files: list[Path], out: Path, actors: int, args: argparse.Namespace, forward_batch: int = 1) -> float:
    from pillow_sdlatent import ray as sdl_ray

    jobs = [(f, out / f.with_suffix(".sdl").name) for f in files]
    options = sdl_ray.EncodeOptions(model=args.model, device=args.device)
    t0 = time.perf_counter()
    result = sdl_ray.convert(jobs, options, overwrite=True, batch_size=args.batch_size, forward_batch=forward_batch,
                             **sdl_ray.actor_resources(actors))  # fmt: skip
    seconds = time.perf_counter() - t0
    if not result.ok or result.converted != len(files):
        raise SystemExit(f"the Ray conversion failed: {result}")
    return seconds


def stage_costs(files: list[Path], args: argparse.Namespace) -> dict[str, float]:
    """Mean milliseconds per image of each stage, in this process: what sizes the CPU side of a cluster."""
    from PIL import Image

    from pillow_sdlatent.models import load_model
    from pillow_sdlatent.pipeline import encode_batch, encode_chunks, split_image

    model = load_model(args.model, args.device)
    totals = {"read + decode (CPU)": 0.0, "latents (the model)": 0.0, "quantize + code + preview (CPU)": 0.0}
    for f in files:
        t0 = time.perf_counter()
        with Image.open(f) as im:
            im.load()
            stored, rgb, alpha = split_image(im)
        t1 = time.perf_counter()
        (z,) = encode_batch(model, [rgb], 1, refine=0)
        t2 = time.perf_counter()
        encode_chunks(z, model, size=(rgb.shape[1], rgb.shape[0]), mode=stored, alpha=alpha, rgb=rgb)
        t3 = time.perf_counter()
        for key, dt in zip(totals, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            totals[key] += dt
    return {k: 1000 * v / len(files) for k, v in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, default=ROOT.parent / "shared" / "data" / "kodak", help="image folder")
    parser.add_argument("--images", type=int, default=24, help="how many of its images (24)")
    parser.add_argument("--model", default=str(ROOT.parent / "shared" / "models" / "taesd"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--actors", type=int, nargs="*", default=[1, 2], help="Ray actor counts (1 2; none: no Ray)")
    parser.add_argument("--single-threads", type=int, nargs="*", default=[],
                        help="also the single process with these torch thread counts (default: none)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=4, help="rows per actor call (4)")
    parser.add_argument("--forward-batch", type=int, default=4,
                        help="also one actor with this many images per forward pass (4; 0: not)")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    import ray
    import torch

    files = [f for f in sorted(args.src.iterdir()) if f.suffix.lower() in {".png", ".jpg", ".jpeg"}][: args.images]
    work = Path(tempfile.mkdtemp(prefix="ray-convert-"))
    load = os.getloadavg()  # other processes on the machine slow every row alike
    rows = []
    try:
        ref = work / "single"
        best = min(single_process(files, ref, args) for _ in range(args.repeat))
        rows.append({"config": f"single process ({torch.get_num_threads()} torch threads)", "seconds": best})
        default_threads = torch.get_num_threads()
        for n in args.single_threads:
            torch.set_num_threads(n)
            out = work / f"single{n}"
            best = min(single_process(files, out, args) for _ in range(args.repeat))
            same = sum((out / f.name).read_bytes() == f.read_bytes() for f in sorted(ref.glob("*.sdl")))
            rows.append({"config": f"single process ({n} torch thread{'s' * (n > 1)})", "seconds": best,
                         "identical": f"{same}/{len(files)}"})  # fmt: skip
        torch.set_num_threads(default_threads)
        start_up = 0.0
        if args.actors:
            t0 = time.perf_counter()
            ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
            start_up = time.perf_counter() - t0
            ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            from pillow_sdlatent import ray as sdl_ray

            runs = [(n, 1) for n in args.actors]
            runs += [(1, args.forward_batch)] if args.actors and args.forward_batch > 1 else []
            for n, fb in runs:
                res = sdl_ray.actor_resources(n)
                out = work / f"ray{n}-{fb}"
                best = min(on_ray(files, out, n, args, fb) for _ in range(args.repeat))
                same = sum((out / f.name).read_bytes() == f.read_bytes() for f in sorted(ref.glob("*.sdl")))
                kind = f"{res['num_gpus']} GPU" if res["num_gpus"] else f"{res['num_cpus']:g} CPU"
                batched = f", {fb} images a forward pass" if fb > 1 else ""
                rows.append({"config": f"Ray, {n} actor{'s' * (n > 1)} ({kind} each{batched})", "seconds": best,
                             "identical": f"{same}/{len(files)}"})  # fmt: skip
        finally:
            if ray.is_initialized():
                ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    sizes = sorted({f"{w}x{h}" for w, h in (_size(f) for f in files)})
    print(f"{len(files)} images ({', '.join(sizes)}) from {args.src}; model {args.model}; device {args.device}")
    print(f"machine: {cpu_name()}; torch {torch.__version__}; ray {ray.__version__}; "
          f"Ray start-up {start_up:.1f} s (not counted below); load average before/after: "
          f"{load[0]:.2f}/{os.getloadavg()[0]:.2f}\n")  # fmt: skip
    print("| configuration | seconds | images/s | bytes identical to single process |")
    print("|---|---:|---:|---:|")
    for r in rows:
        r["images_per_s"] = len(files) / r["seconds"]
        print(f"| {r['config']} | {r['seconds']:.1f} | {r['images_per_s']:.2f} | {r.get('identical', '-')} |")
    costs = stage_costs(files, args)
    print(f"\nper image, one process ({torch.get_num_threads()} torch threads): "
          + "; ".join(f"{k} {v:.0f} ms" for k, v in costs.items()))  # fmt: skip
    if args.json:
        meta = {"images": len(files), "model": args.model, "device": args.device, "machine": cpu_name(),
                "ray_start_up_s": start_up, "batch_size": args.batch_size,
                "load_average": [load[0], os.getloadavg()[0]]}  # fmt: skip
        args.json.write_text(json.dumps({**meta, "rows": rows, "stage_ms": costs}, indent=2) + "\n")


def _size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


if __name__ == "__main__":
    main()
