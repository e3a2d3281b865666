"""Per-Gaussian pruning scores (higher = keep), one function for every score the methods and benchmarks use.

- `fisher`: PUP 3D-GS, log det of the exact 6x6 Fisher block over (mean, log-scale) (`fisher.py`);
- `fisher-probe`: the same from the +-1 probe estimator (cheaper, noisy);
- `lightgaussian`: LightGaussian's global significance, the sum over the pixels a Gaussian is composited into
  of opacity x transmittance, times its normalised volume^0.1 (`volume_power`);
- `opacity`, `random`: the usual baselines.
Plain tensor code: Gaussians in splatfacto's raw parametrisation, cameras as gsplat viewmats/Ks.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

from nerfstudio_pruning.fisher import fisher_blocks, fisher_scores, probe_fisher_blocks
from nerfstudio_pruning.pair_stats import scale_intrinsics, view_background, view_pair_statistics

ScoreKind = Literal["fisher", "fisher-probe", "lightgaussian", "opacity", "random"]
SCORE_KINDS = ("fisher", "fisher-probe", "lightgaussian", "opacity", "random")


def lightgaussian_significance(
    means: Tensor, quats: Tensor, log_scales: Tensor, opacity_logits: Tensor, sh: Tensor, viewmats: Tensor,
    Ks: Tensor, width: int, height: int, sh_degree: int, backgrounds: Optional[Tensor] = None, downscale: float = 1,
    volume_power: float = 0.1,
) -> Tensor:
    """[N] sum over views and composited pixels of opacity * T, times (volume / max volume)^volume_power."""
    Ks, width, height = scale_intrinsics(Ks, width, height, downscale)
    hits = torch.zeros(means.shape[0], dtype=torch.float64, device=means.device)
    opacity = torch.sigmoid(opacity_logits).double()
    for view in range(viewmats.shape[0]):
        for stats in view_pair_statistics(
            means, quats, log_scales, opacity_logits, sh, viewmats[view : view + 1], Ks[view : view + 1], width,
            height, sh_degree, view_background(backgrounds, view),
        ):
            hits.index_add_(0, stats.gaussian, opacity[stats.gaussian] * stats.transmittance)
    log_volume = log_scales.double().sum(dim=-1)
    relative_volume = torch.exp(log_volume - log_volume.max())
    return hits * relative_volume**volume_power


def score_gaussians(
    kind: ScoreKind,
    means: Tensor, quats: Tensor, log_scales: Tensor, opacity_logits: Tensor, sh: Tensor,
    viewmats: Tensor, Ks: Tensor, width: int, height: int, sh_degree: int,
    backgrounds: Optional[Tensor] = None, downscale: float = 1, n_probes: int = 1, seed: int = 0,
    progress: bool = True,
) -> Tensor:
    """[N] float64 scores; the Gaussians with the lowest scores are pruned first."""
    with torch.no_grad():
        if kind == "random":
            g = torch.Generator().manual_seed(seed)
            return torch.rand(means.shape[0], generator=g, dtype=torch.float64).to(means.device)
        if kind == "opacity":
            return torch.sigmoid(opacity_logits.double()).reshape(-1)
    args = (means, quats, log_scales, opacity_logits, sh, viewmats, Ks, width, height, sh_degree)
    if kind == "fisher":
        return fisher_scores(fisher_blocks(*args, backgrounds=backgrounds, downscale=downscale, progress=progress))
    if kind == "fisher-probe":
        g = torch.Generator(device=means.device).manual_seed(seed)
        blocks = probe_fisher_blocks(
            *args, backgrounds=backgrounds, downscale=downscale, n_probes=n_probes, generator=g, progress=progress
        )
        return fisher_scores(blocks)
    if kind == "lightgaussian":
        with torch.no_grad():
            return lightgaussian_significance(*args, backgrounds=backgrounds, downscale=downscale)
    raise ValueError(f"unknown score {kind!r}; choose one of {', '.join(SCORE_KINDS)}")
