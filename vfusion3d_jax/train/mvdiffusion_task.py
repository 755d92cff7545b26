"""The multi-view video diffusion model as a training task: flow matching on orbit clips.

`train/trainer.py` runs the loop; this module supplies the model, the loss, the evaluation step
and the image grid (see `trainer.TASKS`). One step, as Wan trains: a batch of orbit clips (frame 0
is the input view) in the codec's space x₀, noise ε, a noise level σ per clip drawn uniformly and
shifted (`config.flow.shift`), x_σ = (1 − σ)·x₀ + σ·ε, and the mean squared error of the model's
velocity against ε − x₀ over the generated frames. A model that predicts the clean orbit
(`config.flow.prediction="clean"`) returns the velocity its prediction implies, so that error is
‖x₀ − x̂₀‖²/σ² for it; `config.flow.loss_space="clean"` scores ‖x₀ − x̂₀‖² instead (σ² times the
velocity error: relatively more weight at high noise, where an orbit's layout is decided).
Classifier-free guidance is learned by dropping the image (frame 0 then is generated too) and
the caption independently (`config.conditioning.image_dropout`, `text_dropout`).

Evaluation on held-out clips: the flow-matching loss at fixed noise levels (a deterministic
validation curve), and orbits sampled from each clip's first frame and caption with the
configured sampler and guidance, scored against the true orbit (PSNR over the generated frames,
silhouette IoU with a white-background threshold); the grid shows truth over sample per clip.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from vfusion3d_jax import diffusion, errors
from vfusion3d_jax.data import pipeline
from vfusion3d_jax.models.mvdiffusion import MultiViewDiffusion, frame_poses
from vfusion3d_jax.models.mvdiffusion import count_parameters as _count_parameters
from vfusion3d_jax.models.wan.codec import Codec, make_codec
from vfusion3d_jax.train import metrics, sharding

NAME = "Multi-view diffusion"
INPUT_KEYS = ("clip_images", "clip_masks", "clip_relative_pose", "caption_bytes")
VALIDATION_SIGMAS = (0.25, 0.5, 0.75)
LOSS_SPACES = ("velocity", "clean")


def create_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> MultiViewDiffusion:
    return MultiViewDiffusion(config, rngs=rngs)


def count_parameters(config: ml_collections.ConfigDict) -> int:
    return _count_parameters(config)


def train_aux(config: ml_collections.ConfigDict):
    return None


def eval_aux(config: ml_collections.ConfigDict):
    return None


def clean_latents(codec: Codec, clip_images: jax.Array) -> jax.Array:
    """Clip frames (B, F, H, W, 3) in [0, 1] → x₀ in the codec's space."""
    return codec.encode(clip_images * 2.0 - 1.0)


def text_embeddings(model: MultiViewDiffusion, caption_bytes: jax.Array, keep_text: jax.Array) -> jax.Array:
    """The caption's tokens, or the empty caption's (zeros) where the text condition is dropped."""
    return model.encode_text(jnp.where(keep_text[:, None], caption_bytes, 0))


def flow_matching_loss(model: MultiViewDiffusion, clean: jax.Array, noise: jax.Array, sigmas: jax.Array,
                       relative_pose: jax.Array, text: jax.Array, keep_image: jax.Array,
                       loss_space: str = "velocity") -> tuple[jax.Array, jax.Array]:
    """Per clip, the mean squared error over the generated frames (B,), and the mean: of the
    velocity, or (`loss_space="clean"`) of the clean sample it implies, x̂₀ = x_σ − σ·v̂: σ²·‖v̂ − v‖²."""
    noisy = diffusion.noisy_sample(clean, noise, sigmas)
    velocity = model(noisy, sigmas, clean[:, 0], relative_pose, text, keep_image)
    frame_errors = jnp.mean(jnp.square(velocity.astype(jnp.float32) - diffusion.velocity_target(clean, noise)),
                            axis=(2, 3, 4))  # (B, F)
    if loss_space == "clean":
        frame_errors = frame_errors * jnp.square(sigmas)[:, None]
    generated = jnp.ones_like(frame_errors).at[:, 0].set(jnp.where(keep_image, 0.0, 1.0))
    per_clip = jnp.sum(frame_errors * generated, axis=1) / jnp.sum(generated, axis=1)
    return per_clip, jnp.mean(per_clip)


