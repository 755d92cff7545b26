"""The multi-view video diffusion model (a Wan diffusion transformer): model variants.

Variants (parameter counts of the transformer from
`vfusion3d_jax.models.wan.count_parameters`, shapes only, nothing allocated):
    tiny            pixel space, 32 px, 8 frames; trains on a laptop CPU     (2,731,248)
    small           Wan 2.1 VAE latents (16 channels), a 768-wide model      (121,645,888)
    wan2_1_1_3b     Wan-AI/Wan2.1-T2V-1.3B-Diffusers                          (1,418,996,800)
    wan2_1_14b      Wan-AI/Wan2.1-T2V-14B-Diffusers                           (14,288,491,584)
    wan2_1_i2v_14b  Wan-AI/Wan2.1-I2V-14B-480P-Diffusers (image-to-video)     (16,394,878,784)
    wan2_2_ti2v_5b  Wan-AI/Wan2.2-TI2V-5B-Diffusers (48-channel latents of the Wan 2.2 VAE;
                    per-token timesteps keep the conditioning frame clean)   (4,999,787,712)

The published shapes are those of each checkpoint's `transformer/config.json`, as diffusers'
`scripts/convert_wan_to_diffusers.py` writes them; `config.model` uses diffusers' field names,
so a converted checkpoint's config is its own `config.json` (vfusion3d_jax/models/wan/convert.py):

    python -m vfusion3d_jax convert --checkpoint=/path/to/Wan2.1-T2V-1.3B-Diffusers/transformer \
        --workdir=runs/wan2_1_1_3b

`config.codec` says what the transformer denoises (vfusion3d_jax/models/wan/codec.py): `tiny`
diffuses pixels (`kind="identity"`); the others diffuse the normalised latents of a Wan VAE
(`kind="wan_vae"`) whose architecture, `config.codec.vae`, is the published `vae/config.json`
(Wan 2.1: 8x spatial, 4x temporal, 16 channels; Wan 2.2: 16x spatial with its 2 x 2 patchify,
4x temporal, 48 channels) and whose weights come from a diffusers folder:

    --config.codec.checkpoint=/path/to/Wan2.1-T2V-1.3B-Diffusers   (or its vae/ folder)

Any field can be overridden on the command line, e.g. `--config.model.remat=full
--config.model.attention_implementation=cudnn`. Training, sampling and data settings
(`config.train`, `config.sample`, `config.data`) sit beside `config.model`.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections
from ml_collections import config_dict

from vfusion3d_jax.configs import config_module
from vfusion3d_jax.train.finetune import finetune_config

# Fields of diffusers' `WanTransformer3DModel` config.json that differ between variants:
# name: (patch_size, num_attention_heads, attention_head_dim, in_channels, out_channels,
#        text_dim, freq_dim, ffn_dim, num_layers, image_dim, added_kv_proj_dim)
_ARCHITECTURES = {
    "tiny": ((1, 4, 4), 3, 64, 7, 3, 64, 64, 768, 4, None, None),  # in: RGB + input view + its flag
    "small": ((1, 2, 2), 12, 64, 16, 16, 4096, 256, 3072, 12, None, None),
    "wan2_1_1_3b": ((1, 2, 2), 12, 128, 16, 16, 4096, 256, 8960, 30, None, None),
    "wan2_1_14b": ((1, 2, 2), 40, 128, 16, 16, 4096, 256, 13824, 40, None, None),
    "wan2_1_i2v_14b": ((1, 2, 2), 40, 128, 36, 16, 4096, 256, 13824, 40, 1280, 5120),
    "wan2_2_ti2v_5b": ((1, 2, 2), 24, 128, 48, 48, 4096, 256, 14336, 30, None, None),
}
# name: compute dtype, rematerialisation policy of the scanned blocks
_RUN = {
    "tiny": ("float32", "none"),
    "small": ("bfloat16", "dots_with_no_batch_dims"),
    "wan2_1_1_3b": ("bfloat16", "full"),
    "wan2_1_14b": ("bfloat16", "full"),
    "wan2_1_i2v_14b": ("bfloat16", "full"),
    "wan2_2_ti2v_5b": ("bfloat16", "full"),
}
VARIANTS = tuple(_ARCHITECTURES)

# The published Wan VAEs: the fields of diffusers' `AutoencoderKLWan` vae/config.json
# (Wan-AI/Wan2.1-*-Diffusers and Wan-AI/Wan2.2-TI2V-5B-Diffusers).
_WAN2_1_VAE = dict(
    base_dim=96, decoder_base_dim=config_dict.placeholder(int), z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
    attn_scales=(), temperal_downsample=(False, True, True), dropout=0.0,
    latents_mean=(-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
                  -0.3632, -0.1922, -0.9497, 0.2503, -0.2921),
    latents_std=(2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
                 1.6382, 1.1253, 2.8251, 1.916),
    is_residual=False, in_channels=3, out_channels=3, patch_size=config_dict.placeholder(int),
    scale_factor_temporal=4, scale_factor_spatial=8,
)
_WAN2_2_VAE = dict(
    base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=(1, 2, 4, 4), num_res_blocks=2, attn_scales=(),
    temperal_downsample=(False, True, True), dropout=0.0,
    latents_mean=(-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813,
                  0.0891, 0.157, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108,
                  -0.2158, 0.2502, -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.123, -0.0313,
                  -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.052, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944,
                  0.3573, -0.0548, -0.1681, -0.0667),
    latents_std=(0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.499, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
                 0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
                 0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
                 0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.06, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744),
    is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_temporal=4,
    scale_factor_spatial=16,
)
# name: the VAE whose latents the transformer denoises (None: pixels)
_CODEC_VAES = {
    "tiny": None,
    "small": _WAN2_1_VAE,
    "wan2_1_1_3b": _WAN2_1_VAE,
    "wan2_1_14b": _WAN2_1_VAE,
    "wan2_1_i2v_14b": _WAN2_1_VAE,
    "wan2_2_ti2v_5b": _WAN2_2_VAE,
}


def model_config(variant: str) -> ml_collections.ConfigDict:
    """The `config.model` of a variant: diffusers' WanTransformer3DModel fields plus how to run it."""
    (patch_size, num_heads, head_dim, in_channels, out_channels, text_dim, freq_dim, ffn_dim, num_layers, image_dim,
     added_kv_proj_dim) = _ARCHITECTURES[variant]
    dtype, remat = _RUN[variant]
    return ml_collections.ConfigDict(dict(
        # Video patch (frames, height, width): one token per patch (a Conv3d with stride = kernel).
        patch_size=patch_size,
        # Width D = num_attention_heads * attention_head_dim. The head's features are split between
        # the rotary axes as (frame, height, width) = (d - 2h, h, h), h = 2 * (d // 6).
        num_attention_heads=num_heads,
        attention_head_dim=head_dim,
        # Channels of the model's input (noisy latents, plus mask and image latents for image-to-video)
        # and of its prediction. `tiny` diffuses RGB pixels directly.
        in_channels=in_channels,
        out_channels=out_channels,
        # Width of the text encoder's token embeddings (umT5-XXL: 4096; `tiny`: its own small encoder).
        text_dim=text_dim,
        # Width of the sinusoidal timestep embedding.
        freq_dim=freq_dim,
        # Hidden width of each block's GELU(tanh) FFN.
        ffn_dim=ffn_dim,
        num_layers=num_layers,
        # An affine LayerNorm before each cross-attention.
        cross_attn_norm=True,
        # RMSNorm of queries and keys over all heads' features (the only kind diffusers implements).
        qk_norm="rms_norm_across_heads",
        # Epsilon of the blocks' LayerNorms and RMSNorms.
        eps=1e-6,
        # Image-to-video: width of the CLIP image tokens and of their own K/V projections in every
        # cross-attention (set both, or neither).
        image_dim=config_dict.placeholder(int) if image_dim is None else image_dim,
        added_kv_proj_dim=config_dict.placeholder(int) if added_kv_proj_dim is None else added_kv_proj_dim,
        # Positions per axis of the rotary tables: the largest token grid side.
        rope_max_seq_len=1024,
        # First-last-frame models: a learned position embedding over two images' tokens; None = none.
        pos_embed_seq_len=config_dict.placeholder(int),
        # Compute dtype of matmuls ("float32" or "bfloat16"); norms, modulations and residual updates
        # run in float32 regardless. Parameters are param_dtype.
        dtype=dtype,
        param_dtype="float32",
        # Per-block rematerialisation of the scanned blocks: "none", "full", "dots" or
        # "dots_with_no_batch_dims" (models/layers.py REMAT_POLICIES).
        remat=remat,
        # jax.nn.dot_product_attention implementation: None (XLA), "xla" or "cudnn" (fused, GPU, bf16).
        attention_implementation=config_dict.placeholder(str),
    ))


