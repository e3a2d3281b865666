"""The pruning schedules as plain objects, without nerfstudio: PUP's round schedule and VEDAL's controller."""

from __future__ import annotations

import math

import pytest
import torch

from nerfstudio_pruning.errors import PruningRefused
from nerfstudio_pruning.pup.schedule import PupSchedule, PupScheduleConfig
from nerfstudio_pruning.vedal.controller import ImportancePassWindow, VedalConfig, VedalController
from nerfstudio_pruning.vedal.gate import ConvergenceGate, ConvergenceGateConfig


# -- PUP ------------------------------------------------------------------------------------------------------------
def test_pup_rounds_fall_on_their_steps_and_state_round_trips():
    schedule = PupSchedule(PupScheduleConfig(prune_start_step=100, prune_fractions=(0.8, 0.5), refine_steps=(20, 30)))
    due = {step: schedule.due(step) for step in range(95, 160)}
    assert [s for s, f in due.items() if f is not None][0] == 100 and due[100] == 0.8
    assert not schedule.pruning_started(99) and schedule.pruning_started(100)
    schedule.round_done()
    assert schedule.due(119) is None and schedule.due(120) == 0.5
    schedule.round_done()
    assert schedule.finished and schedule.due(10_000) is None

    restored = PupSchedule(schedule.config)
    restored.load_state_dict(schedule.state_dict())
    assert restored.state_dict() == {"rounds_done": 2, "first_round_step": 100, "rounds": []}


def test_pup_post_hoc_start_and_refusal_before_scoring():
    schedule = PupSchedule(PupScheduleConfig(prune_start_step=30000, refine_steps=(5, 5), min_gaussians=64))
    schedule.start_after(1234)
    assert schedule.due(1234) is None and schedule.due(1235) == 0.8 and schedule.round_step(1) == 1240
    assert schedule.remaining_after_all_rounds(1000) == 100
    schedule.check_feasible(640)  # 640 -> 128 -> 64: allowed
    with pytest.raises(PruningRefused, match="fewer than min_gaussians=64"):
        schedule.check_feasible(600)


def test_pup_mask_takes_the_lowest_scores_and_refuses_nan():
    schedule = PupSchedule(PupScheduleConfig(prune_fractions=(0.5,), refine_steps=(1,)))
    scores = torch.tensor([3.0, -float("inf"), 1.0, 2.0])
    assert schedule.prune_mask(scores).tolist() == [False, True, True, False]
    with pytest.raises(PruningRefused, match="NaN"):
        schedule.prune_mask(torch.tensor([1.0, float("nan")]))


@pytest.mark.parametrize("bad", [dict(prune_fractions=(0.8,)), dict(prune_fractions=(1.2, 0.5))])
def test_pup_config_refuses_inconsistent_rounds(bad):
    with pytest.raises(ValueError):
        PupScheduleConfig(**bad)


# -- VEDAL ----------------------------------------------------------------------------------------------------------
def _controller(**overrides) -> VedalController:
    settings = dict(finetune_start_step=10, hard_prune_step=60, importance_every=5, importance_views=3,
                    gate=ConvergenceGateConfig(min_refreshes=2, window=1, threshold_quantile=1.0,
                                               max_eligible_fraction=1.0))
    settings.update(overrides)
    return VedalController(VedalConfig(**settings), ssim_lambda=0.2)


def test_the_controller_keeps_its_state_where_its_device_function_says_at_each_call():
    """A model hands the controller a function (where its Gaussians are): moving the model moves VEDAL's state
    without the model telling the controller."""
    where = [torch.device("cpu")]
    settings = VedalConfig(finetune_start_step=0, hard_prune_step=60, use_gate=False)
    vedal = VedalController(settings, ssim_lambda=0.2, device=lambda: where[0])
    vedal.before_step(0, 6, 2, lambda views: torch.rand(6, dtype=torch.float64))
    assert vedal.gated_mask(6).device.type == "cpu" and vedal.window.sums.device.type == "cpu"
    where[0] = torch.device("meta")
    assert vedal.gated_mask(6).device.type == "meta"
    vedal.reset()
    assert vedal.gate.ema.device.type == "meta"
    assert VedalController(settings, ssim_lambda=0.2).device == torch.device("cpu")


