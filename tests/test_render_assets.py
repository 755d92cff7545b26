"""Rendering real assets into orbit TFRecords: cameras agree with the rasteriser, datasets are
deterministic, resumable and robust to broken assets, and inspect-data reads them back."""

import math
import os

import numpy as np
import pytest
import trimesh

from vfusion3d_jax import cameras
from vfusion3d_jax.configs import load_config
from vfusion3d_jax.curation.consistency import iou
from vfusion3d_jax.data import assets
from vfusion3d_jax.data.example import decode_orbit, read_metadata
from vfusion3d_jax.data.inspect import inspect_dataset
from vfusion3d_jax.data.rasterize import Rasterizer
from vfusion3d_jax.data.render_assets import (OrbitSettings, framing_extent, orbit_cameras, render_dataset,
                                              surface_points)
from vfusion3d_jax.data.tfrecord import iterate_records


def _builtin(name: str) -> assets.AssetSpec:
    return next(s for s in assets.pybullet_objects() if s.object_id == f"pybullet_data/{name}")


def _world_vertices(scene: trimesh.Scene) -> np.ndarray:
    return np.concatenate([g.vertices for g in scene.dump(concatenate=False)])


def _test_cameras():
    """Orbit views plus one with an off-centre principal point and unequal focal lengths."""
    cam2world = list(cameras.orbit_cam2world(cameras.orbit_azimuths(3, 20.0), 30.0, 1.5))
    intrinsics = [cameras.intrinsics_matrix(0.75, 0.75, 0.5, 0.5)] * 3
    cam2world.append(cameras.orbit_cam2world(200.0, 10.0, 1.4))
    intrinsics.append(cameras.intrinsics_matrix(0.8, 0.65, 0.42, 0.58))
    return np.stack(cam2world), np.stack(intrinsics)


@pytest.mark.parametrize("spec", [assets.procedural_assets(1, seed=3)[0], _builtin("duck_vhacd")],
                         ids=lambda s: s.object_id)
@pytest.mark.parametrize("resolution", [(40, 40), (36, 52)], ids=["square", "wide"])
def test_projected_vertices_match_rendered_mask(spec, resolution):
    scene = assets.load_asset(spec, object_size=0.9)
    cam2world, intrinsics = _test_cameras()
    with Rasterizer() as rasterizer:
        views = rasterizer.render(scene, cam2world, intrinsics, resolution)
    height, width = resolution
    assert views.rgba.shape == (4, height, width, 4)
    vertices = _world_vertices(scene)
    for view, (pose, camera) in enumerate(zip(cam2world, intrinsics)):
        uv = cameras.project_points(vertices, pose, camera) * [width, height]
        rows, cols = np.nonzero(views.rgba[view, ..., 3])
        # The mask covers pixels [min, max + 1) in each direction; vertices bound the silhouette.
        mask_box = np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
        projected_box = np.concatenate([uv.min(axis=0), uv.max(axis=0)])
        np.testing.assert_allclose(mask_box, projected_box, atol=0.75, err_msg=f"view {view}")


def test_mirrored_cameras_see_the_mirrored_mesh_as_each_view_flipped_left_right():
    """The training pipeline's mirror (`random_mirror`) keeps images and cameras consistent: the
    rasteriser's views of the mirrored object from cameras.mirror_cameras are the views flipped."""
    scene = assets.load_asset(assets.procedural_assets(1, seed=3)[0], object_size=0.9)
    mirrored = trimesh.Scene([trimesh.Trimesh(g.vertices * [1.0, -1.0, 1.0], g.faces[:, ::-1])
                              for g in scene.dump(concatenate=False)])
    cam2world, intrinsics = _test_cameras()  # one with an off-centre principal point
    with Rasterizer() as rasterizer:
        alpha = rasterizer.render(scene, cam2world, intrinsics, 48).rgba[..., 3] > 0
        mirrored_alpha = rasterizer.render(mirrored, *cameras.mirror_cameras(cam2world, intrinsics), 48).rgba[..., 3] > 0
    for view in range(len(cam2world)):
        assert iou(alpha[view, :, ::-1], mirrored_alpha[view]) > 0.99, view
        # Against the unflipped view the silhouettes differ: the object is not mirror-symmetric here.
        assert iou(alpha[view], mirrored_alpha[view]) < 0.9, view


