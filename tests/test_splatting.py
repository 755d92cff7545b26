"""The Gaussian rasteriser (vfusion3d_jax/rendering/splatting) against gsplat 1.5.3's own code, a
sequential per-pixel oracle, finite differences, and its own invariances.

The reference files (tests/fixtures/gsplat_reference/, see its README.md) hold eight small scenes
made by gsplat's pure-torch functions and a restatement of its CUDA compositing kernel, with
float32 and float64 results. Every discrete decision there (culling, radii, tiles, depth order,
per-pixel skips and stops) is kept away from its threshold, so the integer arrays must match
exactly, and the float arrays must lie within SPREAD_MULTIPLE x gsplat's own float32-vs-float64
spread of the float64 result (at least a few float32 ulps of the array's scale): both round at
every operation, in different orders and with different exp and matmul kernels.
"""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SPREAD_MULTIPLE
from vfusion3d_jax.rendering import splatting
from vfusion3d_jax.rendering.splatting import (
    SplatCapacityError,
    SplatSettings,
    check_capacity,
    composite_tiles,
    covariance_3d,
    intersect_tiles,
    project_and_color,
    project_gaussians,
    rasterize,
    rasterize_to_pixels,
    tile_grid,
)

GSPLAT_DIR = Path(__file__).resolve().parent / "fixtures" / "gsplat_reference"
# `larger` (300 Gaussians, one more compilation) runs with the slow tests: every rule it exercises
# is exercised by the others as well.
SCENES = [pytest.param(path.stem, marks=pytest.mark.slow) if path.stem == "larger" else path.stem
          for path in sorted(GSPLAT_DIR.glob("*.npz"))]
# Scenes are padded with culled Gaussians to a multiple of this, so that scenes with the same image
# and settings share one compilation (four of the eight do).
PAD_TO = 64
# Small capacities and several chunks per tile, so that the fixtures cross chunk and batch borders.
FIXTURE_CAPACITY = dict(max_intersections=1024, max_per_tile=128, chunk_size=16)
FLOAT32_ULP = float(np.finfo(np.float32).eps)
GRADIENT_KEYS = ("means", "quats", "scales", "opacities", "colors")


# ---------------------------------------------------------------------------------------------
# gsplat reference scenes
# ---------------------------------------------------------------------------------------------

def load_scene(name: str) -> dict[str, np.ndarray]:
    return dict(np.load(GSPLAT_DIR / f"{name}.npz"))


def scene_settings(scene: dict) -> SplatSettings:
    return SplatSettings(tile_size=int(scene["tile_size"]), eps2d=float(scene["eps2d"]),
                         near_plane=float(scene["near_plane"]), far_plane=float(scene["far_plane"]),
                         **FIXTURE_CAPACITY)


def padded_inputs(scene: dict) -> dict[str, np.ndarray]:
    """The scene's Gaussians plus culled ones (1 unit behind the camera) up to a multiple of PAD_TO."""
    count = len(scene["means"])
    extra = -count % PAD_TO
    rotation, translation = scene["viewmat"][:3, :3], scene["viewmat"][:3, 3]
    behind = -rotation.T @ translation - rotation[2]  # camera centre minus its viewing direction
    colors = scene["sh_coeffs"] if "sh_coeffs" in scene else scene["colors"]
    return {
        "means": np.concatenate([scene["means"], np.tile(behind, (extra, 1))]).astype(np.float32),
        "quats": np.concatenate([scene["quats"], np.tile([1.0, 0, 0, 0], (extra, 1))]).astype(np.float32),
        "scales": np.concatenate([scene["scales"], np.full((extra, 3), 0.1)]).astype(np.float32),
        "opacities": np.concatenate([scene["opacities"], np.full(extra, 0.5)]).astype(np.float32),
        "colors": np.concatenate([colors, np.full((extra,) + colors.shape[1:], 0.25)]).astype(np.float32),
    }


