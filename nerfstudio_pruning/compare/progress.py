"""Progress of `ns-prune-compare`'s training runs: a rich display on a terminal, plain lines otherwise.

Each run is an `ns-train` subprocess whose output goes to its log file. The display follows the log as it grows:
nerfstudio prints a "Step (% Done)" table whose lines start with the absolute step, e.g. `1230 (41.00%)`; the
step, less the run's first step, is the run's progress (a post-hoc or resumed run starts past step 0). The ETA is
rich's, from the rate at which those steps arrive.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Optional, Sequence

STEP_LINE = re.compile(r"^\s*(\d+) \((?:[0-9.]+|inf|nan)%\)")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def last_step(text: str) -> Optional[int]:
    """The last step nerfstudio's progress table printed in `text`, or None."""
    step = None
    for line in ANSI.sub("", text).splitlines():
        match = STEP_LINE.match(line)
        if match:
            step = int(match.group(1))
    return step


class RunProgress:
    """Runs ns-train commands, one after the other or several at once, showing which run (of how many), its step
    and an ETA for each."""

    def __init__(self, total_runs: int, live: Optional[bool] = None, poll_seconds: float = 0.5):
        self.total_runs = total_runs
        self.live = sys.stdout.isatty() if live is None else live
        self.poll_seconds = poll_seconds
        self.started = 0  # runs started so far: the k of "[k/N]"
        self._progress = None

    def __enter__(self) -> "RunProgress":
        if self.live:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=Console(), transient=False,
            )
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def start(self, command: Sequence[str], log: Path, label: str, first_step: int, steps: int,
              env: Optional[dict] = None) -> "RunningCommand":
        """Start one command with stdout and stderr to `log`, and show it; `poll` follows it."""
        self.started += 1
        title = f"[{self.started}/{self.total_runs}] {label}"
        env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
        log.parent.mkdir(parents=True, exist_ok=True)
        task = None
        if self._progress is not None:
            task = self._progress.add_task(title, total=max(steps, 1))
        else:
            print(f"[compare] training {title} ({steps} steps from step {first_step}); log: {log}", flush=True)
        fh = open(log, "w")
        try:
            proc = subprocess.Popen(list(command), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, cwd=Path.cwd())
        except BaseException:
            fh.close()
            raise
        return RunningCommand(proc, fh, log, label, first_step, steps, task, time.perf_counter())

    def poll(self, running: "RunningCommand") -> Optional[int]:
        """Update the command's progress; its exit status once it has finished (then reported), else None."""
        code = running.proc.poll()
        if running.task is not None:
            running.offset, running.pending, step = _follow(running.log, running.offset, running.pending)
            if step is not None:
                self._progress.update(running.task, completed=min(max(step - running.first_step, 0), running.steps))
        if code is None:
            return None
        running.fh.close()
        running.seconds = time.perf_counter() - running.started
        if running.task is not None:
            if code == 0:
                self._progress.update(running.task, completed=running.steps)
            self._progress.stop_task(running.task)
        else:
            state = "done" if code == 0 else f"failed (exit {code})"
            print(f"[compare] {running.label} {state} in {running.seconds:.0f} s", flush=True)
        return code

    @staticmethod
    def stop(running: "RunningCommand") -> None:
        """End a command that is still running (another one failed, or the user pressed Ctrl-C)."""
        if running.proc.poll() is None:
            running.proc.terminate()
            try:
                running.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                running.proc.kill()
        running.fh.close()


@dataclass
class RunningCommand:
    """One command started by `RunProgress.start`."""

    proc: subprocess.Popen
    fh: IO
    log: Path
    label: str
    first_step: int
    steps: int
    task: Optional[int]
    started: float
    offset: int = 0
    pending: str = ""
    seconds: Optional[float] = None
    """Its wall-clock time, set when `poll` sees it finish."""


def _follow(log: Path, offset: int, pending: str):
    """Read what was appended to the log since `offset`; returns the new offset, an unfinished last line and the
    last complete step line's step (None if none)."""
    try:
        with open(log, "rb") as fh:
            fh.seek(offset)
            chunk = fh.read()
    except OSError:
        return offset, pending, None
    offset += len(chunk)
    text = pending + chunk.decode("utf-8", errors="replace")
    complete, _, pending = text.rpartition("\n")
    return offset, pending, last_step(complete)
