"""The triplane LRM of VFusion3D: image + source camera -> triplane -> rendered views.

    images (N, 3, H, W) in [0, 1] ──DINOv2──▶ image tokens (N, 1 + n², D_enc)
    source camera (N, 16) ──Linear, SiLU, Linear──▶ condition (N, D_c)
    learned triplane tokens (3·r², D) ──[ModLN → cross-attn(image tokens), ModLN → self-attn,
        ModLN → MLP] × L──▶ LayerNorm ──per-plane 2x2 stride-2 deconv──▶ planes (N, 3, C, 2r, 2r)
    planes + render cameras (N, M, 25) ──TriplaneDecoder + ray marching──▶ images

With `source_projection` on (this project's addition, off for the official variants), each
triplane token starts from its learned embedding plus the image feature where the token's centre
projects into the source view (`SourceProjection`): the frontal silhouette and colours reach the
right tokens at step 0 instead of after cross-attention has learned where to look. With
`source_planes`, the same projection at the planes' own resolution is added to the upsampled
planes, a skip that brings the input's colours and outline to the decoder at full resolution.

Numerically equal to the official `LRMGenerator` (see tests/fixtures/vfusion3d_reference);
`vfusion3d_jax.models.convert` imports its weights. Images are channel-first (NCHW) like the
official model and the planes; the renderer returns channels-last images.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from vfusion3d_jax.models import layers
from vfusion3d_jax.models.vit import VisionTransformer
from vfusion3d_jax.rendering.renderer import RenderOptions, render_views
from vfusion3d_jax.rendering.triplane import NUM_PLANES, TriplaneDecoder

SOURCE_CAMERA_DIM = 16
DEFAULT_RENDER_OPTIONS = RenderOptions()


class CameraEmbedder(nnx.Module):
    """16-d source camera -> Linear -> SiLU -> Linear (the adaLN condition)."""

    def __init__(self, embed_dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = layers.dense(SOURCE_CAMERA_DIM, embed_dim, (None, "cond"), **kwargs)
        self.fc2 = layers.dense(embed_dim, embed_dim, ("cond", "cond"), **kwargs)

    def __call__(self, cameras: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.silu(self.fc1(cameras)))


def triplane_token_points(low_res: int) -> np.ndarray:
    """World points (3·r², 3) at the centres of the triplane tokens (token order of `TriplaneTransformer`).

    Plane 0 spans (x, y), plane 1 (x, z), plane 2 (z, y) as (columns, rows) (rendering/triplane.py),
    each over the box [-1, 1]; a token's point has 0 for the plane's third coordinate.
    """
    centres = (np.arange(low_res) + 0.5) * (2.0 / low_res) - 1.0
    rows, cols = (a.ravel() for a in np.meshgrid(centres, centres, indexing="ij"))
    zeros = np.zeros_like(rows)
    return np.concatenate([np.stack(xyz, -1) for xyz in ((cols, rows, zeros), (cols, zeros, rows),
                                                           (zeros, rows, cols))]).astype(np.float32)


def project_to_source(points: jax.Array, source_cameras: jax.Array) -> jax.Array:
    """Normalised image coordinates (N, P, 2) (x right, y down, [0, 1] spans the image) of world
    points (P, 3) in each source camera (N, 16) (cameras.py conventions: OpenGL axes, no skew)."""
    cam2world = source_cameras[:, :12].reshape(-1, 3, 4)
    focal, centre = source_cameras[:, None, 12:14], source_cameras[:, None, 14:16]
    in_camera = jnp.einsum("nji,npj->npi", cam2world[:, :, :3], points[None] - cam2world[:, None, :, 3])
    depth = jnp.maximum(-in_camera[..., 2:3], 1e-3)  # the camera looks along its -z
    return focal * in_camera[..., :2] * jnp.array([1.0, -1.0]) / depth + centre  # image y points down


def bilinear_sample(grid: jax.Array, coords: jax.Array) -> jax.Array:
    """Features (N, P, D) of a grid (N, H, W, D) at float32 coords (N, P, 2) = (x, y) in cells (cell
    k's centre at k), zero outside the grid (grid_sample with zero padding)."""
    num, height, width, dim = grid.shape
    flat = grid.reshape(num, height * width, dim)
    lower = jnp.floor(coords)
    features = jnp.zeros(coords.shape[:2] + (dim,), jnp.float32)
    for corner in ((0, 0), (0, 1), (1, 0), (1, 1)):
        tap = lower + jnp.array(corner, coords.dtype)
        weight = jnp.prod(1.0 - jnp.abs(coords - tap), axis=-1)
        inside = (tap[..., 0] >= 0) & (tap[..., 0] < width) & (tap[..., 1] >= 0) & (tap[..., 1] < height)
        index = (jnp.clip(tap[..., 1], 0, height - 1) * width + jnp.clip(tap[..., 0], 0, width - 1)).astype(jnp.int32)
        values = jnp.take_along_axis(flat, index[..., None], axis=1)
        features = features + jnp.where(inside, weight, 0.0)[..., None] * values
    return features.astype(grid.dtype)


# Unit normals of the planes (x, y), (x, z), (z, y).
PLANE_NORMALS = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], np.float32)


