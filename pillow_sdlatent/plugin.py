"""The Pillow adapter: open/load/save of ``.sdl`` files through ``PIL.Image``.

``_open`` reads the header and metadata only (size and mode known, no model,
no torch), so Pillow's decompression-bomb check runs before any decoding;
``load`` decodes the latents and runs the autoencoder.
"""

from __future__ import annotations

import warnings
from typing import IO, Any

from PIL import Image, ImageFile

from .core import codec
from .core.container import SIGNATURE, FormatError, write_chunks
from .core.header import Header
from .core.settings import settings_for

FORMAT = "SDL"
MIME = "image/x-sdlatent"
EXTENSIONS = [".sdl"]

#: ``encoderinfo`` keys this plugin reads (everything else Pillow passes is ignored).
SAVE_OPTIONS = ("quality", "method", "model", "device", "dither", "palette_size", "exif", "icc_profile", "xmp")


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
        header, info = codec.read_head(self.fp)
        _check_decode_cost(header)
        self.header = header
        self._size = (header.width, header.height)
        self._mode = header.mode
        self.info.update(info)
        self.info["model"] = header.model_id
        self.decoder_options = {}
        # One pseudo-tile so that Pillow sees an unloaded image; load() does the work.
        self.tile = [ImageFile._Tile("sdl", (0, 0, *self.size), self.fp.tell(), None)]

    def read_latent_file(self) -> codec.LatentFile:
        """The model-free layer of this file: header, symbols, alpha, metadata."""
        self.fp.seek(self.tile[0].offset if self.tile else 0)
        if not self.tile:
            raise ValueError("image already loaded; reopen the file to read its latents")
        return codec.read_body(self.fp, self.header, self.info, allow_truncated=ImageFile.LOAD_TRUNCATED_IMAGES)

    def verify(self) -> None:
        """Check every CRC and decode the latent layer (no model needed); raise on any defect."""
        self.read_latent_file()
        super().verify()

    def load(self) -> Any:
        if self.tile and self.tile[0].codec_name == "sdl":
            from .pipeline import decode_image

            lf = self.read_latent_file()
            opts = self.decoder_options
            decoded = decode_image(
                lf, opts.get("model"), allow_mismatch=opts.get("allow_model_mismatch"), device=opts.get("device")
            )
            self.load_prepare()
            self.im.paste(decoded.im, (0, 0, *self.size))
            self.tile = []
            if self._exclusive_fp and self._close_exclusive_fp_after_loading:
                self.fp.close()
            self.fp = None
        return super().load()


def _save(im: Image.Image, fp: IO[bytes], filename: str | bytes) -> None:
    from .models import load_model
    from .pipeline import encode_image

    opts = im.encoderinfo
    model = load_model(opts.get("model"), opts.get("device"))
    settings = settings_for(
        opts.get("quality"),
        opts.get("method", "auto"),
        model.latent_channels,
        opts.get("dither"),
        opts.get("palette_size"),
    )
    info = {}
    for key in ("exif", "icc_profile", "xmp"):
        value = opts.get(key, im.info.get(key))
        if isinstance(value, Image.Exif):
            value = value.tobytes()
        if value:
            info[key] = value
    chunks = encode_image(im, settings, model, info=info)
    # Everything is encoded before the first byte is written: a failure leaves fp untouched.
    write_chunks(fp, chunks)


def register_sdlatent_opener() -> None:
    """Register the SDL format with Pillow (done on ``import pillow_sdlatent``)."""
    Image.register_open(FORMAT, SdlImageFile, _accept)
    Image.register_save(FORMAT, _save)
    Image.register_extensions(FORMAT, EXTENSIONS)
    Image.register_mime(FORMAT, MIME)


__all__ = ["FormatError", "SdlImageFile", "register_sdlatent_opener"]
