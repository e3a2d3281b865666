"""Trainer configurations shared by the plugin's methods, and the trainer that checks their input.

Built explicitly rather than by copying `method_configs["splatfacto"]`: importing nerfstudio's method table from
a plugin that nerfstudio itself is importing gives a circular import.

`PruningTrainer` is nerfstudio's trainer plus checks that turn the usual ways a run goes wrong into one clear
line (`InputError`, exit status 1) before anything is loaded, trained or overwritten: a missing data path, no
training images or one without pixels, training images of several sizes for a method that scores Gaussians on
them (pup-gs, vedal-gs; found at the first scoring, thousands of steps in, otherwise), a scoring downscale that
leaves no pixel, a dataset without seed points, a checkpoint that holds no Gaussians, an empty model, or one
trained on another scene; a PLY for `--pipeline.model.init-ply` that is not a usable 3DGS PLY of the configured SH
degree (checked before ns-train writes its config.yml), or one that fits the training images better in the other
world frame; a target size below min-gaussians or not below a loaded model's count. An `InputError` raised during
training (a pruning schedule the model cannot satisfy,
NaN scores) first saves a checkpoint of the model as it was, so no training is lost.

After every checkpoint, and when training ends, it writes the model's `pruning_report()` (pup-gs's rounds, vedal-gs's
importance time, gate and removal) to `pruning.json` in the run's folder, beside config.yml, for `ns-prune-compare`.

It also makes nerfstudio's terminal progress ("step (percent)" and ETA) count the steps of this run: nerfstudio
computes both as if every run started at step 0, so a post-hoc or resumed run showed e.g. "30500 (305.00%)"
and a meaningless ETA.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Type, Union

import numpy as np
import torch
import yaml
from nerfstudio.configs.base_config import MachineConfig, ViewerConfig
from nerfstudio.data.datamanagers.full_images_datamanager import FullImageDatamanagerConfig
from nerfstudio.data.dataparsers.base_dataparser import DataParserConfig
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
from nerfstudio.engine.trainer import Trainer, TrainerConfig
from nerfstudio.models.base_model import ModelConfig
from nerfstudio.utils import comms, writer
from nerfstudio.utils.rich_utils import CONSOLE

from nerfstudio_pruning.data.dataparser import DefaultSceneDataParserConfig
from nerfstudio_pruning.errors import InputError, PruningRefused
from nerfstudio_pruning.gaussians_ply import in_frame, read_gaussians_ply
from nerfstudio_pruning.methods.checkpoints import numpy_scalars_allowed
from nerfstudio_pruning.methods.pipeline import PruningPipelineConfig, reseed_random_generators
from nerfstudio_pruning.pup.schedule import PupScheduleConfig
from nerfstudio_pruning.render import rasterization
from nerfstudio_pruning.vedal.controller import VedalConfig

PRUNING_REPORT = "pruning.json"
# --pipeline.model.init-ply: its Gaussians are rendered on this many training views, at most this many pixels on
# the longer side, in both world frames; a frame better by the margin is the right one; below the low mark a warning.
PLY_CHECK_VIEWS = 4
PLY_CHECK_SIDE = 256
PLY_FRAME_MARGIN_DB = 3.0
PLY_LOW_PSNR_DB = 15.0


@dataclass
class PruningTrainerConfig(TrainerConfig):
    """nerfstudio's trainer, able to resume from (and post-hoc prune) checkpoints written by stock splatfacto."""

    _target: Type = field(default_factory=lambda: PruningTrainer)

    def save_config(self) -> None:
        # Nothing is written for a run whose PLY would be refused: ns-train saves config.yml before the trainer is
        # set up, so the file is checked here, the first thing ns-train does with the config.
        with _reported_in_one_line():
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
        with _reported_in_one_line(on_error=self._stop_viewer):
            self._check_data_path()
            super().setup(test_mode=test_mode)
        show_progress_of_this_run(self._start_step, self.config.max_num_iterations)

    def train(self) -> None:
        with _reported_in_one_line(on_error=self._save_before_exit):
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

    def _check_data_path(self) -> None:
        data = self._data_path()
        generated = isinstance(self.config.pipeline.datamanager.dataparser, DefaultSceneDataParserConfig)
        if data is not None and not Path(data).exists() and not generated:
            raise InputError(f"data path {data} does not exist")

    def _load_checkpoint(self) -> None:
        # The first point of setup where the training cameras exist; nothing has been loaded yet.
        model_config = self.pipeline.model.config
        check_training_views(self.pipeline.datamanager.train_dataset.cameras,
                             None if scoring_downscale(model_config) is None
                             else lambda width, height: scoring_downscale(model_config, width, height),
                             self.config.method_name)
        path = checkpoint_to_load(self.config)
        if getattr(model_config, "init_ply", None) is not None:
            check_init_ply(self.config, read=False)
            return self._start_from_ply(model_config.init_ply)
        if path is None:
            self._check_model_to_train_from_scratch()
            super()._load_checkpoint()
            return self._check_target()
        if not path.exists():
            raise InputError(f"checkpoint {path} does not exist")
        self._check_same_scene(path)
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
        a trained model (as a run loaded from a splatfacto checkpoint would), learning rates decayed to that step.

        The PLY must be in the frame `init_ply_frame` names. Both frames are tried on a few training images: one
        that clearly matches them better than the chosen one is a wrong choice, refused with the flag to pass."""
        model, outputs = self.pipeline.model, self.pipeline.datamanager.train_dataparser_outputs
        gaussians = read_gaussians_ply(ply, sh_degree=model.config.sh_degree)
        transform, scale = outputs.dataparser_transform, float(outputs.dataparser_scale)
        chosen = model.config.init_ply_frame
        frames = {"dataset": gaussians}
        identity = torch.allclose(transform[:3, :4].double().cpu(), torch.eye(4, dtype=torch.float64)[:3]) and scale == 1
        if chosen == "colmap" or not identity:
            frames["colmap"] = in_frame(gaussians, transform, scale)
        psnr = {frame: self._psnr_on_training_views(g) for frame, g in frames.items()}
        best = max(psnr, key=psnr.get)
        if psnr[best] > psnr[chosen] + PLY_FRAME_MARGIN_DB:
            raise InputError(f"{ply} matches the training images at {psnr[chosen]:.1f} dB PSNR in the {chosen} frame and "
                             f"{psnr[best]:.1f} dB in the {best} frame: pass --pipeline.model.init-ply-frame {best}")
        if psnr[chosen] < PLY_LOW_PSNR_DB:
            CONSOLE.print(f"[yellow]{ply} matches the training images at only {psnr[chosen]:.1f} dB PSNR: is it this scene, "
                          "trained with these dataparser options?", soft_wrap=True)
        placed = frames[chosen]
        model.set_gaussians(placed)
        self._start_step = model.first_step_from_trained_gaussians()
        advance_schedulers(self.optimizers, self._start_step)
        self._check_target()
        end = self._start_step + self.config.max_num_iterations - 1
        CONSOLE.print(f"initialised {len(placed)} Gaussians (SH degree {placed.sh_degree}) from {ply} ({psnr[chosen]:.1f} dB "
                      f"PSNR on {PLY_CHECK_VIEWS} training views); this run trains steps {self._start_step} to {end} "
                      "(--max-num-iterations counts from the first step of the phase a trained model enters)",
                      soft_wrap=True)

    @torch.no_grad()
    def _psnr_on_training_views(self, gaussians) -> float:
        """PSNR of `gaussians` against a few training images spread over the dataset, composited on black, at most
        PLY_CHECK_SIDE pixels on the longer side."""
        from nerfstudio.models.splatfacto import get_viewmat, resize_image

        datamanager = self.pipeline.datamanager
        images, cameras = datamanager.cached_train, datamanager.train_dataset.cameras
        device = self.pipeline.model.device
        g = gaussians
        picks = sorted({int(i) for i in np.linspace(0, len(cameras) - 1, min(PLY_CHECK_VIEWS, len(cameras))).round()})
        errors = []
        for i in picks:
            camera = copy.deepcopy(cameras[i:i + 1])
            factor = max(1, math.ceil(max(int(camera.width), int(camera.height)) / PLY_CHECK_SIDE))
            camera.rescale_output_resolution(1.0 / factor)
            image = images[i]["image"]
            image = (image.float() / 255.0 if image.dtype == torch.uint8 else image.float()).to(device)
            if image.shape[-1] == 4:
                image = image[..., :3] * image[..., 3:]
            image = resize_image(image, factor) if factor > 1 else image
            rendered, _, _ = rasterization(
                means=g.means.to(device), quats=g.quats.to(device), scales=g.scales.to(device),
                opacities=g.opacities.to(device), colors=g.sh.to(device), sh_degree=g.sh_degree,
                viewmats=get_viewmat(camera.camera_to_worlds).to(device), Ks=camera.get_intrinsics_matrices().to(device),
                width=int(camera.width), height=int(camera.height))
            rendered = rendered[0].clamp(0, 1)
            if rendered.shape != image.shape:
                raise RuntimeError(f"rendered {tuple(rendered.shape)}, image {tuple(image.shape)}")
            errors.append(float(((rendered - image) ** 2).mean()))
        return -10.0 * math.log10(max(sum(errors) / len(errors), 1e-10))

    def _check_target(self) -> None:
        """A target size (pup-gs, vedal-gs) below min-gaussians, or not below the Gaussians it would be taken
        from where the model knows that count before training (`target_before_training`)."""
        model = self.pipeline.model
        config = model.config
        minimum = getattr(config, "min_gaussians", 0)
        if getattr(config, "target_gaussians", None) is not None and config.target_gaussians < minimum:
            raise InputError(f"--pipeline.model.target-gaussians {config.target_gaussians} is below "
                             f"--pipeline.model.min-gaussians {minimum}")
        known = getattr(model, "target_before_training", lambda step: None)(self._start_step)
        if known is None:
            return
        wanted, present = known
        if wanted >= present:
            raise InputError(f"the target of {wanted} Gaussians is not below the {present} that {self.config.method_name} "
                             "would prune from; it would remove nothing")
        if wanted < minimum:
            raise InputError(f"the target of {wanted} Gaussians (of {present}) is below --pipeline.model.min-gaussians "
                             f"{minimum}")

    def _check_model_to_train_from_scratch(self) -> None:
        model = self.pipeline.model
        seeds = getattr(model, "seed_points", None)
        if not getattr(model.config, "random_init", True) and (seeds is None or seeds[0].shape[0] == 0):
            raise InputError(
                f"the dataset at {self._data_path()} has no seed points (no point cloud, or load_3D_points is off), so splatfacto "
                "would start from random Gaussians; pass --pipeline.model.random-init True to do that on purpose"
            )
        if model.num_points == 0:
            raise InputError("the model has no Gaussians to train")

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

    def _check_same_scene(self, path: Path) -> None:
        """Gaussians live in the frame the dataparser normalised the poses into: a checkpoint made with another
        transform or scale (another scene, or the same capture with other dataparser options) would not line up
        with these images. The checkpoint's run folder records its frame in dataparser_transforms.json."""
        recorded = path.parent.parent / "dataparser_transforms.json"
        if not recorded.exists():
            CONSOLE.print(f"[yellow]cannot check that {path.name} belongs to this scene: no {recorded.name} beside "
                          "its run folder", soft_wrap=True)
            return
        theirs = json.loads(recorded.read_text())
        outputs = self.pipeline.datamanager.train_dataparser_outputs
        ours_transform = outputs.dataparser_transform.detach().cpu().numpy()
        their_transform = np.asarray(theirs["transform"], dtype=np.float64)
        their_scale, our_scale = float(theirs["scale"]), float(outputs.dataparser_scale)
        same = (their_transform.shape == ours_transform.shape and np.allclose(their_transform, ours_transform, atol=1e-4)
                and abs(their_scale - our_scale) <= 1e-4 * max(abs(our_scale), 1e-12))
        if not same:
            raise InputError(
                f"{path} was trained on another scene or with other dataparser settings: its poses were normalised with "
                f"scale {their_scale:.6g}, this data's with {our_scale:.6g} (transforms differ too: "
                f"{not np.allclose(their_transform, ours_transform, atol=1e-4)}); its Gaussians would not line up "
                "with these images"
            )


