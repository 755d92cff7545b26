"""Inference (image → 3D) time: image → triplane, → turntable video frames, → mesh, per model variant.

Runs the real inference code, `vfusion3d_jax.inference.reconstruct.Reconstructor` (what `infer`
runs), on an LRM of `configs/lrm.py:<variant>` with random weights (`nnx.Rngs(0)`) and random
input images, on whatever backend JAX has (CPU here; unchanged on a GPU or TPU). The job config
is `configs/infer.py`: source size and ray samples come from the model config (tiny 112 px,
16 + 16 samples; large 512 px, 64 + 64), rendering is deterministic as in `infer`.

    image → triplane   `reconstructor.planes(images (N, S, S, 3))`, N = --batch_size
    → turntable        `reconstructor.render(planes, cameras.turntable_cameras(F), resolution=R,
                       views_per_call=V)`, frames returned as NumPy (so finished)
    → mesh             `reconstructor.mesh(planes[0], resolution=G, threshold=T)`: coarse-to-fine
                       density grid (64³ first), marching cubes, vertex colours

Every stage reports its first call (compilation + one run) and the median of --runs further
calls (image → triplane: at least 2). A turntable's first call renders only V frames (one compiled
call); the compile time shown is that call less V frames at the measured rate. Every mesh call
compiles its own density-grid evaluator (as every `infer` mesh does; the colour evaluator is
compiled once), so a mesh time includes compilation and its median is over all --runs calls.

A random model's density never reaches the official iso-level 1.0 (`mesh` would raise
EmptySurfaceError), so the threshold T is the --threshold_quantile (default: median) of the
density on a --threshold_grid³ grid (`query_grid`), and the output says so. The random field is
noise, so at that level the surface runs through the whole box and coarse-to-fine evaluates
~100% of the grid (a trained model's object: ~10% at 512³, see benchmarks/mesh.py) and marching
cubes makes tens of millions of vertices: mesh times here are a dense-grid worst case (large at
512³: ~35M vertices, ~9 GiB peak memory). When F is below --full_frames (the official 160-frame
turntable), the full turntable's time is extrapolated from the measured seconds per frame and
labelled so.

Defaults (5–10 minutes on 2 CPU cores, by load): tiny, batch 1, source 112², 80 frames × 256² with
16+16 samples (configs/infer.py), 8 views per call, mesh 256³, median of 3; large, batch 1,
source 512², 4 frames × 384² with 64+64 samples at 1, 2 and 4 views per call (one timed run
each), mesh 512³ (one call), image → triplane median of 2.

Per-variant flags take `variant:value` items separated by commas (a bare value applies to every
variant); --views_per_call takes several values per variant separated by `/`, one row each.

    python benchmarks/inference.py                               # tiny and large, 5–10 min on 2 CPU cores
    python benchmarks/inference.py --variants=tiny --runs=5
    python benchmarks/inference.py --variants=large --frames=160 --views_per_call=8 --runs=3   # accelerator

Prints Markdown rows for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import shlex
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx

from vfusion3d_jax import cameras
from vfusion3d_jax.configs import load_config
from vfusion3d_jax.inference.reconstruct import Reconstructor
from vfusion3d_jax.models.lrm import LRM, count_parameters
from vfusion3d_jax.rendering import mesh as mesh_lib
from vfusion3d_jax.rendering.triplane import query_grid

# Per-variant defaults of the per-variant flags (sized for ~10 minutes on 2 CPU cores in all).
DEFAULTS = {
    "frames": {"tiny": "80", "large": "4"},
    "render_size": {"tiny": "256", "large": "384"},
    "views_per_call": {"tiny": "8", "large": "1/2/4"},
    "mesh_resolution": {"tiny": "256", "large": "512"},
    "runs": {"tiny": "3", "large": "1"},
}
FALLBACK = {"frames": "80", "render_size": "256", "views_per_call": "8", "mesh_resolution": "256", "runs": "3"}


def per_variant(spec: str | None, flag: str, variant: str) -> str:
    """The value of a `variant:value,...` flag for `variant` (a bare value applies to all)."""
    value = DEFAULTS[flag].get(variant, FALLBACK[flag])
    for item in (spec or "").split(","):
        name, separator, item_value = item.partition(":")
        if item and not separator:
            value = item
        elif name == variant:
            value = item_value
    return value


def block(tree):
    return jax.block_until_ready(tree)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def first_and_median(fn, runs: int):
    """(result, first call s, median s of `runs` further calls, or None when runs = 0)."""
    result, first = timed(fn)
    times = [timed(fn)[1] for _ in range(runs)]
    return result, first, (statistics.median(times) if times else None)


def benchmark(variant: str, args) -> list[dict]:
    overrides = {} if args.dtype is None else {"model__dtype": args.dtype}
    config = load_config(f"lrm.py:{variant}", **overrides)
    job = load_config("infer.py:infer", batch_size=args.batch_size)
    runs = int(per_variant(args.runs, "runs", variant))
    frames = int(per_variant(args.frames, "frames", variant))
    render_size = int(per_variant(args.render_size, "render_size", variant))
    mesh_resolution = int(per_variant(args.mesh_resolution, "mesh_resolution", variant))
    views_per_call = [int(v) for v in per_variant(args.views_per_call, "views_per_call", variant).split("/")]

    model, init_s = timed(lambda: block(LRM(config.model, rngs=nnx.Rngs(0))))
    reconstructor = Reconstructor(model, config, job)
    options = reconstructor.options
    size = reconstructor.source_size
    print(f"[{variant}] {count_parameters(config.model) / 1e6:.1f}M parameters, compute dtype {config.model.dtype}, "
          f"initialised in {init_s:.1f} s; source {size} px, {options.num_coarse}+{options.num_importance} samples",
          flush=True)
    rows = []
    base = dict(variant=variant, params=count_parameters(config.model), dtype=config.model.dtype)

    # Image → triplane: at least 2 timed calls after the first.
    images = np.random.default_rng(0).uniform(size=(args.batch_size, size, size, 3)).astype(np.float32)
    planes, first, median = first_and_median(lambda: block(reconstructor.planes(images)), max(runs, 2))
    plane_shape = "×".join(map(str, planes.shape[1:]))
    rows.append(dict(base, stage="image → triplane",
                     setting=f"batch {args.batch_size}, source {size}², planes {plane_shape}",
                     first=first, median=median, runs=max(runs, 2), per=None))
    print(f"[{variant}] planes: first {first:.2f} s, median {median:.3f} s", flush=True)

    # → turntable: one row per views_per_call.
    turntable = cameras.turntable_cameras(frames)
    for views in views_per_call:
        views = min(views, frames)
        # First call: compilation + one call of `views` frames (the compiled shape).
        _, first = timed(lambda: reconstructor.render(planes, turntable[:views], resolution=render_size,
                                                      views_per_call=views))
        times = [timed(lambda: reconstructor.render(planes, turntable, resolution=render_size,
                                                    views_per_call=views))[1] for _ in range(runs)]
        median = statistics.median(times)
        per_frame = median / (frames * args.batch_size)
        rows.append(dict(base, stage="→ turntable",
                         setting=f"{frames} frames × {render_size}², {options.num_coarse}+{options.num_importance} "
                                 f"samples, {views} views/call",
                         first=first, median=median, runs=runs, per=per_frame, frames=frames,
                         compile=first - views * args.batch_size * per_frame))
        print(f"[{variant}] turntable {views} views/call: first call ({views} frames) {first:.2f} s, "
              f"{frames} frames {median:.2f} s = {per_frame:.3f} s/frame", flush=True)

    # → mesh, at a threshold where the random field has a surface.
    decoder = reconstructor.model.decoder
    sigma = np.asarray(jax.jit(lambda p: query_grid(decoder, p, args.threshold_grid)["sigma"])(planes[:1]))
    threshold = (float(np.quantile(sigma, args.threshold_quantile)) if args.threshold is None else args.threshold)
    note = (f"threshold {threshold:.4f} = {args.threshold_quantile:g}-quantile of the density on a "
            f"{args.threshold_grid}³ grid (density range {sigma.min():.3f}–{sigma.max():.3f}; official level "
            f"{mesh_lib.DEFAULT_LEVEL:g} {'never crossed' if sigma.max() <= mesh_lib.DEFAULT_LEVEL else 'crossed'})"
            if args.threshold is None else f"threshold {threshold:g} (given)")
    print(f"[{variant}] mesh {note}", flush=True)
    # Every mesh call compiles its grid evaluator, so all `runs` calls (the first included) are alike.
    mesh, first = timed(lambda: reconstructor.mesh(planes[0], resolution=mesh_resolution, threshold=threshold))
    times = [first] + [timed(lambda: reconstructor.mesh(planes[0], resolution=mesh_resolution,
                                                        threshold=threshold))[1] for _ in range(runs - 1)]
    median = statistics.median(times)
    evaluations = mesh.metadata["num_density_evaluations"]
    schedule = "→".join(map(str, mesh_lib.grid_schedule(mesh_resolution, mesh_lib.DEFAULT_COARSE_RESOLUTION)))
    rows.append(dict(base, stage="→ mesh",
                     setting=f"{mesh_resolution}³ ({schedule}), {note}; {evaluations / 1e6:.1f}M evaluations "
                             f"({100 * evaluations / mesh_resolution**3:.0f}% of dense), {len(mesh.vertices):,} "
                             f"vertices",
                     first=first, median=median, runs=len(times), per=None, resolution=mesh_resolution))
    print(f"[{variant}] mesh {mesh_resolution}³: first {first:.1f} s, median {median:.1f} s of {len(times)}; "
          f"{evaluations} evaluations, {len(mesh.vertices)} vertices, {len(mesh.faces)} faces", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="tiny,large", help="comma-separated configs/lrm.py variants")
    parser.add_argument("--batch_size", type=int, default=1, help="images per planes call (and objects rendered)")
    parser.add_argument("--frames", default=None, help="turntable frames (default tiny:80,large:4)")
    parser.add_argument("--render_size", default=None, help="turntable side in px (default tiny:256,large:384)")
    parser.add_argument("--views_per_call", default=None, help="views per render call, '/'-separated "
                        "(default tiny:8,large:1/2/4)")
    parser.add_argument("--mesh_resolution", default=None, help="mesh grid side (default tiny:256,large:512)")
    parser.add_argument("--runs", default=None, help="timed calls after the first one (default tiny:3,large:1; "
                        "image → triplane at least 2; mesh: this many calls in all, the first included)")
    parser.add_argument("--full_frames", type=int, default=160, help="turntable length extrapolated to "
                        "(official 160)")
    parser.add_argument("--threshold", type=float, default=None, help="mesh iso-level (default: a quantile)")
    parser.add_argument("--threshold_quantile", type=float, default=0.5)
    parser.add_argument("--threshold_grid", type=int, default=64)
    parser.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16"],
                        help="override the model's compute dtype (default: the variant's)")
    args = parser.parse_args()

    load_before = os.getloadavg()
    rows = [row for variant in args.variants.split(",") for row in benchmark(variant, args)]
    load_after = os.getloadavg()
    device = jax.devices()[0]
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, {jax.device_count()} × {device.device_kind} "
               f"({jax.default_backend()}), jax {jax.__version__}")
    command = shlex.join(["python", "benchmarks/inference.py", *sys.argv[1:]])
    print(f"\ndate: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {machine}; "
          f"1-min load average {load_before[0]:.1f} before, {load_after[0]:.1f} after; "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB; command: `{command}`\n")
    print("| variant | stage | setting | first call s | median s (runs) | s/frame | official size |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        variant = f"{r['variant']} ({r['params'] / 1e6:.1f}M, {r['dtype']})"
        full_text, per = "", ""
        if r["stage"] == "→ turntable":
            compile_text = f"≈ {r['compile']:.1f}" if r["compile"] > 0 else "lost in run-to-run noise"
            first = f"{r['first']:.2f} (compile {compile_text})"
            full = r["per"] * args.full_frames * args.batch_size
            full_text = (f"{full:.0f} s for {args.full_frames} frames"
                         + (" (extrapolated)" if r["frames"] < args.full_frames else ""))
            per = f"{r['per']:.3f}"
        else:
            first = f"{r['first']:.2f}"
        if r["stage"] == "→ mesh":
            full_text = ("official grid" if r["resolution"] == mesh_lib.DEFAULT_RESOLUTION
                         else f"not measured (official {mesh_lib.DEFAULT_RESOLUTION}³)")
        median = f"{r['median']:.3f} ({r['runs']})"
        print(f"| {variant} | {r['stage']} | {r['setting']} | {first} | {median} | {per} | {full_text} |")


if __name__ == "__main__":
    main()
