"""The range-coded batch of spec section 6: the model family, and symbols coded under it.

Model-free and torch-free; the arithmetic is constriction's range coder (32-bit words, 64-bit state,
24-bit probabilities), whose exact algorithm spec section 6.1 restates so that a reader needs no library:
this package encodes with constriction and decodes with its own compiled decoder (:mod:`.transform_decoder`).
Everything a reader computes here is integer arithmetic: the model tables (section 6.2) are built from
integers and handed to constriction as frequencies that already sum to its free weight, so its
float normalisation is the identity (``scale == 1.0``) and every cumulative is exact.

A *batch* codes ``n`` residuals ``r`` (symbol minus prediction) under one model ``(sh, shape)``:
first all bins ``b = clip((r >> sh) + R + 1, 0, NB - 1)`` under the shape's table, then (if ``sh > 0``)
all low parts ``r - ((r >> sh) << sh)`` uniformly over ``2**sh``, then the escapes of the two outer bins
uniformly over ``E = (L >> sh) + 2``.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

PRECISION = 24
ONE = 1 << PRECISION
R = 16  # bins 1..2R+1 hold h = -R..R
NB = 2 * R + 3  # plus one escape bin at each end
TAIL = 64  # an escape bin weighs h = R+1 .. R+TAIL
#: Decay factors of the shapes, in units of 2**-16: k/256 for small k, then 1 - 1/m (rounded down).
THETA16 = tuple(256 * k for k in (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112)) + tuple(
    65536 * (m - 1) // m
    for m in (2, 3, 4, 5, 6, 8, 10, 12, 15, 18, 22, 27, 33, 40, 48, 58, 70, 85, 103, 125, 150, 180, 220, 270, 330, 400)
)
NS = len(THETA16)
NSHAPE = 2 * NS  # shapes 0..NS-1: Gaussian theta**(h*h); NS..2NS-1: Laplace theta**|h|
MAX_SHIFT = 16
#: No symbol costs less than this many bits (the narrowest shape's centre bin), so a payload of B bytes holds
#: fewer than about 90 symbols per bit; readers allow SYMBOLS_PER_BIT, a 2x margin (spec section 10).
SYMBOLS_PER_BIT = 180


def symbol_limit(payload_bytes: int) -> int:
    """Most symbols ``payload_bytes`` of range-coder words may hold (spec section 10), with 64 bits of slack."""
    return SYMBOLS_PER_BIT * (8 * payload_bytes + 64)


@functools.cache
def frequencies() -> np.ndarray:
    """(NSHAPE, NB) int64 frequencies ``f``, each row summing to ``ONE - NB`` (spec section 6.2).

    Built on first use, not at import: v(0) = 2**24, v(n + 1) = (v(n) * theta16) >> 16; the weight of
    h is v(h*h) + 1 (Gaussian) or v(|h|) + 1 (Laplace); each escape bin weighs the sum of the weights of
    h = R+1..R+TAIL; f = floor(weight * (ONE - NB) / total), the rounding remainder added to the centre bin.
    """
    theta = np.array(THETA16, np.int64)
    top = (R + TAIL) ** 2
    v = np.zeros((top + 1, NS), np.int64)
    v[0] = 1 << 24
    for n in range(top):  # vectorised over the shapes; (v * theta) < 2**40
        v[n + 1] = (v[n] * theta) >> 16
        if not v[n + 1].any():
            break
    h = np.arange(R + TAIL + 1)
    rows = []
    for n in (h * h, h):  # Gaussian, then Laplace
        w = v[n].T + 1  # (NS, R + TAIL + 1): weight of |h|
        core = w[:, np.abs(np.arange(-R, R + 1))]
        tail = w[:, R + 1 :].sum(1, keepdims=True)
        rows.append(np.concatenate([tail, core, tail], 1))
    weights = np.concatenate(rows)
    f = weights * (ONE - NB) // weights.sum(1, keepdims=True)
    f[:, R + 1] += (ONE - NB) - f.sum(1)
    return f


@functools.cache
def cumulatives() -> np.ndarray:
    """(NSHAPE, NB + 1) uint64 cumulatives of the coding probabilities f + 1: 0 = cu[0] < ... < cu[NB] = ONE."""
    cu = np.zeros((NSHAPE, NB + 1), np.uint64)
    cu[:, 1:] = np.cumsum(frequencies() + 1, axis=1)
    cu.setflags(write=False)
    return cu


@functools.cache
def log2_probabilities() -> np.ndarray:
    """(NSHAPE, NB) log2 of each bin's coding probability (f + 1) / 2**24 (encoder-side cost estimates)."""
    return np.log2((frequencies() + 1) / ONE)


