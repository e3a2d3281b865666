"""ns-prune-compare's runs trained several at once: the order it keeps, the cores it shares out, a failure's end.

The scheduler is tested on stand-in commands (a Python one-liner per job that records when it started and ended and
writes the config.yml ns-train would), so these tests take seconds; tests/test_compare.py runs it with ns-train.
"""

from __future__ import annotations

import json
import sys
import time

import pytest

from nerfstudio_pruning.compare import runner
from nerfstudio_pruning.compare.config import CompareConfig, CompareError
from nerfstudio_pruning.compare.plan import Job
from nerfstudio_pruning.compare.progress import RunProgress

STAND_IN = """
import json, os, sys, time
log, config, seconds, code = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
started = time.time()
time.sleep(seconds)
os.makedirs(os.path.dirname(config), exist_ok=True)
open(config, "w").write("stand-in")
threads = {k: os.environ.get(k) for k in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS")}
print(json.dumps({"started": started, "ended": time.time(), "threads": threads}), flush=True)
sys.exit(code)
"""


@pytest.fixture
def stand_in_runs(monkeypatch):
    """Replace ns-train by STAND_IN; each job's seconds and exit code come from `plan`."""
    plan = {}

    def command(cfg, job, scene, output_dir):
        job.log = output_dir / "logs" / f"{job.dirname}.log"
        seconds, code = plan[job.label]
        return [sys.executable, "-c", STAND_IN, str(job.log), str(job.config(cfg, output_dir)), str(seconds), str(code)]

    monkeypatch.setattr(runner, "train_command", command)
    return plan


def times(job: Job) -> dict:
    return json.loads(job.log.read_text().strip().splitlines()[-1])


def jobs(*specs):
    return [Job(label, "splatfacto-portable", 42, label.replace("/", "-"), 10, after=after) for label, after in specs]


def test_runs_overlap_and_a_run_waits_for_the_one_it_starts_from(stand_in_runs, tmp_path):
    stand_in_runs.update({"40k": (1.5, 0), "pup": (0.2, 0), "densify": (0.5, 0), "vedal": (0.5, 0)})
    plan = jobs(("40k", None), ("pup", "40k"), ("densify", None), ("vedal", None))
    cfg = CompareConfig(device="cpu")
    with RunProgress(len(plan), live=False, poll_seconds=0.05) as progress:
        runner.train_all(cfg, plan, None, tmp_path, progress, parallel=2)
    t = {j.label: times(j) for j in plan}
    assert t["pup"]["started"] >= t["40k"]["ended"]  # pup-gs loads the 40k run's checkpoint
    assert plan[2].started_wall < t["40k"]["ended"]  # the second core trains meanwhile
    assert t["vedal"]["started"] >= t["densify"]["ended"]  # never more than two at once
    assert plan[3].started_wall < t["40k"]["ended"]
    for job in plan:
        assert job.seconds is not None and (tmp_path / "runs").exists()


def test_several_at_once_start_with_the_longest_chain(stand_in_runs, tmp_path):
    """vedal-gs's 1,000 steps cost more than splatfacto's 1,334 then pup-gs's 334: it starts first, and the densify
    run takes the core splatfacto frees, before the shorter pup-gs."""
    stand_in_runs.update({"40k": (0.4, 0), "pup": (0.2, 0), "densify": (0.2, 0), "vedal": (1.0, 0)})
    plan = [Job("40k", "splatfacto-portable", 42, "40k", 1334), Job("pup", "pup-gs", 42, "pup", 334, after="40k"),
            Job("densify", "splatfacto-portable", 42, "densify", 1000), Job("vedal", "vedal-gs", 42, "vedal", 1000)]
    assert runner.chain_cost(plan[0], plan) == 1334 + 334
    with RunProgress(len(plan), live=False, poll_seconds=0.02) as progress:
        runner.train_all(CompareConfig(device="cpu"), plan, None, tmp_path, progress, parallel=2)
    t = {j.label: times(j) for j in plan}
    # The order of starts is the scheduler's (started_wall); the stand-ins' own clocks start after Python's start-up.
    assert plan[3].started_wall < plan[0].started_wall < t["vedal"]["ended"]
    assert t["40k"]["ended"] <= t["densify"]["started"] and plan[2].started_wall < plan[1].started_wall


def test_one_at_a_time_keeps_plan_order_and_the_threads_alone(stand_in_runs, tmp_path, monkeypatch):
    monkeypatch.delenv("NUMBA_NUM_THREADS", raising=False)
    stand_in_runs.update({"a": (0.1, 0), "b": (0.1, 0), "c": (0.1, 0)})
    plan = jobs(("a", None), ("b", None), ("c", None))
    with RunProgress(len(plan), live=False, poll_seconds=0.02) as progress:
        runner.train_all(CompareConfig(device="cpu"), plan, None, tmp_path, progress, parallel=1)
    t = [times(j) for j in plan]
    assert t[0]["ended"] <= t[1]["started"] and t[1]["ended"] <= t[2]["started"]
    assert t[0]["threads"]["NUMBA_NUM_THREADS"] is None


def test_parallel_runs_share_the_cores_unless_the_user_set_threads(stand_in_runs, tmp_path, monkeypatch):
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 4)
    monkeypatch.delenv("NUMBA_NUM_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    stand_in_runs.update({"a": (0.1, 0), "b": (0.1, 0)})
    plan = jobs(("a", None), ("b", None))
    with RunProgress(len(plan), live=False, poll_seconds=0.02) as progress:
        runner.train_all(CompareConfig(device="cpu"), plan, None, tmp_path, progress, parallel=2)
    assert times(plan[0])["threads"] == {"NUMBA_NUM_THREADS": "2", "OMP_NUM_THREADS": "3"}


def test_a_failed_run_stops_the_others_and_says_which(stand_in_runs, tmp_path, capsys):
    stand_in_runs.update({"long": (30.0, 0), "bad": (0.2, 3), "later": (0.1, 0)})
    plan = jobs(("long", None), ("bad", None), ("later", None))
    started = time.time()
    with pytest.raises(RuntimeError, match="failed \\(exit 3\\)"):
        with RunProgress(len(plan), live=False, poll_seconds=0.05) as progress:
            runner.train_all(CompareConfig(device="cpu"), plan, None, tmp_path, progress, parallel=2)
    assert time.time() - started < 20  # the 30 s run was ended, not waited for
    assert plan[2].log is None  # nothing started after the failure
    assert "bad failed (exit 3)" in capsys.readouterr().out


def test_parallel_runs_below_one_are_refused():
    with pytest.raises(CompareError, match="--parallel-runs must be at least 1"):
        CompareConfig(parallel_runs=0).parallel()
    assert CompareConfig(device="cuda").parallel() == 1
    assert CompareConfig(device="cpu", parallel_runs=3).parallel() == 3