class SourceProjection(nnx.Module):
    """Pixel-aligned triplane features: Linear(image feature and mean colour of the patch at each cell
    centre's projection into the source view), weighted per plane by how squarely the plane faces the
    source camera (|cos| of normal and view axis).

    Used at two resolutions: on the triplane tokens (r², the transformer's start) and on the planes
    themselves (f·r², added to the upsampler's output), where the colour reaches the decoder
    directly. A plane seen edge-on would copy one image column along the depth of the whole box
    (streaks that the decoder must unlearn); the plane facing the camera gets the image one to one.
    The kernel starts at zero, so the model computes what the model without it computes until
    training moves it (an imported model is unchanged); its gradient is not zero.
    """

    def __init__(self, resolution: int, patch_size: int, num_prefix_tokens: int, context_dim: int, dim: int, *,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.resolution, self.patch_size, self.num_prefix_tokens = resolution, patch_size, num_prefix_tokens
        zeros = layers.partitioned(nnx.initializers.zeros_init(), None, "embed")
        self.proj = nnx.Linear(context_dim, dim, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                               kernel_init=zeros, rngs=rngs)
        self.colour_proj = nnx.Linear(3, dim, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                                      kernel_init=zeros, rngs=rngs)

    def __call__(self, image_features: jax.Array, images: jax.Array, source_cameras: jax.Array) -> jax.Array:
        """Image tokens (N, prefix + h·w, D_enc) of images (N, 3, H, W) -> per-cell features (N, 3·R², D)."""
        num, _, height, width = images.shape
        size = self.patch_size
        rows, cols = height // size, width // size
        grid = image_features[:, self.num_prefix_tokens:].reshape(num, rows, cols, image_features.shape[-1])
        colours = images[:, :, :rows * size, :cols * size].reshape(num, 3, rows, size, cols, size).mean((3, 5))
        colours = jnp.moveaxis(colours, 1, -1).astype(grid.dtype)  # (N, rows, cols, 3)
        source_cameras = source_cameras.astype(jnp.float32)
        uv = project_to_source(jnp.asarray(triplane_token_points(self.resolution)), source_cameras)
        cells = uv * jnp.array([width, height], jnp.float32) / size - 0.5
        view_axes = source_cameras[:, :12].reshape(-1, 3, 4)[:, :, 2]  # the camera's z axis in the world
        facing = jnp.abs(view_axes @ jnp.asarray(PLANE_NORMALS).T) / jnp.linalg.norm(view_axes, axis=-1, keepdims=True)
        weights = jnp.repeat(facing, self.resolution**2, axis=1)[..., None]  # (N, 3·R², 1)
        weights = weights.astype(grid.dtype)
        # Two layers rather than one on the concatenation: the same map, without joining arrays
        # that are sharded differently (features over the embedding axis, colours not at all).
        return (self.proj(bilinear_sample(grid, cells) * weights)
                + self.colour_proj(bilinear_sample(colours, cells) * weights))


def cells_to_planes(cells: jax.Array) -> jax.Array:
    """Per-cell features (N, 3·R², C) in token order -> planes (N, 3, C, R, R) float32."""
    side = int(round((cells.shape[1] // NUM_PLANES) ** 0.5))
    return jnp.moveaxis(cells.reshape(cells.shape[0], NUM_PLANES, side, side, -1), -1, 2).astype(jnp.float32)


class TriplaneBlock(nnx.Module):
    """The official `ConditionModulationBlock`: cross-attention, self-attention, MLP, each after a ModLN."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, context_dim: int, cond_dim: int, *,
                 attention_implementation: str | None = None, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        attention = dict(use_bias=False, implementation=attention_implementation, **kwargs)
        self.norm1 = layers.ModLN(dim, cond_dim, **kwargs)
        self.cross_attention = layers.Attention(dim, num_heads, context_dim=context_dim, **attention)
        self.norm2 = layers.ModLN(dim, cond_dim, **kwargs)
        self.self_attention = layers.Attention(dim, num_heads, **attention)
        self.norm3 = layers.ModLN(dim, cond_dim, **kwargs)
        self.mlp = layers.Mlp(dim, int(dim * mlp_ratio), **kwargs)

    def __call__(self, x: jax.Array, context: jax.Array, cond: jax.Array, context_mask: jax.Array | None = None
                 ) -> jax.Array:
        x = x + self.cross_attention(self.norm1(x, cond), context, context_mask)
        x = x + self.self_attention(self.norm2(x, cond))
        return x + self.mlp(self.norm3(x, cond))


class TriplaneUpsampler(nnx.Module):
    """Per-plane ConvTranspose2d(kernel f, stride f): out[c, f·i+a, f·j+b] = bias[c] + Σ_d x[i, j, d] W[d, a, b, c].

    The kernel is (D, f, f, C) (PyTorch's (D, C, f, f) with the output channels last); with
    stride = kernel the transposed convolution is one matmul and a pixel shuffle. The LRM's f is 2
    (official); FlexRM may upsample further for denser Gaussian planes.
    """

    def __init__(self, dim: int, channels: int, *, factor: int = 2, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.kernel = nnx.Param(layers.partitioned(nnx.initializers.lecun_normal(), "embed", None, None, "channels")(
            rngs.params(), (dim, factor, factor, channels), param_dtype))
        self.bias = nnx.Param(layers.partitioned(nnx.initializers.zeros_init(), "channels")(
            rngs.params(), (channels,), param_dtype))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens (N, 3, r, r, D) -> planes (N, 3, C, f·r, f·r) in float32."""
        num, planes, rows, cols, _ = tokens.shape
        factor = self.kernel.shape[1]
        kernel = self.kernel[...].astype(tokens.dtype)
        shuffled = jnp.einsum("npijd,dabc->npciajb", tokens, kernel, preferred_element_type=jnp.float32)
        out = shuffled.reshape(num, planes, -1, factor * rows, factor * cols)
        return out + self.bias[...].astype(jnp.float32)[:, None, None]


class TriplaneTransformer(nnx.Module):
    """Learned triplane tokens, conditioned transformer layers, final LayerNorm and the upsampler.

    Token t = p·r² + i·r + j is row i, column j of plane p.
    """

    def __init__(self, config: ml_collections.ConfigDict, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        tf = config.transformer
        self.low_res = config.triplane_low_res
        self.remat = config.remat
        self.dtype = dtype
        # Official init: N(0, 1/D).
        self.pos_embed = nnx.Param(layers.partitioned(nnx.initializers.normal(tf.dim**-0.5), None, "tokens", "embed")(
            rngs.params(), (1, NUM_PLANES * self.low_res**2, tf.dim), param_dtype))
        self.blocks = layers.stack_layers(
            lambda layer_rngs: TriplaneBlock(
                tf.dim, tf.num_heads, tf.mlp_ratio, config.encoder.dim, config.camera_embed_dim,
                attention_implementation=config.attention_implementation, dtype=dtype, param_dtype=param_dtype,
                rngs=layer_rngs),
            tf.num_layers, rngs)
        self.norm = layers.layer_norm(tf.dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.upsampler = TriplaneUpsampler(tf.dim, config.triplane_dim, factor=config.get("upsample_factor", 2),
                                           param_dtype=param_dtype, rngs=rngs)

    def tokens(self, image_features: jax.Array, cond: jax.Array, *, token_offsets: jax.Array | None = None,
               context_mask: jax.Array | None = None,
               return_layer_outputs: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Final-LayerNorm triplane tokens (N, 3·r², D) (and every layer's output (L, N, 3·r², D) if asked).

        `token_offsets` (N, 3·r², D), if given, are added to the learned tokens before the first layer;
        `context_mask` (N, T) bool, if given, hides the image tokens where it is False (padded views).
        """
        num = image_features.shape[0]
        x = jnp.broadcast_to(self.pos_embed[...].astype(self.dtype), (num,) + self.pos_embed.shape[1:])
        if token_offsets is not None:
            x = x + token_offsets.astype(self.dtype)
        context, cond = image_features.astype(self.dtype), cond.astype(self.dtype)
        x, layer_outputs = layers.scan_layers(self.blocks, x, lambda block, h: block(h, context, cond, context_mask),
                                              remat=self.remat, return_layer_outputs=return_layer_outputs,
                                              stream_axes=layers.BATCH_TOKENS)
        x = self.norm(x)
        return (x, layer_outputs) if return_layer_outputs else x

    def planes(self, tokens: jax.Array) -> jax.Array:
        """Final tokens (N, 3·r², D) -> planes (N, 3, C, f·r, f·r) in float32 (f: the upsampling factor, 2)."""
        return self.upsampler(tokens.reshape(tokens.shape[0], NUM_PLANES, self.low_res, self.low_res, -1))

    def __call__(self, image_features: jax.Array, cond: jax.Array, token_offsets: jax.Array | None = None
                 ) -> jax.Array:
        return self.planes(self.tokens(image_features, cond, token_offsets=token_offsets))


class LRM(nnx.Module):
    """The VFusion3D triplane LRM; `config` is `config.model` (configs/lrm.py).

    Submodules mirror the official `LRMGenerator`: `encoder`, `camera_embedder`, `transformer`
    and `decoder` (the official `synthesizer.decoder`).
    """

    def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.encoder = VisionTransformer(config.encoder, remat=config.remat,
                                         attention_implementation=config.attention_implementation, **kwargs)
        self.camera_embedder = CameraEmbedder(config.camera_embed_dim, **kwargs)
        self.transformer = TriplaneTransformer(config, **kwargs)
        projection = (config.encoder.patch_size, 1 + config.encoder.num_register_tokens, config.encoder.dim)
        self.source_projection = SourceProjection(
            config.triplane_low_res, *projection, config.transformer.dim,
            **kwargs) if config.get("source_projection") else None
        self.source_planes = SourceProjection(
            config.get("upsample_factor", 2) * config.triplane_low_res, *projection, config.triplane_dim,
            **kwargs) if config.get("source_planes") else None
        self.decoder = TriplaneDecoder(config.triplane_dim, config.decoder.hidden_dim, config.decoder.num_layers,
                                       **kwargs)

    def encode_image(self, images: jax.Array) -> jax.Array:
        """Images (N, 3, H, W) RGB in [0, 1] -> image tokens (N, 1 + ⌊H/14⌋·⌊W/14⌋, D_enc), CLS first."""
        return self.encoder(images)

    def embed_camera(self, source_cameras: jax.Array) -> jax.Array:
        """Source cameras (N, 16) (cam2world[:3] row-major, fx, fy, cx, cy normalised) -> (N, D_c)."""
        return self.camera_embedder(source_cameras)

    def forward_planes(self, images: jax.Array, source_cameras: jax.Array) -> jax.Array:
        """Images (N, 3, H, W) in [0, 1] and source cameras (N, 16) -> planes (N, 3, C, 2r, 2r) float32."""
        image_features = self.encode_image(images)
        offsets = (None if self.source_projection is None
                   else self.source_projection(image_features, images, source_cameras))
        planes = self.transformer(image_features, self.embed_camera(source_cameras), offsets)
        if self.source_planes is not None:
            planes = planes + cells_to_planes(self.source_planes(image_features, images, source_cameras))
        return planes

    def __call__(self, images: jax.Array, source_cameras: jax.Array, render_cameras: jax.Array, *,
                 resolution: int, options: RenderOptions = DEFAULT_RENDER_OPTIONS, key: jax.Array | None = None,
                 crop_size: int | None = None, crop_start=None, background: jax.Array | None = None
                 ) -> dict[str, jax.Array]:
        """Planes of the images and their renders from `render_cameras` (N, M, 25).

        The keyword arguments are those of `rendering.render_views`. Returns `planes` and the
        renderer's `rgb` (N, M, h, w, 3), `depth` and `opacity` (N, M, h, w, 1).
        """
        planes = self.forward_planes(images, source_cameras)
        rendered = render_views(self.decoder, planes, render_cameras, resolution=resolution, crop_size=crop_size,
                                crop_start=crop_start, options=options, key=key, background=background)
        return dict(rendered, planes=planes)


def abstract_lrm(config: ml_collections.ConfigDict) -> LRM:
    """The LRM of `config.model`-like `config` with shapes only (nothing allocated)."""
    return nnx.eval_shape(lambda: LRM(config, rngs=nnx.Rngs(0)))


def count_parameters(config: ml_collections.ConfigDict) -> int:
    """Number of parameters of the LRM of `config` (a `config.model`), without allocating them."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract_lrm(config), nnx.Param)))
