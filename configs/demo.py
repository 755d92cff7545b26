"""The README's main command: the whole system on embedded defaults, on a 2-core CPU.

    python -m vfusion3d_jax demo --workdir=runs/demo [--config=configs/demo.py --config.lrm.train...]

Stages (each a command of its own; the demo runs them in order, reusing finished work when
started again): render the built-in assets (`render-data`, configs/data.py:demo), train the
tiny LRM on them (`train`, configs/lrm.py:tiny with fewer steps), evaluate it on the held-out
objects (`evaluate`), and reconstruct held-out images into turntables and meshes (`infer`).
Each section below is the full config of its command, overridable on the command line.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from vfusion3d_jax.configs import config_module, load_config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.data = load_config("data.py:demo")
    # ~7 minutes of training on 2 cores: 1000 steps of 32 px renders, then 100 of 64 px renders
    # supervised by 32 px patches (fine-tuning on rendered data), with the recipe that makes tiny
    # use its input (configs/common.py's sees_its_input; benchmarks/RESULTS.md, "Does the LRM use
    # its input?") and tiny's source projection (each triplane token starts from the image feature
    # it projects to). The model is short of examples, not of rays per example: 2 supervised views
    # (the source and one other) at 32 px make a step ~2.7x cheaper with the recipe's 8 + 8 samples
    # per ray, and 2.8x the steps in a third more time beat the full rays (rows R to V).
    config.lrm = load_config("lrm.py:tiny")
    config_module(str(Path(__file__).with_name("common.py"))).sees_its_input(config.lrm)
    config.lrm.train.optimizer.warmup_steps = 20
    config.lrm.train.stages.low_res.num_target_views = 2
    for stage, steps in (("low_res", 1000), ("high_res", 0), ("finetune", 100)):
        config.lrm.train.stages[stage].num_steps = steps
    config.lrm.train.checkpoint_every = 100
    config.lrm.eval.every = 1100  # the untrained model (step 0) and the trained one
    config.lrm.eval.num_batches = 2
    config.evaluate = load_config("infer.py:evaluate")
    config.evaluate.mesh_resolution = 96
    config.evaluate.sheet_rows = 3
    config.infer = load_config("infer.py:infer")
    config.infer.render_size = 128
    config.infer.num_frames = 48
    config.infer.fps = 16.0
    config.infer.mesh_resolution = 128
    # Held-out source views written as RGBA PNGs for `infer` (the user-image path: alpha,
    # recentring, resizing).
    config.num_images = 4
    # Unseen objects made outside the built-in packages (trimesh primitives in colours of their
    # own, demo.unseen_meshes), rendered like the data and evaluated like the held-out objects.
    config.num_unseen = 8
    return config
