"""Renderer throughput: ray samples per second, forward and forward+backward, and peak memory.

Cases (official sizes: triplane 3 x 80 x 64 x 64, 64 coarse + 64 importance samples, random draws):
  inference  1 object, one 64x64 view
  training   2 objects x 4 views, a 64x64 patch each (of a 128x128 render, one random patch start)
Forward+backward differentiates a loss of rgb and opacity w.r.t. the planes and decoder parameters.
The script also measures this machine's float32 matmul rate (best of several runs of a 2048^2
matmul) and reports the decoder MLP's floating point work per sample and the fraction of that
rate the renderer's MLP reaches.

The comparison with the official PyTorch renderer is measured in the same run: with
`--official=PATH` (a checkout of facebookresearch/vfusion3d) and torch installed (the
`reference` extra), the official `TriplaneSynthesizer` (its ray sampler and `ImportanceRenderer`)
renders the same cases with the same decoder weights and planes in this process. Both are first
run with deterministic draws and must agree (max |difference| printed; the run stops if it exceeds
--tolerance); then both are timed with random draws, taking turns call by call so that load
from other jobs falls on both alike (median of --repeats after a warm-up), and the ratio is
printed. Without --official, the official numbers are the typed-in fallback below, labelled as such.

  python benchmarks/renderer.py                          # median of 5 runs per measurement
  python benchmarks/renderer.py --official=PATH          # side by side with the official checkout at PATH
  python benchmarks/renderer.py --repeats 3 --cases inference --chunk-size 512 --mlp-dtype bfloat16
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import resource
import shlex
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import official
from vfusion3d_jax import cameras as cams
from vfusion3d_jax.rendering import RenderOptions, render_views

# Fallback only, used without --official: the official PyTorch renderer's median samples/s typed in
# from a separate run (2026-11-25, this 2-core CPU, torch 2.13 CPU, 2 threads), not measured here.
TYPED_OFFICIAL = {("inference", "forward"): 530e3, ("inference", "forward+backward"): 237e3,
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


def matmul_rate(repeats: int, size: int = 2048) -> float:
    """Float32 rate of a large square matmul (best of `repeats`: the machine may be shared)."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    return 2 * size**3 / official.time_interleaved([lambda: jax.block_until_ready(matmul(a))], repeats)[0][1]


def make_case(name: str):
    """Planes (N, 3, C, 64, 64), cameras (N, M, 25), resolution, crop size and crop start (y, x) of a case.

    The official synthesizer takes one patch start per call, so all views of the training case
    share one random start (the cost does not depend on where the patch is).
    """
    rng = np.random.default_rng(0)
    intrinsics = cams.intrinsics_matrix(*cams.DEFAULT_INTRINSICS)
    if name == "inference":
        num_objects, num_views, resolution, crop, crop_start = 1, 1, 64, None, None
    else:
        num_objects, num_views, resolution, crop = 2, 4, 128, 64
        crop_start = tuple(int(v) for v in rng.integers(0, resolution - crop + 1, 2))
    azimuths = rng.uniform(0, 360, (num_objects, num_views))
    elevations = rng.uniform(-10, 40, (num_objects, num_views))
    cameras = cams.render_camera(cams.orbit_cam2world(azimuths, elevations, cams.RENDER_RADIUS), intrinsics)
    planes = 0.5 * rng.standard_normal((num_objects, 3, CHANNELS, PLANE_SIZE, PLANE_SIZE)).astype(np.float32)
    return planes, np.asarray(cameras, np.float32), resolution, crop, crop_start


def compiled_temp_bytes(jitted, *args) -> int:
    return jitted.lower(*args).compile().memory_analysis().temp_size_in_bytes


class OfficialCase:
    """The official synthesizer on one case: forward (no_grad, as the official inferrer) and forward+backward."""

    def __init__(self, reference, weights, planes, cameras, resolution, crop, crop_start, samples_per_ray):
        self.torch, synthesizer = reference
        self.module = official.official_synthesizer(self.torch, synthesizer, weights, CHANNELS, samples_per_ray)
        self.planes = self.torch.from_numpy(planes)
        self.cameras = self.torch.from_numpy(cameras)
        start_y, start_x = crop_start or (0, 0)
        self.arguments = (resolution, crop or resolution, start_x, start_y)

    def render(self, planes=None):
        out = self.module(self.planes if planes is None else planes, self.cameras, *self.arguments)
        # Channels-last, as render_views returns them.
        return {name: out[f"images_{key}"].permute(0, 1, 3, 4, 2)
                for name, key in (("rgb", "rgb"), ("depth", "depth"), ("opacity", "weight"))}

    def forward(self):
        with self.torch.no_grad():
            return self.render()

    def forward_backward(self):
        planes = self.planes.clone().requires_grad_(True)
        self.module.zero_grad(set_to_none=True)
        out = self.render(planes)
        loss = (out["rgb"] ** 2).mean() + out["opacity"].mean()
        loss.backward()
        return loss.item(), planes.grad


def check_agreement(case: OfficialCase, render, params, planes, options: RenderOptions) -> dict[str, float]:
    """Max |official - ours| of rgb, depth and opacity, both with the deterministic draws."""
    deterministic = dataclasses.replace(options, deterministic=True)
    ours = jax.jit(lambda p, x: render(p, x, None, deterministic))(params, planes)
    with official.deterministic_draws(case.torch):
        theirs = case.forward()
    return {name: float(np.max(np.abs(np.asarray(ours[name]) - theirs[name].numpy()))) for name in theirs}


