"""analysis/vedal_removal_gap.py: on a vedal-gs checkpoint from before the removal it prints the gated count and the
four renders' PSNR; on one from after the removal it refuses in one line unless asked to read its gated survivors."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "analysis" / "vedal_removal_gap.py"
MID_GATE = 180  # a checkpoint vedal_run keeps, with grants and before the removal (tests/test_resume.py)


def removal_gap(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_renders_a_pre_removal_checkpoint_four_ways(vedal_run, tmp_path):
    _, run = vedal_run
    saved = torch.load(run / "nerfstudio_models" / f"step-{MID_GATE:09d}.ckpt", map_location="cpu", weights_only=True)
    eligible = int(saved["pipeline"]["_model._extra_state"]["vedal"]["gate"]["eligible"].sum())
    assert eligible > 0
    proc = removal_gap(run / "config.yml", "--step", MID_GATE, "--samples", 2, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{eligible:,} gated" in proc.stdout
    rows = dict(re.findall(r"^\| (.+?) \| ([0-9.]+)", proc.stdout, flags=re.M))
    assert len(rows) == 4 and all(math.isfinite(float(v)) and float(v) > 5 for v in rows.values()), proc.stdout
    # before the hand-over to the removal's mask, training renders sampled masks: the gap is against their mean
    gap = re.search(r"^removal gap: ([+-][0-9.]+) dB .*sampled masks\)$", proc.stdout, flags=re.M)
    sampled = next(float(v) for k, v in rows.items() if k.startswith("sampled masks"))
    inference = float(rows["inference mask (what the removal keeps)"])
    assert gap and abs(float(gap.group(1)) - (inference - sampled)) < 0.016, proc.stdout


def test_a_checkpoint_after_the_removal_is_refused(vedal_run, tmp_path):
    _, run = vedal_run
    proc = removal_gap(run / "config.yml", cwd=tmp_path)  # the latest: step 239, after the removal
    assert proc.returncode == 1
    assert "the removal has happened already" in proc.stderr and "--after-removal" in proc.stderr


def test_after_the_removal_the_gated_survivors_are_measured_when_asked(vedal_run, tmp_path):
    _, run = vedal_run
    proc = removal_gap(run / "config.yml", "--after-removal", "--samples", 2, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "after the removal" in proc.stdout
    rows = dict(re.findall(r"^\| (.+?) \| ([0-9.]+)", proc.stdout, flags=re.M))
    assert len(rows) == 4, proc.stdout
    # The survivors' p is frozen at the removal, all >= 0.5: the inference mask hides nothing.
    assert rows["all kept"] == rows["inference mask (what the removal keeps)"], proc.stdout
