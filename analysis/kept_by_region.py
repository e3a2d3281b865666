"""Which part of the scene a one-shot cut keeps: the Gaussians beyond a distance from the scene's vertical axis (the
built-in scene's far wall, a capture's background) against the rest, and how many of each a score's top fractions
keep.

PUP ranks a Gaussian by how much moving or resizing it changes the training views; small, far, flat Gaussians
rank last. This prints, for one trained run, the Gaussians outside `--radius` (in the dataparser's frame, where the
built-in scene's wall is at about 2.0), their median largest scale against the rest's, and how many of them a
score's top `--keep` fractions hold (0.2: what PUP's first 80% round keeps; 0.1: a one-shot 90% cut), scored on the
training views at their resolution (docs/compare.md reads it).

    python analysis/kept_by_region.py path/to/run/config.yml [--step 999] [--radius 1.7] [--keep 0.2 0.1] [--score fisher]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="the run's config.yml")
    parser.add_argument("--step", type=int, default=None, help="the checkpoint to read (default: the latest)")
    parser.add_argument("--radius", type=float, default=1.7, help="distance from the vertical (z) axis beyond which "
                        "a Gaussian counts as outer (dataparser frame)")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.2, 0.1], help="top fractions to count")
    parser.add_argument("--score", default="fisher")
    parser.add_argument("--downscale", type=float, default=1.0, help="score at 1/downscale of the training views")
    args = parser.parse_args()

    from nerfstudio_pruning.scoring.scores import score_gaussians
    from nerfstudio_pruning.testing.run_tensors import load_run

    config = args.config
    if args.step is not None:
        from nerfstudio_pruning.compare.records import config_at_step

        config = config_at_step(args.config, args.step, Path(tempfile.mkdtemp()) / "config.yml")
    gaussians, views = load_run(config)
    outer = gaussians.means[:, :2].norm(dim=1) > args.radius
    largest = gaussians.log_scales.exp().max(dim=1).values
    n, n_outer = len(outer), int(outer.sum())
    print(f"{args.config} (step {'latest' if args.step is None else args.step}): {n} Gaussians, {n_outer} ({n_outer / n:.0%}) beyond radius {args.radius:g}; median "
          f"largest scale outer {largest[outer].median():.4f}, inner {largest[~outer].median():.4f}; "
          f"{len(views)} views of {views.width}x{views.height}")
    started = time.perf_counter()
    scores = score_gaussians(args.score, gaussians, views, downscale=args.downscale, progress=True).double()
    scores = torch.where(torch.isfinite(scores), scores, torch.full_like(scores, -torch.inf))
    print(f"{args.score} scored in {time.perf_counter() - started:.1f} s")
    print("| top fraction kept | Gaussians kept | outer kept | share of the outer ones |")
    print("|---|---|---|---|")
    for fraction in args.keep:
        count = int(round(fraction * n))
        kept = torch.zeros_like(outer)
        kept[torch.topk(scores, count).indices] = True
        outer_kept = int((kept & outer).sum())
        print(f"| {fraction:g} | {count} | {outer_kept} | {outer_kept / max(n_outer, 1):.2%} |")


if __name__ == "__main__":
    main()
