"""Pillow images <-> latents <-> .sdl chunks: where the model layer meets the core.

Importing this module imports torch (through the model layer); the plugin
imports it only when an image is encoded or decoded.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from . import options
from .core import ratecontrol
from .core.codec import LatentFile, build_chunks, quantize
from .core.container import Chunk, write_chunks
from .core.header import Header
from .core.preview import preview_chunk
from .core.settings import QuantSettings, settings_for
from .models import Autoencoder, load_model, model_for_file

#: Modes stored as they are; everything else is converted first (see :func:`split_image`).
NATIVE = ("RGB", "L", "RGBA", "LA")


def split_image(im: Image.Image) -> tuple[str, np.ndarray, np.ndarray | None]:
    """(stored mode, RGB uint8 array (H, W, 3), alpha (H, W) or None) for any Pillow mode.

    P becomes RGBA when it has transparency, else RGB; 1 becomes L; CMYK and
    YCbCr-like modes become RGB; PA and La become LA/RGBA-like as Pillow converts them.
    High-bit-depth grey becomes 8-bit L (with a warning), whatever the data holds:
    I;16 scaled from its 16-bit range (``v / 257``, so 65535 is white); I and F exactly
    as Pillow's ``convert("L")`` (values clipped to 0..255, F truncated: 255 is white, 1.0 is 1).
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
        if mode.startswith("I;16"):
            arr = np.asarray(im, dtype=np.float64) / 257.0
            im = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
        else:
            im = im.convert("L")
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
    """Refinement steps (``options.resolve("REFINE", refine)``: argument > options > environment > 0)."""
    return options.resolve("REFINE", refine)


def search_stages(refine: int | Sequence[int] | None = None, effort: int | None = None) -> tuple[int, ...]:
    """The refinement stages a file's encode runs (:mod:`.effort`): those of the effort level
    (``options.resolve("EFFORT", effort)``, default 0: none), unless ``refine`` (the expert knob, resolved as
    :func:`refine_steps`) is set at least as close to the call (argument > ``options`` > environment) as the
    effort: then one stage of that many steps (``refine=0``: none, whatever the effort). A sequence of stages
    (benchmarks) is taken as it is. Checks both, whichever wins."""
    from .effort import level
    from .models.refine import stage_lengths

    value, effort_from = options.resolve_with_source("EFFORT", effort)
    stages = level(value).stages
    if refine is not None and not isinstance(refine, int):
        return stage_lengths(refine)
    steps, refine_from = options.resolve_with_source("REFINE", refine)
    if refine_from == "default" or _closeness(refine_from) < _closeness(effort_from):
        return stages
    return stage_lengths(steps)


def _closeness(where: str) -> int:
    """3 for an argument, 2 for an ``options`` attribute, 1 for the environment, 0 for the default."""
    return 0 if where == "default" else 2 if where.startswith("pillow_sdlatent.options.") else \
        1 if where.startswith("SDLATENT_") else 3  # fmt: skip


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
    model: Autoencoder,
    rgb: np.ndarray,
    latents: np.ndarray,
    settings: QuantSettings,
    refine: int | Sequence[int] | None = None,
    effort: int | None = None,
) -> tuple[np.ndarray, QuantSettings]:
    """The latents and settings to write for ``latents``, the encoder's output for ``rgb``, after the search
    that ``refine``/``effort`` ask for (:func:`search_stages`).

    Without refinement: unchanged. With refinement and the transform quantizer: refined through its
    torch twin on the parameters (steps and offsets) the encoder's latents choose, on the
    pixel error at several scales plus a rate term, and the settings pinned to that grid (never a worse
    distortion + rate cost than the encoder's latents: see :mod:`.models.refine`). With the other quantizers
    (their grids move with the latents): refined against the float decode, and the encoder's latents
    kept when those decode closer once quantized (:func:`best_quantized`).
    """
    steps = search_stages(refine, effort)
    if not steps:
        return latents, settings
    from .core import transform_coder
    from .models.refine import transform_quantizer

    x = to_tensor(rgb, model.downscale)
    z = torch.from_numpy(latents)[None]
    h, w = rgb.shape[:2]
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
        zq = quantize(z, settings).latents(z.shape[1:])
        out = to_uint8(model.decode(torch.from_numpy(zq)[None]), h, w)
        errors.append(float((torch.from_numpy(out).float() - ref).square().mean()))
    return candidates[int(np.argmin(errors))]


