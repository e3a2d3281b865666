"""Splatfacto that runs on CPU and GPU alike: the base model both pruning methods share.

Stock splatfacto 1.1.5 cannot be built or trained without CUDA: its `get_outputs` moves the intrinsics with
`.cuda()` and calls gsplat's CUDA-only `rasterization`, its seed colours are built with `.cuda()`, and LPIPS is
built eagerly (which downloads AlexNet weights). This subclass changes exactly those things and runs
splatfacto's own code for everything else (rendering, densification, losses, metrics, parameter layout,
checkpoint format):

- splatfacto looks its `rasterization` up in its module at call time; that name is pointed at this plugin's one
  dispatch (`nerfstudio_pruning.render`), which on CUDA tensors *is* gsplat's function, so splatfacto on a
  GPU is unchanged; off CUDA the camera handed to splatfacto keeps its intrinsics on the model's device;
- its `get_viewmat` (camera-to-world to gsplat's world-to-camera, looked up the same way) is torch.compile'd; it
  stays so on CUDA tensors and runs uncompiled on others (`get_viewmat` below);
- two hooks let the pruning methods change what is rendered without copying splatfacto: `rendering_with`
  overrides the raw opacities or colours for one render (VEDAL's sampled masks), `render_value_image` renders
  a per-Gaussian value as a one-channel image (the viewer's score outputs);
- LPIPS is built on first use when AlexNet's weights are in the torch hub cache; otherwise it is omitted, with one
  line per process and no download attempt;
- optimizers are rebound to the current parameters each step (after a checkpoint load resized them);
- checkpoints also hold densification's running statistics, and a checkpoint that cannot fit this model is
  refused with an `InputError`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, Literal, Optional, Tuple, Type
from unittest import mock

import nerfstudio.models.splatfacto as splatfacto_module
import torch
import tyro
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.engine.optimizers import Optimizers
from nerfstudio.models.splatfacto import RGB2SH, SH2RGB, SplatfactoModel, SplatfactoModelConfig
from nerfstudio.utils.rich_utils import CONSOLE

from nerfstudio_pruning.errors import InputError
from nerfstudio_pruning.methods.checkpoints import check_gaussian_checkpoint, use_python_float_learning_rates
from nerfstudio_pruning.methods.viewer import ViewerOutputs, viewer_interrupt
from nerfstudio_pruning.removal import rebind_optimizers
from nerfstudio_pruning.render import rasterization
from nerfstudio_pruning.render.backend import on_gpu
from nerfstudio_pruning.types import Gaussians, Views

GAUSSIAN_PARAMS = ("means", "scales", "quats", "features_dc", "features_rest", "opacities")
# Side of the frame rendered when a viewer starts (`render_first_frame`): small, yet drawing Gaussians.
FIRST_FRAME_SIDE = 32

splatfacto_module.rasterization = rasterization

# getattr: where this module is imported again (importlib.reload), splatfacto's name already holds the function below.
_compiled_get_viewmat = getattr(splatfacto_module.get_viewmat, "compiled", splatfacto_module.get_viewmat)
_eager_get_viewmat = getattr(_compiled_get_viewmat, "__wrapped__", _compiled_get_viewmat)


def get_viewmat(camera_to_worlds: torch.Tensor) -> torch.Tensor:
    """splatfacto's `get_viewmat`: compiled on CUDA tensors, as splatfacto has it, and its own uncompiled code on
    the others. On CPU, torch.compile cost every process that renders (ns-train, ns-eval, ns-viewer) about 3 s of
    inductor for this 4x4 inverse at its first call (2-core VM, two training runs beside it), and a viewer frame
    interrupted inside dynamo's tracing lost its render thread (methods/viewer.py)."""
    if on_gpu(camera_to_worlds):
        return _compiled_get_viewmat(camera_to_worlds)
    return _eager_get_viewmat(camera_to_worlds)