def test_world_axes_land_on_the_expected_image_sides():
    """Hand-derived expectations, independent of project_points: a convention slip fails here."""
    grey = trimesh.creation.box(extents=[0.4, 0.4, 0.4])
    grey.visual.face_colors = [128, 128, 128, 255]
    scene = trimesh.Scene(grey)
    for position, colour in [([1.0, 0, 0], [255, 0, 0]), ([0, 0, 1.0], [0, 0, 255])]:  # red +x, blue +z
        marker = trimesh.creation.box(extents=[0.2, 0.2, 0.2])
        marker.visual.face_colors = colour + [255]
        marker.apply_translation(np.array(position) * 0.4)
        scene.add_geometry(marker)
    # Camera on +y looking at the origin, +z up: image right is world -x, image up is world +z.
    cam2world = cameras.orbit_cam2world([90.0], 0.0, 1.5)
    with Rasterizer() as rasterizer:
        rgba = rasterizer.render(scene, cam2world, cameras.intrinsics_matrix(0.75, 0.75, 0.5, 0.5), 48).rgba[0]
    rgb = rgba[..., :3].astype(int)

    def centre_of(channel: int):
        others = [c for c in range(3) if c != channel]
        rows, cols = np.nonzero((rgb[..., channel] > 2 * rgb[..., others[0]] + 20) &
                                (rgb[..., channel] > 2 * rgb[..., others[1]] + 20))
        assert rows.size, f"no pixels of colour channel {channel}"
        return rows.mean(), cols.mean()

    red_row, red_col = centre_of(0)
    blue_row, blue_col = centre_of(2)
    assert red_col < 24 - 5 and abs(red_row - 24) < 4  # +x is on the left of this view
    assert blue_row < 24 - 5 and abs(blue_col - 24) < 4  # +z is up


def test_depth_is_metric_and_background_is_white():
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.45)
    cam2world = cameras.orbit_cam2world([0.0], 0.0, 1.5)
    with Rasterizer() as rasterizer:
        views = rasterizer.render(sphere, cam2world, cameras.intrinsics_matrix(0.75, 0.75, 0.5, 0.5), 33)
    assert views.depth[0, 16, 16] == pytest.approx(1.05, abs=0.01)
    assert np.isinf(views.depth[0, 0, 0])
    assert (views.rgba[0, 0, 0] == [255, 255, 255, 0]).all()


def test_builtin_texture_is_drawn():
    scene = assets.load_asset(_builtin("soccerball"), object_size=0.9)
    with Rasterizer(supersample=2) as rasterizer:
        rgba = rasterizer.render(scene, cameras.orbit_cam2world([30.0], 20.0, 1.5),
                                 cameras.intrinsics_matrix(0.75, 0.75, 0.5, 0.5), 48).rgba[0]
    grey = rgba[..., :3].mean(axis=-1)[rgba[..., 3] == 255]
    assert np.mean(grey < 60) > 0.1 and np.mean(grey > 150) > 0.3  # black and white patches


def test_vertex_colours_are_drawn_per_face():
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.45)
    top = sphere.vertices[:, 2] > 0
    sphere.visual.vertex_colors = np.where(top[:, None], [[230, 20, 20, 255]], [[20, 20, 230, 255]])
    with Rasterizer() as rasterizer:
        rgb = rasterizer.render(sphere, cameras.orbit_cam2world([0.0], 0.0, 1.5),
                                cameras.intrinsics_matrix(0.75, 0.75, 0.5, 0.5), 32).rgba[0, ..., :3].astype(int)
    assert rgb[10, 16, 0] > 2 * rgb[10, 16, 2]  # upper half red
    assert rgb[22, 16, 2] > 2 * rgb[22, 16, 0]  # lower half blue


