"""The paper's claim in miniature: does more synthetic data make a better LRM? One command, end to end.

VFusion3D's recipe at CPU scale, every step the project's own command code, in order:

1. real 3D data: `render-data` of a few dozen built-in objects (configs/data.py:demo, a third of
   each source), part of them held out for evaluation;
2. the multi-view diffusion model: `train --config=configs/mvdiffusion.py:tiny` on the real
   training orbits only (the generator never sees anything else in 3D);
3. images without 3D: `render-data --config=configs/data.py:image_pool` (one view each of
   procedural objects of another seed: no real object among them);
4. synthetic orbits: `generate` from the pool, max(--multiples) × the real set's size, in shards
   of the real set's size, so the k× set is the first k shards (nested sets);
5. the real-only arm: the LRM (the demo's recipe, configs/demo.py) on real orbits only, then the
   same fine-tuning on real orbits every arm gets;
6. curation: `curate` of the synthetic orbits with the real-only LRM; the curated sets keep the
   orbits scoring above the --curate_keep quantile;
7. one arm per (multiple, curated or not): the same LRM, the same steps, real + synthetic
   sampled in proportion to their sizes, then the same fine-tuning on real orbits;
8. `evaluate` of every arm on the held-out real objects: PSNR, foreground PSNR, silhouette IoU,
   LPIPS, and the input-swap test (conditioning gain, retrieval against its chance level).

Writes under --workdir: one folder per step (`real/`, `diffusion/`, `pool/`, `synthetic/`,
`curated/`, `arms/<arm>/model` and `arms/<arm>/evaluation`), `results.json` (each arm: its data
counts, checkpoint and metrics), `results.md` (the table) and `scaling.png` (held-out metrics
against the synthetic set's size, curated and not). Restarting reuses every finished step.

    python benchmarks/synthetic_scaling.py --workdir=runs/scaling                 # ~55 min on 2 cores
    python benchmarks/synthetic_scaling.py --workdir=/tmp/s --quick               # a smoke run, ~5 min
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vfusion3d_jax.configs import load_config
from vfusion3d_jax.curation.curate import curate, read_scores
from vfusion3d_jax.data import pipeline, tfrecord
from vfusion3d_jax.data.render_assets import render_dataset
from vfusion3d_jax.inference.evaluate import evaluate
from vfusion3d_jax.inference.generate import generate
from vfusion3d_jax.models.convert import checkpoint_step
from vfusion3d_jax.train.trainer import train_and_evaluate

METRICS = ("psnr", "fg_psnr", "iou", "lpips", "conditioning_gain", "retrieval")
PLOTTED = ("fg_psnr", "iou", "conditioning_gain")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--objects_per_source", type=int, default=16, help="real objects of each built-in source")
    parser.add_argument("--holdout_fraction", type=float, default=0.3)
    parser.add_argument("--multiples", default="1,4",
                        help="synthetic set sizes, in real-set sizes (each adds two arms, ~6 min each)")
    parser.add_argument("--diffusion_steps", type=int, default=600)
    parser.add_argument("--lrm_steps", type=int, default=1000,
                        help="steps on the mixture, every arm (the demo's budget)")
    parser.add_argument("--finetune_steps", type=int, default=100, help="steps on real orbits only, every arm")
    parser.add_argument("--curate_keep", type=float, default=0.6, help="fraction of synthetic orbits curation keeps")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny sets, a few steps")
    return parser.parse_args()


def done(path: Path) -> bool:
    return (path / "checkpoints").is_dir() and any((path / "checkpoints").iterdir())


def record_count(glob: str) -> int:
    return sum(len(tfrecord.read_index(path)) for path in pipeline.expand_paths(glob))


def lrm_config(data_dir: Path, steps: int, finetune_steps: int, synthetic_glob: str | None = None,
               synthetic_weight: float = 0.0, real_weight: float = 1.0, quality_min: float | None = None):
    """The demo's LRM recipe on the real orbits (and a synthetic set): the same for every arm."""
    config = load_config("demo.py").lrm
    config.data_dir = str(data_dir)
    for stage, count in (("low_res", steps), ("high_res", 0), ("finetune", finetune_steps)):
        config.train.stages[stage].num_steps = count
    config.train.stages.low_res.mixture.rendered = real_weight
    config.train.stages.low_res.mixture.synthetic = synthetic_weight if synthetic_glob else 0.0
    config.data.mixture.synthetic.glob = synthetic_glob
    config.data.mixture.synthetic.quality_min = quality_min
    config.train.checkpoint_every = steps + finetune_steps
    config.eval.every = 0
    return config


