"""The multi-view orbit record: one object seen from V cameras, as a `tf.train.Example`.

Every record of the orbit TFRecords (rendered 3D assets and synthetic video-diffusion orbits
alike) is one serialised `tf.train.Example` with these features (V = number of views):

| feature                 | type       | values | meaning                                                             |
|-------------------------|------------|--------|---------------------------------------------------------------------|
| `views/image`           | bytes list | V      | PNG, RGBA 8-bit; alpha is the foreground mask (0 = background)      |
| `views/cam2world`       | float list | V×16   | 4×4 camera-to-world, row-major, OpenGL camera axes, world +z up     |
| `views/intrinsics`      | float list | V×9    | 3×3 K, row-major, normalised by image size (fx/w, fy/h, cx/w, cy/h) |
| `views/azimuth_deg`     | float list | V      | camera azimuth, degrees from +x towards +y                          |
| `views/count`           | int64      | 1      | V                                                                   |
| `views/height`          | int64      | 1      | image height in pixels (all views)                                  |
| `views/width`           | int64      | 1      | image width in pixels (all views)                                   |
| `object/id`             | bytes      | 1      | UTF-8 identifier of the object (asset id, or prompt/image id)       |
| `object/source`         | bytes      | 1      | `rendered` (3D asset render) or `synthetic` (video diffusion)       |
| `object/surface_points` | float list | P×3    | optional: points on the object's surface, world frame (below)       |
| `object/caption`        | bytes      | 1      | optional: UTF-8 description of the object, e.g. `a red torus`       |
| `synthetic/generation`  | bytes      | 1      | optional: JSON, how a synthetic orbit was made (below)              |
| `meta/elevation_deg`    | float      | 1      | orbit elevation in degrees (estimated for synthetic orbits)         |
| `meta/quality`          | float      | 1      | curation score, higher is better; NaN when unknown                  |
| `meta/schema_version`   | int64      | 1      | 1                                                                   |

`object/surface_points` is the ground-truth geometry for Chamfer evaluation: P points (the
data config's `num_surface_points`, 2048 by default) sampled uniformly by area on the
normalised asset's surface, row-major xyz, in the world frame of `views/cam2world`. Only
rendered orbits can have it (synthetic orbits have no 3D asset), and it is optional, so the
schema version stays 1: readers that do not know the feature ignore it, and `decode_orbit`
returns None for records without it.

`object/caption` is the text the video diffusion model is conditioned on: `render-data`
writes one for every object (`data.captions`: shape and colour words for procedural objects,
the asset's name for the others), a synthetic orbit may carry its prompt. It is optional
too: `read_metadata` and `decode_orbit` give `caption` '' for records without it.

`synthetic/generation` is what `generate` knows about a synthetic orbit, as a JSON object: the
condition (`kind` image / orbit / prompt, its `id` and file), the checkpoint and its training
step, the sampler settings and the orbit's noise seed. Optional and free-form: readers ignore it,
`read_generation` returns it (None when absent).

Cameras follow `vfusion3d_jax.cameras` (the official model's conventions), so
`cameras.source_camera` and `cameras.render_camera` apply to the decoded arrays directly.
PNG decoding is the cost of reading a record; `decode_orbit(record, views=...)` decodes only
the views asked for.

**Required and derived features.** A record must have `views/image`, `views/cam2world`,
`views/intrinsics`, `object/id`, `object/source`, `meta/elevation_deg` and `meta/quality`
(the data contract). `encode_orbit` also writes `views/count`, `views/height`,
`views/width`, `views/azimuth_deg` and `meta/schema_version`, but other writers need not:
when absent, the count is the number of images, the size that of the first PNG (read from
its header) and the azimuths those of the camera positions, exactly as `encode_orbit`
computes them by default (degrees from +x towards +y in [0, 360)). When present they are
checked against the record like any other feature.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image
from tensorflow_datasets.proto import tf_example_pb2

from vfusion3d_jax import cameras

SCHEMA_VERSION = 1
SOURCES = ("rendered", "synthetic")


class OrbitSchemaError(ValueError):
    """A record that is not a valid orbit Example (missing feature, wrong type or length)."""


@dataclasses.dataclass(frozen=True)
class OrbitMetadata:
    """The scalar features of an orbit record; cheap to read (no image decoding)."""

    object_id: str
    source: str
    elevation_deg: float
    quality: float
    num_views: int
    height: int
    width: int
    caption: str = ""  # '' when the record has no object/caption

    @property
    def is_synthetic(self) -> bool:
        return self.source == "synthetic"


def _encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, mode="RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


def _azimuths_from_cameras(cam2world: np.ndarray) -> np.ndarray:
    position = cam2world[:, :3, 3]
    return np.mod(np.rad2deg(np.arctan2(position[:, 1], position[:, 0])), 360.0)


def encode_orbit(images: np.ndarray, cam2world: np.ndarray, intrinsics: np.ndarray, *, object_id: str,
                 source: str, elevation_deg: float, quality: float = math.nan,
                 azimuths_deg: Sequence[float] | None = None, surface_points: np.ndarray | None = None,
                 caption: str | None = None, generation: dict | None = None) -> bytes:
    """Serialises one orbit as a `tf.train.Example`.

    images: uint8 (V, H, W, 4) RGBA; cam2world: (V, 4, 4); intrinsics: (V, 3, 3) normalised.
    `azimuths_deg` defaults to the azimuths of the camera positions. `surface_points` (P, 3),
    world frame, becomes the optional `object/surface_points` feature and `caption` the optional
    `object/caption` and `generation` (JSON-serialisable) the optional `synthetic/generation`
    (each left out when None).
    """
    images = np.asarray(images)
    cam2world = np.asarray(cam2world, np.float32)
    intrinsics = np.asarray(intrinsics, np.float32)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 4:
        raise ValueError(f"images must be uint8 (V, H, W, 4) RGBA, got {images.dtype} {images.shape}")
    num_views, height, width, _ = images.shape
    if cam2world.shape != (num_views, 4, 4):
        raise ValueError(f"cam2world must be ({num_views}, 4, 4), got {cam2world.shape}")
    if intrinsics.shape != (num_views, 3, 3):
        raise ValueError(f"intrinsics must be ({num_views}, 3, 3), got {intrinsics.shape}")
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    azimuths = _azimuths_from_cameras(cam2world) if azimuths_deg is None else np.asarray(azimuths_deg, np.float32)
    if azimuths.shape != (num_views,):
        raise ValueError(f"azimuths_deg must have {num_views} values, got shape {azimuths.shape}")
    if surface_points is not None:
        surface_points = np.asarray(surface_points, np.float32)
        if surface_points.ndim != 2 or surface_points.shape[1] != 3:
            raise ValueError(f"surface_points must be (P, 3), got shape {surface_points.shape}")

    example = tf_example_pb2.Example()
    feature = example.features.feature
    feature["views/image"].bytes_list.value.extend(_encode_png(image) for image in images)
    feature["views/cam2world"].float_list.value.extend(cam2world.reshape(-1).tolist())
    feature["views/intrinsics"].float_list.value.extend(intrinsics.reshape(-1).tolist())
    feature["views/azimuth_deg"].float_list.value.extend(azimuths.astype(np.float32).tolist())
    feature["views/count"].int64_list.value.append(num_views)
    feature["views/height"].int64_list.value.append(height)
    feature["views/width"].int64_list.value.append(width)
    feature["object/id"].bytes_list.value.append(object_id.encode("utf-8"))
    feature["object/source"].bytes_list.value.append(source.encode("utf-8"))
    if surface_points is not None:
        feature["object/surface_points"].float_list.value.extend(surface_points.reshape(-1).tolist())
    if caption is not None:
        feature["object/caption"].bytes_list.value.append(caption.encode("utf-8"))
    if generation is not None:
        feature["synthetic/generation"].bytes_list.value.append(json.dumps(generation, sort_keys=True).encode("utf-8"))
    feature["meta/elevation_deg"].float_list.value.append(float(elevation_deg))
    feature["meta/quality"].float_list.value.append(float(quality))
    feature["meta/schema_version"].int64_list.value.append(SCHEMA_VERSION)
    # Deterministic: the same orbit always gives the same bytes (reproducible shards).
    return example.SerializeToString(deterministic=True)


def replace_metadata(record: bytes | tf_example_pb2.Example, *, quality: float | None = None,
                     elevation_deg: float | None = None) -> bytes:
    """The record with `meta/quality` and/or `meta/elevation_deg` replaced (None = kept); every
    other feature, including ones this schema does not know, is kept as it was."""
    parsed = tf_example_pb2.Example()
    parsed.CopyFrom(parse_example(record))
    for key, value in (("meta/quality", quality), ("meta/elevation_deg", elevation_deg)):
        if value is not None:
            values = parsed.features.feature[key].float_list.value
            del values[:]
            values.append(float(value))
    return parsed.SerializeToString(deterministic=True)


def parse_example(record: bytes | tf_example_pb2.Example) -> tf_example_pb2.Example:
    """The `tf.train.Example` of a serialised record (an Example passes through)."""
    if isinstance(record, tf_example_pb2.Example):
        return record
    return tf_example_pb2.Example.FromString(record)


def _values(example: tf_example_pb2.Example, key: str, kind: str, count: int | None = None):
    feature_map = example.features.feature
    if key not in feature_map:
        raise OrbitSchemaError(f"orbit record is missing feature {key!r}")
    feature = feature_map[key]
    stored_kind = feature.WhichOneof("kind")
    if stored_kind != kind:
        raise OrbitSchemaError(f"feature {key!r} holds a {stored_kind}, expected a {kind}")
    values = getattr(feature, kind).value
    if count is not None and len(values) != count:
        raise OrbitSchemaError(f"feature {key!r} has {len(values)} values, expected {count}")
    return values


def _scalar(example: tf_example_pb2.Example, key: str, kind: str):
    return _values(example, key, kind, count=1)[0]


def _optional_scalar(example: tf_example_pb2.Example, key: str, kind: str):
    """The feature's single value, None when the record does not have it (a wrong type is still an error)."""
    return _scalar(example, key, kind) if key in example.features.feature else None


