"""`vedal-gs`: VEDAL on splatfacto. Train, then fine-tune with a convergence gate and a variational retention head,
then remove the Gaussians the head lets go.

Schedule (steps of one `ns-train` run):
- before `finetune_start_step`: ordinary splatfacto training, densification and opacity resets included;
- from `finetune_start_step`: densification and opacity resets stop. Every `importance_every` steps the exact
  leave-one-out importance of every Gaussian is measured on a few training views; once the last refreshes have
  covered every training view, their average Delta_i goes into the `ConvergenceGate` at each refresh. Gated
  Gaussians render with opacity o_i z_i, z_i ~ BinaryConcrete(logit p_i, tau), and the loss gains
  kl_weight * sum_{gated} KL(Bern(p_i) || Bern(pi)) + sparsity_weight * mean_i p_i;
- at `hard_prune_step` (after that step's update): every gated Gaussian with p_i < 0.5 is removed.

Importance units: Delta_i is the increase of the reconstruction part of splatfacto's loss, (1 - ssim_lambda) x
the mean per-pixel, per-channel L1 of one view, when Gaussian i alone is removed, averaged over all training
views. In these units Proposition 1 says a gated Gaussian ends below p = 0.5 when
Delta_i < kl_weight * log((1 - pi) / pi), so `kl_weight` is directly a loss increase per Gaussian.

Why the gate sees a one-pass window rather than each refresh's views: a Gaussian is visible in only some views,
so the importance of a random handful of views swings by more than its own size from refresh to refresh. On the
default scene (1500 steps, 285k Gaussians, the model held fixed) feeding the gate random 4, 8 or 16-view batches
left only 13-22% of the Gaussians ever passing its convergence test, with 25-40% reversals (the paper: under 2%).
Views are therefore visited in one fixed shuffled order, `importance_views` per refresh, and the gate gets the
mean over the last pass, which contains every training view once: its changes are the model's, not the
sampling's.

Deviation from the paper, on purpose: only *gated* Gaussians with p < 0.5 are removed, not every Gaussian with
p < 0.5. Only gated Gaussians are rendered through the mask, so the reconstruction loss constrains p of gated
Gaussians alone; p of an ungated Gaussian is whatever the shared head extrapolates from its neighbours, and
removing on it would drop Gaussians that the gate judged important or not yet settled.

Two smaller choices: the regulariser is added only while some Gaussian is gated (see `get_loss_dict`), and after
the hard removal VEDAL is over: p is frozen, nothing is sampled, and any remaining steps train the survivors as
plain splatfacto without densification.

Inference (the model in eval mode: ns-eval, ns-viewer, ns-export, the viewer during training) uses the
deterministic mask: a gated Gaussian with p below the viewer's retention threshold (0.5 unless moved) is hidden.
Hidden Gaussians are reported through `opacities` as a logit far below logit(1/255), which is how
`ns-export gaussian-splat` (and every rasterizer) already recognises Gaussians that contribute nothing: the
export then holds only the retained Gaussians even before the hard removal, without any change to nerfstudio.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple, Type

import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.models.splatfacto import resize_image
from nerfstudio.utils import writer
from nerfstudio.utils.rich_utils import CONSOLE
from nerfstudio.viewer.viewer_elements import ViewerSlider, ViewerText
from torch import Tensor

from nerfstudio_pruning.errors import InputError
from nerfstudio_pruning.gate import ConvergenceGate, ConvergenceGateConfig
from nerfstudio_pruning.importance import leave_one_out_importance
from nerfstudio_pruning.methods.base import (
    PortableSplatfactoModel,
    PortableSplatfactoModelConfig,
    camera_tensors,
    score_output_toggle,
    turbo_colours,
    viewer_wants,
)
from nerfstudio_pruning.removal import remove_gaussians
from nerfstudio_pruning.retention_head import (
    RetentionHead,
    RetentionHeadConfig,
    binary_concrete,
    gaussian_features,
    hard_mask,
    retention_regulariser,
    robust_bounds,
    temperature,
)

# Far below logit(1/255) = -5.54, where the exporter and the rasterizers drop a Gaussian, yet finite, so the
# exporter's NaN/Inf filter does not report the hidden Gaussians as broken; sigmoid(-100) is ~4e-44.
HIDDEN_OPACITY_LOGIT = -100.0

EXTRA_STATE_FORMAT = 2


class ImportancePassWindow:
    """Importance of the last `slots` refreshes, one slot per refresh: per Gaussian, the sum over the slot's
    views of each view's mean L1 change, and how many views that was."""

    def __init__(self, slots: int, num_gaussians: int, device: torch.device) -> None:
        self.slots = slots
        self.sums = torch.zeros(slots, num_gaussians, dtype=torch.float64, device=device)
        self.view_counts = [0] * slots

    @property
    def num_gaussians(self) -> int:
        return self.sums.shape[1]

    @property
    def full(self) -> bool:
        return all(count > 0 for count in self.view_counts)

    def add(self, refresh_index: int, view_sums: Tensor, n_views: int) -> None:
        slot = refresh_index % self.slots
        self.sums[slot] = view_sums.to(self.sums)
        self.view_counts[slot] = n_views

    def mean_per_view(self) -> Tensor:
        """[N] float32 mean L1 change of a view, averaged over every view in the window."""
        return (self.sums.sum(dim=0) / max(sum(self.view_counts), 1)).float()

    def select(self, keep: Tensor) -> None:
        self.sums = self.sums[:, keep.to(self.sums.device)]


