"""`pup-gs`: PUP 3D-GS on splatfacto. Train, then rounds of (score, prune the lowest fraction, refine).

The round schedule is `pup.schedule.PupSchedule`, the scores `scoring.scores`, the removal `removal`; this model
wires them into splatfacto's callbacks: it asks the schedule at every step, keeps densification and opacity
reset off once the rounds start, and gives the Gaussians fresh Adam state each round, as in the paper.

Post-hoc pruning: started with `--load-checkpoint` on a checkpoint of another splatfacto-family method (stock
splatfacto included), the rounds start right after the loaded step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Dict, List, Optional, Tuple, Type

import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.utils import writer
from nerfstudio.utils.rich_utils import CONSOLE

from nerfstudio_pruning.methods.base import (
    FLAT,
    GAUSSIAN_PARAMS,
    PortableSplatfactoModel,
    PortableSplatfactoModelConfig,
    settings_held_in,
    views_from_cameras,
)
from nerfstudio_pruning.methods.viewer import (
    ORDER_LEGEND,
    ViewerMarkdown,
    add_output_if_shown,
    score_legend,
)
from nerfstudio_pruning.pup.schedule import PupSchedule, PupScheduleConfig
from nerfstudio_pruning.removal import remove_gaussians, reset_optimizer_state
from nerfstudio_pruning.scoring.scores import ScoreKind, floored_downscale, score_gaussians


@dataclass
class PupGSModelConfig(PortableSplatfactoModelConfig):
    """PUP 3D-GS: prune by the log-determinant of each Gaussian's Fisher block over (mean, log-scale)."""

    _target: Type = field(default_factory=lambda: PupGSModel)
    schedule: Annotated[PupScheduleConfig, FLAT] = field(default_factory=PupScheduleConfig)
    """The rounds: when, how much, down to what size (`pup.schedule`); its settings are --pipeline.model.* flags."""
    score: ScoreKind = "fisher"
    """Pruning score: exact Fisher log-det (PUP), the same over opacity and base colour too (fisher-appearance, an
    option for flat regions), its probe estimate, Speedy-Splat's squared footprint gradient (speedy), or the
    baselines lightgaussian, opacity, random."""
    fisher_downscale: int = 4
    """Score at 1/fisher_downscale of the training resolution (the official pipeline's --fisher_resolution 4), for
    every score, down to score_min_side; Speedy-Splat's own code scores at the training resolution (1)."""
    score_min_side: int = 256
    """Floor on the scoring resolution: the downscale is lowered until the longer side of the scoring renders has
    at least this many pixels (0: no floor). The official 1/4 was chosen for Mip-NeRF 360 trained at about
    1000-1600 pixels wide, i.e. scoring at 250-400; at 1/4 of a 128x96 image the Fisher blocks would come from
    32x24 renders, where most Gaussians are below a pixel (docs/pup_gs.md measures the ranking against the
    scoring resolution)."""
    n_probes: int = 1
    """Probes per view for score=fisher-probe."""
    score_seed: int = 0
    """Seed of the random score and of the probe estimator."""

    def __post_init__(self) -> None:
        if self.fisher_downscale < 1:
            raise ValueError(f"fisher_downscale must be >= 1, got {self.fisher_downscale}")
        if self.score_min_side < 0:
            raise ValueError(f"score_min_side must be >= 0, got {self.score_min_side}")

    def scoring_downscale(self, width: int = 0, height: int = 0) -> float:
        """The downscale the scores use for training views of this size: fisher_downscale, lowered to keep
        score_min_side (as configured when no size is given)."""
        if width and height:
            return floored_downscale(width, height, self.fisher_downscale, self.score_min_side)
        return int(self.fisher_downscale)

    def gaussian_count_limits(self) -> Tuple[Optional[int], int]:
        return self.schedule.target_gaussians, self.schedule.min_gaussians

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(settings_held_in(state, "schedule", PupScheduleConfig))


