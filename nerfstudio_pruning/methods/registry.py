"""The plugin's methods as nerfstudio's entry points load them (see pyproject.toml, through `entry_points.py`),
and the trainer configuration they share.

The trainer configurations are built here rather than by copying `method_configs["splatfacto"]`: importing
nerfstudio's method table from a plugin that nerfstudio itself is importing gives a circular import.
"""

from __future__ import annotations

from typing import Optional

import torch
from nerfstudio.configs.base_config import MachineConfig, ViewerConfig
from nerfstudio.data.datamanagers.full_images_datamanager import FullImageDatamanagerConfig
from nerfstudio.data.dataparsers.base_dataparser import DataParserConfig
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.models.base_model import ModelConfig
from nerfstudio.plugins.types import MethodSpecification

from nerfstudio_pruning.methods.base import PortableSplatfactoModelConfig
from nerfstudio_pruning.methods.optimizers import splatfacto_optimizers
from nerfstudio_pruning.methods.pipeline import PruningPipelineConfig
from nerfstudio_pruning.methods.pup_gs import PupGSModelConfig
from nerfstudio_pruning.methods.trainer import PruningTrainerConfig
from nerfstudio_pruning.methods.vedal_gs import VedalGSModelConfig


def default_device_type() -> str:
    """The device `ns-train` uses unless told otherwise: CUDA where there is one, else the CPU path."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def splatfacto_trainer_config(
    method_name: str,
    model: ModelConfig,
    max_steps: int = 30000,
    dataparser: Optional[DataParserConfig] = None,
    extra_optimizers: Optional[dict] = None,
) -> PruningTrainerConfig:
    """splatfacto's trainer configuration around `model`, with the schedules stretched over `max_steps`."""
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


splatfacto_portable = MethodSpecification(
    config=splatfacto_trainer_config("splatfacto-portable", PortableSplatfactoModelConfig()),
    description="splatfacto on any device: gsplat's CUDA rasterizer on GPU, a pure-torch rasterizer on CPU "
    "(the unpruned baseline of nerfstudio-pruning)",
)

_pup_model = PupGSModelConfig()
pup_gs = MethodSpecification(
    config=splatfacto_trainer_config("pup-gs", _pup_model, max_steps=_pup_model.schedule.total_steps()),
    description="PUP 3D-GS: prune splatfacto by Fisher sensitivity (log det over mean and log-scale), "
    "80% then 50% with refinement",
)

vedal_gs = MethodSpecification(
    config=splatfacto_trainer_config(
        "vedal-gs",
        VedalGSModelConfig(),
        max_steps=30000,
        # The retention head's own Adam: 1e-3, the usual rate for a small MLP; no decay, since the head has to
        # keep following the gate as it opens until the last step.
        extra_optimizers={"retention_head": {"optimizer": AdamOptimizerConfig(lr=1e-3), "scheduler": None}},
    ),
    description="VEDAL: prune splatfacto with an EMA leave-one-out importance gate and a variational retention "
    "head (Binary Concrete masks, KL prior); removes gated Gaussians with p < 0.5 at the end",
)