class ModelIdentity(NamedTuple):
    """What a file records of its model: enough to write latents made elsewhere without loading weights."""

    model_id: str
    fingerprint: bytes
    downscale: int


def check_choice(
    quality: int | None, method: str, dither: float | None, palette_size: int | None,
    settings: QuantSettings | None, budget: int | None,
) -> None:  # fmt: skip
    """The conflicts between save options that need no model to find."""
    if budget is not None and quality is not None:
        raise ValueError("give quality or a target_size/target_bpp budget, not both")
    if settings is not None:
        if quality is not None or method != "auto" or dither is not None or palette_size is not None:
            raise TypeError("pass either settings=... or quality/method/dither/palette_size, not both")
        if budget is not None:
            raise ValueError("a target_size/target_bpp budget chooses the settings; do not pass settings=...")


def settings_chooser(
    channels: int,
    quality: int | None = None,
    method: str = "auto",
    dither: float | None = None,
    palette_size: int | None = None,
    settings: QuantSettings | None = None,
    budget: int | None = None,
) -> Callable[[int | None], QuantSettings]:
    """quality -> settings for these save options; checks them all now (before any model runs)."""
    check_choice(quality, method, dither, palette_size, settings, budget)
    if settings is not None:
        return lambda _quality: settings

    def choose(q: int | None) -> QuantSettings:
        return settings_for(q, method, channels, dither, palette_size)

    choose(quality)
    return choose


def encode_chunks(
    latents: np.ndarray,
    model: Autoencoder | ModelIdentity,
    *,
    size: tuple[int, int] | None = None,
    mode: str = "RGB",
    alpha: np.ndarray | None = None,
    rgb: np.ndarray | None = None,
    quality: int | None = None,
    method: str = "auto",
    dither: float | None = None,
    palette_size: int | None = None,
    settings: QuantSettings | None = None,
    target_size: int | None = None,
    target_bpp: float | None = None,
    refine: int | Sequence[int] | None = None,
    effort: int | None = None,
    preview: bool = True,
    info: dict | None = None,
    extra: list[Chunk] | None = None,
) -> list[Chunk]:
    """The encode path after the encoder, the one every writer takes: latents -> optional refinement
    -> codec -> chunks, rate control included.

    latents: the encoder's (C, h, w) float32 output (unrefined), or latents made elsewhere.
    model: the autoencoder (needed to refine), or just the :class:`ModelIdentity` to record.
    size: image (width, height) (default: the latents' size times the downscale factor).
    mode, alpha: the stored mode and its alpha plane (see :func:`split_image`).
    rgb: the image's (H, W, 3) uint8 array: refinement targets it, and the ``prVw`` preview map is
        fitted to it (no preview without it, or with ``preview=False``).
    quality, method, dither, palette_size: as the save options; or ``settings`` for full control.
    target_size, target_bpp: a byte budget instead of ``quality``: the highest quality that fits
        (see :mod:`.core.ratecontrol`); with a search, quality and search are chosen together
        (:func:`refined_within`), and the unrefined file is kept if no refined one fits.
    refine, effort: the encoder's search (:func:`search_stages`; :mod:`.effort`).
    info: ``exif``/``icc_profile``/``xmp`` metadata; ``extra``: further ancillary chunks.
    """
    c, lh, lw = latents.shape
    if size is None:
        size = (lw * model.downscale, lh * model.downscale)
    budget = ratecontrol.budget_bytes(size[0], size[1], target_size, target_bpp)
    choose = settings_chooser(c, quality, method, dither, palette_size, settings, budget)
    steps = search_stages(refine, effort)
    if steps and (rgb is None or not isinstance(model, Autoencoder)):
        raise ValueError(
            f"refine needs the image (rgb=...) and the autoencoder itself (model=...): the options ask for "
            f"{sum(steps)} refinement steps (stages {steps}); pass effort=0 and refine=0 to write latents as they are"
        )
    preview_of = rgb if preview else None

    def build(s: QuantSettings, z: np.ndarray = latents) -> list[Chunk]:
        return latents_to_chunks(z, model, s, size, mode, alpha, info=info, extra=extra, preview_of=preview_of)

    def refined(s: QuantSettings) -> list[Chunk]:
        z, s = latents_for_file(model, rgb, latents, s, steps)  # type: ignore[arg-type]
        return build(s, z)

    if budget is None:
        return refined(choose(quality)) if steps else build(choose(quality))
    plain: dict[QuantSettings, list[Chunk]] = {}  # unrefined files by setting: the joint search sizes some twice

    def build_once(s: QuantSettings) -> list[Chunk]:
        if s not in plain:
            plain[s] = build(s)
        return plain[s]

    found, chunks = ratecontrol.fit_budget(choose, build_once, budget)
    if steps:
        return refined_within(budget, found, chunks, choose, build_once, refined)
    return chunks


