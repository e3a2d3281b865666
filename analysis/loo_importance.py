"""VEDAL's leave-one-out importance against brute force on a trained model (not a test).

For a random sample of Gaussians of a trained run: remove each one (opacity 0), re-render every training view with
`nerfstudio_pruning.render.rasterization`, and measure the change of the summed per-pixel loss against the
training images. Compare with `leave_one_out_importance` (the exact per-pixel identity from the per-pair engine)
and with the first-order statistic -o dL/do. Prints Spearman rank correlations and the agreement of the gate's
decision ("importance below the gate's threshold quantile") between estimate and brute force.

Usage: python analysis/loo_importance.py --load-config outputs/.../config.yml [--sample 300] [--loss l1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from nerfstudio_pruning.vedal.gate import ConvergenceGateConfig
from nerfstudio_pruning.scoring.importance import first_order_importance, leave_one_out_importance, pixel_loss_change
from nerfstudio_pruning.render import rasterization
from nerfstudio_pruning.testing.ranks import spearman


def render_all(g, views, opacity_logits):
    images, _, _ = rasterization(
        g.means, g.quats, g.scales, torch.sigmoid(opacity_logits), g.sh, views.viewmats, views.Ks, views.width,
        views.height, sh_degree=g.sh_degree, packed=False, backgrounds=views.backgrounds.expand(len(views), 3),
    )
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load-config", required=True)
    parser.add_argument("--sample", type=int, default=300)
    parser.add_argument("--loss", choices=["l1", "l2"], default="l1")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from nerfstudio.utils.eval_utils import eval_setup

    from nerfstudio_pruning.testing.run_tensors import load_run

    g, views = load_run(args.load_config)
    _, pipeline, _, _ = eval_setup(__import__("pathlib").Path(args.load_config), test_mode="val")
    gt = torch.stack([b["image"].float() / 255.0 for b in pipeline.datamanager.cached_train])[..., :3]
    n = len(g)
    print(f"{args.load_config}: {n} Gaussians, {gt.shape[0]} training views {views.width}x{views.height}, "
          f"loss {args.loss}, torch threads {torch.get_num_threads()}")

    started = time.perf_counter()
    estimate = leave_one_out_importance(g, views, gt_images=gt, loss=args.loss, progress=False)
    t_identity = time.perf_counter() - started
    first = first_order_importance(g, views, gt_images=gt, loss=args.loss)

    with torch.no_grad():
        base = render_all(g, views, g.opacity_logits)
        sample = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))[: args.sample]
        brute = torch.zeros(len(sample), dtype=torch.float64)
        started = time.perf_counter()
        for j, i in enumerate(sample.tolist()):
            logits = g.opacity_logits.clone()
            logits[i] = -1e4
            delta = (render_all(g, views, logits) - base).double()
            brute[j] = pixel_loss_change(delta, (base - gt).double(), args.loss).sum()
        t_brute = time.perf_counter() - started

    est, fo = estimate[sample].double(), first[sample].double()
    rho = spearman(est, brute)
    rho_fo = spearman(fo, brute)
    q = ConvergenceGateConfig().threshold_quantile

    def below(x: torch.Tensor) -> np.ndarray:
        return (x <= torch.quantile(x, q)).numpy()

    agree = float((below(est) == below(brute)).mean())
    agree_fo = float((below(fo) == below(brute)).mean())
    rel = ((est - brute).abs() / brute.abs().clamp_min(1e-12)).numpy()
    print(f"sample {len(sample)} | Spearman identity vs brute force {rho:.4f} | first-order {rho_fo:.4f}")
    print(f"gate decision (below the {q:.2f} quantile) agreement: identity {agree:.4f}, first-order {agree_fo:.4f}")
    print(f"relative error of the identity: median {np.median(rel):.2e}, 95th percentile {np.quantile(rel, 0.95):.2e}")
    print(f"time: identity for all {n} Gaussians {t_identity:.1f} s; brute force {t_brute / len(sample):.2f} s per Gaussian")


if __name__ == "__main__":
    main()
