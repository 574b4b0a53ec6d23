"""Coder 2 ("context"): scalar quantizer + context-model range coder for autoencoder latents.

Imports only numpy, constriction and the standard library (no torch). The
stream layout below is normative (spec section 5.1); the quantizer is the
reference writer's choice.

QUANTIZER  quantize(latents (C,h,w) float32, quality 0..100, channel_weights=None)
  step  D = STEP0 * 2 ** ((Q0 - quality) / QSTEP)   (STEP0 = 0.28, Q0 = 70, QSTEP = 13: q=0 -> 11.6,
        q=60 -> 0.477, q=75 -> 0.214, q=100 -> 0.056); channel c uses D_c = D * w_c,
        w = CH_WEIGHT_4 = (0.945, 1.162, 1.159, 0.845) when C == 4
        (step proportional to 1/sqrt(decoder sensitivity), measured with TAESD and TAESDXL), else w_c = 1.
  grid phase: for phi in {0, 1/8, .., 7/8}: t = z/D_c - phi, m = round(mean(t)),
        qi = m + sign(t-m) * floor(|t-m| + RHO)   (RHO = 0.30 by default; 0.5 would be plain rounding);
        keep the phi with the smallest sum (t - qi)^2.  If max-min+1 > 65536 the step is doubled and retried.
  symbols = qi - min(qi) (uint16), offset[c] = float32((min(qi) + phi) * D_c), scale[c] = float32(D_c),
  levels[c] = max-min+1.  Reconstruction offset[c] + scale[c] * symbols (float32).

STREAM  encode_symbols(symbols, levels) -> bytes.  All integers little endian.
  b"SL1"                                   magic + version
  for c in 0..C-1: uint16 mu[c]            channel centre (round(mean symbol)), must be < levels[c]
  for c, for phase k in 0..3:              predictor coefficients, int8 each, Q6 (value/64), count = NF(c,k)
  for c, for phase k in 0..3: uint8 sh, uint8 shape          (model parameters of this (c,k) batch)
  uint32 crc32 of symbols (uint16 little-endian, C-order)  -- corruption check
  rest: constriction.stream.queue.RangeEncoder payload (uint32 words, little endian).

  Decoding order: channel c = 0..C-1, then phase k = 0..3 inside the channel, where the phase of position (y,x) is
  k = 2*(y%2) + (x%2): (even,even), (even,odd), (odd,even), (odd,odd).  All symbols of a phase are coded as one
  batch in row-major order of their positions.
  Centered values d = s - mu[c].  Neighbour (y+dy, x+dx) outside the plane is mirrored to (y-dy, x-dx)
  (same phase, already decoded); if that is also outside (plane of size 1) the feature value is 0.
  Features (int64) of position (y,x) in channel c, phase k:
     k=1: d(y,x-1)+d(y,x+1)
     k=2: d(y-1,x)+d(y+1,x),  d(y-1,x-1)+d(y-1,x+1)+d(y+1,x-1)+d(y+1,x+1)
     k=3: d(y-1,x-1)+d(y-1,x+1)+d(y+1,x-1)+d(y+1,x+1),  d(y-1,x)+d(y+1,x)+d(y,x-1)+d(y,x+1)
     then for every k: d_{c-1}(y,x), d_{c-2}(y,x), d_{c-3}(y,x) for the previous channels that exist (max 3).
  pred = clip(mu[c] + ((sum_i a_i*f_i + 32) >> 6), 0, levels[c]-1)    (arithmetic shift, i.e. floor)
  residual r = s - pred; high part h = r >> sh (floor), low part l = r - (h << sh) in [0, 2^sh).
  h is coded with a categorical over NB = 2R+3 bins (R = 16): bin 0 = "h < -R", bins 1..2R+1 = h = -R..R,
  bin 2R+2 = "h > R".  Bin weights: integer table TABLE[shape] (below), computed at import time with IEEE-exact
  float64 operations only (repeated multiplication, division, floor): family G (Gaussian, weight theta^(h^2)) for
  shape < NS and family L (Laplace, theta^|h|) for shape >= NS, theta = THETA[shape % NS] with
  THETA = k/256 for k in (1,2,4,8,16,24,32,48,64,80,96,112), then 1 - 1/m for m in the list M; weight =
  floor(2^24 * theta^n) + 1; escape bins hold the tail sums of h = R+1..R+64.  Bins whose whole range of s values
  lies outside [0, levels-1] get weight 0 (mask).  The weights (float64, exact integers) are passed per symbol
  to constriction Categorical(perfect=False) (it normalises).
  Then, if sh > 0, the low parts of all symbols of the batch: Uniform(2^sh).
  Then the escapes of the batch in order: e = (-R-1-h) for bin 0, (h-R-1) for the top bin, coded Uniform(E)
  with E = max(2, (levels[c] >> sh) + 2).
  Any decoded value outside its range, bad header, bad length, CRC mismatch -> ValueError.
"""

