"""Training the triplane LRM: multi-stage, sharded over a device mesh, resumable at any step.

    python -m vfusion3d_jax train --config=configs/lrm.py:tiny --workdir=runs/lrm_tiny

One step: a batch of (source image, source camera, K target views) → triplanes →
render the K target views (or random patches of them) → MSE + LPIPS + opacity +
triplane TV (`losses.lrm_loss`) → clipped AdamW. The VFusion3D strategies are
config data (`config.train`):

* stages: a list of phases, each with its step count, render resolution, patch
  size, number of target views and data mixture, e.g. 128 px renders, then
  384 px with random patches, then fine-tuning on rendered 3D data only;
* image-level supervision: the loss weights are per data source, so synthetic
  orbits can be supervised by LPIPS alone;
* opacity loss against the foreground masks;
* camera noise injection: random rotations and translations of the cameras of
  synthetic examples (their poses are estimates);
* optionally a random background colour per example (renders and targets alike).

Shape first, then allocate (big_vision): the model and optimiser are built with
`nnx.eval_shape`, their shardings derived from the parameters' logical axis names
and the config's rules, and the state created by a jitted init with those
`out_shardings` (or restored straight into them). The step is one jitted function
of (model state, optimiser state, batch, LPIPS weights, step) with the states
donated; its randomness is `fold_in(key, step)`, so a resumed run draws exactly
what an uninterrupted one would. A non-finite loss or gradient norm never reaches
the state (the update is dropped inside the step); the run then stops with an
error, or skips the step and goes on (`config.train.nonfinite`).

Outputs under the workdir: `checkpoints/` (Orbax, see `checkpointing.py`),
`tensorboard/` (scalars and image grids), `metrics.jsonl` (one JSON object per
logged step, for plotting), `eval/eval_step_<N>.png` (one row per held-out object:
source | target views | rendered views), `summary.json` (with `data.skip_corrupt`: the
corrupt records skipped, per file; the log names each one as it is skipped).
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
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

from vfusion3d_jax import errors, visualize
from vfusion3d_jax.data import pipeline
from vfusion3d_jax.models import LRM, count_parameters
from vfusion3d_jax.rendering import RenderOptions, render_views
from vfusion3d_jax.train import checkpointing, losses, metrics
from vfusion3d_jax.train import optimizer as optimizer_lib
from vfusion3d_jax.train import sharding


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

    @property
    def end_step(self) -> int:
        return self.first_step + self.num_steps


def make_stages(config: ml_collections.ConfigDict) -> list[Stage]:
    """The stages of `config.train.stage_order` with steps > 0, each with `config.data` + its overrides."""
    stages, first_step = [], 0
    for name in config.train.stage_order:
        stage = config.train.stages[name]
        if stage.num_steps <= 0:
            continue
        data = ml_collections.ConfigDict(config.data.to_dict())
        data.target_resolution = stage.target_resolution
        data.target_resize_range = None if stage.target_resize_range is None else tuple(stage.target_resize_range)
        data.patch_size = stage.patch_size
        data.num_target_views = stage.num_target_views
        for source in data.mixture:
            data.mixture[source].weight = stage.mixture[source]
        # A new stage reshuffles: its examples do not replay the previous stage's order.
        data.seed = config.data.seed + len(stages)
        stages.append(Stage(len(stages), name, first_step, int(stage.num_steps), data))
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


def abstract_train_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules: sharding.LogicalRules):
    """(state constructor, abstract TrainState): shapes and shardings only, nothing allocated."""
    abstract_params = nnx.state(nnx.eval_shape(lambda: LRM(config.model, rngs=nnx.Rngs(0))), nnx.Param)
    tx = optimizer_lib.make_optimizer(config.train.optimizer, total_steps(config), abstract_params)

    def create() -> tuple[LRM, nnx.Optimizer]:
        model = LRM(config.model, rngs=nnx.Rngs(config.train.seed))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    abstract_model, abstract_optimizer = nnx.eval_shape(create)
    model_graphdef, model_state = nnx.split(abstract_model)
    optimizer_graphdef, optimizer_state = nnx.split(abstract_optimizer)
    state = TrainState(model_graphdef, optimizer_graphdef, model_state, optimizer_state,
                       sharding.state_shardings(model_state, mesh, rules),
                       sharding.state_shardings(optimizer_state, mesh, rules))
    return create, state


def initialize_train_state(create, abstract: TrainState) -> TrainState:
    """Creates the state on its devices: a jitted init whose outputs land in the target shardings."""

    def init() -> tuple[nnx.State, nnx.State]:
        model, optimizer = create()
        return nnx.state(model), nnx.state(optimizer)

    model_state, optimizer_state = jax.jit(
        init, out_shardings=(abstract.model_shardings, abstract.optimizer_shardings))()
    return dataclasses.replace(abstract, model_state=model_state, optimizer_state=optimizer_state)


# --------------------------------------------------------------------------- augmentation


def _rotation_matrices(axis_angles: jax.Array) -> jax.Array:
    """Rodrigues: rotation vectors (..., 3) (radians) → matrices (..., 3, 3)."""
    angle = jnp.linalg.norm(axis_angles, axis=-1, keepdims=True)
    safe_angle = jnp.where(angle > 1e-12, angle, 1.0)
    x, y, z = jnp.moveaxis(axis_angles / safe_angle, -1, 0)
    zero = jnp.zeros_like(x)
    skew = jnp.stack([zero, -z, y, z, zero, -x, -y, x, zero], axis=-1).reshape(x.shape + (3, 3))
    sin, cos = jnp.sin(angle)[..., None], jnp.cos(angle)[..., None]
    eye = jnp.eye(3, dtype=axis_angles.dtype)
    return eye + sin * skew + (1 - cos) * skew @ skew


def perturb_cam2world(key: jax.Array, cam2world: jax.Array, rotation_deg: float, translation: float) -> jax.Array:
    """Each camera (..., 3, 4) turned about its own centre by a random rotation (σ = rotation_deg per
    axis) and moved by a random offset (σ = translation per axis, in world units)."""
    rotation_key, translation_key = jax.random.split(key)
    batch_shape = cam2world.shape[:-2]
    angles = jax.random.normal(rotation_key, batch_shape + (3,)) * jnp.deg2rad(rotation_deg)
    offsets = jax.random.normal(translation_key, batch_shape + (3,)) * translation
    rotation = _rotation_matrices(angles) @ cam2world[..., :3, :3]
    return jnp.concatenate([rotation, (cam2world[..., :3, 3] + offsets)[..., None]], axis=-1)


def inject_camera_noise(key: jax.Array, source_cameras: jax.Array, render_cameras: jax.Array,
                        is_synthetic: jax.Array, config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
    """Camera noise on synthetic examples only (`config` = `config.train.camera_noise`).

    source_cameras (B, 16) = cam2world[:3, :4] + (fx, fy, cx, cy); render_cameras
    (B, K, 25) = cam2world 4x4 + K 3x3; intrinsics are left alone.
    """
    source_key, render_key = jax.random.split(key)
    synthetic = is_synthetic > 0.5
    if config.source:
        pose = source_cameras[:, :12].reshape(-1, 3, 4)
        noisy = perturb_cam2world(source_key, pose, config.rotation_deg, config.translation).reshape(-1, 12)
        source_cameras = source_cameras.at[:, :12].set(jnp.where(synthetic[:, None], noisy, pose.reshape(-1, 12)))
    if config.targets:
        pose = render_cameras[..., :12].reshape(render_cameras.shape[:2] + (3, 4))
        noisy = perturb_cam2world(render_key, pose, config.rotation_deg, config.translation)
        noisy = noisy.reshape(render_cameras.shape[:2] + (12,))
        render_cameras = render_cameras.at[..., :12].set(
            jnp.where(synthetic[:, None, None], noisy, render_cameras[..., :12]))
    return source_cameras, render_cameras


def recomposite(images: jax.Array, masks: jax.Array, background: jax.Array) -> jax.Array:
    """Images composited onto white (B, K, h, w, 3) → the same onto `background` (B, 3)."""
    return images + (1.0 - masks) * (background[:, None, None, None, :] - 1.0)


# --------------------------------------------------------------------------- steps


def render_options(config: ml_collections.ConfigDict, *, deterministic: bool) -> RenderOptions:
    return RenderOptions(num_coarse=config.render.num_coarse, num_importance=config.render.num_importance,
                         chunk_size=config.train.render_chunk_size, deterministic=deterministic)


def _source_images(batch: dict[str, jax.Array]) -> jax.Array:
    return jnp.moveaxis(batch["source_image"], -1, 1)  # NHWC → the model's NCHW


def make_train_step(config: ml_collections.ConfigDict, state: TrainState):
    """The jitted step `(model_state, optimizer_state, batch, lpips_params, step) → (states, metrics)`.

    States are donated. The render size is the batch's patch (or image) size, so
    each stage compiles its own program, once.
    """
    options = render_options(config, deterministic=False)
    train_config = config.train
    schedule = optimizer_lib.learning_rate_schedule(train_config.optimizer, total_steps(config))

    def train_step(model_state, optimizer_state, batch, lpips_params, step):
        model = nnx.merge(state.model_graphdef, model_state)
        optimizer = nnx.merge(state.optimizer_graphdef, optimizer_state)
        # Copies of the incoming state, kept apart from the Variables that the update mutates.
        previous = jax.tree.map(lambda x: x, (model_state, optimizer_state))
        noise_key, background_key, render_key = jax.random.split(
            jax.random.fold_in(jax.random.key(train_config.seed), step), 3)

        source_cameras, render_cameras = batch["source_camera"], batch["target_patch_cameras"]
        if train_config.camera_noise.rotation_deg > 0 or train_config.camera_noise.translation > 0:
            source_cameras, render_cameras = inject_camera_noise(
                noise_key, source_cameras, render_cameras, batch["is_synthetic"], train_config.camera_noise)
        targets, background = batch["target_images"], None
        if train_config.random_background:
            background = jax.random.uniform(background_key, (targets.shape[0], 3))
            targets = recomposite(targets, batch["target_masks"], background)

        def loss_fn(model: LRM):
            rendered = model(_source_images(batch), source_cameras, render_cameras,
                             resolution=targets.shape[2], options=options, key=render_key, background=background)
            return losses.lrm_loss(rendered, targets, batch["target_masks"], batch["is_synthetic"],
                                   lpips_params=lpips_params, config=train_config.loss)

        (loss, terms), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        optimizer.update(model, grads)
        # A non-finite step leaves the state as it was: nothing poisoned survives the step.
        updated = (nnx.state(model), nnx.state(optimizer))
        model_state, optimizer_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, previous)
        step_metrics = dict(terms, loss=loss, grad_norm=grad_norm, finite=finite,
                            learning_rate=schedule(previous[1]["step"][...]),
                            param_norm=optax.tree.norm(nnx.filter_state(model_state, nnx.Param)))
        return model_state, optimizer_state, step_metrics

    return jax.jit(train_step, donate_argnums=(0, 1),
                   out_shardings=(state.model_shardings, state.optimizer_shardings, None))


def source_gradient_norm(model: LRM, images: jax.Array, source_cameras: jax.Array, render_cameras: jax.Array, *,
                         resolution: int, options: RenderOptions) -> jax.Array:
    """Per example, the L2 norm of the gradient of its mean rendered colour with respect to its
    source image (N, 3, H, W): how strongly the reconstruction responds to its input. Zero means
    the path image → planes is cut (a constant input, a stop-gradient, a broadcast over the batch).
    """

    def mean_colours(model: LRM, images: jax.Array) -> jax.Array:
        rendered = model(images, source_cameras, render_cameras, resolution=resolution, options=options)
        return jnp.sum(jnp.mean(rendered["rgb"], axis=(1, 2, 3, 4)))  # examples are independent

    # nnx.grad, not jax.grad: the model's variables may not cross into another trace by closure.
    gradients = nnx.grad(mean_colours, argnums=1)(model, images.astype(jnp.float32))
    return jnp.sqrt(jnp.sum(jnp.square(gradients), axis=(1, 2, 3)))


def _num_swaps(config: ml_collections.ConfigDict) -> int:
    """Other sources each held-out example is rendered from: at most the rest of its eval batch."""
    return min(config.eval.input_swap, config.eval.batch_size - 1)


def make_eval_step(config: ml_collections.ConfigDict, state: TrainState, mesh: jax.sharding.Mesh,
                   rules: sharding.LogicalRules):
    """The jitted evaluation: deterministic full renders of the target views, and their metrics.

    Per view: PSNR, SSIM, LPIPS, foreground PSNR and silhouette IoU. Per example, the input-swap
    test against the next `config.eval.input_swap` examples of the batch (their planes render
    this example's views): conditioning gain and whether the own source scores best; and, with
    `config.eval.source_gradient`, `source_gradient_norm` of each example. Metrics
    come back replicated (every host can read them), renders split over the batch only.
    """
    options = render_options(config, deterministic=True)
    num_swaps = _num_swaps(config)

    def eval_step(model_state, batch, lpips_params):
        model = nnx.merge(state.model_graphdef, model_state)
        targets, masks, target_cameras = batch["target_images"], batch["target_masks"], batch["target_cameras"]
        planes = model.forward_planes(_source_images(batch), batch["source_camera"])
        flat = lambda z: z.reshape((-1,) + z.shape[2:])

        def render(planes):
            rendered = render_views(model.decoder, planes, target_cameras, resolution=targets.shape[2],
                                    options=options)
            return jnp.clip(rendered["rgb"], 0.0, 1.0), rendered["opacity"]

        def foreground_psnr(images, opacity):  # per example: the mean over its views
            values = metrics.foreground_psnr(flat(images), flat(targets), flat(opacity), flat(masks))
            return jnp.nanmean(values.reshape(targets.shape[:2]), axis=1)

        images, opacity = render(planes)
        if min(targets.shape[2:4]) < metrics.LPIPS_MIN_SIZE[metrics.EVAL_LPIPS_NET]:
            lpips_params = None  # too small for the network's pooling: no LPIPS rather than an error
        values = metrics.image_metrics(flat(images), flat(targets), lpips_params, opacity=flat(opacity),
                                       masks=flat(masks))
        if num_swaps:
            own = foreground_psnr(images, opacity)
            # Example i's views from the planes of example i + s (s = 1 .. num_swaps, cyclic).
            swapped = jnp.stack([foreground_psnr(*render(jnp.roll(planes, -shift, axis=0)))
                                 for shift in range(1, num_swaps + 1)], axis=1)
            values.update(conditioning_gain=own - jnp.mean(swapped, axis=1),
                          retrieval=jnp.all(own[:, None] > swapped, axis=1).astype(jnp.float32))
        if config.eval.source_gradient:
            values["source_gradient"] = source_gradient_norm(
                model, _source_images(batch), batch["source_camera"], target_cameras, resolution=targets.shape[2],
                options=options)
        return values, images

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    by_example = jax.sharding.NamedSharding(mesh, sharding.batch_spec(rules))
    return jax.jit(eval_step, out_shardings=(replicated, by_example))


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


def image_grid(sources: np.ndarray, targets: np.ndarray, renders: np.ndarray, rows: int) -> np.ndarray:
    """One row per example: source | target views | rendered views, all resized to the target size."""
    return np.concatenate([visualize.comparison_row(*example) for example in list(zip(sources, targets, renders))[:rows]])


# --------------------------------------------------------------------------- loops


def evaluate(config: ml_collections.ConfigDict, eval_step, model_state: nnx.State, lpips_params,
             mesh: jax.sharding.Mesh, rules: sharding.LogicalRules) -> tuple[dict[str, float], np.ndarray | None]:
    """Means over `config.eval.num_batches` held-out batches (per view, or per example for the
    input-swap test; NaNs, views with nothing to compare, left out), and an image grid.

    The held-out iterator is rebuilt each time with the same seed, so every
    evaluation sees the same objects, views and cameras.
    """
    data = eval_data_config(config)
    iterator = pipeline.make_iterator(data)
    spec = sharding.batch_spec(rules)
    collected: dict[str, list[np.ndarray]] = {}
    grid = None
    for _ in range(config.eval.num_batches):
        host_batch = next(iterator)
        batch = pipeline.to_global_arrays(_model_inputs(host_batch), mesh, spec)
        values, images = eval_step(model_state, batch, lpips_params)
        for name, value in jax.device_get(values).items():
            collected.setdefault(name, []).append(np.asarray(value, np.float64))
        if grid is None and config.eval.grid_rows > 0:
            renders = _first_host_rows(images, host_batch["target_images"].shape[0])
            grid = image_grid(host_batch["source_image"], host_batch["target_images"], renders, config.eval.grid_rows)
    means = {name: float(np.nanmean(np.concatenate(parts))) for name, parts in collected.items()}
    if "retrieval" in means:
        means["retrieval_chance"] = 1.0 / (1 + _num_swaps(config))
    return means, grid


def _first_host_rows(array: jax.Array, rows: int) -> np.ndarray:
    """This host's first `rows` examples of a global array split over its batch axis only."""
    shards = sorted(array.addressable_shards, key=lambda shard: shard.index[0].start or 0)
    seen, parts = set(), []
    for shard in shards:
        start = shard.index[0].start or 0
        if start not in seen:
            seen.add(start)
            parts.append(np.asarray(shard.data))
    return np.concatenate(parts)[:rows]


def eval_data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The held-out input config: fixed seed, full-image targets at `eval.resolution`, novel views only."""
    data = ml_collections.ConfigDict(config.data.to_dict())
    data.mixture = ml_collections.ConfigDict({name: dict(glob=None, weight=0.0, source=None) for name in data.mixture})
    data.mixture.rendered = dict(glob=config.eval.glob, weight=1.0, source=None)
    data.batch_size = config.eval.batch_size
    data.num_target_views = config.eval.num_target_views
    data.include_source_in_targets = False
    data.target_resolution = config.eval.resolution
    data.target_resize_range = None
    data.patch_size = None
    data.random_hue = False
    data.seed = config.eval.seed
    data.num_epochs = None  # repeat: every host runs the same number of batches
    return data


# Arrays the steps read; the rest of a pipeline batch (indices, counters) stays on the host.
_MODEL_INPUT_KEYS = ("source_image", "source_camera", "target_images", "target_masks", "target_cameras",
                     "target_patch_cameras", "is_synthetic")


def _model_inputs(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {key: batch[key] for key in _MODEL_INPUT_KEYS}


class _StepReporter:
    """Host side of the step metrics: finiteness check, progress bar, logs.

    Metrics are fetched one step late, so the host never waits for the device
    right after dispatching a step (the next batch is prepared meanwhile).
    """

    def __init__(self, config: ml_collections.ConfigDict, log: MetricsLog, progress: tqdm.tqdm, batch_size: int):
        self.config = config
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
    for name, batch_size in (("data", config.data.batch_size), ("eval", config.eval.batch_size)):
        if batch_size % sharding.data_parallel_size(mesh, rules):
            raise ValueError(f"config.{name}.batch_size {batch_size} is not divisible by the data parallelism "
                             f"({sharding.data_parallel_size(mesh, rules)}) of mesh {dict(mesh.shape)}")
    if config.eval.every:
        pipeline.expand_paths(config.eval.glob)  # a missing held-out split fails now, not after hours
    if config.train.nonfinite not in ("stop", "skip"):
        raise errors.InvalidConfigValueError(
            f"config.train.nonfinite must be 'stop' or 'skip', got {config.train.nonfinite!r}")

    with sharding.activate(mesh, rules):
        create, state = abstract_train_state(config, mesh, rules)
        print(f"LRM ({config.get('variant', 'custom')}): {count_parameters(config.model):,} parameters; "
              f"{len(stages)} stage(s), {num_steps} steps; mesh {dict(mesh.shape)}", flush=True)
        logging.info("stages: %s", [(s.name, s.num_steps, s.data.target_resolution, s.data.patch_size) for s in stages])

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
            state.model_state, state.optimizer_state = checkpointer.restore(
                start_step, state.model_state, state.optimizer_state, state.model_shardings,
                state.optimizer_shardings, data_iterator=iterator if same_stage else None)
            logging.info("resumed at step %d (stage %s)", start_step, stage.name)
        else:
            state = initialize_train_state(create, state)
            if config.train.init_checkpoint:
                state.model_state = checkpointing.restore_model(config.train.init_checkpoint, state.model_state,
                                                                state.model_shardings)

        train_step = make_train_step(config, state)
        eval_step = make_eval_step(config, state, mesh, rules)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        loss_lpips = (jax.device_put(metrics.load_lpips_params(config.train.loss.lpips_net), replicated)
                      if losses.uses_lpips(config.train.loss) else None)
        eval_lpips = jax.device_put(metrics.load_lpips_params(metrics.EVAL_LPIPS_NET), replicated)
        batch_spec = sharding.batch_spec(rules)
        log = MetricsLog(workdir)
        progress = tqdm.tqdm(total=num_steps, initial=start_step, desc="train", unit="step",
                             disable=jax.process_index() != 0, dynamic_ncols=True)
        reporter = _StepReporter(config, log, progress, config.data.batch_size)
        skips = pipeline.SkippedRecordTally()
        if start_step and (workdir / SUMMARY_FILE).exists():
            skips.merge(json.loads((workdir / SUMMARY_FILE).read_text()).get("corrupt_records_skipped", {}))
        try:
            if config.eval.every and start_step == 0:  # the untrained model: the baseline of every curve
                values, _ = evaluate(config, eval_step, state.model_state, eval_lpips, mesh, rules)
                log.scalars(0, "eval", values)
                logging.info("eval at step 0: %s", values)
            end_step = num_steps if config.train.stop_after is None else min(num_steps, config.train.stop_after)
            for step in range(start_step, end_step):
                if step == stage.end_step:
                    stage = stage_at(stages, step)
                    iterator = pipeline.make_iterator(stage.data)
                    logging.info("stage %s from step %d: %s", stage.name, step, stage.data.to_dict())
                host_batch = next(iterator)
                for record in skips.update(host_batch, stage.data):
                    logging.warning("skipped corrupt record %s (%d records, %d reads so far)", record,
                                    skips.records, skips.times)
                reporter.corrupt_skipped = skips.times
                batch = pipeline.to_global_arrays(_model_inputs(host_batch), mesh, batch_spec)
                state.model_state, state.optimizer_state, step_metrics = train_step(
                    state.model_state, state.optimizer_state, batch, loss_lpips, jnp.uint32(step))
                reporter.push(step, step_metrics)
                done = step + 1
                # On a preemption notice (TPU maintenance, spot VMs) every host saves this step and exits.
                preempted = checkpointer.reached_preemption(done)
                is_last = done == end_step or preempted
                if checkpointer.should_save(done) or is_last:
                    reporter.flush()  # a non-finite step raises here, before anything is written
                    checkpointer.save(done, state.model_state, state.optimizer_state, data_iterator=iterator,
                                      progress=dict(data_stage=stage.index), force=is_last)
                if config.eval.every and (done % config.eval.every == 0 or is_last):
                    reporter.flush()
                    values, grid = evaluate(config, eval_step, state.model_state, eval_lpips, mesh, rules)
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
