"""Renderer throughput: ray samples per second, forward and forward+backward, and peak memory.

Cases (official sizes: triplane 3 x 80 x 64 x 64, 64 coarse + 64 importance samples, random draws):
  inference  1 object, one 64x64 view
  training   2 objects x 4 views, a 64x64 patch each (of a 128x128 render, random patch starts)
Forward+backward differentiates a loss of rgb and opacity w.r.t. the planes and decoder parameters.
The script also measures this machine's float32 matmul rate (best of several runs of a 2048^2
matmul) and reports the decoder MLP's floating point work per sample and the fraction of that
rate the renderer's MLP reaches. Baselines: the official PyTorch renderer on the same machine.

  python benchmarks/renderer.py                          # median of 5 runs per measurement
  python benchmarks/renderer.py --repeats 3 --cases inference --chunk-size 512 --mlp-dtype bfloat16
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vfusion3d_jax import cameras as cams
from vfusion3d_jax.rendering import RenderOptions, TriplaneDecoder, render_views

# Official PyTorch renderer on this machine (torch 2.13 CPU, 2 threads), median samples/s.
BASELINE = {("inference", "forward"): 530e3, ("inference", "forward+backward"): 237e3,
            ("training", "forward"): 433e3, ("training", "forward+backward"): 163e3}
CHANNELS, PLANE_SIZE, HIDDEN = 80, 64, 64
# Decoder 240 -> 64 -> 64 -> 64 -> 4, 2 FLOPs per multiply-add: the official work per sample.
OFFICIAL_MLP_FLOPS = 2 * (3 * CHANNELS * HIDDEN + 2 * HIDDEN * HIDDEN + HIDDEN * 4)
# This implementation folds the first layer into the planes (once per render), leaving the
# three 64-wide layers per sample.
EXECUTED_MLP_FLOPS = 2 * (2 * HIDDEN * HIDDEN + HIDDEN * 4)
# Matmul passes per sample: forward only; or forward, its recomputation (remat) and the two
# backward products (input and weight gradients).
MLP_PASSES = {"forward": 1, "forward+backward": 4}


def time_runs(fn, repeats: int) -> tuple[float, float]:
    """(median, best) wall time of `repeats` runs after a warm-up (compilation) run."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def matmul_rate(repeats: int, size: int = 2048) -> float:
    """Float32 rate of a large square matmul (best of `repeats`: the machine may be shared)."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    return 2 * size**3 / time_runs(lambda: matmul(a), repeats)[1]


def make_case(name: str):
    """Planes (N, 3, C, 64, 64), cameras (N, M, 25), resolution, crop size and crop starts of a case."""
    rng = np.random.default_rng(0)
    intrinsics = cams.intrinsics_matrix(*cams.DEFAULT_INTRINSICS)
    if name == "inference":
        num_objects, num_views, resolution, crop, crop_start = 1, 1, 64, None, None
    else:
        num_objects, num_views, resolution, crop = 2, 4, 128, 64
        crop_start = jnp.asarray(rng.integers(0, resolution - crop + 1, (num_objects, num_views, 2)))
    azimuths = rng.uniform(0, 360, (num_objects, num_views))
    elevations = rng.uniform(-10, 40, (num_objects, num_views))
    cameras = cams.render_camera(cams.orbit_cam2world(azimuths, elevations, cams.RENDER_RADIUS), intrinsics)
    planes = 0.5 * rng.standard_normal((num_objects, 3, CHANNELS, PLANE_SIZE, PLANE_SIZE)).astype(np.float32)
    return jnp.asarray(planes), jnp.asarray(cameras), resolution, crop, crop_start


def compiled_temp_bytes(jitted, *args) -> int:
    return jitted.lower(*args).compile().memory_analysis().temp_size_in_bytes


def run_case(name: str, options: RenderOptions, repeats: int) -> list[dict]:
    planes, cameras, resolution, crop, crop_start = make_case(name)
    decoder = TriplaneDecoder(CHANNELS, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(decoder)
    key = jax.random.key(1)
    num_samples = cameras.shape[0] * cameras.shape[1] * (crop or resolution) ** 2 * (
        options.num_coarse + options.num_importance)

    def render(params, planes, key):
        return render_views(nnx.merge(graphdef, params), planes, cameras, resolution=resolution, crop_size=crop,
                            crop_start=crop_start, options=options, key=key)

    def loss(params, planes, key):
        out = render(params, planes, key)
        return jnp.mean(out["rgb"] ** 2) + jnp.mean(out["opacity"])

    forward = jax.jit(render)
    backward = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    rows = []
    for mode, fn in (("forward", forward), ("forward+backward", backward)):
        seconds, best = time_runs(lambda: fn(params, planes, key), repeats)
        rate = num_samples / seconds
        rows.append({"case": name, "mode": mode, "seconds": seconds, "best": best, "samples_per_s": rate,
                     "ratio": rate / BASELINE[(name, mode)],
                     "temp_mib": compiled_temp_bytes(fn, params, planes, key) / 2**20})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-size", type=int, default=RenderOptions.chunk_size)
    parser.add_argument("--mlp-dtype", default=None, choices=[None, "float32", "bfloat16"])
    parser.add_argument("--inverse-cdf", default="auto", choices=["auto", "gather", "compare"])
    parser.add_argument("--cases", default="inference,training")
    args = parser.parse_args()
    options = RenderOptions(chunk_size=args.chunk_size, mlp_dtype=args.mlp_dtype, inverse_cdf=args.inverse_cdf)

    rows = [row for name in args.cases.split(",") for row in run_case(name, options, args.repeats)]
    peak_rate = matmul_rate(2 * args.repeats)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].device_kind}, jax {jax.__version__}"
    command = "python benchmarks/renderer.py " + " ".join(
        f"--{name.replace('_', '-')}={value}" for name, value in vars(args).items() if value is not None)
    print(f"date: {datetime.date.today()}; machine: {machine}; command: `{command}`")
    print(f"float32 matmul 2048^2: {peak_rate / 1e9:.0f} GFLOP/s. Decoder MLP per sample: {OFFICIAL_MLP_FLOPS} FLOPs "
          f"official (240-64-64-64-4), {EXECUTED_MLP_FLOPS} executed (first layer folded into the planes). "
          f"Peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB.\n")
    print("| case | pass | median s (best) | samples/s | baseline samples/s | ratio | MLP GFLOP/s executed "
          "(% of matmul) | compiled temp MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        flops = row["samples_per_s"] * EXECUTED_MLP_FLOPS * MLP_PASSES[row["mode"]]
        print(f"| {row['case']} | {row['mode']} | {row['seconds']:.3f} ({row['best']:.3f}) | "
              f"{row['samples_per_s'] / 1e6:.2f}M | "
              f"{BASELINE[(row['case'], row['mode'])] / 1e6:.3f}M | {row['ratio']:.1f}x | "
              f"{flops / 1e9:.0f} ({100 * flops / peak_rate:.0f}%) | {row['temp_mib']:.0f} |")


if __name__ == "__main__":
    main()
