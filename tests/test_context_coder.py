"""Coder 2 (spec section 5.1): the context-model range coder on its own, without a model."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from pillow_sdlatent.core import context_coder as cc


def header_length(channels: int) -> int:
    coefficients = sum(cc._nfeat(c, k) for c in range(channels) for k in range(4))
    return 3 + 2 * channels + coefficients + 8 * channels + 4


@pytest.mark.parametrize(
    ("shape", "levels"),
    [((1, 1, 1), [2]), ((1, 1, 2), [3]), ((3, 5, 7), [2, 300, 65536]), ((4, 17, 33), [256] * 4), ((6, 8, 8), [40] * 6)],
)
def test_round_trip_random_symbols(shape: tuple[int, int, int], levels: list[int]) -> None:
    rng = np.random.default_rng(sum(shape))
    symbols = np.stack([rng.integers(0, n, shape[1:]) for n in levels]).astype(np.uint16)
    data = cc.encode_symbols(symbols, levels)
    assert np.array_equal(cc.decode_symbols(data, shape, levels), symbols)


def test_round_trip_quantized_latents_and_dequantization() -> None:
    rng = np.random.default_rng(0)
    latents = (np.cumsum(rng.normal(size=(4, 24, 40)), axis=2) * 0.3).astype(np.float32)
    symbols, offset, scale, levels = cc.quantize(latents, 75)
    decoded = cc.decode_symbols(cc.encode_symbols(symbols, levels), symbols.shape, levels)
    assert np.array_equal(decoded, symbols)
    error = np.abs(cc.dequantize(decoded, offset, scale) - latents)
    assert np.all(error <= (1 - cc.RHO) * scale[:, None, None] + 1e-6)


def test_stream_bytes_are_stable() -> None:
    """The stream is normative: the same symbols give the same bytes on every platform."""
    rng = np.random.default_rng(1)
    symbols = rng.integers(0, 50, (2, 9, 11)).astype(np.uint16)
    data = cc.encode_symbols(symbols, [50, 50])
    assert data[:3] == b"SL1"
    assert hashlib.sha256(data).hexdigest() == STREAM_SHA256


STREAM_SHA256 = "e980f18be639fc8574f27607e9fdf8365880d1a37205930a5fdfbeed94bd49ee"


def test_smaller_steps_cost_more_bits() -> None:
    rng = np.random.default_rng(2)
    latents = (np.cumsum(rng.normal(size=(4, 32, 32)), axis=1) * 0.2).astype(np.float32)
    sizes = []
    for quality in (10, 40, 70, 95):
        symbols, _, _, levels = cc.quantize(latents, quality)
        sizes.append(len(cc.encode_symbols(symbols, levels)))
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]


def test_most_compressible_input_stays_within_the_symbol_limit() -> None:
    """The bound that rejects forged shapes must never reject a real stream: constant planes are the cheapest."""
    for shape in [(1, 512, 512), (4, 128, 128)]:
        symbols = np.zeros(shape, np.uint16)
        data = cc.encode_symbols(symbols, [2] * shape[0])
        assert symbols.size <= cc.symbol_limit(len(data) - header_length(shape[0])) / 1.9


def test_forged_shape_is_rejected_before_decoding() -> None:
    symbols = np.zeros((4, 8, 8), np.uint16)
    data = cc.encode_symbols(symbols, [10] * 4)
    with pytest.raises(ValueError, match="cannot come from"):
        cc.decode_symbols(data, (4, 8192, 8192), [10] * 4)


def corrupt(data: bytes, position: int, value: int) -> bytes:
    return data[:position] + bytes([value]) + data[position + 1 :]


@pytest.fixture
def stream() -> tuple[bytes, tuple[int, int, int], list[int]]:
    rng = np.random.default_rng(3)
    symbols = rng.integers(0, 20, (2, 6, 6)).astype(np.uint16)
    return cc.encode_symbols(symbols, [20, 20]), symbols.shape, [20, 20]


def test_bad_streams_raise_value_error(stream: tuple[bytes, tuple[int, int, int], list[int]]) -> None:
    data, shape, levels = stream
    bad = {
        "magic": b"XL1" + data[3:],
        "length": data + b"\0",
        "centre": corrupt(corrupt(data, 3, 0xFF), 4, 0xFF),
        "model": corrupt(data, header_length(2) - 4 - 7, 200),
        "crc": corrupt(data, header_length(2) - 1, data[header_length(2) - 1] ^ 1),
    }
    for name, forged in bad.items():
        try:
            cc.decode_symbols(forged, shape, levels)
        except ValueError:
            continue
        pytest.fail(f"a stream with a bad {name} decoded")
    for forged_levels in ([1, 20], [20, 65537], [20]):
        with pytest.raises(ValueError, match="bad levels"):
            cc.decode_symbols(data, shape, forged_levels)
    for forged_shape in [(2, 0, 6), (0, 6, 6), (2, 1 << 15, 1 << 15)]:
        with pytest.raises(ValueError):
            cc.decode_symbols(data, forged_shape, levels)


def test_range_coder_spends_close_to_its_models_ideal_code_length() -> None:
    """The spec's probability quantisation is what the coder uses: bytes within 1% of the ideal bits."""
    rng = np.random.default_rng(4)
    latents = (np.cumsum(rng.normal(size=(4, 48, 64)), axis=2) * 0.3).astype(np.float32)
    for quality in (30, 75):
        symbols, _, _, levels = cc.quantize(latents, quality)
        costs: list[float] = []
        data = cc.encode_symbols(symbols, levels, costs)
        payload_bits = 8 * (len(data) - header_length(4))
        assert sum(costs) <= payload_bits <= 1.01 * sum(costs) + 64
