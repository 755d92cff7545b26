"""The `evaluate` command: how well a checkpoint reconstructs held-out orbits.

    python -m vfusion3d_jax evaluate --checkpoint=RUN_OR_CONVERTED_DIR \
        --data='data/tiny/shards/holdout-*.tfrecord' --workdir=OUT [--config=configs/infer.py:evaluate]

For every orbit of the TFRecords: reconstruct from view `source_view` (cameras moved to the
frame where that view is canonical, as in training), render every other view deterministically
and compare: PSNR, SSIM and LPIPS (AlexNet), foreground PSNR and silhouette IoU (the metrics
that the white background cannot win; train/metrics.py), averaged over an object's views, then
over objects. The input-swap test runs on groups of `swap_group` objects: each object's views
are also rendered from the other sources of its group, giving the conditioning gain (foreground
PSNR from its own source minus the mean from the others) and the retrieval accuracy (the own
source reconstructs it best) with its chance level (1 / group size).
When a record carries `object/surface_points` (ground-truth geometry, written by `render-data`),
the exported mesh is compared too: Chamfer distance ("mean of means" of nearest-neighbour
distances, world units; objects are 0.9 across) between points sampled on the mesh and the
ground truth, both in the canonical frame. An object whose density never reaches the mesh
threshold gets no Chamfer value and is counted as `empty_meshes`.

Outputs in OUT: `metrics.json` (overall and per object; a perfect PSNR is written as Infinity,
as Python's json does), `metrics.md` (the same as Markdown tables) and `sheet.png` (the worst
and the best objects by PSNR: source | ground-truth views | rendered views).

The comparison loop takes any predictor (`OrbitTask` list → `Prediction` list), so it is tested
with ground truth as the prediction (PSNR inf, SSIM 1, LPIPS 0, Chamfer 0).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator

import jax
import ml_collections
import numpy as np
import tqdm
import trimesh
from absl import app, flags, logging
from etils import epath

from vfusion3d_jax import cameras, visualize
from vfusion3d_jax.configs import load_config
from vfusion3d_jax.data.example import decode_orbit
from vfusion3d_jax.data.pipeline import composite_on_white, expand_paths, resize_rgba, source_world_change
from vfusion3d_jax.data.tfrecord import iterate_records
from vfusion3d_jax.inference import media
from vfusion3d_jax.inference.reconstruct import Reconstructor
from vfusion3d_jax.models.convert import load_checkpoint_config
from vfusion3d_jax.rendering.mesh import EmptySurfaceError
from vfusion3d_jax.train import metrics

IMAGE_METRICS = ("psnr", "ssim", "lpips")
FOREGROUND_METRICS = ("fg_psnr", "iou")


@dataclasses.dataclass(frozen=True)
class OrbitTask:
    """One held-out object: the model's input and what its output is compared with."""

    object_id: str
    source_image: np.ndarray  # (S, S, 3) float32 in [0, 1], over white
    source_camera: np.ndarray  # (16,), canonical pose at the source view's distance
    target_images: np.ndarray  # (M, H, W, 3) float32 over white: every other view
    target_masks: np.ndarray  # (M, H, W, 1) float32 foreground alpha of the target views
    target_cameras: np.ndarray  # (M, 25) in the canonical frame
    surface_points: np.ndarray | None  # (P, 3) ground-truth surface in the canonical frame
    # For a multi-view model (FlexRM): the source then the other input views, (V, S, S, 3) and (V, 16).
    input_images: np.ndarray | None = None
    input_cameras: np.ndarray | None = None
    elevation_deg: float | None = None  # the orbit's (meta/elevation_deg)


