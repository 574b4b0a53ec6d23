"""Process-wide settings, in the style of ``pillow_heif.options``, and the one resolver that reads them.

Every setting is looked up in one order; the first that is set (not None) wins:

1. the argument of the call: a save option (``im.save(f, "SDL", device="cpu")``), an argument
   of :func:`pillow_sdlatent.open` or of the latent API;
2. the attribute of this module (``pillow_sdlatent.options.DEVICE = "cpu"``);
3. the environment variable ``SDLATENT_<NAME>`` (an empty value counts as unset);
4. the default.

=====================  ===========================  =================================================
attribute              environment variable         default
=====================  ===========================  =================================================
MODEL                  SDLATENT_MODEL               ``stabilityai/sd-vae-ft-mse``
MODEL_PATH             SDLATENT_MODEL_PATH          none (folders, ``os.pathsep``-separated)
DECODE_MODEL           (none)                       the model the file names
ALLOW_MODEL_MISMATCH   (none)                       False
DEVICE                 SDLATENT_DEVICE              ``auto``: cuda > mps > cpu
DTYPE                  SDLATENT_DTYPE               bfloat16 on CPUs with AMX, else float32; GPUs bfloat16/float16
BACKEND                SDLATENT_BACKEND             ``auto``: OpenVINO on the CPU when installed, else torch
TILE_SIZE              SDLATENT_TILE_SIZE           chosen from the model and the device
EFFORT                 SDLATENT_EFFORT              0 (0..9: the encoder's search, see docs/refine.md)
REFINE                 SDLATENT_REFINE              the effort's (an expert override of its steps)
DENOISE                SDLATENT_DENOISE             0.0
DENOISE_MODEL          SDLATENT_DENOISE_MODEL       ``stable-diffusion-v1-5/stable-diffusion-v1-5``
ALLOW_DOWNLOAD         SDLATENT_ALLOW_DOWNLOAD      False: a file makes the package download only its known models
DECODE_BUDGET          SDLATENT_DECODE_BUDGET       64000000 padded pixels a decode may cost (0: none)
=====================  ===========================  =================================================

:func:`resolve` applies that order; every module asks it, none reads ``SDLATENT_*`` itself.
Decoding, ``MODEL`` (or ``SDLATENT_MODEL``) is used only when its model id is the file's; see
:func:`pillow_sdlatent.models.resolve.candidate_specs`. This module imports only the standard library.
"""

from __future__ import annotations

import os
from typing import Any

#: Model used to *encode* (an alias, hub id, folder or checkpoint). Decoding, it is tried only
#: when its id is the file's.
MODEL: str | None = None

#: Folders holding models in sub-folders named by their model id, searched when a file names a
#: model not loaded yet (a list, or one string with ``os.pathsep`` between folders).
MODEL_PATH: str | list[str] | None = None

#: Model used to *decode* files, overriding the one a file names (None: the file's own,
#: found as described in the README). Its fingerprint must still match unless
#: :data:`ALLOW_MODEL_MISMATCH` is set.
DECODE_MODEL: str | None = None

#: Decode with weights whose fingerprint differs from the file's. The image will not
#: be the one that was encoded; only for previews or deliberate model swaps.
ALLOW_MODEL_MISMATCH: bool | None = None

#: Device for encoding and decoding: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
DEVICE: str | None = None

#: Precision: ``float32``, ``float16``, ``bfloat16`` (None: bfloat16 on CPUs with AMX, float32 on other CPUs,
#: bfloat16/float16 on GPUs; bfloat16 on the CPU is an autocast over float32 weights). See docs/speed.md.
DTYPE: str | None = None

#: Tile side in pixels for encoding and decoding large images in overlapping, blended tiles
#: (memory is bounded by the tile; tiles hold at most its square). None: chosen from the model
#: and device (about 2 GiB of activations a tile on the CPU); 0: never tile. An image that fits
#: in one tile is never tiled. See :mod:`pillow_sdlatent.models.tiling`.
TILE_SIZE: int | None = None

#: How hard the writer searches for the file's symbols, 0..9 (default 0: none, today's save time); each
#: level a budget of refinement steps through the decoder (see :mod:`pillow_sdlatent.effort`, docs/refine.md).
#: Files stay valid for every reader and decode at the same cost.
EFFORT: int | None = None

#: Expert override of the effort's refinement: this many gradient steps through the decoder, in one stage
#: (0: none, whatever the effort). Each step costs about two to three decodes, so it is for GPUs or patient
#: CPUs. See :mod:`pillow_sdlatent.models.refine`.
REFINE: int | None = None

#: Diffusion denoising strength applied to latents before decoding (0: off). Opt-in:
#: denoising is generative and may alter content; see :mod:`pillow_sdlatent.denoise`.
DENOISE: float | None = None

#: Diffusers pipeline folder or hub id of the denoising U-Net.
DENOISE_MODEL: str | None = None

#: Let decoding download a model a file names that the package does not know (its aliases: the SD, SDXL,
#: SD3 and FLUX VAEs and the TAESD family). Off: a file never chooses what is downloaded; such models are
#: looked up in the Hugging Face cache and the local folders only. Saving downloads the model you ask for.
ALLOW_DOWNLOAD: bool | None = None

