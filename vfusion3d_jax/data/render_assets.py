"""Rendering 3D assets into multi-view orbit TFRecords: the `render-data` command.

    python -m vfusion3d_jax render-data --config=configs/data.py:builtin --workdir=DIR

Each asset (`vfusion3d_jax.data.assets`) becomes one orbit record (`data.example`): V views
at evenly spaced azimuths with a random offset, one elevation drawn from
`elevation_range_deg`, all at `radius` from the origin with focal length from `fov_deg`,
rendered by `data.rasterize` (RGBA, white background, alpha = foreground), source
'rendered', quality NaN, plus `num_surface_points` points sampled on the asset's surface
(`object/surface_points`: the ground truth of Chamfer evaluation) and a caption
(`object/caption`, from `data.captions`: "a duck", "a red torus"). Records go to
DIR/shards/{split}-{i:05d}-of-{n:05d}.tfrecord, split 'train' or 'holdout' (whole asset
groups held out, for evaluation on unseen objects).

* Deterministic: assets, split, shard contents, cameras and surface points depend only on the
  config (the cameras and points of an object on its id and the seed), so any number of
  workers writes the same bytes.
* Parallel: `num_workers` processes (spawned: each owns a pybullet client), whole shards each.
* Resumable: shards are written atomically, so an existing shard is a complete one and a
  restart skips it. The workdir remembers the config it was made with and refuses another.
* Robust: an asset that fails to load or render is skipped with a warning and listed in the
  summary (DIR/summary.json, also logged); the job stops only if nothing renders at all.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import ml_collections
import numpy as np
import tqdm
import trimesh
from absl import logging

from vfusion3d_jax import cameras, errors
from vfusion3d_jax.configs import load_config
from vfusion3d_jax.data import assets, captions, storage
from vfusion3d_jax.data.storage import stable_hash, write_json_atomically
from vfusion3d_jax.data.example import encode_orbit, read_metadata
from vfusion3d_jax.data.rasterize import Lighting, Rasterizer, placed_geometries
from vfusion3d_jax.data.tfrecord import TFRecordWriter, iterate_records

SPLITS = ("train", "holdout")
SHARD_DIR = "shards"
SUMMARY_FILE = "summary.json"
# The rendering config a workdir was made with; a restart with another config is refused.
RENDER_CONFIG_FILE = "render_config.json"
# Config fields that do not change the output bytes.
_OUTPUT_NEUTRAL_FIELDS = ("num_workers",)


@dataclasses.dataclass(frozen=True)
class OrbitSettings:
    """What a worker needs to render an orbit: the picklable part of the config."""

    num_views: int
    resolution: int
    supersample: int
    elevation_range_deg: tuple[float, float]
    radius: float
    focal: float  # normalised, fx = fy
    object_size: float
    lighting: Lighting
    seed: int
    num_surface_points: int  # 0 = records without object/surface_points

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> OrbitSettings:
        low, high = (float(e) for e in config.elevation_range_deg)
        if not low <= high:
            raise ValueError(f"elevation_range_deg must be (low, high) with low <= high, got {(low, high)}")
        if config.num_surface_points < 0:
            raise ValueError(f"num_surface_points must be >= 0, got {config.num_surface_points}")
        return cls(
            num_views=int(config.num_views), resolution=int(config.resolution), supersample=int(config.supersample),
            elevation_range_deg=(low, high), radius=float(config.radius),
            focal=float(cameras.fov_to_focal(config.fov_deg)), object_size=float(config.object_size),
            lighting=Lighting(tuple(float(v) for v in config.light_direction), float(config.light_ambient),
                              float(config.light_diffuse)),
            seed=int(config.seed), num_surface_points=int(config.num_surface_points))


@dataclasses.dataclass(frozen=True)
class ShardTask:
    """One shard to write: its path, its split and the assets it holds, in order."""

    path: str
    split: str
    specs: tuple[assets.AssetSpec, ...]


def split_assets(specs: list[assets.AssetSpec], holdout_fraction: float, seed: int) -> dict[str, list]:
    """Assets by split: round(fraction * groups) whole groups held out (at least one when fraction > 0).

    Groups are ranked by a seeded hash, so the choice does not depend on the listing order;
    within each split the assets are shuffled by the seed, so every shard mixes sources.
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    groups = sorted({spec.group for spec in specs}, key=lambda group: stable_hash(seed, "split", group))
    num_holdout = round(holdout_fraction * len(groups))
    if holdout_fraction > 0 and len(groups) > 1:
        num_holdout = min(max(num_holdout, 1), len(groups) - 1)
    held_out = set(groups[:num_holdout])
    by_split = {split: [] for split in SPLITS}
    for spec in specs:
        by_split["holdout" if spec.group in held_out else "train"].append(spec)
    rng = np.random.default_rng([seed, 1])
    return {split: [members[i] for i in rng.permutation(len(members))] for split, members in by_split.items()}


