"""LRM training-step throughput: step time, examples per second, compile time, FLOPs and MFU.

Runs the real jitted train step of `vfusion3d_jax.train.trainer` (model, renderer, MSE +
LPIPS + opacity + TV losses, AdamW) on all local devices, with the mesh of the config, on
a synthetic batch of the shapes of one training stage (no data files needed). Model
FLOPs per step come from XLA's cost analysis of the compiled step; MFU divides the
achieved FLOP rate by the devices' peak (known accelerators only: a CPU has no MFU).

  python benchmarks/train_step.py                                  # tiny and small, their first stage
  python benchmarks/train_step.py --variants=small --batch_size=2 --stage=high_res --steps=3
  python benchmarks/train_step.py --variants=large --stage=high_res  # on an accelerator

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from vfusion3d_jax import cameras
from vfusion3d_jax.configs import load_config
from vfusion3d_jax.data import pipeline
from vfusion3d_jax.models import count_parameters
from vfusion3d_jax.train import losses, metrics, sharding, trainer

# Dense peak FLOP/s per device, for MFU: bfloat16 for accelerators (the compute dtype at scale).
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}


def synthetic_batch(stage: trainer.Stage, batch_size: int) -> dict[str, np.ndarray]:
    """A batch with the stage's shapes: smooth random images, orbit cameras that see the object box."""
    rng = np.random.default_rng(0)
    data = stage.data
    views = data.num_target_views
    side = data.patch_size or data.target_resolution
    azimuths = np.linspace(0.0, 360.0, views, endpoint=False)
    cam2world = cameras.orbit_cam2world(azimuths, 20.0, cameras.RENDER_RADIUS)
    intrinsics = np.broadcast_to(cameras.intrinsics_matrix(*cameras.DEFAULT_INTRINSICS), (views, 3, 3))
    render = np.broadcast_to(cameras.render_camera(cam2world, intrinsics), (batch_size, views, 25))
    source = np.broadcast_to(cameras.source_camera(cam2world[0], intrinsics[0]), (batch_size, 16))
    return dict(
        source_image=rng.uniform(size=(batch_size, data.source_resolution, data.source_resolution, 3)),
        source_camera=source,
        target_images=rng.uniform(size=(batch_size, views, side, side, 3)),
        target_masks=(rng.uniform(size=(batch_size, views, side, side, 1)) > 0.5),
        target_cameras=render,
        target_patch_cameras=render,
        is_synthetic=np.arange(batch_size) % 2,
    )


def benchmark(variant: str, stage_name: str | None, batch_size: int | None, steps: int) -> dict:
    overrides = {} if batch_size is None else dict(data__batch_size=batch_size)
    config = load_config(f"lrm.py:{variant}", **overrides)
    stages = trainer.make_stages(config)
    stage = stages[0] if stage_name is None else next(s for s in stages if s.name == stage_name)
    batch_size = config.data.batch_size
    mesh = sharding.make_mesh(config.mesh.shape)
    rules = sharding.logical_rules(config.mesh.logical_rules)
    with sharding.activate(mesh, rules):
        create, state = trainer.abstract_train_state(config, mesh, rules)
        state = trainer.initialize_train_state(create, state)
        host_batch = {key: np.asarray(value, np.float32)
                      for key, value in synthetic_batch(stage, batch_size).items()}
        batch = pipeline.to_global_arrays(host_batch, mesh, sharding.batch_spec(rules))
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        lpips_params = (jax.device_put(metrics.load_lpips_params(config.train.loss.lpips_net), replicated)
                        if losses.uses_lpips(config.train.loss) else None)
        step_fn = trainer.make_train_step(config, state)
        args = (state.model_state, state.optimizer_state, state.ema_state, batch, lpips_params, jnp.uint32(0))

        start = time.perf_counter()
        compiled = step_fn.lower(*args).compile()
        compile_s = time.perf_counter() - start
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops = float(cost.get("flops", 0.0)) if cost else 0.0

        model_state, optimizer_state, ema_state = state.model_state, state.optimizer_state, state.ema_state
        times = []
        for step in range(steps + 1):  # the first run is a warm-up
            start = time.perf_counter()
            model_state, optimizer_state, ema_state, step_metrics = compiled(
                model_state, optimizer_state, ema_state, batch, lpips_params, jnp.uint32(step))
            jax.block_until_ready(step_metrics)
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times[1:])
    device = jax.devices()[0]
    peak = PEAK_FLOPS.get(device.device_kind)
    # XLA's count is per device program (SPMD): total model FLOPs = per-device FLOPs x devices.
    achieved = flops * jax.device_count() / step_s
    return dict(
        variant=variant, stage=stage.name, devices=f"{jax.device_count()} x {device.device_kind}",
        batch=batch_size, views=stage.data.num_target_views,
        render=stage.data.patch_size or stage.data.target_resolution, source=stage.data.source_resolution,
        params=count_parameters(config.model), step_ms=1e3 * step_s, examples_s=batch_size / step_s,
        compile_s=compile_s, gflop=flops * jax.device_count() / 1e9,
        mfu="n/a" if peak is None else f"{achieved / (peak * jax.device_count()):.1%}",
        loss=float(step_metrics["loss"]),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="tiny,small", help="comma-separated configs/lrm.py variants")
    parser.add_argument("--stage", default=None, help="stage whose shapes to use (default: each variant's first)")
    parser.add_argument("--batch_size", type=int, default=None, help="global batch (default: the config's)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    args = parser.parse_args()
    rows = [benchmark(variant, args.stage, args.batch_size, args.steps) for variant in args.variants.split(",")]
    print(f"\n{datetime.date.today()}, {platform.node()}, jax {jax.__version__}, {jax.default_backend()}\n")
    print("| variant | stage | devices | params | batch x views | render px | source px | step ms | "
          "examples/s | compile s | GFLOP/step | MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['stage']} | {r['devices']} | {r['params'] / 1e6:.1f}M | "
              f"{r['batch']} x {r['views']} | {r['render']} | {r['source']} | {r['step_ms']:.0f} | "
              f"{r['examples_s']:.2f} | {r['compile_s']:.1f} | {r['gflop']:.1f} | {r['mfu']} |")


if __name__ == "__main__":
    main()