get_viewmat.compiled = _compiled_get_viewmat
splatfacto_module.get_viewmat = get_viewmat

# A method's settings are one object the model config holds (pup-gs's `schedule`, vedal-gs's `vedal`), as a gsplat
# trainer holds its strategy; on the command line they stay flat: --pipeline.model.<setting>, not
# --pipeline.model.schedule.<setting>.
FLAT = tyro.conf.arg(name="")


def settings_held_in(state: Dict[str, Any], name: str, settings_type: type) -> Dict[str, Any]:
    """A model config's state (pickled, copied or read from a config.yml) with its method's settings held in the
    field `name`. config.yml files written while the model configs inherited those settings hold them as fields of
    the model config itself; they are gathered into a `settings_type` here (yaml restores an object through
    `__setstate__`, without `__init__`)."""
    if name in state:
        return state
    own = {f.name for f in dataclasses.fields(settings_type)}
    held = settings_type(**{key: value for key, value in state.items() if key in own})
    return {**{key: value for key, value in state.items() if key not in own}, name: held}


def views_from_cameras(cameras: Cameras, device: torch.device, backgrounds: Optional[torch.Tensor] = None) -> Views:
    """gsplat views of nerfstudio cameras, which must share one image size.

    `PruningTrainer` refuses training images of mixed sizes before training starts
    (`checks.check_training_views`); this InputError is for callers outside a training run.
    """
    widths, heights = cameras.width.unique(), cameras.height.unique()
    if widths.numel() != 1 or heights.numel() != 1:
        sizes = sorted({(int(w), int(h)) for w, h in zip(cameras.width.reshape(-1).tolist(), cameras.height.reshape(-1).tolist())})
        raise InputError(f"scoring needs all training images at one size; these cameras have {len(sizes)}: "
                         + ", ".join(f"{w}x{h}" for w, h in sizes[:4]) + (", ..." if len(sizes) > 4 else ""))
    viewmats = get_viewmat(cameras.camera_to_worlds.to(device))
    Ks = cameras.get_intrinsics_matrices().to(device)
    return Views(viewmats, Ks, int(widths.item()), int(heights.item()), backgrounds)


class _IntrinsicsOnModelDevice(torch.Tensor):
    """Intrinsics whose `.cuda()` returns them as they are: splatfacto calls `.cuda()` on K, which on a CPU
    model must be a no-op."""

    def cuda(self, *args, **kwargs):  # noqa: D102
        return self.as_subclass(torch.Tensor)


def _camera_for_cpu_model(camera: Cameras) -> Cameras:
    """A shallow copy of `camera` whose intrinsics survive splatfacto's `.cuda()` on a machine without CUDA.
    A copy, so the caller's camera (the datamanager's, the viewer's) is never changed."""
    camera = copy.copy(camera)
    intrinsics = Cameras.get_intrinsics_matrices

    def get_intrinsics_matrices():
        return intrinsics(camera).as_subclass(_IntrinsicsOnModelDevice)

    camera.get_intrinsics_matrices = get_intrinsics_matrices
    return camera


@functools.lru_cache(maxsize=None)
def lpips_unavailable_reason() -> Optional[str]:
    """Why LPIPS cannot be computed without a network, or None when torchmetrics' AlexNet weights are in the torch
    hub cache. Checked before LPIPS is built: building it without them starts a download, which prints and then
    fails offline."""
    try:
        from torchvision.models import AlexNet_Weights
    except Exception as err:  # a broken torchvision: torchmetrics' LPIPS needs it
        return f"torchvision does not import ({type(err).__name__})"
    name = Path(urllib.parse.urlparse(AlexNet_Weights.DEFAULT.url).path).name
    path = Path(torch.hub.get_dir()) / "checkpoints" / name
    return None if path.is_file() else f"AlexNet's weights are not in the torch hub cache ({path})"


_lpips_omission_told = False