def codec_config(variant: str) -> ml_collections.ConfigDict:
    """The `config.codec` of a variant: pixels, or a Wan VAE (its config.json fields plus how to run it)."""
    vae = _CODEC_VAES[variant]
    if vae is None:
        return ml_collections.ConfigDict(dict(kind="identity"))
    return ml_collections.ConfigDict(dict(
        kind="wan_vae",
        # A diffusers AutoencoderKLWan folder, or a Wan pipeline folder with vae/ (required to encode).
        checkpoint=config_dict.placeholder(str),
        # Its architecture (a checkpoint of another is an error); the VAE runs in float32 as in the
        # Wan pipelines (it is frozen and runs once per video).
        vae=dict(**vae, dtype="float32", param_dtype="float32"),
    ))


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    if variant not in _ARCHITECTURES:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(_ARCHITECTURES)}")
    config = ml_collections.ConfigDict()
    config.variant = variant
    config.model = model_config(variant)
    config.codec = codec_config(variant)
    training_config(config, variant)
    return config


def _common():
    return config_module(str(Path(__file__).with_name("common.py")))


# name: (frames, clip side, global batch, steps, learning rate, warm-up, flow shift, sampling steps,
#        image and text guidance, checkpoint/eval interval)
_TRAIN = {
    "tiny": (8, 32, 4, 1000, 1e-3, 50, 1.0, 20, 2.0, 1.0, 250),
    "small": (17, 256, 32, 50_000, 2e-4, 1000, 3.0, 50, 1.0, 5.0, 1000),
    "wan2_1_1_3b": (17, 480, 32, 20_000, 1e-5, 500, 3.0, 50, 1.0, 5.0, 1000),
    "wan2_1_14b": (17, 480, 32, 20_000, 1e-5, 500, 3.0, 50, 1.0, 5.0, 1000),
    "wan2_1_i2v_14b": (17, 480, 32, 20_000, 1e-5, 500, 3.0, 50, 1.0, 5.0, 1000),
    "wan2_2_ti2v_5b": (17, 704, 32, 20_000, 1e-5, 500, 5.0, 50, 1.0, 5.0, 1000),
}


