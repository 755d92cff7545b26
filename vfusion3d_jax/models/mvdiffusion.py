"""The multi-view video diffusion model: a Wan transformer that turns one view into an orbit.

    orbit clip (B, F, H, W, C) in the codec's space; frame 0 = the input view
    noise level σ (B,) ──per token: 0 on the kept input frame, σ·1000 elsewhere──▶ timesteps (B, N)
    frame poses (B, F, 3) ──CameraEmbedding (last layer zero)──▶ per-token offsets of temb
    caption bytes (B, L) ──ByteTextEncoder──▶ text tokens (B, L, text_dim) (or umT5 embeddings given)
    ──WanTransformer──▶ velocity ε − x₀ (B, F, H, W, C)

The input view conditions the orbit the way Wan 2.2 TI2V conditions on an image: its frame is
clean (timestep 0) and replaces the noisy frame 0, so the transformer's input channels are those
of the video alone and a pretrained text-to-video checkpoint needs no new input weights. Dropping
the image condition (classifier-free guidance) leaves frame 0 noisy like the rest: the model then
generates the whole orbit from the caption. The camera embedding's output layer starts at zero,
so an imported model computes exactly what it computed before until training moves it.

A model trained from scratch (`tiny`) may also see the input view beside every frame
(`conditioning.input_view_channels`): its channels, and a channel that is 1 where the view is
kept, are concatenated to each frame's (Wan's image-to-video form concatenates a mask and the
image to the latents the same way, there for frame 0 only), so every frame can start from the
input view's pixels instead of finding them through attention. Its transformer then takes
2·C + 1 input channels.

What the transformer predicts (`config.flow.prediction`): Wan predicts the velocity ε − x₀, which
a pretrained checkpoint keeps. A small pixel-space model trained from scratch predicts the clean
orbit x̂₀ instead ("clean"; JiT, Li & He 2025), turned into the velocity (x_σ − x̂₀)/σ that the loss
and the samplers use. To output ε − x₀ the network must reproduce every pixel's noise through all
its layers, an identity that a small, briefly trained network only approximates, and what it
misses is left as speckle in every sample; clean orbits lie on a far smaller set.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from vfusion3d_jax import errors
from vfusion3d_jax.models import layers
from vfusion3d_jax.models.wan.transformer import WanTransformer

POSE_DIM = 3  # azimuth from frame 0, elevation, elevation of frame 0 (degrees)
POSE_HARMONICS = 4
CAPTION_VOCABULARY = 256  # UTF-8 bytes; 0 pads (it never occurs in text)
PREDICTIONS = ("velocity", "clean")  # what the transformer outputs (`config.flow.prediction`)
# The smallest σ that `velocity_from_clean` divides by (JiT's clip of t): below it the velocity of
# a clean-image prediction would amplify that prediction's error without bound.
MIN_VELOCITY_SIGMA = 0.05


def velocity_from_clean(noisy: jax.Array, clean: jax.Array, sigmas: jax.Array) -> jax.Array:
    """The velocity (x_σ − x̂₀) / σ that a prediction x̂₀ of the clean sample implies at x_σ (the flow of
    `diffusion.schedules`: x_σ = x₀ + σ·(ε − x₀)); σ (leading axes) clipped below at MIN_VELOCITY_SIGMA."""
    sigmas = sigmas.reshape(sigmas.shape + (1,) * (noisy.ndim - sigmas.ndim))
    return (noisy - clean) / jnp.maximum(sigmas, MIN_VELOCITY_SIGMA)


def pose_features(relative_pose: jax.Array) -> jax.Array:
    """(…, 3) degrees → (…, 3·2·POSE_HARMONICS): sin and cos of k·angle, k = 1 … POSE_HARMONICS."""
    angles = jnp.deg2rad(relative_pose.astype(jnp.float32))[..., None] * jnp.arange(1, POSE_HARMONICS + 1)
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(relative_pose.shape[:-1] + (-1,))


class CameraEmbedding(nnx.Module):
    """Per-frame pose → Linear → SiLU → Linear (zero-initialised) → an offset of the time embedding."""

    def __init__(self, dim: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.fc1 = layers.dense(POSE_DIM * 2 * POSE_HARMONICS, dim, (None, "embed"), param_dtype=param_dtype, rngs=rngs)
        self.fc2 = nnx.Linear(dim, dim, param_dtype=param_dtype, rngs=rngs,
                              kernel_init=layers.partitioned(nnx.initializers.zeros_init(), "embed", None),
                              bias_init=layers.partitioned(nnx.initializers.zeros_init(), None))

    def __call__(self, relative_pose: jax.Array) -> jax.Array:
        """(B, F, 3) → (B, F, D) in float32 (temb's dtype)."""
        return self.fc2(jax.nn.silu(self.fc1(pose_features(relative_pose))))


class ByteTextEncoder(nnx.Module):
    """A small transformer over a caption's UTF-8 bytes, trained with the diffusion model (`tiny`).

    Padding positions give zero embeddings, as Wan's pipelines zero umT5's output past the
    prompt; an empty caption is therefore the unconditional text.
    """

    def __init__(self, config: ml_collections.ConfigDict, text_dim: int, *, rngs: nnx.Rngs):
        dim = config.dim
        self.token_embedding = nnx.Embed(CAPTION_VOCABULARY, dim, rngs=rngs,
                                         embedding_init=layers.partitioned(nnx.initializers.normal(0.02), None, "embed"))
        self.position_embedding = nnx.Param(layers.partitioned(nnx.initializers.normal(0.02), "tokens", "embed")(
            rngs.params(), (config.max_length, dim), jnp.float32))
        self.blocks = layers.stack_layers(lambda layer_rngs: _TextBlock(dim, config.num_heads, rngs=layer_rngs),
                                          config.num_layers, rngs)
        self.norm = layers.layer_norm(dim, rngs=rngs)
        self.proj = layers.dense(dim, text_dim, ("embed", None), rngs=rngs)

    def __call__(self, caption_bytes: jax.Array) -> jax.Array:
        """caption_bytes (B, L) uint8, zero-padded, L ≤ max_length → (B, L, text_dim)."""
        valid = caption_bytes > 0
        x = self.token_embedding(caption_bytes.astype(jnp.int32))
        x = x + self.position_embedding[: caption_bytes.shape[1]]
        x, _ = layers.scan_layers(self.blocks, x, lambda block, h: block(h, valid))
        return self.proj(self.norm(x)) * valid[..., None]


class _TextBlock(nnx.Module):
    """Pre-norm self-attention (padding masked) and MLP."""

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.norm1 = layers.layer_norm(dim, rngs=rngs)
        self.qkv = layers.dense(dim, 3 * dim, ("embed", "heads"), rngs=rngs)
        self.out = layers.dense(dim, dim, ("heads", "embed"), rngs=rngs)
        self.norm2 = layers.layer_norm(dim, rngs=rngs)
        self.mlp = layers.Mlp(dim, 4 * dim, rngs=rngs)

    def __call__(self, x: jax.Array, valid: jax.Array) -> jax.Array:
        batch, length, dim = x.shape
        q, k, v = jnp.split(self.qkv(self.norm1(x)).reshape(batch, length, 3, self.num_heads, -1), 3, axis=2)
        # Every query sees the valid keys (an empty caption sees itself, so no row is all masked).
        mask = (valid[:, None, None, :] | jnp.eye(length, dtype=bool)[None, None])
        attended = jax.nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], mask=mask)
        x = x + self.out(attended.reshape(batch, length, dim))
        return x + self.mlp(self.norm2(x))


