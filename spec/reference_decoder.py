"""Reference decoder of the SDL latent image format, version 1.0, written from spec/sdl-v1.md alone.

A deliberately plain second implementation (standard library, numpy, zstandard): one function per section of
the specification, comments citing the section numbers. It decodes the latent layer (section 5) and the alpha
plane (section 7) bit-exactly and checks every reader rule; it does not run the autoencoder (section 9).

    python spec/reference_decoder.py spec/vectors     # check every test vector (section 11)
    python spec/reference_decoder.py FILE.sdl         # print the decoded header
"""

from __future__ import annotations

import bisect
import itertools
import struct
import sys
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import zstandard


class SDLError(ValueError):
    """The file is rejected (section 1: stop decoding and report an error)."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SDLError(message)


SIGNATURE = b"\x89SDL\r\n\x1a\n"  # section 2
DATA_CHUNKS = ("PLTE", "ALPH", "LDAT")
KNOWN_ANCILLARY = ("eXIf", "iCCP", "xMPt", "prVw")
MODES = ("L", "RGB", "LA", "RGBA")
QUANTIZERS = ("scalar", "palette", "transform", "float")
ELEMENTS = {1: "binary16", 2: "bfloat16", 3: "binary32"}  # section 5.4: the float quantizer's element formats


# ---------------------------------------------------------------------------------------------------------------
# Sections 2 and 3: signature and chunks


def read_chunks(data: bytes) -> list[tuple[str, bytes]]:
    """The CRC-checked chunks from HEAD up to (not including) SEND; ancillary chunks with a bad CRC are dropped."""
    check(data[:8] == SIGNATURE, "not an SDL file: signature (2)")
    chunks: list[tuple[str, bytes]] = []
    pos, first = 8, True
    while True:
        check(pos + 8 <= len(data), "stream ends before SEND (3, rule 4)")
        length, raw_type = struct.unpack_from(">I4s", data, pos)
        check(length <= 2**31 - 1, "chunk length above 2^31 - 1 (3)")
        check(raw_type.isalpha(), f"chunk type {raw_type!r} is not four ASCII letters (3)")
        name = raw_type.decode("ascii")
        payload = data[pos + 8 : pos + 8 + length]  # read what is there, then check (10)
        check(len(payload) == length and pos + 12 + length <= len(data), f"{name}: truncated chunk (3, rule 4)")
        (crc,) = struct.unpack_from(">I", data, pos + 8 + length)
        pos += 12 + length
        critical = name[0].isupper()
        check(not first or name == "HEAD", "HEAD is not the first chunk (3, rule 1)")
        first = False
        if zlib.crc32(raw_type + payload) != crc:
            check(not critical, f"{name}: CRC mismatch in a critical chunk (3)")
            warnings.warn(f"{name}: CRC mismatch, ancillary chunk dropped (3)", stacklevel=2)
            continue
        if name == "SEND":
            check(length == 0, "SEND has a payload (3, rule 2)")
            return chunks  # bytes after SEND are ignored (3, rule 1)
        chunks.append((name, payload))


# ---------------------------------------------------------------------------------------------------------------
# Section 4: HEAD


def parse_head(p: bytes) -> dict[str, Any]:
    check(len(p) >= 37, "HEAD too short (4)")
    major, minor, width, height, mode, f, C, quantizer, coder, K = struct.unpack_from(">BBIIBBHBBI", p)
    n = p[36]
    check(major == 1, f"unsupported major version {major} (4)")
    check(len(p) == 37 + n + 10 * C, "HEAD length is not 37 + n + 10 C (4)")
    check(1 <= width <= 2**24 and 1 <= height <= 2**24, "width or height outside 1 ..= 2^24 (4, 10)")
    check(mode <= 3, f"unknown mode {mode} (4)")
    check(1 <= f <= 64, f"downscale {f} outside 1 ..= 64 (4)")
    check(1 <= C <= min(1024, 4 * f * f), f"channels {C} outside 1 ..= min(1024, 4 f^2) (4, 10)")
    check(quantizer <= 3, f"unknown quantizer {quantizer} (4)")
    check(coder <= 2, f"unknown coder {coder} (4)")
    pairs = ((0, 0), (0, 1), (1, 0), (1, 1), (2, 2), (3, 0), (3, 1))
    check((quantizer, coder) in pairs, "invalid quantizer/coder pair (4)")
    if quantizer == 1:
        check(1 <= K <= 65536, f"palette size {K} outside 1 ..= 65536 (4, 10)")
    elif quantizer == 3:
        check(K in ELEMENTS, f"unknown element format {K} (4, 5.4)")
    else:
        check(K == 0, "palette size must be 0 without the palette quantizer (4)")
    model_id = p[37 : 37 + n]
    check(b"\0" not in model_id, "model_id holds a NUL (4)")
    try:
        model_id_text = model_id.decode("utf-8")
    except UnicodeDecodeError:
        raise SDLError("model_id is not UTF-8 (4)") from None
    h, w = -(-height // f), -(-width // f)
    check(C * h * w <= 2**30, "more than 2^30 latent values (10)")
    table = np.frombuffer(p, dtype=[("offset", ">f4"), ("scale", ">f4"), ("levels1", ">u2")], offset=37 + n)
    offset, scale = table["offset"].astype(np.float32), table["scale"].astype(np.float32)
    levels = table["levels1"].astype(np.int64) + 1
    check(bool((levels >= 2).all()), "a stored levels - 1 of 0 (4)")
    check(bool(np.isfinite(offset).all() and np.isfinite(scale).all()), "offset or scale not finite (4)")
    with np.errstate(over="ignore", invalid="ignore"):
        top = np.float32(scale * (levels - 1).astype(np.float32)) + offset  # float32 throughout
    check(bool(np.isfinite(top).all()), "the top symbol does not dequantize to a finite binary32 (4, 10)")
    if quantizer == 3:  # 5.4: the table holds offset +0.0, scale 1.0, levels - 1 = 65535 in every channel
        rows = p[37 + n :]
        check(rows == bytes.fromhex("00000000" "3f800000" "ffff") * C, "float quantizer: channel table (5.4)")
    return {
        "version": (major, minor), "width": width, "height": height, "mode": MODES[mode], "downscale": f,
        "channels": C, "quantizer": QUANTIZERS[quantizer], "coder": ("raw", "zstd", "range")[coder],
        "palette_size": K if quantizer == 1 else 0, "element": ELEMENTS[K] if quantizer == 3 else None,
        "fingerprint": p[20:36].hex(), "model_id": model_id_text,
        "offset": offset, "scale": scale, "levels": levels, "h": h, "w": w,
        "symbol_width": 1 if levels.max() <= 256 else 2, "index_width": 1 if K <= 256 else 2,
    }


# ---------------------------------------------------------------------------------------------------------------
# Section 5: zstd payloads


def zstd_payload(p: bytes, n: int) -> bytes:
    """Exactly one Zstandard frame (RFC 8878) that declares and yields exactly `n` bytes."""
    check(p[:4] == b"\x28\xb5\x2f\xfd", "zstd payload does not start with the frame magic (5)")
    check(len(p) >= 5, "zstd frame header truncated (5)")
    fhd = p[4]
    fcs_flag, single_segment, reserved = fhd >> 6, fhd >> 5 & 1, fhd >> 3 & 1
    has_checksum, did_flag = fhd >> 2 & 1, fhd & 3
    check(reserved == 0, "zstd frame header reserved bit set (5)")
    pos = 5 + (1 - single_segment)  # Window_Descriptor unless single segment
    did_size = (0, 1, 2, 4)[did_flag]
    fcs_size = (single_segment, 2, 4, 8)[fcs_flag]
    check(pos + did_size + fcs_size <= len(p), "zstd frame header truncated (5)")
    check(int.from_bytes(p[pos : pos + did_size], "little") == 0, "zstd frame uses a dictionary (5)")
    pos += did_size
    check(fcs_size > 0, "zstd frame does not declare its content size (5)")
    content_size = int.from_bytes(p[pos : pos + fcs_size], "little") + (256 if fcs_size == 2 else 0)
    check(content_size == n, f"zstd content size {content_size}, expected {n} (5)")
    pos += fcs_size
    while True:  # the end of the frame, from the block headers alone
        check(pos + 3 <= len(p), "zstd frame truncated (5)")
        block = int.from_bytes(p[pos : pos + 3], "little")
        last, block_type, size = block & 1, block >> 1 & 3, block >> 3
        check(block_type != 3, "zstd reserved block type (5)")
        pos += 3 + (1 if block_type == 1 else size)
        if last:
            break
    pos += 4 * has_checksum
    check(pos <= len(p), "zstd frame truncated (5)")
    check(pos == len(p), "bytes after the zstd frame (5)")
    out = bytearray()
    try:  # do not trust the frame: stop after n + 1 bytes
        reader = zstandard.ZstdDecompressor(max_window_size=2**31).stream_reader(p, read_across_frames=False)
        while len(out) <= n:
            piece = reader.read(min(n + 1 - len(out), 2**20))  # bounded pieces: no allocation of n up front
            if not piece:
                break
            out += piece
    except zstandard.ZstdError as e:
        raise SDLError(f"zstd: {e} (5)") from None
    check(len(out) == n, f"zstd frame yields {len(out)}{'+' if len(out) > n else ''} bytes, expected {n} (5)")
    return bytes(out)


def symbols_payload(hd: dict[str, Any], p: bytes, n: int) -> bytes:
    """Coder 0 (raw, length exactly n) or 1 (zstd), sections 5.1 and 5.2."""
    if hd["coder"] == "raw":
        check(len(p) == n, f"raw payload of {len(p)} bytes, expected {n} (5.1)")
        return p
    return zstd_payload(p, n)


def unsigned(raw: bytes, width: int) -> np.ndarray:
    return np.frombuffer(raw, dtype=">u1" if width == 1 else ">u2").astype(np.int64)


# ---------------------------------------------------------------------------------------------------------------
# Sections 5.1 and 5.2: scalar and palette quantizers


def dequantize_scalar(hd: dict[str, Any], S: np.ndarray) -> np.ndarray:
    """5.1: Z = float32(float32(scale * float32(S)) + offset), no fused multiply-add."""
    levels = hd["levels"][:, None, None]
    check(bool((levels > S).all()), "symbol >= levels[c] (5.1)")
    return hd["scale"][:, None, None] * S.astype(np.float32) + hd["offset"][:, None, None]  # binary32 ops


def decode_scalar(hd: dict[str, Any], ldat: bytes) -> np.ndarray:
    C, h, w, s = hd["channels"], hd["h"], hd["w"], hd["symbol_width"]
    S = unsigned(symbols_payload(hd, ldat, C * h * w * s), s).reshape(C, h, w)
    return dequantize_scalar(hd, S)


def decode_palette(hd: dict[str, Any], plte: bytes, ldat: bytes) -> np.ndarray:
    C, h, w, s, i, K = hd["channels"], hd["h"], hd["w"], hd["symbol_width"], hd["index_width"], hd["palette_size"]
    check(len(plte) == K * C * s, "PLTE length is not K C s (5.2)")
    P = unsigned(plte, s).reshape(K, C)
    levels = hd["levels"][None, :]
    check(bool((levels > P).all()), "palette entry >= levels[c] (5.2)")
    index = unsigned(symbols_payload(hd, ldat, h * w * i), i).reshape(h, w)
    check(bool((index < K).all()), "palette index >= K (5.2)")
    return dequantize_scalar(hd, P[index].transpose(2, 0, 1))


# ---------------------------------------------------------------------------------------------------------------
# Section 6.1: the range decoder

MASK64 = 2**64 - 1


class Uniform:
    """6.1: U(E), 2 <= E <= 2^24."""

    def __init__(self, E: int) -> None:
        self.E, self.p = E, 2**24 // E

    def find(self, q: int) -> tuple[int, int, int]:
        t = min(q // self.p, self.E - 1)
        return t, t * self.p, (self.p if t < self.E - 1 else 2**24 - t * self.p)


class Cumulative:
    """A model given by its cumulative list 0 = Cu[0] < ... < Cu[n] = 2^24 (6.1)."""

    def __init__(self, cu: list[int]) -> None:
        assert cu[0] == 0 and cu[-1] == 2**24 and all(a < b for a, b in itertools.pairwise(cu))
        self.cu = cu

    def find(self, q: int) -> tuple[int, int, int]:
        t = bisect.bisect_right(self.cu, q) - 1
        return t, self.cu[t], self.cu[t + 1] - self.cu[t]


class RangeDecoder:
    def __init__(self, words: list[int]) -> None:
        self.words, self.read = words, 0
        self.lower, self.range = 0, 2**64 - 1
        self.point = (self.next() << 32) | self.next()

    def next(self) -> int:
        if self.read == len(self.words):
            self.last = 0  # past the end: 0, counts nothing
        else:
            self.read += 1
            self.last = self.words[self.read - 1]
        return self.last

    def decode(self, model: Uniform | Cumulative) -> int:
        scale = self.range >> 24
        q = ((self.point - self.lower) & MASK64) // scale
        check(q < 2**24, "range decoder: q >= 2^24 (6.1)")
        t, cu, p = model.find(q)
        self.lower = (self.lower + scale * cu) & MASK64
        self.range = scale * p
        if self.range < 2**32:
            self.lower = (self.lower << 32) & MASK64
            self.range <<= 32
            self.point = ((self.point << 32) & MASK64) | self.next()
        return t

    def end_check(self) -> None:
        check(self.read == len(self.words), "words after the end of the range-coded stream (6.1, end check)")
        check(self.last == 0, "the last word read is not 0: words after the end of the stream (6.1, end check)")


# ---------------------------------------------------------------------------------------------------------------
# Section 6.2: the model family

R, NB = 16, 35
SHAPE_ORDER_PRINTED = [
    0, 38, 1, 39, 2, 40, 3, 41, 4, 42, 5, 43, 6, 44, 7, 45, 8, 9, 46, 10, 47, 11, 12, 48, 49, 13, 50, 14, 15, 16, 17,
    51, 18, 19, 20, 52, 21, 22, 53, 23, 24, 54, 25, 26, 27, 28, 55, 29, 30, 56, 31, 32, 57, 33, 34, 58, 35, 36, 59,
    37, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75,
]  # fmt: skip


def shape_tables() -> tuple[list[Cumulative], list[int]]:
    """The 76 shape models and the shape order, computed from the integer recipe of 6.2."""
    theta = [256 * k for k in (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112)]
    theta += [65536 * (m - 1) // m for m in (2, 3, 4, 5, 6, 8, 10, 12, 15, 18, 22, 27, 33, 40, 48, 58,
                                             70, 85, 103, 125, 150, 180, 220, 270, 330, 400)]  # fmt: skip
    assert len(theta) == 38
    F = 2**24 - NB
    models, centre = [], []
    for s in range(76):
        j, e = (s, lambda h: h * h) if s < 38 else (s - 38, abs)
        v = [2**24]
        for _ in range((R + 64) ** 2):
            v.append(v[-1] * theta[j] >> 16)
        g = {h: v[e(h)] + 1 for h in range(-R - 64, R + 65)}
        weight = [0] * NB
        for h in range(-R, R + 1):
            weight[h + R + 1] = g[h]
        weight[0] = weight[NB - 1] = sum(g[h] for h in range(R + 1, R + 65))
        total = sum(weight)
        freq = [wb * F // total for wb in weight]
        freq[R + 1] += F - sum(freq)
        cu = [0]
        for b in range(NB):
            cu.append(cu[-1] + freq[b] + 1)  # P[b] = freq[b] + 1
        models.append(Cumulative(cu))
        centre.append(freq[R + 1])
    order = sorted(range(76), key=lambda s: (-centre[s], s))
    if order != SHAPE_ORDER_PRINTED:
        raise RuntimeError(f"computed shape order differs from the list printed in 6.2: {order}")
    return models, order


SHAPES, SHAPE_ORDER = shape_tables()


# ---------------------------------------------------------------------------------------------------------------
# Section 6.3: a batch


def batch(dec: RangeDecoder, preds: list[int], L: int, sh: int, shape: int) -> list[int]:
    """The symbols pred + r of one batch of len(preds) residuals r; each must lie in 0 ..= L - 1."""
    n = len(preds)
    bins = [dec.decode(SHAPES[shape]) for _ in range(n)]
    lows = [dec.decode(Uniform(1 << sh)) for _ in range(n)] if sh > 0 else [0] * n
    escape = Uniform(max(2, (L >> sh) + 2))
    out = []
    for pred, b, low in zip(preds, bins, lows, strict=True):
        if b == 0:
            hh = -R - 1 - dec.decode(escape)
        elif b == NB - 1:
            hh = R + 1 + dec.decode(escape)
        else:
            hh = b - R - 1
        symbol = pred + (hh << sh) + low
        check(0 <= symbol < L, f"symbol {symbol} outside 0 ..= {L - 1} (5.3)")
        out.append(symbol)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Section 5.3: quantizer 2, transform

ZIGZAG = [(0, 0), (0, 1), (1, 0), (2, 0), (1, 1), (0, 2), (0, 3), (1, 2),
          (2, 1), (3, 0), (3, 1), (2, 2), (1, 3), (2, 3), (3, 2), (3, 3)]  # fmt: skip
A = float.fromhex("0x1.4e7ae9144f0fcp-1")
B = float.fromhex("0x1.1517a7bdb3896p-2")
T = np.array([[0.5, 0.5, 0.5, 0.5], [A, B, -B, -A], [0.5, -0.5, -0.5, 0.5], [B, -A, A, -B]], dtype=np.float64)


def stream_header(C: int, p: bytes) -> tuple[np.ndarray, list[int], bytes]:
    """5.3.1: weight code, explicit weights, nb[], and the word bytes."""
    check(len(p) >= 1, "empty transform stream (5.3.1)")
    wc, pos = p[0], 1
    if wc == 255:
        check(len(p) >= 17, "transform stream truncated in the weights (5.3.1)")
        weight = np.frombuffer(p, dtype=np.uint8, count=16, offset=1).reshape(4, 4).astype(np.float64)
        check(bool((weight >= 1).all()), "band weight 0 (5.3.1)")
        pos = 17
    else:
        weight = np.array([[min(255, 16 + (2 * wc * (u + v) + 6) // 12) for v in range(4)] for u in range(4)],
                          dtype=np.float64)  # fmt: skip
    nb = list(p[pos : pos + C])
    check(len(nb) == C, "transform stream truncated in nb[] (5.3.1)")
    check(all(1 <= x <= 16 for x in nb), "nb[c] outside 1 ..= 16 (5.3.1)")
    words = p[pos + C :]
    check(len(words) % 4 == 0, "range-coder words: length not a multiple of 4 (5.3.1)")
    return weight, nb, words


def rebuild_models(C: int, nb: list[int], dsh: list[int], drk: list[int]) -> list[list[tuple[int, int]]]:
    """5.3.2: models[c][slot] = (sh, shape); slots 0-3 the DC phases, slot 3 + b band b."""
    models: list[list[tuple[int, int]]] = []  # (sh, rank) while rebuilding
    idx = 0
    for c in range(C):
        ch: list[tuple[int, int]] = []
        for slot in range(nb[c] + 3):
            if slot == 0:
                ref = models[c - 1][0] if c >= 1 else (0, 0)
            elif slot == 4:  # band 1
                ref = models[c - 1][4] if c >= 1 and nb[c - 1] >= 2 else ch[3]
            else:  # DC phase k >= 1, band b >= 2
                ref = ch[slot - 1]
            sh, rank = ref[0] + dsh[idx] - 16, ref[1] + drk[idx] - 75
            check(0 <= sh <= 16 and 0 <= rank <= 75, f"model ({sh}, rank {rank}) out of range (5.3.2)")
            ch.append((sh, rank))
            idx += 1
        models.append(ch)
    return [[(sh, SHAPE_ORDER[rank]) for sh, rank in ch] for ch in models]


def spatial_features(D: list[list[int]], i: int, j: int, k: int) -> list[int]:
    """5.3.3: the spatial features of position (i, j) in phase k, from mirrored neighbours."""
    hb, wb = len(D), len(D[0])

    def N(dy: int, dx: int) -> int:
        ii = i + dy if 0 <= i + dy < hb else i - dy
        jj = j + dx if 0 <= j + dx < wb else j - dx
        return D[ii][jj] if 0 <= ii < hb and 0 <= jj < wb else 0

    diagonal = N(-1, -1) + N(-1, 1) + N(1, -1) + N(1, 1)
    if k == 0:
        return []
    if k == 1:
        return [N(0, -1) + N(0, 1)]
    if k == 2:
        return [N(-1, 0) + N(1, 0), diagonal]
    return [diagonal, N(-1, 0) + N(1, 0) + N(0, -1) + N(0, 1)]


def decode_transform(hd: dict[str, Any], ldat: bytes) -> np.ndarray:
    C, h, w, levels = hd["channels"], hd["h"], hd["w"], [int(x) for x in hd["levels"]]
    H, W = 4 * -(-h // 4), 4 * -(-w // 4)
    hb, wb = H // 4, W // 4
    weight, nb, word_bytes = stream_header(C, ldat)
    check(hb * wb * sum(nb) <= 180 * (8 * len(word_bytes) + 64), "range-coded LDAT too short for its size (10)")
    dec = RangeDecoder(list(struct.unpack(f">{len(word_bytes) // 4}I", word_bytes)))

    def NF(c: int, k: int) -> int:
        return (0, 1, 2, 2)[k] + min(c, 3)

    # 5.3.2: coefficient, shift and rank batches
    n_coef = sum(NF(c, k) for c in range(C) for k in range(4))
    a_flat = [v - 128 for v in batch(dec, [128] * n_coef, 256, 3, 18)]
    a: list[list[list[int]]] = []
    for c in range(C):
        a.append([])
        for k in range(4):
            a[c].append(a_flat[: NF(c, k)])
            a_flat = a_flat[NF(c, k) :]
    M = sum(x + 3 for x in nb)
    dsh = batch(dec, [16] * M, 33, 0, 41)
    drk = batch(dec, [75] * M, 151, 0, 52)
    models = rebuild_models(C, nb, dsh, drk)

    # 5.3.3 and 5.3.4: the bands, channel by channel
    S = np.empty((C, H, W), dtype=np.int64)
    DC: list[list[list[int]]] = []
    for c in range(C):
        Zc, L = (levels[c] - 1) // 2, levels[c]
        S[c] = Zc
        D = [[0] * wb for _ in range(hb)]
        for k in range(4):
            positions = [(i, j) for i in range(k >> 1, hb, 2) for j in range(k & 1, wb, 2)]
            preds = []
            for i, j in positions:
                F = spatial_features(D, i, j, k) + [DC[c - d][i][j] for d in (1, 2, 3) if c - d >= 0]
                acc = sum(x * y for x, y in zip(a[c][k], F, strict=True))
                preds.append(min(max(Zc + ((acc + 32) >> 6), 0), L - 1))
            sh, shape = models[c][k]
            for (i, j), symbol in zip(positions, batch(dec, preds, L, sh, shape), strict=True):
                D[i][j] = symbol - Zc
                S[c, 4 * i, 4 * j] = symbol
        DC.append(D)
        for b in range(1, nb[c]):
            u, v = ZIGZAG[b]
            sh, shape = models[c][3 + b]
            S[c, u::4, v::4] = np.array(batch(dec, [Zc] * (hb * wb), L, sh, shape)).reshape(hb, wb)
    dec.end_check()

    # 5.3: dequantization, binary64 in the stated order, then one conversion to binary32
    Zc_all = np.array([(x - 1) // 2 for x in levels], dtype=np.int64)
    q = (S - Zc_all[:, None, None]).astype(np.float64)
    X = q.reshape(C, hb, 4, wb, 4).transpose(0, 1, 3, 2, 4)  # [c][i][j][u][v]
    X = X * hd["scale"].astype(np.float64)[:, None, None, None, None] * weight / 16
    t = ((X[..., 0:1] * T[0] + X[..., 1:2] * T[1]) + X[..., 2:3] * T[2]) + X[..., 3:4] * T[3]  # [u][x]
    Y = ((T[0][:, None] * t[..., 0:1, :] + T[1][:, None] * t[..., 1:2, :]) + T[2][:, None] * t[..., 2:3, :]) \
        + T[3][:, None] * t[..., 3:4, :]  # [r][x]
    with np.errstate(over="ignore"):
        Z = (Y + hd["offset"].astype(np.float64)[:, None, None, None, None]).astype(np.float32)
    Z = Z.transpose(0, 1, 3, 2, 4).reshape(C, H, W)[:, :h, :w]
    check(bool(np.isfinite(Z).all()), "a latent overflows binary32 (5.3)")
    return np.ascontiguousarray(Z)


# ---------------------------------------------------------------------------------------------------------------
# Section 5.4: quantizer 3, float


def decode_float(hd: dict[str, Any], ldat: bytes) -> np.ndarray:
    """5.4: the byte planes of the values' bit patterns, most significant plane first; Z = the values, exactly."""
    C, h, w = hd["channels"], hd["h"], hd["w"]
    b = 4 if hd["element"] == "binary32" else 2
    n = C * h * w
    planes = np.frombuffer(symbols_payload(hd, ldat, b * n), dtype=np.uint8).reshape(b, n)
    bits = np.zeros(n, dtype=np.uint64)
    for k in range(b):  # plane k holds byte k of every value, big-endian (byte 0 the most significant)
        bits = (bits << np.uint64(8)) | planes[k].astype(np.uint64)
    if hd["element"] == "binary16":
        check(bool(((bits & 0x7C00) != 0x7C00).all()), "binary16 infinity or NaN (5.4)")
        Z = bits.astype(np.uint16).view(np.float16).astype(np.float32)  # exact, subnormals included
    elif hd["element"] == "bfloat16":
        check(bool(((bits & 0x7F80) != 0x7F80).all()), "bfloat16 infinity or NaN (5.4)")
        Z = (bits << np.uint64(16)).astype(np.uint32).view(np.float32)
    else:
        check(bool(((bits & 0x7F800000) != 0x7F800000).all()), "binary32 infinity or NaN (5.4)")
        Z = bits.astype(np.uint32).view(np.float32)
    return Z.reshape(C, h, w)


