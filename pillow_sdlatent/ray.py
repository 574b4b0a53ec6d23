"""Dataset conversion on Ray Data: many images to ``.sdl`` on one machine or a cluster (extra ``[ray]``).

Four stages stream into each other, each row carrying its own ``status`` so that a bad image never stops
the job:

1. **read** (Ray tasks on CPU workers): skip rows whose output already exists and reads back (resume),
   read the file unless the row carries its ``bytes``, decode it with Pillow into RGB pixels, alpha and
   metadata (``pipeline.split_image``, as ``Image.save`` and ``sdlatent convert`` read an image);
2. **encode** (:class:`SdlEncoder` actors, one model each; ``num_gpus=1`` on GPU clusters): the latents
   (``pipeline.encode_batch``, as ``sdlatent convert`` makes them);
3. **code** (tasks, CPU): the rest of the one encode path, ``pipeline.encode_chunks`` (quantization, rate
   control, coding, the preview chunk), so that a GPU actor never waits for it; when the options refine,
   which needs the model, the actor runs ``encode_chunks`` itself;
4. **write** (tasks, :func:`convert`): each ``.sdl`` written atomically, optionally WebDataset tar shards.

With the same model, device and options the bytes are those of ``Image.save`` (and of ``sdlatent convert
-b 1``): every image has a forward pass of its own unless ``forward_batch`` says otherwise.
:func:`encode_dataset` is stages 1-3 (a Dataset of image bytes or paths in, ``.sdl`` bytes out);
:func:`convert` runs all four for input files and returns a :class:`Report` (and writes a JSON-lines
table of every row). See docs/dataset.md for a multi-node recipe.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

try:
    import ray
    import ray.data
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"pillow_sdlatent.ray needs Ray Data: pip install 'pillow-sdlatent[ray]' ({exc})") from exc

OK, SKIPPED, ERROR = "ok", "skipped", "error"
#: Columns of every row :func:`convert` reports (and writes to its JSON-lines table).
REPORT_COLUMNS = ("path", "output", "status", "error", "bytes", "seconds", "shard", "input_bytes")
_META = ("exif", "icc_profile", "xmp")


@dataclass
class EncodeOptions:
    """What decides the bytes of a file: the save options of ``Image.save(..., "SDL")`` (and ``sdlatent convert``)."""

    model: str | None = None  # None: options.MODEL / SDLATENT_MODEL on the driver, then the SD VAE
    device: str | None = None  # None: options.DEVICE / SDLATENT_DEVICE on the driver, then each worker's best
    dtype: str | None = None  # None: options.DTYPE / SDLATENT_DTYPE on the driver, then the device's default
    quality: int | None = None
    method: str = "auto"
    dither: float | None = None
    palette_size: int | None = None
    target_size: int | None = None  # a byte budget per file instead of quality (rate control)
    target_bpp: float | None = None
    refine: int | None = None  # None: options.REFINE / SDLATENT_REFINE on the driver, then 0
    preview: bool = True

    def resolved(self) -> EncodeOptions:
        """The settings and environment of the driver applied, so that every worker of a cluster uses the
        same; the save options checked (before any worker starts)."""
        from . import options
        from .models.registry import default_spec
        from .pipeline import check_choice, refine_steps

        budget = 1 if self.target_size is not None or self.target_bpp is not None else None
        check_choice(self.quality, self.method, self.dither, self.palette_size, None, budget)
        return replace(self, model=self.model or default_spec(), device=options.resolve("DEVICE", self.device),
                       dtype=options.resolve("DTYPE", self.dtype), refine=refine_steps(self.refine))  # fmt: skip

    def save_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`pillow_sdlatent.pipeline.encode_chunks`."""
        keys = ("quality", "method", "dither", "palette_size", "target_size", "target_bpp", "refine", "preview")
        return {k: getattr(self, k) for k in keys}


def _describe(exc: BaseException) -> str:
    from .cli import _describe as describe

    return describe(exc)


