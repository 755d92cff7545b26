"""Mesh export: density grid -> marching cubes -> coloured mesh (.obj / .ply / .glb).

Conventions (the official inferrer's, `--export_mesh`):

* The density is sampled on a G^3 grid over `bounds`^3 ([-1, 1]^3 by default) with indexing 'ij':
  value [i, j, k] is the field at (x_i, y_j, z_k), x_i = linspace(lo, hi, G)[i].
* Marching cubes runs on the *activated* density at iso-level 1.0; vertices in index coordinates v
  map to the world by lo + v / (G - 1) * (hi - lo) (v / (G - 1) * 2 - 1 for the default box).
* Vertex colours are the colour field at the vertices, * 255 truncated to uint8.

Differences from the official code, both deliberate: faces are wound counter-clockwise seen from
outside (normals point towards lower density; the official PyMCubes output is exported without a
check), and the grid is filled coarse-to-fine (`density_grid_coarse_to_fine`) instead of densely,
which gives the same surface for everything the coarse grid can see (see its docstring).

Fields are plain functions of a batch of points, `density_fn(points (P, 3)) -> (P,)` and
`color_fn(points (P, 3)) -> (P, 3)` in [0, 1], so this module knows nothing about triplanes. They
run under `jax.jit` with static shapes: the grid is evaluated in cubic blocks of `block_size`^3
points, `chunk_size // block_size^3` blocks per call, the last call padded. A field that needs
large arrays (planes, decoder weights) should be a `jax.tree_util.Partial` binding them: the
evaluators take fields as jit arguments, so bound arrays arrive as inputs, where a closure's
arrays would be baked into the program as constants (and constant-folded at every compile).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import skimage.measure
import trimesh
from absl import logging
from tqdm import tqdm

PointFn = Callable[[jax.Array], jax.Array]

DEFAULT_RESOLUTION = 512  # official mesh_size
DEFAULT_LEVEL = 1.0  # official threshold on the activated density
DEFAULT_COARSE_RESOLUTION = 64
DEFAULT_BLOCK_SIZE = 4  # smaller blocks hug the surface closer; 8 costs ~35% more evaluations
DEFAULT_CHUNK_SIZE = 2**18
MESH_FORMATS = (".obj", ".ply", ".glb")


class EmptySurfaceError(ValueError):
    """The density never crosses the iso-level on the grid, so there is no surface to mesh."""


@dataclasses.dataclass(frozen=True)
class DensityGrid:
    """Density values on a G^3 grid over bounds^3 (indexing 'ij'), and what they cost.

    `num_evaluations` counts every point sent to the field, padding included: the real cost.
    """

    values: np.ndarray
    bounds: tuple[float, float]
    num_evaluations: int

    @property
    def resolution(self) -> int:
        return self.values.shape[0]

    def index_to_world(self, index_coords: np.ndarray) -> np.ndarray:
        """Continuous index coordinates (..., 3) -> world points (..., 3)."""
        lo, hi = self.bounds
        return (lo + index_coords * ((hi - lo) / (self.resolution - 1))).astype(np.float32)


def density_grid(density_fn: PointFn, resolution: int = DEFAULT_RESOLUTION, *,
                 bounds: tuple[float, float] = (-1.0, 1.0), block_size: int = DEFAULT_BLOCK_SIZE,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, progress: bool = False) -> DensityGrid:
    """The field on every point of the resolution^3 grid (the official, dense evaluation)."""
    evaluator = _BlockEvaluator(density_fn, block_size, chunk_size, bounds)
    return evaluator.dense_grid(resolution, progress=progress)


def density_grid_coarse_to_fine(
        density_fn: PointFn, resolution: int = DEFAULT_RESOLUTION, *, level: float = DEFAULT_LEVEL,
        coarse_resolution: int = DEFAULT_COARSE_RESOLUTION, dilation: int = 1,
        bounds: tuple[float, float] = (-1.0, 1.0), block_size: int = DEFAULT_BLOCK_SIZE,
        chunk_size: int = DEFAULT_CHUNK_SIZE, progress: bool = False) -> DensityGrid:
    """The resolution^3 grid, evaluated only where the surface can be; elsewhere a value on the right side.

    The grid is refined through `grid_schedule(resolution, coarse_resolution)` (64 -> 128 -> 256 ->
    512 by default). The coarsest grid is evaluated densely. At each finer level, a block of
    `block_size`^3 points is evaluated when the box spanned by its points and their neighbours
    overlaps an *active* cell of the previous grid: a cell whose corners lie on both sides of
    `level`, or one within `dilation` cells (Chebyshev distance) of such a cell. Every other point
    takes the value of its nearest previous-level sample, which lies on the same side of the level.

    Guarantee: every fine cell that overlaps an active coarse cell gets exact values at all its
    corners, and filled values never create a crossing among themselves, so marching cubes finds
    exactly the dense grid's surface in those cells. The dilation recovers detail that pokes out of
    the coarse surface's cells by up to `dilation` coarse cells (block rounding usually adds a
    little more); detail reaching further is cut off, with a closed surface, where the evaluated
    blocks end. Limitation: a feature that lies entirely between the samples of a coarser level and
    away from any surface that level sees (a speck smaller than a coarse cell, a thin rod or sheet
    that misses every coarse sample) is lost; raise `coarse_resolution` for such fields.
    """
    if dilation < 0:
        raise ValueError(f"dilation must be >= 0, got {dilation}")
    schedule = grid_schedule(resolution, coarse_resolution)
    evaluator = _BlockEvaluator(density_fn, block_size, chunk_size, bounds)
    start = time.perf_counter()
    grid = evaluator.dense_grid(schedule[0], progress=progress)
    num_evaluations = grid.num_evaluations
    for fine_resolution in schedule[1:]:
        active_blocks = _active_blocks(grid.values, fine_resolution, block_size, level, dilation)
        storage = _upsample_nearest(grid.values, fine_resolution, evaluator.storage_side(fine_resolution))
        num_evaluations += evaluator.fill(storage, fine_resolution, np.argwhere(active_blocks),
                                          progress=progress)
        grid = DensityGrid(_crop(storage, fine_resolution), bounds, num_evaluations)
        logging.info("density grid %d^3: %d of %d blocks active", fine_resolution,
                     active_blocks.sum(), active_blocks.size)
    logging.info("density grid %d^3 coarse-to-fine %s: %d field evaluations (%.1f%% of dense) in %.1f s",
                 resolution, schedule, num_evaluations, 100 * num_evaluations / resolution**3,
                 time.perf_counter() - start)
    return grid


def grid_schedule(resolution: int, coarse_resolution: int) -> tuple[int, ...]:
    """Grid resolutions from coarse to fine: `resolution` halved while it stays >= coarse_resolution."""
    if coarse_resolution < 2 or resolution < 2:
        raise ValueError(f"resolutions must be >= 2, got {coarse_resolution} and {resolution}")
    schedule = [resolution]
    while schedule[-1] // 2 >= coarse_resolution:
        schedule.append(schedule[-1] // 2)
    return tuple(reversed(schedule))


def marching_cubes(grid: DensityGrid, level: float = DEFAULT_LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Iso-surface of the grid: world vertices (V, 3) float32 and faces (F, 3) int64, wound outward.

    Raises EmptySurfaceError when the grid has no value on one side of the level.
    """
    inside = grid.values > level
    if inside.all() or not inside.any():
        raise EmptySurfaceError(
            f"the density never crosses level {level} on the {grid.resolution}^3 grid (values in "
            f"[{grid.values.min():.4g}, {grid.values.max():.4g}]): there is no surface to mesh")
    # skimage winds faces by the left-hand rule: for a density that is high inside, 'ascent'
    # gives counter-clockwise faces seen from outside, i.e. outward normals (checked by the tests).
    vertices, faces, _, _ = skimage.measure.marching_cubes(
        grid.values, level, gradient_direction="ascent", allow_degenerate=False)
    return grid.index_to_world(vertices), faces.astype(np.int64)


