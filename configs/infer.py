"""Image to 3D (`infer`) and checkpoint evaluation (`evaluate`) settings.

The model, its input size and its render samples come from the checkpoint (its stored config);
these are the settings of the job. Variants:
    infer     turntable video (MP4 + GIF), novel-view sheet and coloured mesh (.glb + .obj) per image
    flexiview FlexiView3D: candidate views from the diffusion model, the consistent ones chosen,
              FlexRM's Gaussians (.ply), turntable and sheet per image (inference/flexiview.py)
    evaluate  metrics of held-out orbits: PSNR / SSIM / LPIPS per object, Chamfer distance of meshes

    python -m vfusion3d_jax infer --checkpoint=runs/lrm_tiny --inputs=photos/ --workdir=runs/infer \
        [--config=configs/infer.py --config.render_size=384 --config.num_frames=160]
    python -m vfusion3d_jax infer --config=configs/infer.py:flexiview --checkpoint=runs/flexrm_tiny \
        --config.diffusion_checkpoint=runs/mvdiffusion_tiny --inputs=photos/ --workdir=runs/flexiview
    python -m vfusion3d_jax evaluate --checkpoint=runs/lrm_tiny \
        --data='data/tiny/shards/holdout-*.tfrecord' --workdir=runs/eval [--config=configs/infer.py:evaluate]

A field left None takes the checkpoint's value. Field meanings are in the comments.
"""

from __future__ import annotations

import math

import ml_collections
from ml_collections import config_dict


def _model_input(config: ml_collections.ConfigDict) -> None:
    """How images reach the model; None = what the checkpoint's config says."""
    # Side of the square encoder input (checkpoint: data.source_resolution; official 512).
    config.source_size = config_dict.placeholder(int)
    # Distance of the canonical source camera (checkpoint: inference.source_distance; official 1.0).
    config.source_distance = config_dict.placeholder(float)
    # Ray-marching samples per ray, coarse + importance (checkpoint: render.num_*; official 64 + 64).
    config.num_coarse = config_dict.placeholder(int)
    config.num_importance = config_dict.placeholder(int)
    # Rays marched at once per object (memory bound); None = the renderer's backend default.
    config.render_chunk_size = config_dict.placeholder(int)
    # Objects per forward pass of the image-to-triplane network.
    config.batch_size = 4
    # Mesh: density grid side (official 512; coarse-to-fine, see rendering/mesh.py) and the
    # iso-level on the activated density (official 1.0).
    config.mesh_resolution = 256
    config.mesh_threshold = 1.0


def get_config(variant: str = "infer") -> ml_collections.ConfigDict:
    if variant not in ("infer", "flexiview", "evaluate"):
        raise ValueError(f"unknown variant {variant!r}; choose infer, flexiview or evaluate")
    config = ml_collections.ConfigDict()
    config.variant = variant
    _model_input(config)
    if variant in ("infer", "flexiview"):
        # Foreground: the file's alpha channel when it has one, else a colour-key background
        # removal (inference/preprocess.py). Recentring scales the object's bounding box to
        # (1 - border_ratio) of the image, as the official inferrer (0.2); None = the checkpoint's
        # inference.border_ratio (the framing it was trained on). recenter=False keeps the framing.
        config.recenter = True
        config.border_ratio = config_dict.placeholder(float)
        # Turntable: frames on a circle at this elevation and radius (official: 160 frames at 40
        # fps, elevation 0, radius 1.5), rendered at render_size^2 (official 384).
        config.render_size = 256
        config.num_frames = 80
        config.fps = 20.0
        config.elevation_deg = 0.0
        config.radius = 1.5
        # Novel-view sheet: this many views around the object at this elevation.
        config.preview_views = 8
        config.preview_elevation_deg = 20.0
        # Views rendered per call (memory bound on large renders).
        config.views_per_call = 8
        config.export_mesh = True
        # Text to 3D (--prompt=TEXT, or a file of captions, one per line): the multi-view diffusion
        # run that turns each caption into an orbit, whose first frame the LRM reconstructs; the
        # orbit's elevation and its noise seed.
        config.diffusion_checkpoint = config_dict.placeholder(str)
        config.prompts_file = config_dict.placeholder(str)
        config.prompt_elevation_deg = 20.0
        config.prompt_seed = 0
    if variant == "flexiview":
        # FlexRM's input views: the image and at most num_views - 1 generated candidates (1..32;
        # 1 = the image alone, no diffusion model needed).
        config.num_views = 4
        # Candidates: every frame but the first of this many orbits generated from the image (noise
        # seeds candidate_seed, candidate_seed + 1, ...), with the cameras of an orbit at
        # input_elevation_deg (the elevation assumed for the image) and the data's radius and
        # field of view.
        config.num_candidate_orbits = 2
        config.candidate_seed = 0
        config.input_elevation_deg = 20.0
        config.fov_deg = math.degrees(2 * math.atan(0.5 / 0.75))
        # Candidates whose epipolar consistency with the image (inference/view_selection.py) is
        # lower are never chosen; the rest are chosen for coverage, the best first.
        config.min_consistency = 0.0
        # Gaussians are small enough to render at the turntable's side; no mesh.
        config.render_size = 128
        config.num_frames = 48
        config.export_mesh = False
    if variant == "evaluate":
        # The view every orbit is reconstructed from; the others are compared.
        config.source_view = 0
        # Side of the compared views; None = the records' resolution.
        config.resolution = config_dict.placeholder(int)
        # At most this many orbits (None = all), in shard order.
        config.max_objects = config_dict.placeholder(int)
        # Chamfer distance of the exported mesh against the records' object/surface_points (when
        # they have them), with this many points sampled on the mesh.
        config.chamfer = True
        config.mesh_resolution = 128
        config.chamfer_points = 4096
        # The input-swap test: objects are evaluated in groups of this many, and each one's views
        # are also rendered from the other sources of its group (cost: swap_group times the
        # renders). 1 = off. Retrieval's chance level is 1 / swap_group.
        config.swap_group = 8
        # Rows of the sheet of the worst and of the best objects (by PSNR), and views per row.
        config.sheet_rows = 4
        config.sheet_views = 4
        # FlexRM checkpoints (inference/evaluate_views.py): the numbers of input views to compare
        # (`--config.num_views=1,4,8`), on targets that are never inputs (the orbit's views at odd
        # offsets from the source); with a diffusion run, also generated views, curated and random.
        config.num_views = (1, 2, 4, 8)
        config.diffusion_checkpoint = config_dict.placeholder(str)
        config.num_candidate_orbits = 2
        config.candidate_seed = 0
        # An LRM run scored beside FlexRM on the same targets, from the source view alone.
        config.lrm_checkpoint = config_dict.placeholder(str)
    return config
