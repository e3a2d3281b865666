"""How much the PUP score's ranking depends on the resolution it is computed at.

For one trained run, scores every Gaussian at several downscales of the training resolution and compares each
ranking with the one at full resolution: Spearman correlation over all Gaussians, and the overlap of the sets a
90% pruning would keep (the official pipeline scores at 1/4 of the training resolution, chosen for images about
1000 pixels wide). Also prints the time each scoring took.

    python analysis/scoring_resolution.py path/to/run/config.yml --score fisher --downscales 1 2 4 8
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from nerfstudio_pruning.testing.ranks import spearman


def kept_overlap(a: torch.Tensor, b: torch.Tensor, keep_fraction: float) -> float:
    k = max(1, int(round(keep_fraction * len(a))))
    top_a = set(torch.topk(a, k).indices.tolist())
    top_b = set(torch.topk(b, k).indices.tolist())
    return len(top_a & top_b) / k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--score", default="fisher")
    parser.add_argument("--downscales", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--keep", type=float, default=0.1, help="kept fraction for the overlap column")
    args = parser.parse_args()

    from nerfstudio_pruning.scoring.scores import score_gaussians
    from nerfstudio_pruning.testing.run_tensors import load_run

    gaussians, views = load_run(args.config)
    print(f"{args.config}: {len(gaussians)} Gaussians, {len(views)} views of {views.width}x{views.height}, "
          f"score {args.score}, {torch.get_num_threads()} threads")
    reference = None
    print("downscale | scoring size | seconds | Spearman vs 1 | kept-set overlap vs 1 (keep "
          f"{args.keep:.0%}) | unseen")
    for d in args.downscales:
        started = time.perf_counter()
        scores = score_gaussians(args.score, gaussians, views, downscale=d, progress=False).double()
        seconds = time.perf_counter() - started
        scores = torch.where(torch.isfinite(scores), scores, torch.full_like(scores, -torch.inf))
        if reference is None:
            reference = scores
        size = f"{views.width // d}x{views.height // d}"
        unseen = int(torch.isinf(scores).sum())
        print(f"{d} | {size} | {seconds:.1f} | {spearman(scores, reference):.3f} | "
              f"{kept_overlap(scores, reference, args.keep):.3f} | {unseen}", flush=True)


if __name__ == "__main__":
    main()
