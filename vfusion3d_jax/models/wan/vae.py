"""The Wan video VAE in Flax NNX, numerically equal to diffusers' `AutoencoderKLWan` (Wan 2.1 and 2.2 forms).

    video (B, F, H, W, 3) in [-1, 1]
      [2.2: patchify, 2 x 2 pixels -> 12 channels]
      ──encoder: causal conv_in; down blocks (residual blocks, 2x spatial and 2x temporal
        downsampling; 2.2: plus an averaging shortcut per level); mid block (residual block,
        attention within each frame, residual block); RMS norm, SiLU, causal conv_out──
      ──quant_conv──▶ mean, logvar (B, F', H', W', z_dim), F' = 1 + (F - 1) / 4
    latent ──post_quant_conv──decoder (the mirror image, upsampling; 2.2: duplicating
        shortcuts)──[2.2: unpatchify]──clamp to [-1, 1]──▶ video (B, 1 + 4 (F' - 1), H, W, 3)

`config` is the `config.codec.vae` of configs/mvdiffusion.py: diffusers' own `config.json`
fields (`vfusion3d_jax.models.wan.convert` reads them from a checkpoint) plus `dtype` and
`param_dtype`. Submodules keep diffusers' names, except the positions inside diffusers'
`nn.Sequential`s. The model is channels-last; `encode_diffusers` and `decode_diffusers` take and
return diffusers' [B, C, F, H, W] and can return its intermediate activations, so a converted
checkpoint can be checked against diffusers tensor by tensor (tests/fixtures/wan_reference).

Causal chunks. diffusers runs the VAE over time in chunks (encoder: the first frame alone,
then 4 frames at a time; decoder: one latent frame at a time), every causal convolution
carrying the last two frames of its input into the next chunk. This port does the same: each
module that carries state takes the `cache` it returned for the previous chunk (None on the
first) and returns the next. After the first chunk the cache has the same shapes every time,
so the later chunks run as one `lax.scan` (one compiled chunk; one chunk's activations alive
at a time). Chunking is not only a memory device: some modules treat the first chunk
differently and so define the model, as in diffusers. The temporal downsampler passes the
first chunk through and then convolves [last frame of the previous chunk, chunk] with stride
2; the temporal upsampler leaves the first latent frame single, and its time convolution
afterwards sees zeros where the first frame was ("Rep"); the 2.2 shortcuts (`average_down`,
`duplicate_up`) act per chunk.

Numerics follow diffusers in float32. The RMS norm is `F.normalize` over channels
(x / max(‖x‖₂, 1e-12)), normalising in float32 whatever the compute dtype; convolutions,
attention and the shortcuts run in `dtype`; mean and logvar (clamped to [-30, 20]) and the
decoded video are returned in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from vfusion3d_jax.models import layers
from vfusion3d_jax.models.wan.transformer import attention

# diffusers' CACHE_T: the frames a causal 3-frame kernel needs before a chunk.
CACHE_FRAMES = 2
# Input frames per encoder chunk after the first, hard-coded in diffusers' `_encode`.
ENCODER_CHUNK_FRAMES = 4
NORMALIZE_EPS = 1e-12  # F.normalize's floor on the channel norm
LOGVAR_RANGE = (-30.0, 20.0)  # DiagonalGaussianDistribution's clamp
RESAMPLE_MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

Dtype = layers.Dtype
Cache = Any  # a pytree of arrays; None before a video's first chunk
Stages = dict[str, jax.Array]


# ----------------------------------------------------------------------------------------------
# Layers.


def _kernel(rngs: nnx.Rngs, shape: tuple[int, ...], param_dtype: Dtype) -> nnx.Param:
    """A convolution kernel (..., C_in, C_out), LeCun-normal; output channels named "channels"."""
    init = layers.partitioned(nnx.initializers.lecun_normal(), *(None,) * (len(shape) - 1), "channels")
    return nnx.Param(init(rngs.params(), shape, param_dtype))


def _bias(rngs: nnx.Rngs, dim: int, param_dtype: Dtype) -> nnx.Param:
    return nnx.Param(layers.partitioned(nnx.initializers.zeros_init(), "channels")(rngs.params(), (dim,), param_dtype))


def pointwise_conv(in_channels: int, out_channels: int, *, dtype: Dtype, param_dtype: Dtype,
                   rngs: nnx.Rngs) -> nnx.Linear:
    """A 1 x 1 (x 1) convolution: on channels-last arrays, a Linear over the channel axis."""
    return layers.dense(in_channels, out_channels, (None, "channels"), dtype=dtype, param_dtype=param_dtype,
                        rngs=rngs)


class CausalConv3d(nnx.Module):
    """diffusers' `WanCausalConv3d`: a Conv3d padded with 2·p_t zero frames in front and p pixels on each side.

    Kernel (kt, kh, kw, C_in, C_out). `__call__(x, history)` convolves one chunk of a longer
    video; `history` holds the input frames before the chunk that the kernel reaches (zeros
    before the video, which is the causal padding itself).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int, int], *,
                 padding: tuple[int, int, int] = (0, 0, 0), stride_t: int = 1, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.front_padding = 2 * padding[0]
        self.spatial_padding = padding[1:]
        self.stride_t = stride_t
        self.dtype = dtype
        self.kernel = _kernel(rngs, (*kernel_size, in_channels, out_channels), param_dtype)
        self.bias = _bias(rngs, out_channels, param_dtype)

    def __call__(self, x: jax.Array, history: jax.Array | None = None) -> jax.Array:
        """x (B, T, H, W, C_in) -> (B, T', H', W', C_out); `history` replaces as many padding frames as it has."""
        front = self.front_padding
        if history is not None:
            x = jnp.concatenate([history.astype(x.dtype), x], axis=1)
            front -= history.shape[1]
        pad_h, pad_w = self.spatial_padding
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel[...].astype(self.dtype), window_strides=(self.stride_t, 1, 1),
            padding=((front, 0), (pad_h, pad_h), (pad_w, pad_w)), dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
        return y + self.bias[...].astype(self.dtype)

    def stream(self, x: jax.Array, history: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """The chunk's convolution and the next chunk's history: the last 2·p_t input frames so far."""
        if history is None:
            history = jnp.zeros((x.shape[0], self.front_padding, *x.shape[2:]), x.dtype)
        return self(x, history), jnp.concatenate([history, x], axis=1)[:, x.shape[1]:]


class FrameConv2d(nnx.Module):
    """The resamplers' 3 x 3 nn.Conv2d, applied to every frame of (B, T, H, W, C); kernel (3, 3, C_in, C_out)."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int,
                 padding: tuple[tuple[int, int], tuple[int, int]], dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.stride = stride
        self.padding = padding
        self.dtype = dtype
        self.kernel = _kernel(rngs, (3, 3, in_channels, out_channels), param_dtype)
        self.bias = _bias(rngs, out_channels, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, frames = x.shape[:2]
        y = jax.lax.conv_general_dilated(
            x.reshape(batch * frames, *x.shape[2:]).astype(self.dtype), self.kernel[...].astype(self.dtype),
            window_strides=(self.stride, self.stride), padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = y + self.bias[...].astype(self.dtype)
        return y.reshape(batch, frames, *y.shape[1:])


class ChannelRMSNorm(nnx.Module):
    """diffusers' `WanRMS_norm`: x / max(‖x‖₂, 1e-12) · sqrt(C) · scale, the norm over channels; no bias.

    Normalises in float32 at least and casts back before the scale, as diffusers does for half inputs.
    """

    def __init__(self, dim: int, *, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.root_dim = dim**0.5
        self.scale = nnx.Param(layers.partitioned(nnx.initializers.ones_init(), "channels")(
            rngs.params(), (dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        compute = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        norm = jnp.sqrt(jnp.sum(compute * compute, axis=-1, keepdims=True))
        normalized = (compute / jnp.maximum(norm, NORMALIZE_EPS)).astype(x.dtype)
        return normalized * self.root_dim * self.scale[...].astype(x.dtype)


class AttentionBlock(nnx.Module):
    """diffusers' `WanAttentionBlock`: one-head self-attention among the pixels of each frame, plus the input."""

    def __init__(self, dim: int, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = ChannelRMSNorm(dim, param_dtype=param_dtype, rngs=rngs)
        self.to_qkv = pointwise_conv(dim, 3 * dim, **kwargs)
        self.proj = pointwise_conv(dim, dim, **kwargs)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, frames, height, width, channels = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(batch * frames, height * width, 1, 3 * channels)
        query, key, value = jnp.split(qkv, 3, axis=-1)
        attended = attention(query, key, value).reshape(x.shape)
        return x + self.proj(attended)


class Resample(nnx.Module):
    """diffusers' `WanResample`: 2x up- or downsampling in space ("...2d"), and in time too ("...3d").

    Upsampling: [time conv to 2C channels, the halves becoming consecutive frames], nearest x2,
    3 x 3 conv to `upsample_out_dim` (default C/2). Downsampling: zero pad right and bottom,
    3 x 3 stride-2 conv, [stride-2 time conv over the previous chunk's last frame and the chunk].
    The temporal forms carry a cache across chunks and treat the first chunk differently (see
    the module docstring).
    """

    def __init__(self, dim: int, mode: str, *, upsample_out_dim: int | None = None, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        if mode not in RESAMPLE_MODES:
            raise ValueError(f"unknown resample mode {mode!r}; known: {RESAMPLE_MODES}")
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = FrameConv2d(dim, upsample_out_dim or dim // 2, stride=1, padding=((1, 1), (1, 1)),
                                        **kwargs)
        else:
            self.resample = FrameConv2d(dim, dim, stride=2, padding=((0, 1), (0, 1)), **kwargs)
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0), **kwargs)
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride_t=2, **kwargs)
        else:
            self.time_conv = None

    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache]:
        if self.mode == "upsample3d":
            x, cache = self._double_frames(x, cache)
        if self.mode.startswith("upsample"):
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest-exact at an integer factor
        x = self.resample(x)
        if self.mode == "downsample3d":
            x, cache = self._halve_frames(x, cache)
        return x, cache

    def _double_frames(self, x: jax.Array, history: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        if history is None:
            # The video's first frame stays single; the time conv never sees it (diffusers' "Rep").
            return x, jnp.zeros((x.shape[0], CACHE_FRAMES, *x.shape[2:]), x.dtype)
        doubled, history = self.time_conv.stream(x, history)
        batch, frames, height, width, _ = x.shape
        doubled = doubled.reshape(batch, frames, height, width, 2, -1).transpose(0, 1, 4, 2, 3, 5)
        return doubled.reshape(batch, 2 * frames, height, width, -1), history

    def _halve_frames(self, x: jax.Array, previous_frame: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        if previous_frame is None:
            return x, x[:, -1:]  # the first chunk passes through
        return self.time_conv(jnp.concatenate([previous_frame, x], axis=1)), x[:, -1:]


class ResidualBlock(nnx.Module):
    """diffusers' `WanResidualBlock`: (RMS norm, SiLU, causal 3x3x3 conv) twice, plus the (1x1x1-projected) input.

    Dropout (identity in diffusers' eval mode) is left out: this port runs inference.
    """

    def __init__(self, in_dim: int, out_dim: int, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = ChannelRMSNorm(in_dim, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = CausalConv3d(in_dim, out_dim, (3, 3, 3), padding=(1, 1, 1), **kwargs)
        self.norm2 = ChannelRMSNorm(out_dim, param_dtype=param_dtype, rngs=rngs)
        self.conv2 = CausalConv3d(out_dim, out_dim, (3, 3, 3), padding=(1, 1, 1), **kwargs)
        self.conv_shortcut = pointwise_conv(in_dim, out_dim, **kwargs) if in_dim != out_dim else None

    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache]:
        history1, history2 = (None, None) if cache is None else cache
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        h, history1 = self.conv1.stream(jax.nn.silu(self.norm1(x)), history1)
        h, history2 = self.conv2.stream(jax.nn.silu(self.norm2(h)), history2)
        return h + shortcut, (history1, history2)


def _run_stream(modules: Sequence[nnx.Module], x: jax.Array, caches: Cache) -> tuple[jax.Array, Cache]:
    """x through `modules` in turn, each `module(x, cache) -> (x, cache)`; caches is None or one per module."""
    caches = (None,) * len(modules) if caches is None else caches
    updated = []
    for module, cache in zip(modules, caches, strict=True):
        x, cache = module(x, cache)
        updated.append(cache)
    return x, tuple(updated)


class MidBlock(nnx.Module):
    """diffusers' `WanMidBlock`: a residual block, then (attention, residual block)."""

    def __init__(self, dim: int, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResidualBlock(dim, dim, **kwargs) for _ in range(2)])
        self.attentions = nnx.List([AttentionBlock(dim, **kwargs)])

    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache]:
        caches = (None,) * len(self.resnets) if cache is None else cache
        x, first = self.resnets[0](x, caches[0])
        updated = [first]
        for attention_block, resnet, resnet_cache in zip(self.attentions, self.resnets[1:], caches[1:], strict=True):
            x, resnet_cache = resnet(attention_block(x), resnet_cache)
            updated.append(resnet_cache)
        return x, tuple(updated)


# ----------------------------------------------------------------------------------------------
# The Wan 2.2 form: shortcuts that average or duplicate, per chunk.


def average_down(x: jax.Array, out_channels: int, factor_t: int, factor_s: int) -> jax.Array:
    """diffusers' `AvgDown3D` on one chunk (B, T, H, W, C): space-to-channels, then means of channel groups.

    Zero frames in front make the chunk's length a multiple of `factor_t` (the first chunk's
    single frame is averaged with a zero frame). Input channel c with offsets (t, y, x) becomes
    channel ((c·ft + t)·fs + y)·fs + x; output channel o is the mean of channels o·g .. (o+1)·g - 1.
    """
    x = jnp.pad(x, ((0, 0), ((-x.shape[1]) % factor_t, 0), (0, 0), (0, 0), (0, 0)))
    batch, frames, height, width, channels = x.shape
    x = x.reshape(batch, frames // factor_t, factor_t, height // factor_s, factor_s, width // factor_s, factor_s,
                  channels)
    x = x.transpose(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(*x.shape[:4], out_channels, -1).mean(axis=-1)


def duplicate_up(x: jax.Array, out_channels: int, factor_t: int, factor_s: int, *, first_chunk: bool) -> jax.Array:
    """diffusers' `DupUp3D` on one chunk: channels repeated, then channels-to-space (`average_down`'s inverse
    order); the first chunk drops its first `factor_t - 1` frames (the first latent frame stays single)."""
    batch, frames, height, width, channels = x.shape
    repeats = out_channels * factor_t * factor_s * factor_s // channels
    x = jnp.repeat(x, repeats, axis=-1).reshape(batch, frames, height, width, out_channels, factor_t, factor_s,
                                                factor_s)
    x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4).reshape(batch, frames * factor_t, height * factor_s, width * factor_s,
                                                    out_channels)
    return x[:, factor_t - 1:] if first_chunk else x


class ResidualDownBlock(nnx.Module):
    """diffusers' `WanResidualDownBlock` (Wan 2.2): residual blocks and a resampler, plus the input's `average_down`."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, *, temporal: bool, downsample: bool,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.out_dim = out_dim
        self.shortcut_factors = (2 if temporal else 1, 2 if downsample else 1)
        self.resnets = nnx.List([ResidualBlock(in_dim if i == 0 else out_dim, out_dim, **kwargs)
                                 for i in range(num_res_blocks)])
        self.downsampler = (Resample(out_dim, "downsample3d" if temporal else "downsample2d", **kwargs)
                            if downsample else None)

    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache]:
        resnet_caches, downsampler_cache = (None, None) if cache is None else cache
        shortcut = average_down(x, self.out_dim, *self.shortcut_factors)
        x, resnet_caches = _run_stream(self.resnets, x, resnet_caches)
        if self.downsampler is not None:
            x, downsampler_cache = self.downsampler(x, downsampler_cache)
        return x + shortcut, (resnet_caches, downsampler_cache)


class ResidualUpBlock(nnx.Module):
    """diffusers' `WanResidualUpBlock` (Wan 2.2): residual blocks and a resampler, plus `duplicate_up` of the input."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, *, temporal: bool, upsample: bool,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.out_dim = out_dim
        self.shortcut_factors = (2 if temporal else 1, 2)
        self.resnets = nnx.List([ResidualBlock(in_dim if i == 0 else out_dim, out_dim, **kwargs)
                                 for i in range(num_res_blocks + 1)])
        self.upsampler = (Resample(out_dim, "upsample3d" if temporal else "upsample2d", upsample_out_dim=out_dim,
                                   **kwargs) if upsample else None)

    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache]:
        resnet_caches, upsampler_cache = (None, None) if cache is None else cache
        block_input = x
        x, resnet_caches = _run_stream(self.resnets, x, resnet_caches)
        if self.upsampler is not None:
            x, upsampler_cache = self.upsampler(x, upsampler_cache)
            x = x + duplicate_up(block_input, self.out_dim, *self.shortcut_factors, first_chunk=cache is None)
        return x, (resnet_caches, upsampler_cache)


