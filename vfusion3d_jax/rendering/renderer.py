"""The triplane renderer: N objects x M views -> images, depth and opacity, jitted and chunked.

`render_views` reproduces one call of the official `TriplaneSynthesizer.forward` (EG3D importance
renderer): rays through pixel centres (or a crop), ray-box limits, D stratified + K importance
samples, midpoint ray marching and a white (or given) background. It is traceable with static
shapes and meant to be called inside `jax.jit` (the training step); `render` is the eager
convenience entry point that validates inputs first.

The official renderer couples all rays of a call in two places: the fix-up of rays that miss the
box (step 2: min/max over all rays) and the clamp of the composite depth (step 5: min/max over all
sample depths). Both are kept exact while chunking:

1. ray-box limits and the fix-up are computed for all rays up front (a few floats per ray);
2. the expensive part (triplane lookups, MLP, marching) runs over chunks of rays with
   `jax.lax.map`, each chunk rematerialised (`jax.checkpoint`) so peak memory depends on the
   chunk size, not the image size, in the forward and the backward pass;
3. each chunk returns its rays' unclamped depth and their sample depth range; the call-wide clamp
   is applied afterwards.

Sharding: the object axis has the logical name `BATCH_AXIS` and the ray axis `RAY_AXIS`. Under a
mesh (`jax.set_mesh`) and flax logical axis rules (`nnx.logical_axis_rules`) that map them to mesh
axes, objects and rays are sharded accordingly: each device marches its own slice of every chunk
against its own copy of its objects' planes, so lookups stay local and the planes' gradient is
reduced across devices once per call. The call-wide reductions become cross-device reductions.
Random draws depend only on the key and a ray's index, never on chunking or sharding.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vfusion3d_jax.cameras import pixel_rays, split_render_camera
from vfusion3d_jax.partitioning import constrain, mesh_axes
from vfusion3d_jax.rendering.ray_marching import (
    INVERSE_CDF_METHODS,
    OUT_OF_BOX_RAW_DENSITY,
    fix_missed_rays,
    intersect_box,
    march_rays,
    merge_samples,
    sample_importance,
    stratified_depths,
)
from vfusion3d_jax.rendering.triplane import (
    NUM_PLANES,
    TriplaneDecoder,
    activate_rgb,
    interpolate_planes,
    plane_table,
)

BATCH_AXIS = "act_batch"
RAY_AXIS = "act_rays"
CAMERA_DIM = 25


@dataclasses.dataclass(frozen=True)
class RenderOptions:
    """Static renderer settings (hashable: pass as a static argument to `jax.jit`).

    num_coarse, num_importance: samples per ray of the two passes (official: 64 + 64).
    box_min, box_max: the cube [box_min, box_max]^3 that rays are clipped to, outside which samples
      are empty, and that the triplane spans.
    white_background: composite onto white (official) instead of black; a `background` argument
      to `render_views` overrides it.
    deterministic: the fixture's draws (stratified jitter 0.5, importance u_k = (k + 0.5)/K for every
      ray) instead of uniform random draws from a PRNG key.
    chunk_size: rays per object marched at once (across all devices of the ray axis); bounds memory.
      None: 128 on CPU (cache-sized), 4096 on accelerators.
    mlp_dtype: compute dtype of the decoder MLP ("float32", "bfloat16"); None = the decoder's dtype.
    inverse_cdf: "gather", "compare" (no gathers, for TPUs) or "auto" (by `jax.default_backend()`).
    remat: rematerialise each chunk in the backward pass (bounded memory) instead of storing it.
    """

    num_coarse: int = 64
    num_importance: int = 64
    box_min: float = -1.0
    box_max: float = 1.0
    white_background: bool = True
    deterministic: bool = False
    chunk_size: int | None = None
    mlp_dtype: str | None = None
    inverse_cdf: str = "auto"
    remat: bool = True

    def __post_init__(self):
        if self.num_coarse < 4:
            raise ValueError(f"num_coarse must be >= 4 (importance sampling drops 3 bins), got {self.num_coarse}")
        if self.num_importance < 0:
            raise ValueError(f"num_importance must be >= 0, got {self.num_importance}")
        if not self.box_max > self.box_min:
            raise ValueError(f"box_max must exceed box_min, got [{self.box_min}, {self.box_max}]")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {self.chunk_size}")
        if self.inverse_cdf not in INVERSE_CDF_METHODS + ("auto",):
            raise ValueError(f"inverse_cdf must be one of {INVERSE_CDF_METHODS + ('auto',)}, got {self.inverse_cdf!r}")

    def rays_per_chunk(self) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        # CPUs want a chunk's samples to stay in cache; accelerators want large batches.
        return 128 if jax.default_backend() == "cpu" else 4096

    def inverse_cdf_method(self) -> str:
        if self.inverse_cdf != "auto":
            return self.inverse_cdf
        return "compare" if jax.default_backend() == "tpu" else "gather"


def evaluate_samples(field: Callable[[jax.Array], jax.Array], origins: jax.Array, directions: jax.Array,
                     depths: jax.Array, *, box_min: float = -1.0, box_max: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Colours (..., S, 3) and raw densities (..., S) of the samples at `depths` (..., S) along rays (..., 3).

    Official out-of-box filtering: a sample outside [box_min, box_max]^3 (bounds inclusive) gets
    colour 0 and raw density (-FLT_MAX)/3, whatever the field returns there.
    """
    points = origins[..., None, :] + depths[..., None] * directions[..., None, :]
    inside = jnp.all((box_min <= points) & (points <= box_max), axis=-1)
    raw = field(points)
    colors = jnp.where(inside[..., None], activate_rgb(raw[..., 1:]), 0.0)
    raw_densities = jnp.where(inside, raw[..., 0], OUT_OF_BOX_RAW_DENSITY)
    return colors, raw_densities