class LazyLPIPS:
    """LPIPS built on first call when its weights are available locally; otherwise NaN, and one line per process."""

    def __init__(self) -> None:
        self._metric = None
        self.available: Optional[bool] = None

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        global _lpips_omission_told
        if self.available is None:
            reason = lpips_unavailable_reason()
            if reason is None:
                try:
                    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

                    self._metric = LearnedPerceptualImagePatchSimilarity(normalize=True)
                except Exception as err:  # unreadable weights, a torchmetrics that wants others...
                    reason = f"{type(err).__name__}: {err}"
            self.available = reason is None
            if reason is not None and not _lpips_omission_told:
                _lpips_omission_told = True
                CONSOLE.print(f"[yellow]LPIPS omitted: {reason}", soft_wrap=True)
        if not self.available:
            return torch.tensor(float("nan"))
        self._metric = self._metric.to(a.device)
        return self._metric(a, b)


@dataclass
class PortableSplatfactoModelConfig(SplatfactoModelConfig):
    """Splatfacto on any device (gsplat's CUDA rasterizer on GPU, a compiled CPU rasterizer elsewhere)."""

    _target: Type = field(default_factory=lambda: PortableSplatfactoModel)
    min_training_size: int = 128
    """splatfacto's resolution schedule never trains below this many pixels on the longer image side. In a
    tiny image every Gaussian's screen radius (at least 2 px after the 0.3 px^2 dilation) exceeds splatfacto's
    split threshold (5% of the image), so densification would split every Gaussian at every refinement."""
    init_ply: Optional[Path] = None
    """Start from the Gaussians of a 3DGS PLY trained elsewhere (Inria's layout: Inria's 3DGS, gsplat,
    `ns-export gaussian-splat`) instead of the dataset's seed points. The run begins where a trained model enters
    the method: pup-gs at its pruning rounds (prune-start-step), vedal-gs at its fine-tuning (finetune-start-step),
    splatfacto-portable after densification (stop-split-at); --max-num-iterations counts from there."""
    init_ply_frame: Literal["dataset", "colmap"] = "dataset"
    """World frame of init-ply: 'dataset': nerfstudio's dataparser frame, as ns-export writes it (train with the same
    dataparser and options as the run it came from); 'colmap': the frame of the poses the dataparser read, as Inria's
    3DGS writes it on COLMAP data, mapped by the dataparser's transform and scale as its seed points are."""

    def scoring_downscale(self, width: int = 0, height: int = 0) -> Optional[float]:
        """The downscale at which the method scores Gaussians on training views of width x height (as configured
        when no size is given), or None when it scores none: the trainer then accepts training images of any
        sizes. splatfacto scores nothing."""
        return None

    def gaussian_count_limits(self) -> Tuple[Optional[int], int]:
        """(target_gaussians, min_gaussians) of a method that prunes to a size, as the trainer checks them before
        training; splatfacto has neither (None, 0)."""
        return None, 0


