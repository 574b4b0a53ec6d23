"""spec/reference_decoder.py: the stand-alone decoder written from spec/sdl-v1.md decodes every test vector, and
rejects files mutated against the reader rules. It must not depend on pillow_sdlatent."""

from __future__ import annotations

import importlib.util
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import zstandard

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "spec" / "vectors"
SIGNATURE = b"\x89SDL\r\n\x1a\n"

_spec = importlib.util.spec_from_file_location("reference_decoder", ROOT / "spec" / "reference_decoder.py")
assert _spec is not None and _spec.loader is not None
rd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rd)


def vector(name: str) -> bytes:
    return (VECTORS / f"{name}.sdl").read_bytes()


def split(data: bytes) -> list[list]:
    """[[type, payload], ...] up to and including SEND."""
    assert data[:8] == SIGNATURE
    chunks, pos = [], 8
    while True:
        length, ctype = struct.unpack_from(">I4s", data, pos)
        chunks.append([ctype.decode(), data[pos + 8 : pos + 8 + length]])
        pos += 12 + length
        if ctype == b"SEND":
            return chunks


def chunk(ctype: str, payload: bytes, crc: int | None = None) -> bytes:
    raw = ctype.encode()
    crc = zlib.crc32(raw + payload) if crc is None else crc
    return struct.pack(">I", len(payload)) + raw + payload + struct.pack(">I", crc)


def join(chunks: list[list]) -> bytes:
    return SIGNATURE + b"".join(chunk(t, p) for t, p in chunks)


def replace(data: bytes, ctype: str, payload: bytes) -> bytes:
    chunks = split(data)
    for c in chunks:
        if c[0] == ctype:
            c[1] = payload
    return join(chunks)


def insert_before(data: bytes, before: str, ctype: str, payload: bytes) -> bytes:
    chunks = split(data)
    i = [c[0] for c in chunks].index(before)
    return join([*chunks[:i], [ctype, payload], *chunks[i:]])


