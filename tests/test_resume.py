"""Resuming pup-gs and vedal-gs from checkpoints in every phase of their schedules.

A checkpoint restores everything the next steps depend on (model, method state, optimizer moments, densification
statistics, view order and random generators), so a resumed run repeats the uninterrupted one bit for bit on the
same device: the tests compare final checkpoints for equality, which also proves the count is the same. The ns-*
subprocesses run with a fixed PYTHONHASHSEED (see e2e.ns), as reproducing any run needs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from conftest import PUP_ARGS, PUP_SAVE_EVERY, PUP_STEPS, VEDAL_STEPS
from e2e import ns, ns_eval, quick_train_args, run_dir
from nerfstudio_pruning.methods.base import GAUSSIAN_PARAMS

PUP_LAST = PUP_STEPS - 1
VEDAL_LAST = VEDAL_STEPS - 1
VEDAL_MID_GATE = 180


def checkpoint(run: Path, step: int) -> dict:
    return torch.load(run / "nerfstudio_models" / f"step-{step:09d}.ckpt", map_location="cpu", weights_only=True)


def resume(method: str, run: Path, step: int, steps: int, name: str, extra_args, e2e_root: Path) -> Path:
    """Continue `run` from its checkpoint at `step` for `steps` steps with the run's own settings."""
    outputs = e2e_root / "outputs"
    config = yaml.load((run / "config.yml").read_text(), Loader=yaml.Loader)
    args = [*quick_train_args(name, steps, outputs), "--steps-per-save", str(PUP_SAVE_EVERY),
            "--save-only-latest-checkpoint", "False", *extra_args,
            "--load-dir", str(run / "nerfstudio_models"), "--load-step", str(step),
            "nsp-default-scene", "--data", str(config.pipeline.datamanager.dataparser.data)]
    proc = ns("ns-train", [method, *args], cwd=e2e_root)
    assert f"continuing from step {step}: this run trains steps {step + 1} to {step + steps}" in " ".join(proc.stdout.split())
    resumed = run_dir(outputs, name, method)
    # Its config names its own latest checkpoint, not the step it was resumed from (which only the source run has).
    assert yaml.load((resumed / "config.yml").read_text(), Loader=yaml.Loader).load_step is None
    return resumed


def assert_same_model(a: dict, b: dict) -> None:
    pa, pb = a["pipeline"], b["pipeline"]
    assert pa["_model.gauss_params.means"].shape == pb["_model.gauss_params.means"].shape
    for name in GAUSSIAN_PARAMS:
        key = f"_model.gauss_params.{name}"
        assert torch.equal(pa[key], pb[key]), f"{key}: max difference {(pa[key] - pb[key]).abs().max()}"
    for name, opt in a["optimizers"].items():
        for i, state in opt["state"].items():
            other = b["optimizers"][name]["state"][i]
            assert all(torch.equal(state[k], other[k]) for k in state), f"optimizer state of {name} differs"


def loaded_trainer(run: Path, step: int, output_dir: Path):
    """The trainer `ns-train --load-dir <run> --load-step <step>` builds, set up in this process, with the bindings
    its first training step makes (optimizers pointed at the loaded parameters)."""
    config = yaml.load((run / "config.yml").read_text(), Loader=yaml.Loader)
    config.load_dir = run / "nerfstudio_models"
    config.load_step = step
    config.output_dir = output_dir
    config.vis = "tensorboard"
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    trainer.pipeline.model.step_cb(trainer.optimizers, trainer._start_step)
    return trainer


def assert_optimizers_restored(trainer, saved: dict) -> None:
    model = trainer.pipeline.model
    for name in GAUSSIAN_PARAMS:
        optimizer = trainer.optimizers.optimizers[name]
        param = optimizer.param_groups[0]["params"][0]
        assert param is model.gauss_params[name], f"the {name} optimizer does not step the model's parameter"
        state = optimizer.state.get(param, {})
        saved_state = saved["optimizers"][name]["state"].get(0, {})
        assert state.keys() == saved_state.keys()
        for key, value in saved_state.items():
            assert torch.equal(state[key], value), f"{name}: Adam {key} did not come back"


# -- pup-gs ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("step, phase", [(40, "before densification and the rounds"), (80, "between the rounds"),
                                         (100, "after the last round")])
def test_pup_gs_resumed_anywhere_ends_identical_to_the_uninterrupted_run(pup_run, e2e_root, step, phase):
    _, run = pup_run
    if step == 40:
        count = lambda s: checkpoint(run, s)["pipeline"]["_model.gauss_params.means"].shape[0]
        assert count(60) != count(40), "no densification after step 40: the densification state would go untested"
    resumed = resume("pup-gs", run, step, PUP_LAST - step, f"pup-resume-{step}", PUP_ARGS, e2e_root)
    final, resumed_final = checkpoint(run, PUP_LAST), checkpoint(resumed, PUP_LAST)
    assert int(resumed_final["pipeline"]["_model._extra_state"]["pup"]["rounds_done"]) == 2
    assert_same_model(final, resumed_final)
    assert torch.equal(final["pipeline"]["_model.sensitivity"], resumed_final["pipeline"]["_model.sensitivity"])


def test_pup_gs_between_rounds_restores_count_round_and_optimizer_state(pup_run, tmp_path):
    _, run = pup_run
    saved = checkpoint(run, 80)
    trainer = loaded_trainer(run, 80, tmp_path)
    model = trainer.pipeline.model
    assert model.num_points == saved["pipeline"]["_model.gauss_params.means"].shape[0]
    assert model.schedule.rounds_done == 1 and model.schedule.first_round_step == 80
    assert model.schedule.round_step(1) == 100
    assert_optimizers_restored(trainer, saved)