@functools.partial(jax.jit, static_argnames=("width", "height", "settings", "sh_degree"))
def render_with_gradients(inputs, viewmat, K, background, loss_weights, *, width, height, settings, sh_degree):
    """Everything the fixtures hold, from one compilation: the render (opacity-aware radii, as
    `gsplat.rasterization()`), the gradients of the fixtures' loss w.r.t. the inputs and w.r.t.
    the projected means and conics, and the 3.33-sigma radii and tile lists of gsplat's torch
    projection.

    `rasterize` is `rasterize_to_pixels(*project_and_color(...))`; its two halves are run here
    with the chain rule between them, which gives the gradients w.r.t. the projected values (as
    gsplat's retain_grad does) without compiling the compositing's backward pass twice.
    """
    weights_colors, weights_alphas = loss_weights

    def first_half(parameters):
        projection, colors = project_and_color(*(parameters[key] for key in GRADIENT_KEYS), viewmat, K, width, height,
                                               settings, sh_degree)
        return (projection.means2d, projection.conics, colors), projection

    (means2d, conics, colors), pull_back, projection = jax.vjp(first_half, inputs, has_aux=True)

    def second_half(means2d, conics, opacities, colors):
        out_colors, out_alphas, info = rasterize_to_pixels(means2d, conics, projection.depths, projection.radii,
                                                           opacities, colors, width, height, background, settings)
        loss = jnp.sum(weights_colors * out_colors) + jnp.sum(weights_alphas * out_alphas)
        return loss, (out_colors, out_alphas, info)

    (_, (out_colors, out_alphas, info)), (grad_means2d, grad_conics, grad_opacities, grad_colors) = jax.value_and_grad(
        second_half, argnums=(0, 1, 2, 3), has_aux=True)(means2d, conics, inputs["opacities"], colors)
    (grads,) = pull_back((grad_means2d, grad_conics, grad_colors))
    grads = dict(grads, opacities=grads["opacities"] + grad_opacities)

    plain = project_gaussians(inputs["means"], inputs["quats"], inputs["scales"], viewmat, K, width, height,
                              eps2d=settings.eps2d, near_plane=settings.near_plane, far_plane=settings.far_plane)
    tiles_x, tiles_y = tile_grid(width, height, settings.tile_size)
    plain_pairs = intersect_tiles(plain.means2d, plain.radii, plain.depths, tile_size=settings.tile_size,
                                  tiles_x=tiles_x, tiles_y=tiles_y, capacity=settings.max_intersections)
    return {
        "render_colors": out_colors, "render_alphas": out_alphas,
        "info": dict(info, radii=projection.radii, means2d=means2d, depths=projection.depths, conics=conics,
                     colors=colors),
        "grads": grads, "grad_means2d": grad_means2d, "grad_conics": grad_conics,
        "covars": covariance_3d(inputs["quats"], inputs["scales"]),
        "plain_radii": plain.radii, "plain_pairs": plain_pairs._asdict(),
    }


def run_scene(scene: dict, inputs: dict | None = None, viewmat=None) -> dict:
    inputs = padded_inputs(scene) if inputs is None else inputs
    result = render_with_gradients(
        inputs, scene["viewmat"] if viewmat is None else viewmat, scene["K"], scene["background"],
        (scene["loss_weights_colors"], scene["loss_weights_alphas"]), width=int(scene["width"]),
        height=int(scene["height"]), settings=scene_settings(scene),
        sh_degree=int(scene["sh_degree"]) if "sh_coeffs" in scene else None)
    return jax.tree.map(np.asarray, result)


@functools.cache
def reference_run(name: str) -> tuple[dict, dict]:
    scene = load_scene(name)
    return scene, run_scene(scene)


def assert_matches_float64(scene: dict, actual, key: str, rows=None) -> None:
    """`actual` lies within SPREAD_MULTIPLE x gsplat's float32 spread of its float64 result (and
    within 4 float32 ulps of the array's scale, where gsplat's float32 happens to be exact)."""
    expected32, expected64 = scene[key].astype(np.float64), scene[f"float64/{key}"]
    actual = np.asarray(actual, np.float64)[: len(expected64)]
    if rows is not None:
        actual, expected32, expected64 = actual[rows], expected32[rows], expected64[rows]
    assert actual.shape == expected64.shape, key
    scale = float(np.max(np.abs(expected64)))
    spread = float(np.max(np.abs(expected32 - expected64)))
    error = float(np.max(np.abs(actual - expected64)))
    bound = SPREAD_MULTIPLE * max(spread, FLOAT32_ULP * scale)
    assert error <= bound, f"{key}: max |ours - float64| {error:.3g} > {bound:.3g} (gsplat float32 spread {spread:.3g})"


