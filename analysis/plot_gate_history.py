"""The vedal-gs gate over a run: eligible fraction and reversals at every gate update, read from the run's latest
checkpoint, printed and plotted (not a test).

Usage: python analysis/plot_gate_history.py RUN_DIR [RUN_DIR ...] [OUT.png] [--rows N]

RUN_DIR is a vedal-gs run folder (the one holding config.yml and nerfstudio_models/) or its nerfstudio_models/
folder. OUT.png defaults to RUN_DIR/gate_history.png for one run; several runs (a sweep) are printed one after the
other and drawn together, one colour each, in the OUT.png they require. The gate state lives in the model's extra state,
checkpoint["pipeline"]["_model._extra_state"]["vedal"]["gate"]: `history` is one (step, eligible fraction,
cumulative reversals) per gate update, `grant_count` and `reversal_count` the totals (see vedal/gate.py). The
reversal rate is reversals / grants, as `ConvergenceGate.reversal_rate`. A run dir without checkpoints or without
gate state (e.g. a splatfacto run) gives one line starting with `error:` and exit status 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

USAGE_EPILOG = ("example: python analysis/plot_gate_history.py outputs/scene/vedal-gs/2026-11-21_120000 gate.png; "
                "a sweep: ... RUN_A RUN_B RUN_C sweep.png")


class GateHistoryError(Exception):
    """Reported as one `error:` line, exit status 1."""


def latest_checkpoint(run: Path) -> Path:
    if not run.exists():
        raise GateHistoryError(f"{run} does not exist")
    folder = run if run.name == "nerfstudio_models" else run / "nerfstudio_models"
    # Names are zero-padded (step-000029999.ckpt), so the last in name order is the latest step.
    checkpoints = sorted(folder.glob("step-*.ckpt")) if folder.is_dir() else []
    if not checkpoints:
        raise GateHistoryError(f"{run} has no checkpoints (no {folder.name}/step-*.ckpt): pass a vedal-gs run folder")
    return checkpoints[-1]


def extra_state(checkpoint: Dict[str, Any]) -> Dict[str, Any]:
    return (checkpoint.get("pipeline") or {}).get("_model._extra_state") or {}


def gate_state(checkpoint: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The gate's state dict, or None when the checkpoint holds none (another method)."""
    extra = extra_state(checkpoint)
    vedal = extra.get("vedal")
    if isinstance(vedal, dict) and isinstance(vedal.get("gate"), dict):
        return vedal["gate"]
    # Checkpoints written before the package was reorganised kept the gate at the top of the extra state.
    return extra.get("gate") if isinstance(extra.get("gate"), dict) else None


