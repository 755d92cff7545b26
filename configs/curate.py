"""Curation of orbits (`curate`): score every orbit, write the scores into its record.

    python -m vfusion3d_jax curate --checkpoint=runs/lrm_tiny --data='data/synthetic/shards/*.tfrecord' \
        --workdir=data/synthetic_curated
    python -m vfusion3d_jax train --config=configs/lrm.py:tiny --config.data.quality_min=0.5 ...

--checkpoint is the LRM whose reconstructions the quality score compares with each orbit
(`vfusion3d_jax/curation/quality.py` documents the score). Field meanings are in the comments.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Which records get a score; the others are copied unchanged (their meta/quality kept).
    # "synthetic", "rendered" or "all".
    config.sources = "synthetic"
    # Side at which each view is re-rendered by the LRM and compared (LPIPS needs >= 32).
    config.resolution = 64
    # Voxels per side of the visual hull carved from the silhouettes.
    config.hull_resolution = 48
    # Orbits reconstructed per LRM call (the last call padded).
    config.batch_size = 8
    # The sheet: this many lowest- and highest-scoring orbits, each a row of its views.
    config.sheet_rows = 6
    # Learned quality (vfusion3d_jax/curation/estimators.py), logistic regression on the LRM
    # encoder's features of the first view: from a saved `model` (.npz), else fitted on a
    # `labels` file of the curated data (`object_id,good|bad` per line; held_out_fraction of it
    # reports the accuracy), else bootstrapped after scoring from the label-free score's best and
    # worst `bootstrap_fraction` (saved as classifier.npz). Its P(good) goes into the scores;
    # `as_quality` writes it into meta/quality instead of the label-free score (needs a model or
    # labels: it must exist before the shards are written).
    config.classifier = ml_collections.ConfigDict(dict(
        model=config_dict.placeholder(str),
        labels=config_dict.placeholder(str),
        bootstrap_fraction=0.2,
        held_out_fraction=0.2,
        as_quality=False,
    ))
    # Elevation, ridge regression on the same features: from a saved `estimator` (.npz), else
    # fitted on `train_data` (rendered orbits, elevation known; held_out_fraction reports the
    # error; saved as elevation.npz). Its estimate goes into the scores; `replace` also writes it
    # into meta/elevation_deg (for orbits of images whose elevation nobody knows).
    config.elevation = ml_collections.ConfigDict(dict(
        estimator=config_dict.placeholder(str),
        train_data=config_dict.placeholder(str),
        held_out_fraction=0.2,
        replace=False,
    ))
    return config
