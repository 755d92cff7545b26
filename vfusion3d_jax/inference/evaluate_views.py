"""`evaluate` of a FlexRM checkpoint: reconstruction quality as the number of input views grows.

    python -m vfusion3d_jax evaluate --checkpoint=FLEXRM_RUN --data='data/demo/shards/holdout-*.tfrecord' \
        --workdir=OUT --config.num_views=1,2,4,8 [--config.diffusion_checkpoint=MVDIFFUSION_RUN]

Each held-out orbit is split once, so that every view count is compared on the same targets and
no target is ever an input: the views at an even offset from `source_view` are the input pool
(the source first), those at an odd offset the targets. For each count k of `num_views`, the
source and k − 1 views of the pool spread evenly around the orbit → FlexRM → Gaussians rendered
at the target cameras → the metrics of `evaluate` (PSNR, SSIM, LPIPS, foreground PSNR,
silhouette IoU) with its input-swap test (each object's targets also rendered from the other
objects' inputs of its group).

With `diffusion_checkpoint`, the input views beside the source are generated, as FlexiView3D
does (inference/flexiview.py): the diffusion model's candidate orbits from the source view,
generated for the orbit's own elevation and radius, and for each k > 1 two choices of k − 1 of
them: `curated` (epipolar consistency with the source, then `select_views` for coverage, as
`infer` chooses) and `random` (seeded), so curation is measured against chance on the very same
candidates.

With `lrm_checkpoint`, a triplane LRM run reconstructs the same objects from the source view
alone and is scored on the same targets (the `lrm` run): the comparison side by side, in one run.

Outputs in OUT: one folder per run, `<inputs>_<k>_views/` (metrics.json, metrics.md and
sheet.png, as `evaluate` writes them), and at the top `metrics.json` (`runs`: per run its
inputs, k and overall metrics), `metrics.md` (one row per run) and `views.png` (PSNR and
foreground PSNR against the number of views, one line per kind of inputs).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import zlib

import ml_collections
import numpy as np
import tqdm
from etils import epath

from vfusion3d_jax import errors, visualize
from vfusion3d_jax.configs import load_config
from vfusion3d_jax.inference import view_selection
from vfusion3d_jax.data.example import decode_orbit
from vfusion3d_jax.data.pipeline import expand_paths
from vfusion3d_jax.data.tfrecord import iterate_records
from vfusion3d_jax.inference import evaluate, flexiview, media
from vfusion3d_jax.inference.evaluate import OrbitTask, Prediction
from vfusion3d_jax.inference.flexiview import FlexReconstructor
from vfusion3d_jax.inference.reconstruct import Reconstructor
from vfusion3d_jax.inference.sample import OrbitSampler
from vfusion3d_jax.train import metrics

RENDERED, CURATED, RANDOM, LRM = "rendered", "curated", "random", "lrm"


def split_views(num_views: int, source_view: int) -> tuple[list[int], list[int]]:
    """(input pool, targets) of an orbit: the views at even offsets from the source (the source
    first, in orbit order) and those at odd offsets."""
    offsets = [(source_view + offset) % num_views for offset in range(num_views)]
    return offsets[0::2], offsets[1::2]


def spread(pool: list[int], count: int) -> list[int]:
    """`count` views of the pool (in orbit order, the source first) spread evenly around it, the
    source always first."""
    if not 1 <= count <= len(pool):
        raise errors.InvalidConfigValueError(
            f"{count} input views do not fit an input pool of {len(pool)} (the orbit's views at even offsets from "
            f"the source; the odd ones are the targets): render orbits with more views or ask for fewer")
    return [pool[int(i)] for i in np.floor(np.arange(count) * len(pool) / count)]


@dataclasses.dataclass(frozen=True)
class Candidates:
    """One object's generated candidate views, their scores, and the orbit they were made for."""

    pool: flexiview.CandidatePool
    scores: np.ndarray  # (K,) epipolar consistency with the source
    source_camera: np.ndarray  # (25,) the source view's render camera, canonical