def test_asset_listing_and_normalisation():
    objects = assets.pybullet_objects()
    ids = [s.object_id for s in objects]
    assert ids[:3] == ["pybullet_data/duck_vhacd", "pybullet_data/soccerball", "pybullet_data/teddy_vhacd"]
    assert not any("plane" in i or "terrain" in i for i in ids)
    assert "pybullet_data/cube_small" not in ids and "pybullet_data/teddy_large" not in ids  # duplicates
    assert len(assets.pybullet_blobs()) == 1000
    for spec in [_builtin("duck_vhacd"), _builtin("table/table"), assets.procedural_assets(1, seed=0)[0]]:
        low, high = assets.load_asset(spec, object_size=0.9).bounds
        np.testing.assert_allclose(low + high, 0.0, atol=1e-6)
        assert np.max(high - low) == pytest.approx(0.9)
    # The duck is stored y-up (extents x 1.65, y 1.54, z 1.15): turned z-up, it stands tall.
    duck_extent = np.ptp(_world_vertices(assets.load_asset(_builtin("duck_vhacd"), 0.9)), axis=0)
    assert duck_extent[2] > 0.85 * duck_extent.max()
    np.testing.assert_allclose(assets.up_axis_rotation("+y")[:3, :3], [[1, 0, 0], [0, 0, -1], [0, 1, 0]], atol=1e-12)
    for axis in assets.UP_AXES:  # every up axis lands on +z by a proper rotation
        rotation = assets.up_axis_rotation(axis)[:3, :3]
        direction = np.eye(3)["xyz".index(axis[1])] * (1 if axis[0] == "+" else -1)
        np.testing.assert_allclose(rotation @ direction, [0, 0, 1], atol=1e-12)
        np.testing.assert_allclose(np.linalg.det(rotation), 1.0, atol=1e-12)


def test_procedural_objects_are_pure_functions_of_the_seed():
    first, again, other = (assets.procedural_object(seed) for seed in (7, 7, 8))
    np.testing.assert_array_equal(_world_vertices(first), _world_vertices(again))
    assert _world_vertices(first).shape != _world_vertices(other).shape or \
        not np.array_equal(_world_vertices(first), _world_vertices(other))


def test_default_cameras_frame_every_normalised_asset():
    config = load_config("data.py:builtin")
    focal = cameras.fov_to_focal(config.fov_deg)
    assert focal == pytest.approx(0.75)
    assert 0.85 < framing_extent(config.object_size, config.radius, focal, config.elevation_range_deg) < 0.95
    assert framing_extent(config.object_size, 1.0, focal, config.elevation_range_deg) > 1.0


def test_surface_points_are_on_the_placed_triangles_and_seeded_by_the_id():
    """Node transforms apply (URDF links are placed by them) and sampling is uniform by area."""
    scene = trimesh.Scene()
    scene.add_geometry(trimesh.creation.box(extents=[0.2, 0.2, 0.2]),
                       transform=trimesh.transformations.translation_matrix([0.3, 0.0, 0.0]))
    scene.add_geometry(trimesh.creation.box(extents=[0.4, 0.4, 0.4]),
                       transform=trimesh.transformations.translation_matrix([-0.2, 0.0, 0.0]))
    settings = OrbitSettings.from_config(load_config("data.py:tiny", num_surface_points=4000))
    points = surface_points(scene, "two-boxes", settings)
    assert points.shape == (4000, 3) and points.dtype == np.float32
    small = points[:, 0] > 0.15 + 1e-6
    for centre, half, chosen in [(0.3, 0.1, small), (-0.2, 0.2, ~small)]:
        local = np.abs(points[chosen] - [centre, 0.0, 0.0])
        assert (local <= half + 1e-6).all() and (np.min(np.abs(local - half), axis=1) < 1e-6).all()
    assert np.mean(small) == pytest.approx(0.2, abs=0.03)  # areas 0.24 and 0.96
    np.testing.assert_array_equal(points, surface_points(scene, "two-boxes", settings))
    assert not np.array_equal(points, surface_points(scene, "other-id", settings))


def _write_user_assets(folder):
    folder.mkdir()
    box = trimesh.creation.box(extents=[0.2, 1.0, 0.4])  # tallest along y: the user up axis
    box.export(folder / "tall_box.obj")
    (folder / "broken.obj").write_text("this is not\na mesh\nf 1 2 3\n")


def _tiny_config(user_folder, **overrides):
    values = dict(assets=f"pybullet_objects,procedural,{user_folder}", max_assets_per_source=2, num_procedural=2,
                  num_views=4, resolution=16, supersample=1, shard_size=2, holdout_fraction=0.2, num_workers=1)
    values.update(overrides)
    return load_config("data.py:tiny", **values)


def _shards(workdir):
    folder = workdir / "shards"
    return sorted(p for p in os.listdir(folder) if p.endswith(".tfrecord"))


