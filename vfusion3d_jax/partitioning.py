"""Activation sharding by logical axis names, for code that runs inside a jitted step.

Parameters carry logical axis names and the trainer places them (`train/sharding.py`); an
activation is placed with `constrain(x, ("act_batch", None, ...))`, which maps the names through
the current Flax logical-axis rules onto the current mesh. Without a mesh or matching rules
(one device, inference) it does nothing, so models and the renderer call it unconditionally.
"""

from __future__ import annotations

import jax
from flax.core import spmd
from jax.sharding import PartitionSpec


def mesh_axes(logical_axis: str | None) -> tuple[str, ...] | None:
    """Mesh axes that the current logical-axis rules map `logical_axis` to (None = unmapped)."""
    mesh = jax.sharding.get_abstract_mesh()
    if logical_axis is None or mesh.empty:
        return None
    for name, axes in spmd.get_logical_axis_rules():
        if name == logical_axis:
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            axes = tuple(axis for axis in axes if axis in mesh.axis_names)
            return axes or None
    return None


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
    """Sharding constraint of `x` from one logical axis name (or None) per dimension; a no-op
    without a mesh or matching rules."""
    axes = [mesh_axes(name) for name in logical_axes]
    if all(entry is None for entry in axes):
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*axes))
