"""Rendering 3D assets into multi-view orbit TFRecords (`render-data`), and inspecting them.

Variants:
    builtin   pybullet_data objects and blobs + 1000 procedural objects (~2000), 128 px, 16 views
    demo      144 assets (48 of each source), 64 px, 16 views: the README's demo (configs/demo.py)
    tiny      12 assets (8 pybullet_data objects, 4 procedural), 32 px, 8 views: tests
    image_pool 256 procedural objects of another seed, one 64 px view each: `generate`'s inputs

    python -m vfusion3d_jax render-data --config=configs/data.py:builtin --workdir=data/builtin
    python -m vfusion3d_jax render-data --config=configs/data.py:tiny --workdir=data/tiny
    python -m vfusion3d_jax render-data --config=configs/data.py:builtin \
        --config.assets='/data/meshes/**/*.glb' --config.num_procedural=0 --workdir=data/mine
    python -m vfusion3d_jax inspect-data data/builtin/shards [--workdir=data/builtin/inspect]

Shards land in WORKDIR/shards/{train,holdout}-IIIII-of-NNNNN.tfrecord, with WORKDIR/summary.json.
A restarted command skips the shards that are complete. Field meanings are in the comments.
"""

from __future__ import annotations

import math

import ml_collections


def get_config(variant: str = "builtin") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Comma-separated sources and/or paths: 'pybullet_objects', 'pybullet_blobs', 'procedural',
    # 'builtin' (all three), a mesh file, a folder (searched recursively) or a glob (quote it).
    config.assets = "builtin"
    # Procedural objects made when `assets` includes 'procedural' (a pure function of seed and index).
    config.num_procedural = 1000
    # Keep at most this many assets of each non-procedural entry of `assets` (0 = all).
    config.max_assets_per_source = 0
    # Up axis of the asset files: 'auto' (+z for pybullet_data and procedural, +y for user
    # files, as glTF) or one of +x -x +y -y +z -z for every asset.
    config.up_axis = "auto"
    # Assets are centred and scaled so that the longest side of their bounding box is this.
    config.object_size = 0.9

    # Orbit: views at evenly spaced azimuths (random offset) and one elevation per object,
    # drawn uniformly from elevation_range_deg; cameras look at the origin from `radius`.
    config.num_views = 16
    config.elevation_range_deg = (0.0, 45.0)
    # The official turntable camera: radius 1.5 and fx = fy = 0.75 (a 67.4 degree field of view).
    config.radius = 1.5
    config.fov_deg = math.degrees(2 * math.atan(0.5 / 0.75))
    config.resolution = 128
    # Render supersample x supersample pixels per output pixel (anti-aliasing; cost ~ its square).
    config.supersample = 2
    # One light fixed in the world (direction towards the light), Lambertian plus ambient.
    config.light_direction = (0.35, 0.25, 1.0)
    config.light_ambient = 0.55
    config.light_diffuse = 0.5
    # Points sampled uniformly (by area) on each asset's normalised surface and stored in its
    # record (object/surface_points, 12 bytes each): the ground truth of Chamfer evaluation. 0 = none.
    config.num_surface_points = 2048

    # Seeds procedural objects, the split, the shard order and every orbit's cameras and surface points.
    config.seed = 0
    # Fraction of objects (whole groups: variants of one robot go together) held out for evaluation.
    config.holdout_fraction = 0.05
    # Objects per shard; each worker renders whole shards.
    config.shard_size = 64
    # Worker processes; 0 = one per CPU core. The output does not depend on it.
    config.num_workers = 0

    if variant == "builtin":
        pass
    elif variant == "demo":
        config.max_assets_per_source = 48
        config.num_procedural = 48
        config.resolution = 64
        config.shard_size = 16
    elif variant == "tiny":
        config.assets = "pybullet_objects,procedural"
        config.max_assets_per_source = 8
        config.num_procedural = 4
        config.num_views = 8
        config.resolution = 32
        config.holdout_fraction = 0.2
        config.shard_size = 4
    elif variant == "image_pool":
        # Images without 3D for the synthetic-data engine (`generate --config.inputs.orbits=...`):
        # one view each of procedural objects of another seed, so none is an object of the
        # rendered sets above (their ids, procedural/s<seed>-<index>, say so).
        config.assets = "procedural"
        config.num_procedural = 256
        config.seed = 1
        config.num_views = 1
        config.resolution = 64
        config.num_surface_points = 0
        config.holdout_fraction = 0.0
    else:
        raise ValueError(f"unknown data config variant {variant!r}; expected builtin, demo, tiny or image_pool")
    return config
