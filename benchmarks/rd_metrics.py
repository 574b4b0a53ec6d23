"""Metrics of the rate-distortion benchmark (benchmarks/rd.py): image quality, BD-rate, entropy of the coded symbols.

Kept apart from the driver so that the tests can import the pure functions without running anything.
The optional metric packages (pytorch_msssim, pycvvdp) are imported lazily: a missing one turns its
columns into "n/a (reason)" instead of stopping the benchmark.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# ---------------------------------------------------------------- image quality


def psnr(ref: np.ndarray, test: np.ndarray) -> float:
    """PSNR in dB over all RGB samples (8-bit peak 255); inf for identical images."""
    mse = float(np.mean((ref.astype(np.float64) - test.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


@dataclass
class Metrics:
    """SSIM / MS-SSIM (pytorch_msssim) and ColorVideoVDP JOD (pycvvdp), each optional.

    ``*_reason`` says why a metric is unavailable; it is what the tables print instead of a number.
    """

    jod_enabled: bool = True
    ssim_reason: str | None = None
    jod_reason: str | None = None
    _msssim: Any = field(default=None, repr=False)
    _cvvdp: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        try:
            import pytorch_msssim

            self._msssim = pytorch_msssim
        except Exception as exc:  # ImportError, or a broken install
            self.ssim_reason = f"pytorch_msssim not importable: {_short(exc)}"
        if not self.jod_enabled:
            self.jod_reason = "JOD disabled (--no-jod)"
            return
        try:
            # cvvdp needs torchvision, which does not import against the project's CPU torch (docs/benchmarks.md)
            import pycvvdp

            self._cvvdp = pycvvdp.cvvdp(display_name="standard_4k")
        except Exception as exc:
            self.jod_reason = f"cvvdp not importable: {_short(exc)}"

    @property
    def has_jod(self) -> bool:
        return self._cvvdp is not None

    def ssim(self, ref: np.ndarray, test: np.ndarray) -> tuple[float | None, float | None]:
        """(SSIM, MS-SSIM) with data_range=255; MS-SSIM is None below its 161-pixel minimum side."""
        if self._msssim is None:
            return None, None
        import torch

        x = torch.from_numpy(np.array(ref)).permute(2, 0, 1)[None].double()
        y = torch.from_numpy(np.array(test)).permute(2, 0, 1)[None].double()
        s = float(self._msssim.ssim(x, y, data_range=255, size_average=True))
        # 5 scales of an 11-tap window: the smallest side must exceed (11 - 1) * 2**4 = 160
        ms = float(self._msssim.ms_ssim(x, y, data_range=255, size_average=True)) if min(ref.shape[:2]) > 160 else None
        return s, ms

    def jod(self, ref: np.ndarray, test: np.ndarray) -> float | None:
        if self._cvvdp is None:
            return None
        import torch

        with torch.no_grad():
            q, _ = self._cvvdp.predict(test, ref, dim_order="HWC")
        return float(q)

    def all(self, ref: np.ndarray, test: np.ndarray, jod: bool = True) -> dict[str, float | None]:
        s, ms = self.ssim(ref, test)
        return {"psnr": psnr(ref, test), "ssim": s, "msssim": ms, "jod": self.jod(ref, test) if jod else None}


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return text if len(text) <= 100 else text[:97] + "..."


# ---------------------------------------------------------------- Bjøntegaard delta rate


def pchip(x: np.ndarray, y: np.ndarray, xq: np.ndarray) -> np.ndarray:
    """Monotone piecewise-cubic Hermite interpolation (Fritsch-Carlson, as scipy's PchipInterpolator).

    Written out so the benchmark needs no scipy; ``x`` strictly increasing, ``xq`` inside [x0, xn].
    """
    x, y, xq = (np.asarray(a, np.float64) for a in (x, y, xq))
    h = np.diff(x)
    delta = np.diff(y) / h
    n = len(x)
    d = np.zeros(n)
    if n == 2:
        d[:] = delta[0]
    else:
        for k in range(1, n - 1):
            if delta[k - 1] * delta[k] > 0:
                w1, w2 = 2 * h[k] + h[k - 1], h[k] + 2 * h[k - 1]
                d[k] = (w1 + w2) / (w1 / delta[k - 1] + w2 / delta[k])
        d[0] = _pchip_end(h[0], h[1], delta[0], delta[1])
        d[-1] = _pchip_end(h[-1], h[-2], delta[-1], delta[-2])
    k = np.clip(np.searchsorted(x, xq, side="right") - 1, 0, n - 2)
    t = (xq - x[k]) / h[k]
    h00, h10, h01, h11 = 2 * t**3 - 3 * t**2 + 1, t**3 - 2 * t**2 + t, -2 * t**3 + 3 * t**2, t**3 - t**2
    return h00 * y[k] + h10 * h[k] * d[k] + h01 * y[k + 1] + h11 * h[k] * d[k + 1]


def _pchip_end(h0: float, h1: float, m0: float, m1: float) -> float:
    """Shape-preserving one-sided three-point end slope."""
    d = ((2 * h0 + h1) * m0 - h0 * m1) / (h0 + h1)
    if np.sign(d) != np.sign(m0):
        return 0.0
    if np.sign(m0) != np.sign(m1) and abs(d) > abs(3 * m0):
        return 3 * m0
    return d


def monotone_curve(rates: list[float], metric: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Points sorted by rate, keeping only those that raise the metric.

    A saturated curve (the autoencoder's ceiling) has flat or falling tails; log-rate is not a function
    of the metric there, so those points are dropped, as BD tools do.
    """
    pts = sorted((r, m) for r, m in zip(rates, metric, strict=True) if r > 0 and m is not None and math.isfinite(m))
    keep: list[tuple[float, float]] = []
    for r, m in pts:
        if not keep or m > keep[-1][1]:
            keep.append((r, m))
    return np.array([p[0] for p in keep]), np.array([p[1] for p in keep])


@dataclass
class BDResult:
    rate_pct: float | None  # rate change of the test codec against the anchor at equal metric; None: undefined
    lo: float | None = None  # overlapping metric range
    hi: float | None = None
    note: str = ""

    def text(self, unit: str = "") -> str:
        if self.rate_pct is None:
            return f"n/a ({self.note})"
        return f"{self.rate_pct:+.1f}% (over {self.lo:.2f}..{self.hi:.2f}{unit})"


def bd_rate(anchor: tuple[list[float], list[float]], test: tuple[list[float], list[float]]) -> BDResult:
    """Bjøntegaard delta rate of ``test`` vs ``anchor``, each (rates, metric values), in percent.

    Log-rate as a pchip function of the metric for both curves, averaged over the overlapping metric
    range (the pchip form of Bjøntegaard's cubic fit used by current JVET/AOM tools). Negative: the
    test codec needs fewer bits for the same quality.
    """
    ra, ma = monotone_curve(*anchor)
    rt, mt = monotone_curve(*test)
    if len(ra) < 2 or len(rt) < 2:
        return BDResult(None, note=f"fewer than 2 increasing points (anchor {len(ra)}, test {len(rt)})")
    lo, hi = max(ma[0], mt[0]), min(ma[-1], mt[-1])
    if hi <= lo:
        return BDResult(None, note=f"no overlap: anchor {ma[0]:.2f}..{ma[-1]:.2f}, test {mt[0]:.2f}..{mt[-1]:.2f}")
    grid = np.linspace(lo, hi, 2001)
    diff = pchip(mt, np.log(rt), grid) - pchip(ma, np.log(ra), grid)
    avg = float(np.sum((diff[1:] + diff[:-1]) / 2) * (grid[1] - grid[0]) / (hi - lo))
    return BDResult(100.0 * (math.exp(avg) - 1.0), float(lo), float(hi))


def metric_at_rate(curve: tuple[list[float], list[float]], rate: float) -> float | None:
    """The metric of a curve (rates, metric values) at ``rate``: pchip in log-rate over its rising points,
    as :func:`bd_rate` fits it; None outside the curve's rate range."""
    r, m = monotone_curve(*curve)
    if len(r) < 2 or not r[0] <= rate <= r[-1]:
        return None
    return float(pchip(np.log(r), m, [math.log(rate)])[0])


# ---------------------------------------------------------------- coding efficiency


def _entropy_bits(values: np.ndarray) -> float:
    """Total empirical (order-0) code length of ``values`` in bits: n * H(histogram)."""
    if values.size == 0:
        return 0.0
    _, counts = np.unique(values, return_counts=True)
    p = counts / values.size
    return float(-(counts * np.log2(p)).sum())


def order0_bits(symbols: np.ndarray) -> float:
    """Sum over channels of the channel's symbol count times the entropy of its histogram."""
    return sum(_entropy_bits(symbols[c].ravel()) for c in range(symbols.shape[0]))


def _kt_bits(counts: np.ndarray, alphabet: int) -> float:
    """Code length (bits) of a sequence with these symbol counts under an adaptive Krichevsky-Trofimov
    estimator (add-1/2 counts over ``alphabet`` symbols): what an adaptive arithmetic coder spends,
    learning cost included. It depends only on the final counts, not on the order."""
    n, a = int(counts.sum()), 0.5
    lg = math.lgamma
    nats = lg(n + a * alphabet) - lg(a * alphabet) - sum(lg(int(k) + a) - lg(a) for k in counts)
    return nats / math.log(2)


def context_bits(symbols: np.ndarray, levels: np.ndarray | None = None) -> tuple[float, float]:
    """(empirical, adaptive) total bits of ``symbols`` under a simple causal context model over neighbours.

    Context of a value: its channel and the terciles (of that channel's histogram) of its left and top
    neighbours, 9 contexts per channel; the first row/column see themselves. Empirical: sum over contexts of
    n * H(histogram) -- an optimistic bound (the histograms are free); adaptive: the Krichevsky-Trofimov code
    length of the same model over each channel's ``levels`` symbols, which charges for learning them.
    """
    emp = ada = 0.0
    for c in range(symbols.shape[0]):
        s = symbols[c].astype(np.int64)
        edges = np.unique(np.quantile(s, [1 / 3, 2 / 3]))
        p = np.pad(s, ((1, 0), (1, 0)), mode="edge")
        key = np.searchsorted(edges, p[1:, :-1], side="right") * 3 + np.searchsorted(edges, p[:-1, 1:], side="right")
        key, sv = key.ravel(), s.ravel()
        alphabet = int(levels[c]) if levels is not None else int(sv.max()) + 1
        for k in np.unique(key):
            _, counts = np.unique(sv[key == k], return_counts=True)
            emp += float(-(counts * np.log2(counts / counts.sum())).sum())
            ada += _kt_bits(counts, alphabet)
    return emp, ada


def transform_coder_stats(symbols: np.ndarray, levels: np.ndarray, weights: tuple[int, ...], ldat: bytes) -> dict:
    """Coding statistics of a transform stream: its bands' ideal code length under the stream's own models,
    from re-encoding the decoded coefficient symbols (the encoder is deterministic: the same stream, whose
    ``costs`` are the -log2 p of every bin under the coder's quantized probabilities plus low parts and escapes,
    of the range-coded parameters too);
    'residual_order0_bits' is the order-0 entropy of each band (the DC bands' after prediction not counted)."""
    from pillow_sdlatent.core import transform_coder as tc

    costs: list[float] = []
    again = tc.encode_symbols(symbols, levels, weights, costs)
    if again != ldat:
        raise RuntimeError("re-encoding the decoded coefficients did not give the file's LDAT")
    s_all = np.asarray(symbols).astype(np.int64)
    hlen = tc.header_size(ldat, s_all.shape[0])
    n_ch = s_all.shape[0]
    bands = sum(_entropy_bits(s_all[c, u::4, v::4].ravel()) for c in range(n_ch) for u in range(4) for v in range(4))
    return {
        "values": float(s_all.size),
        "ldat_bits": 8.0 * len(ldat),
        "header_bits": 8.0 * hlen,
        "payload_bits": 8.0 * (len(ldat) - hlen),
        "ideal_bits": float(sum(costs)),
        "categorical_bits": float("nan"),
        "residual_order0_bits": bands,
    }
