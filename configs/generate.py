"""The synthetic-data engine (`generate`): conditions in, synthetic orbit TFRecords out.

The model, its codec, clip size and caption length come from the checkpoint (a
`train --config=configs/mvdiffusion.py:VARIANT` run, its EMA weights where it kept them); the
sampler settings default to the checkpoint's `config.sample` and can be overridden here, as for
`sample` (configs/sample.py, whose fields this config shares). Field meanings are in the comments.

    python -m vfusion3d_jax generate --config=configs/generate.py:tiny --checkpoint=runs/mvd_tiny \
        --config.inputs.orbits='data/image_pool/shards/*.tfrecord' --workdir=data/synthetic
    python -m vfusion3d_jax generate --config=configs/generate.py --checkpoint=runs/mvd_tiny \
        --config.inputs.images=photos/ --config.inputs.prompts=prompts.txt --workdir=data/synthetic

Variants:
    default   64 orbits per shard, 4 orbits per device and sampling call
    tiny      the same with 16 orbits per shard (tests and the CPU experiment)
"""

from __future__ import annotations

import math
from pathlib import Path

import ml_collections
from ml_collections import config_dict

from vfusion3d_jax.configs import config_module


def get_config(variant: str = "default") -> ml_collections.ConfigDict:
    if variant not in ("default", "tiny"):
        raise ValueError(f"unknown generate config variant {variant!r}; expected default or tiny")
    config = config_module(str(Path(__file__).with_name("sample.py"))).get_config()
    # What to condition on; any combination, each a deterministic, sorted list:
    #   images   a file, folder or glob of images (prepared as `sample` prepares them)
    #   orbits   a glob of orbit TFRecords (e.g. an image pool: `render-data --config=configs/data.py:
    #            image_pool`); view `orbit_view` of each record is the input, with its caption and
    #            elevation
    #   prompts  a text file, one caption per line (text-only orbits)
    config.inputs = ml_collections.ConfigDict(dict(
        images=config_dict.placeholder(str),
        orbits=config_dict.placeholder(str),
        orbit_view=0,
        prompts=config_dict.placeholder(str),
    ))
    # Orbits per input, each from its own noise (`#k` appended to the object id when > 1).
    config.orbits_per_input = 1
    # Caption of image inputs (images carry none of their own).
    config.image_caption = ""
    # The cameras written with each synthetic orbit: frame 0 at azimuth 0 for images and prompts
    # (an orbit input keeps its view's azimuth), then evenly spaced around the circle, all at
    # `radius` with the focal length of `fov_deg` (the rendered data's: configs/data.py).
    config.radius = 1.5
    config.fov_deg = math.degrees(2 * math.atan(0.5 / 0.75))
    config.elevation_deg = 20.0  # images and prompts; orbit inputs keep their own elevation
    # Orbits per device in one sampling call (the batch is split over the local devices).
    config.batch_size = 4
    # Orbits per output shard; every process writes whole shards of its own.
    config.shard_size = 16 if variant == "tiny" else 64
    return config
