"""Camera conventions against the official reference cameras and rays."""

import json

import numpy as np

from vfusion3d_jax import cameras
from conftest import FIXTURE_DIR


def _fixture_views():
    config = json.loads((FIXTURE_DIR / "config.json").read_text())
    return config["inputs"]["render_views_az_el_radius_fxfycxcy"]


def test_canonical_source_camera_matches_official(reference):
    np.testing.assert_allclose(cameras.canonical_source_camera(), reference["input_source_camera"][0], atol=1e-7)


def test_orbit_source_camera_matches_official(reference):
    cam2world = cameras.orbit_cam2world(30.0, 20.0, 2.0)
    encoded = cameras.source_camera(cam2world, cameras.intrinsics_matrix(*cameras.DEFAULT_INTRINSICS))
    np.testing.assert_allclose(encoded, reference["input_source_camera"][1], atol=1e-6)


def test_render_cameras_match_official(reference):
    for n, views in enumerate(_fixture_views()):
        for m, (az, el, radius, intr) in enumerate(views):
            encoded = cameras.render_camera(cameras.orbit_cam2world(az, el, radius), cameras.intrinsics_matrix(*intr))
            np.testing.assert_allclose(encoded, reference["input_render_cameras"][n, m], atol=1e-6)


def test_pixel_rays_match_official(reference):
    cam2world, intrinsics = cameras.split_render_camera(reference["input_render_cameras"].reshape(6, 25))
    origins, directions = cameras.pixel_rays(cam2world, intrinsics, resolution=8)
    np.testing.assert_allclose(origins, reference["render8_ray_origins"], atol=1e-6)
    np.testing.assert_allclose(directions, reference["render8_ray_directions"], atol=1e-6)


def test_crop_rays_are_a_window_of_the_full_image(reference):
    cam2world, intrinsics = cameras.split_render_camera(reference["input_render_cameras"].reshape(6, 25))
    _, full = cameras.pixel_rays(cam2world, intrinsics, resolution=12)
    _, crop = cameras.pixel_rays(cam2world, intrinsics, resolution=12, crop_size=6, crop_start=(2, 4))
    full = np.asarray(full).reshape(6, 12, 12, 3)
    np.testing.assert_allclose(np.asarray(crop).reshape(6, 6, 6, 3), full[:, 2:8, 4:10], atol=1e-7)


def test_projection_inverts_rays():
    cam2world = cameras.orbit_cam2world(40.0, 25.0, 2.0)
    intrinsics = cameras.intrinsics_matrix(0.8, 0.7, 0.45, 0.55)
    origins, directions = cameras.pixel_rays(cam2world, intrinsics, resolution=4)
    points = np.asarray(origins + 1.3 * directions)
    uv = cameras.project_points(points, cam2world, intrinsics)
    centres = (np.arange(4) + 0.5) / 4
    expected = np.stack(np.meshgrid(centres, centres, indexing="ij")[::-1], -1).reshape(-1, 2)
    np.testing.assert_allclose(uv, expected, atol=1e-5)


def test_orbit_views_are_evenly_spaced_and_look_at_origin():
    cam2world = cameras.orbit_cam2world(cameras.orbit_azimuths(16), 30.0, 2.0)
    assert cam2world.shape == (16, 4, 4)
    np.testing.assert_allclose(np.linalg.norm(cam2world[:, :3, 3], axis=-1), 2.0, rtol=1e-6)
    # The camera's -z axis points at the origin.
    np.testing.assert_allclose(-cam2world[:, :3, 2], -cam2world[:, :3, 3] / 2.0, atol=1e-6)
    # Rotations are orthonormal and right-handed.
    rotation = cam2world[:, :3, :3]
    np.testing.assert_allclose(rotation @ rotation.transpose(0, 2, 1), np.broadcast_to(np.eye(3), (16, 3, 3)), atol=1e-6)
    np.testing.assert_allclose(np.linalg.det(rotation), 1.0, atol=1e-6)


def test_mirrored_cameras_see_the_mirrored_world_mirrored_left_right():
    cam2world = cameras.orbit_cam2world(np.array([10.0, 130.0, 250.0]), np.array([5.0, 30.0, -20.0]), 2.0)
    intrinsics = np.broadcast_to(cameras.intrinsics_matrix(0.8, 0.7, 0.45, 0.55), (3, 3, 3))
    mirrored, mirrored_intrinsics = cameras.mirror_cameras(cam2world, intrinsics)
    # Still rotations (right-handed), at the mirrored positions.
    np.testing.assert_allclose(np.linalg.det(mirrored[:, :3, :3]), 1.0, atol=1e-6)
    np.testing.assert_allclose(mirrored[:, :3, 3], cam2world[:, :3, 3] * [1.0, -1.0, 1.0])
    points = np.random.default_rng(0).uniform(-0.5, 0.5, (3, 20, 3))
    for view in range(3):
        uv = cameras.project_points(points[view], cam2world[view], intrinsics[view])
        uv_mirrored = cameras.project_points(points[view] * [1.0, -1.0, 1.0], mirrored[view], mirrored_intrinsics[view])
        np.testing.assert_allclose(uv_mirrored, np.stack([1.0 - uv[:, 0], uv[:, 1]], -1), atol=1e-5)
    # The canonical source camera sits on the mirror's plane: mirroring leaves it as it is.
    canonical = cameras.CANONICAL_SOURCE_CAM2WORLD
    np.testing.assert_allclose(cameras.mirror_cameras(canonical, intrinsics[0])[0], canonical)
