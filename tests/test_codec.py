"""Whole-file layer without a model: header fields, chunk order, metadata, truncation."""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
import pytest

from pillow_sdlatent.core.codec import LatentFile, build_chunks, decode_bytes, quantize, read_body, read_head
from pillow_sdlatent.core.container import Chunk, FormatError, TruncatedError, pack_chunk, write_chunks
from pillow_sdlatent.core.header import Header
from pillow_sdlatent.core.settings import QuantSettings


def make_file(
    settings: QuantSettings | None = None,
    mode: str = "RGB",
    size: tuple[int, int] = (40, 24),
    channels: int = 4,
    info: dict | None = None,
    extra: list[Chunk] | None = None,
) -> tuple[bytes, np.ndarray]:
    settings = settings or QuantSettings()
    w, h = size
    rng = np.random.default_rng(0)
    z = rng.normal(size=(channels, -(-h // 8), -(-w // 8))).astype(np.float32)
    q = quantize(z, settings)
    header = Header(
        width=w,
        height=h,
        mode=mode,
        channels=channels,
        latent_height=z.shape[1],
        latent_width=z.shape[2],
        model_id="test",
        fingerprint=b"\x01" * 16,
        coder=settings.coder,
        **q.fields,
    )
    alpha = np.arange(w * h, dtype=np.uint8).reshape(h, w) if "A" in mode else None
    buf = io.BytesIO()
    write_chunks(buf, build_chunks(header, q, alpha, info, extra))
    return buf.getvalue(), z


def chunks_of(data: bytes) -> list[tuple[bytes, int]]:
    out, pos = [], 8
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        out.append((data[pos + 4 : pos + 8], pos))
        pos += 12 + n
    return out


def test_header_roundtrip() -> None:
    h = Header(
        width=333,
        height=517,
        mode="LA",
        channels=16,
        latent_height=65,
        latent_width=42,
        model_id="stabilityai/stable-diffusion-3-medium-diffusers/vae",
        fingerprint=bytes(range(16)),
        offset=np.linspace(-3, 3, 16).astype(np.float32),
        scale=np.full(16, 0.02, np.float32),
        levels=np.full(16, 300, np.uint32),
    )
    back = Header.unpack(h.pack())
    assert back.pack() == h.pack()
    assert len(h.pack()) == 37 + len(h.model_id) + 10 * 16  # spec section 4
    assert (back.latent_height, back.latent_width) == (65, 42)  # derived from the image size
    assert (back.width, back.height, back.mode, back.model_id) == (333, 517, "LA", h.model_id)
    assert back.symbol_dtype == np.dtype(">u2")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"width": 0}, "image size"),
        ({"latent_height": 4}, "does not match"),
        ({"channels": 0}, "latent channels"),
        ({"quantizer": "palette", "palette_size": 0}, "palette size"),
        ({"levels": np.array([1, 2, 2, 2], np.uint32)}, "levels"),
        ({"offset": np.array([np.inf, 0, 0, 0], np.float32)}, "finite"),
        ({"model_id": "x" * 256}, "model id"),
    ],
)
def test_header_limits(change: dict, message: str) -> None:
    base = dict(
        width=40,
        height=24,
        mode="RGB",
        channels=4,
        latent_height=3,
        latent_width=5,
        model_id="m",
        offset=np.zeros(4, np.float32),
        scale=np.ones(4, np.float32),
        levels=np.full(4, 256, np.uint32),
    )
    with pytest.raises(FormatError, match=message):
        Header(**(base | change)).pack()


