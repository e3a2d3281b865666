import math

import pytest
import torch

from nerfstudio_pruning.vedal.gate import ConvergenceGate, ConvergenceGateConfig


def open_config(**overrides) -> ConvergenceGateConfig:
    """Threshold and cap wide open and the convergence test applied at every refresh (not sticky), so a test sees
    the convergence rule alone unless it sets them."""
    fields = dict(beta=0.9, rel_tol=0.05, window=5, min_refreshes=1, threshold_quantile=1.0, max_eligible_fraction=1.0,
                  sticky=False)
    fields.update(overrides)
    return ConvergenceGateConfig(**fields)


def first_converged_refresh(sequence, cfg: ConvergenceGateConfig) -> int:
    """Independent float64 reference of the convergence rule for one Gaussian (never converged before, so the
    hysteresis does not matter): 1-based refresh index at which it first counts as converged."""
    ema, streak, margins = None, 0, []
    for t, value in enumerate(sequence, start=1):
        if ema is None:
            ema = value
            continue
        new = cfg.beta * ema + (1 - cfg.beta) * value
        change = abs(new - ema) / abs(ema)
        margins.append(abs(change - cfg.rel_tol))
        streak = streak + 1 if change < cfg.rel_tol else 0
        ema = new
        if streak >= cfg.window and t >= cfg.min_refreshes:
            assert min(margins) > 1e-4, "sequence too close to the tolerance for a float32 comparison"
            return t
    raise AssertionError("reference never converged")


def run(gate: ConvergenceGate, rows):
    masks = []
    for step, row in enumerate(rows):
        masks.append(gate.update(torch.as_tensor(row, dtype=torch.float32), step=step * 100))
    return masks


def test_first_observation_initialises_ema_directly():
    gate = ConvergenceGate(open_config(), 3)
    gate.update(torch.tensor([2.0, 0.5, 7.0]), step=0)
    assert torch.equal(gate.ema, torch.tensor([2.0, 0.5, 7.0]))
    assert torch.isinf(gate.last_relative_change).all()
    assert gate.stable_count.tolist() == [0, 0, 0]


def test_converging_sequence_becomes_eligible_after_window_stable_refreshes():
    cfg = open_config(window=5, min_refreshes=1)
    sequence = [1.0 + 2.0 * 0.7**t for t in range(60)]
    expected = first_converged_refresh(sequence, cfg)
    gate = ConvergenceGate(cfg, 4)
    masks = run(gate, [[v] * 4 for v in sequence])
    first = next(t for t, m in enumerate(masks, start=1) if m.all())
    assert first == expected
    assert not any(m.any() for m in masks[: expected - 1])
    # The stable streak that made it eligible is exactly `window` long at that refresh.
    gate2 = ConvergenceGate(cfg, 1)
    run(gate2, [[v] for v in sequence[:expected]])
    assert gate2.stable_count.item() == cfg.window


@pytest.mark.parametrize("window,min_refreshes,expected", [(3, 1, 4), (3, 8, 8), (6, 2, 7)])
def test_constant_sequence_respects_window_and_min_refreshes(window, min_refreshes, expected):
    # A constant is stable from the second refresh on, so the streak after refresh t is t - 1.
    gate = ConvergenceGate(open_config(window=window, min_refreshes=min_refreshes), 2)
    masks = run(gate, [[1.0, 3.0]] * 20)
    first = next(t for t, m in enumerate(masks, start=1) if m.all())
    assert first == expected
    assert gate.reversal_count == 0


def test_oscillating_sequence_never_becomes_eligible():
    gate = ConvergenceGate(open_config(), 3)
    rows = [[0.5, 0.5, 0.5] if t % 2 == 0 else [4.0, 4.0, 4.0] for t in range(200)]
    masks = run(gate, rows)
    assert not any(m.any() for m in masks)
    assert gate.stable_count.max().item() < gate.config.window
    assert gate.grant_count == 0 and gate.reversal_rate == 0.0


def test_jump_after_convergence_reverses_and_is_counted():
    gate = ConvergenceGate(open_config(), 10)
    run(gate, [[1.0] * 10] * 30)
    assert gate.eligible.all() and gate.grant_count == 10
    jumped = torch.tensor([True] * 4 + [False] * 6)
    mask = gate.update(torch.where(jumped, 5.0, 1.0), step=3000)
    assert torch.equal(mask, ~jumped)
    assert gate.reversal_count == 4
    assert gate.reversal_rate == pytest.approx(4 / 10)
    assert gate.history[-1] == (3000, pytest.approx(0.6), 4)
    # Once the EMA settles at the new level the jumped Gaussians come back.
    run(gate, [torch.where(jumped, 5.0, 1.0).tolist()] * 60)
    assert gate.eligible.all() and gate.grant_count == 14 and gate.reversal_count == 4