def loss_space(config: ml_collections.ConfigDict) -> str:
    """`config.flow.loss_space`, checked (a run trained before it existed: "velocity")."""
    space = config.flow.get("loss_space", "velocity")
    if space not in LOSS_SPACES:
        raise errors.InvalidConfigValueError(f"config.flow.loss_space is {space!r}; choose one of {LOSS_SPACES}")
    return space


def guidance_interval(config: ml_collections.ConfigDict) -> tuple[float, float]:
    """`config.sample.guidance_interval`, checked (a run saved before it existed: every step)."""
    interval = tuple(float(v) for v in config.sample.get("guidance_interval", (0.0, 1.0)))
    if len(interval) != 2 or not 0.0 <= interval[0] <= interval[1] <= 1.0:
        raise errors.InvalidConfigValueError(
            f"config.sample.guidance_interval is {interval}; give (low, high) noise levels, 0 ≤ low ≤ high ≤ 1")
    return interval


def loss_fn(config: ml_collections.ConfigDict):
    """`(model, batch, key, aux) → (loss, terms)` of one flow-matching step."""
    conditioning, shift, space = config.conditioning, config.flow.shift, loss_space(config)
    codec = make_codec(config.codec)  # a VAE's weights are read once, here

    def loss(model: MultiViewDiffusion, batch, key, aux):
        noise_key, sigma_key, image_key, text_key = jax.random.split(key, 4)
        clean = clean_latents(codec, batch["clip_images"])
        batch_size = clean.shape[0]
        sigmas = diffusion.training_sigmas(sigma_key, (batch_size,), shift)
        noise = jax.random.normal(noise_key, clean.shape, jnp.float32)
        keep_image = jax.random.uniform(image_key, (batch_size,)) >= conditioning.image_dropout
        keep_text = jax.random.uniform(text_key, (batch_size,)) >= conditioning.text_dropout
        text = text_embeddings(model, batch["caption_bytes"], keep_text)
        poses = frame_poses(batch["clip_relative_pose"], codec.frame_stride)
        _, value = flow_matching_loss(model, clean, noise, sigmas, poses, text, keep_image, space)
        return value, dict(flow_matching=value)

    return loss


def sample_orbits(model: MultiViewDiffusion, config: ml_collections.ConfigDict, first_frame: jax.Array,
                  relative_pose: jax.Array, caption_bytes: jax.Array, noise: jax.Array,
                  keep_image: jax.Array | None = None) -> jax.Array:
    """Orbits (B, F, H, W, C) in the codec's space from their first frames (B, H, W, C), poses and
    captions, with `config.sample`'s sampler, steps and guidance scales (image, then text).

    Guidance nests three predictions: nothing, the image, the image and the caption:
    v = v∅ + g_image·(v_image − v∅) + g_text·(v_image,text − v_image).
    Where `keep_image` (B,) is false (default: true everywhere) the orbit comes from the caption
    alone: the image is dropped from every prediction, so the image term vanishes and the text term
    guides against the unconditional one, v = v∅ + g_text·(v_text − v∅); frame 0 is generated too.

    `config.sample.init_strength` < 1 starts from the input view copied to every frame and noised
    to σ₀ ≤ init_strength, with the schedule's last steps (image-to-image, as SDEdit): the sample
    keeps the copy's coarse layout and the model redraws the rest. `noise` is then the ε of that
    start; orbits without an image start from the zero (mid-grey) frame.
    """
    settings = config.sample
    schedule = (diffusion.unipc_flow_schedule if settings.sampler == "unipc" else diffusion.flow_euler_schedule)(
        settings.num_steps, config.flow.shift)
    batch_size = first_frame.shape[0]
    keep_image = jnp.ones(batch_size, bool) if keep_image is None else jnp.asarray(keep_image, bool)
    kept = keep_image[:, None, None, None]
    initial, strength = noise, settings.get("init_strength", 1.0)
    if strength < 1.0:
        schedule = diffusion.from_strength(schedule, strength)
        copies = jnp.broadcast_to(jnp.where(kept, first_frame, 0.0)[:, None], noise.shape)
        initial = diffusion.noisy_sample(copies, noise, jnp.full((batch_size,), schedule.sigmas[0], jnp.float32))
    # The captions' tokens are the same at every step: encoded once, outside the sampler's scan.
    empty = model.encode_text(jnp.zeros_like(caption_bytes))
    text = model.encode_text(caption_bytes)
    graphdef, state = nnx.split(model)
    conditions = [dict(keep=jnp.zeros(batch_size, bool), text=empty),
                  dict(keep=keep_image, text=empty),
                  dict(keep=keep_image, text=text)]

    def model_velocity(noisy, timestep, *, keep, text):
        model = nnx.merge(graphdef, state, copy=True)  # fresh Variables inside the sampler's scan
        copies = noisy.shape[0] // batch_size
        sigmas = jnp.full((noisy.shape[0],), timestep / diffusion.schedules.NUM_TRAIN_TIMESTEPS)
        first = jnp.concatenate([first_frame] * copies)
        pose = jnp.concatenate([relative_pose] * copies)
        return model(noisy, sigmas, first, pose, text, keep)

    velocity = diffusion.guided_velocity(model_velocity, conditions, [settings.image_guidance, settings.text_guidance],
                                         guidance_interval(config))
    orbits = diffusion.SAMPLERS[settings.sampler](velocity, initial, schedule)
    return orbits.at[:, 0].set(jnp.where(kept, first_frame, orbits[:, 0]))  # the input view, exactly


