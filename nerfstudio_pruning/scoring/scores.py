"""Every pruning score by name (higher = keep): the one function the methods and the benchmarks call.

- `fisher`: PUP 3D-GS, log det of the exact 6x6 Fisher block over (mean, log-scale) (`fisher.py`);
- `fisher-appearance`: log det of the 10x10 block over (mean, log-scale, opacity logit, base colour), an option
  beside the paper's score for flat regions (`fisher.py`);
- `fisher-probe`: the 6x6 score from the +-1 probe estimator (cheaper, noisy);
- `speedy`: Speedy-Splat's squared per-pixel gradient of the image in each Gaussian's footprint (`speedy.py`);
- `lightgaussian`, `opacity`, `random`: the baselines (`baselines.py`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from nerfstudio_pruning.scoring.baselines import lightgaussian_significance, opacity_scores, random_scores
from nerfstudio_pruning.scoring.fisher import SPATIAL_AND_APPEARANCE, fisher_blocks, fisher_scores, probe_fisher_blocks
from nerfstudio_pruning.scoring.speedy import speedy_scores
from nerfstudio_pruning.types import Gaussians, Views

ScoreKind = Literal["fisher", "fisher-appearance", "fisher-probe", "speedy", "lightgaussian", "opacity", "random"]
SCORE_KINDS = ("fisher", "fisher-appearance", "fisher-probe", "speedy", "lightgaussian", "opacity", "random")


def floored_downscale(width: int, height: int, downscale: float, min_side: int) -> float:
    """The downscale to score `width` x `height` views at: `downscale`, lowered where needed so that the longer
    side of the scoring renders keeps at least `min_side` pixels, and never below 1 (0 turns the floor off).

    Integer where the floor applies, like the downscales the official pipeline uses: the largest whole factor
    that keeps the longer side at `min_side` or more.
    """
    if min_side <= 0:
        return downscale
    return max(1, min(downscale, max(width, height) // min_side))


def score_gaussians(
    kind: ScoreKind,
    gaussians: Gaussians,
    views: Views,
    downscale: float = 1,
    n_probes: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> Tensor:
    """[N] float64 scores of `gaussians` on `views`; the Gaussians with the lowest scores are pruned first.

    `downscale` renders the scores' views at 1/downscale of their resolution (PUP's --fisher_resolution).
    """
    if kind == "random":
        return random_scores(len(gaussians), seed, gaussians.device)
    if kind == "opacity":
        return opacity_scores(gaussians)
    if kind == "fisher":
        return fisher_scores(fisher_blocks(gaussians, views, downscale=downscale, progress=progress))
    if kind == "fisher-appearance":
        return fisher_scores(fisher_blocks(gaussians, views, downscale=downscale, progress=progress,
                                           params=SPATIAL_AND_APPEARANCE))
    if kind == "fisher-probe":
        generator = torch.Generator(device=gaussians.device).manual_seed(seed)
        blocks = probe_fisher_blocks(
            gaussians, views, downscale=downscale, n_probes=n_probes, generator=generator, progress=progress
        )
        return fisher_scores(blocks)
    if kind == "speedy":
        return speedy_scores(gaussians, views, downscale=downscale, progress=progress)
    if kind == "lightgaussian":
        return lightgaussian_significance(gaussians, views, downscale=downscale, progress=progress)
    raise ValueError(f"unknown score {kind!r}; choose one of {', '.join(SCORE_KINDS)}")
