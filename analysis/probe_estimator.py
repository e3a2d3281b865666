"""How well, and how cheaply, the +-1 probe estimator reproduces PUP's exact Fisher scores.

Measures, on any Gaussian set and cameras given as tensors:
- Spearman rank correlation between probe-estimator scores (1, 4, 16 probes per view by default) and exact
  `fisher_scores(fisher_blocks(...))`, over the Gaussians with a finite exact score; how many of those the
  estimator scores -inf (rank-deficient estimate: fewer than 6 independent probe gradients); and how much of
  the set PUP would prune at 80% (lowest scores) both agree on;
- seconds per view of exact scoring, of probe scoring, and of one ordinary forward + backward render.

Not a test. Usage:
    python analysis/probe_estimator.py                      # synthetic: 3000 Gaussians, 64x64, 8 views
    python analysis/probe_estimator.py --scene scene.pt     # torch.save'd dict, see `load_scene`
    python analysis/probe_estimator.py --load-config outputs/.../config.yml --downscale 4   # a trained run
"""

from __future__ import annotations

import argparse
import time
from typing import Dict, Sequence

import torch
from torch import Tensor

from nerfstudio_pruning.scoring.fisher import fisher_blocks, fisher_scores, probe_fisher_blocks
from nerfstudio_pruning.render import rasterization
from nerfstudio_pruning.testing.ranks import spearman
from nerfstudio_pruning.testing.synthetic import orbit_cameras, random_gaussians
from nerfstudio_pruning.types import Gaussians, Views

PRUNE_FRACTION = 0.8  # PUP's first round


def prune_set_agreement(a: Tensor, b: Tensor, fraction: float) -> float:
    """|pruned by a and by b| / |pruned|, pruning the `fraction` with the lowest scores."""
    k = int(fraction * a.shape[0])
    lowest_a = set(torch.argsort(a)[:k].tolist())
    lowest_b = set(torch.argsort(b)[:k].tolist())
    return len(lowest_a & lowest_b) / max(k, 1)


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def render_forward_backward_seconds(gaussians: Gaussians, views: Views) -> float:
    """Seconds per view of one training-style render and backward (all parameters, L1-like scalar)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in
              (gaussians.means, gaussians.quats, gaussians.log_scales, gaussians.opacity_logits, gaussians.sh)]
    means, quats, log_scales, logits, sh = leaves
    total = 0.0
    for view in range(len(views)):
        bg = views.background(view)

        def step():
            image, _, _ = rasterization(
                means, quats, torch.exp(log_scales), torch.sigmoid(logits), sh, views.viewmats[view : view + 1],
                views.Ks[view : view + 1], views.width, views.height, sh_degree=gaussians.sh_degree,
                backgrounds=None if bg is None else bg[None],
            )
            image.abs().sum().backward()

        _, seconds = _timed(step)
        total += seconds
    return total / len(views)


def run_benchmark(gaussians: Gaussians, views: Views, probe_counts: Sequence[int] = (1, 4, 16),
                  downscale: float = 1, seed: int = 0) -> Dict:
    common = dict(downscale=downscale, progress=False)
    n_views = len(views)
    # First calls pay one-off costs (functorch set-up, allocator growth) that a pruning run pays once, not per view.
    fisher_blocks(gaussians, views[0], **common)
    probe_fisher_blocks(gaussians, views[0], **common)
    render_forward_backward_seconds(gaussians, views[0])
    exact_blocks, exact_seconds = _timed(lambda: fisher_blocks(gaussians, views, **common))
    exact = fisher_scores(exact_blocks)
    finite = torch.isfinite(exact)
    results = {
        "n_gaussians": gaussians.means.shape[0],
        "n_views": n_views,
        "n_scored": int(finite.sum()),
        "exact_seconds_per_view": exact_seconds / n_views,
        "render_fwd_bwd_seconds_per_view": render_forward_backward_seconds(gaussians, views),
        "probes": {},
    }
    for n_probes in probe_counts:
        generator = torch.Generator(device=gaussians.means.device).manual_seed(seed)
        blocks, seconds = _timed(lambda: probe_fisher_blocks(
            gaussians, views, n_probes=n_probes, generator=generator, **common
        ))
        scores = fisher_scores(blocks)
        results["probes"][n_probes] = {
            "seconds_per_view": seconds / n_views,
            "spearman": spearman(scores[finite], exact[finite]),
            "minus_inf_among_scored": int((~torch.isfinite(scores[finite])).sum()),
            "prune80_agreement": prune_set_agreement(scores, exact, PRUNE_FRACTION),
        }
    return results


def format_results(results: Dict, label: str) -> str:
    lines = [
        f"scene: {label}",
        f"Gaussians {results['n_gaussians']}, views {results['n_views']}, "
        f"with a finite exact score {results['n_scored']}",
        f"exact fisher_blocks + scores : {results['exact_seconds_per_view']:.3f} s/view",
        f"one forward+backward render  : {results['render_fwd_bwd_seconds_per_view']:.3f} s/view",
        "probes/view | s/view | Spearman vs exact | -inf among scored | 80%-prune set agreement",
    ]
    for n_probes, r in results["probes"].items():
        lines.append(
            f"{n_probes:>11} | {r['seconds_per_view']:.3f} | {r['spearman']:.4f} | {r['minus_inf_among_scored']} | "
            f"{r['prune80_agreement']:.4f}"
        )
    return "\n".join(lines)


def load_scene(path: str):
    """A torch.save'd dict with means, quats, log_scales, opacity_logits, sh, viewmats, Ks, width, height,
    sh_degree, and optionally backgrounds ([3] or [C, 3])."""
    d = torch.load(path, map_location="cpu")
    gaussians = Gaussians(d["means"], d["quats"], d["log_scales"], d["opacity_logits"], d["sh"], int(d["sh_degree"]))
    return gaussians, Views(d["viewmats"], d["Ks"], int(d["width"]), int(d["height"]), d.get("backgrounds"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scene", help="torch.save'd dict of tensors (see load_scene); synthetic if omitted")
    parser.add_argument("--load-config", help="a trained run's config.yml: score its Gaussians on its training views")
    parser.add_argument("--n-gaussians", type=int, default=3000)
    parser.add_argument("--size", type=int, default=64, help="synthetic image width and height")
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--sh-degree", type=int, default=3)
    parser.add_argument("--downscale", type=float, default=1)
    parser.add_argument("--probes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.load_config:
        from nerfstudio_pruning.testing.run_tensors import load_run

        gaussians, views = load_run(args.load_config)
        label = f"{args.load_config}: {len(gaussians)} Gaussians, {len(views)} views {views.width}x{views.height}"
    elif args.scene:
        gaussians, views = load_scene(args.scene)
        label = args.scene
    else:
        gaussians = random_gaussians(args.n_gaussians, sh_degree=args.sh_degree, extent=0.6, scale=0.05,
                                     seed=args.seed).as_gaussians(args.sh_degree)
        width = height = args.size
        viewmats, Ks = orbit_cameras(args.views, width, height)
        views = Views(viewmats, Ks, width, height, torch.tensor([0.2, 0.4, 0.6]))
        label = (f"synthetic random_gaussians(n={args.n_gaussians}, sh_degree={args.sh_degree}, extent=0.6, "
                 f"scale=0.05, seed={args.seed}), orbit_cameras({args.views}, {width}, {height})")
    results = run_benchmark(gaussians, views, args.probes, args.downscale, args.seed)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {gaussians.means.device}")
    print(format_results(results, label))


if __name__ == "__main__":
    main()
