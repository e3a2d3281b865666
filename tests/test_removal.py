"""Removal keeps parameters, Adam state and per-Gaussian state consistent; pruning masks refuse bad input."""

import pytest
import torch
from gsplat.strategy import DefaultStrategy

from nerfstudio_pruning.removal import lowest_fraction_mask, rebind_optimizers, remove_gaussians, reset_optimizer_state


def _params(n=10):
    torch.manual_seed(0)
    params = torch.nn.ParameterDict({"means": torch.nn.Parameter(torch.randn(n, 3)),
                                     "opacities": torch.nn.Parameter(torch.randn(n, 1))})
    optimizers = {k: torch.optim.Adam([p], lr=0.1) for k, p in params.items()}
    loss = sum((p ** 2).sum() for p in params.values())
    loss.backward()
    for opt in optimizers.values():
        opt.step()
    return params, optimizers


class Rows:
    def __init__(self, n):
        self.values = torch.arange(n)

    def select(self, keep):
        self.values = self.values[keep]


def test_remove_keeps_rows_and_optimizer_state_aligned():
    params, optimizers = _params()
    before = {k: p.detach().clone() for k, p in params.items()}
    moments = {k: optimizers[k].state[p]["exp_avg"].clone() for k, p in params.items()}
    strategy_state = DefaultStrategy().initialize_state()
    strategy_state["grad2d"] = torch.arange(10.0)
    extra = Rows(10)
    prune = torch.zeros(10, dtype=torch.bool)
    prune[[1, 4, 7]] = True
    assert remove_gaussians(params, optimizers, strategy_state, prune, extra_states=[extra]) == 3
    keep = ~prune
    for k, p in params.items():
        assert torch.equal(p.detach(), before[k][keep])
        assert optimizers[k].param_groups[0]["params"][0] is p
        assert torch.equal(optimizers[k].state[p]["exp_avg"], moments[k][keep])
    assert torch.equal(strategy_state["grad2d"], torch.arange(10.0)[keep])
    assert torch.equal(extra.values, torch.arange(10)[keep])


def test_remove_refuses_bad_masks_and_changes_nothing():
    params, optimizers = _params()
    means = params["means"]
    with pytest.raises(ValueError, match="shape"):
        remove_gaussians(params, optimizers, {}, torch.zeros(9, dtype=torch.bool))
    with pytest.raises(ValueError, match="minimum"):
        remove_gaussians(params, optimizers, {}, torch.ones(10, dtype=torch.bool), min_remaining=1)
    assert params["means"] is means and means.shape[0] == 10


def test_rebind_after_parameters_were_replaced():
    params, optimizers = _params()
    params["means"] = torch.nn.Parameter(torch.zeros(6, 3))  # as splatfacto's load_state_dict resizes
    assert rebind_optimizers(params, optimizers) == ["means"]
    assert optimizers["means"].param_groups[0]["params"][0] is params["means"]
    assert params["means"] not in optimizers["means"].state or optimizers["means"].state[params["means"]] == {}
    params["means"].grad = torch.ones(6, 3)
    optimizers["means"].step()
    assert (params["means"] != 0).all()  # the live tensor trains


def test_reset_optimizer_state_forgets_moments():
    params, optimizers = _params()
    reset_optimizer_state(optimizers, ["means"])
    assert len(optimizers["means"].state) == 0 and len(optimizers["opacities"].state) == 1


def test_lowest_fraction_mask():
    scores = torch.tensor([3.0, float("-inf"), 1.0, 2.0, 0.5])
    assert lowest_fraction_mask(scores, 0.4).tolist() == [False, True, False, False, True]
    with pytest.raises(ValueError, match="NaN"):
        lowest_fraction_mask(torch.tensor([1.0, float("nan")]), 0.5)
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            lowest_fraction_mask(scores, bad)


def test_pup_schedule_that_would_leave_too_few_gaussians_is_refused_before_scoring():
    from types import SimpleNamespace

    from nerfstudio_pruning.methods.pup_gs import PupGSModel, PupGSModelConfig
    from nerfstudio_pruning.pup.schedule import PupSchedule, PupScheduleConfig

    config = PupGSModelConfig(schedule=PupScheduleConfig(prune_start_step=0, prune_fractions=(0.8, 0.5),
                                                         refine_steps=(1, 1), min_gaussians=64))
    fake = SimpleNamespace(config=config, schedule=PupSchedule(config.schedule), num_points=500,
                           score=lambda: pytest.fail("scored despite the refusal"))
    with pytest.raises(ValueError, match="would leave 50 of 500"):
        PupGSModel.prune_if_due(fake, 0)
    with pytest.raises(ValueError, match="prune fraction"):
        PupScheduleConfig(prune_fractions=(0.8, 1.0), refine_steps=(1, 1))
    with pytest.raises(ValueError, match="differ in length"):
        PupScheduleConfig(prune_fractions=(0.8,), refine_steps=(1, 1))
