"""The Pillow adapter: open/load/save of ``.sdl`` files through ``PIL.Image`` (a thin one, as
Pillow's own QoiImagePlugin: everything else is in :mod:`.core` and :mod:`.pipeline`).

``_open`` reads the header and metadata only (size and mode known, no model,
no torch), so Pillow's decompression-bomb check runs before any decoding;
``load`` decodes the latents and runs the autoencoder. ``draft`` (as for
JPEG) switches ``load`` to the file's model-free 1/8-scale preview instead.

Importing this module (``import pillow_sdlatent`` does) imports Pillow and the
standard library only: numpy, zstandard and the range coder load on the first
``open``, torch on the first encode or full decode.
"""

from __future__ import annotations

import warnings
from typing import IO, TYPE_CHECKING, Any

from PIL import Image, ImageFile

from .errors import FormatError, ModelMismatchError, ModelNotFoundError

if TYPE_CHECKING:
    import numpy as np

    from .core import codec

FORMAT = "SDL"
MIME = "image/x-sdlatent"
EXTENSIONS = [".sdl"]

#: Save options (``im.save(f, "SDL", **options)``); every other ``encoderinfo`` key is ignored.
SAVE_OPTIONS: dict[str, str] = {
    "quality": "0..100 (default 75); file size grows with it",
    "method": "quantizer: auto (= transform), scalar, palette, original; lossless float16, bfloat16, float32 "
    "(see core.settings.settings_for)",
    "target_size": "a budget in bytes instead of quality: the highest quality that fits",
    "target_bpp": "a budget in bits per pixel instead of quality",
    "effort": "0..9: the encoder's search through the decoder (default: options.EFFORT, SDLATENT_EFFORT, 0)",
    "refine": "expert override of effort's refinement steps (default: options.REFINE, SDLATENT_REFINE)",
    "preview": "store the model-free 1/8-scale preview map (default True; 69 bytes with 4 latent channels)",
    "model": "model spec (default: options.MODEL, SDLATENT_MODEL, then the SD VAE)",
    "device": "cpu, cuda, cuda:N, mps (default: options.DEVICE, SDLATENT_DEVICE, then the best available)",
    "dither": "error-diffusion strength 0..1 for palettes",
    "palette_size": "entries of a palette (2..65536)",
    "exif": "EXIF bytes or Image.Exif (default: the image's own info)",
    "icc_profile": "ICC profile bytes (default: the image's own info)",
    "xmp": "XMP packet (default: the image's own info)",
}
METADATA = ("exif", "icc_profile", "xmp")


def _accept(prefix: bytes) -> bool:
    from .core.container import SIGNATURE  # here, not at import: it costs dataclasses' import

    return prefix[:8] == SIGNATURE


