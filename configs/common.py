"""Config pieces shared by the experiment configs.

`input_config()` holds the defaults of the Grain input pipeline
(`vfusion3d_jax.data.pipeline.make_iterator`); experiment configs put it at `config.data` and
override fields, and so can the command line:

    python -m vfusion3d_jax train --config=configs/lrm.py:tiny \
        --config.data.mixture.synthetic.glob='/data/synthetic/train-*.tfrecord' \
        --config.data.mixture.synthetic.weight=9 --config.data.mixture.synthetic.quality_min=0.5
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def mixture_component(weight: float = 1.0, source: str | None = None) -> ml_collections.ConfigDict:
    """One dataset of the mixture: its shards, its sampling weight and an optional source filter."""
    return ml_collections.ConfigDict(dict(
        # Shards of this dataset: a glob, or several separated by commas. Unset = component unused.
        glob=config_dict.placeholder(str),
        # Relative sampling weight; the weights hold for the examples that pass the filters.
        # 0 = component unused.
        weight=weight,
        # Keep only records whose object/source is this ('rendered' or 'synthetic'); None = any.
        source=config_dict.placeholder(str) if source is None else source,
        # This dataset's meta/quality threshold (e.g. curated synthetic orbits: `curate`'s score);
        # None = the pipeline's `quality_min`.
        quality_min=config_dict.placeholder(float),
    ))


def input_config() -> ml_collections.ConfigDict:
    """Defaults of the orbit input pipeline; every field documented inline."""
    config = ml_collections.ConfigDict()
    # Named datasets mixed by weight. Components with no glob or weight 0 are left out, so the
    # command line can switch either on without adding keys to a locked config.
    config.mixture = ml_collections.ConfigDict(dict(
        rendered=mixture_component(weight=1.0),
        synthetic=mixture_component(weight=1.0),
    ))
    # Seeds the global shuffle (reshuffled each epoch) and every per-example choice (views, sizes,
    # crops); the same seed gives the same batches on any number of hosts.
    config.seed = 0
    # Global batch size; each of the shard_count hosts gets batch_size // shard_count per step.
    config.batch_size = 8
    # Passes over each dataset; None = repeat forever (training). With several datasets the
    # iterator ends when the first runs out.
    config.num_epochs = config_dict.placeholder(int)
    # Drop a last partial batch (keeps shapes static for jit; turn off only for exact evaluation).
    config.drop_remainder = True

    # The kind of example (vfusion3d_jax/data/pipeline.py's docstring has each batch's keys):
    # 'views' = one source and num_target_views target views (the LRM); 'clip' = num_frames views
    # going around the orbit in order, with the caption (the video diffusion model).
    config.example = "views"

    # Views per example: one source view (the encoder input) and num_target_views supervision views.
    config.num_target_views = 4
    # VFusion3D/OpenLRM supervise on the source view plus 3 others: the source view is target 0.
    config.include_source_in_targets = True
    # Express every camera in the frame where the source camera has the official canonical pose
    # (cameras.CANONICAL_SOURCE_CAM2WORLD's rotation, at the source view's own distance), as the
    # official inferrer assumes (for clips: frame 0's); False keeps the cameras of the record.
    config.canonicalize_cameras = True
    # Input views (FlexRM, configs/flexrm.py): besides the source view, up to num_input_views - 1
    # other views of the orbit, drawn at random, go to the encoder (input_images, input_cameras);
    # input_mask keeps the first n, with n drawn per example from [min_input_views,
    # num_input_views]. 1 = the source view alone (the LRM; no input_* keys).
    config.num_input_views = 1
    config.min_input_views = 1
    # Side of the square source image given to the encoder (official: 512).
    config.source_resolution = 512
    # Side of the square full render of the target views (the supervision images).
    config.target_resolution = 128
    # (min, max) side of the full render, drawn per example (both ends included); requires
    # patch_size. None = always target_resolution.
    config.target_resize_range = config_dict.placeholder(tuple)
    # Side of the random square patch of each target view to supervise; None = the full image.
    config.patch_size = config_dict.placeholder(int)

    # Clips (example = 'clip'). Frames per clip: views of one orbit from a random start, in order of
    # azimuth, wrapping around (the paper's orbits have 16 views).
    config.num_frames = 16
    # Side of the square frames (the orbits rendered by configs/data.py:builtin are 128 px).
    config.clip_resolution = 128
    # Views from one frame to the next; None = num_views // num_frames, spread over the whole orbit;
    # 1 = consecutive views (a short arc). A clip never comes back to a view it already holds.
    config.clip_stride = config_dict.placeholder(int)
    # Bytes of a clip's caption (object/caption, UTF-8) in caption_bytes: zero-padded, and cut
    # after the last whole word that fits. Procedural objects' captions run to ~165 bytes
    # (median ~75): 48 keeps the largest part or two of an object.
    config.caption_length = 48

    # Turn the hue of every view of an example by one random angle (about the grey axis: greys stay
    # grey, brightness stays). The colours of the target views then exist only in the source view,
    # so the model can only get them from its input, never from memorising an object. A clip's
    # frames turn alike; its caption's colour words then no longer hold, so leave this off when
    # conditioning on captions.
    config.random_hue = False
    # Mirror half the examples left-right ('views' examples only): every view flipped and every
    # camera mirrored with the world (cameras.mirror_cameras), so each orbit is also seen as its
    # mirror image, a second plausible object (the canonical source camera stays where it is).
    # No measurable gain for the demo's LRM (benchmarks/RESULTS.md, issue 10).
    config.random_mirror = False

    # Metadata filters, applied per record before any image is decoded.
    # Keep records with meta/quality >= quality_min; None = no quality filter.
    config.quality_min = config_dict.placeholder(float)
    # What quality_min does to records of unknown (NaN) quality, e.g. rendered assets.
    config.keep_unknown_quality = True
    # Keep records with meta/elevation_deg in [min, max]; None = any elevation.
    config.elevation_range_deg = config_dict.placeholder(tuple)

    # Drop records whose frame or CRC is corrupt (batches count them in `corrupt_skipped`)
    # instead of raising CorruptRecordError.
    config.skip_corrupt = False
    # Grain worker processes; 0 = everything in this process (threads only).
    config.worker_count = 0
    # Batches each worker process prepares ahead.
    config.worker_buffer_size = 2
    # Threads reading and decoding records, per dataset and per process.
    config.read_threads = 8
    # Examples read ahead, per dataset and per process.
    config.read_buffer_size = 32
    return config


def mesh_config() -> ml_collections.ConfigDict:
    """Mesh axes (data, fsdp, tensor; -1 = the remaining devices) and logical-axis rules, one entry
    per logical name of models/layers.py LOGICAL_AXES plus the activations' batch axes."""
    return ml_collections.ConfigDict(dict(
        shape=dict(data=1, fsdp=-1, tensor=1),
        logical_rules=(
            ("batch", ("data", "fsdp")),
            ("act_batch", ("data", "fsdp")),
            ("act_rays", "tensor"),
            ("layers", None),
            ("embed", "fsdp"),
            ("mlp", "tensor"),
            ("heads", "tensor"),
            ("cond", None),
            ("tokens", None),
            ("channels", None),
        ),
    ))


def sees_its_input(config: ml_collections.ConfigDict) -> None:
    """The recipe that makes a tiny reconstruction model use its input, for the LRM (configs/demo.py)
    and FlexRM (configs/flexrm.py:tiny); benchmarks/RESULTS.md, "Does the LRM use its input?".

    7 px patches (objects ~45% of a 112 px view cover ~7x7 tokens instead of ~3x3); every
    example's hue turned at random, so colour exists only in the input views; a loss on the
    object's pixels alone; a higher learning rate; and 8 + 8 samples per ray: ray marching is most
    of a step, and a tiny model is short of examples, not of rays per example.
    """
    config.model.encoder.patch_size = 7
    config.data.random_hue = True
    config.train.loss.foreground_mse.rendered = 1.0
    config.train.optimizer.learning_rate = 1e-3
    config.render.num_coarse = config.render.num_importance = 8
