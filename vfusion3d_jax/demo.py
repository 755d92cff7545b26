"""The README's main command: the whole system on embedded defaults, on a CPU.

    python -m vfusion3d_jax demo --workdir=runs/demo [--config=configs/demo.py ...]

Builds the built-in dataset (assets that ship with the installed packages: no download),
trains the tiny LRM on it, evaluates it on the held-out objects and on unseen objects made
outside the built-in packages (trimesh primitives in colours of their own), reconstructs
held-out images into turntable videos and coloured meshes, then prints where everything is and
how good it is: novel-view PSNR, and the metrics that the white background cannot win
(foreground PSNR, silhouette IoU, the input-swap test). Each stage is one of the CLI's commands; a finished stage is reused when the demo is
started again (rendering skips complete shards, training resumes from its last checkpoint).

    WORKDIR/data/           orbit TFRecords (render-data), WORKDIR/data/inspect/contact_sheet.png
    WORKDIR/model/          checkpoints, TensorBoard logs, metrics.jsonl, eval grids (train)
    WORKDIR/evaluation/     metrics.md, metrics.json, sheet.png (evaluate, held-out objects)
    WORKDIR/unseen/         meshes/*.glb made here, their orbits, and their evaluation/
    WORKDIR/images/         held-out source views as RGBA PNGs (the inputs of infer)
    WORKDIR/reconstructions/<image>/  turntable.mp4/.gif, views.png, mesh.glb/.obj (infer)
"""

from __future__ import annotations

import time
from pathlib import Path

import ml_collections
import numpy as np
import trimesh
from absl import logging

from vfusion3d_jax.configs import load_config
from vfusion3d_jax.data.example import decode_orbit
from vfusion3d_jax.data.inspect import inspect_dataset
from vfusion3d_jax.data.pipeline import expand_paths
from vfusion3d_jax.data.render_assets import render_dataset
from vfusion3d_jax.data.tfrecord import iterate_records
from vfusion3d_jax.inference import media
from vfusion3d_jax.inference.evaluate import evaluate, overall_table
from vfusion3d_jax.inference.infer import format_summary, infer
from vfusion3d_jax.train.trainer import train_and_evaluate


def export_source_views(pattern: str, out_dir: Path, count: int, view: int = 0) -> list[Path]:
    """View `view` of the first `count` orbits of `pattern` as RGBA PNGs named by object."""
    paths = []
    for shard in expand_paths(pattern):
        for record in iterate_records(shard):
            if len(paths) == count:
                return paths
            orbit = decode_orbit(record, views=[view])
            name = orbit["object_id"].replace("/", "_").replace(":", "_")
            paths.append(media.write_png(orbit["images"][0], out_dir / f"{name}.png"))
    return paths


def unseen_meshes(count: int, seed: int = 0) -> list[trimesh.Trimesh]:
    """`count` objects unlike the built-in ones: one or two trimesh primitives (torus, cone,
    capsule, cylinder, annulus, flattened or stretched sphere), randomly turned, each part in two
    saturated colours split across its height."""
    rng = np.random.default_rng(seed)
    makers = (lambda: trimesh.creation.torus(0.35, 0.12), lambda: trimesh.creation.cone(0.3, 0.7),
              lambda: trimesh.creation.capsule(0.5, 0.2), lambda: trimesh.creation.cylinder(0.25, 0.6),
              lambda: trimesh.creation.annulus(0.15, 0.35, 0.3),
              lambda: trimesh.creation.icosphere(2, 0.35).apply_scale(rng.uniform(0.5, 1.6, 3)))
    meshes = []
    for _ in range(count):
        parts = []
        for part_index in range(int(rng.integers(1, 3))):
            part = makers[int(rng.integers(len(makers)))]()
            part.apply_transform(trimesh.transformations.random_rotation_matrix(rng.random(3)))
            part.apply_translation(rng.uniform(-0.25, 0.25, 3) * part_index)
            hues = rng.uniform(0.0, 1.0, 2)
            colours = [np.r_[np.round(255 * _saturated(h)), 255].astype(np.uint8) for h in hues]
            upper = part.triangles_center[:, 2] > part.centroid[2]
            part.visual.face_colors = np.where(upper[:, None], colours[0], colours[1])
            parts.append(part)
        meshes.append(trimesh.util.concatenate(parts))
    return meshes