#: Searches a byte budget may run with ``effort``/``refine`` (:func:`refined_within`), each a refinement at one
#: quality. The search changes the bytes by a ratio that drifts with the quality, so one re-measured ratio is not
#: always enough: at the top effort two searches left 5-26% of a budget unspent (docs/pictures.md). Measured in
#: docs/refine.md (benchmarks/refine.py --search --target-bpp).
BUDGET_SEARCHES = 3


def refined_within(
    budget: int,
    found: int,
    plain: list[Chunk],
    choose: Callable[[int | None], QuantSettings],
    build: Callable[[QuantSettings], list[Chunk]],
    refined: Callable[[QuantSettings], list[Chunk]],
    searches: int | None = None,
) -> list[Chunk]:
    """The file for a byte budget when the writer searches: quality and search chosen together.

    ``found`` is the highest quality whose unrefined file (``plain``) fits. The search changes the bytes (its
    rate term mostly saves some), so the file refined at ``found`` is measured, and the next search runs at the
    quality that the ratio of refined to unrefined bytes just measured says would fit, kept strictly between the
    highest quality whose refined file fits and the lowest whose refined file does not. It stops after
    ``searches`` (:data:`BUDGET_SEARCHES`) searches, or when the next quality would repeat a setting. The refined
    file of the highest quality that fits is kept, else ``plain``."""
    searches = BUDGET_SEARCHES if searches is None else searches
    fits, over = ratecontrol.MIN_QUALITY - 1, ratecontrol.MAX_QUALITY + 1  # refined files fit at fits, not at over
    best, tried, quality = plain, set(), found
    for _ in range(searches):
        setting = choose(quality)
        tried.add(setting)
        chunks = refined(setting)
        size = ratecontrol.file_size(chunks)
        if size <= budget:
            fits, best = quality, chunks
        else:
            over = quality
        ratio = size / ratecontrol.file_size(build(setting))
        try:
            guess, _ = ratecontrol.fit_budget(choose, build, int(budget / ratio))
        except ratecontrol.BudgetError:
            guess = ratecontrol.MIN_QUALITY
        quality = min(max(guess, fits + 1), over - 1)
        if quality <= fits or choose(quality) in tried:
            break
    return best