def view_count_tasks(pattern: str, counts: list[int], *, source_view: int, view_size: int, resolution: int | None,
                     max_objects: int | None) -> dict[int, list[OrbitTask]]:
    """{k: the tasks of every orbit with k rendered input views}; each orbit decoded and prepared
    once, with its whole input pool, of which each count takes its spread."""
    tasks: dict[int, list[OrbitTask]] = {k: [] for k in counts}
    for shard in expand_paths(pattern):
        for record in iterate_records(shard):
            if max_objects is not None and len(tasks[counts[0]]) >= max_objects:
                return tasks
            orbit = decode_orbit(record)
            pool, targets = split_views(orbit["num_views"], source_view)
            task = evaluate.orbit_task(orbit, source_view=source_view, source_size=view_size, resolution=resolution,
                                       target_views=targets, input_views=pool[1:])
            for k in counts:
                chosen = spread(list(range(len(pool))), k)  # positions in the pool, the source first
                tasks[k].append(dataclasses.replace(task, input_images=task.input_images[chosen],
                                                    input_cameras=task.input_cameras[chosen]))
    return tasks


def generated_candidates(reconstructor: FlexReconstructor, sampler: OrbitSampler, task: OrbitTask,
                         config: ml_collections.ConfigDict) -> Candidates:
    """The task's candidate views from its source view, with the cameras of an orbit at the
    source's own elevation, distance and focal length (in the task's canonical frame), scored."""
    source = task.input_cameras[0]
    radius, focal = float(np.linalg.norm(source[:12].reshape(3, 4)[:, 3])), float(source[12])
    orbit_cameras = flexiview.orbit_cameras(sampler.num_frames, task.elevation_deg, radius, focal)
    small = flexiview.resize_views(task.source_image[None], sampler.resolution)[0]
    pool = flexiview.generate_candidates(sampler, small, config.num_candidate_orbits, config.candidate_seed,
                                         reconstructor.view_size, task.elevation_deg, orbit_cameras)
    source_camera = orbit_cameras[1][0]
    scores, _ = flexiview.consistency_scores(reconstructor, task.source_image, pool, source_camera)
    return Candidates(pool, scores, source_camera)


def with_generated_inputs(task: OrbitTask, candidates: Candidates, count: int, choice: str, seed: int) -> OrbitTask:
    """The task with the source and `count` − 1 of its candidates as inputs: `curated` (as `infer`
    chooses) or `random` (seeded by `seed` and the object)."""
    pool, others = candidates.pool, count - 1
    if choice == CURATED:
        chosen = view_selection.select_views(pool.render_cameras, candidates.scores, others,
                                             reference_camera=candidates.source_camera)
    else:
        rng = np.random.default_rng([seed, zlib.crc32(task.object_id.encode("utf-8"))])
        chosen = rng.choice(len(pool.images), size=min(others, len(pool.images)), replace=False)
    return dataclasses.replace(task, input_images=np.concatenate([task.input_images[:1], pool.images[chosen]]),
                               input_cameras=np.concatenate([task.input_cameras[:1], pool.source_cameras[chosen]]))


def flexrm_predictor(reconstructor: FlexReconstructor, config: ml_collections.ConfigDict):
    """`evaluate`'s predictor for FlexRM: each task's Gaussians from its input views; with
    `config.swap_group` > 1 each task's targets are rendered from every Gaussian set of its group."""

    def predict(tasks: list[OrbitTask]) -> list[Prediction]:
        gaussians = [reconstructor.gaussians(task.input_images, task.input_cameras) for task in tasks]
        swap = config.swap_group > 1 and len(tasks) > 1
        predictions = []
        for index, task in enumerate(tasks):
            sources = gaussians if swap else [gaussians[index]]
            renders = [reconstructor.render(g, task.target_cameras, task.target_images.shape[1], with_opacity=True)
                       for g in sources]
            images, opacity = np.stack([r[0] for r in renders]), np.stack([r[1] for r in renders])
            own = index if swap else 0
            predictions.append(Prediction(images[own], opacity[own], *((None, None, images, opacity) if swap else ())))
        return predictions

    return predict


