"""analysis/run_scalars.py: window means of a run's tensorboard scalars over every events file of the run folder, a
resumed run's later file winning where two log the same step; a folder without events files is one `error:` line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

SCRIPT = Path(__file__).resolve().parents[1] / "analysis" / "run_scalars.py"


def write_events(run: Path, started: int, values) -> None:
    """One events file named as if started at `started` seconds, with tag 'Train Metrics Dict/psnr' per step."""
    folder = run / f"tmp{started}"
    writer = SummaryWriter(log_dir=str(folder))
    for step, value in values:
        writer.add_scalar("Train Metrics Dict/psnr", value, step)
    writer.close()
    (written,) = folder.glob("events.out.tfevents.*")
    written.rename(run / f"events.out.tfevents.{started}.host.1.0")
    folder.rmdir()


def run_scalars(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=120)


def test_window_means_join_a_resumed_runs_files_the_later_one_winning(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # The later file (started at 200) repeats steps 20 and 30 with other values, as a run restarted from step 19.
    write_events(run, 200, [(20, 5.0), (30, 7.0), (40, 9.0)])
    write_events(run, 100, [(0, 1.0), (10, 2.0), (20, 100.0), (30, 100.0)])
    proc = run_scalars(run, "--tags", "Train Metrics Dict/psnr", "vedal/mean_p_gated", "--windows", "0:20", "20:41")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {line.split(" | ")[0].strip(): line.split(" | ")[1:] for line in proc.stdout.splitlines() if " | " in line}
    assert rows["0:20"] == ["1.5 (n=2)", "-"]
    assert rows["20:41"] == ["7 (n=3)", "-"]


def test_a_folder_without_events_is_one_error_line(tmp_path):
    proc = run_scalars(tmp_path)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error: no events.out.tfevents")
