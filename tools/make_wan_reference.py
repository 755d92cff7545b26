#!/usr/bin/env python
"""Write the Wan 2.1 / 2.2 reference fixtures with diffusers itself.

The JAX Wan port is tested against these files without torch. They are made here, by
diffusers' own classes (`WanTransformer3DModel`, `AutoencoderKLWan`,
`FlowMatchEulerDiscreteScheduler`, `UniPCMultistepScheduler`) with tiny random weights,
so nothing of vfusion3d_jax is on the reference path: this script imports only torch,
numpy, safetensors and diffusers. What every file and key holds is in
tests/fixtures/wan_reference/README.md.

    pip install 'diffusers>=0.42.1' torch numpy safetensors   # or: pip install -e '.[reference]'
    python tools/make_wan_reference.py                        # writes tests/fixtures/wan_reference/
    python tools/make_wan_reference.py --out /tmp/wan_ref     # elsewhere

Every run with the same software on the same CPU writes bit-identical arrays (one CPU
thread, fixed seeds); the self-check at the end reloads each checkpoint with
`from_pretrained` and compares its output with the stored one.
"""

import argparse
import contextlib
import copy
import hashlib
import importlib.metadata
import json
import math
import pathlib
import platform
import shutil

import diffusers
import numpy as np
import safetensors
import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
    WanTransformer3DModel,
)

DEFAULT_OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "wan_reference"
DTYPES = {"float32": torch.float32, "float64": torch.float64}
BATCH_TIMESTEPS = [937.5, 312.25]  # one per example: the batch must not share a timestep

# Tiny transformers: 2 heads of 16 channels. The head size 16 splits the rotary
# channels unevenly (t 8, h 4, w 4), as the real 128 does (44, 42, 42), so a wrong
# split order cannot pass; latents are 8 x 6 (not square) so H and W cannot be swapped.
TRANSFORMER_COMMON = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    text_dim=16,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=32,
)
TRANSFORMERS = {
    # Wan 2.1 text-to-video: 16 latent channels in and out.
    "t2v": dict(TRANSFORMER_COMMON, in_channels=16, out_channels=16),
    # Wan 2.1 image-to-video: noisy latents (16) + mask (4) + image-condition latents (16);
    # the image tokens get their own K/V projections (added_kv_proj_dim = inner dim, as released).
    "i2v": dict(TRANSFORMER_COMMON, in_channels=36, out_channels=16, image_dim=24, added_kv_proj_dim=32),
    # Wan 2.2 TI2V-5B shape: 48 latent channels (the 2.2 VAE's z_dim), per-token timesteps.
    "ti2v": dict(TRANSFORMER_COMMON, in_channels=48, out_channels=48),
}
LATENT_FRAMES, LATENT_HEIGHT, LATENT_WIDTH = 3, 8, 6
TEXT_TOKENS_T2V = 7
# WanAttnProcessor hard-codes the text length of the image-to-video form: the last 512
# tokens of the concatenated context are text, the rest image. I2V text must be 512 long.
TEXT_TOKENS_I2V = 512
IMAGE_TOKENS = 4

# The real Wan 2.1 VAE's latent statistics (diffusers' defaults, 16 channels).
WAN21_LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
WAN21_LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916]
VAES = {
    # Wan 2.1 pattern (base 96, z 16, dim_mult [1, 2, 4, 4]) shrunk: 8x spatial, 4x temporal
    # compression; z stays 16 so the I2V sampling fixture can use it with the I2V transformer.
    "vae_2_1": dict(
        base_dim=4, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True], dropout=0.0,
        latents_mean=WAN21_LATENTS_MEAN, latents_std=WAN21_LATENTS_STD,
    ),
    # Wan 2.2 pattern (base 160, decoder 256, z 48, residual blocks, patch 2 -> 12 channels):
    # 16x spatial (2 from the patchify, 8 from the encoder), 4x temporal.
    "vae_2_2": dict(
        base_dim=4, decoder_base_dim=3, z_dim=8, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
        attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0,
        latents_mean=[-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557],
        latents_std=[0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.499, 0.4818, 0.5013],
        is_residual=True, in_channels=12, out_channels=12, patch_size=2,
        scale_factor_temporal=4, scale_factor_spatial=16,
    ),
}
# 9 frames = frame 0 + two chunks of 4, so every causal cache path runs (after a 1-frame and
# after a 4-frame chunk; the decoder's first, "Rep" and cached temporal upsampling). One
# example each, to keep the files small (the transformers and sampling cover batches).
VIDEO_SHAPES = {"vae_2_1": (1, 3, 9, 16, 24), "vae_2_2": (1, 3, 9, 32, 32)}

