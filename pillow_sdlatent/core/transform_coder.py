"""The transform quantizer and its range-coded stream (spec section 5.3): 4x4 DCT of each latent channel,
steps that grow with frequency, one range-coded batch per frequency band.

Model-free and torch-free (numpy, and constriction through :mod:`.rangecode`). Dequantization and the
stream are normative (spec sections 5.3, 6); the quantizer is the reference writer's choice.

Why a transform: quantizing the latents themselves puts the same white noise on every spatial frequency
of the latent plane, and at low rates every latent still costs bits. A 4x4 DCT with steps that grow with
frequency spends the bits on the low frequencies, where the decoders turn quantization error into errors
over areas that the eye sees, and lets fine latent detail fall to zero (docs/transform-coder.md).

Symbols: (C, H, W) uint16 with H = 4 ceil(h / 4), W = 4 ceil(w / 4); coefficient (u, v) of block (i, j)
of channel c at S[c][4i + u][4j + v]; its signed index q = S - Z_c with the centre Z_c = (levels[c] - 1) // 2.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from . import rangecode as rc

BLOCK = 4
#: Bands in coding order (a channel codes the first nb[c] of them; the others hold only Z_c).
ZIGZAG = (
    (0, 0), (0, 1), (1, 0), (2, 0), (1, 1), (0, 2), (0, 3), (1, 2),
    (2, 1), (3, 0), (3, 1), (2, 2), (1, 3), (2, 3), (3, 2), (3, 3),
)  # fmt: skip
_ZIGZAG = np.array(ZIGZAG, np.int64)
_A = float.fromhex("0x1.4e7ae9144f0fcp-1")  # sqrt(1/2) cos(pi/8)
_B = float.fromhex("0x1.1517a7bdb3896p-2")  # sqrt(1/2) cos(3 pi/8)
BASIS = np.array([[0.5, 0.5, 0.5, 0.5], [_A, _B, -_B, -_A], [0.5, -0.5, -0.5, 0.5], [_B, -_A, _A, -_B]])

# ---------------------------------------------------------------- the reference writer's quantizer
#: Step at quality 60 (latent units); it halves every QSTEP quality points: 0.28 * 2 ** ((60 - q) / 13).
STEP0, Q_STEP0, QSTEP = 0.28, 60.0, 13.0
#: Per-channel step multipliers for 4-channel latents (SD / SDXL latent spaces): step_c ~ 1/sqrt(decoder
#: sensitivity of channel c), measured with TAESD and TAESDXL (relative dMSE ~ (1.12, 0.74, 0.745, 1.40)).
CH_WEIGHT_4 = (0.945, 1.162, 1.159, 0.845)
#: Step multiplier of band (u, v): 1 + WEIGHT_SLOPE * (u + v) / 6, stored in Q4; measured against slopes 0, 1
#: and 3 (docs/transform-coder.md).
WEIGHT_SLOPE = 2.0
#: Dead-zone rounding offset of the AC coefficients (the DC is rounded to nearest).
RHO = 0.30

Params = tuple[tuple[float, ...], tuple[float, ...], tuple[int, ...]]  # per channel step, offset; 16 weights


def quality_to_step(quality: float) -> float:
    """Base step (latent units) of a quality 0..100: ``0.28 * 2 ** ((60 - quality) / 13)`` (quality 75: 0.113)."""
    q = min(100.0, max(0.0, float(quality)))
    return STEP0 * 2.0 ** ((Q_STEP0 - q) / QSTEP)


def channel_multipliers(channels: int) -> list[float]:
    return list(CH_WEIGHT_4) if channels == 4 else [1.0] * channels


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


def _weight_plane(weights: Sequence[int], H: int, W: int) -> np.ndarray:
    return np.tile(np.asarray(weights, np.float64).reshape(BLOCK, BLOCK), (H // BLOCK, W // BLOCK)) / 16.0


def params(latents: np.ndarray, quality: float) -> Params:
    """The quantizer's fixed parameters for these latents: per-channel steps (float32-exact) and offsets
    (channel means, float32), and the band weights. Refinement computes them once and aims at them."""
    z = np.asarray(latents, dtype=np.float32)
    if z.ndim != 3:
        raise ValueError("latents must be (C,h,w)")
    step = quality_to_step(quality)
    steps = tuple(float(np.float32(step * m)) for m in channel_multipliers(z.shape[0]))
    zc = np.nan_to_num(z.astype(np.float64), nan=0.0, posinf=1e6, neginf=-1e6)
    offsets = tuple(float(np.float32(zc[c].mean())) for c in range(z.shape[0]))
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
    """Float32 latents (C, h, w) of the coefficient symbols (C, H, W), bit-exactly as spec section 5.3 says
    (compiled: :func:`.transform_decoder.dequantize_planes`, no temporaries beyond the output)."""
    from . import transform_decoder as td

    S = np.ascontiguousarray(symbols, np.uint16)
    h, w = shape
    out = np.empty((S.shape[0], h, w), np.float32)
    td.dequantize_planes(  # compiled: overflow gives inf silently, and the caller checks finiteness
        S, (np.asarray(levels, np.int64).ravel() - 1) // 2, np.asarray(scale, np.float32).astype(np.float64),
        np.asarray(offset, np.float32).astype(np.float64),
        np.asarray(weights, np.float64).reshape(BLOCK, BLOCK) / 16.0, BASIS, out,
    )  # fmt: skip
    return out


# ---------------------------------------------------------------- DC prediction (spec section 5.3.3)


def feature_count(c: int, k: int) -> int:
    """NF(c, k): spatial features of phase k plus one per previous channel, at most three."""
    return (0, 1, 2, 2)[k] + min(c, 3)


def _mirror_pad(D: np.ndarray) -> np.ndarray:
    """D with one row and column around it: the neighbour mirrored across the edge (y - dy for y + dy), or 0
    where the plane has a single row or column (the mirror is outside too)."""
    h, w = D.shape
    zr = np.zeros((1, w), D.dtype)
    P = np.concatenate([D[1:2] if h > 1 else zr, D, D[-2:-1] if h > 1 else zr], 0)
    zc = np.zeros((h + 2, 1), D.dtype)
    return np.concatenate([P[:, 1:2] if w > 1 else zc, P, P[:, -2:-1] if w > 1 else zc], 1)


_CROSS_V, _CROSS_H = ((-1, 0), (1, 0)), ((0, -1), (0, 1))
_DIAG = ((-1, -1), (-1, 1), (1, -1), (1, 1))
#: Spatial features of each phase, as the neighbour offsets they sum (spec section 5.3.3).
_SPATIAL = ((), (_CROSS_H,), (_CROSS_V, _DIAG), (_DIAG, _CROSS_V + _CROSS_H))


def dc_features(DC: np.ndarray, c: int, k: int) -> list[np.ndarray]:
    """The NF(c, k) features (int64 planes over phase k's positions) of channel c's centred DC plane DC[c]:
    sums of mirrored neighbours, then the DC planes of up to three previous channels."""
    y0, x0 = k >> 1, k & 1
    ny, nx = len(range(y0, DC.shape[1], 2)), len(range(x0, DC.shape[2], 2))
    F: list[np.ndarray] = []
    if _SPATIAL[k] and ny and nx:
        P = _mirror_pad(DC[c])
        for offsets in _SPATIAL[k]:
            F.append(sum(P[1 + y0 + dy :: 2, 1 + x0 + dx :: 2][:ny, :nx] for dy, dx in offsets))
    elif _SPATIAL[k]:
        F += [np.zeros((ny, nx), np.int64)] * len(_SPATIAL[k])
    F += [DC[p, y0::2, x0::2] for p in range(c - 1, max(-1, c - 4), -1)]
    return F


def dc_predict(F: list[np.ndarray], coef: np.ndarray, zero: int, L: int, n: int) -> np.ndarray:
    """Flat int64 predictions clip(Z + ((sum a_i f_i + 32) >> 6), 0, L - 1); Z alone without features."""
    if not F:
        return np.full(n, zero, np.int64)
    s = sum(f * int(a) for f, a in zip(F, coef, strict=True))
    return np.clip(zero + ((s + 32) >> 6), 0, L - 1).ravel()


def fit_predictor(F: list[np.ndarray], target: np.ndarray) -> np.ndarray:
    """The encoder's DC predictor: least-squares coefficients of the features in Q6, clipped to -128..127."""
    if not F:
        return np.zeros(0, np.int64)
    X = np.stack([f.ravel() for f in F], 1).astype(np.float64)
    if X.shape[0] < X.shape[1]:
        return np.zeros(X.shape[1], np.int64)
    a = np.linalg.lstsq(X, target.ravel().astype(np.float64), rcond=None)[0]
    return np.clip(np.round(a * 64), -128, 127).astype(np.int64)


# ---------------------------------------------------------------- the stream (spec section 5.3.4)
#: Weight code that says 16 explicit weight bytes follow.
EXPLICIT_WEIGHTS = 255
#: Fixed models (sh, shape) of the parameter batches, fitted once to the parameters of the Kodak streams at
#: qualities 30..75 (TAESD): DC predictor coefficients, shift changes, shape-rank changes.
COEF_MODEL = (3, 18)
SHIFT_MODEL = (0, 41)
RANK_MODEL = (0, 52)
_COEF_L, _SHIFT_L, _RANK_L = 256, 2 * rc.MAX_SHIFT + 1, 2 * rc.NSHAPE - 1


@functools.cache
def _shape_order() -> np.ndarray:
    out = np.array(rc.shape_order(), np.int64)
    out.setflags(write=False)
    return out


@functools.cache
def weights_of_code(code: int) -> tuple[int, ...]:
    """The band weights of weight code 0..254: 16 + round(code * (u + v) / 6), at most 255 (code = 16 x slope)."""
    return tuple(min(255, 16 + (2 * code * (u + v) + 6) // 12) for u in range(BLOCK) for v in range(BLOCK))


def weight_code(weights: Sequence[int]) -> int:
    """The code of these weights, or EXPLICIT_WEIGHTS when no code gives them."""
    w = tuple(int(v) for v in weights)
    return next((k for k in range(EXPLICIT_WEIGHTS) if weights_of_code(k) == w), EXPLICIT_WEIGHTS)


def model_references(nb: Sequence[int]) -> list[int]:
    """For each model of a stream in coding order, the index of the model it is coded against (-1: none,
    i.e. sh 0 and rank 0): DC phase 0 against the previous channel's, phase k against phase k - 1, band 1
    against the previous channel's band 1 if it has one (else this channel's phase 3), band i against i - 1."""
    refs: list[int] = []
    prev: int | None = None  # index of the previous channel's first model
    prev_nb = 0
    for n in nb:
        first = len(refs)
        refs += [prev if prev is not None else -1, first, first + 1, first + 2]
        if n > 1:
            refs.append(prev + 4 if prev is not None and prev_nb > 1 else first + 3)
            refs += [first + 4 + i for i in range(n - 2)]
        prev, prev_nb = first, n
    return refs


def header_size(data: bytes, channels: int) -> int:
    """Bytes of a stream's fixed part (weight code, explicit weights, nb[]) before the range coder's words."""
    if not data:
        raise ValueError("empty transform stream")
    return 1 + (BLOCK * BLOCK if data[0] == EXPLICIT_WEIGHTS else 0) + channels


def band_counts(data: bytes, channels: int) -> list[int]:
    """nb[c]: how many bands (in ZIGZAG order) each channel codes."""
    p = header_size(data, channels) - channels
    return list(data[p : p + channels])


def _choose_model(r: np.ndarray, L: int, ref: tuple[int, int]) -> tuple[int, int]:
    """The model of a batch: fewest bits of its residuals plus those of the model's change against ``ref``."""
    t = rc.model_costs(r, L)
    rsh, rshape = ref
    shift_cost = rc.delta_costs(SHIFT_MODEL, _SHIFT_L)[np.arange(rc.MAX_SHIFT + 1) - rsh + rc.MAX_SHIFT]
    rank_cost = rc.delta_costs(RANK_MODEL, _RANK_L)[rc.ranks() - rc.ranks()[rshape] + rc.NSHAPE - 1]
    sh, shape = np.unravel_index(int(np.argmin(t + shift_cost[:, None] + rank_cost[None, :])), t.shape)
    return int(sh), int(shape)


def encode_symbols(
    symbols: np.ndarray, levels: Sequence[int] | np.ndarray, weights: Sequence[int], costs: list[float] | None = None
) -> bytes:
    """The stream of coefficient symbols (C, H, W) with per-channel alphabets ``levels`` and band weights;
    ``costs``, if given, receives the ideal bits of each batch under its model, parameters included (what the
    range coder spends up to its rounding)."""
    S = np.asarray(symbols).astype(np.int64)
    levels = np.asarray(levels).astype(np.int64).ravel()
    if S.ndim != 3 or levels.size != S.shape[0] or (levels < 2).any() or (levels > 65536).any():
        raise ValueError("symbols must be (C, H, W) with one alphabet of 2..65536 per channel")
    C, H, W = S.shape
    if H % BLOCK or W % BLOCK:
        raise ValueError(f"coefficient planes must be multiples of {BLOCK}, got {H}x{W}")
    if len(weights) != BLOCK * BLOCK or not all(1 <= int(v) <= 255 for v in weights):
        raise ValueError("weights must be 16 integers in 1..255")
    if (S < 0).any() or (levels[:, None, None] <= S).any():
        raise ValueError("symbol >= levels")
    zero = (levels - 1) // 2
    nb = []
    for c in range(C):  # the DC band is always coded: it bounds the values a stream can declare
        nz = [i for i, (u, v) in enumerate(ZIGZAG) if (S[c, u::BLOCK, v::BLOCK] != zero[c]).any()]
        nb.append(max(1, nz[-1] + 1 if nz else 1))
    refs = model_references(nb)
    DC = S[:, ::BLOCK, ::BLOCK] - zero[:, None, None]
    coefs: list[np.ndarray] = []
    models: list[tuple[int, int]] = []
    batches: list[tuple[np.ndarray, int]] = []  # (residuals, alphabet); model i codes batch i

    def choose(r: np.ndarray, L: int) -> None:
        ref = models[refs[len(models)]] if refs[len(models)] >= 0 else (0, 0)
        models.append(_choose_model(r, L, ref) if r.size else ref)  # an empty phase copies its reference
        batches.append((r, L))

    for c in range(C):
        L = int(levels[c])
        for k in range(4):
            F = dc_features(DC, c, k)
            target = DC[c, k >> 1 :: 2, k & 1 :: 2]
            a = fit_predictor(F, target) if target.size else np.zeros(feature_count(c, k), np.int64)
            coefs.append(a)
            pred = dc_predict(F, a, int(zero[c]), L, target.size)
            choose(target.ravel() + zero[c] - pred, L)
        for u, v in ZIGZAG[1 : nb[c]]:
            choose(S[c, u::BLOCK, v::BLOCK].ravel() - zero[c], L)
    ref = [models[i] if i >= 0 else (0, 0) for i in refs]
    dsh = np.array([m[0] - f[0] for m, f in zip(models, ref, strict=True)], np.int64)
    drk = np.array([rc.ranks()[m[1]] - rc.ranks()[f[1]] for m, f in zip(models, ref, strict=True)], np.int64)
    parameters = [(np.concatenate(coefs), _COEF_L, COEF_MODEL), (dsh, _SHIFT_L, SHIFT_MODEL),
                  (drk, _RANK_L, RANK_MODEL)]  # fmt: skip
    enc = rc.new_encoder()
    for r, L, (sh, shape) in [*parameters, *((r, L, m) for (r, L), m in zip(batches, models, strict=True))]:
        rc.encode_batch(enc, r, L, sh, shape)
        if costs is not None and r.size:
            costs.append(float(rc.model_costs(r, L)[sh, shape]))
    code = weight_code(weights)
    head = bytes([code]) + (bytes(int(v) for v in weights) if code == EXPLICIT_WEIGHTS else b"") + bytes(nb)
    return head + rc.words_of(enc)


def coded_symbols(nb: Sequence[int], H: int, W: int) -> int:
    """Symbols a stream with band counts ``nb`` range-codes for its coefficients (parameters not counted)."""
    return sum(nb) * (H // BLOCK) * (W // BLOCK)


def decode_symbols(
    data: bytes, shape: Sequence[int], levels: Sequence[int] | np.ndarray
) -> tuple[np.ndarray, tuple[int, ...]]:
    """(coefficient symbols (C, H, W) uint16, band weights) of a stream; ValueError on any inconsistency.

    Checks everything the stream's fixed part declares before it allocates the planes: band counts, and
    the values they bring against what the words can hold (spec section 10)."""
    C, H, W = (int(v) for v in shape)
    if C < 1 or H < 1 or W < 1 or H % BLOCK or W % BLOCK:
        raise ValueError("bad coefficient shape")
    levels = np.asarray(levels).astype(np.int64).ravel()
    if levels.size != C or (levels < 2).any() or (levels > 65536).any():
        raise ValueError("bad levels")
    data = bytes(data)
    hlen = header_size(data, C)
    if len(data) < hlen:
        raise ValueError(f"transform stream of {len(data)} bytes ends inside its {hlen}-byte header")
    weights = tuple(data[1:17]) if data[0] == EXPLICIT_WEIGHTS else weights_of_code(data[0])
    if min(weights) < 1:
        raise ValueError("band weight 0")
    nb = band_counts(data, C)
    if min(nb) < 1 or max(nb) > BLOCK * BLOCK:
        raise ValueError(f"band counts must be 1..{BLOCK * BLOCK}, got {min(nb)}..{max(nb)}")
    words = rc.parse_words(data[hlen:])
    # Every value of the planes comes from a coded DC symbol or a coded band: no symbol costs less than
    # 1/SYMBOLS_PER_BIT bits, so the words bound the work before any of it (spec section 10).
    if coded_symbols(nb, H, W) > rc.symbol_limit(4 * words.size):
        raise ValueError(
            f"{coded_symbols(nb, H, W)} coefficients cannot come from {4 * words.size} bytes of range-coded words"
        )
    from . import transform_decoder as td

    S = np.empty((C, H, W), np.uint16)
    err = td.decode_planes(words, rc.cumulatives(), td.slot_table(), _shape_order(), levels, np.array(nb, np.int64),
                           _ZIGZAG, S)  # fmt: skip
    if err:
        raise ValueError(td.MESSAGES[err])
    return S, weights
