"""FlexRM (FlexiView3D / Flex3D): 1-32 posed views -> triplane -> 3D Gaussians (and the NeRF path).

    views (B, V, 3, H, W) in [0, 1] ──shared DINOv2 encoder──▶ tokens (B·V, 1 + n², D_enc)
        + Linear₀(Plücker ray of each patch centre)                 (zero-initialised)
    concatenated over views ──▶ context (B, V·(1 + n²), D_enc), padded views masked out
    reference camera (view 0, 16-d) ──CameraEmbedder──▶ adaLN condition
    learned triplane tokens ──TriplaneTransformer (the LRM's)──▶ planes (B, 3, C, R, R)
    (+ with `source_planes`, the views' pixel-aligned features and colours, averaged over them)
    planes ──GaussianHead (per texel MLP)──▶ G Gaussians per texel: N = 3·R²·G
    planes ──TriplaneDecoder + ray marching (the LRM's)──▶ `render_nerf`, for NeRF-first training

The LRM's parts are reused as they are (`models/lrm.py`); what is new is the multi-view context
(a key mask in the cross-attention, a Plücker embedding per patch) and the Gaussian head.

Views: V is a static bucket (`VIEW_BUCKETS`); `pad_views` pads a runtime number of views up to
its bucket and returns the mask, so a model compiles once per bucket, not per count. View 0 is
the reference: its camera is the adaLN condition, as the LRM's source camera; every other
view's camera reaches the model only through its Plücker rays. Padded views are replaced by
zeros (and the reference camera) before the encoder, so whatever they held, nothing of them
reaches the outputs, not even a NaN; the key mask then hides their tokens.

Gaussians (world units; the object box is [-1, 1]³): texel (i, j) of plane p is anchored at
its centre on the plane (`triplane_token_points` at texel resolution: plane 0 spans (x, y),
plane 1 (x, z), plane 2 (z, y), the third coordinate 0). Each of its G Gaussians sits at
anchor + tanh(·)·bound, with bound `max_offset_in_plane` along the plane's two axes and
`max_offset_normal` along its normal (a Gaussian of the z = 0 plane must be able to reach the
object's surface anywhere in z); scale = floor + (max − floor)·sigmoid(·); rotation a unit
quaternion (w, x, y, z), identity at init; opacity sigmoid (low at init); colour sigmoid (RGB,
SH degree 0 used as colour).

`render_gaussians` draws them with the pure-JAX rasteriser (`rendering.splatting`, gsplat's
semantics), converting this project's cameras (cam2world in OpenGL axes, intrinsics normalised
by the image size) to its world-to-camera OpenCV view matrix and pixel intrinsics
(`splat_camera`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx, struct

from vfusion3d_jax.cameras import OPENGL_TO_OPENCV, split_render_camera
from vfusion3d_jax.models import layers
from vfusion3d_jax.models.lrm import (
    DEFAULT_RENDER_OPTIONS,
    CameraEmbedder,
    SourceProjection,
    TriplaneTransformer,
    cells_to_planes,
    triplane_token_points,
)
from vfusion3d_jax.models.vit import VisionTransformer
from vfusion3d_jax.partitioning import constrain
from vfusion3d_jax.rendering.renderer import RenderOptions, render_views
from vfusion3d_jax.rendering.splatting import SplatSettings, rasterize
from vfusion3d_jax.rendering.triplane import NUM_PLANES, TriplaneDecoder, query_points

VIEW_BUCKETS = (1, 2, 4, 8, 16, 32)
PLUCKER_DIM = 6
# Per Gaussian, the head's raw outputs: offset 3, scale 3, quaternion 4, opacity 1, colour 3.
_OFFSET, _SCALE, _QUAT, _OPACITY, _COLOR = slice(0, 3), slice(3, 6), slice(6, 10), 10, slice(11, 14)
GAUSSIAN_PARAMS = 14
# A Gaussian (B, N, ...) stream split by example over the mesh's batch axes.
BATCH_GAUSSIANS = ("act_batch", None, None)
WHITE = (1.0, 1.0, 1.0)


@struct.dataclass
class Gaussians:
    """3D Gaussians: means (..., N, 3) world, quats (..., N, 4) unit (w, x, y, z), scales (..., N, 3)
    linear world units, opacities (..., N) in (0, 1), colors (..., N, 3) RGB in (0, 1). A pytree."""

    means: jax.Array
    quats: jax.Array
    scales: jax.Array
    opacities: jax.Array
    colors: jax.Array

    @property
    def count(self) -> int:
        return self.means.shape[-2]

    def __getitem__(self, index) -> "Gaussians":
        """The Gaussians of one object (or a slice of the batch): `gaussians[0]`."""
        return jax.tree.map(lambda x: x[index], self)


# -- views: buckets and padding ------------------------------------------------------------------


def view_bucket(num_views: int, buckets: tuple[int, ...] = VIEW_BUCKETS) -> int:
    """The smallest bucket that holds `num_views` views."""
    for bucket in sorted(buckets):
        if num_views <= bucket:
            if num_views < 1:
                break
            return bucket
    raise ValueError(f"FlexRM takes 1 to {max(buckets)} views, got {num_views}")


def pad_views(images, cameras, num_views: int | None = None, buckets: tuple[int, ...] = VIEW_BUCKETS):
    """Pads views (B, n, ...) up to a bucket: (images (B, V, 3, H, W), cameras (B, V, 16), view_mask (B, V)).

    `num_views` is the bucket V (default: `view_bucket(n)`). Padded views are zero images with a
    copy of the reference camera and False in the mask (the model ignores them whatever they
    hold). NumPy in, NumPy out (host side); JAX arrays give JAX arrays.
    """
    xp = jnp if isinstance(images, jax.Array) or isinstance(cameras, jax.Array) else np
    count = images.shape[1]
    size = view_bucket(count, buckets) if num_views is None else num_views
    if size < count:
        raise ValueError(f"cannot pad {count} views into {size}")
    extra = size - count
    images = xp.concatenate([images, xp.zeros(images.shape[:1] + (extra,) + images.shape[2:], images.dtype)], 1)
    cameras = xp.concatenate([cameras, xp.repeat(cameras[:, :1], extra, axis=1)], 1)
    mask = xp.broadcast_to(xp.arange(size) < count, (images.shape[0], size))
    return images, cameras, mask


# -- cameras ------------------------------------------------------------------------------------


def patch_rays(source_cameras: jax.Array, image_size: tuple[int, int], patch_size: int
               ) -> tuple[jax.Array, jax.Array]:
    """Rays through the patch centres of each view: origins, unit directions (..., rows·cols, 3).

    source_cameras (..., 16) (cam2world[:3] row-major, fx, fy, cx, cy normalised); patches in
    the encoder's row-major order; pixels past the last full patch are not part of any patch (the
    encoder drops them), so centres are at (k + 0.5)·patch / size. The lifting is `pixel_rays`'.
    """
    height, width = image_size
    rows, cols = height // patch_size, width // patch_size
    v = (np.arange(rows) + 0.5) * patch_size / height
    u = (np.arange(cols) + 0.5) * patch_size / width
    v, u = (jnp.asarray(a.ravel(), jnp.float32) for a in np.meshgrid(v, u, indexing="ij"))
    cam2world = source_cameras[..., :12].reshape(source_cameras.shape[:-1] + (3, 4)).astype(jnp.float32)
    fx, fy, cx, cy = (source_cameras[..., k, None].astype(jnp.float32) for k in range(12, 16))
    cam_points = jnp.stack([(u - cx) / fx, (v - cy) / fy, jnp.ones_like(u - cx)], axis=-1)  # OpenCV axes
    rotation = cam2world[..., :3] * jnp.asarray(np.diag(OPENGL_TO_OPENCV)[:3])  # R @ diag(1, -1, -1)
    directions = jnp.einsum("...ij,...pj->...pi", rotation, cam_points)
    directions = directions / jnp.linalg.norm(directions, axis=-1, keepdims=True)
    return jnp.broadcast_to(cam2world[..., None, :, 3], directions.shape), directions


def plucker_rays(origins: jax.Array, directions: jax.Array) -> jax.Array:
    """Plücker coordinates (..., 6) = (o × d, d) of rays: the same for every origin on the ray."""
    return jnp.concatenate([jnp.cross(origins, directions), directions], axis=-1)


def splat_camera(render_cameras: jax.Array, width: int, height: int) -> tuple[jax.Array, jax.Array]:
    """Render cameras (..., 25) -> the rasteriser's world-to-camera view matrix (..., 4, 4) in OpenCV
    axes (x right, y down, z forward) and intrinsics (..., 3, 3) in pixels.

    cam2world is rigid in this project's cameras, so its inverse is the transpose rotation. The
    normalised intrinsics scale by the image size: pixel k's centre is (k + 0.5)/size normalised
    and k + 0.5 in gsplat's pixels.
    """
    cam2world, intrinsics = split_render_camera(render_cameras.astype(jnp.float32))
    cam2world_cv = cam2world @ jnp.asarray(OPENGL_TO_OPENCV)
    rotation_t = jnp.swapaxes(cam2world_cv[..., :3, :3], -1, -2)
    translation = -jnp.einsum("...ij,...j->...i", rotation_t, cam2world_cv[..., :3, 3])
    bottom = jnp.broadcast_to(jnp.array([0.0, 0.0, 0.0, 1.0], jnp.float32), cam2world.shape[:-2] + (1, 4))
    viewmat = jnp.concatenate([jnp.concatenate([rotation_t, translation[..., None]], -1), bottom], -2)
    pixels = jnp.asarray(np.diag([width, height, 1.0]).astype(np.float32))
    return viewmat, pixels @ intrinsics


# -- the Gaussian head --------------------------------------------------------------------------


def texel_anchors(resolution: int) -> np.ndarray:
    """Texel centres (3, R, R, 3) on the triplane (planes (x, y), (x, z), (z, y); box [-1, 1])."""
    return triplane_token_points(resolution).reshape(NUM_PLANES, resolution, resolution, 3)


def offset_bounds(max_offset_in_plane: float, max_offset_normal: float) -> np.ndarray:
    """Per plane (3, 3): the bound of a Gaussian's offset along x, y, z (the normal gets its own)."""
    normal_axis = (2, 1, 0)  # plane 0 spans (x, y), plane 1 (x, z), plane 2 (z, y)
    bounds = np.full((NUM_PLANES, 3), max_offset_in_plane, np.float32)
    bounds[np.arange(NUM_PLANES), normal_axis] = max_offset_normal
    return bounds