class PupGSModel(PortableSplatfactoModel):
    config: PupGSModelConfig

    def populate_modules(self) -> None:
        super().populate_modules()
        self.schedule = PupSchedule(self.config.schedule)
        # Last round's scores of the surviving Gaussians, for the viewer; a buffer so checkpoints keep it.
        self.register_buffer("sensitivity", torch.zeros(0, dtype=torch.float64))
        self._score_cameras: Optional[Cameras] = None
        self._loaded_step: Optional[int] = None
        # The 'sensitivity' output is rendered only while the viewer shows it (`viewer_outputs`, methods/viewer.py).
        self.sensitivity_legend = ViewerMarkdown("Sensitivity legend", score_legend(
            "sensitivity", what="per pixel, the PUP score percentile of its Gaussians (after the first round)",
            low="lowest score, pruned first", high="kept longest"), order=ORDER_LEGEND)

    def step_post_backward(self, step: int) -> None:
        if self.schedule.pruning_started(step):
            return  # no densification, no opacity reset while pruning and refining
        super().step_post_backward(step)

    def get_training_callbacks(self, training_callback_attributes: TrainingCallbackAttributes) -> List[TrainingCallback]:
        self._score_cameras = training_callback_attributes.pipeline.datamanager.train_dataset.cameras
        callbacks = super().get_training_callbacks(training_callback_attributes)
        callbacks.append(TrainingCallback([TrainingCallbackLocation.BEFORE_TRAIN_ITERATION], self.prune_if_due))
        return callbacks

    def prune_if_due(self, step: int) -> None:
        schedule = self.schedule
        if schedule.due(step) is None:
            return
        n_before = self.num_points
        schedule.check_feasible(n_before)  # before any scoring, so the model and its checkpoints stay as they are
        k = schedule.rounds_done
        CONSOLE.print(f"[bold]pup-gs round {k + 1}/{schedule.n_rounds}[/bold] at step {step}: "
                      f"scoring {n_before} Gaussians ({self.config.score})")
        started = time.perf_counter()
        scores = self.score()
        seconds = time.perf_counter() - started
        CONSOLE.print(f"pup-gs: scored {n_before} Gaussians in {seconds:.2f} s")
        prune = schedule.prune_mask(scores)
        remove_gaussians(self.gauss_params, self.optimizers, self.strategy_state, prune,
                         min_remaining=self.config.schedule.min_gaussians)
        reset_optimizer_state(self.optimizers, GAUSSIAN_PARAMS)
        self.sensitivity = scores[~prune.to(scores.device)].to(self.sensitivity)
        schedule.round_done(schedule.round_record(step, self.config.score, n_before, self.num_points, seconds))
        unseen = int((~torch.isfinite(scores)).sum())
        CONSOLE.print(f"pup-gs: removed {int(prune.sum())}, {self.num_points} Gaussians remain "
                      f"({unseen} never seen by a training view)")
        finite = scores[torch.isfinite(scores)]
        scalars = {"scoring_seconds": seconds, "num_gaussians": self.num_points, "round": schedule.rounds_done,
                   "unseen_gaussians": unseen}
        if finite.numel():
            scalars.update(score_mean=float(finite.mean()), score_min=float(finite.min()), score_max=float(finite.max()))
        for name, value in scalars.items():
            writer.put_scalar(f"pup/{name}", value, step)

    def target_before_training(self, first_step: int) -> Optional[Tuple[int, int]]:
        """(Gaussians the target asks for, Gaussians it is taken from) where both are known before training (the
        trainer refuses what cannot be reached): once the rounds have started (post-hoc pruning starts them at the
        first step), densification is off and the count is the loaded model's."""
        config, schedule = self.config.schedule, self.schedule
        if not config.has_target() or not schedule.pruning_started(first_step) or schedule.finished:
            return None
        return schedule.remaining_after_all_rounds(self.num_points), self.num_points

    def score(self) -> torch.Tensor:
        """Scores of the current Gaussians on every training view (higher = keep)."""
        if self._score_cameras is None:
            raise RuntimeError("pup-gs scores on the training cameras; they are attached by the training callbacks")
        views = views_from_cameras(self._score_cameras, self.device, self.background_color.to(self.device))
        return score_gaussians(
            self.config.score, self.gaussians(sh_degree=self.config.sh_degree), views,
            downscale=self.config.scoring_downscale(views.width, views.height), n_probes=self.config.n_probes, seed=self.config.score_seed,
        )

    def pruning_report(self) -> Dict[str, Any]:
        """What the run has pruned so far, as the trainer writes it to `pruning.json` in the run's folder."""
        # target_gaussians: the size asked for, once the first round has fixed the plan (only a target makes one).
        target = self.schedule.plan[-1] if self.schedule.plan else None
        return {"method": "pup-gs", "rounds": [dict(record) for record in self.schedule.rounds],
                "target_gaussians": target, "final_gaussians": int(self.num_points)}

    def first_step_from_trained_gaussians(self) -> int:
        # A PLY trained elsewhere enters where a splatfacto run would: at the first pruning round.
        return int(self.config.schedule.prune_start_step)

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def update_to_step(self, step: int) -> None:
        self._loaded_step = step

    def get_extra_state(self) -> Dict[str, Any]:
        return {**super().get_extra_state(), "pup": self.schedule.state_dict()}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        super().set_extra_state(state)
        if state.get("pup") is not None:
            self.schedule.load_state_dict(state["pup"])
            return
        # Another method's checkpoint (post-hoc pruning): the rounds start right after it.
        if self._loaded_step is not None:
            self.schedule.start_after(self._loaded_step)
        CONSOLE.print("pup-gs: loaded a checkpoint without pruning state; pruning rounds start at step "
                      f"{self.schedule.first_round_step}")

    def with_method_state(self, state: Dict[str, Any]) -> Dict[str, Any]:
        extra = state.get("_extra_state") or {}
        if "sensitivity" not in state:
            state = {**state, "sensitivity": torch.zeros(0, dtype=torch.float64)}
        if "pup" not in extra:
            state = {**state, "_extra_state": {**extra, "pup": None}}
        # A buffer of the checkpoint's length, so that loading does not refuse a size mismatch.
        self.sensitivity = torch.zeros_like(state["sensitivity"])
        return state

    # -- viewer --------------------------------------------------------------------------------------------------
    def get_outputs(self, camera: Cameras) -> Dict:
        outputs = super().get_outputs(camera)
        # Scores exist once a round has run; Gaussians are never added after it.
        if not self.training and self.sensitivity.numel() == self.num_points:
            add_output_if_shown(outputs, "sensitivity", self.viewer_outputs,
                                lambda: self.render_value_image(camera, self.sensitivity_percentile()))
        return outputs

    def sensitivity_percentile(self) -> torch.Tensor:
        """[N] rank of each Gaussian's last-round score among the current Gaussians, in [0, 1]: 0 is the lowest
        score (a further round would prune it first), 1 the highest."""
        ranks = torch.argsort(torch.argsort(self.sensitivity))
        return ranks.float() / max(self.num_points - 1, 1)
