"""PUP 3D-GS sensitivity: per-Gaussian Fisher blocks over (mean, log-scale) and their log-determinants.

The same blocks can also be taken over opacity and base colour (`SPATIAL_AND_APPEARANCE`, 10x10): an option beside
the paper's score, for flat regions, where moving or resizing a Gaussian changes almost nothing (its neighbours
have its colour) but removing it leaves a hole (docs/pup_gs.md).

F_i = sum over views, pixels p and channels c of g g^T with g = d I_pc / d theta_i, theta_i = (mean_i,
log-scale_i). In one view the image depends on Gaussian i only through its projected quantities
u_i = (mean2d 2, conic 3, colour D, effective opacity 1), so g = A_i^T d I_pc / d u_i with A_i = du_i/dtheta_i
and F_i(view) = A_i^T M_i A_i, M_i = sum_{p,c} (dI_pc/du_i)(dI_pc/du_i)^T. M_i comes from the per-pair
gradients of `pair_stats.py`, A_i from forward-mode autodiff through gsplat's torch projection and SH
evaluation: u_i depends on theta_i only, so a JVP whose tangent is the same unit vector for every Gaussian
returns that column of every A_i at once (6 JVPs per view). Where the compiled CPU kernels run, M, A and the
blocks come from compiled passes instead (docs/fisher.md, "Compiled passes").

Memory beyond `pair_stats` (measured as in its docstring): the M terms take 40 float64 per pair (~320 bytes)
on top of the statistics, ~0.75 KB per pair of a chunk in all (+1.1 GB for 1.5 M pairs in one chunk). Per
Gaussian: the [N, 6, 6] float64 result (288 bytes) and the [N, 40] float64 M accumulator (320 bytes), plus the
per-view projection (~300 bytes); the float64 forward-mode Jacobians are taken in slices of `gaussian_chunk`
Gaussians (~4 KB each at SH degree 3, ~0.25 GB per slice). Pair enumeration is bounded separately (its
formula is in `render/pairs.py`); the 1.3 GB of candidate buffers once measured for one 32 x 32 view of 1 M
Gaussians came from the unbatched enumeration it replaced.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from nerfstudio_pruning.errors import PruningRefused
from nerfstudio_pruning.render.backend import Backend, backend_for, scores_fused
from nerfstudio_pruning.render.constants import TILE_SIZE
from nerfstudio_pruning.render.dispatch import enumerate_pairs, rasterization
from nerfstudio_pruning.render.projection import ProjectedGaussians
from nerfstudio_pruning.scoring.accumulate import sum_over_views
from nerfstudio_pruning.scoring.fused import fused_view_statistic
from nerfstudio_pruning.scoring.pair_stats import (
    DEFAULT_CHUNK_PAIRS,
    PairStatistics,
    project_gaussians,
    sum_over_pairs,
)
from nerfstudio_pruning.types import Gaussians, Views

N_PARAMS = 6  # mean (3), log-scale (3)
# What a block is taken over, in this order. PUP 3D-GS's paper and code: mean and log-scale.
SPATIAL = ("means", "log_scales")
# Also the opacity logit and the DC SH coefficients (the base colour): 7 + D parameters.
SPATIAL_AND_APPEARANCE = ("means", "log_scales", "opacity_logits", "sh_dc")
# Gaussians whose projection Jacobian is taken at once: ~0.25 GB of float64 forward-mode temporaries.
DEFAULT_GAUSSIAN_CHUNK = 1 << 16


def _alpha_slots(channels: int) -> list[int]:
    """Positions in u of what alpha depends on: mean2d x, y, conic a, b, c, and the opacity after D colours."""
    return [0, 1, 2, 3, 4, 5 + channels]


def projected_quantities(proj: ProjectedGaussians) -> Tensor:
    """[rows, 6 + D] u = (mean2d, conic, colour, effective opacity), the order used for M and A."""
    return torch.cat([proj.means2d, proj.conics, proj.colors, proj.opacities[:, None]], dim=-1)


def _parameters(gaussians: Gaussians, params: Sequence[str]) -> List[Tensor]:
    """The tensors `params` name, each [N, width] (`sh_dc`: the degree-0 SH coefficients)."""
    tensors = {"sh_dc": gaussians.sh[:, 0], "opacity_logits": gaussians.opacity_logits[:, None]}
    return [tensors[name] if name in tensors else getattr(gaussians, name) for name in params]


def _with_parameters(gaussians: Gaussians, params: Sequence[str], values: Sequence[Tensor]) -> Gaussians:
    fields = dict(zip(params, values))
    if "sh_dc" in fields:
        fields["sh"] = torch.cat([fields.pop("sh_dc")[:, None], gaussians.sh[:, 1:]], dim=1)
    if "opacity_logits" in fields:
        fields["opacity_logits"] = fields["opacity_logits"][:, 0]
    return gaussians.with_tensors(**fields)


def block_size(gaussians: Gaussians, params: Sequence[str] = SPATIAL) -> int:
    return sum(t.shape[-1] for t in _parameters(gaussians, params))


def projection_jacobian(
    gaussians: Gaussians, view: Views, params: Sequence[str] = SPATIAL, radii: Optional[Tensor] = None
) -> Tensor:
    """[N, 6 + D, B] float64 A_i = du_i / d theta_i for one view, theta_i the `params` of Gaussian i (B numbers).

    Includes the view-direction path of the SH colour into the mean and, in antialiased mode, the
    compensation factor in the opacity. Computed in float64 so that A adds no float32 noise to F.

    With `radii` ([N], this view's, from the float32 projection: A is wanted where they are > 0) and a model
    the compiled kernels take, A comes from the compiled projection's backward pass, one product per component
    of u; otherwise from forward-mode autodiff through gsplat's torch projection, one JVP per parameter. Both
    differentiate the same function (tests/test_compiled_fisher.py).
    """
    if radii is not None and backend_for(gaussians.means) == Backend.COMPILED:
        return _compiled_projection_jacobian(gaussians, view, params, radii)
    g64 = gaussians.double()
    view64 = Views(view.viewmats.detach().double(), view.Ks.detach().double(), view.width, view.height)
    primals = tuple(_parameters(g64, params))

    def u_of(*values: Tensor) -> Tensor:
        return projected_quantities(project_gaussians(_with_parameters(g64, params, values), view64))

    columns = []
    for which, primal in enumerate(primals):
        for j in range(primal.shape[-1]):
            tangents = tuple(torch.zeros_like(p) for p in primals)
            tangents[which][:, j] = 1.0
            _, column = torch.func.jvp(u_of, primals, tangents)
            columns.append(column)
    return torch.stack(columns, dim=-1)


def _compiled_projection_jacobian(gaussians: Gaussians, view: Views, params: Sequence[str], radii: Tensor) -> Tensor:
    """`projection_jacobian` from `compiled_projection_jacobian`'s derivatives in the activated parameters."""
    if gaussians.sh.shape[-1] != 3:
        raise ValueError(f"the compiled projection evaluates 3 colour channels, got SH with {gaussians.sh.shape[-1]}")
    from nerfstudio_pruning.scoring.cpu_moments import compiled_projection_jacobian  # loads numba and its kernels

    g64 = gaussians.double()
    d_means, d_scales, d_opacities, d_sh_dc = compiled_projection_jacobian(
        g64.means, g64.quats, g64.scales, g64.opacities, g64.sh, view.viewmats[0], view.Ks[0], view.width,
        view.height, g64.sh_degree, radii, g64.rasterize_mode,
    )
    opacities = g64.opacities
    columns = {
        "means": d_means,
        "log_scales": d_scales * g64.scales[:, None, :],  # d/d log s = s d/ds
        "opacity_logits": (d_opacities * (opacities * (1.0 - opacities))[:, None])[..., None],
        "sh_dc": d_sh_dc,
    }
    return torch.cat([columns[name] for name in params], dim=-1)


def gradient_moments(
    gaussians: Gaussians, view: Views, tile_size: int = TILE_SIZE, chunk_pairs: Optional[int] = DEFAULT_CHUNK_PAIRS
) -> Tuple[ProjectedGaussians, Optional[Tensor]]:
    """One view's projection and [N, 21 + 6 D + 1] float64 per-Gaussian sums of `_compact_m_contributions` over
    the pairs it composites (None if it composites none).

    On CUDA the fused Triton kernel accumulates them in one walk over gsplat's tile lists (`scoring.fused`). Where
    the compiled kernels run, the view is projected by the compiled projection (as the renderer projects it
    there) and the sums are accumulated in one pass over the renderer's tile lists; elsewhere the pairs are
    enumerated and their statistics summed in chunks (`pair_stats`). The same float64 formulas over the same
    pairs of the same projection agree to float64 rounding; the two projections differ by float32 rounding.
    """
    n = len(gaussians)
    if scores_fused(gaussians.means):
        with torch.no_grad():
            proj = project_gaussians(gaussians.detach(), view)
        rows = fused_view_statistic("moments", proj, view.width, view.height, tile_size, view.background(0))
        return proj, rows if bool((rows[:, -1] > 0).any()) else None
    if backend_for(gaussians.means) == Backend.COMPILED:
        # Imported here so that numba and its kernels load only where the compiled backend runs.
        from nerfstudio_pruning.render.compiled import compiled_project
        from nerfstudio_pruning.scoring.cpu_moments import compiled_gradient_moments

        with torch.no_grad():
            proj = project_gaussians(gaussians.detach(), view, compiled_project)
        rows = compiled_gradient_moments(proj, len(view), view.width, view.height, tile_size, view.backgrounds)
        composited = rows[:, -1] > 0  # the w^2 column: > 0 for every composited pair
        if not bool(composited.any()):
            return proj, None
        if rows.shape[0] == n and torch.equal(proj.gaussian_ids, torch.arange(n, device=rows.device)):
            return proj, rows  # one camera, unpacked: the rows are the Gaussians
        moments = torch.zeros(n, rows.shape[1], dtype=torch.float64, device=rows.device)
        return proj, moments.index_add_(0, proj.gaussian_ids, rows)
    with torch.no_grad():
        proj = project_gaussians(gaussians.detach(), view)
        pairs = enumerate_pairs(proj, len(view), view.width, view.height, tile_size)
    if len(pairs) == 0:
        return proj, None
    return proj, sum_over_pairs(proj, pairs, view, n, _compact_m_contributions, chunk_pairs)


def _compact_width(channels: int) -> int:
    return 21 + 6 * channels + 1


def _compact_m_contributions(stats: PairStatistics) -> Tensor:
    """[P, 21 + 6 D + 1] the distinct entries of each pair's sum_c g_c g_c^T.

    With q = dalpha/du restricted to the alpha slots, beta_c = dI_c/dalpha and w = T alpha, the channel-c
    gradient is g_c = beta_c q + w e_c (e_c the colour slot). Summed over channels: (sum_c beta_c^2) q q^T in
    the alpha block, q (w beta)^T across, and w^2 times the identity on the colour block; 40 numbers instead
    of 81 for D = 3.
    """
    q = torch.cat([stats.dalpha_dmean2d, stats.dalpha_dconic, stats.dalpha_dopacity[:, None]], dim=-1)
    beta = stats.dI_dalpha
    w = stats.dI_dcolor
    iu, ju = torch.triu_indices(6, 6, device=q.device)
    alpha_block = q[:, iu] * q[:, ju] * (beta * beta).sum(-1, keepdim=True)
    cross = (q[:, :, None] * (w[:, None] * beta)[:, None, :]).flatten(1)
    return torch.cat([alpha_block, cross, (w * w)[:, None]], dim=-1)


def _expand_m(compact: Tensor, channels: int) -> Tensor:
    """[n, U, U] symmetric M from `_compact_m_contributions` sums, U = 6 + D."""
    n = compact.shape[0]
    u = 6 + channels
    m = compact.new_zeros(n, u, u)
    slots = torch.tensor(_alpha_slots(channels), device=compact.device)
    iu, ju = torch.triu_indices(6, 6, device=compact.device)
    m[:, slots[iu], slots[ju]] = compact[:, :21]
    m[:, slots[ju], slots[iu]] = compact[:, :21]
    cross = compact[:, 21 : 21 + 6 * channels].reshape(n, 6, channels)
    colour_slots = torch.arange(5, 5 + channels, device=compact.device)
    m[:, slots[:, None], colour_slots[None, :]] = cross
    m[:, colour_slots[None, :], slots[:, None]] = cross
    m[:, colour_slots, colour_slots] = compact[:, -1:].expand(n, channels)
    return m


def fisher_blocks(
    gaussians: Gaussians,
    views: Views,
    downscale: float = 1,
    tile_size: int = TILE_SIZE,
    progress: bool = True,
    chunk_pairs: Optional[int] = DEFAULT_CHUNK_PAIRS,
    gaussian_chunk: int = DEFAULT_GAUSSIAN_CHUNK,
    params: Sequence[str] = SPATIAL,
) -> Tensor:
    """[N, B, B] float64 exact Fisher blocks over `params` (by default mean and log-scale, B = 6, as PUP 3D-GS),
    summed over the views given.

    `downscale` renders at 1/downscale resolution (size and fx, fy, cx, cy divided), as PUP's
    `--fisher_resolution`. Views are processed one at a time.
    """
    n = len(gaussians)
    gaussians = gaussians.detach()
    size = block_size(gaussians, params)

    total = torch.zeros(n, size, size, dtype=torch.float64, device=gaussians.device)
    # The fused path (CUDA, or CPU under the interpreter in tests) takes A and the assembly in batched torch, as
    # CUDA runs them.
    fused = scores_fused(gaussians.means)
    compiled = backend_for(gaussians.means) == Backend.COMPILED and not fused
    if compiled:
        from nerfstudio_pruning.scoring.cpu_moments import compiled_add_fisher_blocks  # loads numba and its kernels

    def add_view_blocks(_: int, view: Views) -> None:
        proj, m_compact = gradient_moments(gaussians, view, tile_size, chunk_pairs)
        if m_compact is None:
            return
        channels = proj.colors.shape[-1]
        radii = proj.radii  # one camera, unpacked: row i is Gaussian i
        # Only the Gaussians this view composites need A; the projection is per Gaussian, so a subset is exact,
        # and taking it in slices bounds the float64 forward-mode temporaries (~4 KB per Gaussian). Their blocks
        # go straight into the total: a per-view [N, B, B] buffer would cost more than the blocks themselves.
        for seen in torch.nonzero(m_compact[:, -1] > 0)[:, 0].split(gaussian_chunk):
            jac = projection_jacobian(gaussians.subset(seen), view, params, None if fused else radii[seen])
            if compiled:
                compiled_add_fisher_blocks(m_compact[seen], jac, seen, total)
                continue
            m_full = _expand_m(m_compact[seen], channels)
            block = jac.transpose(1, 2) @ m_full @ jac
            # Matmul rounding leaves ~1e-16 asymmetry; symmetric blocks keep downstream eigen/SVD code honest.
            total.index_add_(0, seen, 0.5 * (block + block.transpose(1, 2)))

    return sum_over_views(views.downscaled(downscale), add_view_blocks, total, "Fisher blocks", progress)


def fisher_scores(fisher: Tensor) -> Tensor:
    """[N] float64 log det F_i as the sum of the logs of its singular values; -inf where F_i = 0 (unseen).

    Raises PruningRefused (counting them) if any block holds a NaN or inf, rather than letting it through as a score:
    such blocks come from Gaussians with non-finite parameters, i.e. a diverged model.
    """
    finite = torch.isfinite(fisher).flatten(1).all(dim=1)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise PruningRefused(f"{bad} of {fisher.shape[0]} Fisher blocks contain NaN or inf values (Gaussians with "
                         "non-finite parameters: the model has diverged); refusing to score them")
    singular_values = torch.linalg.svdvals(fisher.to(torch.float64))
    return torch.log(singular_values).sum(dim=-1)


def probe_fisher_blocks(
    gaussians: Gaussians,
    views: Views,
    downscale: float = 1,
    tile_size: int = TILE_SIZE,
    n_probes: int = 1,
    generator: Optional[torch.Generator] = None,
    progress: bool = True,
) -> Tensor:
    """[N, 6, 6] float64 unbiased estimate of `fisher_blocks` from stock backward passes.

    Per view and probe, v is a random +-1 per pixel and channel and g = d(v . I)/d(mean, log-scale); since
    E[v v^T] = Id, E[g_i g_i^T] is that view's F_i. The render is shared by a view's probes. Its variance is
    what `analysis/probe_estimator.py` measures.
    """
    if n_probes < 1:
        raise ValueError(f"n_probes must be >= 1, got {n_probes}")
    n = len(gaussians)
    g = gaussians.detach()
    means_leaf = g.means.clone().requires_grad_(True)
    log_scales_leaf = g.log_scales.clone().requires_grad_(True)
    opacities = g.opacities

    def view_probes(_: int, view: Views) -> Optional[Tensor]:
        bg = view.background(0)
        image, _, _ = rasterization(
            means_leaf, g.quats, torch.exp(log_scales_leaf), opacities, g.sh, view.viewmats, view.Ks, view.width,
            view.height, sh_degree=g.sh_degree, tile_size=tile_size,
            backgrounds=None if bg is None else bg.reshape(1, -1).to(g.means.dtype), rasterize_mode=g.rasterize_mode,
        )
        if not image.requires_grad:  # nothing composited in this view
            return None
        blocks = torch.zeros(n, N_PARAMS, N_PARAMS, dtype=torch.float64, device=g.device)
        for probe in range(n_probes):
            # Drawn on the generator's device so that a seeded CPU generator reproduces the same probes anywhere.
            signs = torch.randint(0, 2, image.shape, generator=generator, device=_probe_device(generator, image))
            signs = (2 * signs - 1).to(device=image.device, dtype=image.dtype)
            grad_means, grad_log_scales = torch.autograd.grad(
                (signs * image).sum(), (means_leaf, log_scales_leaf), retain_graph=probe < n_probes - 1,
                allow_unused=True, materialize_grads=True,
            )
            grad = torch.cat([grad_means, grad_log_scales], dim=-1).to(torch.float64)
            blocks += grad[:, :, None] * grad[:, None, :] / n_probes
        return blocks

    total = torch.zeros(n, N_PARAMS, N_PARAMS, dtype=torch.float64, device=g.device)
    return sum_over_views(views.downscaled(downscale), view_probes, total, "Fisher probes", progress)


def _probe_device(generator: Optional[torch.Generator], image: Tensor) -> torch.device:
    return image.device if generator is None else generator.device
