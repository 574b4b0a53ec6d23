"""TAESD-family tiny autoencoders from a folder of ``*_encoder`` / ``*_decoder`` weights.

The layout follows ../shared/models/taef2/README.md: plain ``nn.Sequential``
nets whose state-dict keys are their indices; blocks that carry ``pool.*``
keys get the 1x1 bottleneck (TAEF2), others are plain (TAESD, TAESDXL).
Input and output are RGB in [0, 1]; the latents are already scaled.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError
from .base import Autoencoder, fingerprint_tensors, split_precision
from .diffusers_vae import TINY_FINGERPRINT_EXTRA

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")


class _Block(nn.Module):
    def __init__(self, ch: int, pooled: bool) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(ch, ch, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(ch, ch, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(ch, ch, 3, padding=1),
        )
        self.skip = nn.Identity()
        self.pool = (
            nn.Sequential(
                nn.Conv2d(ch, 4 * ch, 1, bias=False),
                nn.GroupNorm(4, 4 * ch),
                nn.ReLU(),
                nn.Conv2d(4 * ch, ch, 1, bias=False),
            )
            if pooled
            else None
        )
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


class _Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


def _pooled(state: dict[str, torch.Tensor], idx: int) -> bool:
    return f"{idx}.pool.0.weight" in state


def build_encoder(state: dict[str, torch.Tensor]) -> nn.Sequential:
    ch = state["0.weight"].shape[0]
    latent = state["14.weight"].shape[0]
    layers: list[nn.Module] = [nn.Conv2d(3, ch, 3, padding=1), _Block(ch, _pooled(state, 1))]
    for start in (2, 6, 10):
        layers.append(nn.Conv2d(ch, ch, 3, padding=1, stride=2, bias=False))
        layers.extend(_Block(ch, _pooled(state, start + i)) for i in (1, 2, 3))
    layers.append(nn.Conv2d(ch, latent, 3, padding=1))
    return nn.Sequential(*layers)


def build_decoder(state: dict[str, torch.Tensor]) -> nn.Sequential:
    ch, latent = state["1.weight"].shape[:2]
    layers: list[nn.Module] = [_Clamp(), nn.Conv2d(latent, ch, 3, padding=1), nn.ReLU()]
    layers.extend(_Block(ch, _pooled(state, i)) for i in (3, 4, 5))
    for start in (6, 11):
        layers += [nn.Upsample(scale_factor=2), nn.Conv2d(ch, ch, 3, padding=1, bias=False)]
        layers.extend(_Block(ch, _pooled(state, start + i)) for i in (2, 3, 4))
    layers += [nn.Upsample(scale_factor=2), nn.Conv2d(ch, ch, 3, padding=1, bias=False), _Block(ch, _pooled(state, 18))]
    layers.append(nn.Conv2d(ch, 3, 3, padding=1))
    return nn.Sequential(*layers)


def find_weights(folder: Path) -> tuple[str, Path, Path]:
    """(family name, encoder path, decoder path) of a TAESD-family folder."""
    found: dict[str, dict[str, Path]] = {}
    for path in sorted(folder.iterdir()):
        for part in ("encoder", "decoder"):
            suffix = f"_{part}"
            if path.suffix in WEIGHT_SUFFIXES and path.stem.endswith(suffix):
                found.setdefault(path.stem[: -len(suffix)], {}).setdefault(part, path)
    complete = {k: v for k, v in found.items() if len(v) == 2}
    if len(complete) != 1:
        raise FileNotFoundError(
            f"{folder} is not a TAESD-family folder: expected one pair of NAME_encoder/NAME_decoder "
            f"weights ({', '.join(WEIGHT_SUFFIXES)}), found {sorted(p.name for p in folder.iterdir())}"
        )
    name, parts = next(iter(complete.items()))
    return name, parts["encoder"], parts["decoder"]


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weight file: safetensors, or ``torch.load(weights_only=True)`` (no pickled code);
    :class:`ModelLoadError` naming the file when it is not one."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, pickle and zip errors have no common base
        raise ModelLoadError(
            f"{path}: not a readable {path.suffix} weight file ({type(exc).__name__}: {exc}); expected a "
            f"TAESD-family state dict, as in madebyollin's taesd repository"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path}: holds no state dict of tensors; expected a TAESD-family state dict")
    return state


def is_taesd_folder(path: Path) -> bool:
    try:
        find_weights(path)
    except (FileNotFoundError, NotADirectoryError, OSError):
        return False
    return True


class TaesdAutoencoder(Autoencoder):
    """A tiny autoencoder; ``model_id`` is the weights' family name (``taesd``, ``taef2``...)."""

    def __init__(self, folder: str | Path, device: torch.device, dtype: torch.dtype) -> None:
        folder = Path(folder)
        name, enc_path, dec_path = find_weights(folder)
        enc_state = {k: v.float() for k, v in load_state(enc_path).items()}
        dec_state = {k: v.float() for k, v in load_state(dec_path).items()}
        for path, state, build, part in ((enc_path, enc_state, build_encoder, "encoder"),
                                         (dec_path, dec_state, build_decoder, "decoder")):  # fmt: skip
            try:
                net = build(state)
                net.load_state_dict(state)
            except (KeyError, IndexError, RuntimeError, ValueError) as exc:
                raise ModelLoadError(
                    f"{path}: not a TAESD-family {part} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
                ) from exc
            setattr(self, part, net)
        self.model_id = name
        self.source = str(folder)
        self.latent_channels = int(dec_state["1.weight"].shape[1])
        self.downscale = 8
        self.global_norm = any(".pool." in k for k in dec_state)  # TAEF2 blocks hold GroupNorms
        self.fingerprint = fingerprint_tensors(dec_state.values(), TINY_FINGERPRINT_EXTRA)
        self.device = device
        self.dtype, self.autocast_dtype = split_precision(device, dtype)
        for net in (self.encoder, self.decoder):
            net.eval().requires_grad_(False).to(device=device, dtype=self.dtype)

    def float32_copy(self) -> TaesdAutoencoder:
        twin = copy.copy(self)
        twin.__dict__.pop("_twin", None)
        twin.encoder = copy.deepcopy(self.encoder).float()
        twin.decoder = copy.deepcopy(self.decoder).float()
        twin.dtype, twin.autocast_dtype, twin.runner = torch.float32, None, None
        return twin

    def _nets(self) -> dict[str, nn.Module]:
        return {"encode": self.encoder, "decode": self.decoder}

    @torch.inference_mode()
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._run_net("encode", images.to(self.device, self.dtype)).float()

    @torch.inference_mode()
    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._run_net("decode", latents.to(self.device, self.dtype)).float()

    def _decode_differentiable(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents.to(self.device, self.dtype)).float()
