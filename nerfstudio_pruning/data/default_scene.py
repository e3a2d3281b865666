"""The project's built-in default scene: a small analytic scene ray-cast in numpy.

The scene is written as an ordinary Nerfstudio dataset (``transforms.json`` plus
PNG images) so that both our own dataparser and nerfstudio's stock
``nerfstudio-data`` parser can train on it, with no download and no COLMAP run.

World frame: +z is up (nerfstudio's convention), the ground is the plane z = 0,
the objects sit inside roughly [-0.85, 0.85]^2 x [0, 0.8], cameras stand about
3 units from the look-at point on two rings, and a cylindrical wall of radius 6
closes the scene with a sky above it.  Camera-to-world matrices use the
OpenGL/Nerfstudio convention: the camera looks down its -z axis, +y is up in the
image and +x is to the right.

Only numpy, PIL and plyfile are used here; nothing from nerfstudio or torch, so
that generating the data never depends on the training stack.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

SCENE_FORMAT_VERSION = 1
"""Bumped whenever the generator's output changes, so stale scenes can be spotted."""

TRANSFORMS_NAME = "transforms.json"
IMAGES_DIRNAME = "images"
POINTS_NPZ_NAME = "points.npz"
POINTS_PLY_NAME = "sparse_pc.ply"
_PAYLOAD_NAMES = (IMAGES_DIRNAME, POINTS_NPZ_NAME, POINTS_PLY_NAME)
MARKER_KEY = "nsp_scene"
"""Key in transforms.json that identifies a dataset made by this module."""

# ---------------------------------------------------------------------------
# Scene layout (world units; the whole thing is tuned for cameras ~3 units out)
# ---------------------------------------------------------------------------
LOOK_AT = np.array([0.0, 0.0, 0.3])
WORLD_UP = np.array([0.0, 0.0, 1.0])

GROUND_RADIUS = 6.0
TILE_HALF_EXTENT = 2.0
TILE_SIZE = 0.25
WALL_RADIUS = 6.0
WALL_HEIGHT = 2.5

BALL_CENTER = np.array([-0.45, 0.30, 0.38])
BALL_RADIUS = 0.38
BANDED_CENTER = np.array([0.55, -0.30, 0.26])
BANDED_RADIUS = 0.26
BOX_LO = np.array([0.00, 0.25, 0.00])
BOX_HI = np.array([0.50, 0.75, 0.55])
CYL_XY = np.array([-0.15, -0.50])
CYL_RADIUS = 0.16
CYL_HEIGHT = 0.80

LIGHT_DIR = np.array([0.5, 0.35, 0.8]) / np.linalg.norm([0.5, 0.35, 0.8])
AMBIENT = 0.35

# Two rings so that the training views see the objects from two elevations.
RING_LOW = (3.0, 0.8)  # (radius, height)
RING_HIGH = (2.6, 1.8)
HORIZONTAL_FOV_DEG = 55.0

SCENE_AABB = np.array(
    [
        [-WALL_RADIUS - 0.05, -WALL_RADIUS - 0.05, -0.05],
        [WALL_RADIUS + 0.05, WALL_RADIUS + 0.05, max(WALL_HEIGHT, RING_HIGH[1]) + 0.05],
    ]
)
"""Axis-aligned box holding every surface and every camera (the sky is at infinity)."""

# Surface ids returned by the tracer.
SKY, GROUND, WALL, BALL, BANDED, BOX, CYLINDER = range(7)

_EPS = 1e-6
_SUPERSAMPLE_OFFSETS = np.array([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])


# ---------------------------------------------------------------------------
# Cameras
# ---------------------------------------------------------------------------
def focal_length(width: int) -> float:
    """Focal length in pixels (square pixels) for the fixed horizontal field of view."""
    return 0.5 * width / np.tan(np.deg2rad(HORIZONTAL_FOV_DEG) / 2.0)