def mesh_from_grid(grid: DensityGrid, color_fn: PointFn | None = None, *,
                   level: float = DEFAULT_LEVEL, chunk_size: int = DEFAULT_CHUNK_SIZE) -> trimesh.Trimesh:
    """Marching cubes on the grid, with uint8 vertex colours from `color_fn` when given."""
    vertices, faces = marching_cubes(grid, level)
    vertex_colors = None
    if color_fn is not None:
        rgb = evaluate_in_chunks(color_fn, vertices, chunk_size)
        # Official: rgb * 255 truncated; the clip guards the activation's (-0.001, 1.001) range.
        vertex_colors = np.clip(rgb * 255, 0, 255).astype(np.uint8)
    # process=False keeps marching cubes' vertices and faces one-to-one with what was computed.
    return trimesh.Trimesh(vertices, faces, vertex_colors=vertex_colors, process=False,
                           metadata={"num_density_evaluations": grid.num_evaluations})


def extract_mesh(density_fn: PointFn, color_fn: PointFn | None = None, *,
                 resolution: int = DEFAULT_RESOLUTION, level: float = DEFAULT_LEVEL,
                 coarse_resolution: int | None = DEFAULT_COARSE_RESOLUTION, dilation: int = 1,
                 bounds: tuple[float, float] = (-1.0, 1.0), block_size: int = DEFAULT_BLOCK_SIZE,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, progress: bool = False) -> trimesh.Trimesh:
    """Coloured mesh of the `level` iso-surface of a density field (the official mesh export).

    `coarse_resolution=None` evaluates the grid densely, as the official code does; otherwise the
    grid is filled coarse-to-fine (`density_grid_coarse_to_fine`). The number of field evaluations
    is logged and kept in `mesh.metadata['num_density_evaluations']`.
    Raises EmptySurfaceError when the density never crosses the level.
    """
    start = time.perf_counter()
    if coarse_resolution is None:
        grid = density_grid(density_fn, resolution, bounds=bounds, block_size=block_size,
                            chunk_size=chunk_size, progress=progress)
    else:
        grid = density_grid_coarse_to_fine(
            density_fn, resolution, level=level, coarse_resolution=coarse_resolution,
            dilation=dilation, bounds=bounds, block_size=block_size, chunk_size=chunk_size,
            progress=progress)
    grid_seconds = time.perf_counter() - start
    mesh = mesh_from_grid(grid, color_fn, level=level, chunk_size=chunk_size)
    logging.info("mesh %d^3: %d vertices, %d faces; %d density evaluations; grid %.1f s, total %.1f s",
                 resolution, len(mesh.vertices), len(mesh.faces), grid.num_evaluations,
                 grid_seconds, time.perf_counter() - start)
    return mesh