class GaussianHead(nnx.Module):
    """Each texel's feature (and its plane's learned embedding) -> MLP -> G Gaussians.

    `config` is `config.model.gaussians`. The last layer starts small (its kernel scaled by
    `output_init_scale`) with a bias that puts every Gaussian at its anchor with the identity
    rotation, the scale `scale_init`, opacity sigmoid(`opacity_bias`) and grey colour.
    """

    def __init__(self, channels: int, config: ml_collections.ConfigDict, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.per_texel = config.per_texel
        # Static (hashable) module data: plain tuples, not arrays.
        self.bounds = tuple(map(tuple, offset_bounds(config.max_offset_in_plane, config.max_offset_normal).tolist()))
        self.scale_min, self.scale_max = config.scale_min, config.scale_max
        if not 0 < config.scale_min < config.scale_init < config.scale_max:
            raise ValueError(f"need 0 < scale_min < scale_init < scale_max, got {config.scale_min}, "
                             f"{config.scale_init}, {config.scale_max}")
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        hidden = config.hidden_dim
        self.input = layers.dense(channels, hidden, ("channels", "mlp"), **kwargs)
        self.plane_embed = nnx.Param(layers.partitioned(nnx.initializers.normal(1.0), None, "mlp")(
            rngs.params(), (NUM_PLANES, hidden), param_dtype))
        self.hidden = nnx.List([layers.dense(hidden, hidden, (None, "mlp"), **kwargs)
                                for _ in range(config.num_layers - 2)])
        fraction = (config.scale_init - config.scale_min) / (config.scale_max - config.scale_min)
        template = np.zeros(GAUSSIAN_PARAMS, np.float32)
        template[_SCALE] = np.log(fraction / (1 - fraction))  # sigmoid⁻¹
        template[_QUAT] = (1.0, 0.0, 0.0, 0.0)
        template[_OPACITY] = config.opacity_bias
        bias = np.tile(template, self.per_texel)
        lecun = nnx.initializers.lecun_normal()
        self.output = nnx.Linear(
            hidden, self.per_texel * GAUSSIAN_PARAMS, dtype=dtype, param_dtype=param_dtype,
            kernel_init=layers.partitioned(lambda key, shape, dt: lecun(key, shape, dt) * config.output_init_scale,
                                           "mlp", None),
            bias_init=layers.partitioned(lambda key, shape, dt: jnp.asarray(bias, dt), None), rngs=rngs)

    def __call__(self, planes: jax.Array) -> Gaussians:
        """planes (B, 3, C, R, R) -> Gaussians (B, 3·R²·G, ...) ordered (plane, row, column, Gaussian)."""
        num, _, _, resolution, _ = planes.shape
        features = jnp.moveaxis(planes, 2, -1)  # (B, 3, R, R, C)
        h = self.input(features)
        h = h + self.plane_embed[...].astype(h.dtype)[:, None, None]
        h = jax.nn.gelu(h, approximate=False)
        for layer in self.hidden:
            h = jax.nn.gelu(layer(h), approximate=False)
        raw = self.output(h).astype(jnp.float32)
        raw = raw.reshape(raw.shape[:-1] + (self.per_texel, GAUSSIAN_PARAMS))  # (B, 3, R, R, G, 14)
        anchors = jnp.asarray(texel_anchors(resolution))[:, :, :, None]
        bounds = jnp.asarray(self.bounds, jnp.float32)[:, None, None, None]
        means = anchors + jnp.tanh(raw[..., _OFFSET]) * bounds
        scales = self.scale_min + (self.scale_max - self.scale_min) * jax.nn.sigmoid(raw[..., _SCALE])
        quats = raw[..., _QUAT]
        quats = quats / jnp.sqrt(jnp.sum(jnp.square(quats), axis=-1, keepdims=True) + 1e-12)
        opacities = jax.nn.sigmoid(raw[..., _OPACITY])
        colors = jax.nn.sigmoid(raw[..., _COLOR])
        flat = lambda x, axes: constrain(x.reshape((num, -1) + x.shape[5:]), axes)
        return Gaussians(means=flat(means, BATCH_GAUSSIANS), quats=flat(quats, BATCH_GAUSSIANS),
                         scales=flat(scales, BATCH_GAUSSIANS), opacities=flat(opacities, ("act_batch", None)),
                         colors=flat(colors, BATCH_GAUSSIANS))


def decoder_opacity(density: jax.Array, scales: jax.Array) -> jax.Array:
    """The opacity (...) of a Gaussian whose peak density is the NeRF density (...) at its mean:
    1 − exp(−optical depth through its centre), the depth of a Gaussian profile of width s being
    density·√(2π)·s (s the geometric mean of its scales (..., 3))."""
    width = jnp.exp(jnp.mean(jnp.log(scales), axis=-1))
    return 1.0 - jnp.exp(-density * math.sqrt(2.0 * math.pi) * width)


# -- the model ----------------------------------------------------------------------------------


class EncodedViews(NamedTuple):
    """`FlexRM.encode_views`: what the transformer and the planes take from the views."""

    context: jax.Array  # (B, V·T, D_enc) every view's tokens with their rays
    mask: jax.Array  # (B, V·T) bool, False for the tokens of padded views
    token_offsets: jax.Array | None  # (B, 3·r², D) `source_projection`'s start of the triplane tokens
    plane_offsets: jax.Array | None  # (B, 3, C, R, R) `source_planes`' skip added to the planes


class FlexRM(nnx.Module):
    """FlexRM; `config` is `config.model` (configs/flexrm.py).

    Submodules: `encoder`, `camera_embedder`, `transformer` and `decoder` as in the LRM (same
    classes and parameter paths, so a trained LRM can initialise them where the shapes agree),
    `plucker_embed` (zero-initialised: at init only the reference camera matters, through the
    adaLN condition as in the LRM; training turns the other views' rays on) and `gaussian_head`.

    The Plücker embedding is added to the encoder's *output* tokens rather than its input: the
    encoder stays the LRM's (pretrained DINOv2 weights see the images they were trained on), and
    the triplane cross-attention, where the views meet, reads every patch with its ray.
    """

    def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.view_buckets = tuple(config.view_buckets)
        self.patch_size = config.encoder.patch_size
        self.num_prefix_tokens = 1 + config.encoder.num_register_tokens
        self.encoder = VisionTransformer(config.encoder, remat=config.remat,
                                         attention_implementation=config.attention_implementation, **kwargs)
        self.camera_embedder = CameraEmbedder(config.camera_embed_dim, **kwargs)
        self.plucker_embed = nnx.Linear(
            PLUCKER_DIM, config.encoder.dim, dtype=dtype, param_dtype=param_dtype,
            kernel_init=layers.partitioned(nnx.initializers.zeros_init(), None, "embed"),
            bias_init=layers.partitioned(nnx.initializers.zeros_init(), "embed"), rngs=rngs)
        self.transformer = TriplaneTransformer(config, **kwargs)
        projection = (self.patch_size, self.num_prefix_tokens, config.encoder.dim)
        self.source_projection = SourceProjection(
            config.triplane_low_res, *projection, config.transformer.dim,
            **kwargs) if config.get("source_projection") else None
        self.source_planes = SourceProjection(
            config.upsample_factor * config.triplane_low_res, *projection, config.triplane_dim,
            **kwargs) if config.get("source_planes") else None
        self.decoder = TriplaneDecoder(config.triplane_dim, config.decoder.hidden_dim, config.decoder.num_layers,
                                       **kwargs)
        self.gaussian_head = GaussianHead(config.triplane_dim, config.gaussians, **kwargs)
        self.color_from_decoder = bool(config.gaussians.get("color_from_decoder", False))
        self.opacity_from_decoder = bool(config.gaussians.get("opacity_from_decoder", False))

    def encode_views(self, images: jax.Array, cameras: jax.Array, view_mask: jax.Array) -> EncodedViews:
        """Views (see `forward_planes`) -> the cross-attention context, its key mask and the
        pixel-aligned starts of `source_projection` and `source_planes`: each view's
        `SourceProjection` (the image feature and colour where a cell's centre projects, weighted
        by how squarely its plane faces that view), averaged over the valid views."""
        num, views = images.shape[:2]
        if views not in self.view_buckets:
            raise ValueError(f"{views} views is not a bucket of {self.view_buckets}; pad them with pad_views")
        valid = view_mask.astype(bool)
        images = jnp.where(valid[:, :, None, None, None], images, 0.0)
        cameras = jnp.where(valid[:, :, None], cameras, cameras[:, :1]).astype(jnp.float32)
        flat_images, flat_cameras = images.reshape((num * views,) + images.shape[2:]), cameras.reshape(num * views, -1)
        tokens = self.encoder(flat_images)  # (B·V, T, D)

        def mean_over_valid_views(projection: SourceProjection | None) -> jax.Array | None:
            if projection is None:
                return None
            per_view = projection(tokens, flat_images, flat_cameras)
            per_view = per_view.reshape((num, views) + per_view.shape[1:])
            weights = valid.astype(per_view.dtype)[:, :, None, None]
            return jnp.sum(per_view * weights, axis=1) / jnp.sum(weights, axis=1)

        token_offsets = mean_over_valid_views(self.source_projection)
        plane_offsets = mean_over_valid_views(self.source_planes)
        origins, directions = patch_rays(flat_cameras, images.shape[-2:], self.patch_size)
        rays = self.plucker_embed(plucker_rays(origins, directions).astype(tokens.dtype))
        # No ray for the CLS (and register) tokens: they summarise the whole view.
        rays = jnp.pad(rays, ((0, 0), (self.num_prefix_tokens, 0), (0, 0)))
        tokens = (tokens + rays).reshape(num, -1, tokens.shape[-1])
        mask = jnp.repeat(valid, tokens.shape[1] // views, axis=1)
        return EncodedViews(constrain(tokens, layers.BATCH_TOKENS), mask, token_offsets,
                            None if plane_offsets is None else cells_to_planes(plane_offsets))

    def forward_planes(self, images: jax.Array, cameras: jax.Array, view_mask: jax.Array) -> jax.Array:
        """images (B, V, 3, H, W) in [0, 1], cameras (B, V, 16), view_mask (B, V) bool (view 0 the
        reference, always valid) -> planes (B, 3, C, R, R) float32."""
        encoded = self.encode_views(images, cameras, view_mask)
        cond = self.camera_embedder(cameras[:, 0].astype(jnp.float32))
        planes = self.transformer.planes(self.transformer.tokens(
            encoded.context, cond, token_offsets=encoded.token_offsets, context_mask=encoded.mask))
        return planes if encoded.plane_offsets is None else planes + encoded.plane_offsets

    def gaussians(self, planes: jax.Array) -> Gaussians:
        """The Gaussians of planes (B, 3, C, R, R): the head's, with what the NeRF decoder says at
        each Gaussian's mean (it reads all three planes) in place of the head's own guess:
        `gaussians.color_from_decoder`: the decoder's colour (the head's colour reads only the
        texel's own plane, and two of three planes see an object edge-on from the input view);
        `gaussians.opacity_from_decoder`: `decoder_opacity` of the decoder's density, so a Gaussian
        is opaque inside the object the NeRF stage learned and clear outside it."""
        gaussians = self.gaussian_head(planes)
        if not (self.color_from_decoder or self.opacity_from_decoder):
            return gaussians
        nerf = query_points(self.decoder, planes, gaussians.means)
        replaced = {}
        if self.color_from_decoder:
            replaced["colors"] = constrain(nerf["rgb"].astype(jnp.float32), BATCH_GAUSSIANS)
        if self.opacity_from_decoder:
            opacities = decoder_opacity(nerf["sigma"][..., 0].astype(jnp.float32), gaussians.scales)
            replaced["opacities"] = constrain(opacities, ("act_batch", None))
        return dataclasses.replace(gaussians, **replaced)

    def __call__(self, images: jax.Array, cameras: jax.Array, view_mask: jax.Array) -> Gaussians:
        """The Gaussians (B, N = 3·R²·G) of the views; see `forward_planes`."""
        return self.gaussians(self.forward_planes(images, cameras, view_mask))

    def render_nerf(self, planes: jax.Array, render_cameras: jax.Array, *, resolution: int,
                    options: RenderOptions = DEFAULT_RENDER_OPTIONS, key: jax.Array | None = None,
                    crop_size: int | None = None, crop_start=None, background: jax.Array | None = None
                    ) -> dict[str, jax.Array]:
        """The LRM's volume rendering of the planes (`rendering.render_views`): rgb, depth, opacity."""
        return render_views(self.decoder, planes, render_cameras, resolution=resolution, crop_size=crop_size,
                            crop_start=crop_start, options=options, key=key, background=background)


def render_gaussians(gaussians: Gaussians, render_cameras: jax.Array, resolution: int | tuple[int, int],
                     settings: SplatSettings = SplatSettings(), background: jax.Array | None = None
                     ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Gaussians (B, N) seen from render cameras (B, M, 25) -> images (B, M, H, W, 3), alphas
    (B, M, H, W, 1) and the capacity report (B, M): `num_intersections`, `max_tile_count`,
    `overflow` (pass it to `splatting.check_capacity` outside jit; an overflowing image is incomplete).

    `resolution` is the side (or (height, width)); background (3,) or (B, 3), white by default
    (the data are composited on white). Traceable; settings static.
    """
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    viewmats, intrinsics = splat_camera(render_cameras, width, height)
    num = render_cameras.shape[0]
    background = jnp.broadcast_to(jnp.asarray(WHITE if background is None else background, jnp.float32), (num, 3))

    def one_view(g: Gaussians, viewmat, k, bg):
        colors, alphas, info = rasterize(g.means, g.quats, g.scales, g.opacities, g.colors, viewmat, k, width,
                                         height, bg, settings)
        return colors, alphas, {name: info[name] for name in ("num_intersections", "max_tile_count", "overflow")}

    per_object = jax.vmap(one_view, in_axes=(None, 0, 0, None))
    gaussians = jax.tree.map(lambda x: x.astype(jnp.float32), gaussians)
    return jax.vmap(per_object)(gaussians, viewmats, intrinsics, background)


def splat_settings(config: ml_collections.ConfigDict) -> SplatSettings:
    """The rasteriser settings of `config.splatting` (configs/flexrm.py)."""
    fields = {field.name for field in dataclasses.fields(SplatSettings)}
    return SplatSettings(**{name: value for name, value in config.splatting.items() if name in fields})


def abstract_flexrm(config: ml_collections.ConfigDict) -> FlexRM:
    """The FlexRM of `config.model`-like `config` with shapes only (nothing allocated)."""
    return nnx.eval_shape(lambda: FlexRM(config, rngs=nnx.Rngs(0)))


def count_parameters(config: ml_collections.ConfigDict) -> int:
    """Number of parameters of the FlexRM of `config` (a `config.model`), without allocating them."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract_flexrm(config), nnx.Param)))


def gaussian_count(config: ml_collections.ConfigDict) -> int:
    """N = 3·R²·G of `config` (a `config.model`): R = triplane_low_res · upsample_factor."""
    resolution = config.triplane_low_res * config.get("upsample_factor", 2)
    return NUM_PLANES * resolution**2 * config.gaussians.per_texel
