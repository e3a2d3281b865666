"""A trained run's Gaussians and training cameras as plain tensors, for benchmarks and offline scoring."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch

from nerfstudio_pruning.methods.base import camera_tensors


def load_run_tensors(config: Path, device: str = "cpu") -> Dict[str, object]:
    """Gaussians in splatfacto's raw parametrisation plus gsplat cameras of the training views."""
    from nerfstudio.utils.eval_utils import eval_setup

    _, pipeline, _, _ = eval_setup(Path(config), test_mode="val")
    model = pipeline.model.to(device)
    viewmats, Ks, width, height = camera_tensors(pipeline.datamanager.train_dataset.cameras, torch.device(device))
    with torch.no_grad():
        return {
            "means": model.means.detach().clone(),
            "quats": model.quats.detach().clone(),
            "log_scales": model.scales.detach().clone(),
            "opacity_logits": model.opacities.detach().squeeze(-1).clone(),
            "sh": torch.cat([model.features_dc[:, None, :], model.features_rest], dim=1).detach().clone(),
            "sh_degree": int(model.config.sh_degree),
            "viewmats": viewmats, "Ks": Ks, "width": width, "height": height,
            "backgrounds": model.background_color.detach().clone().to(device),
        }