@dataclasses.dataclass(frozen=True)
class Prediction:
    images: np.ndarray  # (M, H, W, 3) in [0, 1], the target views as reconstructed
    opacity: np.ndarray | None = None  # (M, H, W, 1) the rendered opacity of those views
    surface_points: np.ndarray | None = None  # (Q, 3) sampled on the reconstructed surface
    note: str | None = None  # why there are no surface points
    # The input-swap test: this task's target views reconstructed from the source of every task
    # of its group, in group order (its own source included), (G, M, H, W, 3) and (G, M, H, W, 1).
    group_images: np.ndarray | None = None
    group_opacity: np.ndarray | None = None


Predictor = Callable[[list[OrbitTask]], list[Prediction]]


def orbit_tasks(pattern: str, *, source_view: int, source_size: int, resolution: int | None = None,
                max_objects: int | None = None) -> Iterator[OrbitTask]:
    """The evaluation tasks of every orbit in the shards of `pattern` (globs, comma-separated)."""
    count = 0
    for shard in expand_paths(pattern):
        for record in iterate_records(shard):
            if max_objects is not None and count >= max_objects:
                return
            count += 1
            yield orbit_task(decode_orbit(record), source_view=source_view, source_size=source_size,
                             resolution=resolution)


def orbit_task(orbit: dict, *, source_view: int, source_size: int, resolution: int | None = None,
               target_views: list[int] | None = None, input_views: list[int] = ()) -> OrbitTask:
    """The task of one decoded orbit: reconstruct from `source_view` (and, for a multi-view model,
    `input_views` beside it), compare at `target_views` (default: every other view)."""
    if not 0 <= source_view < orbit["num_views"] or orbit["num_views"] < 2:
        raise ValueError(f"orbit {orbit['object_id']!r} has {orbit['num_views']} views: cannot use view "
                         f"{source_view} as the source and compare the others")
    resolution = resolution or orbit["height"]
    change = source_world_change(orbit["cam2world"][source_view])
    cam2world = (change @ orbit["cam2world"]).astype(np.float32)
    targets = [view for view in range(orbit["num_views"]) if view != source_view] if target_views is None else list(
        target_views)
    inputs = [source_view, *input_views]
    target_images, target_masks = composite_on_white(
        np.stack([resize_rgba(orbit["images"][v], resolution) for v in targets]))
    points = orbit.get("surface_points")
    if points is not None:
        points = (points.astype(np.float64) @ change[:3, :3].T + change[:3, 3]).astype(np.float32)
    input_images = np.stack([composite_on_white(resize_rgba(orbit["images"][v], source_size))[0] for v in inputs])
    return OrbitTask(
        object_id=orbit["object_id"],
        source_image=input_images[0],
        source_camera=cameras.source_camera(cam2world[source_view], orbit["intrinsics"][source_view]),
        target_images=target_images,
        target_masks=target_masks,
        target_cameras=cameras.render_camera(cam2world[targets], orbit["intrinsics"][targets]),
        surface_points=points,
        input_images=input_images,
        elevation_deg=float(orbit["elevation_deg"]),
        input_cameras=cameras.source_camera(cam2world[inputs], orbit["intrinsics"][inputs]).astype(np.float32),
    )


def model_predictor(reconstructor: Reconstructor, config: ml_collections.ConfigDict) -> Predictor:
    """The checkpoint's reconstructions: planes in batches, renders and meshes per object; with
    `config.swap_group` > 1 each object's views are rendered from every plane set of its group."""

    def predict(tasks: list[OrbitTask]) -> list[Prediction]:
        planes = reconstructor.planes(np.stack([task.source_image for task in tasks]),
                                      np.stack([task.source_camera for task in tasks]))
        swap = config.swap_group > 1 and len(tasks) > 1
        predictions = []
        for index, task in enumerate(tasks):
            # With the swap test, one call renders this object's cameras from every source.
            group_images, group_opacity = reconstructor.render(
                planes if swap else planes[index:index + 1], task.target_cameras,
                resolution=task.target_images.shape[1], with_opacity=True)
            own = index if swap else 0
            rendered, opacity = group_images[own], group_opacity[own]
            points, note = None, None
            if config.chamfer and task.surface_points is not None:
                try:
                    mesh = reconstructor.mesh(planes[index], resolution=config.mesh_resolution,
                                              threshold=config.mesh_threshold)
                    points = np.asarray(trimesh.sample.sample_surface(mesh, config.chamfer_points, seed=0)[0])
                except EmptySurfaceError:
                    note = f"empty mesh (density never reaches {config.mesh_threshold})"
            predictions.append(Prediction(rendered, opacity, points, note, *(
                (group_images, group_opacity) if swap else ())))
        return predictions

    return predict


