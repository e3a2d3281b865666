"""What the rest of the machine does while a benchmark measures, and the memory a process holds (Linux).

The benchmarks run on shared 2-core machines: with numba's or torch's threads on both cores, one foreign process
makes a step several times slower (a 23 ms step was seen taking 3 s), which no number of repeats averages away.
So a benchmark waits for the others to go quiet, then reports the cores they used while it measured.
"""

from __future__ import annotations

import os
import resource
import time
from typing import Callable


def busy_cpu_seconds() -> float:
    """CPU time spent by everything on the machine since boot (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children_cpu_seconds() -> float:
    """CPU time of this process's finished children (what a benchmark that measures in subprocesses spent)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def wait_for_quiet(max_wait: float, threshold: float = 0.3) -> float:
    """Wait (up to max_wait s) until other processes use under `threshold` cores; returns the last reading (cores
    busy over one second; 0 when max_wait <= 0, i.e. no waiting)."""
    if max_wait <= 0:
        return 0.0
    deadline = time.monotonic() + max_wait
    while True:
        busy, started = busy_cpu_seconds(), time.monotonic()
        time.sleep(1.0)
        load = (busy_cpu_seconds() - busy) / (time.monotonic() - started)
        if load < threshold or time.monotonic() > deadline:
            return load
        time.sleep(2.0)


class ForeignLoad:
    """`with ForeignLoad() as load: ...`, then `load.cores`: the cores other processes used on average during the
    block, which took `load.seconds`. `ours` counts the benchmark's own CPU time: its children's (the default, for measurements run in
    subprocesses) or `own_cpu_seconds` for one measured in this process."""

    def __init__(self, ours: Callable[[], float] = children_cpu_seconds) -> None:
        self.ours = ours
        self.cores = self.seconds = float("nan")

    def __enter__(self) -> "ForeignLoad":
        self._busy, self._ours, self._started = busy_cpu_seconds(), self.ours(), time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.monotonic() - self._started
        self.cores = max(0.0, (busy_cpu_seconds() - self._busy) - (self.ours() - self._ours)) / self.seconds
