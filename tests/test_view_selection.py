"""View curation for FlexRM: epipolar geometry, the consistency score on rendered scenes, selection."""

import jax.numpy as jnp
import numpy as np
import pytest

from vfusion3d_jax import cameras
from vfusion3d_jax.inference import view_selection
from vfusion3d_jax.models.flexrm import Gaussians, render_gaussians
from vfusion3d_jax.rendering.splatting import SplatSettings

SIZE, GRID = 64, 16
INTRINSICS = cameras.intrinsics_matrix(*cameras.DEFAULT_INTRINSICS)


def _camera(azimuth_deg: float, elevation_deg: float = 20.0, radius: float = 2.2) -> np.ndarray:
    return cameras.render_camera(cameras.orbit_cam2world(azimuth_deg, elevation_deg, radius), INTRINSICS)


def test_projections_of_one_point_obey_the_fundamental_matrix():
    rng = np.random.default_rng(0)
    points = rng.uniform(-0.8, 0.8, size=(50, 3))
    camera_a, camera_b = _camera(10.0, 15.0), _camera(75.0, 35.0)
    project = lambda camera, p: cameras.project_points(p, *cameras.split_render_camera(camera))  # noqa: E731
    on_a, on_b = project(camera_a, points), project(camera_b, points)
    fundamental = view_selection.fundamental_matrix(camera_a, camera_b)
    assert np.max(view_selection.epipolar_distances(fundamental, on_a, on_b)) < 1e-9
    # A wrong partner (another point's projection) is off its epipolar line.
    assert np.median(view_selection.epipolar_distances(fundamental, on_a, np.roll(on_b, 1, axis=0))) > 0.02


def _scene(seed: int, count: int = 40) -> Gaussians:
    """Small Gaussians of distinct saturated colours in the object box: every patch is recognisable."""
    rng = np.random.default_rng(seed)
    hue = rng.uniform(0, 1, count)
    colors = np.clip(np.abs(((hue[:, None] * 6 + [0, 4, 2]) % 6) - 3) - 1, 0, 1)  # HSV → RGB, full saturation
    return Gaussians(means=jnp.asarray(rng.uniform(-0.6, 0.6, (1, count, 3)), jnp.float32),
                     quats=jnp.tile(jnp.array([1.0, 0, 0, 0]), (1, count, 1)),
                     scales=jnp.full((1, count, 3), 0.07, jnp.float32),
                     opacities=jnp.full((1, count), 0.95, jnp.float32),
                     colors=jnp.asarray(colors[None], jnp.float32))


def _render(scene: Gaussians, camera: np.ndarray) -> np.ndarray:
    settings = SplatSettings(max_intersections=1 << 14, max_per_tile=256)
    images, _, info = render_gaussians(scene, jnp.asarray(camera)[None, None], SIZE, settings)
    assert not bool(np.any(info["overflow"]))
    return np.asarray(images[0, 0])


def _patch_features(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A weight-free descriptor: each patch's mean colour and its 3 x 3 neighbourhood's; foreground mask."""
    patch = SIZE // GRID
    means = image.reshape(GRID, patch, GRID, patch, 3).mean(axis=(1, 3))
    padded = np.pad(means, ((1, 1), (1, 1), (0, 0)), mode="edge")
    neighbourhood = np.concatenate([padded[r:r + GRID, c:c + GRID] for r in range(3) for c in range(3)], axis=-1)
    foreground = means.min(axis=-1) < 0.9
    return (neighbourhood - 1.0).reshape(GRID * GRID, -1), foreground.reshape(-1)


def _consistency(image_a, camera_a, image_b, camera_b) -> float:
    (features_a, foreground_a), (features_b, foreground_b) = _patch_features(image_a), _patch_features(image_b)
    score, matches = view_selection.epipolar_consistency(features_a, features_b, camera_a, camera_b,
                                                         foreground_a=foreground_a, foreground_b=foreground_b)
    assert matches >= 10
    return score


def test_consistency_separates_true_views_from_wrong_ones():
    scene, other = _scene(1), _scene(2)
    camera_a = _camera(0.0)
    image_a = _render(scene, camera_a)
    true_scores, wrong_scores = [], []
    for azimuth in (30.0, 45.0):
        camera_b = _camera(azimuth)
        true_scores.append(_consistency(image_a, camera_a, _render(scene, camera_b), camera_b))
        wrong_scores += [
            _consistency(image_a, camera_a, _render(other, camera_b), camera_b),  # another object
            _consistency(image_a, camera_a, _render(scene, _camera(azimuth + 90.0, 50.0)), camera_b),  # wrong pose
        ]
    # Measured: true 0.80 and 0.76; wrong at most 0.38 (mirrored views are not caught: the docstring).
    assert min(true_scores) > 0.65, true_scores
    assert min(true_scores) > max(wrong_scores) + 0.25, (true_scores, wrong_scores)


def test_selection_covers_the_object_and_drops_low_scores():
    azimuths = np.arange(16) * 22.5
    candidates = np.stack([_camera(a) for a in azimuths])
    scores = np.ones(16)
    scores[8] = 0.1  # the view opposite the input: best for coverage, but below min_score
    chosen = view_selection.select_views(candidates, scores, 3, reference_camera=_camera(0.0), min_score=0.5)
    assert len(chosen) == 3 and 8 not in chosen.tolist()
    directions = view_selection.viewing_directions(np.concatenate([_camera(0.0)[None], candidates[chosen]]))
    angles = np.degrees(np.arccos(np.clip(directions @ directions.T, -1, 1)))
    assert angles[~np.eye(4, dtype=bool)].min() >= 60.0, angles  # spread around, not clustered

    # Without a reference the best score comes first; no more than what passes comes back.
    scores = np.linspace(0.2, 1.0, 16)
    chosen = view_selection.select_views(candidates, scores, 10, min_score=0.85)
    assert chosen[0] == 15 and sorted(chosen.tolist()) == [13, 14, 15]


def test_features_must_be_a_square_grid():
    with pytest.raises(ValueError, match="grid"):
        view_selection.epipolar_consistency(np.zeros((10, 3)), np.zeros((10, 3)), _camera(0.0), _camera(30.0))
