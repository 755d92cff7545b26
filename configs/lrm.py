"""The triplane LRM (VFusion3D): model variants, render settings, input pipeline and mesh.

Variants (parameter counts from `vfusion3d_jax.models.lrm.count_parameters`):
    fixture   the tiny random model of tests/fixtures/vfusion3d_reference (285,436)
    tiny      trains on a laptop CPU in minutes                              (796,164)
    small     DINOv2-S encoder, 512-wide transformer                         (67,960,932)
    base      DINOv2-B encoder, 768-wide transformer                         (244,548,340)
    large     the published VFusion3D model                                  (452,135,700)

    python -m vfusion3d_jax convert --config=configs/lrm.py:large \
        --checkpoint=/path/to/vfusion3d.pth --workdir=runs/vfusion3d_large

Field meanings are in the comments of `model_config`; any field can be overridden on the
command line, e.g. `--config.model.encoder.resize_rule=size --config.model.dtype=float32`.

Training (`config.train`, `config.eval`; fields documented in `training_config`): render the
built-in assets, then train; a run resumes from its newest checkpoint when started again.

    python -m vfusion3d_jax render-data --config=configs/data.py:tiny --workdir=data/tiny
    python -m vfusion3d_jax train --config=configs/lrm.py:tiny --workdir=runs/lrm_tiny
    tensorboard --logdir=runs/lrm_tiny/tensorboard

Fine-tuning the official weights (converted first) on rendered data only:

    python -m vfusion3d_jax train --config=configs/lrm.py:large --workdir=runs/finetune \
        --config.train.init_checkpoint=runs/vfusion3d_large --config.train.stages.low_res.num_steps=0 \
        --config.train.stages.high_res.num_steps=0 --config.data_dir=data/builtin

At scale (a TPU v5 pod; see launch/tpu_v5.sh and the README's pretraining section), with synthetic
orbits mixed in, data and workdir in a bucket:

    launch/tpu_v5.sh train NAME ZONE gs://BUCKET/runs/lrm_large --config.data_dir=gs://BUCKET/orbits \
        --config.data.mixture.synthetic.glob='gs://BUCKET/synthetic/train-*.tfrecord'
"""

from __future__ import annotations

from pathlib import Path

import ml_collections
from ml_collections import config_dict

from vfusion3d_jax.configs import config_module


def _common():
    return config_module(str(Path(__file__).with_name("common.py")))


def _input_config() -> ml_collections.ConfigDict:
    return _common().input_config()


# name: (encoder dim, layers, heads, pretraining image size), camera embedding,
#       (transformer dim, layers, heads), triplane low res, triplane channels
_SIZES = {
    "fixture": ((48, 2, 4, 70), 64, (64, 2, 4), 4, 8),
    "tiny": ((64, 2, 4, 112), 64, (128, 2, 4), 8, 16),
    "small": ((384, 12, 6, 518), 512, (512, 8, 8), 16, 32),
    "base": ((768, 12, 12, 518), 768, (768, 12, 12), 24, 48),
    "large": ((768, 12, 12, 518), 1024, (1024, 16, 16), 32, 80),
}
# name: source image side, render side, coarse + importance samples, compute dtype, remat policy
_RUN = {
    "fixture": (64, 8, 8, "float32", "none"),
    "tiny": (112, 32, 16, "float32", "none"),
    "small": (224, 64, 32, "bfloat16", "none"),
    "base": (336, 128, 48, "bfloat16", "dots_with_no_batch_dims"),
    "large": (512, 384, 64, "bfloat16", "full"),
}


