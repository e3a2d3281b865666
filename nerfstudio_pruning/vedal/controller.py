"""Everything VEDAL decides during a run, as one plain object with step hooks and a state dict.

Schedule (steps of one training run):
- before `finetune_start_step`: ordinary training, densification and opacity resets included;
- from `finetune_start_step`: densification and opacity resets stop. Every `importance_every` steps the exact
  leave-one-out importance of every Gaussian is measured on a few training views; once the last refreshes have
  covered every training view, their average Delta_i goes into the `ConvergenceGate` at each refresh. Gated
  Gaussians render with opacity o_i z_i, z_i ~ BinaryConcrete(logit p_i, tau), and the loss gains
  kl_weight * sum_{gated} KL(Bern(p_i) || Bern(pi)) + sparsity_weight * mean_i p_i;
- at `hard_prune_step` (after that step's update): every gated Gaussian with p_i < 0.5 is removed.

Importance units: Delta_i is the increase of the reconstruction part of splatfacto's loss, (1 - ssim_lambda) x
the mean per-pixel, per-channel L1 of one view, when Gaussian i alone is removed, averaged over all training
views. Proposition 1 says a gated Gaussian ends below p = 0.5 when Delta_i < lambda_KL * log((1 - pi) / pi).
lambda_KL is `kl_weight` times the mean of the gate's importance EMA over all Gaussians (`kl_lambda`): Delta's
absolute size falls as more Gaussians share the image, its distribution relative to the mean stays similar, so
one kl_weight serves models from thousands to millions of Gaussians.

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

Two smaller choices: the regulariser is added only while some Gaussian is gated (see `regulariser`), and after
the hard removal VEDAL is over: p is frozen, nothing is sampled, and any remaining steps train the survivors
without densification.

The controller never touches the Gaussians or renders: the model measures importance when asked (a callback
taking view indices) and removes what `hard_prune_mask` selects through `removal.remove_gaussians`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Literal, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from nerfstudio_pruning.errors import PruningRefused
from nerfstudio_pruning.removal import check_target, target_count
from nerfstudio_pruning.vedal.gate import ConvergenceGate, ConvergenceGateConfig
from nerfstudio_pruning.vedal.retention_head import (
    RetentionHeadConfig,
    PartialLogits,
    binary_concrete_logits,
    hard_mask,
    logit_values,
    retention_regulariser,
    temperature,
)

STATE_FORMAT = 2


@dataclass
class VedalConfig:
    """VEDAL's settings. The nerfstudio model config holds them (`VedalGSModelConfig.vedal`), flat on the command
    line: each is a `--pipeline.model.*` flag."""

    finetune_start_step: int = 7000
    """First step of the VEDAL fine-tuning (the paper: 7k steps of ordinary training first). From here on,
    densification and opacity resets are off and the gate and the retention head are active."""
    hard_prune_step: int = 29999
    """Step after whose update every gated Gaussian with p < 0.5 is removed: the last step of the default 30k
    schedule. Set it to max-num-iterations - 1 when shortening a run; a run that stops earlier is still pruned
    at export and at inference by the deterministic mask."""

    kl_weight: float = 1.0
    """lambda_KL, the main rate-distortion knob: larger prunes more. In units of the mean importance (see
    kl_weight_units): lambda_KL = kl_weight x the mean over all Gaussians of the gate's importance EMA, so by
    Proposition 1 a gated Gaussian is let go when its importance is below kl_weight x log((1 - pi) / pi) x the
    mean: 1.39 x the mean at the default pi of 0.2 (2.88 x at the pi that prior_at_target derives for 10%).
    Importance is heavy-tailed: on trained models of the built-in scene at 83k and 188k Gaussians the mean sat at
    the 78th-81st percentile and 1.39 x the mean near the 85th-87th, while the absolute values differed 4x
    (docs/vedal_gs.md); the mean moves with them, so the default need not be retuned with the scene or the model
    size."""
    kl_weight_units: Literal["mean-importance", "loss"] = "mean-importance"
    """'mean-importance' (default): kl_weight is relative to the mean importance, as above. 'loss': kl_weight is
    lambda_KL itself in the units of Delta (a loss increase per Gaussian), as in earlier versions, where a value
    that prunes half of a 4k-Gaussian model (1e-6) prunes every gated Gaussian of a 285k one."""
    prior_keep_probability: float = 0.2
    """Prior retention probability pi of the KL term: the paper's operating point of 5.2x fewer Gaussians keeps
    ~19%. With kl_weight it sets the prune threshold on Delta (see kl_weight). See prior_at_target for a target."""
    sparsity_weight: float = 1e-3
    """lambda_s of the weak global term lambda_s * mean_i p_i; per Gaussian it moves the Proposition 1 threshold
    by lambda_s / N, negligible against kl_weight except on tiny models."""
    initial_keep_probability: float = 0.99
    """p of every Gaussian when the head is created: near 1 the masked render starts equal to the trained one."""
    temperature_start: float = 1.0
    """Binary Concrete temperature at the start of fine-tuning (smooth samples, informative gradients)."""
    temperature_end: float = 0.1
    """Temperature reached at hard_prune_step (geometric anneal): nearly binary samples, as at inference; lower
    values mostly add gradient variance."""

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
    and the sampled mask) from the start of fine-tuning. Importance is still measured as with the gate, but only
    for the unit of kl_weight (the mean of its EMA), so that a weight means the same lambda_KL in both arms;
    nothing is measured with kl_weight_units 'loss'."""
    gate: ConvergenceGateConfig = field(default_factory=ConvergenceGateConfig)
    """Convergence gate: EMA decay, convergence test, adaptive threshold and eligibility cap."""
    min_gaussians: int = 64
    """A hard removal that would leave fewer Gaussians than this is refused (the model is kept as is)."""
    target_gaussians: Optional[int] = None
    """Gaussians to keep at the hard removal, exactly (instead of 'every gated Gaussian with p < 0.5'); exclusive
    with target_fraction. The gate's cap follows it (see target_contest) and the removal ranks the gated
    Gaussians by p: the head decides which go, the target how many. Refused before training when below
    min_gaussians, or at or above the count of a loaded model that no longer densifies; at the start of
    fine-tuning when at or above the count then."""
    target_fraction: Optional[float] = None
    """The same target as a fraction of the Gaussians present when fine-tuning starts (e.g. 0.2 for 5x fewer)."""
    target_contest: float = 0.5
    """With a target of N kept out of n: the share of the N survivors that the head picks from the gated pool.
    The gate's cap becomes (n - N + target_contest x N) / n (and its threshold quantile at least that), so the
    head ranks n - N + target_contest x N gated Gaussians and removes the n - N with the lowest p, while the
    (1 - target_contest) x N most important are kept by the gate outright. 0 would leave the head no choice
    (every gated Gaussian goes), 1 would let every Gaussian be gated. Why a target sets the cap rather than
    kl_weight: on buddha (docs/results.md) the cap, not the weight, set the size from weight 0.5 up."""
    hard_mask_fraction: float = 0.1
    """The last fraction of the fine-tuning (0.1: 2,300 of 23,000 steps) hands the render over from Binary Concrete
    samples to the removal's deterministic mask, so that the removal is trained before it happens (on the built-in
    scene the sampled mixture and the hard mask differed by up to 3.5 dB; docs/results.md). In its first half each
    mask is the blend (1 - s) z + s [kept], s rising linearly from 0 to 1, and the retention loss is weighted by
    1 - s; at its midpoint the head's decision is fixed (what `removal_mask` removes then), and the second half
    trains the rest of the model on exactly the render the removal leaves. 0: samples until the removal, as in the
    paper."""
    kl_at_target: bool = False
    """With a target: lambda_KL's unit (what kl_weight multiplies) is, at each gate update, the importance EMA at
    which the removal will cut the gated pool (the k-th lowest of the gated, k = Gaussians - target) over
    log((1 - pi) / pi), instead of the mean importance, so that Proposition 1's threshold is the removal's cut: the
    head should let go, during the sampled fine-tuning, the share of the gated that the removal takes (at 10x and
    20x fewer the removal took many Gaussians the head kept, and the train PSNR fell by 9-13 dB at the decision on
    the built-in scene, docs/results.md). Measured there at 10% (one seed): once the gate had filled its cap the cut
    lay below 1.39 x the mean, lambda_KL fell and the head kept more, not less, and the decision fell as with the
    default (25.02 dB against 23.56; prior_at_target: 27.34; docs/vedal_gs.md)."""
    prior_at_target: bool = True
    """With a target (on by default; without one it does nothing): the prior pi is the share of the gated pool the
    removal keeps (target_contest x N of the n - N + target_contest x N gated; 0.053 at 10x fewer, 0.11 at 5x)
    instead of prior_keep_probability, as the paper chose its 0.2 for an operating point that keeps about that
    share. By Proposition 1 an unimportant gated Gaussian's p settles at pi, so the sampled fine-tuning renders
    about as many of them as the removal leaves, not 20%. Measured at full schedule (docs/results.md): at 10% on
    the built-in scene 27.34 / 27.41 dB (seeds 42 / 43; the paper's 0.2: 23.56), the training PSNR falling 1.2 /
    0.7 dB at the decision instead of 9; at 5x fewer level with 0.2 (26.96 ± 0.13 dB against 26.93 ± 0.06, two
    seeds), and on buddha_gray67 at 1/4, 5x, level with the defaults (22.59 dB against 22.49 at 4.64x). False: the
    paper's pi whatever the target."""
    head_gradient_rows: int = 2048
    """Rows through which the retention head's parameter gradient is estimated per step (0: all); see
    `RetentionHeadConfig.gradient_rows`."""

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
        check_target(self.target_gaussians, self.target_fraction)
        if not 0.0 <= self.target_contest <= 1.0 or not 0.0 <= self.hard_mask_fraction <= 1.0:
            raise ValueError("target_contest and hard_mask_fraction must be in [0, 1]")
        if self.head_gradient_rows < 0:
            raise ValueError(f"head_gradient_rows must be >= 0, got {self.head_gradient_rows}")

    def retention_head_config(self) -> RetentionHeadConfig:
        """The retention head's network: RetentionHeadConfig's shape, starting at initial_keep_probability, its
        gradient through head_gradient_rows rows."""
        return RetentionHeadConfig(init_keep_prob=self.initial_keep_probability, gradient_rows=self.head_gradient_rows)

    def measures_importance(self) -> bool:
        """Whether the run measures leave-one-out importance: for the gate, or without it for kl_weight's unit."""
        return self.use_gate or self.kl_weight_units == "mean-importance"