# The scheduler of Wan-AI/Wan2.1-T2V-*-Diffusers (scheduler/scheduler_config.json).
UNIPC_WAN = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    trained_betas=None, solver_order=2, prediction_type="flow_prediction", thresholding=False,
    dynamic_thresholding_ratio=0.995, sample_max_value=1.0, predict_x0=True, solver_type="bh2",
    lower_order_final=True, disable_corrector=[], solver_p=None, use_karras_sigmas=False,
    use_exponential_sigmas=False, use_beta_sigmas=False, use_flow_sigmas=True, flow_shift=3.0,
    timestep_spacing="linspace", steps_offset=0, final_sigmas_type="zero", rescale_betas_zero_snr=False,
)
SCHEDULERS = {
    "euler_shift3": (FlowMatchEulerDiscreteScheduler, dict(num_train_timesteps=1000, shift=3.0)),
    "euler_shift5": (FlowMatchEulerDiscreteScheduler, dict(num_train_timesteps=1000, shift=5.0)),
    "unipc_shift3": (UniPCMultistepScheduler, UNIPC_WAN),
    "unipc_shift5": (UniPCMultistepScheduler, dict(UNIPC_WAN, flow_shift=5.0)),
}
SCHEDULER_STEPS = 10
SAMPLING_STEPS = 6
GUIDANCE_SCALE = 5.0


@contextlib.contextmanager
def float64_throughout():
    """Make `Tensor.float()` leave float64 tensors alone, so a float64 run stays float64.

    diffusers upcasts "to float32" with `.float()` (FP32LayerNorm, the blocks' residual
    adds and modulation, WanUpsample, the rotary tables); on a float64 model that is a
    downcast, and the float64 reference would carry float32 rounding. Under this context
    `.float()` is the identity on float64 tensors and unchanged on everything else.
    """
    original = torch.Tensor.float

    def float_keeping_float64(self, *args, **kwargs):
        if self.dtype == torch.float64:
            return self
        return original(self, *args, **kwargs)

    torch.Tensor.float = float_keeping_float64
    try:
        yield
    finally:
        torch.Tensor.float = original


@torch.no_grad()
def randomize_parameters_(model, seed):
    """Give every parameter a nonzero random value, including those diffusers sets to 0 or 1.

    Matrices and kernels: N(0, 1/fan_in). Norm scales: 1 + N(0, 0.2^2). Modulation
    tables: N(0, 0.3^2). Biases and everything else: N(0, 0.1^2).
    """
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "scale_shift_table":
            value = 0.3 * noise
        elif leaf == "gamma" or ("norm" in name and leaf == "weight"):
            value = 1.0 + 0.2 * noise
        elif parameter.ndim >= 2:
            value = noise / math.sqrt(parameter[0].numel())
        else:
            value = 0.1 * noise
        parameter.copy_(value.to(parameter.dtype))


def float64_copy(model_class, model):
    """The same weights in float64, built under `float64_throughout` so that buffers made at
    construction (the rotary cos/sin tables) are float64 values, not float32 ones upcast."""
    with float64_throughout():
        copy64 = model_class.from_config(model.config)
    copy64.load_state_dict(model.state_dict())
    return copy64.double().eval()


def to_numpy(tensor):
    return tensor.detach().cpu().numpy().copy()


# ----------------------------------------------------------------------------- transformers


