"""The transform quantizer and its stream: exact dequantization, round trips, bad streams (no models)."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest

from pillow_sdlatent.core import rangecode as rc
from pillow_sdlatent.core import transform_coder as tc
from pillow_sdlatent.core.codec import build_chunks, decode_bytes, quantize, read_body, read_head
from pillow_sdlatent.core.container import FormatError, write_chunks
from pillow_sdlatent.core.header import Header
from pillow_sdlatent.core.settings import QuantSettings, settings_for

TRANSFORM = QuantSettings("transform", coder="transform", quality=60)


def smooth_latents(seed: int, shape: tuple[int, int, int]) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = np.cumsum(np.cumsum(rng.normal(size=shape), axis=1), axis=2) * 0.05
    return (z + rng.normal(scale=0.2, size=shape)).astype(np.float32)


def spec_dequantize(q: np.ndarray, offset: float, scale: float, weights: list[int]) -> np.ndarray:
    """Spec section 5.3 written out scalar by scalar in Python floats (binary64), for one 4x4 block."""
    T = [[float(v) for v in row] for row in tc.BASIS]
    X = [[float(int(q[u][v])) * float(np.float32(scale)) * float(weights[4 * u + v]) / 16 for v in range(4)]
         for u in range(4)]  # fmt: skip
    t = [[((X[u][0] * T[0][x] + X[u][1] * T[1][x]) + X[u][2] * T[2][x]) + X[u][3] * T[3][x] for x in range(4)]
         for u in range(4)]  # fmt: skip
    y = [[((T[0][r] * t[0][x] + T[1][r] * t[1][x]) + T[2][r] * t[2][x]) + T[3][r] * t[3][x] for x in range(4)]
         for r in range(4)]  # fmt: skip
    return np.array([[np.float32(y[r][x] + float(np.float32(offset))) for x in range(4)] for r in range(4)])


def test_basis_is_the_orthonormal_dct() -> None:
    n = np.arange(4)
    want = np.cos((2 * n[None, :] + 1) * n[:, None] * np.pi / 8) * np.where(n == 0, 0.5, np.sqrt(0.5))[:, None]
    assert np.allclose(tc.BASIS, want, atol=1e-15, rtol=0)
    assert np.allclose(tc.BASIS @ tc.BASIS.T, np.eye(4), atol=1e-15)
    x = np.random.default_rng(0).normal(size=(2, 8, 12))
    X = tc.forward(x) / 0.001  # the inverse of forward(): dequantize with weights 16 and step 0.001
    q = np.round(X).astype(np.int64)
    back = tc.dequantize((q + 30000).astype(np.uint16), np.zeros(2), np.full(2, 0.001), [60001] * 2, [16] * 16,
                         (8, 12))  # fmt: skip
    assert np.abs(back - x).max() < 2e-3


def test_dequantize_matches_the_spec_formula_bit_for_bit() -> None:
    z = smooth_latents(1, (2, 7, 9))
    symbols, offset, scale, levels, weights = tc.quantize(z, 70)
    got = tc.dequantize(symbols, offset, scale, levels, weights, (7, 9))
    assert got.shape == (2, 7, 9) and got.dtype == np.float32
    for c in range(2):
        zero = (int(levels[c]) - 1) // 2
        for i in range(2):
            for j in range(3):
                q = symbols[c, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4].astype(np.int64) - zero
                block = spec_dequantize(q, offset[c], scale[c], list(weights))[: 7 - 4 * i, : 9 - 4 * j]
                assert block.tobytes() == got[c, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4].tobytes()


def test_dequantize_is_bit_exact_on_random_symbols_steps_and_weights() -> None:
    # the compiled kernel against spec 5.3's formula in numpy binary64 (the reference decoder's): no fused
    # multiply-add, no reordering, on every weight and any step
    rng = np.random.default_rng(5)
    C, H, W = 6, 32, 48
    lev = rng.integers(3, 65537, C)
    S = (rng.integers(0, 65536, (C, H, W)) % lev[:, None, None]).astype(np.uint16)
    sc, off = rng.uniform(1e-3, 3, C).astype(np.float32), rng.normal(size=C).astype(np.float32)
    w = rng.integers(1, 256, 16)
    got = tc.dequantize(S, off, sc, lev, w, (30, 47))
    T = tc.BASIS
    q = (S.astype(np.int64) - ((lev - 1) // 2)[:, None, None]).astype(np.float64)
    X = q.reshape(C, H // 4, 4, W // 4, 4).transpose(0, 1, 3, 2, 4)
    X = X * sc.astype(np.float64)[:, None, None, None, None] * w.reshape(4, 4).astype(np.float64) / 16
    t = ((X[..., 0:1] * T[0] + X[..., 1:2] * T[1]) + X[..., 2:3] * T[2]) + X[..., 3:4] * T[3]
    Y = ((T[0][:, None] * t[..., 0:1, :] + T[1][:, None] * t[..., 1:2, :]) + T[2][:, None] * t[..., 2:3, :]) + T[3][
        :, None
    ] * t[..., 3:4, :]
    Z = (Y + off.astype(np.float64)[:, None, None, None, None]).astype(np.float32)
    assert got.tobytes() == np.ascontiguousarray(Z.transpose(0, 1, 3, 2, 4).reshape(C, H, W)[:, :30, :47]).tobytes()


@pytest.mark.parametrize(("shape", "quality"), [((4, 8, 12), 75), ((4, 9, 15), 40), ((1, 1, 1), 60), ((16, 6, 5), 20),
                                                 ((3, 13, 4), 100), ((4, 24, 16), 0)])  # fmt: skip
def test_stream_round_trip(shape: tuple[int, int, int], quality: int) -> None:
    z = smooth_latents(sum(shape) + quality, shape)
    symbols, _, _, levels, weights = tc.quantize(z, quality)
    assert symbols.shape == (shape[0], *tc.coefficient_shape(*shape[1:]))
    data = tc.encode_symbols(symbols, levels, weights)
    assert data[0] == 32 and tc.header_size(data, shape[0]) == 1 + shape[0]  # default weights: one code byte
    assert (len(data) - tc.header_size(data, shape[0])) % 4 == 0
    back, w2 = tc.decode_symbols(data, symbols.shape, levels)
    assert back.tobytes() == symbols.tobytes() and w2 == weights


def test_words_are_big_endian_and_the_stream_ends_with_its_symbols() -> None:
    s, _, _, lev, w = tc.quantize(smooth_latents(12, (2, 8, 8)), 60)
    data = tc.encode_symbols(s, lev, w)
    hlen = tc.header_size(data, 2)
    words = struct.unpack(f">{(len(data) - hlen) // 4}I", data[hlen:])
    enc = rc.new_encoder()  # the coefficient batch is the first thing coded: its words lead the stream
    DC = s[:, ::4, ::4].astype(np.int64) - ((lev[:, None, None].astype(np.int64) - 1) // 2)
    a = np.concatenate([tc.fit_predictor(tc.dc_features(DC, c, k), DC[c, k >> 1 :: 2, k & 1 :: 2])
                        for c in range(2) for k in range(4)])  # fmt: skip
    rc.encode_batch(enc, a, 256, *tc.COEF_MODEL)
    assert tuple(enc.get_compressed()[:-1]) == words[: enc.get_compressed().size - 1]
    for extra in (b"\x00\x00\x00\x07", bytes(8), b"\x01\x02\x03\x04" * 3):  # spec 6.1, end check
        with pytest.raises(ValueError, match="after the end of the range-coded stream"):
            tc.decode_symbols(data + extra, s.shape, lev)


def test_weight_codes() -> None:
    assert tc.weight_code(tc.default_weights()) == 32 and tc.weights_of_code(32) == tc.default_weights()
    assert tc.weights_of_code(0) == (16,) * 16
    assert tc.weights_of_code(254)[-1] == 255  # capped
    odd = tuple(16 + 3 * u + 5 * v for u in range(4) for v in range(4))
    assert tc.weight_code(odd) == tc.EXPLICIT_WEIGHTS
    s, _, _, lev, _ = tc.quantize(smooth_latents(11, (2, 8, 8)), 60)
    data = tc.encode_symbols(s, lev, odd)
    assert data[0] == tc.EXPLICIT_WEIGHTS and tc.header_size(data, 2) == 1 + 16 + 2
    assert tc.decode_symbols(data, s.shape, lev)[1] == odd


def test_shape_order_is_the_spec_table() -> None:
    # spec section 6.2 lists the order; both families interleave by the centre bin's frequency
    spec = (Path(__file__).parents[1] / "spec" / "sdl-v1.md").read_text()
    table = spec[spec.index("It is (ranks 0 to 75):") :].split("\n\n")[1]
    assert rc.shape_order() == tuple(int(v) for v in table.replace(",", " ").split())
    assert sorted(rc.shape_order()) == list(range(76)) and all(rc.shape_order()[rc.ranks()[s]] == s for s in range(76))


def test_model_tables_are_exact_integers() -> None:
    f = rc.frequencies()
    assert f.shape == (76, 35) and f.dtype == np.int64 and (f >= 0).all()
    assert (f.sum(1) == (1 << 24) - 35).all()  # the coder's leaky quantisation then gives each bin f + 1
    assert (f[:, :17] == f[:, 35:17:-1]).all()  # symmetric around the centre bin
    # the narrowest shape's centre costs 0.0112 bits: the bound of spec section 10 rests on it
    assert -rc.log2_probabilities()[:, rc.R + 1].max() > 0.011


def test_model_references() -> None:
    # channel 0: 4 DC models, bands 1, 2; channel 1: DC only; channel 2: DC, band 1 (against channel 1's phase 3)
    assert tc.model_references([3, 1, 2]) == [-1, 0, 1, 2, 3, 4, 0, 6, 7, 8, 6, 10, 11, 12, 13]
    assert tc.model_references([1, 2]) == [-1, 0, 1, 2, 0, 4, 5, 6, 7]
    assert tc.model_references([2, 2]) == [-1, 0, 1, 2, 3, 0, 5, 6, 7, 4]


def test_quantization_error_shrinks_with_quality_and_high_bands_empty_out() -> None:
    z = smooth_latents(3, (4, 16, 16))
    errs, coded = [], []
    for q in (20, 50, 80, 100):
        s, off, sc, lev, w = tc.quantize(z, q)
        errs.append(float(np.sqrt(((tc.dequantize(s, off, sc, lev, w, (16, 16)) - z) ** 2).mean())))
        data = tc.encode_symbols(s, lev, w)
        coded.append(sum(tc.band_counts(data, 4)))  # bands coded per channel
    assert errs == sorted(errs, reverse=True) and errs[-1] < 0.05
    assert coded[0] < coded[-1] == 64


def test_weights_grow_with_frequency() -> None:
    w = np.array(tc.default_weights()).reshape(4, 4)
    assert w[0, 0] == 16 and w[3, 3] == round(16 * (1 + tc.WEIGHT_SLOPE))
    assert (np.diff(w, axis=0) > 0).all() and (np.diff(w, axis=1) > 0).all()


def test_constant_channel_codes_its_dc_only() -> None:
    z = np.full((2, 8, 8), 0.7, np.float32)
    z[1] = smooth_latents(4, (1, 8, 8))[0]
    s, off, sc, lev, w = tc.quantize(z, 60)
    data = tc.encode_symbols(s, lev, w)
    assert tc.band_counts(data, 2)[0] == 1 and tc.band_counts(data, 2)[1] > 1  # DC is always coded
    back, _ = tc.decode_symbols(data, s.shape, lev)
    assert np.array_equal(tc.dequantize(back, off, sc, lev, w, (8, 8))[0], z[0])


def test_all_constant_latents_cost_a_few_words() -> None:
    z = np.full((3, 64, 64), 0.25, np.float32)
    s, off, sc, lev, w = tc.quantize(z, 60)
    data = tc.encode_symbols(s, lev, w)
    assert tc.band_counts(data, 3) == [1, 1, 1] and len(data) <= 1 + 3 + 4 * 8
    back, _ = tc.decode_symbols(data, s.shape, lev)
    assert np.array_equal(tc.dequantize(back, off, sc, lev, w, (64, 64)), z)


def _file(z: np.ndarray, settings: QuantSettings = TRANSFORM) -> bytes:
    q = quantize(z, settings)
    c, h, w = z.shape
    header = Header(width=8 * w, height=8 * h, mode="RGB", channels=c, latent_height=h, latent_width=w,
                    model_id="test", coder=settings.coder, **q.fields)  # fmt: skip
    buf = io.BytesIO()
    write_chunks(buf, build_chunks(header, q))
    return buf.getvalue()


def test_file_round_trip_gives_the_writers_latents() -> None:
    z = smooth_latents(5, (4, 10, 7))
    lf = decode_bytes(_file(z))
    assert (lf.header.quantizer, lf.header.coder) == ("transform", "transform")
    assert lf.symbols.shape == (4, 12, 8) and lf.weights == tc.default_weights()
    assert lf.latents().tobytes() == quantize(z, TRANSFORM).latents((10, 7)).tobytes()
    assert float(np.abs(lf.latents() - z).mean()) < 0.2


def test_default_method_is_the_transform_coder() -> None:
    assert settings_for(None) == QuantSettings("transform", coder="transform", quality=75)
    with pytest.raises(ValueError, match="unknown method 'context'"):
        settings_for(60, "context")
    z = smooth_latents(6, (32, 4, 4))  # any channel count
    assert decode_bytes(_file(z, settings_for(50, "auto", 32))).latents().shape == (32, 4, 4)


def test_header_pairs_the_transform_quantizer_with_its_coder() -> None:
    z = smooth_latents(7, (4, 4, 4))
    fields = quantize(z, TRANSFORM).fields
    for coder in ("zstd", "raw"):
        with pytest.raises(FormatError, match="transform quantizer and the transform coder"):
            Header(width=32, height=32, mode="RGB", channels=4, latent_height=4, latent_width=4, model_id="t",
                   coder=coder, **fields).validate()  # fmt: skip
    with pytest.raises(FormatError, match="transform quantizer and the transform coder"):
        Header(width=32, height=32, mode="RGB", channels=4, latent_height=4, latent_width=4, model_id="t",
               coder="transform").validate()  # fmt: skip


def _ldat_span(data: bytes) -> tuple[int, int]:
    i = data.index(b"LDAT")
    return i + 4, i + 4 + struct.unpack(">I", data[i - 4 : i])[0]


def _with_ldat(data: bytes, payload: bytes) -> bytes:
    import zlib

    a, b = _ldat_span(data)
    crc = struct.pack(">I", zlib.crc32(b"LDAT" + payload))
    return data[: a - 8] + struct.pack(">I", len(payload)) + b"LDAT" + payload + crc + data[b + 4 :]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: b"", "empty transform stream"),
        (lambda p: b"\xff" + bytes(16) + p[1:], "band weight 0"),
        (lambda p: p[:1] + b"\x11" + p[2:], "band counts must be 1..16"),
        (lambda p: p[:1] + b"\x00" + p[2:], "band counts must be 1..16"),
        (lambda p: p[:3], "ends inside its"),
        (lambda p: p[:-4], "corrupt|out of|cannot come from|after the end"),
        (lambda p: p[:-8] + bytes(8), "corrupt|out of|after the end"),
        (lambda p: p + bytes(64), "after the end of the range-coded stream"),
        (lambda p: p[:-1], "multiple of 4"),
    ],
)
def test_corrupt_streams_are_rejected(edit, message: str) -> None:
    data = _file(smooth_latents(8, (4, 8, 8)))
    a, b = _ldat_span(data)
    with pytest.raises(FormatError, match=message):
        decode_bytes(_with_ldat(data, edit(data[a:b])))


def test_forged_band_count_cannot_inflate_a_tiny_payload() -> None:
    # one channel, 16 bands of a 4096 x 4096 plane (16 M coefficients) from one word: refused before any work
    with pytest.raises(ValueError, match="cannot come from"):
        tc.decode_symbols(bytes([32, 16]) + bytes(4), (1, 4096, 4096), [3])
    # every value counts, coded or not: DC only still declares 1 M DC symbols
    with pytest.raises(ValueError, match="cannot come from"):
        tc.decode_symbols(bytes([32, 1]) + bytes(4), (1, 4096, 4096), [3])


def test_words_outside_the_decoders_interval_are_rejected() -> None:
    # point = 2**64 - 1 against range 2**64 - 1: q = point // (range >> 24) >= 2**24 (spec 6.1)
    with pytest.raises(ValueError, match="left its interval"):
        tc.decode_symbols(bytes([32, 1]) + b"\xff" * 8, (1, 4, 4), [3])


def test_compiled_decoder_releases_the_gil_and_agrees_across_threads() -> None:
    from concurrent.futures import ThreadPoolExecutor

    z = smooth_latents(21, (4, 32, 32))
    s, _, _, lev, w = tc.quantize(z, 80)
    data = tc.encode_symbols(s, lev, w)
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: tc.decode_symbols(data, s.shape, lev)[0], range(16)))
    assert all(o.tobytes() == s.tobytes() for o in outs)


def test_model_out_of_range_is_rejected() -> None:
    # a stream whose first model's rank change (-1) leaves the table: one channel, DC only
    enc = rc.new_encoder()
    rc.encode_batch(enc, np.zeros(5, np.int64), 256, *tc.COEF_MODEL)
    rc.encode_batch(enc, np.zeros(4, np.int64), 33, *tc.SHIFT_MODEL)
    rc.encode_batch(enc, np.array([-1, 0, 0, 0]), 151, *tc.RANK_MODEL)
    data = bytes([32, 1]) + rc.words_of(enc)
    with pytest.raises(ValueError, match="band model out of range"):
        tc.decode_symbols(data, (1, 4, 4), [3])


def test_truncated_file_in_tolerant_mode_decodes_to_channel_offsets() -> None:
    z = smooth_latents(9, (4, 8, 8))
    data = _file(z)
    a, _ = _ldat_span(data)
    fp = io.BytesIO(data[: a + 20])
    head = read_head(fp)
    lf = read_body(fp, head, allow_truncated=True)
    assert lf.truncated
    assert np.array_equal(lf.latents(), np.broadcast_to(head.header.offset[:, None, None], (4, 8, 8)))