def tiles_of(isect_ids: np.ndarray) -> np.ndarray:
    return (isect_ids.astype(np.int64) >> 32).astype(np.int32)


@pytest.mark.parametrize("name", SCENES)
def test_projection_and_tile_lists_match_gsplat(name):
    """Radii, tile counts, the sorted (tile, depth) lists and tile offsets are gsplat's exactly, for
    both radius rules; projected values within float32 rounding."""
    scene, result = reference_run(name)
    count = len(scene["means"])
    info = result["info"]
    for prefix, radii, pairs in (("", result["plain_radii"], result["plain_pairs"]),
                                 ("opacity_aware/", info["radii"], info)):
        label = prefix or "3.33-sigma "
        np.testing.assert_array_equal(radii[:count], scene[f"{prefix}radii"], err_msg=f"{label}radii")
        assert not radii[count:].any(), "the padding is culled"
        np.testing.assert_array_equal(pairs["tiles_per_gaussian"][:count], scene[f"{prefix}tiles_per_gauss"])
        used = len(scene[f"{prefix}flatten_ids"])
        assert int(pairs["num_intersections"]) == used
        # The high 32 bits of gsplat's keys are the tile ids; the order within a tile is the depth order.
        np.testing.assert_array_equal(pairs["tile_ids"][:used], tiles_of(scene[f"{prefix}isect_ids"]))
        assert (pairs["tile_ids"][used:] == pairs["tile_offsets"].size).all(), "unused slots hold the sentinel"
        np.testing.assert_array_equal(pairs["gaussian_ids"][:used], scene[f"{prefix}flatten_ids"],
                                      err_msg=f"{label}depth order")
        np.testing.assert_array_equal(pairs["tile_offsets"], scene[f"{prefix}isect_offsets"])
        counts = np.diff(scene[f"{prefix}isect_offsets"].reshape(-1), append=used)
        np.testing.assert_array_equal(pairs["tile_counts"].reshape(-1), counts)

    visible = scene["radii"].all(axis=-1) > 0  # gsplat's projected values are meaningful here only
    assert_matches_float64(scene, result["covars"], "covars")
    assert_matches_float64(scene, info["depths"], "depths", rows=visible)
    aware_visible = scene["opacity_aware/radii"].all(axis=-1) > 0
    for key in ("means2d", "conics"):
        assert_matches_float64(scene, info[key], key, rows=aware_visible)
    if "sh_colors" in scene:
        assert_matches_float64(scene, info["colors"], "sh_colors", rows=aware_visible)


@pytest.mark.parametrize("name", SCENES)
def test_render_matches_gsplat(name):
    scene, result = reference_run(name)
    assert_matches_float64(scene, result["render_colors"], "render_colors")
    assert_matches_float64(scene, result["render_alphas"], "render_alphas")
    assert not result["info"]["overflow"]


@pytest.mark.parametrize("name", SCENES)
def test_gradients_match_gsplat(name):
    scene, result = reference_run(name)
    color_key = "sh_coeffs" if "sh_coeffs" in scene else "colors"
    for key in GRADIENT_KEYS:
        fixture_key = f"grad_{color_key}" if key == "colors" else f"grad_{key}"
        assert_matches_float64(scene, result["grads"][key], fixture_key)
    assert_matches_float64(scene, result["grad_means2d"], "grad_means2d")
    assert_matches_float64(scene, result["grad_conics"], "grad_conics")


