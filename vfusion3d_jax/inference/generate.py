"""The synthetic-data engine: the `generate` command. Conditions in, synthetic orbit TFRecords out.

    python -m vfusion3d_jax generate --config=configs/generate.py:tiny --checkpoint=RUN_DIR \
        --config.inputs.orbits='data/image_pool/shards/*.tfrecord' --workdir=OUT

VFusion3D's data factory: the fine-tuned multi-view diffusion model (a `train
--config=configs/mvdiffusion.py:VARIANT` run, its EMA weights) turns images, the views of
existing orbit records (an image pool) and text prompts into orbits, written in the data
contract (`data/example.py`) so every reader and the Grain pipeline take them unchanged:

    OUT/shards/synthetic-IIIII-of-NNNNN.tfrecord   + .index, + .summary.json (what it holds, skipped)
    OUT/summary.json                               the whole job: counts, skipped inputs, orbits/s
    OUT/generate_config.json                       the settings the shards are made with

Each record: the F generated frames (frame 0 the input view; alpha estimated from the white
background), the generation cameras (frame 0 at the input's azimuth, 0 for images and prompts,
then evenly spaced around the circle at the input's elevation; radius and focal length of the
config), `object/source` synthetic, `meta/quality` NaN (for `curate`), the caption, and
`synthetic/generation`: the condition, the checkpoint and its step, the sampler settings and the
noise seed. Object ids are `synthetic/<kind>/<input>` (`#k` for the k-th of several orbits per
input).

* Deterministic: the inputs are listed in sorted order, cut into shards of `shard_size` orbits,
  and each orbit's noise is seeded by (seed, its object id), so a shard's bytes depend on the
  config, the checkpoint and the local device count alone, not on which process wrote it or when;
  batched differently, an orbit changes by at most a rounding step (1/255) of a pixel.
* Parallel: a sampling call is split over the local devices; with several processes
  (`jax.distributed`), process p writes shards p, p + P, p + 2P, ... (a function of the list).
* Resumable: shards are written atomically (`TFRecordWriter`), so a restarted job skips those that
  exist and redoes a partial one; the workdir refuses a restart with other settings.
* Robust: an input that cannot be used (unreadable image, no foreground, empty prompt, corrupt
  record) is skipped with its reason in the shard's summary and the job's; it never stops the job.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import Counter
from pathlib import Path

import jax
import ml_collections
import numpy as np
import tqdm
from absl import flags, logging

from vfusion3d_jax import cameras, errors
from vfusion3d_jax.configs import load_config
from vfusion3d_jax.data import clips, example, pipeline, storage, tfrecord
from vfusion3d_jax.inference import preprocess
from vfusion3d_jax.inference.sample import OrbitSampler
from vfusion3d_jax.train import metrics

SHARD_DIR = "shards"
SUMMARY_FILE = "summary.json"
SETTINGS_FILE = "generate_config.json"
SHARD_PREFIX = "synthetic"
# Config fields that do not change the output bytes.
_OUTPUT_NEUTRAL_FIELDS = ("batch_size", "fps")


@dataclasses.dataclass(frozen=True)
class Condition:
    """One input: an image file, a view of an orbit record, or a prompt (text only)."""

    kind: str  # "image", "orbit" or "prompt"
    name: str  # unique per kind: the image's output name, the orbit's object id, prompt-<line>
    location: str  # the image file; the TFRecord and record number; the prompts file and line
    caption: str = ""
    record: tuple[str, int, int] | None = None  # orbit: (TFRecord path, byte offset, length) of its record


@dataclasses.dataclass(frozen=True)
class Job:
    """One orbit to generate: a condition and which of its `orbits_per_input` orbits."""

    condition: Condition
    copy: int
    object_id: str


class InputSkipped(ValueError):
    """An input that cannot be used; the job goes on without it."""


# --------------------------------------------------------------------------- listing the inputs


def list_conditions(config: ml_collections.ConfigDict) -> tuple[list[Condition], list[dict]]:
    """(conditions, inputs skipped while listing) of `config.inputs`, in a deterministic order."""
    conditions, skipped = [], []
    if config.inputs.images:
        paths = sorted(preprocess.find_images(config.inputs.images))
        for path, name in zip(paths, preprocess.output_names(paths)):
            conditions.append(Condition("image", name, str(path), caption=config.image_caption))
    if config.inputs.orbits:
        for path in sorted(pipeline.expand_paths(config.inputs.orbits)):
            try:
                for number, (offset, length) in enumerate(tfrecord.read_index(path).tolist()):
                    metadata = example.read_metadata(tfrecord.read_record(path, offset, length))
                    conditions.append(Condition("orbit", metadata.object_id, f"{path}#{number}",
                                                caption=metadata.caption, record=(path, offset, length)))
            except (tfrecord.CorruptRecordError, example.OrbitSchemaError) as error:
                skipped.append(dict(input=path, reason=f"{type(error).__name__}: {error} (later records skipped)"))
    if config.inputs.prompts:
        lines = Path(config.inputs.prompts).expanduser().read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, start=1):
            if line.strip():
                conditions.append(Condition("prompt", f"prompt-{number:05d}", f"{config.inputs.prompts}:{number}",
                                            caption=line.strip()))
            else:
                skipped.append(dict(input=f"{config.inputs.prompts}:{number}", reason="empty prompt"))
    names = Counter((condition.kind, condition.name) for condition in conditions)
    repeated = [f"{kind}/{name}" for (kind, name), count in names.items() if count > 1]
    if repeated:
        raise errors.InvalidConfigValueError(f"inputs with the same id would make the same object ids: {repeated[:3]}")
    return conditions, skipped


def plan_jobs(conditions: list[Condition], orbits_per_input: int) -> list[Job]:
    """Every orbit to make, in order: each condition's copies together."""
    if orbits_per_input < 1:
        raise errors.InvalidConfigValueError(f"config.orbits_per_input must be >= 1, got {orbits_per_input}")
    return [Job(condition, copy, f"{SHARD_PREFIX}/{condition.kind}/{condition.name}"
                + (f"#{copy}" if orbits_per_input > 1 else ""))
            for condition in conditions for copy in range(orbits_per_input)]


