"""The differentiable torch twins of the quantizers that refinement aims at (imported only by refinement).

A twin maps latents to exactly what a reader dequantizes from the numpy quantizer's symbols (tests hold
them equal), with a rate proxy, so that latent refinement (models/refine.py) optimises the file it writes.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import rangecode as rc
from . import transform_coder as tc


def soft_round(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """Agustsson and Theis's soft rounding: ``round(x)`` as ``temperature`` goes to 0, slope 1 (the identity
    plus a constant) as it grows, smooth between."""
    k = 1.0 / (2.0 * math.tanh(1.0 / (2.0 * temperature)))
    f = torch.floor(x).detach()
    return f + 0.5 + k * torch.tanh((x - f - 0.5) / temperature)


def soft_dead_zone(t: torch.Tensor, rho: float, temperature: float) -> torch.Tensor:
    """The transform quantizer's AC rounding ``sign(t) * floor(|t| + rho)``, made smooth as :func:`soft_round`
    (``floor(u) == round(u - 1/2)``); the relu holds the dead zone's centre at 0, so it is continuous at t = 0."""
    return torch.sign(t) * soft_round(torch.relu(t.abs() + rho - 0.5), temperature)


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
        X, s, _ = self._coefficients(z)
        t = X / s
        q = torch.sign(t) * torch.floor(t.abs() + self._rho)
        q[..., 0, 0] = torch.round(t[..., 0, 0])  # the DC rounds to nearest (no gradient flows here)
        return self._reconstruct(q, s, z)

    def _reconstruct(self, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Latents like ``z`` from quantized coefficients ``q`` (in steps ``s``): the inverse DCT, the crop of the
        edge padding and the channel offsets, what a reader computes."""
        T = self._basis.to(z.device, q.dtype)
        y = T.T @ (q * s) @ T
        n, c, hb, wb = y.shape[:4]
        y = y.transpose(3, 4).reshape(n, c, hb * 4, wb * 4)[:, :, : z.shape[2], : z.shape[3]]
        return (y + self._offset.to(z.device, q.dtype)).to(z.dtype)

    def soft(self, z: torch.Tensor, temperature: float) -> torch.Tensor:
        """``self(z)`` with every rounding made smooth (:func:`soft_round`, :func:`soft_dead_zone`), for a
        surrogate gradient of the quantizer (:data:`.refine.GRADIENT`)."""
        X, s, _ = self._coefficients(z)
        t = X / s
        q = soft_dead_zone(t, self._rho, temperature)
        dc = torch.zeros(4, 4, dtype=torch.bool, device=z.device)
        dc[0, 0] = True
        q = torch.where(dc, soft_round(t, temperature), q)  # the DC rounds to nearest
        return self._reconstruct(q, s, z)

    def rate(self, z: torch.Tensor) -> torch.Tensor:
        """Mean of ``step^2 * |coefficient / its step|`` over the AC coefficients (the DC is predicted from its
        neighbours, its size says little about its bits), in squared latent units (band weight 1)."""
        X, s, _ = self._coefficients(z)
        d = self._step.to(z.device, X.dtype)
        ac = torch.ones(4, 4, dtype=X.dtype, device=z.device)
        ac[0, 0] = 0
        return (d * d * (X / s).abs() * ac).mean().to(z.dtype)

    @property
    def base_step(self) -> float:
        """The quality's base step (latent units): the first channel's step over its channel multiplier."""
        steps = self.params[0]
        return float(steps[0]) / tc.channel_multipliers(len(steps))[0]

    def code_length(self, z0: torch.Tensor):
        """A differentiable twin of the coder's code length of the AC bands, for latents near ``z0``: the map
        from latents (N, C, h, w) to the bits the range coder spends on their AC symbols
        (:func:`.rangecode.model_costs`, escapes included) under the model (shift, shape) that the symbols of
        ``z0`` choose for each band, with the gradient of the line between neighbouring bins' costs, placed at
        the bins' centres (dead zone: index k at ``k + 0.2`` steps), passed straight through. The DC bands
        (predicted from their neighbours) are not counted."""
        X, s, dt = self._coefficients(z0.detach())
        t = X / s
        q = torch.sign(t) * torch.floor(t.abs() + self._rho)
        qn = q.to(torch.int64).cpu().numpy()  # (n, c, hb, wb, 4, 4)
        C = qn.shape[1]
        A = int(np.abs(qn).max()) + 2
        values = np.arange(-A, A + 1, dtype=np.int64)
        table = np.zeros((C, 4, 4, 2 * A + 1))
        for c in range(C):
            L = 2 * max(1, int(np.abs(qn[:, c]).max())) + 1
            for u in range(4):
                for v in range(4):
                    if u == 0 and v == 0:
                        continue
                    r = qn[:, c, :, :, u, v].ravel()
                    costs = rc.model_costs(r, L)
                    sh, shape = np.unravel_index(int(np.argmin(costs)), costs.shape)
                    b = np.clip((values >> sh) + rc.R + 1, 0, rc.NB - 1)
                    bits = -rc.log2_probabilities()[shape][b] + sh
                    table[c, u, v] = bits + np.where((b == 0) | (b == rc.NB - 1), np.log2(rc.escape_alphabet(L, sh)), 0)
        T = torch.tensor(table, dtype=dt, device=z0.device).reshape(-1)
        base = (torch.arange(C * 16, device=z0.device) * (2 * A + 1)).view(1, C, 1, 1, 4, 4)
        centre = 1.0 - self._rho - 0.5  # a dead-zone bin k holds |t| in [k - rho, k + 1 - rho): its centre k + 0.2

        def bits(z: torch.Tensor) -> torch.Tensor:
            X, s, _ = self._coefficients(z)
            t = X / s
            k = (torch.sign(t) * torch.floor(t.abs() + self._rho)).clamp(-A, A).to(torch.int64) + A + base
            p = (torch.sign(t) * torch.relu(t.abs() - centre)).clamp(-A, A - 1e-6) + A
            i0 = torch.floor(p).detach()
            f = p - i0
            i0 = i0.to(torch.int64) + base
            soft = T[i0] * (1 - f) + T[(i0 + 1).clamp(max=T.numel() - 1)] * f
            return (T[k] + soft - soft.detach()).sum().to(z.dtype)  # the symbols' bits, the slope between centres

        return bits
