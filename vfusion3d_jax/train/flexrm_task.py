"""FlexRM as a training task: its model, loss, evaluation step and image grid.

`train/trainer.py` runs one loop for every model; a task module supplies what differs (see
`trainer.TASKS`). FlexRM's step: a batch of (V input views with their cameras and a prefix mask,
K target views) → planes → the K target views (or their patches, exactly: `target_patch_cameras`
at the patch side) rendered by the stage's renderer → the LRM's loss (`losses.lrm_loss`: MSE +
LPIPS + the mask loss, i.e. rendered alpha vs `target_masks`, + triplane TV; per-source weights).

The renderer is a stage option (`STAGE_OPTIONS`: `config.train.stages.<stage>.renderer`), so a
run goes NeRF first ("nerf": `FlexRM.render_nerf`, the LRM's volume rendering of the planes),
then Gaussians ("gaussians": the head's Gaussians drawn by the JAX rasteriser), as Flex3D does;
each renderer compiles its own step.

Robustness to generated views: with probability `config.train.input_noise.probability` per
example, Gaussian noise of std `input_noise.std` on its valid non-reference input views
(`add_input_noise`).

The rasteriser's buffers have fixed capacities (`config.splatting`); an image that needs more is
incomplete. Every Gaussian step reports the largest Gaussian-tile pair count and tile load of
its renders and how many renders overflowed; `step_monitor` turns an overflow into a warning
that names the setting to raise, counted in the metrics (`splat_overflow_steps`), or, with
`config.train.splat_overflow = "stop"`, into an error that ends the run.

Evaluation renders held-out views with the Gaussians, deterministically, from the first
`config.eval.num_input_views` input views: PSNR, SSIM, LPIPS (at 32 px and more), foreground
PSNR and silhouette IoU (`metrics.image_metrics`, as the LRM's); the grid shows input views |
targets | renders per object.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from vfusion3d_jax import errors
from vfusion3d_jax.models import flexrm
from vfusion3d_jax.models.flexrm import FlexRM
from vfusion3d_jax.rendering import splatting
from vfusion3d_jax.train import losses, lrm_task, metrics, sharding

NAME = "FlexRM"
INPUT_KEYS = ("input_images", "input_cameras", "input_mask", "target_images", "target_masks", "target_cameras",
              "target_patch_cameras", "is_synthetic")
# Stage fields that are the loss's options, not data fields (trainer.make_stages).
STAGE_OPTIONS = ("renderer",)
RENDERERS = ("nerf", "gaussians")
SPLAT_OVERFLOW = ("warn", "stop")

# The LPIPS weights of the loss and of the evaluation: as the LRM's.
train_aux = lrm_task.train_aux
eval_aux = lrm_task.eval_aux


def create_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> FlexRM:
    # The trainer builds the model first: a bad view count or renderer fails here, before any compile.
    buckets = tuple(config.model.view_buckets)
    if config.data.num_input_views not in buckets:
        raise errors.InvalidConfigValueError(
            f"config.data.num_input_views must be a view bucket {buckets}, got {config.data.num_input_views}")
    for name, stage in config.train.stages.items():
        if stage.get("renderer", "gaussians") not in RENDERERS:
            raise errors.InvalidConfigValueError(
                f"config.train.stages.{name}.renderer must be one of {RENDERERS}, got {stage.renderer!r}")
    return FlexRM(config.model, rngs=rngs)


def count_parameters(config: ml_collections.ConfigDict) -> int:
    return flexrm.count_parameters(config.model)


def input_views(batch: dict[str, jax.Array]) -> jax.Array:
    """The batch's input views (B, V, H, W, 3) → the model's (B, V, 3, H, W)."""
    return jnp.moveaxis(batch["input_images"], -1, 2)


def add_input_noise(key: jax.Array, images: jax.Array, view_mask: jax.Array, probability: float,
                    std: float) -> jax.Array:
    """Views (B, V, ...) in [0, 1] with Gaussian noise (std `std`, clipped back to [0, 1]) on the
    valid (`view_mask` (B, V)) views after the first, for each example with probability
    `probability`; the reference view 0 and the masked views are returned untouched."""
    choose_key, noise_key = jax.random.split(key)
    chosen = jax.random.uniform(choose_key, images.shape[:1]) < probability
    noisy_views = chosen[:, None] & view_mask.astype(bool) & (jnp.arange(images.shape[1]) > 0)
    noisy = jnp.clip(images + std * jax.random.normal(noise_key, images.shape, images.dtype), 0.0, 1.0)
    return jnp.where(noisy_views.reshape(noisy_views.shape + (1,) * (images.ndim - 2)), noisy, images)


def splat_report(info: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Step metrics of the rasteriser's capacity report (each (B, M)): the largest Gaussian-tile
    pair count and Gaussians in a tile over the renders, and how many renders overflowed."""
    return dict(splat_num_intersections=jnp.max(info["num_intersections"]).astype(jnp.float32),
                splat_max_tile_count=jnp.max(info["max_tile_count"]).astype(jnp.float32),
                splat_overflow=jnp.sum(info["overflow"]).astype(jnp.float32))


