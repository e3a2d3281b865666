"""`PruningTrainer`: nerfstudio's trainer with the plugin's input checks, PLY start and pruning report.

- Before anything is loaded, trained or overwritten it runs the input checks of `checks.py`, each reported as one
  line (`InputError`, exit status 1). An `InputError` raised during training (a pruning schedule the model cannot
  satisfy, NaN scores) first saves a checkpoint of the model as it was, so no training is lost.
- `--pipeline.model.init-ply` starts the run from a PLY trained elsewhere (`init_ply.py`), at the first step of the
  phase that takes a trained model.
- After every checkpoint, and when training ends, it writes the model's `pruning_report()` (pup-gs's rounds,
  vedal-gs's importance time, gate and removal) to `pruning.json` in the run's folder, beside config.yml, for
  `ns-prune-compare`.
- nerfstudio's terminal progress counts the steps of this run (`progress.py`).

The methods' trainer configurations are built in `registry.py`, their optimizers in `optimizers.py`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Type

import yaml
from nerfstudio.engine.trainer import Trainer, TrainerConfig
from nerfstudio.utils import comms
from nerfstudio.utils.rich_utils import CONSOLE

from nerfstudio_pruning.data.dataparser import DefaultSceneDataParserConfig
from nerfstudio_pruning.errors import InputError
from nerfstudio_pruning.methods.checkpoints import numpy_scalars_allowed
from nerfstudio_pruning.methods.checks import (
    check_data_path,
    check_init_ply,
    check_model_to_train_from_scratch,
    check_same_scene,
    check_target,
    check_training_views,
    checkpoint_to_load,
    reported_in_one_line,
)
from nerfstudio_pruning.methods.init_ply import PLY_CHECK_VIEWS, gaussians_from_ply
from nerfstudio_pruning.methods.optimizers import advance_schedulers
# config.yml files written before the optimizers had their own module name the Adam config here.
from nerfstudio_pruning.methods.optimizers import PortableAdamOptimizerConfig  # noqa: F401
from nerfstudio_pruning.methods.pipeline import reseed_random_generators
from nerfstudio_pruning.methods.progress import show_progress_of_this_run

PRUNING_REPORT = "pruning.json"


@dataclass
class PruningTrainerConfig(TrainerConfig):
    """nerfstudio's trainer, able to resume from (and post-hoc prune) checkpoints written by stock splatfacto."""

    _target: Type = field(default_factory=lambda: PruningTrainer)

    def save_config(self) -> None:
        # Nothing is written for a run whose PLY would be refused: ns-train saves config.yml before the trainer is
        # set up, so the file is checked here, the first thing ns-train does with the config.
        with reported_in_one_line():
            check_init_ply(self)
        # ns-eval, ns-export and ns-viewer read config.yml and look for load_step in this run's own checkpoint
        # folder, which never holds the step the run was resumed from: every save leaves it out, so no order of
        # saves (nerfstudio's before setup, any later one) can leave a config naming a checkpoint that is not there.
        load_step, self.load_step = self.load_step, None
        try:
            super().save_config()
        finally:
            self.load_step = load_step


