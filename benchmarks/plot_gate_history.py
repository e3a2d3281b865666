"""Eligible fraction and gate reversals over a vedal-gs run, read from its checkpoint (not a test).

Usage: python benchmarks/plot_gate_history.py RUN_DIR [OUT.png]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def main() -> None:
    run = Path(sys.argv[1])
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else run / "gate_history.png"
    ckpt = sorted((run / "nerfstudio_models").glob("step-*.ckpt"))[-1]
    gate = torch.load(ckpt, map_location="cpu", weights_only=True)["pipeline"]["_model._extra_state"]["gate"]
    steps, fractions, reversals = zip(*gate["history"])
    grants = int(gate["grant_count"])
    print(f"{ckpt}: {len(steps)} gate updates, {grants} eligibility grants, {int(gate['reversal_count'])} reversals "
          f"(rate {int(gate['reversal_count']) / max(grants, 1):.3f})")
    print("step | eligible fraction | reversals so far")
    for i in sorted({0, len(steps) // 4, len(steps) // 2, 3 * len(steps) // 4, len(steps) - 1}):
        print(f"{steps[i]} | {fractions[i]:.3f} | {reversals[i]}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(steps, fractions, color="tab:green", label="eligible fraction")
    ax.set_xlabel("step")
    ax.set_ylabel("eligible fraction")
    twin = ax.twinx()
    twin.plot(steps, reversals, color="tab:red", label="reversals (cumulative)")
    twin.set_ylabel("reversals")
    fig.legend(loc="upper left", fontsize=8)
    ax.set_title(f"vedal-gs gate: {run.name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
