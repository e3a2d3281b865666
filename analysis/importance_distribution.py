"""How VEDAL's leave-one-out importance is distributed in trained models of different sizes.

Prints, per run, the quantiles of Delta (mean over all training views, in the units the gate sees) and the same
quantiles divided by the mean. If the absolute quantiles move with the model size while the relative ones stay
put, a kl_weight stated relative to the mean works across scenes; the chosen default is read off here.

    python analysis/importance_distribution.py path/to/run/config.yml [...] [--step N]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.8, 0.85, 0.9, 0.99)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", type=Path)
    parser.add_argument("--max-views", type=int, default=0, help="0: every training view")
    args = parser.parse_args()

    from nerfstudio.utils.eval_utils import eval_setup

    from nerfstudio_pruning.methods.base import views_from_cameras
    from nerfstudio_pruning.scoring.importance import leave_one_out_importance

    print("run | Gaussians | pixels | zero | " + " | ".join(f"q{int(q * 100)}" for q in QUANTILES)
          + " | mean | " + " | ".join(f"q{int(q * 100)}/mean" for q in QUANTILES) + " | s")
    for config in args.configs:
        _, pipeline, _, step = eval_setup(config, test_mode="val")
        model = pipeline.model
        dataset = pipeline.datamanager.train_dataset
        all_views = views_from_cameras(dataset.cameras, torch.device("cpu"), model.background_color.detach().clone())
        n_views = len(all_views) if args.max_views <= 0 else min(len(all_views), args.max_views)
        gaussians = model.gaussians(sh_degree=int(model.config.sh_degree))
        started = time.perf_counter()
        delta = torch.zeros(len(gaussians), dtype=torch.float64)
        for index in range(n_views):
            gt = dataset[index]["image"].float()[None, ..., :3]
            delta += leave_one_out_importance(gaussians, all_views[index:index + 1], gt_images=gt, loss="l1",
                                              progress=False)
        # The units the gate sees: (1 - ssim_lambda) x mean per-pixel, per-channel L1 of a view, mean over views.
        delta = (1.0 - model.config.ssim_lambda) * delta / (n_views * gt.shape[1] * gt.shape[2] * 3)
        seconds = time.perf_counter() - started
        n = delta.numel()
        values = {q: float(delta.kthvalue(max(1, math.ceil(q * n))).values) for q in QUANTILES}
        mean = float(delta.mean())
        print(f"{config.parent.name}@{step} | {n} | {gt.shape[1]}x{gt.shape[2]} | {float((delta <= 0).double().mean()):.3f} | "
              + " | ".join(f"{values[q]:.3g}" for q in QUANTILES) + " | "
              + f"{mean:.3g} | " + " | ".join(f"{values[q] / mean:.3g}" for q in QUANTILES)
              + f" | {seconds:.0f}", flush=True)


if __name__ == "__main__":
    main()
