"""FlexRM (FlexiView3D / Flex3D): 1-32 posed views -> ~1M 3D Gaussians (vfusion3d_jax/models/flexrm.py).

Variants (parameter counts from `vfusion3d_jax.models.flexrm.count_parameters`; Gaussians
N = 3 planes · R² texels · G per texel, R = triplane_low_res · upsample_factor):
    micro    the tests' model: 56 px views, planes 8², G=2       (174,288 parameters; 384 Gaussians)
    tiny     trains on a laptop CPU: 112 px views, planes 16², G=2, 64 px renders
                                                                  (801,312 parameters; 1,536 Gaussians)
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

Training (`config.task = "flexrm"`, vfusion3d_jax/train/flexrm_task.py, run by the project's
trainer; `config.data`, `config.train`, `config.eval` are documented in `training_config`):
render the built-in assets, then train; a run resumes from its newest checkpoint when started
again. Stages go NeRF first (`FlexRM.render_nerf`), then Gaussians, as Flex3D does; each stage
names its renderer (`config.train.stages.<stage>.renderer`).

    python -m vfusion3d_jax render-data --config=configs/data.py:tiny --workdir=data/tiny
    python -m vfusion3d_jax train --config=configs/flexrm.py:tiny --workdir=runs/flexrm_tiny
    tensorboard --logdir=runs/flexrm_tiny/tensorboard

(`tiny` on a 2-core CPU: ~11 min, 300 NeRF steps of ~0.5 s then 300 Gaussian steps of ~1.6 s.
`tiny` trains with the recipe that made the LRM `tiny` use its input, configs/common.py's
`sees_its_input` as configs/demo.py's LRM: 7 px patches, a random hue per example, a loss on the
object's pixels, learning rate 1e-3, 8 + 8 samples per ray; and 2 supervised views; measured on
the demo's data, `data_dir=<demo workdir>/data`.)

Gaussians only (no NeRF stage), on another data folder:

    python -m vfusion3d_jax train --config=configs/flexrm.py:tiny --workdir=runs/flexrm_gs \
        --config.train.stages.nerf.num_steps=0 --config.data_dir=data/builtin

The model, its renderers and the `.ply` export (`vfusion3d_jax/inference/ply.py`) are also
used from Python. Any field can be overridden on the command line, e.g.
`--config.model.gaussians.per_texel=5`.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections
from ml_collections import config_dict

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
    "tiny": ("tiny", None, 32, 2, 2, 64, (0.25, 1.0, 0.005, 0.05, 0.25), 112, 64, 8),
    "large": ("large", None, 80, 4, 20, 128, (0.0625, 1.0, 0.001, 0.01, 0.06), 512, 512, 64),
}
# name: rasteriser tile size, Gaussian-tile pair capacity, Gaussians per tile capacity, chunk size.
# Capacities are sized for the variant's Gaussian count at its render side: micro holds every
# Gaussian in every tile (nothing can overflow); tiny a third of its 1,536 per tile (every slot is
# composited when training vmaps over renders, so this is a third of the compositing; a trained
# tiny's busiest tile holds at most ~420 Gaussians with the head's opacities, ~200 with the
# decoder's; an untrained head's opacities overflow it); large's are estimates (~1M Gaussians of
# 3σ radius ~8 px at 512 px cover 1-4 tiles each; the busiest tiles of an object hold several
# thousand): `render_gaussians` reports an overflow, `splatting.check_capacity` names the fix.
# Memory per rendered image grows with tiles × max_per_tile (the compositor gathers every tile's
# slots: 1024 tiles × 16384 × 9 floats ≈ 0.6 GB at 512 px), so train large on crops or lower sides.
_SPLAT = {
    "micro": (16, 1 << 12, 384, 32),
    "tiny": (16, 1 << 14, 512, 32),
    "large": (16, 1 << 23, 16384, 64),
}


def model_config(variant: str) -> ml_collections.ConfigDict:
    """The `config.model` of a variant: the LRM's fields (configs/lrm.py) plus FlexRM's."""
    (lrm_variant, depths, channels, factor, per_texel, hidden, bounds, _, _, _) = _SIZES[variant]
    config = _lrm().model_config(lrm_variant)
    if depths is not None:
        config.encoder.num_layers, config.transformer.num_layers = depths
    # The LRM tiny's recipe (issue 10): each triplane token starts from the image feature (and
    # colour) where its centre projects, and the planes get the same at their own resolution, here
    # averaged over the valid views (FlexRM.encode_views); zero-initialised. Off for large, which
    # keeps the published architecture until a pod run says otherwise.
    config.source_projection = config.source_planes = variant in ("micro", "tiny")
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
        # Colours from the NeRF decoder at each Gaussian's mean (all three planes) instead of the
        # head (the texel's own plane); see FlexRM.gaussians. On for micro and tiny
        # (benchmarks/RESULTS.md: 1-view PSNR +0.35 dB, swap gain +0.34 dB on the demo's data).
        color_from_decoder=variant in ("micro", "tiny"),
        # Opacities from the NeRF decoder's density at each Gaussian's mean (FlexRM.gaussians,
        # decoder_opacity) instead of the head's: the planes know better than the head where the
        # object is. On for tiny (benchmarks/RESULTS.md, two paired seeds, 1 and 4 views: IoU +0.02
        # to +0.07, LPIPS -0.01 to -0.05); off for micro, whose tests train no NeRF stage first.
        opacity_from_decoder=variant == "tiny",
    ))
    return config


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    if variant not in _SIZES:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(_SIZES)}")
    view_size, render_size, samples = _SIZES[variant][7:]
    tile_size, max_intersections, max_per_tile, chunk_size = _SPLAT[variant]
    config = ml_collections.ConfigDict()
    config.variant = variant
    config.task = "flexrm"  # the trainer's task module (vfusion3d_jax/train/flexrm_task.py)
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
    training_config(config, variant)
    if variant == "tiny":  # the LRM tiny's recipe (see the docstring)
        _common().sees_its_input(config)
    return config


# name: global batch, (input views V, fewest valid input views), target views per example,
#   [(stage, steps, renderer, full render side, patch side or None)], warm-up steps, LPIPS network
#   of the loss, checkpoint/eval interval
_TRAIN = {
    "micro": (2, (2, 1), 2, [("nerf", 0, "nerf", 32, None), ("gaussians", 20, "gaussians", 32, None)], 5,
              "alexnet", 10),
    "tiny": (4, (4, 1), 2, [("nerf", 300, "nerf", 32, None), ("gaussians", 300, "gaussians", 64, None)], 20,
             "alexnet", 100),
    # Large: the orbits of `render-data` (configs/data.py:builtin) have 16 views, so 16 input views
    # at most per example; 256 px crops of the 512 px renders bound the rasteriser's memory.
    "large": (128, (16, 1), 4, [("nerf", 40_000, "nerf", 128, None), ("gaussians", 60_000, "gaussians", 512, 256)],
              3000, "vgg16", 1000),
}


def training_config(config: ml_collections.ConfigDict, variant: str) -> None:
    """Adds `data_dir`, `config.data`, `config.train` and `config.eval` (vfusion3d_jax/train/trainer.py)."""
    batch_size, (num_input_views, min_input_views), num_targets, stages, warmup, lpips_net, interval = _TRAIN[variant]
    view_size, render_size, _ = _SIZES[variant][7:]
    # Output directory of `render-data`: train and held-out shards under <data_dir>/shards/.
    config.data_dir = "data/tiny"
    config.data = _common().input_config()
    config.data.mixture.rendered.glob = config.get_ref("data_dir") + "/shards/train-*.tfrecord"
    config.data.batch_size = batch_size
    # The encoder's views: the source view then random others of the orbit, V slots (a bucket of
    # model.view_buckets), the first n valid with n drawn per example in [min_input_views, V].
    config.data.num_input_views = num_input_views
    config.data.min_input_views = min_input_views
    config.data.source_resolution = view_size
    config.data.num_target_views = num_targets  # the source view + others (supervision)
    config.data.target_resolution = render_size

    config.train = ml_collections.ConfigDict()
    config.train.seed = 0  # parameter init and the per-step randomness (fold_in(seed, step))
    # Start from another run's checkpoint instead of a random init.
    config.train.init_checkpoint = config_dict.placeholder(str)
    config.train.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=4e-4,
        warmup_steps=warmup,
        final_lr_fraction=0.0,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.05,
        grad_clip_norm=1.0,
        no_decay_patterns=(),
    ))
    config.train.ema_decay = 0.0  # 0 = no moving average of the parameters
    # Flex3D's order: NeRF first (the LRM's volume rendering of the planes), then the Gaussians.
    # Each stage overrides config.data fields (as the LRM's stages: render side, patch side, views,
    # mixture) and names its `renderer`, "nerf" or "gaussians" (the task's stage option). Targets
    # cut into patches are rendered exactly with `target_patch_cameras` at the patch side.
    config.train.stage_order = tuple(name for name, *_ in stages)
    config.train.stages = ml_collections.ConfigDict()
    for name, num_steps, renderer, resolution, patch in stages:
        config.train.stages[name] = ml_collections.ConfigDict(dict(
            num_steps=num_steps,
            renderer=renderer,
            target_resolution=resolution,
            patch_size=config_dict.placeholder(int) if patch is None else patch,
            mixture=dict(rendered=1.0, synthetic=1.0),
        ))
    # Loss weights per data source (vfusion3d_jax/train/losses.py, shared with the LRM): MSE +
    # LPIPS + the mask loss (`opacity`: the rendered alpha against the target's mask); synthetic
    # orbits get image-level supervision only.
    config.train.loss = ml_collections.ConfigDict(dict(
        mse=dict(rendered=1.0, synthetic=0.0),
        foreground_mse=dict(rendered=0.0, synthetic=0.0),
        lpips=dict(rendered=1.0, synthetic=1.0),
        lpips_net=lpips_net,
        opacity=dict(rendered=1.0, synthetic=1.0),
        tv=5e-4,  # triplane total variation
    ))
    # Imperfect inputs (FlexiView3D feeds generated views): with this probability per example,
    # Gaussian noise of this std on its valid non-reference input views (the reference view, the
    # real image, stays clean). Our values; the paper gives none.
    config.train.input_noise = ml_collections.ConfigDict(dict(probability=0.5, std=0.05))
    # A random background colour per example for renders and targets alike (official: white).
    config.train.random_background = False
    # A Gaussian render whose Gaussian-tile pairs or Gaussians per tile exceed config.splatting's
    # capacities is incomplete: "warn" logs the setting to raise and counts the step in the
    # metrics (splat_overflow_steps); "stop" ends the run with that message.
    config.train.splat_overflow = "warn"
    config.train.nonfinite = "stop"
    config.train.stop_after = config_dict.placeholder(int)
    config.train.checkpoint_every = interval
    config.train.checkpoint_keep = 3
    config.train.log_every = 10 if variant in ("micro", "tiny") else 50
    # Rays per object marched at once in the NeRF stage; None = the renderer's backend default.
    config.train.render_chunk_size = config_dict.placeholder(int)

    # Held-out objects rendered with the Gaussians from `num_input_views` of their views (the
    # source and others, fixed by the seed): PSNR, SSIM, LPIPS (AlexNet, at 32 px and more),
    # foreground PSNR, silhouette IoU; grids of input views | targets | renders.
    config.eval = ml_collections.ConfigDict(dict(
        glob=config.get_ref("data_dir") + "/shards/holdout-*.tfrecord",
        every=interval,  # 0 = no evaluation
        num_batches=2 if variant in ("micro", "tiny") else 4,
        batch_size=batch_size,
        num_target_views=3,
        resolution=render_size,
        num_input_views=num_input_views,  # 1 .. data.num_input_views
        seed=1234,
        grid_rows=4,
    ))
