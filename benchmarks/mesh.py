"""Mesh export time: a 512^3 density grid, dense against coarse-to-fine, and against the official code.

The field is a triplane object of the official shape (planes 3 x 80 x 64 x 64, decoder MLP
240 -> 64 -> 64 -> 64 -> 4, ReLU, density softplus(sigma - 1)), evaluated as `Reconstructor.mesh`
does (`query_points` bound with `jax.tree_util.Partial`). Random planes and weights rarely hold a
closed surface, so the object is written into them (`make_object`): channel 0 of each plane holds
a quadratic profile and one hidden unit of the decoder carries their sum to the raw sigma, which
makes a ball of radius ~0.7 (as large as a typical object in the [-1, 1]^3 box); the other 79
random channels make its surface wavy and give the colours. Because the object is nothing but
planes and decoder weights, the official code evaluates exactly the same field.

With `--official=PATH` (a checkout of facebookresearch/vfusion3d; torch and PyMCubes from the
`reference` extra) the official mesh export runs in the same process on the same planes and
weights: the `--export_mesh` branch of its inferrer (`lrm/inferrer.py`: `forward_grid` on the
dense grid, `mcubes.marching_cubes` at 1.0, vertex colours by `forward_points`, a trimesh), timed
against this project's `extract_mesh` (coarse-to-fine), taking turns, median of --official-repeats.
First the two fields are compared on a dense grid (--official-check-resolution: max |difference|
of density and colour), and then the two meshes at --resolution (vertex counts, surface areas,
distance of each vertex to the other mesh's nearest vertex).

Dense 512^3 (134M decoder evaluations) is timed only when its estimate, extrapolated from the
measured dense throughput at --probe-resolution, fits in --dense-budget-s; otherwise the estimate is
printed. A dense/coarse-to-fine comparison of the inside/outside grids at --check-resolution
verifies that the two give the same surface on this field.

  python benchmarks/mesh.py                       # 512^3, median of 3 coarse-to-fine runs
  python benchmarks/mesh.py --repeats 1 --dense-budget-s 0
  python benchmarks/mesh.py --official=PATH --resolution 256 --repeats 0 --dense-budget-s 0 --check-resolution 0
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

import official
from vfusion3d_jax.rendering import mesh as mesh_lib
from vfusion3d_jax.rendering.triplane import query_points

CHANNELS, PLANE_SIZE = 80, 64
OBJECT_RADIUS = 0.7
SPHERE_SLOPE = 8.0  # raw sigma per unit of distance at the ball's surface
WAVE = 0.5  # weight (relative to the profile's 1) of the 237 random channels in the raw sigma
# softplus(raw - 1) = 1 at raw = 1 + log(e - 1): the ball's surface sits exactly on the level.
LEVEL_RAW_SIGMA = 1 + float(np.log(np.e - 1))
RELU_OFFSET = 20.0  # keeps the hidden unit that carries the ball positive everywhere in the box


def make_object(seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Planes (3, C, 64, 64) and official-layout decoder weights whose density is a wavy ball.

    Channel 0 of each plane is a - b (u^2 + v^2) at the texel centres; every axis lies in two of
    the three planes, so their sum is 3a - 2b |x|^2 = K (R^2 - |x|^2) + LEVEL_RAW_SIGMA, which
    crosses the mesh level at |x| = R with slope 2 K R. Hidden unit 0 adds the three channels 0
    (plus WAVE times a random mix of the others) and passes unchanged through the ReLU layers
    to the raw sigma; all other weights stay random. Outside the planes (zero padding) the raw
    sigma goes to 0, below the level.
    """
    rng = np.random.default_rng(seed)
    planes = 0.5 * rng.standard_normal((3, CHANNELS, PLANE_SIZE, PLANE_SIZE)).astype(np.float32)
    k = SPHERE_SLOPE / (2 * OBJECT_RADIUS)
    centres = (np.arange(PLANE_SIZE) + 0.5) / PLANE_SIZE * 2 - 1  # grid_sample's texel centres
    u, v = np.meshgrid(centres, centres, indexing="ij")
    planes[:, 0] = (k * OBJECT_RADIUS**2 + LEVEL_RAW_SIGMA) / 3 - k / 2 * (u**2 + v**2)
    weights = official.decoder_weights(seed, CHANNELS)
    first = weights["net.0.weight"]  # (64, 3C); input index = plane * C + channel
    first[0] = WAVE * rng.standard_normal(first.shape[1]) / np.sqrt(first.shape[1] * 0.25)
    first[0, [0, CHANNELS, 2 * CHANNELS]] = 1.0
    weights["net.0.bias"][0] = RELU_OFFSET
    for name in ("net.2", "net.4", "net.6"):
        weights[f"{name}.weight"][0] = 0.0
        weights[f"{name}.weight"][0, 0] = 1.0
        weights[f"{name}.bias"][0] = 0.0
    weights["net.6.bias"][0] = -RELU_OFFSET
    return planes, weights


