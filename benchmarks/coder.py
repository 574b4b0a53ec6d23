"""Latent coder on its own: bits per latent value, distance to the entropy limits, and entropy-decoding speed.

    python benchmarks/coder.py [--model ../shared/models/taesd] [--images ...] [--quality 20 40 60 75 90]

For each image the autoencoder encodes once; then, per quality of the transform coder (spec sections 5.3
and 6), it reports the LDAT payload in bits per latent value next to
- the ideal code length of the symbols under the coder's own models, parameters (DC predictor coefficients,
  band models) included: what a perfect entropy coder would spend with the same probabilities, so the
  "overhead" column is the range coder's rounding and flush,
- the order-0 entropy of the symbols (per channel histogram: what a context-free coder could reach),
and the time to entropy-decode and dequantize the latents on one CPU core (the autoencoder is separate), and
that of ``read_latents`` of the whole file (bytes in memory to a float32 torch tensor: container, CRCs,
HEAD, the stream, dequantization).

    python benchmarks/coder.py --crop 512      # 512x512 centre crops: 4x64x64 latents with TAESD
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core: the decode-speed target is per core
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import platform
import time
from pathlib import Path

import numpy as np

from pillow_sdlatent.core import transform_coder

SHARED = Path(__file__).resolve().parents[2] / "shared"
KODAK = SHARED / "data" / "kodak"


def order0_bits(symbols: np.ndarray) -> float:
    """Empirical order-0 entropy in bits, each channel with its own histogram."""
    total = 0.0
    for plane in symbols:
        counts = np.bincount(plane.ravel()).astype(np.float64)
        p = counts[counts > 0] / plane.size
        total -= float((counts[counts > 0] * np.log2(p)).sum())
    return total


def stream_header_bytes(channels: int, data: bytes) -> int:
    return transform_coder.header_size(data, channels)


def coder_round_trip(z: np.ndarray, quality: int, costs: list[float]) -> tuple[bytes, float, object]:
    """(stream, encode seconds, the decode + dequantize call) of the transform coder on latents ``z``."""
    symbols, offset, scale, levels, weights = transform_coder.quantize(z, quality)
    t = time.perf_counter()
    data = transform_coder.encode_symbols(symbols, levels, weights, costs)
    encode_s = time.perf_counter() - t

    def decode() -> None:
        s, w = transform_coder.decode_symbols(data, symbols.shape, levels)
        transform_coder.dequantize(s, offset, scale, levels, w, z.shape[1:])

    return data, encode_s, decode


def _symbols(z: np.ndarray, quality: int) -> np.ndarray:
    return transform_coder.quantize(z, quality)[0]


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def encode_latents(model_spec: str, paths: list[Path], crop: int = 0) -> tuple[dict[str, np.ndarray], object]:
    import torch
    from PIL import Image

    from pillow_sdlatent.models import load_model
    from pillow_sdlatent.pipeline import split_image, to_tensor

    torch.set_num_threads(2)
    model = load_model(model_spec, "cpu")
    out = {}
    for path in paths:
        im = Image.open(path).convert("RGB")
        if crop:
            left, top = (im.width - crop) // 2, (im.height - crop) // 2
            im = im.crop((left, top, left + crop, top + crop))
        _, rgb, _ = split_image(im)
        out[path.name] = model.encode(to_tensor(rgb, model.downscale))[0].numpy()
    torch.set_num_threads(1)
    return out, model


def read_call(z: np.ndarray, quality: int, model: object):
    """``read_latents`` of the whole file ``write_latents`` makes of ``z`` at this quality."""
    import io

    from pillow_sdlatent.latents import read_latents, write_latents

    buf = io.BytesIO()
    write_latents(buf, z, model, quality=quality)
    data = buf.getvalue()
    return lambda: read_latents(io.BytesIO(data))


_FIRST = """
import time
t = time.perf_counter()
import numpy as np
from pillow_sdlatent.core import transform_coder as tc
z = np.random.default_rng(0).normal(size=(4, 64, 64)).astype(np.float32)
s, _, _, lev, w = tc.quantize(z, 60)
data = tc.encode_symbols(s, lev, w)
t = time.perf_counter()
tc.decode_symbols(data, s.shape, lev)
print(time.perf_counter() - t)
"""


def first_decode_seconds(cache_dir: str | None) -> float:
    """Seconds of the first transform decode in a fresh process: numba's import and its compiled code, loaded
    from the cache (``cache_dir`` None) or compiled into an empty cache directory."""
    import subprocess
    import sys

    env = dict(os.environ, **({"NUMBA_CACHE_DIR": cache_dir} if cache_dir else {}))
    out = subprocess.run([sys.executable, "-c", _FIRST], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "taesd"))
    ap.add_argument("--images", nargs="*", type=Path, default=sorted(KODAK.glob("kodim*.png")))
    ap.add_argument("--quality", nargs="*", type=int, default=[20, 40, 60, 75, 90])
    ap.add_argument("--repeats", type=int, default=5, help="decode timings: best of this many")
    ap.add_argument("--crop", type=int, default=0, help="centre crops of this side (0: whole images)")
    ap.add_argument("--first-decode", action="store_true", help="only time the first decode of a fresh process")
    args = ap.parse_args(argv)
    if args.first_decode:
        import tempfile

        first_decode_seconds(None)  # the cache is filled, if it was not
        with tempfile.TemporaryDirectory() as empty:
            compiled = first_decode_seconds(empty)
        print(f"first transform decode in a fresh process: {first_decode_seconds(None):.2f} s from numba's cache, "
              f"{compiled:.2f} s compiling it (empty NUMBA_CACHE_DIR)")  # fmt: skip
        return
    latents, model = encode_latents(args.model, args.images, args.crop)
    shape = next(iter(latents.values())).shape
    print(
        f"model {args.model}, {len(latents)} images (latents {shape[0]}x{shape[1]}x{shape[2]} for the first), "
        f"{platform.processor() or platform.machine()}, one thread; encoder constriction, decoder compiled (numba)"
    )
    print("| quality | LDAT bytes | bits/latent | ideal bits under own model | coder overhead | order-0 entropy "
          "| bytes / order-0 | encode ms | decode+dequantize ms | read_latents ms |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for quality in args.quality:
        rows = []
        for z in latents.values():
            costs: list[float] = []
            data, encode_s, decode = coder_round_trip(z, quality, costs)
            decode_s = best_of(decode, args.repeats)
            read_s = best_of(read_call(z, quality, model), args.repeats)
            payload_bits = 8 * (len(data) - stream_header_bytes(z.shape[0], data))
            rows.append((len(data), 8 * len(data) / z.size, sum(costs) / z.size, payload_bits, sum(costs),
                         order0_bits(_symbols(z, quality)) / z.size, encode_s, decode_s, read_s))  # fmt: skip
        n, bpl, ideal_pl, payload, ideal, h0_pl, enc, dec, read = (
            np.array(c, dtype=np.float64) for c in zip(*rows, strict=True)
        )
        print(
            f"| {quality} | {n.mean():.0f} | {bpl.mean():.3f} | {ideal_pl.mean():.3f} "
            f"| {(payload.sum() / ideal.sum() - 1) * 100:+.2f}% | {h0_pl.mean():.3f} "
            f"| {bpl.mean() / h0_pl.mean():.3f} | {enc.mean() * 1e3:.1f} "
            f"| {dec.mean() * 1e3:.2f} (max {dec.max() * 1e3:.2f}) "
            f"| {read.mean() * 1e3:.2f} (max {read.max() * 1e3:.2f}) |"
        )


if __name__ == "__main__":
    main()