_image_metrics = jax.jit(metrics.image_metrics)
_foreground_psnr = jax.jit(metrics.foreground_psnr)


def _view_mean(values) -> float:
    values = np.asarray(values, np.float64)
    return float(np.nanmean(values)) if np.any(~np.isnan(values)) else math.nan


def object_metrics(task: OrbitTask, prediction: Prediction, lpips_params) -> dict:
    """The metrics of one object: image metrics averaged over its views, Chamfer of its mesh."""
    if prediction.images.shape != task.target_images.shape:
        raise ValueError(f"{task.object_id}: prediction {prediction.images.shape} != targets "
                         f"{task.target_images.shape}")
    images, references = np.asarray(prediction.images, np.float32), task.target_images
    masks = dict(opacity=np.asarray(prediction.opacity, np.float32), masks=task.target_masks) if (
        prediction.opacity is not None) else {}
    if min(images.shape[1:3]) >= metrics.LPIPS_MIN_SIZE[metrics.EVAL_LPIPS_NET]:
        per_view = _image_metrics(images, references, lpips_params, **masks)
    else:  # too small for AlexNet's pooling: no LPIPS rather than a wrong one
        per_view = dict(_image_metrics(images, references, **masks), lpips=np.full(len(images), np.nan))
    names = IMAGE_METRICS + (FOREGROUND_METRICS if masks else ())
    result = dict(object_id=task.object_id, num_views=len(images),
                  **{name: _view_mean(per_view[name]) for name in names})
    # No mesh asked for (chamfer off): no Chamfer entry, rather than an "empty mesh".
    if task.surface_points is not None and (prediction.surface_points is not None or prediction.note):
        if prediction.surface_points is None:
            result.update(chamfer=math.nan, note=prediction.note)
        else:
            result.update(metrics.chamfer_distance(np.asarray(prediction.surface_points), task.surface_points))
    return result


def swap_scores(tasks: list[OrbitTask], predictions: list[Prediction]) -> np.ndarray | None:
    """(G, G) foreground PSNR of task i's views reconstructed from task j's source (None without
    group renders)."""
    if len(tasks) < 2 or any(p.group_images is None or p.group_opacity is None for p in predictions):
        return None
    scores = np.empty((len(tasks), len(tasks)))
    for i, (task, prediction) in enumerate(zip(tasks, predictions)):
        if len(prediction.group_images) != len(tasks):
            raise ValueError(f"{task.object_id}: {len(prediction.group_images)} group renders for a group of "
                             f"{len(tasks)}")
        for j in range(len(tasks)):
            scores[i, j] = _view_mean(_foreground_psnr(
                np.asarray(prediction.group_images[j], np.float32), task.target_images,
                np.asarray(prediction.group_opacity[j], np.float32), task.target_masks))
    return scores


