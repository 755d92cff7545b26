"""Checkpoints of a training run: one Orbax `CheckpointManager` with named items.

    <workdir>/checkpoints/<step>/
        model/      the model's NNX state (pure dict of arrays, sharded save/restore)
        optimizer/  the NNX optimiser state (step count, Adam moments)
        data/       the Grain iterator's position, one JSON file per host
        progress/   JSON: training step and the stage whose data iterator is saved
        config/     JSON: the run's config, for people and for `convert`/`infer`

A save runs in the background (Orbax async); `wait_until_finished()` blocks until
it is on disk. Orbax writes to a temporary directory and renames it when
complete, so a run killed at any moment leaves only whole checkpoints and
resumes from the newest one. Before writing, every array is checked: a state
with a NaN or infinity raises `NonFiniteStateError` and nothing is written.
"""

from __future__ import annotations

import json
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx

from vfusion3d_jax import errors

ITEMS = ("model", "optimizer", "data", "progress", "config")
CHECKPOINT_SUBDIR = "checkpoints"  # under a run's workdir


class NonFiniteStateError(errors.NonFiniteError):
    """The training state holds a NaN or infinity; it is never written to a checkpoint."""


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    """True when no floating-point leaf of `tree` holds a NaN or infinity."""
    flags = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def _abstract_pure_dict(state: nnx.State, shardings: nnx.State) -> dict:
    """The restore target: shapes, dtypes and the shardings the arrays should come back with."""
    targets = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    return nnx.to_pure_dict(targets)


class Checkpointer:
    """Saves and restores the training state, the data position and the config under `directory`."""

    def __init__(self, directory: str, *, save_interval_steps: int, max_to_keep: int | None,
                 config: ml_collections.ConfigDict | None = None):
        self.directory = epath.Path(directory)
        self._config = config
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps,
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        return self._manager.should_save(step)

    def reached_preemption(self, step: int) -> bool:
        """True on every host once a preemption notice has reached all of them (a sync point)."""
        return self._manager.reached_preemption(step)

    def save(self, step: int, model_state: nnx.State, optimizer_state: nnx.State, *,
             data_iterator: grain.DatasetIterator | None, progress: dict[str, Any], force: bool = False) -> bool:
        """Starts writing the checkpoint of `step` if the interval says so (or `force`); True if it did.

        Raises `NonFiniteStateError` instead of writing a state with a NaN or infinity.
        """
        if not (force or self._manager.should_save(step)):
            return False
        if not bool(all_finite((model_state, optimizer_state))):
            raise NonFiniteStateError(f"refusing to checkpoint step {step}: the training state is not finite")
        items = dict(
            model=ocp.args.StandardSave(nnx.to_pure_dict(model_state)),
            optimizer=ocp.args.StandardSave(nnx.to_pure_dict(optimizer_state)),
            progress=ocp.args.JsonSave(dict(progress, step=step)),
        )
        if data_iterator is not None:
            # Grain's handler calls get_state() inside save(), before save() returns.
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if self._config is not None:
            items["config"] = ocp.args.JsonSave(json.loads(self._config.to_json_best_effort()))
        saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
        if saved:
            logging.info("checkpoint of step %d started in %s", step, self.directory)
        return saved

    def restore_progress(self, step: int) -> dict[str, Any]:
        """The `progress` item of a checkpoint: cheap, read before the data iterator is built."""
        return self._manager.restore(step, args=ocp.args.Composite(progress=ocp.args.JsonRestore()))["progress"]

    def restore(self, step: int, model_state: nnx.State, optimizer_state: nnx.State,
                model_shardings: nnx.State, optimizer_shardings: nnx.State, *,
                data_iterator: grain.DatasetIterator | None) -> tuple[nnx.State, nnx.State]:
        """Restores the model and optimiser states of `step` (and moves `data_iterator` to its position).

        `model_state`/`optimizer_state` may be abstract (from `nnx.eval_shape`); the
        arrays come back with the given shardings, read shard by shard.
        """
        items = dict(
            model=ocp.args.StandardRestore(_abstract_pure_dict(model_state, model_shardings)),
            optimizer=ocp.args.StandardRestore(_abstract_pure_dict(optimizer_state, optimizer_shardings)),
        )
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        model_state = jax.tree.map(lambda x: x, model_state)  # a copy to fill in: replace_by_pure_dict mutates
        optimizer_state = jax.tree.map(lambda x: x, optimizer_state)
        nnx.replace_by_pure_dict(model_state, restored["model"])
        nnx.replace_by_pure_dict(optimizer_state, restored["optimizer"])
        logging.info("restored checkpoint of step %d from %s", step, self.directory)
        return model_state, optimizer_state

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for any save in flight, then releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()


def restore_model(directory: str, model_state: nnx.State, model_shardings: nnx.State,
                  step: int | None = None) -> nnx.State:
    """The `model` item of another run's checkpoint (newest step by default), into the given shardings.

    `directory` is a workdir or its `checkpoints/` folder: a training run's, or the
    output of `convert` (the official weights), which has the same layout.
    """
    path = epath.Path(directory)
    if (path / CHECKPOINT_SUBDIR).is_dir():
        path = path / CHECKPOINT_SUBDIR
    manager = ocp.CheckpointManager(path, item_names=("model",), options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise errors.MissingCheckpointError(f"no checkpoint in {path}").with_hint(
            "--config.train.init_checkpoint takes a training run's workdir or a `convert` output")
    restored = manager.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(_abstract_pure_dict(model_state, model_shardings))))
    manager.close()
    model_state = jax.tree.map(lambda x: x, model_state)
    nnx.replace_by_pure_dict(model_state, restored["model"])
    logging.info("model initialised from step %d of %s", step, path)
    return model_state

