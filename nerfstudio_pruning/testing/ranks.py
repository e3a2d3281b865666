"""Rank agreement between two scorings of the same Gaussians, for the tests, the analyses and the benchmarks."""

from __future__ import annotations

import torch


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 0..N-1 in float64 (-inf lowest), tied values sharing the mean of the ranks they span, as
    `scipy.stats.rankdata` (minus one): the GPU kit has no scipy, and rank ties are common (unseen Gaussians)."""
    flat = values.detach().reshape(-1).double().cpu()
    ordered, order = torch.sort(flat, stable=True)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    group = torch.cumsum(starts, 0) - 1
    first = torch.nonzero(starts).reshape(-1).double()
    last = torch.cat([first[1:], torch.tensor([float(flat.numel())], dtype=torch.float64)]) - 1
    ranks = torch.empty_like(flat)
    ranks[order] = ((first + last) / 2)[group]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two scorings of the same items (ties at their mean rank)."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))
