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

Memory beyond `pair_stats`: a few [P, 3] float64 temporaries per chunk (the residual, dI, the loss change) and
one float64 per Gaussian.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from tqdm import tqdm

from nerfstudio_pruning.pair_stats import DEFAULT_CHUNK_PAIRS, view_background, view_pair_statistics
from nerfstudio_pruning.rendering import rasterization

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
    means: Tensor,
    quats: Tensor,
    log_scales: Tensor,
    opacity_logits: Tensor,
    sh: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    sh_degree: int,
    gt_images: Optional[Tensor] = None,
    loss: str = "l1",
    backgrounds: Optional[Tensor] = None,
    rasterize_mode: str = "classic",
    tile_size: int = 16,
    progress: bool = True,
    chunk_pairs: int = DEFAULT_CHUNK_PAIRS,
) -> Tensor:
    """[N] float64 loss increase, summed over views and pixels, when each Gaussian alone is removed.

    loss: "l1" or "l2" against `gt_images` [C, H, W, 3], or "energy" = sum_p |dI_p|^2 (no ground truth).
    `backgrounds` [3] or [C, 3], black if None. Views are processed one at a time.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    n_views = viewmats.shape[0]
    _check_gt(gt_images, n_views, width, height, loss)
    importance = torch.zeros(means.shape[0], dtype=torch.float64, device=means.device)
    for view in tqdm(range(n_views), desc="Leave-one-out importance", disable=not progress):
        gt_flat = None if loss == "energy" else gt_images[view].reshape(width * height, -1).detach().double()
        for stats in view_pair_statistics(
            means, quats, log_scales, opacity_logits, sh, viewmats[view : view + 1], Ks[view : view + 1], width,
            height, sh_degree, view_background(backgrounds, view), rasterize_mode, tile_size, chunk_pairs,
        ):
            residual = None if gt_flat is None else stats.pixel_color - gt_flat[stats.pixel]
            change = pixel_loss_change(stats.removal_delta(), residual, loss)
            importance.index_add_(0, stats.gaussian, change)
    return importance


def first_order_importance(
    means: Tensor,
    quats: Tensor,
    log_scales: Tensor,
    opacity_logits: Tensor,
    sh: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    sh_degree: int,
    gt_images: Tensor,
    loss: str = "l1",
    backgrounds: Optional[Tensor] = None,
    rasterize_mode: str = "classic",
    tile_size: int = 16,
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
    n_views = viewmats.shape[0]
    _check_gt(gt_images, n_views, width, height, loss)
    opacities = torch.sigmoid(opacity_logits.detach()).requires_grad_(True)
    scales = torch.exp(log_scales.detach())
    importance = torch.zeros(means.shape[0], dtype=torch.float64, device=means.device)
    for view in tqdm(range(n_views), desc="First-order importance", disable=not progress):
        bg = view_background(backgrounds, view)
        image, _, _ = rasterization(
            means.detach(), quats.detach(), scales, opacities, sh.detach(), viewmats[view : view + 1],
            Ks[view : view + 1], width, height, sh_degree=sh_degree, tile_size=tile_size,
            backgrounds=None if bg is None else bg.reshape(1, -1).to(means.dtype), rasterize_mode=rasterize_mode,
        )
        if not image.requires_grad:  # nothing composited in this view
            continue
        residual = image[0] - gt_images[view].to(image.dtype)
        view_loss = residual.abs().sum() if loss == "l1" else (residual * residual).sum()
        (grad,) = torch.autograd.grad(view_loss, opacities)
        importance -= (opacities.detach() * grad).double()
    return importance