def test_any_pass_of_consecutive_refreshes_sees_every_training_view_once():
    vedal = _controller()
    per_pass = vedal.refreshes_per_pass(7)
    assert per_pass == 3
    for first in range(5):
        views = [v for r in range(first, first + per_pass) for v in vedal.refresh_views(r, 7)]
        assert sorted(views) == list(range(7))


def test_pass_window_averages_over_views_and_shrinks_with_the_gaussians():
    window = ImportancePassWindow(slots=2, num_gaussians=4, device=torch.device("cpu"))
    window.add(0, torch.tensor([3.0, 0.0, 6.0, 9.0]), n_views=3)
    assert not window.full
    window.add(1, torch.tensor([1.0, 4.0, 0.0, 3.0]), n_views=1)
    assert window.full and torch.equal(window.mean_per_view(), torch.tensor([1.0, 1.0, 1.5, 3.0]))
    window.add(2, torch.tensor([1.0, 0.0, 2.0, 3.0]), n_views=1)  # replaces slot 0
    assert torch.equal(window.mean_per_view(), torch.tensor([1.0, 2.0, 1.0, 3.0]))
    window.select(torch.tensor([True, False, False, True]))
    assert torch.equal(window.mean_per_view(), torch.tensor([1.0, 3.0]))


def test_controller_runs_the_schedule_and_gates_converged_unimportant_gaussians():
    vedal = _controller()
    n, n_views = 6, 7
    # Constant importance per Gaussian: every EMA converges; threshold_quantile 1 lets all of them through.
    importance = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=torch.float64)
    asked = []

    def measure(views):
        asked.append(list(views))
        return importance * len(views)

    assert vedal.densification_allowed(9) and not vedal.densification_allowed(10)
    refreshes = [step for step in range(0, 60) if vedal.before_step(step, n, n_views, measure)]
    assert not vedal.densification_allowed(9)  # once fine-tuning has started, whatever the step
    assert refreshes[0] == 10 and all(b - a == 5 for a, b in zip(refreshes, refreshes[1:]))
    assert sorted(v for views in asked[:3] for v in views) == list(range(n_views))
    # The gate sees (1 - ssim_lambda) x the per-view mean once a pass is complete.
    assert torch.allclose(vedal.gate.ema, 0.8 * importance.float())
    assert vedal.gated_mask(n).all()

    logits = torch.tensor([-2.0, 2.0, -2.0, 2.0, -2.0, 2.0])
    gated = vedal.gated_mask(n)
    assert vedal.hard_prune_mask(logits, gated).tolist() == [True, False, True, False, True, False]
    assert set(vedal.regulariser(logits.requires_grad_(), gated)) == {"retention_kl", "retention_sparsity"}
    assert not vedal.hard_prune_due(59) and vedal.hard_prune_due(60)


@pytest.mark.parametrize("units", ["mean-importance", "loss"])
def test_kl_weight_relative_to_the_mean_importance_makes_the_gate_and_the_kl_term_scale_free(units):
    """Importances c times larger (a model with 1/c as many Gaussians on the same image): the default units give
    the same gate decisions and a KL term c times larger, i.e. the same Proposition 1 balance; 'loss' units keep
    lambda_KL fixed."""
    torch.manual_seed(0)
    n, n_views = 200, 7
    base = torch.rand(n, dtype=torch.float64) ** 4  # heavy-tailed, like trained models
    gate = ConvergenceGateConfig(min_refreshes=2, window=1, threshold_quantile=0.8, max_eligible_fraction=0.7)
    logits = torch.randn(n)
    results = {}
    for c in (1.0, 1000.0):
        vedal = _controller(kl_weight=2.0, kl_weight_units=units, gate=gate)
        for step in range(0, 60):
            vedal.before_step(step, n, n_views, lambda views: c * base * len(views))
        gated = vedal.gated_mask(n)
        results[c] = (gated, float(vedal.regulariser(logits, gated)["retention_kl"]), vedal.prune_threshold_importance())
    (gated_1, kl_1, threshold_1), (gated_c, kl_c, threshold_c) = results[1.0], results[1000.0]
    assert torch.equal(gated_1, gated_c) and 0 < int(gated_1.sum()) <= 140
    if units == "mean-importance":
        mean = float((0.8 * base).mean())
        assert threshold_1 == pytest.approx(2.0 * mean * math.log(4.0), rel=1e-6)
        assert kl_c == pytest.approx(1000.0 * kl_1, rel=1e-5) and threshold_c == pytest.approx(1000.0 * threshold_1, rel=1e-5)
    else:
        assert kl_c == pytest.approx(kl_1, rel=1e-6) and threshold_1 == threshold_c == pytest.approx(2.0 * math.log(4.0))


