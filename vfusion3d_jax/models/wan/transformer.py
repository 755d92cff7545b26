"""The Wan video diffusion transformer in Flax NNX, numerically equal to diffusers' `WanTransformer3DModel`.

    video (B, F, H, W, C) ──Conv3d patch embedding──▶ tokens (B, N, D), N = F'·H'·W' (frame-major)
    timestep (B,) or per token (B, N) ──sinusoid, Linear, SiLU, Linear──▶ temb
        temb ──SiLU, Linear──▶ timestep_proj: the blocks' 6 modulations
    text embeddings (B, L, text_dim) ──Linear, GELU(tanh), Linear──▶ context (B, L, D)
    [image-to-video] CLIP image tokens (B, 257, image_dim) ──LayerNorm, MLP, LayerNorm──▶ image context
    tokens ──[adaLN → self-attention (RMSNorm q, k; 3D rotary) → gate,
              (LayerNorm) → cross-attention to text (+ image tokens with their own K/V),
              adaLN → FFN GELU(tanh) → gate] × L
        ──adaLN(temb)──Linear──unpatchify──▶ prediction (B, F, H, W, C_out)

The model is channels-last; `forward_diffusers` takes and returns diffusers' [B, C, F, H, W] and
can return diffusers' intermediate activations, so a converted checkpoint can be checked
against diffusers tensor by tensor (tests/fixtures/wan_reference). `config` is the
`config.model` of configs/mvdiffusion.py, whose architecture fields are diffusers' own
`config.json` fields (`vfusion3d_jax.models.wan.convert` reads them from a checkpoint).

Numerics follow diffusers: LayerNorms, the adaLN modulation, the gated residual updates and
the time embedding MLP run in float32 whatever the compute dtype; RMSNorm normalises in float32
and casts back before its scale (torch.nn.RMSNorm); rotary tables are computed in float64 and
rounded to float32, and applied in float32; the timestep sinusoid is float32. Attention goes
through `attention`, the one place where a kernel is chosen.

Per-token timesteps (Wan 2.2 TI2V: the conditioning frame's tokens stay at t = 0) are the
general case: a timestep per example is a per-token timestep shared by all tokens, so temb and
the modulations have shape (B, T, ...) with T = 1 or N and broadcast over the tokens.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from vfusion3d_jax.models import layers
from vfusion3d_jax.partitioning import constrain

# `jax.nn.dot_product_attention` implementations: None lets JAX choose (XLA), "cudnn" is the fused
# GPU kernel (bfloat16/float16 only). A TPU splash-attention kernel would be one more name here.
ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn")
# The only query/key normalisation diffusers implements (RMSNorm over all heads' features at once).
QK_NORM = "rms_norm_across_heads"
ROPE_THETA = 10000.0
TIMESTEP_MAX_PERIOD = 10000
# diffusers' WanImageEmbedding uses torch.nn.LayerNorm's default epsilon, not the model's `eps`.
IMAGE_EMBEDDER_EPS = 1e-5
NUM_MODULATIONS = 6  # shift, scale, gate of self-attention; shift, scale, gate of the FFN
# Activation sharding (vfusion3d_jax/partitioning.py): the token stream (B, N, D) and attention's
# (B, N, heads, head_dim) arrays stay split by example over the mesh's batch axes.
BATCH_TOKENS = ("act_batch", None, None)
BATCH_HEADS = ("act_batch", None, None, None)

Dtype = layers.Dtype
_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def attention(query: jax.Array, key: jax.Array, value: jax.Array, *, implementation: str | None = None) -> jax.Array:
    """Softmax attention of (batch, tokens, heads, head_dim) arrays with scores scaled by 1/sqrt(head_dim)."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; known: {ATTENTION_IMPLEMENTATIONS}")
    # Each device attends for its own examples: without the constraint XLA may gather the batch
    # that FSDP split and compute every example's scores on every device.
    query, key, value = (constrain(x, BATCH_HEADS) for x in (query, key, value))
    return constrain(jax.nn.dot_product_attention(query, key, value, implementation=implementation), BATCH_HEADS)


