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


def resume(method: str, run: Path, step: int, steps: int, name: str, extra_args, e2e_root: Path,
           save_every: int = PUP_SAVE_EVERY) -> Path:
    """Continue `run` from its checkpoint at `step` for `steps` steps with the run's own settings, saving every
    `save_every` steps and at the last."""
    outputs = e2e_root / "outputs"
    config = yaml.load((run / "config.yml").read_text(), Loader=yaml.Loader)
    args = [*quick_train_args(name, steps, outputs), "--steps-per-save", str(save_every),
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


def loaded_trainer(run: Path, step: int, output_dir: Path, seed=None):
    """The trainer `ns-train --load-dir <run> --load-step <step>` builds, set up in this process, with the bindings
    its first training step makes (optimizers pointed at the loaded parameters); `seed` sets both of its seeds."""
    config = yaml.load((run / "config.yml").read_text(), Loader=yaml.Loader)
    if seed is not None:
        config.machine.seed = config.pipeline.datamanager.train_cameras_sampling_seed = seed
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
    """From step 40 the resumed run goes through densification and the first round and is compared at step 80,
    between the rounds (the resume from there covers the second); from 80 and 100 it goes to the end."""
    _, run = pup_run
    last, rounds = PUP_LAST, 2
    if step == 40:
        count = lambda s: checkpoint(run, s)["pipeline"]["_model.gauss_params.means"].shape[0]
        assert count(60) != count(40), "no densification after step 40: the densification state would go untested"
        last, rounds = 80, 1
    resumed = resume("pup-gs", run, step, last - step, f"pup-resume-{step}", PUP_ARGS, e2e_root)
    final, resumed_final = checkpoint(run, last), checkpoint(resumed, last)
    assert int(resumed_final["pipeline"]["_model._extra_state"]["pup"]["rounds_done"]) == rounds
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


def test_a_checkpoint_continued_with_other_seeds_draws_as_a_fresh_run_with_them(pup_run, tmp_path):
    """With its own seeds a run continues the checkpoint's random state; with others (e.g. pup-gs's refinement of
    one trained model repeated under another seed) it draws what a fresh run with those seeds would."""
    import random

    _, run = pup_run
    saved = checkpoint(run, 80)["pipeline"]["_extra_state"]
    for seed in (None, 7):
        trainer = loaded_trainer(run, 80, tmp_path / f"seed-{seed}", seed=seed)
        datamanager = trainer.pipeline.datamanager
        n_views = len(datamanager.train_dataset)
        unseen, torch_state = list(datamanager.train_unseen_cameras), torch.get_rng_state()
        if seed is None:
            assert unseen == saved["train_unseen_cameras"]
            assert torch.equal(torch_state, saved["random_generators"]["torch"])
        else:
            fresh_order = list(range(n_views))
            random.Random(seed).shuffle(fresh_order)
            assert unseen == fresh_order and unseen != saved["train_unseen_cameras"]
            assert torch.equal(torch_state, torch.manual_seed(seed).get_state())


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
    config = yaml.load((run / "config.yml").read_text(), Loader=yaml.Loader).pipeline.model.vedal
    gate = config.gate
    return ["--pipeline.model.finetune-start-step", str(config.finetune_start_step),
            "--pipeline.model.hard-prune-step", str(config.hard_prune_step),
            "--pipeline.model.importance-every", str(config.importance_every),
            "--pipeline.model.importance-views", str(config.importance_views),
            "--pipeline.model.importance-downscale", str(config.importance_downscale),
            "--pipeline.model.gate.min-refreshes", str(gate.min_refreshes), "--pipeline.model.gate.window", str(gate.window),
            "--pipeline.model.kl-weight", str(config.kl_weight)]


def vedal_state(checkpoint_: dict) -> dict:
    return checkpoint_["pipeline"]["_model._extra_state"]["vedal"]


def assert_same_vedal_run(a: dict, b: dict) -> None:
    """Model, optimizers, retention head and every part of the VEDAL state are equal, except wall-clock times
    (`*_seconds`, e.g. the time spent measuring importance, which no two runs repeat)."""
    assert_same_model(a, b)
    pa, pb = a["pipeline"], b["pipeline"]
    for key in (k for k in pa if k.startswith("_model.retention_head.")):
        assert torch.equal(pa[key], pb[key]), key
    va, vb = vedal_state(a), vedal_state(b)
    for state_a, state_b in ((va, vb), (va["gate"], vb["gate"])):
        keys = {key for key in state_a if not key.endswith("seconds")}
        assert keys == {key for key in state_b if not key.endswith("seconds")}
        for key in keys:
            value = state_a[key]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, state_b[key]), f"vedal state {key} differs"
            elif key != "gate":
                assert value == state_b[key], f"vedal state {key}: {value} != {state_b[key]}"


# The phases of the vedal_run fixture (conftest.py): fine-tuning starts at step 80; importance is measured every 10
# steps on 14 of the 42 views, so the window of one pass fills at steps 80, 90 and 100 and the gate gets its first
# update at 100; with min_refreshes 3 and window 2 its first grants come at 120; the hard removal is at step 239,
# the last. The fixture saves at 60, 120, 180 and 239 only, and it never densifies (splatfacto's warmup_length 500
# is past its end), so "before fine-tuning" here is ordinary training without densification.
VEDAL_BEFORE_FINETUNING = 60
VEDAL_WINDOW_FILLING = 90  # saved by the run resumed from step 60
VEDAL_GATE_OPEN = 120
VEDAL_AFTER_REMOVAL = VEDAL_LAST + 1  # saved by the run resumed from the removal's checkpoint
VEDAL_STEPS_AFTER_REMOVAL = 10