def evaluate_orbits(tasks: Iterable[OrbitTask], predict: Predictor, *, batch_size: int,
                    lpips_params=None, keep: int = 4, progress: bool = True) -> dict:
    """Per-object metrics of every task, their means, and thumbnails for the sheet.

    `predict` sees `batch_size` tasks at a time: the groups of the input-swap test when it
    returns group renders. Returns dict(objects=[...], overall={...}, rows={object_id: uint8
    comparison row}) where a row is source | `keep` evenly spread target views | the same
    views rendered.
    """
    lpips_params = lpips_params if lpips_params is not None else metrics.load_lpips_params(metrics.EVAL_LPIPS_NET)
    objects, rows, batch = [], {}, []
    bar = tqdm.tqdm(desc="evaluate", unit="object", disable=not progress)

    def flush() -> None:
        predictions = predict(batch)
        scores = swap_scores(batch, predictions)
        swap = metrics.input_swap(scores) if scores is not None else None
        for index, (task, prediction) in enumerate(zip(batch, predictions)):
            objects.append(object_metrics(task, prediction, lpips_params))
            if swap is not None:
                objects[-1].update(conditioning_gain=float(swap["gain"][index]),
                                   swap_fg_psnr=float(swap["swapped"][index]), retrieved=bool(swap["retrieved"][index]),
                                   group_size=len(batch))
            views = np.linspace(0, len(task.target_images) - 1, min(keep, len(task.target_images))).round().astype(int)
            rows[task.object_id] = visualize.to_uint8(visualize.comparison_row(
                task.source_image, task.target_images[views], prediction.images[views]))
            bar.update()
        batch.clear()

    for task in tasks:
        batch.append(task)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    bar.close()
    if not objects:
        raise ValueError("no orbits to evaluate")
    return dict(objects=objects, overall=overall_metrics(objects), rows=rows)


def overall_metrics(objects: list[dict]) -> dict:
    """Means over objects (each object weighs the same, whatever its number of views); the
    input-swap test over the objects that had a group."""
    overall = dict(num_objects=len(objects), num_views=sum(o["num_views"] for o in objects))
    names = IMAGE_METRICS + tuple(name for name in FOREGROUND_METRICS if any(name in o for o in objects))
    names += ("chamfer", "accuracy", "completeness") if any("chamfer" in o for o in objects) else ()
    for name in names:
        values = [o[name] for o in objects if name in o and not math.isnan(o[name])]
        overall[name] = float(np.mean(values)) if values else math.nan
    swapped = [o for o in objects if "swap_fg_psnr" in o]
    if swapped:
        overall.update(
            conditioning_gain=float(np.mean([o["conditioning_gain"] for o in swapped])),
            retrieval=float(np.mean([o["retrieved"] for o in swapped])),
            retrieval_chance=float(np.mean([1.0 / o["group_size"] for o in swapped])))
    if "chamfer" in names:
        overall["empty_meshes"] = sum(1 for o in objects if "chamfer" in o and math.isnan(o["chamfer"]))
    return overall


_HEADERS = dict(psnr="PSNR (dB) ↑", fg_psnr="foreground PSNR (dB) ↑", iou="silhouette IoU ↑", ssim="SSIM ↑",
                lpips="LPIPS (AlexNet) ↓", chamfer="Chamfer ↓")


def _columns(overall: dict) -> list[str]:
    return [name for name in _HEADERS if name in overall]


def _cell(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}" if abs(value) < 1 else f"{value:.2f}"


def overall_table(overall: dict) -> str:
    """The means over objects as a one-row Markdown table, under a line of counts."""
    columns = _columns(overall)
    empty = f", {overall['empty_meshes']} empty meshes" if overall.get("empty_meshes") else ""
    lines = [f"{overall['num_objects']} objects, {overall['num_views']} novel views{empty}", "",
             "| " + " | ".join(_HEADERS[c] for c in columns) + " |", "|" + "---|" * len(columns),
             "| " + " | ".join(_cell(overall[c]) for c in columns) + " |"]
    if "conditioning_gain" in overall:
        lines += ["", f"Input swap: conditioning gain {overall['conditioning_gain']:+.2f} dB (foreground PSNR from "
                  f"the own source minus from other objects' sources), retrieval {overall['retrieval']:.2f} "
                  f"(chance {overall['retrieval_chance']:.2f})"]
    return "\n".join(lines)


