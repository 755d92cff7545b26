"""The public entry of the Gaussian rasteriser: project -> colour -> intersect tiles -> composite.

`rasterize` is `project_and_color` (3D -> 2D Gaussians and their colours) followed by
`rasterize_to_pixels` (tiles and compositing; gsplat's `isect_tiles` + `rasterize_to_pixels`).

`rasterize` chains the stages for N Gaussians and one camera exactly as gsplat 1.5.3's
`rasterization()` does in classic mode (pinhole camera, no antialiasing compensation, RGB
render mode), with static shapes: traceable under `jax.jit`, `jax.grad` and `jax.vmap` (over
cameras: `jax.vmap(lambda viewmat, K: rasterize(means, ..., viewmat, K, width, height))`), width,
height, settings and sh_degree static. Its capacities (`SplatSettings.max_intersections`, `max_per_tile`) are fixed
sizes: `info["overflow"]` says whether a scene needed more, with the counts it needed, and
`check_capacity` turns that into an error a user can act on. `render` is the eager convenience
entry point: jitted, then checked.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vfusion3d_jax.errors import InvalidConfigValueError
from vfusion3d_jax.rendering.splatting.composite import composite_tiles
from vfusion3d_jax.rendering.splatting.projection import Projection, project_gaussians
from vfusion3d_jax.rendering.splatting.spherical_harmonics import view_dependent_colors
from vfusion3d_jax.rendering.splatting.tiles import intersect_tiles, tile_grid


@dataclasses.dataclass(frozen=True)
class SplatSettings:
    """Static rasteriser settings (hashable: a static argument of `jax.jit`).

    tile_size, eps2d, near_plane, far_plane: as gsplat's `rasterization()` (defaults equal).
    opacity_aware_radii: the radius box of `rasterization()` on a GPU (extent min(3.33,
      sqrt(2 ln(255 opacity)))); False: the 3.33-sigma box of gsplat's torch projection. The same
      image either way; the opacity-aware box has fewer Gaussian-tile pairs.
    max_intersections: slots of the Gaussian-tile pair buffer (12 bytes each; the sort's cost
      scales with it).
    max_per_tile: most Gaussians composited per tile (compute scales with tiles x max_per_tile).
    chunk_size: Gaussians composited per scan step (the last chunk of a tile is padded). Larger
      chunks mean fewer, bigger steps (and more memory per step in the backward pass).
    tiles_per_batch: tiles composited together; a batch skips the chunks none of its tiles needs.
      None: 8 on CPU (cache-sized, and sparse tiles finish early), all tiles on accelerators.
    """

    tile_size: int = 16
    eps2d: float = 0.3
    near_plane: float = 0.01
    far_plane: float = 1e10
    opacity_aware_radii: bool = True
    max_intersections: int = 1 << 20
    max_per_tile: int = 2048
    chunk_size: int = 32
    tiles_per_batch: int | None = None

    def __post_init__(self):
        for name in ("tile_size", "max_intersections", "max_per_tile", "chunk_size", "tiles_per_batch"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"SplatSettings.{name} must be positive, got {getattr(self, name)}")
        if not self.far_plane > self.near_plane:
            raise ValueError(f"SplatSettings.far_plane ({self.far_plane}) must exceed near_plane ({self.near_plane})")

    def tile_batch(self, num_tiles: int) -> int:
        """Tiles composited together for an image of `num_tiles` tiles."""
        if self.tiles_per_batch is not None:
            return min(self.tiles_per_batch, num_tiles)
        return min(8, num_tiles) if jax.default_backend() == "cpu" else num_tiles


class SplatCapacityError(InvalidConfigValueError):
    """A scene needed more Gaussian-tile pairs, or more Gaussians in one tile, than SplatSettings holds."""


def rasterize(means: jax.Array, quats: jax.Array, scales: jax.Array, opacities: jax.Array, colors: jax.Array,
              viewmat: jax.Array, K: jax.Array, width: int, height: int, background: jax.Array | None = None,
              settings: SplatSettings = SplatSettings(),
              sh_degree: int | None = None) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Renders N 3D Gaussians into one camera, as gsplat's `rasterization()` (classic mode).

    means [N, 3] (world), quats [N, 4] (w, x, y, z; normalised here), scales [N, 3] (linear),
    opacities [N] (in [0, 1]), colors [N, channels] (used as they are) or, with `sh_degree`, SH
    coefficients [N, K, 3] with K >= (sh_degree + 1)^2; viewmat [4, 4] world-to-camera (OpenCV:
    x right, y down, z forward), K [3, 3] pinhole intrinsics in pixels; background [channels] or
    None (black).

    Returns colours [height, width, channels], alphas [height, width, 1] and `info`: the
    projection (radii, means2d, depths, conics), the per-Gaussian colours, the sorted pairs
    (tile_ids, gaussian_ids, tile_offsets, tile_counts, tiles_per_gaussian), the capacities needed
    (num_intersections, max_tile_count) and `overflow` (True if either exceeded its setting; the
    image is then incomplete; see `check_capacity`).
    """
    projection, colors = project_and_color(means, quats, scales, opacities, colors, viewmat, K, width, height,
                                           settings, sh_degree)
    render_colors, render_alphas, info = rasterize_to_pixels(
        projection.means2d, projection.conics, projection.depths, projection.radii, opacities, colors, width, height,
        background, settings)
    info = {"radii": projection.radii, "means2d": projection.means2d, "depths": projection.depths,
            "conics": projection.conics, "colors": colors, **info}
    return render_colors, render_alphas, info