from __future__ import annotations

import contextlib
import struct
import zlib
from collections.abc import Iterator, Sequence

import constriction
import numpy as np

# ---------------- quantizer -----------------
STEP0 = 0.28  # step at quality Q0
Q0 = 70.0  # quality 75 (the default) lands near the model's float ceiling at ~0.23 bpp on Kodak
QSTEP = 13.0  # quality points per halving of the step
RHO = 0.30  # dead-zone rounding offset (0.5 = plain rounding); 0.30 measured best of {0.5, 0.30}
GRID_PHASE = True  # optimise the grid phase per channel
NPHASE = 8
CH_WEIGHT = None  # optional global override of per-channel step multipliers
# Default multipliers for C == 4 (SD / SDXL latent spaces): step_c ∝ 1/sqrt(decoder sensitivity of channel c),
# sensitivities measured with TAESD and TAESDXL (sensitivity.py): relative dMSE ~ (1.12, 0.74, 0.745, 1.40).
CH_WEIGHT_4 = (0.945, 1.162, 1.159, 0.845)


def quality_to_step(quality: float) -> float:
    q = min(100.0, max(0.0, float(quality)))
    return STEP0 * 2.0 ** ((Q0 - q) / QSTEP)


Grid = tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]  # per channel: step, phase, dead-zone centre


def channel_multipliers(channels: int, channel_weights: Sequence[float] | None = None) -> list[float]:
    """Step multiplier of each channel: ``channel_weights``, else CH_WEIGHT, else CH_WEIGHT_4 for 4 channels,
    else 1 (channels beyond the weights given: 1)."""
    cw = channel_weights if channel_weights is not None else CH_WEIGHT
    if cw is None and channels == 4:
        cw = CH_WEIGHT_4
    return [float(cw[c]) if cw is not None and c < len(cw) else 1.0 for c in range(channels)]


def grid(latents: np.ndarray, quality: float, channel_weights: Sequence[float] | None = None) -> Grid:
    """The quantizer's per-channel grid for these latents: (step D_c, phase phi_c, dead-zone centre m_c).

    :func:`quantize` uses it as given; encoders that move the latents towards a fixed grid (latent
    refinement) compute it once and pass it back, so the file is quantized on the grid they aimed at."""
    z = np.asarray(latents, dtype=np.float32)
    if z.ndim != 3:
        raise ValueError("latents must be (C,h,w)")
    C = z.shape[0]
    step = quality_to_step(quality)
    mult = channel_multipliers(C, channel_weights)
    steps, phases, centres = [], [], []
    for c in range(C):
        d = step * mult[c]
        zc = np.nan_to_num(z[c].astype(np.float64), nan=0.0, posinf=1e6, neginf=-1e6)
        while True:
            # grid phase: choose phi in {0,1/NPHASE,..} (units of the step) minimising the squared error
            best = None
            for j in range(NPHASE if GRID_PHASE else 1):
                ph = j / float(NPHASE)
                t = zc / d - ph
                m = float(np.round(np.mean(t)))  # grid point next to the channel mean = dead-zone centre
                qi = _dead_zone(t, m)
                err = float(np.sum((t - qi) ** 2))
                if best is None or err < best[0] - 1e-9:
                    best = (err, ph, m, qi)
            _, ph, m, qi = best
            if qi.max() - qi.min() + 1 <= 65536:
                break
            d *= 2.0
        steps.append(d)
        phases.append(ph)
        centres.append(m)
    return tuple(steps), tuple(phases), tuple(centres)