class SdlImageFile(ImageFile.ImageFile):
    format = FORMAT
    format_description = "Stable Diffusion latent image"

    #: Per-image decode options: ``model``, ``allow_model_mismatch``, ``device`` (see
    #: :func:`pillow_sdlatent.open`). Empty: the defaults in :mod:`pillow_sdlatent.options`.
    decoder_options: dict[str, Any]

    def _open(self) -> None:
        from .core import codec

        self.head = codec.read_head(self.fp)
        header = self.header = self.head.header
        from .limits import check_decode_cost

        check_decode_cost(header, stacklevel=4)
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
        from .core import codec

        if not self.tile:
            raise ValueError("image already loaded; reopen the file to read its latents")
        if self.fp is None:
            raise ValueError("Operation on closed image" if self._closed() else "the file was verified or closed")
        self.fp.seek(self.tile[0].offset)
        lf = codec.read_body(self.fp, self.head, allow_truncated=ImageFile.LOAD_TRUNCATED_IMAGES)
        self.info.update(lf.info)  # metadata chunks after the data, as Pillow's PNG reader
        return lf

    def _closed(self) -> bool:
        return isinstance(getattr(self, "_im", None), Image.DeferredError)

    def load_seek(self, pos: int) -> None:
        """``fp.seek``. Its presence tells ``ImageFile.Parser`` that this format has no incremental
        decoder: the parser then knows ``size`` and ``mode`` as soon as the header is in, and
        decodes once the whole file has been fed (``Parser.close()``)."""
        self.fp.seek(pos)

    def verify(self) -> None:
        """Check every CRC and decode the latent layer (no model needed); raise on any defect."""
        self.read_latent_file()
        super().verify()

    def preview_map(self) -> np.ndarray | None:
        """The file's latent->pixel preview map, or None when it has no usable ``prVw`` chunk."""
        from .core import preview

        payload = self.head.preview
        if payload is None:
            return None
        try:
            return preview.unpack(payload, self.header.channels)
        except preview.PreviewError as exc:
            warnings.warn(f"ignoring the preview chunk: {exc}", stacklevel=3)
            return None

    def draft(self, mode: str | None, size: tuple[int, int] | None) -> tuple[str, tuple[int, int, float, float]] | None:
        """Pillow's draft mode: only before ``load``, and only once.

        When ``size`` is at most twice the 1/8-scale preview (``size <= (2 * (w // 8),
        2 * (h // 8))``), ``load`` renders the model-free preview of ``ceil(w/8) x
        ceil(h/8)`` pixels and ``im.size`` changes now. Twice, not JPEG's once: Pillow's
        :meth:`~PIL.Image.Image.thumbnail` asks draft for twice its target size, so every
        thumbnail of at most ``w // 8 x h // 8`` comes from the preview (and larger ones
        from the full decode). ``mode="L"`` turns an RGB file grey. Returns ``(mode, box)``
        with the original image's box in the new size (what ``thumbnail`` resizes from),
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
            fits = size[0] <= 2 * (original[0] // factor) and size[1] <= 2 * (original[1] // factor)
            if fits and self.preview_map() is not None:
                scale = factor
                self._size = (self.header.latent_width, self.header.latent_height)
                tile = self.tile[0]
                self.tile = [ImageFile._Tile(tile.codec_name, (0, 0, *self.size), tile.offset, tile.args)]
        self._draft_scale = scale
        return self.mode, (0, 0, original[0] / scale, original[1] / scale)

    def load(self) -> Any:
        if self._closed():
            raise ValueError("Operation on closed image")
        if self.tile and self.tile[0].codec_name == "sdl":
            # the model is found and checked (channels, scale, fingerprint) before a single latent is decoded
            model = None if self._draft_scale > 1 else self._decode_model()
            lf = self.read_latent_file()
            decoded = self._render_preview(lf) if model is None else self._decode_full(lf, model)
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
        import numpy as np

        from .core import preview

        matrix = self.preview_map()
        assert matrix is not None  # draft() enables the preview only when the map is usable
        pixels = preview.render(lf.latents(), matrix)
        im = Image.fromarray(pixels[..., 0], "L") if pixels.shape[2] == 1 else Image.fromarray(pixels, "RGB")
        if lf.alpha is not None:
            reduced = preview.box_reduce(lf.alpha, self.header.downscale)
            im = im.convert("RGBA" if im.mode == "RGB" else "LA")
            im.putalpha(Image.fromarray(np.clip(np.rint(reduced), 0, 255).astype(np.uint8), "L"))
        return im

    def _decode_model(self) -> Any:
        opts = self.decoder_options
        try:
            from .pipeline import decode_model
        except ImportError as exc:
            raise self._with_preview_hint(exc, f"decoding .sdl files needs torch ({exc})") from exc
        try:
            mismatch, device = opts.get("allow_model_mismatch"), opts.get("device")
            return decode_model(self.header, opts.get("model"), allow_mismatch=mismatch, device=device)
        except (ModelNotFoundError, ModelMismatchError) as exc:
            raise self._with_preview_hint(exc, str(exc)) from exc

    def _decode_full(self, lf: codec.LatentFile, model: Any) -> Image.Image:
        from .pipeline import decode_image

        opts = self.decoder_options
        return decode_image(lf, model, denoise=opts.get("denoise"), denoise_model=opts.get("denoise_model"))

    def _with_preview_hint(self, exc: Exception, message: str) -> Exception:
        w, h, f = *self.size, self.header.downscale
        if w >= f and h >= f and self.preview_map() is not None:  # draft() reaches the preview
            message += (
                f". The file carries a model-free {self.header.latent_width}x{self.header.latent_height} preview: "
                f"im.draft('RGB', ({w // f}, {h // f})) before load(), or im.thumbnail(size) for any size up to "
                f"{w // f}x{h // f}, gives it without the model"
            )
        return type(exc)(message)


def _save(im: Image.Image, fp: IO[bytes], filename: str | bytes) -> None:
    """``Image.save``: the save options and metadata handed to the one encode path (pipeline.encode_image)."""
    from .core.container import write_chunks

    opts = {k: v for k, v in im.encoderinfo.items() if k in SAVE_OPTIONS and k not in METADATA}
    info = {}
    for key in METADATA:
        value = im.encoderinfo.get(key, im.info.get(key))
        if isinstance(value, Image.Exif):
            value = value.tobytes()
        if value:
            info[key] = value
    from .pipeline import encode_image

    chunks = encode_image(im, opts.pop("model", None), device=opts.pop("device", None), info=info, **opts)
    # Everything is encoded before the first byte is written: a failure leaves fp untouched.
    write_chunks(fp, chunks)


def _save_all(im: Image.Image, fp: IO[bytes], filename: str | bytes) -> None:
    """``save_all=True``: an .sdl file holds one image; a single frame is saved as ``_save`` does."""
    frames = getattr(im, "n_frames", 1) + len(im.encoderinfo.get("append_images", []))
    if frames > 1:
        raise ValueError(
            f"SDL files hold one image, not {frames} frames: save each frame to its own file "
            "(for frame in ImageSequence.Iterator(im): ...)"
        )
    _save(im, fp, filename)


def register_sdlatent_opener() -> None:
    """Register the SDL format with Pillow (done on ``import pillow_sdlatent``)."""
    Image.register_open(FORMAT, SdlImageFile, _accept)
    Image.register_save(FORMAT, _save)
    Image.register_save_all(FORMAT, _save_all)
    Image.register_extensions(FORMAT, EXTENSIONS)
    Image.register_mime(FORMAT, MIME)


__all__ = ["SAVE_OPTIONS", "FormatError", "SdlImageFile", "register_sdlatent_opener"]
