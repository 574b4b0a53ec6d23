"""The latent API: .sdl as a storage format for latents, for training and inference pipelines.

Latent convention. Every tensor here is in the model's *scaled* latent space,
the space a diffusion UNet/transformer consumes and produces:

* ``AutoencoderKL`` (SD 1.x/2.x, SDXL, SD3, FLUX.1): ``(mean - shift_factor) *
  scaling_factor`` of the encoder's posterior (the mean, never a sample), e.g.
  ``mean * 0.18215`` for ``stabilityai/sd-vae-ft-mse``. Undo it with
  ``z / scaling_factor + shift_factor`` before calling ``vae.decode`` yourself.
* TAESD-family models: their latents are already in that space.

So a latent read from a file can go straight into a diffusion model, and a
diffusion model's output can go straight into :func:`write_latents`.

Importing this module imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import IO

import numpy as np
import torch
from PIL import Image

from ._atomic import atomic_write
from .core import codec
from .core.container import write_chunks
from .core.header import FINGERPRINT_SIZE, Header
from .core.settings import QuantSettings
from .limits import check_decode_cost
from .models import Autoencoder, load_model
from .pipeline import ModelIdentity, decode_batch, encode_batch, encode_chunks, refine_steps, split_image

PathOrFile = str | os.PathLike[str] | IO[bytes]
LatentArray = torch.Tensor | np.ndarray

#: The float quantizer's element formats as torch dtypes (``read_latents(..., dtype=None)`` returns these).
STORED_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def read_latent_file(source: PathOrFile, *, allow_truncated: bool = False) -> codec.LatentFile:
    """The model-free content of a file: header, symbols, alpha plane, metadata (no torch needed)."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return read_latent_file(f, allow_truncated=allow_truncated)
    head = codec.read_head(source)
    check_decode_cost(head.header)  # Image.MAX_IMAGE_PIXELS and the decode budget, as Image.open applies them
    return codec.read_body(source, head, allow_truncated=allow_truncated)


def stored_dtype(header: Header) -> torch.dtype:
    """The dtype a file's latents are stored in: the element format of a lossless (float quantizer) file,
    float32 for the others (their dequantized values are float32)."""
    return STORED_DTYPES[header.element] if header.element is not None else torch.float32