def test_sticky_eligibility_survives_a_moving_estimate_but_not_becoming_important():
    gate = ConvergenceGate(open_config(sticky=True, threshold_quantile=0.5), 10)
    ranks = torch.arange(10, dtype=torch.float32) + 1.0
    run(gate, [ranks.tolist()] * 30)
    assert gate.eligible.tolist() == [True] * 5 + [False] * 5 and gate.grant_count == 5
    # Gaussians 0 and 1 turn negative (removing them now lowers the loss: their EMAs move by far more than the
    # tolerance, so they are no longer converged), Gaussian 4 rises to the top.
    moved = ranks.clone()
    moved[0], moved[1], moved[4] = -5.0, -3.0, 100.0
    gate.update(moved, step=0)
    assert not gate.converged[:2].any()  # the convergence test alone would revoke them
    assert gate.eligible[:2].all() and not gate.eligible[4]
    assert gate.reversal_count == 1
    not_sticky = ConvergenceGate(open_config(threshold_quantile=0.5), 10)
    run(not_sticky, [ranks.tolist()] * 30)
    not_sticky.update(moved, step=0)
    assert not not_sticky.eligible[:2].any()


def test_rising_above_threshold_reverses():
    # Ranks 0..9 converged; with a median threshold the lower half is eligible. Gaussian 0 then drifts upwards
    # slowly (stable refreshes) and crosses the threshold: it must lose eligibility for that reason alone.
    gate = ConvergenceGate(open_config(threshold_quantile=0.5), 10)
    values = torch.arange(1.0, 11.0)
    run(gate, [values.tolist()] * 20)
    assert gate.eligible.tolist() == [True] * 5 + [False] * 5
    for t in range(200):
        values[0] = min(values[0].item() * 1.02, 8.0)
        gate.update(values, step=t)
        if not gate.eligible[0]:
            break
    assert not gate.eligible[0]
    assert gate.stable_count[0] >= gate.config.window, "it left through the threshold, not through instability"
    assert gate.reversal_count >= 1


def test_hysteresis_keeps_converged_gaussians_through_moderate_noise():
    cfg = open_config(rel_tol=0.05, release_tol_factor=2.0)
    wiggle = [[1.7] if t % 2 == 0 else [0.3] for t in range(60)]
    converged_then_wiggle = ConvergenceGate(cfg, 1)
    run(converged_then_wiggle, [[1.0]] * 20)
    assert converged_then_wiggle.eligible.all()
    run(converged_then_wiggle, wiggle)
    changes = converged_then_wiggle.last_relative_change.item()
    assert cfg.rel_tol < changes < cfg.rel_tol * cfg.release_tol_factor
    assert converged_then_wiggle.eligible.all() and converged_then_wiggle.reversal_count == 0
    # The same noise from the start never lets it converge in the first place.
    wiggling_from_start = ConvergenceGate(cfg, 1)
    masks = run(wiggling_from_start, [[1.0]] + wiggle)
    assert not any(m.any() for m in masks)


def test_quantile_threshold():
    gate = ConvergenceGate(open_config(threshold_quantile=0.5), 100)
    values = torch.randperm(100).float() + 1.0
    run(gate, [values] * 10)
    assert torch.equal(gate.eligible, values <= 50.0)


def test_cap_keeps_least_important():
    gate = ConvergenceGate(open_config(max_eligible_fraction=0.3), 100)
    values = torch.randperm(100).float() + 1.0
    masks = run(gate, [values] * 10)
    assert all(m.sum().item() <= 30 for m in masks)
    assert torch.equal(gate.eligible, values <= 30.0)
    assert gate.eligible_fraction == pytest.approx(0.3)


@pytest.mark.parametrize("keeps_incumbents", [True, False])
def test_a_full_cap_keeps_its_incumbents_unless_told_not_to(keeps_incumbents):
    """At the cap, an eligible Gaussian whose EMA rises a little (still far below the threshold) keeps its place
    against a newcomer whose EMA is now lower; the earlier rule (least important of all) swaps them: a reversal."""
    gate = ConvergenceGate(open_config(sticky=True, max_eligible_fraction=0.3, cap_keeps_incumbents=keeps_incumbents), 100)
    values = torch.arange(1.0, 101.0)
    run(gate, [values] * 10)
    assert torch.equal(gate.eligible, values <= 30.0) and gate.reversal_count == 0
    moved = values.clone()
    moved[29] = 35.0  # an incumbent (rank 30) rises a little
    moved[30] = 0.5  # a newcomer (rank 31) becomes the least important of all
    run(gate, [moved] * 60)
    assert gate.converged[30], "the newcomer must qualify for the test to mean anything"
    assert int(gate.eligible.sum()) == 30
    if keeps_incumbents:
        assert gate.eligible[29] and not gate.eligible[30] and gate.reversal_count == 0
    else:
        assert not gate.eligible[29] and gate.eligible[30] and gate.reversal_count == 1


