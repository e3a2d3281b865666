"""PUP 3D-GS's round schedule: when to score, what fraction to remove, when densification stops.

A small strategy object in the spirit of gsplat's `gsplat/strategy/`: it holds the schedule and its progress as
plain numbers, answers the model's questions at each step, and saves and restores itself with a state dict.
It never touches the Gaussians: the model scores them (`scoring.scores.score_gaussians`) and removes what
`prune_mask` selects through `removal.remove_gaussians`, then calls `round_done` with what the round did. Those
records (`rounds`) travel in the state dict, so a resumed run still reports every round of the schedule.

The paper's schedule: from a trained model (splatfacto's 30k steps) prune 80%, refine 5k steps with
densification and opacity reset off and fresh Adam state, prune 50% of the rest, refine 5k more: 10% kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from torch import Tensor

from nerfstudio_pruning.errors import PruningRefused
from nerfstudio_pruning.removal import lowest_fraction_mask


@dataclass
class PupScheduleConfig:
    """PUP's schedule settings. The nerfstudio model config inherits these fields, so each is a
    `--pipeline.model.*` flag."""

    prune_start_step: int = 30000
    """Step of the first pruning round (after splatfacto's training). Runs loaded from another method's checkpoint prune right after the loaded step instead."""
    prune_fractions: Tuple[float, ...] = (0.8, 0.5)
    """Fraction of the remaining Gaussians each round removes (the paper: 80% then 50%, 10% kept)."""
    refine_steps: Tuple[int, ...] = (5000, 5000)
    """Fine-tuning steps after each round (same length as prune_fractions)."""
    min_gaussians: int = 64
    """A round that would leave fewer Gaussians than this is refused."""

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

    def round_step(self, k: int) -> int:
        return int(self.first_round_step) + sum(self.config.refine_steps[:k])

    def pruning_started(self, step: int) -> bool:
        """From the first round on, densification and opacity resets stay off."""
        return step >= int(self.first_round_step)

    def due(self, step: int) -> Optional[float]:
        """The fraction to remove at `step`, or None when no round is due."""
        if self.finished or step < self.round_step(self.rounds_done):
            return None
        return self.config.prune_fractions[self.rounds_done]

    def remaining_after_all_rounds(self, num_gaussians: int) -> int:
        left = num_gaussians
        for f in self.config.prune_fractions[self.rounds_done:]:
            left -= int(round(f * left))
        return left

    def check_feasible(self, num_gaussians: int) -> None:
        """PruningRefused if the remaining rounds would leave fewer than min_gaussians (checked before scoring)."""
        left = self.remaining_after_all_rounds(num_gaussians)
        if left < self.config.min_gaussians:
            raise PruningRefused(
                f"the remaining pruning rounds would leave {left} of {num_gaussians} Gaussians, fewer than "
                f"min_gaussians={self.config.min_gaussians}; nothing was pruned"
            )

    def prune_mask(self, scores: Tensor) -> Tensor:
        """[N] bool: the Gaussians this round removes (the lowest-scored fraction)."""
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
        return {"rounds_done": int(self.rounds_done), "first_round_step": int(self.first_round_step),
                "rounds": [dict(record) for record in self.rounds]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.rounds_done = int(state["rounds_done"])
        self.first_round_step = int(state["first_round_step"])
        # Checkpoints written before rounds were recorded have none.
        self.rounds = [dict(record) for record in state.get("rounds", [])]
