"""Training steps per second on CPU (splatfacto-portable, or --method), compiled rasterizer against the torch reference.

Each backend trains the same run (`ns-train splatfacto-portable`, same seed and data) in its own process, with
checkpoints saved every --window steps. The time per step is measured between two checkpoints (file
modification times), so start-up, data loading and kernel loading are not counted, and the Gaussian count is
read from the checkpoint at the end of the window. nerfstudio writes no checkpoint at the first step, so the
first timed window starts --window steps in and start-up is never counted.

    .venv/bin/python benchmarks/training/bench_training_steps.py                                    # built-in scene
    .venv/bin/python benchmarks/training/bench_training_steps.py --scene ../shared/data/buddha_gray67 --downscale 4
    .venv/bin/python benchmarks/training/bench_training_steps.py --load-checkpoint RUN/nerfstudio_models/step-000005000.ckpt
    .venv/bin/python benchmarks/training/bench_training_steps.py --backends compiled --method vedal-gs \
        --method-args "--pipeline.model.finetune-start-step 7000" --load-checkpoint VEDAL_RUN/.../step-000024000.ckpt

With --load-checkpoint the windows start from a trained state (e.g. mid-densification, where a step costs the
most) instead of step 0. The machine should be otherwise idle; the script reports the load of other processes
(cores) over each run.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

from nerfstudio_pruning.testing.machine import ForeignLoad

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def dataparser_args(args: argparse.Namespace, work: Path) -> List[str]:
    if args.scene == "default":
        return ["nsp-default-scene", "--data", str(work / "scene")]
    extra = ["--downscale-factor", str(args.downscale)] if args.downscale else []
    return ["nerfstudio-data-cached", "--data", str(Path(args.scene).resolve()), *extra]


def gaussians_in(ckpt: Path) -> int:
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=False)["pipeline"]
    return int(state["_model.gauss_params.means"].shape[0])


def run_backend(args: argparse.Namespace, backend: str, work: Path) -> dict:
    out = work / backend
    steps = args.window * args.windows
    command = [
        str(BIN / "ns-train"), args.method, "--vis", "tensorboard", "--output-dir", str(out),
        "--experiment-name", "bench", "--timestamp", "run", "--machine.seed", str(args.seed),
        "--machine.device-type", "cpu", "--max-num-iterations", str(steps), "--steps-per-save", str(args.window),
        "--save-only-latest-checkpoint", "False", "--steps-per-eval-image", "1000000000",
        "--steps-per-eval-all-images", "1000000000", "--steps-per-eval-batch", "0",
    ]
    if args.load_checkpoint:
        command += ["--load-checkpoint", str(Path(args.load_checkpoint).resolve())]
    command += args.method_args.split() + dataparser_args(args, work)
    env = dict(os.environ, NSP_CPU_RASTERIZER=backend, OMP_NUM_THREADS=str(args.threads), PYTHONHASHSEED="0")
    log = work / f"{backend}.log"
    with open(log, "w") as fh, ForeignLoad() as load:
        proc = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=work)
    wall, others = load.seconds, load.cores
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-1500:]
        raise SystemExit(f"error: ns-train ({backend}) failed; last lines of {log}:\n{tail}")
    ckpts = sorted((out / "bench" / args.method / "run" / "nerfstudio_models").glob("step-*.ckpt"))
    marks = [(int(c.stem.split("-")[1]), c.stat().st_mtime, gaussians_in(c)) for c in ckpts]
    windows = []
    for (s0, t_0, _), (s1, t_1, n1) in zip(marks, marks[1:]):
        windows.append({"steps": f"{s0}-{s1}", "ms_per_step": 1000 * (t_1 - t_0) / (s1 - s0), "gaussians": n1})
    return {"backend": backend, "windows": windows, "wall_s": wall, "others_load": others}


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scene", default="default", help="'default' or a nerfstudio-data folder")
    p.add_argument("--downscale", type=int, default=None, help="image downscale factor for a dataset folder")
    p.add_argument("--window", type=int, default=200, help="steps between the checkpoints that time a window")
    p.add_argument("--windows", type=int, default=3, help="number of windows")
    p.add_argument("--backends", nargs="+", default=["compiled", "torch"], choices=["compiled", "torch"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--load-checkpoint", default=None, help="start every backend from this checkpoint")
    p.add_argument("--method", default="splatfacto-portable", help="the ns-train method (e.g. vedal-gs with a "
                   "vedal-gs checkpoint)")
    p.add_argument("--method-args", default="", help="more ns-train arguments, one string, e.g. "
                   "'--pipeline.model.finetune-start-step 7000'")
    p.add_argument("--work-dir", default=None, help="where runs go (default: a temporary folder, removed)")
    args = p.parse_args(argv)

    import numba
    import torch

    print(f"python {platform.python_version()}, torch {torch.__version__}, numba {numba.__version__}, "
          f"{os.cpu_count()} CPUs, {args.threads} threads")
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout
    print(f"git commit {git.strip()}; scene {args.scene}" + (f" at 1/{args.downscale}" if args.downscale else "")
          + (f"; from {args.load_checkpoint}" if args.load_checkpoint else "; from step 0"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        results = [run_backend(args, backend, work) for backend in args.backends]
    print("\n| backend | steps | ms per step | Gaussians at the end | others' load (cores) |")
    print("|---|---|---|---|---|")
    for r in results:
        for w in r["windows"]:
            print(f"| {r['backend']} | {w['steps']} | {w['ms_per_step']:.1f} | {w['gaussians']:,} | "
                  f"{r['others_load']:.2f} |")
    if len(results) == 2 and results[0]["windows"] and results[1]["windows"]:
        last = [r["windows"][-1]["ms_per_step"] for r in results]
        print(f"\nlast window: {results[0]['backend']} {last[0]:.1f} ms, {results[1]['backend']} {last[1]:.1f} ms, "
              f"{last[1] / last[0]:.1f}x")


if __name__ == "__main__":
    main()
