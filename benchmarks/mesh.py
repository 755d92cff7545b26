"""Mesh export time: a 512^3 density grid, dense against coarse-to-fine, on a realistic field.

The field is the project's triplane decoder (official shape: planes 3 x 80 x 64 x 64, MLP
240 -> 64 -> 64 -> 64 -> 4, ReLU, density softplus(sigma - 1)) with random planes and weights,
evaluated through the renderer's own path (`plane_table` + `decode_points`). A random triplane
alone rarely has a closed surface, so a sphere term is added to the raw sigma: the object is a
ball of radius ~0.7 whose surface the triplane noise makes wavy, as large as a typical object in
the [-1, 1]^3 box. Colours are the decoder's rgb.

Dense 512^3 (134M decoder evaluations) is timed only when its estimate, extrapolated from the
measured dense throughput at --probe-resolution, fits in --dense-budget-s; otherwise the estimate is
printed. A dense/coarse-to-fine comparison of the inside/outside grids at --check-resolution
verifies that the two give the same surface on this field.

  python benchmarks/mesh.py                       # 512^3, median of 3 coarse-to-fine runs
  python benchmarks/mesh.py --repeats 1 --dense-budget-s 0
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shlex
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vfusion3d_jax.rendering import mesh as mesh_lib
from vfusion3d_jax.rendering.triplane import (TriplaneDecoder, activate_density, activate_rgb,
                                              decode_points, plane_table)

CHANNELS, PLANE_SIZE, HIDDEN = 80, 64, 64
OBJECT_RADIUS = 0.7
SPHERE_SLOPE = 8.0  # raw sigma per unit of distance to the sphere
# softplus(raw - 1) = 1 at raw = 1 + log(e - 1): the sphere's surface sits exactly on the level.
LEVEL_RAW_SIGMA = 1 + float(np.log(np.e - 1))


def make_fields(seed: int = 0):
    """(density_fn, color_fn) of a random triplane object, as closures like the LRM's."""
    decoder = TriplaneDecoder(CHANNELS, HIDDEN, rngs=nnx.Rngs(seed))
    planes = jax.random.normal(jax.random.key(seed), (3, CHANNELS, PLANE_SIZE, PLANE_SIZE))
    table = plane_table(decoder.project_planes(planes))

    def raw_outputs(points):
        return decode_points(decoder, table, points)

    # Centre the random decoder's sigma so that the noise perturbs the sphere instead of moving it.
    probe = jax.random.uniform(jax.random.key(seed + 1), (65536, 3), minval=-1, maxval=1)
    sigma_offset = jnp.mean(raw_outputs(probe)[:, 0])

    def density_fn(points):
        sphere = SPHERE_SLOPE * (OBJECT_RADIUS - jnp.linalg.norm(points, axis=-1))
        return activate_density(raw_outputs(points)[:, 0] - sigma_offset + sphere + LEVEL_RAW_SIGMA)

    def color_fn(points):
        return activate_rgb(raw_outputs(points)[:, 1:])

    return density_fn, color_fn


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--coarse-resolution", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=mesh_lib.DEFAULT_BLOCK_SIZE)
    parser.add_argument("--chunk-size", type=int, default=mesh_lib.DEFAULT_CHUNK_SIZE)
    parser.add_argument("--repeats", type=int, default=3, help="coarse-to-fine runs; the median is reported")
    parser.add_argument("--probe-resolution", type=int, default=128, help="dense grid timed to estimate dense cost")
    parser.add_argument("--check-resolution", type=int, default=256, help="dense = coarse-to-fine check; 0 skips")
    parser.add_argument("--dense-budget-s", type=float, default=300.0)
    args = parser.parse_args()
    grid_options = dict(block_size=args.block_size, chunk_size=args.chunk_size)
    density_fn, color_fn = make_fields()

    # Dense throughput. Every grid call compiles its own evaluator, as every extraction does, so all
    # timings include one compilation (~0.5 s here); the first call also pays JAX's start-up.
    mesh_lib.density_grid(density_fn, args.probe_resolution, **grid_options)
    probe, probe_seconds = timed(lambda: mesh_lib.density_grid(density_fn, args.probe_resolution, **grid_options))
    rate = probe.num_evaluations / probe_seconds
    print(f"dense {args.probe_resolution}^3: {probe.num_evaluations} evaluations in {probe_seconds:.1f} s "
          f"= {rate / 1e6:.2f} M/s (compilation included)", flush=True)

    if args.check_resolution:
        dense = mesh_lib.density_grid(density_fn, args.check_resolution, **grid_options).values
        sparse = mesh_lib.density_grid_coarse_to_fine(
            density_fn, args.check_resolution, coarse_resolution=args.coarse_resolution, **grid_options)
        mismatched = (dense > 1.0) != (sparse.values > 1.0)
        # Misses are specks and bubbles the coarse grids cannot see: their density stays near the level.
        closeness = f", all within {np.abs(dense[mismatched] - 1.0).max():.3f} of the level" if mismatched.any() else ""
        print(f"check {args.check_resolution}^3: {mismatched.sum()} of {dense.size} points differ in inside/outside "
              f"between dense and coarse-to-fine{closeness}; {np.mean(dense > 1.0):.1%} of the box is inside",
              flush=True)

    runs = []
    for _ in range(args.repeats):
        grid, grid_seconds = timed(lambda: mesh_lib.density_grid_coarse_to_fine(
            density_fn, args.resolution, coarse_resolution=args.coarse_resolution, **grid_options))
        mesh, mesh_seconds = timed(lambda: mesh_lib.mesh_from_grid(grid, color_fn, chunk_size=args.chunk_size))
        runs.append((grid_seconds, mesh_seconds))
        print(f"coarse-to-fine {args.resolution}^3: grid {grid_seconds:.1f} s, marching cubes + colours "
              f"{mesh_seconds:.1f} s; {grid.num_evaluations} evaluations; {len(mesh.vertices)} vertices, "
              f"watertight {mesh.is_watertight}", flush=True)
    sparse_grid_seconds = statistics.median(run[0] for run in runs)
    mesh_seconds = statistics.median(run[1] for run in runs)

    dense_evaluations = (math.ceil(args.resolution / args.block_size) * args.block_size) ** 3
    estimate = dense_evaluations / rate
    if estimate <= args.dense_budget_s:
        _, dense_seconds = timed(lambda: mesh_lib.density_grid(density_fn, args.resolution, **grid_options))
        dense_text = f"{dense_seconds:.1f} s (1 run)"
    else:
        dense_seconds = estimate
        dense_text = f"≈{estimate:.0f} s (estimated from {args.probe_resolution}^3, not run)"
    print(f"dense {args.resolution}^3 grid: {dense_text}", flush=True)

    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {jax.devices()[0].platform}"
    command = shlex.join(["python", "benchmarks/mesh.py", *sys.argv[1:]])
    schedule = "→".join(map(str, mesh_lib.grid_schedule(args.resolution, args.coarse_resolution)))
    print()
    print("| date | machine | command | grid | dense grid | coarse-to-fine grid | field evaluations | "
          "marching cubes + colours | speed-up (grid) |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {datetime.date.today()} | {machine} | `{command}` | {args.resolution}³ ({schedule}), "
          f"blocks {args.block_size}³ | {dense_text} | {sparse_grid_seconds:.1f} s (median of {args.repeats}) | "
          f"{grid.num_evaluations / 1e6:.1f}M vs {dense_evaluations / 1e6:.0f}M | {mesh_seconds:.1f} s | "
          f"{dense_seconds / sparse_grid_seconds:.0f}× |")


if __name__ == "__main__":
    main()
