"""The `infer` command: images (or captions) → 3D assets (turntable video, novel views, coloured mesh).

    python -m vfusion3d_jax infer --checkpoint=RUN_OR_CONVERTED_DIR --inputs=IMAGE_OR_FOLDER \
        --workdir=OUT [--config=configs/infer.py --config.render_size=384 ...]
    python -m vfusion3d_jax infer --checkpoint=LRM_DIR --prompt="a red torus" \
        --config.diffusion_checkpoint=MVDIFFUSION_RUN --workdir=OUT          # text to 3D

Text to 3D, as the paper shows it: the multi-view diffusion model generates the caption's orbit
from the caption alone (`sample`'s text-only path); its first frame is the generated view that
the LRM reconstructs (already in the training views' framing: resized, not recentred).
OUT/<the prompt's words>/ also holds `orbit.png` (the generated orbit) and `<the prompt's
words>.png` (its first frame, the LRM's input). `--prompt` takes one caption,
`--config.prompts_file` a file of them (one per line).

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
from collections.abc import Sequence
from pathlib import Path

import ml_collections
import numpy as np
import tqdm
from absl import app, flags, logging

from vfusion3d_jax import cameras, visualize
from vfusion3d_jax.configs import load_config
from vfusion3d_jax.inference import flexiview, media, preprocess
from vfusion3d_jax.inference.reconstruct import Reconstructor
from vfusion3d_jax.inference.sample import OrbitSampler, orbit_relative_pose, prompt_folder_name
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
          reconstructor: Reconstructor | None = None, framed: Sequence[Path] = ()) -> dict:
    """Reconstructs every image of `inputs` (a file, folder, glob or list); returns the summary.

    `framed`: those of the inputs that are already framed as the training views (generated views):
    resized only, not recentred (`preprocess.prepare_framed`)."""
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
                batch.append((path, preprocess.prepare_framed(path, reconstructor.source_size) if path in framed
                              else preprocess.prepare_image(path, reconstructor.source_size,
                                                            border_ratio=reconstructor.border_ratio,
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


def prompt_views(diffusion_checkpoint: str, prompts: list[str], workdir: Path, config: ml_collections.ConfigDict
                 ) -> list[Path]:
    """Generates each caption's orbit with the diffusion model and writes, under
    workdir/<the prompt's words>/, `orbit.png` and `<the prompt's words>.png` (its first frame); returns
    the first frames' paths, the images that `infer` then reconstructs."""
    sampler = OrbitSampler.from_checkpoint(diffusion_checkpoint, load_config("sample.py", batch_size=1))
    pose = orbit_relative_pose(sampler.num_frames, config.prompt_elevation_deg)
    blank = np.ones((1, sampler.resolution, sampler.resolution, 3), np.float32)
    paths = []
    for prompt in tqdm.tqdm(prompts, desc="text to orbit", unit="prompt"):
        frames = sampler.sample(blank, np.array([False]), pose, sampler.caption(prompt), config.prompt_seed)[0]
        name = prompt_folder_name(prompt)
        media.write_png(visualize.image_grid(frames, columns=len(frames)), workdir / name / "orbit.png")
        paths.append(Path(media.write_png(frames[0], workdir / name / f"{name}.png")))
    return paths


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
    """CLI `infer`: --checkpoint=DIR --inputs=IMAGE_OR_FOLDER_OR_GLOB and/or --prompt=TEXT --workdir=OUT."""
    config = config if config is not None else load_config("infer.py")
    checkpoint, inputs = flags.FLAGS.checkpoint, flags.FLAGS.inputs or (args[0] if len(args) == 1 else None)
    if config.get("variant") == "flexiview":
        if not checkpoint or not inputs or not workdir:
            raise app.UsageError("infer --config=configs/infer.py:flexiview needs --checkpoint=DIR (a FlexRM run), "
                                 "--inputs=IMAGE_OR_FOLDER and --workdir=OUT")
        summary = flexiview.infer_flexiview(checkpoint, inputs, workdir, config)
        print(flexiview.format_summary(summary, workdir))
        return
    prompts = [flags.FLAGS.prompt] if flags.FLAGS.prompt else []
    if config.get("prompts_file"):
        prompts += [line.strip() for line in Path(config.prompts_file).read_text(encoding="utf-8").splitlines()
                    if line.strip()]
    if not checkpoint or not (inputs or prompts) or not workdir:
        raise app.UsageError("infer needs --checkpoint=DIR (a training run or a `convert` output), "
                             "--inputs=IMAGE_OR_FOLDER and/or --prompt=TEXT, and --workdir=OUT")
    generated = []
    if prompts:
        if not config.get("diffusion_checkpoint"):
            raise app.UsageError("text to 3D needs --config.diffusion_checkpoint=DIR (a `train "
                                 "--config=configs/mvdiffusion.py` run) to turn the captions into views")
        generated = prompt_views(config.diffusion_checkpoint, prompts, Path(workdir), config)
        inputs = ([] if inputs is None else preprocess.find_images(inputs)) + generated
    summary = infer(checkpoint, inputs, workdir, config, framed=set(generated))
    print(format_summary(summary, workdir))