@pytest.mark.parametrize("name", ["near_plane", "offscreen", "one_pixel"])
def test_culled_gaussians_contribute_nothing(name):
    """Culled Gaussians (behind the camera or the near plane, past the far plane, off screen, too
    faint; and the padding) have a zero gradient, and changing them leaves the image unchanged."""
    scene, result = reference_run(name)
    culled = ~(result["info"]["radii"].all(axis=-1) > 0)
    assert culled[: len(scene["means"])].any()
    for key in GRADIENT_KEYS:
        assert not result["grads"][key][culled].any(), key
    inputs = padded_inputs(scene)
    # Changes that keep them culled: smaller boxes (smaller scales, lower opacities), other colours.
    inputs["colors"][culled] = 1 - inputs["colors"][culled]
    inputs["scales"][culled] *= 0.8
    inputs["opacities"][culled] *= 0.9
    changed = run_scene(scene, inputs)
    np.testing.assert_array_equal(changed["info"]["radii"], result["info"]["radii"])
    np.testing.assert_array_equal(changed["render_colors"], result["render_colors"])
    np.testing.assert_array_equal(changed["render_alphas"], result["render_alphas"])


def test_vmap_over_cameras_matches_single_renders():
    scene, single = reference_run("random")
    moved = scene["viewmat"].copy()
    moved[:3, 3] += [0.2, -0.1, 0.3]
    second = run_scene(scene, viewmat=moved)
    inputs = padded_inputs(scene)
    settings = scene_settings(scene)
    width, height = int(scene["width"]), int(scene["height"])

    @jax.jit
    def render_two(viewmats):
        def one(viewmat):
            colors, alphas, info = rasterize(*(inputs[key] for key in GRADIENT_KEYS), viewmat, scene["K"], width,
                                             height, scene["background"], settings)
            return colors, alphas, info["overflow"]
        return jax.vmap(one)(viewmats)

    colors, alphas, overflow = render_two(np.stack([scene["viewmat"], moved]))
    for index, expected in enumerate((single, second)):
        np.testing.assert_allclose(colors[index], expected["render_colors"], atol=1e-6)
        np.testing.assert_allclose(alphas[index], expected["render_alphas"], atol=1e-6)
    assert not np.asarray(overflow).any()
    assert np.abs(second["render_colors"] - single["render_colors"]).max() > 0.05, "the cameras see different images"


def test_lower_sh_degrees_are_prefixes_of_degree_three():
    """The fixtures cover degree 3; degrees 0-2 use the first (d + 1)^2 bases of the same basis."""
    directions = splatting.projection.normalize(jnp.asarray(np.random.default_rng(8).normal(size=(5, 3))))
    full = np.asarray(splatting.sh_basis(3, directions))
    for degree in range(3):
        np.testing.assert_array_equal(splatting.sh_basis(degree, directions), full[:, : (degree + 1) ** 2])
    np.testing.assert_allclose(full[:, 0], 0.5 / np.sqrt(np.pi))  # Y_0^0


# ---------------------------------------------------------------------------------------------
# Compositing against a sequential oracle, over settings
# ---------------------------------------------------------------------------------------------

def composite_oracle(means2d, conics, opacities, colors, depths, width, height, background):
    """Test oracle: gsplat's per-pixel rule in float32, one Gaussian at a time in depth order (for
    all pixels at once), over all Gaussians (no tiles: outside its box a Gaussian's alpha is below
    1/255 anyway). Also returns, per pixel, the index of the Gaussian that stopped it (-1: none)."""
    f32 = np.float32
    x, y = np.meshgrid(np.arange(width, dtype=f32) + f32(0.5), np.arange(height, dtype=f32) + f32(0.5))
    transmittance = np.ones((height, width), f32)
    image = np.zeros((height, width, colors.shape[1]), f32)
    done = np.zeros((height, width), bool)
    stopped_by = np.full((height, width), -1)
    for g in np.argsort(depths, kind="stable"):
        dx, dy = means2d[g, 0] - x, means2d[g, 1] - y
        a, b, c = conics[g]
        sigma = f32(0.5) * (a * dx * dx + c * dy * dy) + b * dx * dy
        alpha = np.minimum(f32(0.999), opacities[g] * np.exp(-sigma))
        passes = ~done & (sigma >= 0) & (alpha >= f32(1 / 255))
        next_transmittance = transmittance * (f32(1) - alpha)
        stops = passes & (next_transmittance <= f32(1e-4))
        stopped_by[stops] = g
        done |= stops
        blend = passes & ~stops
        image += np.where(blend[..., None], (alpha * transmittance)[..., None] * colors[g], f32(0))
        transmittance = np.where(blend, next_transmittance, transmittance)
    return image + transmittance[..., None] * background, (1 - transmittance)[..., None], stopped_by


