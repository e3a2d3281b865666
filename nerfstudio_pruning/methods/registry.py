"""Entry points for `nerfstudio.method_configs` (see pyproject.toml)."""

from __future__ import annotations

from nerfstudio.plugins.types import MethodSpecification

from nerfstudio_pruning.methods.base import PortableSplatfactoModelConfig
from nerfstudio_pruning.methods.trainer_config import splatfacto_trainer_config

splatfacto_portable = MethodSpecification(
    config=splatfacto_trainer_config("splatfacto-portable", PortableSplatfactoModelConfig()),
    description="splatfacto on any device: gsplat's CUDA rasterizer on GPU, a pure-torch rasterizer on CPU "
    "(the unpruned baseline of nerfstudio-pruning)",
)