def model_config(variant: str) -> ml_collections.ConfigDict:
    """The `config.model` of a variant."""
    (enc_dim, enc_layers, enc_heads, pretrain_size), camera_dim, (dim, num_layers, heads), low_res, channels = (
        _SIZES[variant])
    _, _, _, dtype, remat = _RUN[variant]
    return ml_collections.ConfigDict(dict(
        encoder=dict(
            dim=enc_dim,
            num_layers=enc_layers,
            num_heads=enc_heads,
            mlp_ratio=4,
            patch_size=14,
            # Image size of the learned position grid ((size / 14)^2 positions; DINOv2: 518 -> 37x37).
            pretrain_image_size=pretrain_size,
            # DINOv2 "with registers" tokens; the released VFusion3D encoder has none.
            num_register_tokens=0,
            layer_scale_init=1.0,
            # Position-embedding resize: "legacy" (transformers <= 4.44, most likely what the released
            # model was trained with) or "size" (transformers >= 4.45). See models/vit.py.
            resize_rule="legacy",
        ),
        # 16-d source camera -> Linear -> SiLU -> Linear: the adaLN condition.
        camera_embed_dim=camera_dim,
        transformer=dict(dim=dim, num_layers=num_layers, num_heads=heads, mlp_ratio=4),
        # Learned triplane tokens: 3 planes of low_res^2; the 2x2 deconvolution doubles the resolution.
        triplane_low_res=low_res,
        triplane_dim=channels,
        # The planes' side is upsample_factor · low_res (a stride = kernel deconvolution; official 2).
        upsample_factor=2,
        # This project's addition (models/lrm.py SourceProjection): each triplane token also starts
        # from the image feature at its centre's projection into the source view (zero-initialised).
        # On for `tiny`, which trains from scratch in minutes and needs it to learn shape from its
        # input (benchmarks/RESULTS.md); off for the variants of the official architecture.
        source_projection=variant == "tiny",
        # The same projection at the planes' resolution, added to the upsampled planes (a skip that
        # brings the input's colours and outline straight to the decoder; zero-initialised). On for
        # `tiny` with the projection (benchmarks/RESULTS.md, "Does the LRM use its input?").
        source_planes=variant == "tiny",
        # The official triplane decoder MLP: 3C -> 64 -> 64 -> 64 -> 4 (fixed in VFusion3D).
        decoder=dict(hidden_dim=64, num_layers=4),
        # Compute dtype of matmuls ("float32" or "bfloat16"); parameters are always param_dtype.
        dtype=dtype,
        param_dtype="float32",
        # Per-layer rematerialisation of the scanned encoder and transformer layers: "none", "full",
        # "dots" or "dots_with_no_batch_dims" (models/layers.py REMAT_POLICIES).
        remat=remat,
        # jax.nn.dot_product_attention implementation: None (XLA) or "cudnn" (fused, GPU, bf16).
        attention_implementation=ml_collections.config_dict.placeholder(str),
    ))


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    if variant not in _SIZES:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(_SIZES)}")
    source_size, render_size, samples, _, _ = _RUN[variant]
    config = ml_collections.ConfigDict()
    config.variant = variant
    config.model = model_config(variant)
    # Renderer settings (the fields of vfusion3d_jax.rendering.RenderOptions that change per variant).
    config.render = ml_collections.ConfigDict(dict(
        resolution=render_size,
        num_coarse=samples,
        num_importance=samples,
    ))
    # How to feed this model a user's image (stored with every checkpoint; `infer` and `evaluate`
    # read it). This project's training puts the source camera at its own distance (the rendered
    # orbits' radius, 1.5) and frames objects as `render-data` does: longest side 0.9 at radius
    # 1.5 with fx 0.75 fills ~0.9 * 0.75 / 1.5 = 45% of the image, a recentring border of 0.55.
    # `convert` stores the official values for the released weights (distance 1, border 0.2).
    config.inference = ml_collections.ConfigDict(dict(source_distance=1.5, border_ratio=0.55))
    config.data = _input_config()
    config.data.source_resolution = source_size
    config.data.target_resolution = min(render_size, 128)
    config.mesh = _common().mesh_config()
    training_config(config, variant)
    return config


# name: (global batch, [(stage steps, full render side, patch side)] for low_res, high_res,
#        finetune, warm-up steps, LPIPS network of the loss, checkpoint/eval interval)
_TRAIN = {
    "fixture": (2, [(20, 32, None), (0, 32, None), (0, 32, None)], 5, "alexnet", 10),
    "tiny": (4, [(80, 32, None), (40, 64, 32), (20, 64, 32)], 10, "alexnet", 50),
    "small": (64, [(20_000, 64, None), (10_000, 128, 64), (5_000, 128, 64)], 1000, "vgg16", 1000),
    "base": (128, [(40_000, 128, None), (20_000, 256, 128), (10_000, 256, 128)], 2000, "vgg16", 1000),
    "large": (256, [(60_000, 128, None), (40_000, 384, 128), (10_000, 384, 128)], 3000, "vgg16", 1000),
}


