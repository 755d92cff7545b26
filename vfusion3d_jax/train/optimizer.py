"""The optimiser: OpenLRM's public recipe, every number from `config.train.optimizer`.

AdamW (lr 4e-4, β = (0.9, 0.95), weight decay 0.05) after clipping the global
gradient norm to 1.0; the learning rate warms up linearly from 0 (3000 steps at
scale) and then follows a cosine to `final_lr_fraction` of its peak at the last
step of the last stage. One schedule spans all training stages, so a stage
boundary does not restart the warm-up.

Weight decay, as in OpenLRM (`openlrm/runners/train/lrm.py`): none on
normalisation parameters and biases, which we recognise by rank (< 2: LayerNorm
scales and offsets, all biases; a scanned layer stack's leading axis does not
count). Every matrix, convolution kernel, learned positional embedding and the
learned triplane tokens are decayed, as OpenLRM does: we keep its recipe rather
than the timm/ViT habit of exempting embeddings, which `no_decay_patterns`
provides when wanted (`("pos_embed",)`: any parameter whose path contains one
of the patterns is exempt).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import optax
from flax import nnx

from vfusion3d_jax.models.layers import LAYER_AXIS


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to `learning_rate`, then a cosine to `final_lr_fraction * learning_rate`."""
    warmup_steps = min(int(config.warmup_steps), max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=config.learning_rate * config.final_lr_fraction,
    )


def weight_decay_mask(params: nnx.State, no_decay_patterns: Sequence[str] = ()) -> nnx.State:
    """A tree like `params` (NNX Variables, abstract or not) of bools: True where weight decay applies.

    A parameter's rank is counted without its stacked-layer axis (the `"layers"`
    logical axis of scanned layer stacks), so a stacked bias is still a bias.
    """

    def decays(path: tuple[Any, ...], variable: nnx.Variable) -> bool:
        axes = variable.get_metadata().get("out_sharding") or ()
        rank = len(variable.get_value().shape) - sum(axis == LAYER_AXIS for axis in axes)
        name = jax.tree_util.keystr(path)
        return rank >= 2 and not any(pattern in name for pattern in no_decay_patterns)

    return jax.tree_util.tree_map_with_path(decays, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int,
                   params: nnx.State) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW with the masked weight decay and the warm-up + cosine schedule.

    `params` are the (abstract) parameters to optimise, with their metadata; the
    optimiser sees them as NNX Variables at init and as plain arrays in updates,
    in the same leaf order, so the mask is kept as that order's flat list.
    """
    decay_flags = jax.tree.leaves(weight_decay_mask(params, tuple(config.no_decay_patterns)))

    def mask(tree: Any) -> Any:
        structure = jax.tree.structure(tree)
        if structure.num_leaves != len(decay_flags):
            raise ValueError(f"optimiser built for {len(decay_flags)} parameters, got {structure.num_leaves}")
        return jax.tree.unflatten(structure, decay_flags)

    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip_norm),
        optax.adamw(
            learning_rate=learning_rate_schedule(config, total_steps),
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=mask,
        ),
    )