class PortableSplatfactoModel(SplatfactoModel):
    config: PortableSplatfactoModelConfig
    # Replaced, never mutated, by `rendering_with`; empty: render the parameters as they are.
    _render_overrides: Dict[str, torch.Tensor] = {}

    def populate_modules(self) -> None:
        seed = self.seed_points
        if seed is not None and seed[1].shape[0] > 0:
            # splatfacto would build the seed colours with `.cuda()`; hand it none and set them here.
            self.seed_points = (seed[0], seed[1][:0])
        with mock.patch("torchmetrics.image.lpip.LearnedPerceptualImagePatchSimilarity", lambda **_: LazyLPIPS()):
            super().populate_modules()
        self.seed_points = seed
        # The viewer's output selection (methods/viewer.py); its start renders a first frame here.
        self.viewer_outputs = ViewerOutputs(on_attach=self.render_first_frame)
        if seed is not None and not self.config.random_init and seed[1].shape[0] > 0:
            rgb = seed[1].float() / 255.0
            dc = RGB2SH(rgb) if self.config.sh_degree > 0 else torch.logit(rgb, eps=1e-10)
            self.gauss_params["features_dc"] = torch.nn.Parameter(dc.to(self.gauss_params["means"]))

    # -- what splatfacto renders ---------------------------------------------------------------------------------
    @property
    def opacities(self) -> torch.Tensor:
        return self._render_overrides.get("opacities", self.gauss_params["opacities"])

    @property
    def features_dc(self) -> torch.Tensor:
        return self._render_overrides.get("features_dc", self.gauss_params["features_dc"])

    @property
    def features_rest(self) -> torch.Tensor:
        return self._render_overrides.get("features_rest", self.gauss_params["features_rest"])

    @contextlib.contextmanager
    def rendering_with(self, **overrides: torch.Tensor) -> Iterator[None]:
        """Render with some raw parameters replaced (`opacities` as logits [N, 1], `features_dc`,
        `features_rest`); the model's own parameters are untouched."""
        previous = self._render_overrides
        self._render_overrides = {**previous, **overrides}
        try:
            yield
        finally:
            self._render_overrides = previous

    def render_value_image(self, camera: Cameras, values: torch.Tensor) -> torch.Tensor:
        """[H, W, 1]: per pixel, the mean of a per-Gaussian value in [0, 1] ([N]) weighted by each Gaussian's
        alpha-compositing weight there, i.e. the colour the pixel would have with every Gaussian painted its value
        and no background; 0 where (almost) nothing is drawn. One render with replaced colours (viewer outputs)."""
        grey = values.to(self.means)[:, None].expand(-1, 3)
        if self.config.sh_degree > 0:  # SH with only a DC term evaluates to that colour in every direction
            dc, rest = RGB2SH(grey), torch.zeros_like(self.gauss_params["features_rest"])
        else:  # splatfacto stores degree-0 colours as logits
            dc, rest = torch.logit(grey, eps=1e-6), self.gauss_params["features_rest"]
        with self.rendering_with(features_dc=dc, features_rest=rest):
            outputs = PortableSplatfactoModel.get_outputs(self, camera)
        # splatfacto composites onto its background: rgb = sum_i w_i v_i + (1 - alpha) background.
        alpha = outputs["accumulation"]
        weighted_sum = outputs["rgb"][..., :1] - (1.0 - alpha) * outputs["background"][..., :1]
        drawn = alpha > 1.0 / 255.0
        return torch.where(drawn, weighted_sum / alpha.clamp_min(1.0 / 255.0), torch.zeros_like(alpha)).clamp(0, 1)

    def gaussians(self, sh_degree: Optional[int] = None) -> Gaussians:
        """The model's own Gaussians (no render overrides, no inference masks), detached, as the scoring code
        takes them: SH at every degree (at degree 0 splatfacto stores colours as logits: they become a DC
        coefficient here), rendered at `sh_degree` (default: the degree training renders with now)."""
        params = self.gauss_params
        sh = torch.cat([params["features_dc"][:, None, :], params["features_rest"]], dim=1).detach()
        if self.config.sh_degree == 0:
            sh = RGB2SH(torch.sigmoid(sh[:, :1]))
        return Gaussians(
            means=params["means"].detach(), quats=params["quats"].detach(), log_scales=params["scales"].detach(),
            opacity_logits=params["opacities"].detach().squeeze(-1), sh=sh,
            sh_degree=self.active_sh_degree() if sh_degree is None else sh_degree,
            rasterize_mode=self.config.rasterize_mode,
        )

    def set_gaussians(self, gaussians: Gaussians) -> None:
        """Replace the model's Gaussians (e.g. with a PLY's: `--pipeline.model.init-ply`). The inverse of
        `gaussians()`; the optimizers are rebound to the new parameters at the next step (`step_cb`)."""
        k = (self.config.sh_degree + 1) ** 2
        if gaussians.sh.shape[1] < k:
            raise InputError(f"the Gaussians have SH degree {gaussians.sh_degree}, this config has sh_degree "
                             f"{self.config.sh_degree}: pass --pipeline.model.sh-degree {gaussians.sh_degree}")
        like = self.gauss_params["means"]
        sh = gaussians.sh[:, :k].to(like)
        dc = sh[:, 0]
        if self.config.sh_degree == 0:  # splatfacto stores degree-0 colours as logits
            dc = torch.logit(SH2RGB(dc).clamp(1e-6, 1 - 1e-6))
        values = {"means": gaussians.means, "scales": gaussians.log_scales, "quats": gaussians.quats,
                  "features_dc": dc, "features_rest": sh[:, 1:], "opacities": gaussians.opacity_logits[:, None]}
        for name, value in values.items():
            self.gauss_params[name] = torch.nn.Parameter(value.detach().to(like).contiguous())

    def first_step_from_trained_gaussians(self) -> int:
        """The step at which a run that starts from trained Gaussians (`init_ply`) begins: splatfacto's first step
        after densification, where every SH degree and the full resolution are on."""
        return int(self.config.stop_split_at)

    def active_sh_degree(self) -> int:
        """SH degree training renders with now (splatfacto raises it by one every sh_degree_interval steps)."""
        return min(self.step // self.config.sh_degree_interval, self.config.sh_degree)

    # -- splatfacto overrides ----------------------------------------------------------------------------------
    _longest_side: Optional[int] = None

    def _get_downscale_factor(self) -> int:
        factor = super()._get_downscale_factor()
        if self._longest_side is not None:
            while factor > 1 and self._longest_side / factor < self.config.min_training_size:
                factor //= 2
        return factor

    def get_outputs(self, camera: Cameras) -> Dict[str, Any]:
        if not isinstance(camera, Cameras):
            raise TypeError(f"get_outputs expects a Cameras object, got {type(camera).__name__}")
        self._longest_side = int(max(camera.width.max().item(), camera.height.max().item()))
        if self.device.type != "cuda":
            camera = _camera_for_cpu_model(camera)
        return super().get_outputs(camera)

    def get_outputs_for_camera(self, camera: Cameras, obb_box: Optional[Any] = None) -> Dict[str, Any]:
        try:
            return super().get_outputs_for_camera(camera, obb_box=obb_box)
        except Exception as err:
            interrupt = viewer_interrupt(err)
            if interrupt is None or interrupt is err:
                raise
            raise interrupt from None  # ns-viewer's interrupt, rewrapped by torch.compile (methods/viewer.py)

    def render_first_frame(self, viewer: Any) -> None:
        """Render one frame of at most FIRST_FRAME_SIDE pixels from the first training camera, as the viewer
        renders (eval mode, no gradients), on the calling thread: the viewer calls it when it starts, so that the
        first-time work of rendering (numba loading its kernels, torch.compile) is done before its render thread
        can interrupt a frame (methods/viewer.py, "First frame"). Nothing happens without training cameras."""
        dataset = getattr(getattr(getattr(viewer, "pipeline", None), "datamanager", None), "train_dataset", None)
        cameras = getattr(dataset, "cameras", None)
        if cameras is None or len(cameras) == 0 or self.num_points == 0:
            return
        camera = cameras[0:1].to(self.device)
        longest = float(max(camera.width.max().item(), camera.height.max().item()))
        camera.rescale_output_resolution(min(1.0, FIRST_FRAME_SIDE / longest))
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                self.get_outputs_for_camera(camera)
        except Exception as err:  # the viewer still starts; its own frames meet (and show) the same error
            CONSOLE.print(f"[yellow]viewer: the first frame, rendered ahead, failed: {type(err).__name__}: {err}")
        finally:
            self.train(was_training)

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