def render_rays(field: Callable[[jax.Array], jax.Array], origins: jax.Array, directions: jax.Array,
                start: jax.Array, end: jax.Array, jitter: jax.Array, uniforms: jax.Array, *,
                options: RenderOptions) -> dict[str, jax.Array]:
    """Renders a batch of rays (...,) given their (fixed-up) limits and random draws.

    `field` maps world points (..., S, 3) to raw decoder outputs (..., S, 4) = [raw sigma, raw rgb].
    jitter (..., D) and uniforms (..., K) in [0, 1) are the stratified and importance draws; the
    uniforms must be sorted along each ray (see `merge_samples`).
    Returns the per-ray rgb (no background), opacity, depth (unclamped, +inf where the opacity is 0)
    and the depth range of its samples (for the call-wide clamp), plus every intermediate of the
    official renderer (per-sample colours, raw densities, depths and weights of both passes).
    """

    def evaluate(depths):
        return evaluate_samples(field, origins, directions, depths, box_min=options.box_min, box_max=options.box_max)

    depths_coarse = jax.lax.stop_gradient(stratified_depths(start, end, jitter))
    colors_coarse, densities_coarse = evaluate(depths_coarse)
    coarse = march_rays(colors_coarse, densities_coarse, depths_coarse)
    out = {"depths_coarse": depths_coarse, "colors_coarse": colors_coarse,
           "densities_coarse": densities_coarse, "weights_coarse": coarse["weights"]}
    if options.num_importance > 0:
        depths_importance = jax.lax.stop_gradient(sample_importance(
            depths_coarse, jax.lax.stop_gradient(coarse["weights"]), uniforms, options.inverse_cdf_method()))
        colors_importance, densities_importance = evaluate(depths_importance)
        depths_all, colors_all, densities_all = merge_samples(
            depths_coarse, colors_coarse, densities_coarse, depths_importance, colors_importance, densities_importance)
        final = march_rays(colors_all, densities_all, depths_all)
        out.update(depths_importance=depths_importance, colors_importance=colors_importance,
                   densities_importance=densities_importance, depths_all=depths_all)
    else:
        depths_all, final = depths_coarse, coarse
    out.update(rgb=final["rgb"], opacity=final["opacity"], depth=final["depth"], weights_final=final["weights"],
               depth_min=jnp.min(depths_all, axis=-1), depth_max=jnp.max(depths_all, axis=-1))
    return out


