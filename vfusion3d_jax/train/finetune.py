"""Fine-tuning a pretrained model: which parameters train, LoRA adapters, and EMA weights.

VFusion3D fine-tuned only part of its video model; the modes here (`config.train.finetune`,
defaults in `finetune_config`) are:

    full    every `nnx.Param` trains;
    filter  only the parameters whose '/'-joined path (`blocks/attn1/to_q/kernel`) matches one
            of the `trainable` regexes (`re.search`) train; the rest are frozen;
    lora    low-rank adapters are added to the attention projections (`lora.targets`, regexes
            on module paths) and train, with any parameters matched by `trainable` (e.g. a
            newly added, zero-initialised camera embedding); the base weights are frozen.

Frozen parameters are simply outside the trainable filter: the optimiser allocates no state for
them and never touches them, and no gradient is computed for them. A trainer uses the filter
in three places:

    wrt = finetune.trainable_filter(config.train.finetune)
    model = finetune.apply_finetuning(Model(...), config.train.finetune, rngs=nnx.Rngs(seed))
    tx = optimizer.make_optimizer(config.train.optimizer, total_steps, nnx.state(model, wrt))
    opt = nnx.Optimizer(model, tx, wrt=wrt)
    ... nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model); opt.update(model, grads)

Both `apply_finetuning` and the optimiser are traceable, so the shape-first construction
(`nnx.eval_shape`, shardings from the logical axis names, jitted init) works unchanged.

LoRA (Hu et al. 2021): y = x·W + b + (alpha/r)·x·A·B with A (in, r) and B (r, out); B starts
at zero, so an adapted model computes exactly what the pretrained one did. `LoRALinear` is an
`nnx.Linear` that keeps the base layer's kernel and bias under their own names, so the adapted
model's `nnx.state(model, nnx.Not(LoRAParam))` has the pretrained model's structure (a base
checkpoint restores into it as is). In a scanned layer stack (`layers.stack_layers`) A and B are
stacked on the same leading "layers" axis as the kernel, and carry the kernel's logical axis
names (the rank axis is never sharded), so the config's mesh rules place them. `merge_lora`
folds the adapters into the kernels and gives back plain `nnx.Linear` layers, for export.

EMA: `ema_update` is a pure function of (EMA, parameters) pytrees, for the trainer's jitted step.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from flax.nnx import filterlib

from vfusion3d_jax import errors

# Flax's own LoRA parameter type (a subclass of nnx.Param): `wrt=LoRAParam` trains the adapters
# alone, and `nnx.Not(LoRAParam)` selects the base model's parameters.
LoRAParam = nnx.LoRAParam

FINETUNE_MODES = ("full", "filter", "lora")
# Module paths of the attention q/k/v/output projections: the Wan blocks' (attn1 self-, attn2
# cross-attention) and the LRM/ViT `layers.Attention`s (self_attention, cross_attention, attention).
DEFAULT_LORA_TARGETS = (
    r"(^|/)attn\d+/(to_q|to_k|to_v|to_out)$",
    r"(^|/)\w*attention/(query|key|value|out)$",
)
# PEFT's A initialisation (kaiming_uniform with a = sqrt(5)): uniform in ±1/sqrt(fan_in).
_LORA_A_VARIANCE_SCALE = 1.0 / 3.0


def finetune_config() -> ml_collections.ConfigDict:
    """The defaults of `config.train.finetune`: full fine-tuning."""
    return ml_collections.ConfigDict(dict(
        # "full", "filter" or "lora" (see the module docstring).
        mode="full",
        # Regexes on '/'-joined parameter paths that train ("filter": these alone; "lora": these
        # besides the adapters). Anchor them (`^blocks/`, `/kernel$`) to avoid matching too much.
        trainable=(),
        lora=dict(
            rank=16,
            # The adapter's output is scaled by alpha / rank, so the rank can change without
            # retuning the learning rate.
            alpha=16.0,
            # Regexes on '/'-joined module paths of the nnx.Linear layers to adapt.
            targets=DEFAULT_LORA_TARGETS,
        ),
    ))


def path_string(path: tuple[Any, ...]) -> str:
    """An NNX path ('blocks', 'attn1', 'to_q', 'kernel') as 'blocks/attn1/to_q/kernel'."""
    return "/".join(str(part) for part in path)


# --------------------------------------------------------------------------- parameter filters


@dataclasses.dataclass(frozen=True)
class PathRegex:
    """An NNX filter: the variables whose '/'-joined path matches one of `patterns` (`re.search`).

    Frozen (hashable), so it can be the static `wrt` of `nnx.Optimizer` and `nnx.DiffState`.
    """

    patterns: tuple[str, ...]

    def __post_init__(self):
        for pattern in self.patterns:
            try:
                re.compile(pattern)
            except re.error as error:
                raise errors.InvalidConfigValueError(f"path regex {pattern!r} is invalid: {error}") from None

    def __call__(self, path: tuple[Any, ...], variable: Any) -> bool:
        name = path_string(path)
        return any(re.search(pattern, name) for pattern in self.patterns)


def trainable_filter(config: ml_collections.ConfigDict) -> filterlib.Filter:
    """The NNX filter of the parameters that train under `config` (a `config.train.finetune`).

    Use it as `nnx.Optimizer(..., wrt=...)`, `nnx.DiffState(0, ...)` and `nnx.state(model, ...)`.
    """
    _check_mode(config)
    patterns = tuple(config.trainable)
    if config.mode == "full":
        if patterns:
            raise errors.InvalidConfigValueError(
                f"finetune.trainable {patterns} is set but finetune.mode is 'full' (every parameter trains); "
                "set --config.train.finetune.mode=filter to train only those")
        return nnx.Param
    selected = nnx.All(nnx.Param, PathRegex(patterns))
    if config.mode == "filter":
        if not patterns:
            raise errors.InvalidConfigValueError(
                "finetune.mode is 'filter' but finetune.trainable is empty: nothing would train")
        return selected
    return nnx.Any(LoRAParam, selected) if patterns else LoRAParam


def apply_finetuning(model: nnx.Module, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> nnx.Module:
    """Prepares `model` for `config` (a `config.train.finetune`): adds the LoRA adapters in "lora" mode
    and checks that every `trainable` regex selects a parameter (a typo would silently freeze it).

    Changes `model` in place and returns it; traceable (works under `nnx.eval_shape`).
    """
    _check_mode(config)
    if config.mode == "lora":
        add_lora(model, rank=config.lora.rank, alpha=config.lora.alpha, targets=tuple(config.lora.targets),
                 rngs=rngs)
    paths = [path_string(path) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    for pattern in config.trainable:
        if not any(re.search(pattern, path) for path in paths):
            raise errors.InvalidConfigValueError(
                f"finetune.trainable regex {pattern!r} matches no parameter of {type(model).__name__}; "
                f"its parameter paths look like {paths[:3]}")
    return model


def _check_mode(config: ml_collections.ConfigDict) -> None:
    if config.mode not in FINETUNE_MODES:
        raise errors.InvalidConfigValueError(
            f"finetune.mode {config.mode!r} is unknown; choose one of {FINETUNE_MODES}")


# --------------------------------------------------------------------------- LoRA


class LoRALinear(nnx.Linear):
    """An `nnx.Linear` plus a low-rank update: y = x·W + b + scale·(x·A)·B, scale = alpha / rank.

    Built around an existing layer (whose kernel and bias Variables it takes over, under the same
    names), never from scratch. The kernel may carry leading stacked-layer axes (L, in, out): A and
    B then have them too, and inside the `nnx.scan` of the stack each call sees one layer's slice.
    """

    def __init__(self, base: nnx.Linear, *, rank: int, alpha: float, rngs: nnx.Rngs):
        if rank < 1:
            raise errors.InvalidConfigValueError(f"LoRA rank must be at least 1, got {rank}")
        # Take over the base layer's fields (Variables shared, not copied): same paths, same behaviour.
        for name, value in vars(base).items():
            if not name.startswith("_pytree__"):
                setattr(self, name, value)
        self.lora_scale = float(alpha) / rank
        kernel = base.kernel
        stack_shape, (in_features, out_features) = kernel.shape[:-2], kernel.shape[-2:]
        stack_axes = tuple(range(len(stack_shape)))
        a_init = nnx.initializers.variance_scaling(_LORA_A_VARIANCE_SCALE, "fan_in", "uniform",
                                                   in_axis=-2, out_axis=-1, batch_axis=stack_axes)
        a_metadata, b_metadata = _adapter_metadata(kernel)
        self.lora_a = LoRAParam(a_init(rngs.params(), stack_shape + (in_features, rank), kernel.dtype), **a_metadata)
        self.lora_b = LoRAParam(jnp.zeros(stack_shape + (rank, out_features), kernel.dtype), **b_metadata)

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        outputs = super().__call__(inputs, out_sharding=out_sharding)
        x, lora_a, lora_b = self.promote_dtype((inputs, self.lora_a[...], self.lora_b[...]), dtype=self.dtype)
        return outputs + ((x @ lora_a) @ lora_b * self.lora_scale).astype(outputs.dtype)


def _adapter_metadata(kernel: nnx.Variable) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sharding metadata of A and B from the kernel's: (..., in, None) and (..., None, out) logical axes."""
    metadata = kernel.get_metadata()
    axes = metadata.get("out_sharding")
    if not axes:
        return {}, {}
    extra = {"eager_sharding": metadata["eager_sharding"]} if "eager_sharding" in metadata else {}
    *stack_axes, in_axis, out_axis = axes
    return (dict(out_sharding=(*stack_axes, in_axis, None), **extra),
            dict(out_sharding=(*stack_axes, None, out_axis), **extra))


