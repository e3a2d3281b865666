"""Scalars a run logged to tensorboard, as means over step windows, for several runs side by side (not a test).

Usage: python analysis/run_scalars.py RUN_DIR [RUN_DIR ...] [--tags TAG ...] [--windows A:B ...] [--list]

RUN_DIR is an ns-train run folder (the one holding config.yml and the events.out.tfevents.* files). A run resumed
from a checkpoint writes one more events file into the same folder; every file is read and, where two hold the same
step, the later file's value is kept (a resumed run repeats no step, but a restarted one may). Each window A:B is
the steps A <= step < B; a row gives the mean of a tag's values logged there and how many there were. Default
tags: the training PSNR and Gaussian count and, for vedal-gs, the mean retention probability of the gated
Gaussians and the gated fraction, as results.md quotes them (train PSNR across the hand-over's decision, the
head's p over the fine-tuning). --list prints each run's tags and their last step.

Example: python analysis/run_scalars.py RUN_A RUN_B --windows 27500:28500 28900:29400 29500:29998
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

DEFAULT_TAGS = ("Train Metrics Dict/psnr", "Train Metrics Dict/gaussian_count", "vedal/mean_p_gated",
                "vedal/gated_fraction")


def read_scalars(run: Path) -> Dict[str, Dict[int, float]]:
    """tag -> step -> value over every events file of `run`, read oldest first so that a later file wins."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(run.glob("events.out.tfevents.*"), key=_started)
    if not files:
        raise SystemExit(f"error: no events.out.tfevents.* in {run} (was it trained with --vis tensorboard?)")
    scalars: Dict[str, Dict[int, float]] = {}
    for events in files:
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in accumulator.Scalars(tag)})
    return scalars


def _started(events: Path) -> Tuple[int, str]:
    """An events file's start time in seconds, from its name (events.out.tfevents.<seconds>.<host>...)."""
    stamp = events.name.split(".")[3] if events.name.count(".") >= 3 else ""
    return (int(stamp) if stamp.isdigit() else 0, events.name)


def window_mean(values: Dict[int, float], start: int, stop: int) -> Tuple[float, int]:
    picked = [v for step, v in values.items() if start <= step < stop]
    return (sum(picked) / len(picked), len(picked)) if picked else (math.nan, 0)


def parse_window(text: str) -> Tuple[int, int]:
    try:
        start, stop = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a window is START:STOP in steps, got {text!r}") from None
    if stop <= start:
        raise argparse.ArgumentTypeError(f"a window's STOP must be after its START, got {text!r}")
    return start, stop


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--tags", nargs="+", default=list(DEFAULT_TAGS))
    parser.add_argument("--windows", nargs="+", type=parse_window, default=None,
                        help="START:STOP step windows; default: ten windows over each run's logged steps")
    parser.add_argument("--list", action="store_true", help="print each run's tags and their last step")
    args = parser.parse_args(argv)
    for run in args.runs:
        scalars = read_scalars(run)
        print(f"== {run}")
        if args.list:
            for tag, values in sorted(scalars.items()):
                print(f"  {tag}: {len(values)} values, last step {max(values)}")
            continue
        windows: List[Tuple[int, int]] = args.windows or _even_windows(scalars)
        print("  " + " | ".join(["window"] + [tag.split("/")[-1] for tag in args.tags]))
        for start, stop in windows:
            cells = []
            for tag in args.tags:
                mean, count = window_mean(scalars.get(tag, {}), start, stop)
                cells.append("-" if not count else f"{mean:.4g} (n={count})")
            print("  " + " | ".join([f"{start}:{stop}"] + cells))
    return 0


def _even_windows(scalars: Dict[str, Dict[int, float]]) -> List[Tuple[int, int]]:
    last = max((max(values) for values in scalars.values() if values), default=0) + 1
    edges = [round(last * i / 10) for i in range(11)]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
