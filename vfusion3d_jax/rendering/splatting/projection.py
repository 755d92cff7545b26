"""3D Gaussians -> 2D screen-space Gaussians: gsplat 1.5.3's pinhole EWA projection, classic mode.

Per Gaussian (quaternion (w, x, y, z), linear scales, world-space mean) and one camera (a 4x4
world-to-camera OpenCV matrix and 3x3 intrinsics), as gsplat's `_quat_scale_to_covar_preci`,
`_world_to_cam`, `_persp_proj` and `_fully_fused_projection` (and the CUDA kernel
`projection_ewa_3dgs_fused_fwd_kernel` they mirror) compute them:

* the covariance R S S^T R^T, with R from the normalised quaternion;
* the mean and covariance in camera space;
* the EWA projection with the Jacobian of the pinhole at the mean, whose x/z and y/z are clamped
  to 1.3x the field of view (the clamp only bends the Jacobian, never the projected mean);
* a low-pass filter: eps2d added to the diagonal of the 2D covariance (classic mode: the
  opacity is not compensated);
* the conic (inverse 2D covariance) and per-axis radii ceil(extent sqrt(cov2d_ii)).

The extent is 3.33 standard deviations in gsplat's pure-torch `_fully_fused_projection`. Given
the opacities, it is the opacity-aware min(3.33, sqrt(2 ln(255 opacity))) of the CUDA kernel,
which `gsplat.rasterization()` always uses: the box where opacity exp(-sigma) can still reach
1/255, so fewer tiles, and Gaussians with opacity < 1/255 are culled. Both give the same image:
outside either box no pixel passes the compositing threshold.

A Gaussian is culled (radii 0, so no tile and no pixel sees it) when its depth is not inside
(near_plane, far_plane), when the blurred 2D covariance is not positive definite, (with
opacities) when its opacity is below 1/255, or when its radius box lies entirely outside the image.

Skew in the intrinsics (K[0, 1]) is ignored, as gsplat's CUDA kernels do. Everything is traced
with static shapes; radii carry no gradient (they only select tiles).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

# gsplat: the radius covers 3.33 standard deviations, where opacity * exp(-sigma) < 1/255 for any
# opacity <= 1, so no pixel outside the box could pass the compositing threshold anyway.
RADIUS_SIGMAS = 3.33
# The faintest alpha compositing draws; the opacity-aware box ends where opacity exp(-sigma) hits it.
ALPHA_THRESHOLD = 1.0 / 255.0
# gsplat's `_persp_proj`: the Jacobian is evaluated at most 30% of the half field of view outside
# the image, which keeps Gaussians far off to the side from being smeared across it.
FOV_CLAMP_MARGIN = 0.3
# torch.nn.functional.normalize's floor on the norm.
NORMALIZE_EPS = 1e-12

# Full float32 products on every backend (TPUs and GPUs default to fewer bits for matmuls), since
# radii and tiles are ceil/floor of these values.
matmul = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)


class Projection(NamedTuple):
    """One camera's view of N Gaussians. For culled Gaussians (`visible` False) means2d and conics
    are 0 (as gsplat's CUDA kernel leaves them); depths are always the camera-space z."""

    means2d: jax.Array  # [N, 2] pixel coordinates (pixel centres at +0.5)
    depths: jax.Array  # [N] camera-space z
    conics: jax.Array  # [N, 3] upper triangle (a, b, c) of the inverse blurred 2D covariance
    radii: jax.Array  # [N, 2] int32, 0 for culled Gaussians
    visible: jax.Array  # [N] bool, radii > 0


def normalize(vectors: jax.Array, axis: int = -1) -> jax.Array:
    """`vectors / max(|vectors|, 1e-12)` (torch's F.normalize), with a finite gradient at 0."""
    squared = jnp.sum(vectors * vectors, axis=axis, keepdims=True)
    # sqrt of a floored square: the same value as max(norm, eps), but no 0/0 in the backward pass.
    return vectors / jnp.sqrt(jnp.maximum(squared, NORMALIZE_EPS * NORMALIZE_EPS))


def quaternion_to_rotation(quats: jax.Array) -> jax.Array:
    """Rotation matrices [..., 3, 3] of quaternions [..., 4] (w, x, y, z), normalised first."""
    w, x, y, z = jnp.moveaxis(normalize(quats), -1, 0)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]
    return jnp.stack(rows, axis=-1).reshape(quats.shape[:-1] + (3, 3))


def covariance_3d(quats: jax.Array, scales: jax.Array) -> jax.Array:
    """World-space covariances [..., 3, 3] = R S S^T R^T of quaternions [..., 4] and scales [..., 3]."""
    scaled_rotation = quaternion_to_rotation(quats) * scales[..., None, :]  # R S: column j scaled by s_j
    return matmul(scaled_rotation, jnp.swapaxes(scaled_rotation, -1, -2))


