"""One training loop for every model: multi-stage, sharded over a device mesh, resumable at any step.

    python -m vfusion3d_jax train --config=configs/lrm.py:tiny --workdir=runs/lrm_tiny
    python -m vfusion3d_jax train --config=configs/mvdiffusion.py:tiny --workdir=runs/mvd_tiny

What differs between models is a task module (`TASKS`, chosen by `config.task`): the model, its
loss, its evaluation step and its image grid. `lrm_task` is the triplane LRM with VFusion3D's
strategies (per-source losses, camera noise, opacity loss); `mvdiffusion_task` the multi-view
video diffusion model (flow matching); `flexrm_task` FlexRM (1-32 views to Gaussians). The loop is
shared: stages, each a phase with its own step count and overrides of `config.data` (e.g. 128 px
renders, then 384 px patches, then fine-tuning on rendered 3D data only) and of the task's stage
options (FlexRM's renderer: NeRF, then Gaussians), clipped AdamW on one schedule, checkpoints,
logs and evaluation.

Shape first, then allocate (big_vision): the model and optimiser are built with
`nnx.eval_shape`, their shardings derived from the parameters' logical axis names
and the config's rules, and the state created by a jitted init with those
`out_shardings` (or restored straight into them). The step is one jitted function
of (model state, optimiser state, batch, the task's aux arrays, step) with the states
donated; its randomness is `fold_in(key, step)`, so a resumed run draws exactly
what an uninterrupted one would. A non-finite loss or gradient norm never reaches
the state (the update is dropped inside the step); the run then stops with an
error, or skips the step and goes on (`config.train.nonfinite`).

Outputs under the workdir: `checkpoints/` (Orbax, see `checkpointing.py`),
`tensorboard/` (scalars and image grids), `metrics.jsonl` (one JSON object per
logged step, for plotting), `eval/eval_step_<N>.png` (the task's grid of held-out
examples), `summary.json` (with `data.skip_corrupt`: the
corrupt records skipped, per file; the log names each one as it is skipped).
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import json
import time
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import app, logging
from etils import epath
from flax import nnx
from PIL import Image
from tensorboardX import SummaryWriter

from vfusion3d_jax import errors
from vfusion3d_jax.data import pipeline
from vfusion3d_jax.train import checkpointing, finetune
from vfusion3d_jax.train import optimizer as optimizer_lib
from vfusion3d_jax.train import sharding

# config.task → the module that supplies NAME, INPUT_KEYS, create_model, count_parameters,
# loss_fn, train_aux, eval_aux, make_eval_step, eval_data_config, eval_grid, summarize_eval; and
# optionally STAGE_OPTIONS (stage fields that go to `loss_fn(config, **options)` instead of
# config.data, e.g. FlexRM's renderer) and `step_monitor(config)` (a callable seeing each step's
# metrics on the host before they are logged: warnings, running counts).
TASKS = {"lrm": "vfusion3d_jax.train.lrm_task", "mvdiffusion": "vfusion3d_jax.train.mvdiffusion_task",
         "flexrm": "vfusion3d_jax.train.flexrm_task"}


def task_of(config: ml_collections.ConfigDict) -> ModuleType:
    """The task module of `config` (`config.task`, default "lrm")."""
    name = config.get("task", "lrm")
    if name not in TASKS:
        raise errors.InvalidConfigValueError(f"config.task must be one of {sorted(TASKS)}, got {name!r}")
    return importlib.import_module(TASKS[name])


class NonFiniteLossError(errors.NonFiniteError):
    """A training step produced a NaN or infinite loss or gradient norm (and `nonfinite` is "stop")."""


def train_command(config: ml_collections.ConfigDict, workdir: str, args: list[str]) -> None:
    """The CLI's `train` command."""
    if args:
        raise app.UsageError(f"train takes no positional arguments, got {args}")
    if not workdir:
        raise app.UsageError("train needs --workdir")
    train_and_evaluate(config, workdir)


