"""Cost of scoring one view against one forward+backward render of it, on a trained run's Gaussians.

For a few training views of the run, at the resolution pup-gs scores at (`fisher_downscale` 4 with the 256-pixel
floor, as `removal_pictures.py`), it times:
- `render`: one forward+backward of the view through `render.rasterization` (loss = sum of the image times fixed
  random weights, gradients to every parameter), the unit of the issue's goal (scoring a view should cost at
  most about two of these);
- `fisher`: `fisher_blocks` of the view as pup-gs computes it (on CPU: the compiled moment pass and the compiled
  projection Jacobian);
- `fisher (pair list)`: the same blocks through the enumerated pair list, the torch per-pair statistics and
  forward-mode Jacobians through the torch projection (what ran before the compiled passes; also what the
  torch backend runs), with the largest relative difference between the two per Gaussian block;
- `fisher-appearance`, `lightgaussian`, `speedy`: the other per-view scores.
Median of the views' times after one warm-up view; the thread count is torch's (set with --threads).

    python benchmarks/scoring/bench_scoring.py path/to/run/config.yml --views 5 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--views", type=int, default=5, help="training views timed (after one warm-up view)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-pair-list", action="store_true", help="do not time the pair-list Fisher path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from nerfstudio_pruning.render import rasterization
    from nerfstudio_pruning.render.backend import Backend
    from nerfstudio_pruning.scoring import fisher
    from nerfstudio_pruning.scoring.baselines import lightgaussian_significance
    from nerfstudio_pruning.scoring.scores import floored_downscale
    from nerfstudio_pruning.scoring.speedy import speedy_scores
    from nerfstudio_pruning.testing.run_tensors import load_run

    gaussians, views = load_run(args.config)
    gaussians = gaussians.detach()
    downscale = floored_downscale(views.width, views.height, 4, 256)
    scored = views.downscaled(downscale)
    n = len(gaussians)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"run {args.config}; {n:,} Gaussians, SH degree {gaussians.sh_degree}; views {views.width}x{views.height}, "
          f"scored at {scored.width}x{scored.height} (downscale {downscale}); torch threads {torch.get_num_threads()}; "
          f"commit {commit}; load {open('/proc/loadavg').read().split()[0]}")

    weights = torch.rand(1, scored.height, scored.width, 3, generator=torch.Generator().manual_seed(0))

    def render(view: int) -> None:
        leaves = [t.clone().requires_grad_(True) for t in (gaussians.means, gaussians.quats, gaussians.log_scales,
                                                            gaussians.opacity_logits, gaussians.sh)]
        means, quats, log_scales, logits, sh = leaves
        v = scored[view]
        bg = v.background(0)
        image, _, _ = rasterization(means, quats, torch.exp(log_scales), torch.sigmoid(logits), sh, v.viewmats, v.Ks,
                                    v.width, v.height, sh_degree=gaussians.sh_degree,
                                    backgrounds=None if bg is None else bg.reshape(1, -1),
                                    rasterize_mode=gaussians.rasterize_mode)
        (image * weights).sum().backward()

    def blocks(view: int, params=fisher.SPATIAL):
        return fisher.fisher_blocks(gaussians, views[view], downscale=downscale, progress=False, params=params)

    def pair_list_blocks(view: int):
        compiled_rule = fisher.backend_for
        fisher.backend_for = lambda _: Backend.TORCH  # only the scoring module's choice; pairs stay compiled
        try:
            return blocks(view)
        finally:
            fisher.backend_for = compiled_rule

    cases = {
        "render": render,
        "fisher": blocks,
        "fisher (pair list)": pair_list_blocks,
        "fisher-appearance": lambda view: blocks(view, fisher.SPATIAL_AND_APPEARANCE),
        "lightgaussian": lambda view: lightgaussian_significance(gaussians, views[view], downscale=downscale,
                                                                  progress=False),
        "speedy": lambda view: speedy_scores(gaussians, views[view], downscale=downscale, progress=False),
    }
    if args.skip_pair_list:
        del cases["fisher (pair list)"]
    chosen = [i * len(views) // (args.views + 1) for i in range(args.views + 1)]
    times = {name: [] for name in cases}
    worst = 0.0
    for k, view in enumerate(chosen):
        for name, case in cases.items():
            start = time.perf_counter()
            result = case(view)
            elapsed = time.perf_counter() - start
            if k > 0:
                times[name].append(elapsed)
            if name == "fisher":
                compiled_blocks = result
            if name == "fisher (pair list)":
                norms = result.flatten(1).norm(dim=1)
                seen = norms > 0
                diff = (compiled_blocks - result).flatten(1).norm(dim=1)[seen] / norms[seen]
                worst = max(worst, float(diff.max()) if bool(seen.any()) else 0.0)
    unit = statistics.median(times["render"])
    print(f"\n| per view ({args.views} views, median) | ms | x render fwd+bwd | spread ms |")
    print("|---|---|---|---|")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"| {name} | {1e3 * med:.0f} | {med / unit:.1f} | {1e3 * min(values):.0f}-{1e3 * max(values):.0f} |")
    if "fisher (pair list)" in times:
        print(f"\nlargest relative difference per Gaussian block, compiled vs pair list: {worst:.2e}")


if __name__ == "__main__":
    main()
