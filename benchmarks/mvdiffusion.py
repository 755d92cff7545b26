"""Multi-view video diffusion (issue 12): training-step and sampling throughput, and the compiled cost of a
large variant's training step without its weights.

Two measurements, each of the real code (`trainer.make_train_step` with the mvdiffusion task,
`mvdiffusion_task.sample_orbits`) on a synthetic batch with the clip pipeline's keys
(`mvdiffusion_task.INPUT_KEYS`), so no data files are needed:

timing    (`--timing=tiny`) on the devices jax has (it prints their kind): the jitted training step's
          compile time, then the median (and spread) over `--steps` timed steps after a warm-up, orbits
          per second = batch / step time; and sampling: `sample_orbits` jitted, with the config's sampler,
          steps and guidance (three predictions per step), median over `--sample_runs` runs after the
          compiling one.
compiled  (`--compiled=wan2_1_1_3b`) shapes only, nothing allocated: the abstract state of
          `trainer.abstract_train_state`, the step lowered on `jax.ShapeDtypeStruct` inputs carrying the
          state's shardings and the batch's (`sharding.batch_spec`), compiled; FLOPs from
          `compiled.cost_analysis()`, per-device bytes from `compiled.memory_analysis()`, parameter and
          optimiser bytes per device from the shardings. By default it runs in a child process on
          `--devices` (8) fake CPU devices (JAX_PLATFORMS=cpu,
          XLA_FLAGS=--xla_force_host_platform_device_count=8, set before jax starts); `--devices=0`
          compiles on the local devices instead (e.g. an accelerator's compiler and memory).

Latent space (`--latent`, default for every variant whose codec is a Wan VAE): the step's VAE encode
needs the VAE's weights (`config.codec.checkpoint`), and the large variants' captions are umT5
embeddings that the task cannot take yet (`mvdiffusion_task.text_embeddings` calls the model's byte
encoder, which only `tiny` has). So the benchmark measures the transformer step on what a pipeline
with cached latents and text embeddings would feed it: `clip_images` are already latents (B, F', H',
W', C) with F' = (F - 1) / 4 + 1, H' = H / 8, C = 16 for Wan 2.1 (an identity codec with the VAE's
strides and channels), and `caption_bytes` carries umT5-shaped embeddings (B, `--text_tokens`, 4096),
zeroed where the caption is dropped. The VAE encode (frozen, once per clip) is excluded.

FLOPs: XLA's cost analysis counts a `while` loop's body once, whatever its trip count, so the
transformer's blocks (one `nnx.scan`) are counted as one block ("raw"). The script also compiles the
same step with 1, 2 and 3 blocks, the scan unrolled (no loop), and reports
flops(1) + (L - 1) * (flops(2) - flops(1)), every block counted ("counted"), or n/a when the third
block does not add what the second did (the programs were partitioned differently). Estimates for
comparison: 6·N·T (N transformer parameters, T video tokens per step), the same plus attention,
3 · (2·N·T + 4·L·B·S·(S + text tokens)·D), and that × 4/3 (full rematerialisation runs each block's
forward twice).

Sharding: the Wan blocks constrain their token stream and attention to the batch sharding
(`act_batch`); before they did, XLA computed every example's attention on every FSDP device.

  nice -n 10 .venv/bin/python benchmarks/mvdiffusion.py                      # tiny timing + wan2_1_1_3b compiled
  .venv/bin/python benchmarks/mvdiffusion.py --timing=tiny --compiled= --steps=10 --sample_runs=5
  .venv/bin/python benchmarks/mvdiffusion.py --timing= --compiled=wan2_1_1_3b
  .venv/bin/python benchmarks/mvdiffusion.py --timing= --compiled=wan2_1_14b --frames=9 --resolution=256
  .venv/bin/python benchmarks/mvdiffusion.py --timing=tiny --compiled= --record   # append rows to RESULTS.md
  .venv/bin/python benchmarks/mvdiffusion.py --timing=wan2_1_1_3b --batch=1 --compiled=  # on a GPU

Prints Markdown tables; `--record` appends the rows to the tables of the "Multi-view video diffusion
(issue 12)" section of benchmarks/RESULTS.md (creating them if missing). Nothing is written otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from vfusion3d_jax.configs import load_config
from vfusion3d_jax.data import pipeline
from vfusion3d_jax.models.mvdiffusion import MultiViewDiffusion
from vfusion3d_jax.models.wan.codec import Codec
from vfusion3d_jax.train import mvdiffusion_task, sharding, trainer

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## Multi-view video diffusion (issue 12)"
CHILD_ENV = "VFUSION3D_BENCHMARK_CHILD"
CAPTION = "a red torus on a blue box"
GIB = 2.0**30

TIMING_HEADER = ("| date | machine | command | variant | devices | clip B × F × px | compile s | step s median "
                 "(min–max, n) | train orbits/s | GFLOP/step (XLA raw / counted) | sampling | sample s median "
                 "(min–max, n) | sampled orbits/s |")
COMPILED_HEADER = ("| date | machine | command | variant | mesh | clip B × F × px → latents | tokens/step | params "
                   "(per device) | params + optimiser per device | argument / output / alias / temp GiB per device "
                   "| GFLOP/step XLA raw | GFLOP/step counted | GFLOP/step estimates: 6·N·T / + attention / "
                   "× 4/3 (full remat) | compile s |")


# --------------------------------------------------------------------------- configs and inputs


def bench_config(variant: str, batch: int | None, frames: int | None, resolution: int | None,
                 num_layers: int | None = None, mesh: dict[str, int] | None = None) -> ml_collections.ConfigDict:
    """The variant's config with the given overrides (None = the config's); `mesh` = mesh axis sizes."""
    overrides = {f"mesh__shape__{axis}": size for axis, size in (mesh or {}).items()}
    if batch is not None:
        overrides["data__batch_size"] = batch
    if frames is not None:
        overrides["data__num_frames"] = frames
    if resolution is not None:
        overrides["data__clip_resolution"] = resolution
    if num_layers is not None:
        overrides["model__num_layers"] = num_layers
    return load_config(f"mvdiffusion.py:{variant}", **overrides)


def uses_vae(config: ml_collections.ConfigDict) -> bool:
    return config.codec.kind == "wan_vae"


class LatentCodec(Codec):
    """The identity on cached latents: `encode` passes (B, F', H', W', C) through, with the strides and
    channels of the VAE whose latents they would be (nothing of the VAE is run or loaded)."""

    def __init__(self, channels: int, frame_stride: int, spatial_stride: int):
        self.channels, self.frames, self.spatial = channels, frame_stride, spatial_stride

    @property
    def latent_channels(self) -> int:
        return self.channels

    @property
    def frame_stride(self) -> int:
        return self.frames

    @property
    def spatial_stride(self) -> int:
        return self.spatial

    def encode(self, video: jax.Array) -> jax.Array:
        if video.shape[-1] != self.channels:
            raise ValueError(f"expected cached latents with {self.channels} channels, got shape {video.shape}")
        return video

    def decode(self, latents: jax.Array) -> jax.Array:
        return latents


def latent_codec(config: ml_collections.ConfigDict) -> LatentCodec:
    vae = config.codec.vae
    spatial = vae.scale_factor_spatial
    return LatentCodec(vae.z_dim, vae.scale_factor_temporal, spatial)


@contextlib.contextmanager
def latent_task(config: ml_collections.ConfigDict, latent: bool):
    """While active, the mvdiffusion task reads latents (no VAE) and umT5-shaped text embeddings (see
    the module docstring). The task looks these functions up when the step is built and traced."""
    if not latent:
        yield
        return

    def text_embeddings(model, embeddings, keep_text):
        return jnp.where(keep_text[:, None, None], embeddings, 0.0)

    # The sampler asks the model to encode its captions (and the empty caption, zeros): embeddings pass.
    with mock.patch.object(mvdiffusion_task, "make_codec", lambda _: latent_codec(config)), \
            mock.patch.object(mvdiffusion_task, "text_embeddings", text_embeddings), \
            mock.patch.object(MultiViewDiffusion, "encode_text", lambda model, embeddings: embeddings):
        yield


@contextlib.contextmanager
def unrolled_layer_scans():
    """Every `nnx.scan` fully unrolled (no `while` loop left for XLA's cost analysis to count once)."""
    scan = nnx.scan
    with mock.patch.object(nnx, "scan", functools.partial(scan, unroll=True)):
        yield


def clip_shapes(config: ml_collections.ConfigDict, latent: bool, text_tokens: int
                ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of each model input of one global batch (`mvdiffusion_task.INPUT_KEYS`)."""
    data = config.data
    batch, frames, side = data.batch_size, data.num_frames, data.clip_resolution
    if latent:
        codec = latent_codec(config)
        latent_frames, height, width, channels = codec.latent_shape(frames, side, side)
        return dict(clip_images=((batch, latent_frames, height, width, channels), np.float32),
                    clip_masks=((batch, latent_frames, height, width, 1), np.float32),
                    clip_relative_pose=((batch, frames, 3), np.float32),
                    caption_bytes=((batch, text_tokens, config.model.text_dim), np.float32))
    return dict(clip_images=((batch, frames, side, side, 3), np.float32),
                clip_masks=((batch, frames, side, side, 1), np.float32),
                clip_relative_pose=((batch, frames, 3), np.float32),
                caption_bytes=((batch, data.caption_length), np.uint8))


def synthetic_batch(config: ml_collections.ConfigDict, latent: bool, text_tokens: int) -> dict[str, np.ndarray]:
    """A host batch of the pipeline's shapes: frames in [0, 1], masks, an orbit's relative poses
    (azimuth steps of 360/F at 20 degrees elevation), a caption's zero-padded bytes."""
    rng = np.random.default_rng(0)
    shapes = clip_shapes(config, latent, text_tokens)
    batch = {}
    for key, (shape, dtype) in shapes.items():
        batch[key] = rng.uniform(size=shape).astype(dtype)
    batch["clip_masks"] = (batch["clip_masks"] > 0.5).astype(np.float32)
    size, frames = shapes["clip_relative_pose"][0][:2]
    azimuths = np.arange(frames) * 360.0 / frames
    pose = np.stack([azimuths, np.full(frames, 20.0), np.full(frames, 20.0)], axis=-1)
    batch["clip_relative_pose"] = np.broadcast_to(pose, (size, frames, 3)).astype(np.float32).copy()
    if not latent:
        caption = np.zeros(shapes["caption_bytes"][0][1], np.uint8)
        encoded = np.frombuffer(CAPTION.encode(), np.uint8)[: caption.size]
        caption[: encoded.size] = encoded
        batch["caption_bytes"] = np.broadcast_to(caption, shapes["caption_bytes"][0]).copy()
    return batch


def flops_of(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0)) if cost else 0.0


def abstract_inputs(state: trainer.TrainState, shapes: dict, mesh, rules) -> tuple:
    """`jax.ShapeDtypeStruct`s of the step's arguments, each with its sharding."""
    def spec(leaf, sharding_):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding_)

    by_example = jax.sharding.NamedSharding(mesh, sharding.batch_spec(rules))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return (jax.tree.map(spec, state.model_state, state.model_shardings),
            jax.tree.map(spec, state.optimizer_state, state.optimizer_shardings),
            jax.tree.map(spec, state.ema_state, state.ema_shardings),
            {key: jax.ShapeDtypeStruct(shape, dtype, sharding=by_example) for key, (shape, dtype) in shapes.items()},
            None, jax.ShapeDtypeStruct((), jnp.uint32, sharding=replicated))


def compile_step(config: ml_collections.ConfigDict, latent: bool, text_tokens: int,
                 unroll: bool = False, devices=None):
    """(compiled step, abstract state, mesh, compile seconds): shapes only, nothing allocated; the mesh
    spans `devices` (default: all)."""
    mesh = sharding.make_mesh(config.mesh.shape, devices)
    rules = sharding.logical_rules(config.mesh.logical_rules)
    with sharding.activate(mesh, rules), latent_task(config, latent), \
            (unrolled_layer_scans() if unroll else contextlib.nullcontext()):
        _, state = trainer.abstract_train_state(config, mesh, rules)
        args = abstract_inputs(state, clip_shapes(config, latent, text_tokens), mesh, rules)
        step = trainer.make_train_step(config, state)
        start = time.perf_counter()
        compiled = step.lower(*args).compile()
        seconds = time.perf_counter() - start
    return compiled, state, mesh, seconds


def counted_flops(variant: str, args, latent: bool, mesh: dict[str, int] | None = None,
                  devices=None) -> tuple[float, float, float]:
    """(flops with every block counted, per-block flops, flops outside the blocks) per device, from the
    step compiled with 1, 2 and 3 unrolled blocks: f(1) + (L - 1)·(f(2) - f(1)). NaNs when f(3) - f(2)
    and f(2) - f(1) differ by more than 2% (the programs were partitioned differently, so no count
    extrapolates). `mesh` (axis sizes) and `devices` as in `bench_config` and `compile_step`."""
    flops = [flops_of(compile_step(bench_config(variant, args.batch, args.frames, args.resolution, layers, mesh),
                                   latent, args.text_tokens, unroll=True, devices=devices)[0])
             for layers in (1, 2, 3)]
    num_layers = bench_config(variant, args.batch, args.frames, args.resolution).model.num_layers
    per_block, third = flops[1] - flops[0], flops[2] - flops[1]
    print(f"{variant}: per-device GFLOP with 1, 2, 3 unrolled blocks: {[round(f / 1e9, 1) for f in flops]}",
          flush=True)
    if per_block <= 0 or abs(third - per_block) > 0.02 * abs(per_block):
        print(f"{variant}: blocks 2 and 3 add {per_block / 1e9:.1f} and {third / 1e9:.1f} GFLOP per device: "
              "inconsistent partitioning, no counted FLOPs", flush=True)
        return (math.nan,) * 3
    return flops[0] + (num_layers - 1) * per_block, per_block, flops[0] - per_block


def per_device_bytes(abstract_state, shardings) -> int:
    """Bytes of one device's shards of an abstract state."""
    total = 0
    for leaf, sharding_ in zip(jax.tree.leaves(abstract_state), jax.tree.leaves(shardings), strict=True):
        total += math.prod(sharding_.shard_shape(tuple(leaf.shape))) * np.dtype(leaf.dtype).itemsize
    return total


def tokens_per_clip(config: ml_collections.ConfigDict, shapes: dict) -> int:
    grid = shapes["clip_images"][0][1:4]
    return math.prod(size // patch for size, patch in zip(grid, config.model.patch_size))


def flop_estimates(config: ml_collections.ConfigDict, shapes: dict) -> tuple[float, float]:
    """6·N·T and 3·(2·N·T + 4·L·B·S·(S + text tokens)·D) for one training step (all devices)."""
    model = config.model
    params = mvdiffusion_task.count_parameters(config)
    batch, seq, text = shapes["clip_images"][0][0], tokens_per_clip(config, shapes), shapes["caption_bytes"][0][1]
    dim = model.num_attention_heads * model.attention_head_dim
    tokens = batch * seq
    attention = 4.0 * model.num_layers * batch * seq * (seq + text) * dim
    return 6.0 * params * tokens, 3.0 * (2.0 * params * tokens + attention)


# --------------------------------------------------------------------------- measurements


def matmul_gflops(size: int = 2048, runs: int = 5) -> float:
    """A float32 matmul's rate on the first device: how much of the machine the other jobs left."""
    x = jax.device_put(jnp.ones((size, size), jnp.float32), jax.devices()[0])
    multiply = jax.jit(lambda a: a @ a)
    jax.block_until_ready(multiply(x))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(multiply(x))
        times.append(time.perf_counter() - start)
    return 2.0 * size**3 / statistics.median(times) / 1e9


def spread(times: list[float]) -> str:
    return f"{statistics.median(times):.3f} ({min(times):.3f}–{max(times):.3f}, {len(times)})"


def measure_timing(variant: str, args) -> dict:
    config = bench_config(variant, args.batch, args.frames, args.resolution)
    latent = uses_vae(config) if args.latent is None else args.latent
    mesh = sharding.make_mesh(config.mesh.shape)
    rules = sharding.logical_rules(config.mesh.logical_rules)
    matmul_before, load_before = matmul_gflops(), os.getloadavg()[0]
    with sharding.activate(mesh, rules), latent_task(config, latent):
        create, state = trainer.abstract_train_state(config, mesh, rules)
        state = trainer.initialize_train_state(create, state)
        host = synthetic_batch(config, latent, args.text_tokens)
        batch = pipeline.to_global_arrays(host, mesh, sharding.batch_spec(rules))
        step_fn = trainer.make_train_step(config, state)
        aux = mvdiffusion_task.train_aux(config)

        start = time.perf_counter()
        compiled = step_fn.lower(state.model_state, state.optimizer_state, state.ema_state, batch, aux,
                                 jnp.uint32(0)).compile()
        compile_s = time.perf_counter() - start
        raw_flops = flops_of(compiled)

        model_state, optimizer_state, ema_state = state.model_state, state.optimizer_state, state.ema_state
        times = []
        for step in range(args.steps + 1):  # the first run is a warm-up
            start = time.perf_counter()
            model_state, optimizer_state, ema_state, metrics = compiled(model_state, optimizer_state, ema_state,
                                                                        batch, aux, jnp.uint32(step))
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        loss = float(metrics["loss"])

        graphdef, settings = state.model_graphdef, config.sample

        @jax.jit
        def sample(model_state, first_frame, relative_pose, caption, noise):
            return mvdiffusion_task.sample_orbits(nnx.merge(graphdef, model_state), config, first_frame,
                                                  relative_pose, caption, noise)

        clean = batch["clip_images"] * 2.0 - 1.0  # what `clean_latents` makes of them (identity or cached latents)
        noise = jax.random.normal(jax.random.key(settings.seed), clean.shape, jnp.float32)
        caption = batch["caption_bytes"]
        sample_times = []
        for _ in range(args.sample_runs + 1):  # the first run compiles
            start = time.perf_counter()
            jax.block_until_ready(sample(model_state, clean[:, 0], batch["clip_relative_pose"], caption, noise))
            sample_times.append(time.perf_counter() - start)

    matmul_after, load_after = matmul_gflops(), os.getloadavg()[0]
    counted = counted_flops(variant, args, latent)[0] if args.count_flops else float("nan")
    devices = jax.devices()
    batch_size = config.data.batch_size
    step_s, sample_s = statistics.median(times[1:]), statistics.median(sample_times[1:])
    return dict(
        variant=variant + (" (latents)" if latent else ""), devices=f"{len(devices)} × {devices[0].device_kind}",
        clip=f"{batch_size} × {config.data.num_frames} × {config.data.clip_resolution}", compile_s=compile_s,
        step=spread(times[1:]), step_s=step_s, train_orbits_s=batch_size / step_s,
        gflop=f"{raw_flops * len(devices) / 1e9:.1f} / {counted * len(devices) / 1e9:.1f}",
        sampling=(f"{settings.sampler}, {settings.num_steps} steps, guidance {settings.image_guidance:g} image / "
                  f"{settings.text_guidance:g} text (3 predictions per step; first call {sample_times[0]:.1f} s)"),
        sample=spread(sample_times[1:]), sample_s=sample_s, sampled_orbits_s=batch_size / sample_s, loss=loss,
        params=mvdiffusion_task.count_parameters(config),
        conditions=(f"load {load_before:.1f} → {load_after:.1f}, 2048² f32 matmul {matmul_before:.0f} → "
                    f"{matmul_after:.0f} GFLOP/s"))


def measure_compiled(variant: str, args) -> dict:
    config = bench_config(variant, args.batch, args.frames, args.resolution)
    latent = uses_vae(config) if args.latent is None else args.latent
    compiled, state, mesh, compile_s = compile_step(config, latent, args.text_tokens)
    memory = compiled.memory_analysis()
    raw = flops_of(compiled)
    counted, per_block, outside = counted_flops(variant, args, latent) if args.count_flops else (math.nan,) * 3
    devices = mesh.devices.size
    shapes = clip_shapes(config, latent, args.text_tokens)
    estimate, with_attention = flop_estimates(config, shapes)
    params = sum(leaf.size for leaf in jax.tree.leaves(nnx.filter_state(state.model_state, nnx.Param)))
    model_bytes = per_device_bytes(state.model_state, state.model_shardings)
    optimizer_bytes = per_device_bytes(state.optimizer_state, state.optimizer_shardings)
    data = config.data
    latents = "×".join(str(size) for size in shapes["clip_images"][0][1:])
    return dict(
        variant=variant + (" (latents, VAE excluded)" if latent else ""),
        mesh=f"{dict(mesh.shape)} on {devices} × {mesh.devices.flat[0].device_kind}",
        clip=f"{data.batch_size} × {data.num_frames} × {data.clip_resolution} → {latents}",
        tokens=data.batch_size * tokens_per_clip(config, shapes), text_tokens=shapes["caption_bytes"][0][1],
        params=params, transformer_params=mvdiffusion_task.count_parameters(config),
        model_gib=model_bytes / GIB, optimizer_gib=optimizer_bytes / GIB,
        argument_gib=memory.argument_size_in_bytes / GIB, output_gib=memory.output_size_in_bytes / GIB,
        alias_gib=memory.alias_size_in_bytes / GIB, temp_gib=memory.temp_size_in_bytes / GIB,
        raw_gflop=raw * devices / 1e9, counted_gflop=counted * devices / 1e9, per_block_gflop=per_block * devices / 1e9,
        outside_gflop=outside * devices / 1e9, estimate_gflop=estimate / 1e9,
        attention_estimate_gflop=with_attention / 1e9, compile_s=compile_s, remat=config.model.remat,
        dtype=config.model.dtype)


# --------------------------------------------------------------------------- reporting


def machine() -> str:
    devices = jax.devices()
    if devices[0].platform == "cpu":
        return f"{os.cpu_count()} CPU cores"
    return f"{len(devices)} × {devices[0].device_kind}"


def command_line(args) -> str:
    if args.command_line:
        return args.command_line
    nice = os.nice(0)
    prefix = f"nice -n {nice} " if nice else ""
    return prefix + shlex.join([os.path.relpath(sys.executable)] + sys.argv)


def timing_row(row: dict, args) -> str:
    return (f"| {datetime.date.today()} | {machine()}; {row['conditions']} | `{command_line(args)}` | {row['variant']} "
            f"({row['params'] / 1e6:.2f}M) | {row['devices']} | {row['clip']} | {row['compile_s']:.1f} | "
            f"{row['step']} | {row['train_orbits_s']:.2f} | {row['gflop']} | {row['sampling']} | {row['sample']} | "
            f"{row['sampled_orbits_s']:.3f} |")


def compiled_row(row: dict, args) -> str:
    counted = ("n/a: the 1-, 2- and 3-block programs are partitioned differently" if math.isnan(row["counted_gflop"])
               else f"{row['counted_gflop']:,.0f} ({row['per_block_gflop']:,.0f} per block, "
                    f"{row['outside_gflop']:,.0f} outside)")
    return (f"| {datetime.date.today()} | {machine()}, load {os.getloadavg()[0]:.1f} | `{command_line(args)}` | "
            f"{row['variant']}, {row['dtype']}, remat {row['remat']} | {row['mesh']} | {row['clip']} | "
            f"{row['tokens']:,} (+{row['text_tokens']} text per clip) | {row['params'] / 1e9:.3f}B "
            f"({row['model_gib']:.2f} GiB) | {row['model_gib'] + row['optimizer_gib']:.2f} GiB | "
            f"{row['argument_gib']:.2f} / {row['output_gib']:.2f} / {row['alias_gib']:.2f} / {row['temp_gib']:.2f} | "
            f"{row['raw_gflop']:,.0f} | {counted} | {row['estimate_gflop']:,.0f} / "
            f"{row['attention_estimate_gflop']:,.0f} / {row['attention_estimate_gflop'] * 4 / 3:,.0f} | "
            f"{row['compile_s']:.0f} |")


def record(header: str, rows: list[str]) -> None:
    """Appends `rows` to the table with `header` in this section of RESULTS.md (made if missing)."""
    lines = RESULTS.read_text().splitlines()
    if SECTION not in lines:
        lines += ["", SECTION]
    section = lines.index(SECTION)
    end = next((i for i in range(section + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    if header in lines[section:end]:
        at = lines.index(header, section) + 2
        while at < len(lines) and lines[at].startswith("|"):
            at += 1
    else:
        separator = "|" + "---|" * (header.count("|") - 1)
        lines[end:end] = ["", header, separator]
        at = end + 3
    lines[at:at] = rows
    RESULTS.write_text("\n".join(lines) + "\n")
    print(f"appended {len(rows)} row(s) to {RESULTS}")


def rerun_on_cpu_devices(script: str, num_devices: int, argv: list[str]) -> int:
    """`script` with `argv` in a fresh process (marked by CHILD_ENV) whose jax sees `num_devices` CPU devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", **{CHILD_ENV: "1"})
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={num_devices}").strip()
    return subprocess.call([sys.executable, script] + argv, env=env)


def run_compiled_in_child(args) -> int:
    """The compiled measurement in a fresh process whose jax sees `--devices` CPU devices."""
    # The last --timing wins: the child compiles only.
    argv = sys.argv[1:] + ["--timing=", f"--command_line={command_line(args)}"]
    return rerun_on_cpu_devices(__file__, args.devices, argv)


def report(header: str, rows: list[dict], format_row, args) -> None:
    """Prints the rows as a Markdown table and as JSON; with --record, appends the table's rows."""
    table = [format_row(row, args) for row in rows]
    print("\n" + header + "\n|" + "---|" * (header.count("|") - 1) + "\n" + "\n".join(table))
    print(json.dumps(rows, indent=1, default=str))
    if args.record:
        record(header, table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timing", default="tiny", help="comma-separated variants to time on the local devices")
    parser.add_argument("--compiled", default="wan2_1_1_3b", help="comma-separated variants to compile abstractly")
    parser.add_argument("--devices", type=int, default=8,
                        help="fake CPU devices for --compiled (a child process); 0 = the local devices")
    parser.add_argument("--batch", type=int, default=None, help="global batch (default: the config's)")
    parser.add_argument("--frames", type=int, default=None, help="frames per clip (default: the config's)")
    parser.add_argument("--resolution", type=int, default=None, help="clip side in pixels (default: the config's)")
    parser.add_argument("--text_tokens", type=int, default=512, help="umT5 tokens per caption in latent mode")
    parser.add_argument("--latent", action=argparse.BooleanOptionalAction, default=None,
                        help="cached latents and text embeddings instead of pixels (default: for VAE variants)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps (median reported)")
    parser.add_argument("--sample_runs", type=int, default=5, help="timed sampling runs (median reported)")
    parser.add_argument("--count_flops", action=argparse.BooleanOptionalAction, default=True,
                        help="also compile 1-, 2- and 3-block unrolled steps to count every block's FLOPs")
    parser.add_argument("--record", action="store_true", help=f"append the rows to {RESULTS.name}")
    parser.add_argument("--command_line", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()

    timing = [variant for variant in args.timing.split(",") if variant]
    compiled = [variant for variant in args.compiled.split(",") if variant]
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} × "
          f"{jax.devices()[0].device_kind}, load {os.getloadavg()[0]:.1f}", flush=True)
    if timing:
        report(TIMING_HEADER, [measure_timing(variant, args) for variant in timing], timing_row, args)
    if compiled:
        if args.devices and not os.environ.get(CHILD_ENV) and jax.device_count() != args.devices:
            sys.exit(run_compiled_in_child(args))
        report(COMPILED_HEADER, [measure_compiled(variant, args) for variant in compiled], compiled_row, args)


if __name__ == "__main__":
    main()
