"""Fixtures shared by the tests: one torch thread for tiny tensors, the built-in scene and short ns-train runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import pytest
from filelock import FileLock

from e2e import ns, quick_train_args, run_dir

# nerfstudio's start-up without its inspect.stack() calls and without importing inductor before anything is compiled
# (tests/startup/nerfstudio_startup.py): in this process,
# and through sitecustomize in every Python process the tests start (ns-train, ns-eval, ...).
STARTUP = str(Path(__file__).resolve().parent / "startup")
if STARTUP not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (STARTUP, os.environ.get("PYTHONPATH")) if p)
sys.path.insert(0, STARTUP)
import nerfstudio_startup  # noqa: E402

nerfstudio_startup.install()

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


def folder_all_workers_see(tmp_path_factory) -> Optional[Path]:
    """Under pytest-xdist, the folder above the workers' own temporary folders (they share it); None without xdist."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return None
    return tmp_path_factory.getbasetemp().parent


@pytest.fixture(scope="session")
def e2e_root(tmp_path_factory):
    """Where the shared ns-train runs live: in the folder all workers see, so that each is trained once for all
    workers (`made_once`)."""
    shared = folder_all_workers_see(tmp_path_factory)
    if shared is None:
        return tmp_path_factory.mktemp("e2e")
    root = shared / "e2e"
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


# pytest-xdist (--dist loadgroup --no-loadscope-reorder: scripts/run.sh) hands out work in collection order, a group
# or a test at a time, to whichever worker is free (without the second option it would hand out the largest groups
# first). The long groups come first, then the other tests on the shared runs (the ones that start ns-*
# commands) and those marked slow, then the unit tests: the last minutes are short tests that keep both cores busy, instead of one core
# on a long group while the other idles. The first group needs vedal_run, the first shared run trained below. The
# tests on ns-prune-compare's two-seed comparison form a group too: split over both workers, one would wait on the
# other's lock while the comparison is made.
LONG_GROUPS = ("vedal-resume", "compare-two-seeds", "viewer-browser")


def _groups(item) -> set:
    return {mark.args[0] if mark.args else mark.kwargs.get("name") for mark in item.iter_markers("xdist_group")}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        if "two_seeds" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("compare-two-seeds"))
    rank = {group: i for i, group in enumerate(LONG_GROUPS)}

    def order(item) -> int:
        in_group = [rank[g] for g in _groups(item) if g in rank]
        if in_group:
            return min(in_group)
        long = "e2e_root" in getattr(item, "fixturenames", ()) or item.get_closest_marker("slow") is not None
        return len(LONG_GROUPS) + (not long)

    items.sort(key=order)


# Under pytest-xdist the shared runs are trained side by side before any test: each worker claims, longest first,
# the runs no other worker has claimed and trains them (a claim is a file created with O_EXCL, so exactly one worker
# gets each run). Otherwise both workers would start with tests that need the same run and one would wait for the
# other to train it. Longest first, whichever worker is handed the vedal-resume group waits little for vedal_run.
SHARED_RUNS_LONGEST_FIRST = ("vedal_run", "pup_run", "splatfacto_run")


def _claimed(root: Path, name: str) -> bool:
    """True for the one worker that creates the claim file of `name`."""
    try:
        os.close(os.open(root / f"{name}.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


@pytest.fixture(scope="session", autouse=True)
def shared_runs_trained_side_by_side(request):
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return
    needed = {name for item in request.session.items for name in getattr(item, "fixturenames", ())}
    runs = [name for name in SHARED_RUNS_LONGEST_FIRST if name in needed]
    if not runs:
        return
    root = request.getfixturevalue("e2e_root")
    for name in runs:
        if _claimed(root, name):
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
