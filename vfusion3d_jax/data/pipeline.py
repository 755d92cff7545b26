"""Grain input pipeline: orbit TFRecords → batches of one source view, K target views and their
cameras (the LRM's examples), or of orbit clips and captions (the video diffusion model's).

Per dataset of the mixture (a `MapDataset`: random access, lazy, nothing is read until asked):

    OrbitSource (offset index, CRC check) → shuffle (global; reshuffled each epoch) → repeat
      → map_with_index(TrainingExamples)   metadata filters (rejects → None), the seeded choice
                                            of views, render size and crops (or of a clip's
                                            frames), decoding of only the chosen PNGs
      → HostShare                           this host's share of the global order: block p
                                            of every global batch (of its b = batch_size /
                                            shard_count examples)
      → to_iter_dataset                     reading threads; drops the filtered-out Nones

then over the datasets (an `IterDataset`):

    mix(weights) → drop and count corrupt records → batch → mp_prefetch(worker_count)

Why this order:
* Every random choice before the host share is a function of (seed, dataset, record, epoch),
  so all hosts together see exactly the examples one host would, whatever the host count:
  each example once per epoch, on one host. Host p takes elements [tB + pb, tB + (p+1)b) of
  the global order for its batch t, so with one dataset (and nothing filtered or skipped, one
  reading process per host) the hosts' batches t put side by side are one host's batch t: a
  run on P hosts trains on the very batches of a run on one.
* Mixing comes after the filters, so the weights hold for the examples actually trained on.
* A random-access source must return something for every index: with `skip_corrupt`, a
  corrupt record becomes a `SkippedRecord` marker, which the counting stage drops, adding the
  count to the next example's `corrupt_skipped` and its (dataset, record) to
  `corrupt_skipped_records`. The count travels with the data, so it survives worker processes
  and checkpoints; `SkippedRecordTally` turns it into records per file (training's log and
  summary.json). A shard whose framing is broken (a truncated tail) is read through
  `tfrecord.salvage_index`: its damaged records are skipped like any other.
* Images become float32 per example, in the reading threads, where NumPy runs in parallel;
  converting a whole batch in one thread costs 30-60 ms for 8 sources of 512 px.

`config.example` picks the kind of example: "views" (the LRM's, the default) or "clip".
A "views" batch (B = batch_size // shard_count examples on this host; K = num_target_views;
S = the full render side, p = patch_size or S) is a dict of NumPy arrays:

| key                    | shape, dtype        | meaning                                                    |
|------------------------|---------------------|------------------------------------------------------------|
| `source_image`         | (B, Hs, Ws, 3) f32  | source view in [0, 1], composited onto white                |
| `source_camera`        | (B, 16) f32         | `cameras.source_camera` of the source view                  |
| `target_images`        | (B, K, p, p, 3) f32 | target views (or their patches) in [0, 1], on white          |
| `target_masks`         | (B, K, p, p, 1) f32 | their alpha (foreground) in [0, 1]                          |
| `target_cameras`       | (B, K, 25) f32      | `cameras.render_camera` of the full S x S target views       |
| `target_patch_cameras` | (B, K, 25) f32      | the same cameras with K describing the patch as a p x p image |
| `target_crop_offsets`  | (B, K, 2) i32       | (row, column) of each patch in the S x S render             |
| `target_full_size`     | (B,) i32            | S                                                          |
| `is_synthetic`         | (B,) f32            | 1 for `object/source == synthetic`, else 0 (per-source losses) |
| `source_view_index`    | (B,) i32            | index of the source view in its orbit                       |
| `target_view_indices`  | (B, K) i32          | indices of the target views in their orbit                  |
| `input_images`         | (B, V, Hs, Ws, 3) f32 | with num_input_views V > 1 only: the source view, then V − 1 other random views (white where masked) |
| `input_cameras`        | (B, V, 16) f32      | their `cameras.source_camera` (masked slots repeat the source's) |
| `input_mask`           | (B, V) bool         | the first n slots, n drawn in [min_input_views, V] per example |
| `input_view_indices`   | (B, V) i32          | their views in the orbit; -1 where masked                    |
| `record_index`         | (B,) i32            | record number in its dataset (shards concatenated in path order) |
| `dataset_index`        | (B,) i32            | which dataset of the mixture (`active_datasets` order)       |
| `corrupt_skipped`      | (B,) i32            | corrupt records skipped just before this example            |
| `corrupt_skipped_records` | (B, 4, 2) i32    | the first 4 of them as (dataset_index, record_index); -1 = none |

The renderer renders the patch either as `pixel_rays(target_cameras, resolution=S,
crop_size=p, crop_start=target_crop_offsets)` or, with S varying per example, as the full
p x p image of `target_patch_cameras`; both give the same rays.

A "clip" batch (F = num_frames views going around the orbit in order from a random start,
`data.clips`; R = clip_resolution; L = caption_length) holds the frames instead:

| key                    | shape, dtype        | meaning                                                    |
|------------------------|---------------------|------------------------------------------------------------|
| `clip_images`          | (B, F, R, R, 3) f32 | frames in [0, 1] on white, in orbit order; random_hue turns a clip as one |
| `clip_masks`           | (B, F, R, R, 1) f32 | their alpha (foreground) in [0, 1]                          |
| `clip_cameras`         | (B, F, 25) f32      | `cameras.render_camera`; frame 0 canonical (canonicalize_cameras) |
| `clip_relative_pose`   | (B, F, 3) f32       | degrees: azimuth − frame 0's in [0, 360), elevation, frame 0's elevation |
| `clip_view_indices`    | (B, F) i32          | the frames' views in their orbit record                     |
| `caption_bytes`        | (B, L) u8           | `object/caption` in UTF-8, cut after a whole word, zero-padded |
| `caption_length`       | (B,) i32            | bytes of the caption in `caption_bytes`; 0 = no caption      |

and `is_synthetic`, `record_index`, `dataset_index`, `corrupt_skipped` and
`corrupt_skipped_records` as in a "views" batch. The relative pose comes from the record's
cameras before canonicalisation, which makes frame 0 level whatever its elevation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from collections.abc import Callable, Sequence

import grain
import jax
import ml_collections
import numpy as np
from absl import flags, logging
from PIL import Image

from vfusion3d_jax import cameras, errors
from vfusion3d_jax.data import clips, remote, tfrecord
from vfusion3d_jax.data import example as orbit_example


# --------------------------------------------------------------------------- source


@dataclasses.dataclass(frozen=True)
class StoredRecord:
    """A record's bytes and its position in the source (shards concatenated in path order)."""

    index: int
    data: bytes