def look_at_c2w(position: np.ndarray, target: np.ndarray = LOOK_AT) -> np.ndarray:
    """4x4 camera-to-world matrix in OpenGL convention, looking from position at target."""
    forward = target - position
    forward = forward / np.linalg.norm(forward)
    right = np.cross(forward, WORLD_UP)
    right = right / np.linalg.norm(right)
    up = np.cross(right, forward)
    c2w = np.eye(4)
    c2w[:3, 0] = right
    c2w[:3, 1] = up
    c2w[:3, 2] = -forward
    c2w[:3, 3] = position
    return c2w


def camera_poses(n_views: int) -> np.ndarray:
    """[n_views, 4, 4] camera-to-world matrices on a low and a high ring.

    The first half of the views is the low ring and the second half the high
    ring, so that "every k-th view is eval" picks eval views on both rings.  The
    high ring is rotated by half a step so its views fall between the low ones.
    Matrices are rounded to what transforms.json stores, so the images are
    rendered from exactly the poses a reader gets back.
    """
    n_low = (n_views + 1) // 2
    n_high = n_views - n_low
    poses = []
    for ring, count, (radius, height) in ((0, n_low, RING_LOW), (1, n_high, RING_HIGH)):
        for j in range(count):
            azimuth = 2.0 * np.pi * (j + 0.5 * ring) / count + np.deg2rad(20.0)
            position = np.array([radius * np.cos(azimuth), radius * np.sin(azimuth), height])
            poses.append(look_at_c2w(position))
    return np.round(np.stack(poses), 9)


def pixel_rays(
    c2w: np.ndarray, fx: float, fy: float, cx: float, cy: float, u: np.ndarray, v: np.ndarray
) -> Tuple[np.ndarray, np.ndarray]:
    """World-space rays through continuous pixel coordinates (u right, v down).

    Pixel (i, j) covers [j, j+1) x [i, i+1), so its centre is (j + 0.5, i + 0.5);
    this matches nerfstudio's Cameras.generate_rays with its default offset.
    """
    d_cam = np.stack([(u - cx) / fx, -(v - cy) / fy, -np.ones_like(u)], axis=-1)
    dirs = d_cam @ c2w[:3, :3].T
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    origins = np.broadcast_to(c2w[:3, 3], dirs.shape)
    return np.ascontiguousarray(origins), dirs


# ---------------------------------------------------------------------------
# Ray casting
# ---------------------------------------------------------------------------
def _hit_sphere(o: np.ndarray, d: np.ndarray, center: np.ndarray, radius: float) -> np.ndarray:
    oc = o - center
    b = np.einsum("ij,ij->i", oc, d)
    c = np.einsum("ij,ij->i", oc, oc) - radius * radius
    disc = b * b - c
    ok = disc >= 0.0
    root = np.sqrt(np.where(ok, disc, 0.0))
    t_near = -b - root
    t_far = -b + root
    t = np.where(t_near > _EPS, t_near, t_far)
    return np.where(ok & (t > _EPS), t, np.inf)