def test_without_the_gate_every_gaussian_is_gated_under_the_gated_runs_lambda_kl():
    """The ablation differs from the gated run in the mask only: the same measurements give the same lambda_KL (it
    once stayed 0 without the gate, so the ablation removed nothing), and in 'loss' units nothing is measured."""
    torch.manual_seed(0)
    n, n_views = 50, 7
    base = torch.rand(n, dtype=torch.float64) ** 4
    gate = ConvergenceGateConfig(min_refreshes=2, window=1, threshold_quantile=0.8, max_eligible_fraction=0.7)
    gated_run, ablation = _controller(gate=gate), _controller(gate=gate, use_gate=False)
    for step in range(0, 40):
        for vedal in (gated_run, ablation):
            vedal.before_step(step, n, n_views, lambda views: base * len(views))
    assert 0 < int(gated_run.gated_mask(n).sum()) < n and ablation.gated_mask(n).all()
    assert ablation.kl_lambda() == gated_run.kl_lambda() == pytest.approx(float((0.8 * base).mean()))
    logits = torch.randn(n)
    assert float(ablation.regulariser(logits, ablation.gated_mask(n))["retention_kl"]) > 0
    assert ablation.report()["gate"] is None and gated_run.report()["gate"]["grants"] > 0
    assert "reversal_rate" not in ablation.scalars(logits, ablation.gated_mask(n), 39)
    assert ablation.state_dict()["use_gate"] is False and gated_run.state_dict()["use_gate"] is True

    absolute = _controller(use_gate=False, kl_weight_units="loss", kl_weight=1e-6)
    asked = []
    for step in range(0, 40):
        absolute.before_step(step, n, n_views, lambda views: asked.append(views) or base * len(views))
    assert asked == [] and absolute.gated_mask(n).all() and absolute.kl_lambda() == 1e-6


def _with_and_without(option: str, target: int, steps: int = 60, **fixed):
    """Two controllers with a target of `target` of 200 Gaussians (and the settings `fixed`), one with `option` on,
    fed the same heavy-tailed importances (as of trained models) for `steps` steps; returns (with, without, n)."""
    torch.manual_seed(0)
    n = 200
    base = torch.rand(n, dtype=torch.float64) ** 4
    gate = ConvergenceGateConfig(min_refreshes=2, window=1, threshold_quantile=0.8, max_eligible_fraction=0.7)
    runs = [_controller(gate=gate, target_gaussians=target, min_gaussians=8, **fixed, **{option: on})
            for on in (True, False)]
    for step in range(0, steps):
        for run in runs:
            run.before_step(step, n, 7, lambda views: base * len(views))
    return runs[0], runs[1], n


@pytest.mark.parametrize("target", [60, 20])
def test_kl_at_target_puts_proposition_1s_threshold_where_the_removal_cuts_the_gated(target):
    """kl_at_target with kl_weight 1: a gated Gaussian is let go (p < 1/2 by Proposition 1) exactly when its
    importance EMA is at or below that of the k-th lowest gated one, k = Gaussians - target: the head's share of
    the gated is the removal's (with the mean as the unit it is not). With more to remove than are gated, every
    gated one is let go."""
    vedal, mean_run, n = _with_and_without("kl_at_target", target, prior_at_target=False)
    gated = vedal.gated_mask(n)
    assert torch.equal(gated, mean_run.gated_mask(n)) and 0 < int(gated.sum()) < n
    ema = vedal.gate.ema
    let_go = gated & (ema <= vedal.prune_threshold_importance() * (1 + 1e-9))
    assert int(let_go.sum()) == min(n - target, int(gated.sum()))
    assert mean_run.prune_threshold_importance() == pytest.approx(float(ema.double().mean()) * math.log(4.0), rel=1e-6)
    assert int((gated & (ema <= mean_run.prune_threshold_importance())).sum()) != n - target
    # A gate short of the removal count (as before it fills its cap): the threshold is the highest gated EMA.
    few = gated & (torch.cumsum(gated.long(), 0) <= 50)
    vedal.gate.eligible = few
    vedal._update_importance_scale()
    assert vedal.prune_threshold_importance() == pytest.approx(float(ema[few].max()), rel=1e-9)
    vedal.gate.eligible = gated
    vedal._update_importance_scale()
    restored = _controller(gate=vedal.config.gate, target_gaussians=target, kl_at_target=True, min_gaussians=8,
                           prior_at_target=False)
    restored.load_state_dict(vedal.state_dict())
    assert restored.kl_lambda() == vedal.kl_lambda()


