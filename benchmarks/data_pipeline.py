"""Throughput of the Grain orbit pipeline: decoded batches (and examples) per second.

Writes synthetic orbit shards to a temporary directory, then times `pipeline.make_iterator`
for each worker count, after warm-up batches (so worker start-up is not counted), and prints
one Markdown row per worker count with the median of the runs:

    .venv/bin/python benchmarks/data_pipeline.py --workers=0,2 --batches=20 --runs=3
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

from vfusion3d_jax.configs import config_module
from vfusion3d_jax.data import example, pipeline, tfrecord

_WORKERS = flags.DEFINE_list("workers", ["0", "2"], "Grain worker counts to time.")
_BATCHES = flags.DEFINE_integer("batches", 20, "Timed batches per run.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed batches before each run.")
_RUNS = flags.DEFINE_integer("runs", 3, "Runs per worker count; the median is reported.")
_ORBITS = flags.DEFINE_integer("orbits", 64, "Synthetic orbits written (over 4 shards).")
_VIEWS = flags.DEFINE_integer("views", 16, "Views per orbit.")
_RESOLUTION = flags.DEFINE_integer("resolution", 128, "Stored image side.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Examples per batch.")
_TARGETS = flags.DEFINE_integer("targets", 4, "Target views per example (plus 1 source view).")
_SOURCE_RESOLUTION = flags.DEFINE_integer("source_resolution", 128, "Encoder input side.")
_PATCH = flags.DEFINE_integer("patch_size", None, "Target patch side; unset = full views.")
_READ_THREADS = flags.DEFINE_integer("read_threads", 8, "Reading threads per process.")


def _write_shards(directory: str) -> str:
    rng = np.random.default_rng(0)
    per_shard = -(-_ORBITS.value // 4)
    for shard in range(4):
        with tfrecord.TFRecordWriter(os.path.join(directory, f"orbits-{shard}.tfrecord")) as writer:
            for _ in range(per_shard):
                orbit = example.random_orbit(rng, num_views=_VIEWS.value, resolution=_RESOLUTION.value)
                writer.write(example.encode_orbit(**orbit))
    return os.path.join(directory, "orbits-*.tfrecord")


def _batches_per_second(glob: str, worker_count: int) -> float:
    config = config_module("common.py").input_config()
    config.mixture.rendered.glob = glob
    config.update(dict(batch_size=_BATCH_SIZE.value, num_target_views=_TARGETS.value, worker_count=worker_count,
                       source_resolution=_SOURCE_RESOLUTION.value, target_resolution=_RESOLUTION.value,
                       patch_size=_PATCH.value, read_threads=_READ_THREADS.value))
    iterator = pipeline.make_iterator(config, shard_index=0, shard_count=1)
    try:
        for _ in range(_WARMUP.value):
            next(iterator)
        start = time.perf_counter()
        for _ in range(_BATCHES.value):
            next(iterator)
        return _BATCHES.value / (time.perf_counter() - start)
    finally:
        iterator.close()


def main(argv: list[str]) -> None:
    del argv
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    command = shlex.join(["python", "benchmarks/data_pipeline.py", *sys.argv[1:]])
    setup = (f"{_VIEWS.value} views of {_RESOLUTION.value}², batch {_BATCH_SIZE.value}, 1 source + {_TARGETS.value} "
             f"targets, source {_SOURCE_RESOLUTION.value}², patch {_PATCH.value or 'none'}")
    with tempfile.TemporaryDirectory() as directory:
        glob = _write_shards(directory)
        print("| date | machine | command | setup | workers | batches/s | examples/s |")
        print("|---|---|---|---|---|---|---|")
        for worker_count in map(int, _WORKERS.value):
            rate = statistics.median(_batches_per_second(glob, worker_count) for _ in range(_RUNS.value))
            print(f"| {datetime.date.today()} | {machine} | `{command}` | {setup} | {worker_count} | "
                  f"{rate:.1f} | {rate * _BATCH_SIZE.value:.0f} |", flush=True)


if __name__ == "__main__":
    app.run(main)
