"""The options of `ns-prune-compare` (tyro turns `CompareConfig` into its flags) and the error it refuses input with."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Tuple

import torch

METHODS = ("splatfacto-portable", "pup-gs", "vedal-gs")
# --schedule-scale's default where there is no GPU: the papers' schedules take hours on a CPU.
CPU_SCHEDULE_SCALE = 1.0 / 30.0


class CompareError(Exception):
    """Input ns-prune-compare refuses before it trains or writes anything; printed as one `error:` line."""


@dataclass
class CompareConfig:
    """Train or load splatfacto, pup-gs and vedal-gs on one dataset and compare them at equal budgets."""

    scene: str = "default"
    """'default' for the built-in scene, or a dataset folder (nerfstudio-data, colmap or blender-data)."""
    dataparser: Literal["auto", "nerfstudio-data", "colmap", "blender-data"] = "auto"
    """How to read --scene: auto picks nerfstudio-data for transforms.json, colmap for sparse/0 or colmap/sparse/0, blender-data for transforms_train.json. Datasets without seed points train from random initialisation."""
    downscale_factor: Optional[int] = None
    """Image downscale for a dataset folder (downscaled copies are cached, the data is never written)."""
    output_dir: Path = Path("outputs/compare")
    """Where runs, logs, results.json/.md and compare.png go."""
    schedule_scale: Optional[float] = None
    """Multiply every step count by this (default: 1 on a GPU, 1/30 on a CPU)."""
    refine_scale: Optional[float] = None
    """Multiply pup-gs's refinement steps (and so the 40k row's steps beyond the 30k) by this instead of the schedule scale. Refinement refills what a round removed at learning rates that do not shrink with the schedule, so it needs steps more than a share of them (docs/compare.md)."""
    methods: Tuple[str, ...] = METHODS
    """Methods to compare. pup-gs brings its baselines splatfacto (30k) and (40k), vedal-gs brings splatfacto (densify to 7k); splatfacto-portable alone gives the 30k and 40k rows."""
    runs: Tuple[str, ...] = ()
    """Existing runs to use instead of training, as KEY=path/to/config.yml, or KEY/sSEED=... with several seeds. KEY: splatfacto-portable (a 40k run that kept its 30k checkpoint, or a 30k run, which is then continued to 40k), pup-gs, vedal-gs, splatfacto-densify, and the variants' row labels (pup-gs-speedy with --pup-scores speedy, vedal-gs-kl2 with --kl-weights 2, vedal-gs-cap0.95 with --eligible-caps 0.95, vedal-gs-no-gate with --gate-ablation, pup-gs-t0.2 and vedal-gs-t0.2 with --target-fractions 0.2)."""
    kl_weights: Tuple[float, ...] = ()
    """Extra vedal-gs runs, one per KL weight, drawn as a rate-distortion curve."""
    eligible_caps: Tuple[float, ...] = ()
    """Extra vedal-gs runs at the default KL weight, one per gate cap (--pipeline.model.gate.max-eligible-fraction instead of its default). Only gated Gaussians can be removed, so a cap C allows at most 1/(1 - C) x fewer; at the default weight on our scenes the cap, not the weight, sets the size (docs/results.md)."""
    target_fractions: Tuple[float, ...] = ()
    """Extra pup-gs and vedal-gs runs (of the methods asked for), one per fraction of Gaussians to keep (--pipeline.model.target-fraction), drawn as one rate-distortion curve per method; the table gives the size asked for beside the size obtained. pup-gs's fraction is of the model it prunes, vedal-gs's of the Gaussians at its fine-tuning start."""
    pup_target_fraction: Optional[float] = None
    """The fraction of the model that every pup-gs row keeps (--pipeline.model.target-fraction; two rounds of the paper's shape). Default: the paper's 80% + 50%, i.e. 0.1. Without pup-gs in --methods it does nothing. The README's demo asks for 0.5 on a CPU: at 1/30 of the schedule 167 + 167 refinement steps cannot refill a 90% cut (docs/compare.md)."""
    gate_ablation: bool = False
    """Also run vedal-gs with the gate disabled (synchronous variational pruning, the paper's ablation)."""
    pup_scores: Tuple[str, ...] = ("fisher",)
    """pup-gs runs, one per score (fisher, fisher-probe, lightgaussian, opacity, random), same rounds."""
    seeds: Tuple[int, ...] = (42,)
    """Every run is repeated with each seed; the table shows mean ± half the range over seeds."""
    seed: Optional[int] = None
    """One seed (the same as --seeds SEED; kept for older command lines)."""
    train: bool = True
    """--no-train: train nothing; evaluate only the runs given by --runs and leave out the rows that would need training (said in the notes). For runs finished in different sessions: such tables combine later with --merge."""
    merge: Tuple[Path, ...] = ()
    """results.json files of earlier comparisons (e.g. one per seed, made on different machines) to combine into one table, json and plot in --output-dir; nothing is trained or evaluated, and the other options are ignored."""
    parallel_runs: Optional[int] = None
    """How many ns-train runs train at once, the CPU cores shared out between them (default: one on a GPU; on a CPU two when it has two cores or more: a step costs about as much on one thread as on two, docs/compare.md). Runs that start from another run's checkpoint wait for it."""
    eval_warmup: int = 1
    """Renders per eval view discarded before timing."""
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")
    """Device for training and evaluation."""
    experiment_name: str = "compare"

    def parallel(self) -> int:
        if self.parallel_runs is not None:
            if self.parallel_runs < 1:
                raise CompareError(f"--parallel-runs must be at least 1, got {self.parallel_runs}")
            return self.parallel_runs
        return 1 if self.device != "cpu" else min(2, os.cpu_count() or 1)

    def scale(self) -> float:
        if self.schedule_scale is not None:
            if not 0 < self.schedule_scale <= 1:
                raise CompareError(f"--schedule-scale must be in (0, 1], got {self.schedule_scale}")
            return self.schedule_scale
        return 1.0 if self.device == "cuda" else CPU_SCHEDULE_SCALE

    def refinement_scale(self) -> float:
        if self.refine_scale is not None:
            if not 0 < self.refine_scale <= 1:
                raise CompareError(f"--refine-scale must be in (0, 1], got {self.refine_scale}")
            return self.refine_scale
        return self.scale()

    def seed_list(self) -> Tuple[int, ...]:
        if self.seed is not None:
            if self.seeds not in ((42,), (self.seed,)):
                raise CompareError("give either --seed or --seeds, not both")
            return (self.seed,)
        if not self.seeds:
            raise CompareError("--seeds needs at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise CompareError(f"--seeds repeats a seed: {' '.join(map(str, self.seeds))}")
        return tuple(self.seeds)
