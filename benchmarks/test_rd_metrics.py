"""The maths of benchmarks/rd_metrics.py (BD-rate, interpolation, entropies), tested beside it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import rd_metrics as rm


def test_bd_rate_of_scaled_curves() -> None:
    anchor = ([0.1, 0.2, 0.4, 0.8], [20.0, 24.0, 27.0, 29.0])
    half = ([r / 2 for r in anchor[0]], anchor[1])
    assert rm.bd_rate(anchor, anchor).rate_pct == pytest.approx(0.0, abs=1e-9)
    assert rm.bd_rate(anchor, half).rate_pct == pytest.approx(-50.0, abs=1e-6)
    assert rm.bd_rate(half, anchor).rate_pct == pytest.approx(100.0, abs=1e-6)
    apart = rm.bd_rate(anchor, ([0.1, 0.2], [10.0, 12.0]))
    assert apart.rate_pct is None and "no overlap" in apart.note


def test_bd_rate_drops_saturated_points() -> None:
    rates, metric = rm.monotone_curve([0.4, 0.1, 0.2, 0.3], [7.0, 5.0, 6.5, 7.1])
    assert list(rates) == [0.1, 0.2, 0.3] and list(metric) == [5.0, 6.5, 7.1]


def test_metric_at_rate_interpolates_in_log_rate() -> None:
    curve = ([0.1, 0.2, 0.4], [5.0, 6.0, 7.0])  # linear in log2(rate): pchip reproduces it exactly
    assert rm.metric_at_rate(curve, 0.2) == pytest.approx(6.0)
    assert rm.metric_at_rate(curve, 0.1 * 2**0.5) == pytest.approx(5.5)
    assert rm.metric_at_rate(curve, 0.05) is None and rm.metric_at_rate(curve, 0.5) is None


def test_pchip_matches_scipy_where_available() -> None:
    x, y = [0.0, 1.0, 2.5, 3.0, 5.0], [0.0, 0.8, 1.0, 2.0, 2.1]
    xq = [0.0, 0.3, 1.7, 2.9, 4.2, 5.0]
    got = rm.pchip(x, y, xq)
    assert got[0] == pytest.approx(0.0) and got[-1] == pytest.approx(2.1)
    interpolate = pytest.importorskip("scipy.interpolate")
    assert got == pytest.approx(interpolate.PchipInterpolator(x, y)(xq))


def test_entropies_of_known_sources() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    sym = rng.integers(0, 4, size=(2, 64, 64)).astype(np.uint16)  # 2 bits per value, no context to exploit
    n = sym.size
    assert rm.order0_bits(sym) / n == pytest.approx(2.0, abs=0.01)
    emp, adaptive = rm.context_bits(sym, np.array([4, 4]))
    assert emp / n == pytest.approx(2.0, abs=0.02) and emp <= rm.order0_bits(sym) + 1e-6
    assert adaptive > emp  # the adaptive code pays for learning its 9 histograms per channel