def scoring_downscale(model_config, width: int = 0, height: int = 0) -> Optional[float]:
    """The downscale at which the method scores Gaussians on training views of this size (pup-gs: fisher_downscale
    down to its floor, or as configured when no size is given; vedal-gs: importance_downscale), or None when it
    scores nothing (splatfacto; VEDAL's ungated ablation with kl_weight in 'loss' units)."""
    if isinstance(model_config, PupScheduleConfig):
        if width and height and hasattr(model_config, "score_downscale"):
            return model_config.score_downscale(width, height)
        return int(getattr(model_config, "fisher_downscale", 1))
    if isinstance(model_config, VedalConfig) and model_config.measures_importance():
        return int(model_config.importance_downscale)
    return None


def check_training_views(cameras, scoring_downscale: Union[None, float, Callable[[int, int], Optional[float]]],
                         method: str) -> None:
    """InputError unless there are training views, each with pixels, and, for a method that scores Gaussians on
    them (`scoring_downscale` not None), they share one size that keeps a pixel at 1/scoring_downscale.

    The scores render all training views as one batch of one image size (`Views`); without this check a scene
    of mixed sizes would train for thousands of steps and then fail at the first scoring.
    """
    widths = [int(w) for w in cameras.width.reshape(-1).tolist()]
    heights = [int(h) for h in cameras.height.reshape(-1).tolist()]
    if not widths:
        raise InputError("the dataset has no training images")
    empty = [i for i, (w, h) in enumerate(zip(widths, heights)) if w < 1 or h < 1]
    if empty:
        raise InputError(f"{len(empty)} training image(s) have no pixels (the first, #{empty[0]}, is "
                         f"{widths[empty[0]]}x{heights[empty[0]]}); remove them from the dataset")
    if scoring_downscale is None:
        return
    sizes = Counter(zip(widths, heights))
    if len(sizes) > 1:
        listed = ", ".join(f"{w}x{h} ({n} images)" for (w, h), n in sizes.most_common(4))
        raise InputError(f"{method} scores Gaussians on all training views at one image size, but this dataset mixes "
                         f"{len(sizes)} sizes: {listed}{', ...' if len(sizes) > 4 else ''}; resize the images to one size")
    (width, height), = sizes
    if callable(scoring_downscale):
        scoring_downscale = scoring_downscale(width, height)
    if int(width / scoring_downscale) < 1 or int(height / scoring_downscale) < 1:
        raise InputError(f"{method} scores at 1/{scoring_downscale} of the {width}x{height} training images, which "
                         "leaves no pixel; choose a smaller scoring downscale")


