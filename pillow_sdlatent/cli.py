"""The ``sdlatent`` command line: ``convert``, ``info`` and ``bench``.

``info`` reads headers with the model-free core only: it never imports torch.
``convert`` imports the model layer when it has something to encode or decode.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from . import __version__
from ._atomic import is_temp_name
from .core import codec
from .core.container import SIGNATURE, FormatError, read_chunk
from .core.settings import METHODS

SDL_SUFFIX = ".sdl"
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


# ---------------------------------------------------------------- info


def file_info(path: Path) -> dict[str, Any]:
    """Header, chunk list and bit rate of one .sdl file, read without any model."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = codec.read_head(f)
        header, meta = head.header, head.info
        f.seek(len(SIGNATURE))
        chunks = []
        while (chunk := _next_chunk(f)) is not None:
            chunks.append({"type": chunk[0], "length": chunk[1]})
            if chunk[0] == "SEND":
                break
    levels = [int(v) for v in header.levels]
    return {
        "file": str(path),
        "file_size": size,
        "version": f"{header.version[0]}.{header.version[1]}",
        "width": header.width,
        "height": header.height,
        "mode": header.mode,
        "model_id": header.model_id,
        "fingerprint": header.fingerprint.hex(),
        "downscale": header.downscale,
        "latent_shape": list(header.latent_shape),
        "quantizer": header.quantizer,
        "levels": levels,
        "palette_size": header.palette_size,
        "element": header.element,
        "coder": header.coder,
        "metadata": sorted(k for k in meta if not k.startswith("_")),
        "chunks": chunks,
        "bpp": size * 8 / (header.width * header.height),
    }


def _next_chunk(f: Any) -> tuple[str, int] | None:
    start = f.tell()
    head = f.read(8)
    if len(head) < 8:
        return None if not head else ("(truncated)", len(head))
    f.seek(start)
    chunk = read_chunk(f)  # checks length, type and CRC
    name = head[4:].decode("ascii", "replace")
    if chunk is None:  # ancillary chunk dropped for a bad CRC: list it anyway
        return f"{name} (bad CRC)", int.from_bytes(head[:4], "big")
    return name, len(chunk.payload)


def _format_info(d: dict[str, Any]) -> str:
    levels = d["levels"]
    lv = str(levels[0]) if len(set(levels)) == 1 else f"{min(levels)}..{max(levels)}"
    quant = d["quantizer"] + (f", {d['palette_size']} entries" if d["quantizer"] == "palette" else "")
    quant += f", {lv} levels per channel" if d["quantizer"] != "float" else f" ({d['element']}, lossless)"
    c, h, w = d["latent_shape"]
    lines = [
        f"{d['file']}: {d['width']}x{d['height']} {d['mode']}, {d['file_size']} bytes, {d['bpp']:.4f} bpp",
        f"  model        {d['model_id']}",
        f"  fingerprint  {d['fingerprint']}",
        f"  latents      {c} x {h} x {w} (1/{d['downscale']} scale)",
        f"  quantizer    {quant}",
        f"  coder        {d['coder']}",
        "  chunks       " + ", ".join(f"{ch['type']} {ch['length']}" for ch in d["chunks"]),
        f"  version      {d['version']}" + (f"; metadata: {', '.join(d['metadata'])}" if d["metadata"] else ""),
    ]
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    if args.system:  # the only part of info that imports torch
        from .models.device import describe_system

        system = describe_system()
        if args.json:
            json.dump(system, sys.stdout, indent=2)
            print()
        else:
            print("system (what encoding and decoding run on here; options.BACKEND/DTYPE/DEVICE or "
                  "SDLATENT_BACKEND/DTYPE/DEVICE change it):")  # fmt: skip
            print("\n".join(f"  {k:<17}{v}" for k, v in system.items()))
        if not args.files:
            return 0
    elif not args.files:
        print("sdlatent info: name .sdl files, or --system", file=sys.stderr)
        return EXIT_USAGE
    results, failed = [], 0
    for name in args.files:
        try:
            d = file_info(Path(name))
        except (OSError, ValueError) as exc:  # FormatError is both
            failed += 1
            results.append({"file": name, "error": _describe(exc)})
            if not args.json:
                print(f"sdlatent info: {name}: {_describe(exc)}", file=sys.stderr)
            continue
        results.append(d)
        if not args.json:
            print(_format_info(d))
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
    return EXIT_FAILED if failed else 0


# ---------------------------------------------------------------- convert