# --------------------------------------------------------------------------- stages


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training phase: global steps [first_step, first_step + num_steps) on its own input config."""

    index: int
    name: str
    first_step: int
    num_steps: int
    data: ml_collections.ConfigDict
    # The task's options of this stage (its STAGE_OPTIONS), as sorted (name, value) pairs: hashable,
    # so stages with the same options share one train step.
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def end_step(self) -> int:
        return self.first_step + self.num_steps


def make_stages(config: ml_collections.ConfigDict) -> list[Stage]:
    """The stages of `config.train.stage_order` with steps > 0, each with `config.data` + its overrides:
    every field of a stage but `num_steps`, `mixture` (per-dataset weights) and the task's
    STAGE_OPTIONS (the stage's `options`) replaces that data field."""
    task_options = set(getattr(task_of(config), "STAGE_OPTIONS", ()))
    stages, first_step = [], 0
    for name in config.train.stage_order:
        stage = config.train.stages[name]
        if stage.num_steps <= 0:
            continue
        data = ml_collections.ConfigDict(config.data.to_dict())
        options = []
        for field, value in stage.items():
            value = tuple(value) if isinstance(value, list) else value
            if field in task_options:
                options.append((field, value))
            elif field not in ("num_steps", "mixture"):
                data[field] = value
        for source in data.mixture:
            data.mixture[source].weight = stage.mixture[source]
        # A new stage reshuffles: its examples do not replay the previous stage's order.
        data.seed = config.data.seed + len(stages)
        stages.append(Stage(len(stages), name, first_step, int(stage.num_steps), data, tuple(sorted(options))))
        first_step += int(stage.num_steps)
    if not stages:
        raise ValueError("config.train.stages has no stage with num_steps > 0")
    return stages


def total_steps(config: ml_collections.ConfigDict) -> int:
    """Steps of all stages together: the length of the learning-rate schedule."""
    return make_stages(config)[-1].end_step


def stage_at(stages: list[Stage], step: int) -> Stage:
    """The stage that trains step `step` (0-based); the last stage once training is done."""
    return next((stage for stage in stages if step < stage.end_step), stages[-1])


# --------------------------------------------------------------------------- state


@dataclasses.dataclass
class TrainState:
    """Where a run stands: the model and optimiser states (sharded arrays) and their static parts."""

    model_graphdef: Any
    optimizer_graphdef: Any
    model_state: nnx.State
    optimizer_state: nnx.State
    model_shardings: nnx.State
    optimizer_shardings: nnx.State
    trainable: Any = nnx.Param  # the NNX filter of the parameters that train (config.train.finetune)
    # The moving average of the trainable parameters (`config.train.ema_decay` > 0), else None.
    ema_state: nnx.State | None = None
    ema_shardings: nnx.State | None = None


def finetuning_of(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config.train.finetune` (which parameters train: full, a path filter or LoRA), full by default."""
    return config.train.get("finetune") or finetune.finetune_config()


def ema_decay_of(config: ml_collections.ConfigDict) -> float:
    """`config.train.ema_decay`: the EMA's decay per step, 0 (the default) for no EMA."""
    decay = float(config.train.get("ema_decay", 0.0))
    if not 0.0 <= decay < 1.0:
        raise errors.InvalidConfigValueError(f"config.train.ema_decay must be in [0, 1), got {decay}")
    return decay


def abstract_train_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules: sharding.LogicalRules):
    """(state constructor, abstract TrainState): shapes and shardings only, nothing allocated.

    Only the trainable parameters (`config.train.finetune`) get optimiser state, and an EMA when
    `config.train.ema_decay` > 0 (sharded as the parameters it averages).
    """
    task, finetuning = task_of(config), finetuning_of(config)
    trainable = finetune.trainable_filter(finetuning)

    def make_model(seed: int) -> nnx.Module:
        return finetune.apply_finetuning(task.create_model(config, nnx.Rngs(seed)), finetuning,
                                         rngs=nnx.Rngs(seed + 1))

    abstract_params = nnx.state(nnx.eval_shape(lambda: make_model(0)), trainable)
    tx = optimizer_lib.make_optimizer(config.train.optimizer, total_steps(config), abstract_params)

    def create() -> tuple[nnx.Module, nnx.Optimizer]:
        model = make_model(config.train.seed)
        return model, nnx.Optimizer(model, tx, wrt=trainable)

    abstract_model, abstract_optimizer = nnx.eval_shape(create)
    model_graphdef, model_state = nnx.split(abstract_model)
    optimizer_graphdef, optimizer_state = nnx.split(abstract_optimizer)
    state = TrainState(model_graphdef, optimizer_graphdef, model_state, optimizer_state,
                       sharding.state_shardings(model_state, mesh, rules),
                       sharding.state_shardings(optimizer_state, mesh, rules), trainable)
    if ema_decay_of(config):
        state.ema_state = nnx.filter_state(model_state, trainable)
        state.ema_shardings = nnx.filter_state(state.model_shardings, trainable)
    return create, state


def initialize_train_state(create, abstract: TrainState) -> TrainState:
    """Creates the state on its devices: a jitted init whose outputs land in the target shardings."""

    def init() -> tuple[nnx.State, nnx.State]:
        model, optimizer = create()
        return nnx.state(model), nnx.state(optimizer)

    model_state, optimizer_state = jax.jit(
        init, out_shardings=(abstract.model_shardings, abstract.optimizer_shardings))()
    return start_ema(dataclasses.replace(abstract, model_state=model_state, optimizer_state=optimizer_state))


def start_ema(state: TrainState) -> TrainState:
    """The state with its EMA (if it keeps one) set to a copy of the current trainable parameters:
    at init, once `init_checkpoint` has put in the pretrained ones, and on resuming a checkpoint
    saved without an EMA."""
    if state.ema_state is None:
        return state
    params = nnx.filter_state(state.model_state, state.trainable)
    return dataclasses.replace(state, ema_state=jax.jit(finetune.init_ema, out_shardings=state.ema_shardings)(params))


def evaluation_weights(state: TrainState) -> nnx.State:
    """The model state that evaluation and sampling use: the EMA's parameters where there is one."""
    if state.ema_state is None:
        return state.model_state
    return nnx.merge_state(state.model_state, state.ema_state)


# --------------------------------------------------------------------------- steps


def make_train_step(config: ml_collections.ConfigDict, state: TrainState, options: tuple = ()):
    """The jitted step `(model_state, optimizer_state, ema_state, batch, aux, step) → (the three
    states, metrics)`, where `aux` is what the task's loss needs besides the batch (`task.train_aux`,
    e.g. LPIPS weights) and `ema_state` is None in a run without EMA; `options` are a stage's
    (`Stage.options`), passed to the task's `loss_fn`.

    States are donated. Shapes come from the batch, so each stage compiles its own program, once.
    """
    loss_fn = task_of(config).loss_fn(config, **dict(options))
    trainable = nnx.DiffState(0, state.trainable)  # frozen: no gradient
    seed, ema_decay = config.train.seed, ema_decay_of(config)
    schedule = optimizer_lib.learning_rate_schedule(config.train.optimizer, total_steps(config))

    def train_step(model_state, optimizer_state, ema_state, batch, aux, step):
        model = nnx.merge(state.model_graphdef, model_state)
        optimizer = nnx.merge(state.optimizer_graphdef, optimizer_state)
        # Copies of the incoming state, kept apart from the Variables that the update mutates.
        previous = jax.tree.map(lambda x: x, (model_state, optimizer_state, ema_state))
        key = jax.random.fold_in(jax.random.key(seed), step)
        (loss, terms), grads = nnx.value_and_grad(lambda model: loss_fn(model, batch, key, aux), argnums=trainable,
                                                  has_aux=True)(model)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        optimizer.update(model, grads)
        if ema_state is not None:
            ema_state = finetune.ema_update(ema_state, nnx.state(model, state.trainable), ema_decay, step=step)
        # A non-finite step leaves the state as it was: nothing poisoned survives the step.
        updated = (nnx.state(model), nnx.state(optimizer), ema_state)
        model_state, optimizer_state, ema_state = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old), updated, previous)
        step_metrics = dict(terms, loss=loss, grad_norm=grad_norm, finite=finite,
                            learning_rate=schedule(previous[1]["step"][...]),
                            param_norm=optax.tree.norm(nnx.filter_state(model_state, nnx.Param)))
        return model_state, optimizer_state, ema_state, step_metrics

    return jax.jit(train_step, donate_argnums=(0, 1, 2),
                   out_shardings=(state.model_shardings, state.optimizer_shardings, state.ema_shardings, None))


def make_eval_step(config: ml_collections.ConfigDict, state: TrainState, mesh: jax.sharding.Mesh,
                   rules: sharding.LogicalRules):
    """The task's jitted evaluation `(model_state, batch, aux) → (metrics, outputs for the grid)`."""
    return task_of(config).make_eval_step(config, state.model_graphdef, mesh, rules)


# --------------------------------------------------------------------------- logging


SUMMARY_FILE = "summary.json"  # in the workdir: what the run skipped


def _write_summary(workdir: epath.Path, skips: pipeline.SkippedRecordTally) -> None:
    """`summary.json` (process 0; each host counts the corrupt records of its own batches)."""
    if jax.process_index() != 0:
        return
    (workdir / SUMMARY_FILE).write_text(json.dumps(dict(corrupt_records_skipped=skips.summary()), indent=2) + "\n")
    if skips.times:
        logging.warning("%s", skips.describe())
        print(skips.describe(), flush=True)


class MetricsLog:
    """Scalars to TensorBoard and to `metrics.jsonl`; images to TensorBoard and PNG. Process 0 only.

    The workdir may be local or a bucket (`gs://`, through etils.epath); a bucket
    object cannot be appended to, so there the JSONL file is rewritten whole.
    """

    def __init__(self, workdir: epath.Path):
        self.active = jax.process_index() == 0
        self.workdir = workdir
        if self.active:
            self._writer = SummaryWriter(str(workdir / "tensorboard"))
            self._jsonl = workdir / "metrics.jsonl"
            self._remote = "://" in str(workdir)
            resumed = self._remote and self._jsonl.exists()
            self._lines = self._jsonl.read_text().splitlines(keepends=True) if resumed else []

    def scalars(self, step: int, split: str, values: dict[str, float]) -> None:
        if not self.active:
            return
        for name, value in values.items():
            self._writer.add_scalar(f"{split}/{name}", value, step)
        line = json.dumps(dict(step=step, split=split, time=time.time(), **values)) + "\n"
        if self._remote:
            self._lines.append(line)
            self._jsonl.write_text("".join(self._lines))
        else:
            with self._jsonl.open("a") as file:
                file.write(line)

    def image(self, step: int, name: str, image: np.ndarray) -> None:
        """`image` (H, W, 3) in [0, 1]: TensorBoard and `<workdir>/eval/<name>_step_<step>.png`."""
        if not self.active:
            return
        pixels = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
        self._writer.add_image(name, pixels, step, dataformats="HWC")
        (self.workdir / "eval").mkdir(parents=True, exist_ok=True)
        png = io.BytesIO()
        Image.fromarray(pixels).save(png, format="PNG")
        (self.workdir / "eval" / f"{name}_step_{step:07d}.png").write_bytes(png.getvalue())

    def close(self) -> None:
        if self.active:
            self._writer.close()


# --------------------------------------------------------------------------- loops


def evaluate(config: ml_collections.ConfigDict, eval_step, model_state: nnx.State, aux,
             mesh: jax.sharding.Mesh, rules: sharding.LogicalRules) -> tuple[dict[str, float], np.ndarray | None]:
    """Means over `config.eval.num_batches` held-out batches (NaNs, e.g. views with nothing to
    compare, left out) and the task's image grid of the first batch.

    The held-out iterator is rebuilt each time with the same seed, so every evaluation sees the
    same examples.
    """
    task = task_of(config)
    iterator = pipeline.make_iterator(task.eval_data_config(config))
    spec = sharding.batch_spec(rules)
    collected: dict[str, list[np.ndarray]] = {}
    grid = None
    for _ in range(config.eval.num_batches):
        host_batch = next(iterator)
        batch = pipeline.to_global_arrays(model_inputs(config, host_batch), mesh, spec)
        values, outputs = eval_step(model_state, batch, aux)
        for name, value in jax.device_get(values).items():
            collected.setdefault(name, []).append(np.asarray(value, np.float64))
        if grid is None and config.eval.grid_rows > 0:
            rows = sharding.first_host_rows(outputs, len(next(iter(host_batch.values()))))
            grid = task.eval_grid(host_batch, rows, config.eval.grid_rows)
    means = {name: float(np.nanmean(np.concatenate(parts))) for name, parts in collected.items()}
    return task.summarize_eval(means, config), grid


def model_inputs(config: ml_collections.ConfigDict, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays of a pipeline batch that the task's steps read (indices and counters stay on the host)."""
    return {key: batch[key] for key in task_of(config).INPUT_KEYS}


class _StepReporter:
    """Host side of the step metrics: finiteness check, progress bar, logs.

    Metrics are fetched one step late, so the host never waits for the device
    right after dispatching a step (the next batch is prepared meanwhile).
    """

    def __init__(self, config: ml_collections.ConfigDict, log: MetricsLog, progress: tqdm.tqdm, batch_size: int,
                 monitor=None):
        self.config = config
        self.monitor = monitor  # the task's step_monitor, or None
        self.log = log
        self.progress = progress
        self.batch_size = batch_size
        self.pending: tuple[int, dict[str, jax.Array]] | None = None
        self.skipped = 0
        self.corrupt_skipped = 0  # corrupt records skipped so far (the training loop keeps it current)
        self._last_time = time.perf_counter()

    def push(self, step: int, step_metrics: dict[str, jax.Array]) -> None:
        """Records the dispatch of step `step` (0-based) and reports the previous one."""
        previous, self.pending = self.pending, (step, step_metrics)
        if previous is not None:
            self._report(*previous)

    def flush(self) -> None:
        if self.pending is not None:
            self._report(*self.pending)
            self.pending = None

    def restart_clock(self) -> None:
        """Excludes the time since the last report (an evaluation) from the next step time."""
        self._last_time = time.perf_counter()

    def _report(self, step: int, step_metrics: dict[str, jax.Array]) -> None:
        values = {name: float(value) for name, value in jax.device_get(step_metrics).items()}
        now = time.perf_counter()
        step_time, self._last_time = now - self._last_time, now
        done = step + 1
        if not values.pop("finite"):
            message = (f"non-finite training step {done}: loss={values['loss']}, grad_norm={values['grad_norm']}. "
                       "The update was dropped, the state is unchanged and no checkpoint holds it; look for "
                       "NaNs in the data, lower the learning rate, or set --config.train.nonfinite=skip.")
            if self.config.train.nonfinite == "stop":
                raise NonFiniteLossError(message)
            self.skipped += 1
            logging.warning("%s (skipped %d so far)", message, self.skipped)
        if self.monitor is not None:
            self.monitor(done, values)
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{values['loss']:.4f}", step_s=f"{step_time:.2f}",
                                  ex_s=f"{self.batch_size / max(step_time, 1e-9):.1f}", refresh=False)
        if done % self.config.train.log_every == 0 or done == 1:
            values.update(step_time_s=step_time, examples_per_s=self.batch_size / max(step_time, 1e-9),
                          skipped_steps=self.skipped, corrupt_records_skipped=self.corrupt_skipped)
            self.log.scalars(done, "train", values)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains `config` in `workdir`, resuming from its newest checkpoint; returns the final state."""
    sharding.maybe_initialize_distributed()
    workdir = epath.Path(workdir)
    if "://" not in str(workdir):
        workdir = workdir.absolute()  # Orbax wants absolute paths
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = sharding.make_mesh(config.mesh.shape)
    rules = sharding.logical_rules(config.mesh.logical_rules)
    stages = make_stages(config)
    num_steps = stages[-1].end_step
    batch_sizes = [("data", config.data.batch_size)] + ([("eval", config.eval.batch_size)] if config.eval.every else [])
    parallelism = sharding.data_parallel_size(mesh.shape, rules)
    for name, batch_size in batch_sizes:
        if batch_size % parallelism:
            raise ValueError(f"config.{name}.batch_size {batch_size} is not divisible by the data parallelism "
                             f"({parallelism}) of mesh {dict(mesh.shape)}")
    if config.eval.every:
        pipeline.expand_paths(config.eval.glob)  # a missing held-out split fails now, not after hours
    if config.train.nonfinite not in ("stop", "skip"):
        raise errors.InvalidConfigValueError(
            f"config.train.nonfinite must be 'stop' or 'skip', got {config.train.nonfinite!r}")

    task = task_of(config)
    with sharding.activate(mesh, rules):
        create, state = abstract_train_state(config, mesh, rules)
        print(f"{task.NAME} ({config.get('variant', 'custom')}): {task.count_parameters(config):,} parameters; "
              f"{len(stages)} stage(s), {num_steps} steps; mesh {dict(mesh.shape)}", flush=True)
        logging.info("stages: %s", [(s.name, s.num_steps) for s in stages])

        checkpointer = checkpointing.Checkpointer(
            str(workdir / checkpointing.CHECKPOINT_SUBDIR), save_interval_steps=config.train.checkpoint_every,
            max_to_keep=config.train.checkpoint_keep, config=config)
        start_step = checkpointer.latest_step() or 0
        stage = stage_at(stages, start_step)
        iterator = pipeline.make_iterator(stage.data)
        if start_step:
            progress = checkpointer.restore_progress(start_step)
            # The saved iterator belongs to the stage of the last step trained; past a stage
            # boundary the new stage starts from a fresh iterator instead.
            same_stage = progress.get("data_stage") == stage.index
            state.model_state, state.optimizer_state, ema_state = checkpointer.restore(
                start_step, state.model_state, state.optimizer_state, state.model_shardings,
                state.optimizer_shardings, data_iterator=iterator if same_stage else None,
                ema_state=state.ema_state, ema_shardings=state.ema_shardings)
            if ema_state is None and state.ema_state is not None:
                logging.warning("checkpoint of step %d has no EMA: starting it from the parameters", start_step)
                state = start_ema(state)
            else:
                state.ema_state = ema_state
            logging.info("resumed at step %d (stage %s)", start_step, stage.name)
        else:
            state = initialize_train_state(create, state)
            if config.train.init_checkpoint:
                # The pretrained model: everything but the LoRA adapters this run adds.
                base = nnx.Not(finetune.LoRAParam)
                restored = checkpointing.restore_model(
                    config.train.init_checkpoint, nnx.filter_state(state.model_state, base),
                    nnx.filter_state(state.model_shardings, base))
                state = start_ema(dataclasses.replace(state, model_state=nnx.merge_state(state.model_state, restored)))

        train_steps = {}  # per stage options (one for a task without STAGE_OPTIONS)

        def train_step_of(stage: Stage):
            if stage.options not in train_steps:
                train_steps[stage.options] = make_train_step(config, state, stage.options)
            return train_steps[stage.options]

        eval_step = make_eval_step(config, state, mesh, rules)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        train_aux = jax.device_put(task.train_aux(config), replicated)
        eval_aux = jax.device_put(task.eval_aux(config), replicated)
        batch_spec = sharding.batch_spec(rules)
        log = MetricsLog(workdir)
        progress = tqdm.tqdm(total=num_steps, initial=start_step, desc="train", unit="step",
                             disable=jax.process_index() != 0, dynamic_ncols=True)
        monitor = task.step_monitor(config) if hasattr(task, "step_monitor") else None
        reporter = _StepReporter(config, log, progress, config.data.batch_size, monitor)
        skips = pipeline.SkippedRecordTally()
        if start_step and (workdir / SUMMARY_FILE).exists():
            skips.merge(json.loads((workdir / SUMMARY_FILE).read_text()).get("corrupt_records_skipped", {}))
        try:
            if config.eval.every and start_step == 0:  # the untrained model: the baseline of every curve
                values, _ = evaluate(config, eval_step, evaluation_weights(state), eval_aux, mesh, rules)
                log.scalars(0, "eval", values)
                logging.info("eval at step 0: %s", values)
            end_step = num_steps if config.train.stop_after is None else min(num_steps, config.train.stop_after)
            for step in range(start_step, end_step):
                if step == stage.end_step:
                    stage = stage_at(stages, step)
                    iterator = pipeline.make_iterator(stage.data)
                    logging.info("stage %s from step %d: %s %s", stage.name, step, stage.data.to_dict(),
                                 dict(stage.options))
                host_batch = next(iterator)
                for record in skips.update(host_batch, stage.data):
                    logging.warning("skipped corrupt record %s (%d records, %d reads so far)", record,
                                    skips.records, skips.times)
                reporter.corrupt_skipped = skips.times
                batch = pipeline.to_global_arrays(model_inputs(config, host_batch), mesh, batch_spec)
                state.model_state, state.optimizer_state, state.ema_state, step_metrics = train_step_of(stage)(
                    state.model_state, state.optimizer_state, state.ema_state, batch, train_aux, jnp.uint32(step))
                reporter.push(step, step_metrics)
                done = step + 1
                # On a preemption notice (TPU maintenance, spot VMs) every host saves this step and exits.
                preempted = checkpointer.reached_preemption(done)
                is_last = done == end_step or preempted
                if checkpointer.should_save(done) or is_last:
                    reporter.flush()  # a non-finite step raises here, before anything is written
                    checkpointer.save(done, state.model_state, state.optimizer_state, data_iterator=iterator,
                                      progress=dict(data_stage=stage.index), force=is_last,
                                      ema_state=state.ema_state)
                if config.eval.every and (done % config.eval.every == 0 or is_last):
                    reporter.flush()
                    values, grid = evaluate(config, eval_step, evaluation_weights(state), eval_aux, mesh, rules)
                    log.scalars(done, "eval", values)
                    logging.info("eval at step %d: %s", done, values)
                    if grid is not None:
                        log.image(done, "eval", grid)
                    reporter.restart_clock()
                if preempted:
                    logging.warning("preempted: saved step %d, stopping; run again to resume", done)
                    break
            reporter.flush()
        finally:
            progress.close()
            checkpointer.close()
            log.close()
            _write_summary(workdir, skips)
    return state
