"""Pillow images <-> latents <-> .sdl chunks: where the model layer meets the core.

Importing this module imports torch (through the model layer); the plugin
imports it only when an image is encoded or decoded.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image

from . import options
from .core.codec import LatentFile, build_chunks, quantize
from .core.container import Chunk
from .core.header import Header
from .core.preview import preview_chunk, reader_latents
from .core.settings import QuantSettings
from .models import Autoencoder, load_model, model_for_file

#: Modes stored as they are; everything else is converted first (see :func:`split_image`).
NATIVE = ("RGB", "L", "RGBA", "LA")


def split_image(im: Image.Image) -> tuple[str, np.ndarray, np.ndarray | None]:
    """(stored mode, RGB uint8 array (H, W, 3), alpha (H, W) or None) for any Pillow mode.

    P becomes RGBA when it has transparency, else RGB; 1 becomes L; CMYK and
    YCbCr-like modes become RGB; I;16, I and F become L (high-bit-depth data is
    reduced to 8 bits, with a warning); PA and La become LA/RGBA-like as Pillow converts them.
    """
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info or im.palette.mode == "RGBA" else "RGB")
    elif mode == "PA":
        im = im.convert("RGBA")
    elif mode == "1":
        im = im.convert("L")
    elif mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        warnings.warn(f"mode {mode} is stored as 8-bit L: precision beyond 8 bits is lost", stacklevel=4)
        arr = np.asarray(im, dtype=np.float64)
        if mode.startswith("I;16") or (mode == "I" and arr.size and arr.max() > 255):
            arr = arr / 257.0 if arr.max(initial=0) <= 65535 else arr * (255.0 / max(arr.max(), 1))
        elif mode == "F":
            arr = arr * 255.0 if arr.size and arr.max() <= 1.0 else arr
        im = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    elif mode == "La":
        im = im.convert("LA")
    elif mode == "RGBa":
        im = im.convert("RGBA")
    elif mode not in NATIVE:
        im = im.convert("RGB")
    stored = im.mode
    alpha = np.asarray(im.getchannel("A")) if stored in ("RGBA", "LA") else None
    rgb = np.asarray(im.convert("RGB"))
    return stored, rgb, alpha


def to_tensor(rgb: np.ndarray, multiple: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H', W') float in [0, 1], edge-padded to multiples of ``multiple``."""
    h, w = rgb.shape[:2]
    ph, pw = math.ceil(h / multiple) * multiple - h, math.ceil(w / multiple) * multiple - w
    if ph or pw:
        rgb = np.pad(rgb, ((0, ph), (0, pw), (0, 0)), mode="edge")
    # In place where it can be: at 8192x8192 each float copy of the image is 805 MB.
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)[None].float().div_(255.0)


def to_uint8(images: torch.Tensor, height: int, width: int) -> np.ndarray:
    """(1, 3, H', W') in [0, 1] -> (height, width, 3) uint8, cropping the padding."""
    x = images[0, :, :height, :width].clamp(0, 1).mul_(255).round_().to(torch.uint8)
    return x.permute(1, 2, 0).contiguous().numpy()