def render_views(decoder: TriplaneDecoder, planes: jax.Array, cameras: jax.Array, *, resolution: int,
                 crop_size: int | None = None, crop_start: Any = None,
                 options: RenderOptions = RenderOptions(), key: jax.Array | None = None,
                 background: jax.Array | None = None) -> dict[str, jax.Array]:
    """Renders every view of every object in one (official) call; traceable, static shapes.

    Args:
      decoder: the triplane decoder MLP.
      planes: (N, 3, C, H, W) triplanes.
      cameras: (N, M, 25) render cameras (cam2world 4x4 and normalised intrinsics, row-major).
      resolution: the full image size R (static).
      crop_size: render only a crop_size^2 window of the R^2 image (static); None = the full image.
      crop_start: top-left pixel (row, col) = (start_y, start_x) of the window: a pair shared by all
        views or an (N, M, 2) array (one random patch per view); may be traced.
      options: static `RenderOptions`.
      key: PRNG key for the stratified and importance draws (required unless options.deterministic).
        Draws depend only on the key and the ray's index, so results do not depend on chunking
        or sharding.
      background: (N, 3) background colour per object (e.g. random colours in training); overrides
        options.white_background.

    Returns:
      rgb (N, M, h, w, 3), depth (N, M, h, w, 1) and opacity (N, M, h, w, 1) (the official
      `images_rgb`, `images_depth`, `images_weight`, channels-last), h = w = crop_size.
    """
    crop = resolution if crop_size is None else crop_size
    _check_shapes(decoder, planes, cameras, resolution, crop, crop_start, options, key, background)
    num_objects, num_views = cameras.shape[:2]
    cam2world, intrinsics = split_render_camera(cameras.astype(jnp.float32))
    if crop_start is None or len(_shape(crop_start)) == 1:
        start_yx = (0, 0) if crop_start is None else (crop_start[0], crop_start[1])
        origins, directions = pixel_rays(cam2world, intrinsics, resolution, crop, start_yx)
    else:
        per_view = jax.vmap(lambda c, k, s: pixel_rays(c, k, resolution, crop, (s[0], s[1])))
        origins, directions = per_view(cam2world.reshape(-1, 4, 4), intrinsics.reshape(-1, 3, 3),
                                       jnp.reshape(crop_start, (-1, 2)))
    num_rays = num_views * crop * crop
    origins = constrain(origins.reshape(num_objects, num_rays, 3), (BATCH_AXIS, RAY_AXIS, None))
    directions = constrain(directions.reshape(num_objects, num_rays, 3), (BATCH_AXIS, RAY_AXIS, None))

    # Official: ray limits from detached rays; the fix-up couples all rays of the call.
    tmin, tmax = intersect_box(jax.lax.stop_gradient(origins), jax.lax.stop_gradient(directions),
                               options.box_min, options.box_max)
    start, end = fix_missed_rays(tmin, tmax)

    mlp_dtype = jnp.dtype(options.mlp_dtype or decoder.dtype)
    # The decoder's first layer folded into the planes (see triplane.py), once per call. Each ray
    # shard gets its own copy: devices gather from and scatter-add gradients into their copy, and
    # the copies' gradients are summed once per call instead of once per lookup.
    shards = _ray_shards()
    tables = plane_table(decoder.project_planes(planes))
    tables = jnp.broadcast_to(tables[:, None], (num_objects, shards) + tables.shape[1:])
    tables = constrain(tables, (BATCH_AXIS, RAY_AXIS) + (None,) * (tables.ndim - 2))
    box_centre = (options.box_min + options.box_max) / 2
    box_scale = 2 / (options.box_max - options.box_min)
    ray_ids = jnp.arange(num_objects * num_rays, dtype=jnp.uint32).reshape(num_objects, num_rays)

    # Unsharded, the MLP runs on all samples as one matrix: its weight gradients are then plain
    # matmuls (XLA:CPU runs contractions over several axes ~1.5x slower). Sharded, the object and
    # shard axes stay separate so that the partitioner keeps every sample on its device.
    unsharded = shards == 1 and mesh_axes(BATCH_AXIS) is None

    def field(points):
        # Official: coordinates * (2 / box_warp) for a box centred at the origin. Lookups are per
        # object and ray shard (N, shards, ...).
        points = (points - box_centre) * box_scale
        lookup = jax.vmap(jax.vmap(functools.partial(interpolate_planes, sum_planes=True)))
        features = lookup(tables, points)
        rows = features.reshape(((-1,) if unsharded else features.shape[:2] + (-1,)) + features.shape[-1:])
        raw = decoder.decode_first_layer(rows, dtype=mlp_dtype)
        return raw.reshape(features.shape[:-1] + raw.shape[-1:])

    def render_chunk(rays):
        jitter, uniforms = _draws(key, rays["ray_id"], options)
        out = render_rays(field, rays["origins"], rays["directions"], rays["start"], rays["end"],
                          jitter, uniforms, options=options)
        return {name: out[name] for name in ("rgb", "opacity", "depth", "depth_min", "depth_max")}

    per_ray = _map_ray_chunks(
        render_chunk,
        {"origins": origins, "directions": directions, "start": start, "end": end, "ray_id": ray_ids},
        options, shards,
    )
    # Official depth clamp: to the [min, max] of all sample depths of the call.
    depth_min = jax.lax.stop_gradient(jnp.min(per_ray["depth_min"]))
    depth_max = jax.lax.stop_gradient(jnp.max(per_ray["depth_max"]))
    depth = jnp.clip(per_ray["depth"], depth_min, depth_max)
    rgb, opacity = per_ray["rgb"], per_ray["opacity"]
    if background is not None:
        rgb = rgb + (1 - opacity)[..., None] * background[:, None, :]
    elif options.white_background:
        rgb = rgb + 1 - opacity[..., None]
    image_shape = (num_objects, num_views, crop, crop)
    return {"rgb": rgb.reshape(image_shape + (3,)), "depth": depth.reshape(image_shape + (1,)),
            "opacity": opacity.reshape(image_shape + (1,))}


