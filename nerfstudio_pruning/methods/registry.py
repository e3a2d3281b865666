"""Entry points for `nerfstudio.method_configs` (see pyproject.toml)."""

from __future__ import annotations

from nerfstudio.plugins.types import MethodSpecification

from nerfstudio_pruning.methods.base import PortableSplatfactoModelConfig
from nerfstudio_pruning.methods.pup_gs import PupGSModelConfig
from nerfstudio_pruning.methods.trainer_config import splatfacto_trainer_config

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