def test_a_cap_below_the_incumbents_keeps_the_least_important_of_them():
    gate = ConvergenceGate(open_config(sticky=True, max_eligible_fraction=0.3), 100)
    values = torch.arange(1.0, 101.0)
    run(gate, [values] * 10)
    gate.config.max_eligible_fraction = 0.2
    run(gate, [values])
    assert torch.equal(gate.eligible, values <= 20.0) and gate.reversal_count == 10


def test_relative_change_floor_lets_negligible_gaussians_converge():
    rows = [[1.0] * 9 + [1e-9 if t % 2 == 0 else 5e-9] for t in range(40)]
    with_floor = ConvergenceGate(open_config(rel_change_floor=0.01), 10)
    run(with_floor, rows)
    assert with_floor.eligible.all()
    without_floor = ConvergenceGate(open_config(rel_change_floor=0.0), 10)
    run(without_floor, rows)
    assert not without_floor.eligible[9] and without_floor.eligible[:9].all()


def test_select_keeps_right_rows_and_update_continues():
    gate = ConvergenceGate(open_config(window=3), 8)
    rows = [[float(i + 1) + (t % 3 == 0) * 0.5 * (i % 2) for i in range(8)] for t in range(12)]
    run(gate, rows)
    before = {k: v.clone() for k, v in gate.state_dict().items() if isinstance(v, torch.Tensor)}
    keep = torch.tensor([True, False, True, True, False, False, True, False])
    gate.select(keep)
    assert gate.num_gaussians == 4
    for key, value in before.items():
        assert torch.equal(getattr(gate, key), value[keep]), key
    gate.select(torch.tensor([3, 0]))
    assert torch.equal(gate.ema, before["ema"][keep][[3, 0]])
    gate.update(torch.tensor([7.0, 1.0]), step=10_000)
    with pytest.raises(ValueError):
        gate.update(torch.ones(4), step=10_100)


def test_append_adds_unconverged_gaussians_initialised_by_first_observation():
    gate = ConvergenceGate(open_config(window=2), 3)
    run(gate, [[1.0, 2.0, 3.0]] * 5)
    assert gate.eligible.all()
    gate.append(2)
    assert gate.num_gaussians == 5
    assert gate.eligible.tolist() == [True, True, True, False, False]
    gate.update(torch.tensor([1.0, 2.0, 3.0, 0.25, 9.0]), step=500)
    assert gate.ema[3:].tolist() == [0.25, 9.0]
    assert gate.n_updates.tolist() == [6, 6, 6, 1, 1]
    assert gate.eligible.tolist() == [True, True, True, False, False]


def test_state_dict_round_trip_with_different_n():
    cfg = ConvergenceGateConfig(min_refreshes=3, window=2, threshold_quantile=0.8, max_eligible_fraction=0.5)
    generator = torch.Generator().manual_seed(0)
    base = torch.rand(50, generator=generator) + 0.1
    source = ConvergenceGate(cfg, 50)
    for t in range(15):
        source.update(base * (1 + 0.01 * torch.rand(50, generator=generator)), step=t)
    source.select(torch.arange(50) % 5 != 0)
    state = source.state_dict()

    restored = ConvergenceGate(cfg, 7)
    restored.load_state_dict(state)
    assert restored.num_gaussians == 40
    for key in ("ema", "last_relative_change", "stable_count", "n_updates", "eligible"):
        assert torch.equal(getattr(restored, key), getattr(source, key)), key
    assert (restored.reversal_count, restored.grant_count) == (source.reversal_count, source.grant_count)
    assert restored.history == source.history
    for t in range(5):
        importance = torch.rand(40, generator=generator) + 0.1
        assert torch.equal(restored.update(importance, step=100 + t), source.update(importance, step=100 + t))
    assert restored.history == source.history
    # The state is a copy: later updates of the source do not leak into it.
    assert state["ema"].numel() == 40 and state["n_updates"].max().item() == 15


def test_rejects_bad_input():
    gate = ConvergenceGate(open_config(), 3)
    with pytest.raises(ValueError):
        gate.update(torch.tensor([1.0, math.nan, 2.0]), step=0)
    with pytest.raises(ValueError):
        gate.update(torch.ones(2, 3), step=0)
    with pytest.raises(ValueError):
        ConvergenceGate(ConvergenceGateConfig(beta=1.0), 3)