def make_fields(planes: np.ndarray, weights: dict[str, np.ndarray]):
    """(density_fn, color_fn) of the object as `Reconstructor.mesh` binds them (Partial of state and planes)."""
    graphdef, state = nnx.split(official.project_decoder(weights, CHANNELS))

    def field(name, state, planes, points):
        return query_points(nnx.merge(graphdef, state), planes, points[None])[name][0]

    def density(state, planes, points):
        return field("sigma", state, planes, points)[:, 0]

    def color(state, planes, points):
        return field("rgb", state, planes, points)

    batched = jnp.asarray(planes)[None]
    return jax.tree_util.Partial(density, state, batched), jax.tree_util.Partial(color, state, batched)


def official_mesh(torch, synthesizer, planes, mesh_size: int):
    """The official inferrer's mesh export (`lrm/inferrer.py`, `infer_single`, `export_mesh`), line for line.

    Returns (mesh, grid seconds, marching cubes + colours seconds).
    """
    import mcubes
    import trimesh

    mesh_thres = 1.0
    with torch.no_grad():
        start = time.perf_counter()
        grid_out = synthesizer.forward_grid(planes=planes, grid_size=mesh_size)
        grid_seconds = time.perf_counter() - start
        vtx, faces = mcubes.marching_cubes(grid_out['sigma'].float().squeeze(0).squeeze(-1).cpu().numpy(), mesh_thres)
        vtx = vtx / (mesh_size - 1) * 2 - 1
        vtx_tensor = torch.tensor(vtx, dtype=torch.float32).unsqueeze(0)
        vtx_colors = synthesizer.forward_points(planes, vtx_tensor)['rgb'].float().squeeze(0).cpu().numpy()
        vtx_colors = (vtx_colors * 255).astype(np.uint8)
        mesh = trimesh.Trimesh(vertices=vtx, faces=faces, vertex_colors=vtx_colors)
    return mesh, grid_seconds, time.perf_counter() - start - grid_seconds


MATCHED = 1e-4  # vertices closer than this to one of the other mesh's are the same vertex


def vertex_distances(a, b) -> tuple[float, int]:
    """Mean over the vertices of both meshes of the distance to the other mesh's nearest vertex, and
    how many of them have none within MATCHED.

    Both marching cubes put vertices on the grid's edges by linear interpolation, so on the same
    grid values the two vertex sets coincide up to float rounding wherever both found the surface.
    """
    from scipy.spatial import cKDTree

    a_to_b = cKDTree(b.vertices).query(a.vertices)[0]
    b_to_a = cKDTree(a.vertices).query(b.vertices)[0]
    both = np.concatenate([a_to_b, b_to_a])
    return float(both.mean()), int(np.sum(both > MATCHED))