def test_render_dataset_end_to_end(tmp_path, capsys):
    _write_user_assets(tmp_path / "user")
    one_worker, two_workers = tmp_path / "one", tmp_path / "two"
    summary = render_dataset(_tiny_config(tmp_path / "user"), str(one_worker), [])
    assert summary["assets_listed"] == 6 and summary["objects"] == 5 and summary["skipped"] == 1
    assert summary["skipped_assets"][0]["object_id"] == "user/broken.obj"
    assert summary["splits"]["holdout"]["objects"] >= 1 and summary["splits"]["train"]["objects"] >= 1

    # Records decode to what was asked for.
    records = [r for name in _shards(one_worker) for r in iterate_records(one_worker / "shards" / name)]
    assert len(records) == 5
    orbit = decode_orbit(records[0])
    assert orbit["images"].shape == (4, 16, 16, 4) and orbit["source"] == "rendered" and math.isnan(orbit["quality"])
    settings = OrbitSettings.from_config(_tiny_config(tmp_path / "user"))
    expected_cam2world, _, elevation = orbit_cameras(orbit["object_id"], settings)
    np.testing.assert_allclose(orbit["cam2world"], expected_cam2world, atol=1e-6)
    assert orbit["elevation_deg"] == pytest.approx(elevation) and 0 <= elevation <= 45
    background = orbit["images"][..., 3] == 0
    assert (orbit["images"][..., :3][background] == 255).all()

    # Every object has a caption: the asset's name, or a procedural object's shapes and colours.
    captions = {read_metadata(record).object_id: read_metadata(record).caption for record in records}
    assert all(captions.values()), captions
    assert captions["user/tall_box.obj"] == "a tall box" and captions["pybullet_data/duck_vhacd"] == "a duck"

    # Surface points in the world frame of the normalised asset (longest side object_size 0.9).
    for record in records:
        points = decode_orbit(record, views=[])["surface_points"]
        assert points.shape == (2048, 3)
        assert (np.abs(points) <= 0.45 + 1e-5).all() and np.ptp(points, axis=0).max() == pytest.approx(0.9, rel=0.05)
    box = decode_orbit(next(r for r in records if read_metadata(r).object_id == "user/tall_box.obj"), views=[])
    half = np.abs(box["surface_points"]).max(axis=0)
    np.testing.assert_allclose(np.sort(half), [0.09, 0.18, 0.45], atol=1e-5)  # extents 0.2, 0.4, 1.0 scaled by 0.9
    assert half[2] == pytest.approx(0.45)  # the y-up box stands tall
    assert (np.min(np.abs(np.abs(box["surface_points"]) - half), axis=1) < 1e-5).all()  # each point on a face

    # Two workers write the same bytes.
    render_dataset(_tiny_config(tmp_path / "user", num_workers=2), str(two_workers), [])
    assert _shards(one_worker) == _shards(two_workers)
    for name in _shards(one_worker):
        assert (one_worker / "shards" / name).read_bytes() == (two_workers / "shards" / name).read_bytes(), name

    # A restart renders only the missing shard and still counts the earlier skip.
    names = _shards(one_worker)
    mtimes = {n: os.stat(one_worker / "shards" / n).st_mtime_ns for n in names}
    (one_worker / "shards" / names[0]).unlink()
    resumed = render_dataset(_tiny_config(tmp_path / "user"), str(one_worker), [])
    assert resumed["shards_rendered_now"] == 1 and resumed["shards_already_complete"] == len(names) - 1
    assert resumed["objects"] == 5 and resumed["skipped"] == 1
    assert all(os.stat(one_worker / "shards" / n).st_mtime_ns == mtimes[n] for n in names[1:])
    assert (one_worker / "shards" / names[0]).read_bytes() == (two_workers / "shards" / names[0]).read_bytes()
    with pytest.raises(ValueError, match="other settings"):
        render_dataset(_tiny_config(tmp_path / "user", resolution=24), str(one_worker), [])

    # inspect-data reads it all back.
    capsys.readouterr()
    statistics = inspect_dataset(None, str(tmp_path / "inspect"), [str(one_worker / "shards")])
    printed = capsys.readouterr().out
    assert "records 5  objects 5  views 20" in printed and "holdout" in printed
    assert statistics["per_source"] == {"rendered": 5}
    assert os.path.getsize(tmp_path / "inspect" / "contact_sheet.png") > 0
    assert statistics["camera_radius"]["min"] == pytest.approx(1.5)
