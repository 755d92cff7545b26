"""FlexRM (models/flexrm.py), its camera conversion for the Gaussian rasteriser and the `.ply` export.

One `micro` model serves every test; jitted functions are shared so that the module compiles
the forward pass, one training step and one renderer only once each.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from vfusion3d_jax import cameras
from vfusion3d_jax.configs import config_module
from vfusion3d_jax.inference.ply import PROPERTIES, SH_C0, read_gaussians_ply, write_gaussians_ply
from vfusion3d_jax.models import flexrm, layers
from vfusion3d_jax.models.flexrm import FlexRM, Gaussians
from vfusion3d_jax.models.lrm import count_parameters as lrm_count_parameters
from vfusion3d_jax.rendering import RenderOptions
from vfusion3d_jax.rendering.triplane import query_points

CONFIGS = config_module("configs/flexrm.py")
CONFIG = CONFIGS.get_config("micro")
SIZE = CONFIG.view_resolution
RESOLUTION = CONFIG.splatting.resolution
SETTINGS = flexrm.splat_settings(CONFIG)
NUM_GAUSSIANS = flexrm.gaussian_count(CONFIG.model)
INTRINSICS = cameras.intrinsics_matrix(*cameras.DEFAULT_INTRINSICS)


def source_cameras(azimuths, elevation=20.0, radius=1.5) -> np.ndarray:
    return cameras.source_camera(cameras.orbit_cam2world(np.asarray(azimuths, float), elevation, radius), INTRINSICS)


RENDER_CAMERAS = cameras.render_camera(cameras.orbit_cam2world(np.array([30.0, 150.0, 270.0]), 25.0, 1.6),
                                       INTRINSICS)[None]  # (1, 3, 25)


@nnx.jit
def forward(model, images, cams, mask):
    return model(images, cams, mask)


render = jax.jit(functools.partial(flexrm.render_gaussians, resolution=RESOLUTION, settings=SETTINGS))


def image_loss(model, images, cams, mask, render_cameras, targets):
    rgb, _, info = flexrm.render_gaussians(model(images, cams, mask), render_cameras, RESOLUTION, SETTINGS)
    return jnp.mean(jnp.square(rgb - targets)), info["overflow"]


@nnx.jit
def train_step(model, optimizer, images, cams, mask, render_cameras, targets):
    (loss, overflow), (grads, image_grads) = nnx.value_and_grad(image_loss, argnums=(0, 1), has_aux=True)(
        model, images, cams, mask, render_cameras, targets)
    optimizer.update(model, grads)
    return loss, overflow, image_grads


def known_object(count: int = NUM_GAUSSIANS) -> Gaussians:
    """A ball of Gaussians coloured by position (the overfitting target)."""
    rng = np.random.default_rng(0)
    direction = rng.normal(size=(count, 3))
    means = 0.45 * direction / np.linalg.norm(direction, axis=1, keepdims=True) * rng.uniform(0.5, 1, (count, 1))
    return Gaussians(means=jnp.asarray(means[None], jnp.float32),
                     quats=jnp.tile(jnp.array([1.0, 0, 0, 0]), (1, count, 1)),
                     scales=jnp.full((1, count, 3), 0.09), opacities=jnp.full((1, count), 0.8),
                     colors=jnp.asarray(np.clip(means / 0.9 + 0.5, 0, 1)[None], jnp.float32))


@pytest.fixture(scope="module")
def model():
    return FlexRM(CONFIG.model, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def views():
    rng = np.random.default_rng(1)
    images = rng.uniform(size=(1, 4, 3, SIZE, SIZE)).astype(np.float32)
    return images, source_cameras([0.0, 90.0, 180.0, 270.0])[None]


def test_view_buckets_and_padding():
    assert [flexrm.view_bucket(n) for n in (1, 2, 3, 4, 5, 9, 17, 32)] == [1, 2, 4, 4, 8, 16, 32, 32]
    for bad in (0, 33):
        with pytest.raises(ValueError, match="1 to 32 views"):
            flexrm.view_bucket(bad)
    images, cams = np.ones((2, 3, 3, 8, 8), np.float32), source_cameras([0.0, 10.0, 20.0])[None].repeat(2, 0)
    padded, padded_cams, mask = flexrm.pad_views(images, cams)
    assert padded.shape == (2, 4, 3, 8, 8) and padded_cams.shape == (2, 4, 16) and isinstance(padded, np.ndarray)
    assert mask.tolist() == [[True, True, True, False]] * 2
    assert np.all(padded[:, 3] == 0) and np.array_equal(padded_cams[:, 3], cams[:, 0])
    assert flexrm.pad_views(images, cams, 8)[2].shape == (2, 8)
    with pytest.raises(ValueError):
        flexrm.pad_views(images, cams, 2)


def test_patch_rays_match_pixel_rays():
    # 56 px views in 14 px patches: patch centres are the pixels of a 4x4 image.
    cams = source_cameras([0.0, 77.0], elevation=33.0)
    origins, directions = flexrm.patch_rays(jnp.asarray(cams), (56, 56), 14)
    cam2world = np.concatenate([cams[:, :12].reshape(2, 3, 4), np.tile([[[0, 0, 0, 1.0]]], (2, 1, 1))], 1)
    expected_origins, expected_directions = cameras.pixel_rays(jnp.asarray(cam2world, jnp.float32),
                                                                jnp.asarray(np.stack([INTRINSICS] * 2)), 4)
    np.testing.assert_allclose(origins, expected_origins, atol=1e-6)
    np.testing.assert_allclose(directions, expected_directions, atol=1e-6)
    # The Plücker moment o × d is the same for any origin along the ray.
    moved = origins + 0.7 * directions
    np.testing.assert_allclose(flexrm.plucker_rays(moved, directions), flexrm.plucker_rays(origins, directions),
                               atol=1e-6)


def test_splat_camera_projects_like_project_points():
    points = np.array([[0.3, -0.2, 0.1], [-0.4, 0.35, -0.25], [0.0, 0.0, 0.0]], np.float32)
    width, height = 48, 32
    viewmat, k = flexrm.splat_camera(jnp.asarray(RENDER_CAMERAS[0]), width, height)
    cam2world, intrinsics = cameras.split_render_camera(RENDER_CAMERAS[0])
    for view in range(3):
        in_camera = points @ np.asarray(viewmat[view, :3, :3]).T + np.asarray(viewmat[view, :3, 3])
        assert np.all(in_camera[:, 2] > 0)  # OpenCV: in front of the camera is +z
        pixels = (in_camera / in_camera[:, 2:]) @ np.asarray(k[view]).T
        expected = cameras.project_points(points, cam2world[view], intrinsics[view]) * [width, height]
        np.testing.assert_allclose(pixels[:, :2], expected, atol=1e-4)


def test_rendered_gaussian_lands_where_the_camera_projects_it():
    """One small dark Gaussian on white: its alpha-weighted centroid is its projected centre."""
    point = np.array([0.25, -0.15, 0.1], np.float32)
    target = known_object()
    gaussians = Gaussians(means=target.means.at[0, 0].set(point), quats=target.quats,
                          scales=jnp.full_like(target.scales, 0.06), opacities=jnp.zeros_like(target.opacities)
                          .at[0, 0].set(0.95), colors=jnp.zeros_like(target.colors))
    images, alphas, info = render(gaussians, jnp.asarray(RENDER_CAMERAS))
    assert not np.any(info["overflow"])
    cam2world, intrinsics = cameras.split_render_camera(RENDER_CAMERAS[0])
    centres = np.arange(RESOLUTION) + 0.5
    for view in range(3):
        alpha = np.asarray(alphas[0, view, :, :, 0])
        assert alpha.max() > 0.8
        centroid = np.array([np.sum(alpha.sum(0) * centres), np.sum(alpha.sum(1) * centres)]) / alpha.sum()
        expected = cameras.project_points(point, cam2world[view], intrinsics[view]) * RESOLUTION
        np.testing.assert_allclose(centroid, expected, atol=0.15)
        # White background where nothing is drawn, the Gaussian's black where it is opaque.
        image = np.asarray(images[0, view])
        np.testing.assert_allclose(image, np.broadcast_to(1 - alpha[..., None], image.shape), atol=1e-5)


def test_outputs_shapes_and_count(model, views):
    images, cams = views
    gaussians = forward(model, images[:, :2], cams[:, :2], np.ones((1, 2), bool))
    assert NUM_GAUSSIANS == 3 * 8**2 * 2 == 384
    assert gaussians.means.shape == (1, NUM_GAUSSIANS, 3) and gaussians.quats.shape == (1, NUM_GAUSSIANS, 4)
    assert gaussians.scales.shape == (1, NUM_GAUSSIANS, 3) and gaussians.opacities.shape == (1, NUM_GAUSSIANS)
    assert gaussians.colors.shape == (1, NUM_GAUSSIANS, 3)
    # At init: every Gaussian near its texel anchor, identity rotation, the initial scale and opacity.
    anchors = flexrm.texel_anchors(8)[:, :, :, None].repeat(2, 3).reshape(-1, 3)
    assert np.max(np.abs(gaussians.means[0] - anchors)) < 0.5 * CONFIG.model.gaussians.max_offset_in_plane
    np.testing.assert_allclose(gaussians.opacities, jax.nn.sigmoid(-2.0), atol=0.05)
    assert np.all(gaussians.quats[..., 0] > 0.9)
    with pytest.raises(ValueError, match="not a bucket"):
        model.encode_views(images[:, :3], cams[:, :3], np.ones((1, 3), bool))


def test_gaussian_bounds_hold_when_saturated(model):
    """Huge head inputs drive every activation into saturation; the bounds still hold."""
    head_config = CONFIG.model.gaussians
    planes = 1e3 * jax.random.normal(jax.random.key(0), (2, 3, CONFIG.model.triplane_dim, 8, 8))
    g = model.gaussian_head(planes)
    offsets = np.asarray(g.means).reshape(2, 3, 8, 8, 2, 3) - flexrm.texel_anchors(8)[None, :, :, :, None]
    bounds = flexrm.offset_bounds(head_config.max_offset_in_plane, head_config.max_offset_normal)
    assert np.all(np.abs(offsets) <= bounds[None, :, None, None, None] + 1e-6)
    # Saturated: some offsets reach their bound, along the normal as well (Gaussians leave the plane).
    assert np.max(np.abs(offsets[:, 0, ..., 2])) > 0.99 * head_config.max_offset_normal
    scales = np.asarray(g.scales)
    assert scales.min() >= head_config.scale_min and scales.max() <= head_config.scale_max
    np.testing.assert_allclose(np.linalg.norm(g.quats, axis=-1), 1.0, atol=1e-5)
    opacities, colors = np.asarray(g.opacities), np.asarray(g.colors)
    assert np.all((opacities >= 0) & (opacities <= 1)) and np.all((colors >= 0) & (colors <= 1))
    assert np.all(np.isfinite(opacities))


def test_padded_views_do_not_matter(model, views):
    images, cams = views
    two = forward(model, images[:, :2], cams[:, :2], np.ones((1, 2), bool))
    garbage = np.random.default_rng(5).uniform(-50, 50, size=(1, 2, 3, SIZE, SIZE)).astype(np.float32)
    garbage[0, 1, 0, 0, 0] = np.nan
    garbage_cams = np.full((1, 2, 16), np.nan, np.float32)
    padded_images = np.concatenate([images[:, :2], garbage], 1)
    padded_cams = np.concatenate([cams[:, :2], garbage_cams], 1)
    mask = np.array([[True, True, False, False]])
    four = forward(model, padded_images, padded_cams, mask)
    for a, b in zip(jax.tree.leaves(two), jax.tree.leaves(four)):
        np.testing.assert_allclose(a, b, atol=2e-6)
    # The mask is what hides them: two more real views marked valid change the result.
    more = forward(model, images, cams, np.ones((1, 4), bool))
    assert np.max(np.abs(more.colors - two.colors)) > 1e-4


@pytest.mark.parametrize("projection, output", [("source_projection", "token_offsets"),
                                                ("source_planes", "plane_offsets")])
def test_multi_view_source_projection_averages_the_valid_views(views, projection, output):
    """Each token's start (and each texel's skip) is the mean over valid views of its projected
    feature: padded views (garbage, NaN) add nothing, the order of views does not matter, and
    every valid view counts."""
    assert CONFIG.model[projection]
    model = FlexRM(CONFIG.model, rngs=nnx.Rngs(4))
    kernel = getattr(model, projection).proj.kernel
    kernel[...] = 0.1 * jax.random.normal(jax.random.key(2), kernel.shape)  # zero at init
    images, cams = views
    offsets = lambda i, c, m: getattr(  # noqa: E731
        model.encode_views(jnp.asarray(i), jnp.asarray(c), jnp.asarray(m)), output)
    two = offsets(np.concatenate([images[:, :2], np.full_like(images[:, :2], np.nan)], 1),
                  np.concatenate([cams[:, :2], np.full_like(cams[:, :2], np.nan)], 1), np.array([[1, 1, 0, 0]], bool))
    np.testing.assert_allclose(two, offsets(images[:, :2], cams[:, :2], np.ones((1, 2), bool)), atol=1e-6)
    swapped = offsets(images[:, [1, 0]], cams[:, [1, 0]], np.ones((1, 2), bool))
    np.testing.assert_allclose(two, swapped, atol=1e-6)
    alone = offsets(images[:, :1], cams[:, :1], np.ones((1, 1), bool))
    assert np.max(np.abs(two - alone)) > 1e-3


def test_order_of_other_views_does_not_matter(views):
    """No view embedding: the context is a set of posed patches (the reference view apart)."""
    model = FlexRM(CONFIG.model, rngs=nnx.Rngs(3))
    # Give the zero-initialised Plücker path weights, so that each view's camera matters.
    model.plucker_embed.kernel[...] = jax.random.normal(jax.random.key(1), model.plucker_embed.kernel.shape)
    images, cams = views
    mask = np.array([[True, True, True, False]])
    a = forward(model, images, cams, mask)
    order = [0, 2, 1, 3]
    b = forward(model, images[:, order], cams[:, order], mask)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, atol=2e-6)
    # Swapping the cameras but not the images is a different input.
    c = forward(model, images, cams[:, order], mask)
    assert np.max(np.abs(c.colors - a.colors)) > 1e-4


@pytest.fixture(scope="module")
def training(views):
    """A fresh model overfit to one object for a few dozen Adam steps, with what the tests check."""
    model = FlexRM(CONFIG.model, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    targets, _, info = render(known_object(), jnp.asarray(RENDER_CAMERAS))
    assert not np.any(info["overflow"])
    _, cams = views
    # Inputs: the target object seen from two of its render cameras, resized to the view size.
    inputs = jax.image.resize(jnp.moveaxis(targets[:, :2], -1, 2), (1, 2, 3, SIZE, SIZE), "linear")
    input_cams = np.stack([cameras.source_camera(*cameras.split_render_camera(RENDER_CAMERAS[0, v]))
                           for v in range(2)])[None]
    mask = np.ones((1, 2), bool)
    moved = input_cams.copy()
    moved[0, 1] = source_cameras([200.0], elevation=-10.0, radius=1.8)[0]
    result = {"before": (forward(model, inputs, input_cams, mask), forward(model, inputs, moved, mask))}
    losses, overflows = [], []
    for step in range(40):
        loss, overflow, image_grads = train_step(model, optimizer, inputs, input_cams, mask,
                                                 jnp.asarray(RENDER_CAMERAS), targets)
        losses.append(float(loss))
        overflows.append(bool(np.any(overflow)))
        if step == 0:
            result["image_grads"] = np.asarray(image_grads)
            result["after_one_step"] = (forward(model, inputs, input_cams, mask), forward(model, inputs, moved, mask))
    result.update(losses=np.array(losses), overflows=overflows)
    return result


def test_plucker_path_is_zero_at_init_and_learns(training):
    before, moved_before = training["before"]
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(moved_before)):
        np.testing.assert_array_equal(a, b)  # the other view's camera has no effect at all at init
    after, moved_after = training["after_one_step"]
    assert np.max(np.abs(after.means - moved_after.means)) > 1e-6
    assert np.max(np.abs(after.colors - moved_after.colors)) > 1e-6


def test_rendered_image_has_gradient_to_every_input_view(training):
    grads = training["image_grads"]
    assert grads.shape == (1, 2, 3, SIZE, SIZE) and np.all(np.isfinite(grads))
    for view in range(2):
        assert np.linalg.norm(grads[0, view]) > 0


def test_overfits_one_object(training):
    losses = training["losses"]
    print(f"image MSE: {losses[0]:.4f} -> {losses[-1]:.4f} in {len(losses)} Adam steps")
    assert not any(training["overflows"]) and np.all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_nerf_path_is_wired_to_the_planes(model, views):
    """The LRM's NeRF path on FlexRM's planes, by tracing only (its numerics are test_lrm's and
    test_renderer's; compiling it here would double this module's time)."""
    images, cams = views

    def nerf(model):
        planes = model.forward_planes(images[:, :2], cams[:, :2], np.ones((1, 2), bool))
        rendered = model.render_nerf(planes, jnp.asarray(RENDER_CAMERAS), resolution=16,
                                     options=RenderOptions(num_coarse=4, num_importance=4, deterministic=True))
        return planes, rendered

    planes, rendered = nnx.eval_shape(nerf, model)
    assert planes.shape == (1, 3, CONFIG.model.triplane_dim, 8, 8) and planes.dtype == jnp.float32
    assert rendered["rgb"].shape == (1, 3, 16, 16, 3) and rendered["opacity"].shape == (1, 3, 16, 16, 1)


def test_parameter_and_gaussian_counts():
    tiny, large = CONFIGS.get_config("tiny"), CONFIGS.get_config("large")
    tiny_count = flexrm.count_parameters(tiny.model)
    print(f"FlexRM parameters: tiny {tiny_count:,}; Gaussians: tiny {flexrm.gaussian_count(tiny.model):,}")
    assert 5e5 < tiny_count < 5e6
    assert flexrm.gaussian_count(tiny.model) == 3 * 16**2 * 2
    # Large: the LRM large's encoder and transformer (shapes only, nothing allocated) plus
    # FlexRM's parts; ~1M Gaussians.
    abstract = flexrm.abstract_flexrm(large.model)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    large_count = flexrm.count_parameters(large.model)
    lrm_large = lrm_count_parameters(config_module("configs/lrm.py").get_config("large").model)
    assert large_count == 453_187_500 and 0 < large_count - lrm_large < 5e6  # configs/flexrm.py docstring
    assert flexrm.gaussian_count(large.model) == 3 * 128**2 * 20 == 983_040


def test_every_parameter_has_logical_axes_covered_by_the_rules():
    config = CONFIGS.get_config("large")
    covered = {name for name, _ in config.mesh.logical_rules}
    for path, variable in nnx.to_flat_state(nnx.state(flexrm.abstract_flexrm(config.model), nnx.Param)):
        if path[0] == "decoder":  # the renderer's module, replicated (as in the LRM)
            continue
        names = variable.get_metadata().get("out_sharding")
        assert names is not None and len(names) == variable.ndim, path
        assert set(names) - {None} <= set(layers.LOGICAL_AXES) <= covered, path
        rules = dict(config.mesh.logical_rules)
        mesh_axes = [axis for name in names if name is not None and rules[name] is not None
                     for axis in ((rules[name],) if isinstance(rules[name], str) else rules[name])]
        assert len(mesh_axes) == len(set(mesh_axes)), path  # one mesh axis cannot split two dimensions


def random_gaussians(count: int, seed: int = 0) -> Gaussians:
    rng = np.random.default_rng(seed)
    quats = rng.normal(size=(count, 4)).astype(np.float32)
    return Gaussians(means=rng.normal(size=(count, 3)).astype(np.float32),
                     quats=quats / np.linalg.norm(quats, axis=1, keepdims=True),
                     scales=rng.uniform(1e-3, 0.2, (count, 3)).astype(np.float32),
                     opacities=rng.uniform(1e-3, 0.999, count).astype(np.float32),
                     colors=rng.uniform(0, 1, (count, 3)).astype(np.float32))


def test_ply_round_trip(tmp_path):
    gaussians = random_gaussians(257)
    path = write_gaussians_ply(gaussians, tmp_path / "out" / "object.ply")
    assert sorted(os.listdir(tmp_path / "out")) == ["object.ply"]  # no temporary left behind
    back = read_gaussians_ply(path)
    np.testing.assert_array_equal(back.means, gaussians.means)
    for name in ("quats", "scales", "opacities", "colors"):
        np.testing.assert_allclose(getattr(back, name), getattr(gaussians, name), rtol=2e-6, atol=2e-7)
    # A batch must be indexed first; an object from a batch (gaussians[0]) writes.
    batch = jax.tree.map(lambda x: x[None], gaussians)
    with pytest.raises(ValueError, match="one object"):
        write_gaussians_ply(batch, tmp_path / "batch.ply")
    np.testing.assert_array_equal(read_gaussians_ply(write_gaussians_ply(batch[0], tmp_path / "b.ply")).means,
                                  gaussians.means)


def test_ply_layout_is_the_3dgs_one(tmp_path):
    gaussians = random_gaussians(3, seed=1)
    data = (write_gaussians_ply(gaussians, tmp_path / "g.ply")).read_bytes()
    header = ("ply\nformat binary_little_endian 1.0\nelement vertex 3\n"
              "property float x\nproperty float y\nproperty float z\n"
              "property float nx\nproperty float ny\nproperty float nz\n"
              "property float f_dc_0\nproperty float f_dc_1\nproperty float f_dc_2\n"
              "property float opacity\n"
              "property float scale_0\nproperty float scale_1\nproperty float scale_2\n"
              "property float rot_0\nproperty float rot_1\nproperty float rot_2\nproperty float rot_3\n"
              "end_header\n").encode()
    assert data.startswith(header) and len(data) == len(header) + 3 * len(PROPERTIES) * 4
    rows = np.frombuffer(data[len(header):], "<f4").reshape(3, len(PROPERTIES))
    np.testing.assert_array_equal(rows[:, :3], gaussians.means)
    np.testing.assert_array_equal(rows[:, 3:6], 0)
    np.testing.assert_allclose(rows[:, 6:9], (gaussians.colors - 0.5) / SH_C0, rtol=1e-6)
    np.testing.assert_allclose(rows[:, 9], np.log(gaussians.opacities / (1 - gaussians.opacities)), rtol=1e-5)
    np.testing.assert_allclose(rows[:, 10:13], np.log(gaussians.scales), rtol=1e-6)
    np.testing.assert_allclose(rows[:, 13:17], gaussians.quats, rtol=1e-6)


def _decoder_colored(views, opacity_from_decoder=False):
    config = CONFIGS.get_config("micro").model
    config.gaussians.color_from_decoder = True
    config.gaussians.opacity_from_decoder = opacity_from_decoder
    return FlexRM(config, rngs=nnx.Rngs(5)), tuple(jnp.asarray(x) for x in views), jnp.ones((1, 4), bool)


def test_color_from_decoder_reads_the_nerf_colour_at_each_mean(views):
    """With `gaussians.color_from_decoder`, a Gaussian's colour is the decoder's colour at its mean
    (all three planes), the rest is the head's."""
    model, (images, cams), mask = _decoder_colored(views)
    gaussians = forward(model, images, cams, mask)
    planes = model.forward_planes(images, cams, mask)
    expected = query_points(model.decoder, planes, gaussians.means)["rgb"]
    np.testing.assert_allclose(gaussians.colors, expected, atol=1e-6)
    np.testing.assert_allclose(gaussians.means, model.gaussian_head(planes).means, atol=1e-6)


