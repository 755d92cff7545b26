"""Looking at orbit TFRecords: the `inspect-data` command.

    python -m vfusion3d_jax inspect-data PATH [--workdir=OUT]

PATH is a shard, a folder (searched recursively for *.tfrecord) or a glob. Prints counts
(records, objects, views; per source and per split, the split being the shard-name prefix
such as `train` or `holdout`), image sizes, an elevation histogram, quality, foreground
fraction (mean alpha) and border-touching views, the camera radius and focal ranges, and
how many records have a caption (`object/caption`), with a few of them.
Writes `contact_sheet.png` (rows = objects, columns = views, a label above each row with
the object's id and caption,
images composited on grey so the alpha mask shows) and `inspect.json` to OUT, by default
the folder of the data when it is local and writable, else a folder in the cache directory
(`data.storage`): a reader never writes into a data folder it may not own. Records need only
the contract's required features (`data.example`). Image statistics come from at most `MAX_DECODED_RECORDS` records,
evenly spread; counts and cameras from every record.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections import Counter

import numpy as np
from etils import epath
from PIL import Image, ImageDraw

from vfusion3d_jax import errors
from vfusion3d_jax.data import remote, storage
from vfusion3d_jax.data.example import decode_orbit, parse_example, read_metadata
from vfusion3d_jax.data.tfrecord import iterate_records, read_index

MAX_DECODED_RECORDS = 256
SHEET_OBJECTS = 8
SHEET_VIEWS = 8
CAPTION_EXAMPLES = 5  # distinct captions shown, from the contact sheet's records
MIN_TILE = 64  # tiny renders are enlarged (nearest) to at least this many pixels
_LABEL_HEIGHT = 14
_SHEET_BACKGROUND = 225
_SHARD_NAME = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-\d+-of-\d+\.tfrecord$")


def find_shards(path: str) -> list[str]:
    """The TFRecord files at `path`: a file, a folder (recursive) or a glob."""
    if remote.is_dir(path):
        shards = remote.glob(path.rstrip("/") + "/**/*.tfrecord", recursive=True)
    elif remote.is_file(path):
        shards = [path]
    else:
        shards = [p for p in remote.glob(path, recursive=True) if remote.is_file(p)]
    if not shards:
        raise errors.MissingInputError(f"no TFRecord shards at {path!r}").with_hint(
            "give a shard, a folder of shards or a glob")
    return sorted(shards)


def _split_of(shard: str) -> str:
    match = _SHARD_NAME.match(os.path.basename(shard))
    return match.group("split") if match else "(unnamed)"


def _spread(count: int, total: int) -> set[int]:
    """`count` indices evenly spread over range(total)."""
    return set(np.linspace(0, total - 1, min(count, total)).round().astype(int).tolist()) if total else set()


def _range(values) -> dict:
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return dict(min=None, mean=None, max=None)
    return dict(min=float(values.min()), mean=float(values.mean()), max=float(values.max()))


def dataset_statistics(shards: list[str]) -> tuple[dict, list[dict]]:
    """(statistics, decoded orbits of the contact sheet) of the records in `shards`."""
    total = sum(len(read_index(shard)) for shard in shards)
    decoded_indices = _spread(MAX_DECODED_RECORDS, total)
    sheet_indices = _spread(SHEET_OBJECTS, total)
    sources, splits, sizes, views_per_record, objects = Counter(), Counter(), Counter(), Counter(), set()
    elevations, qualities, radii, focals = [], [], [], []
    foreground, border_views, decoded_views = [], 0, 0
    captioned = 0
    sheet = []
    index = 0
    for shard in shards:
        split = _split_of(shard)
        for record in iterate_records(shard):
            example = parse_example(record)
            metadata = read_metadata(example)
            objects.add(metadata.object_id)
            sources[metadata.source] += 1
            splits[split] += 1
            sizes[f"{metadata.height}x{metadata.width}"] += 1
            views_per_record[metadata.num_views] += 1
            elevations.append(metadata.elevation_deg)
            qualities.append(metadata.quality)
            captioned += bool(metadata.caption)
            if index in decoded_indices:
                orbit = decode_orbit(example)
                alpha = orbit["images"][..., 3].astype(np.float64) / 255.0
                foreground.extend(alpha.mean(axis=(1, 2)).tolist())
                edges = np.concatenate([alpha[:, 0], alpha[:, -1], alpha[:, :, 0], alpha[:, :, -1]], axis=1)
                border_views += int(np.sum(edges.max(axis=1) > 0))
                decoded_views += len(alpha)
                if index in sheet_indices:
                    sheet.append(orbit)
            else:
                orbit = decode_orbit(example, views=[])
            radii.extend(np.linalg.norm(orbit["cam2world"][:, :3, 3], axis=-1).tolist())
            focals.extend(orbit["intrinsics"][:, 0, 0].tolist())
            index += 1

    quality = np.asarray(qualities, np.float64)
    elevation = np.asarray(elevations, np.float64)
    histogram = {}
    if elevation.size:
        edges = np.arange(5 * math.floor(elevation.min() / 5), 5 * math.floor(elevation.max() / 5) + 10, 5.0)
        counts, _ = np.histogram(elevation, bins=edges)
        histogram = {f"{low:g}-{high:g}": int(c) for low, high, c in zip(edges[:-1], edges[1:], counts)}
    statistics = dict(
        shards=len(shards), records=total, objects=len(objects),
        views=int(sum(views * count for views, count in views_per_record.items())),
        per_source=dict(sources), per_split=dict(splits),
        image_sizes=dict(sizes), views_per_record={str(v): n for v, n in sorted(views_per_record.items())},
        elevation_deg=dict(**_range(elevation), histogram=histogram),
        quality=dict(**_range(quality[np.isfinite(quality)]), unknown=int(np.sum(~np.isfinite(quality)))),
        foreground_fraction=dict(**_range(foreground), views=decoded_views, records=len(decoded_indices)),
        views_touching_border=border_views,
        camera_radius=_range(radii), focal_x=_range(focals),
        captions=dict(records=captioned,
                      examples=list(dict.fromkeys(o["caption"] for o in sheet if o["caption"]))[:CAPTION_EXAMPLES]),
    )
    return statistics, sheet


def contact_sheet(orbits: list[dict]) -> Image.Image:
    """Rows = orbits, columns = up to SHEET_VIEWS evenly spaced views, a label strip above each row."""
    tile = max(MIN_TILE, max(max(o["height"], o["width"]) for o in orbits))
    columns = max(min(SHEET_VIEWS, o["num_views"]) for o in orbits)
    row_height = _LABEL_HEIGHT + tile
    sheet = Image.new("RGB", (columns * tile, len(orbits) * row_height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for row, orbit in enumerate(orbits):
        top = row * row_height
        label = f"{orbit['object_id']}  {orbit['source']}  elevation {orbit['elevation_deg']:.0f}  {orbit['caption']}"
        draw.text((2, top + 1), label, fill=(0, 0, 0))
        for column, view in enumerate(sorted(_spread(columns, orbit["num_views"]))):
            rgba = Image.fromarray(orbit["images"][view], mode="RGBA").resize((tile, tile), Image.Resampling.NEAREST)
            background = Image.new("RGBA", rgba.size, (_SHEET_BACKGROUND,) * 3 + (255,))
            sheet.paste(Image.alpha_composite(background, rgba).convert("RGB"), (column * tile, top + _LABEL_HEIGHT))
    return sheet


def format_statistics(statistics: dict) -> str:
    """The statistics as the text `inspect-data` prints."""
    def fmt(summary: dict, digits: int = 3) -> str:
        if summary["min"] is None:
            return "n/a"
        return f"min {summary['min']:.{digits}f}  mean {summary['mean']:.{digits}f}  max {summary['max']:.{digits}f}"

    s = statistics
    lines = [
        f"shards {s['shards']}  records {s['records']}  objects {s['objects']}  views {s['views']}",
        "per source: " + ", ".join(f"{k} {v}" for k, v in sorted(s["per_source"].items())),
        "per split:  " + ", ".join(f"{k} {v}" for k, v in sorted(s["per_split"].items())),
        "image sizes (HxW): " + ", ".join(f"{k}: {v}" for k, v in s["image_sizes"].items())
        + "   views per record: " + ", ".join(f"{k}: {v}" for k, v in s["views_per_record"].items()),
        f"elevation (deg): {fmt(s['elevation_deg'], 1)}",
    ]
    histogram = s["elevation_deg"]["histogram"]
    peak = max(histogram.values(), default=0)
    for bin_range, count in histogram.items():
        lines.append(f"  {bin_range:>7s} {count:6d} {'#' * round(40 * count / peak) if peak else ''}")
    lines += [
        f"quality: {fmt(s['quality'])}  unknown (NaN) {s['quality']['unknown']}",
        f"foreground fraction: {fmt(s['foreground_fraction'])}  "
        f"(over {s['foreground_fraction']['views']} views of {s['foreground_fraction']['records']} records)",
        f"views touching the image border: {s['views_touching_border']}",
        f"camera radius: {fmt(s['camera_radius'])}   focal fx: {fmt(s['focal_x'])}",
        f"captions: {s['captions']['records']} of {s['records']} records"
        + "".join(f"\n  {caption!r}" for caption in s["captions"]["examples"]),
    ]
    return "\n".join(lines)


def _default_output_dir(path: str) -> str:
    """The data's folder when a reader may write there, else the data's folder in the cache."""
    if remote.is_dir(path):
        data_dir = path
    elif remote.is_file(path):
        data_dir = remote.parent(path)
    else:
        fixed_prefix = re.split(r"[*?\[]", path, maxsplit=1)[0]
        data_dir = fixed_prefix.rsplit("/", 1)[0] if "/" in fixed_prefix else "."
    return data_dir if storage.may_write(data_dir) else storage.cache_path("inspect", data_dir)


def inspect_dataset(config, workdir: str | None, args: list[str]) -> dict:
    """Prints the statistics of the shards at args[0] and writes the contact sheet; `config` is unused."""
    del config  # the data describe themselves
    if len(args) != 1:
        raise errors.UsageError(f"inspect-data takes one PATH (a shard, a folder or a glob), got {args}")
    path = args[0]
    statistics, orbits = dataset_statistics(find_shards(path))
    output_dir = epath.Path(workdir or _default_output_dir(path))  # local or a bucket
    output_dir.mkdir(parents=True, exist_ok=True)
    sheet_path = output_dir / "contact_sheet.png"
    if orbits:
        png = io.BytesIO()
        contact_sheet(orbits).save(png, format="PNG")
        sheet_path.write_bytes(png.getvalue())
    (output_dir / "inspect.json").write_text(json.dumps(statistics, indent=2))
    sheet_path = os.fspath(sheet_path)
    print(format_statistics(statistics))
    print(f"contact sheet: {sheet_path if orbits else '(no records)'}")
    return dict(statistics, contact_sheet=sheet_path if orbits else None)
