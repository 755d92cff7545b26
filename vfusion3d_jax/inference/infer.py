"""The `infer` command: images → 3D assets (turntable video, novel views, coloured mesh).

    python -m vfusion3d_jax infer --checkpoint=RUN_OR_CONVERTED_DIR --inputs=IMAGE_OR_FOLDER \
        --workdir=OUT [--config=configs/infer.py --config.render_size=384 ...]

Per image, under OUT/<image name>/:
    input.png       the model's input (foreground recentred, over white, source size)
    turntable.mp4   H.264 turntable (num_frames at fps), and turntable.gif for quick viewing
    views.png       sheet of `preview_views` novel views from `preview_elevation_deg`
    mesh.glb, mesh.obj  marching-cubes mesh with vertex colours (config.export_mesh)
and OUT/summary.json: every input with its outputs, or the reason it was skipped. A bad file
(unreadable, empty, not an image, no foreground, over the size limit) is skipped with a message
and never stops the others; neither does a failure while writing one image's outputs. Images go
through the network `batch_size` at a time.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import ml_collections
import numpy as np
import tqdm
from absl import app, flags, logging

from vfusion3d_jax import cameras, visualize
from vfusion3d_jax.configs import load_config
from vfusion3d_jax.inference import media, preprocess
from vfusion3d_jax.inference.reconstruct import Reconstructor
from vfusion3d_jax.rendering.mesh import EmptySurfaceError, export_mesh

SUMMARY_FILE = "summary.json"
MESH_FORMATS = (".glb", ".obj")


def write_outputs(reconstructor: Reconstructor, planes, prepared: preprocess.PreparedImage, out_dir: Path,
                  config: ml_collections.ConfigDict) -> dict:
    """Renders and writes one object's outputs; returns {kind: path} (and a note if no mesh)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = {"input": media.write_png(prepared.image, out_dir / "input.png")}
    turntable = cameras.turntable_cameras(config.num_frames, config.elevation_deg, config.radius)
    frames = reconstructor.render(planes, turntable, resolution=config.render_size,
                                  views_per_call=config.views_per_call)[0]
    outputs["video"] = media.write_mp4(frames, out_dir / "turntable.mp4", config.fps)
    outputs["gif"] = media.write_gif(frames, out_dir / "turntable.gif", config.fps)
    preview = cameras.turntable_cameras(config.preview_views, config.preview_elevation_deg, config.radius)
    views = reconstructor.render(planes, preview, resolution=config.render_size,
                                 views_per_call=config.views_per_call)[0]
    outputs["views"] = media.write_png(visualize.image_grid(views, columns=min(4, len(views))), out_dir / "views.png")
    if config.export_mesh:
        try:
            mesh = reconstructor.mesh(planes[0], resolution=config.mesh_resolution, threshold=config.mesh_threshold)
        except EmptySurfaceError as error:
            outputs["mesh_note"] = f"no mesh: {error} (--config.mesh_threshold sets the level)"
            logging.warning("%s: %s", out_dir.name, outputs["mesh_note"])
        else:
            for suffix in MESH_FORMATS:
                outputs[f"mesh{suffix}"] = export_mesh(mesh, out_dir / f"mesh{suffix}")
    return {key: str(value) for key, value in outputs.items()}


def infer(checkpoint: str, inputs, workdir: str | Path, config: ml_collections.ConfigDict | None = None,
          reconstructor: Reconstructor | None = None) -> dict:
    """Reconstructs every image of `inputs` (a file, folder, glob or list); returns the summary."""
    config = config if config is not None else load_config("infer.py")
    workdir = Path(workdir)
    reconstructor = reconstructor or Reconstructor.from_checkpoint(checkpoint, config)
    paths = preprocess.find_images(inputs)
    names = dict(zip(paths, preprocess.output_names(paths)))
    summary = dict(checkpoint=str(checkpoint), processed=[], skipped=[])
    start = time.perf_counter()
    bar = tqdm.tqdm(total=len(paths), desc="image to 3D", unit="image")
    for first in range(0, len(paths), config.batch_size):
        batch = []
        for path in paths[first:first + config.batch_size]:
            try:
                batch.append((path, preprocess.prepare_image(
                    path, reconstructor.source_size, border_ratio=reconstructor.border_ratio,
                    recenter_object=config.recenter)))
            except preprocess.ImageSkipped as error:
                _skip(summary, path, str(error), bar)
        if not batch:
            continue
        planes = reconstructor.planes(np.stack([prepared.image for _, prepared in batch]))
        for index, (path, prepared) in enumerate(batch):
            try:
                outputs = write_outputs(reconstructor, planes[index:index + 1], prepared, workdir / names[path], config)
            except Exception as error:  # noqa: BLE001 - one image's failure must not lose the others
                logging.exception("%s: writing its outputs failed", path)
                _skip(summary, path, f"failed while writing outputs: {type(error).__name__}: {error}", bar)
                continue
            summary["processed"].append(dict(input=str(path), name=names[path], had_alpha=prepared.had_alpha,
                                             outputs=outputs))
            bar.update()
    bar.close()
    summary["seconds"] = round(time.perf_counter() - start, 1)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def _skip(summary: dict, path: Path, reason: str, bar: tqdm.tqdm) -> None:
    logging.warning("skipping %s: %s", path, reason)
    summary["skipped"].append(dict(input=str(path), reason=reason))
    bar.update()


def format_summary(summary: dict, workdir: str | Path) -> str:
    lines = [f"{len(summary['processed'])} reconstructed, {len(summary['skipped'])} skipped "
             f"in {summary['seconds']} s; outputs in {workdir}"]
    lines += [f"  {item['name']}: {', '.join(Path(p).name for k, p in item['outputs'].items() if k != 'mesh_note')}"
              + (f"  ({item['outputs']['mesh_note']})" if "mesh_note" in item["outputs"] else "")
              for item in summary["processed"]]
    lines += [f"  skipped {item['input']}: {item['reason']}" for item in summary["skipped"]]
    return "\n".join(lines)


def infer_command(config: ml_collections.ConfigDict | None, workdir: str | None, args: list[str]) -> None:
    """CLI `infer`: --checkpoint=DIR --inputs=IMAGE_OR_FOLDER_OR_GLOB --workdir=OUT."""
    checkpoint, inputs = flags.FLAGS.checkpoint, flags.FLAGS.inputs or (args[0] if len(args) == 1 else None)
    if not checkpoint or not inputs or not workdir:
        raise app.UsageError("infer needs --checkpoint=DIR (a training run or a `convert` output), "
                             "--inputs=IMAGE_OR_FOLDER and --workdir=OUT")
    summary = infer(checkpoint, inputs, workdir, config)
    print(format_summary(summary, workdir))