def latent_tensor(lf: codec.LatentFile, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """A decoded file's latents as a ``(C, h, w)`` tensor of ``dtype`` (None: :func:`stored_dtype`)."""
    dtype = stored_dtype(lf.header) if dtype is None else dtype
    element = lf.header.element
    if element in ("float16", "bfloat16") and dtype == STORED_DTYPES[element]:
        return torch.from_numpy(lf.symbols.view(np.int16)).view(dtype)  # the stored bits, no float32 detour
    return torch.from_numpy(lf.latents()).to(dtype)


def read_latents(source: PathOrFile, *, dtype: torch.dtype | None = torch.float32) -> tuple[torch.Tensor, Header]:
    """The dequantized latents of an .sdl file and its header, without running any model.

    Returns ``(latents, header)``: ``latents`` is a CPU tensor of shape ``(C, h, w)`` (``h, w`` = image
    size / ``header.downscale``, rounded up) in the model's scaled latent space (see the module docstring);
    ``header`` names the model (``header.model_id``, ``header.fingerprint``), the image size and mode, and
    the quantizer. The values are bit-exact: every platform reads the same numbers.

    dtype: float32 by default; None: the dtype the file stores (:func:`stored_dtype`): a lossless file
        (``write_latents(..., lossless=True)``, ``header.element``) gives back its float16, bfloat16 or
        float32 tensor bit for bit, negative zeros and subnormals included. The float32 default holds
        those values exactly too: ``.to(torch.float16)`` of a float16 file's latents is the original.
    """
    lf = read_latent_file(source)
    return latent_tensor(lf, dtype), lf.header


def read_latents_batch(
    sources: Sequence[PathOrFile], *, stack: bool = True, dtype: torch.dtype | None = torch.float32
) -> tuple[torch.Tensor | list[torch.Tensor], list[Header]]:
    """The latents and headers of many files (a training batch), read as :func:`read_latents` reads one.

    Returns ``(latents, headers)``: with ``stack`` (the default) ``latents`` is one ``(N, C, h, w)`` tensor,
    and files of different latent shapes raise ValueError naming the first odd one; without it, a list of
    ``(C, h, w)`` tensors. ``dtype`` as for :func:`read_latents` (None with ``stack``: the files must store
    one dtype). For a torch ``DataLoader`` use :mod:`pillow_sdlatent.dataset`.
    """
    files = [read_latent_file(s) for s in sources]
    headers = [lf.header for lf in files]
    if not stack:
        return [latent_tensor(lf, dtype) for lf in files], headers
    if not files:
        raise ValueError("read_latents_batch(stack=True) needs at least one file (its shape sets the batch's)")
    shape = files[0].header.latent_shape
    out_dtype = stored_dtype(headers[0]) if dtype is None else dtype
    out = torch.empty((len(files), *shape), dtype=out_dtype)
    for i, (src, lf) in enumerate(zip(sources, files, strict=True)):
        name = src if isinstance(src, (str, os.PathLike)) else "a stream"
        if lf.header.latent_shape != shape:
            raise ValueError(
                f"file {i} ({name}) has latents of shape "
                f"{lf.header.latent_shape}, the first file {shape}: pass stack=False for a list"
            )
        if dtype is None and stored_dtype(lf.header) != out_dtype:
            raise ValueError(
                f"file {i} ({name}) stores {stored_dtype(lf.header)}, the first file {out_dtype}: pass a dtype "
                "to convert them all, or stack=False"
            )
        out[i] = latent_tensor(lf, out_dtype)
    return out, headers


def _as_numpy(latents: LatentArray) -> np.ndarray:
    if isinstance(latents, torch.Tensor):
        latents = latents.detach().to("cpu", torch.float32).numpy()
    arr = np.asarray(latents, dtype=np.float32)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"latents must have shape (C, h, w) (or (1, C, h, w)), got {tuple(arr.shape)}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("latents contain NaN or infinity; they cannot be stored")
    return arr


def _lossless_method(latents: LatentArray, quality: int | None, method: str, settings: QuantSettings | None) -> str:
    """The float method that stores ``latents``' dtype bit-exactly (``lossless=True``)."""
    if quality is not None or method != "auto" or settings is not None:
        raise TypeError("lossless=True chooses the method from the latents' dtype; do not pass quality/method/settings")
    dtype = latents.dtype
    for name, torch_dtype in STORED_DTYPES.items():
        if dtype == torch_dtype or (isinstance(latents, np.ndarray) and name != "bfloat16" and dtype == np.dtype(name)):
            return name
    raise ValueError(
        f"lossless=True stores float16, bfloat16 or float32 latents bit-exactly, not {dtype}: convert them first "
        "(.float() for float32), or pass method='float16' / 'bfloat16' / 'float32' to round into that format"
    )


def _model_identity(
    model: Autoencoder | str | os.PathLike[str] | None, model_id: str | None, fingerprint: bytes | str | None,
    downscale: int | None, channels: int,
) -> tuple[str, bytes, int]:  # fmt: skip
    if model_id is not None:
        if model is not None:
            raise TypeError("pass either model=... or model_id=... (with fingerprint=...), not both")
        if fingerprint is None:
            raise TypeError(
                "model_id=... needs fingerprint=... (the model's 16-byte weights fingerprint, "
                "load_model(spec).fingerprint); pass model=spec to have it computed"
            )
        fp = bytes.fromhex(fingerprint) if isinstance(fingerprint, str) else bytes(fingerprint)
        if len(fp) != FINGERPRINT_SIZE:
            raise ValueError(f"fingerprint must be {FINGERPRINT_SIZE} bytes, got {len(fp)}")
        return model_id, fp, downscale or 8
    if fingerprint is not None:
        raise TypeError("fingerprint=... goes with model_id=...; a loaded model brings its own")
    if not isinstance(model, Autoencoder):
        # Only the identity is needed: the CPU copy is loaded once and cached.
        model = load_model(model, "cpu")
    if model.latent_channels != channels:
        raise ValueError(
            f"latents have {channels} channels but model {model.model_id!r} has {model.latent_channels}: "
            f"they were not made by this model"
        )
    if downscale is not None and downscale != model.downscale:
        raise ValueError(f"downscale {downscale} differs from model {model.model_id!r}'s {model.downscale}")
    return model.model_id, model.fingerprint, model.downscale


def latent_chunks(
    latents: LatentArray,
    model: Autoencoder | str | os.PathLike[str] | None = None,
    *,
    model_id: str | None = None,
    fingerprint: bytes | str | None = None,
    downscale: int | None = None,
    size: tuple[int, int] | None = None,
    mode: str = "RGB",
    alpha: np.ndarray | None = None,
    quality: int | None = None,
    method: str = "auto",
    settings: QuantSettings | None = None,
    info: dict[str, bytes | str] | None = None,
    lossless: bool = False,
) -> list:
    """The chunks :func:`write_latents` writes (see there)."""
    if lossless:
        method = _lossless_method(latents, quality, method, settings)
    z = _as_numpy(latents)
    identity = ModelIdentity(*_model_identity(model, model_id, fingerprint, downscale, z.shape[0]))
    # latents made elsewhere, without their image: written as they are, whatever the effort options say
    return encode_chunks(
        z, identity, size=size, mode=mode, alpha=alpha, quality=quality, method=method, settings=settings, info=info,
        refine=0, effort=0,
    )  # fmt: skip


def write_latents(
    target: PathOrFile,
    latents: LatentArray,
    model: Autoencoder | str | os.PathLike[str] | None = None,
    *,
    model_id: str | None = None,
    fingerprint: bytes | str | None = None,
    downscale: int | None = None,
    size: tuple[int, int] | None = None,
    mode: str = "RGB",
    alpha: np.ndarray | None = None,
    quality: int | None = None,
    method: str = "auto",
    settings: QuantSettings | None = None,
    info: dict[str, bytes | str] | None = None,
    lossless: bool = False,
) -> None:
    """Store latents made elsewhere (an encoder, a diffusion model's output) as a valid .sdl file.

    latents: ``(C, h, w)`` (or ``(1, C, h, w)``) tensor or array in the model's
        scaled latent space (see the module docstring).
    model: the autoencoder that decodes them: a loaded :class:`Autoencoder` or a
        model spec (alias, hub id, folder; default ``SDLATENT_MODEL``). The file
        records its id and weights fingerprint, so it decodes only with those
        weights. The spec is loaded (once, on the CPU) to compute them.
    model_id, fingerprint, downscale: the identity given directly instead of
        ``model`` (fingerprint: 16 bytes or 32 hex digits), to write without
        loading any weights.
    size: image ``(width, height)`` the latents decode to, cropped from the
        decoded ``(w * downscale, h * downscale)`` (default: no crop).
    mode, alpha: stored mode; ``"LA"``/``"RGBA"`` need an alpha plane
        ``(height, width)`` uint8.
    quality, method: as for ``Image.save``; or ``settings`` for full control
        (e.g. ``QuantSettings(levels=65536)`` for near-lossless 16-bit storage).
    lossless: store the tensor's values bit-exactly in its own dtype (float16, bfloat16 or float32; the
        float quantizer, ``method="float16"`` etc.): ``read_latents(target, dtype=None)`` returns the same
        tensor bit for bit. Not with ``quality``, ``method`` or ``settings``.

    Reading the file back with :func:`read_latents` gives the quantized latents
    bit for bit. A path is written atomically (a temporary file renamed into
    place), so a failure or interruption never leaves a partial file.
    """
    chunks = latent_chunks(
        latents, model, model_id=model_id, fingerprint=fingerprint, downscale=downscale, size=size, mode=mode,
        alpha=alpha, quality=quality, method=method, settings=settings, info=info, lossless=lossless,
    )  # fmt: skip
    if isinstance(target, (str, os.PathLike)):
        with atomic_write(target) as f:
            write_chunks(f, chunks)
    else:
        write_chunks(target, chunks)


def _resolve(model: Autoencoder | str | os.PathLike[str] | None, device: str | None) -> Autoencoder:
    if isinstance(model, Autoencoder):
        return model
    return load_model(model, device)


def encode_images(
    images: Sequence[Image.Image | np.ndarray] | torch.Tensor,
    model: Autoencoder | str | os.PathLike[str] | None = None,
    *,
    device: str | None = None,
    batch_size: int = 8,
    refine: int | None = None,
) -> list[torch.Tensor] | torch.Tensor:
    """Latents of many images, in batches (images of equal size share a forward pass).

    images: PIL images (any mode; converted to RGB, alpha dropped) or ``(H, W, 3)``
        uint8 arrays -> a list of ``(C, h, w)`` float32 CPU tensors; or a float
        tensor ``(N, 3, H, W)`` in [0, 1] (H, W multiples of the model's
        downscale) -> a ``(N, C, h, w)`` tensor.
    refine: latent refinement steps against the float decode (default ``options.REFINE``,
        ``SDLATENT_REFINE``, else 0; see :mod:`pillow_sdlatent.models.refine`): for latents kept
        at high precision. Coarsely quantized files should refine through their quantizer, as
        ``Image.save(..., refine=N)`` does.
    Latents are in the scaled space (see the module docstring). Store them
    with :func:`write_latents`.
    """
    steps = refine_steps(refine)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    ae = _resolve(model, device)
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"an image tensor must be (N, 3, H, W), got {tuple(images.shape)}")
        if images.shape[2] % ae.downscale or images.shape[3] % ae.downscale:
            raise ValueError(f"image height and width must be multiples of {ae.downscale}; pad or crop first")
        parts = [
            ae.refine(x, ae.encode(x), steps).cpu().float() if steps else ae.encode(x).cpu().float()
            for x in (images[i : i + batch_size] for i in range(0, len(images), batch_size))
        ]
        if not parts:
            f = ae.downscale
            return images.new_zeros((0, ae.latent_channels, images.shape[2] // f, images.shape[3] // f))
        return torch.cat(parts)
    rgbs = [split_image(im)[1] if isinstance(im, Image.Image) else _rgb_array(im) for im in images]
    return [torch.from_numpy(z) for z in encode_batch(ae, rgbs, batch_size, steps)]


def _rgb_array(arr: np.ndarray) -> np.ndarray:
    a = np.asarray(arr)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"image arrays must be (H, W, 3) uint8, got {a.shape} {a.dtype}")
    return a


def decode_latents(
    latents: Sequence[LatentArray] | torch.Tensor,
    model: Autoencoder | str | os.PathLike[str] | None = None,
    *,
    sizes: Sequence[tuple[int, int]] | None = None,
    device: str | None = None,
    batch_size: int = 8,
) -> list[Image.Image]:
    """RGB images of many latents, in batches (latents of equal shape share a forward pass).

    latents: ``(N, C, h, w)`` tensor or a sequence of ``(C, h, w)`` tensors/arrays
        in the scaled latent space.
    model: the decoder (loaded model or spec; default ``SDLATENT_MODEL``). For
        latents read from files, ``pillow_sdlatent.models.model_for_file(header)``
        finds the file's model and checks its weights fingerprint.
    sizes: ``(width, height)`` of each image (e.g. ``(header.width,
        header.height)``); default ``(w, h) * downscale``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    ae = _resolve(model, device)
    arrays = [_as_numpy(z) for z in latents]
    for z in arrays:
        if z.shape[0] != ae.latent_channels:
            raise ValueError(f"latents have {z.shape[0]} channels; model {ae.model_id!r} has {ae.latent_channels}")
    if sizes is None:
        sizes = [(z.shape[2] * ae.downscale, z.shape[1] * ae.downscale) for z in arrays]
    elif len(sizes) != len(arrays):
        raise ValueError(f"{len(sizes)} sizes given for {len(arrays)} latents")
    rgbs = decode_batch(ae, arrays, list(sizes), batch_size)
    return [Image.fromarray(rgb, "RGB") for rgb in rgbs]


def image_from_rgb(lf: codec.LatentFile, rgb: np.ndarray) -> Image.Image:
    """The Pillow image of a decoded file: its stored mode, alpha plane and metadata."""
    im = Image.fromarray(rgb, "RGB")
    if lf.header.mode in ("L", "LA"):
        im = im.convert("L")
    if lf.alpha is not None:
        im.putalpha(Image.fromarray(lf.alpha, "L"))
    im.info.update({k: v for k, v in lf.info.items() if not k.startswith("_")})
    return im


def latent_loader(path: str | os.PathLike[str]) -> torch.Tensor:
    """``loader`` for ``torchvision.datasets.DatasetFolder``: a file's latents, no decoder run.

    ``DatasetFolder(root, loader=latent_loader, extensions=(".sdl",))`` yields
    ``(latents (C, h, w), class index)``: a latent-diffusion training set read
    straight from .sdl files. Without torchvision, and for file lists and tar
    shards: :mod:`pillow_sdlatent.dataset`.
    """
    return read_latents(path)[0]


def image_loader(path: str | os.PathLike[str]) -> Image.Image:
    """``loader`` for ``torchvision.datasets.ImageFolder``: the decoded image, as RGB.

    ``ImageFolder(root, loader=image_loader, is_valid_file=lambda p: p.endswith(".sdl"))``
    (ImageFolder's fixed extension list does not include ``.sdl``).
    """
    with Image.open(path) as im:
        return im.convert("RGB")


__all__ = [
    "decode_latents",
    "encode_images",
    "image_loader",
    "latent_loader",
    "read_latent_file",
    "read_latents",
    "read_latents_batch",
    "stored_dtype",
    "write_latents",
]
