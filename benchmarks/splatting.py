"""Gaussian rasteriser speed on this machine: forward and forward+backward per case, and memory.

Cases: N random 3D Gaussians in front of one camera (means uniform in a cube of side 2 whose
centre is 4 units ahead, log-uniform scales of 0.005-0.03, random rotations, opacities and
colours; a 45-degree field of view, so the cube fills most of the image) rendered at S x S
pixels. Each case first measures the capacities the scene needs (pairs and the fullest tile) and
sets `SplatSettings.max_intersections` and `max_per_tile` just above them, so the time is that of
the work the scene needs. Forward+backward differentiates a weighted sum of the colours and
alphas w.r.t. all Gaussian parameters. Printed per case: the median of --repeats runs after a
warm-up (compilation excluded), the intersections used, the fullest tile, XLA's temporary buffer
size of the compiled function and the process's peak resident memory so far.

    python benchmarks/splatting.py                                 # 64k and 256k Gaussians at 128 and 256 px
    python benchmarks/splatting.py --gaussians=4096 --sizes=64 --repeats=3     # a quick check
    python benchmarks/splatting.py --gaussians=65536 --sizes=128 --chunk-size=64 --passes=forward
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from vfusion3d_jax.rendering.splatting import SplatSettings, check_capacity, intersect_tiles, project_gaussians
from vfusion3d_jax.rendering.splatting import rasterize, tile_grid

FIELD_OF_VIEW_DEGREES = 45.0
CAMERA_DISTANCE = 4.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gaussians", default="65536,262144", help="comma-separated Gaussian counts")
    parser.add_argument("--sizes", default="128,256", help="comma-separated image sides in pixels")
    parser.add_argument("--passes", default="forward,forward+backward", help="forward and/or forward+backward")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (median reported)")
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--tile-size", type=int, default=16)
    parser.add_argument("--tiles-per-batch", type=int, default=None, help="SplatSettings.tiles_per_batch")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def random_scene(num_gaussians: int, size: int, seed: int) -> dict[str, jax.Array]:
    """Gaussians in a cube in front of an identity-rotation camera, and the camera."""
    rng = np.random.default_rng(seed)
    means = rng.uniform(-1, 1, (num_gaussians, 3)) + [0, 0, CAMERA_DISTANCE]
    focal = 0.5 * size / np.tan(np.radians(FIELD_OF_VIEW_DEGREES) / 2)
    scene = {
        "means": means,
        "quats": rng.normal(size=(num_gaussians, 4)),
        "scales": np.exp(rng.uniform(np.log(0.005), np.log(0.03), (num_gaussians, 3))),
        "opacities": rng.uniform(0.05, 1.0, num_gaussians),
        "colors": rng.uniform(0, 1, (num_gaussians, 3)),
        "viewmat": np.eye(4),
        "K": np.array([[focal, 0, size / 2], [0, focal, size / 2], [0, 0, 1]]),
    }
    return {key: jnp.asarray(value, jnp.float32) for key, value in scene.items()}


def needed_capacities(scene: dict[str, jax.Array], size: int, tile_size: int) -> tuple[int, int]:
    """(pairs, fullest tile) of the scene, from the projection and a buffer large enough to hold all."""
    projection = project_gaussians(scene["means"], scene["quats"], scene["scales"], scene["viewmat"], scene["K"],
                                   size, size)
    tiles_x, tiles_y = tile_grid(size, size, tile_size)
    pairs = intersect_tiles(projection.means2d, projection.radii, projection.depths, tile_size=tile_size,
                            tiles_x=tiles_x, tiles_y=tiles_y, capacity=1)
    return int(pairs.num_intersections), int(jnp.max(pairs.tile_counts))


def make_function(pass_name: str, size: int, settings: SplatSettings):
    weights = jnp.asarray(np.random.default_rng(1).uniform(size=(size, size, 3)), jnp.float32)

    def render(parameters, viewmat, K):
        return rasterize(*parameters, viewmat, K, size, size, settings=settings)

    if pass_name == "forward":
        def forward(parameters, viewmat, K):
            colors, alphas, info = render(parameters, viewmat, K)
            return colors, alphas, info["overflow"]

        return jax.jit(forward)

    def loss(parameters, viewmat, K):
        colors, alphas, info = render(parameters, viewmat, K)
        return jnp.sum(weights * colors) + jnp.sum(alphas), info["overflow"]

    return jax.jit(jax.grad(loss, has_aux=True))


def time_case(num_gaussians: int, size: int, pass_name: str, args: argparse.Namespace) -> dict:
    scene = random_scene(num_gaussians, size, args.seed)
    pairs, fullest = needed_capacities(scene, size, args.tile_size)
    chunk = args.chunk_size
    settings = SplatSettings(tile_size=args.tile_size, max_intersections=pairs + 1024,
                             max_per_tile=-(-max(fullest, 1) // chunk) * chunk, chunk_size=chunk,
                             tiles_per_batch=args.tiles_per_batch)
    parameters = tuple(scene[key] for key in ("means", "quats", "scales", "opacities", "colors"))
    function = make_function(pass_name, size, settings)
    compiled = function.lower(parameters, scene["viewmat"], scene["K"]).compile()
    temporary_bytes = compiled.memory_analysis().temp_size_in_bytes
    result = jax.block_until_ready(compiled(parameters, scene["viewmat"], scene["K"]))  # warm-up
    check_capacity({"num_intersections": pairs, "max_tile_count": fullest}, settings)
    assert not bool(result[-1]), "the capacities were measured on the same scene"
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(parameters, scene["viewmat"], scene["K"]))
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "pairs": pairs, "fullest": fullest,
            "temporary_gib": temporary_bytes / 2**30,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    args = parse_args()
    print(f"# {platform.processor() or platform.machine()}, {jax.device_count()} x {jax.devices()[0].device_kind}, "
          f"jax {jax.__version__}, chunk_size {args.chunk_size}, tile_size {args.tile_size}, "
          f"tiles_per_batch {args.tiles_per_batch or 'default'}, "
          f"median of {args.repeats}")
    print("| Gaussians | pixels | pass | time (s) | intersections | max per tile | XLA temp (GiB) | peak RSS (GiB) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for num_gaussians in map(int, args.gaussians.split(",")):
        for size in map(int, args.sizes.split(",")):
            for pass_name in args.passes.split(","):
                row = time_case(num_gaussians, size, pass_name, args)
                print(f"| {num_gaussians} | {size}x{size} | {pass_name} | {row['seconds']:.3f} | {row['pairs']} | "
                      f"{row['fullest']} | {row['temporary_gib']:.3f} | {row['peak_rss_gib']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
