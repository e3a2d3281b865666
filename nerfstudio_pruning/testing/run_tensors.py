"""A trained run's Gaussians and training views as plain tensors, for benchmarks and offline scoring."""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

import torch

from nerfstudio_pruning.types import Gaussians, Views


def load_run(config: Path, device: str = "cpu") -> Tuple[Gaussians, Views]:
    """The run's Gaussians (at its full SH degree) and its training views with the model's background."""
    from nerfstudio.utils.eval_utils import eval_setup

    from nerfstudio_pruning.methods.base import views_from_cameras

    _, pipeline, _, _ = eval_setup(Path(config), test_mode="val")
    model = pipeline.model.to(device)
    background = model.background_color.detach().clone().to(device)
    views = views_from_cameras(pipeline.datamanager.train_dataset.cameras, torch.device(device), background)
    return model.gaussians(sh_degree=int(model.config.sh_degree)), views
