"""Fixtures shared by the tests: one torch thread for tiny tensors, the built-in scene and short ns-train runs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Callable

import pytest
from filelock import FileLock

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
    """Where the shared ns-train runs live. Under pytest-xdist every worker has its own temporary folder; the runs
    go in the folder above them instead, so that each is trained once for all workers (`made_once`)."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return tmp_path_factory.mktemp("e2e")
    root = tmp_path_factory.getbasetemp().parent / "e2e"
    root.mkdir(exist_ok=True)
    return root


def made_once(root: Path, name: str, make: Callable[[], subprocess.CompletedProcess]) -> subprocess.CompletedProcess:
    """`make()` once across pytest-xdist workers: the first to take the lock runs it, the others wait and get the
    same process record (its output kept beside the run as JSON). A failed `make` leaves no record: the next
    worker tries again and fails with its own message."""
    record = root / f"{name}.process.json"
    with FileLock(str(root / f"{name}.lock")):
        if record.exists():
            kept = json.loads(record.read_text())
            return subprocess.CompletedProcess(kept["args"], kept["returncode"], kept["stdout"], kept["stderr"])
        proc = make()
        record.write_text(json.dumps({"args": [str(a) for a in proc.args], "returncode": proc.returncode,
                                      "stdout": proc.stdout, "stderr": proc.stderr}))
        return proc


# Under pytest-xdist, the shared runs each worker trains before its first test: otherwise both workers start with
# tests that need splatfacto_run, and one waits for the other to train it, then again for vedal_run.
FIRST_RUNS_OF_WORKER = {"gw0": ("splatfacto_run", "vedal_run"), "gw1": ("pup_run",)}


@pytest.fixture(scope="session", autouse=True)
def shared_runs_trained_side_by_side(request):
    needed = {name for item in request.session.items for name in getattr(item, "fixturenames", ())}
    for name in FIRST_RUNS_OF_WORKER.get(os.environ.get("PYTEST_XDIST_WORKER", ""), ()):
        if name in needed:
            request.getfixturevalue(name)


@pytest.fixture(scope="session")
def default_scene(e2e_root):
    from nerfstudio_pruning.data.default_scene import ensure_default_scene

    with FileLock(str(e2e_root / "scene.lock")):
        return ensure_default_scene(e2e_root / "scene")


@pytest.fixture(scope="session")
def splatfacto_run(e2e_root, default_scene):
    """A splatfacto-portable run on the built-in scene (BASE_STEPS steps), reused by several tests."""
    outputs = e2e_root / "outputs"
    made_once(e2e_root, "splatfacto_run", lambda: ns("ns-train", [
        "splatfacto-portable", *quick_train_args("base", BASE_STEPS, outputs), "nsp-default-scene", "--data",
        str(default_scene)], cwd=e2e_root))
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
    proc = made_once(e2e_root, "vedal_run", lambda: ns(
        "ns-train", ["vedal-gs", *args, "nsp-default-scene", "--data", str(default_scene)], cwd=e2e_root))
    return proc, run_dir(outputs, "vedal", "vedal-gs")


@pytest.fixture(scope="session")
def pup_run(e2e_root, default_scene):
    """pup-gs's whole schedule, shortened: densification at steps 60 and 70, rounds at steps 80 and 100."""
    outputs = e2e_root / "outputs"
    args = [*quick_train_args("pup", PUP_STEPS, outputs), "--steps-per-save", str(PUP_SAVE_EVERY),
            "--save-only-latest-checkpoint", "False", *PUP_ARGS]
    proc = made_once(e2e_root, "pup_run", lambda: ns(
        "ns-train", ["pup-gs", *args, "nsp-default-scene", "--data", str(default_scene)], cwd=e2e_root))
    return proc, run_dir(outputs, "pup", "pup-gs")