class ImportancePassWindow:
    """Importance of the last `slots` refreshes, one slot per refresh: per Gaussian, the sum over the slot's
    views of each view's mean L1 change, and how many views that was.

    Stored in float32: [slots, N] with one slot per refresh of a pass (25 for 200 training views at 8 per
    refresh) is 100 MB at a million Gaussians, in memory and in every checkpoint, against 200 MB in float64. A
    slot holds one refresh's sum, already reduced in float64 by the scores, and the gate compares changes of its
    EMA far above float32's 1e-7 relative precision; the mean over the slots is taken in float64. Windows saved
    in float64 by earlier versions load cast to float32.
    """

    DTYPE = torch.float32

    def __init__(self, slots: int, num_gaussians: int, device: torch.device) -> None:
        self.slots = slots
        self.sums = torch.zeros(slots, num_gaussians, dtype=self.DTYPE, device=device)
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
        # Slot by slot into one float64 vector: no [slots, N] float64 copy.
        total = self.sums[0].double()
        for slot in range(1, self.slots):
            total += self.sums[slot]
        return (total / max(sum(self.view_counts), 1)).float()

    def select(self, keep: Tensor) -> None:
        self.sums = self.sums[:, keep.to(self.sums.device)]

    def load_sums(self, sums: Tensor, view_counts: List[int]) -> None:
        """Restore saved sums (float32, or float64 from checkpoints written before the window was float32)."""
        self.sums = sums.to(device=self.sums.device, dtype=self.DTYPE)
        self.view_counts = [int(c) for c in view_counts]