def pairs_needed(scene) -> int:
    """Gaussian-tile pairs of a 2D scene, counted in numpy (gsplat's box rule)."""
    size, grid = scene["tile_size"], np.array(tile_grid(scene["width"], scene["height"], scene["tile_size"]))
    center, half = scene["means2d"] / size, scene["radii"] / size
    low = np.clip(np.floor(center - half), 0, grid)
    high = np.clip(np.ceil(center + half), 0, grid)
    return int(np.prod(high - low, axis=-1).sum())


def stacked_scene():
    """2D Gaussians on a 40 x 24 image (tile 8: 5 x 3 tiles). Eight share the centre (20.5, 11.5),
    front to back with opacities 0.5, 0.9, 0.95, 0.95, 0.95, 0.05, 0.1, 0.3: at the centre pixel T
    falls to 1.25e-4 after four, the fifth stops it (not blended), and the sixth and seventh, which
    would still pass were the stop not final, are excluded. Then one with opacity 0.9995 (alpha
    clamped to 0.999 at its centre pixel), some fainter than 1/255, and 30 random ones."""
    rng = np.random.default_rng(3)
    center = [20.5, 11.5]
    stack = [0.5, 0.9, 0.95, 0.95, 0.95, 0.05, 0.1, 0.3]
    count = len(stack) + 3 + 30
    means2d = np.concatenate([np.tile(center, (len(stack), 1)), [[6.5, 4.5], [33.0, 18.0], [10.0, 19.0]],
                              rng.uniform([0, 0], [40, 24], (30, 2))])
    sigmas = np.concatenate([np.full(len(stack), 3.0), [2.0, 4.0, 3.0], rng.uniform(0.7, 4, 30)])
    covariances = np.zeros((count, 2, 2))
    covariances[:, 0, 0] = sigmas ** 2
    covariances[:, 1, 1] = (sigmas * rng.uniform(0.5, 1.5, count)) ** 2
    covariances[:, 0, 1] = covariances[:, 1, 0] = rng.uniform(-0.4, 0.4, count) * np.sqrt(
        covariances[:, 0, 0] * covariances[:, 1, 1])
    inverse = np.linalg.inv(covariances)
    conics = np.stack([inverse[:, 0, 0], inverse[:, 0, 1], inverse[:, 1, 1]], axis=-1)
    radii = np.ceil(3.33 * np.sqrt(np.stack([covariances[:, 0, 0], covariances[:, 1, 1]], axis=-1)))
    opacities = np.concatenate([stack, [0.9995, 0.003, 0.0035], rng.uniform(0.05, 0.99, 30)])
    depths = np.concatenate([1 + 0.1 * np.arange(len(stack)), [0.5, 0.7, 3.0], rng.uniform(2, 3, 30)])
    colors = rng.uniform(0, 1, (count, 3))
    as32 = lambda value: np.asarray(value, np.float32)  # noqa: E731
    return dict(means2d=as32(means2d), conics=as32(conics), radii=radii.astype(np.int32), opacities=as32(opacities),
                depths=as32(depths), colors=as32(colors), background=as32([0.2, 0.4, 0.6]), width=40, height=24,
                tile_size=8)


@functools.partial(jax.jit, static_argnames=("tile_size", "width", "height", "capacity", "max_per_tile",
                                             "chunk_size", "tiles_per_batch"))
def composite_2d(scene, *, tile_size, width, height, capacity, max_per_tile, chunk_size, tiles_per_batch):
    tiles_x, tiles_y = tile_grid(width, height, tile_size)
    pairs = intersect_tiles(scene["means2d"], scene["radii"], scene["depths"], tile_size=tile_size, tiles_x=tiles_x,
                            tiles_y=tiles_y, capacity=capacity)
    colors, alphas = composite_tiles(scene["means2d"], scene["conics"], scene["opacities"], scene["colors"],
                                     pairs.gaussian_ids, pairs.tile_offsets, pairs.tile_counts, scene["background"],
                                     width=width, height=height, tile_size=tile_size, max_per_tile=max_per_tile,
                                     chunk_size=chunk_size, tiles_per_batch=tiles_per_batch)
    return colors, alphas, pairs.num_intersections, jnp.max(pairs.tile_counts)