@dataclass
class Job:
    src: Path
    dst: Path

    @property
    def decode(self) -> bool:
        return is_sdl(self.src)


@dataclass
class Stats:
    converted: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    bytes_in: int = 0
    bytes_out: int = 0


def is_sdl(path: Path) -> bool:
    if path.suffix.lower() == SDL_SUFFIX:
        return True
    try:
        with open(path, "rb") as f:
            return f.read(8) == SIGNATURE
    except OSError:
        return False


def _describe(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"no such file: {exc.filename}"
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, (FormatError, ValueError)) else f"{type(exc).__name__}: {text}"


def _image_suffixes() -> set[str]:
    return {ext.lower() for ext in Image.registered_extensions()}


def _walk(folder: Path, suffixes: set[str]) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not is_temp_name(name) and Path(name).suffix.lower() in suffixes:
                found.append(Path(root) / name)
    return found


def _glob_root(pattern: str) -> Path:
    parts = Path(pattern).parts
    keep = []
    for part in parts:
        if glob.has_magic(part):
            break
        keep.append(part)
    return Path(*keep) if keep else Path(".")


def _output_suffix(src: Path, to: str | None) -> str:
    if to:
        return to
    return ".png" if is_sdl(src) else SDL_SUFFIX


def _normalize_to(to: str | None) -> str | None:
    if to is None:
        return None
    suffix = "." + to.lower().lstrip(".")
    ext = Image.registered_extensions()
    if suffix not in ext or ext[suffix] not in Image.SAVE:
        writable = sorted(s for s, fmt in ext.items() if fmt in Image.SAVE)
        raise ValueError(f"Pillow cannot write {to!r} files; choose one of {' '.join(writable)}")
    return suffix


def collect_jobs(sources: list[str], out: str | None, to: str | None) -> tuple[list[Job], list[tuple[str, str]]]:
    """Input files -> jobs with output paths, and errors for inputs that cannot be converted."""
    errors: list[tuple[str, str]] = []
    suffixes = _image_suffixes()
    items: list[tuple[Path, Path]] = []  # (file, root its output path is relative to)
    for src in sources:
        p = Path(src)
        if p.is_dir():
            files = _walk(p, suffixes)
            if not files:
                errors.append((src, "folder holds no image files"))
            items += [(f, p) for f in files]
        elif p.exists():
            items.append((p, p.parent))
        elif glob.has_magic(src):
            matches = [Path(m) for m in sorted(glob.glob(src, recursive=True))]
            files = [m for m in matches if m.is_file() and m.suffix.lower() in suffixes and not is_temp_name(m.name)]
            if not files:
                errors.append((src, "no image files match"))
            items += [(f, _glob_root(src)) for f in files]
        else:
            errors.append((src, "no such file or folder"))

    out_path = Path(out) if out else None
    single_file_out = (
        out_path is not None
        and len(items) == 1
        and len(sources) == 1
        and Path(sources[0]).is_file()
        and bool(out_path.suffix)
        and not out_path.is_dir()
        and not out.endswith(("/", os.sep))  # type: ignore[union-attr]
    )
    if single_file_out:
        to = _normalize_to(out_path.suffix)  # type: ignore[union-attr]
    elif out_path is not None and out_path.is_file():
        raise ValueError(f"-o {out} is an existing file; with more than one input, -o names a folder")

    jobs: list[Job] = []
    inputs = {f.resolve() for f, _ in items}
    planned: dict[Path, list[Path]] = {}
    for f, root in items:
        suffix = _output_suffix(f, to)
        if single_file_out:
            dst = out_path
        elif out_path is not None:
            dst = out_path / f.relative_to(root).with_suffix(suffix)
        else:
            dst = f.with_suffix(suffix)
        assert dst is not None
        if is_sdl(f) and suffix == SDL_SUFFIX:
            errors.append((str(f), "is already .sdl (to re-encode, decode it to PNG first)"))
        elif not is_sdl(f) and suffix != SDL_SUFFIX:
            errors.append((str(f), f"neither input nor output ({suffix}) is .sdl"))
        elif dst.resolve() in inputs:
            errors.append((str(f), f"output {dst} would overwrite an input; choose another -o folder"))
        else:
            planned.setdefault(dst.resolve(), []).append(f)
            jobs.append(Job(f, dst))
    clashes = {dst: srcs for dst, srcs in planned.items() if len(srcs) > 1}
    for dst, srcs in clashes.items():  # none of them is converted: which one was meant is not ours to guess
        for f in srcs:
            others = ", ".join(str(o) for o in srcs if o != f)
            errors.append((str(f), f"output {dst} is also the output of {others}; convert them separately"))
    return [j for j in jobs if j.dst.resolve() not in clashes], errors