def _png_size(png: bytes, object_id: str) -> tuple[int, int]:
    """(height, width) of a PNG from its header; the pixels are not decoded."""
    try:
        with Image.open(io.BytesIO(png)) as image:
            width, height = image.size
    except (OSError, ValueError) as error:
        raise OrbitSchemaError(f"view 0 of {object_id!r} is not a readable image ({error})") from None
    return height, width


def read_generation(record: bytes | tf_example_pb2.Example) -> dict | None:
    """The `synthetic/generation` JSON object of a record, None when it has none."""
    value = _optional_scalar(parse_example(record), "synthetic/generation", "bytes_list")
    return None if value is None else json.loads(value.decode("utf-8"))


def read_metadata(record: bytes | tf_example_pb2.Example) -> OrbitMetadata:
    """The scalar features of an orbit record, validated."""
    example = parse_example(record)
    object_id = _scalar(example, "object/id", "bytes_list").decode("utf-8")
    source = _scalar(example, "object/source", "bytes_list").decode("utf-8")
    if source not in SOURCES:
        raise OrbitSchemaError(f"object/source of {object_id!r} is {source!r}, expected one of {SOURCES}")
    pngs = _values(example, "views/image", "bytes_list")
    num_views = _optional_scalar(example, "views/count", "int64_list")
    if num_views is None:
        num_views = len(pngs)
    elif num_views != len(pngs):
        raise OrbitSchemaError(f"feature 'views/image' has {len(pngs)} values, expected {num_views} "
                               f"(views/count of {object_id!r})")
    if num_views < 1:
        raise OrbitSchemaError(f"orbit {object_id!r} has no views")
    height = _optional_scalar(example, "views/height", "int64_list")
    width = _optional_scalar(example, "views/width", "int64_list")
    if height is None or width is None:
        png_height, png_width = _png_size(pngs[0], object_id)
        height = png_height if height is None else height
        width = png_width if width is None else width
    caption = _optional_scalar(example, "object/caption", "bytes_list")
    return OrbitMetadata(object_id=object_id, source=source,
                         elevation_deg=float(_scalar(example, "meta/elevation_deg", "float_list")),
                         quality=float(_scalar(example, "meta/quality", "float_list")),
                         num_views=int(num_views), height=int(height), width=int(width),
                         # Lenient: a damaged caption must not stop readers that never use it.
                         caption="" if caption is None else caption.decode("utf-8", errors="replace"))