def refine_steps(refine: int | None = None) -> int:
    """Refinement steps: ``refine`` if given, else ``options.REFINE``, else ``SDLATENT_REFINE``, else 0."""
    value: object = refine if refine is not None else options.REFINE
    if value is None:
        env = os.environ.get("SDLATENT_REFINE", "").strip()
        try:
            value = int(env) if env else 0
        except ValueError:
            raise ValueError(f"SDLATENT_REFINE must be a number of steps >= 0, got {env!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"refine must be a number of steps >= 0, got {value!r}")
    return value


def encode_latents(model: Autoencoder, rgb: np.ndarray, refine: int | None = None) -> np.ndarray:
    """(C, h, w) float32 latents of one RGB image, refined ``refine`` steps against the float decode
    (see :func:`refine_steps`; to refine for a file, use :func:`latents_for_file`)."""
    steps = refine_steps(refine)
    x = to_tensor(rgb, model.downscale)
    z = model.encode(x)
    if steps:
        z = model.refine(x, z, steps, height=rgb.shape[0], width=rgb.shape[1])
    return z[0].cpu().numpy().astype(np.float32)


def latents_for_file(
    model: Autoencoder, rgb: np.ndarray, latents: np.ndarray, settings: QuantSettings, refine: int | None = None
) -> tuple[np.ndarray, QuantSettings]:
    """The latents and settings to write for ``latents``, the encoder's output for ``rgb``.

    Without refinement: unchanged. With ``refine`` steps and the context or transform quantizer: refined
    through that quantizer on the grid (transform: steps and offsets) the encoder's latents choose, on the
    pixel error at several scales plus a rate term, and the settings pinned to that grid (never a worse
    distortion + rate cost than the encoder's latents: see :mod:`.models.refine`). With the other quantizers
    (their grids move with the latents): refined against the float decode, and the encoder's latents
    kept when those decode closer once quantized (:func:`best_quantized`).
    """
    steps = refine_steps(refine)
    if not steps:
        return latents, settings
    from .core import context_coder, transform_coder
    from .models.refine import dead_zone_quantizer, transform_quantizer

    x = to_tensor(rgb, model.downscale)
    z = torch.from_numpy(latents)[None]
    h, w = rgb.shape[:2]
    if settings.coder == "context":
        grid = settings.grid or context_coder.grid(latents, settings.quality)
        zr = model.refine(x, z, steps, height=h, width=w, quantizer=dead_zone_quantizer(grid))
        return zr[0].cpu().numpy().astype(np.float32), replace(settings, grid=grid)
    if settings.quantizer == "transform":
        params = settings.grid or transform_coder.params(latents, settings.quality)
        zr = model.refine(x, z, steps, height=h, width=w, quantizer=transform_quantizer(params))
        return zr[0].cpu().numpy().astype(np.float32), replace(settings, grid=params)
    zr = model.refine(x, z, steps, height=h, width=w)[0].cpu().numpy().astype(np.float32)
    return best_quantized(model, rgb, [zr, latents], settings), settings


def best_quantized(
    model: Autoencoder, rgb: np.ndarray, candidates: list[np.ndarray], settings: QuantSettings
) -> np.ndarray:
    """The candidate whose latents, quantized at ``settings`` as a reader will see them, decode closest
    to ``rgb`` (pixel MSE); the first when there is one. Costs one decode per candidate."""
    if len(candidates) == 1:
        return candidates[0]
    h, w = rgb.shape[:2]
    ref = torch.from_numpy(np.array(rgb, dtype=np.float32))
    errors = []
    for z in candidates:
        fields, payload, palette = quantize(z, settings)
        zq = reader_latents(fields, payload, palette, z.shape[1:])
        out = to_uint8(model.decode(torch.from_numpy(zq)[None]), h, w)
        errors.append(float((torch.from_numpy(out).float() - ref).square().mean()))
    return candidates[int(np.argmin(errors))]


def encode_image(
    im: Image.Image,
    settings: QuantSettings,
    model: Autoencoder | str | None = None,
    *,
    device: str | None = None,
    info: dict | None = None,
    extra: list[Chunk] | None = None,
    preview: bool = True,
    refine: int | None = None,
) -> list[Chunk]:
    """All chunks of the .sdl file for ``im`` (with a ``prVw`` preview chunk unless ``preview=False``);
    ``refine``: latent refinement steps (see :func:`refine_steps`)."""
    if not isinstance(model, Autoencoder):
        model = load_model(model, device or options.DEVICE, options.DTYPE)
    stored, rgb, alpha = split_image(im)
    latents, settings = latents_for_file(model, rgb, encode_latents(model, rgb), settings, refine)
    return latents_to_chunks(
        latents, model, settings, im.size, stored, alpha, info=info, extra=extra, preview_of=rgb if preview else None
    )


def latents_to_chunks(
    latents: np.ndarray,
    model: Autoencoder | ModelIdentity,
    settings: QuantSettings,
    size: tuple[int, int],
    mode: str = "RGB",
    alpha: np.ndarray | None = None,
    *,
    info: dict | None = None,
    extra: list[Chunk] | None = None,
    preview_of: np.ndarray | None = None,
) -> list[Chunk]:
    """Quantize and code latents the model made of an image of ``size`` (width, height).

    ``preview_of``: the image's RGB array (H, W, 3); when given, a ``prVw`` chunk
    with the model-free preview map fitted to it is added (see core/preview.py).
    """
    fields, payload, palette = quantize(latents, settings)
    c, lh, lw = latents.shape
    header = Header(
        width=size[0],
        height=size[1],
        mode=mode,
        channels=c,
        latent_height=lh,
        latent_width=lw,
        model_id=model.model_id,
        fingerprint=model.fingerprint,
        downscale=model.downscale,
        coder=settings.coder,
        **fields,
    )
    if preview_of is not None:
        seen = reader_latents(fields, payload, palette, latents.shape[1:])
        extra = [*(extra or []), preview_chunk(seen, preview_of, mode, model.downscale)]
    return build_chunks(header, payload, palette, alpha, info, extra)


def decode_rgb(lf: LatentFile, model: Autoencoder, latents: np.ndarray | None = None) -> np.ndarray:
    z = torch.from_numpy(lf.latents() if latents is None else latents)[None]
    return to_uint8(model.decode(z), lf.header.height, lf.header.width)


def decode_image(
    lf: LatentFile,
    model: Autoencoder | str | None = None,
    *,
    allow_mismatch: bool | None = None,
    device: str | None = None,
    denoise: float | None = None,
    denoise_model: str | None = None,
) -> Image.Image:
    """The Pillow image a decoded file holds, in its stored mode.

    ``denoise`` (default ``options.DENOISE``): diffusion denoising strength, 0 = off
    (see :mod:`pillow_sdlatent.denoise`; it may alter content).
    """
    if not isinstance(model, Autoencoder):
        model = model_for_file(
            lf.header,
            model or options.DECODE_MODEL,
            allow_mismatch=options.ALLOW_MODEL_MISMATCH if allow_mismatch is None else allow_mismatch,
            device=device or options.DEVICE,
            dtype=options.DTYPE,
        )
    strength = options.DENOISE if denoise is None else denoise
    latents = None
    if strength:
        from .denoise import maybe_denoise

        latents = maybe_denoise(lf.latents(), strength, denoise_model, device or options.DEVICE)
    im = Image.fromarray(decode_rgb(lf, model, latents), "RGB")
    mode = lf.header.mode
    if mode in ("L", "LA"):
        im = im.convert("L")
    if lf.alpha is not None:
        im.putalpha(Image.fromarray(lf.alpha, "L"))
    return im


def encode_batch(
    model: Autoencoder, images: list[np.ndarray], batch_size: int = 8, refine: int | None = None
) -> list[np.ndarray]:
    """Latents of many RGB uint8 arrays; images of equal size share forward passes (and refinement steps)."""
    steps = refine_steps(refine)
    out: list[np.ndarray | None] = [None] * len(images)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, rgb in enumerate(images):
        groups.setdefault(rgb.shape[:2], []).append(i)
    for idx in groups.values():
        for start in range(0, len(idx), batch_size):
            part = idx[start : start + batch_size]
            x = torch.cat([to_tensor(images[i], model.downscale) for i in part])
            z = model.encode(x)
            if steps:
                z = model.refine(x, z, steps, height=images[part[0]].shape[0], width=images[part[0]].shape[1])
            z = z.cpu().numpy().astype(np.float32)
            for j, i in enumerate(part):
                out[i] = z[j]
    return out  # type: ignore[return-value]


def decode_batch(
    model: Autoencoder, latents: list[np.ndarray], sizes: list[tuple[int, int]], batch_size: int = 8
) -> list[np.ndarray]:
    """RGB uint8 arrays (height, width, 3) for many latents; ``sizes`` are (width, height)."""
    out: list[np.ndarray | None] = [None] * len(latents)
    groups: dict[tuple, list[int]] = {}
    for i, z in enumerate(latents):
        groups.setdefault((z.shape, sizes[i]), []).append(i)
    for (_, (w, h)), idx in groups.items():
        for start in range(0, len(idx), batch_size):
            part = idx[start : start + batch_size]
            x = model.decode(torch.from_numpy(np.stack([latents[i] for i in part])))
            for j, i in enumerate(part):
                out[i] = to_uint8(x[j : j + 1], h, w)
    return out  # type: ignore[return-value]


@dataclass
class SourceImage:
    """An image read for encoding: its pixels as :func:`split_image` gives them and the metadata kept in the file."""

    size: tuple[int, int]  # (width, height)
    stored: str  # the mode the file stores (RGB, L, RGBA or LA)
    rgb: np.ndarray  # (H, W, 3) uint8
    alpha: np.ndarray | None  # (H, W) uint8, or None
    info: dict[str, bytes] = field(default_factory=dict)  # exif, icc_profile, xmp


def source_image(im: Image.Image) -> SourceImage:
    """Load ``im`` (decoding it, on the CPU) into what the encoder takes; its exif, ICC profile and XMP kept."""
    im.load()
    stored, rgb, alpha = split_image(im)
    info: dict[str, bytes] = {}
    for key in ("exif", "icc_profile", "xmp"):
        value = im.info.get(key)
        if isinstance(value, Image.Exif):
            value = value.tobytes()
        if value:
            info[key] = value
    return SourceImage(im.size, stored, rgb, alpha, info)


@dataclass(frozen=True)
class ModelIdentity:
    """What the chunks of a file take from its model (:func:`latents_to_chunks`): where no model is loaded."""

    model_id: str
    fingerprint: bytes
    downscale: int

    @classmethod
    def of(cls, model: Autoencoder) -> ModelIdentity:
        return cls(model.model_id, model.fingerprint, model.downscale)


def source_latents(
    model: Autoencoder,
    settings: QuantSettings,
    sources: list[SourceImage],
    *,
    batch_size: int = 1,
    refine: int | None = None,
) -> list[tuple[np.ndarray, QuantSettings] | Exception]:
    """The model's half of :func:`encode_sources`: each source's latents to code and the settings to code
    them with (refinement pins the quantizer's grid), or the exception that image raised."""
    steps = refine_steps(refine)
    latents: list[np.ndarray | Exception] = []
    for start in range(0, len(sources), batch_size):
        part = sources[start : start + batch_size]
        try:
            latents += encode_batch(model, [s.rgb for s in part], batch_size, refine=0)  # refined per file below
        except Exception:
            for s in part:
                try:
                    latents.append(encode_batch(model, [s.rgb], 1, refine=0)[0])
                except Exception as exc:
                    latents.append(exc)
    out: list[tuple[np.ndarray, QuantSettings] | Exception] = []
    for s, z in zip(sources, latents, strict=True):
        try:
            out.append(z if isinstance(z, Exception) else latents_for_file(model, s.rgb, z, settings, steps))
        except Exception as exc:
            out.append(exc)
    return out


def code_latents(
    model: Autoencoder | ModelIdentity, source: SourceImage, latents: np.ndarray, settings: QuantSettings,
    preview: bool = True,
) -> list[Chunk]:  # fmt: skip
    """The model-free half of :func:`encode_sources`: the chunks of the file of ``source`` (CPU only)."""
    return latents_to_chunks(latents, model, settings, source.size, source.stored, source.alpha,
                             info=dict(source.info), preview_of=source.rgb if preview else None)  # fmt: skip


def encode_sources(
    model: Autoencoder,
    settings: QuantSettings,
    sources: list[SourceImage],
    *,
    batch_size: int = 1,
    refine: int | None = None,
    preview: bool = True,
) -> list[list[Chunk] | Exception]:
    """The chunks of the .sdl file of each source, or the exception that image raised (the others go on):
    :func:`source_latents` (the model) then :func:`code_latents` (the CPU), which a pipeline may run apart.

    Equal-size images share forward passes of up to ``batch_size`` images. With ``batch_size=1`` every
    image has a forward pass of its own, as in ``Image.save``, and the bytes are ``Image.save``'s; batched
    forward passes round the last float bits differently, which can change the coded latents. A batch
    that fails (e.g. out of memory at its size) is retried one image at a time.
    """
    out: list[list[Chunk] | Exception] = []
    for s, r in zip(sources, source_latents(model, settings, sources, batch_size=batch_size, refine=refine),
                    strict=True):  # fmt: skip
        if isinstance(r, Exception):
            out.append(r)
            continue
        try:
            out.append(code_latents(model, s, *r, preview=preview))
        except Exception as exc:
            out.append(exc)
    return out
