"""A vedal-gs fine-tuning step against a splatfacto step at the same Gaussian count, on CPU, in one process.

Both models hold the same Gaussians (from a checkpoint of any splatfacto-family run, or the built-in scene's seed
points densified to --gaussians at random) and train on the built-in scene's views. A step is what the trainer
runs per iteration: render, loss, backward and the optimizers' updates. vedal-gs renders with its retention head
and gate active (a fraction --gated of the Gaussians gated, as after the gate has filled; the importance passes,
one every importance_every steps, are not in it: docs/vedal_gs.md counts them apart), splatfacto plainly; neither
densifies (splatfacto's densification statistics are not accumulated: vedal-gs does not densify either while it
fine-tunes). The variants alternate in rounds, so that load from other processes on a shared machine falls on
all of them alike; the spread over the rounds is printed with the median.

    python benchmarks/training/bench_vedal_step.py [--checkpoint RUN/nerfstudio_models/step-N.ckpt] [--rounds 5] [--steps 10]
        [--gradient-rows 2048 8192 0] [--threads 1]
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
    parser.add_argument("--gated", type=float, default=0.85, help="gated fraction (the gate's default cap)")
    parser.add_argument("--gradient-rows", type=int, nargs="+", default=[2048, 8192, 0],
                        help="vedal-gs variants by head_gradient_rows (0: the full head gradient)")
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
    from nerfstudio_pruning.vedal.gate import ConvergenceGate

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

    variants: Dict[str, tuple] = {"splatfacto-portable": (build(PortableSplatfactoModelConfig(**common)),)}
    for rows in args.gradient_rows:
        model = build(VedalGSModelConfig(vedal=VedalConfig(finetune_start_step=0, hard_prune_step=10**9, head_gradient_rows=rows), **common))
        n = model.num_points
        model.vedal.finetune_started_at, model.vedal.start_gaussians = 0, n
        model.vedal.gate = ConvergenceGate(model.config.vedal.gate, n)
        model.vedal.gate.eligible = torch.rand(n, generator=generator) < args.gated
        model.vedal.importance_scale = 1e-7
        from nerfstudio_pruning.vedal.retention_head import robust_bounds

        model.retention_head.set_bounds(*robust_bounds(model.means.detach()))
        variants[f"vedal-gs, head_gradient_rows {rows}" + (" (all)" if rows == 0 else "")] = (model,)
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
    for _ in range(args.rounds):
        for name, (model, optimizers) in variants.items():
            started = time.perf_counter()
            for _ in range(args.steps):
                view = (view + 1) % len(images)
                step(model, optimizers, view)
            timings[name].append(1000 * (time.perf_counter() - started) / args.steps)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    n = next(iter(variants.values()))[0].num_points
    print(f"{n:,} Gaussians, {len(images)} views of {images[0].shape[1]}x{images[0].shape[0]}, {args.threads} thread(s), "
          f"{platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.1f}, commit {commit}")
    base = statistics.median(timings["splatfacto-portable"])
    print("\n| step | ms per step, median (min - max over rounds) | x splatfacto |\n|---|---|---|")
    for name, values in timings.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.0f} ({min(values):.0f} - {max(values):.0f}) | {median / base:.2f} |")


if __name__ == "__main__":
    main()