def make_eval_step(config: ml_collections.ConfigDict, model_graphdef, mesh: jax.sharding.Mesh,
                   rules: sharding.LogicalRules):
    """The jitted evaluation: validation losses at fixed noise levels, and sampled orbits scored
    against the truth (PSNR and silhouette IoU over the generated frames)."""
    codec, space = make_codec(config.codec), loss_space(config)

    def eval_step(model_state, batch, aux):
        model = nnx.merge(model_graphdef, model_state)
        clean = clean_latents(codec, batch["clip_images"])
        batch_size = clean.shape[0]
        key = jax.random.key(config.eval.seed)
        noise = jax.random.normal(key, clean.shape, jnp.float32)
        keep = jnp.ones(batch_size, bool)
        text = text_embeddings(model, batch["caption_bytes"], keep)
        poses = frame_poses(batch["clip_relative_pose"], codec.frame_stride)
        values = {}
        for sigma in VALIDATION_SIGMAS:
            values[f"loss_sigma_{sigma:g}"], _ = flow_matching_loss(
                model, clean, noise, jnp.full((batch_size,), sigma), poses, text, keep, space)
        orbits = sample_orbits(model, config, clean[:, 0], poses, batch["caption_bytes"],
                               jax.random.normal(jax.random.fold_in(key, 1), clean.shape, jnp.float32))
        pixels = jnp.clip((codec.decode(orbits) + 1.0) / 2.0, 0.0, 1.0)
        truth = batch["clip_images"]
        generated = (slice(None), slice(1, None))
        flat = lambda x: x[generated].reshape((-1,) + x.shape[2:])
        values["psnr"] = metrics.psnr(flat(pixels), flat(truth)).reshape(batch_size, -1).mean(axis=1)
        silhouette = metrics.silhouettes(flat(pixels))[..., None].astype(jnp.float32)
        values["iou"] = metrics.silhouette_iou(silhouette, flat(batch["clip_masks"])).reshape(batch_size, -1).mean(1)
        return values, pixels

    return sharding.jit_eval_step(eval_step, mesh, rules)


def eval_grid(host_batch: dict[str, np.ndarray], samples: np.ndarray, rows: int) -> np.ndarray:
    """Per clip: the true orbit over the sampled one (frame 0 is the input in both)."""
    strips = []
    for truth, sample in list(zip(host_batch["clip_images"], samples))[:rows]:
        strips.append(np.concatenate([np.concatenate(list(truth), axis=1), np.concatenate(list(sample), axis=1)]))
    return np.concatenate(strips)


def summarize_eval(means: dict[str, float], config: ml_collections.ConfigDict) -> dict[str, float]:
    return means


def eval_data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Held-out clips: fixed seed, the held-out glob only, no hue changes."""
    return pipeline.held_out_config(config.data, config.eval.glob, batch_size=config.eval.batch_size,
                                    seed=config.eval.seed)
