"""(a) Our renderers against gsplat's CUDA `rasterization` on random scenes: images, alphas, gradients of every
input, absgrad and radii.

Compared with gsplat 1.4.0 CUDA (the reference, float32, fast-math):
- `nerfstudio_pruning.render.rasterization` on CUDA tensors: the dispatch must hand over to gsplat itself.
  gsplat's forward is deterministic, its backward is not (atomicAdd onto each Gaussian's gradient, in whatever
  order the tiles' threads arrive: measured on an H200, two runs of gsplat differ by up to 5e-7 relative), so
  the dispatch must give the same images, alphas and radii bit for bit and gradients within 1e-5 of gsplat's,
  and gsplat run twice is held to the same rule (its spread is recorded beside);
- the per-pair engine (`render.reference.torch_rasterization`) on CUDA tensors: the torch projection, the pair
  list from gsplat's tile kernel (`render/pairs.py`, gsplat path) and index_add compositing with autograd;
- the same torch reference on CPU (the path of NSP_CPU_RASTERIZER=torch) and, where numba is installed, the
  compiled CPU kernel (`render.compiled`).

A gradient is compared as ||ours - gsplat|| / ||gsplat|| over the whole tensor. Images and alphas: the largest
difference, and the fraction of entries off by more than 1e-4: float32 and `__expf` rounding can flip a pair at
alpha = 1/255 or at the T <= 1e-4 stop, which moves one pixel by up to that pair's weight. With --device cpu
the CUDA comparisons are skipped and the CPU engines are compared with each other.

    python benchmarks/gpu/check_rasterizer_parity.py [--device cuda|cpu] [--quick] [--out DIR]
"""

from __future__ import annotations

from kit_common import Results, _numba_available, parse_args, relative_error

import torch

PARAMETERS = ("means", "quats", "scales", "opacities", "colors")
# What a parity run must meet (the measured values are recorded whatever they are).
MAX_FRACTION_OFF = 1e-3  # entries of image / alpha off by more than 1e-4
MAX_GRADIENT_ERROR = 1e-3  # relative, per input tensor
MIN_RADII_EQUAL = 0.999
# Same kernel, other order of its atomic additions: far below any other engine's 1e-4 differences.
SAME_KERNEL_GRADIENT_ERROR = 1e-5


def cases(quick: bool):
    if quick:
        return [dict(n=150, views=2, width=32, height=24, sh=1, mode="classic", packed=False, seed=0)]
    return [
        dict(n=300, views=3, width=45, height=33, sh=1, mode="classic", packed=False, seed=0),
        dict(n=3000, views=2, width=128, height=96, sh=3, mode="classic", packed=False, seed=1),
        dict(n=3000, views=2, width=128, height=96, sh=3, mode="antialiased", packed=False, seed=2),
        dict(n=3000, views=2, width=128, height=96, sh=3, mode="classic", packed=True, seed=3),
        dict(n=30000, views=1, width=320, height=240, sh=3, mode="classic", packed=False, seed=4),
    ]


def render_and_backward(rasterize, case, device):
    """Images, alphas, input gradients, absgrad and radii of one render + backward of a fixed random loss."""
    from nerfstudio_pruning.testing.synthetic import orbit_cameras, random_gaussians

    g = random_gaussians(case["n"], sh_degree=case["sh"], extent=0.5, scale=0.08, seed=case["seed"])
    g.opacity_logits = g.opacity_logits + 1.0
    viewmats, Ks = orbit_cameras(case["views"], case["width"], case["height"], radius=2.0)
    inputs = {k: v.to(device).detach().clone().requires_grad_(True) for k, v in g.render_args().items()}
    background = torch.tensor([[0.2, 0.4, 0.6]], device=device).expand(case["views"], -1)
    image, alpha, meta = rasterize(
        **inputs, viewmats=viewmats.to(device), Ks=Ks.to(device), width=case["width"], height=case["height"],
        sh_degree=case["sh"], packed=case["packed"], absgrad=True, rasterize_mode=case["mode"],
        backgrounds=background, tile_size=16,
    )
    weights = torch.Generator().manual_seed(100 + case["seed"])
    image_weights = torch.randn(image.shape, generator=weights).to(device)
    alpha_weights = torch.randn(alpha.shape, generator=weights).to(device)
    means2d = meta["means2d"]
    if means2d.requires_grad:
        means2d.retain_grad()
    ((image * image_weights).sum() + (alpha * alpha_weights).sum()).backward()
    out = {"image": image.detach().cpu(), "alpha": alpha.detach().cpu(),
           "absgrad": getattr(means2d, "absgrad", None), "radii": meta["radii"].detach().cpu()}
    out["absgrad"] = None if out["absgrad"] is None else out["absgrad"].detach().cpu()
    if case["packed"]:  # packed rows differ between renderers only if their visible sets do
        out["gaussian_ids"] = meta["gaussian_ids"].detach().cpu()
        out["camera_ids"] = meta["camera_ids"].detach().cpu()
    for name in PARAMETERS:
        out[f"grad_{name}"] = inputs[name].grad.detach().cpu()
    return out