def _column(batch: dict[str, np.ndarray], name: str, n: int, default: Any) -> np.ndarray:
    return batch[name] if name in batch else np.array([default] * n, dtype=object)


def _objects(values: Iterable[Any]) -> np.ndarray:
    items = list(values)
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def reads_back(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a complete .sdl file: every chunk and CRC read and the latents decoded (no model)."""
    from .latents import read_latent_file

    try:
        read_latent_file(Path(path))
    except Exception:
        return False
    return True


def _metadata(value: Any) -> bytes:
    from PIL import Image

    return value.tobytes() if isinstance(value, Image.Exif) else bytes(value or b"")


def _read_batch(batch: dict[str, np.ndarray], skip_existing: bool) -> dict[str, np.ndarray]:
    """Stage 1: resume check and image decoding, one row at a time; a failure is the row's status."""
    from PIL import Image

    from .core.container import SIGNATURE
    from .pipeline import split_image

    paths = batch["path"]
    n = len(paths)
    dsts = _column(batch, "dst", n, "")
    datas = _column(batch, "bytes", n, None)
    cols: dict[str, list[Any]] = {k: [] for k in ("status", "error", "width", "height", "mode", "rgb", "alpha",
                                                   *_META, "seconds", "input_bytes")}  # fmt: skip
    for path, dst, data in zip(paths, dsts, datas, strict=True):
        t0 = time.perf_counter()
        row: dict[str, Any] = {"status": OK, "error": "", "width": 0, "height": 0, "mode": "", "rgb": b"",
                               "alpha": b"", **dict.fromkeys(_META, b""), "input_bytes": 0}  # fmt: skip
        if skip_existing and dst and os.path.exists(dst) and reads_back(dst):
            row["status"] = SKIPPED
        else:
            try:
                if data is None:
                    data = Path(path).read_bytes()
                source = io.BytesIO(bytes(data))
                row["input_bytes"] = len(source.getbuffer())
                if source.getbuffer()[:8] == SIGNATURE:  # never a model decode in a read task
                    raise ValueError("is already .sdl (to re-encode, decode it to PNG first)")
                with Image.open(source) as im:
                    im.load()
                    stored, rgb, alpha = split_image(im)  # as Image.save and sdlatent convert read it
                    row.update({k: _metadata(im.info.get(k)) for k in _META})
                row.update(width=im.width, height=im.height, mode=stored, rgb=rgb.tobytes(),
                           alpha=b"" if alpha is None else alpha.tobytes())  # fmt: skip
            except Exception as exc:
                row.update(status=ERROR, error=f"cannot read image: {_describe(exc)}")
        row["seconds"] = time.perf_counter() - t0
        for k, v in row.items():
            cols[k].append(v)
    out = {k: v for k, v in batch.items() if k != "bytes"}
    numbers = {"width": np.int64, "height": np.int64, "input_bytes": np.int64, "seconds": np.float64}
    out.update({k: np.array(v, numbers[k]) if k in numbers else _objects(v) for k, v in cols.items()})
    return out


def _image(batch: dict[str, np.ndarray], i: int) -> dict[str, Any]:
    """Row ``i``'s decoded image as the keyword arguments of :func:`pillow_sdlatent.pipeline.encode_chunks`."""
    w, h = int(batch["width"][i]), int(batch["height"][i])
    alpha = batch["alpha"][i]
    rgb = np.frombuffer(batch["rgb"][i], np.uint8).reshape(h, w, 3)
    return {"size": (w, h), "mode": str(batch["mode"][i]), "rgb": rgb,
            "alpha": np.frombuffer(alpha, np.uint8).reshape(h, w) if len(alpha) else None,
            "info": {k: bytes(batch[k][i]) for k in _META if len(batch[k][i])}}  # fmt: skip


class SdlEncoder:
    """Stage 2, a Ray Data actor: one model loaded once; the latents of each decoded row (``encode_batch``,
    as ``sdlatent convert`` makes them), left to the CPU tasks after it to code, or, when the options
    refine (which needs the model), the whole file here (``encode_chunks``).

    ``threads``: torch's intra-op threads (CPU actors; default: what Ray gives the actor, at least 1).
    """

    def __init__(self, options: EncodeOptions, forward_batch: int = 1, threads: int | None = None) -> None:
        import torch

        from .models import load_model
        from .pipeline import ModelIdentity, settings_chooser

        threads = threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or None
        if threads:
            torch.set_num_threads(threads)
        self.options = options
        self.forward_batch = forward_batch
        self.model = load_model(options.model, options.device, options.dtype)
        self.identity = pickle.dumps(ModelIdentity(self.model.model_id, self.model.fingerprint, self.model.downscale))
        budget = 1 if options.target_size is not None or options.target_bpp is not None else None
        # Options that need the latent channel count to check: bad ones stop the actor before any row.
        settings_chooser(self.model.latent_channels, options.quality, options.method, options.dither,
                         options.palette_size, None, budget)  # fmt: skip

    def _latents(self, images: list[np.ndarray]) -> list[np.ndarray | Exception]:
        from .pipeline import encode_each

        return encode_each(self.model, images, self.forward_batch)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from .pipeline import encode_chunks, file_bytes

        n = len(batch["path"])
        status, error = list(batch["status"]), list(batch["error"])
        seconds = np.array(batch["seconds"], np.float64)
        todo = [i for i in range(n) if status[i] == OK]
        latents, sdl = [b""] * n, [b""] * n
        shapes = np.zeros((n, 3), np.int64)
        t0 = time.perf_counter()
        images = {i: _image(batch, i) for i in todo}
        results = self._latents([images[i]["rgb"] for i in todo])
        for i, z in zip(todo, results, strict=True):
            try:
                if isinstance(z, Exception):
                    raise z
                if self.options.refine:
                    sdl[i] = file_bytes(encode_chunks(z, self.model, **images[i], **self.options.save_options()))
                else:
                    latents[i], shapes[i] = np.ascontiguousarray(z, np.float32).tobytes(), z.shape
            except Exception as exc:
                status[i], error[i] = ERROR, f"cannot encode: {_describe(exc)}"
        share = (time.perf_counter() - t0) / max(len(todo), 1)
        seconds[todo] += share
        out = dict(batch)
        out.update(status=_objects(status), error=_objects(error), seconds=seconds, latents=_objects(latents),
                   latent_c=shapes[:, 0], latent_h=shapes[:, 1], latent_w=shapes[:, 2], sdl=_objects(sdl),
                   model_identity=_objects([self.identity] * n))  # fmt: skip
        return out


def _code_batch(batch: dict[str, np.ndarray], options: EncodeOptions) -> dict[str, np.ndarray]:
    """Stage 3 (CPU tasks): each row's latents through the rest of the encode path (``encode_chunks``:
    quantization, rate control, coding, the preview chunk) into the .sdl file's bytes."""
    from .pipeline import encode_chunks, file_bytes

    n = len(batch["path"])
    status, error = list(batch["status"]), list(batch["error"])
    seconds = np.array(batch["seconds"], np.float64)
    sdl = list(batch["sdl"])
    for i in range(n):
        if status[i] != OK or len(sdl[i]):  # failed, skipped, or coded by the actor already
            continue
        t0 = time.perf_counter()
        try:
            shape = (int(batch["latent_c"][i]), int(batch["latent_h"][i]), int(batch["latent_w"][i]))
            z = np.frombuffer(batch["latents"][i], np.float32).reshape(shape)
            identity = pickle.loads(batch["model_identity"][i])  # made by SdlEncoder of this job, never a file's
            sdl[i] = file_bytes(encode_chunks(z, identity, **_image(batch, i), **options.save_options()))
        except Exception as exc:
            status[i], error[i] = ERROR, f"cannot encode: {_describe(exc)}"
        seconds[i] += time.perf_counter() - t0
    drop = {"rgb", "alpha", "width", "height", "mode", *_META, "latents", "latent_c", "latent_h", "latent_w",
            "model_identity"}  # fmt: skip
    out = {k: v for k, v in batch.items() if k not in drop}
    out.update(status=_objects(status), error=_objects(error), sdl=_objects([bytes(b) for b in sdl]),
               bytes=np.array([len(b) for b in sdl], np.int64), seconds=seconds)  # fmt: skip
    return out


def encode_dataset(
    ds: ray.data.Dataset,
    options: EncodeOptions | None = None,
    *,
    concurrency: int = 1,
    batch_size: int = 8,
    num_gpus: float = 0,
    num_cpus: float = 1,
    read_cpus: float = 1,
    forward_batch: int = 1,
    skip_existing: bool = False,
) -> ray.data.Dataset:
    """``.sdl`` bytes of every image of ``ds``, each row with its status (lazy, like every Ray Dataset).

    ``ds``: rows with ``path`` (str) and ``bytes`` (the image file), or ``path`` alone (then read from
    there: a path every worker sees), as ``ray.data.read_binary_files(..., include_paths=True)`` gives; a
    ``dst`` column, with ``skip_existing``, marks rows whose output exists and reads back ``skipped``.
    Returns the other input columns plus ``status`` (``ok``, ``skipped`` or ``error``), ``error`` (the
    message), ``sdl`` (the file's bytes; empty unless ok), ``bytes`` (its size) and ``seconds`` (decode
    time plus the row's share of its batch's encode time).

    ``concurrency`` encoder actors, each holding one model and taking ``batch_size`` rows a call, with
    ``num_gpus`` GPUs (1 on a GPU cluster; 0: CPU actors) and ``num_cpus`` CPUs (torch threads of a CPU
    actor); images are decoded, and latents coded, by Ray tasks of ``read_cpus`` CPUs. ``forward_batch``
    equal-size images share a forward pass: 1 (the default) gives ``Image.save``'s bytes exactly; more is
    faster on GPUs, but batched passes may round the last float bits differently, so the files may differ
    from ``Image.save``'s (they are as valid and as good). An actor that dies (a node lost, the OOM killer) is
    replaced and its batches retried: Ray Data's default for actor pools (``max_restarts=-1``,
    ``max_task_retries=-1``).
    """
    if concurrency < 1 or batch_size < 1 or forward_batch < 1:
        raise ValueError("concurrency, batch_size and forward_batch must be at least 1")
    options = (options or EncodeOptions()).resolved()
    read = ds.map_batches(_read_batch, fn_kwargs={"skip_existing": skip_existing}, batch_format="numpy",
                          batch_size=batch_size, num_cpus=read_cpus)  # fmt: skip
    encoded = read.map_batches(
        SdlEncoder,
        fn_constructor_kwargs={"options": options, "forward_batch": forward_batch,
                               "threads": max(1, int(num_cpus)) if not num_gpus else None},
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        batch_size=batch_size,
        batch_format="numpy",
        num_gpus=num_gpus or None,
        num_cpus=num_cpus,
    )  # fmt: skip
    return encoded.map_batches(_code_batch, fn_kwargs={"options": options}, batch_format="numpy",
                               batch_size=batch_size, num_cpus=read_cpus)  # fmt: skip


def shard_key(name: str) -> str:
    """A WebDataset key for an output name: the path without its suffix, its other dots made ``_``
    (WebDataset splits a member's name at the first dot of its base name)."""
    p = Path(name).with_suffix("")
    return (p.parent / p.name.replace(".", "_")).as_posix()


def _write_batch(batch: dict[str, np.ndarray], shards: str | None) -> dict[str, np.ndarray]:
    """Stage 3: each ok row's .sdl written atomically (and the batch's ok rows as one tar shard)."""
    from ._atomic import write_bytes_atomic

    n = len(batch["path"])
    status, error = list(batch["status"]), list(batch["error"])
    dsts = _column(batch, "dst", n, "")
    names = _column(batch, "name", n, "")
    shard_rows = []
    for i in range(n):
        if status[i] != OK:
            continue
        try:
            if dsts[i]:
                Path(dsts[i]).parent.mkdir(parents=True, exist_ok=True)
                write_bytes_atomic(dsts[i], bytes(batch["sdl"][i]))
            if shards:
                shard_rows.append(i)
        except Exception as exc:
            status[i], error[i] = ERROR, f"cannot write: {_describe(exc)}"
    shard_of = [""] * n
    if shard_rows:
        from .dataset import write_shard

        keys = [shard_key(str(names[i] or batch["path"][i])) for i in shard_rows]
        target = Path(shards) / (hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16] + ".tar")  # type: ignore[arg-type]
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            meta = [json.dumps({"path": str(batch["path"][i]), "name": str(names[i])}).encode() for i in shard_rows]
            write_shard(target, [(key, {"sdl": bytes(batch["sdl"][i]), "json": m})
                                 for i, key, m in zip(shard_rows, keys, meta, strict=True)])  # fmt: skip
            for i in shard_rows:
                shard_of[i] = str(target)
        except Exception as exc:
            for i in shard_rows:
                status[i], error[i] = ERROR, f"cannot write shard {target}: {_describe(exc)}"
    return {"path": batch["path"], "output": _objects(dsts), "status": _objects(status), "error": _objects(error),
            "bytes": batch["bytes"], "seconds": batch["seconds"], "shard": _objects(shard_of),
            "input_bytes": batch["input_bytes"]}  # fmt: skip


