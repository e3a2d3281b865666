"""Fixtures shared by the tests: one torch thread for tiny tensors, the built-in scene and short ns-train runs."""

from __future__ import annotations

import pytest

from e2e import ns, quick_train_args, run_dir

BASE_STEPS = 150
VEDAL_STEPS = 240
VEDAL_SAVE_EVERY = 60  # checkpoints at 60 (before fine-tuning), 120, 180 (mid-gate) and 239 (after the removal)
VEDAL_SAVE_BEFORE_REMOVAL = 180

PUP_STEPS = 120
PUP_SAVE_EVERY = 20  # checkpoints at 40 (before densification), 80 (between rounds), 100 (after the last), 119...
# Densification at steps 60 and 70 (splatfacto pauses it for num_train_views + refine_every = 52 steps after the
# start), rounds at steps 80 and 100.
PUP_ARGS = ["--pipeline.model.prune-start-step", "80", "--pipeline.model.refine-steps", "20", "20",
            "--pipeline.model.warmup-length", "10", "--pipeline.model.refine-every", "10"]


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread: tensors in the unit tests are tiny, and with the two cores shared by other jobs OpenMP
    barriers in every op cost ~100x the work itself."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def e2e_root(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def default_scene(e2e_root):
    from nerfstudio_pruning.data.default_scene import ensure_default_scene

    return ensure_default_scene(e2e_root / "scene")


@pytest.fixture(scope="session")
def splatfacto_run(e2e_root, default_scene):
    """A splatfacto-portable run on the built-in scene (BASE_STEPS steps), reused by several tests."""
    outputs = e2e_root / "outputs"
    ns("ns-train", ["splatfacto-portable", *quick_train_args("base", BASE_STEPS, outputs),
                    "nsp-default-scene", "--data", str(default_scene)], cwd=e2e_root)
    return run_dir(outputs, "base", "splatfacto-portable")


@pytest.fixture(scope="session")
def vedal_run(e2e_root, default_scene):
    """A shortened vedal-gs run on the built-in scene (gate windows shortened so Gaussians become eligible)."""
    outputs = e2e_root / "outputs"
    args = [*quick_train_args("vedal", VEDAL_STEPS, outputs), "--steps-per-save", str(VEDAL_SAVE_EVERY),
            "--save-only-latest-checkpoint", "False",
            "--pipeline.model.finetune-start-step", "80", "--pipeline.model.hard-prune-step", str(VEDAL_STEPS - 1),
            # 42 training views in passes of 3 refreshes: the gate gets its first observation at step 100.
            "--pipeline.model.importance-every", "10", "--pipeline.model.importance-views", "14",
            "--pipeline.model.importance-downscale", "2",
            "--pipeline.model.gate.min-refreshes", "3", "--pipeline.model.gate.window", "2",
            # 160 steps of fine-tuning instead of 23k: a stronger prior so that p crosses 1/2 within them.
            "--pipeline.model.kl-weight", "3.0"]
    proc = ns("ns-train", ["vedal-gs", *args, "nsp-default-scene", "--data", str(default_scene)], cwd=e2e_root)
    return proc, run_dir(outputs, "vedal", "vedal-gs")


@pytest.fixture(scope="session")
def pup_run(e2e_root, default_scene):
    """pup-gs's whole schedule, shortened: densification at steps 60 and 70, rounds at steps 80 and 100."""
    outputs = e2e_root / "outputs"
    args = [*quick_train_args("pup", PUP_STEPS, outputs), "--steps-per-save", str(PUP_SAVE_EVERY),
            "--save-only-latest-checkpoint", "False", *PUP_ARGS]
    proc = ns("ns-train", ["pup-gs", *args, "nsp-default-scene", "--data", str(default_scene)], cwd=e2e_root)
    return proc, run_dir(outputs, "pup", "pup-gs")
