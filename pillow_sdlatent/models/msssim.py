"""MS-SSIM in torch, differentiable: the perceptual term of the refinement's distortion (models/refine.py).

Wang, Simoncelli and Bovik, "Multi-scale structural similarity for image quality assessment" (2003): an 11-tap
Gaussian window of sigma 1.5 (valid positions only), five scales with the published exponents, contrast-structure
at every scale and luminance at the coarsest. Our own rather than a dependency: 30 lines, and the benchmark's
MS-SSIM column (pytorch_msssim) stays an independent implementation; the two agree within 1e-4.
"""

from __future__ import annotations

import torch

#: Exponents of the five scales, finest first (the paper's).
WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
WINDOW, SIGMA = 11, 1.5
C1, C2 = 0.01**2, 0.03**2  # (K * data range)^2 for images in [0, 1]


def ms_ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """MS-SSIM of images ``a`` and ``b`` (N, C, H, W) in [0, 1], averaged over images and channels.

    Scales whose side would fall below the window are left out and the remaining exponents renormalised; an
    image smaller than the window at full scale gives 1 (no term)."""
    levels = [w for i, w in enumerate(WEIGHTS) if min(a.shape[-2:]) >> i >= WINDOW]
    if not levels:
        return a.new_ones(())
    taps = torch.arange(WINDOW, dtype=a.dtype, device=a.device) - WINDOW // 2
    g = torch.exp(-(taps**2) / (2 * SIGMA**2))
    row = (g / g.sum()).view(1, 1, 1, WINDOW).repeat(a.shape[1], 1, 1, 1)
    col = row.transpose(2, 3)

    def blur(x: torch.Tensor) -> torch.Tensor:  # separable and depthwise: rows, then columns
        return torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, row, groups=a.shape[1]), col, groups=a.shape[1])

    total = sum(levels)
    out = a.new_ones(())
    for i, w in enumerate(levels):
        mu_a, mu_b = blur(a), blur(b)
        var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
        cs = ((2 * (blur(a * b) - mu_a * mu_b) + C2) / (var_a + var_b + C2)).mean()
        if i == len(levels) - 1:
            cs = cs * ((2 * mu_a * mu_b + C1) / (mu_a**2 + mu_b**2 + C1)).mean()
        out = out * cs.clamp_min(1e-6) ** (w / total)  # (a negative contrast-structure term would have no power)
        a, b = torch.nn.functional.avg_pool2d(a, 2), torch.nn.functional.avg_pool2d(b, 2)
    return out