def transformer_inputs(name, config, seed):
    rng = np.random.default_rng(seed)
    batch = 2
    shape = (batch, config["in_channels"], LATENT_FRAMES, LATENT_HEIGHT, LATENT_WIDTH)
    text_tokens = TEXT_TOKENS_I2V if name == "i2v" else TEXT_TOKENS_T2V
    inputs = {
        "hidden_states": rng.standard_normal(shape).astype(np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, text_tokens, config["text_dim"])).astype(np.float32),
    }
    if name == "ti2v":
        # Wan 2.2 expand_timesteps: one timestep per token, the conditioning (first latent)
        # frame's tokens at 0 and the rest at t, flattened in the (frame, h, w) token order.
        p_t, p_h, p_w = config["patch_size"]
        first_frame_mask = np.ones((LATENT_FRAMES // p_t, LATENT_HEIGHT // p_h, LATENT_WIDTH // p_w), np.float32)
        first_frame_mask[0] = 0.0
        inputs["timestep"] = np.stack([first_frame_mask.reshape(-1) * t for t in BATCH_TIMESTEPS]).astype(np.float32)
    else:
        inputs["timestep"] = np.array(BATCH_TIMESTEPS, np.float32)
    if name == "i2v":
        inputs["encoder_hidden_states_image"] = rng.standard_normal(
            (batch, IMAGE_TOKENS, config["image_dim"])).astype(np.float32)
    return inputs


def run_transformer(model, inputs, dtype):
    """One forward pass; returns the output and the intermediates caught by forward hooks."""
    captured = {}

    def keep(key):
        def hook(module, args, output):
            captured[key] = output
        return hook

    def keep_rope(module, args, output):
        captured["rotary_cos"], captured["rotary_sin"] = output

    def keep_condition(module, args, output):
        temb, timestep_proj, text, image = output
        captured["condition_temb"] = temb
        captured["condition_timestep_proj"] = timestep_proj
        captured["condition_encoder_hidden_states"] = text
        if image is not None:
            captured["condition_encoder_hidden_states_image"] = image

    def keep_proj_out_input(module, args):
        captured["norm_out"] = args[0]

    hooks = [
        model.patch_embedding.register_forward_hook(keep("patch_embedding")),
        model.rope.register_forward_hook(keep_rope),
        model.condition_embedder.register_forward_hook(keep_condition),
        model.proj_out.register_forward_pre_hook(keep_proj_out_input),
        model.proj_out.register_forward_hook(keep("proj_out")),
    ]
    hooks += [block.register_forward_hook(keep(f"block_{i}")) for i, block in enumerate(model.blocks)]
    try:
        with torch.no_grad():
            kwargs = {key: torch.from_numpy(value).to(dtype) for key, value in inputs.items()}
            captured["output"] = model(**kwargs, return_dict=False)[0]
    finally:
        for hook in hooks:
            hook.remove()
    return {key: to_numpy(value) for key, value in captured.items()}


def make_transformer(name, config, seed, out):
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**config).eval()
    randomize_parameters_(model, seed)
    model.save_pretrained(out / f"transformer_{name}", safe_serialization=True)

    inputs = transformer_inputs(name, config, seed + 1)
    arrays = dict(inputs)
    arrays.update({f"float32/{k}": v for k, v in run_transformer(model, inputs, torch.float32).items()})
    model64 = float64_copy(WanTransformer3DModel, model)
    with float64_throughout():
        arrays.update({f"float64/{k}": v for k, v in run_transformer(model64, inputs, torch.float64).items()})
    if name == "t2v":
        # For comparison only: plain `.double()`, diffusers' float32 casts left in place.
        plain64 = copy.deepcopy(model).double().eval()
        arrays["float64_diffusers_casts/output"] = run_transformer(plain64, inputs, torch.float64)["output"]
    np.savez_compressed(out / f"transformer_{name}.npz", **arrays)
    return model, model64


# ----------------------------------------------------------------------------- VAEs


def attach_vae_recorders(vae, captured):
    """Hooks on the encoder's and decoder's stages. The VAE runs causally in chunks (encoder:
    frame 0, then 4 frames at a time; decoder: one latent frame at a time), so each hook
    fires once per chunk; the chunks are concatenated along the frame axis afterwards.
    The decoder's last two up blocks and its output (full resolution) are left out to keep
    the files small: `decoded` covers them."""

    def keep(key):
        def hook(module, args, output):
            captured.setdefault(key, []).append(output.detach().clone())
        return hook

    encoder, decoder = vae.encoder, vae.decoder
    hooks = [
        encoder.conv_in.register_forward_hook(keep("enc_conv_in")),
        encoder.mid_block.register_forward_hook(keep("enc_mid_block")),
        encoder.register_forward_hook(keep("enc_output")),
        vae.post_quant_conv.register_forward_hook(keep("dec_post_quant_conv")),
        decoder.conv_in.register_forward_hook(keep("dec_conv_in")),
        decoder.mid_block.register_forward_hook(keep("dec_mid_block")),
    ]
    hooks += [b.register_forward_hook(keep(f"enc_down_{i}")) for i, b in enumerate(encoder.down_blocks)]
    hooks += [b.register_forward_hook(keep(f"dec_up_{i}")) for i, b in enumerate(decoder.up_blocks[:2])]
    return hooks


def run_vae(vae, video, latent, dtype):
    captured = {}
    hooks = attach_vae_recorders(vae, captured)
    try:
        with torch.no_grad():
            posterior = vae.encode(torch.from_numpy(video).to(dtype)).latent_dist
            decoded = vae.decode(torch.from_numpy(latent).to(dtype)).sample if latent is not None else None
    finally:
        for hook in hooks:
            hook.remove()
    arrays = {key: to_numpy(torch.cat(chunks, dim=2)) for key, chunks in captured.items()}
    arrays["latent_mean"] = to_numpy(posterior.mean)
    arrays["latent_logvar"] = to_numpy(posterior.logvar)
    if decoded is not None:
        arrays["decoded"] = to_numpy(decoded)
    return arrays


def make_vae(name, config, seed, out):
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(**config).eval()
    randomize_parameters_(vae, seed)
    with torch.no_grad():
        # Keep most decoded values inside (-1, 1), where decode() clamps, so they test something.
        vae.decoder.conv_out.weight.mul_(0.3)
    vae.save_pretrained(out / name, safe_serialization=True)
    vae64 = float64_copy(AutoencoderKLWan, vae)

    rng = np.random.default_rng(seed + 1)
    video = rng.uniform(-1.0, 1.0, VIDEO_SHAPES[name]).astype(np.float32)
    with float64_throughout():
        mean64 = run_vae(vae64, video, None, torch.float64)["latent_mean"]
    # The decoder's input: the float64 posterior mean, rounded once to float32 so that both
    # precisions decode exactly the same numbers.
    latent = mean64.astype(np.float32)

    arrays = {"video": video, "latent": latent}
    arrays.update({f"float32/{k}": v for k, v in run_vae(vae, video, latent, torch.float32).items()})
    with float64_throughout():
        arrays.update({f"float64/{k}": v for k, v in run_vae(vae64, video, latent, torch.float64).items()})
    np.savez_compressed(out / f"{name}.npz", **arrays)
    return vae


# ----------------------------------------------------------------------------- schedulers


def make_schedulers(out, seed):
    rng = np.random.default_rng(seed)
    sample_shape = (2, 4, 2, 4, 3)
    initial_sample = rng.standard_normal(sample_shape).astype(np.float32)
    model_outputs = rng.standard_normal((SCHEDULER_STEPS,) + sample_shape).astype(np.float32)
    arrays = {}
    for name, (scheduler_class, config) in SCHEDULERS.items():
        scheduler = scheduler_class(**config)
        arrays[f"{name}/config"] = np.array(json.dumps(config, sort_keys=True))
        if scheduler_class is FlowMatchEulerDiscreteScheduler:
            # The shifted training schedule (UniPC's table before set_timesteps is DDPM's, unused here).
            arrays[f"{name}/train_sigmas"] = to_numpy(scheduler.sigmas)
        scheduler.set_timesteps(SCHEDULER_STEPS)
        arrays[f"{name}/sigmas"] = to_numpy(scheduler.sigmas)
        arrays[f"{name}/timesteps"] = to_numpy(scheduler.timesteps)
        arrays[f"{name}/step_model_outputs"] = model_outputs
        for dtype_name, dtype in DTYPES.items():
            scheduler = scheduler_class(**config)
            scheduler.set_timesteps(SCHEDULER_STEPS)
            scheduler.set_begin_index(0)
            sample = torch.from_numpy(initial_sample).to(dtype)
            samples = [sample]
            for t, model_output in zip(scheduler.timesteps, model_outputs):
                sample = scheduler.step(torch.from_numpy(model_output).to(dtype), t, sample, return_dict=False)[0]
                samples.append(sample)
            key = "step_samples" if dtype_name == "float32" else "step_samples_float64"
            arrays[f"{name}/{key}"] = np.stack([to_numpy(s) for s in samples])
    np.savez_compressed(out / "schedulers.npz", **arrays)


# ----------------------------------------------------------------------------- sampling


def denoise(model, scheduler, latents, timestep_dtype, set_begin_index, **conditions):
    """pipeline_wan.py's (and pipeline_wan_i2v.py's) denoising loop, in its own arithmetic:
    two passes per step (conditional, unconditional), noise_pred = uncond + g * (cond - uncond),
    then scheduler.step. `condition` (I2V) is concatenated after the latents on the channels.
    The model's timestep is t.expand(B) cast to the run's dtype (for float32 what
    the pipeline passes after the embedding's own `.float()`; for float64 the same numbers)."""
    prompt_embeds = conditions["prompt_embeds"]
    negative_prompt_embeds = conditions["negative_prompt_embeds"]
    image_embeds = conditions.get("image_embeds")
    condition = conditions.get("condition")
    if set_begin_index:
        scheduler.set_begin_index(0)
    trajectory, predictions = [latents], []
    for t in scheduler.timesteps:
        if condition is None:
            latent_model_input = latents
        else:
            latent_model_input = torch.cat([latents, condition], dim=1)
        timestep = t.expand(latents.shape[0]).to(timestep_dtype)
        extra = {} if image_embeds is None else {"encoder_hidden_states_image": image_embeds}
        with torch.no_grad():
            noise_pred = model(hidden_states=latent_model_input, timestep=timestep,
                               encoder_hidden_states=prompt_embeds, return_dict=False, **extra)[0]
            noise_uncond = model(hidden_states=latent_model_input, timestep=timestep,
                                 encoder_hidden_states=negative_prompt_embeds, return_dict=False, **extra)[0]
        noise_pred = noise_uncond + GUIDANCE_SCALE * (noise_pred - noise_uncond)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        trajectory.append(latents)
        predictions.append(noise_pred)
    return (to_numpy(scheduler.timesteps), np.stack([to_numpy(x) for x in trajectory]),
            np.stack([to_numpy(x) for x in predictions]))


def make_sampling_t2v(model32, model64, out, seed):
    rng = np.random.default_rng(seed)
    config = TRANSFORMERS["t2v"]
    batch = 1
    arrays = {
        "initial_latents": rng.standard_normal(
            (batch, config["in_channels"], LATENT_FRAMES, LATENT_HEIGHT, LATENT_WIDTH)).astype(np.float32),
        "prompt_embeds": rng.standard_normal((batch, TEXT_TOKENS_T2V, config["text_dim"])).astype(np.float32),
        "negative_prompt_embeds": rng.standard_normal(
            (batch, TEXT_TOKENS_T2V, config["text_dim"])).astype(np.float32),
        "guidance_scale": np.array(GUIDANCE_SCALE),
    }
    for scheduler_name, (scheduler_class, scheduler_config) in (
            ("unipc", SCHEDULERS["unipc_shift3"]), ("euler", SCHEDULERS["euler_shift3"])):
        arrays[f"{scheduler_name}/config"] = np.array(json.dumps(scheduler_config, sort_keys=True))
        for dtype_name, dtype in DTYPES.items():
            scheduler = scheduler_class(**scheduler_config)
            scheduler.set_timesteps(SAMPLING_STEPS)
            tensors = {k: torch.from_numpy(arrays[k]).to(dtype)
                       for k in ("initial_latents", "prompt_embeds", "negative_prompt_embeds")}
            model = model32 if dtype_name == "float32" else model64
            context = float64_throughout() if dtype_name == "float64" else contextlib.nullcontext()
            with context:
                timesteps, latents, predictions = denoise(
                    model, scheduler, tensors["initial_latents"], dtype, set_begin_index=True,
                    prompt_embeds=tensors["prompt_embeds"], negative_prompt_embeds=tensors["negative_prompt_embeds"])
            arrays[f"{scheduler_name}/{dtype_name}/timesteps"] = timesteps
            arrays[f"{scheduler_name}/{dtype_name}/latents"] = latents
            arrays[f"{scheduler_name}/{dtype_name}/noise_preds"] = predictions
    np.savez_compressed(out / "sampling_t2v.npz", **arrays)


def make_sampling_i2v(model32, model64, vae, out, seed):
    """Wan 2.1 image-to-video as pipeline_wan_i2v.py prepares it (one image, B = 1)."""
    rng = np.random.default_rng(seed)
    config = TRANSFORMERS["i2v"]
    z_dim = vae.config.z_dim
    scale_t = vae.config.scale_factor_temporal
    num_frames = 1 + scale_t * (LATENT_FRAMES - 1)
    height, width = LATENT_HEIGHT * vae.config.scale_factor_spatial, LATENT_WIDTH * vae.config.scale_factor_spatial
    image = rng.uniform(-1.0, 1.0, (1, 3, height, width)).astype(np.float32)

    # prepare_latents: the image as frame 0 then zero frames, encoded (posterior mode),
    # normalised with the VAE's latents_mean / latents_std, after a 4-channel mask that is 1
    # on the first latent frame (its 4 sub-frames) and 0 elsewhere. The VAE runs in float32.
    image_t = torch.from_numpy(image)
    video_condition = torch.cat([image_t.unsqueeze(2), image_t.new_zeros(1, 3, num_frames - 1, height, width)], dim=2)
    with torch.no_grad():
        latent_condition = vae.encode(video_condition).latent_dist.mode()
    latents_mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1)
    latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1)
    normalised = (latent_condition - latents_mean) * latents_std
    mask = torch.ones(1, 1, num_frames, LATENT_HEIGHT, LATENT_WIDTH)
    mask[:, :, list(range(1, num_frames))] = 0
    first_frame_mask = torch.repeat_interleave(mask[:, :, 0:1], dim=2, repeats=scale_t)
    mask = torch.concat([first_frame_mask, mask[:, :, 1:, :]], dim=2)
    mask = mask.view(1, -1, scale_t, LATENT_HEIGHT, LATENT_WIDTH).transpose(1, 2)
    condition = torch.concat([mask, normalised], dim=1)

    arrays = {
        "image": image,
        "vae_latent_condition": to_numpy(latent_condition),
        "condition": to_numpy(condition),
        "initial_latents": rng.standard_normal(
            (1, config["out_channels"], LATENT_FRAMES, LATENT_HEIGHT, LATENT_WIDTH)).astype(np.float32),
        "prompt_embeds": rng.standard_normal((1, TEXT_TOKENS_I2V, config["text_dim"])).astype(np.float32),
        "negative_prompt_embeds": rng.standard_normal((1, TEXT_TOKENS_I2V, config["text_dim"])).astype(np.float32),
        "image_embeds": rng.standard_normal((1, IMAGE_TOKENS, config["image_dim"])).astype(np.float32),
        "guidance_scale": np.array(GUIDANCE_SCALE),
    }
    scheduler_class, scheduler_config = SCHEDULERS["unipc_shift3"]
    arrays["unipc/config"] = np.array(json.dumps(scheduler_config, sort_keys=True))
    for dtype_name, dtype in DTYPES.items():
        scheduler = scheduler_class(**scheduler_config)
        scheduler.set_timesteps(SAMPLING_STEPS)
        tensors = {k: torch.from_numpy(arrays[k]).to(dtype) for k in (
            "initial_latents", "prompt_embeds", "negative_prompt_embeds", "image_embeds", "condition")}
        model = model32 if dtype_name == "float32" else model64
        context = float64_throughout() if dtype_name == "float64" else contextlib.nullcontext()
        with context:
            timesteps, latents, predictions = denoise(
                model, scheduler, tensors.pop("initial_latents"), dtype, set_begin_index=False, **tensors)
        arrays[f"unipc/{dtype_name}/timesteps"] = timesteps
        arrays[f"unipc/{dtype_name}/latents"] = latents
        arrays[f"unipc/{dtype_name}/noise_preds"] = predictions
    np.savez_compressed(out / "sampling_i2v.npz", **arrays)