def line_plot(series: dict[str, dict[str, list[tuple[float, float]]]], path: Path) -> None:
    """One panel per metric: value against synthetic multiple, a line per kind (curated, uncurated)."""
    panel_w, panel_h, margin = 260, 200, 40
    colours = {"uncurated": (200, 60, 40), "curated": (30, 110, 200)}
    sheet = Image.new("RGB", (panel_w * len(series), panel_h + 30), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (metric, lines) in enumerate(series.items()):
        left = index * panel_w
        points = [p for line in lines.values() for p in line]
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        x_max, y_min, y_max = max(xs) or 1.0, min(ys), max(ys)
        y_min, y_max = (y_min - 0.5, y_max + 0.5) if y_max - y_min < 1e-9 else (y_min, y_max)

        def at(x: float, y: float) -> tuple[int, int]:
            return (int(left + margin + x / x_max * (panel_w - 2 * margin)),
                    int(panel_h - margin + 10 - (y - y_min) / (y_max - y_min) * (panel_h - 2 * margin)))

        draw.text((left + margin, 4), metric, fill="black")
        draw.line([at(0, y_min), at(x_max, y_min)], fill="grey")
        draw.line([at(0, y_min), at(0, y_max)], fill="grey")
        draw.text((left + 2, at(0, y_max)[1] - 5), f"{y_max:.2f}", fill="grey")
        draw.text((left + 2, at(0, y_min)[1] - 5), f"{y_min:.2f}", fill="grey")
        for x in sorted(set(xs)):
            draw.text((at(x, y_min)[0] - 4, at(x, y_min)[1] + 4), f"{x:g}x", fill="grey")
        for kind, line in lines.items():
            line = sorted(line)
            draw.line([at(*p) for p in line], fill=colours[kind], width=2)
            for p in line:
                x, y = at(*p)
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colours[kind])
        draw.text((left + margin, panel_h + 10), "red: uncurated, blue: curated", fill="black")
    sheet.save(path)


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    workdir = Path(args.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    multiples = [int(m) for m in args.multiples.split(",")]
    if args.quick:
        args.objects_per_source, args.diffusion_steps, args.lrm_steps, args.finetune_steps = 3, 4, 4, 2
        multiples = [1, 2]
    timings = {}

    def step(name: str):
        timings[name] = time.perf_counter()
        print(f"== {name}", flush=True)

    step("real data")
    real = workdir / "real"
    if not (real / "summary.json").exists():
        render_dataset(load_config("data.py:demo", max_assets_per_source=args.objects_per_source,
                                   num_procedural=args.objects_per_source, holdout_fraction=args.holdout_fraction,
                                   resolution=32 if args.quick else 64), str(real), [])
    real_train = record_count(str(real / "shards" / "train-*.tfrecord"))
    holdout = str(real / "shards" / "holdout-*.tfrecord")

    step("diffusion model")
    diffusion = workdir / "diffusion"
    if not done(diffusion):
        config = load_config("mvdiffusion.py:tiny", data_dir=str(real), eval__every=0,
                             train__stages__main__num_steps=args.diffusion_steps)
        if args.quick:
            config.sample.num_steps = 2
        train_and_evaluate(config, str(diffusion))

    step("image pool")
    pool = workdir / "pool"
    if not (pool / "summary.json").exists():
        render_dataset(load_config("data.py:image_pool", num_procedural=max(multiples) * real_train,
                                   resolution=32 if args.quick else 64), str(pool), [])

    step("synthetic orbits")
    synthetic = workdir / "synthetic"
    generated = generate(str(diffusion), synthetic, load_config(
        "generate.py", inputs__orbits=str(pool / "shards" / "*.tfrecord"), shard_size=real_train))
    shards = sorted((synthetic / "shards").glob("synthetic-*.tfrecord"))

    step("real-only arm")
    arms_dir = workdir / "arms"
    arms = [dict(name="real only", multiple=0, curated=False, synthetic=0, config=lrm_config(
        real, args.lrm_steps, args.finetune_steps))]

    def train_arm(arm: dict) -> None:
        folder = arms_dir / arm["name"].replace(" ", "_")
        arm["checkpoint"] = str(folder / "model")
        if not done(folder / "model"):
            train_and_evaluate(arm.pop("config"), arm["checkpoint"])
        arm.pop("config", None)
        report = evaluate(arm["checkpoint"], holdout, folder / "evaluation",
                          load_config("infer.py:evaluate", chamfer=False, sheet_rows=3))
        arm["metrics"] = {name: report["overall"].get(name) for name in METRICS + ("retrieval_chance",)}
        arm["step"] = checkpoint_step(arm["checkpoint"])

    train_arm(arms[0])

    step("curation")
    curated = workdir / "curated"
    curate(arms[0]["checkpoint"], str(synthetic / "shards" / "*.tfrecord"), curated,
           load_config("curate.py", resolution=32))
    qualities = np.array([row["quality"] for path in shards for row in read_scores(curated / "shards" / path.name)])
    threshold = float(np.quantile(qualities, 1.0 - args.curate_keep))

    step("arms")
    for multiple in multiples:
        chosen = shards[:multiple]
        for is_curated in (False, True):
            folder = curated if is_curated else synthetic
            glob = ",".join(str(folder / "shards" / path.name) for path in chosen)
            count = (sum(1 for path in chosen for row in read_scores(curated / "shards" / path.name)
                         if row["quality"] >= threshold) if is_curated else record_count(glob))
            arm = dict(name=f"{multiple}x {'curated' if is_curated else 'uncurated'}", multiple=multiple,
                       curated=is_curated, synthetic=count,
                       config=lrm_config(real, args.lrm_steps, args.finetune_steps, glob, float(count),
                                         float(real_train), threshold if is_curated else None))
            train_arm(arm)
            arms.append(arm)
            print(f"   {arm['name']}: {arm['metrics']}", flush=True)

    results = dict(real_train=real_train, holdout=record_count(holdout), multiples=multiples,
                   generated=generated["orbits"], curate_threshold=threshold, curate_keep=args.curate_keep,
                   steps=dict(diffusion=args.diffusion_steps, lrm=args.lrm_steps, finetune=args.finetune_steps),
                   seconds=round(time.perf_counter() - started, 1), arms=arms)
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    header = "| arm | synthetic orbits | " + " | ".join(METRICS) + " |\n" + "|---" * (len(METRICS) + 2) + "|\n"
    rows = "".join(f"| {arm['name']} | {arm['synthetic']} | "
                   + " | ".join(f"{arm['metrics'][m]:.3f}" if arm["metrics"].get(m) is not None else "–"
                                for m in METRICS) + " |\n" for arm in arms)
    (workdir / "results.md").write_text(header + rows)
    series = {metric: {kind: [(0.0, arms[0]["metrics"][metric])] + [
        (arm["multiple"], arm["metrics"][metric]) for arm in arms[1:] if arm["curated"] == (kind == "curated")]
        for kind in ("uncurated", "curated")} for metric in PLOTTED}
    line_plot(series, workdir / "scaling.png")
    print(f"{real_train} real training objects, {results['holdout']} held out; {generated['orbits']} synthetic "
          f"orbits, curation keeps quality >= {threshold:.3f}; {results['seconds']:.0f} s in all")
    print(header + rows, end="")
    print(f"results: {workdir / 'results.json'}, plot: {workdir / 'scaling.png'}")


if __name__ == "__main__":
    main()