# ---------------------------------------------------------------------------------------------------------------
# Section 7: ALPH


def decode_alpha(hd: dict[str, Any], p: bytes) -> np.ndarray:
    check(len(p) >= 1, "empty ALPH (7)")
    check(p[0] in (0, 1), f"unknown ALPH filter {p[0]} (7)")
    width, height = hd["width"], hd["height"]
    D = np.frombuffer(zstd_payload(p[1:], width * height), dtype=np.uint8).reshape(height, width)
    return np.cumsum(D, axis=1, dtype=np.uint8) if p[0] == 1 else D.copy()  # filter 1: sub, mod 256


# ---------------------------------------------------------------------------------------------------------------
# Section 13: prVw


def parse_preview(hd: dict[str, Any], p: bytes) -> np.ndarray | None:
    """The map [K][F] as binary64, or None (with a warning) when the chunk is to be ignored."""
    F = 1 + 2 * hd["channels"]
    K = p[2] if len(p) >= 3 else 0
    if len(p) < 3 or p[0] != 1 or p[1] != 1 or K not in (1, 3) or len(p) != 3 + 2 * K * F:
        warnings.warn("prVw: unknown version, basis, outputs or length; chunk ignored (13)", stacklevel=2)
        return None
    m = np.frombuffer(p, dtype=">f2", offset=3).astype(np.float64).reshape(K, F)
    if not np.isfinite(m).all():
        warnings.warn("prVw: a coefficient is not finite; chunk ignored (13)", stacklevel=2)
        return None
    return m


