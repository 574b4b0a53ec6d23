"""torch datasets over .sdl latent caches: a folder, a file list, or WebDataset-style tar shards.

A diffusion trainer encodes its images once (:func:`pillow_sdlatent.latents.encode_images` then
:func:`~pillow_sdlatent.latents.write_latents`) and trains on the stored latents; no autoencoder runs while
it reads. Every sample is the file's latents, a ``(C, h, w)`` float32 tensor in the model's scaled latent
space (:mod:`pillow_sdlatent.latents`), read by :func:`~pillow_sdlatent.latents.read_latents` (model-free).

Sources (``source`` argument of both datasets): a folder (searched recursively for ``*.sdl`` and
``*.tar``), one path, or a sequence of paths; a path ending in ``.tar`` is a shard in WebDataset's layout
(members ``KEY.sdl`` with optional siblings ``KEY.cls``, ``KEY.json``, ...), any other path is one .sdl file.

* :class:`LatentDataset` (map-style): indexes every sample at construction (tar shards by their member
  offsets, without reading the data), so it shuffles with any sampler.
* :class:`LatentIterableDataset`: streams the sources in order; with ``num_workers > 0`` each worker takes
  every ``num_workers``-th source (a shard is read by one worker only), and with ``world_size`` each rank
  takes its share first, so every sample is read exactly once per epoch.

Both are safe with ``num_workers > 0``: a dataset holds paths and offsets only, never an open file, and
each worker process opens its own files.

``metadata=True`` makes a sample ``(latents, meta)``, ``meta`` a dict that ``default_collate`` batches:
``key``, ``source`` (path, or ``shard.tar:member``), ``model_id``, ``fingerprint`` (hex), ``width``,
``height``, ``mode``, ``quantizer``, and each of ``extras`` (sibling members or files, e.g. ``"cls"``) as
bytes (``b""`` where a sample has none).

Importing this module imports torch.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .core.header import Header
from .latents import read_latents

SourceArg = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
Transform = Callable[[torch.Tensor], Any]


@dataclass(frozen=True)
class Sample:
    """Where one sample's bytes are: a file, or ``size`` bytes at ``offset`` of a tar shard."""

    key: str
    path: str
    offset: int = -1  # -1: the whole file at path
    size: int = -1
    member: str = ""
    extras: tuple[tuple[str, int, int], ...] = ()  # tar siblings: (extension, offset, size)

    @property
    def source(self) -> str:
        return f"{self.path}:{self.member}" if self.member else self.path


def _is_shard(path: str) -> bool:
    return path.endswith(".tar")


def expand_sources(source: SourceArg, extension: str = ".sdl") -> list[str]:
    """The files a ``source`` names: a folder's ``*.sdl`` and ``*.tar`` (recursively, sorted), a path, or a
    sequence of paths (kept in order)."""
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    out: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.name.endswith((extension, ".tar")))
            if not found:
                raise FileNotFoundError(f"no {extension} files or .tar shards under {p}")
            out += found
        elif p.is_file():
            out.append(str(p))
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return out


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset's key and extension of a member name: ``a/b/000123.sdl`` -> (``a/b/000123``, ``sdl``)."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (ext if dot else "")


def _shard_members(tf: tarfile.TarFile, path: str, extension: str) -> Iterator[Sample]:
    """The samples of an open tar shard, in member order (a sample ends where the next key starts)."""
    want = extension.lstrip(".")
    key: str | None = None
    main: tarfile.TarInfo | None = None
    extras: list[tuple[str, int, int]] = []

    def flush() -> Sample | None:
        if main is None or key is None:
            return None
        return Sample(key, path, main.offset_data, main.size, main.name, tuple(extras))

    for info in tf:
        if not info.isfile():
            continue
        k, ext = _split_name(info.name)
        if k != key:
            if (s := flush()) is not None:
                yield s
            key, main, extras = k, None, []
        if ext == want:
            main = info
        else:
            extras.append((ext, info.offset_data, info.size))
    if (s := flush()) is not None:
        yield s


def index_shard(path: str, extension: str = ".sdl") -> list[Sample]:
    """Every sample of a tar shard, by member offsets (headers only; no data is read)."""
    with tarfile.open(path, "r:") as tf:
        return list(_shard_members(tf, path, extension))


def _sample_of_file(path: str, extension: str) -> Sample:
    p = Path(path)
    return Sample(p.name[: -len(extension)] if p.name.endswith(extension) else p.stem, str(p))


#: Shards a reader keeps open at once (random access across shards reopens beyond that, oldest first).
OPEN_SHARDS = 16


