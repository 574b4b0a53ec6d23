"""The transform stream's decoder, compiled: spec sections 6.1 (range decoder), 6.3 (batches), 5.3.2-5.3.4
(models, DC prediction, bands) and 5.3 (dequantization) in one pass over the words.

Why compiled: the stream is about 80 batches, and the DC prediction of each phase needs the phases before
it, so a numpy decoder pays a few microseconds of interpreter per batch and per feature (about 2 ms per
4x64x64 file), where a training data loader wants a fraction of a millisecond. numba compiles these
functions on first use (cached on disk, ``cache=True``) and releases the GIL (``nogil=True``), so threaded
loaders decode in parallel. Nothing here runs at import: :mod:`.transform_coder` imports this module when
it first decodes.

The range decoder is the spec's own (section 6.1), so it needs no library; the encoder side stays
constriction's (:mod:`.rangecode`). The tests decode constriction's streams with it, and spec/vectors
with the reference decoder in spec/.
"""

from __future__ import annotations

import functools

import numba
import numpy as np

from . import rangecode as rc

R, NB = rc.R, rc.NB
_U24, _U32 = np.uint64(24), np.uint64(32)
_TOP = np.uint64(1 << 32)
_ONE = np.uint64(rc.ONE)

#: Error codes of :func:`decode_planes` and the messages the caller raises for them.
OK, Q_RANGE, SYMBOL, MODEL, WORDS_AFTER = 0, 1, 2, 3, 4
MESSAGES = {
    Q_RANGE: "range decoder left its interval (q >= 2**24)",
    SYMBOL: "decoded symbol outside its alphabet",
    MODEL: "band model out of range",
    WORDS_AFTER: "words after the end of the range-coded stream",
}

#: A shape's bins are found from q >> _SLOT_SHIFT: the first bin of each of 1024 slots of 2**14 (then a few
#: steps at most; a binary search per symbol cost twice as much, its compares all on the critical path).
_SLOT_SHIFT = np.uint64(14)


@functools.cache
def slot_table() -> np.ndarray:
    """(NSHAPE, 1024) uint8: the largest bin t with cu[t] <= slot << 14, per shape."""
    cu = rc.cumulatives()
    lo = np.arange(1 << (rc.PRECISION - int(_SLOT_SHIFT)), dtype=np.uint64) << _SLOT_SHIFT
    out = np.stack([np.searchsorted(row, lo, side="right") - 1 for row in cu]).astype(np.uint8)
    out.setflags(write=False)
    return out


# Decoder state between batches, one uint64 array: lower, range, point, words read, last word read. Inside a
# batch it lives in local variables (registers), passed through the small functions below.
_LOWER, _RANGE, _POINT, _READ, _LAST = 0, 1, 2, 3, 4


@numba.njit(cache=True, nogil=True)
def _next_word(words: np.ndarray, read: np.uint64) -> tuple[np.uint64, np.uint64]:
    """(word, words read): the next word, or 0 past the end (which counts nothing)."""
    if read < np.uint64(words.size):
        return np.uint64(words[read]), read + np.uint64(1)
    return np.uint64(0), read


@numba.njit(cache=True, nogil=True)
def _start(st: np.ndarray, words: np.ndarray) -> None:
    hi, read = _next_word(words, np.uint64(0))
    lo, read = _next_word(words, read)
    st[_LOWER], st[_RANGE], st[_POINT], st[_READ], st[_LAST] = 0, 0xFFFFFFFFFFFFFFFF, (hi << _U32) | lo, read, lo


@numba.njit(cache=True, nogil=True)
def _advance(
    words: np.ndarray, lower: np.uint64, point: np.uint64, read: np.uint64, last: np.uint64, scale: np.uint64,
    cu: np.uint64, p: np.uint64,
) -> tuple[np.uint64, np.uint64, np.uint64, np.uint64, np.uint64]:  # fmt: skip
    """Spec 6.1 after a symbol with cumulative cu and probability p: (lower, range, point, read, last)."""
    lower = lower + scale * cu  # wraps modulo 2**64, as the spec's lower does
    rng = scale * p
    if rng < _TOP:
        lower = lower << _U32
        rng = rng << _U32
        last, read = _next_word(words, read)
        point = (point << _U32) | last
    return lower, rng, point, read, last


