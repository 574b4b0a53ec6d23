"""Re-create the regression inputs of this folder in the current format (run from the repository root).

Each file is a small forged input that once made the reader misbehave, or that a reader rule of the spec
decides; tests/test_fuzz.py::test_regression_input checks the outcome recorded in README.md.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from pillow_sdlatent.core import entropy
from pillow_sdlatent.core.codec import decode_bytes
from pillow_sdlatent.core.settings import QuantSettings
from pillow_sdlatent.testing import build_file, forge_head, join_chunks, sealed, split_chunks

HERE = Path(__file__).parent


def edit(data: bytes, ctype: bytes, payload: bytes | None = None, before: bytes | None = None,
         extra: bytes | None = None) -> bytes:  # fmt: skip
    """``data`` with chunk ``ctype``'s payload replaced, or (``before``) a chunk inserted before that type."""
    chunks = split_chunks(data)
    if before is not None:
        i = next(i for i, c in enumerate(chunks) if c[1] == before)
        chunks.insert(i, sealed(ctype, payload or b""))
    else:
        chunks = [sealed(ctype, payload if extra is None else c[2] + extra) if c[1] == ctype else c for c in chunks]
    return join_chunks(chunks)


#: A prVw map of a 4-channel file that paints every pixel 128.
GREY_PREVIEW = bytes([1, 1, 3]) + np.array([[128] + [0] * 8] * 3, ">f2").tobytes()


def rule_cases() -> dict[str, bytes]:
    """Odd files whose outcome a reader rule of the spec decides (spec sections 3, 5, 6.1, 10, 13)."""
    scalar = build_file(64, 48, "RGB", 4, QuantSettings("scalar", 64), 4)
    transform = build_file(64, 48, "RGB", 4, QuantSettings("transform", coder="transform", quality=60), 5)
    raw = decode_bytes(scalar).symbols.astype(np.uint8).tobytes()
    frame = entropy.zstd_compress(raw)
    big = build_file(1040, 1040, "RGB", 4, QuantSettings("scalar", 64), 6)  # 4-byte content size in its frame
    big_frame = entropy.zstd_compress(decode_bytes(big).symbols.astype(np.uint8).tobytes())
    preview = bytes([1, 1, 3]) + np.full((3, 9), 65504, ">f2").tobytes()
    half = build_file(32, 16, "RGB", 4, QuantSettings("float", coder="raw", element="float16"), 7)
    planes = bytearray(split_chunks(half)[-2][2])  # the LDAT: 2 planes of 4 x 2 x 4 values
    planes[5], planes[32 + 5] = 0x7E, 0x00  # value 5 becomes a binary16 NaN
    table_row = 37 + len(b"sdl-fuzz")  # the first channel-table row of HEAD
    head = bytearray(split_chunks(half)[0][2])
    head[table_row : table_row + 4] = struct.pack(">f", 1.0)  # offset 1.0: not the fixed row
    return {
        "rule-send-not-empty": scalar[: scalar.rindex(b"SEND") - 4] + b"".join(sealed(b"SEND", b"\x00")),
        "rule-bytes-after-send": scalar + b"not part of the file",
        "rule-alph-in-rgb": edit(scalar, b"ALPH", b"\x00" + entropy.zstd_compress(bytes(64 * 48)), before=b"LDAT"),
        "rule-plte-in-scalar": edit(scalar, b"PLTE", bytes(4), before=b"LDAT"),
        "rule-zstd-skippable-frame": edit(scalar, b"LDAT", b"\x50\x2a\x4d\x18" + struct.pack("<I", 2) + b"ab" + frame),
        "rule-zstd-two-frames": edit(scalar, b"LDAT", frame + entropy.zstd_compress(b"x")),
        "rule-zstd-128mib-window": edit(big, b"LDAT", big_frame[:4] + bytes([0x80, (27 - 10) << 3]) + big_frame[5:]),
        "rule-words-after-range-stream": edit(transform, b"LDAT", extra=bytes(64)),
        # the first map paints mid grey, the second (ignored) would paint white
        "rule-two-previews": edit(
            edit(transform, b"prVw", GREY_PREVIEW, before=b"LDAT"), b"prVw", preview, before=b"LDAT"
        ),
        "rule-preview-large-coefficients": edit(transform, b"prVw", preview, before=b"LDAT"),
        "rule-300-channels-f8": forge_head(transform, extra_rows=296, channels=300),
        "rule-float-nan": edit(half, b"LDAT", bytes(planes)),
        "rule-float-table-row": join_chunks([sealed(b"HEAD", bytes(head)), *split_chunks(half)[1:]]),
        "rule-float-element-4": forge_head(half, palette_size=4),
    }


def cases() -> dict[str, bytes]:
    rgba = build_file(24, 16, "RGBA", 4, QuantSettings("scalar", 64), 1)
    alph = rgba.index(b"ALPH")
    scalar = build_file(16, 16, "RGB", 4, QuantSettings("scalar", 16), 2, downscale=1)
    transform = build_file(64, 48, "RGB", 4, QuantSettings("transform", coder="transform", quality=60), 3)
    half = build_file(64, 48, "RGB", 4, QuantSettings("float", coder="zstd", element="float16"), 4)
    return {
        "tolerant-truncated-alph": rgba[: alph + 20],
        "tolerant-latent-bomb-c1024-f1": forge_head(scalar, extra_rows=1020, width=65535, height=1, channels=1024),
        "tolerant-117m-latent-values": forge_head(scalar, width=7, height=1 << 24),
        "reader-transform-forged-size": forge_head(transform, width=1 << 14, height=10_000),
        "tolerant-float-cut": half[: half.index(b"LDAT") + 4 + 300],  # inside the second plane's block
    }


if __name__ == "__main__":
    for name, data in {**cases(), **rule_cases()}.items():
        (HERE / f"{name}.sdl").write_bytes(data)
        print(name, len(data))
