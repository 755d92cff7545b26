"""The triplane LRM as a training task: its model, loss, evaluation step and image grid.

`train/trainer.py` runs one loop for every model; a task module supplies what differs (see
`trainer.TASKS`). The LRM's step: a batch of (source image, source camera, K target views) →
triplanes → render the K target views (or random patches of them) → MSE + LPIPS + opacity +
triplane TV (`losses.lrm_loss`), with VFusion3D's strategies as config data: per-source loss
weights (image-level supervision for synthetic orbits), camera noise injection on synthetic
examples, an optional random background. Its evaluation renders held-out novel views
deterministically: PSNR, SSIM, LPIPS, foreground PSNR, silhouette IoU, the input-swap test and
the source-gradient norm; the grid shows source | targets | renders per object.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from vfusion3d_jax import visualize
from vfusion3d_jax.data import pipeline
from vfusion3d_jax.models import LRM
from vfusion3d_jax.models import count_parameters as _count_parameters
from vfusion3d_jax.rendering import RenderOptions, render_views
from vfusion3d_jax.train import losses, metrics, sharding

NAME = "LRM"
# Arrays the steps read; the rest of a pipeline batch (indices, counters) stays on the host.
INPUT_KEYS = ("source_image", "source_camera", "target_images", "target_masks", "target_cameras",
              "target_patch_cameras", "is_synthetic")


def create_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> LRM:
    return LRM(config.model, rngs=rngs)


def count_parameters(config: ml_collections.ConfigDict) -> int:
    return _count_parameters(config.model)


def train_aux(config: ml_collections.ConfigDict):
    """Host arrays the loss needs besides the batch: the LPIPS network's weights (or None)."""
    return metrics.load_lpips_params(config.train.loss.lpips_net) if losses.uses_lpips(config.train.loss) else None


def eval_aux(config: ml_collections.ConfigDict):
    return metrics.load_lpips_params(metrics.EVAL_LPIPS_NET)


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


def render_options(config: ml_collections.ConfigDict, *, deterministic: bool) -> RenderOptions:
    return RenderOptions(num_coarse=config.render.num_coarse, num_importance=config.render.num_importance,
                         chunk_size=config.train.render_chunk_size, deterministic=deterministic)


def _source_images(batch: dict[str, jax.Array]) -> jax.Array:
    return jnp.moveaxis(batch["source_image"], -1, 1)  # NHWC → the model's NCHW


def loss_fn(config: ml_collections.ConfigDict):
    """`(model, batch, key, lpips_params) → (loss, terms)` of one training step."""
    options = render_options(config, deterministic=False)
    train_config = config.train

    def loss(model: LRM, batch, key, lpips_params):
        noise_key, background_key, render_key = jax.random.split(key, 3)
        source_cameras, render_cameras = batch["source_camera"], batch["target_patch_cameras"]
        if train_config.camera_noise.rotation_deg > 0 or train_config.camera_noise.translation > 0:
            source_cameras, render_cameras = inject_camera_noise(
                noise_key, source_cameras, render_cameras, batch["is_synthetic"], train_config.camera_noise)
        targets, background = batch["target_images"], None
        if train_config.random_background:
            background = jax.random.uniform(background_key, (targets.shape[0], 3))
            targets = recomposite(targets, batch["target_masks"], background)
        rendered = model(_source_images(batch), source_cameras, render_cameras, resolution=targets.shape[2],
                         options=options, key=render_key, background=background)
        return losses.lrm_loss(rendered, targets, batch["target_masks"], batch["is_synthetic"],
                               lpips_params=lpips_params, config=train_config.loss)

    return loss


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


def make_eval_step(config: ml_collections.ConfigDict, model_graphdef, mesh: jax.sharding.Mesh,
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
        model = nnx.merge(model_graphdef, model_state)
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
        lpips_params = metrics.lpips_params_for_size(lpips_params, min(targets.shape[2:4]))
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

    return sharding.jit_eval_step(eval_step, mesh, rules)


def eval_grid(host_batch: dict[str, np.ndarray], renders: np.ndarray, rows: int) -> np.ndarray:
    """One row per example: source | target views | rendered views, all resized to the target size."""
    examples = list(zip(host_batch["source_image"], host_batch["target_images"], renders))[:rows]
    return np.concatenate([visualize.comparison_row(*example) for example in examples])


def summarize_eval(means: dict[str, float], config: ml_collections.ConfigDict) -> dict[str, float]:
    if "retrieval" in means:
        means["retrieval_chance"] = 1.0 / (1 + _num_swaps(config))
    return means


def eval_data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The held-out input config: fixed seed, full-image targets at `eval.resolution`, novel views only."""
    data = pipeline.held_out_config(config.data, config.eval.glob, batch_size=config.eval.batch_size,
                                    seed=config.eval.seed)
    data.num_target_views = config.eval.num_target_views
    data.include_source_in_targets = False
    data.target_resolution = config.eval.resolution
    data.target_resize_range = None
    data.patch_size = None
    return data
