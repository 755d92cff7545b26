"""Camera conventions of the official VFusion3D model, so its weights work unchanged.

* World: +z is up; objects live in the box [-1, 1]^3.
* cam2world: 4x4, OpenGL/Blender camera axes (the camera looks along its -z, +y is
  image-up, +x is image-right). Rays are lifted in OpenCV axes by right-multiplying
  with diag(1, -1, -1, 1), exactly as the official ray sampler does.
* Intrinsics are normalised by the image size: K = [[fx/w, 0, cx/w], [0, fy/h, cy/h], [0, 0, 1]].
* Source camera (the encoder's condition), 16-d: cam2world[:3, :4] row-major, then fx, fy, cx, cy.
* Render camera, 25-d: cam2world 4x4 row-major, then K 3x3 row-major.

Pose and encoding helpers are NumPy (host side: data rendering, pipelines); ray
generation is jax.numpy (device side: it runs inside the jitted renderer).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# The official inferrer's intrinsics: fx = fy = 384, cx = cy = 256 for a 512 image.
DEFAULT_INTRINSICS = (0.75, 0.75, 0.5, 0.5)
# Official canonical source camera: at (1, 0, 0), distance 1, looking at the origin, +z up.
CANONICAL_SOURCE_CAM2WORLD = np.array(
    [[0, 0, 1, 1], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=np.float32
)
# Official turntable radius at inference.
RENDER_RADIUS = 1.5
OPENGL_TO_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0]).astype(np.float32)


def _normalize(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def look_at_cam2world(position, target=(0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """cam2world (..., 4, 4) of cameras at `position` looking at `target` (official construction).

    Columns: x = normalize(up x z), y = normalize(z x x), z = normalize(position - target).
    Undefined when the viewing direction is parallel to `up` (a camera straight above).
    """
    position = np.asarray(position, dtype=np.float64)
    z = _normalize(position - np.asarray(target, dtype=np.float64))
    x = _normalize(np.cross(np.broadcast_to(np.asarray(up, np.float64), z.shape), z))
    y = _normalize(np.cross(z, x))
    pose = np.zeros(position.shape[:-1] + (4, 4))
    pose[..., :3, 0], pose[..., :3, 1], pose[..., :3, 2] = x, y, z
    pose[..., :3, 3] = position
    pose[..., 3, 3] = 1.0
    return pose.astype(np.float32)


def orbit_position(azimuth_deg, elevation_deg, radius) -> np.ndarray:
    """(..., 3) points at `radius` from the origin; azimuth from +x towards +y, elevation towards +z."""
    az = np.deg2rad(np.asarray(azimuth_deg, np.float64))
    el = np.deg2rad(np.asarray(elevation_deg, np.float64))
    radius = np.asarray(radius, np.float64)
    return np.stack(
        np.broadcast_arrays(radius * np.cos(az) * np.cos(el), radius * np.sin(az) * np.cos(el), radius * np.sin(el)),
        axis=-1,
    )


def orbit_cam2world(azimuth_deg, elevation_deg, radius) -> np.ndarray:
    """cam2world of cameras on a sphere looking at the origin."""
    return look_at_cam2world(orbit_position(azimuth_deg, elevation_deg, radius))


def orbit_azimuths(num_views: int, offset_deg: float = 0.0) -> np.ndarray:
    """`num_views` evenly spaced azimuths in degrees, starting at `offset_deg`."""
    return offset_deg + 360.0 * np.arange(num_views) / num_views


def intrinsics_matrix(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """Normalised 3x3 K from normalised focal lengths and principal point."""
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=np.float32)


def fov_to_focal(fov_deg: float) -> float:
    """Normalised focal length of a pinhole camera with the given full field of view."""
    return 0.5 / np.tan(np.deg2rad(fov_deg) / 2)


def mirror_cameras(cam2world: np.ndarray, intrinsics: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cameras (..., 4, 4), (..., 3, 3) of the world mirrored across its y = 0 plane, under which
    every image is the original one mirrored left-right: cam2world' = M·cam2world·F with
    M = diag(1, -1, 1, 1) (the world's reflection) and F = diag(-1, 1, 1, 1) (the camera's x axis
    turned back, so the pose stays a rotation), and the principal point's cx -> 1 - cx.
    """
    flip_world = np.diag([1.0, -1.0, 1.0, 1.0]).astype(np.float32)
    flip_camera = np.diag([-1.0, 1.0, 1.0, 1.0]).astype(np.float32)
    intrinsics = np.array(intrinsics, dtype=np.float32)
    intrinsics[..., 0, 2] = 1.0 - intrinsics[..., 0, 2]
    return (flip_world @ np.asarray(cam2world, np.float32) @ flip_camera).astype(np.float32), intrinsics