def _draws(key, ray_ids, options: RenderOptions):
    """Stratified jitter (..., D) and importance draws (..., K) for rays with the given indices."""
    num_coarse, num_importance = options.num_coarse, options.num_importance
    if options.deterministic:
        jitter = jnp.full(ray_ids.shape + (num_coarse,), 0.5, jnp.float32)
        uniforms = (jnp.arange(num_importance, dtype=jnp.float32) + 0.5) / num_importance
        return jitter, jnp.broadcast_to(uniforms, ray_ids.shape + (num_importance,))
    def draw(ray_id):
        # One key per ray (counter-based), so draws do not depend on chunking or sharding.
        jitter_key, importance_key = jax.random.split(jax.random.fold_in(key, ray_id))
        # K sorted uniforms from normalised partial sums of K + 1 exponentials: the same
        # distribution as sorting K independent uniforms (the official draws); the importance
        # depths then come out sorted and merge with the coarse depths instead of being sorted.
        partial_sums = jnp.cumsum(jax.random.exponential(importance_key, (num_importance + 1,)))
        return jax.random.uniform(jitter_key, (num_coarse,)), partial_sums[:-1] / partial_sums[-1]

    for _ in range(ray_ids.ndim):  # over the ray axes (not flattened: they may be sharded)
        draw = jax.vmap(draw)
    return draw(ray_ids)


def _map_ray_chunks(render_chunk: Callable, rays: dict[str, jax.Array], options: RenderOptions, shards: int):
    """Applies `render_chunk` to chunks of rays: arrays (N, R, ...) -> per-ray outputs (N, R, ...).

    The ray axis is split as (shards, chunks, chunk_local): the loop runs over `chunks`, and each
    step passes `render_chunk` arrays (N, shards, chunk_local, ...) holding a contiguous slice of
    every ray shard, so a sharded ray axis stays sharded inside the loop. Rays are padded (by
    repeating the last ray) to whole chunks and the padding is dropped.
    """
    num_objects, num_rays = next(iter(rays.values())).shape[:2]
    chunk_local = max(1, math.ceil(min(options.rays_per_chunk(), num_rays) / shards))
    num_chunks = math.ceil(num_rays / (shards * chunk_local))
    padded = shards * num_chunks * chunk_local

    def split(x):
        x = jnp.pad(x, ((0, 0), (0, padded - num_rays)) + ((0, 0),) * (x.ndim - 2), mode="edge")
        x = x.reshape((num_objects, shards, num_chunks, chunk_local) + x.shape[2:])
        return constrain(jnp.moveaxis(x, 2, 0), (None, BATCH_AXIS, RAY_AXIS) + (None,) * (x.ndim - 3))

    def merge(y):
        return jnp.moveaxis(y, 0, 2).reshape((num_objects, padded) + y.shape[4:])[:, :num_rays]

    def step(chunk):
        out = render_chunk(chunk)
        return jax.tree.map(lambda y: constrain(y, (BATCH_AXIS, RAY_AXIS) + (None,) * (y.ndim - 2)), out)

    if options.remat:
        step = jax.checkpoint(step)
    return jax.tree.map(merge, jax.lax.map(step, jax.tree.map(split, rays)))


def _ray_shards() -> int:
    mesh_shape = jax.sharding.get_abstract_mesh().shape
    return math.prod(mesh_shape[axis] for axis in mesh_axes(RAY_AXIS) or ())