@pytest.mark.parametrize(
    "settings",
    [
        QuantSettings("scalar", 256, coder="raw"),
        QuantSettings("scalar", 4000, coder="zstd"),
        QuantSettings("palette", 256, 32, "kmeans", 1.0, "zstd"),
        QuantSettings("palette", 256, 300, "kmeans", 0.0, "raw"),
        QuantSettings("palette", 256, 64, "imagequant", 1.0, "zstd"),
    ],
    ids=["scalar-raw", "scalar-u16", "palette", "palette-u16-index", "imagequant"],
)
@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_file_roundtrip(settings: QuantSettings, mode: str) -> None:
    data, z = make_file(settings, mode, size=(160, 136))
    lf = decode_bytes(data)
    assert lf.latents().shape == z.shape
    assert np.abs(lf.latents() - z).mean() < 1.0  # quantized, but the same field
    if mode == "RGBA":
        assert np.array_equal(lf.alpha, np.arange(160 * 136, dtype=np.uint8).reshape(136, 160))
    if settings.quantizer == "scalar" and settings.levels >= 256:
        step = lf.header.scale.max()
        assert np.abs(lf.latents() - z).max() <= step / 2 + 1e-5


def test_chunk_order_and_metadata() -> None:
    info = {"exif": b"Exif\x00\x00II*\x00", "icc_profile": b"icc-bytes", "xmp": "<x:xmpmeta/>"}
    data, _ = make_file(QuantSettings("palette", 256, 8), "RGBA", info=info)
    assert [t for t, _ in chunks_of(data)] == [b"HEAD", b"eXIf", b"iCCP", b"xMPt", b"ALPH", b"PLTE", b"LDAT", b"SEND"]
    fp = io.BytesIO(data)
    got = read_head(fp).info
    assert got == {"exif": b"Exif\x00\x00II*\x00", "icc_profile": b"icc-bytes", "xmp": b"<x:xmpmeta/>"}
    assert fp.tell() == chunks_of(data)[4][1]  # read_head stops before the first data chunk


def test_unknown_ancillary_chunk_is_skipped() -> None:
    data, _ = make_file(extra=[Chunk(b"zzZz", b"future")])
    lf = decode_bytes(data)
    assert lf.info == {} and lf.preview is None  # skipped, not exposed


def test_known_ancillary_chunk_counts_once() -> None:
    # Spec section 3, rule 5: the first copy is used, later ones are ignored with a warning.
    data, _ = make_file(extra=[Chunk(b"prVw", b"first"), Chunk(b"iCCP", b"one"), Chunk(b"prVw", b"second")],
                        info={"icc_profile": b"zero"})  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lf = decode_bytes(data)
    assert lf.preview == b"first" and lf.info["icc_profile"] == b"zero"
    assert sorted(str(w.message).split()[1] for w in caught) == ["iCCP", "prVw"]


def _with_chunk_before_send(data: bytes, chunk: bytes) -> bytes:
    send = next(pos for t, pos in chunks_of(data) if t == b"SEND")
    return data[:send] + chunk + data[send:]


def test_send_must_be_empty() -> None:
    data, _ = make_file()
    send = next(pos for t, pos in chunks_of(data) if t == b"SEND")
    with pytest.raises(FormatError, match="SEND chunk holds 3 bytes"):
        decode_bytes(data[:send] + pack_chunk(b"SEND", b"abc"))
    assert decode_bytes(data + b"trailing garbage").header.width == 40  # bytes after SEND: not the file


def test_data_chunks_the_header_does_not_call_for_are_errors() -> None:
    data, _ = make_file(QuantSettings("scalar", 64), "RGB")
    with pytest.raises(FormatError, match="ALPH chunk in a RGB"):
        decode_bytes(_with_chunk_before_send(data, pack_chunk(b"ALPH", b"\x00")))
    with pytest.raises(FormatError, match="PLTE chunk in a RGB scalar"):
        decode_bytes(_with_chunk_before_send(data, pack_chunk(b"PLTE", b"\x00" * 4)))


