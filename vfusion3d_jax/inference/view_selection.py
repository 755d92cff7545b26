"""Choosing FlexRM's input views from a pool of generated candidates (Flex3D's view curation).

Flex3D generates many candidate views of an object (orbits at several elevations from the
multi-view diffusion model) and feeds the reconstruction model only the good ones that agree
with the input view. Two scores per candidate, neither needing new weights:

* quality: a classifier on encoder features (`curation.estimators.QualityClassifier`, as
  `curate` trains it), passed in as numbers;
* consistency with the input view, whose pose and the candidates' generation poses are known:
  patch features of the two images (the LRM encoder's patch tokens, or any (P, D) features on a
  grid of patches) are matched as mutual nearest neighbours among foreground patches, and a
  match counts when it is geometrically possible: each patch centre lies near the epipolar line
  of the other (the fundamental matrix of the two cameras), and the two rays meet in front of
  both cameras inside the object's box. The score is the fraction of matches that pass. A view
  of another object, or one whose pose is not the claimed one, matches by chance, and chance
  matches land anywhere. A limit: cameras on one orbit have nearly horizontal epipolar lines, so
  only rows are checked strictly; a horizontally mirrored view keeps its rows, and at small
  baselines (30-45 degrees) scores close to a true one. The quality classifier is what catches
  mirrored generations (`curation.corruptions.mirrored`).

`select_views` then keeps the candidates above a score and picks a subset of the requested size
that covers the object: the best first, then greedily the candidate whose viewing direction is
farthest (in angle) from those chosen, weighted by its score.

Image coordinates are the project's normalised pixels in [0, 1]² (x right, y down), the frame of
`cameras.project_points`; cameras are 25-d render cameras (`cameras.render_camera`).
"""

from __future__ import annotations

import numpy as np

from vfusion3d_jax import cameras

# A match is consistent when both patch centres lie within this distance (normalised image
# units) of the other's epipolar line: half a patch of a 16 x 16 grid.
EPIPOLAR_TOLERANCE = 1.0 / 32.0
# Objects live in [-1, 1]³ (cameras.py); matched rays must meet inside it.
OBJECT_BOUND = 1.0


def world_to_opencv(render_camera: np.ndarray) -> np.ndarray:
    """The 4x4 world → camera map (OpenCV axes: x right, y down, z forward) of a 25-d camera."""
    cam2world, _ = cameras.split_render_camera(np.asarray(render_camera, np.float64))
    return np.linalg.inv(cam2world @ cameras.OPENGL_TO_OPENCV.astype(np.float64))


def fundamental_matrix(camera_a: np.ndarray, camera_b: np.ndarray) -> np.ndarray:
    """F (3, 3) with x_bᵀ F x_a = 0 for the images x_a, x_b (homogeneous normalised pixels) of
    any world point in the two cameras."""
    pose_a, pose_b = world_to_opencv(camera_a), world_to_opencv(camera_b)
    relative = pose_b @ np.linalg.inv(pose_a)  # camera a's frame → camera b's
    rotation, translation = relative[:3, :3], relative[:3, 3]
    cross = np.array([[0.0, -translation[2], translation[1]],
                      [translation[2], 0.0, -translation[0]],
                      [-translation[1], translation[0], 0.0]])
    _, intrinsics_a = cameras.split_render_camera(np.asarray(camera_a, np.float64))
    _, intrinsics_b = cameras.split_render_camera(np.asarray(camera_b, np.float64))
    return np.linalg.inv(intrinsics_b).T @ (cross @ rotation) @ np.linalg.inv(intrinsics_a)


def epipolar_distances(fundamental: np.ndarray, points_a: np.ndarray, points_b: np.ndarray) -> np.ndarray:
    """(M,) the larger of the two point-to-epipolar-line distances of matched points (M, 2) each."""
    homogeneous_a = np.concatenate([points_a, np.ones((len(points_a), 1))], axis=1)
    homogeneous_b = np.concatenate([points_b, np.ones((len(points_b), 1))], axis=1)
    lines_b = homogeneous_a @ fundamental.T  # the line in image b of each point of image a
    lines_a = homogeneous_b @ fundamental
    distance_b = np.abs(np.sum(lines_b * homogeneous_b, axis=1)) / np.maximum(np.hypot(lines_b[:, 0], lines_b[:, 1]), 1e-12)
    distance_a = np.abs(np.sum(lines_a * homogeneous_a, axis=1)) / np.maximum(np.hypot(lines_a[:, 0], lines_a[:, 1]), 1e-12)
    return np.maximum(distance_a, distance_b)


