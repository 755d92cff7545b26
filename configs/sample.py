"""Orbit generation (`sample`) settings: the job's, on top of the checkpoint's.

The model, its codec, clip size and caption length come from the checkpoint (a
`train --config=configs/mvdiffusion.py:VARIANT` run); the sampler settings default to the
checkpoint's `config.sample` (what its training evaluated with) and any of them can be
overridden here. Field meanings are in the comments.

    python -m vfusion3d_jax sample --checkpoint=runs/mvdiffusion_tiny --inputs=photos/ --workdir=runs/orbits \
        [--prompt="a red torus"] [--config.sample.num_steps=50 --config.sample.seed=1 --config.elevation_deg=20]
    python -m vfusion3d_jax sample --checkpoint=runs/mvdiffusion_tiny --prompt="a red torus" --workdir=runs/orbits
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # The sampler ("unipc" or "euler"), its steps, the nested guidance scales
    # v = v_none + image_guidance*(v_image - v_none) + text_guidance*(v_image_text - v_image)
    # and the seed of the initial noise (the same seed gives the same orbit of an input);
    # None = the checkpoint's config.sample.
    config.sample = ml_collections.ConfigDict(dict(
        sampler=config_dict.placeholder(str),
        num_steps=config_dict.placeholder(int),
        image_guidance=config_dict.placeholder(float),
        text_guidance=config_dict.placeholder(float),
        # (low, high): guide only at noise levels σ inside it, elsewhere the conditioned prediction.
        guidance_interval=config_dict.placeholder(tuple),
        # < 1: start from the input view copied to every frame, noised to this level (SDEdit).
        init_strength=config_dict.placeholder(float),
        seed=config_dict.placeholder(int),
    ))
    # Frames of the orbit, evenly spaced in azimuth starting at the input view; None = the
    # checkpoint's data.num_frames (what the model was trained on).
    config.num_frames = config_dict.placeholder(int)
    # Elevation of the orbit in degrees, i.e. how high above the object the input view was taken
    # (rendered training orbits: 0 to 45).
    config.elevation_deg = 0.0
    # Foreground from the file's alpha channel, else a colour key (inference/preprocess.py), then
    # recentred so that the object's longest side fills (1 - border_ratio) of the frame: 0.55 is
    # how `render-data` frames objects (longest side 0.9 at radius 1.5 with fx 0.75: ~45% of the
    # image). recenter=False keeps the image's own framing.
    config.recenter = True
    config.border_ratio = 0.55
    # Inputs per sampling call (the last call is padded, so one program serves every call).
    config.batch_size = 4
    # Frame rate of orbit.mp4 and orbit.gif.
    config.fps = 8.0
    return config
