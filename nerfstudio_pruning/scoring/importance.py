"""VEDAL leave-one-out importance: how much the training loss rises when one Gaussian alone is removed.

Per composited pair, removing Gaussian i changes its pixel by exactly dI = alpha S / (1 - alpha) - T alpha c
(`PairStatistics.removal_delta`), so for a per-pixel loss the exact change is known pixel by pixel: with
r = I - I_gt, sum_c |r + dI| - |r| for L1 and sum_c 2 r dI + dI^2 for L2. Summed over a Gaussian's pairs and
over views this is the loss increase when that Gaussian alone goes (positive = important). Losses are sums
over pixels and channels, not means: divide by C H W 3 for a mean-reduced loss.

Caveat, documented rather than fixed: the identity keeps every other pair of the pixel as it was. Removing a
Gaussian raises the transmittance of everything behind it, so pairs that the renderer had dropped at the
T <= 1e-4 early stop can come back, and their contribution is missing from dI. (The 1/255 skip tests a pair's
own alpha, which removing another Gaussian does not change, so it never flips.) Only pixels that reached the
early stop are affected, but there the error need not be small: the stop drops the whole pair that would take T
to 1e-4 or below, so e.g. an alpha = 0.999 pair is dropped whenever T before it is <= 0.1, and removing a
Gaussian in front can bring it back at full weight. `tests/test_importance.py` measures the effect against
brute-force re-rendering (up to a few % per Gaussian there; 24% seen on another scene; ranking unchanged).

Memory beyond `pair_stats.py`: a few [P, 3] float64 temporaries per chunk (the residual, dI, the loss change) and
one float64 per Gaussian.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from nerfstudio_pruning.render import rasterization
from nerfstudio_pruning.render.backend import scores_fused
from nerfstudio_pruning.render.constants import TILE_SIZE
from nerfstudio_pruning.scoring.accumulate import sum_over_views
from nerfstudio_pruning.scoring.fused import fused_view_statistic
from nerfstudio_pruning.scoring.pair_stats import (
    DEFAULT_CHUNK_PAIRS,
    PairStatistics,
    project_and_enumerate,
    project_gaussians,
    sum_over_pairs,
)
from nerfstudio_pruning.types import Gaussians, Views

LOSSES = ("l1", "l2", "energy")


def _check_gt(gt_images: Optional[Tensor], n_views: int, width: int, height: int, loss: str) -> None:
    if loss == "energy":
        return
    if gt_images is None:
        raise ValueError(f"loss={loss!r} needs gt_images")
    if gt_images.shape[:3] != (n_views, height, width):
        raise ValueError(f"gt_images must be [{n_views}, {height}, {width}, D], got {tuple(gt_images.shape)}")


def pixel_loss_change(delta: Tensor, residual: Optional[Tensor], loss: str) -> Tensor:
    """[P] exact change of a per-pixel loss (summed over channels) when the pixel moves by `delta` [P, D].

    `residual` is I - I_gt before the move; unused for "energy", which is |delta|^2.
    """
    if loss == "l1":
        return ((residual + delta).abs() - residual.abs()).sum(-1)
    if loss == "l2":
        return (delta * (2.0 * residual + delta)).sum(-1)
    if loss == "energy":
        return (delta * delta).sum(-1)
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


def leave_one_out_importance(
    gaussians: Gaussians,
    views: Views,
    gt_images: Optional[Tensor] = None,
    loss: str = "l1",
    tile_size: int = TILE_SIZE,
    progress: bool = True,
    chunk_pairs: Optional[int] = DEFAULT_CHUNK_PAIRS,
) -> Tensor:
    """[N] float64 loss increase, summed over views and pixels, when each Gaussian alone is removed.

    loss: "l1" or "l2" against `gt_images` [C, H, W, 3], or "energy" = sum_p |dI_p|^2 (no ground truth).
    Views are processed one at a time.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    _check_gt(gt_images, len(views), views.width, views.height, loss)
    gaussians = gaussians.detach()

    fused = scores_fused(gaussians.means)

    def view_importance(index: int, view: Views) -> Tensor:
        if fused:  # one walk over gsplat's tile lists (`scoring.fused`)
            with torch.no_grad():
                proj = project_gaussians(gaussians, view)
            gt_image = None if loss == "energy" else gt_images[index]
            return fused_view_statistic("leave_one_out", proj, view.width, view.height, tile_size,
                                        view.background(0), gt_image, loss)[:, 0]
        gt_flat = None if loss == "energy" else gt_images[index].reshape(view.width * view.height, -1).detach().double()

        def change(stats: PairStatistics) -> Tensor:
            residual = None if gt_flat is None else stats.pixel_color - gt_flat[stats.pixel]
            return pixel_loss_change(stats.removal_delta(), residual, loss)

        proj, pairs = project_and_enumerate(gaussians, view, tile_size)
        return sum_over_pairs(proj, pairs, view, len(gaussians), change, chunk_pairs)

    total = torch.zeros(len(gaussians), dtype=torch.float64, device=gaussians.device)
    return sum_over_views(views, view_importance, total, "Leave-one-out importance", progress)


def first_order_importance(
    gaussians: Gaussians,
    views: Views,
    gt_images: Tensor,
    loss: str = "l1",
    tile_size: int = TILE_SIZE,
    progress: bool = True,
) -> Tensor:
    """[N] float64 -o_i dL/do_i from one ordinary backward per view: the first-order estimate of the same
    loss increase (removal is the step -o_i in opacity).

    Two ways it departs from the exact value: it is linear in dI (L1 kinks and the dI^2 of L2 are dropped), and
    at pairs on the 0.999 alpha clamp alpha does not respond to opacity, so they contribute nothing although
    removing the Gaussian does change them.
    """
    if loss not in ("l1", "l2"):
        raise ValueError(f"first-order importance supports 'l1' and 'l2', got {loss!r}")
    _check_gt(gt_images, len(views), views.width, views.height, loss)
    g = gaussians.detach()
    opacities = g.opacities.clone().requires_grad_(True)

    def view_importance(index: int, view: Views) -> Optional[Tensor]:
        bg = view.background(0)
        image, _, _ = rasterization(
            g.means, g.quats, g.scales, opacities, g.sh, view.viewmats, view.Ks, view.width, view.height,
            sh_degree=g.sh_degree, tile_size=tile_size,
            backgrounds=None if bg is None else bg.reshape(1, -1).to(g.means.dtype), rasterize_mode=g.rasterize_mode,
        )
        if not image.requires_grad:  # nothing composited in this view
            return None
        residual = image[0] - gt_images[index].to(image.dtype)
        view_loss = residual.abs().sum() if loss == "l1" else (residual * residual).sum()
        (grad,) = torch.autograd.grad(view_loss, opacities)
        return -(opacities.detach() * grad).double()

    total = torch.zeros(len(g), dtype=torch.float64, device=g.device)
    return sum_over_views(views, view_importance, total, "First-order importance", progress)
