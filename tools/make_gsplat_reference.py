#!/usr/bin/env python
"""Write reference fixtures for a 3D Gaussian rasteriser with gsplat 1.5.3's own code.

The JAX splatting port (vfusion3d_jax/rendering/splatting/) is tested against these files
without torch. Nothing of vfusion3d_jax is on the reference path: this script imports only
torch, numpy and gsplat (and the standard library). What every file and key holds, and which
of gsplat's CUDA rules the compositing below restates, is in
tests/fixtures/gsplat_reference/README.md.

    pip install 'gsplat==1.5.3' torch numpy jaxtyping rich   # or: pip install -e '.[reference]'
    python tools/make_gsplat_reference.py                    # writes tests/fixtures/gsplat_reference/
    python tools/make_gsplat_reference.py --out /tmp/gsplat_ref   # elsewhere
    python tools/make_gsplat_reference.py --compare-cuda     # on a CUDA GPU: gsplat's CUDA path vs the files

What is gsplat's code and what is this script's:

* gsplat's pure-torch functions (gsplat/cuda/_torch_impl.py), which run on a CPU, make every
  intermediate: `_quat_scale_to_covar_preci` (world covariances), `_fully_fused_projection`
  (radii, means2d, depths, conics; classic EWA, pinhole, non-packed), `_isect_tiles` and
  `_isect_offset_encode` (the depth-sorted tile lists), `_spherical_harmonics` (SH colours);
  `_world_to_cam` and `_persp_proj` give the 2D covariances for the opacity-aware radii.
* gsplat's `_rasterize_to_pixels` cannot run here (it calls the CUDA kernel
  `rasterize_to_indices_in_range`, and `accumulate` needs nerfacc), so `composite` below is a
  small per-pixel restatement of the forward kernel `rasterize_to_pixels_3dgs_fwd_kernel`
  (gsplat/cuda/csrc/RasterizeToPixels3DGSFwd.cu): each tile's pixels walk the tile's
  depth-sorted list exactly as the kernel's threads do. `opacity_aware_radii` restates the
  opacity-aware bounding box of ProjectionEWA3DGSFused.cu, which `gsplat.rasterization()` uses
  because it passes `opacities` to `fully_fused_projection`.
* Gradients are torch autograd through gsplat's functions and `composite`, as gsplat's
  pure-torch path gets them; gsplat's CUDA backward gives the same away from thresholds.

Every run with the same software on the same CPU writes bit-identical files (one CPU thread,
fixed seeds from `np.random.default_rng`). The script refuses a scene whose discrete decisions
(culling, radii, tiles, depth order, per-pixel skips and stops, clamps) lie within a small
margin of a threshold, checks that float32 and float64 make identical decisions, checks the
gradients against central differences in float64, checks the image against a tile-free
per-pixel loop (numpy), checks that the opacity-aware tile lists give the same image and
gradients bit for bit, and finally recomputes every scene and compares it with the written
files.
"""

import argparse
import hashlib
import importlib.metadata
import json
import math
import pathlib
import platform

import numpy as np
import torch

import gsplat
from gsplat.cuda._torch_impl import (
    _fully_fused_projection,
    _isect_offset_encode,
    _isect_tiles,
    _persp_proj,
    _quat_scale_to_covar_preci,
    _spherical_harmonics,
    _world_to_cam,
)

GSPLAT_VERSION = "1.5.3"
DEFAULT_OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "gsplat_reference"

# gsplat's constants (gsplat/cuda/include/Common.h, csrc/RasterizeToPixels3DGSFwd.cu,
# csrc/ProjectionEWA3DGSFused.cu, cuda/_torch_impl.py).
ALPHA_THRESHOLD = 1.0 / 255.0  # Common.h: #define ALPHA_THRESHOLD (1.f / 255.f)
MAX_ALPHA = 0.999  # alpha = min(0.999f, opac * __expf(-sigma))
T_STOP = 1e-4  # if (next_T <= 1e-4f) { done = true; break; }: that Gaussian is not blended
RADIUS_EXTEND = 3.33  # radius = ceil(3.33 * sqrt(covar2d[i][i])) (blurred covariance)

# Margins: no discrete decision may be closer than this to its threshold, so that any float32
# implementation (and float64) makes the same decisions as this one.
MIN_REL_MARGIN = 1e-5  # relative, for alpha / transmittance / radius / depth thresholds
MIN_PX_MARGIN = 1e-4  # pixels, for the on-screen test and tile boundaries

FLOAT_INPUTS = ("means", "quats", "scales", "opacities", "viewmat", "K", "background", "colors", "sh_coeffs")


# ----------------------------------------------------------------------------------------
# Cameras and scenes
# ----------------------------------------------------------------------------------------

def intrinsics(fx, fy, cx, cy):
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def look_at(campos, target, up=(0.0, 0.0, 1.0)):
    """World-to-camera 4x4, OpenCV axes: x right, y down, z forward (towards target)."""
    campos = np.asarray(campos, np.float64)
    forward = np.asarray(target, np.float64) - campos
    forward /= np.linalg.norm(forward)
    right = np.cross(-np.asarray(up, np.float64), forward)
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    R = np.stack([right, down, forward])
    viewmat = np.eye(4)
    viewmat[:3, :3] = R
    viewmat[:3, 3] = -R @ campos
    return viewmat


def camera_to_world(points_c, viewmat):
    R, t = viewmat[:3, :3], viewmat[:3, 3]
    return (np.asarray(points_c, np.float64) - t) @ R


def unproject(u, v, z, K):
    """Camera-space points that project to pixel coordinates (u, v) at depth z."""
    u, v, z = np.broadcast_arrays(np.asarray(u, np.float64), np.asarray(v, np.float64), np.asarray(z, np.float64))
    return np.stack([(u - K[0, 2]) / K[0, 0] * z, (v - K[1, 2]) / K[1, 1] * z, z], axis=-1)


def random_quats(rng, n):
    """Random rotations as (w, x, y, z), deliberately not normalised (norms 0.5 to 2)."""
    q = rng.normal(size=(n, 4))
    return q / np.linalg.norm(q, axis=1, keepdims=True) * rng.uniform(0.5, 2.0, size=(n, 1))


def scales_for(rng, sigma_px, z, f, aniso=(0.4, 1.6)):
    """World scales whose footprint is about sigma_px pixels at depth z (per-axis factors)."""
    sigma_px, z = np.asarray(sigma_px, np.float64), np.asarray(z, np.float64)
    base = sigma_px * z / f
    return base[:, None] * rng.uniform(aniso[0], aniso[1], size=(base.shape[0], 3))


def log_uniform(rng, lo, hi, n):
    return np.exp(rng.uniform(math.log(lo), math.log(hi), size=n))


def random_gaussians(rng, n, K, viewmat, width, height, depth, sigma_px, opacity, pad=4.0):
    """Gaussians whose centres project uniformly over the image (plus pad pixels around it)."""
    u = rng.uniform(-pad, width + pad, n)
    v = rng.uniform(-pad, height + pad, n)
    # stratified depths: consecutive depths differ by at least 0.4 (far - near) / n, so that no
    # two Gaussians sharing a tile have (nearly) equal sort keys
    z = depth[0] + (depth[1] - depth[0]) * (rng.permutation(n) + rng.uniform(0.2, 0.8, n)) / n
    means = camera_to_world(unproject(u, v, z, K), viewmat)
    f = 0.5 * (K[0, 0] + K[1, 1])
    return dict(
        means=means,
        quats=random_quats(rng, n),
        scales=scales_for(rng, log_uniform(rng, *sigma_px, n), z, f),
        opacities=rng.uniform(*opacity, n),
    )