def source_camera(cam2world: np.ndarray, intrinsics: np.ndarray) -> np.ndarray:
    """16-d source-camera encoding: (..., 4, 4), (..., 3, 3) -> (..., 16)."""
    cam2world, intrinsics = np.asarray(cam2world), np.asarray(intrinsics)
    batch = np.broadcast_shapes(cam2world.shape[:-2], intrinsics.shape[:-2])
    cam2world = np.broadcast_to(cam2world, batch + (4, 4))
    intrinsics = np.broadcast_to(intrinsics, batch + (3, 3))
    focal_and_centre = np.stack(
        [intrinsics[..., 0, 0], intrinsics[..., 1, 1], intrinsics[..., 0, 2], intrinsics[..., 1, 2]], axis=-1
    )
    return np.concatenate([cam2world[..., :3, :].reshape(batch + (12,)), focal_and_centre], -1).astype(np.float32)


def render_camera(cam2world: np.ndarray, intrinsics: np.ndarray) -> np.ndarray:
    """25-d render-camera encoding: (..., 4, 4), (..., 3, 3) -> (..., 25)."""
    cam2world, intrinsics = np.asarray(cam2world), np.asarray(intrinsics)
    batch = np.broadcast_shapes(cam2world.shape[:-2], intrinsics.shape[:-2])
    return np.concatenate(
        [np.broadcast_to(cam2world, batch + (4, 4)).reshape(batch + (16,)),
         np.broadcast_to(intrinsics, batch + (3, 3)).reshape(batch + (9,))],
        axis=-1,
    ).astype(np.float32)


def split_render_camera(cameras):
    """(..., 25) -> cam2world (..., 4, 4), intrinsics (..., 3, 3); works on NumPy and JAX arrays."""
    return cameras[..., :16].reshape(cameras.shape[:-1] + (4, 4)), cameras[..., 16:25].reshape(cameras.shape[:-1] + (3, 3))


def canonical_source_camera(intrinsics=DEFAULT_INTRINSICS) -> np.ndarray:
    """The official inferrer's 16-d source camera."""
    return source_camera(CANONICAL_SOURCE_CAM2WORLD, intrinsics_matrix(*intrinsics))


def turntable_cameras(num_views: int, elevation_deg: float = 0.0, radius: float = RENDER_RADIUS,
                      intrinsics=DEFAULT_INTRINSICS, azimuth_offset_deg: float = 0.0) -> np.ndarray:
    """(num_views, 25) render cameras on a circle around the object (the inferrer's video path)."""
    cam2world = orbit_cam2world(orbit_azimuths(num_views, azimuth_offset_deg), elevation_deg, radius)
    return render_camera(cam2world, intrinsics_matrix(*intrinsics))


def project_points(points: np.ndarray, cam2world: np.ndarray, intrinsics: np.ndarray) -> np.ndarray:
    """Pixel coordinates in [0, 1]^2 (x right, y down) of world points (..., 3); NumPy.

    The inverse of `pixel_rays`' lifting; used to check renderers against cameras.
    """
    world2cam = np.linalg.inv(cam2world.astype(np.float64) @ OPENGL_TO_OPENCV)
    homogeneous = np.concatenate([points, np.ones(points.shape[:-1] + (1,))], -1)
    in_camera = homogeneous @ world2cam.T
    uv1 = (in_camera[..., :3] / in_camera[..., 2:3]) @ intrinsics.astype(np.float64).T
    return uv1[..., :2]


def pixel_rays(cam2world: jnp.ndarray, intrinsics: jnp.ndarray, resolution: int,
               crop_size: int | None = None, crop_start=(0, 0)):
    """Rays through pixel centres of a `resolution`^2 image, or of a crop of it; jax.numpy.

    cam2world (..., 4, 4), intrinsics (..., 3, 3) -> origins, unit directions (..., P, 3) with
    P = crop_size^2 pixels in row-major order. `crop_start` = (start_y, start_x) may be traced
    (random training patches); `resolution` and `crop_size` are static.
    """
    crop_size = resolution if crop_size is None else crop_size
    start_y, start_x = crop_start
    rows = (jnp.arange(crop_size) + start_y).astype(jnp.float32)
    cols = (jnp.arange(crop_size) + start_x).astype(jnp.float32)
    y, x = jnp.meshgrid(rows * (1.0 / resolution) + 0.5 / resolution,
                        cols * (1.0 / resolution) + 0.5 / resolution, indexing="ij")
    x, y = x.reshape(-1), y.reshape(-1)
    fx, fy = intrinsics[..., 0, 0, None], intrinsics[..., 1, 1, None]
    cx, cy = intrinsics[..., 0, 2, None], intrinsics[..., 1, 2, None]
    skew = intrinsics[..., 0, 1, None]
    x_lift = (x - cx + cy * skew / fy - skew * y / fy) / fx
    y_lift = (y - cy) / fy
    cam_points = jnp.stack([x_lift, y_lift, jnp.ones_like(x_lift)], axis=-1)  # (..., P, 3), OpenCV axes
    rotation = (cam2world @ OPENGL_TO_OPENCV)[..., :3, :3]
    origins = cam2world[..., None, :3, 3]
    # The official sampler lifts to a world point and subtracts the origin; same direction.
    directions = jnp.einsum("...ij,...pj->...pi", rotation, cam_points)
    directions = directions / jnp.linalg.norm(directions, axis=-1, keepdims=True)
    return jnp.broadcast_to(origins, directions.shape), directions