def test_opacity_from_decoder_is_the_optical_depth_of_the_nerf_density(views):
    """With `gaussians.opacity_from_decoder`, a Gaussian's opacity is 1 − exp(−σ·√(2π)·s) of the
    decoder's density σ at its mean and the geometric mean s of its scales; the rest is unchanged."""
    model, (images, cams), mask = _decoder_colored(views, opacity_from_decoder=True)
    gaussians = forward(model, images, cams, mask)
    planes = model.forward_planes(images, cams, mask)
    head = model.gaussian_head(planes)
    density = np.asarray(query_points(model.decoder, planes, head.means)["sigma"][..., 0], np.float64)
    width = np.prod(np.asarray(head.scales, np.float64), axis=-1) ** (1 / 3)
    expected = 1 - np.exp(-density * np.sqrt(2 * np.pi) * width)
    assert expected.max() > 0.05  # a check that could fail: some Gaussians are not transparent
    np.testing.assert_allclose(gaussians.opacities, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gaussians.scales, head.scales, atol=1e-6)
    # Denser means more opaque, and a Gaussian of no density is clear.
    depth = flexrm.decoder_opacity(jnp.asarray([0.0, 1.0, 4.0]), jnp.full((3, 3), 0.1))
    assert depth[0] == 0 and 0 < depth[1] < depth[2] < 1


@pytest.mark.slow  # ~1 minute of compilation
def test_color_from_decoder_trains_the_decoder_through_the_gaussians(views):
    model, (images, cams), mask = _decoder_colored(views)
    targets = jnp.zeros((1, 3, RESOLUTION, RESOLUTION, 3))
    grads = nnx.grad(image_loss, has_aux=True)(model, images, cams, mask, jnp.asarray(RENDER_CAMERAS), targets)[0]
    assert np.abs(np.asarray(grads.decoder.layers[0].kernel[...])).max() > 0