class Converter:
    """Runs the jobs in batches, reporting each failure and going on."""

    def __init__(self, args: argparse.Namespace, stats: Stats, progress: Any) -> None:
        self.args = args
        self.stats = stats
        self.progress = progress
        self._encoder: Any = None
        self._settings: Any = None

    def fail(self, job: Job | str, exc: BaseException | str) -> None:
        name = str(job.src) if isinstance(job, Job) else job
        msg = exc if isinstance(exc, str) else _describe(exc)
        self.stats.failures.append((name, msg))
        self.progress.write(f"sdlatent: error: {name}: {msg}", file=sys.stderr)
        self.progress.update(1)

    def done(self, job: Job, size_out: int) -> None:
        self.stats.converted += 1
        self.stats.bytes_in += job.src.stat().st_size
        self.stats.bytes_out += size_out
        self.progress.update(1)

    # encoding: images -> .sdl

    def encode(self, jobs: list[Job]) -> None:
        from .models import load_model
        from .pipeline import settings_chooser

        try:
            model = load_model(self.args.model, self.args.device)
            settings_chooser(model.latent_channels, self.args.quality, self.args.method)  # bad options: fail now
        except Exception as exc:
            for job in jobs:
                self.fail(job, f"cannot load the encoder: {_describe(exc)}")
            return
        bs = self.batch_size(model.device)
        for start in range(0, len(jobs), bs):
            self._encode_batch(model, jobs[start : start + bs])

    def batch_size(self, device: Any = None) -> int:
        """``--batch-size``, else 1 on the CPU (one image keeps its convolutions busy: batch 8 ran at 0.93x
        the throughput of batch 1 for 1.4 GiB more, issue 18) and 8 on GPUs."""
        if self.args.batch_size:
            return self.args.batch_size
        if device is None:
            from .models.device import pick_device

            device = pick_device(self.args.device)
        return 1 if device.type == "cpu" else 8

    def _encode_batch(self, model: Any, jobs: list[Job]) -> None:
        from .pipeline import encode_each, split_image

        loaded = []
        for job in jobs:
            try:
                with Image.open(job.src) as im:
                    im.load()
                    stored, rgb, alpha = split_image(im)
                    info = {k: im.info[k] for k in ("exif", "icc_profile", "xmp") if im.info.get(k)}
                    loaded.append((job, im.size, stored, rgb, alpha, info))
            except Exception as exc:
                self.fail(job, f"cannot read image: {_describe(exc)}")
        if not loaded:
            return
        latents = encode_each(model, [item[3] for item in loaded], len(loaded))  # refined per file below
        for (job, size, stored, rgb, alpha, info), z in zip(loaded, latents, strict=True):
            if isinstance(z, BaseException):
                self.fail(job, z)
                continue
            try:
                self._write_sdl(job, model, z, size, stored, rgb, alpha, info)
            except Exception as exc:
                self.fail(job, exc)

    def _write_sdl(self, job: Job, model: Any, z: Any, size: tuple[int, int], stored: str, rgb: Any, alpha: Any,
                   info: dict) -> None:  # fmt: skip
        from ._atomic import atomic_write
        from .core.container import write_chunks
        from .pipeline import encode_chunks

        if isinstance(info.get("exif"), Image.Exif):
            info["exif"] = info["exif"].tobytes()
        # The encode path Image.save takes after the encoder (refinement, codec, the prVw preview unless --no-preview).
        chunks = encode_chunks(
            z, model, size=size, mode=stored, alpha=alpha, rgb=rgb, quality=self.args.quality,
            method=self.args.method, refine=self.args.refine, effort=self.args.effort,
            preview=not self.args.no_preview, info=info,
        )  # fmt: skip
        job.dst.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(job.dst) as f:
            write_chunks(f, chunks)
            written = f.tell()
        self.done(job, written)

    # decoding: .sdl -> images

    def decode(self, jobs: list[Job]) -> None:
        bs = self.batch_size()
        for start in range(0, len(jobs), bs):
            self._decode_batch(jobs[start : start + bs])

    def _decode_batch(self, jobs: list[Job]) -> None:
        from .latents import read_latent_file
        from .models import model_for_file
        from .pipeline import decode_batch

        groups: dict[int, tuple[Any, list[tuple[Job, Any]]]] = {}
        for job in jobs:
            try:
                lf = read_latent_file(job.src)
                model = model_for_file(lf.header, self.args.model, device=self.args.device)
            except Exception as exc:
                self.fail(job, exc)
                continue
            groups.setdefault(id(model), (model, []))[1].append((job, lf))
        for model, items in groups.values():
            try:
                rgbs: list[Any] = decode_batch(
                    model, [lf.latents() for _, lf in items], [(lf.header.width, lf.header.height) for _, lf in items],
                    len(items),
                )  # fmt: skip
            except Exception as exc:
                for job, _ in items:
                    self.fail(job, exc)
                continue
            for (job, lf), rgb in zip(items, rgbs, strict=True):
                try:
                    self._write_image(job, lf, rgb)
                except Exception as exc:
                    self.fail(job, exc)

    def _write_image(self, job: Job, lf: Any, rgb: Any) -> None:
        from ._atomic import atomic_write
        from .latents import image_from_rgb

        im = image_from_rgb(lf, rgb)
        fmt = Image.registered_extensions()[job.dst.suffix.lower()]
        params = {k: im.info[k] for k in ("exif", "icc_profile") if im.info.get(k)}
        if self.args.quality is not None:
            params["quality"] = self.args.quality
        job.dst.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(job.dst) as f:
            im.save(f, format=fmt, **params)
            written = f.tell()
        self.done(job, written)


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def summary(stats: Stats, seconds: float) -> str:
    parts = [
        f"{stats.converted} converted, {stats.skipped} skipped"
        + (" (outputs exist; --overwrite replaces them)" if stats.skipped else "")
        + f", {len(stats.failures)} failed"
        + (f" in {seconds:.1f} s ({stats.converted / seconds:.2f} images/s)" if stats.converted and seconds > 0 else "")
    ]
    if stats.converted and stats.bytes_in and stats.bytes_out:
        size = f"{_human(stats.bytes_in)} in, {_human(stats.bytes_out)} out"
        if stats.bytes_out <= stats.bytes_in:
            size += f" ({stats.bytes_in / stats.bytes_out:.1f}:1 smaller)"
        else:
            size += f" ({stats.bytes_out / stats.bytes_in:.1f}x larger)"
        parts.append(size)
    return "sdlatent: " + "; ".join(parts)


