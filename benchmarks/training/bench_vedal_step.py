"""A vedal-gs fine-tuning step against a splatfacto step at the same Gaussian count, on CPU, in one process.

Both models hold the same Gaussians (from a checkpoint of any splatfacto-family run, or the built-in scene's seed
points densified to --gaussians at random) and train on the built-in scene's views. A step is what the trainer
runs per iteration: render, loss, backward and the optimizers' updates. vedal-gs renders with its retention head
and gate active (a fraction --gated of the Gaussians gated, one model per fraction; the importance passes, one
every importance_every steps, are not in it: docs/vedal_gs.md counts them apart), splatfacto plainly; neither
densifies (splatfacto's densification statistics are not accumulated: vedal-gs does not densify either while it
fine-tunes). The variants alternate in rounds, so that load from other processes on a shared machine falls on
all of them alike; the spread over the rounds is printed with the median, and the cores other processes used
while it measured.

The head runs on the gated Gaussians only (`RetentionHead.on_rows`, up to GATED_ROWS_AT_MOST of them); --every-row F
adds, at gated fraction F, the path before that, where it ran on every Gaussian. Last, the time-weighted mean of the ratio over a fine-tuning
schedule: the gate's eligible fraction over the buddha_gray67 1/4 full-schedule run of docs/results.md ("The gate on
buddha"), the ratio interpolated linearly between the measured fractions.

    python benchmarks/training/bench_vedal_step.py [--checkpoint RUN/nerfstudio_models/step-N.ckpt] [--rounds 5]
        [--steps 10] [--gated 0.1 0.3 0.5 0.7 0.85] [--gradient-rows 2048] [--every-row 0.5] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="Gaussians to use (default: random ones)")
    parser.add_argument("--gaussians", type=int, default=100_000, help="count of random Gaussians without --checkpoint")
    parser.add_argument("--gated", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.85],
                        help="gated fractions, one vedal-gs model each (0.85: the gate's default cap)")
    parser.add_argument("--gradient-rows", type=int, nargs="+", default=[2048],
                        help="vedal-gs variants by head_gradient_rows (0: the full head gradient)")
    parser.add_argument("--every-row", type=float, nargs="*", default=[],
                        help="gated fractions at which to add the head evaluated on every Gaussian (the path before "
                             "on_rows; above GATED_ROWS_AT_MOST it is on_rows' own)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from nerfstudio.data.scene_box import SceneBox
    from PIL import Image

    from nerfstudio_pruning.data.dataparser import DefaultSceneDataParserConfig
    from nerfstudio_pruning.methods.base import PortableSplatfactoModelConfig
    from nerfstudio_pruning.methods.optimizers import FusedOnCpuAdam
    from nerfstudio_pruning.methods.vedal_gs import VedalGSModelConfig
    from nerfstudio_pruning.vedal.controller import VedalConfig
    from nerfstudio_pruning.testing.machine import ForeignLoad, own_cpu_seconds
    from nerfstudio_pruning.vedal.gate import ConvergenceGate
    from nerfstudio_pruning.vedal.retention_head import robust_bounds

    with tempfile.TemporaryDirectory() as tmp:
        outputs = DefaultSceneDataParserConfig(data=Path(tmp) / "scene").setup().get_dataparser_outputs("train")
        images = [torch.from_numpy(__import__("numpy").array(Image.open(f).convert("RGB"))) for f in outputs.image_filenames]
    cameras = outputs.cameras
    seed_means = outputs.metadata["points3D_xyz"].float()
    seed_rgb = outputs.metadata["points3D_rgb"]
    scene_box = SceneBox(aabb=torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]))

    generator = torch.Generator().manual_seed(0)
    if args.checkpoint is not None:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)["pipeline"]
        params = {k.split(".")[-1]: v for k, v in state.items() if k.startswith("_model.gauss_params.")}
    else:
        pick = torch.randint(0, seed_means.shape[0], (args.gaussians,), generator=generator)
        params = None
    common = dict(sh_degree=3, num_downscales=0, random_init=False)

    def build(config):
        if params is None:
            means = seed_means[pick] + 0.01 * torch.randn(args.gaussians, 3, generator=generator)
            model = config.setup(scene_box=scene_box, num_train_data=len(images), seed_points=(means, seed_rgb[pick]))
        else:
            model = config.setup(scene_box=scene_box, num_train_data=len(images), seed_points=(seed_means, seed_rgb))
            for name, value in params.items():
                model.gauss_params[name] = torch.nn.Parameter(value.clone())
        model.train()
        model.step = 10_000  # past splatfacto's resolution schedule and SH warm-up: full size, every SH degree
        return model

    def optimizers_of(model) -> List[torch.optim.Optimizer]:
        groups = {name: params for name, params in model.get_param_groups().items() if params}
        optimizers = {name: FusedOnCpuAdam(params, lr=1e-4, fused=True) for name, params in groups.items()}
        model.optimizers = optimizers  # what the trainer's step callback gives splatfacto (its strategy reads them)
        return list(optimizers.values())

    def vedal_model(rows: int, gated: float, every_row: bool):
        model = build(VedalGSModelConfig(vedal=VedalConfig(finetune_start_step=0, hard_prune_step=10**9, head_gradient_rows=rows), **common))
        n = model.num_points
        model.vedal.finetune_started_at, model.vedal.start_gaussians = 0, n
        eligible = torch.rand(n, generator=generator) < gated
        model.vedal.gate = ConvergenceGate(model.config.vedal.gate, n)
        model.vedal.gate.eligible = eligible
        model.vedal.importance_scale = 1e-7
        model.retention_head.set_bounds(*robust_bounds(model.means.detach()))
        if every_row:
            model.training_head_logits = lambda gated_mask: model.head_logits()
        return model

    variants: Dict[str, tuple] = {"splatfacto-portable": (build(PortableSplatfactoModelConfig(**common)),)}
    fraction_of: Dict[str, float] = {}
    for rows in args.gradient_rows:
        for gated in args.gated:
            name = f"vedal-gs, {100 * gated:g}% gated, head_gradient_rows {rows}" + (" (all)" if rows == 0 else "")
            variants[name] = (vedal_model(rows, gated, every_row=False),)
            fraction_of[name] = gated
        for gated in args.every_row:
            name = f"vedal-gs, {100 * gated:g}% gated, head_gradient_rows {rows}, head on every row (before)"
            variants[name] = (vedal_model(rows, gated, every_row=True),)
    variants = {name: (model, optimizers_of(model)) for name, (model,) in variants.items()}

    def step(model, optimizers, view: int) -> None:
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        out = model.get_outputs(cameras[view : view + 1])
        losses = model.get_loss_dict(out, {"image": images[view]})
        sum(losses.values()).backward()
        for optimizer in optimizers:
            optimizer.step()

    timings: Dict[str, List[float]] = {name: [] for name in variants}
    view = 0
    for name, (model, optimizers) in variants.items():  # warm-up: compilation, allocations
        for _ in range(2):
            step(model, optimizers, view)
    cpu_timings: Dict[str, List[float]] = {name: [] for name in variants}
    with ForeignLoad(ours=own_cpu_seconds) as others:
        for _ in range(args.rounds):
            for name, (model, optimizers) in variants.items():
                started, cpu_started = time.perf_counter(), time.process_time()
                for _ in range(args.steps):
                    view = (view + 1) % len(images)
                    step(model, optimizers, view)
                timings[name].append(1000 * (time.perf_counter() - started) / args.steps)
                cpu_timings[name].append(1000 * (time.process_time() - cpu_started) / args.steps)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    n = next(iter(variants.values()))[0].num_points
    print(f"{n:,} Gaussians, {len(images)} views of {images[0].shape[1]}x{images[0].shape[0]}, {args.threads} thread(s), "
          f"{platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.1f}, other processes "
          f"{others.cores:.2f} cores while measuring, commit {commit}")
    # Wall time, and the process's CPU time: on a machine shared with busy processes this one is also preempted,
    # which wall time counts and CPU time does not (everything here runs in this process, one thread).
    base = statistics.median(timings["splatfacto-portable"])
    cpu_base = statistics.median(cpu_timings["splatfacto-portable"])
    print("\n| step | wall ms per step, median (min - max over rounds) | x splatfacto | CPU ms per step, median "
          "(min - max) | x splatfacto |\n|---|---|---|---|---|")
    for name, values in timings.items():
        median, cpu = statistics.median(values), cpu_timings[name]
        print(f"| {name} | {median:.0f} ({min(values):.0f} - {max(values):.0f}) | {median / base:.2f} | "
              f"{statistics.median(cpu):.0f} ({min(cpu):.0f} - {max(cpu):.0f}) | {statistics.median(cpu) / cpu_base:.2f} |")
    for rows in args.gradient_rows:
        names = [name for name in fraction_of if name.endswith(f"head_gradient_rows {rows}" + (" (all)" if rows == 0 else ""))]
        if len(names) > 1:
            wall = sorted((fraction_of[name], statistics.median(timings[name]) / base) for name in names)
            cpu = sorted((fraction_of[name], statistics.median(cpu_timings[name]) / cpu_base) for name in names)
            print(f"time-weighted over the buddha fine-tuning schedule, head_gradient_rows {rows}: "
                  f"{schedule_mean(wall):.2f}x splatfacto (wall), {schedule_mean(cpu):.2f}x (CPU)")


# The gate's eligible fraction during the buddha_gray67 1/4 full-schedule fine-tuning (steps 7,000-29,999; seed 42,
# docs/results.md "The gate on buddha"): nothing is gated before the first full importance pass (taken as step
# 8,000, the table's first row being 8,600), then the logged fractions, the 85% cap from 17,000. The hand-over's
# second half (the last 5% of the steps) renders the fixed decision without the head (ratio 1) and is left out,
# as are the steps before the gate opens, which run no head either: both cost a splatfacto step.
GATE_HISTORY = [(8_000, 0.0), (8_600, 0.342), (9_400, 0.434), (10_100, 0.510), (11_000, 0.615), (12_000, 0.697),
                (13_000, 0.756), (14_000, 0.798), (15_000, 0.828), (16_000, 0.848), (17_000, 0.850), (28_850, 0.850)]
FINETUNE_STEPS = (7_000, 30_000)


def schedule_mean(ratios) -> float:
    """Mean over the fine-tuning's steps of the step-cost ratio at the gate's fraction then (1 where no head runs),
    with the ratio interpolated linearly between measured fractions (held constant beyond them)."""

    def ratio_at(fraction: float) -> float:
        if fraction <= 0.0:
            return 1.0
        points = [(0.0, 1.0)] if ratios[0][0] > 0 else []
        points += ratios
        for (f0, r0), (f1, r1) in zip(points, points[1:]):
            if f0 <= fraction <= f1:
                return r0 + (r1 - r0) * (fraction - f0) / (f1 - f0)
        return points[-1][1] if fraction > points[-1][0] else points[0][1]

    total = 0.0
    for (s0, f0), (s1, f1) in zip(GATE_HISTORY, GATE_HISTORY[1:]):
        for k in range(s1 - s0):  # step by step, the fraction linear between logged points
            total += ratio_at(f0 + (f1 - f0) * (k + 0.5) / (s1 - s0))
    steps_with_head = GATE_HISTORY[-1][0] - GATE_HISTORY[0][0]
    all_steps = FINETUNE_STEPS[1] - FINETUNE_STEPS[0]
    return (total + (all_steps - steps_with_head)) / all_steps


if __name__ == "__main__":
    main()
