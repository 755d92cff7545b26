"""The DINOv2 ViT image encoder, numerically equal to the official `DinoWrapper` (HF `Dinov2Model`).

Images (N, 3, H, W) in [0, 1] are normalised with the ImageNet mean/std, cut into 14x14
patches (pixels past the last full patch are ignored), prefixed by a CLS token (and
optional register tokens) and given position embeddings resized to the patch grid with
PyTorch's bicubic interpolation. Pre-norm blocks with layer scale follow; the output is the
final LayerNorm of *all* tokens, CLS first: the LRM's cross-attention context.

Position-embedding resize rules (`resize_rule`), both PyTorch bicubic (A = -0.75,
align_corners=False, clamped border taps), differing only in the sampling step r:
    "legacy"  transformers <= 4.44: interpolate(scale_factor=(n + 0.1) / M), r = M / (n + 0.1)
    "size"    transformers >= 4.45: interpolate(size=n), r = M / n
`jax.image.resize` is not equivalent (another cubic kernel, antialiasing), so the resize is a
small matrix built in NumPy at trace time and applied along rows and columns.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from vfusion3d_jax.models import layers

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BICUBIC_A = -0.75
RESIZE_RULES = ("legacy", "size")


def normalize_images(images: jax.Array) -> jax.Array:
    """(N, 3, H, W) RGB in [0, 1] -> (x - mean_c) / std_c in float32, as the DINOv2 image processor."""
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)[:, None, None]
    std = jnp.asarray(IMAGENET_STD, jnp.float32)[:, None, None]
    return (images.astype(jnp.float32) - mean) / std


def _cubic_taps(t: np.ndarray) -> np.ndarray:
    """PyTorch's `get_cubic_upsample_coefficients` in float32: (..., 4) weights of taps i0-1 .. i0+2."""
    a = np.float32(BICUBIC_A)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    one = np.float32(1)
    return np.stack([far(t + one), near(t), near(one - t), far((one - t) + one)], axis=-1)


def bicubic_resize_matrix(in_size: int, out_size: int, step: float) -> np.ndarray:
    """(out_size, in_size) float32 matrix of PyTorch's bicubic resize along one axis.

    `step` is the source distance between output samples (PyTorch's float32 "scale"): output
    index o reads the source at step * (o + 0.5) - 0.5; taps beyond the border are clamped.
    """
    step = np.float32(step)
    source = step * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    # PyTorch's guard_index_and_lambda: the index never passes the last row, t stays in [0, 1].
    index = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    t = np.clip(source - index.astype(np.float32), np.float32(0), np.float32(1))
    weights = _cubic_taps(t)
    matrix = np.zeros((out_size, in_size), np.float32)
    for tap in range(4):
        np.add.at(matrix, (np.arange(out_size), np.clip(index - 1 + tap, 0, in_size - 1)), weights[:, tap])
    return matrix


def resize_step(in_size: int, out_size: int, rule: str) -> np.float32:
    """The float32 sampling step PyTorch uses to resize `in_size` -> `out_size` under `rule`."""
    if rule == "legacy":
        scale_factor = (out_size + 0.1) / in_size  # transformers' "+ 0.1" against rounding, in double
        if math.floor(in_size * scale_factor) != out_size:
            raise ValueError(f"legacy resize of {in_size} gives {math.floor(in_size * scale_factor)}, not {out_size}")
        return np.float32(1.0 / scale_factor)
    if rule == "size":
        return np.float32(in_size) / np.float32(out_size)
    raise ValueError(f"unknown position-embedding resize rule {rule!r}; known: {RESIZE_RULES}")


