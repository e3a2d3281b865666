"""`pup-gs`: PUP 3D-GS on splatfacto. Train, then rounds of (score, prune the lowest fraction, refine).

The scoring, the choice of what to prune and the removal are plain tensor code (`prune_scores`, `removal`); this
model only decides when they run and wires them to splatfacto's state. Per round: densification and opacity
reset stay off, and the Gaussians' Adam state starts fresh, as in the paper's fine-tuning.

Post-hoc pruning: started with `--load-checkpoint` on a checkpoint of another splatfacto-family method (stock
splatfacto included), the rounds start right after the loaded step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Type

import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.utils import writer
from nerfstudio.utils.rich_utils import CONSOLE

from nerfstudio_pruning.methods.base import (
    GAUSSIAN_PARAMS,
    PortableSplatfactoModel,
    PortableSplatfactoModelConfig,
    camera_tensors,
    score_output_toggle,
    turbo_colours,
    viewer_wants,
)
from nerfstudio_pruning.errors import InputError
from nerfstudio_pruning.prune_scores import ScoreKind, score_gaussians
from nerfstudio_pruning.removal import lowest_fraction_mask, remove_gaussians, reset_optimizer_state


@dataclass
class PupGSModelConfig(PortableSplatfactoModelConfig):
    """PUP 3D-GS: prune by the log-determinant of each Gaussian's Fisher block over (mean, log-scale)."""

    _target: Type = field(default_factory=lambda: PupGSModel)
    prune_start_step: int = 30000
    """Step of the first pruning round (after splatfacto's training). Runs loaded from another method's checkpoint prune right after the loaded step instead."""
    prune_fractions: Tuple[float, ...] = (0.8, 0.5)
    """Fraction of the remaining Gaussians each round removes (the paper: 80% then 50%, 10% kept)."""
    refine_steps: Tuple[int, ...] = (5000, 5000)
    """Fine-tuning steps after each round (same length as prune_fractions)."""
    score: ScoreKind = "fisher"
    """Pruning score: exact Fisher log-det (PUP), its probe estimate, or the baselines lightgaussian, opacity, random."""
    fisher_downscale: int = 4
    """Score at 1/fisher_downscale of the training resolution (the official pipeline's --fisher_resolution 4)."""
    n_probes: int = 1
    """Probes per view for score=fisher-probe."""
    min_gaussians: int = 64
    """A round that would leave fewer Gaussians than this is refused."""
    score_seed: int = 0
    """Seed of the random score and of the probe estimator."""

    def __post_init__(self) -> None:
        if len(self.prune_fractions) != len(self.refine_steps):
            raise ValueError(
                f"prune_fractions ({len(self.prune_fractions)} rounds) and refine_steps ({len(self.refine_steps)}) differ in length"
            )
        for f in self.prune_fractions:
            if not 0.0 < f < 1.0:
                raise ValueError(f"each prune fraction must be in (0, 1), got {f}")
        if self.fisher_downscale < 1:
            raise ValueError(f"fisher_downscale must be >= 1, got {self.fisher_downscale}")

    def total_steps(self) -> int:
        return self.prune_start_step + sum(self.refine_steps)


