"""Hostile files: a file never chooses what is downloaded or loaded, and costs what its size justifies."""

from __future__ import annotations

import io
import shutil
import socket
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pillow_sdlatent
from pillow_sdlatent import options
from pillow_sdlatent.core.settings import QuantSettings
from pillow_sdlatent.errors import DecodeBudgetError, ModelLoadError, ModelMismatchError, ModelNotFoundError
from pillow_sdlatent.testing import build_file, forge_head

MiB = 1 << 20


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every outgoing connection attempt recorded and refused (the hub included)."""
    attempts: list = []

    def refuse(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the package itself must not need it
    return attempts


@pytest.fixture
def tiny(tmp_path: Path) -> bytes:
    return build_file(32, 24, "RGB", 4, QuantSettings("transform", coder="transform", quality=60), 1)


def _load(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as im:
        im.load()


@pytest.mark.usefixtures("no_model")
def test_an_unknown_model_id_never_reaches_the_network(tiny: bytes, no_network: list) -> None:
    data = forge_head(tiny, b"attacker-org/tracking-pixel")
    with pytest.raises(ModelNotFoundError):  # the first load imports torch and diffusers: not timed
        _load(forge_head(tiny, b"attacker-org/warm-up"))
    t0 = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="ALLOW_DOWNLOAD") as err:
        _load(data)
    assert time.perf_counter() - t0 < 2.0 and no_network == []
    assert "attacker-org/tracking-pixel" in str(err.value) and "Tried" in str(err.value)


@pytest.mark.usefixtures("no_model")
def test_a_known_model_downloads_only_where_the_hub_answers(tiny: bytes, no_network: list) -> None:
    from pillow_sdlatent.models import registry

    registry._reachable.clear()
    assert registry.download_allowed("stabilityai/sd-vae-ft-mse") is False  # the probe found no hub
    assert list(registry._reachable.values()) == [False] and len(no_network) <= 1  # one probe, remembered
    attempts = len(no_network)
    with pytest.raises(ModelNotFoundError):  # imports torch and diffusers: not timed
        _load(forge_head(tiny, b"attacker-org/warm-up"))
    t0 = time.perf_counter()
    with pytest.raises(ModelNotFoundError):
        _load(forge_head(tiny, b"stabilityai/sd-vae-ft-mse"))
    assert time.perf_counter() - t0 < 2.0 and len(no_network) == attempts
    assert registry.download_allowed("attacker-org/x") is False
    options.ALLOW_DOWNLOAD = True
    try:
        assert registry.download_allowed("attacker-org/x") is False  # opted in, but still no hub here
    finally:
        options.ALLOW_DOWNLOAD = None
    registry._reachable.clear()


@pytest.mark.usefixtures("no_model")
def test_a_file_never_names_a_path_to_load(tiny: bytes, taesd_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "models" / "taesd"
    shutil.copytree(taesd_dir, folder)
    for model_id in (str(folder), f"{tmp_path}/models/../models/taesd", "~/taesd"):
        with pytest.raises(ModelNotFoundError, match="not available"):
            _load(forge_head(tiny, model_id.encode()))
    # the same weights under the file's id in a folder the user names are found
    options.MODEL_PATH = str(tmp_path / "models")
    try:
        with pytest.raises(ModelMismatchError, match=r"fingerprint|weights"):  # build_file's fingerprint is fake
            _load(forge_head(tiny, b"taesd"))
    finally:
        options.MODEL_PATH = None


def test_every_refusal_comes_before_a_latent_is_decoded(taesd_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 256 channels at factor 8 are a valid header; the model has 4: refused before LDAT is read.
    data = build_file(64, 64, "RGB", 256, QuantSettings("scalar", 16), 2, model_id="taesd")
    from pillow_sdlatent.core import codec

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("latents were decoded before the model was checked")

    monkeypatch.setattr(codec, "read_body", no_decoding)
    with Image.open(io.BytesIO(data)) as im:
        im.decoder_options["model"] = str(taesd_dir)
        with pytest.raises(ModelMismatchError, match="256"):
            im.load()


def test_decode_budget_refuses_before_any_work(tiny: bytes) -> None:
    data = forge_head(tiny, width=2048, height=2048)  # a legal header; decoding it costs 4 Mpx of TAESD
    options.DECODE_BUDGET = 1_000_000
    try:
        tracemalloc.start()
        with pytest.raises(DecodeBudgetError, match="decode budget of 1000000"):
            Image.open(io.BytesIO(data))
        with pytest.raises(Image.DecompressionBombError):  # what image tools already catch
            pillow_sdlatent.read_latents(io.BytesIO(data))
        assert tracemalloc.get_traced_memory()[1] < MiB
    finally:
        tracemalloc.stop()
        options.DECODE_BUDGET = None
    # the default budget passes a 50 Mpx photo's header (8688x5792), and 0 turns it off
    with Image.open(io.BytesIO(forge_head(tiny, width=8688, height=5792))) as im:
        assert im.size == (8688, 5792)
    options.DECODE_BUDGET = 0
    try:
        Image.open(io.BytesIO(forge_head(tiny, width=9000, height=9000))).close()
    finally:
        options.DECODE_BUDGET = None


def test_read_latents_honours_max_image_pixels(tiny: bytes) -> None:
    data = forge_head(tiny, width=32768, height=32768)
    with pytest.raises(Image.DecompressionBombError):
        pillow_sdlatent.read_latents(io.BytesIO(data))


def test_budget_from_the_environment(tiny: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDLATENT_DECODE_BUDGET", "500000")
    with pytest.raises(DecodeBudgetError, match="500000"):
        Image.open(io.BytesIO(forge_head(tiny, width=1024, height=1024)))
    monkeypatch.setenv("SDLATENT_DECODE_BUDGET", "lots")
    with pytest.raises(ValueError, match="SDLATENT_DECODE_BUDGET"):
        Image.open(io.BytesIO(tiny))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other-net"])
def test_bad_weight_files_name_their_path(taesd_dir: Path, tmp_path: Path, damage: str) -> None:
    from pillow_sdlatent.models import clear_cache, load_model

    folder = tmp_path / "taesd"
    shutil.copytree(taesd_dir, folder)
    decoder = next(folder.glob("*_decoder.*"))
    if damage == "garbage":
        decoder.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "truncated":
        decoder.write_bytes(decoder.read_bytes()[:1000])
    else:  # an encoder where the decoder belongs
        shutil.copy(next(folder.glob("*_encoder.*")), decoder)
    clear_cache()
    with pytest.raises(ModelLoadError, match=str(decoder.name)) as err:
        load_model(str(folder), "cpu")
    assert "TAESD-family" in str(err.value)
    clear_cache()