@dataclasses.dataclass(frozen=True)
class SkippedRecord:
    """Stands in for a corrupt record when skipping them; `reason` names the file, record and offset."""

    index: int
    reason: str
    dataset_index: int = -1  # set by TrainingExamples: which dataset of the mixture


def expand_paths(patterns: str | Sequence[str]) -> list[str]:
    """Sorted shard paths from globs (a string may hold several, separated by commas).

    Offset index files that a glob also matches are left out.
    """
    if isinstance(patterns, str):
        patterns = [pattern.strip() for pattern in patterns.split(",") if pattern.strip()]
    paths = set()
    for pattern in patterns:
        matches = [path for path in remote.glob(pattern) if not path.endswith(".index")]
        if not matches:
            raise errors.MissingInputError(f"no TFRecord shards match {pattern!r}").with_hint(
                "check the path or glob (`render-data` writes shards to WORKDIR/shards/; training reads "
                "them from --config.data_dir=WORKDIR)")
        paths.update(matches)
    return sorted(paths)


SKIP_CORRUPT_HINT = "add --config.data.skip_corrupt=true to skip corrupt records and count them"


class OrbitSource:
    """Grain random-access source over TFRecord shards, through their offset indexes.

    Record i of the source is record i of the shards concatenated in sorted path order.
    Reads check the CRCs; a corrupt record raises `tfrecord.CorruptRecordError` or, with
    `skip_corrupt`, is logged and returned as a `SkippedRecord`.
    """

    def __init__(self, paths: str | Sequence[str], *, skip_corrupt: bool = False, verify_crc: bool = True):
        self.paths = expand_paths(paths)
        self.skip_corrupt = skip_corrupt
        self.verify_crc = verify_crc
        indexes = [self._read_index(path) for path in self.paths]
        self._index = np.concatenate(indexes) if indexes else np.zeros((0, 2), np.uint64)
        self._shard_starts = np.cumsum([0] + [len(index) for index in indexes])

    def _read_index(self, path: str) -> np.ndarray:
        try:
            return tfrecord.read_index(path)
        except tfrecord.CorruptRecordError as error:  # broken framing: a truncated tail, a damaged length
            if not self.skip_corrupt:
                raise error.with_hint(SKIP_CORRUPT_HINT)
            index = tfrecord.salvage_index(path)
            logging.warning("%s; reading the %d records of its salvaged index, skipping those that are damaged",
                            error, len(index))
            return index

    def __len__(self) -> int:
        return len(self._index)

    def locate(self, index: int) -> tuple[str, int, int, int]:
        """(path, record number in the shard, byte offset, data length) of source record `index`."""
        shard = int(np.searchsorted(self._shard_starts, index, side="right")) - 1
        offset, length = self._index[index]
        return self.paths[shard], index - int(self._shard_starts[shard]), int(offset), int(length)

    def __getitem__(self, index: int) -> StoredRecord | SkippedRecord:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records")
        path, record_in_shard, offset, length = self.locate(index)
        try:
            data = tfrecord.read_record(path, offset, length, verify_crc=self.verify_crc,
                                        record_index=record_in_shard)
        except tfrecord.CorruptRecordError as error:
            if not self.skip_corrupt:
                raise error.with_hint(SKIP_CORRUPT_HINT)
            logging.warning("skipping %s", error)
            return SkippedRecord(index, str(error))
        return StoredRecord(index, data)

    def __repr__(self) -> str:
        return f"OrbitSource({len(self.paths)} shards, {len(self)} records, first={self.paths[:1]})"


