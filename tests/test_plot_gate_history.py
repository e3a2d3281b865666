"""analysis/plot_gate_history.py: on a vedal-gs run it prints the gate's history and reversal rate and writes a PNG;
on anything else it says why in one `error:` line and exits with status 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "analysis" / "plot_gate_history.py"


def plot_gate_history(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_prints_the_reversal_rate_and_writes_the_plot_of_a_vedal_run(vedal_run, tmp_path):
    _, run = vedal_run
    latest = sorted((run / "nerfstudio_models").glob("step-*.ckpt"))[-1]
    gate = torch.load(latest, map_location="cpu", weights_only=True)["pipeline"]["_model._extra_state"]["vedal"]["gate"]
    grants, reversals = int(gate["grant_count"]), int(gate["reversal_count"])
    assert grants > 0 and gate["history"], "the fixture's gate granted nothing: the plot would be empty"
    out = tmp_path / "plots" / "gate.png"
    proc = plot_gate_history(run, out, "--rows", "0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert f"grants: {grants}  reversals: {reversals}  reversal rate: {reversals / grants:.4f} per grant" in lines
    # --rows 0: one table row per gate update, "step | eligible fraction | reversals so far".
    rows = lines[lines.index("step | eligible fraction | reversals so far") + 1:-1]
    assert rows == [f"{s} | {f:.3f} | {r}" for s, f, r in gate["history"]]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000


def test_a_run_without_gate_state_or_checkpoints_is_one_error_line(splatfacto_run, tmp_path):
    proc = plot_gate_history(splatfacto_run, tmp_path / "gate.png", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ") and "holds no vedal-gs gate state" in proc.stderr
    assert not (tmp_path / "gate.png").exists()

    proc = plot_gate_history(tmp_path, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr == f"error: {tmp_path} has no checkpoints (no nerfstudio_models/step-*.ckpt): pass a vedal-gs run folder\n"


def test_the_no_gate_ablation_is_one_error_line(vedal_run, tmp_path):
    """Without the gate the gate object only keeps kl_weight's unit: its eligibility is no history of the run."""
    _, run = vedal_run
    latest = sorted((run / "nerfstudio_models").glob("step-*.ckpt"))[-1]
    checkpoint = torch.load(latest, map_location="cpu", weights_only=True)
    checkpoint["pipeline"]["_model._extra_state"]["vedal"]["use_gate"] = False
    ablation = tmp_path / "no-gate"
    (ablation / "nerfstudio_models").mkdir(parents=True)
    torch.save(checkpoint, ablation / "nerfstudio_models" / latest.name)
    proc = plot_gate_history(ablation, tmp_path / "gate.png", cwd=tmp_path)
    assert proc.returncode == 1 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr == (f"error: {ablation} is the no-gate ablation: every Gaussian was gated, and its gate only "
                           "kept the importance EMA that kl_weight is relative to\n")
    assert not (tmp_path / "gate.png").exists()


def test_usage(tmp_path):
    proc = plot_gate_history(cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("usage: plot_gate_history.py")
    proc = plot_gate_history("--help", cwd=tmp_path)
    assert proc.returncode == 0 and "reversal rate" in proc.stdout


def test_several_runs_are_printed_in_turn_and_drawn_in_one_picture(vedal_run, tmp_path):
    _, run = vedal_run
    one = plot_gate_history(run, tmp_path / "one.png", cwd=tmp_path)
    assert one.returncode == 0, one.stdout + one.stderr
    block = one.stdout.splitlines()[:-1]  # without its "wrote ..." line
    out = tmp_path / "sweep.png"
    proc = plot_gate_history(run, run / "nerfstudio_models", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == [*block, "", *block, f"wrote {out}"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000

    proc = plot_gate_history(run, run, cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr == "error: 2 runs are drawn in one picture: name it last (... OUT.png)\n"
