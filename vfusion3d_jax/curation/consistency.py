"""Multi-view consistency of an orbit's silhouettes, without any model: the visual hull.

The silhouettes of one 3D object seen from known cameras are consistent: carve the volume
that projects inside every silhouette (the visual hull) and each silhouette is the hull's own
projection. Frames that do not belong together (shuffled, another object's view, mirrored, a
shape that changes along the orbit) carve a hull whose projections miss parts of them, so
each frame's IoU with the hull's projection drops. A static blob scores high too, so this is
one term of the quality score, never the whole.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from vfusion3d_jax import cameras


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks; 1 when both are empty."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def visual_hull(masks: np.ndarray, render_cameras: np.ndarray, *, resolution: int = 48,
                bound: float = 1.0) -> np.ndarray:
    """bool (R, R, R) voxels of [-bound, bound]³ whose centres project inside every mask (F, H, W)
    from the cameras (F, 25) (`cameras.render_camera` layout)."""
    side = masks.shape[1]
    grid = (np.arange(resolution) + 0.5) / resolution * 2.0 * bound - bound
    voxels = np.stack(np.meshgrid(grid, grid, grid, indexing="ij"), -1).reshape(-1, 3)
    cam2world, intrinsics = cameras.split_render_camera(np.asarray(render_cameras, np.float64))
    inside = np.ones(len(voxels), bool)
    for mask, c2w, k in zip(masks, cam2world, intrinsics):
        uv = cameras.project_points(voxels, c2w, k)
        col, row = np.floor(uv[:, 0] * side).astype(int), np.floor(uv[:, 1] * side).astype(int)
        visible = (col >= 0) & (col < side) & (row >= 0) & (row < side)
        inside &= visible & mask[np.clip(row, 0, side - 1), np.clip(col, 0, side - 1)]
    return inside.reshape((resolution,) * 3)


def hull_silhouettes(hull: np.ndarray, render_cameras: np.ndarray, side: int, *, bound: float = 1.0,
                     samples: int = 96) -> np.ndarray:
    """bool (F, side, side): the pixels whose ray (through the pixel centre, over the cube's
    depth range) meets an occupied voxel of `hull`."""
    resolution = hull.shape[0]
    cam2world, intrinsics = cameras.split_render_camera(np.asarray(render_cameras, np.float32))
    depths = np.linspace(0.0, 1.0, samples)
    views = []
    for c2w, k in zip(cam2world, intrinsics):
        origins, directions = (np.asarray(x) for x in cameras.pixel_rays(jnp.asarray(c2w), jnp.asarray(k), side))
        distance = np.linalg.norm(origins[0])
        reach = np.sqrt(3.0) * bound  # the cube's half diagonal: every voxel lies within it
        points = origins[:, None] + directions[:, None] * (distance - reach + 2 * reach * depths)[None, :, None]
        cells = np.floor((points + bound) / (2 * bound) * resolution).astype(int)
        valid = np.all((cells >= 0) & (cells < resolution), axis=-1)
        cells = np.clip(cells, 0, resolution - 1)
        views.append(np.any(valid & hull[cells[..., 0], cells[..., 1], cells[..., 2]], axis=1).reshape(side, side))
    return np.stack(views)


def hull_ious(masks: np.ndarray, render_cameras: np.ndarray, *, resolution: int = 48, bound: float = 1.0
              ) -> np.ndarray:
    """float (F,): each silhouette's IoU with the projection of the hull carved from all of them;
    1 everywhere for silhouettes of one rigid object seen from those cameras (up to voxel size)."""
    hull = visual_hull(masks, render_cameras, resolution=resolution, bound=bound)
    projected = hull_silhouettes(hull, render_cameras, masks.shape[1], bound=bound)
    return np.array([iou(p, m) for p, m in zip(projected, masks)])