def test_pup_gs_resumed_after_its_schedule_keeps_training_the_survivors(pup_run, e2e_root):
    _, run = pup_run
    resumed = resume("pup-gs", run, PUP_LAST, 10, "pup-resume-end", PUP_ARGS, e2e_root)
    before, after = checkpoint(run, PUP_LAST)["pipeline"], checkpoint(resumed, PUP_LAST + 10)["pipeline"]
    assert ns_eval(resumed / "config.yml", cwd=e2e_root)["num_gaussians"] == after["_model.gauss_params.means"].shape[0]
    assert after["_model.gauss_params.means"].shape == before["_model.gauss_params.means"].shape
    assert int(after["_model._extra_state"]["pup"]["rounds_done"]) == 2
    moved = (after["_model.gauss_params.means"] - before["_model.gauss_params.means"]).norm(dim=1) > 0
    assert moved.float().mean() > 0.5  # optimizers bound to stale tensors would leave them where they were


# -- vedal-gs ----------------------------------------------------------------------------------------------------


def vedal_args(run: Path):
    config = yaml.load((run / "config.yml").read_text(), Loader=yaml.Loader).pipeline.model
    gate = config.gate
    return ["--pipeline.model.finetune-start-step", str(config.finetune_start_step),
            "--pipeline.model.hard-prune-step", str(config.hard_prune_step),
            "--pipeline.model.importance-every", str(config.importance_every),
            "--pipeline.model.importance-views", str(config.importance_views),
            "--pipeline.model.importance-downscale", str(config.importance_downscale),
            "--pipeline.model.gate.min-refreshes", str(gate.min_refreshes), "--pipeline.model.gate.window", str(gate.window),
            "--pipeline.model.kl-weight", str(config.kl_weight)]


def test_vedal_gs_resumed_mid_gate_ends_identical_to_the_uninterrupted_run(vedal_run, e2e_root):
    _, run = vedal_run
    mid = checkpoint(run, VEDAL_MID_GATE)["pipeline"]["_model._extra_state"]["vedal"]
    assert mid["gate"]["eligible"].any() and not mid["pruned"], "step 180 is not mid-gate: the test would not test it"
    resumed = resume("vedal-gs", run, VEDAL_MID_GATE, VEDAL_LAST - VEDAL_MID_GATE, "vedal-resume-mid", vedal_args(run), e2e_root)
    final, resumed_final = checkpoint(run, VEDAL_LAST), checkpoint(resumed, VEDAL_LAST)
    assert_same_model(final, resumed_final)
    a, b = final["pipeline"], resumed_final["pipeline"]
    for key in (k for k in a if k.startswith("_model.retention_head.")):
        assert torch.equal(a[key], b[key]), key
    gate_a, gate_b = a["_model._extra_state"]["vedal"]["gate"], b["_model._extra_state"]["vedal"]["gate"]
    assert torch.equal(gate_a["ema"], gate_b["ema"]) and torch.equal(gate_a["eligible"], gate_b["eligible"])
    assert b["_model._extra_state"]["vedal"]["pruned"]


def test_vedal_gs_mid_gate_restores_gate_head_window_and_optimizers(vedal_run, tmp_path):
    _, run = vedal_run
    saved = checkpoint(run, VEDAL_MID_GATE)
    state = saved["pipeline"]
    vedal = state["_model._extra_state"]["vedal"]
    trainer = loaded_trainer(run, VEDAL_MID_GATE, tmp_path)
    model = trainer.pipeline.model
    assert model.num_points == state["_model.gauss_params.means"].shape[0]
    assert torch.equal(model.vedal.gate.ema, vedal["gate"]["ema"]) and torch.equal(model.vedal.gate.eligible, vedal["gate"]["eligible"])
    assert torch.equal(model.vedal.gate.stable_count, vedal["gate"]["stable_count"])
    assert (model.vedal.refresh_count, model.vedal.last_refresh_step, model.vedal.finetune_started_at) == (
        vedal["refresh_count"], vedal["last_refresh_step"], vedal["finetune_started_at"])
    assert model.vedal.window is not None and model.vedal.window.full
    assert torch.equal(model.vedal.window.sums, vedal["importance_sums"])
    for key, value in model.retention_head.state_dict().items():
        assert torch.equal(value, state[f"_model.retention_head.{key}"]), key
    assert_optimizers_restored(trainer, saved)
    head_optimizer = trainer.optimizers.optimizers["retention_head"]
    assert len(head_optimizer.state) == len(saved["optimizers"]["retention_head"]["state"]) > 0


def test_vedal_gs_resumed_after_the_removal_keeps_training_the_survivors(vedal_run, e2e_root):
    _, run = vedal_run
    resumed = resume("vedal-gs", run, VEDAL_LAST, 10, "vedal-resume-end", vedal_args(run), e2e_root)
    before, after = checkpoint(run, VEDAL_LAST)["pipeline"], checkpoint(resumed, VEDAL_LAST + 10)["pipeline"]
    assert after["_model.gauss_params.means"].shape == before["_model.gauss_params.means"].shape
    assert after["_model._extra_state"]["vedal"]["pruned"]
    moved = (after["_model.gauss_params.means"] - before["_model.gauss_params.means"]).norm(dim=1) > 0
    assert moved.float().mean() > 0.5