# --------------------------------------------------------------------------- per-example transforms


@dataclasses.dataclass(frozen=True)
class MetadataFilter:
    """Which records to train on, decided from their scalar features alone."""

    quality_min: float | None = None
    keep_unknown_quality: bool = True
    elevation_range_deg: tuple[float, float] | None = None
    source: str | None = None

    def __call__(self, metadata: orbit_example.OrbitMetadata) -> bool:
        if self.source is not None and metadata.source != self.source:
            return False
        if self.quality_min is not None:
            if math.isnan(metadata.quality):
                if not self.keep_unknown_quality:
                    return False
            elif metadata.quality < self.quality_min:
                return False
        if self.elevation_range_deg is not None:
            low, high = self.elevation_range_deg
            if not low <= metadata.elevation_deg <= high:
                return False
        return True


@dataclasses.dataclass(frozen=True)
class ExampleOptions:
    """How a training example is cut from an orbit (see `configs/common.py` for each field)."""

    num_target_views: int = 4
    include_source_in_targets: bool = True
    canonicalize_cameras: bool = True
    source_resolution: int = 512
    target_resolution: int = 128
    target_resize_range: tuple[int, int] | None = None
    patch_size: int | None = None
    random_hue: bool = False
    random_mirror: bool = False
    num_input_views: int = 1
    min_input_views: int = 1

    def __post_init__(self):
        if not 1 <= self.min_input_views <= self.num_input_views:
            raise ValueError(f"need 1 <= min_input_views ({self.min_input_views}) <= num_input_views "
                             f"({self.num_input_views})")
        if self.target_resize_range is not None:
            low, high = self.target_resize_range
            if self.patch_size is None:
                raise ValueError("target_resize_range needs patch_size: batched images must share one size")
            if not 0 < low <= high:
                raise ValueError(f"target_resize_range {self.target_resize_range} must be (min, max) with 0 < min <= max")
        smallest = self.target_resolution if self.target_resize_range is None else self.target_resize_range[0]
        if self.patch_size is not None and not 0 < self.patch_size <= smallest:
            raise ValueError(f"patch_size {self.patch_size} must be in (0, {smallest}], the smallest full render")
        if self.num_target_views < 1:
            raise ValueError(f"num_target_views must be >= 1, got {self.num_target_views}")


def select_views(rng: np.random.Generator, num_views: int, num_targets: int,
                 include_source: bool) -> tuple[int, np.ndarray]:
    """A source view and `num_targets` distinct target views (the source is target 0 if included)."""
    needed = num_targets if include_source else num_targets + 1
    if num_views < needed:
        raise ValueError(f"an orbit of {num_views} views cannot give 1 source and {num_targets} targets "
                         f"(include_source_in_targets={include_source})")
    chosen = rng.choice(num_views, size=needed, replace=False)
    return int(chosen[0]), (chosen[:num_targets] if include_source else chosen[1:])


def source_world_change(source_cam2world: np.ndarray) -> np.ndarray:
    """The rigid 4x4 map of world points into the frame where the source camera has the official
    canonical pose at its own distance (float64).

    The canonical pose looks from +x at the origin with +z up; this is the camera the official
    inferrer gives the encoder, so training in this frame matches inference.
    """
    canonical = cameras.CANONICAL_SOURCE_CAM2WORLD.astype(np.float64)
    canonical[:3, 3] *= np.linalg.norm(source_cam2world[:3, 3])
    return canonical @ np.linalg.inv(source_cam2world.astype(np.float64))


def canonicalize_to_source(cam2world: np.ndarray, source_cam2world: np.ndarray) -> np.ndarray:
    """Cameras (..., 4, 4) moved with the world by `source_world_change` (the source becomes canonical)."""
    return (source_world_change(source_cam2world) @ cam2world.astype(np.float64)).astype(np.float32)