@pytest.fixture(scope="module")
def vedal_resumed_before_finetuning(vedal_run, e2e_root):
    """vedal_run resumed from step 60 up to step 120, when the gate has just opened, saving at 90 and 120."""
    _, run = vedal_run
    before = vedal_state(checkpoint(run, VEDAL_BEFORE_FINETUNING))
    assert before["finetune_started_at"] == -1 and not before["importance_view_counts"], "step 60 is not before fine-tuning"
    steps = VEDAL_GATE_OPEN - VEDAL_BEFORE_FINETUNING
    return resume("vedal-gs", run, VEDAL_BEFORE_FINETUNING, steps, "vedal-resume-before", vedal_args(run), e2e_root,
                  save_every=VEDAL_WINDOW_FILLING - VEDAL_BEFORE_FINETUNING)


@pytest.fixture(scope="module")
def vedal_resumed_after_removal(vedal_run, e2e_root):
    """vedal_run resumed from its last checkpoint (right after the hard removal) for 10 more steps, saving at 240."""
    _, run = vedal_run
    return resume("vedal-gs", run, VEDAL_LAST, VEDAL_STEPS_AFTER_REMOVAL, "vedal-resume-end", vedal_args(run), e2e_root)


@pytest.mark.xdist_group("vedal-resume")
def test_vedal_gs_resumed_before_finetuning_ends_identical_to_the_uninterrupted_run(vedal_run, vedal_resumed_before_finetuning):
    """From step 60 through the start of fine-tuning, the importance window and the gate's first grants to step 120,
    the uninterrupted run's checkpoint there. (Steps 90 to the end are the window-filling test's resume.)"""
    _, run = vedal_run
    final = checkpoint(run, VEDAL_GATE_OPEN)
    assert vedal_state(final)["gate"]["eligible"].any(), "no grants by step 120: the resumed run would not reach them"
    assert_same_vedal_run(final, checkpoint(vedal_resumed_before_finetuning, VEDAL_GATE_OPEN))


@pytest.mark.xdist_group("vedal-resume")
@pytest.mark.parametrize("phase, step", [("window filling", VEDAL_WINDOW_FILLING), ("mid-gate", VEDAL_MID_GATE),
                                         ("after the removal", VEDAL_AFTER_REMOVAL)])
def test_vedal_gs_resumed_in_each_phase_ends_identical_to_the_uninterrupted_run(vedal_run, request, e2e_root, phase, step):
    """Resumed from a checkpoint in the phase, the run ends as the one that wrote the checkpoint (and went on without
    stopping) ended. The window-filling checkpoint is the run resumed from step 60's: a resume of a resume, so it is
    compared with vedal_run's own, at step 120, when the gate has granted (the mid-gate resume covers the steps
    from there through the removal)."""
    _, run = vedal_run
    source, reference, last = {
        "window filling": (request.getfixturevalue("vedal_resumed_before_finetuning"), run, VEDAL_GATE_OPEN),
        "mid-gate": (run, run, VEDAL_LAST),
        "after the removal": (request.getfixturevalue("vedal_resumed_after_removal"),) * 2 + (VEDAL_LAST + VEDAL_STEPS_AFTER_REMOVAL,),
    }[phase]
    state = vedal_state(checkpoint(source, step))
    gate = state["gate"]
    in_phase = {
        "window filling": state["finetune_started_at"] >= 0 and 0 in state["importance_view_counts"]
                          and not gate["history"] and not gate["eligible"].any(),
        "mid-gate": bool(gate["eligible"].any()) and not state["pruned"],
        "after the removal": state["pruned"],
    }[phase]
    assert in_phase, f"step {step} is not in the phase '{phase}': the test would not test it"
    resumed = resume("vedal-gs", source, step, last - step, f"vedal-resume-{step}", vedal_args(run), e2e_root)
    final, resumed_final = checkpoint(reference, last), checkpoint(resumed, last)
    assert_same_vedal_run(final, resumed_final)
    assert bool(vedal_state(resumed_final)["pruned"]) == (last >= VEDAL_LAST)


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


@pytest.mark.xdist_group("vedal-resume")
def test_vedal_gs_resumed_after_the_removal_keeps_training_the_survivors(vedal_run, vedal_resumed_after_removal):
    _, run = vedal_run
    last = VEDAL_LAST + VEDAL_STEPS_AFTER_REMOVAL
    before, after = checkpoint(run, VEDAL_LAST)["pipeline"], checkpoint(vedal_resumed_after_removal, last)["pipeline"]
    assert after["_model.gauss_params.means"].shape == before["_model.gauss_params.means"].shape
    assert after["_model._extra_state"]["vedal"]["pruned"]
    moved = (after["_model.gauss_params.means"] - before["_model.gauss_params.means"]).norm(dim=1) > 0
    assert moved.float().mean() > 0.5