def project_and_color(means: jax.Array, quats: jax.Array, scales: jax.Array, opacities: jax.Array,
                      colors: jax.Array, viewmat: jax.Array, K: jax.Array, width: int, height: int,
                      settings: SplatSettings = SplatSettings(),
                      sh_degree: int | None = None) -> tuple[Projection, jax.Array]:
    """The first half of `rasterize`: the 2D Gaussians and their colours [N, channels] for this
    camera (SH evaluated if `sh_degree` is given). Arguments as `rasterize`."""
    means, quats, scales, opacities, colors, viewmat, K = (
        jnp.asarray(value) for value in (means, quats, scales, opacities, colors, viewmat, K))
    projection = project_gaussians(means, quats, scales, viewmat, K, width, height,
                                   opacities=opacities if settings.opacity_aware_radii else None,
                                   eps2d=settings.eps2d, near_plane=settings.near_plane, far_plane=settings.far_plane)
    if sh_degree is not None:
        colors = view_dependent_colors(sh_degree, means, colors, viewmat)
    return projection, colors


def rasterize_to_pixels(means2d: jax.Array, conics: jax.Array, depths: jax.Array, radii: jax.Array,
                        opacities: jax.Array, colors: jax.Array, width: int, height: int,
                        background: jax.Array | None = None,
                        settings: SplatSettings = SplatSettings()) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """The second half of `rasterize` (gsplat's isect_tiles + rasterize_to_pixels): projected 2D
    Gaussians (means2d [N, 2], conics [N, 3], depths [N], radii [N, 2]; radii 0 = culled),
    opacities [N] and colours [N, channels] -> colours, alphas and the tile part of `info`."""
    opacities, colors = jnp.asarray(opacities), jnp.asarray(colors)
    tiles_x, tiles_y = tile_grid(width, height, settings.tile_size)
    pairs = intersect_tiles(means2d, radii, depths, tile_size=settings.tile_size, tiles_x=tiles_x, tiles_y=tiles_y,
                            capacity=settings.max_intersections)
    render_colors, render_alphas = composite_tiles(
        means2d, conics, opacities, colors, pairs.gaussian_ids, pairs.tile_offsets, pairs.tile_counts, background,
        width=width, height=height, tile_size=settings.tile_size, max_per_tile=settings.max_per_tile,
        chunk_size=settings.chunk_size, tiles_per_batch=settings.tile_batch(tiles_x * tiles_y))

    max_tile_count = jnp.max(pairs.tile_counts)
    # The int32 pair count wraps past 2^31 - 1 pairs; a float sum tells, and the count saturates.
    wrapped = jnp.sum(pairs.tiles_per_gaussian.astype(jnp.float32)) >= 2.0**31
    num_intersections = jnp.where(wrapped, jnp.iinfo(jnp.int32).max, pairs.num_intersections)
    overflow = (num_intersections > settings.max_intersections) | (max_tile_count > settings.max_per_tile)
    info = {
        "tiles_per_gaussian": pairs.tiles_per_gaussian,
        "tile_ids": pairs.tile_ids,
        "gaussian_ids": pairs.gaussian_ids,
        "tile_offsets": pairs.tile_offsets,
        "tile_counts": pairs.tile_counts,
        "num_intersections": num_intersections,
        "max_tile_count": max_tile_count,
        "overflow": overflow,
    }
    return render_colors, render_alphas, info


def check_capacity(info: dict[str, Any], settings: SplatSettings) -> None:
    """Raises SplatCapacityError (one line: what overflowed, by how much, which setting to raise)
    if the capacities `info` reports needing (of one call, or of a vmapped one) exceed those of
    `settings`, the settings the call used. Host-side: it reads the values, so call it outside jit."""
    needed_pairs = int(np.max(np.asarray(info["num_intersections"])))
    needed_per_tile = int(np.max(np.asarray(info["max_tile_count"])))
    problems, fixes = [], []
    if needed_pairs > settings.max_intersections:
        at_least = "at least " if needed_pairs == np.iinfo(np.int32).max else ""
        problems.append(f"{at_least}{needed_pairs} Gaussian-tile intersections > "
                        f"max_intersections={settings.max_intersections}")
        fixes.append(f"max_intersections={_round_up(needed_pairs, 1024)}")
    if needed_per_tile > settings.max_per_tile:
        problems.append(f"{needed_per_tile} Gaussians in one tile > max_per_tile={settings.max_per_tile}")
        fixes.append(f"max_per_tile={_round_up(needed_per_tile, settings.chunk_size)}")
    if problems:
        raise SplatCapacityError(f"Gaussian splatting capacity exceeded: {'; '.join(problems)}; "
                                 f"use SplatSettings({', '.join(fixes)}) or more.")


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@functools.partial(jax.jit, static_argnames=("width", "height", "settings", "sh_degree"))
def _rasterize_jit(means, quats, scales, opacities, colors, viewmat, K, background, *, width, height, settings,
                   sh_degree):
    return rasterize(means, quats, scales, opacities, colors, viewmat, K, width, height, background, settings,
                     sh_degree)


def render(means, quats, scales, opacities, colors, viewmat, K, width: int, height: int, background=None,
           settings: SplatSettings = SplatSettings(),
           sh_degree: int | None = None) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Eager entry point: runs the jitted `rasterize` (same arguments and outputs), then
    `check_capacity`, so a scene too big for the settings raises instead of rendering incomplete."""
    arrays = [jnp.asarray(value, jnp.float32) for value in (means, quats, scales, opacities, colors, viewmat, K)]
    background = None if background is None else jnp.asarray(background, jnp.float32)
    result = _rasterize_jit(*arrays, background, width=width, height=height, settings=settings, sh_degree=sh_degree)
    check_capacity(result[2], settings)
    return result