@numba.njit(cache=True, nogil=True)
def _batch(
    st: np.ndarray, words: np.ndarray, table: np.ndarray, slots: np.ndarray, pred: np.ndarray, out: np.ndarray, n: int,
    L: int, sh: int, shape: int, bins: np.ndarray, lows: np.ndarray,
) -> int:  # fmt: skip
    """Spec 6.3: the n symbols pred + r of one batch into out[:n]; an error code (Q_RANGE: q >= 2**24)."""
    cu = table[shape]
    start = slots[shape]
    lower, rng, point, read, last = st[_LOWER], st[_RANGE], st[_POINT], st[_READ], st[_LAST]
    for i in range(n):
        scale = rng >> _U24
        q = (point - lower) // scale
        if q >= _ONE:
            return Q_RANGE
        t = np.int64(start[q >> _SLOT_SHIFT])  # the largest t with cu[t] <= q: from its slot's first bin on
        while cu[t + 1] <= q:
            t += 1
        bins[i] = t
        lower, rng, point, read, last = _advance(words, lower, point, read, last, scale, cu[t], cu[t + 1] - cu[t])
    E = (L >> sh) + 2
    if sh == 0:
        for i in range(n):
            lows[i] = 0
    if sh > 0:
        p = _ONE // np.uint64(1 << sh)  # U(2**sh): every symbol has probability 2**24 >> sh
        for i in range(n):
            scale = rng >> _U24
            q = (point - lower) // scale
            if q >= _ONE:
                return Q_RANGE
            t = q // p
            lows[i] = t
            lower, rng, point, read, last = _advance(words, lower, point, read, last, scale, t * p, p)
    e_n = np.uint64(E)
    e_p = _ONE // e_n
    for i in range(n):
        b = bins[i]
        if b == 0 or b == NB - 1:  # U(E), 2 <= E <= 2**24: the last symbol takes the remainder
            scale = rng >> _U24
            q = (point - lower) // scale
            if q >= _ONE:
                return Q_RANGE
            t = min(q // e_p, e_n - np.uint64(1))
            pr = e_p if t < e_n - np.uint64(1) else _ONE - t * e_p
            lower, rng, point, read, last = _advance(words, lower, point, read, last, scale, t * e_p, pr)
            hh = -R - 1 - np.int64(t) if b == 0 else R + 1 + np.int64(t)
        else:
            hh = b - R - 1
        s = pred[i] + (hh << sh) + lows[i]
        if s < 0 or s >= L:
            return SYMBOL
        out[i] = s
    st[_LOWER], st[_RANGE], st[_POINT], st[_READ], st[_LAST] = lower, rng, point, read, last
    return OK


@numba.njit(cache=True, nogil=True)
def _mirror(D: np.ndarray, i: int, j: int, dy: int, dx: int) -> int:
    """N(dy, dx) of spec 5.3.3: the neighbour, mirrored across an edge, 0 where the mirror is outside too."""
    hb, wb = D.shape
    ii = i + dy if 0 <= i + dy < hb else i - dy
    jj = j + dx if 0 <= j + dx < wb else j - dx
    if 0 <= ii < hb and 0 <= jj < wb:
        return D[ii, jj]
    return 0


@numba.njit(cache=True, nogil=True)
def decode_planes(
    words: np.ndarray, table: np.ndarray, slots: np.ndarray, order: np.ndarray, levels: np.ndarray, nb: np.ndarray,
    zigzag: np.ndarray, S: np.ndarray,
) -> int:  # fmt: skip
    """Decode a stream's words into the coefficient symbols S (C, H, W) (every value written); an error code.

    table: (NSHAPE, NB + 1) uint64 cumulatives of the shapes; slots: :func:`slot_table`; order: the shape order
    (rank -> shape); levels, nb: per channel; zigzag: (16, 2) band positions."""
    C, H, W = S.shape
    hb, wb = H // 4, W // 4
    st = np.zeros(5, np.uint64)
    _start(st, words)
    nfs = np.array((0, 1, 2, 2))
    n_coef = 0
    for c in range(C):
        for k in range(4):
            n_coef += nfs[k] + min(c, 3)
    M = 0
    for c in range(C):
        M += nb[c] + 3
    big = max(n_coef, M, hb * wb)
    pred = np.empty(big, np.int64)
    out = np.empty(big, np.int64)
    bins = np.empty(big, np.int64)
    lows = np.empty(big, np.int64)

    # 5.3.2: the DC predictor coefficients, then the shift and rank changes of every model
    pred[:n_coef] = 128
    err = _batch(st, words, table, slots, pred, out, n_coef, 256, 3, 18, bins, lows)
    if err:
        return err
    coef = out[:n_coef] - 128
    pred[:M] = 16
    err = _batch(st, words, table, slots, pred, out, M, 33, 0, 41, bins, lows)
    if err:
        return err
    dsh = out[:M] - 16
    pred[:M] = 75
    err = _batch(st, words, table, slots, pred, out, M, 151, 0, 52, bins, lows)
    if err:
        return err
    drk = out[:M] - 75
    msh = np.empty(M, np.int64)
    mrk = np.empty(M, np.int64)
    first = np.empty(C, np.int64)  # index of channel c's first model
    idx = 0
    for c in range(C):
        first[c] = idx
        for slot in range(nb[c] + 3):
            if slot == 0:
                ref = first[c - 1] if c >= 1 else -1
            elif slot == 4:  # band 1: the previous channel's band 1 if it has one, else this channel's phase 3
                ref = first[c - 1] + 4 if c >= 1 and nb[c - 1] >= 2 else idx - 1
            else:
                ref = idx - 1
            rsh = msh[ref] if ref >= 0 else 0
            rrk = mrk[ref] if ref >= 0 else 0
            msh[idx] = rsh + dsh[idx]
            mrk[idx] = rrk + drk[idx]
            if not (0 <= msh[idx] <= 16 and 0 <= mrk[idx] < order.size):
                return MODEL
            idx += 1

    # 5.3.3 and 5.3.4: channel by channel, the four DC phases, then the bands
    DC = np.zeros((C, hb, wb), np.int64)
    pos_i = np.empty(hb * wb, np.int64)
    pos_j = np.empty(hb * wb, np.int64)
    ci = 0  # next DC predictor coefficient
    for c in range(C):
        L = levels[c]
        Z = (L - 1) // 2
        S[c, :, :] = Z
        D = DC[c]
        for k in range(4):
            n = 0
            for i in range(k >> 1, hb, 2):
                for j in range(k & 1, wb, 2):
                    pos_i[n] = i
                    pos_j[n] = j
                    n += 1
            nf = nfs[k] + min(c, 3)
            for t in range(n):
                i, j = pos_i[t], pos_j[t]
                acc = 0
                f = 0
                if k >= 2:
                    diag = _mirror(D, i, j, -1, -1) + _mirror(D, i, j, -1, 1)
                    diag += _mirror(D, i, j, 1, -1) + _mirror(D, i, j, 1, 1)
                    vert = _mirror(D, i, j, -1, 0) + _mirror(D, i, j, 1, 0)
                    if k == 2:
                        acc += coef[ci] * vert + coef[ci + 1] * diag
                    else:
                        horiz = _mirror(D, i, j, 0, -1) + _mirror(D, i, j, 0, 1)
                        acc += coef[ci] * diag + coef[ci + 1] * (vert + horiz)
                    f = 2
                elif k == 1:
                    acc += coef[ci] * (_mirror(D, i, j, 0, -1) + _mirror(D, i, j, 0, 1))
                    f = 1
                for d in range(1, min(c, 3) + 1):
                    acc += coef[ci + f] * DC[c - d, i, j]
                    f += 1
                p = Z + ((acc + 32) >> 6)
                pred[t] = min(max(p, 0), L - 1)
            ci += nf
            m = first[c] + k
            err = _batch(st, words, table, slots, pred, out, n, L, msh[m], order[mrk[m]], bins, lows)
            if err:
                return err
            for t in range(n):
                i, j = pos_i[t], pos_j[t]
                D[i, j] = out[t] - Z
                S[c, 4 * i, 4 * j] = out[t]
        n = hb * wb
        pred[:n] = Z
        for b in range(1, nb[c]):
            m = first[c] + 3 + b
            err = _batch(st, words, table, slots, pred, out, n, L, msh[m], order[mrk[m]], bins, lows)
            if err:
                return err
            u, v = zigzag[b, 0], zigzag[b, 1]
            t = 0
            for i in range(hb):
                for j in range(wb):
                    S[c, 4 * i + u, 4 * j + v] = out[t]
                    t += 1

    # 6.1, end check: every word read, and the last word read (0 past the end) is 0
    if st[_READ] != np.uint64(words.size) or st[_LAST] != np.uint64(0):
        return WORDS_AFTER
    return OK


@numba.njit(cache=True, nogil=True)
def dequantize_planes(
    S: np.ndarray, zero: np.ndarray, scale: np.ndarray, offset: np.ndarray, weight: np.ndarray,
    basis: np.ndarray, out: np.ndarray,
) -> None:  # fmt: skip
    """Spec 5.3's dequantization into out (C, h, w) float32: per 4x4 block, X = q * scale * (w / 16) in
    binary64, rows then columns of the inverse DCT in the spec's order of additions, + offset, one rounding
    to binary32. weight: (4, 4) float64 w / 16; basis: T (4, 4) float64."""
    C, H, W = S.shape
    h, w = out.shape[1], out.shape[2]
    X = np.empty((4, 4))
    t = np.empty((4, 4))
    for c in range(C):
        sc = scale[c]
        for bi in range(H // 4):
            for bj in range(W // 4):
                for u in range(4):
                    for v in range(4):
                        X[u, v] = (np.float64(np.int64(S[c, 4 * bi + u, 4 * bj + v]) - zero[c]) * sc) * weight[u, v]
                for u in range(4):  # t[u][x] = sum over v of X[u][v] T[v][x]
                    for x in range(4):
                        t[u, x] = ((X[u, 0] * basis[0, x] + X[u, 1] * basis[1, x]) + X[u, 2] * basis[2, x]) + X[
                            u, 3
                        ] * basis[3, x]
                for r in range(4):  # Y[r][x] = sum over u of T[u][r] t[u][x]
                    y = 4 * bi + r
                    if y >= h:
                        break
                    for x in range(4):
                        xx = 4 * bj + x
                        if xx >= w:
                            break
                        v = ((basis[0, r] * t[0, x] + basis[1, r] * t[1, x]) + basis[2, r] * t[2, x]) + basis[
                            3, r
                        ] * t[3, x]
                        out[c, y, xx] = np.float32(v + offset[c])
