"""Triplane volume rendering: triplane features and decoder, ray marching, the batched renderer.

`render_views` (traceable, for jitted training steps) and `render` (eager, validated) reproduce the
official VFusion3D renderer; `query_points` / `query_grid` are the official point and grid queries.
`splatting` (imported on its own) is a differentiable 3D Gaussian rasteriser with gsplat 1.5.3's semantics.
"""

from vfusion3d_jax.rendering.renderer import (
    BATCH_AXIS,
    RAY_AXIS,
    RenderOptions,
    evaluate_samples,
    render,
    render_rays,
    render_views,
    validate_render_inputs,
)
from vfusion3d_jax.rendering.triplane import (
    TriplaneDecoder,
    activate_density,
    activate_rgb,
    query_grid,
    query_points,
    sample_from_planes,
)

__all__ = [
    "BATCH_AXIS",
    "RAY_AXIS",
    "RenderOptions",
    "TriplaneDecoder",
    "activate_density",
    "activate_rgb",
    "evaluate_samples",
    "query_grid",
    "query_points",
    "render",
    "render_rays",
    "render_views",
    "sample_from_planes",
    "validate_render_inputs",
]