# ----------------------------------------------------------------------------------------------
# Position and time encodings.


def rotary_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Head features rotated by frame, row and column position: (head_dim - 2·h, h, h), h = 2·⌊head_dim/6⌋."""
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def _rotary_axis_table(length: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (length, dim) of positions 0..length-1, each frequency repeated twice (interleaved pairs).

    diffusers' `get_1d_rotary_pos_embed(use_real=True, repeat_interleave_real=True)` with float64
    frequencies, rounded to float32 as it does.
    """
    frequencies = 1.0 / ROPE_THETA ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    angles = np.outer(np.arange(length, dtype=np.float64), frequencies)
    return (np.repeat(np.cos(angles), 2, axis=1).astype(np.float32),
            np.repeat(np.sin(angles), 2, axis=1).astype(np.float32))


def rotary_tables(head_dim: int, grid: tuple[int, int, int]) -> tuple[jax.Array, jax.Array]:
    """diffusers' `WanRotaryPosEmbed` for a token grid (F', H', W'): cos and sin (N, head_dim) float32.

    Token n = (f·H' + h)·W' + w. Its first features rotate with f, the next with h, the last
    with w (`rotary_axis_dims`); pair (2i, 2i+1) has one frequency, so both tables hold each
    value twice, as diffusers' do. Only the small per-axis tables are constants; the (N, head_dim)
    broadcast is left to XLA.
    """
    tables = [_rotary_axis_table(length, dim) for length, dim in zip(grid, rotary_axis_dims(head_dim), strict=True)]

    def expand(which: int) -> jax.Array:
        parts = []
        for axis, table in enumerate(tables):
            shape = [1, 1, 1, table[which].shape[1]]
            shape[axis] = grid[axis]
            parts.append(jnp.broadcast_to(jnp.asarray(table[which]).reshape(shape), tuple(grid) + (shape[3],)))
        return jnp.concatenate(parts, axis=-1).reshape(-1, head_dim)

    return expand(0), expand(1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates feature pairs (2i, 2i+1) of x (B, N, heads, head_dim) by the tables' angles (N, head_dim).

    In float32 at least (the tables' dtype), cast back to x's dtype, as diffusers.
    """
    compute = jnp.promote_types(x.dtype, jnp.float32)
    even, odd = x[..., 0::2].astype(compute), x[..., 1::2].astype(compute)
    cos, sin = cos[:, None, 0::2].astype(compute), sin[:, None, 1::2].astype(compute)
    rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


def timestep_sinusoid(timesteps: jax.Array, dim: int) -> jax.Array:
    """diffusers' `get_timestep_embedding(flip_sin_to_cos=True, downscale_freq_shift=0)`: [cos, sin] in float32.

    (...,) timesteps -> (..., dim); frequency i of dim // 2 is exp(-ln(10000) · i / (dim // 2)).
    """
    half = dim // 2
    exponent = -math.log(TIMESTEP_MAX_PERIOD) * jnp.arange(half, dtype=jnp.float32) / half
    angles = timesteps.astype(jnp.float32)[..., None] * jnp.exp(exponent)
    embedding = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)
    if dim % 2:
        embedding = jnp.pad(embedding, [(0, 0)] * (embedding.ndim - 1) + [(0, 1)])
    return embedding


# ----------------------------------------------------------------------------------------------
# Layers.


def fp32_layer_norm(dim: int, eps: float, *, affine: bool, param_dtype: Dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """diffusers' `FP32LayerNorm`: LayerNorm over the last axis computed in float32 (call with a float32 input)."""
    metadata = {"out_sharding": ("embed",), "eager_sharding": False}
    return nnx.LayerNorm(dim, epsilon=eps, use_scale=affine, use_bias=affine, use_fast_variance=False,
                         dtype=jnp.float32, param_dtype=param_dtype, scale_metadata=metadata,
                         bias_metadata=metadata, rngs=rngs)


class RMSNorm(nnx.Module):
    """torch.nn.RMSNorm: x · rsqrt(mean(x²) + eps) in float32, cast back to x's dtype, times a learned scale."""

    def __init__(self, dim: int, eps: float, *, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = nnx.Param(layers.partitioned(nnx.initializers.ones_init(), "heads")(
            rngs.params(), (dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        compute = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        normalized = compute * jax.lax.rsqrt(jnp.mean(compute * compute, axis=-1, keepdims=True) + self.eps)
        return normalized.astype(x.dtype) * self.scale[...].astype(x.dtype)


class Mlp(nnx.Module):
    """Linear -> activation ("silu", "gelu", "gelu_tanh") -> Linear."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, activation: str, *, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.activation = activation
        self.fc1 = layers.dense(in_dim, hidden_dim, ("embed", "mlp"), **kwargs)
        self.fc2 = layers.dense(hidden_dim, out_dim, ("mlp", "embed"), **kwargs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(_ACTIVATIONS[self.activation](self.fc1(x)))


class WanAttention(nnx.Module):
    """diffusers' `WanAttention` with `WanAttnProcessor`: q, k, v and output projections with biases,
    RMSNorm of q and k over all heads' features, optional rotary embedding, and for the
    image-to-video cross-attention a second attention of the same queries to the image tokens
    through their own K/V projections (`add_k_proj`, `add_v_proj`, `norm_added_k`), summed
    before the output projection.

    Heads split the features as in diffusers: head h holds features h·d .. (h+1)·d - 1. diffusers
    passes text and image tokens joined and splits them assuming exactly 512 text tokens (the
    umT5 length its pipelines pad to); here they arrive apart, which is the same whenever that
    assumption holds.
    """

    def __init__(self, dim: int, num_heads: int, *, eps: float, image_context_dim: int | None = None,
                 implementation: str | None = None, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads = num_heads
        self.implementation = implementation
        self.to_q = layers.dense(dim, dim, ("embed", "heads"), **kwargs)
        self.to_k = layers.dense(dim, dim, ("embed", "heads"), **kwargs)
        self.to_v = layers.dense(dim, dim, ("embed", "heads"), **kwargs)
        self.to_out = layers.dense(dim, dim, ("heads", "embed"), **kwargs)
        self.norm_q = RMSNorm(dim, eps, param_dtype=param_dtype, rngs=rngs)
        self.norm_k = RMSNorm(dim, eps, param_dtype=param_dtype, rngs=rngs)
        if image_context_dim is None:
            self.add_k_proj = self.add_v_proj = self.norm_added_k = None
        else:
            self.add_k_proj = layers.dense(image_context_dim, dim, ("embed", "heads"), **kwargs)
            self.add_v_proj = layers.dense(image_context_dim, dim, ("embed", "heads"), **kwargs)
            self.norm_added_k = RMSNorm(dim, eps, param_dtype=param_dtype, rngs=rngs)

    def _split_heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(x.shape[:-1] + (self.num_heads, -1))

    def __call__(self, x: jax.Array, context: jax.Array | None = None, image_context: jax.Array | None = None,
                 rotary: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        """Self-attention of x (B, N, D) (context None) or cross-attention to context (B, L, D)."""
        context = x if context is None else context
        query = self._split_heads(self.norm_q(self.to_q(x)))
        key = self._split_heads(self.norm_k(self.to_k(context)))
        value = self._split_heads(self.to_v(context))
        if rotary is not None:
            query, key = apply_rotary(query, *rotary), apply_rotary(key, *rotary)
        attended = attention(query, key, value, implementation=self.implementation)
        if image_context is not None:
            if self.add_k_proj is None:
                raise ValueError("image tokens given to a model without image K/V projections (added_kv_proj_dim)")
            image_key = self._split_heads(self.norm_added_k(self.add_k_proj(image_context)))
            image_value = self._split_heads(self.add_v_proj(image_context))
            attended = attended + attention(query, image_key, image_value, implementation=self.implementation)
        return self.to_out(attended.reshape(x.shape[:-1] + (-1,)))


class WanBlock(nnx.Module):
    """diffusers' `WanTransformerBlock`.

    Modulations = `scale_shift_table` (1, 6, D) + the block's input `timestep_proj`, in float32:
    x += gate · self_attention(LN(x)·(1 + scale) + shift); x += cross_attention(LN'(x)) (LN' is
    an affine LayerNorm if `cross_attn_norm`, else nothing); x += gate' · FFN(LN(x)·(1 + scale')
    + shift'). The residual updates are float32 and cast back to the stream's dtype.
    """

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, *, eps: float, cross_attn_norm: bool,
                 image_context_dim: int | None, attention_implementation: str | None, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        attention_kwargs = dict(eps=eps, implementation=attention_implementation, **kwargs)
        self.norm1 = fp32_layer_norm(dim, eps, affine=False, param_dtype=param_dtype, rngs=rngs)
        self.attn1 = WanAttention(dim, num_heads, **attention_kwargs)
        self.norm2 = (fp32_layer_norm(dim, eps, affine=True, param_dtype=param_dtype, rngs=rngs)
                      if cross_attn_norm else None)
        self.attn2 = WanAttention(dim, num_heads, image_context_dim=image_context_dim, **attention_kwargs)
        self.norm3 = fp32_layer_norm(dim, eps, affine=False, param_dtype=param_dtype, rngs=rngs)
        self.ffn = Mlp(dim, ffn_dim, dim, "gelu_tanh", **kwargs)
        self.scale_shift_table = nnx.Param(layers.partitioned(nnx.initializers.normal(dim**-0.5), None, None, "embed")(
            rngs.params(), (1, NUM_MODULATIONS, dim), param_dtype))

    def __call__(self, x: jax.Array, context: jax.Array, image_context: jax.Array | None, timestep_proj: jax.Array,
                 rotary: tuple[jax.Array, jax.Array]) -> jax.Array:
        """x (B, N, D); timestep_proj (B, T, 6, D) with T = 1 or N; rotary tables (N, head_dim)."""
        x = constrain(x, BATCH_TOKENS)
        modulation = self.scale_shift_table[...].astype(jnp.float32)[None] + timestep_proj.astype(jnp.float32)
        shift, scale, gate, ffn_shift, ffn_scale, ffn_gate = (modulation[:, :, i] for i in range(NUM_MODULATIONS))
        stream = x.dtype

        normed = (self.norm1(x.astype(jnp.float32)) * (1 + scale) + shift).astype(stream)
        x = (x.astype(jnp.float32) + self.attn1(normed, rotary=rotary) * gate).astype(stream)

        normed = x if self.norm2 is None else self.norm2(x.astype(jnp.float32)).astype(stream)
        x = x + self.attn2(normed, context, image_context)

        normed = (self.norm3(x.astype(jnp.float32)) * (1 + ffn_scale) + ffn_shift).astype(stream)
        return constrain((x.astype(jnp.float32) + self.ffn(normed).astype(jnp.float32) * ffn_gate).astype(stream),
                         BATCH_TOKENS)


class PatchEmbedding(nnx.Module):
    """Conv3d with kernel = stride = patch (pt, ph, pw): one matmul over each patch's pixels.

    The kernel is (pt, ph, pw, C, D) (PyTorch's (D, C, pt, ph, pw) with the output features last).
    """

    def __init__(self, in_channels: int, dim: int, patch_size: tuple[int, int, int], *, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.patch_size = patch_size
        self.dtype = dtype
        kernel_init = layers.partitioned(nnx.initializers.lecun_normal(), None, None, None, "channels", "embed")
        self.kernel = nnx.Param(kernel_init(rngs.params(), (*patch_size, in_channels, dim), param_dtype))
        self.bias = nnx.Param(layers.partitioned(nnx.initializers.zeros_init(), "embed")(
            rngs.params(), (dim,), param_dtype))

    def __call__(self, video: jax.Array) -> jax.Array:
        """video (B, F, H, W, C) -> tokens (B, F', H', W', D), F' = F / pt etc."""
        batch, frames, height, width, channels = video.shape
        pt, ph, pw = self.patch_size
        if frames % pt or height % ph or width % pw:
            raise ValueError(f"video of {frames} frames of {height}x{width} is not divisible into patches "
                             f"{self.patch_size}")
        patches = video.reshape(batch, frames // pt, pt, height // ph, ph, width // pw, pw, channels)
        tokens = jnp.einsum("bftyhxwc,thwcd->bfyxd", patches.astype(self.dtype), self.kernel[...].astype(self.dtype))
        return tokens + self.bias[...].astype(self.dtype)


class ImageEmbedder(nnx.Module):
    """diffusers' `WanImageEmbedding`: CLIP image tokens -> LayerNorm, Linear, GELU, Linear, LayerNorm.

    With `pos_embed_seq_len` (first-last-frame models) the tokens of consecutive image pairs are
    joined into one sequence of 2·257 and a learned position embedding is added first.
    """

    def __init__(self, image_dim: int, dim: int, pos_embed_seq_len: int | None, *, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        norm_kwargs = dict(affine=True, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = fp32_layer_norm(image_dim, IMAGE_EMBEDDER_EPS, **norm_kwargs)
        self.ff = Mlp(image_dim, image_dim, dim, "gelu", dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm2 = fp32_layer_norm(dim, IMAGE_EMBEDDER_EPS, **norm_kwargs)
        self.pos_embed = None if pos_embed_seq_len is None else nnx.Param(
            layers.partitioned(nnx.initializers.zeros_init(), None, "tokens", "embed")(
                rngs.params(), (1, pos_embed_seq_len, image_dim), param_dtype))

    def __call__(self, image_tokens: jax.Array) -> jax.Array:
        if self.pos_embed is not None:
            _, num_tokens, width = image_tokens.shape
            image_tokens = image_tokens.reshape(-1, 2 * num_tokens, width) + self.pos_embed[...].astype(
                image_tokens.dtype)
        stream = image_tokens.dtype
        hidden = self.ff(self.norm1(image_tokens.astype(jnp.float32)).astype(stream))
        return self.norm2(hidden.astype(jnp.float32)).astype(hidden.dtype)


class Conditions(NamedTuple):
    """What the condition embedder gives the blocks (T = 1 for a timestep per example, N per token)."""

    temb: jax.Array  # (B, T, D), compute dtype: the output head's modulation input
    timestep_proj: jax.Array  # (B, T, 6, D): the blocks' modulation inputs
    context: jax.Array  # (B, L, D): projected text tokens
    image_context: jax.Array | None  # (B, 257, D): projected image tokens (image-to-video), else None


class ConditionEmbedder(nnx.Module):
    """diffusers' `WanTimeTextImageEmbedding`.

    The time path is two steps so that other conditions (e.g. a camera embedding) can be added
    to temb before the modulations are derived from it: `embed_time` (sinusoid -> MLP, in float32
    as diffusers keeps `time_embedder` in float32) and `modulations` (SiLU -> Linear to 6·D).
    """

    def __init__(self, dim: int, freq_dim: int, text_dim: int, image_dim: int | None,
                 pos_embed_seq_len: int | None, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.freq_dim = freq_dim
        self.dtype = dtype
        self.time_embedder = Mlp(freq_dim, dim, dim, "silu", dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)
        self.time_proj = layers.dense(dim, NUM_MODULATIONS * dim, ("embed", "mlp"), **kwargs)
        self.text_embedder = Mlp(text_dim, dim, dim, "gelu_tanh", **kwargs)
        self.image_embedder = None if image_dim is None else ImageEmbedder(image_dim, dim, pos_embed_seq_len,
                                                                            **kwargs)

    def embed_time(self, timestep: jax.Array) -> jax.Array:
        """timestep (B, T) -> temb (B, T, D) in the compute dtype."""
        return self.time_embedder(timestep_sinusoid(timestep, self.freq_dim)).astype(self.dtype)

    def modulations(self, temb: jax.Array) -> jax.Array:
        """temb (B, T, D) -> timestep_proj (B, T, 6, D)."""
        projected = self.time_proj(jax.nn.silu(temb))
        return projected.reshape(projected.shape[:-1] + (NUM_MODULATIONS, -1))

    def __call__(self, timestep: jax.Array, text: jax.Array, image: jax.Array | None = None,
                 temb_offset: jax.Array | None = None) -> Conditions:
        if image is not None and self.image_embedder is None:
            raise ValueError("image tokens given to a model without an image embedder (image_dim)")
        temb = self.embed_time(timestep)
        if temb_offset is not None:  # another condition (a camera), added before the modulations
            temb = temb + temb_offset.astype(temb.dtype)
        return Conditions(
            temb=temb,
            timestep_proj=self.modulations(temb),
            context=self.text_embedder(text),
            image_context=None if image is None else self.image_embedder(image),
        )


# ----------------------------------------------------------------------------------------------
# The model.


def check_model_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError for a `config.model` this implementation (or diffusers) cannot build."""
    if config.qk_norm != QK_NORM:
        raise ValueError(f"qk_norm {config.qk_norm!r} is not supported: diffusers' Wan blocks always use {QK_NORM!r}")
    if (config.image_dim is None) != (config.added_kv_proj_dim is None):
        raise ValueError(f"image_dim ({config.image_dim}) and added_kv_proj_dim ({config.added_kv_proj_dim}) must "
                         f"be set together (image-to-video) or both be None")
    if config.attention_head_dim % 2:
        raise ValueError(f"attention_head_dim {config.attention_head_dim} must be even (rotary pairs)")
    if config.attention_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"unknown attention_implementation {config.attention_implementation!r}; "
                         f"known: {ATTENTION_IMPLEMENTATIONS}")
    if len(config.patch_size) != 3:
        raise ValueError(f"patch_size {config.patch_size} must be (frames, height, width)")


class WanTransformer(nnx.Module):
    """diffusers' `WanTransformer3DModel`; `config` is a `config.model` of configs/mvdiffusion.py.

    Submodules keep diffusers' names (`patch_embedding`, `condition_embedder`, `blocks`,
    `proj_out`, `scale_shift_table`); the blocks are stacked on a leading "layers" axis and run
    as one `nnx.scan`, rematerialised by the policy `config.remat`.
    """

    def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        check_model_config(config)
        dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        dim = config.num_attention_heads * config.attention_head_dim
        self.patch_size = tuple(config.patch_size)
        self.head_dim = config.attention_head_dim
        self.out_channels = config.out_channels or config.in_channels
        self.rope_max_seq_len = config.rope_max_seq_len
        self.remat = config.remat
        self.dtype = dtype
        self.patch_embedding = PatchEmbedding(config.in_channels, dim, self.patch_size, **kwargs)
        self.condition_embedder = ConditionEmbedder(dim, config.freq_dim, config.text_dim, config.image_dim,
                                                    config.pos_embed_seq_len, **kwargs)
        self.blocks = layers.stack_layers(
            lambda layer_rngs: WanBlock(
                dim, config.ffn_dim, config.num_attention_heads, eps=config.eps,
                cross_attn_norm=config.cross_attn_norm, image_context_dim=config.added_kv_proj_dim,
                attention_implementation=config.attention_implementation, dtype=dtype, param_dtype=param_dtype,
                rngs=layer_rngs),
            config.num_layers, rngs)
        self.norm_out = fp32_layer_norm(dim, config.eps, affine=False, param_dtype=param_dtype, rngs=rngs)
        self.proj_out = layers.dense(dim, self.out_channels * math.prod(self.patch_size), ("embed", "channels"),
                                     **kwargs)
        self.scale_shift_table = nnx.Param(layers.partitioned(nnx.initializers.normal(dim**-0.5), None, None, "embed")(
            rngs.params(), (1, 2, dim), param_dtype))

    def token_grid(self, video_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """Patch grid (F', H', W') of a channels-last video shape (B, F, H, W, C)."""
        grid = tuple(size // patch for size, patch in zip(video_shape[1:4], self.patch_size, strict=True))
        if max(grid) > self.rope_max_seq_len:
            raise ValueError(f"token grid {grid} exceeds the rotary tables' {self.rope_max_seq_len} positions "
                             f"(rope_max_seq_len)")
        return grid

    def embed_conditions(self, timestep: jax.Array, encoder_hidden_states: jax.Array,
                         encoder_hidden_states_image: jax.Array | None = None, *, num_tokens: int,
                         temb_offset: jax.Array | None = None) -> Conditions:
        """Timestep (), (B,) or per token (B, num_tokens); text (B, L, text_dim); image tokens (B, 257, image_dim);
        `temb_offset` (B, 1 or num_tokens, D) is added to the time embedding (a zero offset changes nothing)."""
        batch = encoder_hidden_states.shape[0]
        timestep = jnp.asarray(timestep)
        if timestep.ndim == 0:
            timestep = jnp.broadcast_to(timestep, (batch,))
        if timestep.ndim == 1:
            timestep = timestep[:, None]  # one timestep per example is one shared by all its tokens
        elif timestep.ndim != 2 or timestep.shape[1] != num_tokens:
            raise ValueError(f"timesteps of shape {timestep.shape}: expected (), ({batch},) or per token "
                             f"({batch}, {num_tokens})")
        image = None if encoder_hidden_states_image is None else encoder_hidden_states_image.astype(self.dtype)
        return self.condition_embedder(timestep, encoder_hidden_states.astype(self.dtype), image, temb_offset)

    def output_norm(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        """The final adaLN: shift, scale = `scale_shift_table` + temb, in float32; proj_out's input."""
        modulation = self.scale_shift_table[...].astype(jnp.float32)[None] + temb.astype(jnp.float32)[:, :, None]
        shift, scale = modulation[:, :, 0], modulation[:, :, 1]
        return (self.norm_out(x.astype(jnp.float32)) * (1 + scale) + shift).astype(x.dtype)

    def unpatchify(self, patches: jax.Array, grid: tuple[int, int, int]) -> jax.Array:
        """(B, N, pt·ph·pw·C) -> (B, F, H, W, C); each token's features are (pt, ph, pw, C), C fastest."""
        (frames, height, width), (pt, ph, pw) = grid, self.patch_size
        video = patches.reshape(patches.shape[0], frames, height, width, pt, ph, pw, -1)
        video = video.transpose(0, 1, 4, 2, 5, 3, 6, 7)
        return video.reshape(patches.shape[0], frames * pt, height * ph, width * pw, -1)

    def __call__(self, video: jax.Array, timestep: jax.Array, encoder_hidden_states: jax.Array,
                 encoder_hidden_states_image: jax.Array | None = None, *, temb_offset: jax.Array | None = None,
                 return_intermediates: bool = False) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        """The model's prediction (B, F, H, W, C_out) for a channels-last video (B, F, H, W, C_in).

        `temb_offset` (B, 1 or N, D), e.g. a per-token camera embedding, is added to the time
        embedding before the modulations are derived from it.

        With `return_intermediates`, also a dict: `patch_embedding` (B, F', H', W', D),
        `rotary_cos` and `rotary_sin` (N, head_dim), `temb` (B, T, D), `timestep_proj`
        (B, T, 6, D), `context`, `image_context` (None without image tokens), `blocks`
        (L, B, N, D) (every block's output), `norm_out` (B, N, D) and `proj_out` (B, N, pt·ph·pw·C).
        """
        grid = self.token_grid(video.shape)
        patches = self.patch_embedding(video)
        tokens = patches.reshape(patches.shape[0], -1, patches.shape[-1])
        rotary = rotary_tables(self.head_dim, grid)
        conditions = self.embed_conditions(timestep, encoder_hidden_states, encoder_hidden_states_image,
                                           num_tokens=tokens.shape[1], temb_offset=temb_offset)
        x, block_outputs = layers.scan_layers(
            self.blocks, tokens,
            lambda block, h: block(h, conditions.context, conditions.image_context, conditions.timestep_proj, rotary),
            remat=self.remat, return_layer_outputs=return_intermediates)
        normed = self.output_norm(x, conditions.temb)
        projected = self.proj_out(normed)
        prediction = self.unpatchify(projected, grid)
        if not return_intermediates:
            return prediction
        intermediates = dict(patch_embedding=patches, rotary_cos=rotary[0], rotary_sin=rotary[1],
                             blocks=block_outputs, norm_out=normed, proj_out=projected, **conditions._asdict())
        return prediction, intermediates

    def forward_diffusers(self, hidden_states: jax.Array, timestep: jax.Array, encoder_hidden_states: jax.Array,
                          encoder_hidden_states_image: jax.Array | None = None, *, return_intermediates: bool = False
                          ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        """diffusers' `WanTransformer3DModel.forward` on its own layouts: hidden_states (B, C, F, H, W) -> output
        (B, C_out, F, H, W).

        With `return_intermediates`, also the outputs of diffusers' submodules, in diffusers'
        shapes: `patch_embedding` (B, D, F', H', W') (the Conv3d's), `rotary_cos`, `rotary_sin`
        (1, N, 1, head_dim) (`rope`'s), the condition embedder's `condition_temb` (B, D) or
        (B, N, D), `condition_timestep_proj` (B, 6·D) or (B, N, 6·D),
        `condition_encoder_hidden_states` and `condition_encoder_hidden_states_image`
        (image-to-video), `block_<i>` (B, N, D) (block i's), `norm_out` (B, N, D) (proj_out's
        input) and `proj_out` (B, N, pt·ph·pw·C_out).
        """
        outputs = self(jnp.moveaxis(hidden_states, 1, -1), timestep, encoder_hidden_states,
                       encoder_hidden_states_image, return_intermediates=return_intermediates)
        if not return_intermediates:
            return jnp.moveaxis(outputs, -1, 1)
        prediction, ours = outputs
        per_token = jnp.ndim(timestep) == 2
        temb, timestep_proj = ours["temb"], ours["timestep_proj"]
        timestep_proj = timestep_proj.reshape(timestep_proj.shape[:2] + (-1,))
        intermediates = {
            "patch_embedding": jnp.moveaxis(ours["patch_embedding"], -1, 1),
            "rotary_cos": ours["rotary_cos"][None, :, None],
            "rotary_sin": ours["rotary_sin"][None, :, None],
            "condition_temb": temb if per_token else temb[:, 0],
            "condition_timestep_proj": timestep_proj if per_token else timestep_proj[:, 0],
            "condition_encoder_hidden_states": ours["context"],
        }
        if ours["image_context"] is not None:
            intermediates["condition_encoder_hidden_states_image"] = ours["image_context"]
        intermediates.update({f"block_{i}": output for i, output in enumerate(ours["blocks"])})
        intermediates.update(norm_out=ours["norm_out"], proj_out=ours["proj_out"])
        return jnp.moveaxis(prediction, -1, 1), intermediates


def abstract_wan_transformer(config: ml_collections.ConfigDict) -> WanTransformer:
    """The WanTransformer of `config` (a `config.model`) with shapes only: nothing is allocated."""
    return nnx.eval_shape(lambda: WanTransformer(config, rngs=nnx.Rngs(0)))


def count_parameters(config: ml_collections.ConfigDict) -> int:
    """Number of parameters of the WanTransformer of `config` (a `config.model`), without allocating them."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract_wan_transformer(config), nnx.Param)))