def patch_intrinsics(intrinsics: np.ndarray, full_size: int, patch_size: int, offsets: np.ndarray) -> np.ndarray:
    """Normalised K (..., 3, 3) of p x p patches at pixel `offsets` (..., 2) = (row, column) of S x S images.

    Pixel coordinates normalised by the patch are an affine map of those normalised by the full
    image: u_patch = (S u_full - column) / p, so K_patch = A K with A that map.
    """
    offsets = np.asarray(offsets, np.float64)
    affine = np.zeros(offsets.shape[:-1] + (3, 3))
    affine[..., 0, 0] = affine[..., 1, 1] = full_size / patch_size
    affine[..., 0, 2] = -offsets[..., 1] / patch_size
    affine[..., 1, 2] = -offsets[..., 0] / patch_size
    affine[..., 2, 2] = 1.0
    return (affine @ np.asarray(intrinsics, np.float64)).astype(np.float32)


def resize_rgba(image: np.ndarray, size: int) -> np.ndarray:
    """Square RGBA resize; Pillow filters RGBA with premultiplied alpha, so no dark fringes."""
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image, "RGBA").resize((size, size), Image.Resampling.BICUBIC))


def hue_rotation(angle: float) -> np.ndarray:
    """The 3x3 RGB rotation by `angle` radians about the grey axis (1, 1, 1): hues turn, greys and
    brightness (the mean of R, G, B) stay."""
    axis = np.full(3, 1.0 / np.sqrt(3.0))
    cross = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    return np.cos(angle) * np.eye(3) + np.sin(angle) * cross + (1.0 - np.cos(angle)) * np.outer(axis, axis)


def rotate_hue(rgba: np.ndarray, angle: float) -> np.ndarray:
    """uint8 RGBA (..., 4) with the colours turned by `hue_rotation(angle)` (clipped to [0, 255])."""
    rgb = rgba[..., :3].astype(np.float32) @ hue_rotation(angle).T.astype(np.float32)
    return np.concatenate([np.clip(np.round(rgb), 0, 255).astype(np.uint8), rgba[..., 3:]], axis=-1)