def show_progress_of_this_run(first_step: int, steps: int) -> None:
    """Make nerfstudio's terminal progress count the steps of this run, first_step .. first_step + steps - 1.

    nerfstudio prints "step (step / max_iter %)" and an ETA of (max_iter - step) x the mean step time, with
    max_iter = --max-num-iterations, i.e. as if every run started at step 0. The ETA becomes right with max_iter
    set to the run's end; the percentage of the printed line is computed from a max_iter that makes
    step / max_iter equal this run's fraction, (step - first_step) / steps, set for that one line only. A run
    from step 0 prints exactly what nerfstudio prints.
    """
    buffer = writer.GLOBAL_BUFFER
    if "max_iter" not in buffer:  # no local writer was set up (not the main process)
        return
    buffer["max_iter"] = first_step + steps
    for local_writer in writer.EVENT_WRITERS:
        if isinstance(local_writer, writer.LocalWriter):
            _print_this_runs_fraction(local_writer, first_step, steps)


def _print_this_runs_fraction(local_writer, first_step: int, steps: int) -> None:
    nerfstudio_print_stats = getattr(local_writer, "_nsp_nerfstudio_print_stats", local_writer._print_stats)

    def print_stats(latest_map, padding=" "):
        buffer = writer.GLOBAL_BUFFER
        step, end = buffer["step"], buffer["max_iter"]
        done = step - first_step
        buffer["max_iter"] = step * steps / done if done > 0 else math.inf  # step / max_iter = done / steps
        try:
            nerfstudio_print_stats(latest_map, padding)
        finally:
            buffer["max_iter"] = end

    local_writer._nsp_nerfstudio_print_stats = nerfstudio_print_stats
    local_writer._print_stats = print_stats