def compare(results: Results, label: str, ours, reference, same_kernel: bool = False) -> None:
    numbers = {}
    for key in ("image", "alpha"):
        difference = (ours[key] - reference[key]).abs()
        numbers[f"{key}_max_abs"] = float(difference.max())
        numbers[f"{key}_fraction_off_1e-4"] = float((difference > 1e-4).double().mean())
    for name in PARAMETERS:
        numbers[f"grad_{name}_rel"] = relative_error(ours[f"grad_{name}"], reference[f"grad_{name}"])
    if (ours["absgrad"] is not None and reference["absgrad"] is not None
            and ours["absgrad"].shape == reference["absgrad"].shape):
        numbers["absgrad_rel"] = relative_error(ours["absgrad"], reference["absgrad"])
    else:
        numbers["absgrad_rel"] = float("nan")
    same_rows = ours["radii"].shape == reference["radii"].shape
    numbers["radii_equal_fraction"] = float((ours["radii"] == reference["radii"]).double().mean()) if same_rows else 0.0
    if same_kernel:
        passed = all(torch.equal(ours[k], reference[k]) for k in ("image", "alpha", "radii"))
        passed &= all(numbers[f"grad_{n}_rel"] <= SAME_KERNEL_GRADIENT_ERROR for n in PARAMETERS)
        passed &= not numbers["absgrad_rel"] > SAME_KERNEL_GRADIENT_ERROR
    else:
        passed = (numbers["image_fraction_off_1e-4"] <= MAX_FRACTION_OFF
                  and numbers["alpha_fraction_off_1e-4"] <= MAX_FRACTION_OFF
                  and all(numbers[f"grad_{n}_rel"] <= MAX_GRADIENT_ERROR for n in PARAMETERS)
                  and not numbers["absgrad_rel"] > MAX_GRADIENT_ERROR
                  and numbers["radii_equal_fraction"] >= MIN_RADII_EQUAL)
    results.check(label, passed, **numbers)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    results = Results("rasterizer_parity", args.device, args.out)
    from nerfstudio_pruning.render import rasterization as dispatch
    from nerfstudio_pruning.render.reference import torch_rasterization

    cpu_engines = {"torch reference (CPU)": torch_rasterization}
    if _numba_available():
        from nerfstudio_pruning.render.compiled import compiled_rasterization

        cpu_engines["compiled kernel (CPU)"] = compiled_rasterization
    if args.device == "cuda":
        from gsplat.rendering import rasterization as gsplat_rasterization

        reference_engine, reference_device = gsplat_rasterization, "cuda"
        candidates = [("gsplat CUDA run twice", gsplat_rasterization, "cuda", True),
                      ("dispatch on CUDA is gsplat", dispatch, "cuda", True),
                      ("per-pair engine on CUDA vs gsplat", torch_rasterization, "cuda", False)]
        candidates += [(f"{label} vs gsplat CUDA", engine, "cpu", False) for label, engine in cpu_engines.items()]
    else:
        # The same comparisons among the CPU engines: exercises this script where there is no GPU.
        results.skip("comparisons with gsplat CUDA", "--device cpu")
        reference_engine, reference_device = torch_rasterization, "cpu"
        candidates = [("dispatch on CPU vs torch reference", dispatch, "cpu", False)]
        if "compiled kernel (CPU)" in cpu_engines:
            candidates.append(("compiled kernel vs torch reference", cpu_engines["compiled kernel (CPU)"], "cpu", False))

    for case in cases(args.quick):
        tag = ", ".join(f"{k}={v}" for k, v in case.items())

        def one_case(case=case, tag=tag):
            reference = render_and_backward(reference_engine, case, reference_device)
            for label, engine, device, same_kernel in candidates:
                compare(results, f"{label} [{tag}]", render_and_backward(engine, case, device), reference, same_kernel)

        results.guarded(f"parity [{tag}]", one_case)
    results.write()
    raise SystemExit(1 if results.failed else 0)


if __name__ == "__main__":
    main()