class ViTBlock(nnx.Module):
    """Pre-norm DINOv2 layer: h += ls1 * Attn(LN1(h)); h += ls2 * MLP(LN2(h))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, layer_scale_init: float, *,
                 attention_implementation: str | None = None, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        layer_scale = layers.partitioned(nnx.initializers.constant(layer_scale_init), "embed")
        self.norm1 = layers.layer_norm(dim, **kwargs)
        self.attention = layers.Attention(dim, num_heads, use_bias=True, implementation=attention_implementation,
                                          **kwargs)
        self.layer_scale1 = nnx.Param(layer_scale(rngs.params(), (dim,), param_dtype))
        self.norm2 = layers.layer_norm(dim, **kwargs)
        self.mlp = layers.Mlp(dim, int(dim * mlp_ratio), **kwargs)
        self.layer_scale2 = nnx.Param(layer_scale(rngs.params(), (dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        # The residual stream keeps the compute dtype (a scan carry cannot change type).
        x = x + self.layer_scale1[...].astype(x.dtype) * self.attention(self.norm1(x))
        return x + self.layer_scale2[...].astype(x.dtype) * self.mlp(self.norm2(x))


class VisionTransformer(nnx.Module):
    """DINOv2 encoder; `config` is `config.model.encoder` (see configs/lrm.py).

    `remat` is a policy name of `layers.REMAT_POLICIES`; `attention_implementation` is passed to
    `jax.nn.dot_product_attention` (None = XLA's choice, "cudnn" = fused kernel on GPU).
    """

    def __init__(self, config: ml_collections.ConfigDict, *, remat: str = "none",
                 attention_implementation: str | None = None, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if config.resize_rule not in RESIZE_RULES:
            raise ValueError(f"unknown position-embedding resize rule {config.resize_rule!r}; known: {RESIZE_RULES}")
        dim, patch = config.dim, config.patch_size
        self.patch_size = patch
        self.pretrain_grid = config.pretrain_image_size // patch
        self.resize_rule = config.resize_rule
        self.remat = remat
        self.dtype = dtype
        self.patch_embed = nnx.Conv(
            3, dim, kernel_size=(patch, patch), strides=(patch, patch), padding="VALID", dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=layers.partitioned(nnx.initializers.lecun_normal(), None, None, "channels", "embed"),
            bias_init=layers.partitioned(nnx.initializers.zeros_init(), "embed"), rngs=rngs)
        token_init = nnx.initializers.truncated_normal(0.02)
        self.cls_token = nnx.Param(
            layers.partitioned(token_init, None, None, "embed")(rngs.params(), (1, 1, dim), param_dtype))
        # DINOv2's masked-image-modelling token: replaces the patches selected by `patch_mask`.
        self.mask_token = nnx.Param(
            layers.partitioned(nnx.initializers.zeros_init(), None, "embed")(rngs.params(), (1, dim), param_dtype))
        self.pos_embed = nnx.Param(layers.partitioned(token_init, None, "tokens", "embed")(
            rngs.params(), (1, 1 + self.pretrain_grid**2, dim), param_dtype))
        if config.num_register_tokens:
            self.register_tokens = nnx.Param(layers.partitioned(token_init, None, "tokens", "embed")(
                rngs.params(), (1, config.num_register_tokens, dim), param_dtype))
        else:
            self.register_tokens = None
        self.blocks = layers.stack_layers(
            lambda layer_rngs: ViTBlock(config.dim, config.num_heads, config.mlp_ratio, config.layer_scale_init,
                                        attention_implementation=attention_implementation, dtype=dtype,
                                        param_dtype=param_dtype, rngs=layer_rngs),
            config.num_layers, rngs)
        self.norm = layers.layer_norm(dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def position_embeddings(self, height: int, width: int) -> jax.Array:
        """(1, 1 + rows * cols, D): CLS position as stored, patch grid resized to this image's patch grid."""
        rows, cols = height // self.patch_size, width // self.patch_size
        pos_embed = self.pos_embed[...]
        grid = self.pretrain_grid
        if rows * cols == grid * grid and height == width:  # the only case transformers skips the resize
            return pos_embed
        resize_rows = bicubic_resize_matrix(grid, rows, resize_step(grid, rows, self.resize_rule))
        resize_cols = bicubic_resize_matrix(grid, cols, resize_step(grid, cols, self.resize_rule))
        patch_grid = pos_embed[0, 1:].astype(jnp.float32).reshape(grid, grid, -1)
        # A few thousand multiply-adds: always in full precision.
        resized = jnp.einsum("ri,ijd,cj->rcd", resize_rows, patch_grid, resize_cols,
                             precision=jax.lax.Precision.HIGHEST)
        resized = resized.reshape(1, rows * cols, -1).astype(pos_embed.dtype)
        return jnp.concatenate([pos_embed[:, :1], resized], axis=1)

    def embed(self, pixel_values: jax.Array, patch_mask: jax.Array | None = None) -> jax.Array:
        """Normalised pixels (N, 3, H, W) -> input tokens (N, 1 + R + n_h * n_w, D) of the first block.

        `patch_mask` (N, n_h * n_w) bool replaces the selected patch embeddings by the mask token.
        """
        height, width = pixel_values.shape[-2:]
        patches = self.patch_embed(jnp.moveaxis(pixel_values, 1, -1).astype(self.dtype))  # VALID: remainder dropped
        patches = patches.reshape(patches.shape[0], -1, patches.shape[-1])
        if patch_mask is not None:
            patches = jnp.where(patch_mask[..., None], self.mask_token[...].astype(patches.dtype), patches)
        cls = jnp.broadcast_to(self.cls_token[...].astype(patches.dtype), (patches.shape[0], 1, patches.shape[-1]))
        tokens = jnp.concatenate([cls, patches], axis=1) + self.position_embeddings(height, width).astype(patches.dtype)
        if self.register_tokens is not None:  # registers go after CLS and carry no position embedding
            registers = jnp.broadcast_to(self.register_tokens[...].astype(tokens.dtype),
                                         (tokens.shape[0],) + self.register_tokens.shape[1:])
            tokens = jnp.concatenate([tokens[:, :1], registers, tokens[:, 1:]], axis=1)
        return tokens

    def __call__(self, images: jax.Array, *, patch_mask: jax.Array | None = None,
                 return_layer_outputs: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Images (N, 3, H, W) in [0, 1] -> final-LayerNorm tokens (N, 1 + R + n_h * n_w, D), CLS first.

        With `return_layer_outputs`, also every block's output before the final norm (L, N, T, D).
        """
        tokens = self.embed(normalize_images(images), patch_mask)
        tokens, layer_outputs = layers.scan_layers(self.blocks, tokens, lambda block, x: block(x), remat=self.remat,
                                                   return_layer_outputs=return_layer_outputs,
                                                   stream_axes=layers.BATCH_TOKENS)
        features = self.norm(tokens)
        return (features, layer_outputs) if return_layer_outputs else features