class UpBlock(nnx.Module):
    """diffusers' `WanUpBlock` (Wan 2.1): residual blocks, then an optional resampler (in a list, as diffusers')."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, upsample_mode: str | None, *,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResidualBlock(in_dim if i == 0 else out_dim, out_dim, **kwargs)
                                 for i in range(num_res_blocks + 1)])
        self.upsamplers = None if upsample_mode is None else nnx.List([Resample(out_dim, upsample_mode, **kwargs)])

    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache]:
        return _run_stream(list(self.resnets) + list(self.upsamplers or []), x, cache)


# ----------------------------------------------------------------------------------------------
# Encoder and decoder: one chunk each.


class Encoder(nnx.Module):
    """diffusers' `WanEncoder3d` with `z_dim` = 2·z_dim (mean and logvar); 2.1: `down_blocks` is a flat list of
    residual blocks and resamplers, 2.2: one `ResidualDownBlock` per level."""

    def __init__(self, config: ml_collections.ConfigDict, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        dims = [config.base_dim * multiple for multiple in (1, *config.dim_mult)]
        last_level = len(config.dim_mult) - 1
        self.conv_in = CausalConv3d(config.in_channels, dims[0], (3, 3, 3), padding=(1, 1, 1), **kwargs)
        blocks = []
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            downsample = level != last_level
            temporal = downsample and config.temperal_downsample[level]
            if config.is_residual:
                blocks.append(ResidualDownBlock(in_dim, out_dim, config.num_res_blocks, temporal=temporal,
                                                downsample=downsample, **kwargs))
                continue
            for index in range(config.num_res_blocks):
                blocks.append(ResidualBlock(in_dim if index == 0 else out_dim, out_dim, **kwargs))
            if downsample:
                blocks.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d", **kwargs))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(dims[-1], **kwargs)
        self.norm_out = ChannelRMSNorm(dims[-1], param_dtype=param_dtype, rngs=rngs)
        self.conv_out = CausalConv3d(dims[-1], 2 * config.z_dim, (3, 3, 3), padding=(1, 1, 1), **kwargs)

    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache, Stages]:
        """One chunk (B, T, H, W, C_in) -> (B, T', H', W', 2·z_dim), the next cache, every stage's output."""
        conv_in_cache, down_caches, mid_cache, conv_out_cache = (None,) * 4 if cache is None else cache
        down_caches = (None,) * len(self.down_blocks) if down_caches is None else down_caches
        x, conv_in_cache = self.conv_in.stream(x, conv_in_cache)
        stages = {"enc_conv_in": x}
        updated = []
        for index, (block, block_cache) in enumerate(zip(self.down_blocks, down_caches, strict=True)):
            x, block_cache = block(x, block_cache)
            stages[f"enc_down_{index}"] = x
            updated.append(block_cache)
        x, mid_cache = self.mid_block(x, mid_cache)
        stages["enc_mid_block"] = x
        x, conv_out_cache = self.conv_out.stream(jax.nn.silu(self.norm_out(x)), conv_out_cache)
        stages["enc_output"] = x
        return x, (conv_in_cache, tuple(updated), mid_cache, conv_out_cache), stages


class Decoder(nnx.Module):
    """diffusers' `WanDecoder3d`: widths `decoder_base_dim` (default `base_dim`) x reversed `dim_mult`; 2.1's
    upsamplers halve the channels (hence each later level's input C/2), 2.2's keep them."""

    def __init__(self, config: ml_collections.ConfigDict, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        base_dim = config.decoder_base_dim or config.base_dim
        dims = [base_dim * multiple for multiple in (config.dim_mult[-1], *reversed(config.dim_mult))]
        temporal_upsample = tuple(reversed(config.temperal_downsample))
        last_level = len(config.dim_mult) - 1
        self.conv_in = CausalConv3d(config.z_dim, dims[0], (3, 3, 3), padding=(1, 1, 1), **kwargs)
        self.mid_block = MidBlock(dims[0], **kwargs)
        blocks = []
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            upsample = level != last_level
            temporal = upsample and temporal_upsample[level]
            if config.is_residual:
                blocks.append(ResidualUpBlock(in_dim, out_dim, config.num_res_blocks, temporal=temporal,
                                              upsample=upsample, **kwargs))
            else:
                mode = ("upsample3d" if temporal else "upsample2d") if upsample else None
                blocks.append(UpBlock(in_dim // 2 if level > 0 else in_dim, out_dim, config.num_res_blocks, mode,
                                      **kwargs))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = ChannelRMSNorm(dims[-1], param_dtype=param_dtype, rngs=rngs)
        self.conv_out = CausalConv3d(dims[-1], config.out_channels, (3, 3, 3), padding=(1, 1, 1), **kwargs)

    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache, Stages]:
        """One latent frame (B, 1, H, W, z_dim) -> its frames (B, T, H', W', C_out) (T = 1 for the first, else 4)."""
        conv_in_cache, mid_cache, up_caches, conv_out_cache = (None,) * 4 if cache is None else cache
        up_caches = (None,) * len(self.up_blocks) if up_caches is None else up_caches
        x, conv_in_cache = self.conv_in.stream(x, conv_in_cache)
        stages = {"dec_conv_in": x}
        x, mid_cache = self.mid_block(x, mid_cache)
        stages["dec_mid_block"] = x
        updated = []
        for index, (block, block_cache) in enumerate(zip(self.up_blocks, up_caches, strict=True)):
            x, block_cache = block(x, block_cache)
            stages[f"dec_up_{index}"] = x
            updated.append(block_cache)
        x, conv_out_cache = self.conv_out.stream(jax.nn.silu(self.norm_out(x)), conv_out_cache)
        return x, (conv_in_cache, mid_cache, tuple(updated), conv_out_cache), stages


def run_causally(step: Callable[[jax.Array, Cache], tuple[jax.Array, Cache, Stages]], first: jax.Array,
                 rest: jax.Array, *, keep_stages: bool) -> tuple[jax.Array, Stages]:
    """`step` over a video's chunks: `first` (B, T0, ...) alone, then `rest` (N, B, T, ...) as one `lax.scan`
    carrying the cache. Returns the outputs joined along frames and, if kept, every stage's likewise."""
    output, cache, stages = step(first, None)
    outputs = (output, stages if keep_stages else {})
    if rest.shape[0] == 0:
        return outputs

    def chunk_step(cache: Cache, chunk: jax.Array) -> tuple[Cache, tuple[jax.Array, Stages]]:
        output, cache, stages = step(chunk, cache)
        return cache, (output, stages if keep_stages else {})

    _, later = jax.lax.scan(chunk_step, cache, rest)

    def join(first_chunk: jax.Array, later_chunks: jax.Array) -> jax.Array:
        later_chunks = jnp.moveaxis(later_chunks, 0, 1)
        later_chunks = later_chunks.reshape(later_chunks.shape[0], -1, *later_chunks.shape[3:])
        return jnp.concatenate([first_chunk, later_chunks], axis=1)

    return jax.tree.map(join, outputs, later)


# ----------------------------------------------------------------------------------------------
# The model.


def patchify(video: jax.Array, patch_size: int) -> jax.Array:
    """Wan 2.2's pixels-to-channels: (B, F, H, W, C) -> (B, F, H/p, W/p, C·p²), channel (c·p + column)·p + row."""
    batch, frames, height, width, channels = video.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"frames of {height}x{width} pixels do not divide into {patch_size}x{patch_size} patches")
    video = video.reshape(batch, frames, height // patch_size, patch_size, width // patch_size, patch_size, channels)
    return video.transpose(0, 1, 2, 4, 6, 5, 3).reshape(batch, frames, height // patch_size, width // patch_size, -1)


def unpatchify(video: jax.Array, patch_size: int) -> jax.Array:
    """The inverse of `patchify`: (B, F, H, W, C·p²) -> (B, F, H·p, W·p, C)."""
    batch, frames, height, width, _ = video.shape
    video = video.reshape(batch, frames, height, width, -1, patch_size, patch_size)
    return video.transpose(0, 1, 2, 6, 3, 5, 4).reshape(batch, frames, height * patch_size, width * patch_size, -1)


def check_vae_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError for a `config.codec.vae` that this port (or diffusers) cannot run."""
    if tuple(config.attn_scales):
        raise ValueError(f"attn_scales {tuple(config.attn_scales)} must be empty: diffusers' AutoencoderKLWan cannot "
                         f"run attention in its down blocks, and no Wan VAE has any")
    if len(config.temperal_downsample) != len(config.dim_mult) - 1:
        raise ValueError(f"temperal_downsample {tuple(config.temperal_downsample)} needs one entry per downsampling "
                         f"level: {len(config.dim_mult) - 1} for dim_mult {tuple(config.dim_mult)}")
    if 2 ** sum(map(bool, config.temperal_downsample)) != ENCODER_CHUNK_FRAMES:
        raise ValueError(f"temperal_downsample {tuple(config.temperal_downsample)} must halve time twice: the "
                         f"encoder takes frames {ENCODER_CHUNK_FRAMES} at a time, one latent frame per chunk")
    for name in ("latents_mean", "latents_std"):
        if len(config[name]) != config.z_dim:
            raise ValueError(f"{name} has {len(config[name])} values; z_dim is {config.z_dim}")


class WanVAE(nnx.Module):
    """diffusers' `AutoencoderKLWan`; `config` is a `config.codec.vae` of configs/mvdiffusion.py."""

    def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        check_vae_config(config)
        dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype
        self.z_dim = config.z_dim
        self.patch_size = config.patch_size or 1
        self.latents_mean = tuple(config.latents_mean)
        self.latents_std = tuple(config.latents_std)
        self.frame_stride = 2 ** sum(map(bool, config.temperal_downsample))
        self.spatial_stride = 2 ** (len(config.dim_mult) - 1) * self.patch_size
        self.video_channels = config.out_channels // self.patch_size**2
        self.encoder = Encoder(config, **kwargs)
        self.quant_conv = pointwise_conv(2 * config.z_dim, 2 * config.z_dim, **kwargs)
        self.post_quant_conv = pointwise_conv(config.z_dim, config.z_dim, **kwargs)
        self.decoder = Decoder(config, **kwargs)

    def encode(self, video: jax.Array, *, return_intermediates: bool = False
               ) -> tuple[jax.Array, jax.Array] | tuple[jax.Array, jax.Array, Stages]:
        """The posterior's mean and logvar (B, F', H', W', z_dim), float32, of a video (B, F, H, W, C) in [-1, 1].

        F' = 1 + (F - 1) // 4: as in diffusers, frames after the last full chunk of 4 are not
        encoded. With `return_intermediates`, also the encoder's stages (`Encoder`), every chunk's
        output joined along frames.
        """
        if video.shape[1] < 1:
            raise ValueError("cannot encode a video of 0 frames")
        x = video.astype(self.dtype)
        if self.patch_size > 1:
            x = patchify(x, self.patch_size)
        batch, frames = x.shape[:2]
        num_later_chunks = (frames - 1) // ENCODER_CHUNK_FRAMES
        later = x[:, 1:1 + num_later_chunks * ENCODER_CHUNK_FRAMES]
        later = jnp.moveaxis(later.reshape(batch, num_later_chunks, ENCODER_CHUNK_FRAMES, *x.shape[2:]), 1, 0)
        encoded, stages = run_causally(self.encoder, x[:, :1], later, keep_stages=return_intermediates)
        mean, logvar = jnp.split(self.quant_conv(encoded).astype(jnp.float32), 2, axis=-1)
        logvar = jnp.clip(logvar, *LOGVAR_RANGE)
        return (mean, logvar, stages) if return_intermediates else (mean, logvar)

    def decode(self, latent: jax.Array, *, return_intermediates: bool = False
               ) -> jax.Array | tuple[jax.Array, Stages]:
        """The video (B, 1 + 4·(F' - 1), H, W, C), float32, clamped to [-1, 1], of a latent (B, F', H', W', z_dim).

        With `return_intermediates`, also `dec_post_quant_conv` and the decoder's stages (`Decoder`).
        """
        x = self.post_quant_conv(latent.astype(self.dtype))
        later = jnp.moveaxis(x[:, 1:, None], 1, 0)  # one latent frame per chunk
        video, stages = run_causally(self.decoder, x[:, :1], later, keep_stages=return_intermediates)
        if self.patch_size > 1:
            video = unpatchify(video, self.patch_size)
        video = jnp.clip(video.astype(jnp.float32), -1.0, 1.0)
        return (video, {"dec_post_quant_conv": x, **stages}) if return_intermediates else video

    def normalize_latents(self, latent: jax.Array) -> jax.Array:
        """The diffusion model's latents: (z - latents_mean) / latents_std per channel, as the Wan pipelines
        compute it (times 1/std, in float32)."""
        mean, inverse_std = self._latent_statistics()
        return (latent.astype(jnp.float32) - mean) * inverse_std

    def denormalize_latents(self, latent: jax.Array) -> jax.Array:
        """The inverse of `normalize_latents`, applied before `decode` (z / (1/std) + mean, as the pipelines)."""
        mean, inverse_std = self._latent_statistics()
        return latent.astype(jnp.float32) / inverse_std + mean

    def _latent_statistics(self) -> tuple[jax.Array, jax.Array]:
        return (jnp.asarray(self.latents_mean, jnp.float32),
                1.0 / jnp.asarray(self.latents_std, jnp.float32))

    def encode_diffusers(self, video: jax.Array, *, return_intermediates: bool = False
                         ) -> tuple[jax.Array, jax.Array] | tuple[jax.Array, jax.Array, Stages]:
        """`encode` on diffusers' layouts: video [B, C, F, H, W] -> `latent_dist.mean`, `.logvar` [B, z, F', H', W'];
        intermediates as diffusers' hooked modules give them (channels second)."""
        outputs = self.encode(jnp.moveaxis(video, 1, -1), return_intermediates=return_intermediates)
        return jax.tree.map(lambda x: jnp.moveaxis(x, -1, 1), outputs)

    def decode_diffusers(self, latent: jax.Array, *, return_intermediates: bool = False
                         ) -> jax.Array | tuple[jax.Array, Stages]:
        """`decode` on diffusers' layouts: latent [B, z, F', H', W'] -> `decode(latent).sample` [B, C, F, H, W]."""
        outputs = self.decode(jnp.moveaxis(latent, 1, -1), return_intermediates=return_intermediates)
        return jax.tree.map(lambda x: jnp.moveaxis(x, -1, 1), outputs)


def abstract_wan_vae(config: ml_collections.ConfigDict) -> WanVAE:
    """The WanVAE of `config` (a `config.codec.vae`) with shapes only: nothing is allocated."""
    return nnx.eval_shape(lambda: WanVAE(config, rngs=nnx.Rngs(0)))


def count_vae_parameters(config: ml_collections.ConfigDict) -> int:
    """Number of parameters of the WanVAE of `config`, without allocating them."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract_wan_vae(config), nnx.Param)))