@dataclass
class Report:
    """The outcome of :func:`convert`: counts, and the rows that failed (``path``, ``error``)."""

    converted: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    bytes_in: int = 0  # of the converted inputs
    bytes_out: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures


def convert(
    jobs: Iterable[tuple[str | os.PathLike[str], str | os.PathLike[str]]],
    options: EncodeOptions | None = None,
    *,
    report: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    shards: str | os.PathLike[str] | None = None,
    output_root: str | os.PathLike[str] | None = None,
    **encode_args: Any,
) -> Report:
    """Encode ``jobs`` (input file, output .sdl path) on the Ray cluster ``ray.init`` connected to.

    An output that exists and reads back is skipped (resume) unless ``overwrite``; each .sdl is written
    atomically (a killed job leaves whole files or none). ``report``: a JSON-lines table of every row
    (:data:`REPORT_COLUMNS`); a row lost with a block that failed past its retries is reported as an
    error. ``shards``: a folder that also gets the converted files as WebDataset tar shards (one a batch,
    keys from the output's path relative to ``output_root``). ``encode_args``: those of :func:`encode_dataset`.
    """
    jobs = [(str(src), str(dst)) for src, dst in jobs]
    rows = []
    for src, dst in jobs:
        name = os.path.relpath(dst, output_root) if output_root else src
        rows.append({"path": src, "dst": dst, "name": Path(name).as_posix()})
    out = Report()
    start = time.perf_counter()
    if not rows:
        return out
    batch_size = encode_args.get("batch_size", 8)
    ctx = ray.data.DataContext.get_current()
    ctx.max_errored_blocks = -1  # rows carry their errors; a block lost past its retries is reported below
    # Blocks of about a batch, at least two per actor (each actor busy), at most 1000 (the driver's bookkeeping).
    blocks = max(min(math.ceil(len(rows) / batch_size), 1000), min(len(rows), 2 * encode_args.get("concurrency", 1)))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    encoded = encode_dataset(ds, options, skip_existing=not overwrite, **encode_args)
    written = encoded.map_batches(_write_batch, fn_kwargs={"shards": str(shards) if shards else None},
                                  batch_format="numpy", batch_size=batch_size,
                                  num_cpus=encode_args.get("read_cpus", 1))  # fmt: skip
    seen: set[str] = set()
    with open(report, "w", encoding="utf-8") if report else _NullFile() as table:
        for row in _rows(written):
            _count(out, row)
            seen.add(row["path"])
            table.write(json.dumps(row) + "\n")
        for src, dst in jobs:
            if src not in seen:
                lost = "lost: its block failed past its retries (see the Ray log)"
                row = {"path": src, "output": dst, "status": ERROR, "error": lost, "bytes": 0, "seconds": 0.0,
                       "shard": "", "input_bytes": 0}  # fmt: skip
                _count(out, row)
                table.write(json.dumps(row) + "\n")
    out.seconds = time.perf_counter() - start
    return out


