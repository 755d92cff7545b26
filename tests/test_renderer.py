"""The triplane renderer against the official reference, closed forms, and its own invariances."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from conftest import FIXTURE_DIR
from vfusion3d_jax import cameras as cams
from vfusion3d_jax.rendering import (
    BATCH_AXIS,
    RAY_AXIS,
    RenderOptions,
    TriplaneDecoder,
    evaluate_samples,
    query_grid,
    query_points,
    render,
    render_rays,
    render_views,
    sample_from_planes,
    validate_render_inputs,
)
from vfusion3d_jax.rendering import ray_marching, triplane

# The fixture's renderer settings: 8 coarse + 8 importance samples, the deterministic draws.
FIXTURE_OPTIONS = RenderOptions(num_coarse=8, num_importance=8, deterministic=True)
RENDERS = {"render8": (8, None, None), "render12": (12, None, None), "crop": (12, 6, (2, 4))}
NUM_VIEWS = 3
render_jit = jax.jit(render_views, static_argnames=("resolution", "crop_size", "options"))


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def assert_close(actual, expected, rtol=1e-5):
    """Max-norm relative error below `rtol`."""
    assert np.shape(actual) == np.shape(expected), (np.shape(actual), np.shape(expected))
    assert relative_error(actual, expected) < rtol, relative_error(actual, expected)


def channels_first(image):
    return jnp.moveaxis(image, -1, 2)


@pytest.fixture(scope="module")
def decoder():
    weights = load_file(str(FIXTURE_DIR / "model.safetensors"))
    decoder = TriplaneDecoder(8, rngs=nnx.Rngs(0))
    for i, layer in enumerate(decoder.layers):
        layer.kernel[...] = jnp.asarray(weights[f"synthesizer.decoder.net.{2 * i}.weight"].T)
        layer.bias[...] = jnp.asarray(weights[f"synthesizer.decoder.net.{2 * i}.bias"])
    return decoder


@pytest.fixture(scope="module")
def fixture_renders(decoder, reference):
    """The three fixture renders, each one call with all 2 x 3 views."""
    return {name: render_jit(decoder, reference["planes"], reference["input_render_cameras"], resolution=resolution,
                             crop_size=crop, crop_start=start, options=FIXTURE_OPTIONS)
            for name, (resolution, crop, start) in RENDERS.items()}


def fixture_limits(reference):
    origins, directions = reference["render8_ray_origins"], reference["render8_ray_directions"]
    tmin, tmax = ray_marching.intersect_box(jnp.asarray(origins), jnp.asarray(directions))
    return tmin, tmax, *ray_marching.fix_missed_rays(tmin, tmax)


def per_object(*arrays):
    """Arrays of the 6 fixture views (6, 64, ...) regrouped per object (2, 3 * 64, ...)."""
    return [jnp.reshape(x, (2, NUM_VIEWS * 64) + np.shape(x)[2:]) for x in arrays]


# --- official parity -------------------------------------------------------------------------------

def test_sample_from_planes_matches_official(reference):
    features = jax.vmap(sample_from_planes)(reference["planes"], reference["input_points"])
    assert_close(features, reference["points_features"])


def test_decoder_and_point_queries_match_official(decoder, reference):
    features = jax.vmap(sample_from_planes)(reference["planes"], reference["input_points"])
    raw = decoder(jnp.moveaxis(features, 1, 2).reshape(2, 64, -1))
    assert_close(raw[..., :1], reference["points_sigma_raw"])
    queried = query_points(decoder, reference["planes"], reference["input_points"])
    assert_close(queried["sigma"], reference["points_sigma"])
    assert_close(queried["rgb"], reference["points_rgb"])
    chunked = query_points(decoder, reference["planes"], reference["input_points"], chunk_size=24)  # 64 = 2*24+16
    assert_close(chunked["sigma"], reference["points_sigma"])


def test_grid_query_matches_official(decoder, reference):
    grid = query_grid(decoder, reference["planes"], 9)
    assert_close(grid["sigma"], reference["grid_sigma"])
    assert_close(grid["rgb"], reference["grid_rgb"])


def test_ray_limits_and_fix_up_match_official(reference):
    tmin, tmax, start, end = fixture_limits(reference)
    assert_close(tmin, reference["render8_ray_tmin_raw"][..., 0])
    assert_close(tmax, reference["render8_ray_tmax_raw"][..., 0])
    assert_close(start, reference["render8_ray_start"][..., 0])
    assert_close(end, reference["render8_ray_end"][..., 0])


def test_ray_marching_intermediates_match_official(decoder, reference):
    _, _, start, end = fixture_limits(reference)
    tables = triplane.plane_table(decoder.project_planes(reference["planes"]))
    origins, directions, start, end = per_object(
        reference["render8_ray_origins"], reference["render8_ray_directions"], start, end)
    jitter = jnp.full(start.shape + (8,), 0.5)
    uniforms = jnp.broadcast_to((jnp.arange(8, dtype=jnp.float32) + 0.5) / 8, start.shape + (8,))

    @jax.jit
    @jax.vmap
    def render_object(table, origins, directions, start, end, jitter, uniforms):
        return render_rays(lambda points: triplane.decode_points(decoder, table, points), origins, directions,
                           start, end, jitter, uniforms, options=FIXTURE_OPTIONS)

    @jax.jit
    @jax.vmap
    def evaluate_object(table, origins, directions, depths):
        return evaluate_samples(lambda points: triplane.decode_points(decoder, table, points),
                                origins, directions, depths)

    out = render_object(tables, origins, directions, start, end, jitter, uniforms)
    out = {name: np.reshape(value, (6, 64) + value.shape[2:]) for name, value in out.items()}
    for name in ("depths_coarse", "weights_coarse", "depths_importance", "depths_all", "weights_final"):
        assert_close(out[name], reference[f"render8_{name}"][..., 0])
    # Colours and raw densities at the official depths (stage isolation: importance depths agree to
    # ~1e-6, which the field's gradient along a ray would amplify).
    for stage in ("coarse", "importance"):
        depths, = per_object(reference[f"render8_depths_{stage}"][..., 0])
        colors, densities = evaluate_object(tables, origins, directions, depths)
        expected_colors = reference[f"render8_colors_{stage}"]
        expected_densities = reference[f"render8_densities_{stage}"][..., 0]
        colors, densities = np.reshape(colors, expected_colors.shape), np.reshape(densities, expected_densities.shape)
        outside = expected_densities == ray_marching.OUT_OF_BOX_RAW_DENSITY
        assert outside.any() and (~outside).any()
        np.testing.assert_array_equal(densities == ray_marching.OUT_OF_BOX_RAW_DENSITY, outside)
        assert_close(densities[~outside], expected_densities[~outside])
        assert_close(colors, expected_colors)


@pytest.mark.parametrize("name", sorted(RENDERS))
def test_renders_match_official(fixture_renders, reference, name):
    out = fixture_renders[name]
    assert_close(channels_first(out["rgb"]), reference[f"{name}_rgb"])
    assert_close(channels_first(out["depth"]), reference[f"{name}_depth"])
    assert_close(channels_first(out["opacity"]), reference[f"{name}_weight"])


def test_gradient_matches_official(decoder, reference):
    def loss(planes):
        out = render_views(decoder, planes, reference["input_render_cameras"], resolution=8, options=FIXTURE_OPTIONS)
        return (jnp.sum(reference["grad_loss_weights_rgb"] * channels_first(out["rgb"]))
                + jnp.sum(reference["grad_loss_weights_weight"] * channels_first(out["opacity"])))

    value, grad = jax.jit(jax.value_and_grad(loss))(jnp.asarray(reference["planes"]))
    assert_close(value, reference["grad_loss"])
    assert_close(grad, reference["grad_planes"])


# --- building blocks ---------------------------------------------------------------------------------

def reference_bilinear(planes, points):
    """grid_sample(bilinear, zeros, align_corners=False) of the three planes, written out directly."""
    _, _, height, width = planes.shape
    features = []
    for plane, (a, b) in zip(planes, ((0, 1), (0, 2), (2, 1))):
        x = ((points[..., a] + 1) * width - 1) / 2
        y = ((points[..., b] + 1) * height - 1) / 2
        x0, y0 = jnp.floor(x), jnp.floor(y)
        feature = 0.0
        for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
            weight = (1 - jnp.abs(x - xi)) * (1 - jnp.abs(y - yi))
            valid = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
            values = plane[:, jnp.clip(yi, 0, height - 1).astype(int), jnp.clip(xi, 0, width - 1).astype(int)]
            feature = feature + jnp.where(valid, weight, 0.0)[..., None] * jnp.moveaxis(values, 0, -1)
        features.append(feature)
    return jnp.stack(features)


def test_interpolation_values_and_gradients_match_autodiff_of_the_definition():
    keys = jax.random.split(jax.random.key(0), 3)
    planes = jax.random.normal(keys[0], (3, 5, 6, 7))
    points = jax.random.uniform(keys[1], (40, 3), minval=-1.3, maxval=1.3)  # some beyond the planes
    cotangent = jax.random.normal(keys[2], (3, 40, 5))

    def summed_over_planes(planes, points):
        table = triplane.plane_table(jnp.moveaxis(planes, 1, -1))
        return triplane.interpolate_planes(table, points, sum_planes=True)

    def reference_summed(planes, points):
        return jnp.sum(reference_bilinear(planes, points), axis=0)

    assert_close(sample_from_planes(planes, points), reference_bilinear(planes, points), rtol=1e-6)
    # Both forms of the custom gradient (per plane, summed), w.r.t. the planes and the points.
    for fast, slow, weights in ((sample_from_planes, reference_bilinear, cotangent),
                                (summed_over_planes, reference_summed, cotangent[0])):
        gradients = [jax.jit(jax.grad(lambda planes, points, fn=fn: jnp.sum(fn(planes, points) * weights),
                                      argnums=(0, 1)))(planes, points) for fn in (fast, slow)]
        for actual, expected in zip(*gradients):
            assert_close(actual, expected, rtol=1e-6)


def test_merge_equals_sorting_the_union():
    keys = jax.random.split(jax.random.key(0), 4)
    coarse = jnp.sort(jax.random.uniform(keys[0], (20, 13)), axis=-1)
    importance = jnp.sort(jax.random.uniform(keys[1], (20, 9)), axis=-1)
    colors = jax.random.uniform(keys[2], (20, 22, 3))
    densities = jax.random.normal(keys[3], (20, 22))
    depths, merged_colors, merged_densities = ray_marching.merge_samples(
        coarse, colors[:, :13], densities[:, :13], importance, colors[:, 13:], densities[:, 13:])
    order = jnp.argsort(jnp.concatenate([coarse, importance], axis=-1), axis=-1)
    np.testing.assert_array_equal(depths, jnp.sort(jnp.concatenate([coarse, importance], axis=-1), axis=-1))
    np.testing.assert_array_equal(merged_colors, jnp.take_along_axis(colors, order[..., None], axis=1))
    np.testing.assert_array_equal(merged_densities, jnp.take_along_axis(densities, order, axis=1))


def test_inverse_cdf_methods_are_identical():
    keys = jax.random.split(jax.random.key(0), 3)
    depths = jnp.sort(jax.random.uniform(keys[0], (50, 16), maxval=3.0), axis=-1)
    weights = jax.random.uniform(keys[1], (50, 15)) ** 4  # peaked: many near-empty bins
    weights = weights.at[:5].set(0.0)
    uniforms = jnp.sort(jax.random.uniform(keys[2], (50, 40)), axis=-1)
    gathered = ray_marching.sample_importance(depths, weights, uniforms, "gather")
    compared = ray_marching.sample_importance(depths, weights, uniforms, "compare")
    np.testing.assert_array_equal(gathered, compared)
    # Sorted draws give sorted depths (what `merge_samples` relies on).
    assert np.all(np.diff(np.asarray(gathered), axis=-1) >= 0)


def constant_field(density, color):
    """A field with constant density and colour: raw decoder outputs that activate to them."""
    raw_sigma = 1 + jnp.log(jnp.expm1(density))
    color = (jnp.asarray(color, jnp.float32) + 0.001) / 1.002
    raw = jnp.concatenate([raw_sigma[None], jnp.log(color) - jnp.log1p(-color)])
    return lambda points: jnp.broadcast_to(raw, points.shape[:-1] + (4,))


def test_constant_density_matches_closed_form():
    # Rays along +x through the cube at several heights; each crosses 2 units of density.
    options = RenderOptions(num_coarse=48, num_importance=48, deterministic=True)
    color = np.array([0.2, 0.5, 0.9])
    densities = np.array([0.3, 1.0, 2.5])
    origins = jnp.asarray([[-3.0, y, 0.1] for y in (-0.5, 0.0, 0.7)])
    directions = jnp.broadcast_to(jnp.asarray([1.0, 0.0, 0.0]), origins.shape)
    start, end = ray_marching.fix_missed_rays(*ray_marching.intersect_box(origins, directions))
    np.testing.assert_allclose(start, 2.0)
    np.testing.assert_allclose(end, 4.0)
    jitter = jnp.full((3, 48), 0.5)
    uniforms = jnp.broadcast_to((jnp.arange(48) + 0.5) / 48, (3, 48))

    @jax.jit
    @jax.vmap
    def render_with(density):
        return render_rays(constant_field(density, color), origins, directions, start, end, jitter,
                           uniforms, options=options)

    out = render_with(jnp.asarray(densities))
    # The in-box samples span [first, last]; the marcher integrates exactly that length, so the
    # opacity is 1 - exp(-density * length), the transmittance of a homogeneous slab.
    first, last = 2 + 1 / 47, 4 - 1 / 47
    inside = out["depths_all"] < 4.0
    np.testing.assert_allclose(jnp.min(jnp.where(inside, out["depths_all"], 9), axis=-1), first, rtol=1e-6)
    np.testing.assert_allclose(jnp.max(jnp.where(inside, out["depths_all"], 0), axis=-1), last, rtol=1e-6)
    length = last - first
    opacity = 1 - np.exp(-densities[:, None] * length)
    np.testing.assert_allclose(out["opacity"], np.broadcast_to(opacity, (3, 3)), rtol=1e-5)
    np.testing.assert_allclose(out["rgb"], np.broadcast_to(opacity[..., None] * color, (3, 3, 3)), rtol=1e-5)
    # Mean depth of an exponential distribution truncated to the slab (midpoint rule: O(delta^2)).
    expected_depth = first + 1 / densities[:, None] - length * np.exp(-densities[:, None] * length) / opacity
    np.testing.assert_allclose(out["depth"], np.broadcast_to(expected_depth, (3, 3)), rtol=2e-3)


def test_gradient_matches_finite_differences(decoder, reference):
    # Without importance samples the sample positions do not depend on the planes, so the render
    # is a smooth function of them and the official (depth-detached) gradient is the true one.
    options = RenderOptions(num_coarse=24, num_importance=0, deterministic=True)
    cameras = reference["input_render_cameras"][:, :2]
    weights = jax.random.uniform(jax.random.key(0), (2, 2, 6, 6, 3))
    planes = jnp.asarray(reference["planes"])
    base = render_jit(decoder, planes, cameras, resolution=6, options=options)

    @jax.jit
    def loss(planes):
        # Centred on the base render so that float32 rounding of the loss stays small.
        out = render_views(decoder, planes, cameras, resolution=6, options=options)
        return jnp.sum(weights * (out["rgb"] - base["rgb"])) + jnp.sum(out["opacity"] - base["opacity"])

    grad = jax.jit(jax.grad(loss))(planes)
    random_direction = jax.random.normal(jax.random.key(1), planes.shape)
    for direction, step, rtol in ((grad, 3e-3, 1e-3), (random_direction, 1e-2, 2e-2)):
        direction = direction / jnp.linalg.norm(direction)
        numeric = (loss(planes + step * direction) - loss(planes - step * direction)) / (2 * step)
        np.testing.assert_allclose(jnp.vdot(grad, direction), numeric, rtol=rtol)


# --- invariances -------------------------------------------------------------------------------------

def test_chunking_does_not_change_the_render(decoder, reference, fixture_renders):
    for chunk_size in (7, 64):
        options = RenderOptions(num_coarse=8, num_importance=8, deterministic=True, chunk_size=chunk_size)
        out = render_jit(decoder, reference["planes"], reference["input_render_cameras"], resolution=8,
                         options=options)
        for name in ("rgb", "depth", "opacity"):
            assert_close(out[name], fixture_renders["render8"][name], rtol=3e-6)


def test_sharded_render_matches_single_device(decoder, reference, fixture_renders):
    assert jax.device_count() == 8
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rules = ((BATCH_AXIS, "data"), (RAY_AXIS, "fsdp"))
    options = RenderOptions(num_coarse=8, num_importance=8, deterministic=True, chunk_size=24)

    def loss(planes):
        out = render_views(decoder, planes, reference["input_render_cameras"], resolution=8, options=options)
        return (jnp.sum(reference["grad_loss_weights_rgb"] * channels_first(out["rgb"]))
                + jnp.sum(reference["grad_loss_weights_weight"] * channels_first(out["opacity"]))), out

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        planes = jax.device_put(reference["planes"], jax.NamedSharding(mesh, jax.P("data")))
        (_, out), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(planes)
    assert grad.sharding.spec[:1] == ("data",)
    for name in ("rgb", "depth", "opacity"):
        assert_close(out[name], fixture_renders["render8"][name], rtol=3e-6)
    assert_close(grad, reference["grad_planes"])


def test_random_draws_depend_only_on_the_key(decoder, reference):
    def render_with(key, chunk_size=None, inverse_cdf="auto"):
        options = RenderOptions(num_coarse=8, num_importance=8, chunk_size=chunk_size, inverse_cdf=inverse_cdf)
        return render_jit(decoder, reference["planes"], reference["input_render_cameras"], resolution=8,
                          options=options, key=key)["rgb"]

    first = render_with(jax.random.key(0))
    np.testing.assert_array_equal(first, render_with(jax.random.key(0)))
    # Neither the chunking nor the inverse-CDF method changes the draws or the render.
    assert_close(render_with(jax.random.key(0), chunk_size=10, inverse_cdf="compare"), first, rtol=3e-6)
    second = render_with(jax.random.key(1))
    assert np.max(np.abs(first - second)) > 1e-3
    # Random draws render the same scene: close to the deterministic render on average.
    deterministic = render_jit(decoder, reference["planes"], reference["input_render_cameras"], resolution=8,
                               options=FIXTURE_OPTIONS)["rgb"]
    assert np.mean(np.abs(first - deterministic)) < 0.05


# --- options and API ---------------------------------------------------------------------------------

def test_crop_per_view_and_background(decoder, reference, fixture_renders):
    starts = jnp.asarray([[[0, 0], [2, 4], [6, 6]], [[3, 1], [6, 0], [1, 5]]])
    background = jnp.asarray([[0.0, 0.0, 0.0], [0.2, 0.4, 0.6]])
    out = render_jit(decoder, reference["planes"], reference["input_render_cameras"], resolution=12, crop_size=6,
                     crop_start=starts, options=FIXTURE_OPTIONS, background=background)
    # A ray's colour and opacity do not depend on the other rays of the call.
    full = fixture_renders["render12"]
    for n, m in np.ndindex(2, 3):
        y, x = np.asarray(starts[n, m])
        opacity = full["opacity"][n, m, y:y + 6, x:x + 6]
        on_black = full["rgb"][n, m, y:y + 6, x:x + 6] - (1 - opacity)
        np.testing.assert_allclose(out["opacity"][n, m], opacity, atol=1e-6)
        np.testing.assert_allclose(out["rgb"][n, m], on_black + (1 - opacity) * background[n], atol=1e-6)


def test_bfloat16_mlp_is_close(decoder, reference, fixture_renders):
    options = RenderOptions(num_coarse=8, num_importance=8, deterministic=True, mlp_dtype="bfloat16")
    out = render_jit(decoder, reference["planes"], reference["input_render_cameras"], resolution=8, options=options)
    difference = np.max(np.abs(out["rgb"] - fixture_renders["render8"]["rgb"]))
    assert 0 < difference < 1e-2  # bfloat16 matmuls are used, and stay close


def test_render_validates_and_matches_render_views(decoder, reference, fixture_renders):
    out = render(decoder, reference["planes"], reference["input_render_cameras"], resolution=8,
                 options=FIXTURE_OPTIONS)
    np.testing.assert_array_equal(out["rgb"], fixture_renders["render8"]["rgb"])


def test_malformed_inputs_raise(decoder, reference):
    planes, cameras = reference["planes"], reference["input_render_cameras"]
    kwargs = dict(resolution=8, options=FIXTURE_OPTIONS)
    with pytest.raises(ValueError, match=r"planes must be \(N, 3, C, H, W\)"):
        render_views(decoder, planes[0], cameras, **kwargs)
    with pytest.raises(ValueError, match="channels"):
        render_views(decoder, planes[:, :, :4], cameras, **kwargs)
    with pytest.raises(ValueError, match=r"cameras must be \(N, M, 25\)"):
        render_views(decoder, planes, cameras[..., :16], **kwargs)
    with pytest.raises(ValueError, match="disagree on N"):
        render_views(decoder, planes, cameras[:1], **kwargs)
    with pytest.raises(ValueError, match="PRNG key"):
        render_views(decoder, planes, cameras, resolution=8, options=RenderOptions())
    with pytest.raises(ValueError, match="crop_size"):
        render_views(decoder, planes, cameras, resolution=8, crop_size=9, options=FIXTURE_OPTIONS)
    with pytest.raises(ValueError, match="crop_start"):
        render_views(decoder, planes, cameras, resolution=8, crop_size=4, crop_start=jnp.zeros((2, 2, 2)),
                     options=FIXTURE_OPTIONS)
    with pytest.raises(ValueError, match="num_coarse"):
        RenderOptions(num_coarse=3)

    validate_render_inputs(planes, cameras)
    with pytest.raises(ValueError, match="non-finite"):
        validate_render_inputs(np.where(np.arange(8) == 3, np.nan, planes), cameras)
    stretched = cameras.copy()
    stretched[1, 2, 0] *= 1.2  # scales the rotation's first row
    with pytest.raises(ValueError, match=r"camera \[n=1, m=2\].*orthonormal"):
        validate_render_inputs(planes, stretched)
    no_focal = cameras.copy()
    no_focal[0, 1, 16] = -0.5
    with pytest.raises(ValueError, match="focal"):
        validate_render_inputs(planes, no_focal)
    with pytest.raises(ValueError, match="non-finite"):
        render(decoder, planes, np.where(np.arange(25) == 3, np.inf, cameras), resolution=8, options=FIXTURE_OPTIONS)


# --- memory ------------------------------------------------------------------------------------------

def compiled_gradient(resolution: int, options: RenderOptions, channels: int = 8, plane_size: int = 16):
    """Compiled planes-gradient of a render of one view, and its arguments."""
    decoder = TriplaneDecoder(channels, rngs=nnx.Rngs(0))
    planes = 0.5 * jax.random.normal(jax.random.key(0), (1, 3, channels, plane_size, plane_size))
    cameras = jnp.asarray(cams.turntable_cameras(1))[None]

    def loss(planes):
        return jnp.mean(render_views(decoder, planes, cameras, resolution=resolution, options=options,
                                     key=jax.random.key(0))["rgb"])

    return jax.jit(jax.grad(loss)).lower(planes).compile(), planes


def test_backward_memory_does_not_grow_with_image_size():
    options = RenderOptions(num_coarse=16, num_importance=16, chunk_size=256)
    small, large = (compiled_gradient(resolution, options)[0].memory_analysis().temp_size_in_bytes
                    for resolution in (32, 128))
    # 16x more rays: only per-ray vectors (a few dozen bytes each) may grow, not per-sample buffers.
    assert (large - small) / (128**2 - 32**2) < 200, (small, large)
    assert large < 1.5 * small, (small, large)


@pytest.mark.slow
def test_official_size_render_runs_in_bounded_memory():
    compiled, planes = compiled_gradient(384, RenderOptions(), channels=80, plane_size=64)  # 64 + 64 samples
    assert compiled.memory_analysis().temp_size_in_bytes < 2**30
    grad = compiled(planes)
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)