def training_config(config: ml_collections.ConfigDict, variant: str) -> None:
    """Adds `data_dir`, the data globs, `config.train` and `config.eval` (vfusion3d_jax/train/trainer.py)."""
    batch_size, stages, warmup, lpips_net, interval = _TRAIN[variant]
    render_size = _RUN[variant][1]
    # Output directory of `render-data`: train and held-out shards under <data_dir>/shards/.
    config.data_dir = "data/tiny"
    config.data.mixture.rendered.glob = config.get_ref("data_dir") + "/shards/train-*.tfrecord"
    config.data.batch_size = batch_size
    config.data.num_target_views = 4  # the source view + 3 others (OpenLRM)

    config.train = ml_collections.ConfigDict()
    config.train.seed = 0  # parameter init and the per-step randomness (fold_in(seed, step))
    # Start from the model of another run's checkpoint (e.g. `convert` output: the official
    # weights) instead of a random init; ignored once this run has checkpoints of its own.
    config.train.init_checkpoint = config_dict.placeholder(str)
    # OpenLRM's recipe (vfusion3d_jax/train/optimizer.py); one schedule spans all stages.
    config.train.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=4e-4,
        warmup_steps=warmup,
        final_lr_fraction=0.0,  # cosine to this fraction of the peak at the last step
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.05,  # never on rank < 2 parameters (norms, biases)
        grad_clip_norm=1.0,
        no_decay_patterns=(),  # substrings of parameter paths also exempt from decay
    ))
    # An exponential moving average of the parameters, for evaluation and export (checkpoint item
    # `ema`, read by `infer`/`evaluate`/init_checkpoint); 0 = none, as OpenLRM and VFusion3D train.
    config.train.ema_decay = 0.0
    # VFusion3D's multi-stage training, in this order; a stage with num_steps 0 is skipped. Each
    # overrides these fields of config.data: full render side (target_resolution), optional
    # random render side per example (target_resize_range, needs patch_size), random patch side
    # (patch_size, None = the whole render), views, and the mixture weights per dataset.
    config.train.stage_order = ("low_res", "high_res", "finetune")
    config.train.stages = ml_collections.ConfigDict()
    for name, (num_steps, resolution, patch) in zip(config.train.stage_order, stages):
        config.train.stages[name] = ml_collections.ConfigDict(dict(
            num_steps=num_steps,
            target_resolution=resolution,
            target_resize_range=config_dict.placeholder(tuple),
            patch_size=config_dict.placeholder(int) if patch is None else patch,
            num_target_views=4,
            # The final stage fine-tunes on rendered 3D data only.
            mixture=dict(rendered=1.0, synthetic=0.0 if name == "finetune" else 1.0),
        ))
    # Loss weights per data source (vfusion3d_jax/train/losses.py). Synthetic orbits get image-level
    # supervision only: LPIPS, no pixel MSE.
    config.train.loss = ml_collections.ConfigDict(dict(
        mse=dict(rendered=1.0, synthetic=0.0),
        # The pixel MSE over the target's object pixels only (losses.py): small objects over white
        # would otherwise be supervised mostly by their background.
        foreground_mse=dict(rendered=0.0, synthetic=0.0),
        lpips=dict(rendered=1.0, synthetic=1.0),
        lpips_net=lpips_net,  # "vgg16" (OpenLRM's training loss) or "alexnet" (cheaper)
        opacity=dict(rendered=1.0, synthetic=1.0),  # rendered opacity vs foreground mask
        tv=5e-4,  # triplane total variation
    ))
    # Camera noise injection on synthetic examples (their poses are estimates): per camera a random
    # rotation about its centre (σ degrees per axis) and offset (σ world units per axis). The paper
    # gives no magnitudes; these are ours.
    config.train.camera_noise = ml_collections.ConfigDict(dict(
        rotation_deg=1.0, translation=0.01, source=False, targets=True))
    # A random background colour per example for renders and targets alike (official: white).
    config.train.random_background = False
    # A NaN/inf loss or gradient norm: "stop" raises; "skip" drops that update and goes on.
    config.train.nonfinite = "stop"
    # End this job after this global step (checkpointed; run again to go on), e.g. to fit a queue's
    # time limit. None = train to the end.
    config.train.stop_after = config_dict.placeholder(int)
    config.train.checkpoint_every = interval
    config.train.checkpoint_keep = 3
    config.train.log_every = 10 if variant in ("fixture", "tiny") else 50
    # Rays per object marched at once (bounds memory); None = the renderer's backend default
    # (128 on CPU, where larger chunks fall out of cache; 4096 on accelerators).
    config.train.render_chunk_size = config_dict.placeholder(int)

    # Evaluation on held-out objects: fixed seed (same objects, views and cameras every time),
    # deterministic rendering, PSNR / SSIM / LPIPS (AlexNet) on novel views; image grid PNGs.
    config.eval = ml_collections.ConfigDict(dict(
        glob=config.get_ref("data_dir") + "/shards/holdout-*.tfrecord",
        every=interval * 2,  # 0 = no evaluation
        num_batches=2 if variant in ("fixture", "tiny") else 4,
        batch_size=batch_size,
        num_target_views=3,
        resolution=render_size,
        seed=1234,
        grid_rows=4,
        # The input-swap test: each example's views are also rendered from the planes of this many
        # other examples of its batch (conditioning gain, retrieval; chance 1 / (1 + input_swap)).
        # Costs input_swap extra renders per evaluation batch; 0 = off.
        input_swap=3,
        # Also the norm of the gradient of the renders with respect to the source image (a backward
        # pass through full renders: cheap at tiny sizes, memory-hungry at 384 px).
        source_gradient=variant in ("fixture", "tiny"),
    ))