@pytest.mark.parametrize("edit", ["skippable-first", "two-frames", "bytes-after", "no-content-size"])
def test_zstd_payload_is_exactly_one_frame(edit: str) -> None:
    import zstandard

    from pillow_sdlatent.core.entropy import zstd_compress

    data, _ = make_file(QuantSettings("scalar", 64, coder="zstd"))
    raw = decode_bytes(data).symbols.astype(np.uint8).tobytes()
    frame = zstd_compress(raw)
    payload = {
        "skippable-first": b"\x50\x2a\x4d\x18" + struct.pack("<I", 3) + b"abc" + frame,
        "two-frames": frame + zstd_compress(b""),
        "bytes-after": frame + b"\x00" * 64,
        "no-content-size": zstandard.ZstdCompressor(write_content_size=False).compress(raw),
    }[edit]
    with pytest.raises(FormatError, match=r"skippable|after its zstd frame|content size"):
        decode_bytes(_replace_chunk(data, b"LDAT", payload))


def test_unknown_critical_chunk_is_an_error() -> None:
    data, _ = make_file(extra=[Chunk(b"ZZZZ", b"future")])
    with pytest.raises(FormatError, match="unknown critical chunk ZZZZ"):
        decode_bytes(data)


def _replace_chunk(data: bytes, ctype: bytes, payload: bytes) -> bytes:
    for t, pos in chunks_of(data):
        if t == ctype:
            (n,) = struct.unpack(">I", data[pos : pos + 4])
            return data[:pos] + pack_chunk(ctype, payload) + data[pos + 12 + n :]
    raise AssertionError(ctype)


def test_palette_index_out_of_range() -> None:
    data, _ = make_file(QuantSettings("palette", 256, 8, coder="raw"))
    lf = decode_bytes(data)
    bad = np.full(lf.header.latent_height * lf.header.latent_width, lf.header.palette_size, np.uint8)
    with pytest.raises(FormatError, match="palette index out of range"):
        decode_bytes(_replace_chunk(data, b"LDAT", bad.tobytes()))


def test_symbol_out_of_range() -> None:
    data, _ = make_file(QuantSettings("scalar", 100, coder="raw"))
    with pytest.raises(FormatError, match="out of its channel's range"):
        decode_bytes(_replace_chunk(data, b"LDAT", b"\xff" * (4 * 3 * 5)))


def test_payload_larger_than_header_allows() -> None:
    from pillow_sdlatent.core.entropy import zstd_compress

    data, _ = make_file()
    with pytest.raises(FormatError, match="declares a content size of 10000000"):
        decode_bytes(_replace_chunk(data, b"LDAT", zstd_compress(b"\x00" * 10_000_000)))


def test_missing_ldat_and_duplicates() -> None:
    data, _ = make_file()
    ldat = next(pos for t, pos in chunks_of(data) if t == b"LDAT")
    send = next(pos for t, pos in chunks_of(data) if t == b"SEND")
    with pytest.raises(FormatError, match="no LDAT"):
        decode_bytes(data[:ldat] + data[send:])
    with pytest.raises(FormatError, match="duplicate LDAT"):
        decode_bytes(data[:send] + data[ldat:send] + data[send:])


def test_truncation_strict_and_tolerant() -> None:
    data, _ = make_file(QuantSettings("scalar", 256, coder="raw"), size=(160, 136))
    cut = data[: len(data) - 300]
    with pytest.raises(TruncatedError):
        decode_bytes(cut)
    fp = io.BytesIO(cut)
    head = read_head(fp)
    header = head.header
    lf = read_body(fp, head, allow_truncated=True)
    assert isinstance(lf, LatentFile) and lf.truncated
    full = decode_bytes(data).symbols.reshape(-1)
    kept = full.size - (300 - 12 - 4)  # SEND chunk and LDAT's CRC are gone, then payload bytes
    got = lf.symbols.reshape(-1)
    assert np.array_equal(got[:kept], full[:kept])
    # Missing values (the tail of the last channel) decode to the grid point nearest latent 0.
    tail = lf.latents().reshape(-1)[kept:]
    assert np.all(np.abs(tail) <= header.scale[-1] / 2 + 1e-6)
