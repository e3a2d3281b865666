"""The compiled projection and SH colours (numba) against `projection.project` (gsplat's torch implementation).

Tolerances, and why:
- float64 inputs run the kernels in float64: every output and every gradient within 1e-12 relative to the
  largest value of its tensor. Both sides compute the same formulas in float64 and differ only in the order of
  a few sums; a wrong derivative (a missing term, a clamp passing gradient) is off by 1e-2 or more.
- float32 (what training uses): outputs within 1e-5 relative and gradients within 1e-5 relative to their
  tensor's largest value. The kernels compute in float64 and round once; torch rounds every float32 op.
- radii: exact (a flip would need a 3-sigma radius within float32 rounding of an integer; none here).
The scenes put Gaussians behind the camera and beyond the near plane (culled), beyond the image edge where the
Jacobian's tangent is clamped yet the footprint reaches the image, with colours below zero after SH (clamped),
and with quaternions far from unit norm; the tests assert each case occurs.
"""

from __future__ import annotations

import math

import pytest
import torch

from nerfstudio_pruning.render.compiled import compiled_project, compiled_rasterization
from nerfstudio_pruning.render.projection import project
from nerfstudio_pruning.render.reference import torch_rasterization
from nerfstudio_pruning.testing.synthetic import orbit_cameras, random_gaussians

W, H = 40, 30
OUTPUTS = ("means2d", "conics", "opacities", "depths", "colors")


def _scene(dtype, n=240, views=3, seed=0, sh_degree=3):
    g = random_gaussians(n, sh_degree=sh_degree, extent=1.0, scale=0.15, seed=seed)
    viewmats, Ks = orbit_cameras(views, W, H, radius=2.5)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        g.quats.mul_(0.2 + 3.0 * torch.rand(n, 1, generator=gen))  # far from unit norm
        c2w = torch.linalg.inv(viewmats[0])
        cam_pos, right, forward = c2w[:3, 3], c2w[:3, 0], c2w[:3, 2]  # OpenCV: the camera looks along +z
        # Large Gaussians just beyond the left/right edge of camera 0: tangent clamped, footprint on screen.
        for k, side in enumerate((-1.0, 1.0, -1.0, 1.0)):
            depth = 1.2 + 0.3 * k
            g.means[k] = cam_pos + depth * (forward + side * 0.9 * right)
            g.log_scales[k] = math.log(0.4)
        # Behind camera 0 and inside its near plane.
        g.means[4] = cam_pos - 0.5 * forward
        g.means[5] = cam_pos + 0.005 * forward
        g.sh[6:20, 0] = -3.0  # DC far below zero: the colour is clamped at 0
    leaves = {k: v.detach().to(dtype).requires_grad_() for k, v in g.render_args().items()
              if torch.is_tensor(v) and v.is_floating_point()}
    return leaves, viewmats.to(dtype), Ks.to(dtype)


def _project_and_grads(fn, leaves, viewmats, Ks, sh_degree, mode):
    args = dict(leaves)
    if sh_degree is None:
        args["colors"] = args["colors"][:, 0, :]  # plain per-Gaussian colours, no SH
    proj, unpacked = fn(**args, viewmats=viewmats, Ks=Ks, width=W, height=H, sh_degree=sh_degree,
                        rasterize_mode=mode)
    visible = proj.radii > 0
    gen = torch.Generator().manual_seed(3)
    loss = 0.0
    for name in OUTPUTS:
        t = getattr(proj, name)
        loss = loss + (t[visible] * torch.randn(t[visible].shape, generator=gen, dtype=t.dtype)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    grads = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads)}
    return proj, unpacked, grads