def compare_with_official(args, reference, planes, weights, density_fn, color_fn, grid_options) -> dict:
    """Agreement checks, then official and this project's mesh export timed in turns; prints and returns a summary."""
    torch, synthesizer_module = reference
    synthesizer = official.official_synthesizer(torch, synthesizer_module, weights, CHANNELS, samples_per_ray=128)
    planes_t = torch.from_numpy(planes)[None]
    check = args.official_check_resolution
    with torch.no_grad():
        theirs = synthesizer.forward_grid(planes=planes_t, grid_size=check)
    ours_sigma = mesh_lib.density_grid(density_fn, check, **grid_options).values
    grid_points = np.stack(np.meshgrid(*[np.linspace(-1, 1, check, dtype=np.float32)] * 3, indexing="ij"), -1)
    ours_rgb = mesh_lib.evaluate_in_chunks(color_fn, grid_points.reshape(-1, 3), args.chunk_size)
    differences = {"density": float(np.max(np.abs(ours_sigma - theirs["sigma"][0, ..., 0].numpy()))),
                   "rgb": float(np.max(np.abs(ours_rgb - theirs["rgb"][0].reshape(-1, 3).numpy())))}
    print(f"official vs this project, dense {check}^3 grid, max |difference|: density {differences['density']:.2e}, "
          f"rgb {differences['rgb']:.2e}; {np.mean(ours_sigma > 1.0):.1%} of the box inside", flush=True)
    if max(differences.values()) > args.tolerance:
        raise SystemExit(f"the fields differ by more than --tolerance={args.tolerance}: timings would not "
                         "compare the same computation")

    runs = {"official": [], "ours": []}
    meshes = {}

    def run_official():
        mesh, grid_seconds, rest_seconds = official_mesh(torch, synthesizer, planes_t, args.resolution)
        runs["official"].append((grid_seconds, rest_seconds))
        meshes["official"] = mesh
        print(f"official dense {args.resolution}^3: grid {grid_seconds:.1f} s, mcubes + colours {rest_seconds:.1f} s; "
              f"{len(mesh.vertices)} vertices", flush=True)

    def run_ours():
        start = time.perf_counter()
        grid = mesh_lib.density_grid_coarse_to_fine(
            density_fn, args.resolution, coarse_resolution=args.coarse_resolution, **grid_options)
        grid_seconds = time.perf_counter() - start
        meshes["ours"] = mesh_lib.mesh_from_grid(grid, color_fn, chunk_size=args.chunk_size)
        runs["ours"].append((grid_seconds, time.perf_counter() - start - grid_seconds))
        print(f"this project coarse-to-fine {args.resolution}^3: grid {grid_seconds:.1f} s, marching cubes + colours "
              f"{runs['ours'][-1][1]:.1f} s; {grid.num_evaluations} evaluations "
              f"({grid.num_evaluations / args.resolution**3:.1%} of dense); {len(meshes['ours'].vertices)} vertices",
              flush=True)

    official.time_interleaved([run_ours, run_official], args.official_repeats, warmup=0)
    summary = {}
    for side, side_runs in runs.items():
        grid = statistics.median(r[0] for r in side_runs)
        total = statistics.median(r[0] + r[1] for r in side_runs)
        summary[side] = dict(grid=grid, total=total, vertices=len(meshes[side].vertices), area=meshes[side].area)
    summary["vertex_mean"], summary["unmatched"] = vertex_distances(meshes["ours"], meshes["official"])
    summary["torch"] = official.describe_torch(torch)
    summary["differences"] = differences
    print(f"meshes: official {summary['official']['vertices']} vertices, area {summary['official']['area']:.4f}; "
          f"this project {summary['ours']['vertices']} vertices, area {summary['ours']['area']:.4f}; "
          f"distance to the other's nearest vertex: mean {summary['vertex_mean']:.1e}; "
          f"{summary['unmatched']} of {summary['official']['vertices'] + summary['ours']['vertices']} vertices "
          f"have none within {MATCHED:g} (grid step {2 / (args.resolution - 1):.1e})", flush=True)
    return summary


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
    parser.add_argument("--official", default=None,
                        help="checkout of facebookresearch/vfusion3d: time the official mesh export in this run")
    parser.add_argument("--official-repeats", type=int, default=1, help="official and ours, in turns; median")
    parser.add_argument("--official-check-resolution", type=int, default=128,
                        help="dense grid on which the official and this project's fields are compared")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted |density difference|")
    args = parser.parse_args()
    grid_options = dict(block_size=args.block_size, chunk_size=args.chunk_size)
    try:
        reference = official.load(args.official) if args.official else None
    except official.OfficialUnavailable as error:
        parser.error(str(error))
    load_before = official.load_average()
    planes, weights = make_object()
    density_fn, color_fn = make_fields(planes, weights)

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

    summary = (compare_with_official(args, reference, planes, weights, density_fn, color_fn, grid_options)
               if reference else None)

    runs = []
    for _ in range(args.repeats):
        grid, grid_seconds = timed(lambda: mesh_lib.density_grid_coarse_to_fine(
            density_fn, args.resolution, coarse_resolution=args.coarse_resolution, **grid_options))
        mesh, mesh_seconds = timed(lambda: mesh_lib.mesh_from_grid(grid, color_fn, chunk_size=args.chunk_size))
        runs.append((grid_seconds, mesh_seconds, grid.num_evaluations))
        print(f"coarse-to-fine {args.resolution}^3: grid {grid_seconds:.1f} s, marching cubes + colours "
              f"{mesh_seconds:.1f} s; {grid.num_evaluations} evaluations; {len(mesh.vertices)} vertices, "
              f"watertight {mesh.is_watertight}", flush=True)

    dense_evaluations = (math.ceil(args.resolution / args.block_size) * args.block_size) ** 3
    estimate = dense_evaluations / rate
    if estimate <= args.dense_budget_s:
        _, dense_seconds = timed(lambda: mesh_lib.density_grid(density_fn, args.resolution, **grid_options))
        dense_text = f"{dense_seconds:.1f} s (1 run)"
    else:
        dense_seconds = estimate
        dense_text = f"≈{estimate:.0f} s (estimated from {args.probe_resolution}^3, not run)"
    print(f"dense {args.resolution}^3 grid (this project): {dense_text}", flush=True)

    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {jax.devices()[0].platform}"
    command = shlex.join(["python", "benchmarks/mesh.py", *sys.argv[1:]])
    schedule = "→".join(map(str, mesh_lib.grid_schedule(args.resolution, args.coarse_resolution)))
    print(f"\n{load_before} at the start, {official.load_average()} at the end")
    if runs:
        sparse_grid_seconds = statistics.median(run[0] for run in runs)
        mesh_seconds = statistics.median(run[1] for run in runs)
        print()
        print("| date | machine | command | grid | dense grid | coarse-to-fine grid | field evaluations | "
              "marching cubes + colours | speed-up (grid) |")
        print("|---|---|---|---|---|---|---|---|---|")
        print(f"| {datetime.date.today()} | {machine} | `{command}` | {args.resolution}³ ({schedule}), "
              f"blocks {args.block_size}³ | {dense_text} | {sparse_grid_seconds:.1f} s (median of {args.repeats}) | "
              f"{runs[0][2] / 1e6:.1f}M vs {dense_evaluations / 1e6:.0f}M | {mesh_seconds:.1f} s | "
              f"{dense_seconds / sparse_grid_seconds:.0f}× |")
    if summary:
        theirs, ours = summary["official"], summary["ours"]
        print()
        print("| date | machine | command | grid | official (dense, mcubes): grid / total | this project "
              "(coarse-to-fine): grid / total | ratio (total) | vertices official / ours | vertices without a twin |")
        print("|---|---|---|---|---|---|---|---|---|")
        print(f"| {datetime.date.today()} | {machine}, {summary['torch']} | `{command}` | {args.resolution}³ | "
              f"{theirs['grid']:.1f} s / {theirs['total']:.1f} s | {ours['grid']:.1f} s / {ours['total']:.1f} s | "
              f"{theirs['total'] / ours['total']:.1f}× | {theirs['vertices']} / {ours['vertices']} | "
              f"{summary['unmatched']} |")


if __name__ == "__main__":
    main()
