"""The differentiable torch twins of the quantizers that refinement aims at (imported only by refinement).

A twin maps latents to exactly what a reader dequantizes from the numpy quantizer's symbols (tests hold
them equal), with a rate proxy, so that latent refinement (models/refine.py) optimises the file it writes.
"""

from __future__ import annotations

import torch

from . import transform_coder as tc


class TransformQuantizer:
    """The transform quantizer (core/transform_coder.py) with fixed parameters (steps, offsets, band weights),
    as a torch map from latents (N, C, h, w) to what a reader dequantizes, with a rate proxy.

    Works on any crop whose top-left corner sits on the 4x4 block grid: planes that are not a multiple of 4
    are padded by repeating the last row and column, as the writer pads the image's latents at their edge."""

    def __init__(self, params: tuple) -> None:
        steps, offsets, weights = params
        self.params = params
        self._basis = torch.tensor(tc.BASIS, dtype=torch.float64)
        self._step = torch.tensor(steps, dtype=torch.float64).view(1, -1, 1, 1, 1, 1)
        self._offset = torch.tensor(offsets, dtype=torch.float64).view(1, -1, 1, 1)
        self._weight = torch.tensor(weights, dtype=torch.float64).view(1, 1, 1, 1, 4, 4) / 16.0
        self._rho = tc.RHO

    def _coefficients(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
        dt = torch.float32 if z.device.type == "mps" else torch.float64  # MPS has no float64
        n, c, h, w = z.shape
        x = z.to(dt) - self._offset.to(z.device, dt)
        x = torch.nn.functional.pad(x, (0, -w % 4, 0, -h % 4), mode="replicate")
        b = x.view(n, c, x.shape[2] // 4, 4, x.shape[3] // 4, 4).transpose(3, 4)  # (n, c, hb, wb, 4, 4)
        T = self._basis.to(z.device, dt)
        X = T @ b @ T.T
        return X, (self._step * self._weight).to(z.device, dt), dt

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        X, s, dt = self._coefficients(z)
        t = X / s
        q = torch.sign(t) * torch.floor(t.abs() + self._rho)
        q[..., 0, 0] = torch.round(t[..., 0, 0])  # the DC rounds to nearest (no gradient flows here)
        T = self._basis.to(z.device, dt)
        y = T.T @ (q * s) @ T
        n, c, hb, wb = y.shape[:4]
        y = y.transpose(3, 4).reshape(n, c, hb * 4, wb * 4)[:, :, : z.shape[2], : z.shape[3]]
        return (y + self._offset.to(z.device, dt)).to(z.dtype)

    def rate(self, z: torch.Tensor) -> torch.Tensor:
        """Mean of ``step^2 * |coefficient / its step|`` over the AC coefficients (the DC is predicted from its
        neighbours, its size says little about its bits), in squared latent units (band weight 1)."""
        X, s, _ = self._coefficients(z)
        d = self._step.to(z.device, X.dtype)
        ac = torch.ones(4, 4, dtype=X.dtype, device=z.device)
        ac[0, 0] = 0
        return (d * d * (X / s).abs() * ac).mean().to(z.dtype)
