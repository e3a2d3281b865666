"""The `evidence` stage: the papers' schedules on a real capture through `ns-prune-compare`, within a call's budget.

    python benchmarks/gpu/run_evidence.py --scene bonsai [--parts pup vedal] [--scale S] [--data DIR] [--out DIR]

Two parts per scene, each one `ns-prune-compare` run (through ns_kit.py: its `ns-train` runs go through the kit's
launcher) that trains its rows and writes the table:

- `pup`:   splatfacto-portable 40k keeping its 30k checkpoint (rows "30k" and "40k"), then pup-gs post hoc from the
           30k checkpoint with the fisher and the lightgaussian score (5k + 5k refinement each): `--methods
           splatfacto-portable pup-gs --pup-scores fisher lightgaussian`.
- `vedal`: splatfacto-portable with densification stopped at 7k (30k steps) and vedal-gs (30k): `--methods vedal-gs`.

Run folders cannot come back from the GPU machine (a 30k checkpoint of a capture is hundreds of MB; the device tool
returns 64 MiB), so a part is trained and evaluated within one call; what comes back is each part's results.json,
results.md and compare.png, and `ns-prune-compare --merge` makes one table of the parts (here, at the end, when both
are in the results folder; else where they were brought back).

Schedule: `--scale` (ns-prune-compare's --schedule-scale; 1 = the papers' 30k/40k), or, left out, the largest of
1, 1/2, 1/4, ... 1/64 whose estimated time fits what is left of the stage's budget (KIT_STAGE_LIMIT, set by
run_all.sh), from the rates in RATES, replaced by the ones measured by earlier parts (of this call, or of another
given as EVIDENCE_RATES='{"steps_per_s": 95, "score_view_s": 0.02}'). A part estimated not to fit even at 1/64
still runs at 1/64 when TRY_S seconds are left, to measure the rates on the real capture; with less it is skipped
and says so. If a part runs out of time, the runs it finished (those with a checkpoint) are evaluated with
`--no-train --runs KEY=config ...`, so a partial table still comes back. Each part's record (schedule, estimates, measured rates, seconds) goes to <out>/evidence.json.

With `--device cpu` (KIT_DEVICE=cpu) and the tiny copies of `prepare_evidence_data.py --tiny`, the same command
lines run in a minute or two on a CPU: the dry run (tests/test_gpu_kit.py).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

from kit_common import KIT_DIR, REPO_ROOT, Results, parse_args

LADDER = (1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625)
PARTS = ("pup", "vedal")
SEED = 42
# Seconds kept at the end of the stage for the salvage table of finished runs (one ns-prune-compare --no-train).
SALVAGE_S = {"cuda": 75.0, "cpu": 60.0}
# Estimates before anything is measured in the call. cuda: ns-* start 19-30 s each and gsplat's render + backward
# 4.5-4.8 ms per view at 100k-1M Gaussians and 480x270 (H200/H100, docs/cuda_path.md sections 7-8); nerfstudio's
# step adds its optimizers, densification and logging on top: ~12 ms a step assumed (not yet measured). Scoring per
# view on CUDA with the per-pair engine: 0.35 s at 4k Gaussians (128x96) to 1.4 s at 100k (480x270) measured before
# the cumsum fix; 0.5 s assumed. Evaluation: per row, loading the checkpoint, rendering the eval views and exporting.
RATES = {
    "cuda": {"steps_per_s": 80.0, "start_s": 25.0, "score_view_s": 0.5, "eval_row_s": 12.0},
    "cpu": {"steps_per_s": 8.0, "start_s": 10.0, "score_view_s": 0.05, "eval_row_s": 4.0},
}
TRY_S = 120.0
SCENES = {"bonsai": "bonsai", "buddha": "buddha_gray67", "buddha_gray67": "buddha_gray67"}


@dataclass
class Work:
    """What one part asks of the machine at a given schedule scale."""

    processes: int
    steps: int
    scored_views: int
    eval_rows: int

    def seconds(self, rates: Dict[str, float]) -> float:
        return (self.processes * rates["start_s"] + self.steps / rates["steps_per_s"]
                + self.scored_views * rates["score_view_s"] + self.eval_rows * rates["eval_row_s"])


def scaled(steps: int, scale: float, minimum: int = 1) -> int:
    return max(minimum, int(round(steps * scale)))


def part_work(part: str, scale: float, train_views: int) -> Work:
    """Steps, scored views, processes and evaluated rows of a part, from ns-prune-compare's schedule: 30k steps,
    pup-gs 5k + 5k refinement after two scoring rounds over the training views, vedal-gs's importance refresh every
    100 steps (floor 10) of 8 views from its fine-tuning start at 7k."""
    s30, refine = scaled(30000, scale, 10), 2 * scaled(5000, scale)
    if part == "pup":
        return Work(processes=4, steps=s30 + refine + 2 * refine, scored_views=2 * 2 * train_views, eval_rows=4)
    start, every = scaled(7000, scale, 1), scaled(100, scale, 10)
    refreshes = max(0, (s30 - start) // every)
    return Work(processes=3, steps=2 * s30, scored_views=8 * refreshes, eval_rows=2)


def compare_args(part: str, scene: Path, scale: float, output: Path, device: str) -> List[str]:
    methods = ["splatfacto-portable", "pup-gs", "--pup-scores", "fisher", "lightgaussian"] if part == "pup" else ["vedal-gs"]
    return ["--scene", str(scene), "--methods", *methods, "--schedule-scale", f"{scale:g}", "--seeds", str(SEED),
            "--device", device, "--output-dir", str(output), "--experiment-name", f"evidence-{part}"]


def finished_runs(output: Path) -> Dict[str, Path]:
    """--runs keys of the runs in a part's output folder that wrote a checkpoint (ns-prune-compare's run folders:
    runs/<experiment>/<method>/<run>/config.yml)."""
    found: Dict[str, Path] = {}
    for config in sorted(output.glob("runs/*/*/*/config.yml")):
        if not any((config.parent / "nerfstudio_models").glob("step-*.ckpt")):
            continue
        method, run = config.parent.parent.name, re.sub(r"-s-?\d+$", "", config.parent.name)  # <run>-s<seed>
        if method == "splatfacto-portable":
            key = "splatfacto-densify" if "densify" in run else ("splatfacto-portable" if "continued" not in run else None)
        else:
            key = run if method == "pup-gs" else method  # pup-gs, pup-gs-lightgaussian; vedal-gs
        if key:
            found[key] = config
    return found


def measured_rates(output: Path, base: Dict[str, float], views: int) -> Dict[str, float]:
    """Rates measured by a part's run folders, finished or cut: steps per second of its splatfacto-portable runs
    (last checkpoint's step over the time from config.yml, written when training starts, to that checkpoint) and
    scoring seconds per view from the pruning.json of pup-gs (rounds over all training views) and vedal-gs
    (importance passes of 8 views)."""
    rates = dict(base)
    speeds, scoring, scored = [], 0.0, 0
    for config in output.glob("runs/*/*/*/config.yml"):
        checkpoints = sorted((config.parent / "nerfstudio_models").glob("step-*.ckpt"))
        method = config.parent.parent.name
        if method == "splatfacto-portable" and checkpoints:
            seconds = checkpoints[-1].stat().st_mtime - config.stat().st_mtime
            if seconds > 0:
                speeds.append((int(checkpoints[-1].stem.split("-")[1]) + 1) / seconds)
        try:
            pruning = json.loads((config.parent / "pruning.json").read_text())
        except (OSError, ValueError):
            continue
        if pruning.get("rounds"):
            scoring += sum(r["scoring_seconds"] for r in pruning["rounds"])
            scored += views * len(pruning["rounds"])
        elif pruning.get("importance_passes") and pruning.get("importance_seconds") is not None:
            scoring += pruning["importance_seconds"]
            scored += 8 * pruning["importance_passes"]
    if speeds:
        rates["steps_per_s"] = min(speeds)
    if scored:
        rates["score_view_s"] = scoring / scored
    return rates


def train_views(scene: Path) -> int:
    """nerfstudio-data's default split keeps ceil(0.9 n) training views."""
    frames = json.loads((scene / "transforms.json").read_text())["frames"]
    return math.ceil(0.9 * len(frames))


def main() -> int:
    def extra(p):
        p.add_argument("--scene", default="bonsai", help="bonsai or buddha_gray67 (a folder of --data), or a path")
        p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
        p.add_argument("--scale", type=float, default=None, help="schedule scale; default: the largest that fits")
        p.add_argument("--data", type=Path, default=Path(os.environ.get("EVIDENCE_DATA", KIT_DIR / "evidence_data")))

    args = parse_args(__doc__.splitlines()[0], extra)
    limit = float(os.environ.get("KIT_STAGE_LIMIT", os.environ.get("STAGE_TIMEOUT", "540")))
    deadline = time.monotonic() + limit - 10.0
    scene = Path(args.scene) if Path(args.scene).is_dir() else args.data / SCENES.get(args.scene, args.scene)
    name = scene.name
    results = Results(f"evidence_{name}", args.device, args.out)
    record_path = args.out / "evidence.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    work_root = KIT_DIR / "cache" / "evidence" / f"{args.device}-{name}"
    if not (scene / "transforms.json").is_file():
        results.check(f"evidence data for {args.scene}", False, missing=str(scene),
                      fix="run benchmarks/gpu/prepare_evidence_data.py where ../shared/data is and carry "
                          "benchmarks/gpu/evidence_data")
        results.write()
        return 1
    views = train_views(scene)
    rates = dict(RATES[args.device])
    rates.update(record.get("measured_rates", {}).get(args.device, {}))
    rates.update(json.loads(os.environ.get("EVIDENCE_RATES") or "{}"))
    salvage = SALVAGE_S[args.device]
    for part in args.parts:
        left = deadline - time.monotonic() - salvage
        scale = args.scale
        fits = True
        if scale is None:
            scale = next((s for s in LADDER if part_work(part, s, views).seconds(rates) <= left), None)
            if scale is None and left >= TRY_S:
                scale, fits = LADDER[-1], False  # run to measure; the salvage keeps what finishes
        work = part_work(part, scale or LADDER[-1], views)
        entry = {"scene": name, "part": part, "scale": scale, "train_views": views, "rates_assumed": dict(rates),
                 "estimate_s": round(work.seconds(rates), 1), "left_s": round(left, 1), "fits": fits, **work.__dict__}
        if scale is None:
            results.skip(f"{name} {part}", f"estimated {work.seconds(rates):.0f} s even at 1/{1 / LADDER[-1]:g}, "
                                           f"{left:.0f} s left")
            record.setdefault("parts", []).append({**entry, "status": "skipped"})
            continue
        output = work_root / part
        shutil.rmtree(output, ignore_errors=True)
        output.mkdir(parents=True)
        print(f"[evidence] {name} {part}: schedule x{scale:g}, estimated {work.seconds(rates):.0f} s of {left:.0f} s "
              f"left{'' if fits else ' (does not fit: run to measure the rates, finished runs kept)'} ({work.steps} steps, {work.scored_views} scored views, rates {rates})", flush=True)
        log = args.out / f"evidence_{name}_{part}.log"
        started = time.monotonic()
        code = run_compare(compare_args(part, scene, scale, output, args.device), log, deadline - salvage)
        seconds = time.monotonic() - started
        status = "complete" if code == 0 else f"exit {code}"
        if code != 0 and (output / "results.json").is_file():
            status += " after writing its table"  # results.json comes last but for compare.png: nothing to salvage
        elif code != 0:
            runs = finished_runs(output)
            print(f"[evidence] {name} {part}: {status} after {seconds:.0f} s; evaluating its finished runs "
                  f"{sorted(runs)} with --no-train", flush=True)
            if runs:
                partial = compare_args(part, scene, scale, output / "partial", args.device) + [
                    "--no-train", "--runs", *(f"{k}={v}" for k, v in runs.items())]
                if run_compare(partial, args.out / f"evidence_{name}_{part}_partial.log", deadline) == 0:
                    status += ", partial table of finished runs"
                    output = output / "partial"
        done = results.check(f"{name} {part}: ns-prune-compare wrote its table", (output / "results.json").is_file(),
                             status=status, seconds=round(seconds, 1), scale=scale)
        entry.update(status=status, seconds=round(seconds, 1))
        if done:
            keep = args.out / "evidence" / f"{name}-{part}"
            shutil.rmtree(keep, ignore_errors=True)
            keep.mkdir(parents=True)
            for file in ("results.json", "results.md", "compare.png"):
                if (output / file).is_file():
                    shutil.copy2(output / file, keep / file)
            for row in json.loads((output / "results.json").read_text()).get("runs", []):
                results.measure(scene=name, part=part, scale=scale, row=row.get("row"), **{
                    k: row.get("metrics", {}).get(k) for k in ("psnr", "ssim", "num_gaussians", "fps")},
                    train_s=row.get("train_seconds"), scoring_s=row.get("scoring_seconds"))
        rates = measured_rates(work_root / part, rates, views)
        entry["rates_measured"] = rates
        record.setdefault("measured_rates", {})[args.device] = rates
        record.setdefault("parts", []).append(entry)
        record_path.write_text(json.dumps(record, indent=1) + "\n")
    merged = args.out / "evidence" / f"{name}-merged"
    parts_done = sorted(p for p in (args.out / "evidence").glob(f"{name}-*/results.json") if "merged" not in str(p))
    if len(parts_done) > 1 and deadline - time.monotonic() > 30:
        scales = {json.loads(p.read_text()).get("schedule_scale") for p in parts_done}
        if len(scales) == 1:
            code = run_compare(["--merge", *map(str, parts_done), "--output-dir", str(merged)],
                               args.out / f"evidence_{name}_merge.log", deadline)
            results.check(f"{name}: one table of the parts (ns-prune-compare --merge)", code == 0,
                          parts=[p.parent.name for p in parts_done])
        else:
            results.skip(f"{name}: one table of the parts", f"parts at different schedule scales {sorted(scales)}")
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    results.write()
    return 1 if results.failed else 0


def run_compare(argv: List[str], log: Path, deadline: float) -> int:
    """ns-prune-compare through ns_kit.py until `deadline` (monotonic); its exit code, or 124 when cut."""
    left = deadline - time.monotonic()
    if left < 5:
        return 124
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, str(KIT_DIR / "ns_kit.py"), "compare", *argv], stdout=out,
                                stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True)
        try:
            code = proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 15)  # its ns-train children too
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
            code = 124
    tail = log.read_text(errors="replace")[-2500:]
    print(tail if code else "\n".join(line for line in tail.splitlines() if line.startswith("|")), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
