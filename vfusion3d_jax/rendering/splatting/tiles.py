"""Which Gaussians touch which screen tiles, in depth order per tile: gsplat's `isect_tiles` and
`isect_offset_encode` with static shapes.

gsplat writes one 64-bit key (tile_id << 32 | float bits of the depth) per Gaussian-tile pair
into a buffer sized by the actual number of pairs, sorts the keys, and finds each tile's range.
Here the buffer has a fixed capacity (`capacity` slots) so that everything traces with static
shapes:

1. each visible Gaussian's tile box is floor/ceil((mean2d -/+ radius) / tile_size), clipped to the
   grid; its pair count is the box's area;
2. slot k belongs to the Gaussian whose cumulative-count interval holds k (a binary search), and
   the k-th pair's tile follows from k's position inside that Gaussian's box (row-major, as gsplat);
3. slots past the total get a sentinel tile id (= number of tiles) that sorts after every real
   tile;
4. a stable sort on (tile id, depth bits) puts each tile's Gaussians front to back; equal depths
   keep the Gaussians' index order, as gsplat's stable radix sort does;
5. per-tile counts come from a 2D difference array over the boxes, so they (and the number of
   pairs needed) are exact even when the buffer is too small: an overflow is reported, never
   silently truncated.

Nothing here is differentiable (it only selects); inputs are taken through stop_gradient.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class TileIntersections(NamedTuple):
    """The sorted Gaussian-tile pairs of one image and the per-tile ranges into them."""

    tile_ids: jax.Array  # [capacity] int32, ascending; the sentinel (num_tiles) in unused slots
    gaussian_ids: jax.Array  # [capacity] int32, front to back within each tile (gsplat's flatten_ids)
    tile_offsets: jax.Array  # [tiles_y, tiles_x] int32, first slot of each tile (gsplat's isect_offsets)
    tile_counts: jax.Array  # [tiles_y, tiles_x] int32, pairs per tile (exact, even on overflow)
    tiles_per_gaussian: jax.Array  # [N] int32
    num_intersections: jax.Array  # int32 scalar: pairs needed (slots used if <= capacity)


def tile_grid(width: int, height: int, tile_size: int) -> tuple[int, int]:
    """(tiles_x, tiles_y) covering a width x height image."""
    return math.ceil(width / tile_size), math.ceil(height / tile_size)


def tile_boxes(means2d: jax.Array, radii: jax.Array, tile_size: int, tiles_x: int,
               tiles_y: int) -> tuple[jax.Array, jax.Array]:
    """Per Gaussian, the inclusive min and exclusive max tile (x, y) [N, 2] int32 of its radius
    box, clipped to the grid; empty (min == max) for Gaussians with a zero radius."""
    center = means2d / tile_size
    half = radii.astype(means2d.dtype) / tile_size
    grid = jnp.array([tiles_x, tiles_y], dtype=jnp.int32)
    box_min = jnp.clip(jnp.floor(center - half).astype(jnp.int32), 0, grid)
    box_max = jnp.clip(jnp.ceil(center + half).astype(jnp.int32), 0, grid)
    visible = jnp.all(radii > 0, axis=-1, keepdims=True)
    return box_min, jnp.where(visible, box_max, box_min)


def count_per_tile(box_min: jax.Array, box_max: jax.Array, tiles_x: int, tiles_y: int) -> jax.Array:
    """Number of boxes [tiles_y, tiles_x] covering each tile: +1/-1 at the boxes' corners of a
    difference array, then a 2D prefix sum (O(N + tiles), independent of the pair buffer)."""
    x0, y0 = box_min[:, 0], box_min[:, 1]
    x1, y1 = box_max[:, 0], box_max[:, 1]
    ones = jnp.ones_like(x0)
    ys = jnp.concatenate([y0, y0, y1, y1])
    xs = jnp.concatenate([x0, x1, x0, x1])
    signs = jnp.concatenate([ones, -ones, -ones, ones])
    difference = jnp.zeros((tiles_y + 1, tiles_x + 1), jnp.int32).at[ys, xs].add(signs)
    return jnp.cumsum(jnp.cumsum(difference, axis=0), axis=1)[:tiles_y, :tiles_x]


def intersect_tiles(means2d: jax.Array, radii: jax.Array, depths: jax.Array, *, tile_size: int, tiles_x: int,
                    tiles_y: int, capacity: int) -> TileIntersections:
    """Gaussian-tile pairs sorted by (tile, depth) in a buffer of `capacity` slots."""
    means2d, depths = jax.lax.stop_gradient(means2d), jax.lax.stop_gradient(depths)
    num_gaussians, num_tiles = means2d.shape[0], tiles_x * tiles_y
    box_min, box_max = tile_boxes(means2d, radii, tile_size, tiles_x, tiles_y)
    box_size = box_max - box_min
    tiles_per_gaussian = box_size[:, 0] * box_size[:, 1]
    pair_ends = jnp.cumsum(tiles_per_gaussian)
    total = pair_ends[-1]

    slots = jnp.arange(capacity, dtype=jnp.int32)
    # Gaussian g owns slots [end_{g-1}, end_g): the number of ends <= k is the owner of slot k
    # (Gaussians without pairs have end_{g-1} == end_g and are skipped over).
    owner = jnp.minimum(jnp.searchsorted(pair_ends, slots, side="right"), num_gaussians - 1).astype(jnp.int32)
    local = slots - (pair_ends[owner] - tiles_per_gaussian[owner])
    row_length = jnp.maximum(box_size[owner, 0], 1)
    tile_x = box_min[owner, 0] + local % row_length
    tile_y = box_min[owner, 1] + local // row_length
    used = slots < total
    tile_ids = jnp.where(used, tile_y * tiles_x + tile_x, num_tiles).astype(jnp.int32)
    # gsplat's key holds the depth's float bits: for positive depths the same order as the values,
    # and negative depths (only with near_plane < 0) sort after all positive ones, as there.
    depth_bits = jax.lax.bitcast_convert_type(depths, jnp.dtype(f"uint{8 * depths.dtype.itemsize}"))
    tile_ids, _, gaussian_ids = jax.lax.sort((tile_ids, depth_bits[owner], owner), num_keys=2, is_stable=True)

    tile_counts = count_per_tile(box_min, box_max, tiles_x, tiles_y)
    flat_counts = tile_counts.reshape(-1)
    tile_offsets = (jnp.cumsum(flat_counts) - flat_counts).reshape(tiles_y, tiles_x)
    return TileIntersections(
        tile_ids=tile_ids,
        gaussian_ids=gaussian_ids,
        tile_offsets=tile_offsets.astype(jnp.int32),
        tile_counts=tile_counts,
        tiles_per_gaussian=tiles_per_gaussian.astype(jnp.int32),
        num_intersections=total.astype(jnp.int32),
    )