def rejects(data: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        rd.decode(data)


def test_cli_decodes_every_vector() -> None:
    n = len(list(VECTORS.glob("*.sdl")))
    assert n >= 7
    run = subprocess.run([sys.executable, str(ROOT / "spec" / "reference_decoder.py"), str(VECTORS)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    lines = run.stdout.strip().splitlines()
    assert lines[-1] == f"{n} passed, 0 failed", run.stdout + run.stderr
    assert run.returncode == 0
    assert sum(" PASS " in line for line in lines) == n


def test_round_trip_of_the_test_helpers() -> None:
    for path in VECTORS.glob("*.sdl"):
        data = path.read_bytes()
        assert join(split(data)) == data


def test_send_with_payload_rejects() -> None:
    data = vector("scalar-raw-rgb")
    rejects(replace(data, "SEND", b"\0"), "SEND has a payload")


def test_bytes_after_send_are_ignored() -> None:
    data = vector("scalar-raw-rgb")
    _, z, _ = rd.decode(data + b"garbage")
    _, z0, _ = rd.decode(data)
    assert z.tobytes() == z0.tobytes()


@pytest.mark.parametrize("name", ["scalar-raw-rgb", "transform-l-c16"])
def test_alph_in_a_file_without_alpha_rejects(name: str) -> None:
    alph = dict(split(vector("palette-zstd-rgba")))["ALPH"]
    rejects(insert_before(vector(name), "LDAT", "ALPH", alph), "ALPH in a mode without alpha")


def test_plte_in_a_scalar_file_rejects() -> None:
    plte = dict(split(vector("palette-zstd-rgba")))["PLTE"]
    rejects(insert_before(vector("scalar-raw-rgb"), "LDAT", "PLTE", plte), "PLTE without the palette")


def test_second_data_chunk_rejects() -> None:
    data = vector("scalar-zstd-l-u16")
    rejects(insert_before(data, "SEND", "LDAT", dict(split(data))["LDAT"]), "second LDAT")


def test_known_ancillary_first_copy_wins() -> None:
    data = vector("scalar-raw-rgb")
    first = dict(split(data))["eXIf"]
    with pytest.warns(UserWarning, match="second eXIf"):
        hd, _, _ = rd.decode(insert_before(data, "LDAT", "eXIf", b"MM\0*other"))
    assert hd["exif"] == first


def test_crc_mismatch_critical_rejects_ancillary_drops() -> None:
    chunks = split(vector("scalar-raw-rgb"))
    bad = SIGNATURE + b"".join(chunk(t, p, crc=0 if t == "LDAT" else None) for t, p in chunks)
    rejects(bad, "CRC mismatch in a critical chunk")
    bad = SIGNATURE + b"".join(chunk(t, p, crc=0 if t == "eXIf" else None) for t, p in chunks)
    with pytest.warns(UserWarning, match="CRC mismatch"):
        hd, _, _ = rd.decode(bad)
    assert hd["exif"] is None


def test_unknown_critical_rejects_unknown_ancillary_skipped() -> None:
    data = vector("scalar-raw-rgb")
    rejects(insert_before(data, "LDAT", "ZZZZ", b"x"), "unknown or misplaced critical chunk")
    rd.decode(insert_before(data, "LDAT", "zzZZ", b"x"))


TRANSFORM_VECTORS = ["transform-rgb", "transform-l-c16", "transform-1x1-c32", "transform-smooth-c4"]


@pytest.mark.parametrize("name", TRANSFORM_VECTORS)
@pytest.mark.parametrize("extra", [b"\x12\x34\x56\x78" * 2, b"\0" * 8])
def test_words_after_the_range_coded_stream_reject(name: str, extra: bytes) -> None:
    data = vector(name)
    ldat = dict(split(data))["LDAT"]
    rejects(replace(data, "LDAT", ldat + extra), "end check")
    rejects(replace(data, "LDAT", ldat + extra[:3]), "multiple of 4")


@pytest.mark.parametrize("name", TRANSFORM_VECTORS)
def test_one_word_after_the_range_coded_stream_rejects(name: str) -> None:
    data = vector(name)
    rejects(replace(data, "LDAT", dict(split(data))["LDAT"] + b"\x12\x34\x56\x78"), "end check")


def test_zstd_payload_followed_by_bytes_rejects() -> None:
    data = vector("scalar-zstd-l-u16")
    ldat = dict(split(data))["LDAT"]
    rejects(replace(data, "LDAT", ldat + b"\0"), "after the zstd frame")
    rejects(replace(data, "LDAT", ldat + ldat), "after the zstd frame")  # two frames
    data = vector("palette-zstd-rgba")
    alph = dict(split(data))["ALPH"]
    rejects(replace(data, "ALPH", alph + b"\0\0\0\0"), "after the zstd frame")


def test_zstd_frames_the_spec_excludes_reject() -> None:
    data = vector("scalar-zstd-l-u16")
    _, z, _ = rd.decode(data)
    raw = z.size * 2 * b"\0"
    rejects(replace(data, "LDAT", zstandard.ZstdCompressor(write_content_size=False).compress(raw)), "content size")
    skippable = b"\x50\x2a\x4d\x18" + struct.pack("<I", 0)
    rejects(replace(data, "LDAT", skippable + zstandard.ZstdCompressor().compress(raw)), "frame magic")
    rejects(replace(data, "LDAT", zstandard.ZstdCompressor().compress(raw + b"\0\0")), "content size")
    rd.decode(replace(data, "LDAT", zstandard.ZstdCompressor(write_checksum=True).compress(raw)))


def test_truncated_files_reject() -> None:
    for path in VECTORS.glob("*.sdl"):
        data = path.read_bytes()
        for cut in range(len(data)):
            with pytest.raises(ValueError):
                rd.decode(data[:cut])


def test_header_range_checks() -> None:
    data = vector("transform-rgb")
    head = bytearray(dict(split(data))["HEAD"])
    for offset, value in [(0, 2), (10, 4), (11, 0), (14, 3), (15, 1)]:  # major, mode, downscale, quantizer, coder
        bad = bytearray(head)
        bad[offset] = value
        with pytest.raises(ValueError):
            rd.decode(replace(data, "HEAD", bytes(bad)))
    rejects(replace(data, "HEAD", bytes(head) + b"\0"), "HEAD length")


def test_float_stream_rules() -> None:
    # Section 5.4: element formats 1..3, the fixed channel table, the (3, 0) and (3, 1) pairs, finite values only.
    data = vector("float-raw-bf16-la")
    head = dict(split(data))["HEAD"]
    cases = [(16, b"\0\0\0\0", "element format"), (16, b"\0\0\0\4", "element format"),
             (15, b"\2", "quantizer/coder pair"), (head.index(b"\x3f\x80"), b"\x40", "channel table")]  # fmt: skip
    for offset, raw, match in cases:
        bad = bytearray(head)
        bad[offset : offset + len(raw)] = raw
        rejects(replace(data, "HEAD", bytes(bad)), match)
    ldat = bytearray(dict(split(data))["LDAT"])
    n = len(ldat) // 2  # bfloat16: plane 0 then plane 1
    ldat[7], ldat[n + 7] = 0x7F, 0x80  # value 7: +infinity
    rejects(replace(data, "LDAT", bytes(ldat)), "infinity or NaN")
    rejects(replace(data, "LDAT", bytes(ldat[:-1])), "raw payload")
    hd, Z, _ = rd.decode(data)
    assert hd["element"] == "bfloat16" and hd["palette_size"] == 0 and np.signbit(Z.reshape(-1)[0])


def test_preview_chunk() -> None:
    data = vector("transform-rgb")
    hd, z, alpha = rd.decode(data)
    assert hd["preview_map"].shape == (3, 1 + 2 * 4)
    assert rd.render_preview(hd, z, alpha, hd["preview_map"]).shape == (9, 15, 3)
    prvw = bytearray(dict(split(data))["prVw"])
    prvw[0] = 2  # unknown version: the chunk is ignored, decoding goes on
    with pytest.warns(UserWarning, match="prVw"):
        hd, z2, _ = rd.decode(replace(data, "prVw", bytes(prvw)))
    assert hd["preview_map"] is None and z2.tobytes() == z.tobytes()
    prvw = bytearray(dict(split(data))["prVw"])
    prvw[3:5] = b"\x7c\x00"  # f16 infinity
    with pytest.warns(UserWarning, match="not finite"):
        assert rd.decode(replace(data, "prVw", bytes(prvw)))[0]["preview_map"] is None


def test_shape_order_matches_the_printed_list() -> None:
    assert rd.SHAPE_ORDER == rd.SHAPE_ORDER_PRINTED
