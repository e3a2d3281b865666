"""What a comparison writes: the table (results.md), results.json, the plot (compare.png) and the notes that say
what each row is and how to read it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from nerfstudio_pruning.compare.config import CompareConfig
from nerfstudio_pruning.compare.data import Scene
from nerfstudio_pruning.compare.plan import ROW_30K, ROW_40K, ROW_DENSIFY, Job
from nerfstudio_pruning.compare.records import COLUMNS, SPREAD, RunRecord, aggregates, record_value
from nerfstudio_pruning.compare.schedule import Schedule, full_schedule


def seeds_note(seeds) -> str:
    return f"Seeds {', '.join(map(str, seeds))}: each cell is the mean ± {SPREAD}; results.json keeps every run."


def table_notes(cfg: CompareConfig, sched: Schedule, scene: Scene, seeds: Tuple[int, ...], records: List[RunRecord],
                plan_notes: List[str], jobs: Dict[str, Job]) -> List[str]:
    rows = {r.row for r in records}
    continued = any(r.row == ROW_40K and r.job and jobs[r.job].first_step > 0 for r in records)
    s = sched.scale
    if sched.refine_scale == s:
        scales = f"Schedule scale {s:.4g} (every step count x{s:.4g})"
    else:
        scales = (f"Schedule scale {s:.4g} (every step count x{s:.4g}, but pup-gs's refinement x{sched.refine_scale:.4g}: "
                  f"{' + '.join(map(str, sched.refine))} steps, so the 40k row's extra steps too)")
    notes = [f"{scales}: '30k' is {sched.steps_30k} steps, '40k' {sched.steps_40k}, '7k' {sched.densify_stop}; device "
             f"{cfg.device}; render time is the median over the eval views after warm-up."]
    if len(seeds) > 1:
        notes.append(seeds_note(seeds))
    else:
        notes.append(f"Seed {seeds[0]}.")
    if ROW_30K in rows and continued:
        notes.append(f"{ROW_30K} is the given splatfacto-portable run (pup-gs's starting point); {ROW_40K} is that run "
                     f"continued for {sum(sched.refine)} steps, its train s those steps only.")
    elif ROW_30K in rows:
        notes.append(f"{ROW_30K} and {ROW_40K} are one splatfacto-portable run of {sched.steps_40k} steps, evaluated "
                     f"after its first {sched.steps_30k} steps (the checkpoint pup-gs starts from) and at its end; the "
                     "30k row's train s is the time until that checkpoint was written.")
    if any(r.method == "pup-gs" for r in records):
        notes.append(f"Read pup-gs against {ROW_40K}: both train {sched.steps_40k} steps in all ({sched.steps_30k} "
                     f"splatfacto + {' + '.join(map(str, sched.refine))} refinement); its train s is the pruning and "
                     "refinement only.")
        if cfg.pup_target_fraction is not None:
            notes.append(f"pup-gs keeps {cfg.pup_target_fraction:.0%} of the model it prunes (--pup-target-fraction "
                         f"{cfg.pup_target_fraction:g}: two rounds of the paper's shape), not the paper's 10%"
                         + (": at this schedule its refinement is too short to refill a 90% cut (docs/compare.md)."
                            if sched.scale < 1 else "."))
    if ROW_DENSIFY in rows:
        notes.append(f"Read vedal-gs against {ROW_DENSIFY}: both train {sched.vedal_steps} steps with densification, "
                     f"culling and opacity resets stopped at step {sched.densify_stop} (vedal-gs's fine-tuning start), "
                     "so the two differ by the pruning alone.")
    if any(row.startswith("vedal-gs-cap") for row in rows):
        notes.append("vedal-gs-capC: vedal-gs at its default KL weight with the gate's cap (max_eligible_fraction) at C "
                     f"instead of {full_schedule().eligible_cap:g}; only gated Gaussians can be removed, so it removes "
                     "at most a fraction C.")
    targets = sorted({r.target_fraction for r in records if r.target_fraction is not None}, reverse=True)
    if targets:
        fractions = ", ".join(f"{f:g}" for f in targets)
        notes.append(f"pup-gs-tF, vedal-gs-tF (F = {fractions}): the method at its defaults with "
                     "--pipeline.model.target-fraction F, read against the same row as the method; 'asked' is the "
                     "size the run resolved F to (pup-gs: of the model it prunes; vedal-gs: of the Gaussians at its "
                     "fine-tuning start), 'Gaussians' the size it ended with.")
    if "vedal-gs-no-gate" in rows:
        notes.append("vedal-gs-no-gate: the paper's ablation, every Gaussian under the KL prior from the fine-tuning "
                     "start, no gate; its importance passes (scoring s) only set the unit of kl_weight.")
    if any(r.baseline for r in records):
        notes.append("'x fewer' is the Gaussian count of the row a run is read against (same seed) over the run's.")
    sources = {r.scoring_source for r in records if r.method in ("pup-gs", "vedal-gs")}
    if sources:
        methods = {r.method for r in records}
        parts = (["pup-gs's scoring summed over its rounds"] if "pup-gs" in methods else []) + (
            ["vedal-gs's leave-one-out importance passes"] if "vedal-gs" in methods else [])
        text = "Scoring s: " + ", ".join(parts)
        if "pruning.json" in sources:
            text += ", read from each run's pruning.json"
        missing = sorted({r.row for r in records if r.method in ("pup-gs", "vedal-gs") and r.scoring_source != "pruning.json"})
        if missing:
            text += (f"; no pruning.json for {', '.join(missing)} (older runs): taken from the training log where it "
                     "prints it (pup-gs's 'scored ... in ... s' lines), '-' where it does not")
        notes.append(text + ".")
    given = list(dict.fromkeys(r.row for r in records if r.job is None))
    if given:
        notes.append(f"Taken from --runs, not trained here (their schedules are their own): {', '.join(given)}.")
    scene_name = "the built-in scene" if scene.name == "default" else f"{scene.name} ({scene.dataparser})"
    notes.append(f"Scene: {scene_name}" + (", random init (no seed points)" if scene.random_init else "") + ".")
    notes += scene.notes + plan_notes
    return notes


def cell(agg, fmt: str) -> str:
    if agg is None:
        return "-"
    if agg["n"] == 1:
        return format(agg["mean"], fmt)
    return f"{format(agg['mean'], fmt)} ± {format(agg['spread'], fmt)}"


def markdown_table(records: List[RunRecord], notes: List[str]) -> str:
    has_lpips = all("lpips" in r.metrics for r in records)
    has_targets = any(record_value(r, "target_gaussians") is not None for r in records)
    columns = [c for c in COLUMNS if (has_lpips or c[0] != "lpips") and (has_targets or c[0] != "target_gaussians")]
    head = ["run"] + [h for _, h, _ in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, agg in aggregates(records).items():
        lines.append("| " + " | ".join([row] + [cell(agg["metrics"][k], fmt) for k, _, fmt in columns]) + " |")
    notes = list(notes)
    if not has_lpips and not any(n.startswith("LPIPS omitted") for n in notes):
        notes.append("LPIPS omitted: its pretrained weights could not be loaded offline.")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def count_label(count: float) -> str:
    """A Gaussian count as an axis label: 800, 3k, 20k, 1.5M."""
    for unit, suffix in ((1e6, "M"), (1e3, "k")):
        if count >= unit:
            return f"{count / unit:.3g}{suffix}"
    return f"{count:.3g}"


def draw(records: List[RunRecord], images: Dict[str, torch.Tensor], path: Path, scale: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(images))  # no images (a merge of results.json files): the plot alone
    rows = max(1, math.ceil(len(images) / max(columns, 1)))
    fig = plt.figure(figsize=(5.0 + 2.8 * columns, max(4.2, 2.2 * rows)))
    grid = fig.add_gridspec(rows, 1 + columns, width_ratios=[1.8] + [1] * columns)
    ax = fig.add_subplot(grid[:, 0])
    agg = aggregates(records)

    def point(row: str) -> Tuple[float, float, float, float]:
        n, p = agg[row]["metrics"]["num_gaussians"], agg[row]["metrics"]["psnr"]
        return n["mean"], p["mean"], n["spread"], p["spread"]

    # Curves: the KL sweep, and each method's target sizes; a row on a drawn curve gets no marker of its own.
    curves = [("vedal-gs KL sweep", "tab:green", {r.row: f"{r.kl_weight:g}" for r in records if r.kl_weight is not None})]
    for method, colour in (("pup-gs", "tab:blue"), ("vedal-gs", "tab:red")):
        curves.append((f"{method} target sizes", colour, {r.row: f"{r.target_fraction:.0%}" for r in records
                                                          if r.target_fraction is not None and r.method == method}))
    on_curve = set()
    for name, colour, annotations in curves:
        sweep = sorted(annotations, key=lambda row: point(row)[0])
        if len(sweep) < 2:
            continue
        ax.plot([point(r)[0] for r in sweep], [point(r)[1] for r in sweep], "-o", color=colour, alpha=0.6, label=name)
        for row in sweep:
            ax.annotate(annotations[row], point(row)[:2], fontsize=7)
        on_curve.update(sweep)
    for row in agg:
        if row not in on_curve:
            x, y, dx, dy = point(row)
            ax.errorbar(x, y, xerr=dx or None, yerr=dy or None, fmt="o", markersize=7, label=row, zorder=3)
    ax.set_xscale("log")
    # Counts as 3k, 20k, 1.5M at 1, 2 and 5 x 10^k: matplotlib's default minor labels (3x10^3 4x10^3 ...) overlap.
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: count_label(value)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("Gaussians (log)")
    ax.set_ylabel("eval PSNR (dB)")
    ax.set_title(f"PSNR vs size (schedule x{scale:.3g})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    for i, (label, image) in enumerate(images.items()):
        sub = fig.add_subplot(grid[i // columns, 1 + i % columns])
        sub.imshow(image.numpy())
        sub.set_title(label, fontsize=9)
        sub.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(output_dir: Path, scene: str, records: List[RunRecord], notes: List[str], payload: dict,
                  images: Dict[str, torch.Tensor], scale: float) -> None:
    """results.md, results.json (payload plus the runs and rows) and compare.png, as every comparison writes them."""
    table = markdown_table(records, notes)
    (output_dir / "results.md").write_text(f"# Pruning comparison on {scene}\n\n{table}")
    payload = {**payload, "runs": [r.to_json() for r in records], "rows": aggregates(records), "notes": notes}
    (output_dir / "results.json").write_text(json.dumps(payload, indent=2))
    draw(records, images, output_dir / "compare.png", scale)
    print("\n" + table)
    print(f"[compare] table: {output_dir / 'results.md'}\n[compare] json:  {output_dir / 'results.json'}\n"
          f"[compare] plot:  {output_dir / 'compare.png'}")
