"""Does the tiny multi-view diffusion model make orbits? Train it on this CPU, score held-out orbits.

Renders the demo's built-in objects (configs/data.py:demo, with captions) unless --data_dir
has them, trains `configs/mvdiffusion.py:tiny` through the `train` command's code for
--steps steps, then samples every held-out object's orbit from its first frame and caption and
compares it with the true orbit, beside two trivial answers:

    copy   the input view copied to every frame
    mean   the training set's mean orbit (per frame, over all training clips)

Metrics over the generated frames (1 … F−1): PSNR, LPIPS (AlexNet), silhouette IoU (foreground =
any channel darker than 0.9 on white, against the true alpha), and visual-hull consistency: the
silhouettes of all frames carved into a 48³ voxel hull with the known cameras, each frame's
silhouette compared (IoU) with the hull's projection; 1 = silhouettes of one 3D object. Writes
`results.json` and `orbits.png` (per object: truth, each sampler's orbit, copy, mean) under --workdir.

    python benchmarks/mvdiffusion_quality.py --workdir=/tmp/mvd_quality             # ~20 min on 2 cores
    python benchmarks/mvdiffusion_quality.py --workdir=/tmp/q --steps=50 --data_dir=/tmp/q/data   # smoke
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from PIL import Image

from vfusion3d_jax.configs import load_config
from vfusion3d_jax.data import pipeline
from vfusion3d_jax.data.render_assets import render_dataset
from vfusion3d_jax.curation import consistency
from vfusion3d_jax.train import metrics, mvdiffusion_task, trainer

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--data_dir", default=None, help="render-data output with captions (default: <workdir>/data)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--init_strengths", default="1.0",
                        help="comma-separated config.sample.init_strength values, each sampled and scored: 1 starts "
                             "from noise, < 1 from the input view copied to every frame and noised to that level")
    parser.add_argument("--override", action="append", default=[],
                        help="config override FIELD=VALUE of configs/mvdiffusion.py:tiny (repeatable)")
    return parser.parse_args()


def scores(frames: np.ndarray, truth: np.ndarray, true_masks: np.ndarray, render_cameras: np.ndarray,
           lpips_params) -> dict[str, float]:
    """Metrics of one orbit (F, H, W, 3) against the truth, over the generated frames 1 … F−1."""
    generated, target = jnp.asarray(frames[1:]), jnp.asarray(truth[1:])
    masks = metrics.silhouettes(frames)
    return dict(
        psnr=float(jnp.mean(metrics.psnr(generated, target))),
        lpips=float(jnp.mean(metrics.lpips(lpips_params, generated, target))),
        iou=float(np.mean([consistency.iou(m, t > 0.5) for m, t in zip(masks[1:], true_masks[1:, ..., 0])])),
        hull_consistency=float(np.mean(consistency.hull_ious(masks, render_cameras))),
    )


def main() -> None:
    args = parse_args()
    workdir = Path(args.workdir).absolute()
    data_dir = Path(args.data_dir or workdir / "data")
    started = time.perf_counter()
    if not (data_dir / "shards").is_dir():
        render_dataset(load_config("data.py:demo"), str(data_dir), [])
    overrides = dict(data_dir=str(data_dir), train__stages__main__num_steps=args.steps, eval__every=0)
    for item in args.override:
        key, value = item.split("=", 1)
        overrides[key.replace(".", "__")] = json.loads(value) if value[:1] in "[{0123456789-.tfn" else value
    config = load_config("mvdiffusion.py:tiny", **overrides)
    train_started = time.perf_counter()
    state = trainer.train_and_evaluate(config, str(workdir / "model"))
    train_seconds = time.perf_counter() - train_started
    model = nnx.merge(state.model_graphdef, trainer.evaluation_weights(state))  # the EMA, as `sample` uses

    # The training set's mean orbit (frame by frame), from one pass over the training clips.
    train_data = trainer.make_stages(config)[0].data
    train_data.num_epochs, train_data.drop_remainder, train_data.random_hue = 1, False, False
    mean_orbit = np.mean(np.concatenate([batch["clip_images"] for batch in pipeline.make_iterator(train_data)]), 0)

    held_out = mvdiffusion_task.eval_data_config(config)
    held_out.num_epochs, held_out.drop_remainder, held_out.batch_size = 1, False, 1
    strengths = [float(value) for value in args.init_strengths.split(",")]
    samplers = {}
    for strength in strengths:
        strength_config = ml_collections.ConfigDict(config.to_dict())
        strength_config.sample.init_strength = strength
        samplers["sample" if strength == 1 else f"sample from the input, strength {strength:g}"] = jax.jit(
            lambda state, first, pose, caption, noise, c=strength_config: mvdiffusion_task.sample_orbits(
                nnx.merge(nnx.graphdef(model), state), c, first, pose, caption, noise))
    lpips_params = metrics.load_lpips_params(metrics.EVAL_LPIPS_NET)
    results, rows = {name: [] for name in [*samplers, "copy", "mean"]}, []
    for index, batch in enumerate(pipeline.make_iterator(held_out)):
        truth = batch["clip_images"][0]
        noise = jax.random.normal(jax.random.key(config.sample.seed + index), (1,) + truth.shape)
        orbits = {}
        for name, sample in samplers.items():
            sampled = sample(nnx.state(model), jnp.asarray(truth[None, 0] * 2 - 1),
                             jnp.asarray(batch["clip_relative_pose"]), jnp.asarray(batch["caption_bytes"]), noise)
            orbits[name] = np.clip((np.asarray(sampled[0]) + 1) / 2, 0, 1)
        orbits.update(copy=np.broadcast_to(truth[:1], truth.shape), mean=np.concatenate([truth[:1], mean_orbit[1:]]))
        for name, frames in orbits.items():
            results[name].append(scores(frames, truth, batch["clip_masks"][0], batch["clip_cameras"][0], lpips_params))
        rows.append(np.concatenate([np.concatenate(list(frames), axis=1) for frames in [truth, *orbits.values()]]))
    summary = {name: {key: float(np.mean([r[key] for r in values])) for key in values[0]}
               for name, values in results.items()}
    # The true orbits' own hull consistency: the ceiling of the metric.
    truth_hull = float(np.mean([np.mean(consistency.hull_ious(batch["clip_masks"][0, ..., 0] > 0.5,
                                                              batch["clip_cameras"][0]))
                                for batch in pipeline.make_iterator(held_out)]))
    report = dict(steps=args.steps, objects=len(rows), train_seconds=round(train_seconds, 1),
                  total_seconds=round(time.perf_counter() - started, 1), truth_hull_consistency=truth_hull,
                  config=dict(frames=config.data.num_frames, resolution=config.data.clip_resolution,
                              sampler=config.sample.sampler, sample_steps=config.sample.num_steps,
                              init_strengths=strengths,
                              image_guidance=config.sample.image_guidance, text_guidance=config.sample.text_guidance),
                  metrics=summary, per_object=results)
    (workdir / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    Image.fromarray(np.round(np.concatenate(rows) * 255).astype(np.uint8)).save(workdir / "orbits.png")
    print(f"{len(rows)} held-out objects, {args.steps} steps ({train_seconds:.0f} s training, "
          f"{report['total_seconds']:.0f} s in all); true orbits' hull consistency {truth_hull:.3f}")
    print("| orbit | PSNR ↑ | LPIPS ↓ | silhouette IoU ↑ | hull consistency ↑ |\n|---|---|---|---|---|")
    for name, values in summary.items():
        print(f"| {name} | {values['psnr']:.2f} | {values['lpips']:.3f} | {values['iou']:.3f} | "
              f"{values['hull_consistency']:.3f} |")
    print(f"results: {workdir / 'results.json'}, sheet: {workdir / 'orbits.png'}")


if __name__ == "__main__":
    main()