def loss_fn(config: ml_collections.ConfigDict, renderer: str = "gaussians"):
    """`(model, batch, key, lpips_params) → (loss, terms)` of one training step, rendering the
    target views (their patches) with `renderer` ("nerf" or "gaussians")."""
    if renderer not in RENDERERS:
        raise errors.InvalidConfigValueError(f"a stage's renderer must be one of {RENDERERS}, got {renderer!r}")
    train_config = config.train
    options = lrm_task.render_options(config, deterministic=False)
    settings = flexrm.splat_settings(config)

    def loss(model: FlexRM, batch, key, lpips_params):
        noise_key, background_key, render_key = jax.random.split(key, 3)
        images, mask = input_views(batch), batch["input_mask"]
        if train_config.input_noise.probability > 0 and train_config.input_noise.std > 0:
            images = add_input_noise(noise_key, images, mask, train_config.input_noise.probability,
                                     train_config.input_noise.std)
        targets, background = batch["target_images"], None
        if train_config.random_background:
            background = jax.random.uniform(background_key, (targets.shape[0], 3))
            targets = lrm_task.recomposite(targets, batch["target_masks"], background)
        planes = model.forward_planes(images, batch["input_cameras"], mask)
        cameras, side = batch["target_patch_cameras"], targets.shape[2]
        report = {}
        if renderer == "nerf":
            rendered = model.render_nerf(planes, cameras, resolution=side, options=options, key=render_key,
                                         background=background)
        else:
            rgb, alpha, info = flexrm.render_gaussians(model.gaussians(planes), cameras, side, settings, background)
            rendered = dict(rgb=rgb, opacity=alpha)
            report = splat_report(info)
        rendered["planes"] = planes
        total, terms = losses.lrm_loss(rendered, targets, batch["target_masks"], batch["is_synthetic"],
                                       lpips_params=lpips_params, config=train_config.loss)
        return total, dict(terms, **report)

    return loss


class SplatOverflowMonitor:
    """The trainer's per-step hook: an overflowing Gaussian step is logged as a warning naming the
    setting to raise and counted (`splat_overflow_steps` in the step's metrics), or, with
    `config.train.splat_overflow = "stop"`, raises `splatting.SplatCapacityError`."""

    def __init__(self, config: ml_collections.ConfigDict):
        if config.train.splat_overflow not in SPLAT_OVERFLOW:
            raise errors.InvalidConfigValueError(f"config.train.splat_overflow must be one of {SPLAT_OVERFLOW}, got "
                             f"{config.train.splat_overflow!r}")
        self.stop = config.train.splat_overflow == "stop"
        self.settings = flexrm.splat_settings(config)
        self.overflow_steps = 0

    def __call__(self, step: int, values: dict[str, float]) -> None:
        if "splat_overflow" not in values:  # a NeRF step
            return
        if values["splat_overflow"] > 0:
            self.overflow_steps += 1
            message = f"training step {step}: {int(values['splat_overflow'])} Gaussian render(s) incomplete"
            try:
                splatting.check_capacity(dict(num_intersections=values["splat_num_intersections"],
                                              max_tile_count=values["splat_max_tile_count"]), self.settings)
            except splatting.SplatCapacityError as error:
                message += f": {error} (--config.splatting.<field>)"
            if self.stop:
                raise splatting.SplatCapacityError(message + "; or set --config.train.splat_overflow=warn")
            logging.warning("%s (%d overflowing steps so far)", message, self.overflow_steps)
        values["splat_overflow_steps"] = float(self.overflow_steps)