def _hit_box(o: np.ndarray, d: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / d
        t1 = (lo - o) * inv
        t2 = (hi - o) * inv
    t_min = np.nanmax(np.minimum(t1, t2), axis=1)
    t_max = np.nanmin(np.maximum(t1, t2), axis=1)
    t = np.where(t_min > _EPS, t_min, t_max)
    return np.where((t_max >= t_min) & (t > _EPS), t, np.inf)


def _hit_cylinder(o: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Vertical capped cylinder standing on the ground (its bottom cap is never seen)."""
    ox = o[:, 0] - CYL_XY[0]
    oy = o[:, 1] - CYL_XY[1]
    a = d[:, 0] ** 2 + d[:, 1] ** 2
    b = ox * d[:, 0] + oy * d[:, 1]
    c = ox * ox + oy * oy - CYL_RADIUS**2
    disc = b * b - a * c
    ok = (disc >= 0.0) & (a > 1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_side = (-b - np.sqrt(np.where(ok, disc, 0.0))) / np.where(ok, a, 1.0)
    z_side = o[:, 2] + t_side * d[:, 2]
    t_side = np.where(ok & (t_side > _EPS) & (z_side >= 0.0) & (z_side <= CYL_HEIGHT), t_side, np.inf)

    with np.errstate(divide="ignore", invalid="ignore"):
        t_cap = (CYL_HEIGHT - o[:, 2]) / d[:, 2]
    cap_x = ox + t_cap * d[:, 0]
    cap_y = oy + t_cap * d[:, 1]
    t_cap = np.where((t_cap > _EPS) & (cap_x**2 + cap_y**2 <= CYL_RADIUS**2), t_cap, np.inf)
    return np.minimum(t_side, t_cap)


def _hit_ground(o: np.ndarray, d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        t = -o[:, 2] / d[:, 2]
    x = o[:, 0] + t * d[:, 0]
    y = o[:, 1] + t * d[:, 1]
    return np.where((t > _EPS) & (x * x + y * y <= GROUND_RADIUS**2), t, np.inf)


def _hit_wall(o: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Inside of the surrounding cylinder; every ray starts inside it, so take the far root."""
    a = d[:, 0] ** 2 + d[:, 1] ** 2
    b = o[:, 0] * d[:, 0] + o[:, 1] * d[:, 1]
    c = o[:, 0] ** 2 + o[:, 1] ** 2 - WALL_RADIUS**2
    disc = np.maximum(b * b - a * c, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (-b + np.sqrt(disc)) / a
    z = o[:, 2] + t * d[:, 2]
    return np.where((a > 1e-12) & (t > _EPS) & (z >= 0.0) & (z <= WALL_HEIGHT), t, np.inf)


def _object_hits(o: np.ndarray, d: np.ndarray) -> List[np.ndarray]:
    return [
        _hit_sphere(o, d, BALL_CENTER, BALL_RADIUS),
        _hit_sphere(o, d, BANDED_CENTER, BANDED_RADIUS),
        _hit_box(o, d, BOX_LO, BOX_HI),
        _hit_cylinder(o, d),
    ]


def trace(o: np.ndarray, d: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First hit along each ray: (t, surface id, hit point). Misses get t = inf and id SKY."""
    ts = np.stack([_hit_ground(o, d), _hit_wall(o, d), *_object_hits(o, d)])
    first = np.argmin(ts, axis=0)
    t = ts[first, np.arange(ts.shape[1])]
    surface = np.where(np.isfinite(t), first + GROUND, SKY)
    points = o + np.where(np.isfinite(t), t, 0.0)[:, None] * d
    return t, surface, points


def _normals(points: np.ndarray, surface: np.ndarray) -> np.ndarray:
    n = np.zeros_like(points)
    n[:, 2] = 1.0  # ground and sky (sky is never shaded with it)
    for sid, center, radius in ((BALL, BALL_CENTER, BALL_RADIUS), (BANDED, BANDED_CENTER, BANDED_RADIUS)):
        m = surface == sid
        n[m] = (points[m] - center) / radius
    m = surface == WALL
    n[m, :2] = -points[m, :2] / WALL_RADIUS
    n[m, 2] = 0.0
    m = surface == BOX
    if m.any():
        p = points[m]
        # The face the point lies on is the one it is closest to.
        gaps = np.concatenate([np.abs(p - BOX_LO), np.abs(p - BOX_HI)], axis=1)
        face = np.argmin(gaps, axis=1)
        nb = np.zeros_like(p)
        nb[np.arange(len(p)), face % 3] = np.where(face < 3, -1.0, 1.0)
        n[m] = nb
    m = surface == CYLINDER
    if m.any():
        p = points[m]
        on_cap = p[:, 2] >= CYL_HEIGHT - 1e-6
        side = np.zeros_like(p)
        side[:, 0] = (p[:, 0] - CYL_XY[0]) / CYL_RADIUS
        side[:, 1] = (p[:, 1] - CYL_XY[1]) / CYL_RADIUS
        side[on_cap] = (0.0, 0.0, 1.0)
        n[m] = side
    return n


# ---------------------------------------------------------------------------
# Materials
# ---------------------------------------------------------------------------
def _hash01(i: np.ndarray, j: np.ndarray, salt: int = 0) -> np.ndarray:
    """Cheap deterministic per-cell random number in [0, 1) (integer hash, no RNG state)."""
    h = (i.astype(np.int64) * 73856093) ^ (j.astype(np.int64) * 19349663) ^ (salt * 83492791)
    h = (h ^ (h >> 13)) * 1274126177
    h = h ^ (h >> 16)
    return (h & 0xFFFF).astype(np.float64) / 65536.0


def _mix(a, b, w: np.ndarray) -> np.ndarray:
    return np.asarray(a) * (1.0 - w[:, None]) + np.asarray(b) * w[:, None]


def _albedo_ground(p: np.ndarray) -> np.ndarray:
    ix = np.floor(p[:, 0] / TILE_SIZE)
    iy = np.floor(p[:, 1] / TILE_SIZE)
    checker = ((ix + iy) % 2).astype(np.float64)
    tiles = _mix((0.90, 0.86, 0.78), (0.55, 0.32, 0.22), checker)
    # A per-tile tint breaks the perfect periodicity, which would make views ambiguous.
    tiles *= (0.88 + 0.24 * _hash01(ix, iy, 1))[:, None]
    wobble = 0.5 + 0.25 * np.sin(1.7 * p[:, 0] + 0.6) * np.sin(2.3 * p[:, 1]) + 0.25 * np.sin(0.9 * p[:, 0] - 1.3 * p[:, 1])
    grass = _mix((0.26, 0.42, 0.18), (0.45, 0.60, 0.30), wobble)
    inside = (np.abs(p[:, 0]) < TILE_HALF_EXTENT) & (np.abs(p[:, 1]) < TILE_HALF_EXTENT)
    return np.where(inside[:, None], tiles, grass)


def _albedo_wall(p: np.ndarray) -> np.ndarray:
    azimuth = np.arctan2(p[:, 1], p[:, 0])
    panel_f = (azimuth / (2.0 * np.pi) + 0.5) * 36.0
    panel = np.floor(panel_f)
    colour = _mix((0.78, 0.72, 0.62), (0.62, 0.66, 0.70), (panel % 2).astype(np.float64))
    colour *= (0.9 + 0.2 * _hash01(panel, np.zeros_like(panel), 2))[:, None]
    seam = np.abs(panel_f - np.round(panel_f)) < 0.04
    band = (p[:, 2] > 1.55) & (p[:, 2] < 1.8)
    colour = np.where((seam | band)[:, None], np.array([0.30, 0.28, 0.30]), colour)
    return colour


def _albedo_ball(p: np.ndarray) -> np.ndarray:
    """Beach ball: six coloured gores around the vertical axis and dark polar caps."""
    n = (p - BALL_CENTER) / BALL_RADIUS
    gore = np.floor((np.arctan2(n[:, 1], n[:, 0]) / (2.0 * np.pi) + 0.5) * 6.0).astype(np.int64) % 6
    palette = np.array(
        [
            [0.88, 0.16, 0.12],
            [0.95, 0.95, 0.90],
            [0.16, 0.32, 0.85],
            [0.95, 0.95, 0.90],
            [0.96, 0.78, 0.12],
            [0.95, 0.95, 0.90],
        ]
    )
    colour = palette[gore]
    colour[np.abs(n[:, 2]) > 0.92] = (0.15, 0.15, 0.18)
    return colour


def _albedo_banded(p: np.ndarray) -> np.ndarray:
    """Latitude bands, with a ring of dots on every other band to give azimuthal detail."""
    n = (p - BANDED_CENTER) / BANDED_RADIUS
    lat = np.arcsin(np.clip(n[:, 2], -1.0, 1.0))
    band = np.floor((lat / np.pi + 0.5) * 7.0)
    colour = _mix((0.50, 0.20, 0.62), (0.62, 0.86, 0.40), (band % 2).astype(np.float64))
    lon = np.arctan2(n[:, 1], n[:, 0])
    phase_lat = (lat / np.pi + 0.5) * 7.0 - band - 0.5
    phase_lon = (lon / (2.0 * np.pi) + 0.5) * 12.0
    phase_lon = phase_lon - np.floor(phase_lon) - 0.5
    dot = (band % 2 == 0) & (phase_lat**2 + phase_lon**2 < 0.09)
    colour[dot] = (0.98, 0.92, 0.55)
    return colour


def _albedo_box(p: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Running-bond bricks laid out in each face's own two tangent coordinates."""
    axis = np.argmax(np.abs(n), axis=1)
    u = np.where(axis == 0, p[:, 1], p[:, 0])
    v = np.where(axis == 2, p[:, 1], p[:, 2])
    brick_w, brick_h, mortar = 0.125, 0.0625, 0.012
    row = np.floor(v / brick_h)
    u_shift = u + 0.5 * brick_w * (row % 2)
    col = np.floor(u_shift / brick_w)
    fu = u_shift - col * brick_w
    fv = v - row * brick_h
    is_mortar = (fu < mortar) | (fv < mortar)
    colour = np.empty_like(p)
    colour[:] = (0.72, 0.32, 0.20)
    colour *= (0.8 + 0.35 * _hash01(col, row, 3 + axis))[:, None]
    colour[is_mortar] = (0.86, 0.83, 0.78)
    return colour


def _albedo_cylinder(p: np.ndarray) -> np.ndarray:
    """Helical stripes on the side and concentric rings on the top cap."""
    x = p[:, 0] - CYL_XY[0]
    y = p[:, 1] - CYL_XY[1]
    azimuth = np.arctan2(y, x)
    helix = np.floor(2.0 * (azimuth / (2.0 * np.pi) * 3.0 + p[:, 2] * 4.0)) % 2
    colour = _mix((0.10, 0.58, 0.60), (0.96, 0.90, 0.78), helix.astype(np.float64))
    on_cap = p[:, 2] >= CYL_HEIGHT - 1e-6
    rings = np.floor(np.sqrt(x * x + y * y) / CYL_RADIUS * 4.0) % 2
    cap = _mix((0.85, 0.35, 0.55), (0.96, 0.90, 0.78), rings.astype(np.float64))
    return np.where(on_cap[:, None], cap, colour)


def sky_colour(d: np.ndarray) -> np.ndarray:
    """Direction-only sky: a vertical gradient with soft streaks so it is not flat."""
    elevation = np.arcsin(np.clip(d[:, 2], -1.0, 1.0))
    azimuth = np.arctan2(d[:, 1], d[:, 0])
    w = np.clip(elevation / (0.5 * np.pi), 0.0, 1.0) ** 0.6
    colour = _mix((0.86, 0.90, 0.96), (0.30, 0.50, 0.88), w)
    streaks = np.clip(np.sin(5.0 * azimuth + 3.0 * np.sin(4.0 * elevation)) * np.sin(9.0 * elevation), 0.0, 1.0)
    return colour + 0.12 * streaks[:, None] * (1.0 - colour)


def shade(o: np.ndarray, d: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Colour seen along each ray, plus the surface ids and hit points behind it."""
    _, surface, points = trace(o, d)
    normals = _normals(points, surface)
    albedo = np.zeros_like(points)
    for sid, fn in (
        (GROUND, _albedo_ground),
        (WALL, _albedo_wall),
        (BALL, _albedo_ball),
        (BANDED, _albedo_banded),
        (CYLINDER, _albedo_cylinder),
    ):
        m = surface == sid
        if m.any():
            albedo[m] = fn(points[m])
    m = surface == BOX
    if m.any():
        albedo[m] = _albedo_box(points[m], normals[m])

    lit = surface != SKY
    lambert = np.clip(normals @ LIGHT_DIR, 0.0, None)
    # Only the objects cast shadows; the wall is too far and too low to reach the centre.
    shadow_o = points[lit] + 1e-4 * normals[lit]
    shadow_d = np.broadcast_to(LIGHT_DIR, shadow_o.shape)
    blocked = np.isfinite(np.min(np.stack(_object_hits(shadow_o, shadow_d)), axis=0))
    visible = np.ones(len(points))
    visible[np.flatnonzero(lit)[blocked]] = 0.0

    colour = albedo * (AMBIENT + (1.0 - AMBIENT) * lambert * visible)[:, None]
    colour[~lit] = sky_colour(d[~lit])
    return np.clip(colour, 0.0, 1.0), surface, points


def render_view(c2w: np.ndarray, width: int, height: int, fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """[height, width, 3] uint8 image, 2x2 supersampled."""
    jj, ii = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    u = (jj[..., None] + _SUPERSAMPLE_OFFSETS[:, 0]).reshape(-1)
    v = (ii[..., None] + _SUPERSAMPLE_OFFSETS[:, 1]).reshape(-1)
    o, d = pixel_rays(c2w, fx, fy, cx, cy, u, v)
    colour, _, _ = shade(o, d)
    colour = colour.reshape(height, width, len(_SUPERSAMPLE_OFFSETS), 3).mean(axis=2)
    return np.round(colour * 255.0).astype(np.uint8)


def surface_distance(points: np.ndarray) -> np.ndarray:
    """Unsigned distance from each point to the nearest scene surface (used to check seed points)."""
    p = np.asarray(points, dtype=np.float64)
    r_xy = np.hypot(p[:, 0], p[:, 1])
    ground = np.where(r_xy <= GROUND_RADIUS, np.abs(p[:, 2]), np.inf)
    wall = np.where((p[:, 2] >= 0.0) & (p[:, 2] <= WALL_HEIGHT), np.abs(r_xy - WALL_RADIUS), np.inf)
    ball = np.abs(np.linalg.norm(p - BALL_CENTER, axis=1) - BALL_RADIUS)
    banded = np.abs(np.linalg.norm(p - BANDED_CENTER, axis=1) - BANDED_RADIUS)
    half = 0.5 * (BOX_HI - BOX_LO)
    q = np.abs(p - 0.5 * (BOX_HI + BOX_LO)) - half
    box = np.abs(np.linalg.norm(np.maximum(q, 0.0), axis=1) + np.minimum(q.max(axis=1), 0.0))
    r_cyl = np.hypot(p[:, 0] - CYL_XY[0], p[:, 1] - CYL_XY[1])
    qc = np.stack([r_cyl - CYL_RADIUS, np.abs(p[:, 2] - 0.5 * CYL_HEIGHT) - 0.5 * CYL_HEIGHT], axis=1)
    cyl = np.abs(np.linalg.norm(np.maximum(qc, 0.0), axis=1) + np.minimum(qc.max(axis=1), 0.0))
    return np.min(np.stack([ground, wall, ball, banded, box, cyl]), axis=0)


# ---------------------------------------------------------------------------
# Seed points
# ---------------------------------------------------------------------------
def sample_seed_points(
    poses: np.ndarray,
    width: int,
    height: int,
    fx: float,
    fy: float,
    cx: float,
    cy: float,
    n_points: int,
    seed: int,
) -> Tuple[np.ndarray, np.ndarray]:
    """Points on surfaces seen by the given cameras, coloured as seen, jittered like SfM output.

    Casting random pixel rays and keeping the first hit means that only visible
    surfaces get points, and that their density follows image coverage, much as
    a real sparse reconstruction would.
    """
    rng = np.random.default_rng(seed)
    xyz_parts: List[np.ndarray] = []
    rgb_parts: List[np.ndarray] = []
    found = 0
    while found < n_points:
        batch = max(2 * (n_points - found), 256)
        cam = rng.integers(0, len(poses), size=batch)
        u = rng.uniform(0.0, width, size=batch)
        v = rng.uniform(0.0, height, size=batch)
        o = np.empty((batch, 3))
        d = np.empty((batch, 3))
        for k in np.unique(cam):
            m = cam == k
            o[m], d[m] = pixel_rays(poses[k], fx, fy, cx, cy, u[m], v[m])
        colour, surface, points = shade(o, d)
        keep = surface != SKY
        xyz_parts.append(points[keep])
        rgb_parts.append(colour[keep])
        found += int(keep.sum())
    xyz = np.concatenate(xyz_parts)[:n_points]
    rgb = np.concatenate(rgb_parts)[:n_points]
    xyz = xyz + rng.normal(0.0, 0.004, size=xyz.shape)
    rgb = np.clip(rgb + rng.normal(0.0, 0.03, size=rgb.shape), 0.0, 1.0)
    return xyz.astype(np.float32), np.round(rgb * 255.0).astype(np.uint8)


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------
def _write_npz(path: Path, arrays: Dict[str, np.ndarray]) -> None:
    """np.savez stamps the current time into the zip headers; fix it so files are byte-identical."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, array in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def _write_ply(path: Path, xyz: np.ndarray, rgb: np.ndarray) -> None:
    from plyfile import PlyData, PlyElement

    vertex = np.empty(
        len(xyz),
        dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")],
    )
    vertex["x"], vertex["y"], vertex["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    vertex["red"], vertex["green"], vertex["blue"] = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    PlyData([PlyElement.describe(vertex, "vertex")], text=False, byte_order="<").write(str(path))


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(image, mode="RGB").save(path, format="PNG", compress_level=6)


def split_indices(n_views: int, eval_every: int) -> Tuple[List[int], List[int]]:
    """(train, eval) view indices; view i is eval when i % eval_every == 0.

    This is the same rule as nerfstudio's ``--eval-mode interval``, so both
    parsers agree even if the explicit file lists were ignored.
    """
    eval_ids = [i for i in range(n_views) if i % eval_every == 0]
    train_ids = [i for i in range(n_views) if i % eval_every != 0]
    return train_ids, eval_ids


def _frame_path(i: int) -> str:
    return f"{IMAGES_DIRNAME}/frame_{i:05d}.png"


def _write_scene(
    root: Path, width: int, height: int, n_views: int, eval_every: int, n_seed_points: int, seed: int
) -> None:
    fx = fy = float(round(focal_length(width), 6))
    cx, cy = width / 2.0, height / 2.0
    poses = camera_poses(n_views)
    train_ids, eval_ids = split_indices(n_views, eval_every)

    (root / IMAGES_DIRNAME).mkdir(parents=True)
    for i, c2w in enumerate(poses):
        _write_png(root / _frame_path(i), render_view(c2w, width, height, fx, fy, cx, cy))

    xyz, rgb = sample_seed_points(poses[train_ids], width, height, fx, fy, cx, cy, n_seed_points, seed)
    _write_npz(root / POINTS_NPZ_NAME, {"xyz": xyz, "rgb": rgb})
    _write_ply(root / POINTS_PLY_NAME, xyz, rgb)

    meta = {
        "camera_model": "PINHOLE",
        "fl_x": fx,
        "fl_y": fy,
        "cx": cx,
        "cy": cy,
        "w": width,
        "h": height,
        "ply_file_path": POINTS_PLY_NAME,
        "train_filenames": [_frame_path(i) for i in train_ids],
        "val_filenames": [_frame_path(i) for i in eval_ids],
        "test_filenames": [_frame_path(i) for i in eval_ids],
        MARKER_KEY: {
            "version": SCENE_FORMAT_VERSION,
            "width": width,
            "height": height,
            "n_views": n_views,
            "eval_every": eval_every,
            "n_seed_points": n_seed_points,
            "seed": seed,
            "points_file": POINTS_NPZ_NAME,
            "look_at": LOOK_AT.tolist(),
            "up": WORLD_UP.tolist(),
            "aabb": SCENE_AABB.tolist(),
        },
        "frames": [{"file_path": _frame_path(i), "transform_matrix": c2w.tolist()} for i, c2w in enumerate(poses)],
    }
    # transforms.json is the completion marker, so it is written last.
    (root / TRANSFORMS_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _is_ours(folder: Path) -> bool:
    try:
        meta = json.loads((folder / TRANSFORMS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and MARKER_KEY in meta


def _install(staged: Path, out_dir: Path, overwrite: bool) -> None:
    """Move a fully written scene from the staging folder into out_dir."""
    try:
        # Atomic when out_dir is missing (or an empty folder): readers see all or nothing.
        os.rename(staged, out_dir)
        return
    except OSError:
        if not out_dir.is_dir():
            raise

    marker = out_dir / TRANSFORMS_NAME
    if marker.exists():
        if not overwrite:
            return  # another process finished first; its scene is as good as ours
        if not _is_ours(out_dir):
            raise FileExistsError(f"{out_dir} holds a dataset not made by nerfstudio_pruning.data.default_scene; not overwriting it")
    else:
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in _PAYLOAD_NAMES)
        if foreign:
            raise FileExistsError(
                f"{out_dir} is not empty and has no {TRANSFORMS_NAME} (found {foreign[:5]}); "
                "refusing to write the default scene into it"
            )

    # Drop the completion marker first so that a crash mid-swap leaves a folder
    # that is visibly incomplete and gets regenerated next time.
    marker.unlink(missing_ok=True)
    for name in _PAYLOAD_NAMES:
        dst = out_dir / name
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        elif dst.exists() or dst.is_symlink():
            dst.unlink()
        os.replace(staged / name, dst)
    os.replace(staged / TRANSFORMS_NAME, marker)


def _generate(
    out_dir: Path,
    overwrite: bool,
    width: int,
    height: int,
    n_views: int,
    eval_every: int,
    n_seed_points: int,
    seed: int,
) -> Path:
    if width < 8 or height < 8:
        raise ValueError(f"image size must be at least 8x8, got {width}x{height}")
    if eval_every < 2:
        raise ValueError(f"eval_every must be >= 2 so that some views are left for training, got {eval_every}")
    if n_views < 2:
        raise ValueError(f"n_views must be >= 2 so there is a train and an eval view, got {n_views}")
    if n_seed_points < 1:
        raise ValueError(f"n_seed_points must be positive, got {n_seed_points}")

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        # mkdtemp makes the folder private (0700); the renamed scene should read like any other folder.
        os.chmod(staged, 0o755)
        _write_scene(staged, width, height, n_views, eval_every, n_seed_points, seed)
        _install(staged, out_dir, overwrite)
    finally:
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True)
    return out_dir


DEFAULT_SCENE_OPTIONS: Dict[str, int] = dict(width=128, height=96, n_views=48, eval_every=8, n_seed_points=4000, seed=0)
"""make_default_scene's keyword defaults, for callers that forward options (kept equal by a test)."""


def make_default_scene(
    out_dir: Path,
    *,
    width: int = 128,
    height: int = 96,
    n_views: int = 48,
    eval_every: int = 8,
    n_seed_points: int = 4000,
    seed: int = 0,
) -> Path:
    """Render the default scene into out_dir as a Nerfstudio dataset and return out_dir.

    Writes ``images/frame_XXXXX.png``, ``sparse_pc.ply``, ``points.npz`` and,
    last, ``transforms.json``.  Everything is staged in a sibling temp folder
    first, so an interrupted run never leaves a folder with a transforms.json
    but missing images.  Regenerates (overwrites) a scene previously made here;
    refuses to touch a folder holding anything else.  Same arguments give
    byte-identical files.
    """
    return _generate(Path(out_dir), True, width, height, n_views, eval_every, n_seed_points, seed)


def ensure_default_scene(out_dir: Path, **scene_kwargs) -> Path:
    """Generate the default scene in out_dir unless a transforms.json is already there.

    ``scene_kwargs`` are make_default_scene's options; they only matter when a
    scene is actually generated.
    """
    out_dir = Path(out_dir)
    if out_dir.suffix == ".json":
        out_dir = out_dir.parent
    if (out_dir / TRANSFORMS_NAME).exists():
        return out_dir
    unknown = set(scene_kwargs) - set(DEFAULT_SCENE_OPTIONS)
    if unknown:
        raise TypeError(f"unknown scene options: {sorted(unknown)}")
    return _generate(out_dir, False, **{**DEFAULT_SCENE_OPTIONS, **scene_kwargs})


def read_scene_params(out_dir: Path) -> Dict[str, object]:
    """Generator options stored in a scene made here ({} for other datasets)."""
    try:
        meta = json.loads((Path(out_dir) / TRANSFORMS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    params = meta.get(MARKER_KEY, {}) if isinstance(meta, dict) else {}
    return dict(params) if isinstance(params, dict) else {}
