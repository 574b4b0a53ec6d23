"""examples/train_on_latents.py trains from a cache of .sdl files without loading any autoencoder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from pillow_sdlatent.latents import write_latents

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_on_latents.py"


def test_training_loop_reads_latents_from_sdl_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(6):
        z = rng.normal(size=(4, 16, 16)).astype(np.float32)
        # an identity no model resolves: the example must never need the autoencoder
        write_latents(tmp_path / f"{i}.sdl", z, model_id="nowhere/no-such-model", fingerprint=bytes(16),
                      method="scalar", quality=100)  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDLATENT_")}
    out = subprocess.run(
        [sys.executable, str(EXAMPLE), "--cache", str(tmp_path), "--steps", "4", "--batch-size", "3",
         "--workers", "1"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "6 cached latents of shape (4, 16, 16)" in out.stdout
    losses = [float(x) for x in re.findall(r"loss (\S+)", out.stdout)]
    assert len(losses) == 4 and all(0 < v < 10 for v in losses)
