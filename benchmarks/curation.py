"""Does the label-free quality score tell good orbits from broken ones? ROC AUC per kind of damage.

Renders `--objects` procedural objects that no built-in training set holds (seed --data_seed,
3 by default; the score's combination was chosen on seed 2; 16 views of 64 px) unless --data_dir
has them, makes each into a "generated-looking" orbit (views over
white, alpha estimated from the background, as `generate` writes) and into five broken copies
(`curation/corruptions.py`: shuffled, a view swapped with another object's, blurred, noised,
mirrored), scores all of them with `curation.quality.QualityScorer` and the LRM of --lrm, and
reports each term's and the score's ROC AUC (good against each kind of broken copy, and
against all of them). Writes `results.json` and `scores.png` (per kind: the score's histogram)
under --workdir.

    python benchmarks/curation.py --lrm=runs/demo/model --workdir=/tmp/curation     # the demo's LRM
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import ml_collections
import numpy as np
from PIL import Image, ImageDraw

from vfusion3d_jax.configs import load_config
from vfusion3d_jax.curation import corruptions, quality
from vfusion3d_jax.data import example, pipeline, tfrecord
from vfusion3d_jax.data.render_assets import render_dataset
from vfusion3d_jax.inference.reconstruct import Reconstructor


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrm", required=True, help="an LRM training run or `convert` output")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--data_dir", default=None, help="orbits to score (default: render them into <workdir>/data)")
    parser.add_argument("--objects", type=int, default=32)
    parser.add_argument("--data_seed", type=int, default=3, help="seed of the procedural objects (2: the design set)")
    parser.add_argument("--resolution", type=int, default=64, help="side at which views are re-rendered and compared")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def histogram_sheet(scores: dict[str, list[float]], path: Path) -> None:
    """One row per kind (good first): ticks of each orbit's score on [0, 1]."""
    width, row = 600, 28
    sheet = Image.new("RGB", (width + 110, row * len(scores)), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (kind, values) in enumerate(scores.items()):
        top = index * row
        draw.text((4, top + 8), kind, fill="black")
        draw.line([(100, top + row // 2), (100 + width, top + row // 2)], fill=(200, 200, 200))
        for value in values:
            x = 100 + int(round(np.clip(value, 0, 1) * width))
            draw.line([(x, top + 4), (x, top + row - 4)], fill=(0, 120, 0) if kind == "good" else (200, 0, 0))
    sheet.save(path)


def main() -> None:
    args = parse_args()
    workdir = Path(args.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data_dir or workdir / "data")
    started = time.perf_counter()
    if not (data_dir / "shards").is_dir():
        render_dataset(load_config("data.py:demo", assets="procedural", num_procedural=args.objects, seed=args.data_seed,
                                   holdout_fraction=0.0, num_surface_points=0), str(data_dir), [])
    orbits = [example.decode_orbit(record) for path in pipeline.expand_paths(str(data_dir / "shards" / "*.tfrecord"))
              for record in tfrecord.iterate_records(path)][:args.objects]
    rng = np.random.default_rng(args.seed)
    sets = {"good": [corruptions.as_generated(orbit) for orbit in orbits]}
    for kind, corrupt in corruptions.CORRUPTIONS.items():
        sets[kind] = [corrupt(orbit, rng, orbits[:index] + orbits[index + 1:]) for index, orbit in enumerate(orbits)]

    scorer = quality.QualityScorer(Reconstructor.from_checkpoint(
        args.lrm, ml_collections.ConfigDict(dict(batch_size=args.batch_size))),
                                   resolution=args.resolution)
    results = {}
    for kind, members in sets.items():
        start = time.perf_counter()
        results[kind] = [terms for i in range(0, len(members), args.batch_size)
                         for terms in scorer.terms(members[i:i + args.batch_size])]
        print(f"{kind}: {len(members)} orbits scored in {time.perf_counter() - start:.0f} s", flush=True)

    names = quality.TERMS + ("quality",)
    # Higher is better for every term but LPIPS.
    sign = {name: -1.0 if name == "lrm_lpips" else 1.0 for name in names}
    auc = {}
    for kind in corruptions.CORRUPTIONS:
        auc[kind] = {name: corruptions.roc_auc([sign[name] * r[name] for r in results["good"]],
                                               [sign[name] * r[name] for r in results[kind]]) for name in names}
    broken = [r for kind in corruptions.CORRUPTIONS for r in results[kind]]
    auc["all broken"] = {name: corruptions.roc_auc([sign[name] * r[name] for r in results["good"]],
                                                   [sign[name] * r[name] for r in broken]) for name in names}
    report = dict(lrm=args.lrm, objects=len(orbits), data_seed=args.data_seed, resolution=args.resolution,
                  seconds=round(time.perf_counter() - started, 1), auc=auc,
                  mean={kind: {name: float(np.mean([r[name] for r in rs])) for name in names}
                        for kind, rs in results.items()},
                  per_orbit={kind: rs for kind, rs in results.items()})
    (workdir / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    histogram_sheet({kind: [r["quality"] for r in rs] for kind, rs in results.items()}, workdir / "scores.png")
    print(f"{len(orbits)} objects, {report['seconds']:.0f} s; ROC AUC, good against broken:")
    print("| broken copies | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for kind, values in auc.items():
        print(f"| {kind} | " + " | ".join(f"{values[name]:.3f}" for name in names) + " |")
    print("mean score: " + ", ".join(f"{kind} {values['quality']:.3f}" for kind, values in report["mean"].items()))
    print(f"results: {workdir / 'results.json'}, sheet: {workdir / 'scores.png'}")


if __name__ == "__main__":
    main()
