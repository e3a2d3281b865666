"""Random Gaussians and cameras for tests and benchmarks (plain tensors, no nerfstudio)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from nerfstudio_pruning.types import Gaussians


@dataclass
class GaussianSet:
    """Gaussians in splatfacto's raw parametrisation (log-scales, opacity logits, SH coefficients)."""

    means: Tensor  # [N, 3]
    quats: Tensor  # [N, 4]
    log_scales: Tensor  # [N, 3]
    opacity_logits: Tensor  # [N]
    sh: Tensor  # [N, K, 3]

    def render_args(self) -> dict:
        return dict(
            means=self.means,
            quats=self.quats,
            scales=torch.exp(self.log_scales),
            opacities=torch.sigmoid(self.opacity_logits),
            colors=self.sh,
        )

    def as_gaussians(self, sh_degree: int, rasterize_mode: str = "classic") -> Gaussians:
        """These tensors (not copies) as the `Gaussians` the renderer's callers and the scores take."""
        return Gaussians(self.means, self.quats, self.log_scales, self.opacity_logits, self.sh, sh_degree, rasterize_mode)

    def requires_grad_(self) -> "GaussianSet":
        for t in (self.means, self.quats, self.log_scales, self.opacity_logits, self.sh):
            t.requires_grad_(True)
        return self


def random_gaussians(
    n: int, sh_degree: int = 3, extent: float = 0.6, scale: float = 0.06, seed: int = 0,
    device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32,
) -> GaussianSet:
    g = torch.Generator().manual_seed(seed)
    k = (sh_degree + 1) ** 2
    sh = torch.randn(n, k, 3, generator=g) * 0.15
    sh[:, 0] = (torch.rand(n, 3, generator=g) - 0.5) * 3.0
    gs = GaussianSet(
        means=(torch.rand(n, 3, generator=g) * 2 - 1) * extent,
        quats=torch.randn(n, 4, generator=g),
        log_scales=torch.log(scale * (0.3 + torch.rand(n, 3, generator=g))),
        opacity_logits=torch.randn(n, generator=g) * 1.5,
        sh=sh,
    )
    return GaussianSet(**{k_: v.to(device=device, dtype=dtype) for k_, v in gs.__dict__.items()})


def look_at_viewmat(eye: Tensor, target: Tensor, up: Tensor) -> Tensor:
    """World-to-camera matrix in gsplat's OpenCV convention (x right, y down, z forward)."""
    z = torch.nn.functional.normalize(target - eye, dim=0)
    x = torch.nn.functional.normalize(torch.linalg.cross(z, up), dim=0)
    y = torch.linalg.cross(z, x)
    rot = torch.stack([x, y, z], dim=0)
    view = torch.eye(4, dtype=eye.dtype)
    view[:3, :3] = rot
    view[:3, 3] = -rot @ eye
    return view


def orbit_cameras(
    n_views: int, width: int, height: int, radius: float = 2.5, fov_deg: float = 50.0, elevation: float = 0.35,
    device: Optional[torch.device] = None,
) -> tuple[Tensor, Tensor]:
    """Cameras on a ring looking at the origin. Returns viewmats [C, 4, 4] and Ks [C, 3, 3]."""
    views = []
    for i in range(n_views):
        a = 2 * math.pi * i / n_views
        eye = torch.tensor([radius * math.cos(a), radius * elevation, radius * math.sin(a)])
        views.append(look_at_viewmat(eye, torch.zeros(3), torch.tensor([0.0, -1.0, 0.0])))
    f = 0.5 * width / math.tan(math.radians(fov_deg) / 2)
    K = torch.tensor([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1.0]])
    return torch.stack(views).to(device), K[None].repeat(n_views, 1, 1).to(device)


def point_on_pixel_centre(viewmat: Tensor, K: Tensor, x: int, y: int, depth: float) -> Tensor:
    """World point that projects exactly onto the centre of pixel (x, y) at the given depth (to put a Gaussian on
    the 0.999 alpha clamp, which needs sigma < 1e-3)."""
    in_camera = torch.stack([(x + 0.5 - K[0, 2]) / K[0, 0], (y + 0.5 - K[1, 2]) / K[1, 1], torch.ones_like(K[0, 0])])
    rotation, translation = viewmat[:3, :3], viewmat[:3, 3]
    return rotation.T @ (depth * in_camera - translation)
