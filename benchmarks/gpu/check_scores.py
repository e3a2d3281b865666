"""(b) The pruning scores on CUDA against the float64 CPU reference and against autograd brute force.

Small scenes (the 0.999 alpha clamp and the T <= 1e-4 stop both occur), a float32 model on the device:
- Fisher blocks (`scoring.fisher.fisher_blocks`), leave-one-out importance (L1 against a ground truth, and the
  energy form) and LightGaussian's significance on the device (on CUDA: gsplat's tile kernel for the pairs,
  float32 per-pair statistics, float64 sums) against the same on CPU with the model cast to float64 (float64
  projection and statistics): per-Gaussian relative error and rank agreement of the scores;
- Fisher blocks against the full autograd Jacobian of the image rendered by the dispatch (gsplat's CUDA
  rasterizer on CUDA), one backward pass per image entry;
- leave-one-out importance against re-rendering without each Gaussian (the dispatch again), on the Gaussians
  whose removal brings back no pair from behind the early stop (where the identity is exact).

    python benchmarks/gpu/check_scores.py [--device cuda|cpu] [--quick] [--out DIR]
"""

from __future__ import annotations

from kit_common import Results, orbit_scene, parse_args, per_row_relative_error, spearman

import torch

# float32 model and images against float64: ~1e-6 expected; the limits leave room for gsplat's fast math.
MAX_FISHER_ERROR = 1e-3  # per Gaussian, relative (Frobenius)
MAX_IMPORTANCE_ERROR = 1e-4  # relative to the largest |importance|
MIN_SPEARMAN = 0.999
MAX_BRUTE_FORCE_FISHER_ERROR = 1e-3
MAX_BRUTE_FORCE_LOO_ERROR = 1e-3  # on Gaussians whose change is > 1e-3 of the largest and no pair returns


def scores_on(gaussians, views, gt, device_label):
    from nerfstudio_pruning.scoring.baselines import lightgaussian_significance
    from nerfstudio_pruning.scoring.fisher import fisher_blocks, fisher_scores
    from nerfstudio_pruning.scoring.importance import leave_one_out_importance

    fisher = fisher_blocks(gaussians, views, progress=False)
    return {
        "fisher": fisher,
        "fisher_scores": fisher_scores(fisher),
        "loo_l1": leave_one_out_importance(gaussians, views, gt_images=gt, loss="l1", progress=False),
        "loo_energy": leave_one_out_importance(gaussians, views, loss="energy", progress=False),
        "lightgaussian": lightgaussian_significance(gaussians, views),
    }


def compare_with_float64_cpu(results: Results, device: str, quick: bool, label: str = "") -> None:
    from nerfstudio_pruning.render import rasterization

    n, n_views, width, height = (60, 2, 32, 24) if quick else (400, 4, 96, 72)
    g, views = orbit_scene(n, n_views, width, height, device, seed=0)
    target, _ = orbit_scene(n, n_views, width, height, device, seed=5)
    gt, _, _ = rasterization(**target.render_args(), viewmats=views.viewmats, Ks=views.Ks, width=width, height=height,
                             sh_degree=2, backgrounds=views.backgrounds[None].expand(n_views, -1))
    ours = scores_on(g.as_gaussians(2), views, gt, device)
    g64 = type(g)(**{k: v.detach().cpu().double() for k, v in g.__dict__.items()})
    views64 = views.to("cpu")
    views64 = type(views64)(views64.viewmats.double(), views64.Ks.double(), width, height, views64.backgrounds.double())
    reference = scores_on(g64.as_gaussians(2), views64, gt.detach().cpu().double(), "cpu")
    tag = f"{n} Gaussians, {n_views} views {width}x{height}, {device} float32 model{label} vs CPU float64"
    fisher_error = per_row_relative_error(ours["fisher"], reference["fisher"])
    rank = spearman(ours["fisher_scores"], reference["fisher_scores"])
    results.check(f"Fisher blocks [{tag}]", fisher_error <= MAX_FISHER_ERROR and rank >= MIN_SPEARMAN,
                  max_per_gaussian_relative_error=fisher_error, score_spearman=rank,
                  gaussians_seen=int((reference["fisher"].flatten(1).norm(dim=1) > 0).sum()))
    for key in ("loo_l1", "loo_energy", "lightgaussian"):
        ref = reference[key].cpu()
        error = float((ours[key].cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-300))
        rank = spearman(ours[key], ref)
        results.check(f"{key} [{tag}]", error <= MAX_IMPORTANCE_ERROR and rank >= MIN_SPEARMAN,
                      max_error_over_largest=error, spearman=rank)


