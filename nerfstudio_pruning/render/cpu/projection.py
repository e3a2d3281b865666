"""Numba kernels of the compiled projection: gsplat 1.4.0's pinhole `fully_fused_projection` and SH colours.

Forward and backward of what `projection.project` computes with gsplat's torch implementation
(`_quat_scale_to_covar_preci`, `_fully_fused_projection`, `_spherical_harmonics`): per Gaussian the 3D covariance
from its (unnormalised) quaternion and scale, then for every camera the camera-space mean and covariance, the
pinhole Jacobian with the clamped tangent of `_persp_proj`, the 2D covariance dilated by eps2d, conic, radius,
antialiasing compensation, and the SH colour seen from the camera centre (visible rows only, 0.5 added, clamped
at 0). The backward pass returns what torch's autograd returns for that composition, including at the clamps
(a clamped tangent passes no gradient to the mean's x/y; a clamped colour passes none to its coefficients).

Work is split by Gaussian (`prange` over chunks of N) with the cameras in an inner loop, so every thread owns its
Gaussians' outputs and gradients: no atomics, and the per-Gaussian rotation and covariance are built once.
Arithmetic is float64 on scalars, so results differ from torch's float32 only by float32 rounding (~1e-7
relative); outputs are written in the arrays' dtype.

Rows whose mean, scale or quaternion is not finite are culled (radius 0), which is where gsplat's torch
projection ends up too (its comparisons fail on NaN); a non-finite opacity is refused by the compositor.

Only rows with radius > 0 get gradients (gsplat's CUDA backward skips the others as well); culled rows never
reach the compositor, so the torch path gives them zero gradient too.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from nerfstudio_pruning.render.cpu.jit import inline, kernel, parallel_kernel

# Real SH basis constants (the ones gsplat's `_eval_sh_bases_fast` uses, after Sloan, JCGT 2013).
SH_C0 = 0.2820947917738781
SH_C1 = 0.48860251190292
SH_C2_Z2 = 0.9461746957575601
SH_C2_CONST = 0.3153915652525201
SH_C2_XZ = 1.092548430592079
SH_C2_XY = 0.5462742152960395
SH_C3_Z3 = 1.865881662950577
SH_C3_Z1 = 1.119528997770346
SH_C3_ZZ = 2.285228997322329
SH_C3_Z0 = 0.4570457994644658
SH_C3_B = 1.445305721320277
SH_C3_A = 0.5900435899266435
# Gaussians per parallel work item: the scratch arrays are allocated once per chunk, not per Gaussian.
GAUSSIANS_PER_CHUNK = 256


@kernel
def _rotation(qw, qx, qy, qz):
    """Rotation matrix (row-major 9-tuple) of the normalised quaternion, and the normalised quaternion."""
    norm = math.sqrt(qw * qw + qx * qx + qy * qy + qz * qz)
    inv = 1.0 / max(norm, 1e-12)  # F.normalize's eps
    w, x, y, z = qw * inv, qx * inv, qy * inv, qz * inv
    r = (
        1.0 - 2.0 * (y * y + z * z), 2.0 * (x * y - w * z), 2.0 * (x * z + w * y),
        2.0 * (x * y + w * z), 1.0 - 2.0 * (x * x + z * z), 2.0 * (y * z - w * x),
        2.0 * (x * z - w * y), 2.0 * (y * z + w * x), 1.0 - 2.0 * (x * x + y * y),
    )
    return r, w, x, y, z, max(norm, 1e-12)


@kernel
def _sh_basis(degree, x, y, z, basis):
    """The real SH basis up to `degree` (<= 3) at unit direction (x, y, z), into basis[:(degree+1)^2]."""
    basis[0] = SH_C0
    if degree < 1:
        return
    basis[1] = -SH_C1 * y
    basis[2] = SH_C1 * z
    basis[3] = -SH_C1 * x
    if degree < 2:
        return
    basis[4] = SH_C2_XY * 2.0 * x * y
    basis[5] = -SH_C2_XZ * z * y
    basis[6] = SH_C2_Z2 * z * z - SH_C2_CONST
    basis[7] = -SH_C2_XZ * z * x
    basis[8] = SH_C2_XY * (x * x - y * y)
    if degree < 3:
        return
    c1 = x * x - y * y
    s1 = 2.0 * x * y
    tc = -SH_C3_ZZ * z * z + SH_C3_Z0
    tb = SH_C3_B * z
    basis[9] = -SH_C3_A * (x * s1 + y * c1)
    basis[10] = tb * s1
    basis[11] = tc * y
    basis[12] = z * (SH_C3_Z3 * z * z - SH_C3_Z1)
    basis[13] = tc * x
    basis[14] = tb * c1
    basis[15] = -SH_C3_A * (x * c1 - y * s1)


@kernel
def _sh_basis_vjp(degree, x, y, z, g):
    """(d/dx, d/dy, d/dz) of sum_k g[k] * basis_k(x, y, z), x, y, z treated as independent (as autograd does)."""
    gx = 0.0
    gy = 0.0
    gz = 0.0
    if degree < 1:
        return gx, gy, gz
    gy += -SH_C1 * g[1]
    gz += SH_C1 * g[2]
    gx += -SH_C1 * g[3]
    if degree < 2:
        return gx, gy, gz
    a2 = 2.0 * SH_C2_XY
    gx += a2 * y * g[4] - SH_C2_XZ * z * g[7] + a2 * x * g[8]
    gy += a2 * x * g[4] - SH_C2_XZ * z * g[5] - a2 * y * g[8]
    gz += -SH_C2_XZ * y * g[5] + 2.0 * SH_C2_Z2 * z * g[6] - SH_C2_XZ * x * g[7]
    if degree < 3:
        return gx, gy, gz
    c1 = x * x - y * y
    s1 = 2.0 * x * y
    tc = -SH_C3_ZZ * z * z + SH_C3_Z0
    dtc_dz = -2.0 * SH_C3_ZZ * z
    tb = SH_C3_B * z
    a3 = SH_C3_A
    # basis 9 = -a3 (3x^2 y - y^3), basis 15 = -a3 (x^3 - 3 x y^2)
    gx += -a3 * 6.0 * x * y * g[9] - a3 * 3.0 * c1 * g[15]
    gy += -a3 * 3.0 * c1 * g[9] + a3 * 6.0 * x * y * g[15]
    # basis 10 = tb * 2xy, basis 14 = tb * (x^2 - y^2)
    gx += tb * 2.0 * y * g[10] + tb * 2.0 * x * g[14]
    gy += tb * 2.0 * x * g[10] - tb * 2.0 * y * g[14]
    gz += SH_C3_B * (s1 * g[10] + c1 * g[14])
    # basis 11 = tc * y, basis 13 = tc * x
    gy += tc * g[11]
    gx += tc * g[13]
    gz += dtc_dz * (y * g[11] + x * g[13])
    # basis 12 = z (c z^2 - d)
    gz += (3.0 * SH_C3_Z3 * z * z - SH_C3_Z1) * g[12]
    return gx, gy, gz


@kernel
def _camera_terms(viewmats, ks, c, m0, m1, m2, s00, s01, s02, s11, s12, s22, width, height):
    """Camera-space mean p, the clamped-tangent pinhole Jacobian J and W Sigma W^T for camera c.

    Returns p (3), the tangents' clamp flags, J's non-zero entries (j00, j02, j11, j12) and the camera-space
    covariance as 6 unique entries.
    """
    w00 = viewmats[c, 0, 0]; w01 = viewmats[c, 0, 1]; w02 = viewmats[c, 0, 2]
    w10 = viewmats[c, 1, 0]; w11 = viewmats[c, 1, 1]; w12 = viewmats[c, 1, 2]
    w20 = viewmats[c, 2, 0]; w21 = viewmats[c, 2, 1]; w22 = viewmats[c, 2, 2]
    px = w00 * m0 + w01 * m1 + w02 * m2 + viewmats[c, 0, 3]
    py = w10 * m0 + w11 * m1 + w12 * m2 + viewmats[c, 1, 3]
    pz = w20 * m0 + w21 * m1 + w22 * m2 + viewmats[c, 2, 3]
    # A = W Sigma
    a00 = w00 * s00 + w01 * s01 + w02 * s02
    a01 = w00 * s01 + w01 * s11 + w02 * s12
    a02 = w00 * s02 + w01 * s12 + w02 * s22
    a10 = w10 * s00 + w11 * s01 + w12 * s02
    a11 = w10 * s01 + w11 * s11 + w12 * s12
    a12 = w10 * s02 + w11 * s12 + w12 * s22
    a20 = w20 * s00 + w21 * s01 + w22 * s02
    a21 = w20 * s01 + w21 * s11 + w22 * s12
    a22 = w20 * s02 + w21 * s12 + w22 * s22
    # Sc = A W^T
    c00 = a00 * w00 + a01 * w01 + a02 * w02
    c01 = a00 * w10 + a01 * w11 + a02 * w12
    c02 = a00 * w20 + a01 * w21 + a02 * w22
    c11 = a10 * w10 + a11 * w11 + a12 * w12
    c12 = a10 * w20 + a11 * w21 + a12 * w22
    c22 = a20 * w20 + a21 * w21 + a22 * w22

    fx = ks[c, 0, 0]
    fy = ks[c, 1, 1]
    cx = ks[c, 0, 2]
    cy = ks[c, 1, 2]
    tan_fovx = 0.5 * width / fx
    tan_fovy = 0.5 * height / fy
    lim_x_pos = (width - cx) / fx + 0.3 * tan_fovx
    lim_x_neg = cx / fx + 0.3 * tan_fovx
    lim_y_pos = (height - cy) / fy + 0.3 * tan_fovy
    lim_y_neg = cy / fy + 0.3 * tan_fovy
    ux = px / pz
    uy = py / pz
    # torch.clamp passes the gradient when the value lies within [min, max], ends included.
    x_clamped = ux < -lim_x_neg or ux > lim_x_pos
    y_clamped = uy < -lim_y_neg or uy > lim_y_pos
    ux = min(max(ux, -lim_x_neg), lim_x_pos)
    uy = min(max(uy, -lim_y_neg), lim_y_pos)
    tx = pz * ux
    ty = pz * uy
    j00 = fx / pz
    j02 = -fx * tx / (pz * pz)
    j11 = fy / pz
    j12 = -fy * ty / (pz * pz)
    return (px, py, pz, ux, uy, tx, ty, x_clamped, y_clamped, j00, j02, j11, j12,
            c00, c01, c02, c11, c12, c22)


@inline
def _dilated_cov2d(j00, j02, j11, j12, c00, c01, c02, c11, c12, c22, eps2d):
    """cov2d = J Sc J^T with J = [[j00, 0, j02], [0, j11, j12]] (b00, b01, b11), its determinant, and the entries
    and determinant after the eps2d dilation (a, d, det before the 1e-10 floor)."""
    b00 = j00 * j00 * c00 + 2.0 * j00 * j02 * c02 + j02 * j02 * c22
    b01 = j00 * j11 * c01 + j00 * j12 * c02 + j02 * j11 * c12 + j02 * j12 * c22
    b11 = j11 * j11 * c11 + 2.0 * j11 * j12 * c12 + j12 * j12 * c22
    det_orig = b00 * b11 - b01 * b01
    a = b00 + eps2d
    d = b11 + eps2d
    return b00, b01, b11, det_orig, a, d, a * d - b01 * b01


@inline
def _scaled_rotation(means, quats, scales, n):
    """Gaussian n's rotation R (and its normalised quaternion), M = R diag(s), Sigma = M M^T (6 unique entries)
    and its mean."""
    r, qw, qx, qy, qz, qnorm = _rotation(quats[n, 0], quats[n, 1], quats[n, 2], quats[n, 3])
    sx = scales[n, 0]
    sy = scales[n, 1]
    sz = scales[n, 2]
    m00 = r[0] * sx; m01 = r[1] * sy; m02 = r[2] * sz
    m10 = r[3] * sx; m11 = r[4] * sy; m12 = r[5] * sz
    m20 = r[6] * sx; m21 = r[7] * sy; m22 = r[8] * sz
    s00 = m00 * m00 + m01 * m01 + m02 * m02
    s01 = m00 * m10 + m01 * m11 + m02 * m12
    s02 = m00 * m20 + m01 * m21 + m02 * m22
    s11 = m10 * m10 + m11 * m11 + m12 * m12
    s12 = m10 * m20 + m11 * m21 + m12 * m22
    s22 = m20 * m20 + m21 * m21 + m22 * m22
    mx = float(means[n, 0])
    my = float(means[n, 1])
    mz = float(means[n, 2])
    return (r, qw, qx, qy, qz, qnorm, sx, sy, sz, m00, m01, m02, m10, m11, m12, m20, m21, m22,
            s00, s01, s02, s11, s12, s22, mx, my, mz)


@parallel_kernel
def project_forward(means, quats, scales, opacities, sh, sh_degree, campos, viewmats, ks, width, height, eps2d,
                    near_plane, far_plane, radius_clip, antialiased, means2d, conics, depths, radii, opac_out,
                    colors, compensations):
    """Fill the [C, N, ...] outputs. `sh` is [N, K, 3] (K = 0 to skip colours), `colors` [C, N, 3]."""
    n_gauss = means.shape[0]
    n_cams = viewmats.shape[0]
    n_bases = (sh_degree + 1) * (sh_degree + 1) if sh.shape[1] > 0 else 0
    n_chunks = (n_gauss + GAUSSIANS_PER_CHUNK - 1) // GAUSSIANS_PER_CHUNK
    for chunk in prange(n_chunks):
      basis = np.empty(16)
      for n in range(chunk * GAUSSIANS_PER_CHUNK, min(n_gauss, (chunk + 1) * GAUSSIANS_PER_CHUNK)):
        (_, _, _, _, _, _, _, _, _, _, _, _, _, _, _, _, _, _,
         s00, s01, s02, s11, s12, s22, mx, my, mz) = _scaled_rotation(means, quats, scales, n)
        for c in range(n_cams):
            (px, py, pz, ux, uy, tx, ty, xcl, ycl, j00, j02, j11, j12,
             c00, c01, c02, c11, c12, c22) = _camera_terms(viewmats, ks, c, mx, my, mz, s00, s01, s02, s11, s12,
                                                           s22, width, height)
            b00, b01, b11, det_orig, a, d, det_raw = _dilated_cov2d(j00, j02, j11, j12, c00, c01, c02, c11, c12,
                                                                    c22, eps2d)
            det = max(det_raw, 1e-10)
            comp = math.sqrt(max(det_orig / det, 0.0)) if antialiased else 1.0
            mean_x = (ks[c, 0, 0] * px + ks[c, 0, 1] * py + ks[c, 0, 2] * pz) / pz
            mean_y = (ks[c, 1, 0] * px + ks[c, 1, 1] * py + ks[c, 1, 2] * pz) / pz
            means2d[c, n, 0] = mean_x
            means2d[c, n, 1] = mean_y
            conics[c, n, 0] = d / det
            conics[c, n, 1] = -b01 / det
            conics[c, n, 2] = a / det
            depths[c, n] = pz
            opac_out[c, n] = opacities[n] * comp
            compensations[c, n] = comp
            b = 0.5 * (a + d)
            v1 = b + math.sqrt(max(b * b - det, 0.01))
            extent = 3.0 * math.sqrt(v1)
            # NaN or huge (non-finite mean, scale or quaternion): culled, as the torch projection's comparisons
            # and int cast end up doing, instead of an undefined float-to-int conversion here.
            radius = float(math.ceil(extent)) if extent < 2e9 else 0.0
            if not (pz > near_plane and pz < far_plane):
                radius = 0.0
            if not (mean_x + radius > 0 and mean_x - radius < width and mean_y + radius > 0
                    and mean_y - radius < height):
                radius = 0.0
            if radius_clip > 0 and radius <= radius_clip:
                radius = 0.0
            radii[c, n] = int(radius)
            if n_bases > 0:
                for ch in range(3):
                    colors[c, n, ch] = 0.0
                if radius > 0:
                    dx = mx - campos[c, 0]
                    dy = my - campos[c, 1]
                    dz = mz - campos[c, 2]
                    inv_len = 1.0 / max(math.sqrt(dx * dx + dy * dy + dz * dz), 1e-12)
                    _sh_basis(sh_degree, dx * inv_len, dy * inv_len, dz * inv_len, basis)
                    for ch in range(3):
                        acc = 0.0
                        for k in range(n_bases):
                            acc += basis[k] * sh[n, k, ch]
                        colors[c, n, ch] = max(acc + 0.5, 0.0)


@inline
def _camera_forward(viewmats, ks, c, mx, my, mz, s00, s01, s02, s11, s12, s22, width, height, eps2d, sh, n,
                    sh_degree, n_bases, campos, basis):
    """What the backward pass through camera c needs of Gaussian n's forward pass (`basis` is filled with the SH
    basis of its view direction); one call serves any number of cotangents (`_camera_vjp`)."""
    (px, py, pz, ux, uy, tx, ty, xcl, ycl, j00, j02, j11, j12,
     c00, c01, c02, c11, c12, c22) = _camera_terms(viewmats, ks, c, mx, my, mz, s00, s01, s02, s11, s12,
                                                   s22, width, height)
    b00, b01, b11, det_orig, a, d, det_raw = _dilated_cov2d(j00, j02, j11, j12, c00, c01, c02, c11, c12, c22, eps2d)
    det = max(det_raw, 1e-10)
    dx = 0.0
    dy = 0.0
    dz = 0.0
    length = 1.0
    ex = 0.0
    ey = 0.0
    ez = 0.0
    pass0 = False
    pass1 = False
    pass2 = False
    if n_bases > 0:
        dx = mx - campos[c, 0]
        dy = my - campos[c, 1]
        dz = mz - campos[c, 2]
        length = max(math.sqrt(dx * dx + dy * dy + dz * dz), 1e-12)
        ex = dx / length
        ey = dy / length
        ez = dz / length
        _sh_basis(sh_degree, ex, ey, ez, basis)
        acc0 = 0.0
        acc1 = 0.0
        acc2 = 0.0
        for k in range(n_bases):
            acc0 += basis[k] * sh[n, k, 0]
            acc1 += basis[k] * sh[n, k, 1]
            acc2 += basis[k] * sh[n, k, 2]
        # clamp_min passes the gradient where the input is >= the bound
        pass0 = acc0 + 0.5 >= 0.0
        pass1 = acc1 + 0.5 >= 0.0
        pass2 = acc2 + 0.5 >= 0.0
    return (px, py, pz, ux, uy, tx, ty, xcl, ycl, j00, j02, j11, j12, c00, c01, c02, c11, c12, c22, b00, b01, b11, det_orig, a, d, det_raw, det, dx, dy, dz, length, ex, ey, ez, pass0, pass1, pass2)


@inline
def _camera_vjp(fw, viewmats, ks, c, opacity, sh, n, sh_degree, n_bases, eps2d, antialiased, basis, g_basis,
                g_sh_n, gs, v_m2x, v_m2y, v_depth, v_c0, v_c1, v_c2, v_col0, v_col1, v_col2, v_op, gmx, gmy, gmz,
                gop):
    """Camera c's share of the vjp for the cotangents given (of mean2d, depth, conic, colour, opacity): added to
    gmx, gmy, gmz, gop (returned), gs (d/dSigma, row-major 3x3) and g_sh_n (d/dSH)."""
    (px, py, pz, ux, uy, tx, ty, xcl, ycl, j00, j02, j11, j12, c00, c01, c02, c11, c12, c22, b00, b01, b11, det_orig, a, d, det_raw, det, dx, dy, dz, length, ex, ey, ez, pass0, pass1, pass2) = fw
    # Opacity and compensation.
    g_comp = 0.0
    if antialiased:
        ratio = det_orig / det
        comp = math.sqrt(max(ratio, 0.0))
        gop += v_op * comp
        g_comp = v_op * opacity
    else:
        gop += v_op

    # Colour: SH coefficients, then the view direction's gradient into the mean.
    if n_bases > 0:
        any_grad = False
        for k in range(n_bases):
            g_basis[k] = 0.0
        for ch in range(3):
            passes = pass0 if ch == 0 else (pass1 if ch == 1 else pass2)
            if passes:
                gc = v_col0 if ch == 0 else (v_col1 if ch == 1 else v_col2)
                if gc != 0.0:
                    any_grad = True
                    for k in range(n_bases):
                        g_sh_n[k, ch] += basis[k] * gc
                        g_basis[k] += sh[n, k, ch] * gc
        if any_grad:
            gex, gey, gez = _sh_basis_vjp(sh_degree, ex, ey, ez, g_basis)
            dot = gex * ex + gey * ey + gez * ez
            # F.normalize divides by max(|d|, eps); below eps the direction is d / eps
            if math.sqrt(dx * dx + dy * dy + dz * dz) > 1e-12:
                gmx += (gex - ex * dot) / length
                gmy += (gey - ey * dot) / length
                gmz += (gez - ez * dot) / length
            else:
                gmx += gex / length
                gmy += gey / length
                gmz += gez / length

    # Conic [d/det, -b01/det, a/det] (gsplat averages the two off-diagonal entries, equal here).
    gc0 = v_c0
    gc1 = v_c1
    gc2 = v_c2
    g_a = gc2 / det
    g_d = gc0 / det
    g_b = -gc1 / det  # d/d b01 of the symmetric entry, i.e. the sum over (0,1) and (1,0)
    g_det = -(gc0 * d - gc1 * b01 + gc2 * a) / (det * det)
    g_det_orig = 0.0
    if antialiased and g_comp != 0.0:
        ratio = det_orig / det
        if ratio > 0.0:
            g_ratio = g_comp * 0.5 / math.sqrt(ratio)
            g_det_orig = g_ratio / det
            g_det += -g_ratio * det_orig / (det * det)
    if det_raw < 1e-10:
        g_det = 0.0
    # det = a d - b01^2, det_orig = b00 b11 - b01^2 (b00 = a - eps, b11 = d - eps)
    g_a += g_det * d + g_det_orig * b11
    g_d += g_det * a + g_det_orig * b00
    g_b += -2.0 * b01 * (g_det + g_det_orig)
    # Split the symmetric off-diagonal gradient evenly over the two entries of cov2d.
    h01 = 0.5 * g_b

    # cov2d = J Sc J^T: dJ = (G + G^T) J Sc = 2 G J Sc for symmetric G; dSc = J^T G J.
    # G = [[g_a, h01], [h01, g_d]]
    # JS = J Sc (2x3)
    js00 = j00 * c00 + j02 * c02
    js01 = j00 * c01 + j02 * c12
    js02 = j00 * c02 + j02 * c22
    js10 = j11 * c01 + j12 * c02
    js11 = j11 * c11 + j12 * c12
    js12 = j11 * c12 + j12 * c22
    gj00 = 2.0 * (g_a * js00 + h01 * js10)
    gj02 = 2.0 * (g_a * js02 + h01 * js12)
    gj11 = 2.0 * (h01 * js01 + g_d * js11)
    gj12 = 2.0 * (h01 * js02 + g_d * js12)
    # dSc = J^T G J, J columns: col0 = (j00, 0), col1 = (0, j11), col2 = (j02, j12)
    q00 = j00 * (g_a * j00)
    q01 = j00 * (h01 * j11)
    q02 = j00 * (g_a * j02 + h01 * j12)
    q11 = j11 * (g_d * j11)
    q12 = j11 * (h01 * j02 + g_d * j12)
    q22 = j02 * (g_a * j02 + h01 * j12) + j12 * (h01 * j02 + g_d * j12)
    # dSigma += W^T dSc W (dSc symmetric: q01 = q10 etc.)
    w00 = viewmats[c, 0, 0]; w01 = viewmats[c, 0, 1]; w02 = viewmats[c, 0, 2]
    w10 = viewmats[c, 1, 0]; w11 = viewmats[c, 1, 1]; w12 = viewmats[c, 1, 2]
    w20 = viewmats[c, 2, 0]; w21 = viewmats[c, 2, 1]; w22 = viewmats[c, 2, 2]
    # T = dSc W
    t00 = q00 * w00 + q01 * w10 + q02 * w20
    t01 = q00 * w01 + q01 * w11 + q02 * w21
    t02 = q00 * w02 + q01 * w12 + q02 * w22
    t10 = q01 * w00 + q11 * w10 + q12 * w20
    t11 = q01 * w01 + q11 * w11 + q12 * w21
    t12 = q01 * w02 + q11 * w12 + q12 * w22
    t20 = q02 * w00 + q12 * w10 + q22 * w20
    t21 = q02 * w01 + q12 * w11 + q22 * w21
    t22 = q02 * w02 + q12 * w12 + q22 * w22
    # W^T T
    gs[0] += w00 * t00 + w10 * t10 + w20 * t20
    gs[1] += w00 * t01 + w10 * t11 + w20 * t21
    gs[2] += w00 * t02 + w10 * t12 + w20 * t22
    gs[3] += w01 * t00 + w11 * t10 + w21 * t20
    gs[4] += w01 * t01 + w11 * t11 + w21 * t21
    gs[5] += w01 * t02 + w11 * t12 + w21 * t22
    gs[6] += w02 * t00 + w12 * t10 + w22 * t20
    gs[7] += w02 * t01 + w12 * t11 + w22 * t21
    gs[8] += w02 * t02 + w12 * t12 + w22 * t22

    # Camera-space mean: from means2d, depth and the Jacobian.
    gm2x = v_m2x
    gm2y = v_m2y
    mean_x = (ks[c, 0, 0] * px + ks[c, 0, 1] * py + ks[c, 0, 2] * pz) / pz
    mean_y = (ks[c, 1, 0] * px + ks[c, 1, 1] * py + ks[c, 1, 2] * pz) / pz
    gpx = (gm2x * ks[c, 0, 0] + gm2y * ks[c, 1, 0]) / pz
    gpy = (gm2x * ks[c, 0, 1] + gm2y * ks[c, 1, 1]) / pz
    gpz = (gm2x * (ks[c, 0, 2] - mean_x) + gm2y * (ks[c, 1, 2] - mean_y)) / pz + v_depth
    fx = ks[c, 0, 0]
    fy = ks[c, 1, 1]
    pz2 = pz * pz
    # j00 = fx / z, j11 = fy / z, j02 = -fx tx / z^2, j12 = -fy ty / z^2
    gpz += -fx / pz2 * gj00 - fy / pz2 * gj11
    gpz += 2.0 * fx * tx / (pz2 * pz) * gj02 + 2.0 * fy * ty / (pz2 * pz) * gj12
    g_tx = -fx / pz2 * gj02
    g_ty = -fy / pz2 * gj12
    # tx = z * clamp(px / z): unclamped, d/dpx = 1 and d/dz = 0; clamped, d/dz = the bound, d/dpx = 0.
    if xcl:
        gpz += g_tx * ux
    else:
        gpx += g_tx
    if ycl:
        gpz += g_ty * uy
    else:
        gpy += g_ty
    # mean = W^T p
    gmx += w00 * gpx + w10 * gpy + w20 * gpz
    gmy += w01 * gpx + w11 * gpy + w21 * gpz
    gmz += w02 * gpx + w12 * gpy + w22 * gpz
    return gmx, gmy, gmz, gop


@inline
def _sigma_vjp(gs, r, qw, qx, qy, qz, qnorm, sx, sy, sz, m00, m01, m02, m10, m11, m12, m20, m21, m22):
    """d/dSigma (gs, row-major 3x3) back to the scale (3) and the unnormalised quaternion (4)."""
    # Sigma = M M^T: dM = (dSigma + dSigma^T) M
    h00 = gs[0] + gs[0]; h01 = gs[1] + gs[3]; h02 = gs[2] + gs[6]
    h11 = gs[4] + gs[4]; h12 = gs[5] + gs[7]; h22 = gs[8] + gs[8]
    gm00 = h00 * m00 + h01 * m10 + h02 * m20
    gm01 = h00 * m01 + h01 * m11 + h02 * m21
    gm02 = h00 * m02 + h01 * m12 + h02 * m22
    gm10 = h01 * m00 + h11 * m10 + h12 * m20
    gm11 = h01 * m01 + h11 * m11 + h12 * m21
    gm12 = h01 * m02 + h11 * m12 + h12 * m22
    gm20 = h02 * m00 + h12 * m10 + h22 * m20
    gm21 = h02 * m01 + h12 * m11 + h22 * m21
    gm22 = h02 * m02 + h12 * m12 + h22 * m22
    # M = R diag(s)
    gsx = gm00 * r[0] + gm10 * r[3] + gm20 * r[6]
    gsy = gm01 * r[1] + gm11 * r[4] + gm21 * r[7]
    gsz = gm02 * r[2] + gm12 * r[5] + gm22 * r[8]
    gr00 = gm00 * sx; gr01 = gm01 * sy; gr02 = gm02 * sz
    gr10 = gm10 * sx; gr11 = gm11 * sy; gr12 = gm12 * sz
    gr20 = gm20 * sx; gr21 = gm21 * sy; gr22 = gm22 * sz
    w, x, y, z = qw, qx, qy, qz
    gw = 2.0 * (-z * gr01 + y * gr02 + z * gr10 - x * gr12 - y * gr20 + x * gr21)
    gx = 2.0 * (y * gr01 + z * gr02 + y * gr10 - 2.0 * x * gr11 - w * gr12 + z * gr20 + w * gr21
                - 2.0 * x * gr22)
    gy = 2.0 * (-2.0 * y * gr00 + x * gr01 + w * gr02 + x * gr10 + z * gr12 - w * gr20 + z * gr21
                - 2.0 * y * gr22)
    gz = 2.0 * (-2.0 * z * gr00 - w * gr01 + x * gr02 + w * gr10 - 2.0 * z * gr11 + y * gr12 + x * gr20
                + y * gr21)
    # q_hat = q / max(|q|, eps): dq = (dq_hat - q_hat (q_hat . dq_hat)) / |q|; below eps a plain division
    dot = gw * w + gx * x + gy * y + gz * z if qnorm > 1e-12 else 0.0
    gq0 = (gw - w * dot) / qnorm
    gq1 = (gx - x * dot) / qnorm
    gq2 = (gy - y * dot) / qnorm
    gq3 = (gz - z * dot) / qnorm
    return gsx, gsy, gsz, gq0, gq1, gq2, gq3


@parallel_kernel
def project_backward(means, quats, scales, opacities, sh, sh_degree, campos, viewmats, ks, width, height, eps2d,
                     antialiased, radii, v_means2d, v_conics, v_depths, v_opac, v_colors,
                     g_means, g_quats, g_scales, g_opacities, g_sh):
    """Gradients of the forward outputs' vjp into the per-Gaussian inputs (g_* are written, not accumulated)."""
    n_gauss = means.shape[0]
    n_cams = viewmats.shape[0]
    n_sh = sh.shape[1]
    n_bases = (sh_degree + 1) * (sh_degree + 1) if n_sh > 0 else 0
    n_chunks = (n_gauss + GAUSSIANS_PER_CHUNK - 1) // GAUSSIANS_PER_CHUNK
    for chunk in prange(n_chunks):
      basis = np.empty(16)
      g_basis = np.zeros(16)
      g_sh_n = np.zeros((16, 3))
      gs = np.zeros(9)
      for n in range(chunk * GAUSSIANS_PER_CHUNK, min(n_gauss, (chunk + 1) * GAUSSIANS_PER_CHUNK)):
        g_sh_n[:] = 0.0
        gs[:] = 0.0
        (r, qw, qx, qy, qz, qnorm, sx, sy, sz, m00, m01, m02, m10, m11, m12, m20, m21, m22,
         s00, s01, s02, s11, s12, s22, mx, my, mz) = _scaled_rotation(means, quats, scales, n)
        # Accumulated over cameras: d/dSigma (gs), d/dmean, d/dopacity.
        gmx = 0.0
        gmy = 0.0
        gmz = 0.0
        gop = 0.0
        for c in range(n_cams):
            if radii[c, n] <= 0:
                continue
            fw = _camera_forward(viewmats, ks, c, mx, my, mz, s00, s01, s02, s11, s12, s22, width, height, eps2d,
                                 sh, n, sh_degree, n_bases, campos, basis)
            gmx, gmy, gmz, gop = _camera_vjp(
                fw, viewmats, ks, c, opacities[n], sh, n, sh_degree, n_bases, eps2d, antialiased, basis, g_basis,
                g_sh_n, gs, v_means2d[c, n, 0], v_means2d[c, n, 1], v_depths[c, n], v_conics[c, n, 0],
                v_conics[c, n, 1], v_conics[c, n, 2], v_colors[c, n, 0], v_colors[c, n, 1], v_colors[c, n, 2],
                v_opac[c, n], gmx, gmy, gmz, gop)
        g_means[n, 0] = gmx
        g_means[n, 1] = gmy
        g_means[n, 2] = gmz
        g_opacities[n] = gop
        for k in range(n_sh):
            for ch in range(3):
                g_sh[n, k, ch] = g_sh_n[k, ch] if k < n_bases else 0.0
        gsx, gsy, gsz, gq0, gq1, gq2, gq3 = _sigma_vjp(gs, r, qw, qx, qy, qz, qnorm, sx, sy, sz, m00, m01, m02,
                                                       m10, m11, m12, m20, m21, m22)
        g_scales[n, 0] = gsx
        g_scales[n, 1] = gsy
        g_scales[n, 2] = gsz
        g_quats[n, 0] = gq0
        g_quats[n, 1] = gq1
        g_quats[n, 2] = gq2
        g_quats[n, 3] = gq3