def _saturated(hue: float) -> np.ndarray:
    """RGB in [0, 1] of a fully saturated, bright colour of `hue` in [0, 1)."""
    return np.clip(np.abs(np.mod(hue * 6.0 + np.array([0.0, 4.0, 2.0]), 6.0) - 3.0) - 1.0, 0.0, 1.0) * 0.85 + 0.1


def write_unseen_meshes(out_dir: Path, count: int, seed: int = 0) -> list[Path]:
    """`unseen_meshes` as .glb files (vertex-coloured by face) in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, mesh in enumerate(unseen_meshes(count, seed)):
        path = out_dir / f"unseen_{index:03d}.glb"
        if not path.exists():
            mesh.export(path)
        paths.append(path)
    return paths


def run_demo(config: ml_collections.ConfigDict | None, workdir: str | None, args: list[str]) -> dict:
    config = config if config is not None else load_config("demo.py")
    workdir = Path(workdir or "runs/demo")
    paths = {name: workdir / name for name in ("data", "model", "evaluation", "unseen", "images", "reconstructions")}
    holdout = str(paths["data"] / "shards" / "holdout-*.tfrecord")
    seconds = {}

    def stage(name: str, message: str):
        logging.info("demo: %s", message)
        print(f"\n== {message}", flush=True)
        seconds[name] = time.perf_counter()

    def done(name: str) -> None:
        seconds[name] = time.perf_counter() - seconds[name]

    stage("data", f"rendering the built-in assets into {paths['data']}")
    render_dataset(config.data, str(paths["data"]), [])
    inspect_dataset(None, str(paths["data"] / "inspect"), [str(paths["data"] / "shards")])
    done("data")

    stage("train", f"training the tiny LRM in {paths['model']}")
    config.lrm.data_dir = str(paths["data"])
    train_and_evaluate(config.lrm, str(paths["model"]))
    done("train")

    stage("evaluate", "evaluating it on the held-out objects")
    report = evaluate(str(paths["model"]), holdout, paths["evaluation"], config.evaluate)
    done("evaluate")

    stage("unseen", f"evaluating it on {config.num_unseen} unseen objects made outside the built-in packages")
    unseen = None
    if config.num_unseen:
        write_unseen_meshes(paths["unseen"] / "meshes", config.num_unseen, seed=config.data.seed)
        unseen_data = ml_collections.ConfigDict(config.data.to_dict())
        unseen_data.update(assets=str(paths["unseen"] / "meshes"), up_axis="+z", holdout_fraction=0.0)
        render_dataset(unseen_data, str(paths["unseen"] / "data"), [])
        unseen = evaluate(str(paths["model"]), str(paths["unseen"] / "data" / "shards" / "train-*.tfrecord"),
                          paths["unseen"] / "evaluation", config.evaluate)
    done("unseen")

    stage("infer", "reconstructing held-out images into turntables and meshes")
    export_source_views(holdout, paths["images"], config.num_images)
    summary = infer(str(paths["model"]), str(paths["images"]), paths["reconstructions"], config.infer)
    done("infer")

    print("\n== Demo finished in " + ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items()))
    print(f"Data: {paths['data']} (contact sheet: {paths['data'] / 'inspect' / 'contact_sheet.png'})")
    print(f"Model: {paths['model']} (tensorboard --logdir={paths['model'] / 'tensorboard'})")
    print(f"Held-out novel views ({report['paths']['markdown']}, sheet {report['paths']['sheet']}):")
    print(overall_table(report["overall"]))
    if unseen is not None:
        print(f"Unseen objects ({unseen['paths']['markdown']}, sheet {unseen['paths']['sheet']}):")
        print(overall_table(unseen["overall"]))
    print(format_summary(summary, paths["reconstructions"]))
    return dict(report=report, unseen=unseen, summary=summary, seconds=seconds)