def plan_shards(by_split: dict[str, list], shard_size: int, shard_dir: str) -> list[ShardTask]:
    """Consecutive runs of `shard_size` assets per split, named {split}-{i:05d}-of-{n:05d}.tfrecord."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    tasks = []
    for split in SPLITS:
        members = by_split[split]
        count = math.ceil(len(members) / shard_size)
        for index in range(count):
            path = os.path.join(shard_dir, f"{split}-{index:05d}-of-{count:05d}.tfrecord")
            tasks.append(ShardTask(path, split, tuple(members[index * shard_size:(index + 1) * shard_size])))
    return tasks


def orbit_cameras(object_id: str, settings: OrbitSettings) -> tuple[np.ndarray, np.ndarray, float]:
    """cam2world (V, 4, 4), intrinsics (V, 3, 3) and elevation of an object's orbit; seeded by its id."""
    rng = np.random.default_rng([settings.seed, stable_hash("orbit", object_id)])
    elevation = float(rng.uniform(*settings.elevation_range_deg))
    offset = float(rng.uniform(0.0, 360.0 / settings.num_views))
    azimuths = cameras.orbit_azimuths(settings.num_views, offset_deg=offset)
    cam2world = cameras.orbit_cam2world(azimuths, elevation, settings.radius)
    intrinsics = cameras.intrinsics_matrix(settings.focal, settings.focal, 0.5, 0.5)
    return cam2world, np.broadcast_to(intrinsics, (settings.num_views, 3, 3)), elevation


def surface_points(scene: trimesh.Scene, object_id: str, settings: OrbitSettings) -> np.ndarray:
    """float32 (P, 3) world points uniform by area on the scene's triangles; seeded by the object id.

    The triangles are gathered bare (the rasteriser's placed parts) rather than by
    `scene.to_geometry()`, which also merges materials and textures: up to 0.2 s for the
    many-part robots, and a way to fail that has nothing to do with the geometry.
    """
    vertices, faces, offset = [], [], 0
    for _, part_vertices, part_faces in placed_geometries(scene):
        vertices.append(part_vertices)
        faces.append(part_faces + offset)
        offset += len(part_vertices)
    if not faces:
        raise assets.AssetError(f"{object_id}: no triangles to sample surface points on")
    mesh = trimesh.Trimesh(np.concatenate(vertices), np.concatenate(faces), process=False)
    rng = np.random.default_rng([settings.seed, stable_hash("surface", object_id)])
    points, _ = trimesh.sample.sample_surface(mesh, settings.num_surface_points, seed=rng)
    return points.astype(np.float32)


def framing_extent(object_size: float, radius: float, focal: float, elevation_range_deg) -> float:
    """Largest image extent (1 = the full width) of the bounding cube of any normalised asset over all orbits.

    Above 1, some objects are cut off at some views. Samples azimuths every degree and
    elevations every degree of the range (both ends included).
    """
    half = object_size / 2
    corners = np.array(np.meshgrid([-half, half], [-half, half], [-half, half], indexing="ij")).reshape(3, -1).T
    low, high = elevation_range_deg
    elevations = np.linspace(low, high, max(2, int(high - low) + 1))
    azimuths = np.arange(360.0)
    cam2world = cameras.orbit_cam2world(azimuths[None, :], elevations[:, None], radius).reshape(-1, 4, 4)
    intrinsics = cameras.intrinsics_matrix(focal, focal, 0.5, 0.5)
    uv = np.stack([cameras.project_points(corners, pose, intrinsics) for pose in cam2world])
    return float(2 * np.max(np.abs(uv - 0.5)))


