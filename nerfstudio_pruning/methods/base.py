"""Splatfacto that runs on CPU and GPU alike: the base model both pruning methods share.

Stock splatfacto 1.1.5 cannot be built or trained without CUDA (see docs/environment notes): it moves seed
colours and intrinsics with `.cuda()`, builds LPIPS eagerly (which downloads AlexNet weights), and renders with
gsplat's CUDA-only `rasterization`. This subclass changes exactly those things and keeps everything else
(densification strategy, losses, metrics, parameter layout, checkpoint format) from splatfacto:

- rendering goes through `nerfstudio_pruning.rendering.rasterization` (gsplat on CUDA, the pure-torch path
  elsewhere), with two hooks, `render_opacities` and `render_colors`, that the pruning methods override;
- LPIPS is built on first use and, when its weights cannot be loaded offline, reported once and omitted;
- optimizers are rebound to the current parameters each step (after a checkpoint load resized them);
- checkpoints also hold densification's running statistics (so a resumed run densifies as an uninterrupted one
  would), and a checkpoint that cannot fit this model is refused with an `InputError`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Type, Union
from unittest import mock

import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.engine.optimizers import Optimizers
from nerfstudio.models.splatfacto import RGB2SH, SplatfactoModel, SplatfactoModelConfig, get_viewmat, num_sh_bases
from nerfstudio.utils.rich_utils import CONSOLE
from nerfstudio.viewer.viewer_elements import ViewerCheckbox

from nerfstudio_pruning.errors import InputError
from nerfstudio_pruning.removal import rebind_optimizers
from nerfstudio_pruning.rendering import rasterization

GAUSSIAN_PARAMS = ("means", "scales", "quats", "features_dc", "features_rest", "opacities")


def check_gaussian_checkpoint(state: Dict[str, Any], sh_degree: int) -> int:
    """Number of Gaussians in a model state dict; `InputError` when it cannot load into a splatfacto model of
    `sh_degree` (another kind of method, no Gaussians, another SH degree)."""
    prefix = "gauss_params." if "gauss_params.means" in state else ""
    if f"{prefix}means" not in state:
        raise InputError("the checkpoint holds no Gaussians (not a splatfacto-family method); "
                         "these methods load checkpoints of splatfacto, splatfacto-portable, pup-gs and vedal-gs")
    n = int(state[f"{prefix}means"].shape[0])
    if n == 0:
        raise InputError("the checkpoint holds an empty model (0 Gaussians); there is nothing to train or prune")
    rest = state.get(f"{prefix}features_rest")
    if rest is not None and rest.dim() == 3 and rest.shape[1] != num_sh_bases(sh_degree) - 1:
        degree = round((rest.shape[1] + 1) ** 0.5) - 1
        raise InputError(f"the checkpoint's Gaussians have SH degree {degree} (features_rest {tuple(rest.shape)}), this "
                         f"config has sh_degree {sh_degree}: pass --pipeline.model.sh-degree {degree}")
    return n


def camera_tensors(cameras: Cameras, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, int, int]:
    """gsplat viewmats [C, 4, 4], Ks [C, 3, 3] and the shared image size of nerfstudio cameras."""
    widths, heights = cameras.width.unique(), cameras.height.unique()
    if widths.numel() != 1 or heights.numel() != 1:
        raise NotImplementedError("scoring needs all training images at one size; this dataset mixes sizes")
    viewmats = get_viewmat(cameras.camera_to_worlds.to(device))
    Ks = cameras.get_intrinsics_matrices().to(device)
    return viewmats, Ks, int(widths.item()), int(heights.item())


def score_output_toggle(name: str) -> ViewerCheckbox:
    """A viewer checkbox for an extra score-coloured render output.

    The extra output costs a second render per frame, so it is produced only when a viewer has installed this
    checkbox (its `gui_handle` exists) and it is ticked: ns-eval's timings and ns-export never pay for it.
    """
    return ViewerCheckbox(name, True, hint="Adds a render output with each Gaussian coloured by its score")


def viewer_wants(toggle: ViewerCheckbox) -> bool:
    return toggle.gui_handle is not None and bool(toggle.value)


def turbo_colours(values: torch.Tensor) -> torch.Tensor:
    """[N, 3] turbo colours of values in [0, 1]."""
    from nerfstudio.utils.colormaps import ColormapOptions, apply_colormap

    return apply_colormap(values.float()[:, None].clamp(0, 1), ColormapOptions(colormap="turbo"))


def use_python_float_learning_rates(optimizers: Optimizers) -> None:
    """Keep learning rates Python floats so checkpoints load with `torch.load(weights_only=True)`.

    nerfstudio's exponential-decay schedule computes rates with numpy; the numpy scalars end up in the saved
    optimizer and scheduler state, and torch >= 2.6 (weights_only by default) then refuses the checkpoint in
    ns-eval, ns-export and ns-viewer.
    """
    for scheduler in optimizers.schedulers.values():
        # Marked on the functions, not the scheduler: a scheduler's attributes are saved and restored with
        # checkpoints, its lambdas are not, so a resumed run must wrap them again.
        if all(getattr(f, "returns_python_float", False) for f in scheduler.lr_lambdas):
            continue
        scheduler.lr_lambdas = [_python_float_schedule(f) for f in scheduler.lr_lambdas]
        scheduler._last_lr = [float(lr) for lr in scheduler._last_lr]
    for optimizer in optimizers.optimizers.values():
        for group in optimizer.param_groups:
            group["lr"] = float(group["lr"])


def _python_float_schedule(schedule):
    def wrapped(step):
        return float(schedule(step))

    wrapped.returns_python_float = True
    return wrapped


class LazyLPIPS:
    """LPIPS built on first call; NaN (and one warning) when its pretrained weights are not available."""

    def __init__(self) -> None:
        self._metric = None
        self.available: Optional[bool] = None

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.available is None:
            try:
                from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

                self._metric = LearnedPerceptualImagePatchSimilarity(normalize=True)
                self.available = True
            except Exception as err:  # no network, no cached AlexNet weights, broken torchvision...
                self.available = False
                CONSOLE.print(f"[yellow]LPIPS unavailable ({type(err).__name__}: {err}); the metric is omitted.")
        if not self.available:
            return torch.tensor(float("nan"))
        self._metric = self._metric.to(a.device)
        return self._metric(a, b)


@contextlib.contextmanager
def _deferred_lpips():
    with mock.patch("torchmetrics.image.lpip.LearnedPerceptualImagePatchSimilarity", lambda **_: LazyLPIPS()):
        yield


@dataclass
class PortableSplatfactoModelConfig(SplatfactoModelConfig):
    """Splatfacto on any device (gsplat's CUDA rasterizer on GPU, a pure-torch rasterizer on CPU)."""

    _target: Type = field(default_factory=lambda: PortableSplatfactoModel)
    min_training_size: int = 128
    """splatfacto's resolution schedule never trains below this many pixels on the longer image side. In a
    tiny image every Gaussian's screen radius (at least 2 px after the 0.3 px^2 dilation) exceeds splatfacto's
    split threshold (5% of the image), so densification would split every Gaussian at every refinement."""


class PortableSplatfactoModel(SplatfactoModel):
    config: PortableSplatfactoModelConfig

    def populate_modules(self) -> None:
        seed = self.seed_points
        if seed is not None and seed[1].shape[0] > 0:
            # splatfacto would build the seed colours with `.cuda()`; hand it none and set them here.
            self.seed_points = (seed[0], seed[1][:0])
        with _deferred_lpips():
            super().populate_modules()
        self.seed_points = seed
        if seed is not None and not self.config.random_init and seed[1].shape[0] > 0:
            rgb = seed[1].float() / 255.0
            dc = RGB2SH(rgb) if self.config.sh_degree > 0 else torch.logit(rgb, eps=1e-10)
            self.gauss_params["features_dc"] = torch.nn.Parameter(dc.to(self.gauss_params["means"]))

    # -- hooks the pruning methods override ------------------------------------------------------------------
    _colour_override: Optional[torch.Tensor] = None

    def render_with_colours(self, camera: Cameras, colours: torch.Tensor) -> torch.Tensor:
        """Render [H, W, 3] with each Gaussian painted one flat colour (viewer outputs of scores)."""
        self._colour_override = colours.to(self.means)
        try:
            return PortableSplatfactoModel.get_outputs(self, camera)["rgb"]
        finally:
            self._colour_override = None

    def render_opacities(self) -> torch.Tensor:
        """Post-sigmoid opacities [N] used for rendering."""
        return torch.sigmoid(self.opacities).squeeze(-1)

    def render_colors(self) -> Tuple[torch.Tensor, Optional[int]]:
        """Colours for rendering: SH coefficients [N, K, 3] with the degree in use, or RGB [N, 3] with None."""
        if self._colour_override is not None:
            return self._colour_override, None
        colors = torch.cat((self.features_dc[:, None, :], self.features_rest), dim=1)
        if self.config.sh_degree > 0:
            return colors, self.active_sh_degree()
        return torch.sigmoid(colors).squeeze(1), None

    def active_sh_degree(self) -> int:
        """SH degree training renders with now (splatfacto raises it by one every sh_degree_interval steps)."""
        return min(self.step // self.config.sh_degree_interval, self.config.sh_degree)

    def sh_coefficients(self) -> torch.Tensor:
        """Detached SH coefficients [N, K, 3] of the current colours, for the scoring code (which takes SH at every
        degree). At degree 0 splatfacto stores colours as logits: they become a DC coefficient here."""
        sh = torch.cat([self.features_dc[:, None, :], self.features_rest], dim=1).detach()
        return RGB2SH(torch.sigmoid(sh[:, :1])) if self.config.sh_degree == 0 else sh

    # -- splatfacto overrides ----------------------------------------------------------------------------------
    _longest_side: Optional[int] = None

    def _get_downscale_factor(self) -> int:
        factor = super()._get_downscale_factor()
        if self._longest_side is not None:
            while factor > 1 and self._longest_side / factor < self.config.min_training_size:
                factor //= 2
        return factor

    def get_outputs(self, camera: Cameras) -> Dict[str, Union[torch.Tensor, List]]:
        if not isinstance(camera, Cameras):
            raise TypeError(f"get_outputs expects a Cameras object, got {type(camera).__name__}")
        if self.training:
            if camera.shape[0] != 1:
                raise ValueError("training renders one camera at a time")
            camera_to_world = self.camera_optimizer.apply_to_camera(camera)
        else:
            camera_to_world = camera.camera_to_worlds

        keep = None
        if self.crop_box is not None and not self.training:
            keep = self.crop_box.within(self.means).squeeze()
            if keep.sum() == 0:
                return self.get_empty_outputs(int(camera.width.item()), int(camera.height.item()), self.background_color)

        colors, sh_degree = self.render_colors()
        opacities = self.render_opacities()
        means, quats, scales = self.means, self.quats, self.scales
        if keep is not None:
            means, quats, scales, colors, opacities = (t[keep] for t in (means, quats, scales, colors, opacities))

        self._longest_side = int(max(camera.width.max().item(), camera.height.max().item()))
        downscale = self._get_downscale_factor()
        camera.rescale_output_resolution(1 / downscale)
        viewmat = get_viewmat(camera_to_world)
        K = camera.get_intrinsics_matrices().to(self.device)
        W, H = int(camera.width.item()), int(camera.height.item())
        self.last_size = (H, W)
        camera.rescale_output_resolution(downscale)

        render_mode = "RGB+ED" if (self.config.output_depth_during_training or not self.training) else "RGB"
        render, alpha, self.info = rasterization(
            means=means,
            quats=quats,
            scales=torch.exp(scales),
            opacities=opacities,
            colors=colors,
            viewmats=viewmat,
            Ks=K,
            width=W,
            height=H,
            tile_size=16,
            packed=False,
            near_plane=0.01,
            far_plane=1e10,
            render_mode=render_mode,
            sh_degree=sh_degree,
            sparse_grad=False,
            absgrad=self.strategy.absgrad,
            rasterize_mode=self.config.rasterize_mode,
        )
        if self.training:
            self.strategy.step_pre_backward(self.gauss_params, self.optimizers, self.strategy_state, self.step, self.info)

        background = self._get_background_color()
        rgb = torch.clamp(render[..., :3] + (1 - alpha) * background, 0.0, 1.0)
        if self.config.use_bilateral_grid and self.training and camera.metadata and "cam_idx" in camera.metadata:
            rgb = self._apply_bilateral_grid(rgb, camera.metadata["cam_idx"], H, W)
        depth = None
        if render_mode == "RGB+ED":
            depth = torch.where(alpha > 0, render[..., 3:4], render[..., 3:4].detach().max()).squeeze(0)
        if background.shape[0] == 3 and not self.training:
            background = background.expand(H, W, 3)
        return {"rgb": rgb.squeeze(0), "depth": depth, "accumulation": alpha.squeeze(0), "background": background}

    def step_cb(self, optimizers: Optimizers, step: int) -> None:
        super().step_cb(optimizers, step)
        for name in rebind_optimizers(self.gauss_params, optimizers.optimizers):
            optimizers.parameters[name] = [self.gauss_params[name]]
        use_python_float_learning_rates(optimizers)

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def get_extra_state(self) -> Dict[str, Any]:
        """Densification's running statistics (gsplat strategy state: accumulated screen-space gradients,
        visibility counts, radii). splatfacto does not save them, so a resumed run would split and prune a
        different set of Gaussians at its next refinement than the uninterrupted run."""
        return {"strategy_state": {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v
                                   for k, v in self.strategy_state.items()}}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        saved = state.get("strategy_state") or {}
        self.strategy_state.update({k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in saved.items()})

    def load_state_dict(self, dict, **kwargs):  # type: ignore[override]
        check_gaussian_checkpoint(dict, self.config.sh_degree)
        return super().load_state_dict(self.with_method_state(dict), **kwargs)

    def with_method_state(self, state: Dict[str, Any]) -> Dict[str, Any]:
        """`state` completed with this method's own entries when it was written by another splatfacto-family
        method (post-hoc pruning of a trained model). The base model has none to add."""
        return state

    def get_image_metrics_and_images(self, outputs, batch):
        metrics, images = super().get_image_metrics_and_images(outputs, batch)
        if getattr(self.lpips, "available", True) is False:
            metrics.pop("lpips", None)
            metrics.pop("cc_lpips", None)
        metrics["num_gaussians"] = float(self.num_points)
        return metrics, images
