"""Mesh export on analytic fields: grid convention, sphere geometry, coarse-to-fine = dense, colours, formats."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import trimesh

from vfusion3d_jax.rendering import mesh as mesh_lib

CHUNK = 2**15  # small chunks keep the padding of these small grids cheap


def spheres(centers, radii, sharpness=40.0):
    """Union of spheres: density 2 * sigmoid(sharpness * (r - |p - c|)) crosses 1.0 exactly at radius r."""
    centers = jnp.asarray(centers, jnp.float32)
    radii = jnp.asarray(radii, jnp.float32)

    def density(points):
        distance = jnp.linalg.norm(points[:, None, :] - centers, axis=-1)
        return jnp.max(2 * jax.nn.sigmoid(sharpness * (radii - distance)), axis=-1)

    return density


def position_color(points):
    return (points + 1) / 2


class CountingField:
    """Wraps a field and counts the points it is evaluated on, also under jit."""

    def __init__(self, field):
        self.field = field
        self.count = 0

    def __call__(self, points):
        num_points = points.shape[0]
        jax.debug.callback(lambda: self._add(num_points))
        return self.field(points)

    def _add(self, num_points):
        self.count += num_points


def blobby(points):
    """An object-like field: three overlapping blobs with a wavy surface."""
    blobs = spheres([[0.0, 0.0, 0.0], [0.35, 0.2, -0.1], [-0.3, -0.25, 0.2]], [0.45, 0.3, 0.25], 20.0)
    waves = 0.15 * jnp.sin(9 * points[:, 0]) * jnp.cos(7 * points[:, 1]) * jnp.sin(8 * points[:, 2])
    return blobs(points) + waves


def test_grid_follows_the_official_convention():
    # 21 is not a multiple of the block size: the last blocks overhang and are cropped.
    def field(points):
        return points[:, 0] + 10 * points[:, 1] + 100 * points[:, 2]

    for bounds in [(-1.0, 1.0), (-0.5, 1.5)]:
        grid = mesh_lib.density_grid(field, 21, bounds=bounds, chunk_size=CHUNK)
        axis = np.linspace(*bounds, 21)
        x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
        np.testing.assert_allclose(grid.values, x + 10 * y + 100 * z, atol=1e-4)
        assert grid.num_evaluations >= 21**3


def test_vertices_map_to_world_like_the_official_code():
    # A density linear in x crosses the level on the plane x = 0.3; marching cubes' linear
    # interpolation is exact there, so this checks v / (G - 1) * 2 - 1.
    grid = mesh_lib.density_grid(lambda p: 1 + (0.3 - p[:, 0]), 17, chunk_size=CHUNK)
    vertices, faces = mesh_lib.marching_cubes(grid)
    np.testing.assert_allclose(vertices[:, 0], 0.3, atol=1e-5)
    assert np.ptp(vertices[:, 1]) == pytest.approx(2.0) and np.ptp(vertices[:, 2]) == pytest.approx(2.0)
    assert len(faces) > 0


def test_grid_schedule_halves_down_to_the_coarse_resolution():
    assert mesh_lib.grid_schedule(512, 64) == (64, 128, 256, 512)
    assert mesh_lib.grid_schedule(500, 64) == (125, 250, 500)
    assert mesh_lib.grid_schedule(100, 64) == (100,)


def test_sphere_mesh_is_a_closed_outward_sphere():
    radius, resolution = 0.6, 128
    mesh = mesh_lib.extract_mesh(spheres([[0.0, 0.0, 0.0]], [radius]), resolution=resolution,
                                 coarse_resolution=32, chunk_size=CHUNK)
    voxel = 2 / (resolution - 1)
    np.testing.assert_allclose(np.linalg.norm(mesh.vertices, axis=-1), radius, atol=0.1 * voxel)
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.volume == pytest.approx(4 / 3 * np.pi * radius**3, rel=2e-3)
    # Outward: every face normal points away from the centre (towards lower density).
    assert np.all(np.sum(mesh.face_normals * mesh.triangles_center, axis=-1) > 0)


def test_coarse_to_fine_gives_the_dense_surface_with_far_fewer_evaluations():
    resolution = 256
    dense_field, sparse_field = CountingField(blobby), CountingField(blobby)
    dense = mesh_lib.density_grid(dense_field, resolution, chunk_size=CHUNK)
    sparse = mesh_lib.density_grid_coarse_to_fine(sparse_field, resolution, coarse_resolution=32,
                                                  chunk_size=CHUNK)
    assert (dense_field.count, sparse_field.count) == (dense.num_evaluations, sparse.num_evaluations)
    assert sparse.num_evaluations < dense.num_evaluations / 5
    np.testing.assert_array_equal(sparse.values > 1.0, dense.values > 1.0)
    dense_vertices, dense_faces = mesh_lib.marching_cubes(dense)
    sparse_vertices, sparse_faces = mesh_lib.marching_cubes(sparse)
    np.testing.assert_array_equal(sparse_faces, dense_faces)
    np.testing.assert_allclose(sparse_vertices, dense_vertices, atol=1e-6)


def test_coarse_to_fine_handles_grids_that_are_not_whole_blocks():
    # 150 -> 75 -> 37: neither nested nor multiples of the block size.
    dense = mesh_lib.density_grid(blobby, 150, chunk_size=CHUNK)
    sparse = mesh_lib.density_grid_coarse_to_fine(blobby, 150, coarse_resolution=37, chunk_size=CHUNK)
    assert mesh_lib.grid_schedule(150, 37) == (37, 75, 150)
    np.testing.assert_array_equal(sparse.values > 1.0, dense.values > 1.0)


def test_dilation_keeps_a_small_bump_the_coarse_grid_misses():
    # A bump of radius 0.02 (1.3 fine voxels) centred in the coarse cell just outside the big
    # sphere's crossing cells: no coarse sample sees it, the one-cell dilation does. Blocks of
    # 2^3 points keep block rounding from hiding the effect of the dilation.
    coarse_spacing = 2 / 63
    bump_center = -1 + 48.5 * coarse_spacing  # centre of the cell next to the one crossing x = 0.5
    field = spheres([[0.0, 0.0, 0.0], [bump_center, 0.0, 0.0]], [0.5, 0.02])
    dense = mesh_lib.density_grid(field, 128, chunk_size=CHUNK).values > 1.0

    def coarse_to_fine(dilation):
        return mesh_lib.density_grid_coarse_to_fine(field, 128, coarse_resolution=64, dilation=dilation,
                                                    block_size=2, chunk_size=CHUNK).values > 1.0

    np.testing.assert_array_equal(coarse_to_fine(dilation=1), dense)
    assert np.any(coarse_to_fine(dilation=0) != dense)


def test_isolated_speck_below_the_coarse_resolution_is_lost():
    # The documented limitation: a speck that falls between all coarse samples, away from any
    # surface, is only found by a finer coarse grid.
    speck_center = -1 + 10.5 * (2 / 31)  # a cell centre of the 32^3 grid
    field = spheres([[0.3, 0.3, 0.3], [speck_center] * 3], [0.3, 0.03])
    without_speck = mesh_lib.density_grid(spheres([[0.3, 0.3, 0.3]], [0.3]), 128, chunk_size=CHUNK)
    dense = mesh_lib.density_grid(field, 128, chunk_size=CHUNK).values > 1.0
    coarse_32 = mesh_lib.density_grid_coarse_to_fine(field, 128, coarse_resolution=32, chunk_size=CHUNK)
    coarse_64 = mesh_lib.density_grid_coarse_to_fine(field, 128, coarse_resolution=64, chunk_size=CHUNK)
    assert np.any(dense != (without_speck.values > 1.0))
    np.testing.assert_array_equal(coarse_32.values > 1.0, without_speck.values > 1.0)
    np.testing.assert_array_equal(coarse_64.values > 1.0, dense)


def test_vertex_colors_come_from_the_color_field():
    mesh = mesh_lib.extract_mesh(spheres([[0.1, -0.2, 0.0]], [0.5]), position_color, resolution=64,
                                 coarse_resolution=None, chunk_size=CHUNK)
    colors = np.asarray(mesh.visual.vertex_colors)
    assert colors.dtype == np.uint8
    expected = np.floor((mesh.vertices + 1) / 2 * 255)
    np.testing.assert_allclose(colors[:, :3], expected, atol=1)


def test_evaluate_in_chunks_pads_the_last_chunk():
    points = np.random.default_rng(0).uniform(-1, 1, (1000, 3)).astype(np.float32)
    np.testing.assert_allclose(mesh_lib.evaluate_in_chunks(position_color, points, chunk_size=256),
                               (points + 1) / 2, atol=1e-6)


@pytest.mark.parametrize("suffix", [".obj", ".ply", ".glb"])
def test_export_round_trips_with_vertex_colors(tmp_path, suffix):
    mesh = mesh_lib.extract_mesh(spheres([[0.0, 0.0, 0.0]], [0.5]), position_color, resolution=32,
                                 coarse_resolution=None, chunk_size=CHUNK)
    path = mesh_lib.export_mesh(mesh, tmp_path / "nested" / f"object{suffix}")
    loaded = trimesh.load(path, force="mesh", process=False)
    np.testing.assert_allclose(loaded.vertices, mesh.vertices, atol=1e-6)
    np.testing.assert_array_equal(loaded.faces, mesh.faces)
    np.testing.assert_array_equal(loaded.visual.vertex_colors, mesh.visual.vertex_colors)


def test_export_rejects_an_unknown_format(tmp_path):
    mesh = trimesh.creation.box()
    with pytest.raises(ValueError, match="format"):
        mesh_lib.export_mesh(mesh, tmp_path / "object.stl")


@pytest.mark.parametrize("constant", [0.5, 2.0])
@pytest.mark.parametrize("coarse_resolution", [None, 16])
def test_a_field_without_surface_raises(constant, coarse_resolution):
    with pytest.raises(mesh_lib.EmptySurfaceError, match="never crosses level 1.0"):
        mesh_lib.extract_mesh(lambda p: jnp.full(p.shape[:1], constant), resolution=32,
                              coarse_resolution=coarse_resolution, chunk_size=CHUNK)
