"""Helpers for tests that drive the real `ns-*` commands in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence

BIN = Path(sys.executable).parent
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def ns(command: str, args: Sequence[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run an ns-* command from this venv; fail with its output tail if it fails."""
    # A fixed hash seed: with it two runs of the same command, or a resumed run and the uninterrupted one, are
    # bit-identical on CPU (with a per-process random hash seed they drift apart by float rounding).
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONHASHSEED="0", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run([str(BIN / command), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise AssertionError(f"{command} {' '.join(args)} exited {proc.returncode}:\n{tail}")
    return proc


def quick_train_args(experiment: str, steps: int, outputs: Path) -> List[str]:
    return [
        "--vis", "tensorboard", "--experiment-name", experiment, "--timestamp", "run",
        "--max-num-iterations", str(steps), "--steps-per-save", str(steps),
        "--steps-per-eval-image", "1000000", "--steps-per-eval-all-images", "1000000",
        "--output-dir", str(outputs),
    ]


def run_dir(outputs: Path, experiment: str, method: str) -> Path:
    return outputs / experiment / method / "run"


def ns_eval(config: Path, cwd: Path) -> dict:
    # One file per process: pytest-xdist workers may evaluate the same shared run at once.
    out = config.parent / f"eval-{os.getpid()}.json"
    ns("ns-eval", ["--load-config", str(config), "--output-path", str(out)], cwd=cwd)
    return json.loads(out.read_text())["results"]
