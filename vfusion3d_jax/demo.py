"""The README's main command: the whole system on embedded defaults, on a CPU.

    python -m vfusion3d_jax demo --workdir=runs/demo [--config=configs/demo.py ...]

Builds the built-in dataset (assets that ship with the installed packages: no download),
trains the tiny LRM on it, evaluates it on the held-out objects and reconstructs held-out
images into turntable videos and coloured meshes, then prints where everything is and how good
it is. Each stage is one of the CLI's commands; a finished stage is reused when the demo is
started again (rendering skips complete shards, training resumes from its last checkpoint).

    WORKDIR/data/           orbit TFRecords (render-data), WORKDIR/data/inspect/contact_sheet.png
    WORKDIR/model/          checkpoints, TensorBoard logs, metrics.jsonl, eval grids (train)
    WORKDIR/evaluation/     metrics.md, metrics.json, sheet.png (evaluate, held-out objects)
    WORKDIR/images/         held-out source views as RGBA PNGs (the inputs of infer)
    WORKDIR/reconstructions/<image>/  turntable.mp4/.gif, views.png, mesh.glb/.obj (infer)
"""

from __future__ import annotations

import time
from pathlib import Path

import ml_collections
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


def run_demo(config: ml_collections.ConfigDict | None, workdir: str | None, args: list[str]) -> dict:
    config = config if config is not None else load_config("demo.py")
    workdir = Path(workdir or "runs/demo")
    paths = {name: workdir / name for name in ("data", "model", "evaluation", "images", "reconstructions")}
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

    stage("infer", "reconstructing held-out images into turntables and meshes")
    export_source_views(holdout, paths["images"], config.num_images)
    summary = infer(str(paths["model"]), str(paths["images"]), paths["reconstructions"], config.infer)
    done("infer")

    print("\n== Demo finished in " + ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items()))
    print(f"Data: {paths['data']} (contact sheet: {paths['data'] / 'inspect' / 'contact_sheet.png'})")
    print(f"Model: {paths['model']} (tensorboard --logdir={paths['model'] / 'tensorboard'})")
    print(f"Held-out novel views ({report['paths']['markdown']}, sheet {report['paths']['sheet']}):")
    print(overall_table(report["overall"]))
    print(format_summary(summary, paths["reconstructions"]))
    return dict(report=report, summary=summary, seconds=seconds)
