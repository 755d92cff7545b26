"""FlexRM speed: views → Gaussians on this machine, and the large configuration's size and FLOPs.

For `configs/flexrm.py:tiny` (or --variant), per view-count bucket: the median time of the jitted
forward pass (views → Gaussians; compilation excluded, one compile per bucket) and of the same
followed by one rendered view (`render_gaussians` at the config's render side), batch 1, random
views (the model's cost does not depend on their content; the rasteriser's does, a little).

For `configs/flexrm.py:large`: the Gaussian count and parameter count (shapes only), and the
forward pass's FLOPs from XLA's cost analysis of the compiled program at 1 and 32 views, nothing
allocated. XLA counts a loop body once, so the encoder's and transformer's layer scans are
unrolled and compiled at 1 and 2 layers each: counted = f(1,1) + (E−1)·(f(2,1)−f(1,1)) +
(T−1)·(f(1,2)−f(1,1)), as `benchmarks/sizing.py` counts the LRM. The rasteriser is not counted
(its chunk loops run a data-dependent number of useful steps).

    python benchmarks/flexrm.py                             # tiny at 1, 4, 8, 16, 32 views; large counted
    python benchmarks/flexrm.py --views=1,8 --repeats=3 --skip-large
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mvdiffusion as mvd  # noqa: E402  (its unrolled_layer_scans and flops_of)

from vfusion3d_jax import cameras  # noqa: E402
from vfusion3d_jax.configs import load_config  # noqa: E402
from vfusion3d_jax.models import flexrm  # noqa: E402


def orbit_views(num_views: int, side: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(1, V, 3, S, S) random views and (1, V, 16) cameras of an orbit (azimuth steps of 360/V)."""
    cam2world = cameras.orbit_cam2world(cameras.orbit_azimuths(num_views), 20.0, 2.0)
    intrinsics = cameras.intrinsics_matrix(*cameras.DEFAULT_INTRINSICS)
    views = rng.uniform(0, 1, (1, num_views, 3, side, side)).astype(np.float32)
    return views, cameras.source_camera(cam2world, intrinsics)[None]


def median_seconds(function, repeats: int) -> float:
    jax.block_until_ready(function())  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(function())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_variant(variant: str, view_counts: list[int], repeats: int) -> None:
    config = load_config(f"flexrm.py:{variant}")
    model = flexrm.FlexRM(config.model, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    settings, side = flexrm.splat_settings(config), config.splatting.resolution

    @jax.jit
    def to_gaussians(state, views, view_cameras, mask):
        return nnx.merge(graphdef, state)(views, view_cameras, mask)

    @jax.jit
    def to_image(state, views, view_cameras, mask, render_camera):
        gaussians = nnx.merge(graphdef, state)(views, view_cameras, mask)
        return flexrm.render_gaussians(gaussians, render_camera, side, settings)[0]

    render_camera = jnp.asarray(cameras.turntable_cameras(1, 20.0, 2.0))[None]
    print(f"{variant}: {flexrm.count_parameters(config.model):,} parameters, "
          f"{flexrm.gaussian_count(config.model):,} Gaussians, {config.view_resolution} px views, "
          f"{side} px render; median of {repeats}", flush=True)
    print("| views | views → Gaussians (ms) | + one rendered view (ms) |\n|---|---|---|")
    rng = np.random.default_rng(0)
    for count in view_counts:
        views, view_cameras = orbit_views(count, config.view_resolution, rng)
        padded_views, padded_cameras, mask = flexrm.pad_views(views, view_cameras)
        arguments = (state, jnp.asarray(padded_views), jnp.asarray(padded_cameras), jnp.asarray(mask))
        forward = median_seconds(lambda: to_gaussians(*arguments), repeats)
        with_render = median_seconds(lambda: to_image(*arguments, render_camera), repeats)
        print(f"| {count} | {forward * 1e3:.1f} | {with_render * 1e3:.1f} |", flush=True)


def forward_flops(config, num_views: int) -> float:
    """XLA-counted FLOPs of views → Gaussians for `config.model` (scans unrolled), nothing allocated."""
    with mvd.unrolled_layer_scans():
        abstract = flexrm.abstract_flexrm(config.model)
        graphdef, state = nnx.split(abstract)
        side = config.view_resolution
        shapes = (jax.ShapeDtypeStruct((1, num_views, 3, side, side), jnp.float32),
                  jax.ShapeDtypeStruct((1, num_views, 16), jnp.float32),
                  jax.ShapeDtypeStruct((1, num_views), jnp.bool_))
        forward = jax.jit(lambda state, *inputs: nnx.merge(graphdef, state)(*inputs))
        return mvd.flops_of(forward.lower(state, *shapes).compile())


def count_large(view_counts: list[int]) -> None:
    config = load_config("flexrm.py:large")
    encoder_layers, transformer_layers = config.model.encoder.num_layers, config.model.transformer.num_layers
    print(f"large: {flexrm.count_parameters(config.model):,} parameters, "
          f"{flexrm.gaussian_count(config.model):,} Gaussians, {config.view_resolution} px views")
    print("| views | forward TFLOP (counted) | per encoder layer | per transformer layer |\n|---|---|---|---|")
    for count in view_counts:
        flops = {}
        for depths in ((1, 1), (2, 1), (1, 2)):
            shallow = load_config("flexrm.py:large", model__encoder__num_layers=depths[0],
                                  model__transformer__num_layers=depths[1])
            flops[depths] = forward_flops(shallow, count)
        encoder, transformer = flops[2, 1] - flops[1, 1], flops[1, 2] - flops[1, 1]
        total = flops[1, 1] + (encoder_layers - 1) * encoder + (transformer_layers - 1) * transformer
        print(f"| {count} | {total / 1e12:.2f} | {encoder / 1e12:.3f} | {transformer / 1e12:.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="tiny")
    parser.add_argument("--views", default="1,4,8,16,32", help="view counts to time (padded to their buckets)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--large-views", default="1,32", help="view counts whose large forward FLOPs are counted")
    parser.add_argument("--skip-large", action="store_true")
    args = parser.parse_args()
    print(f"{platform.node()}: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    time_variant(args.variant, [int(v) for v in args.views.split(",")], args.repeats)
    if not args.skip_large:
        count_large([int(v) for v in args.large_views.split(",")])


if __name__ == "__main__":
    main()
