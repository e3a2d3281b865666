"""Entry points for `nerfstudio.method_configs` (see pyproject.toml)."""

from __future__ import annotations

from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.plugins.types import MethodSpecification

from nerfstudio_pruning.methods.base import PortableSplatfactoModelConfig
from nerfstudio_pruning.methods.pup_gs import PupGSModelConfig
from nerfstudio_pruning.methods.trainer import splatfacto_trainer_config
from nerfstudio_pruning.methods.vedal_gs import VedalGSModelConfig

splatfacto_portable = MethodSpecification(
    config=splatfacto_trainer_config("splatfacto-portable", PortableSplatfactoModelConfig()),
    description="splatfacto on any device: gsplat's CUDA rasterizer on GPU, a pure-torch rasterizer on CPU "
    "(the unpruned baseline of nerfstudio-pruning)",
)

_pup_model = PupGSModelConfig()
pup_gs = MethodSpecification(
    config=splatfacto_trainer_config("pup-gs", _pup_model, max_steps=_pup_model.total_steps()),
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