def autograd_fisher(g, views, sh_degree):
    """F_i = sum over pixels and channels of grad I grad I^T through the dispatch (gsplat on CUDA)."""
    from nerfstudio_pruning.render import rasterization

    means = g.means.detach().clone().requires_grad_(True)
    log_scales = g.log_scales.detach().clone().requires_grad_(True)
    fisher = torch.zeros(g.means.shape[0], 6, 6, dtype=torch.float64, device=g.means.device)
    for view in range(len(views)):
        image, _, _ = rasterization(
            means, g.quats, torch.exp(log_scales), torch.sigmoid(g.opacity_logits), g.sh,
            views.viewmats[view : view + 1], views.Ks[view : view + 1], views.width, views.height,
            sh_degree=sh_degree, backgrounds=views.backgrounds[None],
        )
        flat = image.reshape(-1)
        for k in range(flat.shape[0]):
            grads = torch.autograd.grad(flat[k], (means, log_scales), retain_graph=True, allow_unused=True,
                                        materialize_grads=True)
            row = torch.cat(grads, dim=-1).double()
            fisher += row[:, :, None] * row[:, None, :]
    return fisher


def compare_with_brute_force(results: Results, device: str, quick: bool) -> None:
    from nerfstudio_pruning.render import rasterization
    from nerfstudio_pruning.render.pairs import find_pairs
    from nerfstudio_pruning.scoring.fisher import fisher_blocks
    from nerfstudio_pruning.scoring.importance import leave_one_out_importance
    from nerfstudio_pruning.scoring.pair_stats import project_gaussians

    n, n_views, width, height, sh = (20, 1, 16, 12, 1) if quick else (40, 2, 24, 20, 1)
    g, views = orbit_scene(n, n_views, width, height, device, seed=1, sh_degree=sh, opacity_boost=1.5)
    tag = f"{n} Gaussians, {n_views} views {width}x{height} on {device}"
    fisher = fisher_blocks(g.as_gaussians(sh), views, progress=False)
    reference = autograd_fisher(g, views, sh)
    error = per_row_relative_error(fisher, reference)
    results.check(f"Fisher blocks vs autograd Jacobian [{tag}]", error <= MAX_BRUTE_FORCE_FISHER_ERROR,
                  max_per_gaussian_relative_error=error)

    target, _ = orbit_scene(n, n_views, width, height, device, seed=6, sh_degree=sh)
    kwargs = dict(viewmats=views.viewmats, Ks=views.Ks, width=width, height=height, sh_degree=sh,
                  backgrounds=views.backgrounds[None].expand(n_views, -1))
    gt, _, _ = rasterization(**target.render_args(), **kwargs)
    importance = leave_one_out_importance(g.as_gaussians(sh), views, gt_images=gt, loss="l1", progress=False)
    with torch.no_grad():
        args = g.render_args()
        full, _, _ = rasterization(**args, **kwargs)
        full_pairs = find_pairs(project_gaussians(g.as_gaussians(sh), views), n_views, width, height)
        full_set = set(zip(full_pairs.pixel.tolist(), full_pairs.row.tolist()))
        exact, unaffected = [], []
        for i in range(n):
            opacities = args["opacities"].clone()
            opacities[i] = 0.0
            image, _, _ = rasterization(**{**args, "opacities": opacities}, **kwargs)
            # Per pixel in float64 from the float32 images: the loss change is a small difference of large sums.
            before, after = (full.double() - gt.double()).abs(), (image.double() - gt.double()).abs()
            exact.append(float((after - before).sum()))
            logits = g.opacity_logits.clone()
            logits[i] = -float("inf")
            removed = type(g)(g.means, g.quats, g.log_scales, logits, g.sh)
            pairs = find_pairs(project_gaussians(removed.as_gaussians(sh), views), n_views, width, height)
            others = {pair for pair in full_set if pair[1] % n != i}
            unaffected.append(set(zip(pairs.pixel.tolist(), pairs.row.tolist())) == others)
    exact = torch.tensor(exact, dtype=torch.float64)
    unaffected = torch.tensor(unaffected)
    large = exact.abs() > 1e-3 * exact.abs().max()
    ours = importance.cpu()
    relative = (ours - exact).abs() / exact.abs().clamp_min(1e-300)
    checked = unaffected & large
    worst = float(relative[checked].max()) if checked.any() else float("nan")
    rank = spearman(ours, exact)
    results.check(f"leave-one-out vs re-rendering without each Gaussian [{tag}]",
                  checked.any() and worst <= MAX_BRUTE_FORCE_LOO_ERROR and rank >= 0.99,
                  max_relative_error_where_exact=worst, gaussians_checked=int(checked.sum()),
                  gaussians_reviving_pairs=int((~unaffected).sum()), spearman_all=rank)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    results = Results("scores", args.device, args.out)
    results.guarded("scores vs float64 CPU", lambda: compare_with_float64_cpu(results, args.device, args.quick))
    results.guarded("scores vs brute force", lambda: compare_with_brute_force(results, args.device, args.quick))
    if args.device == "cpu":
        from nerfstudio_pruning.scoring.pair_stats import statistics_dtype

        # What CUDA computes in float32 statistics, on the CPU (the device is the only difference left).
        with statistics_dtype(torch.float32):
            results.guarded("float32 statistics on CPU vs float64",
                            lambda: compare_with_float64_cpu(results, "cpu", args.quick, ", float32 statistics"))
    results.write()
    raise SystemExit(1 if results.failed else 0)


if __name__ == "__main__":
    main()
