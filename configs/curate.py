"""Curation of orbits (`curate`): score every orbit, write the scores into its record.

    python -m vfusion3d_jax curate --checkpoint=runs/lrm_tiny --data='data/synthetic/shards/*.tfrecord' \
        --workdir=data/synthetic_curated
    python -m vfusion3d_jax train --config=configs/lrm.py:tiny --config.data.quality_min=0.5 ...

--checkpoint is the LRM whose reconstructions the quality score compares with each orbit
(`vfusion3d_jax/curation/quality.py` documents the score). Field meanings are in the comments.
"""

from __future__ import annotations

import ml_collections


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
    return config
