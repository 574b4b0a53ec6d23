""".sdl as a latent cache for diffusion training, against the stores trainers use today.

    python benchmarks/latent_store.py                      # TAESD, TAESDXL, TAEF2 on the 24 Kodak images
    python benchmarks/latent_store.py --images 6 --models taesd
    python benchmarks/latent_store.py --images 6 --models taesd --scalar-sweep   # method="scalar" by quality
    python benchmarks/latent_store.py --float-planes      # the lossless stream's bytes and its alternatives

For each model (../shared/models) and Kodak image (512x512 centre crops by default, latents 4x64x64 for
TAESD; ``--crop 0``: whole 768x512 images), the float latents ``z`` of
``encode_images`` are stored in each format, read back to float32 ``z'``, and decoded:

* bytes: mean bytes per image (a whole file: header, preview and chunks for .sdl; the .npy / safetensors
  header included);
* latent SNR: ``10 log10(sum z^2 / sum (z - z')^2)`` over all images;
* decoded PSNR: RGB of ``z'`` against RGB of ``z`` (the float-latent decode), uint8, over all pixels;
* reads/s: files read per second from bytes in memory to a float32 torch tensor (C, h, w) on one thread
  (``torch.set_num_threads(1)``), the best of three passes over the images; disk I/O not included.

Stores: raw fp16 ``.npy``; bf16 safetensors; raw uint8 in imagenet.int8's convention (``u = clip(round((z /
24 + 0.5) * 255))``, read as ``(u / 255 - 0.5) * 24``) and the same bytes through zstd (level 19); .sdl with
the transform quantizer at several qualities and with the scalar quantizer (quantizer 0, zstd) at 96, 256,
4096 and 65536 levels, and lossless (the float quantizer: ``write_latents(..., lossless=True)`` of the latents
as fp16, bf16 and fp32 tensors), all through ``write_latents`` / ``read_latents``.

``--float-planes``: for each element format, the float quantizer's ``LDAT`` bytes ("LDAT"; "file": the whole
file) per image against the raw values' (2 or 4 bytes a value: "x raw"), and, as the same ratio, the same
values coded otherwise, each one zstd frame at the package's level (``entropy.ZSTD_LEVEL``): "one block" (the
byte planes without a block boundary between them), "no planes" (the values' big-endian bytes in order, what
a raw fp16/bf16 array through zstd is), "sub" / "xor" (before the split, each bit pattern minus, mod 2^bits,
or XOR its left neighbour's) and "ordered sub" (the difference of the patterns mapped to order-preserving
integers). No decoding, no timing.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import zstandard
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"

from pillow_sdlatent.core import entropy, floats  # noqa: E402
from pillow_sdlatent.core.codec import decode_bytes  # noqa: E402
from pillow_sdlatent.core.settings import QuantSettings  # noqa: E402
from pillow_sdlatent.latents import decode_latents, encode_images, read_latents, write_latents  # noqa: E402
from pillow_sdlatent.models import load_model  # noqa: E402

Store = tuple[Callable[[np.ndarray], bytes], Callable[[bytes], torch.Tensor]]
SPAN = 24.0  # imagenet.int8: (x / 255 - 0.5) * 24


def _npy_write(z: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, z.astype(np.float16))
    return buf.getvalue()


def _npy_read(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.load(io.BytesIO(data)).astype(np.float32))


def _st_write(z: np.ndarray) -> bytes:
    from safetensors.torch import save

    return save({"latents": torch.from_numpy(z).to(torch.bfloat16)})


def _st_read(data: bytes) -> torch.Tensor:
    from safetensors.torch import load

    return load(data)["latents"].float()


def _u8(z: np.ndarray) -> bytes:
    return np.clip(np.round((z / SPAN + 0.5) * 255), 0, 255).astype(np.uint8).tobytes()


def _u8_reader(shape: tuple[int, ...]) -> Callable[[bytes], torch.Tensor]:
    def read(data: bytes) -> torch.Tensor:
        u = torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(shape)
        return (u.float() / 255 - 0.5) * SPAN

    return read


def _sdl(identity: dict, **kw: object) -> Store:
    def write(z: np.ndarray) -> bytes:
        buf = io.BytesIO()
        write_latents(buf, z, **identity, **kw)
        return buf.getvalue()

    return write, lambda data: read_latents(io.BytesIO(data))[0]


def stores(identity: dict, shape: tuple[int, ...], qualities: list[int]) -> dict[str, Store]:
    zc = zstandard.ZstdCompressor(level=19)
    zd = zstandard.ZstdDecompressor()
    u8read = _u8_reader(shape)
    out: dict[str, Store] = {
        "fp16 .npy": (_npy_write, _npy_read),
        "bf16 safetensors": (_st_write, _st_read),
        "uint8 (imagenet.int8)": (_u8, u8read),
        "uint8 + zstd": (lambda z: zc.compress(_u8(z)), lambda d: u8read(zd.decompress(d))),
    }
    for q in qualities:
        out[f".sdl transform q{q}"] = _sdl(identity, quality=q)
    for levels in (96, 256, 4096, 65536):
        out[f".sdl scalar {levels} levels"] = _sdl(identity, settings=QuantSettings(levels=levels))
    for label, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        write, read = _sdl(identity, lossless=True)
        out[f".sdl lossless {label}"] = (lambda z, write=write, dtype=dtype: write(torch.from_numpy(z).to(dtype)), read)
    return out


def _psnr(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    mse = np.mean(np.concatenate([((x.astype(np.float64) - y) ** 2).ravel() for x, y in zip(a, b, strict=True)]))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def _snr(zs: list[np.ndarray], ys: list[np.ndarray]) -> float:
    sig = sum(float((z.astype(np.float64) ** 2).sum()) for z in zs)
    err = sum(float(((z.astype(np.float64) - y) ** 2).sum()) for z, y in zip(zs, ys, strict=True))
    return float("inf") if err == 0 else 10 * np.log10(sig / err)


def _reads_per_s(read: Callable[[bytes], torch.Tensor], blobs: list[bytes], min_time: float) -> float:
    best = float("inf")
    for _ in range(3):
        n, start = 0, time.perf_counter()
        while True:
            for b in blobs:
                read(b)
            n += len(blobs)
            if (dt := time.perf_counter() - start) >= min_time:
                break
        best = min(best, dt / n)
    return 1 / best


def run_model(name: str, images: list[Image.Image], qualities: list[int], min_time: float) -> list[str]:
    ae = load_model(str(SHARED / "models" / name), "cpu")
    identity = {"model_id": ae.model_id, "fingerprint": ae.fingerprint, "downscale": ae.downscale}
    zs = [z.numpy() for z in encode_images(images, ae)]
    sizes = [im.size for im in images]
    ref = [np.asarray(im) for im in decode_latents(zs, ae, sizes=sizes)]
    shapes = {z.shape for z in zs}
    rows = []
    raw = zs[0].size  # latent values per image (the uint8 store's bytes)
    by_shape = {s: stores(identity, s, qualities) for s in shapes}
    for label in by_shape[zs[0].shape]:
        blobs = [by_shape[z.shape][label][0](z) for z in zs]
        reads = [by_shape[z.shape][label][1](b).numpy() for z, b in zip(zs, blobs, strict=True)]
        dec = [np.asarray(im) for im in decode_latents(reads, ae, sizes=sizes)]
        blobs0 = [b for z, b in zip(zs, blobs, strict=True) if z.shape == zs[0].shape]
        rate = _reads_per_s(by_shape[zs[0].shape][label][1], blobs0, min_time)
        nbytes = np.mean([len(b) for b in blobs])
        rows.append(
            f"| {name} | {label} | {nbytes:,.0f} | {nbytes / raw:.2f} | {_snr(zs, reads):.1f} | "
            f"{_psnr(ref, dec):.1f} | {rate:,.0f} |"
        )
        print(rows[-1], flush=True)
    return rows


def _centre_crop(im: Image.Image, side: int) -> Image.Image:
    left, top = (im.width - side) // 2, (im.height - side) // 2
    return im.crop((left, top, left + side, top + side))


def scalar_sweep(name: str, images: list[Image.Image], qualities: list[int]) -> None:
    """Bytes and latent SNR of ``method="scalar"`` at each quality (no decoding, no timing)."""
    ae = load_model(str(SHARED / "models" / name), "cpu")
    identity = {"model_id": ae.model_id, "fingerprint": ae.fingerprint, "downscale": ae.downscale}
    zs = [z.numpy() for z in encode_images(images, ae)]
    print("| model | quality (method=scalar) | levels | bytes | vs uint8 | latent SNR dB |\n|---|---|---|---|---|---|")
    for q in qualities:
        write, read = _sdl(identity, method="scalar", quality=q)
        blobs = [write(z) for z in zs]
        nbytes = np.mean([len(b) for b in blobs])
        levels = int(read_latents(io.BytesIO(blobs[0]))[1].levels[0])
        snr = _snr(zs, [read(b).numpy() for b in blobs])
        print(f"| {name} | {q} | {levels} | {nbytes:,.0f} | {nbytes / zs[0].size:.2f} | {snr:.1f} |", flush=True)


def _filtered(bits: np.ndarray, kind: str) -> np.ndarray:
    """``bits`` (C, h, w) with a left-neighbour filter along each row (the first column as is)."""
    if kind == "ordered sub":
        top = bits.dtype.type(1 << (8 * bits.dtype.itemsize - 1))
        bits = np.where(bits & top, ~bits, bits | top)  # order-preserving: negatives below positives
    out = bits.copy()
    if kind == "xor":
        out[..., 1:] ^= bits[..., :-1]
    else:
        out[..., 1:] -= bits[..., :-1]  # unsigned arithmetic wraps mod 2^bits
    return out


def _float_variants(bits: np.ndarray) -> dict[str, int]:
    """Bytes of the alternatives to the float quantizer's stream for one latent's bit patterns."""
    zc = zstandard.ZstdCompressor(level=entropy.ZSTD_LEVEL, write_content_size=True, threads=0)
    be = bits.astype(bits.dtype.newbyteorder(">")).tobytes()
    out = {"one block": len(zc.compress(b"".join(floats.planes(bits)))), "no planes": len(zc.compress(be))}
    for kind in ("sub", "xor", "ordered sub"):
        out[kind] = len(entropy.zstd_compress_parts(floats.planes(_filtered(bits, kind))))
    return out


def float_planes(name: str, images: list[Image.Image]) -> None:
    """Bytes of the lossless stream per element format against raw values, and its alternatives."""
    ae = load_model(str(SHARED / "models" / name), "cpu")
    identity = {"model_id": ae.model_id, "fingerprint": ae.fingerprint, "downscale": ae.downscale}
    zs = [z.numpy() for z in encode_images(images, ae)]
    for fmt in ("float16", "bfloat16", "float32"):
        files, ldat, alt = [], [], {}
        for z in zs:
            data = _sdl(identity, method=fmt)[0](z)
            files.append(len(data))
            at = data.index(b"LDAT")
            ldat.append(int.from_bytes(data[at - 4 : at], "big"))
            for k, v in _float_variants(decode_bytes(data).symbols).items():
                alt[k] = alt.get(k, 0) + v
        raw = zs[0].size * floats.width(fmt)
        cols = " | ".join(f"{v / len(zs) / raw:.3f}" for v in alt.values())
        print(f"| {name} | {fmt} | {raw:,} | {np.mean(ldat):,.0f} | {np.mean(files):,.0f} | "
              f"{np.mean(ldat) / raw:.3f} | {cols} |", flush=True)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["taesd", "taesdxl", "taef2"])
    p.add_argument("--images", type=int, default=24, help="the first N Kodak images")
    p.add_argument("--qualities", type=int, nargs="+", default=[60, 75, 90, 100])
    p.add_argument("--crop", type=int, default=512, help="centre crops of this side (0: whole images)")
    p.add_argument(
        "--scalar-sweep",
        type=int,
        nargs="*",
        metavar="QUALITY",
        help="only bytes and latent SNR of method='scalar' at these qualities (default 60 65 70 75 80 100)",
    )
    p.add_argument("--float-planes", action="store_true", help="only the lossless stream's bytes and alternatives")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds per timing pass")
    args = p.parse_args()
    torch.set_num_threads(1)
    paths = sorted((SHARED / "data" / "kodak").glob("kodim*.png"))[: args.images]
    if not paths:
        sys.exit(f"no Kodak images in {SHARED / 'data' / 'kodak'}")
    images = [Image.open(f).convert("RGB") for f in paths]
    if args.crop:
        images = [_centre_crop(im, args.crop) for im in images]
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line), "?")
    what = f"{args.crop}x{args.crop} centre crops of" if args.crop else "whole"
    print(f"{what} {len(images)} Kodak images; {model_name}; torch {torch.__version__}, 1 thread; "
          f"zstd {'.'.join(map(str, zstandard.ZSTD_VERSION))}\n")  # fmt: skip
    if args.float_planes:
        print("| model | format | raw bytes | LDAT | file | x raw | one block | no planes | sub | xor | ordered sub |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for name in args.models:
            float_planes(name, images)
        return
    if args.scalar_sweep is not None:
        for name in args.models:
            scalar_sweep(name, images, args.scalar_sweep or [60, 65, 70, 75, 80, 100])
        return
    print("| model | store | bytes | vs uint8 | latent SNR dB | decoded PSNR dB | reads/s |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        run_model(name, images, args.qualities, args.min_time)


if __name__ == "__main__":
    main()
