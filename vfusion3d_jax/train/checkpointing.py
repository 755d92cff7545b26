"""Checkpoints of a training run: one Orbax `CheckpointManager` with named items.

    <workdir>/checkpoints/<step>/
        model/      the model's NNX state (pure dict of arrays, sharded save/restore)
        ema/        the exponential moving average of the trainable parameters, when the run keeps
                    one (`config.train.ema_decay`); readers of the model take it over `model/`
        optimizer/  the NNX optimiser state (step count, Adam moments)
        data/       the Grain iterator's position, one JSON file per host
        progress/   JSON: training step and the stage whose data iterator is saved
        config/     JSON: the run's config, for people and for `convert`/`infer`

A save runs in the background (Orbax async); `wait_until_finished()` blocks until
it is on disk. Orbax writes to a temporary directory and renames it when
complete, so a run killed at any moment leaves only whole checkpoints and
resumes from the newest one. Before writing, every array is checked: a state
with a NaN or infinity raises `NonFiniteStateError` and nothing is written.

Preemption: SIGTERM (what a preempted TPU VM or a SLURM job at its time limit receives)
makes `reached_preemption` true at the next step, on every process at the same step; the
trainer then saves and exits. Across processes JAX's preemption sync manager (part of
`jax.distributed`) catches the signal and agrees on the step; a lone process catches it here.
"""

from __future__ import annotations

import json
import signal
import threading
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
from vfusion3d_jax.models import convert
from vfusion3d_jax.models.convert import CHECKPOINT_SUBDIR

ITEMS = ("model", "ema", "optimizer", "data", "progress", "config")


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
        self._terminated = threading.Event()
        self._catches_sigterm = (not jax.distributed.is_initialized()
                                 and threading.current_thread() is threading.main_thread())
        if self._catches_sigterm:
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        logging.warning("SIGTERM: saving at the end of this step, then stopping")
        self._terminated.set()

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        return self._manager.should_save(step)

    def reached_preemption(self, step: int) -> bool:
        """True once SIGTERM has arrived: on every process at the same step (a sync point)."""
        return self._terminated.is_set() or self._manager.reached_preemption(step)

    def save(self, step: int, model_state: nnx.State, optimizer_state: nnx.State, *,
             data_iterator: grain.DatasetIterator | None, progress: dict[str, Any], force: bool = False,
             ema_state: nnx.State | None = None) -> bool:
        """Starts writing the checkpoint of `step` if the interval says so (or `force`); True if it did.

        Raises `NonFiniteStateError` instead of writing a state with a NaN or infinity.
        """
        if not (force or self._manager.should_save(step)):
            return False
        if not bool(all_finite((model_state, optimizer_state, ema_state))):
            raise NonFiniteStateError(f"refusing to checkpoint step {step}: the training state is not finite")
        items = dict(
            model=ocp.args.StandardSave(nnx.to_pure_dict(model_state)),
            optimizer=ocp.args.StandardSave(nnx.to_pure_dict(optimizer_state)),
            progress=ocp.args.JsonSave(dict(progress, step=step)),
        )
        if ema_state is not None:
            items["ema"] = ocp.args.StandardSave(nnx.to_pure_dict(ema_state))
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
                data_iterator: grain.DatasetIterator | None, ema_state: nnx.State | None = None,
                ema_shardings: nnx.State | None = None) -> tuple[nnx.State, nnx.State, nnx.State | None]:
        """Restores the model, optimiser and (when `ema_state` is given and the checkpoint has one,
        else None) EMA states of `step`, and moves `data_iterator` to its position.

        The states may be abstract (from `nnx.eval_shape`); the arrays come back with the given
        shardings, read shard by shard.
        """
        states = dict(model=(model_state, model_shardings), optimizer=(optimizer_state, optimizer_shardings))
        has_ema = ema_state is not None and (self.directory / str(step) / "ema").exists()
        if has_ema:
            states["ema"] = (ema_state, ema_shardings)
        items = {name: ocp.args.StandardRestore(_abstract_pure_dict(*pair)) for name, pair in states.items()}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        filled = {name: _filled(state, restored[name]) for name, (state, _) in states.items()}
        logging.info("restored checkpoint of step %d from %s", step, self.directory)
        return filled["model"], filled["optimizer"], filled.get("ema")

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for any save in flight, then releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()
        if self._catches_sigterm:
            signal.signal(signal.SIGTERM, self._previous_handler or signal.SIG_DFL)
            self._catches_sigterm = False


def _filled(state: nnx.State, pure: dict) -> nnx.State:
    """A copy of `state` (possibly abstract) holding the arrays of `pure` (replace_by_pure_dict mutates)."""
    state = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(state, pure)
    return state


def restore_model(directory: str, model_state: nnx.State, model_shardings: nnx.State,
                  step: int | None = None) -> nnx.State:
    """The model of another run's checkpoint (newest step by default; `read_model`: the EMA where it
    has one), into the given shardings.

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
    restored = convert.read_model(manager, step, _abstract_pure_dict(model_state, model_shardings))
    manager.close()
    logging.info("model initialised from step %d of %s", step, path)
    return _filled(model_state, restored)

