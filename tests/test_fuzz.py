"""Short fuzzing runs (hypothesis) of the reader; the long run is benchmarks/fuzz.py.

Every mutated input must give a consistent result or one of the documented
exceptions, within 2 s and without large allocations; inputs that once broke
the reader live in tests/regressions/ and are replayed here.
"""

from __future__ import annotations

import io
import os
import random
import struct
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pillow_sdlatent.testing import (
    MUTATORS,
    TARGETS,
    Crash,
    model_seeds,
    run_one,
    seed_files,
    warm_decoder,
    warm_hub_stack,
)

REGRESSIONS = Path(__file__).parent / "regressions"

#: Examples per hypothesis test; raise it for a longer local run (SDL_FUZZ_EXAMPLES=5000).
EXAMPLES = int(os.environ.get("SDL_FUZZ_EXAMPLES", "300"))

#: Any single small input decoding past this much traced memory allocated from declared sizes.
PEAK_LIMIT = 256 << 20

SEEDS = seed_files()
warm_decoder()  # a fresh checkout compiles the numba decoder (seconds): not inside a case's 2 s limit
MODEL_FREE = ("reader", "pillow", "tolerant")

steps = st.lists(st.tuples(st.integers(0, len(MUTATORS) - 1), st.integers(0, 2**32 - 1)), min_size=1, max_size=4)


def apply(data: bytes, ops: list[tuple[int, int]]) -> bytes:
    """Mutators by index, each with its own seeded RNG, so that hypothesis can shrink the list."""
    for index, seed in ops:
        if data:
            data = MUTATORS[index](data, random.Random(seed))
    return data


def check(target: str, data: bytes, measure_memory: bool = False) -> str:
    if measure_memory:
        tracemalloc.start()
    try:
        outcome = run_one(TARGETS[target], data)
        peak = tracemalloc.get_traced_memory()[1] if measure_memory else 0
    except Crash as exc:
        pytest.fail(f"{target}: {exc}\ninput ({len(data)} bytes): {data.hex()}")
    finally:
        if measure_memory:
            tracemalloc.stop()
    assert peak <= PEAK_LIMIT, f"{target}: peak {peak >> 20} MiB on a {len(data)}-byte input: {data.hex()}"
    return outcome


def test_seeds_decode_cleanly() -> None:
    assert len(SEEDS) >= 6
    for name, data in SEEDS.items():
        for target in MODEL_FREE:
            assert check(target, data) == "ok", (name, target)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(name=st.sampled_from(sorted(SEEDS)), ops=steps, target=st.sampled_from(MODEL_FREE))
def test_model_free_reader_survives_mutations(name: str, ops: list[tuple[int, int]], target: str) -> None:
    check(target, apply(SEEDS[name], ops), measure_memory=True)


#: Outcome prefix per model-free target of each regression file (tests/regressions/README.md); a target not
#: named must be "ok" there too unless the file's row says otherwise. Reader rules: spec sections 3, 5, 6.1, 13.
REJECTED = {t: "FormatError" for t in MODEL_FREE}
BOMB = ("DecompressionBomb", "DecodeBudget")  # Pillow's pixel limit, or the decode budget (tighter) before it
EXPECTED: dict[str, dict[str, str | tuple[str, ...]]] = {
    "tolerant-truncated-alph": {"tolerant": "ok", "reader": "TruncatedError", "pillow": "TruncatedError"},
    "tolerant-latent-bomb-c1024-f1": {t: "FormatError@header" for t in MODEL_FREE},
    "tolerant-117m-latent-values": {"tolerant": BOMB, "pillow": BOMB, "reader": "FormatError"},
    "reader-transform-forged-size": {"reader": "FormatError", "pillow": BOMB, "tolerant": BOMB},
    "rule-send-not-empty": REJECTED,
    "rule-bytes-after-send": {t: "ok" for t in MODEL_FREE},
    "rule-alph-in-rgb": REJECTED,
    "rule-plte-in-scalar": REJECTED,
    "rule-zstd-skippable-frame": REJECTED,
    "rule-zstd-two-frames": REJECTED,
    "rule-zstd-128mib-window": {t: "ok" for t in MODEL_FREE},
    "rule-words-after-range-stream": REJECTED,
    "rule-two-previews": {t: "ok" for t in MODEL_FREE},
    "rule-preview-large-coefficients": {t: "ok" for t in MODEL_FREE},
    "rule-300-channels-f8": {t: "FormatError@header" for t in MODEL_FREE},
    "rule-float-nan": REJECTED,
    "rule-float-table-row": {t: "FormatError@header" for t in MODEL_FREE},
    "rule-float-element-4": {t: "FormatError@header" for t in MODEL_FREE},
    "tolerant-float-cut": {"tolerant": "ok", "reader": "TruncatedError", "pillow": "TruncatedError"},
}


