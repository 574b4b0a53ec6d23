"""Re-create the regression inputs of this folder in the current format (run from the repository root).

Each file is a small forged input that once made the reader misbehave, or that a reader rule of the spec
decides; tests/test_fuzz.py::test_regression_input checks the outcome recorded in README.md.
"""

from __future__ import annotations

import struct
from pathlib import Path

from pillow_sdlatent.core.settings import QuantSettings
from pillow_sdlatent.testing import HEAD_FIELDS, build_file, join_chunks, sealed, split_chunks

HERE = Path(__file__).parent


def with_head(data: bytes, extra_rows: int = 0, **fields: int) -> bytes:
    chunks = split_chunks(data)
    head = bytearray(chunks[0][2])
    for name, value in fields.items():
        offset, fmt = HEAD_FIELDS[name]
        struct.pack_into(fmt, head, offset, value)
    head += head[-10:] * extra_rows
    chunks[0] = sealed(b"HEAD", bytes(head))
    return join_chunks(chunks)


def cases() -> dict[str, bytes]:
    rgba = build_file(24, 16, "RGBA", 4, QuantSettings("scalar", 64), 1)
    alph = rgba.index(b"ALPH")
    scalar = build_file(16, 16, "RGB", 4, QuantSettings("scalar", 16), 2, downscale=1)
    transform = build_file(64, 48, "RGB", 4, QuantSettings("transform", coder="transform", quality=60), 3)
    return {
        "tolerant-truncated-alph": rgba[: alph + 20],
        "tolerant-latent-bomb-c1024-f1": with_head(scalar, 1020, width=65535, height=1, channels=1024),
        "tolerant-117m-latent-values": with_head(scalar, width=7, height=1 << 24),
        "reader-transform-forged-size": with_head(transform, width=1 << 14, height=10_000),
    }


if __name__ == "__main__":
    for name, data in cases().items():
        (HERE / f"{name}.sdl").write_bytes(data)
        print(name, len(data))
