"""VEDAL's convergence gate over per-Gaussian leave-one-out importances.

Importance convention: Delta_i >= 0 is the increase of the training loss when Gaussian i is removed (bigger
means more important). The caller refreshes the gate every K training steps with a fresh [N] tensor; a
Gaussian becomes *eligible* (its retention probability is put under the KL prior) once its EMA of Delta has
stopped moving and is low compared with the rest of the model. Eligibility is decided per Gaussian at every
refresh and can be withdrawn again (a reversal).

Plain torch on purpose: no nerfstudio import, so the gate can be tested and reused outside a pipeline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

# Per-Gaussian state, in the order the state dict stores it.
_PER_GAUSSIAN_KEYS = ("ema", "last_relative_change", "stable_count", "n_updates", "eligible")


@dataclass
class ConvergenceGateConfig:
    """Gate hyperparameters. The paper gives none of these numbers; each default says why it was chosen."""

    beta: float = 0.9
    """EMA decay per refresh. 0.9 averages over ~1/(1-beta) = 10 refreshes, i.e. ~10 different batches of
    training views at K steps apart, enough to smooth view-to-view noise in a Gaussian's visibility while still
    following the slow drift of fine-tuning (23k steps is hundreds of refreshes)."""

    rel_tol: float = 0.05
    """A refresh is stable when |EMA_new - EMA_old| / |EMA_old| < rel_tol. The EMA moves by (1 - beta) of the
    innovation, so with beta = 0.9 this accepts observations within ~50% of the running mean: noise of that
    size is normal for a per-view-batch importance, while a real trend keeps moving the EMA by more."""

    window: int = 5
    """Consecutive stable refreshes needed to call the EMA converged. Five makes a chance run of stable
    refreshes in a still-drifting EMA unlikely, and costs only ~5K steps of delay."""

    min_refreshes: int = 10
    """No Gaussian is eligible before its EMA has seen this many observations: one EMA memory length
    (1/(1-beta)), so the first few view batches cannot make a Gaussian look converged-and-unimportant."""

    threshold_quantile: float = 0.9
    """Adaptive threshold: eligible only if EMA <= the threshold_quantile quantile of the current EMAs.
    A rank rule rather than threshold_scale * median: the paper validates the importance statistic by rank
    (Spearman >= 0.91, gate-decision agreement), so a rule that depends only on ranks makes the gate decision
    exactly as reliable as what was validated, and it is invariant to the loss units and to heavy tails. It
    always offers the same fraction as candidates, but that is harmless: the gate only decides who is under
    the KL prior, and Proposition 1 still keeps candidates whose importance is large against lambda_KL.
    0.9 protects the top 10% unconditionally and leaves room for the reported 5.2x (~81%) reduction."""

    max_eligible_fraction: float = 0.85
    """Cap on the eligible fraction of all Gaussians; when more pass, the least important are kept. 0.85 is
    just above the ~81% the paper removes, so the cap never blocks the reported operating point but stops the
    whole model coming under KL pressure at once. It bounds the removal: only eligible Gaussians can go, so at most
    1/(1 - cap) x fewer (6.7x at 0.85), and on buddha at 1/4 the default kl_weight already removes nearly all of
    them (docs/results.md). Above threshold_quantile the quantile bounds it instead."""

    release_tol_factor: float = 2.0
    """Hysteresis: once converged, a Gaussian stays converged while its relative change is below
    rel_tol * release_tol_factor. Without it, one noisy refresh near rel_tol flips eligibility back and forth;
    the paper reports under 2% reversals, which a single tolerance does not give on noisy importances."""

    sticky: bool = True
    """Once eligible, a Gaussian stays eligible while its EMA stays at or below the threshold quantile (and within
    the cap), whether or not the EMA keeps moving; the convergence test decides only who enters. Gating changes
    what the gate measures: a gated Gaussian renders at o_i z_i, its neighbours take over its pixels and its
    leave-one-out importance (measured unmasked) drops, so re-testing convergence after the grant revoked most
    grants (78% of them by step 11.4k of a full-schedule run on the built-in scene; docs/vedal_gs.md). Revoking
    when the Gaussian has become important is kept. False: the convergence test applies at every refresh, as
    before."""

    cap_keeps_incumbents: bool = True
    """When more Gaussians qualify than the cap allows, the ones eligible already keep their place and the cap's
    remaining room goes to the least important newcomers. False: the least important of all qualifying Gaussians
    are kept, so a newcomer whose EMA is lower displaces an eligible Gaussian whose EMA rose slightly: at the full
    schedule on the built-in scene that churn made the reversals go from ~1% to 8.8% of grants once the cap was
    reached (docs/results.md). An eligible Gaussian still loses its place by becoming important (above the
    threshold quantile), as with `sticky`."""

    rel_change_floor: float = 0.01
    """Relative changes are measured against max(|EMA_old|, rel_change_floor * mean |EMA|): a Gaussian whose
    importance is ~1e-9 while the typical one is ~1e-6 would otherwise never look converged, although its
    changes are negligible at the scale of the model. The mean, not the median: importance is heavy-tailed and
    about a third of a trained model's Gaussians have Delta <= 0 (removing them lowers the loss), so the median
    sits near 0.06 x the mean (docs/vedal_gs.md): a floor on it would judge the near-zero Gaussians, the first
    candidates for pruning, by changes that are negligible at the model's scale."""


