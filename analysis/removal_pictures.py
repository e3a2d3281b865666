"""What each pruning score removes: one eval view of a trained run, pruned by each score.

For every score, the Gaussians a one-shot prune of `--prune` of them (by that score) would remove are split from
the ones it keeps, and the eval view is rendered twice through the model's own render path: the kept Gaussians
alone (with the PSNR against the ground truth) and the removed Gaussians alone. The first row holds the ground
truth and the unpruned render. Scores use every training view at the resolution pup-gs would use
(`fisher_downscale` 4 with the 256-pixel floor). One shot, no refinement: this shows where each score puts its
cut, not the quality after pup-gs's refinement. Besides the pictured view, the kept-only PSNR is averaged over every
eval view. Scores are kept in <output>.scores.pt; `--reuse-scores` takes them from there when they are of the
same checkpoint (Fisher scoring takes minutes).

    python analysis/removal_pictures.py path/to/run/config.yml --scores fisher speedy lightgaussian opacity \
        --prune 0.9 --view 0 --output docs/img/removal.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

NEVER = -30.0  # an opacity logit that makes a Gaussian invisible (sigmoid ~ 1e-13, below gsplat's 1/255 skip)


def psnr(image: torch.Tensor, gt: torch.Tensor) -> float:
    mse = float(((image - gt) ** 2).mean())
    return float("inf") if mse == 0 else -10.0 * torch.log10(torch.tensor(mse)).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--scores", nargs="+", default=["fisher", "speedy", "lightgaussian", "opacity"])
    parser.add_argument("--prune", type=float, default=0.9, help="fraction removed by each score")
    parser.add_argument("--view", type=int, default=0, help="index of the eval view")
    parser.add_argument("--output", type=Path, default=Path("removal.png"))
    parser.add_argument("--reuse-scores", action="store_true", help="read scores kept by an earlier run")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from nerfstudio.utils.eval_utils import eval_setup

    from nerfstudio_pruning.methods.base import views_from_cameras
    from nerfstudio_pruning.scoring.scores import floored_downscale, score_gaussians

    _, pipeline, _, step = eval_setup(args.config, test_mode="test")
    model = pipeline.model.eval()
    train = pipeline.datamanager.train_dataset
    views = views_from_cameras(train.cameras, torch.device("cpu"), model.background_color.detach().clone())
    downscale = floored_downscale(views.width, views.height, 4, 256)
    gaussians = model.gaussians(sh_degree=int(model.config.sh_degree))
    n = len(gaussians)
    eval_data = pipeline.datamanager.eval_dataset
    n_eval = len(eval_data)
    truths = [eval_data[i]["image"].float()[..., :3] for i in range(n_eval)]
    gt = truths[args.view]
    raw = model.gauss_params["opacities"].detach()

    def render(keep: torch.Tensor, view: int = args.view) -> torch.Tensor:
        opacities = torch.where(keep[:, None], raw, torch.full_like(raw, NEVER))
        with torch.no_grad(), model.rendering_with(opacities=opacities):
            return model.get_outputs(eval_data.cameras[view: view + 1])["rgb"].clamp(0, 1)

    def view_psnrs(keep: torch.Tensor) -> list:
        return [psnr(render(keep, i), truths[i]) for i in range(n_eval)]

    everything = torch.ones(n, dtype=torch.bool)
    full = render(everything)
    unpruned = view_psnrs(everything)
    rows = [("ground truth", gt, "unpruned", full, f"{unpruned[args.view]:.2f} dB, {n} Gaussians")]
    record = {"config": str(args.config), "step": step, "gaussians": n, "prune": args.prune, "view": args.view,
              "score_downscale": downscale, "unpruned_psnr": unpruned[args.view], "eval_views": n_eval,
              "unpruned_view_psnr": unpruned, "scores": {}}
    record["unpruned_mean_psnr"] = sum(record["unpruned_view_psnr"]) / n_eval
    n_prune = int(round(args.prune * n))
    cache_path = args.output.with_suffix(".scores.pt")
    cache = torch.load(cache_path) if args.reuse_scores and cache_path.exists() else {}
    if cache and (cache.get("step"), cache.get("gaussians")) != (step, n):
        cache = {}
    for kind in args.scores:
        if kind in cache:
            scores, seconds = cache[kind]["scores"], cache[kind]["seconds"]
        else:
            started = time.perf_counter()
            scores = score_gaussians(kind, gaussians, views, downscale=downscale, progress=False).double()
            seconds = time.perf_counter() - started
            cache[kind] = {"scores": scores, "seconds": seconds}
            torch.save({**cache, "step": step, "gaussians": n}, cache_path)
        scores = torch.where(torch.isfinite(scores), scores, torch.full_like(scores, -torch.inf))
        removed = torch.zeros(n, dtype=torch.bool)
        removed[torch.argsort(scores, stable=True)[:n_prune]] = True
        kept_image, removed_image = render(~removed), render(removed)
        per_view = view_psnrs(~removed)
        value = per_view[args.view]
        record["scores"][kind] = {"kept_psnr": value, "kept_mean_psnr": sum(per_view) / n_eval,
                                  "kept_view_psnr": per_view, "seconds": seconds, "unseen": int(torch.isinf(scores).sum())}
        rows.append((f"{kind}: kept {n - n_prune}", kept_image, f"{kind}: removed {n_prune}", removed_image,
                     f"{value:.2f} dB"))
        print(f"{kind}: kept-only render {value:.2f} dB against {record['unpruned_psnr']:.2f} unpruned (mean over "
              f"{n_eval} eval views {record['scores'][kind]['kept_mean_psnr']:.2f} against "
              f"{record['unpruned_mean_psnr']:.2f}); scored in {seconds:.1f} s", flush=True)

    fig, axes = plt.subplots(len(rows), 2, figsize=(6.4, 2.5 * len(rows)), squeeze=False)
    for (left_title, left, right_title, right, note), (ax_left, ax_right) in zip(rows, axes):
        ax_left.imshow(left.numpy())
        ax_left.set_title(left_title if left is gt else f"{left_title} ({note})", fontsize=8)
        ax_right.imshow(right.numpy())
        ax_right.set_title(f"{right_title} ({note})" if left is gt else right_title, fontsize=8)
        for ax in (ax_left, ax_right):
            ax.axis("off")
    fig.suptitle(f"One-shot {args.prune:.0%} prune of {n} Gaussians, eval view {args.view} (step {step})", fontsize=9)
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=110)
    args.output.with_suffix(".json").write_text(json.dumps(record, indent=2))
    print(f"wrote {args.output} and {args.output.with_suffix('.json')}")


if __name__ == "__main__":
    main()
