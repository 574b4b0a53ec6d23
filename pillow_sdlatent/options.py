"""Process-wide defaults, in the style of ``pillow_heif.options``.

Each can also be given per call: as a save option (``im.save(f, model=...)``)
or to :func:`pillow_sdlatent.open` for decoding.
"""

from __future__ import annotations

#: Model used to *decode* files, overriding the one a file names (None: the file's own,
#: found as described in the README). Its fingerprint must still match unless
#: :data:`ALLOW_MODEL_MISMATCH` is set.
DECODE_MODEL: str | None = None

#: Decode with weights whose fingerprint differs from the file's. The image will not
#: be the one that was encoded; only for previews or deliberate model swaps.
ALLOW_MODEL_MISMATCH: bool = False

#: Device for encoding and decoding (None: ``SDLATENT_DEVICE`` or cuda > mps > cpu).
DEVICE: str | None = None

#: Precision (None: ``SDLATENT_DTYPE``, else bfloat16 on CPUs with AMX, float32 on other CPUs, bfloat16/float16
#: on GPUs; bfloat16 on the CPU is an autocast over float32 weights). See docs/speed.md.
DTYPE: str | None = None

#: Diffusion denoising strength applied to latents before decoding (0: off). Opt-in:
#: denoising is generative and may alter content; see :mod:`pillow_sdlatent.denoise`.
DENOISE: float = 0.0

#: Diffusers pipeline folder or hub id of the denoising U-Net (None: ``SDLATENT_DENOISE_MODEL``,
#: then Stable Diffusion 1.5).
DENOISE_MODEL: str | None = None

#: Tile side in pixels for encoding and decoding large images in overlapping, blended tiles
#: (memory is bounded by the tile; tiles hold at most its square). None: ``SDLATENT_TILE_SIZE``,
#: else chosen from the model and device (about 2 GiB of activations a tile on the CPU); 0: never tile.
#: An image that fits in one tile is never tiled. See :mod:`pillow_sdlatent.models.tiling`.
TILE_SIZE: int | None = None

#: Encoder-side latent refinement: gradient steps through the decoder before quantizing (0: off;
#: None: ``SDLATENT_REFINE``, else 0). Files stay valid for every reader; encoding costs about
#: two to three decodes a step, so it is for GPUs or patient CPUs. See :mod:`pillow_sdlatent.models.refine`.
REFINE: int | None = None

#: What runs the models: "torch", "openvino" (CPU only; the ``[openvino]`` extra) or "auto" (None:
#: ``SDLATENT_BACKEND``, else "auto": OpenVINO on the CPU when installed, torch elsewhere). The precision is
#: :data:`DTYPE`'s whichever runs. ``sdlatent info --system`` shows the choice and why. See docs/speed.md.
BACKEND: str | None = None