def render_orbit(rasterizer: Rasterizer, spec: assets.AssetSpec, settings: OrbitSettings) -> bytes:
    """One asset's orbit as a serialised record. Raises AssetError (or a pybullet error) on a broken asset."""
    mesh = assets.load_asset(spec, settings.object_size)
    cam2world, intrinsics, elevation = orbit_cameras(spec.object_id, settings)
    views = rasterizer.render(mesh, cam2world, intrinsics, settings.resolution)
    if not views.rgba[..., 3].any():
        raise assets.AssetError(f"{spec.object_id}: nothing visible in any view")
    points = surface_points(mesh, spec.object_id, settings) if settings.num_surface_points else None
    return encode_orbit(views.rgba, cam2world, intrinsics, object_id=spec.object_id, source="rendered",
                        elevation_deg=elevation, surface_points=points, caption=captions.asset_caption(spec))


def _summary_path(shard_path: str) -> str:
    return shard_path + ".summary.json"


def render_shard(task: ShardTask, settings: OrbitSettings, on_object: Callable[[], None] = lambda: None) -> dict:
    """Renders a shard (atomically) and its per-shard summary beside it; returns the summary.

    A fresh pybullet client per shard: pybullet keeps every mesh it loaded until disconnected.
    """
    start = time.perf_counter()
    rendered, skipped = [], []
    with Rasterizer(settings.lighting, settings.supersample) as rasterizer, TFRecordWriter(task.path) as writer:
        for spec in task.specs:
            try:
                writer.write(render_orbit(rasterizer, spec, settings))
                rendered.append(spec)
            except Exception as error:  # noqa: BLE001 - any failure of one asset must not stop the job
                reason = f"{type(error).__name__}: {error}"
                skipped.append(dict(object_id=spec.object_id, path=spec.path, reason=reason))
            on_object()
    summary = _shard_summary(task, rendered, skipped, settings, seconds=time.perf_counter() - start)
    write_json_atomically(_summary_path(task.path), summary)
    return summary


def _shard_summary(task: ShardTask, rendered: list, skipped: list[dict], settings: OrbitSettings,
                   seconds: float) -> dict:
    return dict(shard=os.path.basename(task.path), split=task.split, objects=len(rendered),
                views=len(rendered) * settings.num_views, sources=dict(Counter(s.source for s in rendered)),
                skipped=skipped, seconds=round(seconds, 3))


def _existing_shard_summary(task: ShardTask, settings: OrbitSettings) -> dict:
    """The summary of a shard a previous run completed (rebuilt from its records if the file is missing)."""
    try:
        with open(_summary_path(task.path)) as file:
            return json.load(file)
    except (OSError, json.JSONDecodeError):
        pass
    present = {read_metadata(record).object_id for record in iterate_records(task.path)}
    rendered = [s for s in task.specs if s.object_id in present]
    skipped = [dict(object_id=s.object_id, path=s.path, reason="skipped by an earlier run")
               for s in task.specs if s.object_id not in present]
    return _shard_summary(task, rendered, skipped, settings, seconds=0.0)


# --- Worker processes --------------------------------------------------------------------------

_worker_state: dict = {}


def _init_worker(settings: OrbitSettings, progress_queue) -> None:
    _worker_state.update(settings=settings, queue=progress_queue)


def _render_shard_in_worker(task: ShardTask) -> dict:
    queue = _worker_state["queue"]
    return render_shard(task, _worker_state["settings"], on_object=lambda: queue.put(1))


def _run_tasks(tasks: list[ShardTask], settings: OrbitSettings, num_workers: int, bar: tqdm.tqdm) -> list[dict]:
    """Renders the shards, in this process or in `num_workers` processes; summaries as they finish."""
    def finished(summary: dict) -> dict:
        for skipped in summary["skipped"]:
            logging.warning("skipped asset %s (%s): %s", skipped["object_id"], skipped["path"], skipped["reason"])
        return summary

    if num_workers <= 1:
        return [finished(render_shard(task, settings, on_object=lambda: bar.update(1))) for task in tasks]
    # Spawned, not forked: the parent may hold JAX's threads.
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()

    def forward_progress():
        while queue.get() is not None:
            bar.update(1)

    forwarder = threading.Thread(target=forward_progress, daemon=True)
    forwarder.start()
    pool = context.Pool(num_workers, initializer=_init_worker, initargs=(settings, queue))
    try:
        summaries = [finished(s) for s in pool.imap_unordered(_render_shard_in_worker, tasks, chunksize=1)]
        pool.close()
        return summaries
    finally:
        pool.terminate()  # after close(): workers are idle; on an error: stop them
        pool.join()
        queue.put(None)
        forwarder.join()