def evaluate_view_counts(checkpoint: str, data: str, workdir: str | os.PathLike,
                         config: ml_collections.ConfigDict) -> dict:
    """Every run (inputs × view count) of a FlexRM checkpoint on `data`; writes and returns the summary."""
    counts = sorted({int(k) for k in np.atleast_1d(config.num_views)})
    reconstructor = FlexReconstructor.from_checkpoint(checkpoint)
    if counts[-1] > reconstructor.view_buckets[-1]:
        raise errors.InvalidConfigValueError(f"FlexRM takes at most {reconstructor.view_buckets[-1]} views, "
                                             f"config.num_views asks for {counts[-1]}")
    tasks = view_count_tasks(data, counts, source_view=config.source_view, view_size=reconstructor.view_size,
                             resolution=config.resolution, max_objects=config.max_objects)
    if not tasks[counts[0]]:
        raise ValueError(f"no orbits in {data}")
    runs = [(RENDERED, k, tasks[k]) for k in counts]
    if config.get("diffusion_checkpoint"):
        sampler = OrbitSampler.from_checkpoint(config.diffusion_checkpoint,
                                               load_config("sample.py", batch_size=config.num_candidate_orbits))
        base = tasks[counts[0]]
        candidates = [generated_candidates(reconstructor, sampler, task, config)
                      for task in tqdm.tqdm(base, desc="candidate views", unit="object")]
        for choice in (CURATED, RANDOM):
            runs += [(choice, k, [with_generated_inputs(task, found, k, choice, config.candidate_seed)
                                  for task, found in zip(base, candidates)]) for k in counts if k > 1]
    predictors = {inputs: flexrm_predictor(reconstructor, config) for inputs, _, _ in runs}
    if config.get("lrm_checkpoint"):  # the triplane LRM from the source view, on the same targets
        lrm = Reconstructor.from_checkpoint(config.lrm_checkpoint, config)
        lrm_tasks = view_count_tasks(data, [1], source_view=config.source_view, view_size=lrm.source_size,
                                     resolution=config.resolution, max_objects=config.max_objects)[1]
        runs.insert(0, (LRM, 1, lrm_tasks))
        lrm_config = config.copy_and_resolve_references()
        lrm_config.chamfer = False  # FlexRM's runs have no mesh either
        predictors[LRM] = evaluate.model_predictor(lrm, lrm_config)
    workdir = epath.Path(workdir)
    group = config.swap_group if config.swap_group > 1 else config.batch_size
    lpips_params = metrics.load_lpips_params(metrics.EVAL_LPIPS_NET)
    summary = dict(checkpoint=str(checkpoint), data=data, config=config.to_dict(), runs=[])
    for inputs, count, run_tasks in runs:
        report = evaluate.evaluate_orbits(run_tasks, predictors[inputs], batch_size=group,
                                          lpips_params=lpips_params, keep=config.sheet_views)
        evaluate.write_report(report, workdir / f"{inputs}_{count}_views", sheet_rows=config.sheet_rows,
                              extra=dict(checkpoint=str(checkpoint), data=data, inputs=inputs, num_views=count))
        overall = dict(report["overall"])
        overall["num_target_views"] = overall.pop("num_views")  # `num_views` here is the input views'
        summary["runs"].append(dict(overall, inputs=inputs, num_views=count))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "metrics.json").write_text(json.dumps(summary, indent=2))
    (workdir / "metrics.md").write_text(runs_table(summary["runs"]) + "\n")
    media.write_png(plot_runs(summary["runs"]), workdir / "views.png")
    return summary


_COLUMNS = dict(psnr="PSNR ↑", fg_psnr="fg PSNR ↑", iou="IoU ↑", ssim="SSIM ↑", lpips="LPIPS ↓",
                conditioning_gain="swap gain (dB) ↑", retrieval="retrieval")


def runs_table(runs: list[dict]) -> str:
    """One Markdown row per run: its inputs, view count and overall metrics."""
    columns = [name for name in _COLUMNS if any(name in run for run in runs)]
    lines = ["| inputs | views | " + " | ".join(_COLUMNS[c] for c in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for run in runs:
        cells = ["n/a" if math.isnan(run.get(c, math.nan)) else f"{run[c]:.3f}" for c in columns]
        if "retrieval" in run and "retrieval_chance" in run:
            cells[columns.index("retrieval")] += f" ({run['retrieval_chance']:.2f})"
        lines.append(f"| {run['inputs']} | {run['num_views']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_runs(runs: list[dict]) -> np.ndarray:
    """PSNR and foreground PSNR against the number of input views, one line per kind of inputs."""
    charts = []
    for metric, title in (("psnr", "PSNR (dB), higher is better"), ("fg_psnr", "foreground PSNR (dB)")):
        series = {inputs: [(run["num_views"], run.get(metric, math.nan)) for run in runs if run["inputs"] == inputs]
                  for inputs in (RENDERED, CURATED, RANDOM, LRM)}
        charts.append(visualize.line_chart({name: points for name, points in series.items() if points},
                                           title=title, x_label="input views", log2_x=True))
    return np.concatenate(charts, axis=1)