def triangulate(camera_a: np.ndarray, camera_b: np.ndarray, points_a: np.ndarray, points_b: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where the rays through matched image points (M, 2) come closest: midpoints (M, 3) and the
    distances (M,) along each ray from its camera (negative: behind it)."""
    def rays(camera, points):
        cam2world, intrinsics = cameras.split_render_camera(np.asarray(camera, np.float64))
        to_world = cam2world @ cameras.OPENGL_TO_OPENCV.astype(np.float64)
        lifted = np.concatenate([points, np.ones((len(points), 1))], axis=1) @ np.linalg.inv(intrinsics).T
        directions = lifted @ to_world[:3, :3].T
        return to_world[:3, 3], directions / np.linalg.norm(directions, axis=1, keepdims=True)

    (origin_a, direction_a), (origin_b, direction_b) = rays(camera_a, points_a), rays(camera_b, points_b)
    # Closest points o_a + s d_a and o_b + t d_b of two lines (unit directions).
    offset = origin_a - origin_b
    cosine = np.sum(direction_a * direction_b, axis=1)
    along_a, along_b = direction_a @ offset, direction_b @ offset
    denominator = np.maximum(1.0 - cosine ** 2, 1e-12)
    depth_a = (cosine * along_b - along_a) / denominator
    depth_b = (along_b - cosine * along_a) / denominator
    midpoints = 0.5 * (origin_a + depth_a[:, None] * direction_a + origin_b + depth_b[:, None] * direction_b)
    return midpoints, depth_a, depth_b


def patch_centres(grid: int) -> np.ndarray:
    """(grid², 2) normalised (x, y) centres of a grid x grid patch layout, row-major."""
    centres = (np.arange(grid) + 0.5) / grid
    y, x = np.meshgrid(centres, centres, indexing="ij")
    return np.stack([x.ravel(), y.ravel()], axis=1)


def mutual_nearest_neighbours(features_a: np.ndarray, features_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j) where b's j is a's i's nearest neighbour by cosine similarity and vice versa."""
    unit_a = features_a / np.maximum(np.linalg.norm(features_a, axis=1, keepdims=True), 1e-12)
    unit_b = features_b / np.maximum(np.linalg.norm(features_b, axis=1, keepdims=True), 1e-12)
    similarity = unit_a @ unit_b.T
    best_b, best_a = similarity.argmax(axis=1), similarity.argmax(axis=0)
    mutual = best_a[best_b] == np.arange(len(features_a))
    return np.nonzero(mutual)[0], best_b[mutual]


def epipolar_consistency(features_a: np.ndarray, features_b: np.ndarray, camera_a: np.ndarray,
                         camera_b: np.ndarray, *, foreground_a: np.ndarray | None = None,
                         foreground_b: np.ndarray | None = None,
                         tolerance: float = EPIPOLAR_TOLERANCE, bound: float = OBJECT_BOUND) -> tuple[float, int]:
    """(fraction of mutual nearest-neighbour matches that are geometrically possible, matches).

    A match is possible when it obeys the epipolar constraint within `tolerance` and its rays
    meet in front of both cameras within the box [-bound, bound]³. features_*: (grid², D) patch
    features in row-major grid order; foreground_*: (grid²,) bool, the patches that show the
    object (None: all). No match at all scores 0.
    """
    grid = int(round(np.sqrt(len(features_a))))
    if grid * grid != len(features_a) or features_a.shape != features_b.shape:
        raise ValueError(f"features must be (grid², D) of equal shape, got {features_a.shape} and {features_b.shape}")
    keep_a = np.ones(len(features_a), bool) if foreground_a is None else np.asarray(foreground_a, bool)
    keep_b = np.ones(len(features_b), bool) if foreground_b is None else np.asarray(foreground_b, bool)
    index_a, index_b = np.nonzero(keep_a)[0], np.nonzero(keep_b)[0]
    if not len(index_a) or not len(index_b):
        return 0.0, 0
    matched_a, matched_b = mutual_nearest_neighbours(features_a[index_a], features_b[index_b])
    if not len(matched_a):
        return 0.0, 0
    centres = patch_centres(grid)
    points_a, points_b = centres[index_a[matched_a]], centres[index_b[matched_b]]
    distances = epipolar_distances(fundamental_matrix(camera_a, camera_b), points_a, points_b)
    midpoints, depth_a, depth_b = triangulate(camera_a, camera_b, points_a, points_b)
    possible = (distances <= tolerance) & (depth_a > 0) & (depth_b > 0) & np.all(np.abs(midpoints) <= bound, axis=1)
    return float(np.mean(possible)), int(len(matched_a))


def viewing_directions(render_cameras: np.ndarray) -> np.ndarray:
    """(K, 3) unit vectors from the object centre (the origin) to each camera."""
    cam2world, _ = cameras.split_render_camera(np.asarray(render_cameras, np.float64))
    positions = cam2world[..., :3, 3]
    return positions / np.maximum(np.linalg.norm(positions, axis=-1, keepdims=True), 1e-12)


def select_views(candidate_cameras: np.ndarray, scores: np.ndarray, count: int, *,
                 reference_camera: np.ndarray | None = None, min_score: float = 0.0) -> np.ndarray:
    """Indices of at most `count` candidates: those scoring >= min_score, chosen for coverage.

    Greedy: the best-scoring candidate first (or, with `reference_camera`, the one that adds the
    most to the input view's coverage), then each time the candidate maximising score × its angle
    to the nearest view chosen so far (the input view counts as chosen). Fewer than `count` come
    back when fewer pass.
    """
    scores = np.asarray(scores, np.float64)
    directions = viewing_directions(candidate_cameras)
    eligible = np.nonzero(scores >= min_score)[0]
    chosen_directions = [] if reference_camera is None else [viewing_directions(reference_camera[None])[0]]
    chosen: list[int] = []
    while len(chosen) < count and len(chosen) < len(eligible):
        remaining = np.array([i for i in eligible if i not in chosen])
        if chosen_directions:
            cosines = np.clip(directions[remaining] @ np.stack(chosen_directions).T, -1.0, 1.0)
            gain = scores[remaining] * np.arccos(cosines).min(axis=1)
        else:
            gain = scores[remaining]
        best = int(remaining[np.argmax(gain)])
        chosen.append(best)
        chosen_directions.append(directions[best])
    return np.asarray(chosen, np.int64)
