"""The spec's test vectors decode to their latent arrays bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pillow_sdlatent.core.codec import decode_bytes

VECTORS = sorted((Path(__file__).parents[1] / "spec" / "vectors").glob("*.sdl"))


def test_vectors_present() -> None:
    assert len(VECTORS) >= 4


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: p.stem)
def test_vector_decodes_exactly(path: Path) -> None:
    lf = decode_bytes(path.read_bytes())
    want = np.load(path.with_suffix(".latents.npy"))
    got = lf.latents()
    assert got.dtype == np.float32 and got.shape == want.shape
    assert got.astype("<f4").tobytes() == want.astype("<f4").tobytes()
    alpha_path = path.with_suffix(".alpha.npy")
    if alpha_path.exists():
        assert np.array_equal(lf.alpha, np.load(alpha_path))
    else:
        assert lf.alpha is None
    assert lf.header.model_id == "sdl-test-vector"
