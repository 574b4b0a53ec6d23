"""Coder 3 ("transform"): 4x4 DCT of each latent channel, frequency-weighted steps, range coding per band.

Imports only numpy, constriction and the standard library (no torch). Dequantization and the stream layout
are normative (spec section 5.2); the quantizer is the reference writer's choice.

Why a transform: quantizing the latents themselves (coder 2) puts the same white noise on every spatial
frequency of the latent plane, and at low rates every latent still costs bits. A 4x4 DCT with steps that
grow with frequency spends the bits on the low frequencies, where the decoders turn quantization error into
errors over areas that the eye sees, and lets fine latent detail fall to zero (docs/transform-coder.md:
BD-rate on JOD about -30% against coder 2 on the same latents).

SYMBOLS  (C, H, W) uint16 with H = 4 * ceil(h / 4), W = 4 * ceil(w / 4): coefficient (u, v) of the block
  at block row i, column j of channel c sits at S[c][4i + u][4j + v].  Coefficient value (a signed index)
  q = S - Z_c with Z_c = (levels[c] - 1) // 2.

DEQUANTIZE  (float64 throughout, every operation IEEE rounded, no fused multiply-add; then one float32 cast)
  X = float64(q) * float64(scale[c]) * float64(weight[u][v]) / 16        (exact: fewer than 53 bits)
  t[u][x] = ((X[u][0] * T[0][x] + X[u][1] * T[1][x]) + X[u][2] * T[2][x]) + X[u][3] * T[3][x]
  y[y'][x] = ((T[0][y'] * t[0][x] + T[1][y'] * t[1][x]) + T[2][y'] * t[2][x]) + T[3][y'] * t[3][x]
  Z[c][4i + y'][4j + x] = float32(float64(offset[c]) + y[y'][x]), then cropped to (h, w).
  T: the orthonormal 4-point DCT-II, T[k][n] = c_k cos((2n + 1) k pi / 8): rows (1/2, 1/2, 1/2, 1/2),
  (A, B, -B, -A), (1/2, -1/2, -1/2, 1/2), (B, -A, A, -B) with the binary64 constants A, B below.

STREAM  encode_symbols(symbols, levels, weights) -> bytes; integers little endian; two versions (magic).
  Version 2, b"ST2" (written): u8 weight code w (0..254: weight[u][v] = min(255, 16 + (2w(u+v) + 6) // 12);
  255: 16 x u8 weights follow); C x u8 nb[c] (0..16): bands of channel c coded, in ZIGZAG order, the others
  all zero (S = Z_c); u32 crc32 of the symbols (u16 little endian, C-order); the RangeEncoder payload (u32
  words): first three parameter batches with fixed models (COEF_MODEL, SHIFT_MODEL, RANK_MODEL): the DC
  predictor coefficients (coder 2's features on the DC planes) of the coded channels, + 128; then for every
  model in coding order its change of sh and of shape rank (SHAPE_ORDER) against its reference model
  (model_references); then the bands.
  Version 1, b"ST1" (read only): 16 x u8 weights; nb; NF(c, k) x i8 DC predictor coefficients for every c, k;
  for c, for band i < nb[c]: u8 sh, u8 shape (band 0, the DC plane: four, one per phase k); crc; the words.
  Band order: channel c = 0..C-1, then its bands in ZIGZAG order.  Band 0 (DC, plane S[c][0::4][0::4]) is coded
  exactly as coder 2 codes a channel (four phases, linear prediction from decoded DC neighbours and the DC
  planes of up to 3 previous channels, centre mu = Z_c; only channels with nb[c] >= 1 count as decoded, the
  others are Z_c).  Band (u, v) != (0, 0), plane S[c][u::4][v::4] in row-major order, is one batch with
  prediction Z_c under model (sh, shape) of the band.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

import constriction
import numpy as np

from . import context_coder as cc

BLOCK = 4
#: Bands in coding order (the coder stops at the last non-zero band of each channel).
ZIGZAG = (
    (0, 0), (0, 1), (1, 0), (2, 0), (1, 1), (0, 2), (0, 3), (1, 2),
    (2, 1), (3, 0), (3, 1), (2, 2), (1, 3), (2, 3), (3, 2), (3, 3),
)  # fmt: skip
_A = float.fromhex("0x1.4e7ae9144f0fcp-1")  # sqrt(1/2) cos(pi/8)
_B = float.fromhex("0x1.1517a7bdb3896p-2")  # sqrt(1/2) cos(3 pi/8)
BASIS = np.array([[0.5, 0.5, 0.5, 0.5], [_A, _B, -_B, -_A], [0.5, -0.5, -0.5, 0.5], [_B, -_A, _A, -_B]])
#: Step multiplier of band (u, v): 1 + WEIGHT_SLOPE * (u + v) / 6, stored in Q4; measured against slopes 0, 1
#: and 3 with benchmarks/quantizer_variants.py (docs/transform-coder.md).
WEIGHT_SLOPE = 2.0
#: Dead-zone rounding offset of the AC coefficients (the DC is rounded to nearest).
RHO = 0.30
#: The transform spends fewer bits than coder 2 at the same step; its quality q uses coder 2's step of
#: quality q + QUALITY_SHIFT, so that a quality gives about the image quality it gave with coder 2 (TAESD on
#: Kodak: quality 75 near the float decode's JOD) at a smaller file.
QUALITY_SHIFT = 10.0


def quality_to_step(quality: float) -> float:
    """Base step (latent units) of a quality 0..100: ``0.28 * 2 ** ((60 - quality) / 13)`` (quality 75: 0.113)."""
    q = min(100.0, max(0.0, float(quality)))
    return cc.STEP0 * 2.0 ** ((cc.Q0 - q - QUALITY_SHIFT) / cc.QSTEP)


Params = tuple[tuple[float, ...], tuple[float, ...], tuple[int, ...]]  # per channel step, offset; 16 weights


def default_weights(slope: float | None = None) -> tuple[int, ...]:
    a = WEIGHT_SLOPE if slope is None else slope
    return tuple(min(255, max(1, round(16 * (1 + a * (u + v) / 6)))) for u in range(BLOCK) for v in range(BLOCK))


def coefficient_shape(h: int, w: int) -> tuple[int, int]:
    return -(-h // BLOCK) * BLOCK, -(-w // BLOCK) * BLOCK


def _blocks(x: np.ndarray) -> np.ndarray:
    """(..., H, W) -> (..., H/4, W/4, 4, 4)."""
    *lead, H, W = x.shape
    return x.reshape(*lead, H // BLOCK, BLOCK, W // BLOCK, BLOCK).swapaxes(-3, -2)


def _unblocks(b: np.ndarray) -> np.ndarray:
    *lead, hb, wb, _, _ = b.shape
    return b.swapaxes(-3, -2).reshape(*lead, hb * BLOCK, wb * BLOCK)


def forward(x: np.ndarray) -> np.ndarray:
    """DCT coefficients of (..., H, W) float64 planes, in the symbol layout (encoder side, not bit-exact)."""
    return _unblocks(np.einsum("uy,...yx,vx->...uv", BASIS, _blocks(x), BASIS))


def inverse(X: np.ndarray) -> np.ndarray:
    """The spec's exact inverse transform of (..., H, W) float64 coefficients (fixed order of operations)."""
    b = _blocks(X)
    row = [BASIS[k] for k in range(BLOCK)]  # T[k][x] along the last axis
    col = [BASIS[k][:, None] for k in range(BLOCK)]  # T[k][y] down the rows
    t = ((b[..., :, 0:1] * row[0] + b[..., :, 1:2] * row[1]) + b[..., :, 2:3] * row[2]) + b[..., :, 3:4] * row[3]
    y = ((col[0] * t[..., 0:1, :] + col[1] * t[..., 1:2, :]) + col[2] * t[..., 2:3, :]) + col[3] * t[..., 3:4, :]
    return _unblocks(y)