def render_preview(hd: dict[str, Any], Z: np.ndarray, alpha: np.ndarray | None, m: np.ndarray) -> np.ndarray:
    """13: the w x h preview, uint8 [h][w][K (+1 with alpha)]; samples may differ by one between readers."""
    Zp = np.pad(Z.astype(np.float64), ((0, 0), (1, 1), (1, 1)), mode="edge")
    lap = (Zp[:, :-2, 1:-1] + Zp[:, 2:, 1:-1] + Zp[:, 1:-1, :-2] + Zp[:, 1:-1, 2:]) / 4 - Zp[:, 1:-1, 1:-1]
    feats = np.concatenate([np.ones((1, *Z.shape[1:])), Z.astype(np.float64), lap])  # [F][h][w]
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.clip(np.round(np.einsum("kf,fyx->yxk", m, feats)), 0, 255).astype(np.uint8)
    if alpha is not None:
        f, h, w = hd["downscale"], hd["h"], hd["w"]
        mean = [[alpha[y * f : y * f + f, x * f : x * f + f].mean() for x in range(w)] for y in range(h)]
        out = np.concatenate([out, np.round(np.array(mean))[..., None].astype(np.uint8)], axis=2)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The whole file


def decode(data: bytes) -> tuple[dict[str, Any], np.ndarray, np.ndarray | None]:
    """Decode an SDL file: (header, latents float32 [C][h][w], alpha uint8 [height][width] or None)."""
    chunks = read_chunks(data)
    hd = parse_head(chunks[0][1])
    found: dict[str, bytes] = {}
    for name, payload in chunks[1:]:  # 3, rules 3 and 5
        if name in DATA_CHUNKS:
            check(name not in found, f"second {name} chunk (3, rule 3)")
            found[name] = payload
        elif name[0].isupper():
            check(False, f"unknown or misplaced critical chunk {name} (3)")
        elif name in KNOWN_ANCILLARY:
            if name in found:
                warnings.warn(f"second {name} chunk ignored (3, rule 5)", stacklevel=2)
            else:
                found[name] = payload
    check("PLTE" not in found or hd["quantizer"] == "palette", "PLTE without the palette quantizer (3, rule 3)")
    check("ALPH" not in found or hd["mode"] in ("LA", "RGBA"), "ALPH in a mode without alpha (3, rule 3)")
    check("PLTE" in found or hd["quantizer"] != "palette", "missing PLTE (3, rule 4)")
    check("ALPH" in found or hd["mode"] not in ("LA", "RGBA"), "missing ALPH (3, rule 4)")
    check("LDAT" in found, "missing LDAT (3, rule 4)")
    hd["exif"], hd["icc_profile"], hd["xmp"] = found.get("eXIf"), found.get("iCCP"), found.get("xMPt")
    hd["preview_map"] = parse_preview(hd, found["prVw"]) if "prVw" in found else None
    if hd["quantizer"] == "scalar":
        Z = decode_scalar(hd, found["LDAT"])
    elif hd["quantizer"] == "palette":
        Z = decode_palette(hd, found["PLTE"], found["LDAT"])
    elif hd["quantizer"] == "float":
        Z = decode_float(hd, found["LDAT"])
    else:
        Z = decode_transform(hd, found["LDAT"])
    alpha = decode_alpha(hd, found["ALPH"]) if "ALPH" in found else None
    return hd, Z, alpha