def _decode_png(png: bytes, height: int, width: int, object_id: str, view: int) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        if image.size != (width, height):
            raise OrbitSchemaError(
                f"view {view} of {object_id!r} is {image.size[0]}x{image.size[1]} (WxH), "
                f"views/width x views/height say {width}x{height}"
            )
        # PNGs from other tools may lack alpha; a missing mask means all foreground.
        return np.asarray(image if image.mode == "RGBA" else image.convert("RGBA"))


def _surface_points(example: tf_example_pb2.Example, object_id: str) -> np.ndarray | None:
    """The optional `object/surface_points` as float32 (P, 3); None when the record has none."""
    if "object/surface_points" not in example.features.feature:
        return None
    values = np.asarray(_values(example, "object/surface_points", "float_list"), np.float32)
    if values.size % 3:
        raise OrbitSchemaError(f"feature 'object/surface_points' of {object_id!r} has {values.size} values, "
                               "expected a multiple of 3")
    return values.reshape(-1, 3)


def read_cameras(record: bytes | tf_example_pb2.Example, num_views: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cam2world float32 (V, 4, 4) and intrinsics float32 (V, 3, 3) of every view; no image is decoded.

    `num_views` (V) is `read_metadata(record).num_views`, read again when not given.
    """
    example = parse_example(record)
    num_views = read_metadata(example).num_views if num_views is None else num_views
    cam2world = np.asarray(_values(example, "views/cam2world", "float_list", num_views * 16), np.float32)
    intrinsics = np.asarray(_values(example, "views/intrinsics", "float_list", num_views * 9), np.float32)
    return cam2world.reshape(num_views, 4, 4), intrinsics.reshape(num_views, 3, 3)


def decode_orbit(record: bytes | tf_example_pb2.Example, *, views: Sequence[int] | None = None) -> dict:
    """Decodes an orbit record into NumPy arrays; only the `views` asked for (all by default).

    Returns a dict with `images` uint8 (V', H, W, 4), `cam2world` float32 (V', 4, 4),
    `intrinsics` float32 (V', 3, 3), `azimuth_deg` float32 (V',), `view_indices` int32 (V',),
    in the order of `views`, `surface_points` float32 (P, 3) or None when the record has none,
    and the metadata: `object_id`, `source`, `elevation_deg`, `quality`, `num_views` (V, all
    views in the record), `height`, `width`, `caption` ('' when the record has none).
    """
    example = parse_example(record)
    metadata = read_metadata(example)
    num_views = metadata.num_views
    view_indices = np.arange(num_views) if views is None else np.asarray(views, dtype=np.int64).reshape(-1)
    if view_indices.size and (view_indices.min() < 0 or view_indices.max() >= num_views):
        raise IndexError(f"views {view_indices.tolist()} out of range for {metadata.object_id!r} with {num_views} views")
    pngs = _values(example, "views/image", "bytes_list", num_views)
    cam2world, intrinsics = read_cameras(example, num_views)
    if "views/azimuth_deg" in example.features.feature:
        azimuths = np.asarray(_values(example, "views/azimuth_deg", "float_list", num_views), np.float32)
    else:
        azimuths = _azimuths_from_cameras(cam2world).astype(np.float32)
    images = [_decode_png(pngs[v], metadata.height, metadata.width, metadata.object_id, v) for v in view_indices]
    return {
        "images": np.stack(images) if images else np.zeros((0, metadata.height, metadata.width, 4), np.uint8),
        "cam2world": cam2world[view_indices],
        "intrinsics": intrinsics[view_indices],
        "azimuth_deg": azimuths[view_indices],
        "view_indices": view_indices.astype(np.int32),
        "surface_points": _surface_points(example, metadata.object_id),
        **dataclasses.asdict(metadata),
    }


def random_orbit(rng: np.random.Generator, *, num_views: int = 8, resolution: int = 16, source: str = "rendered",
                 quality: float = math.nan, radius: float = 2.0) -> dict:
    """Arguments of `encode_orbit` for a made-up orbit: a soft disc of random colour per view.

    For tests, benchmarks and smoke runs. The images compress like renders (smooth, with a
    transparent background) rather than like noise, so PNG costs are realistic.
    """
    elevation = float(rng.uniform(0.0, 45.0))
    azimuths = cameras.orbit_azimuths(num_views, offset_deg=float(rng.uniform(0.0, 360.0 / num_views)))
    cam2world = cameras.orbit_cam2world(azimuths, elevation, radius)
    intrinsics = np.broadcast_to(cameras.intrinsics_matrix(*cameras.DEFAULT_INTRINSICS), (num_views, 3, 3))
    grid = (np.arange(resolution) + 0.5) / resolution
    y, x = np.meshgrid(grid, grid, indexing="ij")
    centres = rng.uniform(0.3, 0.7, size=(num_views, 2))
    distance = np.hypot(y - centres[:, 0, None, None], x - centres[:, 1, None, None])
    alpha = np.clip((0.35 - distance) * 8.0, 0.0, 1.0)
    colour = rng.uniform(0.0, 1.0, size=(num_views, 1, 1, 3)) * (0.6 + 0.4 * y[None, ..., None])
    colour = colour + rng.normal(0.0, 0.01, colour.shape[:1] + (resolution, resolution, 3))
    images = np.concatenate([colour, alpha[..., None]], axis=-1)
    images = np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)
    return dict(images=images, cam2world=cam2world, intrinsics=intrinsics, object_id=f"orbit-{rng.integers(1 << 62):x}",
                source=source, elevation_deg=elevation, quality=quality, azimuths_deg=azimuths)
