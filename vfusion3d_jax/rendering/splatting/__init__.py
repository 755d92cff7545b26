"""A differentiable 3D Gaussian rasteriser in pure JAX with gsplat 1.5.3's classic-mode semantics.

One file per stage, in the order a Gaussian travels: `projection` (3D -> 2D Gaussians),
`spherical_harmonics` (view-dependent colour), `tiles` (Gaussian-tile pairs sorted by depth in a
fixed-capacity buffer), `composite` (front-to-back blending per tile, chunked), and `rasterize`
(the public entry that chains them, and the capacity check). Static shapes throughout: jit, grad
and vmap over cameras all work.
"""

from vfusion3d_jax.rendering.splatting.composite import composite_tiles
from vfusion3d_jax.rendering.splatting.projection import (
    Projection,
    covariance_3d,
    perspective_projection,
    project_gaussians,
    quaternion_to_rotation,
    world_to_camera,
)
from vfusion3d_jax.rendering.splatting.rasterize import (
    SplatCapacityError,
    SplatSettings,
    check_capacity,
    project_and_color,
    rasterize,
    rasterize_to_pixels,
    render,
)
from vfusion3d_jax.rendering.splatting.spherical_harmonics import sh_basis, sh_to_color, view_dependent_colors
from vfusion3d_jax.rendering.splatting.tiles import TileIntersections, intersect_tiles, tile_grid

__all__ = [
    "Projection",
    "SplatCapacityError",
    "SplatSettings",
    "TileIntersections",
    "check_capacity",
    "composite_tiles",
    "covariance_3d",
    "intersect_tiles",
    "perspective_projection",
    "project_and_color",
    "project_gaussians",
    "quaternion_to_rotation",
    "rasterize",
    "rasterize_to_pixels",
    "render",
    "sh_basis",
    "sh_to_color",
    "tile_grid",
    "view_dependent_colors",
    "world_to_camera",
]
