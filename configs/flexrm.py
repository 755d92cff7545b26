"""FlexRM (FlexiView3D / Flex3D): 1-32 posed views -> ~1M 3D Gaussians (vfusion3d_jax/models/flexrm.py).

Variants (parameter counts from `vfusion3d_jax.models.flexrm.count_parameters`; Gaussians
N = 3 planes · R² texels · G per texel, R = triplane_low_res · upsample_factor):
    micro    the tests' model: 56 px views, planes 8², G=2       (170,616 parameters; 384 Gaussians)
    tiny     trains on a laptop CPU: 112 px views, planes 16², G=2, 64 px renders
                                                                  (806,528 parameters; 1,536 Gaussians)
    large    the LRM large's encoder and transformer, planes 128² (deconvolution factor 4), G=20,
             512 px views and renders                             (453,187,500 parameters; 983,040 Gaussians)

The model takes V views, V a static bucket of `model.view_buckets` (up to `model.max_views`);
`vfusion3d_jax.models.flexrm.pad_views` pads a runtime count up to its bucket with a mask. Its
outputs are Gaussians (`FlexRM.__call__`, drawn by `render_gaussians` with `config.splatting`)
or, for NeRF-first training as Flex3D does, the LRM's volume renders (`FlexRM.render_nerf`
with `config.render`).

    python -c "import ml_collections; from vfusion3d_jax.configs import config_module; \
        from vfusion3d_jax.models import flexrm; \
        print(flexrm.count_parameters(config_module('configs/flexrm.py').get_config('large').model))"

Training is to be `config.task = "flexrm"` of the trainer (not built yet: random view counts per
batch, noisy inputs, MSE + LPIPS + mask losses); until then the model, its renderers and the
`.ply` export (`vfusion3d_jax/inference/ply.py`) are used from Python. Any field can be
overridden on the command line, e.g. `--config.model.gaussians.per_texel=5`.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from vfusion3d_jax.configs import config_module

VIEW_BUCKETS = (1, 2, 4, 8, 16, 32)


def _lrm():
    return config_module(str(Path(__file__).with_name("lrm.py")))


def _common():
    return config_module(str(Path(__file__).with_name("common.py")))


# name: LRM variant of the encoder/transformer, (encoder layers, transformer layers) override or
#   None, triplane channels, upsample factor, Gaussians per texel, head hidden width,
#   (in-plane offset, normal offset, scale floor, initial scale, scale max) in world units,
#   view side, render side, NeRF samples (coarse = importance)
# Large: 3·128²·20 = 983,040 Gaussians (Flex3D's ~1M). The LRM large's 32² tokens per plane go to
# 128² texels by a factor-4 deconvolution (3·256²·5 would need factor 8: 64 texels per token from
# one linear map, for the same count); G = 20 Gaussians per texel then share one feature.
_SIZES = {
    "micro": ("fixture", (1, 1), 8, 2, 2, 32, (0.5, 1.0, 0.01, 0.1, 0.5), 56, 32, 8),
    "tiny": ("tiny", None, 32, 2, 2, 64, (0.25, 1.0, 0.005, 0.05, 0.25), 112, 64, 16),
    "large": ("large", None, 80, 4, 20, 128, (0.0625, 1.0, 0.001, 0.01, 0.06), 512, 512, 64),
}
# name: rasteriser tile size, Gaussian-tile pair capacity, Gaussians per tile capacity, chunk size.
# Capacities are sized for the variant's Gaussian count at its render side: tiny and micro hold
# every Gaussian in every tile (nothing can overflow); large's are estimates (~1M Gaussians of
# 3σ radius ~8 px at 512 px cover 1-4 tiles each; the busiest tiles of an object hold several
# thousand): `render_gaussians` reports an overflow, `splatting.check_capacity` names the fix.
# Memory per rendered image grows with tiles × max_per_tile (the compositor gathers every tile's
# slots: 1024 tiles × 16384 × 9 floats ≈ 0.6 GB at 512 px), so train large on crops or lower sides.
_SPLAT = {
    "micro": (16, 1 << 12, 384, 32),
    "tiny": (16, 1 << 14, 1536, 32),
    "large": (16, 1 << 23, 16384, 64),
}


def model_config(variant: str) -> ml_collections.ConfigDict:
    """The `config.model` of a variant: the LRM's fields (configs/lrm.py) plus FlexRM's."""
    (lrm_variant, depths, channels, factor, per_texel, hidden, bounds, _, _, _) = _SIZES[variant]
    config = _lrm().model_config(lrm_variant)
    if depths is not None:
        config.encoder.num_layers, config.transformer.num_layers = depths
    # The LRM's single-view source projection has no multi-view counterpart here.
    del config.source_projection
    config.triplane_dim = channels
    # The transformer's r² tokens per plane become (factor·r)² texels through a stride = kernel
    # deconvolution (the LRM's is 2): the Gaussian head's grid.
    config.upsample_factor = factor
    # Input views: a static bucket V of view_buckets per call (pad_views), at most max_views.
    config.max_views = max(VIEW_BUCKETS)
    config.view_buckets = VIEW_BUCKETS
    in_plane, normal, scale_min, scale_init, scale_max = bounds
    config.gaussians = ml_collections.ConfigDict(dict(
        per_texel=per_texel,  # G Gaussians per texel
        hidden_dim=hidden,
        num_layers=3,  # Linear layers of the per-texel MLP (input, hidden..., output)
        # Offset from the texel's anchor: tanh-bounded along the plane's axes and along its normal
        # (the normal bound reaches the whole [-1, 1] box from the plane through the origin).
        max_offset_in_plane=in_plane,
        max_offset_normal=normal,
        # Linear scales (world units): scale_min + (scale_max - scale_min)·sigmoid, scale_init at init.
        scale_min=scale_min,
        scale_init=scale_init,
        scale_max=scale_max,
        opacity_bias=-2.0,  # initial opacity sigmoid(-2) = 0.12
        output_init_scale=0.1,  # the last layer's LeCun-normal kernel times this: Gaussians start near their init
    ))
    return config


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    if variant not in _SIZES:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(_SIZES)}")
    view_size, render_size, samples = _SIZES[variant][7:]
    tile_size, max_intersections, max_per_tile, chunk_size = _SPLAT[variant]
    config = ml_collections.ConfigDict()
    config.variant = variant
    config.task = "flexrm"  # the trainer's task module (reserved: the task comes with the training issue)
    config.model = model_config(variant)
    config.view_resolution = view_size  # side of the input views
    # The NeRF path (FlexRM.render_nerf): fields of vfusion3d_jax.rendering.RenderOptions.
    config.render = ml_collections.ConfigDict(dict(resolution=render_size, num_coarse=samples,
                                                   num_importance=samples))
    # The Gaussian path (render_gaussians): the side of the renders and the rasteriser's
    # SplatSettings (vfusion3d_jax/rendering/splatting/rasterize.py).
    config.splatting = ml_collections.ConfigDict(dict(
        resolution=render_size,
        tile_size=tile_size,
        max_intersections=max_intersections,
        max_per_tile=max_per_tile,
        chunk_size=chunk_size,
    ))
    # Mesh and logical-axis rules, as the LRM's (models/layers.py names; FlexRM adds none).
    config.mesh = _common().mesh_config()
    return config
