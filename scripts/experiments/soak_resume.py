"""Resume soak: does a run resumed from any of its checkpoints end where the uninterrupted run ends?

For each method (pup-gs, vedal-gs by default) the script
  1. trains once without interruption on a real capture at low resolution, keeping every checkpoint
     (`--save-only-latest-checkpoint False`), with checkpoints spread over every phase of the method;
  2. resumes from every checkpoint but the last (`--load-dir/--load-step`, `--max-num-iterations LAST - s`, so
     the resumed run trains steps s+1 .. LAST) and compares its final checkpoint with the uninterrupted one:
     Gaussian count, max |difference| of every `_model.gauss_params.*` tensor, whether every other tensor of the
     pipeline state (method buffers, gate state, ...) is identical, and eval PSNR from `ns-eval`;
  3. resumes from the last checkpoint for `--extra-steps` more steps: training must go on past the end of the
     schedule without removing anything (count unchanged) while still updating the parameters (means move).

Every ns-* subprocess runs with PYTHONHASHSEED (default 0) and OMP_NUM_THREADS (default 1) set, one at a time.
Writes soak.json and soak.md under --output-dir and prints the table.

Usage (from the repository root):
    python scripts/experiments/soak_resume.py --data ../shared/data/buddha_gray67 --output-dir /work/runs/soak
    python scripts/experiments/soak_resume.py --smoke ...   # 60-step schedules, to check the flags
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
GAUSS_PREFIX = "_model.gauss_params."


# -- schedules -----------------------------------------------------------------------------------------------------
@dataclass
class Schedule:
    steps: int  # --max-num-iterations of the uninterrupted run (last step = steps - 1)
    steps_per_save: int
    model_args: List[str]  # --pipeline.model.* flags
    phases: List[Tuple[int, str]]  # (first step, name), ascending


def pup_schedule(smoke: bool) -> Schedule:
    if smoke:
        return Schedule(60, 20, [
            "--pipeline.model.prune-start-step", "30", "--pipeline.model.refine-steps", "15", "15",
            "--pipeline.model.warmup-length", "10", "--pipeline.model.refine-every", "5",
            "--pipeline.model.stop-split-at", "25"],
            [(0, "warm-up"), (10, "densifying"), (25, "densification stopped"), (30, "refining after round 1"),
             (45, "refining after round 2")])
    return Schedule(600, 100, [
        "--pipeline.model.prune-start-step", "300", "--pipeline.model.refine-steps", "150", "150",
        "--pipeline.model.warmup-length", "50", "--pipeline.model.refine-every", "25",
        "--pipeline.model.stop-split-at", "250"],
        # rounds run before the training iteration of their step: the checkpoint of step 300 is after round 1
        [(0, "warm-up"), (50, "densifying"), (250, "densification stopped"), (300, "refining after round 1"),
         (450, "refining after round 2")])


def vedal_schedule(smoke: bool) -> Schedule:
    common = ["--pipeline.model.importance-downscale", "1", "--pipeline.model.gate.min-refreshes", "3",
              "--pipeline.model.gate.window", "2", "--pipeline.model.kl-weight", "3.0"]
    if smoke:
        return Schedule(60, 20, [
            "--pipeline.model.finetune-start-step", "20", "--pipeline.model.hard-prune-step", "59",
            "--pipeline.model.warmup-length", "10", "--pipeline.model.refine-every", "5",
            "--pipeline.model.importance-every", "5", "--pipeline.model.importance-views", "16", *common],
            [(0, "warm-up"), (10, "densifying"), (20, "fine-tuning (gate + head)"), (59, "after hard removal")])
    return Schedule(600, 100, [
        "--pipeline.model.finetune-start-step", "200", "--pipeline.model.hard-prune-step", "599",
        "--pipeline.model.warmup-length", "50", "--pipeline.model.refine-every", "25",
        "--pipeline.model.importance-every", "20", "--pipeline.model.importance-views", "16", *common],
        [(0, "warm-up"), (50, "densifying"), (200, "fine-tuning (gate + head)"), (599, "after hard removal")])


SCHEDULES = {"pup-gs": pup_schedule, "vedal-gs": vedal_schedule}


def phase_of(schedule: Schedule, step: int) -> str:
    name = schedule.phases[0][1]
    for first, label in schedule.phases:
        if step >= first:
            name = label
    return name


# -- subprocesses --------------------------------------------------------------------------------------------------
@dataclass
class Proc:
    command: List[str]
    returncode: int
    seconds: float
    log: Path
    tail: str


def run(command: Sequence[str], log: Path, env: Dict[str, str], timeout: float) -> Proc:
    log.parent.mkdir(parents=True, exist_ok=True)
    full = [str(BIN / command[0]), *command[1:]]
    started = time.perf_counter()
    with log.open("w") as handle:
        handle.write("$ " + " ".join(full) + "\n")
        handle.flush()
        try:
            code = subprocess.run(full, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = -9
    seconds = time.perf_counter() - started
    text = log.read_text(errors="replace")
    return Proc(list(full), code, seconds, log, text[-3000:])


def ns_eval(config: Path, out: Path, log: Path, env: Dict[str, str], timeout: float) -> Dict[str, Any]:
    proc = run(["ns-eval", "--load-config", str(config), "--output-path", str(out)], log, env, timeout)
    if proc.returncode != 0 or not out.is_file():
        return {"error": f"ns-eval exited {proc.returncode}", "command": " ".join(proc.command), "tail": proc.tail,
                "seconds": proc.seconds}
    results = json.loads(out.read_text())["results"]
    return {"psnr": results.get("psnr"), "ssim": results.get("ssim"), "num_gaussians": results.get("num_gaussians"),
            "seconds": proc.seconds, "config": str(config)}


# -- checkpoints ---------------------------------------------------------------------------------------------------
def checkpoint_steps(models: Path) -> List[int]:
    return sorted(int(p.stem.split("-")[1]) for p in models.glob("step-*.ckpt"))


def load_pipeline(path: Path) -> Dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)["pipeline"]


def flatten_tensors(obj: Any, prefix: str = "") -> Dict[str, Any]:
    """Every tensor and plain number under a (nested) state dict, keyed by its path."""
    out: Dict[str, Any] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            out.update(flatten_tensors(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            out.update(flatten_tensors(value, f"{prefix}[{i}]"))
    elif isinstance(obj, (int, float, bool, str)) or obj is None:
        out[prefix] = obj
    return out


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.nan
    if a.numel() == 0:
        return 0.0
    if a.dtype == torch.bool or not (a.is_floating_point() or b.is_floating_point()):
        return float((a.long() - b.long()).abs().max())
    return float((a.double() - b.double()).abs().max())


def compare_states(resumed: Dict[str, Any], reference: Dict[str, Any]) -> Dict[str, Any]:
    """Per-Gaussian-parameter max |diff|, plus whether every other entry of the pipeline state is identical."""
    gauss = sorted(k for k in reference if k.startswith(GAUSS_PREFIX))
    count_resumed = int(resumed[GAUSS_PREFIX + "means"].shape[0])
    count_reference = int(reference[GAUSS_PREFIX + "means"].shape[0])
    per_param = {k[len(GAUSS_PREFIX):]: max_abs_diff(resumed[k], reference[k]) if k in resumed else math.nan
                 for k in gauss}
    finite = [v for v in per_param.values() if not math.isnan(v)]
    max_gauss = math.nan if len(finite) < len(per_param) else max(finite, default=0.0)
    flat_r = flatten_tensors({k: v for k, v in resumed.items() if not k.startswith(GAUSS_PREFIX)})
    flat_ref = flatten_tensors({k: v for k, v in reference.items() if not k.startswith(GAUSS_PREFIX)})
    differing = []
    for key in sorted(set(flat_r) | set(flat_ref)):
        a, b = flat_r.get(key, "<missing>"), flat_ref.get(key, "<missing>")
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            same = a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
        else:
            same = type(a) is type(b) and a == b
        if not same:
            differing.append(key)
    return {"count_resumed": count_resumed, "count_reference": count_reference, "max_abs_diff": per_param,
            "max_abs_diff_all": max_gauss, "other_state_identical": not differing, "other_state_differing": differing}


def vedal_gate_note(pipeline: Dict[str, Any]) -> Optional[str]:
    try:
        vedal = pipeline["_model._extra_state"]["vedal"]
        eligible = vedal["gate"]["eligible"]
        frac = float(eligible.float().mean()) if eligible.numel() else 0.0
        return f"refreshes {int(vedal['refresh_count'])}, eligible {frac:.2f}"
    except (KeyError, TypeError, AttributeError):
        return None


# -- the soak ------------------------------------------------------------------------------------------------------
def soak_method(method: str, args: argparse.Namespace, env: Dict[str, str]) -> Dict[str, Any]:
    schedule = SCHEDULES[method](args.smoke)
    root = args.output_dir / method
    logs = args.output_dir / "logs"
    if root.exists():
        shutil.rmtree(root)
    data = ["nerfstudio-data-cached", "--data", str(Path(args.data).resolve()),
            "--downscale-factor", str(args.downscale_factor)]

    def train_args(experiment: str, iterations: int, extra: Sequence[str] = ()) -> List[str]:
        return ["ns-train", method, "--vis", "tensorboard", "--output-dir", str(root), "--experiment-name", experiment,
                "--timestamp", "run", "--machine.seed", str(args.seed), "--max-num-iterations", str(iterations),
                "--steps-per-save", str(schedule.steps_per_save), "--save-only-latest-checkpoint", "False",
                "--steps-per-eval-image", "1000000", "--steps-per-eval-all-images", "1000000",
                *schedule.model_args, *extra, *data]

    def run_dir(experiment: str) -> Path:
        return root / experiment / method / "run"

    result: Dict[str, Any] = {"method": method, "steps": schedule.steps, "steps_per_save": schedule.steps_per_save,
                              "model_args": schedule.model_args, "resumes": []}
    print(f"\n== {method}: uninterrupted run, {schedule.steps} steps", flush=True)
    full_cmd = train_args("full", schedule.steps)
    proc = run(full_cmd, logs / f"{method}_full.log", env, args.timeout)
    result["full"] = {"command": " ".join(proc.command), "seconds": proc.seconds, "returncode": proc.returncode,
                      "log": str(proc.log)}
    if proc.returncode != 0:
        result["full"]["tail"] = proc.tail
        print(f"   FAILED ({proc.returncode}); log {proc.log}\n{proc.tail}", flush=True)
        return result
    full_dir = run_dir("full")
    models = full_dir / "nerfstudio_models"
    steps = checkpoint_steps(models)
    last = steps[-1]
    reference = load_pipeline(models / f"step-{last:09d}.ckpt")
    full_eval = ns_eval(full_dir / "config.yml", full_dir / "eval.json", logs / f"{method}_full_eval.log", env,
                        args.timeout)
    result["full"].update({"checkpoints": steps, "last_step": last,
                           "count": int(reference[GAUSS_PREFIX + "means"].shape[0]), "eval": full_eval})
    print(f"   {proc.seconds:.0f} s; checkpoints {steps}; {result['full']['count']} Gaussians; "
          f"PSNR {full_eval.get('psnr')}", flush=True)

    for s in steps[:-1]:
        loaded = load_pipeline(models / f"step-{s:09d}.ckpt")
        row: Dict[str, Any] = {"kind": "resume", "from_step": s, "phase": phase_of(schedule, s),
                               "count_at_load": int(loaded[GAUSS_PREFIX + "means"].shape[0]),
                               "gate_at_load": vedal_gate_note(loaded), "trained_steps": last - s}
        experiment = f"resume{s}"
        proc = run(train_args(experiment, last - s, ["--load-dir", str(models), "--load-step", str(s)]),
                   logs / f"{method}_{experiment}.log", env, args.timeout)
        row.update({"command": " ".join(proc.command), "seconds": proc.seconds, "returncode": proc.returncode,
                    "log": str(proc.log)})
        ckpt = run_dir(experiment) / "nerfstudio_models" / f"step-{last:09d}.ckpt"
        if proc.returncode != 0 or not ckpt.is_file():
            row["tail"] = proc.tail
            row["error"] = f"ns-train exited {proc.returncode}" + ("" if ckpt.is_file() else f"; no {ckpt.name}")
            print(f"   resume from {s}: FAILED ({row['error']}); log {proc.log}\n{proc.tail}", flush=True)
            result["resumes"].append(row)
            continue
        row.update(compare_states(load_pipeline(ckpt), reference))
        row["eval"] = ns_eval(run_dir(experiment) / "config.yml", run_dir(experiment) / "eval.json",
                              logs / f"{method}_{experiment}_eval.log", env, args.timeout)
        row["match"] = (row["count_resumed"] == row["count_reference"] and row["max_abs_diff_all"] == 0.0
                        and row["other_state_identical"])
        print(f"   resume from {s} ({row['phase']}): {proc.seconds:.0f} s, count {row['count_resumed']} vs "
              f"{row['count_reference']}, max|diff| {row['max_abs_diff_all']:.3g}, other state identical "
              f"{row['other_state_identical']}, PSNR {row['eval'].get('psnr')} vs {full_eval.get('psnr')}", flush=True)
        if row["other_state_differing"]:
            print(f"      differing state entries: {row['other_state_differing'][:10]}", flush=True)
        result["resumes"].append(row)

    # past the end of the schedule
    experiment = "continue"
    extra_steps = args.extra_steps
    row = {"kind": "continue", "from_step": last, "phase": "past the end", "count_at_load": result["full"]["count"],
           "gate_at_load": vedal_gate_note(reference), "trained_steps": extra_steps}
    proc = run(train_args(experiment, extra_steps, ["--load-dir", str(models), "--load-step", str(last)]),
               logs / f"{method}_{experiment}.log", env, args.timeout)
    row.update({"command": " ".join(proc.command), "seconds": proc.seconds, "returncode": proc.returncode,
                "log": str(proc.log)})
    cont_models = run_dir(experiment) / "nerfstudio_models"
    cont_steps = checkpoint_steps(cont_models) if cont_models.is_dir() else []
    if proc.returncode != 0 or not cont_steps:
        row["tail"] = proc.tail
        row["error"] = f"ns-train exited {proc.returncode}" + ("" if cont_steps else "; no checkpoint")
        print(f"   continue from {last}: FAILED ({row['error']}); log {proc.log}\n{proc.tail}", flush=True)
    else:
        end = load_pipeline(cont_models / f"step-{cont_steps[-1]:09d}.ckpt")
        count_end = int(end[GAUSS_PREFIX + "means"].shape[0])
        moved = max_abs_diff(end[GAUSS_PREFIX + "means"], reference[GAUSS_PREFIX + "means"])
        row.update({"end_step": cont_steps[-1], "count_resumed": count_end, "count_reference": row["count_at_load"],
                    "max_abs_diff_means_vs_loaded": moved})
        row["eval"] = ns_eval(run_dir(experiment) / "config.yml", run_dir(experiment) / "eval.json",
                              logs / f"{method}_{experiment}_eval.log", env, args.timeout)
        row["match"] = count_end == row["count_at_load"] and not math.isnan(moved) and moved > 0
        print(f"   continue from {last} to {cont_steps[-1]}: {proc.seconds:.0f} s, count {count_end} vs "
              f"{row['count_at_load']}, max|diff means| vs loaded {moved:.3g}, PSNR {row['eval'].get('psnr')}",
              flush=True)
    result["resumes"].append(row)
    return result


# -- report --------------------------------------------------------------------------------------------------------
def fmt_diff(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a (shapes differ)"
    return "0" if x == 0 else f"{x:.2e}"


def fmt_psnr(e: Optional[Dict[str, Any]]) -> str:
    if not e or e.get("psnr") is None:
        return "failed" if e else "-"
    return f"{e['psnr']:.4f}"


def table(results: List[Dict[str, Any]]) -> str:
    lines = ["| method | run | phase at load | steps trained | wall s | Gaussians (this run / uninterrupted) | "
             "max abs diff, gauss_params | other pipeline state | PSNR (this run / uninterrupted) | result |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        full = r.get("full", {})
        if full.get("returncode") != 0:
            lines.append(f"| {r['method']} | uninterrupted | | {r['steps']} | {full.get('seconds', 0):.0f} | | | | | "
                         f"FAILED (exit {full.get('returncode')}) |")
            continue
        ev = full.get("eval", {})
        lines.append(f"| {r['method']} | uninterrupted, steps 0-{full['last_step']}, checkpoints "
                     f"{', '.join(map(str, full['checkpoints']))} | | {r['steps']} | {full['seconds']:.0f} | "
                     f"{full['count']} | | | {fmt_psnr(ev)} | reference |")
        for row in r["resumes"]:
            phase = row["phase"] + (f"; {row['gate_at_load']}" if row.get("gate_at_load") else "")
            if "error" in row:
                lines.append(f"| {r['method']} | {row['kind']} from {row['from_step']} | {phase} | "
                             f"{row['trained_steps']} | {row['seconds']:.0f} | | | | | FAILED: {row['error']} |")
                continue
            if row["kind"] == "resume":
                other = "identical" if row["other_state_identical"] else \
                    f"{len(row['other_state_differing'])} entries differ"
                lines.append(
                    f"| {r['method']} | resume from {row['from_step']} ({row['count_at_load']} Gaussians) | {phase} | "
                    f"{row['trained_steps']} | {row['seconds']:.0f} | {row['count_resumed']} / "
                    f"{row['count_reference']} | {fmt_diff(row['max_abs_diff_all'])} | {other} | "
                    f"{fmt_psnr(row.get('eval'))} / {fmt_psnr(ev)} | "
                    f"{'bit-identical' if row['match'] else 'MISMATCH'} |")
            else:
                lines.append(
                    f"| {r['method']} | continue from final {row['from_step']} to {row['end_step']} | {phase} | "
                    f"{row['trained_steps']} | {row['seconds']:.0f} | {row['count_resumed']} / "
                    f"{row['count_reference']} (loaded) | means moved by up to "
                    f"{fmt_diff(row['max_abs_diff_means_vs_loaded'])} vs loaded | | {fmt_psnr(row.get('eval'))} / "
                    f"{fmt_psnr(ev)} | {'ok (count kept, trained)' if row['match'] else 'UNEXPECTED'} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/buddha_gray67", help="nerfstudio-format dataset folder")
    parser.add_argument("--downscale-factor", type=int, default=8)
    parser.add_argument("--output-dir", type=Path, default=Path("/work/runs/soak"))
    parser.add_argument("--methods", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    parser.add_argument("--extra-steps", type=int, default=50, help="steps trained past the final checkpoint")
    parser.add_argument("--seed", type=int, default=42, help="--machine.seed of every run")
    parser.add_argument("--threads", default="1", help="OMP_NUM_THREADS of every ns-* subprocess")
    parser.add_argument("--hash-seed", default="0", help="PYTHONHASHSEED of every ns-* subprocess")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed to one subprocess")
    parser.add_argument("--smoke", action="store_true", help="60-step schedules, to check the flags quickly")
    args = parser.parse_args(argv)
    if args.smoke and args.extra_steps == 50:
        args.extra_steps = 10

    args.output_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONHASHSEED=args.hash_seed, OMP_NUM_THREADS=args.threads)
    started = time.perf_counter()
    results = [soak_method(m, args, env) for m in args.methods]
    total = time.perf_counter() - started

    from importlib.metadata import version

    meta = {"data": str(Path(args.data).resolve()), "downscale_factor": args.downscale_factor, "smoke": args.smoke,
            "extra_steps": args.extra_steps, "seed": args.seed, "OMP_NUM_THREADS": args.threads,
            "PYTHONHASHSEED": args.hash_seed, "total_seconds": total, "python": platform.python_version(),
            "torch": torch.__version__, "nerfstudio": version("nerfstudio"), "gsplat": version("gsplat"),
            "cpu": platform.processor() or platform.machine(), "argv": sys.argv}
    md = table(results)
    (args.output_dir / "soak.json").write_text(json.dumps({"meta": meta, "methods": results}, indent=2, default=str))
    (args.output_dir / "soak.md").write_text(md + f"\n\nTotal wall-clock: {total:.0f} s.\n")
    print("\n" + md)
    print(f"\ntotal {total:.0f} s; wrote {args.output_dir / 'soak.json'} and {args.output_dir / 'soak.md'}")
    ok = all(row.get("match") for r in results for row in r["resumes"]) and \
        all(r.get("full", {}).get("returncode") == 0 for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