def export_mesh(mesh: trimesh.Trimesh, path: str | Path) -> Path:
    """Writes the mesh as .obj, .ply or .glb (chosen by the suffix), vertex colours included."""
    path = Path(path)
    if path.suffix.lower() not in MESH_FORMATS:
        raise ValueError(f"mesh format must be one of {MESH_FORMATS}, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    mesh.export(path)
    return path


def evaluate_in_chunks(fn: PointFn, points: np.ndarray, chunk_size: int = DEFAULT_CHUNK_SIZE) -> np.ndarray:
    """`fn` on points (P, 3), jitted, in fixed-size chunks (the last one padded) -> NumPy (P, ...)."""
    num_points = len(points)
    # A power of two below chunk_size for small inputs: bounded padding, few distinct shapes.
    chunk = min(chunk_size, 1 << max(num_points - 1, 0).bit_length())
    padded = np.zeros((-(-num_points // chunk) * chunk, 3), np.float32)
    padded[:num_points] = points
    fn = _as_pytree(fn)
    outputs = [np.asarray(out) for out in _pipelined(
        _apply(fn, jnp.asarray(padded[start:start + chunk])) for start in range(0, len(padded), chunk))]
    return np.concatenate(outputs)[:num_points]


def _as_pytree(fn: PointFn) -> jax.tree_util.Partial:
    """`fn` as a pytree (a Partial's bound arrays are its leaves; the function is static)."""
    return fn if isinstance(fn, jax.tree_util.Partial) else jax.tree_util.Partial(fn)


@jax.jit
def _apply(fn: jax.tree_util.Partial, points: jax.Array) -> jax.Array:
    return fn(points)


class _BlockEvaluator:
    """Evaluates the field on lists of cubic blocks of a grid, a fixed number of blocks per call."""

    def __init__(self, density_fn: PointFn, block_size: int, chunk_size: int,
                 bounds: tuple[float, float]):
        if chunk_size < block_size**3:
            raise ValueError(f"chunk_size {chunk_size} is smaller than one block ({block_size}^3 points)")
        self.block_size = block_size
        self.blocks_per_call = chunk_size // block_size**3
        self.bounds = bounds
        offsets = np.stack(np.meshgrid(*[np.arange(block_size)] * 3, indexing="ij"), axis=-1)
        offsets = jnp.asarray(offsets.reshape(-1, 3), jnp.int32)
        self.density_fn = _as_pytree(density_fn)

        @jax.jit
        def evaluate_blocks(density_fn: jax.tree_util.Partial, block_origins: jax.Array, last_index: jax.Array,
                            step: jax.Array) -> jax.Array:
            # Blocks overhanging the grid repeat its last plane: those values are cropped away,
            # and no point outside the bounds reaches the field.
            index = jnp.minimum(block_origins[:, None, :] + offsets, last_index)
            points = (bounds[0] + index.astype(jnp.float32) * step).reshape(-1, 3)
            density = density_fn(points).astype(jnp.float32)
            return density.reshape((len(block_origins),) + (block_size,) * 3)

        self._evaluate_blocks = evaluate_blocks

    def dense_grid(self, resolution: int, *, progress: bool = False) -> DensityGrid:
        """The field on every point of the resolution^3 grid."""
        storage = np.empty((self.storage_side(resolution),) * 3, np.float32)
        num_blocks = storage.shape[0] // self.block_size
        every_block = np.stack(np.unravel_index(np.arange(num_blocks**3), (num_blocks,) * 3), axis=-1)
        num_evaluations = self.fill(storage, resolution, every_block, progress=progress)
        return DensityGrid(_crop(storage, resolution), self.bounds, num_evaluations)

    def storage_side(self, resolution: int) -> int:
        """Side of the grid's storage: padded to whole blocks, so that blocks are written by reshaping."""
        return -(-resolution // self.block_size) * self.block_size

    def fill(self, storage: np.ndarray, resolution: int, block_indices: np.ndarray, *,
             progress: bool = False) -> int:
        """Writes the field into the given blocks (K, 3) of `storage`; returns the points evaluated."""
        size, num_blocks = self.block_size, storage.shape[0] // self.block_size
        # (i, a, j, b, k, c) view: advanced indexing on (i, j, k) addresses whole blocks.
        blocked = storage.reshape(num_blocks, size, num_blocks, size, num_blocks, size)
        step = np.float32((self.bounds[1] - self.bounds[0]) / (resolution - 1))
        calls = range(0, len(block_indices), self.blocks_per_call)

        def dispatch() -> Iterator[tuple[np.ndarray, jax.Array]]:
            for start in tqdm(calls, desc=f"density {resolution}^3", disable=not progress):
                batch = block_indices[start:start + self.blocks_per_call]
                origins = np.zeros((self.blocks_per_call, 3), np.int32)
                origins[:len(batch)] = batch * size
                yield batch, self._evaluate_blocks(self.density_fn, origins, np.int32(resolution - 1), step)

        for batch, values in _pipelined(dispatch()):
            blocked[batch[:, 0], :, batch[:, 1], :, batch[:, 2], :] = np.asarray(values)[:len(batch)]
        return len(calls) * self.blocks_per_call * size**3


def _pipelined(items: Iterator) -> Iterator:
    """Yields each item after the next one has been produced, so the device computes call n + 1
    while the host copies out call n (JAX dispatch is asynchronous)."""
    pending = None
    for item in items:
        if pending is not None:
            yield pending
        pending = item
    if pending is not None:
        yield pending


def _crop(storage: np.ndarray, resolution: int) -> np.ndarray:
    if storage.shape[0] == resolution:
        return storage
    return np.ascontiguousarray(storage[:resolution, :resolution, :resolution])


def _upsample_nearest(coarse: np.ndarray, fine_resolution: int, side: int) -> np.ndarray:
    """(side,)^3 grid whose point i (clipped to the fine grid) holds its nearest coarse sample."""
    fine = np.minimum(np.arange(side), fine_resolution - 1)
    nearest = np.rint(fine * ((coarse.shape[0] - 1) / (fine_resolution - 1))).astype(np.int64)
    # `nearest` never decreases, so repeating each coarse sample is the same gather, ~10x faster.
    repeats = np.bincount(nearest, minlength=coarse.shape[0])
    for axis in range(3):
        coarse = np.repeat(coarse, repeats, axis=axis)
    return coarse


def _active_blocks(coarse: np.ndarray, fine_resolution: int, block_size: int, level: float,
                   dilation: int) -> np.ndarray:
    """Fine blocks (n, n, n) bool whose neighbourhood overlaps an active cell of the coarse grid."""
    inside = coarse > level
    corners = [inside[i:i + inside.shape[0] - 1, j:j + inside.shape[1] - 1, k:k + inside.shape[2] - 1]
               for i in (0, 1) for j in (0, 1) for k in (0, 1)]
    crossing = np.logical_or.reduce(corners) & ~np.logical_and.reduce(corners)
    overlap = _block_cell_overlap(fine_resolution, coarse.shape[0], block_size, dilation)
    # Separable "any" over each block's box of coarse cells, as three small matrix products.
    active = np.einsum("ai,bj,ck,ijk->abc", overlap, overlap, overlap, crossing.astype(np.float32),
                       optimize=True)
    return active > 0


def _block_cell_overlap(fine_resolution: int, coarse_resolution: int, block_size: int,
                        dilation: int) -> np.ndarray:
    """(blocks, coarse cells) float: 1 where a block's points, widened by one fine point each side
    (the cells it shares with its neighbours) and then by `dilation` coarse cells, touch the cell."""
    num_blocks = -(-fine_resolution // block_size)
    first = np.maximum(np.arange(num_blocks) * block_size - 1, 0)
    last = np.minimum(np.arange(num_blocks) * block_size + block_size, fine_resolution - 1)
    # Fine index -> continuous coarse index; a small epsilon keeps touching cells in.
    scale = (coarse_resolution - 1) / (fine_resolution - 1)
    first_cell = np.ceil(first * scale - 1e-6).astype(np.int64) - 1 - dilation
    last_cell = np.floor(last * scale + 1e-6).astype(np.int64) + dilation
    cells = np.arange(coarse_resolution - 1)
    return ((cells >= first_cell[:, None]) & (cells <= last_cell[:, None])).astype(np.float32)
