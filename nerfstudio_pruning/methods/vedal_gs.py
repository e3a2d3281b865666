"""`vedal-gs`: VEDAL on splatfacto. Train, then fine-tune with a convergence gate and a variational retention head,
then remove the Gaussians the head lets go.

What VEDAL decides (schedule, importance window, gate, temperature, regulariser, the hard-prune decision) is
`vedal.controller.VedalController`, documented there; the importance itself is `scoring.importance`. This model
wires them into splatfacto: it measures importance on the training images when the controller asks, renders
gated Gaussians with sampled opacities, passes the retention logits to the loss through the outputs, removes
what the controller selects, and shows p in the viewer.

Inference (the model in eval mode: ns-eval, ns-viewer, ns-export, the viewer during training) uses the
deterministic mask: a gated Gaussian with p below the viewer's retention threshold (0.5 unless moved) is hidden.
Hidden Gaussians are reported through `opacities` as a logit far below logit(1/255), which is how
`ns-export gaussian-splat` (and every rasterizer) already recognises Gaussians that contribute nothing: the
export then holds only the retained Gaussians even before the hard removal, without any change to nerfstudio.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Dict, List, Optional, Tuple, Type, Union

import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.models.splatfacto import resize_image
from nerfstudio.utils import writer
from nerfstudio.utils.rich_utils import CONSOLE
from torch import Tensor

from nerfstudio_pruning.errors import InputError, PruningRefused
from nerfstudio_pruning.methods.base import (
    FLAT,
    PortableSplatfactoModel,
    PortableSplatfactoModelConfig,
    settings_held_in,
    views_from_cameras,
)
from nerfstudio_pruning.methods.viewer import (
    ORDER_COUNT,
    ORDER_LEGEND,
    ThresholdSlider,
    ViewerMarkdown,
    add_output_if_shown,
    score_legend,
)
from nerfstudio_pruning.removal import remove_gaussians, target_count
from nerfstudio_pruning.scoring.importance import leave_one_out_importance
from nerfstudio_pruning.vedal.controller import HIDDEN_OPACITY_LOGIT, VedalConfig, VedalController
from nerfstudio_pruning.vedal.retention_head import PartialLogits, RetentionHead, retention_inputs, robust_bounds



@dataclass
class VedalGSModelConfig(PortableSplatfactoModelConfig):
    """VEDAL: prune splatfacto with an EMA importance gate and a variational retention head."""

    _target: Type = field(default_factory=lambda: VedalGSModel)
    vedal: Annotated[VedalConfig, FLAT] = field(default_factory=VedalConfig)
    """Everything VEDAL decides (`vedal.controller`); its settings are --pipeline.model.* flags."""

    def scoring_downscale(self, width: int = 0, height: int = 0) -> Optional[int]:
        """importance_downscale where the run measures importance; None for the ungated ablation with kl_weight in
        'loss' units, which measures nothing."""
        return int(self.vedal.importance_downscale) if self.vedal.measures_importance() else None

    def gaussian_count_limits(self) -> Tuple[Optional[int], int]:
        return self.vedal.target_gaussians, self.vedal.min_gaussians

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(settings_held_in(state, "vedal", VedalConfig))


class VedalGSModel(PortableSplatfactoModel):
    config: VedalGSModelConfig

    def populate_modules(self) -> None:
        super().populate_modules()
        self.vedal = VedalController(self.config.vedal, self.config.ssim_lambda, device=self.gaussians_device)
        self.retention_head = RetentionHead(self.config.vedal.retention_head_config())
        self._train_cameras: Optional[Cameras] = None
        self._train_images: Optional[List[Dict[str, Tensor]]] = None
        # -- viewer (methods/viewer.py) --
        self.retention_threshold_slider = ThresholdSlider(
            "Retention threshold", 0.5, 0.01, 0.99, 0.01, marks=(0.01, 0.5, 0.99),
            on_move=self.threshold_moved,
            hint="At 0.5: hides what the hard removal removes (gated with p < 0.5, or with a target the gated with "
                 "the lowest p). Higher also hides the gated with p below it; lower shows those of the removal's above "
                 "it. Gated: eligible for pruning once its importance estimate has converged.",
        )
        self.kept_count_text = ViewerMarkdown("Gaussians shown", "", order=ORDER_COUNT)
        # 'retention' output (while the viewer shows it): every Gaussian, hidden ones included, drawn with its p.
        self.retention_legend = ViewerMarkdown("Retention legend", score_legend(
            "retention", what="per pixel, the retention probability p of its Gaussians, hidden ones included",
            low="hidden first once gated", high="kept"), order=ORDER_LEGEND)
        # What the viewer counts from, replaced as a whole by the thread that holds the model (training or
        # rendering) and read by the slider's thread: (number of Gaussians, retention logits, gated mask).
        self._kept_count_inputs: Optional[Tuple[int, Tensor, Tensor]] = None
        # (step, Gaussians before, after) of the hard removal, once made (or read from a checkpoint that records it).
        self._hard_removal: Optional[Tuple[int, int, int]] = None

    def gaussians_device(self) -> torch.device:
        """Where the Gaussians are, wherever the model has been moved: where VEDAL keeps its per-Gaussian state."""
        return self.means.device

    # -- retention probabilities and masks -----------------------------------------------------------------------
    def head_logits(self) -> Tensor:
        """Retention logits [N] from the head (in the graph of the head's parameters)."""
        # Raw parameters, not `self.opacities`: in eval mode that property is itself masked by these logits.
        p = self.gauss_params
        return self.retention_head(*retention_inputs(p["means"], p["opacities"], p["scales"]))

    def training_head_logits(self, gated: Tensor) -> Union[Tensor, PartialLogits]:
        """What a training step reads of the head: the logits of the gated Gaussians (`RetentionHead.on_rows`)."""
        p = self.gauss_params
        return self.retention_head.on_rows(*retention_inputs(p["means"], p["opacities"], p["scales"]), rows=gated,
                                           count=self.vedal.gated_count(self.num_points))

    @torch.no_grad()
    def retention_logits(self) -> Tensor:
        """Retention logits [N] as inference sees them: frozen at the hard removal, else the head's."""
        return self.vedal.inference_logits(self.head_logits, self.num_points)

    def gated_mask(self) -> Tensor:
        return self.vedal.gated_mask(self.num_points)

    @torch.no_grad()
    def hidden_mask(self, threshold: Optional[float] = None) -> Tensor:
        """[N] bool: Gaussians the deterministic inference mask drops (gated and p < threshold)."""
        gated = self.gated_mask()
        if not self.vedal.any_gated(self.num_points) and self.vedal.target() is None:
            return gated
        threshold = float(self.retention_threshold_slider.value) if threshold is None else threshold
        return self.vedal.hidden_mask(self.retention_logits(), gated, threshold)

    @property
    def opacities(self) -> Tensor:
        raw = super().opacities
        # Training renders every Gaussian (gated ones through the sampled mask); renders with overrides (the
        # 'retention' output) show the hidden Gaussians too, coloured by p.
        if self.training or self._render_overrides:
            return raw
        hidden = self.hidden_mask()
        if not hidden.any():
            return raw
        return torch.where(hidden[:, None], torch.full_like(raw, HIDDEN_OPACITY_LOGIT), raw)

    # -- schedule ------------------------------------------------------------------------------------------------
    def step_post_backward(self, step: int) -> None:
        if not self.vedal.densification_allowed(step):
            return  # no densification, no opacity reset during fine-tuning
        super().step_post_backward(step)

    def get_training_callbacks(self, training_callback_attributes: TrainingCallbackAttributes) -> List[TrainingCallback]:
        datamanager = training_callback_attributes.pipeline.datamanager
        self._train_images = datamanager.cached_train
        # After `cached_train`: caching undistorts the images and rewrites these cameras' intrinsics to match.
        self._train_cameras = datamanager.train_dataset.cameras
        trainer = training_callback_attributes.trainer
        if trainer is not None:
            first_step = getattr(trainer, "_start_step", 0)
            warning = self.vedal.schedule_warning(first_step, first_step + trainer.config.max_num_iterations - 1)
            if warning:
                CONSOLE.print(f"[yellow]vedal-gs: {warning}")
        callbacks = super().get_training_callbacks(training_callback_attributes)
        callbacks.append(TrainingCallback([TrainingCallbackLocation.BEFORE_TRAIN_ITERATION], self.before_step))
        callbacks.append(TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN_ITERATION], self.hard_prune_if_due))
        return callbacks

    def before_step(self, step: int) -> None:
        was_started = self.vedal.finetuning_started
        refreshed = self.vedal.before_step(step, self.num_points, len(self._train_images), self.measure_importance)
        if self.vedal.finetuning_started and not was_started:
            with torch.no_grad():
                self.retention_head.set_bounds(*robust_bounds(self.means))
            mode = "asynchronous gate" if self.config.vedal.use_gate else "every Gaussian gated (no gate)"
            CONSOLE.print(f"[bold]vedal-gs[/bold]: fine-tuning from step {step} with {self.num_points} Gaussians ({mode})")
        if refreshed:
            self.log_state(step)
            self.refresh_kept_count()

    def hard_prune_if_due(self, step: int) -> None:
        if self.vedal.hard_prune_due(step):
            self.hard_prune(step)

    def target_before_training(self, first_step: int) -> Optional[Tuple[int, int]]:
        """(Gaussians the target asks for, Gaussians it is taken from) where both are known before training (the
        trainer refuses what cannot be reached): once fine-tuning has started, or when it starts at the first step,
        the count no longer grows."""
        vedal, config = self.vedal, self.config.vedal
        if vedal.pruned:
            return None
        if vedal.finetuning_started:
            wanted = vedal.target()
            return None if wanted is None else (wanted, vedal.start_gaussians)
        if first_step >= config.finetune_start_step:
            wanted = target_count(config.target_gaussians, config.target_fraction, self.num_points)
            return None if wanted is None else (wanted, self.num_points)
        return None

    @torch.no_grad()
    def hard_prune(self, step: int) -> int:
        """Remove what the controller's removal mask selects (gated with p < 0.5, or down to the target by p);
        returns how many went."""
        logits = self.head_logits().detach()
        gated = self.gated_mask()
        prune = self.vedal.hard_prune_mask(logits, gated)
        n_before = self.num_points
        try:
            removed = remove_gaussians(
                self.gauss_params, self.optimizers, self.strategy_state, prune,
                extra_states=self.vedal.per_gaussian_states(n_before), min_remaining=self.config.vedal.min_gaussians,
            )
        except PruningRefused as err:
            CONSOLE.print(f"[yellow]vedal-gs: hard removal refused ({err}); the model is kept unpruned")
            self.vedal.removal_refused = True  # once per run, not again at every remaining step
            return 0
        self.vedal.finish(logits[~prune], step=step, gaussians_before=n_before)
        CONSOLE.print(
            f"[bold]vedal-gs[/bold]: hard removal at step {step}: removed {removed} of {n_before} Gaussians, "
            f"{self.num_points} remain (gated fraction was {float(gated.float().mean()):.3f}"
            + (f", gate reversal rate {self.vedal.gate.reversal_rate:.4f})" if self.config.vedal.use_gate else ", no gate)")
        )
        writer.put_scalar("vedal/removed", removed, step)
        self.log_state(step)
        self._hard_removal = (step, n_before, self.num_points)
        self.refresh_kept_count()
        return removed

    def first_step_from_trained_gaussians(self) -> int:
        # A PLY trained elsewhere skips the densification phase: fine-tuning starts at the run's first step.
        return int(self.config.vedal.finetune_start_step)

    # -- importance ----------------------------------------------------------------------------------------------
    def ground_truth(self, view: int, downscale: int) -> Tensor:
        """[H, W, 3] float training image of a view, composited on the background as the loss sees it."""
        image = self._train_images[view]["image"]
        image = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
        image = self.composite_with_background(image.to(self.device), self.background_color.to(self.device))
        return resize_image(image, downscale) if downscale > 1 else image

    @torch.no_grad()
    def measure_importance(self, views: List[int]) -> Tensor:
        """[N] float64: the increase of the mean per-pixel, per-channel L1 of each view when Gaussian i alone is
        removed, summed over `views` (exact leave-one-out against the training images).

        Measured on the unmasked model: with the sampled or deterministic mask applied, a Gaussian the head
        currently hides would have no measurable importance and could never argue its way back. Masks that come
        with undistorted images are not applied (leave-one-out has no pixel weights); their pixels then count.
        """
        d = self.config.vedal.importance_downscale
        cameras = self._train_cameras[torch.tensor(views, dtype=torch.long)].to(self.device)
        cameras.rescale_output_resolution(1.0 / d)
        view_batch = views_from_cameras(cameras, self.device, self.background_color.to(self.device))
        gt = torch.stack([self.ground_truth(v, d) for v in views])
        if gt.shape[1:3] != (view_batch.height, view_batch.width):
            raise RuntimeError(f"downscaled images are {tuple(gt.shape[1:3])}, cameras {(view_batch.height, view_batch.width)}")
        total = leave_one_out_importance(self.gaussians(), view_batch, gt_images=gt, loss="l1", progress=False)
        return total / (view_batch.height * view_batch.width * 3)

    # -- rendering and loss ----------------------------------------------------------------------------------------
    def get_outputs(self, camera: Cameras) -> Dict:
        if self.training and self.vedal.finetuning_active() and not self._render_overrides:
            gated = self.gated_mask()
            masked, logits = self.vedal.training_opacity_logits(
                self.gauss_params["opacities"].squeeze(-1), lambda: self.training_head_logits(gated), gated, self.step)
            if masked is not None:
                with self.rendering_with(opacities=masked[:, None]):
                    outputs = super().get_outputs(camera)
                return outputs if logits is None else {**outputs, "retention_logits": logits}  # for the regulariser
        outputs = super().get_outputs(camera)
        if not self.training and not self._render_overrides and self.viewer_outputs.attached:
            self.refresh_kept_count()
            add_output_if_shown(outputs, "retention", self.viewer_outputs,
                                lambda: self.render_value_image(camera, torch.sigmoid(self.retention_logits())))
        return outputs

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, Tensor]:
        loss_dict = super().get_loss_dict(outputs, batch, metrics_dict)
        if self.training:
            loss_dict.update(self.vedal.regulariser(outputs.get("retention_logits"), self.gated_mask(), self.step))
        return loss_dict

    def get_param_groups(self) -> Dict[str, List[torch.nn.Parameter]]:
        return {**super().get_param_groups(), "retention_head": list(self.retention_head.parameters())}

    # -- logging and viewer ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def log_state(self, step: int) -> None:
        for name, value in self.vedal.scalars(self.retention_logits(), self.gated_mask(), step).items():
            writer.put_scalar(f"vedal/{name}", value, step)

    @torch.no_grad()
    def kept_count_inputs(self) -> Tuple[int, Tensor, Tensor]:
        """(number of Gaussians, retention logits, gated mask): what the count is computed from."""
        gated = self.gated_mask()
        logits = self.retention_logits() if gated.any() else torch.zeros(gated.shape, device=gated.device)
        return self.num_points, logits, gated

    def refresh_kept_count(self) -> None:
        """Take the count's inputs from the model and show the count; by the thread that holds the model."""
        self._kept_count_inputs = self.kept_count_inputs()
        self.update_kept_count_text()

    def threshold_moved(self, threshold: float) -> None:
        """The slider moved (viser's thread, maybe while a frame renders): count at once, then ask for a frame."""
        self.update_kept_count_text(threshold)
        self.viewer_outputs.rerender()

    def kept_count_description(self, threshold: Optional[float] = None) -> str:
        """'<shown> of <N> shown' at `threshold` (default: the slider's), and why the others are not shown. Counted
        from the inputs of the last refresh (a render or a training refresh) when there was one: the slider's
        thread must not read the model while training changes it."""
        n, logits, gated = self._kept_count_inputs or self.kept_count_inputs()
        threshold = float(self.retention_threshold_slider.value) if threshold is None else threshold
        hidden_mask = self.vedal.hidden_mask(logits, gated, threshold)
        hidden = int(hidden_mask.sum())
        if not self.vedal.finetuning_started:
            why = f"none gated before fine-tuning (step {self.config.vedal.finetune_start_step:,})"
        else:
            hidden_gated = int((hidden_mask & gated).sum())
            why = f"{hidden_gated:,} of the {int(gated.sum()):,} gated hidden at {threshold:.2f}"
            if hidden > hidden_gated:  # only a target removes ungated Gaussians (by importance, the gate short)
                why += f" and {hidden - hidden_gated:,} ungated, by importance, for the target"
        if self.vedal.pruned and self._hard_removal is not None:
            step, before, after = self._hard_removal
            why += f"; hard removal at step {step:,}: {before:,} -> {after:,}"
        elif self.vedal.pruned:
            wanted = self.vedal.target()
            rule = "gated, p < 0.5" if wanted is None else f"to the target of {wanted:,}"
            why += f"; the hard removal ({rule}) already ran: checkpoints do not keep the count before it"
        return f"{n - hidden:,} of {n:,} shown ({why})"

    def update_kept_count_text(self, threshold: Optional[float] = None) -> None:
        self.kept_count_text.content = f"**Gaussians shown**: {self.kept_count_description(threshold)}"

    def get_image_metrics_and_images(self, outputs, batch):
        metrics, images = super().get_image_metrics_and_images(outputs, batch)
        metrics["retained_gaussians"] = float(self.num_points - int(self.hidden_mask().sum()))
        return metrics, images

    def pruning_report(self) -> Dict[str, Any]:
        """What the run has pruned so far, as the trainer writes it to `pruning.json` in the run's folder."""
        return {"method": "vedal-gs", **self.vedal.report(), "target_gaussians": self.vedal.target(),
                "final_gaussians": int(self.num_points)}

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def get_extra_state(self) -> Dict[str, Any]:
        # The importance time sits beside VEDAL's state, not in it: a resumed run must repeat that state exactly,
        # and wall-clock time never repeats.
        return {**super().get_extra_state(), "vedal": self.vedal.state_dict(),
                "vedal_importance_seconds": float(self.vedal.importance_seconds)}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        super().set_extra_state(state)
        if state.get("vedal") is None:  # another method's checkpoint (see with_method_state)
            self.vedal.reset()
            return
        try:
            self.vedal.load_state_dict(state["vedal"])
        except ValueError as err:
            raise InputError(str(err)) from None
        self.vedal.importance_seconds = float(state.get("vedal_importance_seconds", 0.0))
        removal = self.vedal.hard_prune_record
        if removal is not None:
            self._hard_removal = (removal["step"], removal["gaussians_before"], removal["gaussians_after"])

    def with_method_state(self, state: Dict[str, Any]) -> Dict[str, Any]:
        extra = state.get("_extra_state") or {}
        if "vedal" in extra:
            return state
        # Another method's checkpoint: VEDAL starts from scratch; fine-tuning begins at the first training step at
        # or after finetune_start_step.
        head_state = {f"retention_head.{k}": v for k, v in self.retention_head.state_dict().items()}
        CONSOLE.print("vedal-gs: loaded a checkpoint without VEDAL state; the gate and the head start afresh")
        return {**head_state, **state, "_extra_state": {**extra, "vedal": None}}
