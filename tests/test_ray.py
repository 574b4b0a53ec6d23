"""Runs tests/ray_cases.py in a pytest process of its own, so no Ray driver lives in the main run.

``ray.shutdown`` leaves the driver's gRPC threads running (gcs_client_io_service, grpc timers, event
engines) and resets SIGSEGV to the default action, which silences faulthandler: a crash in any later test
of the same process would end the run with status 139 and no traceback. The child disables Ray's
handler (RAY_DISABLE_FAILURE_SIGNAL_HANDLER) so that a crash there still names its thread.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the [ray] extra is not installed")

ROOT = Path(__file__).resolve().parents[1]


def test_ray_cases_in_their_own_process() -> None:
    env = dict(os.environ, RAY_DISABLE_FAILURE_SIGNAL_HANDLER="1")
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "ray_cases.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    summary = r.stdout.strip().splitlines()[-1]
    if not re.search(r"\d+ passed", summary):  # every case skipped: ../shared or a dependency is absent
        reasons = re.findall(r"^SKIPPED \[\d+\] (.*)$", r.stdout, re.M)  # addopts' -ra lists them
        pytest.skip("; ".join(sorted(set(reasons))) or summary)