# ---------------------------------------------------------------------------------------------------------------
# Section 11: the test vectors


def check_vector(path: Path) -> tuple[bool, str]:
    try:
        hd, Z, alpha = decode(path.read_bytes())
    except SDLError as e:
        return False, f"rejected: {e}"
    info = f"{hd['quantizer']}/{hd['coder']} {hd['mode']} latent {' x '.join(map(str, Z.shape))}"
    expected = np.load(path.with_name(path.name[:-4] + ".latents.npy"))
    if expected.shape != Z.shape:
        return False, f"{info}: latent shape differs, expected {' x '.join(map(str, expected.shape))}"
    diff = expected.astype(np.float32).view(np.uint32) != Z.view(np.uint32)
    if diff.any():
        c, y, x = np.argwhere(diff)[0]
        return False, f"{info}: {int(diff.sum())} latents differ, first Z[{c}][{y}][{x}] = {float(Z[c, y, x])}, " \
            f"expected {float(expected[c, y, x])}"
    alpha_path = path.with_name(path.name[:-4] + ".alpha.npy")
    if alpha_path.exists():
        expected_alpha = np.load(alpha_path)
        if alpha is None or alpha.shape != expected_alpha.shape or (alpha != expected_alpha).any():
            return False, f"{info}: alpha differs"
    elif alpha is not None:
        return False, f"{info}: decoded an alpha plane, the vector has none"
    return True, info


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: reference_decoder.py VECTOR_FOLDER | FILE.sdl", file=sys.stderr)
        return 2
    target = Path(argv[0])
    if target.is_dir():
        passed = failed = 0
        for path in sorted(target.glob("*.sdl")):
            ok, info = check_vector(path)
            print(f"{path.stem:24s} {'PASS' if ok else 'FAIL'}  {info}")
            passed, failed = passed + ok, failed + (not ok)
        print(f"{passed} passed, {failed} failed")
        return 0 if failed == 0 else 1
    try:
        hd, Z, alpha = decode(target.read_bytes())
    except SDLError as e:
        print(f"{target}: rejected: {e}")
        return 1
    for key, value in hd.items():
        if isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, bytes):
            value = f"{len(value)} bytes"
        print(f"{key:14s} {value}")
    print(f"{'latents':14s} {' x '.join(map(str, Z.shape))} float32, range {float(Z.min())} .. {float(Z.max())}")
    print(f"{'alpha':14s} {'none' if alpha is None else ' x '.join(map(str, alpha.shape))}")
    if hd["preview_map"] is not None:
        preview = render_preview(hd, Z, alpha, hd["preview_map"])
        print(f"{'preview':14s} {' x '.join(map(str, preview.shape))} uint8, mean {preview.mean(axis=(0, 1)).round(1)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