def _weight_plane(weights: Sequence[int], H: int, W: int) -> np.ndarray:
    w = np.asarray(weights, np.float64).reshape(BLOCK, BLOCK) / 16.0
    return np.tile(w, (H // BLOCK, W // BLOCK))


def params(latents: np.ndarray, quality: float, channel_weights: Sequence[float] | None = None) -> Params:
    """The quantizer's fixed parameters for these latents: per-channel steps (coder 2's, float32-exact) and
    offsets (channel means, float32), and the band weights. Refinement computes them once and aims at them."""
    z = np.asarray(latents, dtype=np.float32)
    if z.ndim != 3:
        raise ValueError("latents must be (C,h,w)")
    C = z.shape[0]
    step = quality_to_step(quality)
    steps = tuple(float(np.float32(step * m)) for m in cc.channel_multipliers(C, channel_weights))
    zc = np.nan_to_num(z.astype(np.float64), nan=0.0, posinf=1e6, neginf=-1e6)
    offsets = tuple(float(np.float32(zc[c].mean())) for c in range(C))
    return steps, offsets, default_weights()


def quantize(
    latents: np.ndarray, quality: float, params_: Params | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[int, ...]]:
    """(symbols (C,H,W) uint16, offset, scale (C,) float32, levels (C,) uint32, weights) of latents (C,h,w)."""
    z = np.asarray(latents, dtype=np.float32)
    steps, offsets, weights = params_ if params_ is not None else params(z, quality)
    C, h, w = z.shape
    if len(steps) != C or len(offsets) != C or len(weights) != BLOCK * BLOCK:
        raise ValueError(f"transform parameters for {len(steps)} channels cannot quantize {C}")
    H, W = coefficient_shape(h, w)
    zc = np.nan_to_num(z.astype(np.float64), nan=0.0, posinf=1e6, neginf=-1e6)
    x = np.pad(zc, ((0, 0), (0, H - h), (0, W - w)), mode="edge") - np.array(offsets)[:, None, None]
    X = forward(x)
    wp = _weight_plane(weights, H, W)
    dc = np.zeros((H, W), bool)
    dc[::BLOCK, ::BLOCK] = True
    syms = np.empty((C, H, W), np.uint16)
    scale = np.empty(C, np.float32)
    lev = np.empty(C, np.uint32)
    for c in range(C):
        d = steps[c]
        while True:
            t = X[c] / (d * wp)
            q = np.where(dc, np.round(t), np.sign(t) * np.floor(np.abs(t) + RHO))
            a = max(1, int(np.abs(q).max()))
            if 2 * a + 1 <= 65535:
                break
            d *= 2.0
        syms[c] = (q + a).astype(np.uint16)
        scale[c] = np.float32(d)
        lev[c] = 2 * a + 1
    return syms, np.array(offsets, np.float32), scale, lev, tuple(int(v) for v in weights)


def dequantize(
    symbols: np.ndarray,
    offset: np.ndarray,
    scale: np.ndarray,
    levels: np.ndarray,
    weights: Sequence[int],
    shape: tuple[int, int],
) -> np.ndarray:
    """Float32 latents (C, h, w) of the coefficient symbols (C, H, W), bit-exactly as spec section 5.2 says."""
    _, H, W = symbols.shape
    zero = ((np.asarray(levels, np.int64) - 1) // 2)[:, None, None]
    q = symbols.astype(np.int64) - zero
    X = q.astype(np.float64) * np.asarray(scale, np.float32).astype(np.float64)[:, None, None]
    X = X * (np.tile(np.asarray(weights, np.float64).reshape(BLOCK, BLOCK), (H // BLOCK, W // BLOCK)) / 16.0)
    y = np.asarray(offset, np.float32).astype(np.float64)[:, None, None] + inverse(X)
    return y.astype(np.float32)[:, : shape[0], : shape[1]]


def _bands(nb: int) -> list[tuple[int, int]]:
    return list(ZIGZAG[:nb])


def _dc_batches(dc: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The positions of the DC planes' four phases (coder 2's batches)."""
    hb, wb = dc.shape[1:]
    return [cc._phase_pos(hb, wb, k) for k in range(4)]


# ---------------- stream version 2: the header's parameters range-coded -----------------
#: Stream magics by version. Version 1 (b"ST1") stored every band model in two bytes, 12-22% of a small
#: file; version 2 (b"ST2", what the writer writes) range-codes the parameters. Readers decode both.
MAGICS = {1: b"ST1", 2: b"ST2"}
STREAM_VERSION = 2
#: Weight code of a version-2 stream that says 16 explicit weight bytes follow.
EXPLICIT_WEIGHTS = 255
#: Fixed models (sh, shape) of the version-2 parameter batches, fitted once to the parameters of the Kodak
#: streams at qualities 30..75 (TAESD): DC predictor coefficients, shift changes, shape-rank changes.
COEF_MODEL = (3, 18)
SHIFT_MODEL = (0, 41)
RANK_MODEL = (0, 52)
_SHIFT_L, _RANK_L = 33, 2 * cc.NSHAPE - 1


def _shape_order() -> tuple[int, ...]:
    """The shapes by decreasing centre-bin weight TABLE[s][R+1] / sum(TABLE[s]) (exact rationals, ties by the
    smaller index): neighbouring ranks are models of similar spread, Gaussian and Laplace interleaved."""
    from fractions import Fraction

    key = [Fraction(int(cc.TABLE[s, cc.R + 1]), int(cc.TABLE[s].sum())) for s in range(cc.NSHAPE)]
    return tuple(sorted(range(cc.NSHAPE), key=lambda s: (-key[s], s)))


SHAPE_ORDER = _shape_order()
RANK = tuple(SHAPE_ORDER.index(s) for s in range(cc.NSHAPE))


def weights_of_code(code: int) -> tuple[int, ...]:
    """The band weights of weight code 0..254: 16 + round(code * (u + v) / 6), at most 255 (code = 16 x slope)."""
    return tuple(min(255, 16 + (2 * code * (u + v) + 6) // 12) for u in range(BLOCK) for v in range(BLOCK))


def weight_code(weights: Sequence[int]) -> int:
    """The code of these weights, or EXPLICIT_WEIGHTS when no code gives them."""
    w = tuple(int(v) for v in weights)
    return next((k for k in range(EXPLICIT_WEIGHTS) if weights_of_code(k) == w), EXPLICIT_WEIGHTS)


def model_references(nb: Sequence[int]) -> list[int]:
    """For each model of a stream in coding order, the index of the model it is coded against (-1: none,
    i.e. sh 0 and rank 0): DC phase 0 against the previous coded channel's, phase k against phase k - 1, band 1
    against the previous coded channel's band 1 (else this channel's phase 3), band i against band i - 1."""
    refs: list[int] = []
    prev: int | None = None  # index of the previous coded channel's first model
    for c in range(len(nb)):
        if not nb[c]:
            continue
        first = len(refs)
        refs += [prev if prev is not None else -1, first, first + 1, first + 2]
        if nb[c] > 1:
            refs.append(prev + 4 if prev is not None and nb[_prev_coded(nb, c)] > 1 else first + 3)
            refs += [first + 4 + i for i in range(nb[c] - 2)]
        prev = first
    return refs


def _prev_coded(nb: Sequence[int], c: int) -> int:
    return max(k for k in range(c) if nb[k])


def _delta_costs(model: tuple[int, int], L: int) -> np.ndarray:
    """Ideal bits of every change d = -(L-1)/2..(L-1)/2 (index d + (L-1)/2) under a parameter model."""
    mid = (L - 1) // 2
    r = np.arange(L, dtype=np.int64) - mid
    pred = np.full(L, mid, np.int64)
    sh, shape = model
    b = np.clip((r >> sh) + cc.R + 1, 0, cc.NB - 1)
    bits = -np.log2(cc.model_probabilities(cc._bin_weights(shape, pred, sh, L), b)) + sh
    return bits + np.where((b == 0) | (b == cc.NB - 1), np.log2(max(2, (L >> sh) + 2)), 0.0)


_SHIFT_COST = _delta_costs(SHIFT_MODEL, _SHIFT_L)
_RANK_COST = _delta_costs(RANK_MODEL, _RANK_L)
_RANK_ARR = np.array(RANK, np.int64)


def _choose_model(r: np.ndarray, L: int, ref: tuple[int, int] | None) -> tuple[int, int]:
    """The model of a batch: fewest bits of residuals plus, in version 2 (``ref`` = the reference model), of
    the model's own change against its reference."""
    t = cc.model_costs(r, L)
    if ref is not None:
        rsh, rshape = ref
        t = t + _SHIFT_COST[np.arange(17) - rsh + 16][:, None] + _RANK_COST[_RANK_ARR - RANK[rshape] + cc.NSHAPE - 1]
    sh, shape = np.unravel_index(int(np.argmin(t)), t.shape)
    return int(sh), int(shape)


def encode_symbols(
    symbols: np.ndarray,
    levels: Sequence[int] | np.ndarray,
    weights: Sequence[int],
    costs: list[float] | None = None,
    version: int = STREAM_VERSION,
) -> bytes:
    """The stream of coefficient symbols (C, H, W) with per-channel alphabets ``levels`` (odd sizes: the zero
    coefficient is the middle symbol) and band weights; ``costs`` receives the ideal bits of every batch.
    ``version`` 1 writes the older layout (kept for the spec's vectors and comparisons)."""
    symbols, levels = cc._check(symbols, levels)
    C, H, W = symbols.shape
    if version not in MAGICS:
        raise ValueError(f"unknown stream version {version}")
    if H % BLOCK or W % BLOCK:
        raise ValueError(f"coefficient planes must be multiples of {BLOCK}, got {H}x{W}")
    if len(weights) != BLOCK * BLOCK or not all(1 <= int(v) <= 255 for v in weights):
        raise ValueError("weights must be 16 integers in 1..255")
    S = symbols.astype(np.int64)
    if (levels[:, None, None] <= S).any():
        raise ValueError("symbol >= levels")
    zero = (levels - 1) // 2
    nb = []
    for c in range(C):
        nz = [i for i, (u, v) in enumerate(ZIGZAG) if (S[c, u::BLOCK, v::BLOCK] != zero[c]).any()]
        nb.append(nz[-1] + 1 if nz else 0)
    refs = model_references(nb) if version == 2 else None
    DC = S[:, ::BLOCK, ::BLOCK] - zero[:, None, None]
    coefs: list[np.ndarray] = []
    models: list[tuple[int, int]] = []
    batches: list[tuple[np.ndarray, np.ndarray, int, int]] = []  # (residuals, predictions, L, model index)

    def choose(r: np.ndarray, L: int) -> None:
        ref = None if refs is None else (models[refs[len(models)]] if refs[len(models)] >= 0 else (0, 0))
        models.append(_choose_model(r, L, ref) if r.size else (ref or (0, 0)))

    for c in range(C):
        L = int(levels[c])
        for k, (ys, xs) in enumerate(_dc_batches(DC)):
            if nb[c] == 0 or ys.size == 0 or xs.size == 0:
                coefs.append(np.zeros(cc._nfeat(c, k), np.int8))
                if nb[c]:
                    choose(np.zeros(0, np.int64), L)  # a placeholder: no symbols
                continue
            a, pred = cc.fit_predictor(DC, c, k, ys, xs, int(zero[c]), L)
            r = S[c, ::BLOCK, ::BLOCK][np.ix_(ys, xs)].ravel() - pred
            coefs.append(a)
            choose(r, L)
            batches.append((r, pred, L, len(models) - 1))
        for u, v in _bands(nb[c])[1:]:
            r = S[c, u::BLOCK, v::BLOCK].ravel() - zero[c]
            choose(r, L)
            batches.append((r, np.full(r.size, zero[c]), L, len(models) - 1))
    enc = constriction.stream.queue.RangeEncoder()
    crc = struct.pack("<I", zlib.crc32(symbols.astype("<u2").tobytes()))
    if version == 1:
        head = bytearray(MAGICS[1]) + bytes(int(v) for v in weights) + bytes(nb)
        for a in coefs:
            head += a.astype(np.int8).tobytes()
        for sh, shape in models:
            head += bytes((sh, shape))
        head += crc
    else:
        code = weight_code(weights)
        head = bytearray(MAGICS[2]) + bytes([code])
        if code == EXPLICIT_WEIGHTS:
            head += bytes(int(v) for v in weights)
        head += bytes(nb) + crc
        _encode_parameters(enc, nb, coefs, models, refs or [], costs)
    for r, pred, L, m in batches:
        cc.encode_batch(enc, r, pred, L, *models[m], costs)
    return bytes(head) + enc.get_compressed().astype("<u4").tobytes()


def _encode_parameters(
    enc: constriction.stream.queue.RangeEncoder,
    nb: Sequence[int],
    coefs: list[np.ndarray],
    models: list[tuple[int, int]],
    refs: list[int],
    costs: list[float] | None,
) -> None:
    """Version 2's parameter batches: the DC predictor coefficients of the coded channels, then every
    model's change of shift and of shape rank against its reference (spec section 5.2)."""
    a = np.concatenate([coefs[4 * c + k] for c in range(len(nb)) if nb[c] for k in range(4)] + [np.zeros(0, np.int8)])
    a = a.astype(np.int64)
    if a.size:
        cc.encode_batch(enc, a, np.full(a.size, 128), 256, *COEF_MODEL, costs)
    if models:
        ref = [models[i] if i >= 0 else (0, 0) for i in refs]
        dsh = np.array([m[0] - f[0] for m, f in zip(models, ref, strict=True)], np.int64)
        drk = np.array([RANK[m[1]] - RANK[f[1]] for m, f in zip(models, ref, strict=True)], np.int64)
        cc.encode_batch(enc, dsh, np.full(dsh.size, 16), _SHIFT_L, *SHIFT_MODEL, costs)
        cc.encode_batch(enc, drk, np.full(drk.size, cc.NSHAPE - 1), _RANK_L, *RANK_MODEL, costs)


def _decode_parameters(
    dec: constriction.stream.queue.RangeDecoder, nb: Sequence[int]
) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    C = len(nb)
    counts = [cc._nfeat(c, k) if nb[c] else 0 for c in range(C) for k in range(4)]
    n = sum(counts)
    a = cc.decode_batch(dec, np.full(n, 128), 256, *COEF_MODEL) - 128 if n else np.zeros(0, np.int64)
    ends = np.cumsum(counts)
    coefs = [a[e - k : e].astype(np.int8) for e, k in zip(ends, counts, strict=True)]
    refs = model_references(nb)
    models: list[tuple[int, int]] = []
    if refs:
        dsh = cc.decode_batch(dec, np.full(len(refs), 16), _SHIFT_L, *SHIFT_MODEL) - 16
        drk = cc.decode_batch(dec, np.full(len(refs), cc.NSHAPE - 1), _RANK_L, *RANK_MODEL) - (cc.NSHAPE - 1)
        for i, f in enumerate(refs):
            rsh, rrank = (models[f][0], RANK[models[f][1]]) if f >= 0 else (0, 0)
            sh, rank = rsh + int(dsh[i]), rrank + int(drk[i])
            if not (0 <= sh <= 16 and 0 <= rank < cc.NSHAPE):
                raise ValueError("bad model parameters")
            models.append((sh, SHAPE_ORDER[rank]))
    return coefs, models


def _header_size(nb: Sequence[int]) -> int:
    """Bytes of a version-1 stream's fixed part (everything before the range coder's words) for band counts."""
    C = len(nb)
    nco = sum(cc._nfeat(c, k) for c in range(C) for k in range(4))
    return 3 + BLOCK * BLOCK + C + nco + 2 * sum(n + 3 for n in nb if n) + 4


def stream_version(data: bytes) -> int:
    """The layout version a stream's magic names; ValueError for anything else."""
    for version, magic in MAGICS.items():
        if data[:3] == magic and len(data) > 3:
            return version
    raise ValueError("bad stream header")


def _band_count_offset(data: bytes) -> int:
    """Where nb[] starts: after the 16 weight bytes, which version 2 stores only with EXPLICIT_WEIGHTS."""
    if stream_version(data) == 1:
        return 3 + BLOCK * BLOCK
    return 4 + (BLOCK * BLOCK if data[3] == EXPLICIT_WEIGHTS else 0)


def band_counts(data: bytes, channels: int) -> list[int]:
    """nb[c] of a stream of either version: how many bands (in ZIGZAG order) each channel codes."""
    p = _band_count_offset(data)
    return list(data[p : p + channels])


def header_size(data: bytes, channels: int) -> int:
    """Bytes of the stream header of ``data`` (a stream of ``channels`` channels), words excluded (version 2:
    its parameters are range-coded, part of the words)."""
    if stream_version(data) == 1:
        return _header_size(band_counts(data, channels))
    return _band_count_offset(data) + channels + 4


def decode_symbols(
    data: bytes, shape: Sequence[int], levels: Sequence[int] | np.ndarray
) -> tuple[np.ndarray, tuple[int, ...]]:
    """(coefficient symbols (C, H, W) uint16, band weights) of a stream of either version; ValueError on any
    inconsistency."""
    try:
        C, H, W = (int(v) for v in shape)
    except Exception:
        raise ValueError("bad shape") from None
    if C < 1 or H < 1 or W < 1 or H % BLOCK or W % BLOCK or C * H * W > (1 << 28):
        raise ValueError("bad shape")
    levels = np.asarray(levels).astype(np.int64).ravel()
    if levels.size != C or (levels < 2).any() or (levels > 65536).any():
        raise ValueError("bad levels")
    data = bytes(data)
    version = stream_version(data)
    p = _band_count_offset(data)  # the weights, where stored, are the 16 bytes before it
    fixed = p + C
    if len(data) < fixed:
        raise ValueError("bad stream header")
    weights = tuple(data[p - BLOCK * BLOCK : p]) if p >= 3 + BLOCK * BLOCK else weights_of_code(data[3])
    if min(weights) < 1:
        raise ValueError("band weight 0")
    nb = band_counts(data, C)
    if max(nb) > BLOCK * BLOCK:
        raise ValueError("more than 16 bands in a channel")
    hlen = header_size(data, C)
    if len(data) < hlen or (len(data) - hlen) % 4:
        raise ValueError("bad stream length")
    # a forged header must not make a few bytes decode into millions of symbols (spec section 10)
    coded = sum(H * W * len(_bands(n)) // (BLOCK * BLOCK) for n in nb)
    if coded > cc.symbol_limit(len(data) - hlen):
        raise ValueError(f"{coded} coefficients cannot come from a {len(data) - hlen}-byte range-coded payload")
    p = fixed
    if version == 1:
        coefs, p = cc.read_coefficients(data, C, p)
        models, p = cc.read_models(data, sum(n + 3 for n in nb if n), p)
    crc = struct.unpack_from("<I", data, p)[0]
    p += 4
    dec = constriction.stream.queue.RangeDecoder(np.frombuffer(data, "<u4", (len(data) - p) // 4, p).astype(np.uint32))
    zero = (levels - 1) // 2
    S = np.repeat(zero, H * W).reshape(C, H, W)
    DC = np.zeros((C, H // BLOCK, W // BLOCK), np.int64)
    m = 0
    with cc.stream_errors():
        if version == 2:
            coefs, models = _decode_parameters(dec, nb)
        for c in range(C):
            if nb[c] == 0:
                continue
            L = int(levels[c])
            dcs = S[c, ::BLOCK, ::BLOCK]  # a view: decoded DC symbols land in S
            for k, (ys, xs) in enumerate(_dc_batches(DC)):
                if ys.size == 0 or xs.size == 0:
                    m += 1
                    continue
                F = cc._features(DC, c, k, ys, xs)
                pred = cc._predict(F, coefs[4 * c + k], int(zero[c]), L)
                pred = pred.ravel() if pred is not None else np.full(ys.size * xs.size, int(zero[c]), np.int64)
                s = cc.decode_batch(dec, pred, L, *models[m]).reshape(ys.size, xs.size)
                m += 1
                dcs[np.ix_(ys, xs)] = s
                DC[c][np.ix_(ys, xs)] = s - zero[c]
            for u, v in _bands(nb[c])[1:]:
                n = (H // BLOCK) * (W // BLOCK)
                s = cc.decode_batch(dec, np.full(n, zero[c]), L, *models[m])
                m += 1
                S[c, u::BLOCK, v::BLOCK] = s.reshape(H // BLOCK, W // BLOCK)
    return cc.checked(S, crc), weights
