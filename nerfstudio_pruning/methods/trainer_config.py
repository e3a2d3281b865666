"""Trainer configurations shared by the plugin's methods.

Built explicitly rather than by copying `method_configs["splatfacto"]`: importing nerfstudio's method table from
a plugin that nerfstudio itself is importing gives a circular import.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional, Type

import numpy as np
import torch
from nerfstudio.configs.base_config import MachineConfig, ViewerConfig
from nerfstudio.data.datamanagers.full_images_datamanager import FullImageDatamanagerConfig
from nerfstudio.data.dataparsers.base_dataparser import DataParserConfig
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
from nerfstudio.engine.trainer import Trainer, TrainerConfig
from nerfstudio.models.base_model import ModelConfig
from nerfstudio.pipelines.base_pipeline import VanillaPipelineConfig


@contextlib.contextmanager
def numpy_scalars_allowed():
    """Let `torch.load(weights_only=True)` read the numpy scalars in checkpoints written by stock nerfstudio.

    Stock splatfacto checkpoints hold numpy learning rates, which torch >= 2.6 refuses by default. Allowing
    numpy's scalar and dtype reconstructors admits plain numbers, not arbitrary objects.
    """
    allowed = [np.core.multiarray.scalar, np.dtype] + [type(np.dtype(t)) for t in (np.float64, np.float32, np.int64)]
    with torch.serialization.safe_globals(allowed):
        yield


@dataclass
class PruningTrainerConfig(TrainerConfig):
    """nerfstudio's trainer, able to resume from (and post-hoc prune) checkpoints written by stock splatfacto."""

    _target: Type = field(default_factory=lambda: PruningTrainer)


class PruningTrainer(Trainer):
    def _load_checkpoint(self) -> None:
        with numpy_scalars_allowed():
            super()._load_checkpoint()


def default_device_type() -> str:
    """The device `ns-train` uses unless told otherwise: CUDA where there is one, else the CPU path."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def splatfacto_optimizers(max_steps: int) -> dict:
    """splatfacto 1.1.5's optimizer table, with the schedules stretched over `max_steps`."""

    def adam(lr: float) -> AdamOptimizerConfig:
        return AdamOptimizerConfig(lr=lr, eps=1e-15)

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
        pipeline=VanillaPipelineConfig(
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