#: Most pixels, counted at the autoencoder's padded size, that opening (or ``read_latents``) accepts to
#: decode: neural decoding costs about 1,000 times what PNG decoding does per pixel, so Pillow's
#: ``MAX_IMAGE_PIXELS`` (which still applies) is too loose on its own. 64 M passes photos up to about
#: 60 Mpx; 0 turns the budget off. Over it, ``Image.open`` raises :class:`~pillow_sdlatent.DecodeBudgetError`.
DECODE_BUDGET: int | None = None

#: What runs the models: ``torch``, ``openvino`` (CPU only; the ``[openvino]`` extra) or ``auto`` (None: auto,
#: OpenVINO on the CPU when installed, torch elsewhere). The precision is :data:`DTYPE`'s whichever runs.
#: ``sdlatent info --system`` shows the choice and why. See docs/speed.md.
BACKEND: str | None = None


def _parse(kind: str, value: Any, from_env: bool) -> Any:
    """``value`` checked for ``kind``; the environment's text converted first. Raises ValueError."""
    if from_env and kind in ("count", "pixels", "side", "strength", "flag", "effort"):
        table = {
            "1": True,
            "true": True,
            "yes": True,
            "on": True,
            "0": False,
            "false": False,
            "no": False,
            "off": False,
        }
        try:
            value = (
                int(value)
                if kind in ("count", "pixels", "side", "effort")
                else float(value)
                if kind == "strength"
                else table[value.lower()]
            )
        except (ValueError, KeyError):
            raise ValueError(_KINDS[kind]) from None
    if kind == "paths" and isinstance(value, str):
        value = [p for p in value.split(os.pathsep) if p]
    ok = {
        "text": lambda v: isinstance(v, (str, os.PathLike)) and bool(os.fspath(v)),
        "paths": lambda v: isinstance(v, (list, tuple)) and all(isinstance(p, (str, os.PathLike)) for p in v),
        "count": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "effort": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 9,
        "pixels": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "side": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "strength": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1,
        "flag": lambda v: isinstance(v, bool),
        "any": lambda v: not isinstance(v, str) or bool(v),  # or a torch.device / torch.dtype
    }[kind]
    if not ok(value):
        raise ValueError(_KINDS[kind])
    if kind == "paths":
        return [os.fspath(p) for p in value]
    return float(value) if kind == "strength" else value


_KINDS = {
    "text": "must be a non-empty string",
    "paths": f"must be folders separated by {os.pathsep!r}, or a list of folders",
    "count": "must be a number of steps >= 0",
    "effort": "must be an integer 0..9",
    "pixels": "must be a number of pixels >= 0 (0: no budget)",
    "side": "must be 0 (never tile) or a side in pixels",
    "strength": "must be a number in 0..1",
    "flag": "must be True or False",
    "any": "must be a non-empty string",
}

#: name -> (environment variable or None, kind, default)
SETTINGS: dict[str, tuple[str | None, str, Any]] = {
    "MODEL": ("SDLATENT_MODEL", "text", None),
    "MODEL_PATH": ("SDLATENT_MODEL_PATH", "paths", []),
    "DECODE_MODEL": (None, "text", None),
    "ALLOW_MODEL_MISMATCH": (None, "flag", False),
    "DEVICE": ("SDLATENT_DEVICE", "any", None),
    "DTYPE": ("SDLATENT_DTYPE", "any", None),
    "TILE_SIZE": ("SDLATENT_TILE_SIZE", "side", None),
    "EFFORT": ("SDLATENT_EFFORT", "effort", 0),
    "REFINE": ("SDLATENT_REFINE", "count", 0),
    "DENOISE": ("SDLATENT_DENOISE", "strength", 0.0),
    "DENOISE_MODEL": ("SDLATENT_DENOISE_MODEL", "text", None),
    "ALLOW_DOWNLOAD": ("SDLATENT_ALLOW_DOWNLOAD", "flag", False),
    "DECODE_BUDGET": ("SDLATENT_DECODE_BUDGET", "pixels", 64_000_000),
    "BACKEND": ("SDLATENT_BACKEND", "text", None),
}


def resolve(name: str, value: Any = None) -> Any:
    """The value of setting ``name`` (an attribute name above): ``value`` when it is not None,
    else this module's attribute, else ``SDLATENT_<NAME>``, else the default; checked, with an
    error naming where a bad value came from."""
    return resolve_with_source(name, value)[0]


def resolve_with_source(name: str, value: Any = None) -> tuple[Any, str]:
    """:func:`resolve`'s value and where it came from: the argument's name (``dtype``), the attribute
    (``pillow_sdlatent.options.DTYPE``), the environment variable (``SDLATENT_DTYPE``) or ``default``."""
    env, kind, default = SETTINGS[name]
    from_env = False
    if value is not None:
        where = name.lower()
    elif (value := globals()[name]) is not None:
        where = f"pillow_sdlatent.options.{name}"
    elif env and (text := os.environ.get(env, "").strip()):
        value, where, from_env = text, env, True
    else:
        return default, "default"
    try:
        return _parse(kind, value, from_env), where
    except ValueError as exc:
        raise ValueError(f"{where} {exc}, got {value!r}") from None