def _dead_zone(t: np.ndarray, m: float) -> np.ndarray:
    u = t - m
    return m + np.sign(u) * np.floor(np.abs(u) + RHO)


def quantize(
    latents: np.ndarray,
    quality: float,
    channel_weights: Sequence[float] | None = None,
    grid_: Grid | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Symbols (C,h,w) uint16, offset and scale (C,) float32 and levels (C,) of float latents (C,h,w),
    on ``grid_`` if given (see :func:`grid`), else on the grid these latents choose."""
    z = np.asarray(latents, dtype=np.float32)
    g = grid_ if grid_ is not None else grid(z, quality, channel_weights)
    C = z.shape[0]
    if any(len(part) != C for part in g):
        raise ValueError(f"a grid for {len(g[0])} channels cannot quantize {C}")
    syms = np.empty(z.shape, np.uint16)
    off = np.empty(C, np.float32)
    sc = np.empty(C, np.float32)
    lev = np.empty(C, np.uint32)
    for c in range(C):
        d, ph, m = (float(v[c]) for v in g)
        zc = np.nan_to_num(z[c].astype(np.float64), nan=0.0, posinf=1e6, neginf=-1e6)
        qi = _dead_zone(zc / d - ph, m)
        lo, hi = qi.min(), qi.max()
        if hi - lo + 1 > 65536:
            raise ValueError(f"channel {c} spans {int(hi - lo + 1)} steps of the grid (at most 65536)")
        syms[c] = (qi - lo).astype(np.uint16)
        off[c] = np.float32((lo + ph) * d)
        sc[c] = np.float32(d)
        lev[c] = max(2, int(hi - lo + 1))  # the format needs an alphabet of 2+
    return syms, off, sc, lev


def dequantize(symbols: np.ndarray, offset: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return offset[:, None, None].astype(np.float32) + scale[:, None, None].astype(np.float32) * symbols.astype(
        np.float32
    )


# ---------------- probability tables (IEEE-exact construction) -----------------
R = 16
NB = 2 * R + 3
M = [2, 3, 4, 5, 6, 8, 10, 12, 15, 18, 22, 27, 33, 40, 48, 58, 70, 85, 103, 125, 150, 180, 220, 270, 330, 400]
THETA = [k / 256.0 for k in (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112)] + [1.0 - 1.0 / float(m) for m in M]
NS = len(THETA)


def _build_tables() -> np.ndarray:
    tabs = []
    for fam in (0, 1):  # 0 gaussian theta^(h^2), 1 laplace theta^|h|
        for theta in THETA:
            wts = []
            for h in range(0, R + 65):
                n = h * h if fam == 0 else h
                v = 1.0
                # repeated squaring would also be exact, plain loop is simplest; cap n to keep it cheap
                for _ in range(min(n, 4000)):
                    v *= theta
                    if v < 1e-30:
                        v = 0.0
                        break
                wts.append(int(np.floor(v * 16777216.0)) + 1)
            core = [wts[abs(h)] for h in range(-R, R + 1)]
            tail = sum(wts[R + 1 :])
            tabs.append([tail, *core, tail])
    return np.array(tabs, dtype=np.int64)


TABLE = _build_tables()  # (2*NS, NB) int64
TABLE_F = TABLE.astype(np.float64)
NSHAPE = TABLE.shape[0]
PRECISION = 24  # bits of the range coder's fixed-point probabilities
BIN_SLICE = 1 << 15  # symbols per coder call: (BIN_SLICE, NB) float64 weights = 9 MiB
LOG2P = np.log2(TABLE_F / TABLE_F.sum(1, keepdims=True))  # encoder-side only (shape selection)


# ---------------- geometry helpers -----------------
def _phase_pos(h: int, w: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    py, px = k >> 1, k & 1
    return np.arange(py, h, 2), np.arange(px, w, 2)


def _nb(D: np.ndarray, ys: np.ndarray, xs: np.ndarray, dy: int, dx: int) -> np.ndarray:
    h, w = D.shape
    yy = ys + dy
    xx = xs + dx
    yy = np.where((yy < 0) | (yy >= h), ys - dy, yy)
    xx = np.where((xx < 0) | (xx >= w), xs - dx, xx)
    oky = (yy >= 0) & (yy < h)
    okx = (xx >= 0) & (xx < w)
    out = D[np.ix_(np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1))]
    if not (oky.all() and okx.all()):
        out = out * (oky[:, None] & okx[None, :])
    return out


def _features(Dall: np.ndarray, c: int, k: int, ys: np.ndarray, xs: np.ndarray) -> list[np.ndarray]:
    D = Dall[c]
    F = []
    if k == 1:
        F.append(_nb(D, ys, xs, 0, -1) + _nb(D, ys, xs, 0, 1))
    elif k == 2:
        F.append(_nb(D, ys, xs, -1, 0) + _nb(D, ys, xs, 1, 0))
        F.append(_nb(D, ys, xs, -1, -1) + _nb(D, ys, xs, -1, 1) + _nb(D, ys, xs, 1, -1) + _nb(D, ys, xs, 1, 1))
    elif k == 3:
        F.append(_nb(D, ys, xs, -1, -1) + _nb(D, ys, xs, -1, 1) + _nb(D, ys, xs, 1, -1) + _nb(D, ys, xs, 1, 1))
        F.append(_nb(D, ys, xs, -1, 0) + _nb(D, ys, xs, 1, 0) + _nb(D, ys, xs, 0, -1) + _nb(D, ys, xs, 0, 1))
    for cc in range(c - 1, max(-1, c - 4), -1):
        F.append(Dall[cc][np.ix_(ys, xs)])
    return F


def _nfeat(c: int, k: int) -> int:
    return (0, 1, 2, 2)[k] + min(c, 3)


def _predict(F: list[np.ndarray], coef: np.ndarray, mu: int, L: int) -> np.ndarray | None:
    s = np.zeros(F[0].shape if F else (), np.int64) if F else 0
    for f, a in zip(F, coef, strict=False):
        s = s + f * int(a)
    if not F:
        return None
    p = mu + ((s + 32) >> 6)
    return np.clip(p, 0, L - 1)


def _bin_weights(shape: int, pred: np.ndarray, sh: int, L: int) -> np.ndarray:
    """(n, NB) float64 weights with infeasible bins masked."""
    n = pred.size
    W = np.broadcast_to(TABLE_F[shape], (n, NB)).copy()
    step = 1 << sh
    hb = np.arange(-R, R + 1, dtype=np.int64)
    lo = pred[:, None] + hb[None, :] * step  # smallest s in bin
    feas = (lo <= L - 1) & (lo + step - 1 >= 0)
    W[:, 1 : NB - 1] *= feas
    W[:, 0] *= pred - R * step - 1 >= 0
    W[:, NB - 1] *= pred + (R + 1) * step <= L - 1
    return W


def encode_batch(
    enc: constriction.stream.queue.RangeEncoder,
    r: np.ndarray,
    pred: np.ndarray,
    L: int,
    sh: int,
    shape: int,
    costs: list[float] | None = None,
) -> None:
    """Append one batch: residuals ``r`` (int64) of symbols ``pred + r`` in ``0..L-1`` under model (sh, shape):
    the bins, then the low parts, then the escapes (spec section 5.1). ``costs`` gets the ideal bits."""
    cat = constriction.stream.model.Categorical(perfect=False)
    uni = constriction.stream.model.Uniform()
    hh = r >> sh
    b = np.clip(hh + R + 1, 0, NB - 1)
    sel = (b == 0) | (b == NB - 1)
    E = max(2, (L >> sh) + 2)
    for i in range(0, b.size, BIN_SLICE):  # slices bound the (n, NB) weights' memory, as in the decoder
        W = _bin_weights(shape, pred[i : i + BIN_SLICE], sh, L)
        enc.encode(b[i : i + BIN_SLICE].astype(np.int32), cat, W)
        if costs is not None:
            costs.append(-np.log2(model_probabilities(W, b[i : i + BIN_SLICE])).sum())
    if sh > 0:
        enc.encode((r - (hh << sh)).astype(np.int32), uni, np.full(r.size, 1 << sh, np.int32))
    if sel.any():
        e = np.where(b == 0, -R - 1 - hh, hh - R - 1)[sel]
        enc.encode(e.astype(np.int32), uni, np.full(e.size, E, np.int32))
    if costs is not None:
        costs.append(float(r.size * sh + sel.sum() * np.log2(E)))


def decode_batch(
    dec: constriction.stream.queue.RangeDecoder, pred: np.ndarray, L: int, sh: int, shape: int
) -> np.ndarray:
    """The symbols (int64) of one batch with predictions ``pred``; ValueError if one falls outside 0..L-1."""
    cat = constriction.stream.model.Categorical(perfect=False)
    uni = constriction.stream.model.Uniform()
    n = pred.size
    # the bins of a batch are consecutive in the stream: decode them in slices to bound the weights' memory
    b = np.concatenate(
        [
            dec.decode(cat, _bin_weights(shape, pred[i : i + BIN_SLICE], sh, L)).astype(np.int64)
            for i in range(0, n, BIN_SLICE)
        ]
    )
    hh = b - (R + 1)
    r = hh << sh
    if sh > 0:
        r = r + dec.decode(uni, np.full(n, 1 << sh, np.int32)).astype(np.int64)
    sel = (b == 0) | (b == NB - 1)
    if sel.any():
        E = max(2, (L >> sh) + 2)
        e = dec.decode(uni, np.full(int(sel.sum()), E, np.int32)).astype(np.int64)
        hsel = np.where(b[sel] == 0, -R - 1 - e, R + 1 + e)
        r[sel] = (hsel << sh) + (r[sel] - (hh[sel] << sh))
    s = pred + r
    if (s < 0).any() or (s >= L).any():
        raise ValueError("decoded symbol out of range")
    return s


# ---------------- encoder -----------------
def _choose_model(r: np.ndarray, L: int) -> tuple[int, int]:
    """pick (sh, shape) minimising estimated bits for residuals r (encoder only)."""
    return model_bits(r, L)[1:]


def model_costs(r: np.ndarray, L: int) -> np.ndarray:
    """(17, NSHAPE) ideal bits of residuals ``r`` under every model (sh, shape), the batch's parameters not
    counted; inf for the shifts a batch of alphabet ``L`` never uses (encoder only)."""
    out = np.full((17, NSHAPE), np.inf)
    for sh in range(0, 17):
        if sh > 0 and (1 << sh) > 2 * L:
            break
        hh = r >> sh
        b = np.clip(hh + R + 1, 0, NB - 1)
        cnt = np.bincount(b, minlength=NB).astype(np.float64)
        esc = cnt[0] + cnt[-1]
        out[sh] = -(LOG2P @ cnt) + r.size * sh + esc * np.log2(max(2, (L >> sh) + 2))
    return out


def model_bits(r: np.ndarray, L: int) -> tuple[float, int, int]:
    """(ideal bits, sh, shape) of the (sh, shape) that codes residuals ``r`` in the fewest bits (encoder only;
    the batch's two header bytes not counted; ties go to the smaller sh, then the smaller shape)."""
    t = model_costs(r, L)
    sh, j = np.unravel_index(int(np.argmin(t)), t.shape)
    return float(t[sh, j]), int(sh), int(j)


def fit_predictor(
    Dall: np.ndarray, c: int, k: int, ys: np.ndarray, xs: np.ndarray, mu: int, L: int
) -> tuple[np.ndarray, np.ndarray]:
    """The encoder's predictor of batch (c, k): least-squares coefficients of the features in Q6 (int8) and the
    predictions (flat, int64) they give, from the centred symbols ``Dall`` (encoder only)."""
    F = _features(Dall, c, k, ys, xs)
    if not F:
        return np.zeros(0, np.int8), np.full(ys.size * xs.size, mu, np.int64)
    tgt = Dall[c][np.ix_(ys, xs)].ravel()
    X = np.stack([f.ravel() for f in F], 1).astype(np.float64)
    a = np.linalg.lstsq(X, tgt.astype(np.float64), rcond=None)[0] if X.shape[0] >= X.shape[1] else np.zeros(X.shape[1])
    a = np.clip(np.round(a * 64), -128, 127).astype(np.int8)
    return a, _predict(F, a, mu, L).ravel()


def _check(symbols: np.ndarray, levels: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    symbols = np.asarray(symbols)
    if symbols.ndim != 3:
        raise ValueError("symbols must be (C,h,w)")
    levels = np.asarray(levels).astype(np.int64).ravel()
    if levels.size != symbols.shape[0] or (levels < 1).any() or (levels > 65536).any():
        raise ValueError("bad levels")
    return symbols, levels


def model_probabilities(W: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Probabilities of bins ``b`` under weights ``W`` exactly as the range coder uses them (spec section 5.1):
    constriction's leaky fast quantization to 24 bits, every bin >= 2^-24, the last bin taking the remainder."""
    n = W.shape[1]
    scale = float((1 << PRECISION) - n) / W.sum(1)
    cum = np.concatenate([np.zeros((W.shape[0], 1)), np.cumsum(W, 1)], 1)  # exact: integer weights < 2^53
    rows = np.arange(W.shape[0])
    left = np.floor(cum[rows, b] * scale) + b
    right = np.where(b == n - 1, float(1 << PRECISION), np.floor(cum[rows, b + 1] * scale) + b + 1)
    return (right - left) / float(1 << PRECISION)


def encode_symbols(symbols: np.ndarray, levels: Sequence[int] | np.ndarray, costs: list[float] | None = None) -> bytes:
    """The stream of ``symbols`` (C,h,w) with per-channel alphabet sizes ``levels``.

    ``costs``, if given, receives the ideal code length in bits of each batch under the stream's own model
    (what a perfect entropy coder would spend), to measure how close the range coder comes to it."""
    symbols, levels = _check(symbols, levels)
    C, h, w = symbols.shape
    S = symbols.astype(np.int64)
    if (levels[:, None, None] <= S).any() or (S < 0).any():
        raise ValueError("symbol >= levels")
    mu = np.array([int(np.round(S[c].mean())) if S[c].size else 0 for c in range(C)], np.int64)
    mu = np.minimum(mu, levels - 1)
    Dall = S - mu[:, None, None]
    coefs = []
    params = []
    enc = constriction.stream.queue.RangeEncoder()
    for c in range(C):
        L = int(levels[c])
        for k in range(4):
            ys, xs = _phase_pos(h, w, k)
            if ys.size == 0 or xs.size == 0:
                coefs.append(np.zeros(_nfeat(c, k), np.int8))
                params.append((0, 0))
                continue
            a, pred = fit_predictor(Dall, c, k, ys, xs, int(mu[c]), L)
            s = S[c][np.ix_(ys, xs)].ravel()
            r = s - pred
            sh, shape = _choose_model(r, L)
            coefs.append(a)
            params.append((sh, shape))
            encode_batch(enc, r, pred, L, sh, shape, costs)
    head = bytearray(b"SL1")
    head += mu.astype("<u2").tobytes()
    for a in coefs:
        head += a.astype(np.int8).tobytes()
    for sh, shape in params:
        head += bytes((sh, shape))
    head += struct.pack("<I", zlib.crc32(symbols.astype("<u2").tobytes()))
    return bytes(head) + enc.get_compressed().astype("<u4").tobytes()


# ---------------- decoder -----------------
def _min_bits_per_symbol() -> float:
    """The fewest bits any symbol can cost: levels >= 2 keeps a second bin of weight >= floor(2^24/256) + 1
    feasible next to the centre bin whenever sh == 0 (sh > 0 costs sh bits of low part on top)."""
    centre, neighbour = TABLE_F[:, R + 1], np.minimum(TABLE_F[:, R], TABLE_F[:, R + 2])
    return float(np.log2((centre + neighbour) / centre).min())


MIN_BITS_PER_SYMBOL = _min_bits_per_symbol()
SYMBOLS_PER_BIT = 360


def symbol_limit(payload_bytes: int) -> int:
    """Most symbols a payload of this many bytes may declare (spec section 10): 360 per bit, twice the
    1 / MIN_BITS_PER_SYMBOL = 178 that the table allows, with 64 bits of slack for the coder's flush."""
    return SYMBOLS_PER_BIT * (8 * payload_bytes + 64)


def decode_symbols(data: bytes, shape: Sequence[int], levels: Sequence[int] | np.ndarray) -> np.ndarray:
    try:
        C, h, w = (int(v) for v in shape)
    except Exception:
        raise ValueError("bad shape") from None
    if C < 1 or h < 1 or w < 1 or C * h * w > (1 << 28):
        raise ValueError("bad shape") from None
    levels = np.asarray(levels).astype(np.int64).ravel()
    if levels.size != C or (levels < 2).any() or (levels > 65536).any():
        raise ValueError("bad levels")
    data = bytes(data)
    nco = sum(_nfeat(c, k) for c in range(C) for k in range(4))
    hlen = 3 + 2 * C + nco + 8 * C + 4
    if len(data) < hlen or data[:3] != b"SL1" or (len(data) - hlen) % 4:
        raise ValueError("bad stream header/length")
    # A forged header must not make a few bytes decode into millions of symbols: none costs less than
    # MIN_BITS_PER_SYMBOL, so the payload bounds the count before any work (spec section 10).
    if C * h * w > symbol_limit(len(data) - hlen):
        raise ValueError(f"{C * h * w} latent values cannot come from a {len(data) - hlen}-byte range-coded payload")
    p = 3
    mu = np.frombuffer(data, "<u2", C, p).astype(np.int64)
    p += 2 * C
    if (mu >= levels).any():
        raise ValueError("bad centre")
    coefs, p = read_coefficients(data, C, p)
    params, p = read_models(data, 4 * C, p)
    crc = struct.unpack_from("<I", data, p)[0]
    p += 4
    words = np.frombuffer(data, "<u4", (len(data) - p) // 4, p).astype(np.uint32)
    dec = constriction.stream.queue.RangeDecoder(words)
    S = np.zeros((C, h, w), np.int64)
    Dall = np.zeros((C, h, w), np.int64)
    with stream_errors():
        for c in range(C):
            L = int(levels[c])
            for k in range(4):
                ys, xs = _phase_pos(h, w, k)
                if ys.size == 0 or xs.size == 0:
                    continue
                sh, shape = params[4 * c + k]
                F = _features(Dall, c, k, ys, xs)
                n = ys.size * xs.size
                pred = _predict(F, coefs[4 * c + k], int(mu[c]), L)
                pred = pred.ravel() if pred is not None else np.full(n, int(mu[c]), np.int64)
                s = decode_batch(dec, pred, L, sh, shape)
                s2 = s.reshape(ys.size, xs.size)
                S[c][np.ix_(ys, xs)] = s2
                Dall[c][np.ix_(ys, xs)] = s2 - mu[c]
    return checked(S, crc)


# ---------------- stream parts shared with coder 3 (core/transform_coder.py) -----------------
def read_coefficients(data: bytes, C: int, p: int) -> tuple[list[np.ndarray], int]:
    """The int8 predictor coefficients of batches (c, k), c < C, k < 4, from offset ``p``; and the next offset."""
    coefs = []
    for c in range(C):
        for k in range(4):
            n = _nfeat(c, k)
            coefs.append(np.frombuffer(data, np.int8, n, p))
            p += n
    return coefs, p


def read_models(data: bytes, count: int, p: int) -> tuple[list[tuple[int, int]], int]:
    """``count`` (sh, shape) byte pairs from offset ``p``, each checked; and the next offset."""
    models = []
    for _ in range(count):
        sh, shape = data[p], data[p + 1]
        p += 2
        if sh > 16 or shape >= NSHAPE:
            raise ValueError("bad model parameters")
        models.append((sh, shape))
    return models, p


@contextlib.contextmanager
def stream_errors() -> Iterator[None]:
    """Inside: the range decoder's own errors on garbage become ValueError (ValueErrors pass unchanged)."""
    try:
        yield
    except ValueError:
        raise
    except Exception as ex:  # constriction errors on garbage
        raise ValueError(f"corrupt stream: {ex}") from ex


def checked(S: np.ndarray, crc: int) -> np.ndarray:
    """The decoded symbols as uint16 once their CRC-32 (u16 little endian, C-order) matches ``crc``."""
    out = S.astype(np.uint16)
    if zlib.crc32(out.astype("<u2").tobytes()) != crc:
        raise ValueError("CRC mismatch (corrupt stream)")
    return out