def add_lora(model: nnx.Module, *, rank: int, alpha: float, targets: Sequence[str] = DEFAULT_LORA_TARGETS,
             rngs: nnx.Rngs) -> nnx.Module:
    """Replaces every `nnx.Linear` of `model` whose '/'-joined module path matches one of `targets`
    (`re.search`) by a `LoRALinear` around it; in place, returns `model`.

    Raises if nothing matches (a misspelt target, or a model that is adapted already).
    """
    path_filter = PathRegex(tuple(targets))
    matches = [(path, node) for path, node in nnx.iter_graph(model)
               if path and type(node) is nnx.Linear and path_filter(path, node)]
    if not matches:
        raise errors.InvalidConfigValueError(
            f"LoRA targets {tuple(targets)} match no nnx.Linear of {type(model).__name__} "
            "(not yet adapted); set finetune.lora.targets to regexes of module paths such as 'attn1/to_q'")
    for path, linear in matches:
        _replace_node(model, path, LoRALinear(linear, rank=rank, alpha=alpha, rngs=rngs))
    return model


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Folds every adapter into its kernel, W ← W + (alpha/r)·A·B, and puts back a plain `nnx.Linear`.

    In place, returns `model`, whose parameters then have the pretrained model's structure (for
    export). The product is computed in float32 at full precision and rounded once to W's dtype.
    """
    for path, adapted in [(path, node) for path, node in nnx.iter_graph(model) if isinstance(node, LoRALinear)]:
        update = jnp.matmul(adapted.lora_a[...].astype(jnp.float32), adapted.lora_b[...].astype(jnp.float32),
                            precision=jax.lax.Precision.HIGHEST)
        kernel = adapted.kernel[...]
        adapted.kernel[...] = (kernel.astype(jnp.float32) + adapted.lora_scale * update).astype(kernel.dtype)
        # A plain Linear with the adapted layer's fields: built abstractly, so nothing is allocated.
        linear = nnx.eval_shape(lambda: nnx.Linear(1, 1, rngs=nnx.Rngs(0)))
        for name in vars(linear):
            if not name.startswith("_pytree__"):
                setattr(linear, name, getattr(adapted, name))
        _replace_node(model, path, linear)
    return model


def _replace_node(root: nnx.Module, path: tuple[Any, ...], node: nnx.Module) -> None:
    parent = root
    for key in path[:-1]:
        parent = getattr(parent, key) if isinstance(key, str) else parent[key]
    if isinstance(path[-1], str):
        setattr(parent, path[-1], node)
    else:
        parent[path[-1]] = node


# --------------------------------------------------------------------------- EMA


def ema_decay(step: jax.Array | int, decay: float) -> jax.Array:
    """The warmed-up decay at `step` (0-based): min(decay, (1 + step) / (10 + step)).

    Early on the average forgets fast (0.1 at step 0, 0.5 at step 8), so it is not dominated by
    the initial weights; later the configured decay takes over (as in diffusers' EMAModel and
    timm's ModelEmaV2 with warm-up).
    """
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))


def init_ema(params: Any) -> Any:
    """A fresh copy of `params` (e.g. `nnx.state(model, wrt)`) to start the average from.

    A copy, not the same buffers: the step donates the model state, which would invalidate the
    EMA if they were shared.
    """
    return jax.tree.map(jnp.copy, params)


def ema_update(ema_params: Any, params: Any, decay: float | jax.Array, *, step: jax.Array | int | None = None) -> Any:
    """One EMA step: ema ← ema − (1 − d)·(ema − params), with d = `decay`, or `ema_decay(step, decay)`
    when `step` is given.

    Pure and jit-friendly: `ema_params` and `params` are pytrees of the same structure (nnx.State
    of the trainable parameters, `nnx.state(model, wrt)`, or plain dicts); computed in float32,
    returned in the EMA's dtypes. Frozen parameters do not change, so averaging the trainable
    ones is enough; to sample with the average, `nnx.update(model, ema_params)`.
    """
    d = jnp.asarray(decay, jnp.float32) if step is None else ema_decay(step, decay)

    def update(average: jax.Array, value: jax.Array) -> jax.Array:
        average32 = average.astype(jnp.float32)
        return (average32 - (1.0 - d) * (average32 - value.astype(jnp.float32))).astype(average.dtype)

    return jax.tree.map(update, ema_params, params)