def read_history(run: Path) -> Tuple[Path, int, List[Tuple[int, float, int]], int, int]:
    """(checkpoint, its step, history, grants, reversals) of the run's latest checkpoint."""
    import torch

    path = latest_checkpoint(run)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which, not a traceback
        raise GateHistoryError(f"cannot read {path}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    gate = gate_state(checkpoint)
    if gate is None:
        raise GateHistoryError(f"{path} holds no vedal-gs gate state (is {run} a vedal-gs run?)")
    if (extra_state(checkpoint).get("vedal") or {}).get("use_gate") is False:
        raise GateHistoryError(f"{run} is the no-gate ablation: every Gaussian was gated, and its gate only kept the "
                               "importance EMA that kl_weight is relative to")
    history = [(int(s), float(f), int(r)) for s, f, r in gate.get("history", [])]
    step = int(checkpoint.get("step", -1))
    if not history:
        raise GateHistoryError(f"{path} (step {step}) has no gate updates yet: the gate is disabled (use_gate False) "
                               "or fine-tuning has not reached its first full importance pass")
    return path, step, history, int(gate["grant_count"]), int(gate["reversal_count"])


def rows_to_show(history: Sequence[Tuple[int, float, int]], rows: int) -> List[int]:
    """Indices of the table's rows: `rows` evenly spaced updates (all when rows <= 0 or there are few), always
    with the first, the last and the update where eligibility first opened."""
    n = len(history)
    if rows <= 0 or n <= rows:
        return list(range(n))
    chosen = {round(i * (n - 1) / (rows - 1)) for i in range(rows)} if rows > 1 else {n - 1}
    opened = next((i for i, (_, fraction, _) in enumerate(history) if fraction > 0), None)
    if opened is not None:
        chosen.add(opened)
    return sorted(chosen | {0, n - 1})


def plot(history: Sequence[Tuple[int, float, int]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s for s, _, _ in history]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(steps, [f for _, f, _ in history], color="tab:green", marker=".", label="eligible fraction")
    ax.set_xlabel("step")
    ax.set_ylabel("eligible fraction")
    ax.set_ylim(0, 1)
    twin = ax.twinx()
    twin.plot(steps, [r for _, _, r in history], color="tab:red", marker=".", label="reversals (cumulative)")
    twin.set_ylabel("reversals (cumulative)")
    twin.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10)
    # Below the axes: inside, it covered the title or a curve (the fraction rises to the cap, reversals keep rising).
    fig.legend(loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_runs(runs: Sequence[Tuple[str, float, Sequence[Tuple[int, float, int]]]], out: Path) -> None:
    """Several runs side by side: eligible fraction and cumulative reversals against the step, one colour a run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
    for name, rate, history in runs:
        steps = [s for s, _, _ in history]
        line, = left.plot(steps, [f for _, f, _ in history], marker=".", markersize=3, label=f"{name} ({rate:.3f})")
        right.plot(steps, [r for _, _, r in history], marker=".", markersize=3, color=line.get_color())
    left.set(xlabel="step", ylabel="eligible fraction", ylim=(0, 1), title="eligible fraction")
    right.set(xlabel="step", ylabel="reversals (cumulative)", title="reversals")
    right.set_ylim(bottom=0)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.legend(*left.get_legend_handles_labels(), loc="lower center", ncol=min(len(runs), 4), fontsize=8,
               frameon=False, title="run (reversal rate per grant)", title_fontsize=8)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="plot_gate_history.py",
        description="Print and plot the vedal-gs gate's eligible fraction and cumulative reversals at every gate "
                    "update, and the reversal rate (reversals / grants), from a run's latest checkpoint.",
        epilog=USAGE_EPILOG,
    )
    parser.add_argument("paths", type=Path, nargs="+", metavar="PATH",
                        help="RUN_DIR [RUN_DIR ...] [OUT.png]: vedal-gs run folders (holding nerfstudio_models/) or those folders, then the PNG to "
                             "write (default for one run: RUN_DIR/gate_history.png; required for several)")
    parser.add_argument("--rows", type=int, default=10, help="table rows to print, evenly spaced; 0 prints every "
                                                             "update (default 10)")
    args = parser.parse_args(argv)
    paths = list(args.paths)
    out = paths.pop() if len(paths) > 1 and paths[-1].suffix.lower() == ".png" else None
    folders = [run.parent if run.name == "nerfstudio_models" else run for run in paths]
    if out is None and len(paths) > 1:
        print(f"error: {len(paths)} runs are drawn in one picture: name it last (... OUT.png)", file=sys.stderr)
        return 1
    out = out if out is not None else folders[0] / "gate_history.png"
    try:
        read = [read_history(run) for run in paths]
    except GateHistoryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    drawn = []
    for folder, (path, step, history, grants, reversals) in zip(folders, read):
        rate = reversals / grants if grants else 0.0
        if drawn:
            print()
        print(f"{path} (step {step}): {len(history)} gate updates, steps {history[0][0]} to {history[-1][0]}")
        print(f"grants: {grants}  reversals: {reversals}  reversal rate: {rate:.4f} per grant")
        print("step | eligible fraction | reversals so far")
        for i in rows_to_show(history, args.rows):
            s, fraction, so_far = history[i]
            print(f"{s} | {fraction:.3f} | {so_far}")
        drawn.append((folder.name, rate, history))
    try:
        if len(drawn) == 1:
            name, rate, history = drawn[0]
            plot(history, out, f"vedal-gs gate: {name} (reversal rate {rate:.3f})")
        else:
            plot_runs(drawn, out)
    except OSError as err:
        print(f"error: cannot write {out}: {err.strerror or err}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
