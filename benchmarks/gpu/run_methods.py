"""The real methods end to end: `ns-train pup-gs` and `ns-train vedal-gs` on the built-in scene, then `ns-eval` and
`ns-export gaussian-splat` of each, with nerfstudio 1.1.5 from the carried wheels and gsplat's CUDA rasterizer.

    python benchmarks/gpu/run_methods.py [--device cuda|cpu] [--quick] [--scale S] [--out DIR]

The schedule is ns-prune-compare's, scaled (nerfstudio_pruning.compare: Schedule, common_train_args): a
splatfacto-portable run of `steps_30k` steps, pup-gs post hoc from its last checkpoint (two refinement rounds,
80% then 50% pruned) and vedal-gs for `steps_30k` steps (densification, then fine-tuning with the gate and a hard
prune at the end). --scale 0.01 (default): 300 steps, pup-gs 50 + 50; --quick: 0.001, i.e. 30 steps, pup-gs 5 + 5.
Every command goes through ns_kit.py (the plugin registered from pyproject.toml, gsplat's cached build loaded).

Checks: each command exits 0 and writes what it should; pup-gs's pruning.json has its two rounds and fewer
Gaussians at the end; vedal-gs's pruning.json is there; ns-eval's PSNR is finite and its Gaussian count is the
run's; the exported PLY parses, has splatfacto's properties, only finite values and at most that many vertices.
Results (<out>/methods.json, one measurement row per method, and <out>/methods/: logs, configs, pruning.json,
eval.json, the PLY when small) come back; runs and checkpoints stay in benchmarks/gpu/cache/methods/. Every
command gets what is left of STAGE_TIMEOUT (less a margin to write the results).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

from kit_common import KIT_DIR, Results, parse_args
from ns_kit import use_shims

# The schedule is read from the methods' configs (compare.schedule imports nerfstudio's method table), whose imports
# need the kit's stand-ins for packages it never uses, as every ns-* command it starts gets them.
use_shims()

import numpy as np  # noqa: E402

from nerfstudio_pruning.compare import CompareConfig, Schedule, common_train_args, last_checkpoint  # noqa: E402

SEED = 42
PLY_KEEP_BYTES = 4 * 2**20  # PLYs up to this size are copied into the results
MARGIN_S = 25.0


def main() -> int:
    args = parse_args(__doc__.splitlines()[0], lambda p: p.add_argument(
        "--scale", type=float, default=None, help="schedule scale (ns-prune-compare's): 0.01, or 0.001 with --quick"))
    scale = args.scale or (0.001 if args.quick else 0.01)
    deadline = time.monotonic() + float(os.environ.get("STAGE_TIMEOUT", "540")) - MARGIN_S
    results = Results("methods", args.device, args.out)
    files = args.out / "methods"
    shutil.rmtree(files, ignore_errors=True)
    (files / "logs").mkdir(parents=True)
    work = KIT_DIR / "cache" / "methods" / f"{args.device}-{scale:g}"
    shutil.rmtree(work, ignore_errors=True)
    scene = ["nsp-default-scene", "--data", str(KIT_DIR / "cache" / "nsp-default-scene")]
    cfg = CompareConfig(device=args.device, schedule_scale=scale, experiment_name="gpu_kit", seeds=(SEED,))
    sched = Schedule.of(scale)
    print(f"schedule scale {scale:g}: splatfacto-portable and vedal-gs {sched.steps_30k} steps, pup-gs "
          f"{' + '.join(map(str, sched.refine))} from the splatfacto checkpoint; device {args.device}", flush=True)

    def ns(label: str, command: str, argv: List[str]) -> Optional[float]:
        """Run one ns-* command; its seconds, or None (a failed check) if it failed."""
        log = files / "logs" / f"{label}.log"
        left = deadline - time.monotonic()
        if left < 10:
            results.skip(f"ns-{command} {label}", "out of STAGE_TIMEOUT")
            return None
        start = time.perf_counter()
        try:
            with log.open("w") as out:
                proc = subprocess.run([sys.executable, str(KIT_DIR / "ns_kit.py"), command, *argv], stdout=out,
                                      stderr=subprocess.STDOUT, timeout=left, cwd=KIT_DIR.parents[1])
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        seconds = time.perf_counter() - start
        if code != 0:
            tail = log.read_text(errors="replace")[-3000:]
            print(tail, flush=True)
            results.check(f"ns-{command} {label} exits 0", False, exit=code, seconds=seconds, log=str(log.name))
            return None
        results.check(f"ns-{command} {label} exits 0", True, seconds=seconds)
        return seconds

    def train(label: str, method: str, steps: int, extra: List[str]) -> Optional[Path]:
        argv = [method, *common_train_args(cfg, label, steps, work, SEED), *extra, *scene]
        seconds = ns(label, "train", argv)
        config = work / "runs" / cfg.experiment_name / method / label / "config.yml"
        if seconds is None:
            return None
        if not results.check(f"{label}: config.yml and a checkpoint written", config.is_file() and any(
                (config.parent / "nerfstudio_models").glob("step-*.ckpt")), config=str(config.relative_to(work))):
            return None
        train_seconds[label] = seconds
        shutil.copy2(config, files / f"{label}_config.yml")
        return config

    train_seconds: dict = {}
    runs = {}
    base = train("splatfacto", "splatfacto-portable", sched.steps_30k, [])
    if base is not None:
        runs["pup-gs"] = train("pup-gs", "pup-gs", sum(sched.refine), [
            "--load-checkpoint", str(last_checkpoint(base)), "--pipeline.model.refine-steps", *map(str, sched.refine)])
    else:
        results.skip("pup-gs", "no splatfacto-portable checkpoint to prune")
    runs["vedal-gs"] = train("vedal-gs", "vedal-gs", sched.steps_30k, sched.vedal_args())

    for method, config in runs.items():
        if config is None:
            continue
        row = {"method": method, "steps": sched.steps_30k if method == "vedal-gs" else sum(sched.refine),
               "train_s": train_seconds.get(method)}
        pruning = read_json(config.parent / "pruning.json")
        if pruning is not None:
            shutil.copy2(config.parent / "pruning.json", files / f"{method}_pruning.json")
        final = pruning.get("final_gaussians") if pruning else None
        if method == "pup-gs":
            rounds = (pruning or {}).get("rounds", [])
            results.check("pup-gs: pruning.json has two rounds, each leaving fewer Gaussians", len(rounds) == 2 and all(
                r["gaussians_after"] < r["gaussians_before"] for r in rounds),
                rounds=[(r["gaussians_before"], r["gaussians_after"]) for r in rounds],
                scoring_s=[round(r["scoring_seconds"], 3) for r in rounds])
            if rounds:
                row["gaussians_before"] = rounds[0]["gaussians_before"]
        else:
            hard = (pruning or {}).get("hard_prune") or {}
            results.check("vedal-gs: pruning.json written, the hard prune (if reached) left the final Gaussians",
                          final is not None and (not hard or hard["gaussians_after"] == final <= hard["gaussians_before"]),
                          final_gaussians=final, hard_prune=hard or "not reached",
                          importance_passes=(pruning or {}).get("importance_passes"))
            if hard:
                row["gaussians_before"] = hard["gaussians_before"]
        row["gaussians"] = final

        eval_json = files / f"{method}_eval.json"
        row["eval_s"] = ns(f"{method}-eval", "eval", ["--load-config", str(config), "--output-path", str(eval_json)])
        metrics = (read_json(eval_json) or {}).get("results", {})
        if row["eval_s"] is not None:
            psnr = metrics.get("psnr")
            results.check(f"{method}: ns-eval PSNR finite, Gaussian count the run's",
                          psnr is not None and math.isfinite(psnr) and metrics.get("num_gaussians") == final,
                          psnr=psnr, ssim=metrics.get("ssim"), num_gaussians=metrics.get("num_gaussians"),
                          lpips=metrics.get("lpips", "omitted (no AlexNet weights offline)"))
        row.update({k: metrics[k] for k in ("psnr", "ssim", "lpips", "fps") if k in metrics})

        ply_dir = work / "export" / method
        row["export_s"] = ns(f"{method}-export", "export", ["gaussian-splat", "--load-config", str(config),
                                                             "--output-dir", str(ply_dir)])
        ply = ply_dir / "splat.ply"
        if row["export_s"] is not None:
            try:
                vertices, properties, finite = read_ply(ply)
                expected = {"x", "y", "z", "nx", "ny", "nz", "opacity", *(f"f_dc_{i}" for i in range(3)),
                            *(f"scale_{i}" for i in range(3)), *(f"rot_{i}" for i in range(4))}
                results.check(f"{method}: ns-export gaussian-splat wrote a PLY of the model", ply.is_file()
                              and 0 < vertices <= (final or 0) and expected <= set(properties) and finite,
                              vertices=vertices, properties=len(properties), bytes=ply.stat().st_size)
                row.update(ply_vertices=vertices, ply_mib=ply.stat().st_size / 2**20)
                if ply.stat().st_size <= PLY_KEEP_BYTES:
                    shutil.copy2(ply, files / f"{method}_splat.ply")
            except Exception as err:  # noqa: BLE001
                results.error(f"{method}: ns-export gaussian-splat wrote a PLY of the model", err)
        results.measure(**row)
    results.write()
    return 1 if results.failed else 0


def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_ply(path: Path):
    """(vertex count, property names, all values finite) of a binary little-endian PLY of float/uchar vertices."""
    with path.open("rb") as f:
        header = []
        while True:
            line = f.readline().decode("ascii").strip()
            header.append(line)
            if line == "end_header" or not line:
                break
        body = f.read()
    assert header[0] == "ply" and "format binary_little_endian 1.0" in header, header[:3]
    count = next(int(h.split()[2]) for h in header if h.startswith("element vertex"))
    props = [(h.split()[2], "<f4" if h.split()[1] == "float" else "u1") for h in header if h.startswith("property")]
    data = np.frombuffer(body, dtype=np.dtype(props), count=count)
    finite = all(np.isfinite(data[name]).all() for name, kind in props if kind == "<f4")
    return count, [name for name, _ in props], bool(finite)


if __name__ == "__main__":
    sys.exit(main())