@pytest.mark.parametrize("path", sorted(REGRESSIONS.glob("*.sdl")), ids=lambda p: p.stem)
def test_regression_input(path: Path) -> None:
    data = path.read_bytes()
    outcomes = {target: check(target, data, measure_memory=True) for target in MODEL_FREE}
    assert path.stem in EXPECTED, f"{path.name}: add its outcome to EXPECTED and tests/regressions/README.md"
    for target, want in EXPECTED[path.stem].items():
        assert outcomes[target] == want if want == "ok" else outcomes[target].startswith(want), (target, outcomes)


def test_preview_rules() -> None:
    # Spec section 3 rule 5: the first prVw counts (mid grey), the second (white) is ignored; section 13: a
    # large but finite map renders in binary64 without overflow, clipped.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the second prVw
        grey = Image.open(REGRESSIONS / "rule-two-previews.sdl")
        grey.draft("RGB", (grey.width // 8, grey.height // 8))
        assert set(grey.convert("RGB").getdata()) == {(128, 128, 128)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        big = Image.open(REGRESSIONS / "rule-preview-large-coefficients.sdl")
        big.draft("RGB", (big.width // 8, big.height // 8))
        assert big.convert("RGB").getextrema() is not None


def test_every_mutator_reaches_the_reader() -> None:
    """Each mutator changes some seed (no dead operator) and the results stay within the oracle."""
    rng = random.Random(7)
    for mutator in MUTATORS:
        changed = 0
        for name in sorted(SEEDS):
            data = mutator(SEEDS[name], rng)
            changed += data != SEEDS[name]
            check("reader", data)
        assert changed, mutator.__name__


# ------------------------------------------------------------------ through Pillow with a model


@pytest.fixture(scope="module")
def load_seeds(taesd_dir: Path) -> dict[str, bytes]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SDLATENT_MODEL", str(taesd_dir))
        mp.setenv("HF_HUB_OFFLINE", "1")  # a forged hub id must fail fast, not try the network
        import torch

        torch.set_num_threads(1)
        seeds = model_seeds(str(taesd_dir))
        warm_hub_stack()
        yield seeds


def test_load_seeds_roundtrip(load_seeds: dict[str, bytes]) -> None:
    for name, data in load_seeds.items():
        assert check("load", data) == "ok", name
        with Image.open(io.BytesIO(data)) as im:
            assert im.size[0] <= 48 and im.format == "SDL"


@settings(max_examples=max(20, EXAMPLES // 5), deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
@given(index=st.integers(0, 3), ops=steps)
def test_load_survives_mutations(load_seeds: dict[str, bytes], index: int, ops: list[tuple[int, int]]) -> None:
    data = apply(list(load_seeds.values())[index], ops)
    check("load", data)


def test_forged_length_past_end_of_file_is_truncation() -> None:
    data = SEEDS["scalar-rgb-16"]
    pos = 8  # first chunk (HEAD): declare 2**31 - 1 bytes
    forged = data[:pos] + struct.pack(">I", 2**31 - 1) + data[pos + 4 :]
    assert check("reader", forged, measure_memory=True).startswith("TruncatedError")
