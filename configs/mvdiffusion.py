"""The multi-view video diffusion model (a Wan diffusion transformer): model variants.

Variants (parameter counts of the transformer from
`vfusion3d_jax.models.wan.count_parameters`, shapes only, nothing allocated):
    tiny            pixel space, 32 px, 8 frames; trains on a laptop CPU     (2,718,960)
    small           Wan 2.1 latents (16 channels), a 768-wide model          (121,645,888)
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

Any field can be overridden on the command line, e.g. `--config.model.remat=full
--config.model.attention_implementation=cudnn`. Training, sampling and data settings
(`config.train`, `config.sample`, `config.data`) sit beside `config.model`.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

# Fields of diffusers' `WanTransformer3DModel` config.json that differ between variants:
# name: (patch_size, num_attention_heads, attention_head_dim, in_channels, out_channels,
#        text_dim, freq_dim, ffn_dim, num_layers, image_dim, added_kv_proj_dim)
_ARCHITECTURES = {
    "tiny": ((1, 4, 4), 3, 64, 3, 3, 64, 64, 768, 4, None, None),
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


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    if variant not in _ARCHITECTURES:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(_ARCHITECTURES)}")
    config = ml_collections.ConfigDict()
    config.variant = variant
    config.model = model_config(variant)
    return config
