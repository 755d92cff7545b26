"""Views rendered per second by `render-data` on the built-in assets, by workers and resolution.

    .venv/bin/python benchmarks/render_data.py [--runs=3] [--per_source=8] [--workers=1,2] [--resolutions=128,64]

Each run renders a fresh dataset of `per_source` pybullet_data objects, blobs and procedural
objects each (16 views, the builtin config otherwise) through `render_dataset`, workers'
start-up included; a row per (workers, resolution) gives the median views/s of the runs.
Prints Markdown rows for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import tempfile

from absl import logging

from vfusion3d_jax.configs import load_config
from vfusion3d_jax.data.render_assets import render_dataset


def views_per_second(per_source: int, workers: int, resolution: int) -> float:
    config = load_config("data.py:builtin", assets="builtin", max_assets_per_source=per_source,
                         num_procedural=per_source, resolution=resolution, num_workers=workers,
                         shard_size=max(1, per_source // 2), holdout_fraction=0.0)
    with tempfile.TemporaryDirectory(prefix="render_data_bench_") as workdir:
        return render_dataset(config, workdir, [])["views_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--per_source", type=int, default=8)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--resolutions", default="128,64")
    flags = parser.parse_args()
    logging.set_verbosity(logging.WARNING)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    print("| date | machine | command | views/s (median) |")
    print("|---|---|---|---|")
    for resolution in (int(r) for r in flags.resolutions.split(",")):
        for workers in (int(w) for w in flags.workers.split(",")):
            runs = [views_per_second(flags.per_source, workers, resolution) for _ in range(flags.runs)]
            command = (f"render-data builtin, {3 * flags.per_source} assets x 16 views, {resolution} px "
                       f"(supersample 2), {workers} worker(s); runs: {', '.join(f'{r:.1f}' for r in runs)}")
            print(f"| {datetime.date.today()} | {machine} | {command} | {statistics.median(runs):.1f} |", flush=True)


if __name__ == "__main__":
    main()
