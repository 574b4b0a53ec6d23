"""The float quantizer (id 3, spec section 5.4): latents stored bit-exactly as float16, bfloat16 or float32,
through ``write_latents(..., lossless=True)`` and ``method="float16"`` / ``"bfloat16"`` / ``"float32"``."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pillow_sdlatent.core import codec, entropy, floats
from pillow_sdlatent.core.codec import build_chunks, decode_bytes, quantize
from pillow_sdlatent.core.container import FormatError, write_chunks
from pillow_sdlatent.core.header import Header
from pillow_sdlatent.core.settings import QuantSettings, settings_for
from pillow_sdlatent.dataset import LatentDataset
from pillow_sdlatent.latents import read_latents, read_latents_batch, write_latents

FP = bytes(range(16))
IDENTITY = {"model_id": "my-vae", "fingerprint": FP}
INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
#: Per dtype: negative zero, the smallest subnormal, the largest subnormal (negated), the largest finite value.
SPECIAL_BITS = {
    torch.float16: [0x8000, 0x0001, 0x83FF, 0x7BFF],
    torch.bfloat16: [0x8000, 0x0001, 0x807F, 0x7F7F],
    torch.float32: [0x80000000, 0x00000001, 0x807FFFFF, 0x7F7FFFFF],
}


def chunk(ctype: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload))


def small_file(element: str, coder: str, values: np.ndarray, width: int = 16, height: int = 8) -> bytes:
    z = np.asarray(values, np.float32)
    q = quantize(z, QuantSettings("float", coder=coder, element=element))
    c, h, w = z.shape
    header = Header(width=width, height=height, mode="RGB", channels=c, latent_height=h, latent_width=w,
                    model_id="m", coder=coder, **q.fields)  # fmt: skip
    buf = io.BytesIO()
    write_chunks(buf, build_chunks(header, q))
    return buf.getvalue()


def special_tensor(dtype: torch.dtype, shape: tuple[int, int, int] = (4, 5, 6)) -> torch.Tensor:
    """Random values of ``dtype`` whose first entries are the special values (exact bit patterns)."""
    z = torch.randn(shape, generator=torch.Generator().manual_seed(3)).mul(2).to(dtype)
    bits = z.view(INT_VIEW[dtype]).reshape(-1)
    special = np.array(SPECIAL_BITS[dtype], np.uint32 if dtype == torch.float32 else np.uint16)
    bits[: len(special)] = torch.from_numpy(special.view(np.int32 if dtype == torch.float32 else np.int16))
    return z


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype]))


# ------------------------------------------------------------------ the model-free layer, byte for byte


def test_exact_bytes_of_a_small_float16_stream() -> None:
    # 1 channel, latent 1 x 2 (a 16 x 8 image): 1.0 = 0x3C00, -2.5 = 0xC100; planes: the high bytes, then the low.
    data = small_file("float16", "raw", np.array([[[1.0, -2.5]]]))
    head = (bytes([1, 0]) + struct.pack(">II", 16, 8) + bytes([1, 8]) + struct.pack(">H", 1) + bytes([3, 0])
            + struct.pack(">I", 1) + bytes(16) + bytes([1]) + b"m"
            + bytes.fromhex("00000000" "3f800000" "ffff"))  # fmt: skip
    expected = b"\x89SDL\r\n\x1a\n" + chunk(b"HEAD", head) + chunk(b"LDAT", bytes([0x3C, 0xC1, 0x00, 0x00]))
    assert data == expected + chunk(b"SEND", b"")
    lf = decode_bytes(data)
    assert lf.header.element == "float16" and lf.header.palette_size == 0
    assert lf.latents().tolist() == [[[1.0, -2.5]]]


def test_exact_planes_of_binary32_and_bfloat16() -> None:
    z = np.array([[[1.0, -0.0, np.float32(2**-149)]]], np.float32)  # 3F800000, 80000000, 00000001
    ldat = floats.planes(quantize(z, QuantSettings("float", element="float32")).payload)
    assert b"".join(ldat) == bytes.fromhex("3f8000" "800000" "000000" "000001")
    bf = quantize(np.array([[[1.0, 1.00390625, -3.0]]], np.float32), QuantSettings("float", element="bfloat16"))
    # 1.00390625 = 0x3F808000 lies halfway between two bfloat16s: ties to even gives 0x3F80
    assert b"".join(floats.planes(bf.payload)) == bytes.fromhex("3f3fc0" "8080" "40")


def test_zstd_ends_a_block_at_each_plane() -> None:
    parts = [bytes(300), bytes(range(256)) + bytes(44)]
    frame = entropy.zstd_compress_parts(parts)
    assert entropy.zstd_decompress(frame, 600) == b"".join(parts)
    assert frame[4] == 0x60  # single segment, 2-byte content size: the first block header starts at byte 7
    blocks, pos = 0, 7
    while True:
        bh = int.from_bytes(frame[pos : pos + 3], "little")
        blocks, pos = blocks + 1, pos + 3 + (1 if (bh >> 1) & 3 == 1 else bh >> 3)
        if bh & 1:
            break
    assert blocks == 2 and pos == len(frame)  # one block per part (one frame: a reader sees nothing else)


# ------------------------------------------------------------------ bit-exact round trips


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_lossless_round_trip_is_bit_exact(tmp_path: Path, dtype: torch.dtype) -> None:
    z = special_tensor(dtype, (4, 32, 32))
    path = tmp_path / "z.sdl"
    write_latents(path, z, **IDENTITY, lossless=True)
    back, header = read_latents(path, dtype=None)
    assert header.quantizer == "float" and header.element == str(dtype).removeprefix("torch.")
    assert same_bits(back, z)
    assert torch.signbit(back.reshape(-1)[0]) and back.reshape(-1)[1] != 0  # -0.0 and a subnormal kept
    as32, _ = read_latents(path)  # the float32 default holds the same values: converting back is exact
    assert as32.dtype == torch.float32 and same_bits(as32.to(dtype), z)
    assert len(path.read_bytes()) < 0.9 * z.numel() * z.element_size()  # smaller than the raw values


def test_lossless_accepts_numpy_and_4d() -> None:
    z = np.random.default_rng(0).normal(size=(1, 4, 3, 5)).astype(np.float16)
    buf = io.BytesIO()
    write_latents(buf, z, **IDENTITY, lossless=True)
    back, header = read_latents(io.BytesIO(buf.getvalue()), dtype=None)
    assert header.element == "float16" and np.array_equal(back.numpy().view(np.uint16), z[0].view(np.uint16))


def test_lossless_refuses_what_it_cannot_store_exactly() -> None:
    with pytest.raises(ValueError, match=r"not torch\.float64"):
        write_latents(io.BytesIO(), torch.zeros(4, 2, 2, dtype=torch.float64), **IDENTITY, lossless=True)
    with pytest.raises(TypeError, match="lossless=True chooses the method"):
        write_latents(io.BytesIO(), torch.zeros(4, 2, 2), **IDENTITY, lossless=True, quality=90)
    with pytest.raises(ValueError, match="NaN or infinity"):
        write_latents(io.BytesIO(), torch.full((4, 2, 2), float("inf")).half(), **IDENTITY, lossless=True)


def test_float_methods_round_to_the_format() -> None:
    z = torch.randn(4, 6, 7, generator=torch.Generator().manual_seed(1)) * 3
    for method, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        buf = io.BytesIO()
        write_latents(buf, z, **IDENTITY, method=method)
        back, header = read_latents(io.BytesIO(buf.getvalue()), dtype=None)
        assert header.element == method and same_bits(back, z.to(dtype))  # torch's rounding: nearest, ties even
    with pytest.raises(ValueError, match=r"beyond float16's range.*bfloat16 or float32"):
        write_latents(io.BytesIO(), torch.full((4, 2, 2), 70000.0), **IDENTITY, method="float16")
    assert settings_for(50, "bfloat16") == settings_for(100, "bfloat16")  # quality does not change it


def test_batch_and_dataset_read_stored_dtypes(tmp_path: Path) -> None:
    zs = [special_tensor(torch.bfloat16, (4, 3, 3)), *torch.randn(2, 4, 3, 3).bfloat16()]
    for i, z in enumerate(zs):
        write_latents(tmp_path / f"{i}.sdl", z, **IDENTITY, lossless=True)
    paths = sorted(tmp_path.glob("*.sdl"))
    batch, _ = read_latents_batch(paths, dtype=None)
    assert same_bits(batch, torch.stack(zs))
    ds = LatentDataset(tmp_path, dtype=None)
    assert all(same_bits(ds[i], zs[i]) for i in range(3))
    assert LatentDataset(tmp_path)[0].dtype == torch.float32
    write_latents(tmp_path / "9.sdl", zs[0].float(), **IDENTITY, lossless=True)
    with pytest.raises(ValueError, match=r"stores torch\.float32, the first file torch\.bfloat16"):
        read_latents_batch([*paths, tmp_path / "9.sdl"], dtype=None)


# ------------------------------------------------------------------ odd files


def _head_with(data: bytes, offset: int, raw: bytes) -> bytes:
    n = struct.unpack_from(">I", data, 8)[0]
    head = bytearray(data[16 : 16 + n])
    head[offset : offset + len(raw)] = raw
    return data[:8] + chunk(b"HEAD", bytes(head)) + data[8 + 12 + n :]


def _ldat(data: bytes, payload: bytes) -> bytes:
    at = data.index(b"LDAT") - 4
    n = struct.unpack_from(">I", data, at)[0]
    return data[:at] + chunk(b"LDAT", payload) + data[at + 12 + n :]


@pytest.mark.parametrize(
    ("offset", "raw", "match"),
    [
        (16, struct.pack(">I", 0), "unknown element format 0"),
        (16, struct.pack(">I", 4), "unknown element format 4"),
        (15, bytes([2]), "transform coder"),  # the range coder is the transform quantizer's only
        (38, struct.pack(">f", -0.0), "channel table must hold"),  # offset -0.0 is not the fixed +0.0
        (42, struct.pack(">f", 2.0), "channel table must hold"),
        (46, struct.pack(">H", 255), "channel table must hold"),
    ],
)
def test_bad_head_fields_reject(offset: int, raw: bytes, match: str) -> None:
    data = small_file("float16", "raw", np.ones((1, 1, 2)))
    with pytest.raises(FormatError, match=match):
        decode_bytes(_head_with(data, offset, raw))


def test_bad_payloads_reject() -> None:
    data = small_file("float32", "raw", np.ones((2, 1, 2)))
    with pytest.raises(FormatError, match="holds 15 bytes; header requires 16"):
        decode_bytes(_ldat(data, bytes(15)))
    with pytest.raises(FormatError, match="header requires 16"):
        decode_bytes(_ldat(data, bytes(17)))
    nan = bytes([0x7F, 0, 0, 0, 0xC0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0])  # plane 0 = 7F: value 0 is a NaN
    with pytest.raises(FormatError, match="infinite or NaN float32"):
        decode_bytes(_ldat(data, nan))
    zdata = small_file("bfloat16", "zstd", np.ones((2, 1, 2)))
    with pytest.raises(FormatError, match="declares a content size of 7; the header requires 8"):
        decode_bytes(_ldat(zdata, entropy.zstd_compress(bytes(7))))
    inf = bytes([0x7F, 0, 0, 0, 0x80, 0, 0, 0])  # 0x7F80: bfloat16 infinity
    with pytest.raises(FormatError, match="infinite or NaN bfloat16"):
        decode_bytes(_ldat(zdata, entropy.zstd_compress(inf)))


def test_cut_stream_keeps_the_top_plane_in_tolerant_mode() -> None:
    z = special_tensor(torch.float16, (4, 6, 8)).float().numpy()
    data = small_file("float16", "raw", z, 64, 48)
    cut = data[: data.index(b"LDAT") + 4 + 192 + 10]  # plane 0 (192 bytes) and 10 bytes of plane 1
    with pytest.raises(FormatError):
        decode_bytes(cut)
    fp = io.BytesIO(cut)
    lf = codec.read_body(fp, codec.read_head(fp), allow_truncated=True)
    want = z.reshape(-1).astype(np.float16).view(np.uint16)
    got = lf.symbols.reshape(-1)
    assert lf.truncated and np.array_equal(got[:10], want[:10])
    assert np.array_equal(got[10:], want[10:] & 0xFF00)  # every top byte, missing low bytes 0


# ------------------------------------------------------------------ through Pillow


def test_image_save_and_open_with_a_float_method(taesd_dir: Path, gradient: Image.Image) -> None:
    from pillow_sdlatent.models import load_model
    from pillow_sdlatent.pipeline import decode_rgb, encode_latents, split_image

    im = gradient.convert("RGB").crop((0, 0, 32, 24))
    buf = io.BytesIO()
    im.save(buf, "SDL", model=str(taesd_dir), method="bfloat16")
    lf = decode_bytes(buf.getvalue())
    model = load_model(taesd_dir, "cpu")
    z = torch.from_numpy(encode_latents(model, split_image(im)[1]))
    assert lf.header.element == "bfloat16" and same_bits(torch.from_numpy(lf.latents()).bfloat16(), z.bfloat16())
    with Image.open(io.BytesIO(buf.getvalue())) as out:
        assert out.size == im.size
        assert np.array_equal(np.asarray(out.convert("RGB")), decode_rgb(lf, model))