def cmd_convert(args: argparse.Namespace) -> int:
    try:
        to = _normalize_to(args.to)
        jobs, errors = collect_jobs(args.sources, args.output, to)
    except ValueError as exc:
        print(f"sdlatent convert: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.ray is not None:  # the same jobs, encoded on a Ray cluster
        try:
            from .ray import cli_convert
        except ImportError as exc:
            print(f"sdlatent convert: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        return cli_convert(args, jobs, errors)
    from tqdm import tqdm

    stats = Stats()
    for name, msg in errors:
        stats.failures.append((name, msg))
        print(f"sdlatent: error: {name}: {msg}", file=sys.stderr)
    todo = []
    for job in jobs:
        if job.dst.exists() and not args.overwrite:
            stats.skipped += 1
        else:
            todo.append(job)
    start = time.perf_counter()
    disable = True if args.quiet else None  # None: a bar only on a terminal
    with tqdm(total=len(todo), unit="img", desc="sdlatent", file=sys.stderr, disable=disable) as bar:
        conv = Converter(args, stats, bar)
        try:
            enc = [j for j in todo if not j.decode]
            dec = [j for j in todo if j.decode]
            if enc:
                conv.encode(enc)
            if dec:
                conv.decode(dec)
        except KeyboardInterrupt:
            bar.close()
            print(summary(stats, time.perf_counter() - start))
            print("sdlatent: interrupted; outputs not yet written were left untouched", file=sys.stderr)
            return EXIT_INTERRUPTED
    print(summary(stats, time.perf_counter() - start))  # each failure was printed once, as it happened
    return EXIT_FAILED if stats.failures else 0


# ---------------------------------------------------------------- bench


def find_benchmark() -> Path | None:
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        candidate = base / "benchmarks" / "rd.py"
        if candidate.is_file():
            return candidate
    return None


def run_benchmark(bench_args: list[str]) -> int:
    script = find_benchmark()
    if script is None:
        print(
            "sdlatent bench: benchmarks/rd.py not found (it ships with the source checkout, not the wheel); "
            "run this from the root of a pillow-sdlatent checkout",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return subprocess.call([sys.executable, str(script), *bench_args])


# ---------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdlatent", description="Images stored as compressed autoencoder latents.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    conv = sub.add_parser(
        "convert",
        help="convert images to .sdl, or .sdl files to PNG/JPEG/...",
        description="Convert files, folders (recursively) and globs: images to .sdl, .sdl to images. Outputs go "
        "next to the inputs, or under -o DIR keeping the folder structure; existing outputs are skipped.",
    )
    conv.add_argument("sources", nargs="+", metavar="SRC", help="file, folder or glob (quote it: 'photos/**/*.jpg')")
    conv.add_argument("-o", "--output", metavar="DIR", help="output folder (or file name, for one input file)")
    conv.add_argument("--to", metavar="EXT", help="output format by suffix: sdl (default for images), png "
                      "(default for .sdl), jpg, webp, ...")  # fmt: skip
    conv.add_argument("-q", "--quality", type=int, metavar="0-100", help="quality (default 75)")
    conv.add_argument("--method", default="auto", choices=METHODS,
                      help="quantizer (default auto)")  # fmt: skip
    conv.add_argument("--model", help="model spec: alias, hub id or folder (default: SDLATENT_MODEL, then the SD VAE)"
                      "; when decoding, overrides the model the file names (its fingerprint must match)")  # fmt: skip
    conv.add_argument("--device", help="cpu, cuda, cuda:N, mps (default: SDLATENT_DEVICE, then the best available)")
    conv.add_argument(
        "--effort",
        type=int,
        metavar="0-9",
        help="how hard the encoder searches through the decoder (default: SDLATENT_EFFORT, else 0: no search; "
        "files decode as fast at every level; seconds per level in docs/refine.md)",
    )
    conv.add_argument(
        "--refine",
        type=int,
        metavar="STEPS",
        help="expert override of the effort's refinement: this many steps through the decoder in one stage "
        "(default: SDLATENT_REFINE, else the effort's; each step costs two to three decodes; see docs/refine.md)",
    )
    conv.add_argument("-b", "--batch-size", type=int, metavar="N",
                      help="images per forward pass (default: 1 on the CPU, 8 on GPUs)")  # fmt: skip
    conv.add_argument("--no-preview", action="store_true", help="leave out the model-free preview chunk (prVw)")
    conv.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    conv.add_argument("--quiet", action="store_true", help="no progress bar")
    ray_opts = conv.add_argument_group("Ray (extra [ray]; see docs/dataset.md)")
    ray_opts.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="encode on Ray Data: RAY_ADDRESS, else the cluster 'ray start' started here, else a new local one; "
        "or the cluster at ADDRESS (auto, ray://host:10001); --batch-size is then images per actor call, each with a "
        "forward pass of its own (the bytes of Image.save); outputs that read back are skipped. Give it after "
        "the sources or as --ray=ADDRESS, else it takes the first source for an address",
    )
    ray_opts.add_argument("--actors", type=int, metavar="N", help="encoder actors (default: one per GPU, else 1)")
    ray_opts.add_argument("--report", metavar="FILE", help="a JSON-lines table of every input: path, output, "
                          "status, error, bytes, seconds")  # fmt: skip
    conv.set_defaults(func=cmd_convert)

    info = sub.add_parser("info", help="show .sdl headers (no model, no torch), or --system")
    info.add_argument("files", nargs="*", metavar="FILE")
    info.add_argument("--system", action="store_true",
                      help="what models run on here (device, precision, backend) and why; imports torch")  # fmt: skip
    info.add_argument("--json", action="store_true", help="a JSON list, one object per file")
    info.set_defaults(func=cmd_info)

    # Listed for --help only: main() hands everything after "bench" to the script unparsed.
    sub.add_parser("bench", help="run the rate-distortion benchmark benchmarks/rd.py with the arguments given")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # everything after it belongs to the benchmark, --help included
        return run_benchmark(argv[1:])
    args = parser.parse_args(argv)
    if getattr(args, "batch_size", None) is not None and args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if getattr(args, "quality", None) is not None and not 0 <= args.quality <= 100:
        parser.error("--quality must be in 0..100")
    if getattr(args, "refine", None) is not None and args.refine < 0:
        parser.error("--refine must be a number of steps >= 0")
    if getattr(args, "effort", None) is not None and not 0 <= args.effort <= 9:
        parser.error("--effort must be in 0..9")
    try:
        status = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the try
        return status
    except KeyboardInterrupt:
        print("sdlatent: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader left (``sdlatent info *.sdl | head -1``): stop quietly, as cat does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's final flush does not fail again
        return EXIT_FAILED
