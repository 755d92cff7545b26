"""Shared NNX layers of the ViT encoder and the triplane transformer, and layer stacking.

Numerics follow the official PyTorch modules: LayerNorm with eps 1e-6 and a two-pass
variance, GELU in its exact erf form, multi-head attention with heads split along the
feature axis (head h = features h*d .. (h+1)*d - 1) and scores scaled by 1/sqrt(d).

Every parameter carries logical axis names (`out_sharding` metadata); the config's
`mesh.logical_rules` map them to mesh axes (see `vfusion3d_jax.train.sharding`). The names:

    layers    the stacked-layer axis of a scanned layer stack (never sharded)
    embed     model width: the residual stream of the encoder and of the triplane transformer
    mlp       hidden width of the MLPs
    heads     attention projections (num_heads x head_dim, heads outermost)
    cond      width of the camera embedding that conditions the adaLN modulation
    tokens    token axes of learned embeddings (position embeddings, triplane tokens)
    channels  small pixel/channel axes (patch pixels, triplane channels)

The names are metadata only (`eager_sharding=False`): creating a model never needs a mesh
or rules, and a trainer places the state by deriving shardings from the names (shape first
with `nnx.eval_shape`, then a jitted init with `out_shardings`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vfusion3d_jax.partitioning import constrain

LOGICAL_AXES = ("layers", "embed", "mlp", "heads", "cond", "tokens", "channels")
LAYER_AXIS = "layers"
LAYER_NORM_EPS = 1e-6
# A token stream (N, T, D) split by example over the mesh's batch axes (`scan_layers`' stream_axes).
BATCH_TOKENS = ("act_batch", None, None)
_EMBED_METADATA = {"out_sharding": ("embed",), "eager_sharding": False}

# Rematerialisation per scanned layer, by name ("none" keeps every activation).
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

Dtype = Any


def partitioned(init: nnx.Initializer, *names: str | None) -> nnx.Initializer:
    """`init` whose parameters carry the logical axis `names` (not applied at creation; see above)."""
    return nnx.with_partitioning(init, names, eager_sharding=False)


def dense(in_features: int, out_features: int, axes: tuple[str | None, str | None], *, use_bias: bool = True,
          dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs) -> nnx.Linear:
    """nnx.Linear (kernel (in, out), LeCun-normal init); logical axes `axes` on the kernel, `axes[1]` on the bias."""
    return nnx.Linear(
        in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=partitioned(nnx.initializers.lecun_normal(), *axes),
        bias_init=partitioned(nnx.initializers.zeros_init(), axes[1]), rngs=rngs)


def layer_norm(dim: int, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm over the last axis, eps 1e-6, two-pass variance as in PyTorch."""
    return nnx.LayerNorm(
        dim, epsilon=LAYER_NORM_EPS, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype,
        scale_metadata=_EMBED_METADATA, bias_metadata=_EMBED_METADATA, rngs=rngs)


class Attention(nnx.Module):
    """Multi-head attention with separate query/key/value projections and an output projection.

    `__call__(x)` is self-attention; `__call__(x, context)` cross-attends to `context`, whose
    width is `context_dim`; `mask` (batch, context tokens) bool, if given, hides the tokens where it
    is False from every query (padding). PyTorch's fused `in_proj` of `nn.MultiheadAttention` is
    the concatenation [Wq; Wk; Wv] of these projections.
    """

    def __init__(self, dim: int, num_heads: int, *, context_dim: int | None = None, use_bias: bool,
                 implementation: str | None = None, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        context_dim = context_dim or dim
        kwargs = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads = num_heads
        self.implementation = implementation
        self.query = dense(dim, dim, ("embed", "heads"), **kwargs)
        self.key = dense(context_dim, dim, ("embed", "heads"), **kwargs)
        self.value = dense(context_dim, dim, ("embed", "heads"), **kwargs)
        self.out = dense(dim, dim, ("heads", "embed"), **kwargs)

    def __call__(self, x: jax.Array, context: jax.Array | None = None, mask: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context

        def split_heads(y: jax.Array) -> jax.Array:
            return y.reshape(y.shape[:-1] + (self.num_heads, -1))

        q, k, v = split_heads(self.query(x)), split_heads(self.key(context)), split_heads(self.value(context))
        # (batch, tokens, heads, head_dim); softmax runs in float32 whatever the compute dtype.
        # A key mask broadcasts to the (batch, heads, queries, keys) layout of the scores.
        mask = None if mask is None else mask[:, None, None, :]
        attended = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=self.implementation)
        return self.out(attended.reshape(x.shape[:-1] + (-1,)))


class Mlp(nnx.Module):
    """Linear -> GELU (exact erf form) -> Linear."""

    def __init__(self, dim: int, hidden_dim: int, *, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = dense(dim, hidden_dim, ("embed", "mlp"), **kwargs)
        self.fc2 = dense(hidden_dim, dim, ("mlp", "embed"), **kwargs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class ModLN(nnx.Module):
    """adaLN "ModLN": LN(x) * (1 + scale) + shift, [shift, scale] = Linear(SiLU(cond)), shift first."""

    def __init__(self, dim: int, cond_dim: int, *, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.norm = layer_norm(dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.modulation = dense(cond_dim, 2 * dim, ("cond", "embed"), dtype=dtype, param_dtype=param_dtype,
                                rngs=rngs)

    def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
        """x (batch, tokens, dim), cond (batch, cond_dim)."""
        shift, scale = jnp.split(self.modulation(jax.nn.silu(cond))[:, None, :], 2, axis=-1)
        return self.norm(x) * (1 + scale) + shift


def stack_layers(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
    """`num_layers` independently initialised layers, every parameter stacked on a leading "layers" axis."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYER_AXIS})
    def make(layer_rngs: nnx.Rngs) -> nnx.Module:
        return make_layer(layer_rngs)

    return make(rngs)


def scan_layers(layers: nnx.Module, x: jax.Array, apply: Callable[[nnx.Module, jax.Array], jax.Array], *,
                remat: str = "none", return_layer_outputs: bool = False,
                stream_axes: tuple[str | None, ...] | None = None) -> tuple[jax.Array, jax.Array | None]:
    """Runs `x = apply(layer, x)` through a stack made by `stack_layers`, as one `lax.scan`.

    One traced layer keeps compile time flat in depth. `remat` names a rematerialisation
    policy of `REMAT_POLICIES`, applied per layer. `stream_axes` (e.g. `BATCH_TOKENS`) places
    the carried stream, before and after every layer: a stream that starts as a parameter
    broadcast over the batch (the LRM's triplane tokens) is otherwise computed whole, every
    example on every device. Returns the output and, if asked, every layer's output stacked
    (layers, *x.shape).
    """

    def place(stream: jax.Array) -> jax.Array:
        return stream if stream_axes is None else constrain(stream, stream_axes)

    def body(carry: jax.Array, layer: nnx.Module) -> tuple[jax.Array, jax.Array | None]:
        carry = place(apply(layer, carry))
        return carry, carry if return_layer_outputs else None

    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; known: {sorted(REMAT_POLICIES)}")
    if remat != "none":
        body = nnx.remat(body, policy=REMAT_POLICIES[remat])
    return nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))(place(x), layers)
