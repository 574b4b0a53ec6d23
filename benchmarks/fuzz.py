"""Mutation fuzzer for the .sdl reader: the long-run harness.

The engine (seeds, mutators, targets, oracle) is :mod:`pillow_sdlatent.testing`, which the tests use too;
this script adds line-coverage guidance, an address-space cap and the report.

Long run (model-free, coverage-guided by the lines of pillow_sdlatent executed)::

    python benchmarks/fuzz.py --seconds 300 --targets reader,pillow,tolerant
    SDLATENT_MODEL=../shared/models/taesd python benchmarks/fuzz.py --seconds 120 --targets load
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import zstandard

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pillow_sdlatent.testing import (  # noqa: E402
    HANG_SECONDS,
    MUTATORS,
    PKG_DIR,
    TARGETS,
    Crash,
    model_seeds,
    mutate,
    run_one,
    seed_files,
    warm_decoder,
    warm_hub_stack,
)

# ------------------------------------------------------------------ long run


class LineCoverage:
    """Edges (previous line, line) executed in pillow_sdlatent: the fuzzer's novelty signal."""

    def __init__(self) -> None:
        self.seen: set[tuple] = set()
        self._new = 0
        self._last: tuple | None = None

    def _local(self, frame, event, arg):
        if event == "line":
            here = (frame.f_code.co_filename, frame.f_lineno)
            edge = (self._last, here)
            if edge not in self.seen:
                self.seen.add(edge)
                self._new += 1
            self._last = here
        return self._local

    def _global(self, frame, event, arg):
        return self._local if frame.f_code.co_filename.startswith(PKG_DIR) else None

    @contextmanager
    def track(self) -> Iterator[list[int]]:
        self._new, self._last = 0, None
        found = [0]
        sys.settrace(self._global)
        try:
            yield found
        finally:
            sys.settrace(None)
            found[0] = self._new


def _cap_address_space(extra: int) -> str:
    """Limit the process's address space to what it uses now plus ``extra`` bytes (Linux)."""
    try:
        import resource

        with open("/proc/self/status") as fh:
            vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + extra, resource.RLIM_INFINITY))
        return f"{(vm + extra) / 2**20:.0f} MiB"
    except (ImportError, OSError, ValueError, StopIteration):
        return "none (not Linux)"