def markdown_report(report: dict) -> str:
    """The overall means and the per-object table (worst PSNR first) as Markdown."""
    columns = _columns(report["overall"])
    lines = [overall_table(report["overall"]), "",
             "| object | views | " + " | ".join(_HEADERS[c] for c in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for item in sorted(report["objects"], key=lambda o: o["psnr"]):
        cells = [_cell(item.get(c, math.nan)) for c in columns]
        lines.append(f"| {item['object_id']} | {item['num_views']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def worst_and_best_sheet(report: dict, rows: int) -> np.ndarray:
    """Rows of the `rows` worst then the `rows` best objects by PSNR: source | targets | renders."""
    ranked = sorted(report["objects"], key=lambda o: o["psnr"])
    chosen = ranked if len(ranked) <= 2 * rows else ranked[:rows] + ranked[-rows:]
    return visualize.labelled_rows([(f"{item['object_id']}  PSNR {item['psnr']:.2f}", report["rows"][item["object_id"]])
                                    for item in chosen])


def write_report(report: dict, workdir: str | os.PathLike, *, sheet_rows: int, extra: dict | None = None) -> dict:
    """metrics.json, metrics.md and sheet.png in `workdir` (local or a bucket); returns their paths."""
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    paths = dict(json=workdir / "metrics.json", markdown=workdir / "metrics.md", sheet=workdir / "sheet.png")
    content = dict(extra or {}, overall=report["overall"], objects=report["objects"])
    paths["json"].write_text(json.dumps(content, indent=2))
    paths["markdown"].write_text(markdown_report(report))
    if sheet_rows > 0:
        media.write_png(worst_and_best_sheet(report, sheet_rows), paths["sheet"])
    return paths


def evaluate(checkpoint: str, data: str, workdir: str | os.PathLike,
             config: ml_collections.ConfigDict | None = None) -> dict:
    """Evaluates `checkpoint` on the orbits of `data`; writes and returns the report."""
    config = config if config is not None else load_config("infer.py:evaluate")
    reconstructor = Reconstructor.from_checkpoint(checkpoint, config)
    tasks = orbit_tasks(data, source_view=config.source_view, source_size=reconstructor.source_size,
                        resolution=config.resolution, max_objects=config.max_objects)
    group = config.swap_group if config.swap_group > 1 else config.batch_size
    report = evaluate_orbits(tasks, model_predictor(reconstructor, config), batch_size=group,
                             keep=config.sheet_views)
    report["paths"] = write_report(report, workdir, sheet_rows=config.sheet_rows,
                                   extra=dict(checkpoint=str(checkpoint), data=data, config=config.to_dict()))
    return report


def evaluate_command(config: ml_collections.ConfigDict | None, workdir: str | None, args: list[str]) -> None:
    """CLI `evaluate`: --checkpoint=DIR --data=GLOB --workdir=OUT."""
    checkpoint, data = flags.FLAGS.checkpoint, flags.FLAGS.data or (args[0] if len(args) == 1 else None)
    if not checkpoint or not data or not workdir:
        raise app.UsageError("evaluate needs --checkpoint=DIR, --data=TFRECORD_GLOB and --workdir=OUT")
    config = config if config is not None else load_config("infer.py:evaluate")
    if load_checkpoint_config(checkpoint).get("task") == "flexrm":
        from vfusion3d_jax.inference import evaluate_views  # the FlexRM evaluation builds on this module

        summary = evaluate_views.evaluate_view_counts(checkpoint, data, workdir, config)
        print(evaluate_views.runs_table(summary["runs"]))
        print(f"Report: {workdir}/metrics.md, metrics.json, views.png; one folder per run")
        return
    report = evaluate(checkpoint, data, workdir, config)
    print(overall_table(report["overall"]))
    print(f"Report: {report['paths']['markdown']}, {report['paths']['json']}; sheet: {report['paths']['sheet']}")
    logging.info("evaluation of %s on %s: %s", checkpoint, data, report["overall"])