def run_case(name: str, options: RenderOptions, repeats: int, reference, tolerance: float) -> list[dict]:
    planes_np, cameras_np, resolution, crop, crop_start = make_case(name)
    weights = official.decoder_weights(0, CHANNELS)
    decoder = official.project_decoder(weights, CHANNELS)
    graphdef, params = nnx.split(decoder)
    planes, cameras = jnp.asarray(planes_np), jnp.asarray(cameras_np)
    key = jax.random.key(1)
    num_samples = cameras.shape[0] * cameras.shape[1] * (crop or resolution) ** 2 * (
        options.num_coarse + options.num_importance)

    def render(params, planes, key, options=options):
        return render_views(nnx.merge(graphdef, params), planes, cameras, resolution=resolution, crop_size=crop,
                            crop_start=crop_start, options=options, key=key)

    def loss(params, planes, key):
        out = render(params, planes, key)
        return jnp.mean(out["rgb"] ** 2) + jnp.mean(out["opacity"])

    theirs, agreement = None, None
    if reference is not None:
        theirs = OfficialCase(reference, weights, planes_np, cameras_np, resolution, crop, crop_start,
                              options.num_coarse + options.num_importance)
        agreement = check_agreement(theirs, render, params, planes, options)
        print(f"[{name}] official vs this project, deterministic draws, max |difference|: "
              + ", ".join(f"{k} {v:.2e}" for k, v in agreement.items()), flush=True)
        if max(agreement.values()) > tolerance:
            raise SystemExit(f"[{name}] the implementations disagree by more than --tolerance={tolerance}: "
                             "timings would not compare the same computation")

    forward = jax.jit(render)
    backward = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    rows = []
    for mode, fn in (("forward", forward), ("forward+backward", backward)):
        ours = lambda fn=fn: jax.block_until_ready(fn(params, planes, key))  # noqa: E731
        if theirs is not None:
            official_fn = theirs.forward if mode == "forward" else theirs.forward_backward
            (seconds, best), (official_seconds, _) = official.time_interleaved([ours, official_fn], repeats)
        else:
            seconds, best = official.time_interleaved([ours], repeats)[0]
        row = {"case": name, "mode": mode, "seconds": seconds, "best": best, "samples_per_s": num_samples / seconds,
               "temp_mib": compiled_temp_bytes(fn, params, planes, key) / 2**20, "agreement": agreement}
        if theirs is not None:
            row["official_seconds"] = official_seconds
            row["official_samples_per_s"] = num_samples / official_seconds
            row["official_source"] = "measured"
        else:
            row["official_samples_per_s"] = TYPED_OFFICIAL[(name, mode)]
            row["official_seconds"] = num_samples / row["official_samples_per_s"]
            row["official_source"] = "typed fallback"
        row["ratio"] = row["samples_per_s"] / row["official_samples_per_s"]
        print(f"[{name}] {mode}: this project {seconds:.3f} s, official {row['official_seconds']:.3f} s "
              f"({row['official_source']}), ratio {row['ratio']:.1f}x", flush=True)
        rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-size", type=int, default=RenderOptions.chunk_size)
    parser.add_argument("--mlp-dtype", default=None, choices=[None, "float32", "bfloat16"])
    parser.add_argument("--inverse-cdf", default="auto", choices=["auto", "gather", "compare"])
    parser.add_argument("--cases", default="inference,training")
    parser.add_argument("--official", default=None,
                        help="checkout of facebookresearch/vfusion3d: time the official renderer in this run (needs torch)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest |official - ours| accepted in the deterministic check before timing")
    args = parser.parse_args()
    options = RenderOptions(chunk_size=args.chunk_size, mlp_dtype=args.mlp_dtype, inverse_cdf=args.inverse_cdf)
    try:
        reference = official.load(args.official) if args.official else None
    except official.OfficialUnavailable as error:
        parser.error(str(error))
    load_before = official.load_average()

    rows = [row for name in args.cases.split(",")
            for row in run_case(name, options, args.repeats, reference, args.tolerance)]
    peak_rate = matmul_rate(2 * args.repeats)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].device_kind}, jax {jax.__version__}"
    command = shlex.join(["python", "benchmarks/renderer.py", *sys.argv[1:]])
    baseline = (f"official measured in this run ({official.describe_torch(reference[0])})" if reference else
                "official: TYPED FALLBACK from a 2026-11-25 run, not measured here (pass --official=PATH)")
    print(f"\ndate: {datetime.date.today()}; machine: {machine}; command: `{command}`; {baseline}")
    print(f"{load_before} at the start, {official.load_average()} at the end")
    print(f"float32 matmul 2048^2: {peak_rate / 1e9:.0f} GFLOP/s. Decoder MLP per sample: {OFFICIAL_MLP_FLOPS} FLOPs "
          f"official (240-64-64-64-4), {EXECUTED_MLP_FLOPS} executed (first layer folded into the planes). "
          f"Peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB.\n")
    print("| case | pass | this project median s (best) | samples/s | official median s | official samples/s | "
          "ratio | MLP GFLOP/s executed (% of matmul) | compiled temp MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        flops = row["samples_per_s"] * EXECUTED_MLP_FLOPS * MLP_PASSES[row["mode"]]
        source = "" if row["official_source"] == "measured" else " (typed fallback)"
        print(f"| {row['case']} | {row['mode']} | {row['seconds']:.3f} ({row['best']:.3f}) | "
              f"{row['samples_per_s'] / 1e6:.2f}M | {row['official_seconds']:.3f}{source} | "
              f"{row['official_samples_per_s'] / 1e6:.3f}M{source} | {row['ratio']:.1f}x | "
              f"{flops / 1e9:.0f} ({100 * flops / peak_rate:.0f}%) | {row['temp_mib']:.0f} |")


if __name__ == "__main__":
    main()