def training_config(config: ml_collections.ConfigDict, variant: str) -> None:
    """The orbit conditioning, flow matching, sampling, data, training and evaluation settings
    (vfusion3d_jax/train/mvdiffusion_task.py, run by vfusion3d_jax/train/trainer.py)."""
    (frames, side, batch_size, steps, learning_rate, warmup, shift, sample_steps, image_guidance, text_guidance,
     interval) = _TRAIN[variant]
    config.task = "mvdiffusion"
    # How the orbit is conditioned (vfusion3d_jax/models/mvdiffusion.py): the input view is the
    # clean frame 0; each frame's pose relative to it goes through a zero-initialised embedding
    # added to the time embedding; captions through `text_encoder` (a small byte-level encoder
    # trained with `tiny`; None = the large variants' umT5 embeddings, given by the data). Each
    # condition is dropped independently during training, for classifier-free guidance.
    config.conditioning = ml_collections.ConfigDict(dict(
        camera=True,
        # The input view (and a kept-flag channel) beside every frame's channels: a from-scratch
        # model starts each frame from it (model.in_channels = 2 * out_channels + 1). Off for
        # the Wan variants, whose pretrained input layer takes the latents alone.
        input_view_channels=variant == "tiny",
        text_encoder=dict(dim=64, num_layers=2, num_heads=4, max_length=128) if variant == "tiny"
        else config_dict.placeholder(dict),
        image_dropout=0.1,
        text_dropout=0.1,
    ))
    # Flow matching: noise levels drawn uniformly then shifted, sigma -> shift*sigma/(1+(shift-1)*sigma);
    # larger videos want more denoising at high noise (Wan: 3.0 at 480p, 5.0 at 720p).
    # What the transformer predicts: "velocity" (ε − x₀, as Wan and its checkpoints) or "clean" (x₀,
    # turned into the velocity; `tiny`, a pixel-space model from scratch: see models/mvdiffusion.py).
    # The loss: the squared error of the "velocity", or of the "clean" sample it implies (σ² times it,
    # more weight on high noise, where an orbit's layout is decided).
    predicts = "clean" if variant == "tiny" else "velocity"
    config.flow = ml_collections.ConfigDict(dict(shift=shift, prediction=predicts, loss_space=predicts))
    # Sampling (`sample`, training's evaluation): "unipc" or "euler", steps, and the nested guidance
    # scales: v = v_none + image_guidance*(v_image - v_none) + text_guidance*(v_image_text - v_image);
    # guidance_interval (low, high): guide only at noise levels σ in it, elsewhere the fully
    # conditioned prediction (diffusion.guided_velocity); (0, 1) guides every step.
    # init_strength < 1 starts from the input view copied to every frame, noised to that level.
    config.sample = ml_collections.ConfigDict(dict(
        sampler="unipc", num_steps=sample_steps, image_guidance=image_guidance, text_guidance=text_guidance,
        guidance_interval=(0.0, 1.0), init_strength=1.0, seed=0))

    config.data_dir = "data/tiny"
    config.data = _common().input_config()
    config.data.example = "clip"
    config.data.num_frames = frames
    config.data.clip_resolution = side
    config.data.caption_length = 128  # bytes; 71% of the procedural captions fit whole
    config.data.batch_size = batch_size
    config.data.mixture.rendered.glob = config.get_ref("data_dir") + "/shards/train-*.tfrecord"

    config.train = ml_collections.ConfigDict()
    config.train.seed = 0
    # Start from another run's checkpoint or a `convert` output (the published Wan weights).
    config.train.init_checkpoint = config_dict.placeholder(str)
    config.train.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=learning_rate, warmup_steps=warmup, final_lr_fraction=0.1, b1=0.9, b2=0.999, eps=1e-8,
        weight_decay=0.01, grad_clip_norm=1.0, no_decay_patterns=()))
    # Which parameters train (vfusion3d_jax/train/finetune.py): "full", "filter" (path regexes in
    # `trainable`) or "lora" (adapters on the attention projections, plus `trainable`).
    config.train.finetune = finetune_config()
    # The exponential moving average of the trainable parameters that evaluation and `sample` use
    # (checkpoint item `ema`; warmed up: min(decay, (1 + step) / (10 + step))); 0 = none.
    config.train.ema_decay = 0.995 if variant == "tiny" else 0.9999
    # One stage of rendered orbits; synthetic orbits can join through the mixture weights.
    config.train.stage_order = ("main",)
    config.train.stages = ml_collections.ConfigDict(dict(main=dict(num_steps=steps,
                                                                   mixture=dict(rendered=1.0, synthetic=0.0))))
    config.train.nonfinite = "stop"
    config.train.stop_after = config_dict.placeholder(int)
    config.train.checkpoint_every = interval
    config.train.checkpoint_keep = 3
    config.train.log_every = 10 if variant == "tiny" else 50

    # Held-out clips: validation losses at fixed noise levels, and orbits sampled from their first
    # frames scored against the truth; grids of truth over sample.
    config.eval = ml_collections.ConfigDict(dict(
        glob=config.get_ref("data_dir") + "/shards/holdout-*.tfrecord",
        every=interval,
        num_batches=1,
        batch_size=batch_size,
        seed=1234,
        grid_rows=4,
    ))
    config.mesh = _common().mesh_config()
