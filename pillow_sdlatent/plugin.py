"""The Pillow adapter: open/load/save of ``.sdl`` files through ``PIL.Image``.

``_open`` reads the header and metadata only (size and mode known, no model,
no torch), so Pillow's decompression-bomb check runs before any decoding;
``load`` decodes the latents and runs the autoencoder. ``draft`` (as for
JPEG) switches ``load`` to the file's model-free 1/8-scale preview instead.
"""

from __future__ import annotations

import warnings
from typing import IO, Any

import numpy as np
from PIL import Image, ImageFile

from .core import codec, preview, ratecontrol
from .core.container import SIGNATURE, FormatError, write_chunks
from .core.header import Header
from .core.settings import QuantSettings, settings_for

FORMAT = "SDL"
MIME = "image/x-sdlatent"
EXTENSIONS = [".sdl"]

#: ``encoderinfo`` keys this plugin reads (everything else Pillow passes is ignored).
SAVE_OPTIONS = ("quality", "method", "model", "device", "dither", "palette_size", "exif", "icc_profile", "xmp",
                "preview", "target_size", "target_bpp")  # fmt: skip


def _accept(prefix: bytes) -> bool:
    return prefix[:8] == SIGNATURE


def _check_decode_cost(header: Header) -> None:
    """Pillow's decompression-bomb rule applied to what decoding really costs.

    Pillow checks ``width * height`` after ``_open``; the autoencoder decodes the
    image padded to whole latent cells (a 1-pixel-high image at factor 64 decodes
    64 rows) and the reader holds every latent value, so both are held to the
    same ``Image.MAX_IMAGE_PIXELS`` before any data is read.
    """
    limit = Image.MAX_IMAGE_PIXELS
    if not limit:
        return
    f = header.downscale
    padded = header.latent_width * f * header.latent_height * f
    values = header.channels * header.latent_height * header.latent_width
    what, cost = max((("padded pixels", padded), ("latent values", values)), key=lambda x: x[1])
    if cost > 2 * limit:
        raise Image.DecompressionBombError(
            f"decoding this {header.width}x{header.height} image needs {cost} {what}, more than twice the "
            f"limit of {limit} (Image.MAX_IMAGE_PIXELS); it could be a decompression bomb DOS attack"
        )
    if cost > limit and header.width * header.height <= limit:  # else Pillow's own check warns
        warnings.warn(
            f"decoding this image needs {cost} {what}, more than the limit of {limit}; "
            "it could be a decompression bomb DOS attack",
            Image.DecompressionBombWarning,
            stacklevel=3,
        )