class MultiViewDiffusion(nnx.Module):
    """Wan transformer + camera embedding + (for `tiny`) its own text encoder; `config` is a full
    configs/mvdiffusion.py config (`config.model` the transformer, `config.conditioning` the rest)."""

    def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        conditioning = config.conditioning
        self.transformer = WanTransformer(config.model, rngs=rngs)
        dim = config.model.num_attention_heads * config.model.attention_head_dim
        self.camera_embedding = (CameraEmbedding(dim, param_dtype=jnp.dtype(config.model.param_dtype), rngs=rngs)
                                 if conditioning.camera else None)
        self.text_encoder = (ByteTextEncoder(conditioning.text_encoder, config.model.text_dim, rngs=rngs)
                             if conditioning.text_encoder is not None else None)
        self.input_view_channels = bool(conditioning.get("input_view_channels", False))
        self.prediction = config.flow.get("prediction", "velocity")
        if self.prediction not in PREDICTIONS:
            raise errors.InvalidConfigValueError(
                f"config.flow.prediction is {self.prediction!r}; choose one of {PREDICTIONS}")
        expected = 2 * config.model.out_channels + 1 if self.input_view_channels else config.model.out_channels
        if config.model.in_channels != expected:
            raise ValueError(f"model.in_channels is {config.model.in_channels}, but with out_channels "
                             f"{config.model.out_channels} and conditioning.input_view_channels="
                             f"{self.input_view_channels} the transformer takes {expected}")

    def encode_text(self, caption_bytes: jax.Array) -> jax.Array:
        if self.text_encoder is None:
            raise ValueError("this model has no text encoder (config.conditioning.text_encoder is None): "
                             "pass text embeddings (umT5) instead of caption bytes")
        return self.text_encoder(caption_bytes)

    def __call__(self, noisy: jax.Array, sigmas: jax.Array, first_frame: jax.Array, relative_pose: jax.Array,
                 text: jax.Array, keep_first_frame: jax.Array) -> jax.Array:
        """The velocity (B, F, H, W, C) of an orbit.

        noisy (B, F, H, W, C) at noise levels sigmas (B,); first_frame (B, H, W, C) the clean input
        view, used where keep_first_frame (B,) is true; relative_pose (B, F, 3); text (B, L, text_dim).
        """
        batch, frames = noisy.shape[:2]
        if relative_pose.shape[1] != frames:
            raise ValueError(f"{relative_pose.shape[1]} frame poses for {frames} frames: give one pose per frame "
                             f"of the codec's space (`frame_poses`)")
        keep = keep_first_frame.astype(bool)
        is_first = (jnp.arange(frames) == 0)[None, :] & keep[:, None]  # (B, F)
        video = jnp.where(is_first[:, :, None, None, None], first_frame[:, None].astype(noisy.dtype), noisy)
        current = video  # the kept input frame is clean: the state its velocity is relative to
        grid = self.transformer.token_grid(video.shape)
        frame_timesteps = jnp.where(is_first, 0.0, sigmas[:, None] * 1000.0)  # (B, F)
        tokens_per_frame = grid[1] * grid[2]
        frame_of_token = self._token_frames(frames, grid[0], tokens_per_frame)
        timesteps = frame_timesteps[:, frame_of_token]
        offsets = None if self.camera_embedding is None else self.camera_embedding(relative_pose)[:, frame_of_token]
        if self.input_view_channels:
            shown = keep[:, None, None, None, None]
            view = jnp.where(shown, first_frame[:, None].astype(video.dtype), 0.0)
            video = jnp.concatenate([video, jnp.broadcast_to(view, video.shape),
                                     jnp.broadcast_to(shown.astype(video.dtype), video.shape[:-1] + (1,))], axis=-1)
        output = self.transformer(video, timesteps, text, temb_offset=offsets)
        if self.prediction == "clean":
            return velocity_from_clean(current, output.astype(jnp.float32), sigmas)
        return output

    @staticmethod
    def _token_frames(frames: int, token_frames: int, tokens_per_frame: int) -> np.ndarray:
        """The video frame (the first of its temporal patch) of each token, frame-major token order."""
        stride = frames // token_frames
        return np.repeat(np.arange(token_frames) * stride, tokens_per_frame)


def frame_poses(relative_pose: jax.Array, frame_stride: int) -> jax.Array:
    """Video frames' poses (B, F, 3) → one per frame of a codec that keeps frame 0 and then one frame
    per `frame_stride` (Wan's causal VAE: latent frame k ≥ 1 ends at video frame k·stride)."""
    return relative_pose[:, ::frame_stride]


def abstract_mvdiffusion(config: ml_collections.ConfigDict) -> MultiViewDiffusion:
    """Shapes only: nothing allocated."""
    return nnx.eval_shape(lambda: MultiViewDiffusion(config, rngs=nnx.Rngs(0)))


def count_parameters(config: ml_collections.ConfigDict) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract_mvdiffusion(config), nnx.Param)))