def _logit_of_product(r: Tensor, t: Tensor) -> Tensor:
    """logit(sigmoid(r) sigmoid(t)), exactly and stably: o z / (1 - o z) = 1 / ((1 + e^-r)(1 + e^-t) - 1)
    = 1 / (e^-r + e^-t + e^-(r+t)), so the logit is -logsumexp(-r, -t, -r - t); finite and differentiable where o
    or z round to 0 or 1. One logsumexp instead of four logsigmoids and a logaddexp: this runs on every Gaussian at
    every fine-tuning step."""
    return -torch.logsumexp(torch.stack([-r, -t, -(r + t)]), dim=0)


# Far below logit(1/255) = -5.54, where the exporter and the rasterizers drop a Gaussian, yet finite, so that
# nothing downstream meets an infinity; sigmoid(-100) is ~4e-44.
HIDDEN_OPACITY_LOGIT = -100.0


MeasureImportance = Callable[[List[int]], Tensor]
"""Callback: [N] float64 leave-one-out importance summed over the given training views (mean-L1 units)."""


class VedalController:
    def __init__(self, config: VedalConfig, ssim_lambda: float,
                 device: Union[None, str, torch.device, Callable[[], torch.device]] = None) -> None:
        """`device`: where VEDAL's per-Gaussian state lives (CPU by default), or a function that answers it each
        time (a model gives where its Gaussians are, which follows the model when it is moved)."""
        self.config = config
        # Delta is in units of splatfacto's loss, whose L1 part is weighted by 1 - ssim_lambda.
        self.loss_weight = 1.0 - ssim_lambda
        if callable(device):
            self._device = device
        else:
            fixed = torch.device("cpu") if device is None else torch.device(device)
            self._device = lambda: fixed
        self.reset()

    @property
    def device(self) -> torch.device:
        return self._device()

    def reset(self) -> None:
        """The state before fine-tuning starts: that of a new run, and of one loaded from another method's
        checkpoint."""
        self.gate = ConvergenceGate(self.config.gate, 0, self.device)
        # -1: fine-tuning has not started. Not the configured step: a run resumed from another method's
        # checkpoint starts it at its first step, and the temperature anneal runs from there.
        self.finetune_started_at = -1
        # Gaussians when fine-tuning started (-1: not started): what target_fraction and the gate's cap refer to.
        self.start_gaussians = -1
        self.last_refresh_step = -1
        self.refresh_count = 0
        self.pruned = False
        self.removal_refused = False
        # After the hard removal p is frozen: the head standardises its features over the Gaussians present, so
        # evaluated after the removal it would move p of the survivors.
        self.frozen_logits: Optional[Tensor] = None
        # [N] bool: the head's decision, fixed halfway through the hand-over to the removal's mask.
        self.decided: Optional[Tensor] = None
        self.window: Optional[ImportancePassWindow] = None
        # Mean of the gate's importance EMA over the Gaussians it has observed: the unit of kl_weight.
        self.importance_scale = 0.0
        self.importance_summary: Dict[str, float] = {}
        # What the run has done, for its pruning.json (`report`). The counts are in the state dict; the seconds,
        # which no resumed run repeats bit for bit, are saved by the model beside it.
        self.importance_seconds = 0.0
        self.importance_passes = 0
        self.hard_prune_record: Optional[Dict[str, int]] = None

    # -- phases --------------------------------------------------------------------------------------------------
    @property
    def finetuning_started(self) -> bool:
        return self.finetune_started_at >= 0

    def finetuning_active(self) -> bool:
        return self.finetuning_started and not self.pruned

    def densification_allowed(self, step: int) -> bool:
        return not self.finetuning_started and step < self.config.finetune_start_step

    # -- the target size -------------------------------------------------------------------------------------------
    def target(self) -> Optional[int]:
        """Gaussians to keep at the removal, or None without a target (or before fine-tuning, for a fraction)."""
        return target_count(self.config.target_gaussians, self.config.target_fraction, self.start_gaussians)

    def check_target(self, num_gaussians: int) -> None:
        """PruningRefused when the target cannot be reached from num_gaussians (checked as fine-tuning starts)."""
        wanted = target_count(self.config.target_gaussians, self.config.target_fraction, num_gaussians)
        if wanted is None:
            return
        if wanted >= num_gaussians:
            raise PruningRefused(f"target of {wanted} Gaussians is not below the {num_gaussians} present when "
                                 "vedal-gs's fine-tuning starts; nothing would be removed")
        if wanted < self.config.min_gaussians:
            raise PruningRefused(f"target of {wanted} Gaussians is below min_gaussians={self.config.min_gaussians}")

    def prior_keep_probability(self) -> float:
        """pi of the KL term: the configured one, or with prior_at_target and a target (once fine-tuning has
        started) the share of the gated pool that the removal keeps (`gate_config`'s pool)."""
        wanted, n = self.target(), self.start_gaussians
        if not self.config.prior_at_target or wanted is None or n <= 0:
            return self.config.prior_keep_probability
        pool = self._gated_pool(wanted, n)
        return min(max((pool - (n - wanted)) / pool, 1e-3), 1.0 - 1e-3)

    def log_prior_odds(self) -> float:
        """log((1 - pi) / pi): Proposition 1 lets a gated Gaussian go below Delta = lambda_KL x this."""
        prior = self.prior_keep_probability()
        return math.log((1.0 - prior) / prior)

    def _gated_pool(self, wanted: int, n: int) -> int:
        """Gaussians the gate may make eligible with a target of `wanted` of n: the removal's n - wanted and
        target_contest of the survivors."""
        return min(n, n - wanted + int(round(self.config.target_contest * wanted)))

    def gate_config(self) -> ConvergenceGateConfig:
        """The gate's settings: as configured, or with a target, its cap (and threshold quantile, so that it does
        not bind first) at the removal count plus target_contest of the survivors."""
        wanted, n = self.target(), self.start_gaussians
        if wanted is None or n <= 0:
            return self.config.gate
        cap = self._gated_pool(wanted, n) / n
        return replace(self.config.gate, max_eligible_fraction=cap,
                       threshold_quantile=max(self.config.gate.threshold_quantile, cap))

    def before_step(self, step: int, num_gaussians: int, n_views: int, measure: MeasureImportance) -> bool:
        """Start fine-tuning when due and refresh importance when due; True if a refresh ran."""
        if self.pruned:
            return False
        if not self.finetuning_started and step >= self.config.finetune_start_step:
            self.check_target(num_gaussians)
            self.finetune_started_at = step
            self.start_gaussians = num_gaussians
            self.gate = ConvergenceGate(self.gate_config(), num_gaussians, self.device)
        if self.finetuning_started and self.decided is None and (
            self.last_refresh_step < 0 or step - self.last_refresh_step >= self.config.importance_every
        ):
            self.refresh(step, num_gaussians, n_views, measure)
            return True
        return False

    def refresh(self, step: int, num_gaussians: int, n_views: int, measure: MeasureImportance) -> None:
        """Measure importance on this refresh's views and update the gate once a pass is complete.

        Without the gate (the ablation) the gate object still folds in each pass: its EMA is what kl_weight is
        relative to, and an ablation whose lambda_KL stayed at 0 would remove nothing; its eligibility is unused
        (`gated_mask`)."""
        if self.config.measures_importance():
            n = num_gaussians
            if self.gate.num_gaussians != n:
                # Only a model changed behind VEDAL's back (e.g. by hand) gets here; densification is off.
                self.gate = ConvergenceGate(self.gate_config(), n, self.device)
                self.importance_scale = 0.0
            slots = self.refreshes_per_pass(n_views)
            window = self.window
            if window is None or window.num_gaussians != n or window.slots != slots:
                window = self.window = ImportancePassWindow(slots, n, self.device)
            views = self.refresh_views(self.refresh_count, n_views)
            started = time.perf_counter()
            importance_sums = measure(views)
            self.importance_seconds += time.perf_counter() - started
            self.importance_passes += 1
            window.add(self.refresh_count, importance_sums, len(views))
            if window.full:
                importance = self.loss_weight * window.mean_per_view()
                self.gate.update(importance, step)
                self._update_importance_scale()
                self.importance_summary = {
                    f"importance_q{int(100 * q)}": float(importance.kthvalue(max(1, math.ceil(q * n))).values)
                    for q in (0.5, 0.9)
                }
                self.importance_summary["importance_mean"] = float(importance.double().mean())
        self.last_refresh_step = step
        self.refresh_count += 1

    def refreshes_per_pass(self, n_views: int) -> int:
        return math.ceil(n_views / self.config.importance_views)

    def refresh_views(self, refresh_index: int, n_views: int) -> List[int]:
        """Training views of one refresh. One shuffled order, cut into refreshes_per_pass near-equal parts and
        visited cyclically: any refreshes_per_pass consecutive refreshes see every view exactly once. (A new
        order per pass would not: the window would straddle two orders and could miss views.)"""
        generator = torch.Generator().manual_seed(self.config.importance_seed)
        order = torch.randperm(n_views, generator=generator)
        parts = torch.tensor_split(order, self.refreshes_per_pass(n_views))
        return parts[refresh_index % len(parts)].tolist()

    def schedule_warning(self, first_step: int, last_step: int) -> Optional[str]:
        """What is wrong with running steps first_step..last_step under this schedule, if anything."""
        if self.pruned:
            return None
        hard = self.config.hard_prune_step
        if not self.finetuning_started and first_step >= hard:
            return (f"this run starts at step {first_step}, past hard_prune_step {hard}: fine-tuning would end at once. "
                    "Set --pipeline.model.hard-prune-step (and finetune-start-step) relative to the loaded step.")
        if last_step < hard:
            return (f"this run ends at step {last_step}, before hard_prune_step {hard}: nothing is removed, but exports "
                    "and renders still drop the Gaussians the mask hides.")
        return None

    # -- masks -----------------------------------------------------------------------------------------------------
    def gated_mask(self, num_gaussians: int) -> Tensor:
        """[N] bool: Gaussians under the KL prior and the sampled mask (and the only ones ever removed)."""
        n = num_gaussians
        if not self.finetuning_started:
            return torch.zeros(n, dtype=torch.bool, device=self.device)
        if not self.config.use_gate:
            return torch.ones(n, dtype=torch.bool, device=self.device)
        if self.gate.num_gaussians != n:
            return torch.zeros(n, dtype=torch.bool, device=self.device)
        return self.gate.eligible.to(self.device)

    def any_gated(self, num_gaussians: int) -> bool:
        """Whether `gated_mask(num_gaussians)` holds a Gaussian, answered on the host (no device read per step)."""
        if not self.finetuning_started or num_gaussians == 0:
            return False
        if not self.config.use_gate:
            return True
        return self.gate.num_gaussians == num_gaussians and self.gate.eligible_count > 0

    def gated_count(self, num_gaussians: int) -> int:
        if not self.any_gated(num_gaussians):
            return 0
        return num_gaussians if not self.config.use_gate else self.gate.eligible_count

    def hard_mask_from(self) -> int:
        """First step of the hand-over to the removal's mask (the last hard_mask_fraction of the fine-tuning)."""
        start = max(self.finetune_started_at, 0)
        span = max(self.config.hard_prune_step - start, 0)
        return self.config.hard_prune_step + 1 - int(round(self.config.hard_mask_fraction * span))

    def hard_mask_phase(self, step: int) -> bool:
        return self.finetuning_active() and self.config.hard_mask_fraction > 0 and step >= self.hard_mask_from()

    def hardening(self, step: int) -> float:
        """s in [0, 1]: the weight of the removal's mask in the rendered masks at `step` (0 before the phase,
        rising over its first half, 1 from its midpoint, when the decision is fixed)."""
        if not self.hard_mask_phase(step):
            return 0.0
        start = self.hard_mask_from()
        ramp = max(1, (self.config.hard_prune_step + 1 - start) // 2)
        return min(1.0, (step - start + 1) / ramp)

    def training_opacity_logits(
        self, opacity_logits: Tensor, head_logits: Callable[[], Union[Tensor, PartialLogits]], gated: Tensor,
        step: int,
    ) -> Tuple[Optional[Tensor], Optional[Union[Tensor, PartialLogits]]]:
        """(raw opacity logits to render this training step with, retention logits for the regulariser); None for
        either where there is none (nothing gated: the model renders as it is). head_logits may evaluate the head on
        the gated rows only (`RetentionHead.on_rows`): nothing here reads the logits of an ungated Gaussian.

        Once the hand-over is complete (`hardening` 1) the head's decision is fixed at that step and rendered
        from then on (`decided`): the head is no longer evaluated, nothing is sampled, no retention loss."""
        n = opacity_logits.numel()
        if self.hardening(step) >= 1.0:
            if self.decided is None or self.decided.numel() != n:
                self.decided = self.removal_mask(logit_values(head_logits()).detach(), gated)
            return torch.where(self.decided, torch.full_like(opacity_logits, HIDDEN_OPACITY_LOGIT), opacity_logits), None
        if not self.any_gated(n):
            return None, None
        logits = head_logits()
        return self.sampled_opacity_logits(opacity_logits, logit_values(logits), gated, step), logits

    def temperature(self, step: int) -> float:
        start = max(self.finetune_started_at, 0)
        return temperature(
            step - start, self.config.temperature_start, self.config.temperature_end,
            max(self.config.hard_prune_step - start, 1),
        )

    def sampled_opacity_logits(self, opacity_logits: Tensor, logits: Tensor, gated: Tensor, step: int) -> Tensor:
        """[N] training opacities as logits: logit(o_i z_i), z_i ~ BinaryConcrete(logit p_i, tau), for gated
        Gaussians, the raw logit otherwise.

        As logits because splatfacto renders sigmoid(raw opacity). Computed in log space (`_logit_of_product`), so
        that sigmoid of the result is o z to rounding and stays differentiable where o or z round to 0 or 1.

        In the first half of the last hard_mask_fraction of the fine-tuning the mask is the blend (1 - s) z + s h,
        s = `hardening(step)` and h = 0 for what `removal_mask` would remove now, 1 otherwise (the ungated included,
        with z = 1), in the same log space: log z and log(1 - z) of the blend by logaddexp.
        """
        r = opacity_logits
        t = binary_concrete_logits(logits, self.temperature(step))
        s = self.hardening(step)
        if s <= 0.0:
            return torch.where(gated, _logit_of_product(r, t), r)
        removed = self.removal_mask(logits.detach(), gated)
        # Ungated Gaussians have no sample (z = 1); t = 40 makes sigmoid(t) 1 and logsigmoid(-t) -40 (e^-40 ~ 4e-18).
        t = torch.where(gated, t, torch.full_like(t, 40.0))
        log_s, log_rest = math.log(s), math.log1p(-s) if s < 1.0 else -math.inf
        log_z = F.logsigmoid(t) + log_rest
        log_not_z = F.logsigmoid(-t) + log_rest
        log_z = torch.where(removed, log_z, torch.logaddexp(log_z, torch.full_like(log_z, log_s)))
        log_not_z = torch.where(removed, torch.logaddexp(log_not_z, torch.full_like(log_not_z, log_s)), log_not_z)
        log_oz = F.logsigmoid(r) + log_z
        log_one_minus_oz = torch.logaddexp(F.logsigmoid(-r), F.logsigmoid(r) + log_not_z)
        return torch.where(gated | removed, log_oz - log_one_minus_oz, r)

    def inference_logits(self, head_logits: Callable[[], Tensor], num_gaussians: int) -> Tensor:
        """Retention logits as inference sees them: frozen at the hard removal, else the head's."""
        frozen = self.frozen_logits
        if frozen is not None and frozen.numel() == num_gaussians:
            return frozen.to(self.device)
        return head_logits()

    def hidden_mask(self, logits: Tensor, gated: Tensor, threshold: float = 0.5) -> Tensor:
        """[N] bool: Gaussians the deterministic inference mask drops: at 0.5, what the removal would remove now
        (`removal_mask`); above 0.5, that and every gated Gaussian with p below the threshold; below 0.5, only
        those of it with p below the threshold (gated or not: a target may remove ungated Gaussians by their EMA).
        Without a target and before the removal this is simply "gated with p < threshold". With a target, the
        hand-over's fixed decision, or after the removal, the removal's set is not a threshold on p (after the
        removal it is empty, while 7% of the gated survivors of a full-schedule run had p < 0.5), so a plain
        "p < threshold" would hide more just below 0.5 than at it; this way fewer Gaussians are hidden as the slider
        moves down, and more as it moves up."""
        removal = self.removal_mask(logits, gated)
        if threshold == 0.5:
            return removal
        below = ~hard_mask(logits, threshold)
        return removal | (gated & below) if threshold > 0.5 else removal & below

    def removal_mask(self, logits: Tensor, gated: Tensor) -> Tensor:
        """[N] bool: what the hard removal removes given these logits. Without a target, every gated Gaussian with
        p < 0.5. With one of N kept out of n, exactly n - N: the gated Gaussians with the lowest p, and, should
        fewer than n - N be gated (a gate that has not filled its cap), then every gated one and the ungated with
        the lowest importance EMA (once the gate has observed them). Counts come from the host (no device read):
        topk with a known k. Once the decision is fixed (`training_opacity_logits`) it is that decision; after the
        removal, nothing."""
        n = logits.numel()
        if self.pruned:
            return torch.zeros(n, dtype=torch.bool, device=logits.device)
        if self.decided is not None and self.decided.numel() == n:
            return self.decided.to(logits.device)
        wanted = self.target()
        if wanted is None or not self.finetuning_started:
            return gated & ~hard_mask(logits, 0.5) if self.finetuning_started else torch.zeros_like(gated)
        k = max(n - wanted, 0)
        mask = torch.zeros(n, dtype=torch.bool, device=logits.device)
        n_gated = self.gated_count(n)
        from_gated = min(k, n_gated)
        if from_gated:
            key = torch.where(gated, logits, torch.full_like(logits, math.inf))
            mask[torch.topk(key, from_gated, largest=False).indices] = True
        if k > from_gated and self.gate.num_gaussians == n and self.gate.history:  # every Gaussian observed
            ema = self.gate.ema.to(logits.device)
            key = torch.where(gated, torch.full_like(ema, math.inf), ema)
            mask[torch.topk(key, k - from_gated, largest=False).indices] = True
        return mask

    def regulariser(self, logits: Optional[Union[Tensor, PartialLogits]], gated: Tensor,
                    step: Optional[int] = None) -> Dict[str, Tensor]:
        """The retention loss terms for this step: none before any Gaussian is gated or after the removal.

        Not before the gate has opened: the sparsity term would then be the head's only gradient, and Adam's
        per-parameter normalisation turns a gradient of any size into full-size steps, so a 1e-3-weighted term
        would pull every p down long before any Gaussian has a reconstruction reason to stay.
        """
        if logits is None or not self.finetuning_active() or not self.any_gated(logit_values(logits).numel()):
            return {}
        _, parts = self.retention_loss(logits, gated)
        # During the hand-over the reconstruction reaches the head through (1 - s) z only; the same weight on the
        # prior keeps the balance of Proposition 1 (Adam would otherwise let the prior win as s grows).
        weight = 1.0 - self.hardening(step) if step is not None else 1.0
        return {"retention_kl": weight * parts["kl"], "retention_sparsity": weight * parts["sparsity"]}

    def kl_lambda(self) -> float:
        """lambda_KL in the units of Delta: kl_weight itself, or kl_weight x the mean importance EMA (0 until the
        gate has its first observation: with the gate nothing is gated yet; without it every Gaussian already is,
        and for that first pass the head feels only reconstruction and the sparsity term).

        The mean is taken once per gate update (`_update_importance_scale`) and recomputed from the gate's state on
        loading, so a resumed run gets the same value without saving it."""
        if self.config.kl_weight_units == "loss":
            return self.config.kl_weight
        return self.config.kl_weight * self.importance_scale

    def _update_importance_scale(self) -> None:
        observed = self.gate.n_updates > 0
        if not bool(observed.any()):
            self.importance_scale = 0.0
        elif self.config.kl_at_target and self.target() is not None:
            self.importance_scale = self._cut_importance() / self.log_prior_odds()
        else:
            self.importance_scale = float(self.gate.ema[observed].double().mean())

    def _cut_importance(self) -> float:
        """The importance EMA at which the removal would cut the gated pool now: the k-th lowest among the gated
        (k = Gaussians - target), or the highest when k reaches past them (every gated one goes); 0 when nothing
        is gated yet (lambda_KL 0: the head feels only reconstruction and the sparsity term)."""
        gated = self.gated_mask(self.gate.num_gaussians)
        ema = self.gate.ema[gated.to(self.gate.ema.device)]
        if ema.numel() == 0:
            return 0.0
        k = min(max(self.gate.num_gaussians - int(self.target()), 1), ema.numel())
        return float(ema.double().kthvalue(k).values)

    def retention_loss(self, logits: Union[Tensor, PartialLogits], gated: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        """`retention_regulariser` with the prior, lambda_KL in the units of Delta (`kl_lambda`) and the sparsity
        weight of this run."""
        return retention_regulariser(logits, gated, self.prior_keep_probability(), self.kl_lambda(),
                                     self.config.sparsity_weight)

    def prune_threshold_importance(self) -> float:
        """The Delta below which Proposition 1 puts a gated Gaussian under p = 0.5."""
        return self.kl_lambda() * self.log_prior_odds()

    # -- the hard removal ------------------------------------------------------------------------------------------
    def hard_prune_due(self, step: int) -> bool:
        return (not self.pruned and not self.removal_refused and self.finetuning_started
                and step >= self.config.hard_prune_step)

    def hard_prune_mask(self, logits: Tensor, gated: Tensor) -> Tensor:
        """[N] bool: what the hard removal removes (`removal_mask`)."""
        return self.removal_mask(logits, gated)

    def per_gaussian_states(self, num_gaussians: int) -> list:
        """The per-Gaussian state a removal must shrink with the Gaussians (see `removal.remove_gaussians`)."""
        return [s for s in (self.gate, self.window) if s is not None and s.num_gaussians == num_gaussians]

    def finish(self, kept_logits: Tensor, step: Optional[int] = None, gaussians_before: Optional[int] = None) -> None:
        """After the hard removal: p of the survivors is frozen and VEDAL is over. With the removal's step and the
        count before it, the removal is recorded for `report`."""
        self.frozen_logits = kept_logits.detach()
        self.pruned = True
        self.decided = None
        if step is not None and gaussians_before is not None:
            self.hard_prune_record = {"step": int(step), "gaussians_before": int(gaussians_before),
                                      "gaussians_after": int(kept_logits.numel())}

    # -- logging ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def scalars(self, logits: Tensor, gated: Tensor, step: int) -> Dict[str, float]:
        """What tensorboard shows of VEDAL at `step`."""
        _, parts = self.retention_loss(logits, gated)
        n = max(logits.numel(), 1)
        scalars = {
            "num_gaussians": logits.numel(),
            "gated_fraction": float(gated.sum()) / n,
            "would_remove": int(self.hard_prune_mask(logits, gated).sum()),
            "mean_p": float(parts["mean_p"]),
            "kl_sum_gated": float(parts["kl_sum"]),
            "kl_term": float(parts["kl"]),
            "temperature": self.temperature(step),
            # Beside the Delta quantiles, the Proposition 1 threshold shows where kl_weight cuts the distribution.
            "prune_threshold_importance": self.prune_threshold_importance(),
            "kl_lambda": self.kl_lambda(),
        }
        if self.config.use_gate:
            scalars.update(reversal_count=self.gate.reversal_count, reversal_rate=self.gate.reversal_rate)
        if gated.any():
            scalars["mean_p_gated"] = float(torch.sigmoid(logits[gated]).mean())
        scalars.update(self.importance_summary)
        return scalars

    def report(self) -> Dict[str, Any]:
        """What VEDAL has done in the run so far, as plain numbers (the body of the run's pruning.json).

        importance_passes counts leave-one-out measurements, one per refresh (importance_views views each), and
        importance_seconds the time spent in them; the gate's counts are of the Gaussians present now (None
        without the gate: every Gaussian was gated, whatever the unused gate object counted)."""
        gate = self.gate
        return {
            "importance_seconds": float(self.importance_seconds),
            "importance_passes": int(self.importance_passes),
            "gate": None if not self.config.use_gate else {
                "eligible_fraction": float(gate.eligible_fraction), "grants": int(gate.grant_count),
                "reversals": int(gate.reversal_count)},
            "hard_prune": None if self.hard_prune_record is None else dict(self.hard_prune_record),
        }

    # -- checkpoints -------------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Plain tensors and numbers, so checkpoints load with torch.load(weights_only=True).

        The importance window is saved too ([slots, N] float32, ~5 refreshes' worth of one number per Gaussian):
        without it a resumed gate would wait a whole pass for its next observation and open later than in the
        uninterrupted run."""
        frozen, window = self.frozen_logits, self.window
        return {
            "format": STATE_FORMAT,
            # Read by analysis/plot_gate_history.py: without the gate its history is not the run's eligibility.
            "use_gate": bool(self.config.use_gate),
            "gate": self.gate.state_dict(),
            "finetune_started_at": int(self.finetune_started_at),
            "start_gaussians": int(self.start_gaussians),
            "last_refresh_step": int(self.last_refresh_step),
            "refresh_count": int(self.refresh_count),
            "pruned": bool(self.pruned),
            "frozen_retention_logits": torch.zeros(0) if frozen is None else frozen.detach().cpu().clone(),
            "decided": torch.zeros(0, dtype=torch.bool) if self.decided is None else self.decided.cpu().clone(),
            "importance_sums": (torch.zeros(0, dtype=ImportancePassWindow.DTYPE) if window is None
                                else window.sums.cpu().clone()),
            "importance_view_counts": [] if window is None else list(window.view_counts),
            "importance_passes": int(self.importance_passes),
            # {} rather than None for "no removal yet": the state stays within weights_only's plain types.
            "hard_prune": {} if self.hard_prune_record is None else dict(self.hard_prune_record),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore from `state_dict()`; ValueError for a state of another format."""
        if int(state.get("format", -1)) != STATE_FORMAT:
            raise ValueError(f"the checkpoint's vedal-gs state has format {state.get('format')!r}; this version "
                             f"reads format {STATE_FORMAT}")
        self.reset()
        self.finetune_started_at = int(state["finetune_started_at"])
        # States saved before targets existed lack it; they were saved without a target.
        self.start_gaussians = int(state.get("start_gaussians", -1))
        self.gate = ConvergenceGate(self.gate_config(), 0, self.device)
        self.gate.load_state_dict(state["gate"])
        self._update_importance_scale()
        self.last_refresh_step = int(state["last_refresh_step"])
        self.refresh_count = int(state["refresh_count"])
        self.pruned = bool(state["pruned"])
        frozen = state["frozen_retention_logits"]
        self.frozen_logits = frozen.to(self.device).float() if frozen.numel() else None
        decided = state.get("decided", torch.zeros(0, dtype=torch.bool))
        self.decided = decided.to(self.device, torch.bool) if decided.numel() else None
        sums, counts = state["importance_sums"], state["importance_view_counts"]
        if sums.numel():
            self.window = ImportancePassWindow(sums.shape[0], sums.shape[1], self.device)
            self.window.load_sums(sums, counts)
        # States saved before the run's record was kept lack these two: it then counts from the resume.
        self.importance_passes = int(state.get("importance_passes", 0))
        removal = state.get("hard_prune")
        self.hard_prune_record = {key: int(value) for key, value in removal.items()} if removal else None