class _Reader:
    """Reads samples; keeps up to OPEN_SHARDS shards open, only in the process that opened them."""

    def __init__(
        self, metadata: bool, extras: Sequence[str], transform: Transform | None, extension: str,
        dtype: torch.dtype | None,
    ) -> None:  # fmt: skip
        self.metadata = metadata
        self.dtype = dtype
        self.extras = tuple(e.lstrip(".") for e in extras)
        self.transform = transform
        self.extension = extension
        self._pid = os.getpid()
        self._files: dict[str, Any] = {}  # path -> open file, oldest first

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_files"] = {}  # a worker opens its own files
        return state

    def _shard(self, path: str) -> Any:
        if self._pid != os.getpid():  # forked with the parent's handles: never share a file offset
            self._pid, self._files = os.getpid(), {}
        f = self._files.pop(path, None)
        if f is None:
            if len(self._files) >= OPEN_SHARDS:
                self._files.pop(next(iter(self._files))).close()
            f = open(path, "rb")  # noqa: SIM115 (kept open across samples; closed by close() or eviction)
        self._files[path] = f  # most recently used last
        return f

    def close(self) -> None:
        if self._pid == os.getpid():
            for f in self._files.values():
                f.close()
        self._files = {}

    def _bytes(self, path: str, offset: int, size: int) -> bytes:
        f = self._shard(path)
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise EOFError(f"{path}: shard ends inside a member (offset {offset}, {size} bytes)")
        return data

    def read(self, s: Sample) -> Any:
        try:
            if s.offset < 0:
                latents, header = read_latents(s.path, dtype=self.dtype)
            else:
                latents, header = read_latents(io.BytesIO(self._bytes(s.path, s.offset, s.size)), dtype=self.dtype)
        except Exception as exc:
            if hasattr(exc, "add_note"):  # Python 3.11+: the traceback names the sample
                exc.add_note(f"while reading the sample {s.source}")
            raise
        x = self.transform(latents) if self.transform is not None else latents
        if not self.metadata:
            return x
        return x, self._meta(s, header)

    def _meta(self, s: Sample, header: Header) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "key": s.key, "source": s.source, "model_id": header.model_id, "fingerprint": header.fingerprint.hex(),
            "width": header.width, "height": header.height, "mode": header.mode, "quantizer": header.quantizer,
        }  # fmt: skip
        for ext in self.extras:
            meta[ext] = self._extra(s, ext)
        return meta

    def _extra(self, s: Sample, ext: str) -> bytes:
        if s.offset >= 0:
            return next((self._bytes(s.path, o, n) for e, o, n in s.extras if e == ext), b"")
        sibling = Path(s.path).with_name(f"{s.key}.{ext}")
        return sibling.read_bytes() if sibling.is_file() else b""


class LatentDataset(Dataset):
    """Map-style dataset of .sdl latents: ``ds[i]`` is a ``(C, h, w)`` float32 tensor (see the module docstring).

    source: a folder, a path or a sequence of paths (``.sdl`` files and ``.tar`` shards).
    metadata: return ``(latents, meta)`` (module docstring); ``extras``: sibling extensions to add to ``meta``.
    transform: applied to each latent tensor (e.g. a random flip).
    dtype: of the latent tensors (default float32); None: each file's stored dtype (float16 or bfloat16 for
        lossless files of those formats, bit-exact; see :func:`~pillow_sdlatent.latents.read_latents`).
    """

    def __init__(
        self,
        source: SourceArg,
        *,
        metadata: bool = False,
        extras: Sequence[str] = (),
        transform: Transform | None = None,
        extension: str = ".sdl",
        dtype: torch.dtype | None = torch.float32,
    ) -> None:
        self.samples: list[Sample] = []
        for path in expand_sources(source, extension):
            self.samples += index_shard(path, extension) if _is_shard(path) else [_sample_of_file(path, extension)]
        self._reader = _Reader(metadata, extras, transform, extension, dtype)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Any:
        return self._reader.read(self.samples[index])


class LatentIterableDataset(IterableDataset):
    """Streaming dataset of .sdl latents over files and tar shards, split between workers and ranks.

    source, metadata, extras, transform, dtype: as for :class:`LatentDataset`.
    shuffle: shuffle the sources (files and shards, not the samples within a shard) each epoch, with
        ``seed + epoch`` (call :meth:`set_epoch`); every worker and rank draws the same order, so the split
        stays disjoint.
    rank, world_size: this process's share in distributed training (default: all of it); the
        ``num_workers`` of a ``DataLoader`` then split that share.
    A source goes to one worker, so use at least as many shards as ``world_size * num_workers``; a worker
    left without a source yields nothing.
    """

    def __init__(
        self,
        source: SourceArg,
        *,
        metadata: bool = False,
        extras: Sequence[str] = (),
        transform: Transform | None = None,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        extension: str = ".sdl",
        dtype: torch.dtype | None = torch.float32,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..world_size-1, got rank={rank}, world_size={world_size}")
        self.sources = expand_sources(source, extension)
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.rank, self.world_size = rank, world_size
        self.extension = extension
        self._reader = _Reader(metadata, extras, transform, extension, dtype)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose shuffled order :meth:`__iter__` uses (as ``DistributedSampler.set_epoch``)."""
        self.epoch = epoch

    def my_sources(self) -> list[str]:
        """The sources this process (and, inside a DataLoader worker, this worker) reads this epoch."""
        order = list(self.sources)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = [order[i] for i in torch.randperm(len(order), generator=g).tolist()]
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return order[self.rank * workers + worker :: self.world_size * workers]

    def __iter__(self) -> Iterator[Any]:
        try:
            for path in self.my_sources():
                if _is_shard(path):
                    with tarfile.open(path, "r:") as tf:
                        samples = list(_shard_members(tf, path, self.extension))
                    for s in samples:
                        yield self._reader.read(s)
                else:
                    yield self._reader.read(_sample_of_file(path, self.extension))
        finally:
            self._reader.close()


def write_shard(path: str | os.PathLike[str], samples: Sequence[tuple[str, dict[str, bytes]]]) -> None:
    """Write a WebDataset-style tar shard: ``samples`` of ``(key, {extension: bytes})``, e.g.
    ``("000001", {"sdl": sdl_bytes, "cls": b"3"})``, members in that order. Atomic: the shard appears complete
    under its name or not at all (``sdlatent convert --ray --shards`` writes its shards with this too)."""
    from ._atomic import atomic_write

    for key, _ in samples:  # before anything is written
        if "." in key.rpartition("/")[2]:
            raise ValueError(f"a sample key cannot contain a dot (WebDataset splits names there): {key!r}")
    with atomic_write(path) as f, tarfile.open(fileobj=f, mode="w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext.lstrip('.')}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


__all__ = ["LatentDataset", "LatentIterableDataset", "Sample", "expand_sources", "index_shard", "write_shard"]
