"""The latent cache read path: read_latents_batch and the torch datasets over folders, file lists and shards."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pillow_sdlatent import dataset
from pillow_sdlatent.dataset import LatentDataset, LatentIterableDataset, index_shard, write_shard
from pillow_sdlatent.latents import read_latents, read_latents_batch, write_latents

IDENTITY = {"model_id": "test/latent-cache", "fingerprint": bytes(range(16)), "downscale": 8}


def _sdl_bytes(seed: int, shape: tuple[int, int, int] = (4, 8, 12)) -> bytes:
    z = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    buf = io.BytesIO()
    write_latents(buf, z, quality=80, **IDENTITY)
    return buf.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    (root / "sub").mkdir()
    for i in range(7):
        (root / ("sub" if i % 2 else "") / f"{i:03d}.sdl").write_bytes(_sdl_bytes(i))
        (root / ("sub" if i % 2 else "") / f"{i:03d}.cls").write_bytes(str(i % 3).encode())
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("shards")
    paths = []
    for s in range(4):
        keys = [f"{s}{j:02d}" for j in range(3)]
        path = root / f"shard-{s:02d}.tar"
        write_shard(path, [(k, {"sdl": _sdl_bytes(int(k)), "cls": k.encode()}) for k in keys])
        paths.append(path)
    return paths


def _expected(seed: int) -> torch.Tensor:
    return read_latents(io.BytesIO(_sdl_bytes(seed)))[0]


def test_read_latents_batch_stacks_what_read_latents_reads(folder: Path) -> None:
    files = sorted(folder.rglob("*.sdl"))
    batch, headers = read_latents_batch(files)
    assert batch.shape == (7, 4, 8, 12) and batch.dtype == torch.float32
    for i, f in enumerate(files):
        z, h = read_latents(f)
        assert torch.equal(batch[i], z) and headers[i].model_id == h.model_id == IDENTITY["model_id"]


def test_read_latents_batch_names_the_file_of_another_shape(folder: Path, tmp_path: Path) -> None:
    odd = tmp_path / "odd.sdl"
    odd.write_bytes(_sdl_bytes(99, (4, 8, 8)))
    files = [*sorted(folder.rglob("*.sdl"))[:2], odd]
    with pytest.raises(ValueError, match=r"odd\.sdl.*stack=False"):
        read_latents_batch(files)
    lst, _ = read_latents_batch(files, stack=False)
    assert [tuple(z.shape) for z in lst] == [(4, 8, 12), (4, 8, 12), (4, 8, 8)]


def test_map_dataset_over_a_folder_with_workers(folder: Path) -> None:
    ds = LatentDataset(folder, metadata=True, extras=("cls",))
    assert len(ds) == 7
    loader = DataLoader(ds, batch_size=3, num_workers=2, shuffle=False)
    batches = list(loader)
    z = torch.cat([b[0] for b in batches])
    keys = [k for b in batches for k in b[1]["key"]]
    assert keys == [s.key for s in ds.samples]
    for i, key in enumerate(keys):
        assert torch.equal(z[i], _expected(int(key)))
    cls = [c for b in batches for c in b[1]["cls"]]
    assert cls == [str(int(k) % 3).encode() for k in keys]
    assert batches[0][1]["width"].tolist() == [96] * 3  # header fields collate to tensors


def test_map_dataset_over_shards_and_files(shards: list[Path], folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dataset, "OPEN_SHARDS", 2)  # random access across 4 shards evicts open handles
    files = sorted(folder.rglob("*.sdl"))[:2]
    ds = LatentDataset([*shards, *files], metadata=True, extras=("cls",))
    assert len(ds) == 4 * 3 + 2
    order = [11, 2, 0, 13, 5]  # random access, across shards
    for i in order:
        z, meta = ds[i]
        assert torch.equal(z, _expected(int(meta["key"])))
        if i < 12:
            assert meta["cls"] == meta["key"].encode() and meta["source"].endswith(f"{meta['key']}.sdl")
    assert len(ds._reader._files) <= 2
    assert [s.key for s in index_shard(str(shards[1]))] == ["100", "101", "102"]


@pytest.mark.parametrize("workers", [0, 2])
def test_iterable_dataset_reads_every_sample_once(shards: list[Path], workers: int) -> None:
    ds = LatentIterableDataset(shards, metadata=True, extras=("cls",), shuffle=True, seed=4)
    seen: list[str] = []
    for z, meta in DataLoader(ds, batch_size=2, num_workers=workers):
        for j, key in enumerate(meta["key"]):
            assert torch.equal(z[j], _expected(int(key)))
            assert meta["cls"][j] == key.encode()
        seen += meta["key"]
    assert sorted(seen) == sorted(f"{s}{j:02d}" for s in range(4) for j in range(3))


def test_iterable_dataset_ranks_split_the_sources(folder: Path) -> None:
    parts = [LatentIterableDataset(folder, shuffle=True, seed=1, rank=r, world_size=3) for r in range(3)]
    for ds in parts:
        ds.set_epoch(2)
    mine = [ds.my_sources() for ds in parts]
    assert sorted(p for m in mine for p in m) == sorted(str(f) for f in folder.rglob("*.sdl")) and all(mine)
    assert sum(len(list(ds)) for ds in parts) == 7
    with pytest.raises(ValueError, match="rank"):
        LatentIterableDataset(folder, rank=3, world_size=3)


def test_a_corrupt_sample_names_itself(tmp_path: Path) -> None:
    data = bytearray(_sdl_bytes(1))
    data[-20] ^= 0xFF
    (tmp_path / "bad.sdl").write_bytes(bytes(data))
    ds = LatentDataset(tmp_path)
    with pytest.raises(ValueError) as info:
        ds[0]
    assert "bad.sdl" in "".join(getattr(info.value, "__notes__", [str(info.value)]))


def test_missing_source_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        LatentDataset(tmp_path / "nothing-here")
    with pytest.raises(FileNotFoundError, match=r"no \.sdl files"):
        LatentDataset(tmp_path)


def test_shards_of_webdatasets_writer_read_back(tmp_path: Path) -> None:
    """The shards pillow_sdlatent.ray writes (webdataset.TarWriter, keys with folders, a json sibling)."""
    webdataset = pytest.importorskip("webdataset")
    path = tmp_path / "ray.tar"
    with open(path, "wb") as f:
        writer = webdataset.TarWriter(f)
        for seed in (5, 6):
            writer.write({"__key__": f"photos/2024/img_{seed}", "sdl": _sdl_bytes(seed), "json": {"seed": seed}})
        writer.close()
    got = list(LatentIterableDataset(path, metadata=True, extras=("json",)))
    assert [m["key"] for _, m in got] == ["photos/2024/img_5", "photos/2024/img_6"]
    for seed, (z, meta) in zip((5, 6), got, strict=True):
        assert torch.equal(z, _expected(seed)) and b'"seed"' in meta["json"]
