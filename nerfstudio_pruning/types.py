"""The two things every renderer call and every score takes: a set of Gaussians and a batch of views.

`Gaussians` is splatfacto's parametrisation (raw log-scales and opacity logits, SH coefficients at every degree);
`Views` is what gsplat needs to render cameras (world-to-camera matrices, intrinsics, one image size) plus the
background each is composited on. Plain tensors, no nerfstudio: the nerfstudio models build them from their
parameters and `Cameras` (`nerfstudio_pruning/methods/base.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Union

import torch
from torch import Tensor


@dataclass(frozen=True)
class Gaussians:
    """N Gaussians as splatfacto stores them.

    means [N, 3]; quats [N, 4] (not necessarily normalised); log_scales [N, 3]; opacity_logits [N];
    sh [N, K, 3] SH coefficients with K >= (sh_degree + 1)^2 (at degree 0, the DC coefficient of the colour);
    sh_degree: the degree rendered with; rasterize_mode: "classic" or "antialiased" (gsplat's compensation).
    """

    means: Tensor
    quats: Tensor
    log_scales: Tensor
    opacity_logits: Tensor
    sh: Tensor
    sh_degree: int
    rasterize_mode: str = "classic"

    def __len__(self) -> int:
        return int(self.means.shape[0])

    @property
    def device(self) -> torch.device:
        return self.means.device

    @property
    def scales(self) -> Tensor:
        return torch.exp(self.log_scales)

    @property
    def opacities(self) -> Tensor:
        return torch.sigmoid(self.opacity_logits)

    def detach(self) -> "Gaussians":
        return replace(self, **{k: getattr(self, k).detach() for k in _TENSOR_FIELDS})

    def double(self) -> "Gaussians":
        return replace(self, **{k: getattr(self, k).detach().double() for k in _TENSOR_FIELDS})

    def subset(self, index: Tensor) -> "Gaussians":
        """The Gaussians at `index` (a bool mask or integer indices), in that order."""
        return replace(self, **{k: getattr(self, k)[index] for k in _TENSOR_FIELDS})

    def with_tensors(self, **tensors: Tensor) -> "Gaussians":
        """A copy with some tensors replaced (e.g. means and log_scales that require grad)."""
        return replace(self, **tensors)


_TENSOR_FIELDS = ("means", "quats", "log_scales", "opacity_logits", "sh")


@dataclass(frozen=True)
class Views:
    """C pinhole views of one image size, in gsplat's conventions.

    viewmats [C, 4, 4] world-to-camera (OpenCV axes); Ks [C, 3, 3]; width, height in pixels; backgrounds None
    (black), [D] for every view or [C, D] per view.
    """

    viewmats: Tensor
    Ks: Tensor
    width: int
    height: int
    backgrounds: Optional[Tensor] = None

    def __post_init__(self) -> None:
        if self.viewmats.dim() != 3 or self.viewmats.shape[1:] != (4, 4):
            raise ValueError(f"viewmats must be [C, 4, 4], got {tuple(self.viewmats.shape)}")
        if self.Ks.shape != (self.viewmats.shape[0], 3, 3):
            raise ValueError(f"Ks must be [{self.viewmats.shape[0]}, 3, 3], got {tuple(self.Ks.shape)}")
        if self.width < 1 or self.height < 1:
            raise ValueError(f"views need a positive image size, got {self.width}x{self.height}")
        bg = self.backgrounds
        if bg is not None and bg.dim() == 2 and bg.shape[0] != len(self):
            raise ValueError(f"backgrounds must be [D] or [{len(self)}, D], got {tuple(bg.shape)}")

    def __len__(self) -> int:
        return int(self.viewmats.shape[0])

    def background(self, view: int) -> Optional[Tensor]:
        """[D] background of one view, or None."""
        bg = self.backgrounds
        if bg is None:
            return None
        return bg if bg.dim() == 1 else bg[view]

    def __getitem__(self, index: Union[int, slice, Tensor]) -> "Views":
        """The views at `index`; an int gives a batch of one."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        bg = self.backgrounds
        if bg is not None and bg.dim() == 2:
            bg = bg[index]
        return replace(self, viewmats=self.viewmats[index], Ks=self.Ks[index], backgrounds=bg)

    def to(self, device: Union[str, torch.device]) -> "Views":
        bg = None if self.backgrounds is None else self.backgrounds.to(device)
        return replace(self, viewmats=self.viewmats.to(device), Ks=self.Ks.to(device), backgrounds=bg)

    def downscaled(self, factor: float) -> "Views":
        """The same views rendered at 1/factor of the resolution.

        fx, fy, cx, cy are divided by the factor and the size truncated to whole pixels, as nerfstudio's
        `Cameras.rescale_output_resolution` does.
        """
        if factor == 1:
            return self
        if factor <= 0:
            raise ValueError(f"downscale must be positive, got {factor}")
        Ks = self.Ks.clone()
        Ks[..., :2, :] = Ks[..., :2, :] / factor
        return replace(self, Ks=Ks, width=int(self.width / factor), height=int(self.height / factor))
