"""pup-gs through ns-train: the whole schedule on the built-in scene, and post-hoc pruning of a checkpoint."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from e2e import ns, ns_eval, quick_train_args, run_dir

ROUND_LINE = re.compile(r"pup-gs: removed (\d+), (\d+) Gaussians remain")


def _rounds(stdout: str):
    return [(int(a), int(b)) for a, b in ROUND_LINE.findall(stdout)]


def _final_state(run):
    ckpt = sorted((run / "nerfstudio_models").glob("*.ckpt"))[-1]
    return torch.load(ckpt, map_location="cpu", weights_only=True)["pipeline"]


def test_full_schedule_prunes_80_then_50_percent(e2e_root, pup_run):
    proc, run = pup_run
    rounds = _rounds(proc.stdout)
    assert len(rounds) == 2, proc.stdout[-3000:]
    (removed1, left1), (removed2, left2) = rounds
    n0 = removed1 + left1
    assert removed1 == round(0.8 * n0) and removed2 == round(0.5 * left1) and left2 == left1 - removed2
    state = _final_state(run)
    assert state["_model.gauss_params.means"].shape[0] == left2
    assert int(state["_model._extra_state"]["pup"]["rounds_done"]) == 2
    assert state["_model.sensitivity"].shape[0] == left2
    results = ns_eval(run / "config.yml", cwd=e2e_root)
    assert results["num_gaussians"] == left2 and math.isfinite(results["psnr"])


def test_the_run_writes_what_each_round_did_to_pruning_json(pup_run):
    proc, run = pup_run
    report = json.loads((run / "pruning.json").read_text())
    assert report.keys() == {"method", "rounds", "target_gaussians", "final_gaussians"} and report["method"] == "pup-gs"
    assert report["target_gaussians"] is None  # no target asked
    rounds = report["rounds"]
    assert [r["step"] for r in rounds] == [80, 100], rounds
    keys = {"step", "score", "gaussians_before", "gaussians_after", "scoring_seconds"}
    assert all(r.keys() == keys and r["score"] == "fisher" for r in rounds)
    removed_and_left = [(r["gaussians_before"] - r["gaussians_after"], r["gaussians_after"]) for r in rounds]
    assert removed_and_left == _rounds(proc.stdout)
    assert rounds[1]["gaussians_before"] == rounds[0]["gaussians_after"]
    assert all(r["gaussians_after"] < r["gaussians_before"] and r["scoring_seconds"] > 0 for r in rounds)
    # The console line reports the same time, to its two decimals.
    printed = [float(t) for t in re.findall(r"scored \d+ Gaussians in ([0-9.]+) s", proc.stdout)]
    assert printed == [round(r["scoring_seconds"], 2) for r in rounds]

    final = _final_state(run)
    assert report["final_gaussians"] == final["_model.gauss_params.means"].shape[0] == rounds[1]["gaussians_after"]
    # The rounds live in the checkpoints (loaded with weights_only=True), so a resumed run reports them all.
    assert final["_model._extra_state"]["pup"]["rounds"] == rounds
    between = torch.load(run / "nerfstudio_models" / "step-000000080.ckpt", map_location="cpu", weights_only=True)
    assert between["pipeline"]["_model._extra_state"]["pup"]["rounds"] == rounds[:1]


def test_post_hoc_pruning_of_a_splatfacto_checkpoint_with_numpy_scalars(e2e_root, default_scene, splatfacto_run, tmp_path):
    """The checkpoint carries numpy learning rates as stock splatfacto's do (torch >= 2.6 refuses them by default)."""
    src = sorted((splatfacto_run / "nerfstudio_models").glob("*.ckpt"))[-1]
    state = torch.load(src, map_location="cpu", weights_only=True)
    for opt in state["optimizers"].values():
        for group in opt["param_groups"]:
            group["lr"] = np.float64(group["lr"])
    stock_like = tmp_path / src.name
    torch.save(state, stock_like)
    with pytest.raises(Exception):
        torch.load(stock_like, map_location="cpu", weights_only=True)

    n_trained = state["pipeline"]["_model.gauss_params.means"].shape[0]
    outputs = tmp_path / "outputs"
    proc = ns("ns-train", ["pup-gs", *quick_train_args("posthoc", 60, outputs), "--load-checkpoint", str(stock_like),
                           "--pipeline.model.refine-steps", "30", "30",
                           "nsp-default-scene", "--data", str(default_scene)], cwd=e2e_root)
    assert f"pruning rounds start at step {state['step'] + 1}" in proc.stdout
    rounds = _rounds(proc.stdout)
    assert len(rounds) == 2 and rounds[0][0] + rounds[0][1] == n_trained
    final = _final_state(run_dir(outputs, "posthoc", "pup-gs"))
    means = final["_model.gauss_params.means"]
    assert means.shape[0] == rounds[1][1]
    # Training continued after pruning: the kept Gaussians moved (stale optimizers would leave them frozen).
    original = state["pipeline"]["_model.gauss_params.means"]
    nearest = torch.cdist(means, original).min(dim=1).values
    assert (nearest > 0).float().mean() > 0.5