def test_prior_at_target_is_the_share_of_the_gated_pool_that_the_removal_keeps():
    """prior_at_target with N of n kept: pi = target_contest N / (n - N + target_contest N) in the KL term and in
    Proposition 1's threshold, from fine-tuning's start (the configured pi before it, and without the option)."""
    target = 40
    vedal, plain, n = _with_and_without("prior_at_target", target, steps=0)
    assert vedal.prior_keep_probability() == plain.prior_keep_probability() == 0.2  # before fine-tuning
    vedal, plain, n = _with_and_without("prior_at_target", target)
    pi = 20 / (160 + 20)
    assert vedal.prior_keep_probability() == pytest.approx(pi) and plain.prior_keep_probability() == 0.2
    assert vedal.prune_threshold_importance() == pytest.approx(vedal.kl_lambda() * math.log((1 - pi) / pi))
    logits, gated = torch.randn(n), vedal.gated_mask(n)
    assert int(gated.sum()) > 0
    p = torch.sigmoid(logits.double())[gated]
    kl = (p * torch.log(p / pi) + (1 - p) * torch.log((1 - p) / (1 - pi))).sum() * vedal.kl_lambda()
    assert float(vedal.regulariser(logits, gated)["retention_kl"]) == pytest.approx(float(kl), rel=1e-4)


def test_a_target_sets_the_prior_by_default_and_without_one_the_papers_prior_stays():
    """prior_at_target is on by default: with a target the prior is the removal's share of the gated pool once
    fine-tuning starts; without a target, or with the option off, it is prior_keep_probability."""
    n, target = 200, 40
    runs = {name: _controller(gate=ConvergenceGateConfig(min_refreshes=2, window=1, threshold_quantile=0.8,
                                                         max_eligible_fraction=0.7), min_gaussians=8, **settings)
            for name, settings in {"default": dict(target_gaussians=target), "off": dict(target_gaussians=target,
                                   prior_at_target=False), "no target": dict(prior_keep_probability=0.3)}.items()}
    for step in range(0, 20):
        for run in runs.values():
            run.before_step(step, n, 7, lambda views: torch.rand(n, dtype=torch.float64))
    assert runs["default"].prior_keep_probability() == pytest.approx(20 / (160 + 20))
    assert runs["off"].prior_keep_probability() == 0.2 and runs["no target"].prior_keep_probability() == 0.3


def test_the_kl_scale_is_restored_with_the_gate():
    vedal = _controller()
    for step in range(0, 40):
        vedal.before_step(step, 5, 7, lambda views: torch.rand(5, dtype=torch.float64))
    assert vedal.importance_scale > 0
    restored = _controller()
    restored.load_state_dict(vedal.state_dict())
    assert restored.kl_lambda() == vedal.kl_lambda()


def test_sampled_opacity_logits_are_the_logit_of_o_times_z():
    vedal = _controller()
    vedal.finetune_started_at = 0
    raw = torch.tensor([-3.0, 0.0, 2.0, 20.0, 40.0], dtype=torch.float64)
    head = torch.tensor([0.5, -1.0, 3.0, 30.0, -30.0], dtype=torch.float64)
    gated = torch.tensor([True, True, True, True, False])
    torch.manual_seed(3)
    masked = vedal.sampled_opacity_logits(raw, head, gated, step=5)
    torch.manual_seed(3)
    from nerfstudio_pruning.vedal.retention_head import binary_concrete

    z = binary_concrete(head, vedal.temperature(5))
    expected = torch.where(gated, torch.sigmoid(raw) * z, torch.sigmoid(raw))
    assert torch.allclose(torch.sigmoid(masked), expected, rtol=1e-12, atol=1e-15)
    assert masked[4] == raw[4]