def concat(*parts):
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def finish(gaussians, *, viewmat, K, width, height, tile_size, rng, near_plane=0.01, far_plane=1e10,
           eps2d=0.3, background=(0.0, 0.0, 0.0), sh_degree=None, sh_coeffs=None):
    """A scene's arrays: the Gaussians, the camera, colours (or SH), float32 inputs, loss weights."""
    n = gaussians["means"].shape[0]
    scene = dict(gaussians)
    scene.update(viewmat=viewmat, K=K, background=np.asarray(background, np.float64))
    if sh_degree is None:
        scene["colors"] = rng.uniform(0.0, 1.0, size=(n, 3))
    else:
        scene["sh_coeffs"] = sh_coeffs
        scene["sh_degree"] = np.int32(sh_degree)
    scene.update(
        width=np.int32(width), height=np.int32(height), tile_size=np.int32(tile_size),
        near_plane=np.float32(near_plane), far_plane=np.float32(far_plane), eps2d=np.float32(eps2d),
    )
    for k in FLOAT_INPUTS:
        if k in scene:
            scene[k] = np.ascontiguousarray(scene[k], dtype=np.float32)
    loss_rng = np.random.default_rng(rng.integers(2**32))
    scene["loss_weights_colors"] = loss_rng.normal(size=(height, width, 3)).astype(np.float32)
    scene["loss_weights_alphas"] = loss_rng.normal(size=(height, width, 1)).astype(np.float32)
    return scene


def scene_random(rng):
    """~48 Gaussians over a 45 x 37 image (3 x 3 tiles of 16, partial last row and column)."""
    width, height = 45, 37
    K = intrinsics(48.0, 52.0, 21.7, 19.3)
    viewmat = look_at((3.0, -2.5, 1.5), (0.0, 0.0, 0.2))
    g = random_gaussians(rng, 48, K, viewmat, width, height, depth=(3.0, 6.0), sigma_px=(0.6, 4.0),
                         opacity=(0.05, 0.95))
    return finish(g, viewmat=viewmat, K=K, width=width, height=height, tile_size=16, rng=rng,
                  background=(0.25, 0.5, 0.75))


def scene_near_plane(rng):
    """Gaussians behind the camera, between camera and near plane, straddling it, beyond far."""
    width, height = 45, 37
    K = intrinsics(48.0, 52.0, 22.1, 18.4)
    viewmat = look_at((-2.0, 3.0, 1.0), (0.2, 0.1, 0.0))
    near, far = 0.5, 6.0
    z = np.array([
        -2.0, -0.7, -0.1,  # behind the camera: culled (depth <= near)
        0.15, 0.3, 0.45,  # in front of the camera but before the near plane: culled
        0.55, 0.62, 0.7, 0.8,  # just past the near plane; 3 sigma reaches behind it (and the camera)
        5.5, 5.85,  # just before the far plane: kept
        6.2, 8.0, 20.0,  # beyond the far plane: culled
    ])
    n_special = z.size
    u = rng.uniform(-3.0, width + 3.0, n_special)
    v = rng.uniform(-3.0, height + 3.0, n_special)
    sigma = np.array([3.0, 3.0, 3.0, 4.0, 4.0, 4.0, 30.0, 12.0, 20.0, 6.0, 2.0, 3.0, 3.0, 2.0, 1.0])
    f = 0.5 * (K[0, 0] + K[1, 1])
    special = dict(
        means=camera_to_world(unproject(u, v, z, K), viewmat),
        quats=random_quats(rng, n_special),
        scales=scales_for(rng, sigma, np.abs(z), f, aniso=(0.7, 1.3)),
        opacities=rng.uniform(0.2, 0.7, n_special),
    )
    middle = random_gaussians(rng, 16, K, viewmat, width, height, depth=(1.0, 5.0), sigma_px=(0.8, 3.0),
                              opacity=(0.1, 0.9))
    return finish(concat(special, middle), viewmat=viewmat, K=K, width=width, height=height,
                  tile_size=16, rng=rng, near_plane=near, far_plane=far, background=(0.1, 0.1, 0.1))


def radius_before_culling(scene_like, index):
    """ceil(3.33 sqrt(blurred covar2d[i][i])) of one Gaussian, before any culling (gsplat's
    `_world_to_cam` and `_persp_proj`, float32); used to place Gaussians at their box's edge."""
    covars, _ = _quat_scale_to_covar_preci(
        torch.tensor(scene_like["quats"], dtype=torch.float32),
        torch.tensor(scene_like["scales"], dtype=torch.float32), compute_preci=False)
    means_c, covars_c = _world_to_cam(torch.tensor(scene_like["means"], dtype=torch.float32), covars,
                                      torch.tensor(scene_like["viewmat"], dtype=torch.float32)[None])
    _, covars2d = _persp_proj(means_c, covars_c, torch.tensor(scene_like["K"], dtype=torch.float32)[None],
                              scene_like["width"], scene_like["height"])
    var = torch.diagonal(covars2d[0, index], dim1=-2, dim2=-1) + 0.3
    return torch.ceil(RADIUS_EXTEND * torch.sqrt(var)).numpy()


def box_std(g, viewmat, K, width, height, eps2d=0.3):
    """sqrt of the blurred 2D variances (gsplat's `_world_to_cam` and `_persp_proj`, float32)."""
    covars, _ = _quat_scale_to_covar_preci(torch.tensor(g["quats"], dtype=torch.float32),
                                           torch.tensor(g["scales"], dtype=torch.float32), compute_preci=False)
    means_c, covars_c = _world_to_cam(torch.tensor(g["means"], dtype=torch.float32), covars,
                                      torch.tensor(viewmat, dtype=torch.float32)[None])
    _, covars2d = _persp_proj(means_c, covars_c, torch.tensor(K, dtype=torch.float32)[None], width, height)
    return torch.sqrt(torch.diagonal(covars2d[0], dim1=-2, dim2=-1) + eps2d).numpy()


