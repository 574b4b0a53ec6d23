"""Corruption is detected: every single-bit flip in a file is rejected or leaves the latents unchanged.

Exhaustive over small files holding every chunk type of version 1 (latent layer
only, no model). The per-chunk outcomes asserted here are the table in
spec/sdl-v1.md, section "Corruption detection".
"""

from __future__ import annotations

import struct
import warnings
from collections import defaultdict

import numpy as np
import pytest

from pillow_sdlatent.core.codec import decode_bytes
from pillow_sdlatent.core.settings import QuantSettings
from pillow_sdlatent.fuzzing import build_file, sealed, split_chunks

META = {"exif": b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x00", "icc_profile": b"\x00\x01icc", "xmp": "<x:xmpmeta/>"}

REJECTED, DROPPED, SILENT = "rejected", "dropped with a warning, latents unchanged", "SILENT"


def with_unknown_ancillary(data: bytes) -> bytes:
    """Insert an unknown ancillary chunk (as a future preview would be) after the metadata."""
    chunks = split_chunks(data)
    assert chunks is not None
    chunks.insert(2, sealed(b"prVw", bytes(range(10))))
    return b"".join([data[:8], *(b"".join(c) for c in chunks)])


FILES = {
    # palette + alpha + all metadata + an unknown ancillary chunk: every chunk type once
    "palette-rgba": with_unknown_ancillary(
        build_file(16, 8, "RGBA", 4, QuantSettings("palette", 64, 4, dither=0.0), 11, META)
    ),
    # scalar, raw coder, u16 symbols: every LDAT byte is a symbol
    "scalar-raw-u16": build_file(40, 32, "L", 2, QuantSettings("scalar", 300, coder="raw"), 12),
}


def regions(data: bytes) -> list[str]:
    """Name of the field each byte belongs to: ``signature`` or ``TYPE.length|type|payload|crc``."""
    names = ["signature"] * 8
    pos = 8
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        ctype = data[pos + 4 : pos + 8].decode()
        names += [f"{ctype}.length"] * 4 + [f"{ctype}.type"] * 4 + [f"{ctype}.payload"] * length
        names += [f"{ctype}.crc"] * 4
        pos += 12 + length
    assert len(names) == len(data)
    return names


def classify(data: bytes, reference: np.ndarray, alpha: np.ndarray | None) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            lf = decode_bytes(data)
        except (OSError, ValueError):
            return REJECTED
    same = np.array_equal(lf.latents().view(np.uint32), reference.view(np.uint32)) and (
        alpha is None or np.array_equal(lf.alpha, alpha)
    )
    if same and any("CRC mismatch in ancillary" in str(w.message) for w in caught):
        return DROPPED
    return SILENT


@pytest.mark.parametrize("name", sorted(FILES))
def test_every_single_bit_flip_is_detected(name: str) -> None:
    data = FILES[name]
    ref = decode_bytes(data)
    reference, alpha = ref.latents(), ref.alpha
    names = regions(data)
    outcomes: dict[str, set[str]] = defaultdict(set)
    silent = []
    for bit in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        outcome = classify(bytes(flipped), reference, alpha)
        outcomes[names[bit // 8]].add(outcome)
        if outcome == SILENT:
            silent.append((bit, names[bit // 8]))
    assert not silent, f"undetected flips (bit, field): {silent[:10]}"
    assert len(data) * 8 >= 1000  # a few thousand flips in all

    # The spec's table: critical chunks and the signature reject any flip; an ancillary
    # chunk's payload or CRC flip drops the chunk; a type flip may also make it critical
    # (bit 5 of the first letter) and so rejected; a length flip breaks the framing.
    for field, seen in outcomes.items():
        ctype, _, part = field.partition(".")
        ancillary = ctype[:1].islower()
        if not ancillary:
            assert seen == {REJECTED}, field
        elif part in ("payload", "crc"):
            assert seen == {DROPPED}, field
        elif part == "type":
            assert seen == {REJECTED, DROPPED}, field
        else:
            assert seen == {REJECTED}, field
    chunk_types = {f.partition(".")[0] for f in outcomes}
    if name == "palette-rgba":
        assert chunk_types == {"signature", "HEAD", "eXIf", "iCCP", "xMPt", "prVw", "PLTE", "ALPH", "LDAT", "SEND"}