class PupGSModel(PortableSplatfactoModel):
    config: PupGSModelConfig

    def populate_modules(self) -> None:
        super().populate_modules()
        # Persisted so that resumed runs know which rounds are done and viewers can show the last scores.
        self.register_buffer("rounds_done", torch.zeros((), dtype=torch.long))
        self.register_buffer("first_round_step", torch.tensor(self.config.prune_start_step, dtype=torch.long))
        self.register_buffer("sensitivity", torch.zeros(0, dtype=torch.float64))
        self._score_cameras: Optional[Cameras] = None
        self._loaded_step: Optional[int] = None
        self.sensitivity_toggle = score_output_toggle("Sensitivity output (PUP score percentile)")

    # -- schedule ------------------------------------------------------------------------------------------------
    def round_step(self, k: int) -> int:
        return int(self.first_round_step) + sum(self.config.refine_steps[:k])

    def pruning_started(self) -> bool:
        return self.step >= int(self.first_round_step)

    def step_post_backward(self, step: int) -> None:
        if self.pruning_started():
            return  # no densification, no opacity reset while pruning and refining
        super().step_post_backward(step)

    def get_training_callbacks(self, training_callback_attributes: TrainingCallbackAttributes) -> List[TrainingCallback]:
        self._score_cameras = training_callback_attributes.pipeline.datamanager.train_dataset.cameras
        callbacks = super().get_training_callbacks(training_callback_attributes)
        callbacks.append(TrainingCallback([TrainingCallbackLocation.BEFORE_TRAIN_ITERATION], self.prune_if_due))
        return callbacks

    def prune_if_due(self, step: int) -> None:
        k = int(self.rounds_done)
        if k >= len(self.config.prune_fractions) or step < self.round_step(k):
            return
        fraction = self.config.prune_fractions[k]
        n_before = self.num_points
        left = n_before
        for f in self.config.prune_fractions[k:]:
            left -= int(round(f * left))
        if left < self.config.min_gaussians:
            # Refused before any scoring or removal, so the model and its checkpoints stay as they are.
            raise InputError(f"the remaining pruning rounds would leave {left} of {n_before} Gaussians, fewer than "
                             f"min_gaussians={self.config.min_gaussians}; nothing was pruned")
        CONSOLE.print(f"[bold]pup-gs round {k + 1}/{len(self.config.prune_fractions)}[/bold] at step {step}: "
                      f"scoring {n_before} Gaussians ({self.config.score})")
        started = time.perf_counter()
        scores = self.score()
        seconds = time.perf_counter() - started
        CONSOLE.print(f"pup-gs: scored {n_before} Gaussians in {seconds:.2f} s")
        writer.put_scalar("pup/scoring_seconds", seconds, step)
        finite = scores[torch.isfinite(scores)]
        prune = lowest_fraction_mask(scores, fraction)
        remove_gaussians(self.gauss_params, self.optimizers, self.strategy_state, prune, min_remaining=self.config.min_gaussians)
        reset_optimizer_state(self.optimizers, GAUSSIAN_PARAMS)
        self.sensitivity = scores[~prune.to(scores.device)].to(self.sensitivity)
        self.rounds_done += 1
        CONSOLE.print(f"pup-gs: removed {int(prune.sum())}, {self.num_points} Gaussians remain "
                      f"({int((~torch.isfinite(scores)).sum())} never seen by a training view)")
        writer.put_scalar("pup/num_gaussians", self.num_points, step)
        writer.put_scalar("pup/round", int(self.rounds_done), step)
        writer.put_scalar("pup/unseen_gaussians", int((~torch.isfinite(scores)).sum()), step)
        if finite.numel():
            writer.put_scalar("pup/score_mean", float(finite.mean()), step)
            writer.put_scalar("pup/score_min", float(finite.min()), step)
            writer.put_scalar("pup/score_max", float(finite.max()), step)

    # -- scoring -------------------------------------------------------------------------------------------------
    def score(self) -> torch.Tensor:
        """Scores of the current Gaussians on every training view (higher = keep)."""
        if self._score_cameras is None:
            raise RuntimeError("pup-gs scores on the training cameras; they are attached by the training callbacks")
        viewmats, Ks, width, height = camera_tensors(self._score_cameras, self.device)
        return score_gaussians(
            self.config.score, self.means.detach(), self.quats.detach(), self.scales.detach(),
            self.opacities.detach().squeeze(-1), self.sh_coefficients(), viewmats, Ks, width, height,
            self.config.sh_degree,
            backgrounds=self.background_color.to(self.device), downscale=self.config.fisher_downscale,
            n_probes=self.config.n_probes, seed=self.config.score_seed,
        )

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def update_to_step(self, step: int) -> None:
        self._loaded_step = step

    def with_method_state(self, state):
        if "rounds_done" not in state:
            # Another method's checkpoint (post-hoc pruning): start the rounds right after it.
            start = self.config.prune_start_step if self._loaded_step is None else self._loaded_step + 1
            state = {**state, "rounds_done": torch.zeros((), dtype=torch.long),
                     "first_round_step": torch.tensor(start, dtype=torch.long),
                     "sensitivity": torch.zeros(0, dtype=torch.float64)}
            CONSOLE.print(f"pup-gs: loaded a checkpoint without pruning state; pruning rounds start at step {start}")
        # A buffer of the checkpoint's length, so that loading does not refuse a size mismatch.
        self.sensitivity = torch.zeros_like(state["sensitivity"])
        return state

    # -- viewer --------------------------------------------------------------------------------------------------
    def get_outputs(self, camera: Cameras) -> Dict:
        outputs = super().get_outputs(camera)
        if not self.training and viewer_wants(self.sensitivity_toggle) and self.sensitivity.numel() == self.num_points:
            percentile = torch.argsort(torch.argsort(self.sensitivity)).float() / max(self.num_points - 1, 1)
            # blue: pruned first; red: kept longest
            outputs["sensitivity"] = self.render_with_colours(camera, turbo_colours(percentile))
        return outputs