def encode_image(
    im: Image.Image,
    model: Autoencoder | str | None = None,
    *,
    device: str | None = None,
    info: dict | None = None,
    **save_options: Any,
) -> list[Chunk]:
    """All chunks of the .sdl file ``Image.save`` writes for ``im``: the image -> latents part of the
    encode path, then :func:`encode_chunks` (``save_options``: its keyword arguments, e.g. ``quality``,
    ``target_bpp``, ``effort``, ``refine``, ``preview``). Every option is checked before the encoder runs."""
    if im.width == 0 or im.height == 0:
        raise ValueError("cannot write empty image")
    opt = save_options.get
    budget = ratecontrol.budget_bytes(im.width, im.height, opt("target_size"), opt("target_bpp"))
    choice = (opt("quality"), opt("method", "auto"), opt("dither"), opt("palette_size"), opt("settings"), budget)
    check_choice(*choice)
    search_stages(opt("refine"), opt("effort"))
    if not isinstance(model, Autoencoder):
        model = load_model(model, device)
    settings_chooser(model.latent_channels, *choice)  # the checks that need the latent channel count
    stored, rgb, alpha = split_image(im)
    latents = encode_latents(model, rgb, 0)
    return encode_chunks(latents, model, size=im.size, mode=stored, alpha=alpha, rgb=rgb, info=info, **save_options)


def file_bytes(chunks: list[Chunk]) -> bytes:
    """The bytes of the file these chunks make (what ``Image.save`` writes)."""
    buf = io.BytesIO()
    write_chunks(buf, chunks)
    return buf.getvalue()


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
    """Quantize and code latents the model made of an image of ``size`` (width, height): the codec
    step of :func:`encode_chunks` (call that instead: it chooses settings, refines, controls the rate).

    ``preview_of``: the image's RGB array (H, W, 3); when given, a ``prVw`` chunk
    with the model-free preview map fitted to it is added (see core/preview.py).
    """
    q = quantize(latents, settings)
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
        **q.fields,
    )
    if preview_of is not None:
        extra = [*(extra or []), preview_chunk(q.latents((lh, lw)), preview_of, mode, model.downscale)]
    return build_chunks(header, q, alpha, info, extra)


def decode_rgb(lf: LatentFile, model: Autoencoder, latents: np.ndarray | None = None) -> np.ndarray:
    z = torch.from_numpy(lf.latents() if latents is None else latents)[None]
    return to_uint8(model.decode(z), lf.header.height, lf.header.width)


def decode_model(
    header: Header,
    model: Autoencoder | str | None = None,
    *,
    allow_mismatch: bool | None = None,
    device: str | None = None,
) -> Autoencoder:
    """The model that decodes a file of ``header``: found, its channels, scale and fingerprint checked,
    from the header alone (callers ask it before they decode a single latent)."""
    if isinstance(model, Autoencoder):
        return model
    return model_for_file(
        header,
        options.resolve("DECODE_MODEL", model),
        allow_mismatch=options.resolve("ALLOW_MODEL_MISMATCH", allow_mismatch),
        device=device,
    )


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
    model = decode_model(lf.header, model, allow_mismatch=allow_mismatch, device=device)
    strength = options.resolve("DENOISE", denoise)
    latents = None
    if strength:
        from .denoise import maybe_denoise

        latents = maybe_denoise(lf.latents(), strength, denoise_model, device)
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


def encode_each(model: Autoencoder, images: list[np.ndarray], batch_size: int) -> list[np.ndarray | Exception]:
    """Unrefined latents of many images, ``batch_size`` to a forward pass, for converters that must not stop at
    one bad image: a batch that fails (e.g. out of memory at one image's size) is retried one image at a
    time, and an image that still fails stands as its exception."""
    out: list[np.ndarray | Exception] = []
    for start in range(0, len(images), batch_size):
        part = images[start : start + batch_size]
        try:
            out += encode_batch(model, part, batch_size, refine=0)
            continue
        except Exception as exc:
            if len(part) == 1:
                out.append(exc)
                continue
        for rgb in part:
            try:
                out += encode_batch(model, [rgb], 1, refine=0)
            except Exception as exc:
                out.append(exc)
    return out


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