def test_controller_state_round_trips_and_refuses_another_format():
    vedal = _controller()
    for step in range(0, 40):
        vedal.before_step(step, 5, 7, lambda views: torch.rand(5, dtype=torch.float64))
    vedal.finish(torch.randn(5))
    restored = _controller()
    restored.load_state_dict(vedal.state_dict())
    for key in ("finetune_started_at", "last_refresh_step", "refresh_count", "pruned"):
        assert getattr(restored, key) == getattr(vedal, key)
    assert torch.equal(restored.window.sums, vedal.window.sums)
    assert torch.equal(restored.gate.ema, vedal.gate.ema) and torch.equal(restored.frozen_logits, vedal.frozen_logits)
    with pytest.raises(ValueError, match="format"):
        restored.load_state_dict({**vedal.state_dict(), "format": 1})


# -- target sizes ---------------------------------------------------------------------------------------------------
def test_pup_target_keeps_the_rounds_shape_and_ends_exactly_on_it():
    paper = PupScheduleConfig(target_fraction=0.1)
    assert paper.planned_counts(1000) == PupScheduleConfig().planned_counts(1000) == [200, 100]
    for target, n in ((7153, 143067), (28614, 143067), (101, 1000)):
        counts = PupScheduleConfig(target_gaussians=target).planned_counts(n)
        assert counts[-1] == target and n > counts[0] > target
        # the first round takes log(0.2) / log(0.1) of the log-reduction, as 80% + 50% does
        assert math.log(counts[0] / n) / math.log(target / n) == pytest.approx(math.log(0.2) / math.log(0.1), abs=1e-3)

    schedule = PupSchedule(PupScheduleConfig(prune_start_step=10, refine_steps=(5, 5), target_gaussians=77,
                                             min_gaussians=8))
    n = 1000
    schedule.check_feasible(n)
    assert schedule.plan == [schedule.plan[0], 77] and schedule.remaining_after_all_rounds(n) == 77
    scores = torch.randn(n)
    mask = schedule.prune_mask(scores)
    assert int((~mask).sum()) == schedule.plan[0] and scores[~mask].min() >= scores[mask].max()
    schedule.round_done()
    restored = PupSchedule(schedule.config)
    restored.load_state_dict(schedule.state_dict())
    survivors = scores[~mask]
    assert int((~restored.prune_mask(survivors)).sum()) == 77

    too_many = PupSchedule(PupScheduleConfig(target_gaussians=1000))
    with pytest.raises(PruningRefused, match="not below the 1000"):
        too_many.check_feasible(1000)
    with pytest.raises(ValueError, match="not both"):
        PupScheduleConfig(target_gaussians=5, target_fraction=0.5)
    with pytest.raises(ValueError, match="target_fraction"):
        PupScheduleConfig(target_fraction=1.0)


def _targeted(n: int, target: int, **overrides) -> VedalController:
    vedal = _controller(target_gaussians=target, min_gaussians=1, **overrides)
    vedal.finetune_started_at, vedal.start_gaussians = 0, n
    vedal.gate = ConvergenceGate(vedal.gate_config(), n)
    return vedal