@dataclass
class VedalGSModelConfig(PortableSplatfactoModelConfig):
    """VEDAL: prune splatfacto with an EMA importance gate and a variational retention head."""

    _target: Type = field(default_factory=lambda: VedalGSModel)

    finetune_start_step: int = 7000
    """First step of the VEDAL fine-tuning (the paper: 7k steps of ordinary training first). From here on,
    densification and opacity resets are off and the gate and the retention head are active."""
    hard_prune_step: int = 29999
    """Step after whose update every gated Gaussian with p < 0.5 is removed: the last step of the default 30k
    schedule. Set it to max-num-iterations - 1 when shortening a run; a run that stops earlier is still pruned
    at export and at inference by the deterministic mask."""

    kl_weight: float = 1e-6
    """lambda_KL, the main rate-distortion knob: larger prunes more. In units of Delta (the increase of
    (1 - ssim_lambda) x mean per-pixel L1 of a view when one Gaussian is removed), gated Gaussians with
    Delta < kl_weight * log((1 - pi) / pi) = 1.39e-6 by default are let go (Proposition 1). On the default
    scene with 4k Gaussians that threshold sits near the median Delta (1.8e-6), so about half of the gated
    Gaussians go. Delta shrinks roughly as 1/(number of Gaussians per image): at 285k Gaussians its median was
    7e-10 and every gated Gaussian went. Tensorboard logs Delta's quantiles (vedal/importance_q50, _q90) next to
    the threshold (vedal/prune_threshold_importance) to set this per scene."""
    prior_keep_probability: float = 0.2
    """Prior retention probability pi of the KL term: the paper's operating point of 5.2x fewer Gaussians keeps
    ~19%. With kl_weight it sets the prune threshold on Delta (see kl_weight)."""
    sparsity_weight: float = 1e-3
    """lambda_s of the weak global term lambda_s * mean_i p_i; per Gaussian it moves the Proposition 1 threshold
    by lambda_s / N, negligible against kl_weight except on tiny models."""
    initial_keep_probability: float = 0.99
    """p of every Gaussian when the head is created: near 1 the masked render starts equal to the trained one."""
    temperature_start: float = 1.0
    """Binary Concrete temperature at the start of fine-tuning (smooth samples, informative gradients)."""
    temperature_end: float = 0.1
    """Temperature reached at hard_prune_step (geometric anneal): nearly binary samples, as at inference."""

    importance_every: int = 100
    """Steps between importance refreshes. The gate gets its first observation once a pass over the training
    views is complete (ceil(views / importance_views) refreshes) and needs min_refreshes (10) before anything is
    gated: with 100, on a scene of ~40-50 training views the first Gaussians become eligible ~1.5k steps into the
    23k-step fine-tuning (~3.4k with 200 views), leaving most of it for the head to settle."""
    importance_views: int = 8
    """Training views per refresh. On the CPU path at 285k Gaussians one view's leave-one-out costs about two
    training steps, so 8 views every 100 steps adds ~15% to the training time; a pass over a 40-50-view scene
    takes 6 refreshes."""
    importance_downscale: int = 1
    """Measure Delta at 1/importance_downscale of the training resolution. 1: on the default scene at 285k
    Gaussians, half resolution took as long (projecting every Gaussian dominates) and ranked the Gaussians
    differently (Spearman 0.47 with full resolution; 0.97 at 4k Gaussians), since many are below a pixel."""
    importance_seed: int = 0
    """Seed of the fixed shuffled order in which the refreshes visit the training views."""
    use_gate: bool = True
    """False: synchronous variational pruning, the paper's ablation: every Gaussian is gated (under the KL prior
    and the sampled mask) from the start of fine-tuning and no importance is measured."""
    gate: ConvergenceGateConfig = field(default_factory=ConvergenceGateConfig)
    """Convergence gate: EMA decay, convergence test, adaptive threshold and eligibility cap."""
    min_gaussians: int = 64
    """A hard removal that would leave fewer Gaussians than this is refused (the model is kept as is)."""

    def __post_init__(self) -> None:
        if self.finetune_start_step < 0:
            raise ValueError(f"finetune_start_step must be >= 0, got {self.finetune_start_step}")
        if self.hard_prune_step <= self.finetune_start_step:
            raise ValueError(
                f"hard_prune_step ({self.hard_prune_step}) must come after finetune_start_step ({self.finetune_start_step})"
            )
        if self.importance_every < 1 or self.importance_views < 1 or self.importance_downscale < 1:
            raise ValueError("importance_every, importance_views and importance_downscale must all be >= 1")
        if not 0.0 < self.prior_keep_probability < 1.0 or not 0.0 < self.initial_keep_probability < 1.0:
            raise ValueError("prior_keep_probability and initial_keep_probability must be in (0, 1)")
        if self.kl_weight <= 0 or self.sparsity_weight < 0:
            raise ValueError("kl_weight must be > 0 and sparsity_weight >= 0")
        if self.temperature_start <= 0 or self.temperature_end <= 0:
            raise ValueError("temperatures must be > 0")

    def head_config(self) -> RetentionHeadConfig:
        return RetentionHeadConfig(
            init_keep_prob=self.initial_keep_probability,
            prior_pi=self.prior_keep_probability,
            lambda_kl=self.kl_weight,
            lambda_sparsity=self.sparsity_weight,
            tau_start=self.temperature_start,
            tau_end=self.temperature_end,
            anneal_steps=self.hard_prune_step - self.finetune_start_step,
        )


