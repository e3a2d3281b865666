"""Removing Gaussians while keeping every optimizer and per-Gaussian state consistent.

Like gsplat's `strategy/ops.py`, this is the one place that changes the number of Gaussians. Removal itself is
gsplat's `ops.remove` (parameters, Adam moments, the strategy's running state); this module adds the checks and
the bookkeeping gsplat leaves to the caller: optimizers that still hold tensors from before a checkpoint load,
and per-Gaussian state of our own (gates, scores) that must shrink with the Gaussians.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, MutableMapping, Optional, Protocol

import torch
from gsplat.strategy import ops as gsplat_ops
from torch import Tensor

from nerfstudio_pruning.errors import PruningRefused


class PerGaussianState(Protocol):
    def select(self, keep: Tensor) -> None: ...


def rebind_optimizers(params: MutableMapping[str, torch.nn.Parameter], optimizers: Dict[str, torch.optim.Optimizer]) -> List[str]:
    """Point each optimizer at the current parameter tensor of the same name.

    nerfstudio builds optimizers before loading a checkpoint, and splatfacto's `load_state_dict` replaces the
    parameters with resized ones, so the optimizers keep stepping tensors the model no longer uses (training
    silently stops) and gsplat's `ops.remove`, which reads the parameter from the optimizer, prunes the wrong
    tensor. Moment estimates are kept where their shape still matches and dropped otherwise.
    Returns the names that were rebound.
    """
    rebound = []
    for name, param in params.items():
        opt = optimizers.get(name)
        if opt is None:
            continue
        for group in opt.param_groups:
            old = group["params"][0]
            if old is param:
                continue
            state = opt.state.pop(old, {})
            if any(isinstance(v, Tensor) and v.dim() > 0 and v.shape != param.shape for v in state.values()):
                state = {}
            group["params"] = [param]
            if state:
                opt.state[param] = state
            rebound.append(name)
    return rebound


def reset_optimizer_state(optimizers: Dict[str, torch.optim.Optimizer], names: Iterable[str]) -> None:
    """Forget Adam's moments and step count (PUP 3D-GS fine-tunes each round with fresh optimizer state)."""
    for name in names:
        opt = optimizers.get(name)
        if opt is not None:
            opt.state.clear()


def remove_gaussians(
    params: MutableMapping[str, torch.nn.Parameter],
    optimizers: Dict[str, torch.optim.Optimizer],
    strategy_state: Dict[str, object],
    prune: Tensor,
    extra_states: Iterable[PerGaussianState] = (),
    min_remaining: int = 1,
) -> int:
    """Remove the Gaussians where `prune` is True. Returns how many were removed.

    Refuses, with nothing changed, a mask of the wrong length (ValueError) or one that would leave fewer than
    `min_remaining` Gaussians (PruningRefused).
    """
    n = next(iter(params.values())).shape[0]
    if prune.dtype != torch.bool or prune.shape != (n,):
        raise ValueError(f"prune mask must be a bool tensor of shape ({n},), got {prune.dtype} {tuple(prune.shape)}")
    n_removed = int(prune.sum())
    if n - n_removed < min_remaining:
        raise PruningRefused(
            f"removing {n_removed} of {n} Gaussians would leave {n - n_removed}, fewer than the minimum {min_remaining}"
        )
    if n_removed == 0:
        return 0
    rebind_optimizers(params, optimizers)
    prune = prune.to(next(iter(params.values())).device)
    gsplat_ops.remove(params=params, optimizers=optimizers, state=strategy_state, mask=prune)
    keep = ~prune
    for extra in extra_states:
        extra.select(keep)
    return n_removed


def lowest_fraction_mask(scores: Tensor, fraction: float) -> Tensor:
    """Mask of the `fraction` of entries with the lowest scores (-inf first; ties broken by index).

    NaN scores are refused: ordering by NaN would prune arbitrary Gaussians.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"prune fraction must be in (0, 1), got {fraction}")
    return lowest_count_mask(scores, int(round(fraction * scores.numel())))


def lowest_count_mask(scores: Tensor, count: int) -> Tensor:
    """Mask of the `count` entries with the lowest scores (-inf first; ties broken by index); NaN refused."""
    if not 0 <= count <= scores.numel():
        raise ValueError(f"cannot select {count} of {scores.numel()} scores")
    n_nan = int(torch.isnan(scores).sum())
    if n_nan:
        raise PruningRefused(f"{n_nan} of {scores.numel()} scores are NaN; refusing to prune by an undefined order")
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if count > 0:
        order = torch.argsort(scores, stable=True)
        mask[order[:count]] = True
    return mask


def check_target(target_gaussians: Optional[int], target_fraction: Optional[float]) -> None:
    """ValueError unless at most one target form is given and it is meaningful (a count >= 1, a fraction in (0, 1))."""
    if target_gaussians is not None and target_fraction is not None:
        raise ValueError("give target_gaussians or target_fraction, not both")
    if target_gaussians is not None and target_gaussians < 1:
        raise ValueError(f"target_gaussians must be >= 1, got {target_gaussians}")
    if target_fraction is not None and not 0.0 < target_fraction < 1.0:
        raise ValueError(f"target_fraction must be in (0, 1), got {target_fraction}")


def target_count(target_gaussians: Optional[int], target_fraction: Optional[float], reference: int) -> Optional[int]:
    """Gaussians a target asks to keep: the count itself, or round(fraction x reference) once `reference` (the
    Gaussians the fraction refers to) is known (> 0); None without a target or before that."""
    if target_gaussians is not None:
        return int(target_gaussians)
    if target_fraction is not None and reference > 0:
        return max(1, int(round(target_fraction * reference)))
    return None