def test_vedal_target_sets_the_gates_cap_and_the_removal_ranks_the_gated_by_p():
    n, target = 100, 20
    vedal = _targeted(n, target)
    cap = vedal.gate.config.max_eligible_fraction
    assert cap == pytest.approx((n - target + 0.5 * target) / n) and vedal.gate.config.threshold_quantile >= cap
    gated = torch.arange(n) < 90
    vedal.gate.update(torch.linspace(0, 1, n), step=0)
    vedal.gate.eligible = gated
    logits = torch.randn(n)
    removed = vedal.hard_prune_mask(logits, gated)
    assert int(removed.sum()) == n - target and not removed[~gated].any()
    assert logits[removed].max() <= logits[gated & ~removed].min()  # the head ranks: the lowest p go

    # A gate that has not filled: every gated one goes, then the ungated with the lowest importance EMA.
    few = torch.arange(n) < 50
    vedal.gate.eligible = few
    removed = vedal.hard_prune_mask(logits, few)
    assert int(removed.sum()) == n - target and removed[few].all()
    assert torch.equal(removed[50:], torch.arange(50, n) < 50 + (n - target - 50))  # the EMA rises with the index

    with pytest.raises(PruningRefused, match="not below"):
        _controller(target_gaussians=n).before_step(10, n, 7, lambda views: torch.zeros(n, dtype=torch.float64))
    fraction = _controller(target_fraction=0.25, min_gaussians=1)
    fraction.before_step(10, n, 7, lambda views: torch.zeros(n, dtype=torch.float64))
    assert fraction.target() == 25 and fraction.state_dict()["start_gaussians"] == n
    restored = _controller(target_fraction=0.25, min_gaussians=1)
    restored.load_state_dict(fraction.state_dict())
    assert restored.target() == 25 and restored.gate.config == fraction.gate.config


def test_the_last_part_of_fine_tuning_hands_the_render_over_to_the_removals_mask_then_fixes_it():
    n = 8
    vedal = _targeted(n, 5, hard_mask_fraction=0.2)  # fine-tuning 0..60: steps 49..54 blend, 55..60 fixed
    assert not vedal.hard_mask_phase(48) and vedal.hard_mask_phase(49)
    assert [vedal.hardening(step) for step in (48, 49, 51, 54, 55, 60)] == [0.0, 1 / 6, 0.5, 1.0, 1.0, 1.0]
    gated = torch.tensor([True] * 6 + [False] * 2)
    vedal.gate.update(torch.rand(n), step=0)
    vedal.gate.eligible = gated
    raw = torch.randn(n, dtype=torch.float64)
    logits = torch.tensor([3.0, -1.0, 0.5, -2.0, 1.0, -0.5, 0.0, 0.0], dtype=torch.float64, requires_grad=True)
    removed = vedal.removal_mask(logits.detach(), gated)
    assert removed.tolist() == [False, True, False, True, False, True, False, False]

    # the blend: opacity o ((1 - s) z + s [kept]) with z the Binary Concrete sample (1 for the ungated)
    step = 51
    torch.manual_seed(1)
    blended = vedal.sampled_opacity_logits(raw, logits, gated, step)
    torch.manual_seed(1)
    from nerfstudio_pruning.vedal.retention_head import binary_concrete

    z = torch.where(gated, binary_concrete(logits.detach(), vedal.temperature(step)), torch.ones(n, dtype=torch.float64))
    s = vedal.hardening(step)
    expected = torch.sigmoid(raw) * ((1 - s) * z + s * (~removed).double())
    torch.testing.assert_close(torch.sigmoid(blended.detach()), expected, rtol=1e-9, atol=1e-12)
    (head_grad,) = torch.autograd.grad(blended.sum(), (logits,))
    assert (head_grad[gated] != 0).all() and (head_grad[~gated] == 0).all()
    kl_now = vedal.regulariser(logits, gated, step)["retention_kl"]
    assert float(kl_now) == pytest.approx((1 - s) * float(vedal.regulariser(logits, gated)["retention_kl"]))

    # from the midpoint: the decision is fixed once, the head is no longer asked, nothing more is regularised
    asked = []
    opacities, none = vedal.training_opacity_logits(raw, lambda: asked.append(1) or logits.detach(), gated, 55)
    assert none is None and asked == [1] and torch.equal(vedal.decided, removed)
    assert torch.equal(opacities[~removed], raw[~removed]) and (opacities[removed] == -100.0).all()
    vedal.training_opacity_logits(raw, lambda: asked.append(1) or -logits.detach(), gated, 58)
    assert asked == [1] and torch.equal(vedal.hard_prune_mask(-logits.detach(), gated), removed)
    assert not vedal.before_step(60, n, 7, lambda views: torch.zeros(n, dtype=torch.float64))  # no refresh
    restored = _targeted(n, 5, hard_mask_fraction=0.2)
    restored.load_state_dict(vedal.state_dict())
    assert torch.equal(restored.decided, removed)