def _rows(ds: ray.data.Dataset) -> Iterable[dict[str, Any]]:
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for i in range(len(batch["path"])):
            yield {k: (v[i].item() if isinstance(v[i], np.generic) else v[i]) for k, v in batch.items()}


def _count(out: Report, row: dict[str, Any]) -> None:
    if row["status"] == OK:
        out.converted += 1
        out.bytes_in += int(row["input_bytes"])
        out.bytes_out += int(row["bytes"])
    elif row["status"] == SKIPPED:
        out.skipped += 1
    else:
        out.failures.append((row["path"], row["error"]))


def actor_resources(actors: int | None = None) -> dict[str, Any]:
    """``concurrency``, ``num_gpus`` and ``num_cpus`` of :func:`encode_dataset` for the connected cluster.

    With GPUs: ``actors`` (default: one per GPU) of one GPU each. Without: ``actors`` (default 1) CPU actors
    sharing the cluster's CPUs but one, which is left to the reading and writing tasks.
    """
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    actors = actors or max(gpus, 1)
    if gpus:
        return {"concurrency": actors, "num_gpus": 1, "num_cpus": 1.0}
    return {"concurrency": actors, "num_gpus": 0, "num_cpus": max(0.25, (cpus - 1) / actors)}


def cli_convert(args: Any, jobs: list[Any], errors: list[tuple[str, str]]) -> int:
    """``sdlatent convert --ray [ADDRESS]``: the jobs and errors of :func:`pillow_sdlatent.cli.collect_jobs`."""
    from . import cli

    stats = cli.Stats(failures=list(errors))
    msg = "--ray encodes images to .sdl; convert .sdl files to images without --ray"
    stats.failures += [(str(job.src), msg) for job in jobs if job.decode]
    for name, why in stats.failures:  # each failure is printed once: these now, the job's at its end
        print(f"sdlatent: error: {name}: {why}", file=sys.stderr)
    todo = [(job.src, job.dst) for job in jobs if not job.decode]
    options = EncodeOptions(model=args.model, device=args.device, quality=args.quality, method=args.method,
                            refine=args.refine, preview=not args.no_preview)  # fmt: skip
    start = time.perf_counter()
    address = None if args.ray == "local" else args.ray  # None: RAY_ADDRESS, this machine's cluster, or a new one
    connected = ray.is_initialized()  # called from a program that has its cluster: use it, leave it up
    if not connected:
        ray.init(address=address, include_dashboard=False, logging_level="WARNING" if args.quiet else "INFO")
    try:
        ray.data.DataContext.get_current().enable_progress_bars = not args.quiet
        result = convert(todo, options, report=args.report, overwrite=args.overwrite, output_root=args.output,
                         batch_size=args.batch_size or 8, **actor_resources(args.actors))  # fmt: skip
    except Exception as exc:
        print(f"sdlatent convert --ray: error: {_describe(exc)}", file=sys.stderr)
        return cli.EXIT_FAILED
    finally:
        if not connected:
            ray.shutdown()  # stops the cluster if this process started it, else disconnects
    stats.converted, stats.skipped = result.converted, result.skipped
    stats.bytes_in, stats.bytes_out = result.bytes_in, result.bytes_out
    stats.failures += result.failures
    for name, why in result.failures:
        print(f"sdlatent: error: {name}: {why}", file=sys.stderr)
    print(cli.summary(stats, time.perf_counter() - start))
    return cli.EXIT_FAILED if stats.failures else 0


class _NullFile(io.StringIO):
    def write(self, s: str) -> int:
        return len(s)


__all__ = ["REPORT_COLUMNS", "EncodeOptions", "Report", "SdlEncoder", "actor_resources", "cli_convert", "convert",
           "encode_dataset", "reads_back", "shard_key"]  # fmt: skip