def shard_paths(shard_dir: Path, count: int) -> list[Path]:
    return [shard_dir / f"{SHARD_PREFIX}-{index:05d}-of-{count:05d}.tfrecord" for index in range(count)]


def own_shards(count: int, process_index: int, process_count: int) -> list[int]:
    """The shards that process `process_index` of `process_count` writes: every P-th from its index."""
    return list(range(process_index, count, process_count))


# --------------------------------------------------------------------------- one orbit


@dataclasses.dataclass(frozen=True)
class PreparedInput:
    """What the sampler needs of one job, and the cameras its record gets (computed once: the
    model is conditioned on these very cameras' poses)."""

    job: Job
    image: np.ndarray | None  # (H, W, 3) in [0, 1]; None for a prompt
    elevation_deg: float
    cam2world: np.ndarray  # (F, 4, 4)
    intrinsics: np.ndarray  # (F, 3, 3)


def prepare_input(job: Job, config: ml_collections.ConfigDict, resolution: int, num_frames: int) -> PreparedInput:
    """The job's input view at the model's resolution and its orbit's cameras; raises InputSkipped
    with the reason for an input that cannot be used."""
    condition = job.condition

    def prepared(image: np.ndarray | None, azimuth_deg: float, elevation_deg: float) -> PreparedInput:
        return PreparedInput(job, image, elevation_deg, *orbit_cameras(azimuth_deg, elevation_deg, num_frames, config))

    if condition.kind == "prompt":
        return prepared(None, 0.0, float(config.elevation_deg))
    if condition.kind == "image":
        try:
            image = preprocess.prepare_image(condition.location, resolution, border_ratio=config.border_ratio,
                                             recenter_object=config.recenter).image
        except preprocess.ImageSkipped as error:
            raise InputSkipped(str(error)) from None
        return prepared(image, 0.0, float(config.elevation_deg))
    path, offset, length = condition.record
    try:
        orbit = example.decode_orbit(tfrecord.read_record(path, offset, length), views=[config.inputs.orbit_view])
    except (tfrecord.CorruptRecordError, example.OrbitSchemaError, IndexError) as error:
        raise InputSkipped(f"{type(error).__name__}: {error}") from None
    image, _ = pipeline.composite_on_white(pipeline.resize_rgba(orbit["images"][0], resolution))
    return prepared(image, float(orbit["azimuth_deg"][0]), float(orbit["elevation_deg"]))


def orbit_cameras(azimuth_deg: float, elevation_deg: float, num_frames: int, config: ml_collections.ConfigDict
                  ) -> tuple[np.ndarray, np.ndarray]:
    """cam2world (F, 4, 4) and intrinsics (F, 3, 3) of a generated orbit: frame 0 at the input's
    angles, the others evenly spaced around the circle in the direction of increasing azimuth
    (as the clips the model was trained on)."""
    azimuths = (azimuth_deg + 360.0 * np.arange(num_frames) / num_frames) % 360.0
    cam2world = cameras.orbit_cam2world(azimuths, elevation_deg, config.radius)
    focal = cameras.fov_to_focal(config.fov_deg)
    intrinsics = cameras.intrinsics_matrix(focal, focal, 0.5, 0.5)
    return cam2world.astype(np.float32), np.broadcast_to(intrinsics, (num_frames, 3, 3)).astype(np.float32)