def _as_index(keep: Tensor, n: int) -> Tensor:
    """Normalise a bool keep-mask or an index tensor to a long index tensor on the same device."""
    if keep.dtype == torch.bool:
        if keep.shape != (n,):
            raise ValueError(f"keep mask has shape {tuple(keep.shape)}, expected ({n},)")
        return keep.nonzero(as_tuple=False).squeeze(1)
    # uint8 is refused on purpose: an old-style byte mask would be silently read as indices 0 and 1.
    if keep.dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
        index = keep.long().reshape(-1)
        if index.numel() and (index.min() < 0 or index.max() >= n):
            raise ValueError(f"keep index out of range for {n} Gaussians")
        return index
    raise TypeError(f"keep must be a bool mask or an integer index, got {keep.dtype}")


def _lower_quantile(values: Tensor, q: float) -> Tensor:
    """q-quantile without interpolation. kthvalue instead of torch.quantile: the latter refuses inputs above
    2**24 elements, which a large splat model can reach."""
    k = min(values.numel(), max(1, math.ceil(q * values.numel())))
    return values.kthvalue(k).values


class ConvergenceGate:
    """Per-Gaussian EMA of importance with a convergence test, adaptive threshold and eligibility cap."""

    def __init__(
        self,
        config: Optional[ConvergenceGateConfig] = None,
        num_gaussians: int = 0,
        device: Union[str, torch.device, None] = None,
    ) -> None:
        self.config = config if config is not None else ConvergenceGateConfig()
        self._check_config()
        self._allocate(num_gaussians, torch.device(device) if device is not None else torch.device("cpu"))
        self.reversal_count = 0
        self.grant_count = 0
        self.history: List[Tuple[int, float, int]] = []

    def _check_config(self) -> None:
        c = self.config
        if not 0.0 <= c.beta < 1.0:
            raise ValueError("beta must be in [0, 1)")
        if c.rel_tol <= 0 or c.release_tol_factor < 1.0:
            raise ValueError("rel_tol must be > 0 and release_tol_factor >= 1")
        if c.window < 1 or c.min_refreshes < 1:
            raise ValueError("window and min_refreshes must be >= 1")
        if not 0.0 < c.threshold_quantile <= 1.0 or not 0.0 <= c.max_eligible_fraction <= 1.0:
            raise ValueError("threshold_quantile must be in (0, 1] and max_eligible_fraction in [0, 1]")

    @property
    def eligible(self) -> Tensor:
        """[N] bool: the Gaussians under the KL prior."""
        return self._eligible

    @eligible.setter
    def eligible(self, mask: Tensor) -> None:
        # The count is taken here, where eligibility changes (at a gate refresh, a removal, a load), so that the
        # per-step question "is anything gated?" (`eligible_count`) never reads a device tensor back to the host.
        self._eligible = mask
        self.eligible_count = int(mask.sum())

    def _allocate(self, n: int, device: torch.device) -> None:
        self.ema = torch.zeros(n, dtype=torch.float32, device=device)
        # inf, not 0: a Gaussian that has not been observed twice has no measured change and must not look stable.
        self.last_relative_change = torch.full((n,), math.inf, dtype=torch.float32, device=device)
        self.stable_count = torch.zeros(n, dtype=torch.long, device=device)
        self.n_updates = torch.zeros(n, dtype=torch.long, device=device)
        self._eligible, self.eligible_count = torch.zeros(n, dtype=torch.bool, device=device), 0

    def _to(self, device: torch.device) -> None:
        for key in _PER_GAUSSIAN_KEYS:
            # The eligible mask directly: moving it changes no count, and its setter would read the count back.
            setattr(self, "_eligible" if key == "eligible" else key, getattr(self, key).to(device))

    @property
    def num_gaussians(self) -> int:
        return self.ema.numel()

    @property
    def converged(self) -> Tensor:
        return (self.stable_count >= self.config.window) & (self.n_updates >= self.config.min_refreshes)

    @property
    def eligible_fraction(self) -> float:
        n = self.num_gaussians
        return self.eligible_count / n if n else 0.0

    @property
    def reversal_rate(self) -> float:
        """Withdrawn eligibilities per granted eligibility (eligible -> not eligible over not -> eligible).
        Gaussians pruned while eligible are not reversals."""
        return self.reversal_count / self.grant_count if self.grant_count else 0.0

    @torch.no_grad()
    def update(self, importance: Tensor, step: int) -> Tensor:
        """Fold one refresh of importances into the EMAs and return the new eligible mask (a copy)."""
        cfg = self.config
        if importance.dim() != 1 or importance.numel() != self.num_gaussians:
            raise ValueError(
                f"importance has shape {tuple(importance.shape)}, gate holds {self.num_gaussians} Gaussians"
            )
        if not torch.isfinite(importance).all():
            raise ValueError("importance contains non-finite values")
        if importance.device != self.ema.device:
            self._to(importance.device)
        delta = importance.detach().to(torch.float32)

        first = self.n_updates == 0
        previous = self.ema
        # First observation is taken as is: a zero start biases the EMA towards 0 for ~1/(1-beta) refreshes,
        # which would make every new Gaussian look unimportant (below threshold) and its EMA look like it is
        # still rising. Taking the first value directly is unbiased for a constant sequence.
        ema = torch.where(first, delta, cfg.beta * previous + (1.0 - cfg.beta) * delta)

        observed_before = ~first
        if observed_before.any():
            floor = cfg.rel_change_floor * previous[observed_before].abs().mean()
        else:
            floor = torch.zeros((), device=delta.device)
        denominator = torch.maximum(previous.abs(), floor).clamp_min(torch.finfo(torch.float32).tiny)
        relative_change = torch.where(first, torch.full_like(ema, math.inf), (ema - previous).abs() / denominator)

        was_converged = self.stable_count >= cfg.window
        tolerance = torch.where(
            was_converged,
            torch.full_like(ema, cfg.rel_tol * cfg.release_tol_factor),
            torch.full_like(ema, cfg.rel_tol),
        )
        stable = relative_change < tolerance
        self.stable_count = torch.where(stable, self.stable_count + 1, torch.zeros_like(self.stable_count))
        self.n_updates = self.n_updates + 1
        self.ema = ema
        self.last_relative_change = relative_change

        new_eligible = self._eligibility()
        previous_eligible = self.eligible
        self.reversal_count += int((previous_eligible & ~new_eligible).sum().item())
        self.grant_count += int((~previous_eligible & new_eligible).sum().item())
        self.eligible = new_eligible
        self.history.append((int(step), self.eligible_fraction, self.reversal_count))
        return new_eligible.clone()

    def _eligibility(self) -> Tensor:
        cfg = self.config
        observed = self.n_updates > 0
        candidates = self.converged & observed
        if cfg.sticky:
            candidates |= self.eligible
        if observed.any():
            threshold = _lower_quantile(self.ema[observed], cfg.threshold_quantile)
            candidates &= self.ema <= threshold
        cap = math.floor(cfg.max_eligible_fraction * self.num_gaussians)
        if int(candidates.sum()) <= cap:
            return candidates
        capped = torch.zeros_like(candidates)
        if cfg.cap_keeps_incumbents:
            incumbents = candidates & self.eligible
            room = cap - int(incumbents.sum())
            if room >= 0:
                capped |= incumbents
                candidates = candidates & ~self.eligible
                cap = room
            else:  # fewer places than incumbents (the cap or the model shrank): the least important of them stay
                candidates = incumbents
        candidate_index = candidates.nonzero(as_tuple=False).squeeze(1)
        least_important = torch.topk(self.ema[candidate_index], cap, largest=False).indices
        capped[candidate_index[least_important]] = True
        return capped

    @torch.no_grad()
    def select(self, keep: Tensor) -> None:
        """Keep only the rows named by `keep` (bool mask over the current Gaussians, or an index), e.g. after
        pruning with the same mask applied to the splat parameters."""
        index = _as_index(keep.to(self.ema.device), self.num_gaussians)
        for key in _PER_GAUSSIAN_KEYS:
            setattr(self, key, getattr(self, key)[index])

    @torch.no_grad()
    def append(self, n: int) -> None:
        """Add n Gaussians at the end (densification); they start unobserved and unconverged."""
        if n < 0:
            raise ValueError("n must be >= 0")
        fresh = ConvergenceGate(self.config, n, self.ema.device)
        for key in _PER_GAUSSIAN_KEYS:
            setattr(self, key, torch.cat([getattr(self, key), getattr(fresh, key)]))

    def state_dict(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {key: getattr(self, key).clone() for key in _PER_GAUSSIAN_KEYS}
        state["reversal_count"] = self.reversal_count
        state["grant_count"] = self.grant_count
        state["history"] = [tuple(entry) for entry in self.history]
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore from `state_dict()`. The number of Gaussians is taken from the state, not from the
        constructor, since a checkpoint is usually written after pruning."""
        missing = [key for key in (*_PER_GAUSSIAN_KEYS, "reversal_count", "grant_count", "history") if key not in state]
        if missing:
            raise KeyError(f"gate state is missing {missing}")
        n = state["ema"].numel()
        for key in _PER_GAUSSIAN_KEYS:
            if state[key].shape != (n,):
                raise ValueError(f"gate state '{key}' has shape {tuple(state[key].shape)}, expected ({n},)")
        device = self.ema.device
        self.ema = state["ema"].to(device, torch.float32).clone()
        self.last_relative_change = state["last_relative_change"].to(device, torch.float32).clone()
        self.stable_count = state["stable_count"].to(device, torch.long).clone()
        self.n_updates = state["n_updates"].to(device, torch.long).clone()
        self.eligible = state["eligible"].to(device, torch.bool).clone()
        self.reversal_count = int(state["reversal_count"])
        self.grant_count = int(state["grant_count"])
        self.history = [(int(s), float(f), int(r)) for s, f, r in state["history"]]