def composite_on_white(rgba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 RGBA (..., 4) → float32 RGB in [0, 1] over a white background (the renderer's), alpha (..., 1)."""
    alpha = rgba[..., 3:].astype(np.float32) * np.float32(1 / 255)
    rgb = rgba[..., :3].astype(np.float32)
    rgb *= alpha * np.float32(1 / 255)  # in place: no image-sized temporaries
    rgb += 1.0 - alpha
    return rgb, alpha


def make_training_example(record: bytes, rng: np.random.Generator, options: ExampleOptions,
                          metadata_filter: MetadataFilter = MetadataFilter()) -> dict | None:
    """One training example (float32 images and cameras) from an orbit record; None if filtered out.

    The random draws happen in a fixed order (views, render size, crops, hue, input views,
    mirror), so switching patches off leaves the view choice of each example unchanged, and
    adding input views or the mirror leaves the rest of the example unchanged.
    """
    parsed = orbit_example.parse_example(record)
    metadata = orbit_example.read_metadata(parsed)
    if not metadata_filter(metadata):
        return None
    try:
        source_view, target_views = select_views(rng, metadata.num_views, options.num_target_views,
                                                 options.include_source_in_targets)
    except ValueError as error:
        raise ValueError(f"orbit {metadata.object_id!r}: {error}") from None
    if options.target_resize_range is None:
        full_size = options.target_resolution
    else:
        full_size = int(rng.integers(options.target_resize_range[0], options.target_resize_range[1] + 1))
    patch_size = full_size if options.patch_size is None else options.patch_size
    offsets = rng.integers(0, full_size - patch_size + 1, size=(len(target_views), 2))
    hue_angle = rng.uniform(0.0, 2.0 * np.pi) if options.random_hue else None
    input_views = select_input_views(rng, metadata.num_views, source_view, options, metadata.object_id)
    mirror = options.random_mirror and rng.random() < 0.5

    # Each chosen view decoded once.
    decoded_views = list(dict.fromkeys([source_view, *target_views.tolist(), *input_views]))
    orbit = orbit_example.decode_orbit(parsed, views=decoded_views)
    if hue_angle is not None:
        orbit["images"] = rotate_hue(orbit["images"], hue_angle)
    if mirror:  # the whole world mirrored, before the cameras are moved to the source's frame
        orbit["images"] = orbit["images"][:, :, ::-1]
        orbit["cam2world"], orbit["intrinsics"] = cameras.mirror_cameras(orbit["cam2world"], orbit["intrinsics"])
    slot = {view: i for i, view in enumerate(decoded_views)}
    target_slots = [slot[view] for view in target_views.tolist()]
    cam2world, intrinsics = orbit["cam2world"], orbit["intrinsics"]
    if options.canonicalize_cameras:
        cam2world = canonicalize_to_source(cam2world, cam2world[slot[source_view]])

    target_rgba = np.stack([
        resize_rgba(orbit["images"][s], full_size)[top:top + patch_size, left:left + patch_size]
        for s, (top, left) in zip(target_slots, offsets)
    ])
    target_images, target_masks = composite_on_white(target_rgba)
    source_image, _ = composite_on_white(resize_rgba(orbit["images"][slot[source_view]], options.source_resolution))
    target_cam2world, target_intrinsics = cam2world[target_slots], intrinsics[target_slots]
    example = {
        "source_image": source_image,
        "source_camera": cameras.source_camera(cam2world[slot[source_view]], intrinsics[slot[source_view]]),
        "target_images": target_images,
        "target_masks": target_masks,
        "target_cameras": cameras.render_camera(target_cam2world, target_intrinsics),
        "target_patch_cameras": cameras.render_camera(
            target_cam2world, patch_intrinsics(target_intrinsics, full_size, patch_size, offsets)),
        "target_crop_offsets": offsets.astype(np.int32),
        "target_full_size": np.int32(full_size),
        "is_synthetic": np.float32(metadata.is_synthetic),
        "source_view_index": np.int32(source_view),
        "target_view_indices": target_views.astype(np.int32),
    }
    if options.num_input_views > 1:
        example.update(input_views_example(orbit, slot, source_view, input_views, cam2world, options))
    return example


def select_input_views(rng: np.random.Generator, num_views: int, source_view: int, options: ExampleOptions,
                       object_id: str) -> list[int]:
    """The input views besides the source: n - 1 distinct others, n drawn in [min_input_views,
    num_input_views] (no draws at all for num_input_views 1, so the LRM's examples are unchanged)."""
    if options.num_input_views == 1:
        return []
    if num_views < options.num_input_views:
        raise ValueError(f"orbit {object_id!r}: {num_views} views cannot give {options.num_input_views} input views")
    count = int(rng.integers(options.min_input_views, options.num_input_views + 1))
    others = np.delete(np.arange(num_views), source_view)
    return rng.choice(others, size=count - 1, replace=False).tolist()


def input_views_example(orbit: dict, slot: dict[int, int], source_view: int, input_views: list[int],
                        cam2world: np.ndarray, options: ExampleOptions) -> dict:
    """The `input_*` arrays: the source view, the other input views, then masked padding (white
    images, the source's camera) up to num_input_views."""
    views = [source_view, *input_views]
    padding = options.num_input_views - len(views)
    images = [composite_on_white(resize_rgba(orbit["images"][slot[view]], options.source_resolution))[0]
              for view in views]
    views_cameras = [cameras.source_camera(cam2world[slot[view]], orbit["intrinsics"][slot[view]]) for view in views]
    return {
        "input_images": np.stack(images + [np.ones_like(images[0])] * padding),
        "input_cameras": np.stack(views_cameras + views_cameras[:1] * padding).astype(np.float32),
        "input_mask": np.arange(options.num_input_views) < len(views),
        "input_view_indices": np.asarray(views + [-1] * padding, np.int32),
    }


def make_clip_example(record: bytes, rng: np.random.Generator, options: clips.ClipOptions,
                      metadata_filter: MetadataFilter = MetadataFilter()) -> dict | None:
    """One clip example (float32 frames, cameras and the caption's bytes) from an orbit record;
    None if filtered out. The random draws: the start view, then the hue angle."""
    parsed = orbit_example.parse_example(record)
    metadata = orbit_example.read_metadata(parsed)
    if not metadata_filter(metadata):
        return None
    all_cam2world, _ = orbit_example.read_cameras(parsed, metadata.num_views)
    try:
        views = clips.select_clip_views(rng, all_cam2world, options.num_frames, options.stride)
    except ValueError as error:
        raise ValueError(f"orbit {metadata.object_id!r}: {error}") from None
    orbit = orbit_example.decode_orbit(parsed, views=views)
    images = orbit["images"]
    if options.random_hue:
        images = rotate_hue(images, rng.uniform(0.0, 2.0 * np.pi))
    cam2world = orbit["cam2world"]
    relative_pose = clips.relative_pose(cam2world)  # before canonicalising: it needs the world's up
    if options.canonicalize_cameras:
        cam2world = canonicalize_to_source(cam2world, cam2world[0])
    clip_images, clip_masks = composite_on_white(np.stack([resize_rgba(image, options.resolution)
                                                           for image in images]))
    caption_bytes, caption_length = clips.encode_caption(metadata.caption, options.caption_length)
    return {
        "clip_images": clip_images,
        "clip_masks": clip_masks,
        "clip_cameras": cameras.render_camera(cam2world, orbit["intrinsics"]),
        "clip_relative_pose": relative_pose,
        "clip_view_indices": views.astype(np.int32),
        "caption_bytes": caption_bytes,
        "caption_length": caption_length,
        "is_synthetic": np.float32(metadata.is_synthetic),
    }


# The kinds of example `config.example` names, and the function that makes each from a record
# (`example_options` gives the options it takes).
EXAMPLE_KINDS = {"views": make_training_example, "clip": make_clip_example}


def example_options(config: ml_collections.ConfigDict) -> ExampleOptions | clips.ClipOptions:
    """The options of the input config's kind of example (`config.example`), validated."""
    if config.example == "views":
        return ExampleOptions(
            num_target_views=config.num_target_views,
            include_source_in_targets=config.include_source_in_targets,
            canonicalize_cameras=config.canonicalize_cameras,
            source_resolution=config.source_resolution,
            target_resolution=config.target_resolution,
            target_resize_range=None if config.target_resize_range is None else tuple(config.target_resize_range),
            patch_size=config.patch_size,
            random_hue=config.random_hue,
            random_mirror=config.get("random_mirror", False),  # configs saved before it lack it
            num_input_views=config.get("num_input_views", 1),  # configs saved before FlexRM lack them
            min_input_views=config.get("min_input_views", 1),
        )
    if config.example == "clip":
        if config.get("random_mirror", False):
            raise ValueError("random_mirror is for 'views' examples: a mirrored clip would turn the "
                             "other way round its orbit")
        return clips.ClipOptions(
            num_frames=config.num_frames,
            resolution=config.clip_resolution,
            stride=config.clip_stride,
            caption_length=config.caption_length,
            canonicalize_cameras=config.canonicalize_cameras,
            random_hue=config.random_hue,
        )
    raise ValueError(f"config.example must be one of {sorted(EXAMPLE_KINDS)}, got {config.example!r}")


class TrainingExamples(grain.transforms.MapWithIndex):
    """Grain step: stored record at stream position `index` → training example, None, or a SkippedRecord.

    `make_example(record_bytes, rng)` makes the example (`make_training_example` or
    `make_clip_example` with their options bound). Its random generator is seeded by (seed,
    dataset, record, epoch) alone, so each record gets fresh views every epoch, and the same
    ones on any host count or resume.
    """

    def __init__(self, make_example: Callable[[bytes, np.random.Generator], dict | None], *, seed: int,
                 dataset_key: int, dataset_index: int, records_per_epoch: int):
        self.make_example = make_example
        self.seed = seed
        self.dataset_key = dataset_key
        self.dataset_index = dataset_index
        self.records_per_epoch = records_per_epoch

    def map_with_index(self, index: int, record: StoredRecord | SkippedRecord):
        if isinstance(record, SkippedRecord):
            return dataclasses.replace(record, dataset_index=self.dataset_index)
        epoch = index // self.records_per_epoch
        rng = np.random.default_rng([self.seed, self.dataset_key, record.index, epoch])
        training_example = self.make_example(record.data, rng)
        if training_example is not None:
            training_example["record_index"] = np.int32(record.index)
            training_example["dataset_index"] = np.int32(self.dataset_index)
        return training_example


# --------------------------------------------------------------------------- stream stages


# Skipped records named per example in `corrupt_skipped_records` (a fixed width, so examples
# batch); more than this before one example are counted but not named.
MAX_NAMED_SKIPS = 4


class _DropSkippedRecordsIterator(grain.DatasetIterator):
    def __next__(self) -> dict:
        skipped = []
        while isinstance(element := next(self._parent), SkippedRecord):
            skipped.append((element.dataset_index, element.index))
        element["corrupt_skipped"] = np.int32(len(skipped))
        named = np.full((MAX_NAMED_SKIPS, 2), -1, np.int32)
        if skipped:
            named[:min(len(skipped), MAX_NAMED_SKIPS)] = skipped[:MAX_NAMED_SKIPS]
        element["corrupt_skipped_records"] = named
        return element

    # Between calls nothing is pending (the count restarts at each example): the parent's
    # state is the whole state.
    def get_state(self) -> dict:
        return self._parent.get_state()

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state)


class DropSkippedRecords(grain.IterDataset):
    """Drops `SkippedRecord` markers, counting them into the next example's `corrupt_skipped` and
    naming them (dataset, record) in its `corrupt_skipped_records`.

    Corrupt records after the last example of a finite stream have no example to carry their
    count; the source's warning log names every skipped record regardless.
    """

    def __iter__(self) -> grain.DatasetIterator:
        return _DropSkippedRecordsIterator(self._parent.__iter__())


# --------------------------------------------------------------------------- assembly


def active_datasets(config: ml_collections.ConfigDict) -> list[tuple[str, ml_collections.ConfigDict]]:
    """The mixture's (name, component) pairs in use (glob set, weight > 0), in name order."""
    active = [(name, component) for name, component in config.mixture.items()
              if component.glob and component.weight > 0]
    if not active:
        raise ValueError("no dataset in config.mixture has a glob and a positive weight")
    return active


def _stable_key(name: str) -> int:
    # Keyed by name, so switching another dataset on or off leaves this one's stream unchanged.
    return zlib.crc32(name.encode("utf-8"))


class HostShare(grain.MapDataset):
    """Host `shard_index`'s share of a dataset read `block` elements per host per global batch:
    its element j is element (j // block) * block * shard_count + shard_index * block + j % block.

    Every element belongs to exactly one host. On several hosts a final partial global batch is
    left out (every host must run the same number of steps on equal shapes).
    """

    def __init__(self, parent: grain.MapDataset, *, block: int, shard_index: int, shard_count: int):
        super().__init__(parent)
        self._block, self._shard_index, self._shard_count = block, shard_index, shard_count
        span = block * shard_count
        self._length = len(parent) if shard_count == 1 else (len(parent) // span) * block

    def __len__(self) -> int:
        return self._length

    def _parent_index(self, index: int) -> int:
        batch, offset = divmod(index, self._block)
        return (batch * self._shard_count + self._shard_index) * self._block + offset

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._parent_index(index)]

    def __str__(self) -> str:
        return f"HostShare(block={self._block}, host {self._shard_index} of {self._shard_count})"


def orbit_dataset(source: OrbitSource, transform: TrainingExamples, *, shuffle_seed: int,
                  num_epochs: int | None, host_batch: int, shard_index: int, shard_count: int) -> grain.MapDataset:
    """One dataset's examples for one host: shuffled, repeated, transformed, then its share taken."""
    dataset = grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat(num_epochs)
    return HostShare(dataset.map_with_index(transform), block=host_batch, shard_index=shard_index,
                     shard_count=shard_count)


def make_dataset(config: ml_collections.ConfigDict, *, shard_index: int | None = None,
                 shard_count: int | None = None) -> grain.IterDataset:
    """The whole pipeline as a Grain `IterDataset` of batches for host `shard_index` of `shard_count`."""
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} must be in [0, {shard_count})")
    if config.batch_size % shard_count:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the {shard_count} hosts")
    options = example_options(config)
    read_options = grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=config.read_buffer_size)
    datasets, weights = [], []
    for dataset_index, (name, component) in enumerate(active_datasets(config)):
        quality_min = component.get("quality_min")
        metadata_filter = MetadataFilter(
            quality_min=config.quality_min if quality_min is None else quality_min,
            keep_unknown_quality=config.keep_unknown_quality,
            elevation_range_deg=None if config.elevation_range_deg is None else tuple(config.elevation_range_deg),
            source=component.source,
        )
        source = OrbitSource(component.glob, skip_corrupt=config.skip_corrupt)
        if len(source) == 0:
            raise errors.EmptyInputError(f"dataset {name!r} ({component.glob}) has no records").with_hint(
                "point the glob at non-empty shards")
        make_example = functools.partial(EXAMPLE_KINDS[config.example], options=options,
                                         metadata_filter=metadata_filter)
        transform = TrainingExamples(make_example, seed=config.seed, dataset_key=_stable_key(name),
                                     dataset_index=dataset_index, records_per_epoch=len(source))
        shuffle_seed = int(np.random.SeedSequence([config.seed, _stable_key(name)]).generate_state(1)[0])
        dataset = orbit_dataset(source, transform, shuffle_seed=shuffle_seed, num_epochs=config.num_epochs,
                                host_batch=config.batch_size // shard_count, shard_index=shard_index,
                                shard_count=shard_count)
        datasets.append(dataset.to_iter_dataset(read_options))
        weights.append(float(component.weight))
    stream = datasets[0] if len(datasets) == 1 else grain.IterDataset.mix(datasets, weights)
    stream = DropSkippedRecords(stream)
    stream = stream.batch(config.batch_size // shard_count, drop_remainder=config.drop_remainder)
    if config.worker_count > 0:
        # Grain's worker processes read absl flags; outside absl.app.run nobody has parsed them.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        stream = stream.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=config.worker_count, per_worker_buffer_size=config.worker_buffer_size))
    return stream


def held_out_config(data: ml_collections.ConfigDict, glob: str, *, batch_size: int,
                    seed: int) -> ml_collections.ConfigDict:
    """`data` reading the files of `glob` alone (as rendered data), with a fixed seed and no colour
    changes, repeated so every host runs the same number of batches: an evaluation's input."""
    held_out = ml_collections.ConfigDict(data.to_dict())
    held_out.mixture = ml_collections.ConfigDict(
        {name: dict(glob=None, weight=0.0, source=None, quality_min=None) for name in held_out.mixture})
    held_out.mixture.rendered = dict(glob=glob, weight=1.0, source=None, quality_min=None)
    held_out.batch_size = batch_size
    held_out.random_hue = False
    held_out.seed = seed
    held_out.num_epochs = None
    return held_out


def make_iterator(config: ml_collections.ConfigDict, *, shard_index: int | None = None,
                  shard_count: int | None = None) -> grain.DatasetIterator:
    """A checkpointable iterator of this host's batches (`get_state()` / `set_state()`).

    `config` is `configs/common.py:input_config()` (or an experiment's `config.data`); the host
    defaults to `jax.process_index()` of `jax.process_count()`. A restored iterator yields exactly
    the batches the original would have, given the same config, host count and worker_count:
    each worker process batches its own slice of the host's examples, so the grouping of
    examples into batches (not the examples) depends on worker_count. Close the iterator when
    done with it (`iterator.close()`) to stop worker processes promptly.
    """
    return iter(make_dataset(config, shard_index=shard_index, shard_count=shard_count))


def to_global_arrays(batch: dict, mesh: jax.sharding.Mesh,
                     partition_spec: jax.sharding.PartitionSpec) -> dict:
    """This host's batch → global `jax.Array`s, the leading (batch) axis split by `partition_spec`."""
    sharding = jax.sharding.NamedSharding(mesh, partition_spec)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


# --------------------------------------------------------------------------- accounting


class SkippedRecordTally:
    """Which corrupt records a run skipped (`skip_corrupt`), from its batches: per file, the records.

    `update(batch, config)` reads a batch's `corrupt_skipped` and `corrupt_skipped_records`;
    `config` is the input config the batch came from (it maps dataset indexes to shards). A record
    skipped again in a later epoch counts once in `records` and again in `times`.
    """

    def __init__(self):
        self.times = 0  # skips, every epoch's
        self.unnamed = 0  # skips beyond MAX_NAMED_SKIPS before one example: counted, not located
        self.files: dict[str, set[int]] = {}  # shard -> record numbers in the shard
        self._sources: dict[str, OrbitSource] = {}

    @property
    def records(self) -> int:
        return sum(len(records) for records in self.files.values())

    def update(self, batch: dict, config: ml_collections.ConfigDict) -> list[str]:
        """Adds the skips of `batch`; returns `path: record N` of each record skipped for the first time."""
        count = int(np.sum(batch["corrupt_skipped"]))
        if not count:
            return []
        self.times += count
        named = np.asarray(batch["corrupt_skipped_records"]).reshape(-1, 2)
        named = named[named[:, 0] >= 0]
        self.unnamed += count - len(named)
        datasets = active_datasets(config)
        new = []
        for dataset_index, record in named.tolist():
            glob_ = datasets[dataset_index][1].glob
            if glob_ not in self._sources:
                self._sources[glob_] = OrbitSource(glob_, skip_corrupt=True)
            path, record_in_shard, _, _ = self._sources[glob_].locate(record)
            if record_in_shard not in self.files.setdefault(path, set()):
                self.files[path].add(record_in_shard)
                new.append(f"{path}: record {record_in_shard}")
        return new

    def merge(self, summary: dict) -> None:
        """Adds the counts of an earlier `summary()` (a resumed run's first part)."""
        self.times += summary.get("times", 0)
        self.unnamed += summary.get("unnamed", 0)
        for path, records in summary.get("files", {}).items():
            self.files.setdefault(path, set()).update(records)

    def summary(self) -> dict:
        """JSON-ready: records (distinct), times (all skips), unnamed, files {path: [record numbers]}."""
        return dict(records=self.records, times=self.times, unnamed=self.unnamed,
                    files={path: sorted(records) for path, records in sorted(self.files.items())})

    def describe(self) -> str:
        """One line: how many records of which files were skipped."""
        if not self.times:
            return "no corrupt records skipped"
        files = "; ".join(f"{path} (record{'s' if len(records) > 1 else ''} {', '.join(map(str, sorted(records)))})"
                          for path, records in sorted(self.files.items()))
        unnamed = f", {self.unnamed} not located" if self.unnamed else ""
        return (f"skipped {self.records} corrupt record{'s' if self.records != 1 else ''} "
                f"({self.times} reads{unnamed}): {files}")
