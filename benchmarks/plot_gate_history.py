"""The vedal-gs gate over a run: eligible fraction and reversals at every gate update, read from the run's latest
checkpoint, printed and plotted (not a test).

Usage: python benchmarks/plot_gate_history.py RUN_DIR [OUT.png] [--rows N]

RUN_DIR is a vedal-gs run folder (the one holding config.yml and nerfstudio_models/) or its nerfstudio_models/
folder. OUT.png defaults to RUN_DIR/gate_history.png. The gate state lives in the model's extra state,
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

USAGE_EPILOG = "example: python benchmarks/plot_gate_history.py outputs/scene/vedal-gs/2026-11-21_120000 gate.png"


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


def gate_state(checkpoint: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The gate's state dict, or None when the checkpoint holds none (another method)."""
    extra = (checkpoint.get("pipeline") or {}).get("_model._extra_state") or {}
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="plot_gate_history.py",
        description="Print and plot the vedal-gs gate's eligible fraction and cumulative reversals at every gate "
                    "update, and the reversal rate (reversals / grants), from a run's latest checkpoint.",
        epilog=USAGE_EPILOG,
    )
    parser.add_argument("run_dir", type=Path, help="vedal-gs run folder (holding nerfstudio_models/), or that folder")
    parser.add_argument("out", type=Path, nargs="?", help="PNG to write (default: RUN_DIR/gate_history.png)")
    parser.add_argument("--rows", type=int, default=10, help="table rows to print, evenly spaced; 0 prints every "
                                                             "update (default 10)")
    args = parser.parse_args(argv)
    run = args.run_dir
    run_folder = run.parent if run.name == "nerfstudio_models" else run
    out = args.out if args.out is not None else run_folder / "gate_history.png"
    try:
        path, step, history, grants, reversals = read_history(run)
    except GateHistoryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    rate = reversals / grants if grants else 0.0
    print(f"{path} (step {step}): {len(history)} gate updates, steps {history[0][0]} to {history[-1][0]}")
    print(f"grants: {grants}  reversals: {reversals}  reversal rate: {rate:.4f} per grant")
    print("step | eligible fraction | reversals so far")
    for i in rows_to_show(history, args.rows):
        s, fraction, so_far = history[i]
        print(f"{s} | {fraction:.3f} | {so_far}")
    try:
        plot(history, out, f"vedal-gs gate: {run_folder.name} (reversal rate {rate:.3f})")
    except OSError as err:
        print(f"error: cannot write {out}: {err.strerror or err}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