# ----------------------------------------------------------------------------- checks


def spread(a, b):
    scale = max(float(np.max(np.abs(b))), 1e-30)
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) / scale


def self_check(out):
    """Reload every checkpoint with from_pretrained and compare with the stored arrays."""
    report = []
    for name in TRANSFORMERS:
        model = WanTransformer3DModel.from_pretrained(out / f"transformer_{name}").eval()
        stored = np.load(out / f"transformer_{name}.npz")
        inputs = {k: stored[k] for k in ("hidden_states", "timestep", "encoder_hidden_states",
                                          "encoder_hidden_states_image") if k in stored}
        output = run_transformer(model, inputs, torch.float32)["output"]
        reload_error = float(np.max(np.abs(output - stored["float32/output"])))
        assert reload_error <= 1e-6, (name, reload_error)
        line = (f"transformer_{name}: reload |diff| {reload_error:.2e}; relative max |f32 - f64| "
                f"{spread(stored['float32/output'], stored['float64/output']):.2e}")
        if "float64_diffusers_casts/output" in stored:
            line += (f"; f64 with diffusers' casts vs f64 "
                     f"{spread(stored['float64_diffusers_casts/output'], stored['float64/output']):.2e}")
        report.append(line)
    for name in VAES:
        vae = AutoencoderKLWan.from_pretrained(out / name).eval()
        stored = np.load(out / f"{name}.npz")
        arrays = run_vae(vae, stored["video"], stored["latent"], torch.float32)
        for key in ("latent_mean", "decoded"):
            error = float(np.max(np.abs(arrays[key] - stored[f"float32/{key}"])))
            assert error <= 1e-6, (name, key, error)
        clamped = float(np.mean(np.abs(stored["float64/decoded"]) >= 1.0))
        mean_spread = spread(stored["float32/latent_mean"], stored["float64/latent_mean"])
        decoded_spread = spread(stored["float32/decoded"], stored["float64/decoded"])
        report.append(f"{name}: reload ok; relative max |f32 - f64| latent_mean {mean_spread:.2e}, "
                      f"decoded {decoded_spread:.2e}; decoded values clamped: {clamped:.1%}")
    for name in ("sampling_t2v", "sampling_i2v"):
        stored = np.load(out / f"{name}.npz")
        for scheduler_name in ("unipc", "euler"):
            if f"{scheduler_name}/float32/latents" in stored:
                final32 = stored[f"{scheduler_name}/float32/latents"][-1]
                final64 = stored[f"{scheduler_name}/float64/latents"][-1]
                report.append(f"{name} {scheduler_name}: relative max |f32 - f64| final latents "
                              f"{spread(final32, final64):.2e}")
    return report