def _relative(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _clamped_tangent_rows(viewmats, Ks, means, radii):
    """Visible (camera, Gaussian) rows whose x or y tangent lies outside gsplat's clamp limits."""
    p = torch.einsum("cij,nj->cni", viewmats[:, :3, :3], means) + viewmats[:, None, :3, 3]
    fx, fy, cx, cy = Ks[:, 0, 0, None], Ks[:, 1, 1, None], Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    ux, uy = p[..., 0] / p[..., 2], p[..., 1] / p[..., 2]
    out_x = (ux > (W - cx) / fx + 0.15 * W / fx) | (ux < -(cx / fx + 0.15 * W / fx))
    out_y = (uy > (H - cy) / fy + 0.15 * H / fy) | (uy < -(cy / fy + 0.15 * H / fy))
    return int(((out_x | out_y) & (radii > 0)).sum())


@pytest.mark.parametrize("mode", ["classic", "antialiased"])
@pytest.mark.parametrize("sh_degree", [None, 0, 1, 2, 3])
def test_float64_matches_autograd_of_the_torch_projection(sh_degree, mode):
    leaves, viewmats, Ks = _scene(torch.float64)
    ref, ref_unpacked, ref_grads = _project_and_grads(project, leaves, viewmats, Ks, sh_degree, mode)
    out, unpacked, grads = _project_and_grads(compiled_project, leaves, viewmats, Ks, sh_degree, mode)
    assert torch.equal(out.radii, ref.radii)
    radii = ref_unpacked["radii"]
    assert (radii == 0).any() and (radii > 0).sum() > 300
    assert (radii[0, 4] == 0) and (radii[0, 5] == 0)  # behind the camera, inside the near plane
    assert _clamped_tangent_rows(viewmats, Ks, leaves["means"].detach(), radii) >= 2
    visible = ref.radii > 0
    for name in OUTPUTS:
        a, b = getattr(out, name)[visible], getattr(ref, name)[visible]
        assert _relative(a, b) < 1e-12, name
    if sh_degree is not None:
        assert (ref.colors[visible] == 0).any()  # some colours are clamped
    for key in ("camera_ids", "gaussian_ids"):
        assert torch.equal(getattr(out, key), getattr(ref, key))
    for name, g in ref_grads.items():
        assert g.abs().max() > 0, f"{name}: the reference gradient is zero, nothing is tested"
        assert _relative(grads[name], g) < 1e-12, f"{name}: {_relative(grads[name], g):.2e}"


@pytest.mark.parametrize("mode", ["classic", "antialiased"])
def test_float32_within_rounding_of_the_torch_projection(mode):
    leaves, viewmats, Ks = _scene(torch.float32, seed=5)
    ref, _, ref_grads = _project_and_grads(project, leaves, viewmats, Ks, 3, mode)
    out, _, grads = _project_and_grads(compiled_project, leaves, viewmats, Ks, 3, mode)
    assert torch.equal(out.radii, ref.radii)
    visible = ref.radii > 0
    for name in OUTPUTS:
        assert _relative(getattr(out, name)[visible], getattr(ref, name)[visible]) < 1e-5, name
    for name, g in ref_grads.items():
        assert _relative(grads[name], g) < 1e-5, name


def test_unsupported_inputs_fall_back_to_the_torch_projection():
    leaves, viewmats, Ks = _scene(torch.float32, n=40)
    args = {k: v.detach() for k, v in leaves.items()}
    kw = dict(width=W, height=H, sh_degree=3)
    # Camera gradients (pose optimisation) are not in the kernels: the torch projection must run.
    cams = viewmats.clone().requires_grad_()
    proj, unpacked = compiled_project(**args, viewmats=cams, Ks=Ks, **kw)
    ref, _ = project(**args, viewmats=cams, Ks=Ks, **kw)
    assert "ProjectGaussians" not in type(unpacked["means2d"].grad_fn).__name__
    torch.testing.assert_close(proj.means2d, ref.means2d, rtol=0, atol=0)
    # Explicit covariances, likewise.
    covars = torch.eye(3).expand(args["means"].shape[0], 3, 3) * 0.01
    proj, unpacked = compiled_project(**{**args, "quats": None, "scales": None}, covars=covars, viewmats=viewmats,
                                      Ks=Ks, **kw)
    ref, _ = project(**{**args, "quats": None, "scales": None}, covars=covars, viewmats=viewmats, Ks=Ks, **kw)
    torch.testing.assert_close(proj.conics, ref.conics, rtol=0, atol=0)
    # The supported case runs the kernels.
    _, unpacked = compiled_project(**leaves, viewmats=viewmats, Ks=Ks, **kw)
    assert "ProjectGaussians" in type(unpacked["means2d"].grad_fn).__name__


def test_compiled_rasterization_end_to_end_matches_the_reference():
    """Projection and compositing both compiled, against the torch reference: images and every gradient."""
    leaves, viewmats, Ks = _scene(torch.float32, n=120, seed=7)
    outs = []
    for fn in (compiled_rasterization, torch_rasterization):
        img, alpha, meta = fn(**leaves, viewmats=viewmats, Ks=Ks, width=W, height=H, sh_degree=3, tile_size=8,
                              rasterize_mode="antialiased", render_mode="RGB+ED")
        weights = torch.randn(img.shape, generator=torch.Generator().manual_seed(11))
        loss = (img * weights).sum() + 0.3 * alpha.sum()
        grads = torch.autograd.grad(loss, list(leaves.values()))
        outs.append((img.detach(), alpha.detach(), meta, grads))
    (img, alpha, meta, grads), (ref_img, ref_alpha, ref_meta, ref_grads) = outs
    assert torch.equal(meta["radii"], ref_meta["radii"])
    assert abs(meta["n_pairs"] - ref_meta["n_pairs"]) <= ref_meta["n_pairs"] * 1e-4
    torch.testing.assert_close(img, ref_img, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(alpha, ref_alpha, rtol=1e-5, atol=1e-6)
    for name, a, b in zip(leaves, grads, ref_grads):
        assert _relative(a, b) < 2e-4, f"{name}: {_relative(a, b):.2e}"


def test_non_finite_gaussians_are_culled_like_the_torch_projection():
    leaves, viewmats, Ks = _scene(torch.float32, n=30)
    args = {k: v.detach().clone() for k, v in leaves.items()}
    args["means"][1] = float("nan")
    args["log_scales" if "log_scales" in args else "scales"][2] = float("inf")
    args["quats"][3] = float("nan")
    proj, _ = compiled_project(**args, viewmats=viewmats, Ks=Ks, width=W, height=H, sh_degree=3)
    ref, _ = project(**args, viewmats=viewmats, Ks=Ks, width=W, height=H, sh_degree=3)
    radii = proj.radii.view(-1, 30)
    assert (radii[:, 1:4] == 0).all()
    assert torch.equal(proj.radii > 0, ref.radii > 0)


def test_a_gaussian_at_depth_zero_leaves_its_neighbours_exact():
    """A mean exactly in a camera's plane divides by a zero depth. numba's default error model raises there, and an
    exception inside a parallel loop under the workqueue layer aborts the rest of that chunk of Gaussians without
    telling the caller (numba issue #6976): their outputs and gradients were left as uninitialised memory, which
    over a long training run turned into NaN parameters (docs/compiled_rasterizer.md). The kernels now compile with
    error_model="numpy": the zero depth gives inf, the Gaussian is culled, the others are computed."""
    torch.manual_seed(0)
    n = 300  # more than one chunk of 256 Gaussians, the zero-depth one first in its chunk
    means = torch.randn(n, 3) * 0.3 + torch.tensor([0.0, 0.0, 3.0])
    means[0] = torch.tensor([0.5, 0.2, 0.0])
    quats, scales, opacities = torch.randn(n, 4), torch.rand(n, 3) * 0.05 + 0.01, torch.rand(n)
    sh = torch.randn(n, 16, 3) * 0.2
    viewmats = torch.eye(4)[None]
    Ks = torch.tensor([[[100.0, 0.0, 64.0], [0.0, 100.0, 48.0], [0.0, 0.0, 1.0]]])
    outputs = {}
    for name, projector in (("compiled", compiled_project), ("torch", project)):
        leaves = [t.clone().requires_grad_() for t in (means, quats, scales, opacities, sh)]
        proj, _ = projector(*leaves, viewmats, Ks, 128, 96, sh_degree=3)
        visible = proj.radii > 0
        loss = (proj.means2d[visible].sum() + proj.conics[visible].sum() + proj.colors[visible].sum()
                + proj.opacities[visible].sum())
        loss.backward()
        outputs[name] = (proj, [leaf.grad for leaf in leaves])
    (proj, grads), (ref, ref_grads) = outputs["compiled"], outputs["torch"]
    assert proj.radii[0] == 0 and torch.equal(proj.radii, ref.radii) and int((ref.radii > 0).sum()) > 250
    visible = ref.radii > 0
    for got, want in ((proj.means2d, ref.means2d), (proj.conics, ref.conics), (proj.colors, ref.colors)):
        torch.testing.assert_close(got[visible], want[visible], rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got[1:], want[1:], rtol=1e-4, atol=1e-4)