def world_to_camera(means: jax.Array, covariances: jax.Array, viewmat: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Means [N, 3] and covariances [N, 3, 3] in the camera frame of a 4x4 world-to-camera matrix."""
    rotation, translation = viewmat[:3, :3], viewmat[:3, 3]
    means_camera = matmul(means, rotation.T) + translation
    covariances_camera = matmul(matmul(rotation, covariances), rotation.T)
    return means_camera, covariances_camera


def perspective_projection(means_camera: jax.Array, covariances_camera: jax.Array, K: jax.Array, width: int,
                           height: int) -> tuple[jax.Array, jax.Array]:
    """Pinhole EWA projection: camera-space means [N, 3] and covariances [N, 3, 3] -> pixel means
    [N, 2] and 2D covariances [N, 2, 2] (before the low-pass filter). z must be non-zero."""
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    x, y, z = means_camera[:, 0], means_camera[:, 1], means_camera[:, 2]
    tan_fov_x, tan_fov_y = 0.5 * width / fx, 0.5 * height / fy
    limit_x_pos = (width - cx) / fx + FOV_CLAMP_MARGIN * tan_fov_x
    limit_x_neg = cx / fx + FOV_CLAMP_MARGIN * tan_fov_x
    limit_y_pos = (height - cy) / fy + FOV_CLAMP_MARGIN * tan_fov_y
    limit_y_neg = cy / fy + FOV_CLAMP_MARGIN * tan_fov_y
    # jnp.clip passes the gradient inside the limits only, as gsplat's `persp_proj_vjp` does.
    clamped_x = z * jnp.clip(x / z, -limit_x_neg, limit_x_pos)
    clamped_y = z * jnp.clip(y / z, -limit_y_neg, limit_y_pos)
    zeros = jnp.zeros_like(z)
    jacobian = jnp.stack([
        jnp.stack([fx / z, zeros, -fx * clamped_x / (z * z)], axis=-1),
        jnp.stack([zeros, fy / z, -fy * clamped_y / (z * z)], axis=-1),
    ], axis=-2)  # [N, 2, 3]
    covariances_2d = matmul(matmul(jacobian, covariances_camera), jnp.swapaxes(jacobian, -1, -2))
    means2d = jnp.stack([fx * x / z + cx, fy * y / z + cy], axis=-1)
    return means2d, covariances_2d


def project_gaussians(means: jax.Array, quats: jax.Array, scales: jax.Array, viewmat: jax.Array, K: jax.Array,
                      width: int, height: int, *, opacities: jax.Array | None = None, eps2d: float = 0.3,
                      near_plane: float = 0.01, far_plane: float = 1e10) -> Projection:
    """gsplat's projection (pinhole, classic) for N Gaussians and one camera: with `opacities` [N]
    that of `rasterization()` (opacity-aware radii), without them `_fully_fused_projection`'s."""
    means_camera, covariances_camera = world_to_camera(means, covariance_3d(quats, scales), viewmat)
    depths = means_camera[:, 2]
    in_depth_range = (depths > near_plane) & (depths < far_plane)
    # Culled Gaussians are projected at depth 1 instead: their outputs are discarded below, and a
    # z of 0 would put inf into the discarded branch, whose gradient would then be 0 * inf = NaN.
    safe_z = jnp.where(in_depth_range, depths, jnp.ones_like(depths))
    means2d, covariances_2d = perspective_projection(means_camera.at[:, 2].set(safe_z), covariances_camera, K,
                                                     width, height)
    a = covariances_2d[:, 0, 0] + eps2d
    d = covariances_2d[:, 1, 1] + eps2d
    b, c = covariances_2d[:, 0, 1], covariances_2d[:, 1, 0]
    determinant = a * d - b * c
    positive = determinant > 0
    safe_determinant = jnp.where(positive, determinant, jnp.ones_like(determinant))
    conics = jnp.stack([d, -(b + c) / 2, a], axis=-1) / safe_determinant[:, None]

    # The box is selection only (no gradient), computed in the same order as gsplat's.
    extent, opaque_enough = jnp.asarray(RADIUS_SIGMAS, means.dtype), True
    if opacities is not None:
        opacities = jax.lax.stop_gradient(opacities)
        opaque_enough = opacities >= ALPHA_THRESHOLD
        aware = jnp.sqrt(2 * jnp.log(jnp.maximum(opacities, ALPHA_THRESHOLD) / ALPHA_THRESHOLD))
        extent = jnp.minimum(aware, RADIUS_SIGMAS)[:, None]
    radius = jnp.ceil(extent * jnp.sqrt(jax.lax.stop_gradient(jnp.stack([a, d], axis=-1))))
    center = jax.lax.stop_gradient(means2d)
    inside_image = ((center[:, 0] + radius[:, 0] > 0) & (center[:, 0] - radius[:, 0] < width)
                    & (center[:, 1] + radius[:, 1] > 0) & (center[:, 1] - radius[:, 1] < height))
    visible = in_depth_range & positive & opaque_enough & inside_image & jnp.all(radius > 0, axis=-1)
    radii = jnp.where(visible[:, None], radius, 0).astype(jnp.int32)
    return Projection(
        means2d=jnp.where(visible[:, None], means2d, 0),
        depths=depths,
        conics=jnp.where(visible[:, None], conics, 0),
        radii=radii,
        visible=visible,
    )