def write_manifest(out):
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name not in ("manifest.json", "README.md"))
    file_entries = {
        str(p.relative_to(out)): {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "bytes": p.stat().st_size}
        for p in files
    }
    manifest = {
        "generator": "tools/make_wan_reference.py",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "numpy": np.__version__,
            "safetensors": safetensors.__version__,
            "accelerate": importlib.metadata.version("accelerate"),
        },
        "files": file_entries,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT,
                        help="output folder (default: %(default)s)")
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    # One thread and deterministic kernels: the same software on the same CPU writes the same bits.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    for stale in [*(f"transformer_{n}" for n in TRANSFORMERS), *VAES]:
        shutil.rmtree(out / stale, ignore_errors=True)

    models = {}
    for index, (name, config) in enumerate(TRANSFORMERS.items()):
        models[name] = make_transformer(name, config, seed=1200 + 10 * index, out=out)
    vaes = {name: make_vae(name, config, seed=1300 + 10 * index, out=out)
            for index, (name, config) in enumerate(VAES.items())}
    make_schedulers(out, seed=1400)
    make_sampling_t2v(*models["t2v"], out=out, seed=1500)
    make_sampling_i2v(*models["i2v"], vae=vaes["vae_2_1"], out=out, seed=1600)
    write_manifest(out)
    for line in self_check(out):
        print(line)
    print(f"wrote {out} with torch {torch.__version__}, diffusers {diffusers.__version__}")


if __name__ == "__main__":
    main()
