"""Device mesh, logical-to-mesh axis rules and the shardings of the training state.

The model names the axes of its parameters logically (`"embed"`, `"mlp"`,
`"heads"`, ...); the config says how many devices each mesh axis has
(`config.mesh.shape`) and which mesh axes each logical name maps to
(`config.mesh.logical_rules`), MaxText style. No code outside this module ever
names a device count.

Mesh axes, outermost first:
    data    pure data parallelism (parameters replicated),
    fsdp    data parallelism with parameters and optimiser state sharded,
    tensor  tensor (model) parallelism inside a layer.

Multi-host: `maybe_initialize_distributed()` calls `jax.distributed.initialize()`
when the environment variable `VFUSION3D_DISTRIBUTED=1` is set (the launch
scripts set it on every worker of a pod).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
DISTRIBUTED_ENV = "VFUSION3D_DISTRIBUTED"

# A logical axis maps to nothing (replicated), one mesh axis, or several.
MeshAxes = str | tuple[str, ...] | None
LogicalRules = tuple[tuple[str, MeshAxes], ...]


def maybe_initialize_distributed() -> None:
    """Joins the multi-host job when `VFUSION3D_DISTRIBUTED=1` (pods, multi-node GPU).

    On TPU VMs and SLURM JAX discovers the coordinator itself; elsewhere set
    `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`.
    """
    if os.environ.get(DISTRIBUTED_ENV, "0").lower() not in ("1", "true", "yes") or jax.distributed.is_initialized():
        return
    kwargs = {}
    if "JAX_NUM_PROCESSES" in os.environ:
        kwargs = dict(num_processes=int(os.environ["JAX_NUM_PROCESSES"]), process_id=int(os.environ["JAX_PROCESS_ID"]))
    jax.distributed.initialize(**kwargs)
    logging.info("jax.distributed: process %d of %d, %d local devices of %d",
                 jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())


def mesh_shape(shape: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves the config's axis sizes (at most one -1 = the remaining devices) in `MESH_AXES` order."""
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
    sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(shape)}")
    known = math.prod(size for size in sizes if size != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh {dict(shape)} does not divide {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {num_devices}")
    return tuple(sizes)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes `MESH_AXES` over all (or the given) devices, in automatic sharding mode."""
    devices = list(devices) if devices is not None else jax.devices()
    sizes = mesh_shape(shape, len(devices))
    # Auto axes: jit propagates shardings from the annotated inputs and parameters.
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_rules(rules: Sequence[Sequence[Any]]) -> LogicalRules:
    """Normalises config rules `[(logical, None | "axis" | ("axis", ...)), ...]` into Flax's form."""
    normalised = []
    for logical, mesh_axes in rules:
        if mesh_axes is not None and not isinstance(mesh_axes, str):
            mesh_axes = tuple(mesh_axes)
        for axis in (mesh_axes,) if isinstance(mesh_axes, str) else (mesh_axes or ()):
            if axis not in MESH_AXES:
                raise ValueError(f"rule {logical!r} -> {mesh_axes!r} names an unknown mesh axis {axis!r}")
        normalised.append((str(logical), mesh_axes))
    return tuple(normalised)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: LogicalRules) -> Iterator[None]:
    """Makes `mesh` and `rules` current: model creation, jit tracing and sharding constraints see them."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def fit_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes that do not divide their dimension or were already used by an earlier dimension.

    A tiny model's 3-channel bias cannot be split 8 ways; it is replicated on that
    axis instead of failing the whole run (big_vision's fsdp does the same).
    """
    used: set[str] = set()
    fitted = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        kept = []
        for axis in axes:
            size = math.prod(mesh.shape[a] for a in kept + [axis])
            if axis not in used and dim % size == 0:
                kept.append(axis)
        used.update(kept)
        fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*fitted)


def state_shardings(abstract_state: Any, mesh: Mesh, rules: LogicalRules) -> Any:
    """NamedShardings for an (abstract) NNX state from its logical `out_sharding` metadata.

    Variables without metadata (and plain arrays) are replicated.
    """
    with nn.logical_axis_rules(rules):
        specs = nnx.get_partition_spec(abstract_state)

    def to_sharding(spec: PartitionSpec, leaf: Any) -> NamedSharding:
        return NamedSharding(mesh, fit_spec(spec, tuple(leaf.shape), mesh))

    return jax.tree.map(to_sharding, specs, abstract_state, is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_spec(rules: LogicalRules, logical_axis: str = "batch") -> PartitionSpec:
    """The PartitionSpec of arrays whose leading axis is `logical_axis` (default: the example batch)."""
    mesh_axes = dict(rules).get(logical_axis)
    return PartitionSpec(mesh_axes)


def jit_eval_step(eval_step, mesh: Mesh, rules: LogicalRules):
    """`eval_step` (→ metrics, per-example outputs) jitted with its metrics replicated and its
    outputs split by example, as every task's evaluation returns them."""
    replicated = NamedSharding(mesh, PartitionSpec())
    by_example = NamedSharding(mesh, batch_spec(rules))
    return jax.jit(eval_step, out_shardings=(replicated, by_example))


def data_parallel_size(mesh_shape: Mapping[str, int], rules: LogicalRules) -> int:
    """How many ways the batch is split on a mesh of these axis sizes (`mesh.shape`, or a plan's
    without devices): the global batch size must be a multiple of it."""
    axes = batch_spec(rules)[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(mesh_shape[axis] for axis in axes)


def per_device_bytes(tree: Any) -> int:
    """Bytes of the arrays of `tree` stored on the first local device (its shards and replicas)."""
    device = jax.local_devices()[0]
    total = 0
    for leaf in jax.tree.leaves(tree):
        for shard in getattr(leaf, "addressable_shards", ()):
            if shard.device == device:
                total += shard.data.nbytes
    return total


def first_host_rows(array: jax.Array, rows: int) -> np.ndarray:
    """This host's first `rows` examples of a global array split over its batch axis only."""
    shards = sorted(array.addressable_shards, key=lambda shard: shard.index[0].start or 0)
    seen, parts = set(), []
    for shard in shards:
        start = shard.index[0].start or 0
        if start not in seen:
            seen.add(start)
            parts.append(np.asarray(shard.data))
    return np.concatenate(parts)[:rows]