def check_init_ply(config: TrainerConfig, read: bool = True) -> None:
    """InputError unless no checkpoint is asked for besides the model's init_ply (if any), and (`read`) the file is a
    usable 3DGS PLY of the configured SH degree. Reading checks every value: NaNs anywhere are refused."""
    model_config = config.pipeline.model
    ply = getattr(model_config, "init_ply", None)
    if ply is None:
        return
    if config.load_dir is not None or config.load_checkpoint is not None:
        raise InputError("--pipeline.model.init-ply and a checkpoint (--load-dir or --load-checkpoint) both give the "
                         "Gaussians to start from; pass one of them")
    if read:
        read_gaussians_ply(ply, sh_degree=model_config.sh_degree)


def advance_schedulers(optimizers, step: int) -> None:
    """Set every learning-rate schedule to `step`, as after `step` training steps (a run starting mid-schedule)."""
    for scheduler in optimizers.schedulers.values():
        scheduler.last_epoch = step - 1
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": no step was skipped here
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step()


def checkpoint_to_load(config: TrainerConfig) -> Optional[Path]:
    """The checkpoint file `--load-dir`/`--load-step` or `--load-checkpoint` point at (as nerfstudio resolves them)."""
    if config.load_dir is not None:
        load_dir = Path(config.load_dir)
        if not load_dir.is_dir():
            raise InputError(f"--load-dir {load_dir} is not a folder")
        step = config.load_step
        if step is None:
            steps = sorted(int(name[name.find("-") + 1:name.find(".")]) for name in os.listdir(load_dir)
                           if name.startswith("step-") and name.endswith(".ckpt"))
            if not steps:
                raise InputError(f"--load-dir {load_dir} holds no step-*.ckpt checkpoints")
            step = steps[-1]
        return load_dir / f"step-{step:09d}.ckpt"
    if config.load_checkpoint is not None:
        return Path(config.load_checkpoint)
    return None