@functools.cache
def shape_order() -> tuple[int, ...]:
    """The shapes by decreasing centre frequency f[R+1], ties by the smaller index (spec section 6.2)."""
    f = frequencies()
    return tuple(sorted(range(NSHAPE), key=lambda s: (-int(f[s, R + 1]), s)))


@functools.cache
def ranks() -> np.ndarray:
    """rank[shape]: the shape's position in :func:`shape_order`."""
    out = np.empty(NSHAPE, np.int64)
    out[list(shape_order())] = np.arange(NSHAPE)
    return out


def escape_alphabet(L: int, sh: int) -> int:
    return (L >> sh) + 2


@functools.cache
def _categorical(shape: int) -> Any:
    import constriction

    # frequencies summing to ONE - NB: constriction's leaky quantisation gives each bin exactly f + 1
    return constriction.stream.model.Categorical(frequencies()[shape].astype(np.float64), perfect=False)


@functools.cache
def _uniform(size: int) -> Any:
    import constriction

    return constriction.stream.model.Uniform(size)


def new_encoder() -> Any:
    """constriction's queue range encoder: u32 words, u64 state, 24-bit probabilities (spec section 6.1)."""
    import constriction

    return constriction.stream.queue.RangeEncoder()


def encode_batch(enc: Any, r: np.ndarray, L: int, sh: int, shape: int) -> None:
    """Append a batch of residuals ``r`` (int64) of symbols in an alphabet of ``L`` under model (sh, shape)."""
    if r.size == 0:
        return
    hh = r >> sh
    b = np.clip(hh + R + 1, 0, NB - 1)
    enc.encode(b.astype(np.int32), _categorical(shape))
    if sh > 0:
        enc.encode((r - (hh << sh)).astype(np.int32), _uniform(1 << sh))
    sel = (b == 0) | (b == NB - 1)
    if sel.any():
        e = np.where(b == 0, -R - 1 - hh, hh - R - 1)[sel]
        E = escape_alphabet(L, sh)
        if (e >= E).any():
            raise ValueError(f"residual beyond the escape range of an alphabet of {L}")
        enc.encode(e.astype(np.int32), _uniform(E))


def words_of(enc: Any) -> bytes:
    """The encoder's words, big-endian (spec section 6.1)."""
    return enc.get_compressed().astype(">u4").tobytes()


def parse_words(data: bytes) -> np.ndarray:
    if len(data) % 4:
        raise ValueError(f"range-coded words take a multiple of 4 bytes, not {len(data)}")
    return np.frombuffer(data, ">u4").astype(np.uint32)


# ---------------------------------------------------------------- encoder-side costs


def model_costs(r: np.ndarray, L: int) -> np.ndarray:
    """(MAX_SHIFT + 1, NSHAPE) bits of residuals ``r`` under every model, as the coder spends them up to its
    rounding; inf for shifts wider than the alphabet needs."""
    lp = log2_probabilities()
    out = np.full((MAX_SHIFT + 1, NSHAPE), np.inf)
    for sh in range(MAX_SHIFT + 1):
        if sh > 0 and (1 << sh) > 2 * L:
            break
        b = np.clip((r >> sh) + R + 1, 0, NB - 1)
        cnt = np.bincount(b, minlength=NB).astype(np.float64)
        out[sh] = -(lp @ cnt) + r.size * sh + (cnt[0] + cnt[-1]) * np.log2(escape_alphabet(L, sh))
    return out


@functools.cache  # asked once per band model the encoder chooses, always for the same two parameter models
def delta_costs(model: tuple[int, int], L: int) -> np.ndarray:
    """Bits of each value d = -(L-1)//2 .. L-1-(L-1)//2 (index d + (L-1)//2) under a parameter model."""
    mid = (L - 1) // 2
    r = np.arange(L, dtype=np.int64) - mid
    sh, shape = model
    b = np.clip((r >> sh) + R + 1, 0, NB - 1)
    bits = -log2_probabilities()[shape][b] + sh
    out = bits + np.where((b == 0) | (b == NB - 1), np.log2(escape_alphabet(L, sh)), 0.0)
    out.setflags(write=False)  # cached: shared by every caller
    return out