class SdlImageFile(ImageFile.ImageFile):
    format = FORMAT
    format_description = "Stable Diffusion latent image"

    #: Per-image decode options: ``model``, ``allow_model_mismatch``, ``device`` (see
    #: :func:`pillow_sdlatent.open`). Empty: the defaults in :mod:`pillow_sdlatent.options`.
    decoder_options: dict[str, Any]

    def _open(self) -> None:
        self.head = codec.read_head(self.fp)
        header = self.header = self.head.header
        _check_decode_cost(header)
        self._size = (header.width, header.height)
        self._mode = header.mode
        self.info.update(self.head.info)
        self.info["model"] = header.model_id
        self.decoder_options = {}
        self._draft_scale = 0  # 0: draft not called; 1: full size; 8: the model-free preview
        # One pseudo-tile so that Pillow sees an unloaded image; load() does the work.
        self.tile = [ImageFile._Tile("sdl", (0, 0, *self.size), self.fp.tell(), None)]

    def read_latent_file(self) -> codec.LatentFile:
        """The model-free layer of this file: header, symbols, alpha, metadata."""
        self.fp.seek(self.tile[0].offset if self.tile else 0)
        if not self.tile:
            raise ValueError("image already loaded; reopen the file to read its latents")
        return codec.read_body(self.fp, self.head, allow_truncated=ImageFile.LOAD_TRUNCATED_IMAGES)

    def verify(self) -> None:
        """Check every CRC and decode the latent layer (no model needed); raise on any defect."""
        self.read_latent_file()
        super().verify()

    def preview_map(self) -> np.ndarray | None:
        """The file's latent->pixel preview map, or None when it has no usable ``prVw`` chunk."""
        payload = self.head.preview
        if payload is None:
            return None
        try:
            return preview.unpack(payload, self.header.channels)
        except preview.PreviewError as exc:
            warnings.warn(f"ignoring the preview chunk: {exc}", stacklevel=3)
            return None

    def draft(self, mode: str | None, size: tuple[int, int] | None) -> tuple[str, tuple[int, int, float, float]] | None:
        """Pillow's draft mode, as for JPEG: only before ``load``, and only once.

        When ``size`` fits within the 1/8-scale preview (``size <= (w // 8, h // 8)``,
        JPEG's rule for its 1/8 scale), ``load`` renders the model-free preview of
        ``ceil(w/8) x ceil(h/8)`` pixels and ``im.size`` changes now. ``mode="L"``
        turns an RGB file grey. Returns ``(mode, box)`` with the original image's
        box in the new size (what :meth:`PIL.Image.Image.thumbnail` resizes from),
        or None when the image is loaded or draft was already called.
        """
        if len(self.tile) != 1 or self._draft_scale:
            return None
        original = self.size
        if mode == "L" and self.mode == "RGB":
            self._mode = "L"
        scale = 1
        factor = self.header.downscale
        if size and size[0] > 0 and size[1] > 0:
            fits = min(original[0] // size[0], original[1] // size[1]) >= factor
            if fits and self.preview_map() is not None:
                scale = factor
                self._size = (self.header.latent_width, self.header.latent_height)
                tile = self.tile[0]
                self.tile = [ImageFile._Tile(tile.codec_name, (0, 0, *self.size), tile.offset, tile.args)]
        self._draft_scale = scale
        return self.mode, (0, 0, original[0] / scale, original[1] / scale)

    def load(self) -> Any:
        if self.tile and self.tile[0].codec_name == "sdl":
            lf = self.read_latent_file()
            decoded = self._render_preview(lf) if self._draft_scale > 1 else self._decode_full(lf)
            if decoded.mode != self.mode:
                decoded = decoded.convert(self.mode)
            self.load_prepare()
            self.im.paste(decoded.im, (0, 0, *self.size))
            self.tile = []
            if self._exclusive_fp and self._close_exclusive_fp_after_loading:
                self.fp.close()
            self.fp = None
        return super().load()

    def _render_preview(self, lf: codec.LatentFile) -> Image.Image:
        matrix = self.preview_map()
        assert matrix is not None  # draft() enables the preview only when the map is usable
        pixels = preview.render(lf.latents(), matrix)
        im = Image.fromarray(pixels[..., 0], "L") if pixels.shape[2] == 1 else Image.fromarray(pixels, "RGB")
        if lf.alpha is not None:
            reduced = preview.box_reduce(lf.alpha, self.header.downscale)
            im = im.convert("RGBA" if im.mode == "RGB" else "LA")
            im.putalpha(Image.fromarray(np.clip(np.rint(reduced), 0, 255).astype(np.uint8), "L"))
        return im

    def _decode_full(self, lf: codec.LatentFile) -> Image.Image:
        opts = self.decoder_options
        try:
            from .models import ModelMismatchError, ModelNotFoundError
            from .pipeline import decode_image
        except ImportError as exc:
            raise self._with_preview_hint(exc, f"decoding .sdl files needs torch ({exc})") from exc
        try:
            return decode_image(
                lf, opts.get("model"), allow_mismatch=opts.get("allow_model_mismatch"), device=opts.get("device"),
                denoise=opts.get("denoise"), denoise_model=opts.get("denoise_model"),
            )  # fmt: skip
        except (ModelNotFoundError, ModelMismatchError) as exc:
            raise self._with_preview_hint(exc, str(exc)) from exc

    def _with_preview_hint(self, exc: Exception, message: str) -> Exception:
        w, h, f = *self.size, self.header.downscale
        if w >= f and h >= f and self.preview_map() is not None:  # draft() reaches the preview
            message += (
                f". The file carries a model-free {self.header.latent_width}x{self.header.latent_height} preview: "
                f"call im.draft('RGB', ({w // f}, {h // f})) before load(), or im.thumbnail(...), to get it"
            )
        return type(exc)(message)


def _save(im: Image.Image, fp: IO[bytes], filename: str | bytes) -> None:
    from .models import load_model
    from .pipeline import encode_image

    opts = im.encoderinfo
    budget = ratecontrol.budget_bytes(im.width, im.height, opts.get("target_size"), opts.get("target_bpp"))
    if budget is not None and opts.get("quality") is not None:
        raise ValueError("give quality or a target_size/target_bpp budget, not both")
    from .pipeline import refine_steps

    model = load_model(opts.get("model"), opts.get("device"))

    def settings(quality: int | None) -> QuantSettings:
        method = opts.get("method", "auto")
        return settings_for(quality, method, model.latent_channels, opts.get("dither"), opts.get("palette_size"))

    settings(opts.get("quality"))  # reject bad options before the model runs
    refine = refine_steps(opts.get("refine"))
    info = {}
    for key in ("exif", "icc_profile", "xmp"):
        value = opts.get(key, im.info.get(key))
        if isinstance(value, Image.Exif):
            value = value.tobytes()
        if value:
            info[key] = value
    with_preview = bool(opts.get("preview", True))
    if budget is None:
        chunks = encode_image(im, settings(opts.get("quality")), model, info=info, preview=with_preview, refine=refine)
    else:
        chunks = _encode_to_budget(im, model, settings, budget, info, with_preview, refine)
    # Everything is encoded before the first byte is written: a failure leaves fp untouched.
    write_chunks(fp, chunks)


def _encode_to_budget(im: Image.Image, model: Any, settings: Any, budget: int, info: dict,
                      with_preview: bool, refine: int) -> list:  # fmt: skip
    """Encode (and refine) once, then quantize and code at the qualities a bisection visits (see core.ratecontrol)."""
    from .pipeline import encode_latents, latents_for_file, latents_to_chunks, split_image

    stored, rgb, alpha = split_image(im)
    latents = encode_latents(model, rgb)

    def build(s: QuantSettings, z: Any = latents) -> list:
        preview_of = rgb if with_preview else None
        return latents_to_chunks(z, model, s, im.size, stored, alpha, info=info, preview_of=preview_of)

    quality, chunks = ratecontrol.fit_budget(settings, build, budget)
    if refine:  # refine at the quality the search found; keep the unrefined file if the refined one overshoots
        z, s = latents_for_file(model, rgb, latents, settings(quality), refine)
        refined = build(s, z)
        if ratecontrol.file_size(refined) <= budget:
            chunks = refined
    return chunks


def register_sdlatent_opener() -> None:
    """Register the SDL format with Pillow (done on ``import pillow_sdlatent``)."""
    Image.register_open(FORMAT, SdlImageFile, _accept)
    Image.register_save(FORMAT, _save)
    Image.register_extensions(FORMAT, EXTENSIONS)
    Image.register_mime(FORMAT, MIME)


__all__ = ["FormatError", "SdlImageFile", "register_sdlatent_opener"]