def step_monitor(config: ml_collections.ConfigDict) -> SplatOverflowMonitor:
    return SplatOverflowMonitor(config)


def eval_view_mask(config: ml_collections.ConfigDict, view_mask: jax.Array) -> jax.Array:
    """The first `config.eval.num_input_views` views of each example's (all valid) input views."""
    count = config.eval.num_input_views
    if not 1 <= count <= view_mask.shape[1]:
        raise errors.InvalidConfigValueError(
            f"config.eval.num_input_views must be in [1, {view_mask.shape[1]}], got {count}")
    return view_mask.astype(bool) & (jnp.arange(view_mask.shape[1]) < count)


def make_eval_step(config: ml_collections.ConfigDict, model_graphdef, mesh: jax.sharding.Mesh,
                   rules: sharding.LogicalRules):
    """The jitted evaluation: the Gaussians of the first `eval.num_input_views` views drawn at the
    full target cameras; per view PSNR, SSIM, LPIPS, foreground PSNR and silhouette IoU, per
    example whether a render overflowed the rasteriser. Metrics come back replicated; the grid's
    panels (the input views as used, then the renders: (B, V + K, h, w, 3)) split by example."""
    settings = flexrm.splat_settings(config)

    def eval_step(model_state, batch, lpips_params):
        model = nnx.merge(model_graphdef, model_state)
        targets, masks = batch["target_images"], batch["target_masks"]
        used = eval_view_mask(config, batch["input_mask"])
        gaussians = model(input_views(batch), batch["input_cameras"], used)
        images, alphas, info = flexrm.render_gaussians(gaussians, batch["target_cameras"], targets.shape[2],
                                                       settings)
        images = jnp.clip(images, 0.0, 1.0)
        flat = lambda z: z.reshape((-1,) + z.shape[2:])
        lpips_params = metrics.lpips_params_for_size(lpips_params, min(targets.shape[2:4]))
        values = metrics.image_metrics(flat(images), flat(targets), lpips_params, opacity=flat(alphas),
                                       masks=flat(masks))
        values["splat_overflow"] = jnp.any(info["overflow"], axis=1).astype(jnp.float32)
        return values, jnp.concatenate([grid_inputs(batch, used, targets.shape[2]), images], axis=1)

    return sharding.jit_eval_step(eval_step, mesh, rules)


def grid_inputs(batch: dict[str, jax.Array], used: jax.Array, size: int) -> jax.Array:
    """The input views (B, V, size, size, 3) as the grid shows them: resized, white where unused."""
    views = batch["input_images"]
    resized = jax.image.resize(views, views.shape[:2] + (size, size, 3), "linear")
    return jnp.where(used[:, :, None, None, None], jnp.clip(resized, 0.0, 1.0), 1.0)


def eval_grid(host_batch: dict[str, np.ndarray], panels: np.ndarray, rows: int) -> np.ndarray:
    """One row per example: the input views the model saw (unused slots white) | target views |
    rendered views; `panels` are the eval step's (inputs then renders)."""
    num_inputs = host_batch["input_images"].shape[1]
    strips = [np.concatenate([*example[:num_inputs], *targets, *example[num_inputs:]], axis=1)
              for example, targets in list(zip(panels, host_batch["target_images"]))[:rows]]
    return np.concatenate(strips)


def summarize_eval(means: dict[str, float], config: ml_collections.ConfigDict) -> dict[str, float]:
    if means.get("splat_overflow", 0) > 0:
        logging.warning("evaluation: %.0f%% of the held-out examples had incomplete Gaussian renders; raise "
                        "--config.splatting.max_intersections / max_per_tile", 100 * means["splat_overflow"])
    return means


def eval_data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The held-out input config: fixed seed, full-image targets at `eval.resolution`, novel views
    only, every input slot filled (the eval step keeps the first `eval.num_input_views`)."""
    data = lrm_task.eval_data_config(config)
    data.min_input_views = data.num_input_views
    return data
