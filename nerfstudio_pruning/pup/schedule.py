"""PUP 3D-GS's round schedule: when to score, what fraction to remove, when densification stops.

A small strategy object in the spirit of gsplat's `gsplat/strategy/`: it holds the schedule and its progress as
plain numbers, answers the model's questions at each step, and saves and restores itself with a state dict.
It never touches the Gaussians: the model scores them (`scoring.scores.score_gaussians`) and removes what
`prune_mask` selects through `removal.remove_gaussians`, then calls `round_done` with what the round did. Those
records (`rounds`) travel in the state dict, so a resumed run still reports every round of the schedule.

The paper's schedule: from a trained model (splatfacto's 30k steps) prune 80%, refine 5k steps with
densification and opacity reset off and fresh Adam state, prune 50% of the rest, refine 5k more: 10% kept.

A target size (`target_gaussians` or `target_fraction`) keeps the rounds' shape and sets their scale: round r
keeps the share (1 - f_r) of the configured fractions raised to the power log(k) / log(prod_s (1 - f_s)), k the
kept fraction the target asks for. Each round thus takes the same share of the total log-reduction as in the
configured schedule (the paper's 80% + 50%: 70% and 30% of it), the paper's own schedule is the target of 10%,
and the last round removes exactly what leaves the target. Equal rounds (sqrt(k) each) would be the other simple
choice; this one changes nothing at the paper's operating point and makes the first, larger cut on the model
that was trained with every Gaussian, as the paper does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from torch import Tensor

from nerfstudio_pruning.errors import PruningRefused
from nerfstudio_pruning.removal import check_target, lowest_count_mask, lowest_fraction_mask, target_count


@dataclass
class PupScheduleConfig:
    """PUP's schedule settings. The nerfstudio model config holds them (`PupGSModelConfig.schedule`), flat on the
    command line: each is a `--pipeline.model.*` flag."""

    prune_start_step: int = 30000
    """Step of the first pruning round (after splatfacto's training). Runs loaded from another method's checkpoint prune right after the loaded step instead."""
    prune_fractions: Tuple[float, ...] = (0.8, 0.5)
    """Fraction of the remaining Gaussians each round removes (the paper: 80% then 50%, 10% kept)."""
    refine_steps: Tuple[int, ...] = (5000, 5000)
    """Fine-tuning steps after each round (same length as prune_fractions)."""
    min_gaussians: int = 64
    """A round that would leave fewer Gaussians than this is refused."""
    target_gaussians: Optional[int] = None
    """Gaussians to keep after the last round, exactly; the rounds' fractions are solved for it (module
    docstring). Exclusive with target_fraction. Refused before training when below min_gaussians or, for a loaded
    model, at or above its count."""
    target_fraction: Optional[float] = None
    """The same target as a fraction of the Gaussians at the first round (0.1 is the paper's 80% + 50%)."""

    def __post_init__(self) -> None:
        if len(self.prune_fractions) != len(self.refine_steps):
            raise ValueError(
                f"prune_fractions ({len(self.prune_fractions)} rounds) and refine_steps ({len(self.refine_steps)}) "
                "differ in length"
            )
        for f in self.prune_fractions:
            if not 0.0 < f < 1.0:
                raise ValueError(f"each prune fraction must be in (0, 1), got {f}")
        if any(s < 0 for s in self.refine_steps):
            raise ValueError(f"refine_steps must be >= 0, got {tuple(self.refine_steps)}")
        check_target(self.target_gaussians, self.target_fraction)

    def has_target(self) -> bool:
        return self.target_gaussians is not None or self.target_fraction is not None

    def planned_counts(self, num_gaussians: int) -> List[int]:
        """Gaussians left after each round from num_gaussians at the first round: with a target, the configured
        fractions' shape scaled to reach it, the last round exactly on it; without, the configured fractions."""
        wanted = target_count(self.target_gaussians, self.target_fraction, num_gaussians)
        if wanted is None:
            left, counts = num_gaussians, []
            for f in self.prune_fractions:
                left -= int(round(f * left))
                counts.append(left)
            return counts
        if not 0 < wanted < num_gaussians:
            return [wanted] * len(self.prune_fractions)
        logs = [math.log1p(-f) for f in self.prune_fractions]
        total, done, counts = sum(logs), 0.0, []
        for r, log_keep in enumerate(logs):
            done += log_keep
            share = done / total
            counts.append(wanted if r == len(logs) - 1 else int(round(num_gaussians * (wanted / num_gaussians) ** share)))
        return counts

    def total_steps(self) -> int:
        """Steps of a whole run from scratch: training, then every round's refinement."""
        return self.prune_start_step + sum(self.refine_steps)


class PupSchedule:
    """The rounds' progress under a `PupScheduleConfig`; saved in checkpoints through `state_dict`."""

    def __init__(self, config: PupScheduleConfig) -> None:
        self.config = config
        self.rounds_done = 0
        self.first_round_step = config.prune_start_step
        # One plain dict per round done (`round_record`): checkpoints load with torch.load(weights_only=True).
        self.rounds: List[Dict[str, Any]] = []
        # Gaussians left after each round, fixed at the first round from the count then (`planned_counts`).
        self.plan: List[int] = []

    @property
    def n_rounds(self) -> int:
        return len(self.config.prune_fractions)

    @property
    def finished(self) -> bool:
        return self.rounds_done >= self.n_rounds

    def start_after(self, step: int) -> None:
        """Post-hoc pruning of a model trained elsewhere: the first round runs right after `step`."""
        self.first_round_step = step + 1
        self.rounds_done = 0
        self.rounds = []
        self.plan = []

    def round_step(self, k: int) -> int:
        return int(self.first_round_step) + sum(self.config.refine_steps[:k])

    def pruning_started(self, step: int) -> bool:
        """From the first round on, densification and opacity resets stay off."""
        return step >= int(self.first_round_step)

    def due(self, step: int) -> Optional[float]:
        """The configured fraction of the round due at `step` (with a target the round removes what the plan
        says: `prune_mask`), or None when no round is due."""
        if self.finished or step < self.round_step(self.rounds_done):
            return None
        return self.config.prune_fractions[self.rounds_done]

    def remaining_after_all_rounds(self, num_gaussians: int) -> int:
        if self.plan:
            return self.plan[-1]
        if self.config.has_target():
            return self.config.planned_counts(num_gaussians)[-1]
        left = num_gaussians
        for f in self.config.prune_fractions[self.rounds_done:]:
            left -= int(round(f * left))
        return left

    def check_feasible(self, num_gaussians: int) -> None:
        """PruningRefused if the remaining rounds would leave fewer than min_gaussians, or a target is not below
        the count at the first round (checked before scoring). At the first round, the plan is fixed."""
        fixing = self.config.has_target() and not self.plan  # the first round: the plan is made once, here
        plan = self.config.planned_counts(num_gaussians) if fixing else self.plan
        if fixing and plan[-1] >= num_gaussians:
            raise PruningRefused(f"target of {plan[-1]} Gaussians is not below the {num_gaussians} present at the "
                                 "first pruning round; nothing was pruned")
        left = plan[-1] if plan else self.remaining_after_all_rounds(num_gaussians)
        if left < self.config.min_gaussians:
            raise PruningRefused(
                f"the remaining pruning rounds would leave {left} of {num_gaussians} Gaussians, fewer than "
                f"min_gaussians={self.config.min_gaussians}; nothing was pruned"
            )
        if fixing:
            self.plan = plan

    def prune_mask(self, scores: Tensor) -> Tensor:
        """[N] bool: the Gaussians this round removes: the lowest-scored fraction, or with a target the lowest
        scores down to the plan's count for this round (`check_feasible` fixes the plan first)."""
        if self.plan:
            return lowest_count_mask(scores, max(scores.numel() - self.plan[self.rounds_done], 0))
        return lowest_fraction_mask(scores, self.config.prune_fractions[self.rounds_done])

    def round_done(self, record: Optional[Dict[str, Any]] = None) -> None:
        """Count the round; `record` (from `round_record`) is kept in `rounds`."""
        self.rounds_done += 1
        if record is not None:
            self.rounds.append(dict(record))

    @staticmethod
    def round_record(step: int, score: str, gaussians_before: int, gaussians_after: int,
                     scoring_seconds: float) -> Dict[str, Any]:
        """What one round did, as plain numbers (the rounds of `pruning.json`)."""
        return {"step": int(step), "score": str(score), "gaussians_before": int(gaussians_before),
                "gaussians_after": int(gaussians_after), "scoring_seconds": float(scoring_seconds)}

    def state_dict(self) -> Dict[str, Any]:
        state = {"rounds_done": int(self.rounds_done), "first_round_step": int(self.first_round_step),
                 "rounds": [dict(record) for record in self.rounds]}
        if self.plan:
            state["plan"] = [int(count) for count in self.plan]
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.rounds_done = int(state["rounds_done"])
        self.first_round_step = int(state["first_round_step"])
        # Checkpoints written before rounds were recorded have none.
        self.rounds = [dict(record) for record in state.get("rounds", [])]
        self.plan = [int(count) for count in state.get("plan", [])]
