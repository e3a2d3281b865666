"""The step counts of one comparison: the methods' own defaults (the papers' schedules), scaled together.

Nothing here is a copy of a method's setting: the full-schedule numbers are read from the configs `ns-train` uses
(splatfacto-portable's trainer config, `PupScheduleConfig`, `VedalConfig`), so a changed default changes the
comparison with it. What is this module's own is how they shrink: one scale for all of them, and the floors below.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from nerfstudio_pruning.compare.config import CompareConfig

# splatfacto's step-valued fields and their floors when scaled. Densifying every few steps compounds splits before
# the new Gaussians have moved (hundreds of thousands within a hundred steps), so the interval keeps a floor.
SPLATFACTO_STEP_FLOORS = {
    "warmup_length": 50,
    "refine_every": 25,
    "resolution_schedule": 1,
    "stop_split_at": 1,
    "sh_degree_interval": 1,
    "stop_screen_size_at": 1,
}
# A refresh every few steps would spend the run measuring importance; the gate counts refreshes, not steps.
IMPORTANCE_EVERY_FLOOR = 10
FINETUNE_START_FLOOR = 1
TRAINING_STEPS_FLOOR = 10


def flag(field_name: str) -> str:
    """The ns-train flag of a model config field."""
    return "pipeline.model." + field_name.replace("_", "-")


@dataclass(frozen=True)
class FullSchedule:
    """The methods' default step counts, as `ns-train` runs them."""

    training_steps: int
    """splatfacto-portable's run length (the '30k'); pup-gs prunes the model it ends with."""
    means_lr_steps: int
    """Length of the means' learning-rate decay in that run."""
    splatfacto_steps: Dict[str, int]
    """splatfacto's step-valued model fields (SPLATFACTO_STEP_FLOORS's keys)."""
    pup_refine_steps: Tuple[int, ...]
    """pup-gs's refinement after each pruning round."""
    vedal_steps: int
    """vedal-gs's run length: its hard removal is after the last step."""
    vedal_finetune_start: int
    """vedal-gs's fine-tuning start, where it stops densification (the '7k')."""
    vedal_importance_every: int
    eligible_cap: float
    """vedal-gs's gate cap (max_eligible_fraction): the most it may remove."""


@functools.lru_cache(maxsize=None)
def full_schedule() -> FullSchedule:
    from nerfstudio_pruning.methods.registry import splatfacto_portable
    from nerfstudio_pruning.pup.schedule import PupScheduleConfig
    from nerfstudio_pruning.vedal.controller import VedalConfig

    trainer = splatfacto_portable.config
    model = trainer.pipeline.model
    pup, vedal = PupScheduleConfig(), VedalConfig()
    return FullSchedule(
        training_steps=trainer.max_num_iterations,
        means_lr_steps=trainer.optimizers["means"]["scheduler"].max_steps,
        splatfacto_steps={name: getattr(model, name) for name in SPLATFACTO_STEP_FLOORS},
        pup_refine_steps=tuple(pup.refine_steps),
        vedal_steps=vedal.hard_prune_step + 1,
        vedal_finetune_start=vedal.finetune_start_step,
        vedal_importance_every=vedal.importance_every,
        eligible_cap=vedal.gate.max_eligible_fraction,
    )


def scaled(steps: int, scale: float, minimum: int = 1) -> int:
    return max(minimum, int(round(steps * scale)))


@dataclass
class Schedule:
    """Step counts of one comparison, all scaled together."""

    scale: float
    steps_30k: int
    refine: Tuple[int, ...]
    densify_stop: int
    vedal_steps: int
    importance_every: int
    refine_scale: float
    """The scale of pup-gs's refinement (and so of the 40k row's extra steps); `scale` unless set apart."""

    @classmethod
    def of(cls, scale: float, refine_scale: Optional[float] = None) -> "Schedule":
        full = full_schedule()
        refine_scale = scale if refine_scale is None else refine_scale
        return cls(scale, scaled(full.training_steps, scale, minimum=TRAINING_STEPS_FLOOR),
                   tuple(scaled(s, refine_scale) for s in full.pup_refine_steps),
                   scaled(full.vedal_finetune_start, scale, minimum=FINETUNE_START_FLOOR),
                   scaled(full.vedal_steps, scale, minimum=TRAINING_STEPS_FLOOR),
                   scaled(full.vedal_importance_every, scale, minimum=IMPORTANCE_EVERY_FLOOR), refine_scale)

    @property
    def steps_40k(self) -> int:
        return self.steps_30k + sum(self.refine)

    def vedal_args(self) -> List[str]:
        return [f"--{flag('finetune_start_step')}", str(self.densify_stop),
                f"--{flag('importance_every')}", str(self.importance_every),
                f"--{flag('hard_prune_step')}", str(self.vedal_steps - 1)]


def common_train_args(cfg: CompareConfig, name: str, max_steps: int, output_dir: Path, seed: int,
                      overrides: Optional[Dict[str, str]] = None, steps_per_save: Optional[int] = None) -> List[str]:
    s = cfg.scale()
    full = full_schedule()
    args = [
        "--vis", "tensorboard", "--output-dir", str(output_dir / "runs"), "--experiment-name", cfg.experiment_name,
        "--timestamp", name, "--machine.seed", str(seed), "--machine.device-type", cfg.device,
        # nerfstudio draws the order of the training views from a seed of the datamanager's own (default 42).
        "--pipeline.datamanager.train-cameras-sampling-seed", str(seed),
        "--max-num-iterations", str(max_steps), "--steps-per-save", str(max(steps_per_save or max_steps, 1)),
        "--steps-per-eval-image", "1000000000", "--steps-per-eval-all-images", "1000000000",
        "--optimizers.means.scheduler.max-steps", str(scaled(full.means_lr_steps, s)),
    ]
    fields = {flag(name): str(scaled(steps, s, minimum=SPLATFACTO_STEP_FLOORS[name]))
              for name, steps in full.splatfacto_steps.items()}
    fields.update(overrides or {})
    for key, value in fields.items():
        args += [f"--{key}", value]
    return args