def _check_shapes(decoder, planes, cameras, resolution, crop, crop_start, options, key, background):
    if planes.ndim != 5 or planes.shape[1] != NUM_PLANES:
        raise ValueError(f"planes must be (N, 3, C, H, W), got shape {planes.shape}")
    if planes.shape[2] != decoder.feature_dim:
        raise ValueError(f"planes have {planes.shape[2]} channels but the decoder expects {decoder.feature_dim}")
    if cameras.ndim != 3 or cameras.shape[-1] != CAMERA_DIM:
        raise ValueError(f"cameras must be (N, M, 25), got shape {cameras.shape}")
    if cameras.shape[0] != planes.shape[0]:
        raise ValueError(f"planes and cameras disagree on N: {planes.shape[0]} vs {cameras.shape[0]}")
    if not 0 < crop <= resolution:
        raise ValueError(f"crop_size must be in [1, resolution={resolution}], got {crop}")
    if crop_start is not None and _shape(crop_start) not in ((2,), cameras.shape[:2] + (2,)):
        raise ValueError(f"crop_start must be (2,) or (N, M, 2) = {cameras.shape[:2] + (2,)}, got {_shape(crop_start)}")
    if background is not None and _shape(background) != (planes.shape[0], 3):
        raise ValueError(f"background must be (N, 3) = ({planes.shape[0]}, 3), got {_shape(background)}")
    if key is None and not options.deterministic:
        raise ValueError("a PRNG key is required unless options.deterministic")


def _shape(x) -> tuple[int, ...]:
    """Shape of an array or of a (possibly traced) tuple of scalars."""
    return (len(x),) if isinstance(x, (tuple, list)) else tuple(x.shape)


def validate_render_inputs(planes, cameras, *, atol: float = 1e-3) -> None:
    """Eager checks of concrete inputs (not for use inside jit): shapes, finiteness and cameras.

    Raises ValueError naming the first offending view when cam2world is not a rigid transform
    (orthonormal rotation with determinant +1, last row [0, 0, 0, 1]) or the intrinsics are not a
    normalised pinhole matrix (positive focal lengths, last row [0, 0, 1], no K[1, 0]).
    """
    planes, cameras = np.asarray(planes), np.asarray(cameras)
    if planes.ndim != 5 or planes.shape[1] != NUM_PLANES:
        raise ValueError(f"planes must be (N, 3, C, H, W), got shape {planes.shape}")
    if cameras.ndim != 3 or cameras.shape[-1] != CAMERA_DIM:
        raise ValueError(f"cameras must be (N, M, 25), got shape {cameras.shape}")
    if cameras.shape[0] != planes.shape[0]:
        raise ValueError(f"planes and cameras disagree on N: {planes.shape[0]} vs {cameras.shape[0]}")
    if not np.all(np.isfinite(planes)):
        raise ValueError(f"planes contain {np.sum(~np.isfinite(planes))} non-finite values")
    for index in np.ndindex(cameras.shape[:2]):
        camera = cameras[index].astype(np.float64)
        where = f"camera [n={index[0]}, m={index[1]}]"
        if not np.all(np.isfinite(camera)):
            raise ValueError(f"{where} has non-finite values")
        cam2world, intrinsics = camera[:16].reshape(4, 4), camera[16:].reshape(3, 3)
        rotation = cam2world[:3, :3]
        if not np.allclose(cam2world[3], [0, 0, 0, 1], atol=atol):
            raise ValueError(f"{where}: cam2world last row must be [0, 0, 0, 1], got {cam2world[3]}")
        if not np.allclose(rotation @ rotation.T, np.eye(3), atol=atol) or np.linalg.det(rotation) <= 0:
            raise ValueError(f"{where}: cam2world rotation is not orthonormal with determinant +1")
        if not (intrinsics[0, 0] > 0 and intrinsics[1, 1] > 0):
            raise ValueError(f"{where}: focal lengths must be positive, got {intrinsics[0, 0]}, {intrinsics[1, 1]}")
        if not np.allclose(intrinsics[2], [0, 0, 1], atol=atol) or abs(intrinsics[1, 0]) > atol:
            raise ValueError(f"{where}: intrinsics must be [[fx, s, cx], [0, fy, cy], [0, 0, 1]], got {intrinsics}")


_render_jit = jax.jit(render_views, static_argnames=("resolution", "crop_size", "options"))


def render(decoder: TriplaneDecoder, planes, cameras, *, resolution: int, crop_size: int | None = None,
           crop_start: Any = None, options: RenderOptions = RenderOptions(), key: jax.Array | None = None,
           background: jax.Array | None = None) -> dict[str, jax.Array]:
    """Validates concrete inputs, then runs the jitted `render_views` (same arguments and outputs)."""
    validate_render_inputs(planes, cameras)
    return _render_jit(decoder, jnp.asarray(planes), jnp.asarray(cameras), resolution=resolution,
                       crop_size=crop_size, crop_start=crop_start, options=options, key=key,
                       background=background)
