"""The codec between videos and what the diffusion model denoises: the pixels themselves, or Wan-VAE latents.

The diffusion model, the trainer and the sampler see only a `Codec`, so they are the same code
in pixel space (`tiny`) and in latent space (the published variants). `config.codec` of
configs/mvdiffusion.py picks one:

    config.codec = dict(kind="identity")                        # pixel space
    config.codec = dict(kind="wan_vae", checkpoint=DIR, vae=...) # a Wan VAE's normalised latents

`checkpoint` is a diffusers `AutoencoderKLWan` folder or a Wan pipeline folder (its `vae/`);
`vae`, if present, holds the architecture the config expects (diffusers' config.json fields,
plus dtype and param_dtype), and a checkpoint of another architecture is an error.

Shapes: video (B, F, H, W, 3) in [-1, 1] <-> latents (B, F', H', W', C) with
F' = 1 + (F - 1) / frame_stride (the first frame is encoded alone: Wan's VAE is causal in time),
H' = H / spatial_stride, W' = W / spatial_stride, C = latent_channels (`latent_shape`).
`encode` is deterministic (the posterior's mean) and `decode` returns [-1, 1].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from vfusion3d_jax import errors
from vfusion3d_jax.models.convert import CheckpointMismatchError
from vfusion3d_jax.models.wan import convert
from vfusion3d_jax.models.wan.vae import WanVAE, abstract_wan_vae

CODEC_KINDS = ("identity", "wan_vae")
VIDEO_CHANNELS = 3  # RGB


class Codec(nnx.Module):
    """The interface: `encode` (B, F, H, W, 3) in [-1, 1] -> latents (B, F', H', W', latent_channels),
    `decode` back, and how shapes map (`frame_stride`, `spatial_stride`, `latent_shape`)."""

    @property
    def latent_channels(self) -> int:
        raise NotImplementedError

    @property
    def frame_stride(self) -> int:
        raise NotImplementedError

    @property
    def spatial_stride(self) -> int:
        raise NotImplementedError

    def encode(self, video: jax.Array) -> jax.Array:
        raise NotImplementedError

    def decode(self, latents: jax.Array) -> jax.Array:
        raise NotImplementedError

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(F', H', W', C) of the latents of a video of `num_frames` frames of height x width pixels.

        A video that does not map exactly (frames beyond the last full group, pixels beyond the
        last full latent cell) is an error rather than silently cropped.
        """
        if num_frames < 1 or (num_frames - 1) % self.frame_stride:
            raise ValueError(f"videos of {num_frames} frames do not encode exactly: this codec needs 1 + "
                             f"{self.frame_stride}·k frames (e.g. {1 + 4 * self.frame_stride})")
        if height % self.spatial_stride or width % self.spatial_stride:
            raise ValueError(f"frames of {height}x{width} pixels do not encode exactly: height and width must be "
                             f"multiples of {self.spatial_stride}")
        return (1 + (num_frames - 1) // self.frame_stride, height // self.spatial_stride,
                width // self.spatial_stride, self.latent_channels)

    def _check_video(self, video: jax.Array) -> None:
        if video.ndim != 5 or video.shape[-1] != VIDEO_CHANNELS:
            raise ValueError(f"expected videos (B, F, H, W, {VIDEO_CHANNELS}), got shape {video.shape}")
        self.latent_shape(*video.shape[1:4])


class IdentityCodec(Codec):
    """Pixel space: the latents are the video's RGB values."""

    @property
    def latent_channels(self) -> int:
        return VIDEO_CHANNELS

    @property
    def frame_stride(self) -> int:
        return 1

    @property
    def spatial_stride(self) -> int:
        return 1

    def encode(self, video: jax.Array) -> jax.Array:
        self._check_video(video)
        return video

    def decode(self, latents: jax.Array) -> jax.Array:
        return jnp.clip(latents, -1.0, 1.0)  # the same contract as a VAE's decode


class WanVAECodec(Codec):
    """A Wan VAE's latents, normalised per channel with its `latents_mean` / `latents_std` as the Wan
    pipelines do for the diffusion model: encode = normalise(posterior mean), decode = VAE(denormalise)."""

    def __init__(self, vae: WanVAE):
        if vae.video_channels != VIDEO_CHANNELS:
            raise ValueError(f"the VAE decodes {vae.video_channels}-channel videos, not RGB")
        self.vae = vae

    @property
    def latent_channels(self) -> int:
        return self.vae.z_dim

    @property
    def frame_stride(self) -> int:
        return self.vae.frame_stride

    @property
    def spatial_stride(self) -> int:
        return self.vae.spatial_stride

    def encode(self, video: jax.Array) -> jax.Array:
        self._check_video(video)
        mean, _ = self.vae.encode(video)
        return self.vae.normalize_latents(mean)

    def decode(self, latents: jax.Array) -> jax.Array:
        return self.vae.decode(self.vae.denormalize_latents(latents))


def _kind(config: ml_collections.ConfigDict) -> str:
    if config.kind not in CODEC_KINDS:
        raise errors.InvalidConfigValueError(f"unknown codec kind {config.kind!r} (config.codec.kind); known: "
                                             f"{CODEC_KINDS}")
    return config.kind


def make_codec(config: ml_collections.ConfigDict) -> Codec:
    """The codec of a `config.codec` section, a Wan VAE's weights read from `config.codec.checkpoint`."""
    if _kind(config) == "identity":
        return IdentityCodec()
    if config.get("checkpoint") is None:
        raise errors.InvalidConfigValueError("config.codec.checkpoint is not set").with_hint(
            "point it at a diffusers AutoencoderKLWan folder or a Wan pipeline folder with vae/, e.g. "
            "--config.codec.checkpoint=/path/to/Wan2.1-T2V-1.3B-Diffusers")
    expected = config.get("vae")
    config_json = convert.read_diffusers_config(config.checkpoint, convert.VAE_PIPELINE_SUBFOLDER)
    if expected is not None:
        mismatches = convert.vae_config_mismatches(config_json, expected)
        if mismatches:
            raise CheckpointMismatchError(
                f"the VAE in {config.checkpoint} does not fit config.codec.vae (pick the variant of this VAE, or "
                f"override these fields):\n  " + "\n  ".join(mismatches))
    run = {} if expected is None else {key: expected[key] for key in convert.VAE_RUN_DEFAULTS}
    vae, _ = convert.load_diffusers_vae(config.checkpoint, **run)
    return WanVAECodec(vae)


def abstract_codec(config: ml_collections.ConfigDict) -> Codec:
    """The codec of a `config.codec` section with shapes only (a Wan VAE from `config.codec.vae`, nothing
    allocated): its shape maps, and `nnx.eval_shape` of its encode and decode, need no weights."""
    if _kind(config) == "identity":
        return IdentityCodec()
    return WanVAECodec(abstract_wan_vae(config.vae))