# --- The command -------------------------------------------------------------------------------


def render_dataset(config: ml_collections.ConfigDict | None, workdir: str | None, args: list[str]) -> dict:
    """Renders the assets of `config` into orbit TFRecord shards under `workdir`; returns the summary."""
    if args:
        raise errors.UsageError(f"render-data takes no positional arguments, got {args}")
    if workdir is None:
        raise errors.UsageError("render-data needs --workdir")
    if config is None:
        config = load_config("data.py:builtin")
        logging.info("no --config given: using configs/data.py:builtin")
    settings = OrbitSettings.from_config(config)
    extent = framing_extent(settings.object_size, settings.radius, settings.focal, settings.elevation_range_deg)
    if extent > 1.0:
        logging.warning("with object_size=%g, radius=%g, fov_deg=%g the largest objects span %.0f%% of the image "
                        "width at some views: they will be cut off", settings.object_size, settings.radius,
                        config.fov_deg, 100 * extent)
    workdir_path = Path(workdir)
    shard_dir = workdir_path / SHARD_DIR
    shard_dir.mkdir(parents=True, exist_ok=True)
    storage.claim_workdir(workdir_path / RENDER_CONFIG_FILE, {k: v for k, v in config.to_dict().items()
                                                              if k not in _OUTPUT_NEUTRAL_FIELDS}, "render-data")

    specs = assets.list_assets(config.assets, num_procedural=config.num_procedural, seed=config.seed,
                               up_axis=config.up_axis, max_assets_per_source=config.max_assets_per_source)
    tasks = plan_shards(split_assets(specs, config.holdout_fraction, config.seed), config.shard_size, str(shard_dir))
    pending = [task for task in tasks if not os.path.exists(task.path)]
    num_workers = min(config.num_workers or os.cpu_count() or 1, max(1, len(pending)))
    logging.info("render-data: %d assets in %d shards (%d already complete) -> %s, %d worker(s)",
                 len(specs), len(tasks), len(tasks) - len(pending), shard_dir, num_workers)

    start = time.perf_counter()
    with tqdm.tqdm(total=sum(len(t.specs) for t in pending), unit="object", desc="render-data") as bar:
        rendered_now = _run_tasks(pending, settings, num_workers, bar)
    seconds = time.perf_counter() - start
    pending_paths = {task.path for task in pending}
    shard_summaries = rendered_now + [_existing_shard_summary(task, settings)
                                      for task in tasks if task.path not in pending_paths]
    shard_summaries.sort(key=lambda s: s["shard"])

    skipped = [item for s in shard_summaries for item in s["skipped"]]
    objects_now = sum(s["objects"] for s in rendered_now)
    summary = dict(
        shard_dir=str(shard_dir),
        assets_listed=len(specs),
        objects=sum(s["objects"] for s in shard_summaries),
        views=sum(s["views"] for s in shard_summaries),
        skipped=len(skipped),
        splits={split: dict(objects=sum(s["objects"] for s in shard_summaries if s["split"] == split),
                            shards=sum(1 for s in shard_summaries if s["split"] == split)) for split in SPLITS},
        sources=dict(sum((Counter(s["sources"]) for s in shard_summaries), Counter())),
        shards_rendered_now=len(rendered_now),
        shards_already_complete=len(tasks) - len(pending),
        num_workers=num_workers,
        seconds=round(seconds, 2),
        objects_per_second=round(objects_now / seconds, 3) if rendered_now else None,
        views_per_second=round(objects_now * settings.num_views / seconds, 2) if rendered_now else None,
        framing_extent=round(extent, 4),
        skipped_assets=skipped,
        config=json.loads(json.dumps(config.to_dict(), default=str)),
    )
    write_json_atomically(str(workdir_path / SUMMARY_FILE), summary)
    logging.info("render-data summary: %s", json.dumps({k: v for k, v in summary.items()
                                                        if k not in ("skipped_assets", "config")}))
    if specs and summary["objects"] == 0:
        reasons = "; ".join(f"{s['object_id']}: {s['reason']}" for s in skipped[:3])
        raise RuntimeError(f"no asset rendered ({len(skipped)} skipped), e.g. {reasons}")
    return summary