@parallel_kernel
def projection_jacobian_rows(means, quats, scales, opacities, sh, sh_degree, campos, viewmats, ks, width, height,
                             eps2d, antialiased, radii, d_means, d_scales, d_opacities, d_sh_dc):
    """Row k of each Gaussian's Jacobian of u = (mean2d 2, conic 3, colour 3, opacity 1) seen from camera 0, for
    k = 0..8: what `project_backward` returns for a cotangent of 1 in component k of every Gaussian's u, with one
    forward pass per Gaussian for all nine (d_means, d_scales [N, 9, 3], d_opacities [N, 9], d_sh_dc [N, 9, 3]:
    into the means, scales, activated opacities and degree-0 SH coefficients). Rows with radius <= 0 are zero."""
    n_gauss = means.shape[0]
    n_sh = sh.shape[1]
    n_bases = (sh_degree + 1) * (sh_degree + 1) if n_sh > 0 else 0
    n_chunks = (n_gauss + GAUSSIANS_PER_CHUNK - 1) // GAUSSIANS_PER_CHUNK
    for chunk in prange(n_chunks):
      basis = np.empty(16)
      g_basis = np.zeros(16)
      g_sh_n = np.zeros((16, 3))
      gs = np.zeros(9)
      unit = np.zeros(9)
      for n in range(chunk * GAUSSIANS_PER_CHUNK, min(n_gauss, (chunk + 1) * GAUSSIANS_PER_CHUNK)):
        if radii[0, n] <= 0:
            for k in range(9):
                for i in range(3):
                    d_means[n, k, i] = 0.0
                    d_scales[n, k, i] = 0.0
                    d_sh_dc[n, k, i] = 0.0
                d_opacities[n, k] = 0.0
            continue
        (r, qw, qx, qy, qz, qnorm, sx, sy, sz, m00, m01, m02, m10, m11, m12, m20, m21, m22,
         s00, s01, s02, s11, s12, s22, mx, my, mz) = _scaled_rotation(means, quats, scales, n)
        fw = _camera_forward(viewmats, ks, 0, mx, my, mz, s00, s01, s02, s11, s12, s22, width, height, eps2d,
                             sh, n, sh_degree, n_bases, campos, basis)
        for k in range(9):
            g_sh_n[:] = 0.0
            gs[:] = 0.0
            unit[:] = 0.0
            unit[k] = 1.0
            gmx, gmy, gmz, gop = _camera_vjp(
                fw, viewmats, ks, 0, opacities[n], sh, n, sh_degree, n_bases, eps2d, antialiased, basis, g_basis,
                g_sh_n, gs, unit[0], unit[1], 0.0, unit[2], unit[3], unit[4], unit[5], unit[6], unit[7], unit[8],
                0.0, 0.0, 0.0, 0.0)
            gsx, gsy, gsz, _, _, _, _ = _sigma_vjp(gs, r, qw, qx, qy, qz, qnorm, sx, sy, sz, m00, m01, m02, m10,
                                                   m11, m12, m20, m21, m22)
            d_means[n, k, 0] = gmx
            d_means[n, k, 1] = gmy
            d_means[n, k, 2] = gmz
            d_scales[n, k, 0] = gsx
            d_scales[n, k, 1] = gsy
            d_scales[n, k, 2] = gsz
            d_opacities[n, k] = gop
            for ch in range(3):
                d_sh_dc[n, k, ch] = g_sh_n[0, ch] if n_bases > 0 else 0.0
