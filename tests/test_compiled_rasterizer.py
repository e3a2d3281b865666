"""The compiled (numba) CPU rasterizer against the torch reference and a brute-force per-pixel compositor.

Tolerances, and why:
- Images and alphas against the brute force: 3e-6 absolute. Both composite in float32 the same pairs in the
  same order; the brute force keeps T as a float32 product, the kernel as a float64 product, so they differ by
  float32 rounding of ~40 factors (~40 x 6e-8).
- Against the torch reference: rtol 1e-5 and atol 2e-6 on colours/depths. The reference takes T from float32
  log1p(-alpha) summed in float64 and exponentiated (relative error up to ~n x 6e-8 for n pairs per pixel) and
  sums colours with float32 index_add; expected depth (ED) divides by alpha, which keeps the relative size.
- Gradients (every raw parameter): max |compiled - other| <= GRAD_RTOL x max |other| per tensor. GRAD_RTOL is
  1e-5 where colours and depths are composited as such: the largest difference seen on these scenes is 6e-7
  (float32 sums over pixels that partly cancel). Expected depth (ED) divides by alpha, and the reference's
  alpha = 1 - float32(T) carries a float32 rounding of T (6e-8 absolute, 1.5e-5 relative at alpha ~ 1/255)
  that the division turns into gradient differences of up to 3e-5 here; ED modes get GRAD_RTOL_ED = 2e-4.
  A wrong rule (a missing pair, a clamp passing gradient, an inclusive cut-off) changes gradients by 1e-3 or
  more. The compiled gradients are also checked to be no farther from a float64 reference than the float32
  torch reference is (with a 2x margin).
- Pairs, radii, n_pairs, packed ids: exact. The kernel evaluates sigma and alpha in float32 in the reference's
  order of operations; exp is correctly rounded here and 1-ulp in torch, which could only flip a pair lying
  within 1 ulp of alpha = 1/255 or of T = 1e-4: none does in these scenes (the assertions would say so).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import threading

import numba
import pytest
import torch
from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci, _spherical_harmonics

from nerfstudio_pruning.render import compiled
from nerfstudio_pruning.render.cpu import compositing as compiled_kernels
from nerfstudio_pruning.render.compiled import compiled_compositor, compiled_find_pairs, compiled_rasterization
from nerfstudio_pruning.render.constants import ALPHA_MAX
from nerfstudio_pruning.render.pairs import find_pairs
from nerfstudio_pruning.render.projection import pack, project
from nerfstudio_pruning.render.dispatch import enumerate_pairs, rasterization
from nerfstudio_pruning.render.frontend import rasterize_with
from nerfstudio_pruning.render.reference import torch_rasterization

try:
    from nerfstudio_pruning.testing.synthetic import orbit_cameras, random_gaussians
except ImportError:  # layout before the package restructuring
    from nerfstudio_pruning.synthetic import orbit_cameras, random_gaussians

W, H, TILE = 27, 21, 8  # not multiples of the tile size: edge tiles are partial
LEAF_NAMES = ["means", "quats", "log_scales", "opacity_logits", "sh"]
GRAD_RTOL = 1e-5
GRAD_RTOL_ED = 2e-4


def _leaves(g):
    return [g.means, g.quats, g.log_scales, g.opacity_logits, g.sh]


def _scene(n=60, views=2, seed=0, sh_degree=2, opaque=0, width=W, height=H, extent=0.5):
    """Random Gaussians around the origin and `views` orbit cameras; `opaque` Gaussians get opacity ~1."""
    g = random_gaussians(n, sh_degree=sh_degree, extent=extent, scale=0.12, seed=seed)
    g.opacity_logits = g.opacity_logits + 3.0  # many pixels saturate: the transmittance cut-off is exercised
    viewmats, Ks = orbit_cameras(views, width, height, radius=2.0)
    if opaque:
        # Opacity 0.99988 > 0.999: alpha is clamped where sigma < 9e-4, i.e. within ~0.1 pixel of the centre.
        # The first one sits halfway between camera 0 and the origin, in front of the others and projected
        # onto the principal point, a pixel centre when width and height are odd.
        g.opacity_logits[:opaque] = 9.0
        g.means[0] = 0.5 * torch.linalg.inv(viewmats[0])[:3, 3]
        g.log_scales[0] = math.log(0.03)
    return g, viewmats, Ks


def brute_force(means, quats, scales, opacities, sh, viewmats, Ks, width, height, sh_degree, tile_size,
                backgrounds=None, antialiased=False, stats=None):
    """gsplat's per-pixel loop, one Gaussian at a time front to back, vectorised over the pixels of a camera.

    Written from the CUDA kernels' rules, independently of pairs.py and render/cpu/: tile rectangle
    from the 3-sigma radius, pixel centres at +0.5, alpha = min(0.999, o exp(-sigma)), skip sigma < 0 or
    alpha < 1/255, stop before the Gaussian that brings T to <= 1e-4. T is a float32 product, as in gsplat.
    `stats`, a dict, receives how many pixels were stopped and how many composited pairs had alpha clamped.
    """
    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_preci=False)
    radii, means2d, depths, conics, comp = _fully_fused_projection(
        means, covars, viewmats, Ks, width, height, calc_compensations=antialiased)
    campos = torch.linalg.inv(viewmats)[:, :3, 3]
    n_views = viewmats.shape[0]
    colors = torch.clamp_min(
        _spherical_harmonics(sh_degree, means[None] - campos[:, None], sh[None].expand(n_views, -1, -1, -1)) + 0.5, 0)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    px, py = xs.float() + 0.5, ys.float() + 0.5
    images, alphas = [], []
    for c in range(n_views):
        opac = opacities * comp[c] if comp is not None else opacities
        visible = [i for i in range(means.shape[0]) if radii[c, i] > 0]
        order = sorted(visible, key=lambda i: (float(depths[c, i].detach()), i))
        T = torch.ones(height, width)
        image = torch.zeros(height, width, colors.shape[-1])
        done = torch.zeros(height, width, dtype=torch.bool)
        n_clamped = 0
        for i in order:
            tile_r = radii[c, i].float() / tile_size
            tx, ty = means2d[c, i, 0].detach() / tile_size, means2d[c, i, 1].detach() / tile_size
            in_tile = ((xs // tile_size >= torch.floor(tx - tile_r)) & (xs // tile_size < torch.ceil(tx + tile_r))
                       & (ys // tile_size >= torch.floor(ty - tile_r)) & (ys // tile_size < torch.ceil(ty + tile_r)))
            dx, dy = means2d[c, i, 0] - px, means2d[c, i, 1] - py
            sigma = 0.5 * (conics[c, i, 0] * dx * dx + conics[c, i, 2] * dy * dy) + conics[c, i, 1] * dx * dy
            alpha = torch.clamp_max(opac[i] * torch.exp(-sigma), ALPHA_MAX)
            valid = in_tile & (sigma >= 0) & (alpha >= 1.0 / 255.0) & ~done
            t_next = T * (1 - alpha)
            stop = valid & (t_next <= 1e-4)
            done = done | stop
            use = valid & ~stop
            n_clamped += int((use & (opac[i] * torch.exp(-sigma) > ALPHA_MAX)).sum())
            image = image + torch.where(use, T * alpha, torch.zeros_like(T))[..., None] * colors[c, i]
            T = torch.where(use, t_next, T)
        if backgrounds is not None:
            image = image + T[..., None] * backgrounds[c]
        images.append(image)
        alphas.append((1 - T)[..., None])
        if stats is not None:
            stats["stopped"] = stats.get("stopped", 0) + int(done.sum())
            stats["clamped"] = stats.get("clamped", 0) + n_clamped
    return torch.stack(images), torch.stack(alphas)


def _render_and_grads(fn, g, viewmats, Ks, weights=None, extra_leaves=(), **kwargs):
    """Render, backpropagate sum(image * weights) + sum(alpha * 0.3), return outputs and gradients."""
    for t in _leaves(g) + list(extra_leaves):
        t.grad = None
    img, alpha, meta = fn(**g.render_args(), viewmats=viewmats, Ks=Ks, **kwargs)
    if weights is None:
        weights = torch.randn(img.shape, generator=torch.Generator().manual_seed(7))
    loss = (img * weights).sum() + 0.3 * alpha.sum()
    leaves = _leaves(g) + list(extra_leaves)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(leaf) if gr is None else gr for leaf, gr in zip(leaves, grads)]
    return img.detach(), alpha.detach(), meta, grads


def _assert_grads_close(grads, ref_grads, names, rtol=GRAD_RTOL):
    for name, a, b in zip(names, grads, ref_grads):
        if name not in ("sh", "backgrounds"):  # depth-only modes use neither: both must then be exactly zero
            assert b.abs().max() > 0, f"{name}: the reference gradient is zero, nothing is tested"
        scale = b.abs().max().clamp_min(1e-12)
        err = float((a - b).abs().max() / scale)
        assert err < rtol, f"{name}: max |difference| / max |reference| = {err:.2e}"


@pytest.mark.parametrize("antialiased", [False, True])
def test_matches_brute_force(antialiased):
    g, viewmats, Ks = _scene(opaque=4, extent=0.3)
    g.requires_grad_()
    bg = torch.tensor([[0.2, 0.4, 0.6], [0.9, 0.1, 0.3]])
    stats = {}
    kwargs = dict(width=W, height=H, sh_degree=2, tile_size=TILE, backgrounds=bg)
    mode = "antialiased" if antialiased else "classic"
    img, alpha, meta, grads = _render_and_grads(compiled_rasterization, g, viewmats, Ks, packed=False,
                                                rasterize_mode=mode, **kwargs)

    def brute(**args):
        return brute_force(args["means"], args["quats"], args["scales"], args["opacities"], args["colors"],
                           args["viewmats"], args["Ks"], W, H, 2, TILE, backgrounds=bg, antialiased=antialiased,
                           stats=stats) + ({},)

    ref_img, ref_alpha, _, ref_grads = _render_and_grads(brute, g, viewmats, Ks)
    # The scene must exercise the rules that matter: the T <= 1e-4 stop and (classic mode) the 0.999 clamp.
    assert stats["stopped"] > 20 and (antialiased or stats["clamped"] > 0), stats
    assert (img - ref_img).abs().max() < 3e-6
    assert (alpha - ref_alpha).abs().max() < 3e-6
    _assert_grads_close(grads, ref_grads, LEAF_NAMES)


def compiled_compositing(*args, **kwargs):
    """The compiled compositor behind the torch projection: compositing compared on identical projected rows."""
    return rasterize_with(compiled_compositor, *args, **kwargs)


def _compare_with_reference(g, viewmats, Ks, width, height, tile_size, packed, render_mode, antialiased, bg):
    extra = [bg] if bg is not None else []
    kwargs = dict(width=width, height=height, sh_degree=2, tile_size=tile_size, packed=packed, absgrad=True,
                  render_mode=render_mode, rasterize_mode="antialiased" if antialiased else "classic",
                  backgrounds=bg)
    out = _render_and_grads(compiled_compositing, g, viewmats, Ks, extra_leaves=extra, **kwargs)
    ref = _render_and_grads(torch_rasterization, g, viewmats, Ks, extra_leaves=extra, **kwargs)
    (img, alpha, meta, grads), (ref_img, ref_alpha, ref_meta, ref_grads) = out, ref
    assert img.shape == ref_img.shape and alpha.shape == ref_alpha.shape
    torch.testing.assert_close(img, ref_img, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(alpha, ref_alpha, rtol=1e-5, atol=2e-6)
    assert set(meta) == set(ref_meta)
    for key in ("radii", "camera_ids", "gaussian_ids", "n_pairs", "tile_width", "tile_height", "n_cameras"):
        a, b = meta[key], ref_meta[key]
        assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b), key
    for key in ("means2d", "conics", "opacities", "depths"):
        torch.testing.assert_close(meta[key], ref_meta[key], rtol=0, atol=0)
    names = LEAF_NAMES + (["backgrounds"] if bg is not None else [])
    _assert_grads_close(grads, ref_grads, names, rtol=GRAD_RTOL_ED if render_mode.endswith("ED") else GRAD_RTOL)
    return meta, ref_meta


@pytest.mark.parametrize(
    "packed,render_mode,antialiased,with_bg,tile_size",
    [
        (False, "RGB", False, True, TILE),
        (True, "RGB+ED", True, True, TILE),
        (True, "RGB+D", False, False, 16),
        (False, "ED", True, True, 4),
        (True, "D", False, False, TILE),
    ],
)
def test_matches_reference(packed, render_mode, antialiased, with_bg, tile_size):
    g, viewmats, Ks = _scene(n=60, views=3, seed=1, opaque=5)
    g.requires_grad_()
    bg = torch.tensor([[0.2, 0.4, 0.6], [0.9, 0.1, 0.3], [0.5, 0.5, 0.0]], requires_grad=True) if with_bg else None
    _compare_with_reference(g, viewmats, Ks, W, H, tile_size, packed, render_mode, antialiased, bg)


def test_absgrad_matches_reference():
    g, viewmats, Ks = _scene(n=50, views=2, seed=2, opaque=3)
    g.requires_grad_()
    out = {}
    for name, fn in (("compiled", compiled_rasterization), ("torch", torch_rasterization)):
        for packed in (False, True):
            img, _, meta = fn(**g.render_args(), viewmats=viewmats, Ks=Ks, width=W, height=H, sh_degree=2,
                              tile_size=TILE, packed=packed, absgrad=True)
            meta["means2d"].retain_grad()
            (img * torch.randn(img.shape, generator=torch.Generator().manual_seed(3))).sum().backward()
            out[name, packed] = (meta["means2d"].absgrad, meta["means2d"].grad)
    for packed in (False, True):
        absgrad, grad = out["compiled", packed]
        ref_absgrad, _ = out["torch", packed]
        assert absgrad.shape == ref_absgrad.shape
        torch.testing.assert_close(absgrad, ref_absgrad, rtol=1e-4, atol=1e-7)
        assert (absgrad >= grad.abs() * (1 - 1e-5) - 1e-7).all()  # |sum| <= sum of | |
    # Packed rows are the visible rows of the unpacked [C, N, 2] layout, in the same order.
    unpacked = out["compiled", False][0].reshape(-1, 2)
    radii = project(**g.render_args(), viewmats=viewmats, Ks=Ks, width=W, height=H, sh_degree=2)[0].radii
    torch.testing.assert_close(out["compiled", True][0], unpacked[radii > 0], rtol=1e-6, atol=0)


def _float64_grads(g, viewmats, Ks, **kwargs):
    g64 = type(g)(**{k: v.detach().double().requires_grad_() for k, v in g.__dict__.items()})
    img, alpha, meta, grads = _render_and_grads(torch_rasterization, g64, viewmats.double(), Ks.double(), **kwargs)
    return img, alpha, grads


def test_scene_after_optimisation_steps():
    """A few Adam steps through the compiled path, then compiled vs reference (and vs float64) at that state."""
    target_g, viewmats, Ks = _scene(n=50, views=2, seed=4)
    with torch.no_grad():
        target, _, _ = compiled_rasterization(**target_g.render_args(), viewmats=viewmats, Ks=Ks, width=W, height=H,
                                              sh_degree=2, tile_size=TILE)
    g, _, _ = _scene(n=50, views=2, seed=5, opaque=3)
    g.requires_grad_()
    opt = torch.optim.Adam(_leaves(g), lr=0.03)
    losses = []
    for _ in range(8):
        img, _, _ = compiled_rasterization(**g.render_args(), viewmats=viewmats, Ks=Ks, width=W, height=H,
                                           sh_degree=2, tile_size=TILE)
        loss = (img - target).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0], "the compiled path's gradients did not reduce the loss"
    kwargs = dict(width=W, height=H, sh_degree=2, tile_size=TILE, packed=False)
    weights = torch.randn(2, H, W, 3, generator=torch.Generator().manual_seed(8))
    img, alpha, _, grads = _render_and_grads(compiled_rasterization, g, viewmats, Ks, weights=weights, **kwargs)
    ref_img, ref_alpha, _, ref_grads = _render_and_grads(torch_rasterization, g, viewmats, Ks, weights=weights,
                                                         **kwargs)
    torch.testing.assert_close(img, ref_img, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(alpha, ref_alpha, rtol=1e-5, atol=2e-6)
    _assert_grads_close(grads, ref_grads, LEAF_NAMES)
    # Against float64 (the reference run in double): compiled is about as close as the float32 reference.
    _, _, grads64 = _float64_grads(g, viewmats, Ks, weights=weights.double(), **kwargs)
    for name, a, b, t in zip(LEAF_NAMES, grads, ref_grads, grads64):
        err_compiled = float((a.double() - t).abs().max())
        err_reference = float((b.double() - t).abs().max())
        assert err_compiled <= 2 * err_reference + 1e-6 * float(t.abs().max()), (name, err_compiled, err_reference)


def _projected(g, viewmats, Ks, width, height, packed):
    with torch.no_grad():
        proj, _ = project(**g.render_args(), viewmats=viewmats, Ks=Ks, width=width, height=height, sh_degree=2)
    return pack(proj) if packed else proj


@pytest.mark.parametrize("packed,tile_size,views,seed", [(False, 8, 2, 0), (True, 16, 3, 1), (True, 5, 1, 2)])
def test_find_pairs_equal(packed, tile_size, views, seed):
    g, viewmats, Ks = _scene(n=80, views=views, seed=seed, opaque=4, width=45, height=33)
    proj = _projected(g, viewmats, Ks, 45, 33, packed)
    expected = find_pairs(proj, views, 45, 33, tile_size)
    got = compiled_find_pairs(proj, views, 45, 33, tile_size)
    assert len(expected) > 1000
    assert torch.equal(got.pixel, expected.pixel)
    assert torch.equal(got.row, expected.row)
    assert got.pixel.dtype == got.row.dtype == torch.int64


def test_cpu_dispatch_uses_compiled_backend(monkeypatch):
    """rasterization() and enumerate_pairs() run the compiled kernels by default on CPU, the reference on request."""
    calls = []
    real_raster, real_pairs = compiled.compiled_rasterization, compiled.compiled_find_pairs
    monkeypatch.setattr(compiled, "compiled_rasterization",
                        lambda *a, **k: calls.append("raster") or real_raster(*a, **k))
    monkeypatch.setattr(compiled, "compiled_find_pairs", lambda *a, **k: calls.append("pairs") or real_pairs(*a, **k))
    g, viewmats, Ks = _scene(n=20, views=1)
    monkeypatch.delenv("NSP_CPU_RASTERIZER", raising=False)
    img, _, _ = rasterization(**g.render_args(), viewmats=viewmats, Ks=Ks, width=W, height=H, sh_degree=2)
    proj = _projected(g, viewmats, Ks, W, H, packed=True)
    enumerate_pairs(proj, 1, W, H)
    assert calls == ["raster", "pairs"]
    monkeypatch.setenv("NSP_CPU_RASTERIZER", "torch")
    ref_img, _, _ = rasterization(**g.render_args(), viewmats=viewmats, Ks=Ks, width=W, height=H, sh_degree=2)
    enumerate_pairs(proj, 1, W, H)
    assert calls == ["raster", "pairs"]
    torch.testing.assert_close(img, ref_img, rtol=1e-5, atol=2e-6)


def test_empty_view_renders_background_and_backpropagates():
    g, viewmats, Ks = _scene(n=10, views=1)
    g.requires_grad_()
    behind = torch.eye(4)[None]
    behind[0, 2, 3] = -10.0  # every Gaussian behind the camera
    bg = torch.tensor([[0.3, 0.5, 0.7]], requires_grad=True)
    img, alpha, meta = compiled_rasterization(**g.render_args(), viewmats=behind, Ks=Ks, width=W, height=H,
                                              sh_degree=2, backgrounds=bg)
    assert meta["n_pairs"] == 0
    assert torch.equal(img, torch.tensor([0.3, 0.5, 0.7]).expand_as(img)) and alpha.abs().max() == 0
    img.sum().backward()
    assert torch.allclose(bg.grad, torch.full((1, 3), float(W * H)))
    assert g.means.grad is None or g.means.grad.abs().max() == 0


def _raises_one_sentence(match, fn, *args, **kwargs):
    with pytest.raises(ValueError, match=match) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert message.endswith(".") and ". " not in message and "\n" not in message, message


def test_bad_input_raises_one_sentence_value_error(monkeypatch):
    g, viewmats, Ks = _scene(n=20, views=1)
    args = g.render_args()
    common = dict(viewmats=viewmats, Ks=Ks, sh_degree=2)
    _raises_one_sentence("zero-size image", compiled_rasterization, **args, **common, width=0, height=H)
    _raises_one_sentence("tile_size", compiled_rasterization, **args, **common, width=W, height=H, tile_size=0)
    bad = dict(args, opacities=args["opacities"].clone())
    bad["opacities"][3] = float("nan")  # projection keeps the row (its radius is finite): the kernel must refuse it
    _raises_one_sentence(r"non-finite means2d, conics, opacities or depths \(first: row 3", compiled_rasterization,
                         **bad, **common, width=W, height=H, packed=False)
    proj = _projected(g, viewmats, Ks, W, H, packed=True)
    proj.conics[0, 1] = float("inf")
    _raises_one_sentence("non-finite", compiled_find_pairs, proj, 1, W, H)
    # The 2^31 limits, lowered so that a small view crosses them.
    proj = _projected(g, viewmats, Ks, W, H, packed=True)
    monkeypatch.setattr(compiled, "MAX_PAIRS", 10)
    _raises_one_sentence("more than the 2\\^31 - 1 a pair list may hold", compiled_find_pairs, proj, 1, W, H)
    monkeypatch.setattr(compiled, "MAX_TILE_ENTRIES", 3)
    _raises_one_sentence("entries, more than the 2\\^31 - 1", compiled_rasterization, **args, **common, width=W,
                         height=H)


def test_threads_follow_torch_and_leave_torch_alone():
    g, viewmats, Ks = _scene(n=20, views=1)
    before = torch.get_num_threads()
    try:
        for n in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            torch.set_num_threads(n)
            compiled_rasterization(**g.render_args(), viewmats=viewmats, Ks=Ks, width=W, height=H, sh_degree=2)
            assert numba.get_num_threads() == n
            assert torch.get_num_threads() == n, "a numba launch changed torch's thread count"
    finally:
        torch.set_num_threads(before)


def test_first_launch_of_a_process_shares_torchs_pool_and_leaves_its_thread_count():
    """numba's OpenMP layer is the libgomp torch loaded; its first parallel launch creates the pool at numba's own
    size (2 here), which is also torch's thread count: `_launch` must put torch's back (it was 1)."""
    script = textwrap.dedent("""
        import torch
        torch.set_num_threads(1)
        import numba
        from nerfstudio_pruning.render.compiled import compiled_rasterization
        from nerfstudio_pruning.testing.synthetic import orbit_cameras, random_gaussians
        g = random_gaussians(20, sh_degree=1)
        viewmats, Ks = orbit_cameras(1, 16, 16)
        compiled_rasterization(**g.render_args(), viewmats=viewmats, Ks=Ks, width=16, height=16, sh_degree=1)
        print(torch.get_num_threads(), numba.threading_layer())
    """)
    env = dict(os.environ, NUMBA_NUM_THREADS="2")
    env.pop("NUMBA_THREADING_LAYER", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    threads, layer = proc.stdout.split()[-2:]
    assert threads == "1", "numba's first launch changed torch's thread count"
    if sys.platform.startswith("linux"):
        assert layer == "omp", "numba should share torch's OpenMP pool"


def test_concurrent_renders_from_two_threads():
    """A viewer thread may render while training does: launches are serialised, results unchanged."""
    g, viewmats, Ks = _scene(n=30, views=1)
    args = dict(**g.render_args(), viewmats=viewmats, Ks=Ks, width=W, height=H, sh_degree=2)
    expected, _, _ = compiled_rasterization(**args)
    results, errors = [], []

    def work():
        try:
            for _ in range(4):
                results.append(compiled_rasterization(**args)[0])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 8
    assert all(torch.equal(r, expected) for r in results)


def test_the_kernel_cache_command_runs_every_kernel_and_leaves_nothing_to_compile():
    """`python -m nerfstudio_pruning.kernel_cache` (run by scripts/run.sh before the demo and the tests) runs every
    kernel the CPU path launches, and after it a fresh process loads every one of them from numba's on-disk cache
    and compiles none.

    A kernel added without a way in from the warm-up is named in its output, which fails here."""
    from nerfstudio_pruning.kernel_cache import numba_kernels

    env = dict(os.environ)
    env.pop("NUMBA_DISABLE_JIT", None)
    command = [sys.executable, "-m", "nerfstudio_pruning.kernel_cache"]
    outputs = [subprocess.run(command, capture_output=True, text=True, env=env, timeout=600) for _ in range(2)]
    for proc in outputs:
        assert proc.returncode == 0, proc.stderr
        assert "never run" not in proc.stdout, proc.stdout
    kernels = numba_kernels()
    assert {"compositing.rasterize_tiles", "compositing.backward_tiles", "cpu_moments.gradient_moment_tiles"} <= set(
        kernels)
    assert f"0 numba kernels compiled here, {len(kernels)} loaded from the cache" in outputs[1].stdout, outputs[1].stdout


def test_exp_is_correctly_rounded_and_within_one_ulp_of_torch():
    """The kernels' exp(-sigma) equals float32(exp(float64)); torch's float32 exp (the reference's) is within 1 ulp.

    Every 97th float32 in [0, 87] (~11M values; above 87 the kernels clamp, see exp_neg_f32; the benchmark's
    --exp-check runs all of [0, 6] exhaustively).
    """
    import numpy as np
    from numba import njit

    @njit(cache=False)
    def kernel_exp(sigmas, out):
        for i in range(sigmas.size):
            out[i] = compiled_kernels.exp_neg_f32(sigmas[i])

    sigmas = np.arange(0, np.float32(87.0).view(np.int32), 97, dtype=np.int32).view(np.float32)
    got = np.empty_like(sigmas)
    kernel_exp(sigmas, got)
    exact = np.exp(-sigmas.astype(np.float64)).astype(np.float32)
    assert np.array_equal(got, exact)
    torch_exp = torch.exp(-torch.from_numpy(sigmas)).numpy()
    ulps = np.abs(torch_exp.view(np.int32).astype(np.int64) - got.view(np.int32).astype(np.int64))
    assert ulps.max() <= 1 and (ulps == 0).mean() > 0.95