class PruningTrainer(Trainer):
    def setup(self, test_mode="val") -> None:
        with reported_in_one_line(on_error=self._stop_viewer):
            datamanager = self.config.pipeline.datamanager
            check_data_path(self._data_path(), isinstance(datamanager.dataparser, DefaultSceneDataParserConfig))
            super().setup(test_mode=test_mode)
        show_progress_of_this_run(self._start_step, self.config.max_num_iterations)

    def train(self) -> None:
        with reported_in_one_line(on_error=self._save_before_exit):
            super().train()
        self.write_pruning_report()

    def save_checkpoint(self, step: int) -> None:
        super().save_checkpoint(step)
        self.write_pruning_report()

    def write_pruning_report(self) -> Optional[Path]:
        """Write the model's `pruning_report()` to pruning.json in the run's folder; its path, or None for a model
        without one (splatfacto) and on processes other than the main one."""
        report = getattr(self.pipeline.model, "pruning_report", None)
        if report is None or not comms.is_main_process():
            return None
        path = Path(self.base_dir) / PRUNING_REPORT
        path.parent.mkdir(parents=True, exist_ok=True)
        # Replaced in one step, so a reader never sees half a file while a run saves.
        partial = path.with_name(f".{PRUNING_REPORT}.partial")
        partial.write_text(json.dumps(report(), indent=2) + "\n")
        os.replace(partial, path)
        return path

    def _stop_viewer(self) -> None:
        # The viewer's server thread would otherwise keep the process alive after the error.
        if getattr(self, "viewer_state", None) is not None:
            self.shutdown()

    def _save_before_exit(self) -> None:
        # Our refusals are raised by callbacks before the step that hits them changes anything: the model is
        # exactly as the previous step left it.
        step = max(self.step - 1, 0)
        self.save_checkpoint(step)
        CONSOLE.print(f"saved the model as it was after step {step} to {self.checkpoint_dir}", soft_wrap=True)
        self._stop_viewer()

    def _data_path(self) -> Optional[Path]:
        datamanager = self.config.pipeline.datamanager
        return datamanager.data or getattr(datamanager.dataparser, "data", None)

    def _check_target(self) -> None:
        check_target(self.pipeline.model, self._start_step, self.config.method_name)

    def _load_checkpoint(self) -> None:
        # The first point of setup where the training cameras exist; nothing has been loaded yet.
        model_config = self.pipeline.model.config
        check_training_views(self.pipeline.datamanager.train_dataset.cameras,
                             None if model_config.scoring_downscale() is None else model_config.scoring_downscale,
                             self.config.method_name)
        path = checkpoint_to_load(self.config)
        if getattr(model_config, "init_ply", None) is not None:
            check_init_ply(self.config, read=False)
            return self._start_from_ply(model_config.init_ply)
        if path is None:
            check_model_to_train_from_scratch(self.pipeline.model, self._data_path())
            super()._load_checkpoint()
            return self._check_target()
        if not path.exists():
            raise InputError(f"checkpoint {path} does not exist")
        check_same_scene(path, self.pipeline.datamanager.train_dataparser_outputs)
        with numpy_scalars_allowed():
            super()._load_checkpoint()
        self._reseed_if_other_seeds(path)
        self._check_target()
        end = self._start_step + self.config.max_num_iterations - 1
        CONSOLE.print(f"continuing from step {self._start_step - 1}: this run trains steps {self._start_step} to {end} "
                      "(nerfstudio counts --max-num-iterations from the loaded step; the progress percentage and ETA "
                      "count this run's steps)", soft_wrap=True)

    def _start_from_ply(self, ply: Path) -> None:
        """Initialise the Gaussians from a PLY trained elsewhere and start at the first step of the phase that takes
        a trained model (as a run loaded from a splatfacto checkpoint would), learning rates decayed to that step."""
        model = self.pipeline.model
        placed, psnr = gaussians_from_ply(self.pipeline, ply)
        model.set_gaussians(placed)
        self._start_step = model.first_step_from_trained_gaussians()
        advance_schedulers(self.optimizers, self._start_step)
        self._check_target()
        end = self._start_step + self.config.max_num_iterations - 1
        CONSOLE.print(f"initialised {len(placed)} Gaussians (SH degree {placed.sh_degree}) from {ply} ({psnr:.1f} dB "
                      f"PSNR on {PLY_CHECK_VIEWS} training views); this run trains steps {self._start_step} to {end} "
                      "(--max-num-iterations counts from the first step of the phase a trained model enters)",
                      soft_wrap=True)

    def _reseed_if_other_seeds(self, path: Path) -> None:
        """Loading restores the random state the checkpoint's run left (exact resume). A run started from another
        run's checkpoint with other seeds (--machine.seed, --pipeline.datamanager.train-cameras-sampling-seed)
        asks for other randomness from there on, e.g. to repeat pup-gs's refinement of one trained model: it is
        re-seeded as a fresh run with its seeds would be. The checkpoint's run records its seeds in config.yml."""
        recorded = path.parent.parent / "config.yml"
        try:
            theirs = yaml.load(recorded.read_text(), Loader=yaml.Loader)
            their_seeds = (int(theirs.machine.seed), int(theirs.pipeline.datamanager.train_cameras_sampling_seed))
        except Exception:  # no or unreadable config.yml (e.g. a copied checkpoint): keep the checkpoint's state
            return
        ours = (int(self.config.machine.seed), int(self.config.pipeline.datamanager.train_cameras_sampling_seed))
        if ours != their_seeds:
            reseed_random_generators(*ours, self.pipeline.datamanager)
            CONSOLE.print(f"{path.name} comes from a run with seeds {their_seeds} (--machine.seed, camera order); "
                          f"this run continues with its own, {ours}", soft_wrap=True)