class VedalGSModel(PortableSplatfactoModel):
    config: VedalGSModelConfig

    def populate_modules(self) -> None:
        super().populate_modules()
        self.head_config = self.config.head_config()
        self.retention_head = RetentionHead(self.head_config)
        self.reset_method_state()
        self._training_logits: Optional[Tensor] = None
        self._show_hidden = False
        self._removal_refused = False
        self._train_cameras: Optional[Cameras] = None
        self._train_images: Optional[List[Dict[str, Tensor]]] = None
        self._importance_summary: Dict[str, float] = {}

        self.retention_threshold_slider = ViewerSlider(
            "Retention threshold", 0.5, 0.01, 0.99, 0.01,
            cb_hook=lambda _: self.update_kept_count_text(),
            hint="Gated Gaussians with retention probability p below this are hidden (0.5 is what the hard removal uses)",
        )
        self.kept_count_text = ViewerText(
            "Gaussians kept", "", disabled=True, hint="Gaussians that remain at the retention threshold"
        )
        # 'retention' output: every Gaussian, hidden ones included, coloured by p (blue: about to go, red: kept)
        self.retention_toggle = score_output_toggle("Retention output (p per Gaussian)")

    def reset_method_state(self) -> None:
        """VEDAL's state before fine-tuning starts: that of a new model, and of one loaded from another method's
        checkpoint (the head keeps whatever it was given)."""
        self.gate = ConvergenceGate(self.config.gate, 0)
        # -1: fine-tuning has not started. Not the configured step: a run resumed from another method's
        # checkpoint starts it at its first step, and the temperature anneal runs from there.
        self.finetune_started_at = -1
        self.last_refresh_step = -1
        self.refresh_count = 0
        self.pruned = False
        # After the hard removal p is frozen: the head standardises its features over the Gaussians present, so
        # evaluated after the removal it would move p of the survivors.
        self.frozen_retention_logits: Optional[Tensor] = None
        self.importance_window: Optional[ImportancePassWindow] = None

    # -- retention probabilities and masks -----------------------------------------------------------------------
    def head_logits(self) -> Tensor:
        """Retention logits [N] from the head (in the graph of the head's parameters)."""
        # Raw parameters, not `self.opacities`: in eval mode that property is itself masked by these logits.
        means = self.gauss_params["means"].detach()
        features = gaussian_features(self.gauss_params["opacities"], self.gauss_params["scales"]).detach()
        # The head standardises its features over all Gaussians, so one Gaussian with a NaN parameter (splatfacto
        # occasionally diverges a few) would make every p NaN. Such a Gaussian gets neutral inputs instead.
        if not torch.isfinite(features).all() or not torch.isfinite(means).all():
            finite_features = torch.isfinite(features)
            typical = torch.where(finite_features, features, 0.0).sum(0) / finite_features.sum(0).clamp_min(1)
            features = torch.where(finite_features, features, typical)
            means = torch.where(torch.isfinite(means), means, 0.0)
        return self.retention_head(means, features)

    @torch.no_grad()
    def retention_logits(self) -> Tensor:
        """Retention logits [N] as inference sees them: frozen at the hard removal, else the head's."""
        frozen = self.frozen_retention_logits
        if frozen is not None and frozen.numel() == self.num_points:
            return frozen.to(self.device)
        return self.head_logits()

    def gated_mask(self) -> Tensor:
        """[N] bool: Gaussians under the KL prior and the sampled mask (and the only ones ever removed)."""
        n = self.num_points
        if self.finetune_started_at < 0:
            return torch.zeros(n, dtype=torch.bool, device=self.device)
        if not self.config.use_gate:
            return torch.ones(n, dtype=torch.bool, device=self.device)
        if self.gate.num_gaussians != n:
            return torch.zeros(n, dtype=torch.bool, device=self.device)
        return self.gate.eligible.to(self.device)

    def retention_threshold(self) -> float:
        return float(self.retention_threshold_slider.value)

    @torch.no_grad()
    def hidden_mask(self, threshold: Optional[float] = None) -> Tensor:
        """[N] bool: Gaussians the deterministic inference mask drops (gated and p < threshold)."""
        gated = self.gated_mask()
        if not gated.any():
            return gated
        threshold = self.retention_threshold() if threshold is None else threshold
        return gated & ~hard_mask(self.retention_logits(), threshold)

    @property
    def opacities(self) -> Tensor:
        raw = self.gauss_params["opacities"]
        if self.training or self._show_hidden:
            return raw
        hidden = self.hidden_mask()
        if not hidden.any():
            return raw
        return torch.where(hidden[:, None], torch.full_like(raw, HIDDEN_OPACITY_LOGIT), raw)

    @contextmanager
    def hidden_gaussians_shown(self) -> Iterator[None]:
        self._show_hidden = True
        try:
            yield
        finally:
            self._show_hidden = False

    def finetuning_active(self) -> bool:
        return self.finetune_started_at >= 0 and not self.pruned

    def current_temperature(self) -> float:
        start = max(self.finetune_started_at, 0)
        return temperature(
            self.step - start, self.config.temperature_start, self.config.temperature_end,
            max(self.config.hard_prune_step - start, 1),
        )

    def render_opacities(self) -> Tensor:
        opacities = super().render_opacities()
        if not (self.training and self.finetuning_active()) or self._colour_override is not None:
            return opacities
        gated = self.gated_mask()
        if not gated.any():
            return opacities
        logits = self.head_logits()
        self._training_logits = logits
        z = binary_concrete(logits, self.current_temperature())
        return opacities * torch.where(gated, z, torch.ones_like(z))

    # -- schedule ------------------------------------------------------------------------------------------------
    def step_post_backward(self, step: int) -> None:
        if self.finetune_started_at >= 0 or step >= self.config.finetune_start_step:
            return  # no densification, no opacity reset during fine-tuning
        super().step_post_backward(step)

    def get_training_callbacks(self, training_callback_attributes: TrainingCallbackAttributes) -> List[TrainingCallback]:
        datamanager = training_callback_attributes.pipeline.datamanager
        self._train_images = datamanager.cached_train
        # After `cached_train`: caching undistorts the images and rewrites these cameras' intrinsics to match.
        self._train_cameras = datamanager.train_dataset.cameras
        trainer = training_callback_attributes.trainer
        if trainer is not None and not self.pruned:
            first_step = getattr(trainer, "_start_step", 0)
            last_step = first_step + trainer.config.max_num_iterations - 1
            if self.finetune_started_at < 0 and first_step >= self.config.hard_prune_step:
                CONSOLE.print(
                    f"[yellow]vedal-gs: this run starts at step {first_step}, past hard_prune_step "
                    f"{self.config.hard_prune_step}: fine-tuning would end at once. Set --pipeline.model.hard-prune-step "
                    "(and finetune-start-step) relative to the loaded step."
                )
            elif last_step < self.config.hard_prune_step:
                CONSOLE.print(
                    f"[yellow]vedal-gs: this run ends at step {last_step}, before hard_prune_step "
                    f"{self.config.hard_prune_step}: nothing is removed, but exports and renders still drop the "
                    "Gaussians the mask hides."
                )
        callbacks = super().get_training_callbacks(training_callback_attributes)
        callbacks.append(TrainingCallback([TrainingCallbackLocation.BEFORE_TRAIN_ITERATION], self.before_step))
        callbacks.append(TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN_ITERATION], self.hard_prune_if_due))
        return callbacks

    def before_step(self, step: int) -> None:
        if self.pruned:
            return
        if self.finetune_started_at < 0 and step >= self.config.finetune_start_step:
            self.start_finetuning(step)
        if self.finetune_started_at >= 0 and (
            self.last_refresh_step < 0 or step - self.last_refresh_step >= self.config.importance_every
        ):
            self.refresh(step)

    @torch.no_grad()
    def start_finetuning(self, step: int) -> None:
        self.retention_head.set_bounds(*robust_bounds(self.means))
        self.gate = ConvergenceGate(self.config.gate, self.num_points, self.device)
        self.finetune_started_at = step
        CONSOLE.print(
            f"[bold]vedal-gs[/bold]: fine-tuning from step {step} with {self.num_points} Gaussians "
            f"({'asynchronous gate' if self.config.use_gate else 'every Gaussian gated (no gate)'})"
        )

    def refresh(self, step: int) -> None:
        """Measure importance on this refresh's views, update the gate once a pass is complete (when gating is
        on), and log the state of the method."""
        if self.config.use_gate:
            n = self.num_points
            if self.gate.num_gaussians != n:
                CONSOLE.print(
                    f"[yellow]vedal-gs: gate holds {self.gate.num_gaussians} Gaussians, the model {n}; starting the gate afresh"
                )
                self.gate = ConvergenceGate(self.config.gate, n, self.device)
            slots = self.refreshes_per_pass()
            window = self.importance_window
            if window is None or window.num_gaussians != n or window.slots != slots:
                window = self.importance_window = ImportancePassWindow(slots, n, self.device)
            views = self.refresh_views(self.refresh_count)
            window.add(self.refresh_count, self.measure_importance(views), len(views))
            if window.full:
                importance = (1.0 - self.config.ssim_lambda) * window.mean_per_view()
                self.gate.update(importance, step)
                self._importance_summary = {
                    f"importance_q{int(100 * q)}": float(importance.kthvalue(max(1, math.ceil(q * n))).values)
                    for q in (0.5, 0.9)
                }
        self.last_refresh_step = step
        self.refresh_count += 1
        self.log_state(step)
        self.update_kept_count_text()

    def hard_prune_if_due(self, step: int) -> None:
        if self.pruned or self._removal_refused or self.finetune_started_at < 0 or step < self.config.hard_prune_step:
            return
        self.hard_prune(step)

    @torch.no_grad()
    def hard_prune(self, step: int) -> int:
        """Remove every gated Gaussian with p < 0.5; returns how many went."""
        logits = self.head_logits().detach()
        gated = self.gated_mask()
        prune = gated & ~hard_mask(logits, 0.5)
        n_before = self.num_points
        extra_states = [s for s in (self.gate, self.importance_window) if s is not None and s.num_gaussians == n_before]
        try:
            removed = remove_gaussians(
                self.gauss_params, self.optimizers, self.strategy_state, prune,
                extra_states=extra_states, min_remaining=self.config.min_gaussians,
            )
        except ValueError as err:
            CONSOLE.print(f"[yellow]vedal-gs: hard removal refused ({err}); the model is kept unpruned")
            self._removal_refused = True  # once per run, not again at every remaining step
            return 0
        self.frozen_retention_logits = logits[~prune]
        self.pruned = True
        self._training_logits = None
        CONSOLE.print(
            f"[bold]vedal-gs[/bold]: hard removal at step {step}: removed {removed} of {n_before} Gaussians, "
            f"{self.num_points} remain (gated fraction was {float(gated.float().mean()):.3f}, "
            f"gate reversal rate {self.gate.reversal_rate:.4f})"
        )
        writer.put_scalar("vedal/removed", removed, step)
        self.log_state(step)
        self.update_kept_count_text()
        return removed

    # -- importance ----------------------------------------------------------------------------------------------
    def num_train_views(self) -> int:
        if self._train_images is None:
            raise RuntimeError("vedal-gs measures importance on the training views; they are attached by the training callbacks")
        return len(self._train_images)

    def refreshes_per_pass(self) -> int:
        return math.ceil(self.num_train_views() / self.config.importance_views)

    def refresh_views(self, refresh_index: int) -> List[int]:
        """Training views of one refresh. One shuffled order, cut into refreshes_per_pass near-equal parts and
        visited cyclically: any refreshes_per_pass consecutive refreshes see every view exactly once. (A new
        order per pass would not: the window would straddle two orders and could miss views.)"""
        n_views = self.num_train_views()
        generator = torch.Generator().manual_seed(self.config.importance_seed)
        order = torch.randperm(n_views, generator=generator)
        parts = torch.tensor_split(order, self.refreshes_per_pass())
        return parts[refresh_index % len(parts)].tolist()

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
        d = self.config.importance_downscale
        cameras = self._train_cameras[torch.tensor(views, dtype=torch.long)].to(self.device)
        cameras.rescale_output_resolution(1.0 / d)
        viewmats, Ks, width, height = camera_tensors(cameras, self.device)
        gt = torch.stack([self.ground_truth(v, d) for v in views])
        if gt.shape[1:3] != (height, width):
            raise RuntimeError(f"downscaled images are {tuple(gt.shape[1:3])}, cameras {(height, width)}")
        sh, sh_degree = self.importance_colours()
        total = leave_one_out_importance(
            self.means.detach(), self.quats.detach(), self.scales.detach(),
            self.gauss_params["opacities"].detach().squeeze(-1), sh, viewmats, Ks, width, height, sh_degree,
            gt_images=gt, loss="l1", backgrounds=self.background_color.to(self.device),
            rasterize_mode=self.config.rasterize_mode, progress=False,
        )
        return total / (height * width * 3)

    def importance_colours(self) -> Tuple[Tensor, int]:
        """SH coefficients and degree as training renders them now."""
        return self.sh_coefficients(), self.active_sh_degree()

    # -- loss ----------------------------------------------------------------------------------------------------
    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, Tensor]:
        loss_dict = super().get_loss_dict(outputs, batch, metrics_dict)
        logits, self._training_logits = self._training_logits, None
        gated = self.gated_mask()
        # Not before the gate has opened: the sparsity term would then be the head's only gradient, and Adam's
        # per-parameter normalisation turns a gradient of any size into full-size steps, so a 1e-3-weighted
        # term would pull every p down long before any Gaussian has a reconstruction reason to stay.
        if self.training and logits is not None and self.finetuning_active() and gated.any():
            _, parts = retention_regulariser(logits, gated, self.head_config)
            loss_dict["retention_kl"] = parts["kl"]
            loss_dict["retention_sparsity"] = parts["sparsity"]
        return loss_dict

    def get_param_groups(self) -> Dict[str, List[torch.nn.Parameter]]:
        groups = super().get_param_groups()
        groups["retention_head"] = list(self.retention_head.parameters())
        return groups

    # -- logging -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def log_state(self, step: int) -> None:
        logits = self.retention_logits()
        gated = self.gated_mask()
        _, parts = retention_regulariser(logits, gated, self.head_config)
        n = max(self.num_points, 1)
        scalars = {
            "num_gaussians": self.num_points,
            "gated_fraction": float(gated.sum()) / n,
            "would_remove": int((gated & ~hard_mask(logits, 0.5)).sum()),
            "reversal_count": self.gate.reversal_count,
            "reversal_rate": self.gate.reversal_rate,
            "mean_p": float(parts["mean_p"]),
            "kl_sum_gated": float(parts["kl_sum"]),
            "kl_term": float(parts["kl"]),
            "temperature": self.current_temperature(),
        }
        if gated.any():
            scalars["mean_p_gated"] = float(torch.sigmoid(logits[gated]).mean())
        # Beside the Delta quantiles, the Proposition 1 threshold shows where kl_weight cuts the distribution.
        prior = self.config.prior_keep_probability
        scalars["prune_threshold_importance"] = self.config.kl_weight * math.log((1.0 - prior) / prior)
        scalars.update(self._importance_summary)
        for name, value in scalars.items():
            writer.put_scalar(f"vedal/{name}", value, step)

    # -- viewer and evaluation -----------------------------------------------------------------------------------
    def kept_count_description(self) -> str:
        n = self.num_points
        kept = n - int(self.hidden_mask().sum())
        return f"{kept} of {n} ({100.0 * kept / max(n, 1):.1f}%)"

    def update_kept_count_text(self) -> None:
        description = self.kept_count_description()
        # Assigning a viewer element's value re-renders the viewer: assign only on a change.
        if self.kept_count_text.value != description:
            self.kept_count_text.value = description

    def get_outputs(self, camera: Cameras) -> Dict:
        outputs = super().get_outputs(camera)
        if not self.training and self._colour_override is None:
            self.update_kept_count_text()
            if viewer_wants(self.retention_toggle):
                p = torch.sigmoid(self.retention_logits())
                with self.hidden_gaussians_shown():
                    outputs["retention"] = self.render_with_colours(camera, turbo_colours(p))
        return outputs

    def get_image_metrics_and_images(self, outputs, batch):
        metrics, images = super().get_image_metrics_and_images(outputs, batch)
        metrics["retained_gaussians"] = float(self.num_points - int(self.hidden_mask().sum()))
        return metrics, images

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def get_extra_state(self) -> Dict[str, Any]:
        """Method state in plain tensors and numbers, so checkpoints load with torch.load(weights_only=True).

        The importance window is saved too ([slots, N] float64, ~5 refreshes' worth of one number per Gaussian;
        a fifth of the Gaussians' own size): without it a resumed gate would wait a whole pass for its next
        observation and open later than in the uninterrupted run."""
        frozen = self.frozen_retention_logits
        window = self.importance_window
        vedal = {
            "format": EXTRA_STATE_FORMAT,
            "gate": self.gate.state_dict(),
            "finetune_started_at": int(self.finetune_started_at),
            "last_refresh_step": int(self.last_refresh_step),
            "refresh_count": int(self.refresh_count),
            "pruned": bool(self.pruned),
            "frozen_retention_logits": torch.zeros(0) if frozen is None else frozen.detach().cpu().clone(),
            "importance_sums": torch.zeros(0, dtype=torch.float64) if window is None else window.sums.cpu().clone(),
            "importance_view_counts": [] if window is None else list(window.view_counts),
        }
        return {**super().get_extra_state(), "vedal": vedal}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        super().set_extra_state(state)
        vedal = state["vedal"]
        if vedal is None:  # another method's checkpoint (see with_method_state)
            self.reset_method_state()
            return
        if int(vedal.get("format", -1)) != EXTRA_STATE_FORMAT:
            raise InputError(f"the checkpoint's vedal-gs state has format {vedal.get('format')!r}; this version reads "
                             f"format {EXTRA_STATE_FORMAT}")
        self.gate = ConvergenceGate(self.config.gate, 0, self.device)
        self.gate.load_state_dict(vedal["gate"])
        self.finetune_started_at = int(vedal["finetune_started_at"])
        self.last_refresh_step = int(vedal["last_refresh_step"])
        self.refresh_count = int(vedal["refresh_count"])
        self.pruned = bool(vedal["pruned"])
        frozen = vedal["frozen_retention_logits"]
        self.frozen_retention_logits = frozen.to(self.device).float() if frozen.numel() else None
        sums, counts = vedal["importance_sums"], vedal["importance_view_counts"]
        self.importance_window = None
        if sums.numel():
            self.importance_window = ImportancePassWindow(sums.shape[0], sums.shape[1], self.device)
            self.importance_window.sums = sums.to(self.device, torch.float64)
            self.importance_window.view_counts = [int(c) for c in counts]

    def with_method_state(self, state: Dict[str, Any]) -> Dict[str, Any]:
        extra = state.get("_extra_state") or {}
        if "vedal" in extra:
            return state
        # Another method's checkpoint: VEDAL starts from scratch; fine-tuning begins at the first training step at
        # or after finetune_start_step.
        head_state = {f"retention_head.{k}": v for k, v in self.retention_head.state_dict().items()}
        CONSOLE.print("vedal-gs: loaded a checkpoint without VEDAL state; the gate and the head start afresh")
        return {**head_state, **state, "_extra_state": {**extra, "vedal": None}}