def estimated_alpha(frames: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W) foreground of frames in [0, 1] over white: 255 where any channel is darker
    than metrics.FOREGROUND_THRESHOLD (a generated frame has no alpha of its own)."""
    return np.where(metrics.silhouettes(frames), 255, 0).astype(np.uint8)


def orbit_seed(seed: int, object_id: str) -> int:
    """The noise seed of one orbit: a function of the job's seed and the orbit's id only."""
    return storage.stable_hash(seed, "generate", object_id) % 2**32


def encode_generated(prepared: PreparedInput, frames: np.ndarray, generation: dict, seed: int) -> bytes:
    """The orbit record of generated frames (F, H, W, 3) in [0, 1]."""
    rgb = np.clip(np.round(frames * 255.0), 0, 255).astype(np.uint8)
    rgba = np.concatenate([rgb, estimated_alpha(frames)[..., None]], axis=-1)
    condition = prepared.job.condition
    record_generation = dict(generation, seed=seed, copy=prepared.job.copy,
                             condition=dict(kind=condition.kind, id=condition.name, location=condition.location))
    return example.encode_orbit(rgba, prepared.cam2world, prepared.intrinsics, object_id=prepared.job.object_id, source="synthetic",
                                elevation_deg=prepared.elevation_deg, caption=condition.caption,
                                generation=record_generation)


# --------------------------------------------------------------------------- shards


def write_shard(path: Path, jobs: list[Job], sampler: OrbitSampler, config: ml_collections.ConfigDict,
                generation: dict, seed: int, bar: tqdm.tqdm) -> dict:
    """Generates and writes one shard atomically, then its summary beside it; returns the summary."""
    start = time.perf_counter()
    written, skipped = [], []
    with tfrecord.TFRecordWriter(path) as writer:
        batch: list[PreparedInput] = []

        def flush() -> None:
            seeds = [orbit_seed(seed, item.job.object_id) for item in batch]
            blank = np.ones((sampler.resolution, sampler.resolution, 3), np.float32)
            images = np.stack([blank if item.image is None else item.image for item in batch])
            keep_image = np.array([item.image is not None for item in batch])
            poses = np.stack([clips.relative_pose(item.cam2world) for item in batch])
            captions = np.stack([sampler.caption(item.job.condition.caption) for item in batch])
            orbits = sampler.sample(images, keep_image, poses, captions, np.asarray(seeds, np.uint32))
            for item, frames, noise_seed in zip(batch, orbits, seeds):
                writer.write(encode_generated(item, frames, generation, noise_seed))
                written.append(item.job.object_id)
            bar.update(len(batch))
            batch.clear()

        for job in jobs:
            try:
                batch.append(prepare_input(job, config, sampler.resolution, sampler.num_frames))
            except InputSkipped as error:
                logging.warning("skipping %s: %s", job.condition.location, error)
                skipped.append(dict(input=job.condition.location, object_id=job.object_id, reason=str(error)))
                bar.update()
            if len(batch) == sampler.batch_size:
                flush()
        if batch:
            flush()
    summary = dict(shard=path.name, orbits=len(written), object_ids=written, skipped=skipped,
                   seconds=round(time.perf_counter() - start, 3))
    storage.write_json_atomically(_summary_path(path), summary)
    return summary


def _summary_path(path: Path) -> Path:
    return path.with_name(path.name + ".summary.json")


def existing_shard_summary(path: Path, jobs: list[Job]) -> dict:
    """The summary of a shard an earlier run completed (rebuilt from its records if the file is missing)."""
    try:
        return json.loads(_summary_path(path).read_text())
    except (OSError, json.JSONDecodeError):
        pass
    present = {example.read_metadata(record).object_id for record in tfrecord.iterate_records(path)}
    return dict(shard=path.name, orbits=len(present), object_ids=[j.object_id for j in jobs if j.object_id in present],
                skipped=[dict(input=j.condition.location, object_id=j.object_id, reason="skipped by an earlier run")
                         for j in jobs if j.object_id not in present], seconds=0.0)


# --------------------------------------------------------------------------- the command


def generate(checkpoint: str | Path, workdir: str | Path, config: ml_collections.ConfigDict | None = None,
             sampler: OrbitSampler | None = None) -> dict:
    """Generates the synthetic orbits of `config`'s inputs into `workdir`; returns the job's summary.

    `sampler`: an `OrbitSampler.from_checkpoint` to reuse (one compile for many jobs).
    """
    start = time.perf_counter()
    config = config if config is not None else load_config("generate.py")
    if not (config.inputs.images or config.inputs.orbits or config.inputs.prompts):
        raise errors.UsageError("generate needs inputs: --config.inputs.images=FOLDER_OR_GLOB, "
                                "--config.inputs.orbits=TFRECORD_GLOB and/or --config.inputs.prompts=FILE")
    if config.shard_size < 1:
        raise errors.InvalidConfigValueError(f"config.shard_size must be >= 1, got {config.shard_size}")
    workdir = Path(workdir)
    shard_dir = workdir / SHARD_DIR
    shard_dir.mkdir(parents=True, exist_ok=True)
    if sampler is None:
        job_config = ml_collections.ConfigDict(config.to_dict())
        job_config.batch_size = config.batch_size * jax.local_device_count()
        sampler = OrbitSampler.from_checkpoint(checkpoint, job_config)
    seed = sampler.config.sample.seed if config.sample.seed is None else config.sample.seed
    generation = dict(checkpoint=str(checkpoint), model_step=sampler.step,
                      sampler=dict(sampler.config.sample.to_dict(), seed=seed, flow_shift=sampler.config.flow.shift),
                      num_frames=sampler.num_frames, resolution=sampler.resolution)
    settings = {key: value for key, value in config.to_dict().items() if key not in _OUTPUT_NEUTRAL_FIELDS}
    storage.claim_workdir(workdir / SETTINGS_FILE, dict(settings, generation=generation), "generate")

    conditions, listing_skipped = list_conditions(config)
    jobs = plan_jobs(conditions, config.orbits_per_input)
    count = max(1, math.ceil(len(jobs) / config.shard_size))
    paths = shard_paths(shard_dir, count)
    shard_jobs = [jobs[index * config.shard_size:(index + 1) * config.shard_size] for index in range(count)]
    mine = own_shards(count, jax.process_index(), jax.process_count())
    for stale in shard_dir.glob(f".{SHARD_PREFIX}-*.tmp-*"):  # partial shards of a killed run
        if any(stale.name.startswith(f".{paths[index].name}.tmp-") for index in mine):
            stale.unlink()
    pending = [index for index in mine if not paths[index].exists()]
    logging.info("generate: %d inputs, %d orbits in %d shards; this process writes %d (%d already complete)",
                 len(conditions), len(jobs), count, len(mine), len(mine) - len(pending))

    generated_now = []
    with tqdm.tqdm(total=sum(len(shard_jobs[index]) for index in pending), unit="orbit", desc="generate",
                   disable=jax.process_index() != 0) as bar:
        for index in pending:
            generated_now.append(write_shard(paths[index], shard_jobs[index], sampler, config, generation, seed, bar))
    seconds = time.perf_counter() - start
    now = {summary["shard"] for summary in generated_now}
    shard_summaries = generated_now + [existing_shard_summary(paths[index], shard_jobs[index])
                                       for index in mine if paths[index].name not in now]
    shard_summaries.sort(key=lambda summary: summary["shard"])
    skipped = listing_skipped + [item for summary in shard_summaries for item in summary["skipped"]]
    orbits_now = sum(summary["orbits"] for summary in generated_now)
    summary = dict(
        shard_dir=str(shard_dir), inputs=len(conditions), inputs_by_kind=dict(Counter(c.kind for c in conditions)),
        orbits=sum(s["orbits"] for s in shard_summaries), shards=len(shard_summaries), shards_total=count,
        shards_generated_now=len(generated_now), skipped=len(skipped),
        seconds=round(seconds, 2), orbits_per_second=round(orbits_now / seconds, 3) if orbits_now else None,
        generation=generation, skipped_inputs=skipped,
    )
    if jax.process_count() > 1:
        summary_path = workdir / f"summary.process{jax.process_index():03d}.json"
    else:
        summary_path = workdir / SUMMARY_FILE
    storage.write_json_atomically(summary_path, summary)
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"{summary['orbits']} synthetic orbits in {summary['shards']} shard(s) under {summary['shard_dir']} "
             f"({summary['shards_generated_now']} shard(s) generated now, {summary['seconds']} s"
             + (f", {summary['orbits_per_second']} orbits/s" if summary["orbits_per_second"] else "") + ")"]
    if summary["skipped"]:
        lines.append(f"{summary['skipped']} input(s) skipped:")
        lines += [f"  {item['input']}: {item['reason']}" for item in summary["skipped_inputs"][:20]]
    return "\n".join(lines)


def generate_command(config: ml_collections.ConfigDict | None, workdir: str | None, args: list[str]) -> None:
    """CLI `generate`: --checkpoint=DIR --workdir=OUT, inputs in `config.inputs`."""
    if args:
        raise errors.UsageError(f"generate takes no positional arguments, got {args}")
    checkpoint = flags.FLAGS.checkpoint
    if not checkpoint or not workdir:
        raise errors.UsageError("generate needs --checkpoint=DIR (a `train --config=configs/mvdiffusion.py` run) "
                                "and --workdir=OUT")
    print(format_summary(generate(checkpoint, workdir, config)))