def scene_offscreen(rng):
    """Partly and fully off-screen Gaussians; boxes that just reach into the image; FOV clamp."""
    width, height = 45, 37
    K = intrinsics(48.0, 52.0, 22.5, 18.5)
    viewmat = look_at((2.5, 2.5, 2.0), (0.0, 0.0, 0.0))
    f = 0.5 * (K[0, 0] + K[1, 1])
    # Far off-screen Gaussians (beyond gsplat's 1.3 x FOV limit, where the EWA Jacobian is
    # evaluated at the clamped direction, so the 2D covariance no longer depends on how far
    # out the centre is). Each is first projected at a provisional centre to learn its radius
    # r, then moved so that its box [m - r, m + r] reaches 0.4 px into the image ("reach"),
    # or stops 0.4 px short of it ("miss", culled), or reaches well in ("big").
    sides = ["left", "right", "top", "bottom"]
    plans = [(side, kind) for side in sides for kind in ("reach", "miss")] + [("left", "big"), ("bottom", "big")]
    n = len(plans)
    z = rng.uniform(2.0, 5.0, n)
    sigma = np.where([kind == "big" for _, kind in plans], 14.0, rng.uniform(3.0, 4.0, n))
    far_u = {"left": -60.0, "right": width + 60.0}
    far_v = {"top": -60.0, "bottom": height + 60.0}
    u = np.array([far_u.get(side, rng.uniform(8.0, width - 8.0)) for side, _ in plans])
    v = np.array([far_v.get(side, rng.uniform(8.0, height - 8.0)) for side, _ in plans])
    part = dict(
        means=None,
        quats=random_quats(rng, n),
        scales=scales_for(rng, sigma, z, f, aniso=(0.8, 1.2)),
        opacities=rng.uniform(0.5, 0.95, n),
    )
    base = dict(viewmat=viewmat, K=K, width=width, height=height)
    for i, (side, kind) in enumerate(plans):
        part["means"] = camera_to_world(unproject(u, v, z, K), viewmat)
        radii = radius_before_culling(dict(base, **part), i)
        axis = 0 if side in ("left", "right") else 1
        r = float(radii[axis])
        into = {"reach": 0.4, "miss": -0.4, "big": 0.6 * r}[kind]
        if side == "left":
            u[i] = -r + into
        elif side == "right":
            u[i] = width + r - into
        elif side == "top":
            v[i] = -r + into
        else:
            v[i] = height + r - into
    part["means"] = camera_to_world(unproject(u, v, z, K), viewmat)
    # Centres just outside the image, inside the 1.3 x FOV limit (unclamped Jacobian).
    m = 10
    u2 = np.concatenate([rng.uniform(-6.0, -1.0, 3), rng.uniform(width + 1.0, width + 6.0, 3),
                         rng.uniform(0.0, width, 4)])
    v2 = np.concatenate([rng.uniform(0.0, height, 6), rng.uniform(-6.0, -1.0, 2),
                         rng.uniform(height + 1.0, height + 6.0, 2)])
    z2 = rng.uniform(2.0, 5.0, m)
    near_edge = dict(
        means=camera_to_world(unproject(u2, v2, z2, K), viewmat),
        quats=random_quats(rng, m),
        scales=scales_for(rng, rng.uniform(1.0, 3.0, m), z2, f),
        opacities=rng.uniform(0.3, 0.9, m),
    )
    inside = random_gaussians(rng, 12, K, viewmat, width, height, depth=(2.0, 5.0), sigma_px=(0.8, 3.0),
                              opacity=(0.1, 0.9), pad=0.0)
    return finish(concat(part, near_edge, inside), viewmat=viewmat, K=K, width=width,
                  height=height, tile_size=16, rng=rng, background=(0.6, 0.3, 0.1))


def scene_one_pixel(rng):
    """Many opaque Gaussians stacked on one pixel (transmittance stop), faint ones, a clamp."""
    width, height = 45, 37
    K = intrinsics(48.0, 52.0, 22.5, 18.5)
    viewmat = look_at((0.5, -3.5, 1.2), (0.0, 0.0, 0.3))
    f = 0.5 * (K[0, 0] + K[1, 1])
    u0, v0 = 20.3, 17.6  # not a pixel centre: neighbouring pixels see different alphas
    # 20 opaque Gaussians on the ray through (u0, v0), at distinct depths.
    n = 20
    z = 2.0 + 0.13 * np.arange(n)
    stack = dict(
        means=camera_to_world(unproject(np.full(n, u0), np.full(n, v0), z, K), viewmat),
        quats=random_quats(rng, n),
        scales=scales_for(rng, rng.uniform(1.5, 4.0, n), z, f, aniso=(0.6, 1.4)),
        opacities=rng.permutation(rng.uniform(0.6, 0.95, n)),
    )
    # 6 faint Gaussians, opacity < 1/255 (never blended; culled by the opacity-aware box), some
    # in front of the stack; 4 with opacity 0.006..0.02 (blended near the centre only).
    zf = np.array([1.5, 1.7, 2.07, 2.33, 2.6, 3.0, 1.6, 2.2, 2.48, 2.9])
    nf = zf.size
    faint = dict(
        means=camera_to_world(unproject(u0 + rng.uniform(-1, 1, nf), v0 + rng.uniform(-1, 1, nf), zf, K),
                              viewmat),
        quats=random_quats(rng, nf),
        scales=scales_for(rng, rng.uniform(2.0, 4.0, nf), zf, f),
        opacities=np.concatenate([rng.uniform(0.0015, 0.0035, 6), rng.uniform(0.006, 0.02, 4)]),
    )
    # One Gaussian with opacity 0.9995 > 0.999 centred on a pixel centre: its alpha is clamped
    # to 0.999 there (no gradient through the clamp), unclamped one pixel away.
    zc = np.array([3.37])
    clamp = dict(
        means=camera_to_world(unproject(np.array([32.5]), np.array([9.5]), zc, K), viewmat),
        quats=random_quats(rng, 1),
        scales=scales_for(rng, np.array([6.0]), zc, f, aniso=(0.9, 1.1)),
        opacities=np.array([0.9995]),
    )
    rest = random_gaussians(rng, 12, K, viewmat, width, height, depth=(2.5, 6.0), sigma_px=(1.0, 4.0),
                            opacity=(0.1, 0.9))
    return finish(concat(stack, faint, clamp, rest), viewmat=viewmat, K=K, width=width,
                  height=height, tile_size=16, rng=rng, background=(1.0, 1.0, 1.0))