@functools.cache
def stacked_oracle():
    scene = stacked_scene()
    arrays = {key: scene[key] for key in ("means2d", "conics", "opacities", "colors", "depths")}
    return scene, composite_oracle(**arrays, width=scene["width"], height=scene["height"],
                                   background=scene["background"])


@pytest.mark.parametrize("capacity, max_per_tile, chunk_size, tiles_per_batch", [
    (1024, 64, 1, 1),     # one Gaussian per step: every stop lands on a chunk border
    (1024, 63, 3, 2),     # the centre's stop falls mid-chunk; the Gaussians after it in the next one
    (None, 64, 16, 15),   # a buffer of exactly the pairs needed (counted in numpy); all tiles in one batch
    (4096, 512, 64, 4),   # generous capacities: chunks past every tile's count are skipped
])
def test_compositing_follows_the_sequential_rule(capacity, max_per_tile, chunk_size, tiles_per_batch):
    scene, (expected_colors, expected_alphas, stopped_at) = stacked_oracle()
    center_x, center_y = 20, 11
    assert stopped_at[center_y, center_x] == 4, "the fifth Gaussian of the stack stops the centre pixel"
    assert (stopped_at >= 0).sum() > 1
    arrays = {key: scene[key] for key in ("means2d", "conics", "opacities", "colors", "depths", "radii", "background")}
    static = dict(tile_size=scene["tile_size"], width=scene["width"], height=scene["height"])
    if capacity is None:
        capacity = pairs_needed(scene)
    colors, alphas, needed, fullest = composite_2d(arrays, **static, capacity=capacity, max_per_tile=max_per_tile,
                                                   chunk_size=chunk_size, tiles_per_batch=tiles_per_batch)
    assert needed == pairs_needed(scene) <= capacity and fullest <= max_per_tile
    np.testing.assert_allclose(colors, expected_colors, atol=1e-6)
    np.testing.assert_allclose(alphas, expected_alphas, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Capacities
# ---------------------------------------------------------------------------------------------

def test_too_few_intersection_slots_raise_in_the_eager_entry_point():
    scene = load_scene("random")
    inputs = padded_inputs(scene)
    needed = len(scene["opacity_aware/flatten_ids"])
    settings = SplatSettings(max_intersections=64, max_per_tile=128, chunk_size=16)
    expected = rf"{needed} Gaussian-tile intersections > max_intersections=64"
    with pytest.raises(SplatCapacityError, match=expected) as raised:
        splatting.render(*(inputs[key] for key in GRADIENT_KEYS), scene["viewmat"], scene["K"], int(scene["width"]),
                         int(scene["height"]), scene["background"], settings)
    message = str(raised.value)
    assert "\n" not in message and "SplatSettings(max_intersections=1024)" in message and "max_per_tile" not in message


def test_a_tile_over_max_per_tile_is_reported():
    scene = load_scene("larger")
    inputs = padded_inputs(scene)
    settings = SplatSettings(max_intersections=1024, max_per_tile=16, chunk_size=16)
    fullest = int(np.diff(scene["opacity_aware/isect_offsets"].reshape(-1),
                          append=len(scene["opacity_aware/flatten_ids"])).max())
    _, _, info = jax.jit(rasterize, static_argnums=(7, 8, 10))(
        *(inputs[key] for key in GRADIENT_KEYS), scene["viewmat"], scene["K"], int(scene["width"]),
        int(scene["height"]), scene["background"], settings)
    assert bool(info["overflow"]) and int(info["max_tile_count"]) == fullest > 16
    assert int(info["num_intersections"]) == len(scene["opacity_aware/flatten_ids"])
    with pytest.raises(SplatCapacityError, match=rf"{fullest} Gaussians in one tile > max_per_tile=16"):
        check_capacity(info, settings)
    check_capacity(info, SplatSettings(max_intersections=1024, max_per_tile=fullest))


def test_settings_are_validated():
    with pytest.raises(ValueError, match="far_plane .* must exceed near_plane"):
        SplatSettings(near_plane=1.0, far_plane=0.5)
    with pytest.raises(ValueError, match="max_intersections must be positive"):
        SplatSettings(max_intersections=0)


# ---------------------------------------------------------------------------------------------
# Gradients against finite differences
# ---------------------------------------------------------------------------------------------

def smooth_scene():
    """Six large SH (degree 3) Gaussians over a 16 x 12 image: every Gaussian covers every pixel
    with alpha in [0.1, 0.7], so no pixel is near 1/255, the 0.999 clamp or the 1e-4 stop, and
    every radius box covers the image. Float64."""
    rng = np.random.default_rng(5)
    count = 6
    means = np.concatenate([rng.uniform(-0.15, 0.15, (count, 2)), 3 + 0.4 * np.arange(count)[:, None]], axis=1)
    sh = np.zeros((count, 16, 3))
    sh[:, 0] = rng.uniform(-0.5, 0.5, (count, 3))
    sh[:, 1:] = rng.normal(0, 0.05, (count, 15, 3))
    return {
        "means": means, "quats": rng.normal(size=(count, 4)), "scales": rng.uniform(1.8, 2.5, (count, 3)),
        "opacities": rng.uniform(0.25, 0.7, count), "colors": sh,
        "viewmat": np.eye(4), "K": np.array([[20.0, 0, 8], [0, 20.0, 6], [0, 0, 1]]),
    }


def test_gradients_match_central_differences_in_float64():
    """Directional derivatives along a random direction per input: autodiff vs central differences,
    in float64 (step 1e-6: truncation ~1e-12, rounding ~1e-10, relative), on a scene whose
    discrete decisions stay put under the step."""
    scene = smooth_scene()
    settings = SplatSettings(tile_size=8, max_intersections=256, max_per_tile=64, chunk_size=4)
    weights = np.random.default_rng(6).normal(size=(12, 16, 4))
    with jax.enable_x64(True):
        inputs = {key: jnp.asarray(scene[key], jnp.float64) for key in GRADIENT_KEYS}
        camera = jnp.asarray(scene["viewmat"]), jnp.asarray(scene["K"])

        def loss(parameters):
            colors, alphas, info = rasterize(*(parameters[key] for key in GRADIENT_KEYS), *camera, 16, 12,
                                             settings=settings, sh_degree=3)
            image = jnp.concatenate([colors, alphas], axis=-1)
            return jnp.sum(weights * image), (info, colors)

        value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
        (_, (info, colors)), grads = value_and_grad(inputs)
        assert colors.dtype == jnp.float64
        # The thresholds are far: every Gaussian covers the whole image with a moderate alpha.
        assert (np.asarray(info["tiles_per_gaussian"]) == 4).all()
        projected = {key: np.asarray(info[key]) for key in ("means2d", "conics")}
        x, y = np.meshgrid(np.arange(16) + 0.5, np.arange(12) + 0.5)
        dx = projected["means2d"][:, 0, None, None] - x
        dy = projected["means2d"][:, 1, None, None] - y
        a, b, c = (projected["conics"][:, k, None, None] for k in range(3))
        alphas = scene["opacities"][:, None, None] * np.exp(-(0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy))
        assert 0.1 < alphas.min() and alphas.max() < 0.7
        assert np.asarray(info["colors"]).min() > 0.05, "SH colours stay clear of the clamp at 0"

        rng = np.random.default_rng(7)
        step = 1e-6
        for key in GRADIENT_KEYS:
            direction = rng.normal(size=scene[key].shape)
            plus = dict(inputs, **{key: inputs[key] + step * direction})
            minus = dict(inputs, **{key: inputs[key] - step * direction})
            numeric = (float(value_and_grad(plus)[0][0]) - float(value_and_grad(minus)[0][0])) / (2 * step)
            analytic = float(np.sum(np.asarray(grads[key]) * direction))
            assert abs(numeric - analytic) <= 1e-6 * max(abs(analytic), 1e-3), (key, numeric, analytic)