def fuzz(targets: list[str], seconds: float, seed: int, crash_dir: Path, guided: bool, measure: bool = True,
         cap: int = 0) -> int:  # fmt: skip
    """``cap``: bytes of address space each case may add (0: no cap). It is set again before every case, on top
    of what the process holds then: the harness's own heap grows over a long run (the allocator keeps what
    tracemalloc's traces fragmented), and that must not count against the files."""
    rng = random.Random(seed)
    seeds = seed_files()
    with_model = model_seeds() if "load" in targets else {}
    corpora = {"model-free": list(seeds.values()), "load": list(with_model.values())}
    for name, data in [*seeds.items(), *with_model.items()]:  # every seed must decode cleanly
        for t in targets:
            if (t == "load") == (name in with_model) and run_one(TARGETS[t], data) != "ok":
                raise SystemExit(f"seed {name} does not decode with target {t}")
    cov = LineCoverage()
    outcomes: dict[str, Counter] = {t: Counter() for t in targets}
    crashes: dict[str, bytes] = {}
    # per target, the case with the highest traced peak (Python and numpy allocations) and the slowest one
    worst: dict[str, dict[str, tuple[float, bytes, str]]] = {t: {"peak": (0, b"", ""), "time": (0, b"", "")}
                                                              for t in targets}  # fmt: skip
    execs = 0
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        target = rng.choice(targets)
        corpus = corpora["load" if target == "load" else "model-free"]
        try:
            data = mutate(rng.choice(corpus), rng)
        except (MemoryError, zstandard.ZstdError):  # the fuzzer's own bomb (up to MAX_BOMB) hit the cap: not a case
            continue
        if cap:
            _cap_address_space(cap)
        try:
            if measure:
                tracemalloc.start()
            t0 = time.perf_counter()
            try:
                if guided:
                    with cov.track() as found:
                        outcome = run_one(TARGETS[target], data)
                    if found[0] and len(data) < 1 << 16:
                        corpus.append(data)
                else:
                    outcome = run_one(TARGETS[target], data)
            finally:
                elapsed = time.perf_counter() - t0
                peak = tracemalloc.get_traced_memory()[1] if measure else 0
                if measure:
                    tracemalloc.stop()
            outcomes[target][outcome] += 1
            for key, value in (("peak", peak), ("time", elapsed)):
                if value > worst[target][key][0]:
                    worst[target][key] = (value, data, outcome)
        except Crash as exc:
            key = f"{target}: {str(exc).splitlines()[0][:160]}"
            if key not in crashes:
                crashes[key] = data
                crash_dir.mkdir(parents=True, exist_ok=True)
                path = crash_dir / f"{target}-{hashlib.sha1(data).hexdigest()[:12]}.sdl"
                path.write_bytes(data)
                print(f"CRASH {key}\n  input: {path}", flush=True)
        execs += 1
    print(f"\n{execs} executions in {seconds:.0f} s ({execs / seconds:.0f}/s), seed {seed}, "
          f"{len(seeds) + len(with_model)} seed files, corpus grew to {sum(map(len, corpora.values()))}")  # fmt: skip
    if guided:
        print(f"coverage: {len(cov.seen)} distinct line edges in pillow_sdlatent")
    for t in targets:
        kinds = outcomes[t]
        print(f"\n[{t}] {sum(kinds.values())} executions, {len(kinds)} distinct outcomes (exception@raising line):")
        for outcome, n in kinds.most_common():
            print(f"  {n:8d}  {outcome}")
    if measure:
        print("\nworst cases (traced peak: Python and numpy allocations; time: wall clock, coverage tracing on):")
        for t in targets:
            for key, (value, data, outcome) in worst[t].items():
                if not data:
                    continue
                crash_dir.mkdir(parents=True, exist_ok=True)
                path = crash_dir / f"worst-{key}-{t}.sdl"
                path.write_bytes(data)
                shown = f"{value / 2**20:.1f} MiB" if key == "peak" else f"{value * 1e3:.0f} ms"
                print(f"  [{t}] {key}: {shown}, {len(data)}-byte input, {outcome} ({path})")
    print(f"\ncrashes: {len(crashes)}")
    for key in crashes:
        print(f"  {key}")
    return 1 if crashes else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--targets", default="reader,pillow,tolerant", help=f"comma list of {', '.join(TARGETS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--crash-dir", type=Path, default=Path("fuzz-crashes"))
    ap.add_argument("--no-coverage", action="store_true", help="skip line tracing (faster, blind mutation)")
    ap.add_argument("--no-measure", action="store_true", help="skip the per-case memory and time measurement")
    ap.add_argument("--memory-cap-mib", type=int, default=1024, help="address space a case may add to the process's")
    args = ap.parse_args()
    targets = args.targets.split(",")
    unknown = set(targets) - set(TARGETS)
    if unknown:
        ap.error(f"unknown targets {sorted(unknown)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a forged model id must never reach the network
    if "load" in targets:
        import torch

        torch.set_num_threads(1)
        cap = "none (torch reserves address space)"
        warm_hub_stack()
    else:
        warm_decoder()
        cap = f"{_cap_address_space(args.memory_cap_mib << 20)} at the start, +{args.memory_cap_mib} MiB per case"
    print(f"targets {targets}, {len(MUTATORS)} mutators, address-space cap {cap}, hang limit {HANG_SECONDS} s")
    return fuzz(targets, args.seconds, args.seed, args.crash_dir, not args.no_coverage, not args.no_measure,
                0 if "load" in targets else args.memory_cap_mib << 20)


if __name__ == "__main__":
    sys.exit(main())