@contextlib.contextmanager
def _reported_in_one_line(on_error=None) -> Iterator[None]:
    try:
        yield
    except (InputError, PruningRefused) as err:
        if on_error is not None:
            on_error()
        CONSOLE.print(f"[bold red]error:[/bold red] {err}", soft_wrap=True)
        raise SystemExit(1) from None


def default_device_type() -> str:
    """The device `ns-train` uses unless told otherwise: CUDA where there is one, else the CPU path."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class PortableAdamOptimizerConfig(AdamOptimizerConfig):
    """splatfacto's Adam, run by torch's fused kernel when the parameters are on the CPU.

    torch's default CPU Adam makes about ten passes over every parameter tensor per step; the fused kernel makes
    one, ~10x faster at splatfacto's sizes (188k Gaussians: 67 ms against 6 ms per step on one core), which is
    a large share of a CPU training step. The update is the same up to float rounding. On CUDA nothing changes.
    """

    def setup(self, params) -> torch.optim.Optimizer:
        params = list(params)
        kwargs = vars(self).copy()
        kwargs.pop("_target")
        kwargs.pop("max_norm")
        if params and all(p.device.type == "cpu" and p.is_floating_point() for p in params):
            return FusedOnCpuAdam(params, fused=True, **kwargs)
        return self._target(params, **kwargs)


class FusedOnCpuAdam(torch.optim.Adam):
    """torch's Adam that stays fused when a checkpoint is loaded.

    `load_state_dict` copies every hyperparameter of the saved groups, `fused` included, so a checkpoint written
    by the unfused optimizer (stock splatfacto, or this plugin before it fused) would switch the kernel off for
    the rest of the run. The flag only chooses the kernel, never the update, so keeping ours is safe.
    """

    def load_state_dict(self, state_dict) -> None:
        fused = [group.get("fused") for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, flag in zip(self.param_groups, fused):
            group["fused"] = flag


def splatfacto_optimizers(max_steps: int) -> dict:
    """splatfacto 1.1.5's optimizer table, with the schedules stretched over `max_steps`.

    A copy, because the original lives in nerfstudio's method table (`nerfstudio.configs.method_configs`), whose
    import discovers the plugins, i.e. imports this module: reading it from here is a circular import.
    `tests/test_plugin_hygiene.py` checks that the copy still equals splatfacto's.
    """

    def adam(lr: float) -> AdamOptimizerConfig:
        return PortableAdamOptimizerConfig(lr=lr, eps=1e-15)

    return {
        "means": {"optimizer": adam(1.6e-4), "scheduler": ExponentialDecaySchedulerConfig(lr_final=1.6e-6, max_steps=max_steps)},
        "features_dc": {"optimizer": adam(0.0025), "scheduler": None},
        "features_rest": {"optimizer": adam(0.0025 / 20), "scheduler": None},
        "opacities": {"optimizer": adam(0.05), "scheduler": None},
        "scales": {"optimizer": adam(0.005), "scheduler": None},
        "quats": {"optimizer": adam(0.001), "scheduler": None},
        "camera_opt": {
            "optimizer": adam(1e-4),
            "scheduler": ExponentialDecaySchedulerConfig(lr_final=5e-7, max_steps=max_steps, warmup_steps=1000, lr_pre_warmup=0),
        },
        "bilateral_grid": {
            "optimizer": adam(2e-3),
            "scheduler": ExponentialDecaySchedulerConfig(lr_final=1e-4, max_steps=max_steps, warmup_steps=1000, lr_pre_warmup=0),
        },
    }


def splatfacto_trainer_config(
    method_name: str,
    model: ModelConfig,
    max_steps: int = 30000,
    dataparser: Optional[DataParserConfig] = None,
    extra_optimizers: Optional[dict] = None,
) -> PruningTrainerConfig:
    optimizers = splatfacto_optimizers(max_steps)
    optimizers.update(extra_optimizers or {})
    return PruningTrainerConfig(
        method_name=method_name,
        steps_per_eval_image=100,
        steps_per_eval_batch=0,
        steps_per_save=2000,
        steps_per_eval_all_images=1000,
        max_num_iterations=max_steps,
        mixed_precision=False,
        machine=MachineConfig(device_type=default_device_type()),
        pipeline=PruningPipelineConfig(
            datamanager=FullImageDatamanagerConfig(
                dataparser=dataparser or NerfstudioDataParserConfig(load_3D_points=True),
                cache_images_type="uint8",
            ),
            model=model,
        ),
        optimizers=optimizers,
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15),
        vis="viewer",
    )