def scene_tile_borders(rng):
    """Centres exactly on tile boundaries (exact binary arithmetic), boxes into neighbours."""
    width, height = 45, 37
    # Powers of two and short binary fractions everywhere, so that means2d = (fx x + cx z) / z
    # (gsplat's torch form) and fx (x / z) + cx are exact: the centres are exactly 16, 32, ...
    K = intrinsics(32.0, 64.0, 24.0, 16.0)
    viewmat = np.eye(4)
    viewmat[:3, 3] = (0.5, -0.25, 1.0)
    points = [(16, 16), (32, 16), (16, 32), (32, 32), (16, 8), (32, 24), (8, 16), (40, 32),
              (24, 16), (16, 36), (0, 16), (32, 0), (40, 16), (16, 24), (32, 8), (8, 32),
              (16, 16), (32, 32), (24, 32), (40, 8)]
    n = len(points)
    u = np.array([p[0] for p in points], np.float64)
    v = np.array([p[1] for p in points], np.float64)
    z = 2.0 + 0.125 * rng.permutation(n)  # distinct depths, 3 fraction bits
    xc = (u - K[0, 2]) / K[0, 0] * z  # exact: (u - 24) / 32 and (v - 16) / 64 are short fractions
    yc = (v - K[1, 2]) / K[1, 1] * z
    means = np.stack([xc, yc, z], axis=1) - viewmat[:3, 3]
    f = 0.5 * (K[0, 0] + K[1, 1])
    g = dict(
        means=means,
        quats=random_quats(rng, n),
        scales=scales_for(rng, rng.uniform(1.5, 6.0, n), z, f),
        opacities=rng.uniform(0.2, 0.9, n),
    )
    # Integer centres and integer radii put box edges m +- r on integers; where one would land
    # exactly on a tile boundary that changes the tile range (floor / ceil), an implementation
    # whose means2d is one ulp off would pick other tiles. Grow such Gaussians by 7 % until no
    # edge (3.33 box or opacity-aware box) does.
    centres = np.stack([u, v], axis=1)
    sizes, ts = np.array([width, height]), 16
    n_tiles = -(-sizes // ts)
    for _ in range(50):
        radii = np.stack([radius_before_culling(dict(g, viewmat=viewmat, K=K, width=width, height=height), i)
                          for i in range(n)])
        extend = np.minimum(RADIUS_EXTEND, np.sqrt(2.0 * np.log(g["opacities"] / ALPHA_THRESHOLD)))
        hit = np.zeros(n, bool)
        for r in (radii, np.ceil(extend[:, None].astype(np.float32) * box_std(g, viewmat, K, width, height))):
            low, high = (centres - r) / ts, (centres + r) / ts
            hit |= np.any((low == np.round(low)) & (low >= 1) & (low <= n_tiles), axis=1)
            hit |= np.any((high == np.round(high)) & (high >= 0) & (high <= n_tiles - 1), axis=1)
        if not hit.any():
            break
        g["scales"] = np.where(hit[:, None], g["scales"] * 1.07, g["scales"])
    else:
        raise AssertionError("tile_borders: could not move box edges off tile boundaries")
    return finish(g, viewmat=viewmat, K=K, width=width, height=height, tile_size=16,
                  rng=rng, background=(0.0, 0.2, 0.1))


def scene_sh3(rng):
    """Degree-3 spherical harmonics, view-dependent colour, some colours clamped at 0."""
    width, height = 45, 37
    K = intrinsics(50.0, 46.0, 23.2, 17.9)
    viewmat = look_at((-3.0, -1.5, 2.2), (0.1, 0.2, 0.0))
    n = 40
    g = random_gaussians(rng, n, K, viewmat, width, height, depth=(2.5, 5.5), sigma_px=(0.8, 3.5),
                         opacity=(0.1, 0.95))
    degree = 3
    sh = rng.normal(size=(n, (degree + 1) ** 2, 3))
    sh[:, 0] *= 1.2
    sh[:, 1:4] *= 0.5
    sh[:, 4:9] *= 0.35
    sh[:, 9:16] *= 0.25
    return finish(g, viewmat=viewmat, K=K, width=width, height=height, tile_size=16, rng=rng,
                  sh_degree=degree, sh_coeffs=sh, background=(0.3, 0.3, 0.3))


def scene_larger(rng):
    """300 Gaussians at 64 x 48 (4 x 3 full tiles of 16)."""
    width, height = 64, 48
    K = intrinsics(60.0, 62.0, 32.4, 23.7)
    viewmat = look_at((1.5, 3.5, 2.5), (0.0, 0.0, 0.0))
    g = random_gaussians(rng, 300, K, viewmat, width, height, depth=(3.0, 7.0), sigma_px=(0.6, 3.5),
                         opacity=(0.05, 0.9))
    return finish(g, viewmat=viewmat, K=K, width=width, height=height, tile_size=16, rng=rng,
                  background=(0.05, 0.1, 0.2))


def scene_tile8(rng):
    """tile_size 8 on a 53 x 29 image (7 x 4 tiles, partial last row and column); eps2d 0.2;
    three empty tiles: the first, the last and an inner one."""
    width, height, ts = 53, 29, 8
    K = intrinsics(44.0, 40.0, 26.1, 14.2)
    viewmat = look_at((2.0, 2.0, -1.5), (0.0, 0.1, 0.0))
    empty = [(0, 0), (3, 6), (1, 3)]  # (tile row, tile column)
    g = random_gaussians(rng, 200, K, viewmat, width, height, depth=(2.0, 5.0), sigma_px=(0.6, 3.0),
                         opacity=(0.05, 0.95))
    # keep the first 64 candidates whose 3.33-sigma box (gsplat's tile range) misses the empty tiles
    means_c = g["means"] @ viewmat[:3, :3].T + viewmat[:3, 3]
    centre = np.stack([K[0, 0] * means_c[:, 0] / means_c[:, 2] + K[0, 2],
                       K[1, 1] * means_c[:, 1] / means_c[:, 2] + K[1, 2]], axis=1)
    r = np.ceil(RADIUS_EXTEND * box_std(g, viewmat, K, width, height, eps2d=0.2))
    lo, hi = np.floor((centre - r) / ts), np.ceil((centre + r) / ts)  # tiles [lo, hi)
    keep = np.ones(len(r), bool)
    for ty, tx in empty:
        keep &= ~((lo[:, 0] <= tx) & (tx < hi[:, 0]) & (lo[:, 1] <= ty) & (ty < hi[:, 1]))
    g = {k: v[np.flatnonzero(keep)[:64]] for k, v in g.items()}
    assert len(g["means"]) == 64
    return finish(g, viewmat=viewmat, K=K, width=width, height=height, tile_size=8, rng=rng,
                  near_plane=0.1, far_plane=100.0, eps2d=0.2, background=(0.9, 0.8, 0.7))


SCENES = {
    "random": (scene_random, 101),
    "near_plane": (scene_near_plane, 202),
    "offscreen": (scene_offscreen, 303),
    "one_pixel": (scene_one_pixel, 404),
    "tile_borders": (scene_tile_borders, 505),
    "sh3": (scene_sh3, 606),
    "larger": (scene_larger, 707),
    "tile8": (scene_tile8, 808),
}


def make_scene(name):
    builder, seed = SCENES[name]
    return builder(np.random.default_rng(seed))


# ----------------------------------------------------------------------------------------
# The script's restatements of gsplat's CUDA rules
# ----------------------------------------------------------------------------------------

def opacity_aware_radii(means, covars, opacities, viewmat, K, width, height, eps2d, near_plane, far_plane):
    """The radii `gsplat.rasterization()` gets: projection_ewa_3dgs_fused_fwd_kernel with opacities.

    ProjectionEWA3DGSFused.cu, in order: cull if depth < near or depth > far; blur the 2D
    covariance by eps2d and cull if its determinant <= 0; cull if opacity < 1/255; extend =
    min(3.33, sqrt(2 log(opacity * 255))); radius = ceil(extend * sqrt(blurred covar2d[i][i]));
    cull if both radii <= radius_clip (0); cull if m + r <= 0 or m - r >= size on either axis.
    """
    means_c, covars_c = _world_to_cam(means, covars, viewmat[None])
    means2d, covars2d = _persp_proj(means_c, covars_c, K[None], width, height)
    var_x = covars2d[..., 0, 0] + eps2d
    var_y = covars2d[..., 1, 1] + eps2d
    det = var_x * var_y - covars2d[..., 0, 1] * covars2d[..., 1, 0]
    depths = means_c[..., 2]
    valid = (depths >= near_plane) & (depths <= far_plane) & (det > 0) & (opacities >= ALPHA_THRESHOLD)
    extend = torch.clamp_max(torch.sqrt(2.0 * torch.log(torch.clamp_min(opacities, ALPHA_THRESHOLD) / ALPHA_THRESHOLD)),
                             RADIUS_EXTEND)
    radius = torch.stack([torch.ceil(extend * torch.sqrt(var_x)), torch.ceil(extend * torch.sqrt(var_y))], -1)
    inside = ((means2d[..., 0] + radius[..., 0] > 0) & (means2d[..., 0] - radius[..., 0] < width)
              & (means2d[..., 1] + radius[..., 1] > 0) & (means2d[..., 1] - radius[..., 1] < height))
    radius = torch.where((valid & inside)[..., None], radius, torch.zeros_like(radius))
    return radius.int(), extend, torch.sqrt(var_x), torch.sqrt(var_y)


def composite(means2d, conics, colors, opacities, background, width, height, tile_size, isect_offsets,
              flatten_ids, record=None):
    """gsplat's classic 3DGS forward compositing, restated (RasterizeToPixels3DGSFwd.cu).

    One pass per tile; the tile's pixels (the kernel's threads) walk the tile's list
    flatten_ids[isect_offsets[tile] : isect_offsets[tile + 1]] (the last tile ends at
    n_isects) front to back. For pixel centre (x + 0.5, y + 0.5) and Gaussian (mean, conic
    (a, b, c), opacity): delta = mean - centre; sigma = 0.5 (a dx^2 + c dy^2) + b dx dy;
    alpha = min(0.999, opacity exp(-sigma)); skip if sigma < 0 or alpha < 1/255;
    next_T = T (1 - alpha); if next_T <= 1e-4 the pixel is done and this Gaussian is NOT
    blended; otherwise colour += colour_g alpha T, T = next_T. At the end alpha = 1 - T and
    colour += T background. last_ids is the kernel's last_ids (the index into the tile lists of
    the last blended Gaussian, 0 if none); n_contrib counts the blended Gaussians.
    """
    dtype = means2d.dtype
    tile_h, tile_w = isect_offsets.shape
    ends = isect_offsets.flatten().tolist()[1:] + [int(flatten_ids.shape[0])]
    starts = isect_offsets.flatten().tolist()
    ids = flatten_ids.tolist()
    rows_c, rows_a = [], []
    last_ids = torch.zeros((height, width), dtype=torch.int32)
    n_contrib = torch.zeros((height, width), dtype=torch.int32)
    stopped = torch.zeros((height, width), dtype=torch.bool)
    clamped = 0
    for ty in range(tile_h):
        tiles_c, tiles_a = [], []
        for tx in range(tile_w):
            ys = torch.arange(ty * tile_size, min((ty + 1) * tile_size, height))
            xs = torch.arange(tx * tile_size, min((tx + 1) * tile_size, width))
            py, px = torch.meshgrid(ys.to(dtype) + 0.5, xs.to(dtype) + 0.5, indexing="ij")
            py, px = py.flatten(), px.flatten()
            n_pix = px.shape[0]
            T = torch.ones(n_pix, dtype=dtype)
            done = torch.zeros(n_pix, dtype=torch.bool)
            out = torch.zeros((n_pix, colors.shape[-1]), dtype=dtype)
            last = torch.zeros(n_pix, dtype=torch.int32)
            count = torch.zeros(n_pix, dtype=torch.int32)
            tile = ty * tile_w + tx
            for idx in range(starts[tile], ends[tile]):
                g = ids[idx]
                dx = means2d[g, 0] - px
                dy = means2d[g, 1] - py
                sigma = 0.5 * (conics[g, 0] * dx * dx + conics[g, 2] * dy * dy) + conics[g, 1] * dx * dy
                raw = opacities[g] * torch.exp(-sigma)
                alpha = torch.clamp_max(raw, MAX_ALPHA)
                skip = (sigma < 0) | (alpha < ALPHA_THRESHOLD)
                next_T = T * (1.0 - alpha)
                stop = ~done & ~skip & (next_T <= T_STOP)
                use = ~done & ~skip & ~stop
                vis = torch.where(use, alpha * T, torch.zeros_like(T))
                out = out + vis[:, None] * colors[g]
                T = torch.where(use, next_T, T)
                done = done | stop
                last = torch.where(use, torch.full_like(last, idx), last)
                count = count + use.int()
                if record is not None:
                    with torch.no_grad():
                        live = ~done | stop  # pixels that evaluated this Gaussian
                        r = raw.detach()[live].double()
                        if r.numel():
                            record["alpha_threshold"] = min(record["alpha_threshold"],
                                                            float(torch.min(torch.abs(r / ALPHA_THRESHOLD - 1))))
                            record["alpha_clamp"] = min(record["alpha_clamp"],
                                                        float(torch.min(torch.abs(r / MAX_ALPHA - 1))))
                            record["sigma_min"] = min(record["sigma_min"], float(sigma.detach()[live].min()))
                        tested = (live & ~skip)
                        nt = next_T.detach()[tested].double()
                        if nt.numel():
                            record["t_stop"] = min(record["t_stop"], float(torch.min(torch.abs(nt / T_STOP - 1))))
                        clamped += int((use & (raw.detach() > MAX_ALPHA)).sum())
            out = out + T[:, None] * background
            h, w = ys.shape[0], xs.shape[0]
            tiles_c.append(out.reshape(h, w, -1))
            tiles_a.append((1.0 - T).reshape(h, w, 1))
            y0, x0 = ty * tile_size, tx * tile_size
            last_ids[y0:y0 + h, x0:x0 + w] = last.reshape(h, w)
            n_contrib[y0:y0 + h, x0:x0 + w] = count.reshape(h, w)
            stopped[y0:y0 + h, x0:x0 + w] = done.reshape(h, w)
        rows_c.append(torch.cat(tiles_c, dim=1))
        rows_a.append(torch.cat(tiles_a, dim=1))
    if record is not None:
        record["pixels_stopped"] = int(stopped.sum())
        record["alpha_clamped_blends"] = clamped
    return torch.cat(rows_c, dim=0), torch.cat(rows_a, dim=0), last_ids, n_contrib


# ----------------------------------------------------------------------------------------
# One scene through gsplat's functions and the compositing, with gradients
# ----------------------------------------------------------------------------------------

def run_scene(scene, dtype, record=None, perturb=None):
    """Everything the fixture holds for one scene, computed in dtype (float32 or float64)."""
    width, height, tile_size = int(scene["width"]), int(scene["height"]), int(scene["tile_size"])
    near, far, eps2d = float(scene["near_plane"]), float(scene["far_plane"]), float(scene["eps2d"])
    t = {k: torch.tensor(scene[k], dtype=dtype) for k in FLOAT_INPUTS if k in scene}
    sh = "sh_coeffs" in scene
    colour_key = "sh_coeffs" if sh else "colors"
    param_keys = ("means", "quats", "scales", "opacities", colour_key)
    if perturb is not None:
        step, direction = perturb
        for k in param_keys:
            t[k] = t[k] + step * direction[k]
    for k in param_keys:
        t[k].requires_grad_(True)

    covars, _ = _quat_scale_to_covar_preci(t["quats"], t["scales"], compute_covar=True, compute_preci=False,
                                           triu=False)
    radii, means2d, depths, conics, _ = _fully_fused_projection(
        t["means"], covars, t["viewmat"][None], t["K"][None], width, height, eps2d=eps2d, near_plane=near,
        far_plane=far)
    means2d.retain_grad()
    conics.retain_grad()
    if sh:
        # gsplat.rasterization(): campos = inverse(viewmat)[:3, 3]; dirs = means - campos;
        # colors = spherical_harmonics(degree, dirs, coeffs); clamp_min(colors + 0.5, 0).
        campos = torch.inverse(t["viewmat"])[:3, 3]
        sh_colors = torch.clamp_min(_spherical_harmonics(int(scene["sh_degree"]), t["means"] - campos,
                                                         t["sh_coeffs"]) + 0.5, 0.0)
        colors = sh_colors
    else:
        colors = t["colors"]

    tile_w = math.ceil(width / float(tile_size))
    tile_h = math.ceil(height / float(tile_size))
    tiles_per_gauss, isect_ids, flatten_ids = _isect_tiles(means2d, radii, depths, tile_size, tile_w, tile_h)
    isect_offsets = _isect_offset_encode(isect_ids, 1, tile_w, tile_h)[0]
    render_colors, render_alphas, last_ids, n_contrib = composite(
        means2d[0], conics[0], colors, t["opacities"], t["background"], width, height, tile_size, isect_offsets,
        flatten_ids, record=record)
    loss = (torch.sum(torch.tensor(scene["loss_weights_colors"], dtype=dtype) * render_colors)
            + torch.sum(torch.tensor(scene["loss_weights_alphas"], dtype=dtype) * render_alphas))
    if perturb is not None:
        return float(loss.detach())

    loss.backward(retain_graph=True)

    def f(x):
        return x.detach().numpy().copy()

    # Copies now: the second gradient below runs the retain_grad hooks of means2d and conics again.
    floats = {
        "covars": f(covars),
        "means2d": f(means2d[0]),
        "depths": f(depths[0]),
        "conics": f(conics[0]),
        "render_colors": f(render_colors),
        "render_alphas": f(render_alphas),
        "grad_means": f(t["means"].grad),
        "grad_quats": f(t["quats"].grad),
        "grad_scales": f(t["scales"].grad),
        "grad_opacities": f(t["opacities"].grad),
        f"grad_{colour_key}": f(t[colour_key].grad),
        "grad_means2d": f(means2d.grad[0]),
        "grad_conics": f(conics.grad[0]),
    }

    # The same render with the opacity-aware tile lists (gsplat.rasterization()'s), and its gradients.
    with torch.no_grad():
        oa_radii, extend, std_x, std_y = opacity_aware_radii(
            t["means"], covars, t["opacities"], t["viewmat"], t["K"], width, height, eps2d, near, far)
        oa_tiles, oa_isect_ids, oa_flatten_ids = _isect_tiles(means2d, oa_radii, depths, tile_size, tile_w, tile_h)
        oa_offsets = _isect_offset_encode(oa_isect_ids, 1, tile_w, tile_h)[0]
    oa_colors, oa_alphas, _, _ = composite(
        means2d[0], conics[0], colors, t["opacities"], t["background"], width, height, tile_size, oa_offsets,
        oa_flatten_ids)
    oa_loss = (torch.sum(torch.tensor(scene["loss_weights_colors"], dtype=dtype) * oa_colors)
               + torch.sum(torch.tensor(scene["loss_weights_alphas"], dtype=dtype) * oa_alphas))
    oa_keys = [f"grad_{k}" for k in param_keys] + ["grad_means2d", "grad_conics"]
    oa_grads = torch.autograd.grad(oa_loss, [t[k] for k in param_keys] + [means2d, conics])
    oa_grads = [g[0] if k in ("grad_means2d", "grad_conics") else g for k, g in zip(oa_keys, oa_grads)]
    if sh:
        floats["sh_colors"] = f(sh_colors)
    discrete = {
        "radii": f(radii[0]).astype(np.int32),
        "tiles_per_gauss": f(tiles_per_gauss[0]).astype(np.int32),
        "isect_ids": f(isect_ids).astype(np.int64),
        "flatten_ids": f(flatten_ids).astype(np.int32),
        "isect_offsets": f(isect_offsets).astype(np.int32),
        "last_ids": f(last_ids).astype(np.int32),
        "n_contrib": f(n_contrib).astype(np.int32),
        "opacity_aware/radii": f(oa_radii[0]).astype(np.int32),
        "opacity_aware/tiles_per_gauss": f(oa_tiles[0]).astype(np.int32),
        "opacity_aware/isect_ids": f(oa_isect_ids).astype(np.int64),
        "opacity_aware/flatten_ids": f(oa_flatten_ids).astype(np.int32),
        "opacity_aware/isect_offsets": f(oa_offsets).astype(np.int32),
    }
    extras = {
        "opacity_aware_render_colors": f(oa_colors),
        "opacity_aware_render_alphas": f(oa_alphas),
        "extend": f(extend),
        "std_x": f(std_x[0]),
        "std_y": f(std_y[0]),
        **{f"opacity_aware_{k}": f(g) for k, g in zip(oa_keys, oa_grads)},
    }
    return floats, discrete, extras


# ----------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------

def frac_margin(x):
    """Relative distance of x > 0 from the nearest integer (ceil flips there)."""
    x = np.asarray(x, np.float64)
    return np.abs(x - np.round(x)) / np.maximum(x, 1e-30)


def projection_margins(scene, floats, discrete, extras):
    """How close any projection / tile decision of this scene is to flipping."""
    width, height, ts = int(scene["width"]), int(scene["height"]), int(scene["tile_size"])
    near, far = float(scene["near_plane"]), float(scene["far_plane"])
    depths = floats["depths"].astype(np.float64)
    m = floats["means2d"].astype(np.float64)
    out = {
        "depth_near": float(np.min(np.abs(depths / near - 1))),
        "depth_far": float(np.min(np.abs(depths / far - 1))),
    }
    in_range = (depths > near) & (depths < far)
    std = np.stack([extras["std_x"], extras["std_y"]], -1).astype(np.float64)[in_range]
    # ceil(3.33 * std) and ceil(extend * std); float32 products as gsplat forms them
    out["radius_ceil"] = float(np.min(frac_margin(np.float32(RADIUS_EXTEND) * std)))
    opac = scene["opacities"].astype(np.float64)
    ok = in_range & (opac >= ALPHA_THRESHOLD)
    oa = extras["extend"].astype(np.float64)[ok, None] * np.stack(
        [extras["std_x"], extras["std_y"]], -1).astype(np.float64)[ok]
    out["oa_radius_ceil"] = float(np.min(frac_margin(oa))) if oa.size else 1.0
    out["opacity_threshold"] = float(np.min(np.abs(opac / ALPHA_THRESHOLD - 1)))
    pos, pos_ts = [], []
    for key in ("radii", "opacity_aware/radii"):
        # the on-screen test, for the radii the Gaussian had before it (3.33 box: recompute)
        r = np.ceil(np.float32(RADIUS_EXTEND) * std) if key == "radii" else None
        if key == "radii":
            mm = m[in_range]
        else:
            mm, r = m[ok], np.ceil(oa)
        for axis, size in ((0, width), (1, height)):
            pos += [np.abs(mm[:, axis] + r[:, axis]), np.abs(mm[:, axis] - r[:, axis] - size)]
        # tile boundaries for the Gaussians that got tiles
        rad = discrete[key].astype(np.float64)
        vis = np.all(rad > 0, axis=1)
        n_tiles = (math.ceil(width / ts), math.ceil(height / ts))
        for axis in (0, 1):
            # floor((m - r) / ts) flips at k ts, which matters for k in [1, n_tiles] (clamp to
            # [0, n_tiles] after); ceil((m + r) / ts) flips at k ts for k in [0, n_tiles - 1].
            for edge, lo, hi in ((m[vis, axis] - rad[vis, axis], 1, n_tiles[axis]),
                                 (m[vis, axis] + rad[vis, axis], 0, n_tiles[axis] - 1)):
                k = np.clip(np.round(edge / ts), lo, hi)
                pos_ts.append(np.abs(edge - k * ts))
    out["onscreen_px"] = float(np.min(np.concatenate(pos)))
    out["tile_edge_px"] = float(np.min(np.concatenate(pos_ts))) if pos_ts else 1.0
    # depth order inside every tile (the sort key's low 32 bits are the float32 depth)
    rel = [1.0]
    for key in ("", "opacity_aware/"):
        ids = discrete[key + "isect_ids"]
        assert np.unique(ids).size == ids.size, "two Gaussians share a tile and a depth: sort order undefined"
        tiles = ids >> 32
        d = depths[discrete[key + "flatten_ids"]]
        same = tiles[1:] == tiles[:-1]
        if same.any():
            rel.append(float(np.min((d[1:] - d[:-1])[same] / np.abs(d[:-1][same]))))
    out["depth_order"] = min(rel)
    if "sh_colors" in floats:
        vis = np.all(discrete["radii"] > 0, axis=1)
        raw = extras["sh_raw"][vis]
        out["sh_clamp"] = float(np.min(np.abs(raw)))
    return out


def check_margins(name, margins):
    rel_keys = ("depth_near", "depth_far", "radius_ceil", "oa_radius_ceil", "opacity_threshold", "depth_order",
                "alpha_threshold", "alpha_clamp", "t_stop", "sh_clamp")
    px_keys = ("onscreen_px", "tile_edge_px")
    for k in rel_keys:
        if k in margins:
            assert margins[k] >= MIN_REL_MARGIN, f"{name}: {k} margin {margins[k]:.3g} < {MIN_REL_MARGIN}"
    for k in px_keys:
        assert margins[k] >= MIN_PX_MARGIN, f"{name}: {k} margin {margins[k]:.3g} px < {MIN_PX_MARGIN}"
    assert margins["sigma_min"] >= 0, f"{name}: a negative sigma was evaluated"


def finite_difference_check(scene, floats64, seed):
    """Directional derivative of the loss in float64 against central differences."""
    rng = np.random.default_rng(seed)
    colour_key = "sh_coeffs" if "sh_coeffs" in scene else "colors"
    keys = ("means", "quats", "scales", "opacities", colour_key)
    direction = {k: torch.tensor(rng.normal(size=scene[k].shape), dtype=torch.float64) for k in keys}
    # relative steps for scales and opacities (small Gaussians are as sensitive as large ones)
    direction["scales"] = direction["scales"] * torch.tensor(scene["scales"], dtype=torch.float64)
    direction["opacities"] = direction["opacities"] * torch.tensor(scene["opacities"], dtype=torch.float64)
    grad_dot = sum(float(torch.sum(torch.tensor(floats64[f"grad_{k}"]) * direction[k])) for k in keys)
    # small enough that no discrete decision flips (margins >= 1e-5), large enough for float64
    h = 1e-8
    plus = run_scene(scene, torch.float64, perturb=(h, direction))
    minus = run_scene(scene, torch.float64, perturb=(-h, direction))
    fd = (plus - minus) / (2 * h)
    err = abs(fd - grad_dot) / max(abs(grad_dot), 1e-12)
    assert err < 1e-5, f"finite differences {fd} vs autograd {grad_dot} (relative {err:.2e})"
    return err


def brute_force_render(scene, floats, discrete):
    """An independent check of the tile machinery: no tiles, float64 numpy. Every pixel walks all
    Gaussians with radii > 0 in depth order under the same rules as `composite`."""
    width, height = int(scene["width"]), int(scene["height"])
    vis = np.flatnonzero(np.all(discrete["radii"] > 0, axis=1))
    ids = vis[np.argsort(floats["depths"][vis], kind="stable")]
    m = floats["means2d"][ids].astype(np.float64)
    c = floats["conics"][ids].astype(np.float64)
    op = scene["opacities"][ids].astype(np.float64)
    col = (floats["sh_colors"] if "sh_colors" in floats else scene["colors"])[ids].astype(np.float64)
    bg = scene["background"].astype(np.float64)
    image = np.zeros((height, width, 3))
    alphas = np.zeros((height, width, 1))
    count = np.zeros((height, width), np.int32)
    for y in range(height):
        dy = m[:, 1] - (y + 0.5)
        for x in range(width):
            dx = m[:, 0] - (x + 0.5)
            sigma = 0.5 * (c[:, 0] * dx * dx + c[:, 2] * dy * dy) + c[:, 1] * dx * dy
            alpha = np.minimum(MAX_ALPHA, op * np.exp(-sigma))
            T, out = 1.0, np.zeros(3)
            for a, rgb in zip(alpha[(sigma >= 0) & (alpha >= ALPHA_THRESHOLD)],
                              col[(sigma >= 0) & (alpha >= ALPHA_THRESHOLD)]):
                next_T = T * (1.0 - a)
                if next_T <= T_STOP:
                    break
                out += a * T * rgb
                T = next_T
                count[y, x] += 1
            image[y, x] = out + T * bg
            alphas[y, x] = 1.0 - T
    assert np.array_equal(count, discrete["n_contrib"]), "brute force blends other Gaussians"
    return max(float(np.max(np.abs(image - floats["render_colors"]))),
               float(np.max(np.abs(alphas - floats["render_alphas"]))))


def make_arrays(name):
    """The fixture's arrays for one scene, and a report."""
    scene = make_scene(name)
    record = dict(alpha_threshold=np.inf, alpha_clamp=np.inf, t_stop=np.inf, sigma_min=np.inf)
    floats32, discrete32, extras32 = run_scene(scene, torch.float32, record=record)
    floats64, discrete64, extras64 = run_scene(scene, torch.float64)
    if "sh_coeffs" in scene:
        with torch.no_grad():
            vm = torch.tensor(scene["viewmat"])
            raw = _spherical_harmonics(int(scene["sh_degree"]), torch.tensor(scene["means"]) - torch.inverse(vm)[:3, 3],
                                       torch.tensor(scene["sh_coeffs"])) + 0.5
        extras32["sh_raw"] = raw.numpy()
    margins = projection_margins(scene, floats32, discrete32, extras32)
    margins.update({k: v for k, v in record.items() if k in ("alpha_threshold", "alpha_clamp", "t_stop", "sigma_min")})
    check_margins(name, margins)
    for key, value in discrete32.items():
        if key.endswith("isect_ids"):  # low 32 bits: float32 depth bits; compare the tile part and order
            assert np.array_equal(value >> 32, discrete64[key] >> 32), (name, key)
        else:
            assert np.array_equal(value, discrete64[key]), f"{name}: float32 and float64 differ in {key}"
    for key in [k for k in extras32 if k.startswith("opacity_aware_")]:
        assert np.array_equal(extras32[key], floats32[key[len("opacity_aware_"):]]), (
            f"{name}: the opacity-aware tile lists give another {key[len('opacity_aware_'):]}")
    fd_err = finite_difference_check(scene, floats64, seed=SCENES[name][1] + 1)
    brute = brute_force_render(scene, floats32, discrete32)
    assert brute < 1e-5, f"{name}: tile-free per-pixel render differs by {brute}"

    arrays = {k: v for k, v in scene.items()}
    arrays.update({k: v.astype(np.float32) for k, v in floats32.items()})
    arrays.update({f"float64/{k}": v.astype(np.float64) for k, v in floats64.items()})
    arrays.update(discrete32)
    vis = np.all(discrete32["radii"] > 0, axis=1)
    oa_vis = np.all(discrete32["opacity_aware/radii"] > 0, axis=1)
    stats = {
        "N": int(scene["means"].shape[0]),
        "image": f"{int(scene['width'])}x{int(scene['height'])}",
        "tile_size": int(scene["tile_size"]),
        "visible": int(vis.sum()),
        "visible_opacity_aware": int(oa_vis.sum()),
        "n_isects": int(discrete32["isect_ids"].size),
        "n_isects_opacity_aware": int(discrete32["opacity_aware/isect_ids"].size),
        "pixels_stopped": record["pixels_stopped"],
        "alpha_clamped_blends": record["alpha_clamped_blends"],
        "max_n_contrib": int(discrete32["n_contrib"].max()),
        "max_abs_f32_f64_render": float(np.max(np.abs(floats32["render_colors"] - floats64["render_colors"]))),
        "fd_rel_err": fd_err,
        "brute_force_max_abs": brute,
    }
    if "sh_raw" in extras32:
        stats["sh_clamped_visible"] = int(np.sum(extras32["sh_raw"][vis] < 0))
    return arrays, stats, margins


# ----------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------

def write_manifest(out):
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name not in ("manifest.json", "README.md"))
    manifest = {
        "generator": "tools/make_gsplat_reference.py",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "gsplat": gsplat.__version__,
            "numpy": np.__version__,
            "jaxtyping": importlib.metadata.version("jaxtyping"),
            "rich": importlib.metadata.version("rich"),
        },
        "files": {
            str(p.relative_to(out)): {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "bytes": p.stat().st_size}
            for p in files
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def self_check(out):
    """Recompute every scene and compare with the written files, bit for bit; check the manifest."""
    manifest = json.loads((out / "manifest.json").read_text())
    for rel, entry in manifest["files"].items():
        data = (out / rel).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"], rel
    for name in SCENES:
        arrays, _, _ = make_arrays(name)
        with np.load(out / f"{name}.npz") as stored:
            assert sorted(stored.files) == sorted(arrays), name
            for key, value in arrays.items():
                assert stored[key].dtype == value.dtype and np.array_equal(stored[key], value), (name, key)
    return f"self-check: {len(SCENES)} scenes recomputed, identical to the files; manifest hashes match"


def compare_with_cuda(out):
    """Render the stored scenes with gsplat's CUDA path and print the largest differences.

    Needs a CUDA GPU and gsplat's compiled extension; not run where this script was written
    (no GPU there). `gsplat.rasterization(packed=False, rasterize_mode="classic")` with the
    stored inputs; its radii and tile lists are the opacity-aware ones (`opacity_aware/*`)."""
    if not torch.cuda.is_available():
        raise SystemExit("--compare-cuda needs a CUDA GPU and a CUDA build of torch")
    device = torch.device("cuda")
    failures = []
    for name in SCENES:
        z = np.load(out / f"{name}.npz")
        sh = "sh_coeffs" in z.files
        colour_key = "sh_coeffs" if sh else "colors"
        params = {k: torch.tensor(z[k], device=device, requires_grad=True)
                  for k in ("means", "quats", "scales", "opacities", colour_key)}
        colors, alphas, meta = gsplat.rasterization(
            params["means"], params["quats"], params["scales"], params["opacities"], params[colour_key],
            torch.tensor(z["viewmat"], device=device)[None], torch.tensor(z["K"], device=device)[None],
            int(z["width"]), int(z["height"]), near_plane=float(z["near_plane"]), far_plane=float(z["far_plane"]),
            eps2d=float(z["eps2d"]), sh_degree=int(z["sh_degree"]) if sh else None, packed=False,
            tile_size=int(z["tile_size"]), backgrounds=torch.tensor(z["background"], device=device)[None],
            rasterize_mode="classic")
        meta["means2d"].retain_grad()
        meta["conics"].retain_grad()
        loss = (torch.sum(torch.tensor(z["loss_weights_colors"], device=device) * colors[0])
                + torch.sum(torch.tensor(z["loss_weights_alphas"], device=device) * alphas[0]))
        loss.backward()
        vis = np.all(z["radii"] > 0, axis=1)
        got = {
            "render_colors": colors[0], "render_alphas": alphas[0],
            "means2d": meta["means2d"][0], "depths": meta["depths"][0], "conics": meta["conics"][0],
            "grad_means2d": meta["means2d"].grad[0], "grad_conics": meta["conics"].grad[0],
            **{f"grad_{k}": v.grad for k, v in params.items()},
        }
        exact = {
            "opacity_aware/radii": meta["radii"][0], "opacity_aware/isect_ids": meta["isect_ids"],
            "opacity_aware/flatten_ids": meta["flatten_ids"], "opacity_aware/isect_offsets": meta["isect_offsets"][0],
            "opacity_aware/tiles_per_gauss": meta["tiles_per_gauss"][0],
        }
        for key, value in exact.items():
            a, b = value.detach().cpu().numpy().astype(z[key].dtype), z[key]
            if key.endswith("isect_ids"):  # the low 32 bits are CUDA's float32 depth: may differ by an ulp
                a, b = a >> 32, b >> 32
            equal = a.shape == b.shape and np.array_equal(a, b)
            print(f"{name} {key}: {'identical' if equal else 'DIFFERENT'}")
            if not equal:
                failures.append((name, key))
        for key, value in got.items():
            a = value.detach().cpu().numpy().astype(np.float64)
            b = z[key].astype(np.float64)
            if key in ("means2d", "depths", "conics"):  # CUDA leaves culled Gaussians unwritten
                a, b = a[vis], b[vis]
            err = float(np.max(np.abs(a - b))) / max(float(np.max(np.abs(b))), 1e-30)
            print(f"{name} {key}: max |cuda - fixture| / max |fixture| = {err:.2e}")
            if err > 1e-4:
                failures.append((name, key))
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    parser.add_argument("--scenes", nargs="*", default=list(SCENES),
                        help="only these scenes (no manifest, no self-check)")
    parser.add_argument("--compare-cuda", action="store_true",
                        help="write nothing; render the files in --out with gsplat's CUDA path and compare (GPU)")
    args = parser.parse_args()
    if gsplat.__version__ != GSPLAT_VERSION:
        raise SystemExit(f"gsplat {GSPLAT_VERSION} is required (the rules restated here are its), "
                         f"found {gsplat.__version__}")
    if args.compare_cuda:
        failures = compare_with_cuda(args.out)
        raise SystemExit(f"differences beyond 1e-4 (or in tile lists): {failures}" if failures else 0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    for name in args.scenes:
        arrays, stats, margins = make_arrays(name)
        np.savez_compressed(out / f"{name}.npz", **arrays)
        print(name, json.dumps(stats))
        print("  margins", json.dumps({k: float(f"{v:.3g}") for k, v in margins.items()}))
    if sorted(args.scenes) == sorted(SCENES):
        write_manifest(out)
        print(self_check(out))
    print(f"wrote {out} with torch {torch.__version__}, gsplat {gsplat.__version__}, numpy {np.__version__}")


if __name__ == "__main__":
    main()
