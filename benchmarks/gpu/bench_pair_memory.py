"""The terms of `find_pairs`' peak-memory formula (render/pairs.py docstring), fitted from measurements.

Synthetic views of full-frame layers (`check_pairs_and_layers.layered_projection`) whose pixels, pairs per pixel
(the layers' opacity sets where each pixel stops) and depth are varied one at a time, with the batch size:
    peak ~ a Np + b Q + c P (+ d V, negligible here: a few hundred layers)
a, b, c are fitted by least squares over all runs and printed beside the docstring's figures. Depth (layers)
enters only through the candidates, which the batch bounds: its runs check that it adds nothing.
Memory: torch's CPU allocator events (--device cpu) or CUDA allocator statistics (--device cuda, where both the
torch path and the gsplat path are measured).

    python benchmarks/gpu/bench_pair_memory.py [--device cuda|cpu] [--quick]
"""

from __future__ import annotations

from kit_common import Results, parse_args, timed_peak

import torch

# The formula of render/pairs.py: bytes per pixel, per candidate held, per pair returned, per visible (torch) or
# projected (gsplat) row, per tile intersection.
DOCSTRING_TERMS = {"torch": {"per_pixel": 9, "per_candidate": 100, "per_pair": 40, "per_row": 150, "per_isect": 0},
                   "gsplat": {"per_pixel": 26, "per_candidate": 130, "per_pair": 24, "per_row": 150, "per_isect": 24}}


def layered(width, height, layers, opacity, device):
    from check_pairs_and_layers import layered_projection

    proj = layered_projection(width, height, layers, "cpu")
    proj.opacities[:] = opacity * (1 - 0.02 * torch.rand(layers, generator=torch.Generator().manual_seed(1)))
    return type(proj)(**{k: v.to(device) for k, v in proj.__dict__.items()})


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    results = Results("pair_memory_terms", args.device, args.out)
    from nerfstudio_pruning.render.pairs import EnumerationStats, find_pairs

    side = 64 if args.quick else (128 if args.device == "cpu" else 512)
    batch = 1 << (12 if args.quick else 14)
    runs = [  # (side, layers, opacity, batch): pixels, depth, pairs per pixel and batch varied one at a time
        (side, 32, 0.9, batch), (2 * side, 32, 0.9, batch), (side, 128, 0.9, batch),
        (side, 32, 0.3, batch), (side, 64, 0.1, batch), (side, 32, 0.9, 4 * batch), (side, 32, 0.9, 16 * batch),
    ]
    backends = ["torch", "gsplat"] if args.device == "cuda" else ["torch"]
    for backend in backends:
        rows = []
        # On the gsplat path one call holds at least one (tile, depth batch) cell: up to 256 Gaussians x 256 pixels
        # of a 16x16 tile (render/pairs.py), whatever the budget. Below 256 layers a cell is not full and its size
        # follows the depth: the quick run's small views get 8x the layers so that every run fills its cells.
        depth_factor = 8 if args.quick and backend == "gsplat" else 1
        for width, layers, opacity, batch_size in runs:
            layers *= depth_factor
            proj = layered(width, width, layers, opacity, args.device)
            stats = EnumerationStats()
            limits = {"batch_candidates": batch_size} if backend == "torch" else {"call_budget": batch_size}
            pairs, seconds, peak = timed_peak(
                lambda: find_pairs(proj, 1, width, width, backend=backend, stats=stats, **limits), args.device,
                profile_cpu_memory=True)
            # Q: what one batch really held (a call's candidates on the gsplat path), not the limit asked for.
            row = dict(backend=backend, pixels=width * width, layers=layers, opacity=opacity, batch=batch_size,
                       held_candidates=stats.peak_batch_candidates, pairs=len(pairs),
                       tile_intersections=stats.tile_intersections, peak_bytes=peak, seconds=round(seconds, 3))
            rows.append(row)
            results.measure(**row)
        documented = DOCSTRING_TERMS[backend]
        columns = ("per_pixel", "per_candidate", "per_pair", "per_row", "per_isect")
        design = torch.tensor([[r["pixels"], r["held_candidates"], r["pairs"], r["layers"], r["tile_intersections"]]
                               for r in rows], dtype=torch.float64)
        peaks = torch.tensor([r["peak_bytes"] for r in rows], dtype=torch.float64)
        formula = design @ torch.tensor([documented[c] for c in columns], dtype=torch.float64)
        # Pixels and pairs rise together in these scenes, and rows and tile intersections are few: those terms are
        # held at their documented values (allocations of known size), the candidate and pair terms are fitted.
        held = design[:, [0, 3, 4]] @ torch.tensor([documented[c] for c in ("per_pixel", "per_row", "per_isect")],
                                                    dtype=torch.float64)
        coefficients = torch.linalg.lstsq(design[:, 1:3], (peaks - held)[:, None]).solution[:, 0]
        fitted = held + design[:, 1:3] @ coefficients
        worst = float(((fitted - peaks).abs() / peaks).max())
        terms = {"per_candidate": round(float(coefficients[0]), 1), "per_pair": round(float(coefficients[1]), 1)}
        # The docstring's formula is meant as an upper estimate within ~1.5x of what is measured.
        ratio = float((peaks / formula).max())
        results.check(f"{backend} path: measured peak within 1.5x of the documented formula", ratio <= 1.5,
                      fitted_bytes=terms, documented_bytes=documented, fit_worst_relative_error=worst,
                      max_measured_over_formula=ratio)
        # Depth adds tile-list entries on the gsplat path (one per Gaussian and tile, as in gsplat's own render),
        # and nothing else on either path.
        deep, shallow = rows[2], rows[0]
        isect_bytes = documented["per_isect"]
        deep_rest = deep["peak_bytes"] - isect_bytes * deep["tile_intersections"]
        shallow_rest = shallow["peak_bytes"] - isect_bytes * shallow["tile_intersections"]
        results.check(f"{backend} path: 4x the layers adds nothing but tile-list entries", deep_rest <= 1.2 * shallow_rest,
                      shallow_MB=shallow["peak_bytes"] / 2**20, deep_MB=deep["peak_bytes"] / 2**20,
                      tile_list_MB_deep=isect_bytes * deep["tile_intersections"] / 2**20)
    results.write()
    raise SystemExit(1 if results.failed else 0)


if __name__ == "__main__":
    main()
