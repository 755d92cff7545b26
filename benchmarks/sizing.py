"""Pretraining sizing plan (issue 14): per-device memory and FLOPs of the compiled training step on
slices of 8 to 128 devices, the smallest slice of each chip that holds it, and the days to train.

Computed, not guessed: for each slice size N of `--devices` the real training step
(`trainer.make_train_step` of `configs/lrm.py:large` or `configs/mvdiffusion.py:wan2_1_14b`) is lowered
on `jax.ShapeDtypeStruct` inputs that carry the abstract state's shardings (`trainer.abstract_train_state`)
and the batch's (`sharding.batch_spec`) and compiled for N fake CPU devices: nothing is allocated. One
child process runs with max(N) devices (XLA_FLAGS=--xla_force_host_platform_device_count, JAX_PLATFORMS=cpu,
set before jax starts) and builds each mesh on its first N (`sharding.make_mesh(shape, devices[:N])`).

Per device, for each distinct batch shape of the config's stages (`trainer.make_stages`; the LRM's
low_res, high_res and finetune stages all feed 4 views of 128 px (whole renders, then patches of
384 px renders) and a 512 px source, so they compile one program):
  params, optimiser, EMA   bytes of one device's shards of the abstract state (exact, from the shardings);
  argument/output/alias/temp   `compiled.memory_analysis()`: temp holds the activations (and every other
                          temporary) of XLA's buffer assignment;
  total                   argument + output - alias + temp: the donated state's outputs reuse its buffers.
FLOPs per step (all devices) = per-device `compiled.cost_analysis()` flops × N. XLA counts a `while` loop's
body once whatever its trip count, so each model's loops are removed before counting:
  LRM          the ViT encoder and the triplane transformer (both `layers.scan_layers` → `nnx.scan`) are
               unrolled (`mvdiffusion.unrolled_layer_scans`) and compiled with (1, 1), (2, 1), (1, 2) and
               (2, 2) (encoder, transformer) layers; counted = f(1,1) + (E - 1)·a + (T - 1)·b with
               a = f(2,1) - f(1,1), b = f(1,2) - f(1,1), or n/a when f(2,2) - f(2,1) - f(1,2) + f(1,1) is not
               within 2% of min(a, b) of zero (the programs were partitioned differently). The renderer's
               `lax.map` over ray chunks is removed by compiling those four programs with one chunk per
               object (`train.render_chunk_size` = views × pixels); memory comes from the full-depth program
               with `--render_chunk` rays per chunk (default 4096, the renderer's accelerator default).
               The threefry loops of the random draws (integer mixing, 5 rounds) stay: negligible.
  diffusion    `mvdiffusion.counted_flops`: 1, 2 and 3 unrolled blocks, f(1) + (L - 1)·(f(2) - f(1)), on
               cached latents and umT5-shaped text embeddings (`mvdiffusion.latent_task`; the frozen VAE
               encode is excluded), as `benchmarks/mvdiffusion.py --compiled` measures it.
Where they are counted (`--count_flops`): "adaptive" (default) counts at the first size, and at each
further size compiles only the memory program and reuses that count, scaled by the ratio of the two
sizes' raw totals (the memory programs' per-device flops × N, loop bodies once), when that ratio is
within 1% of 1: the same work, split N ways. Where it is not (the partitioner leaves work replicated,
so the total grows with N) it counts again at that size; where the first count failed (its programs
extrapolate inconsistently) it counts nowhere else either. "each" counts at every size; "none" nowhere
(memory only, no step times). The table says where each row's count comes from.

Plan: for each chip (`CHIPS`: peak dense bf16 FLOP/s, HBM) the smallest compiled N whose largest
per-device total fits in HBM less `HEADROOM` (10%: runtime, collectives' buffers, fragmentation);
step time = FLOPs per step / (N × peak × MFU) and days = Σ over stages of steps × step time / 86400,
at the stated `--mfu` (assumed, not measured). The global batch must be divisible by the mesh's
data-parallel size (the product of the mesh axes of the "batch" rule); other N are skipped.

Sharding: every layer stack (`layers.scan_layers`) keeps its token stream split by example
(`stream_axes=BATCH_TOKENS`). Before it did, the LRM's triplane tokens (a parameter broadcast over the
batch) were computed whole on every device: ~660 GiB of temporaries per device at any N, which this
script found (RESULTS.md keeps that block).

Caveats (also printed under the tables):
  * memory is XLA:CPU's buffer assignment, an approximation of the TPU and GPU compilers' (fusion, layout
    and rematerialisation differ; the CPU may upcast bf16); attention is XLA's default, which materialises
    the (heads, S, S) f32 scores: a fused attention (`attention_implementation="cudnn"`, TPU splash) needs far
    less; the renderer uses its CPU/GPU inverse CDF ("gather"; TPUs use "compare");
  * FLOPs are XLA-counted model FLOPs of this code (rematerialised forwards included), not hardware counters;
  * MFU is assumed, not measured: no accelerator has run these steps yet.

  nice -n 10 .venv/bin/python benchmarks/sizing.py --record                      # LRM large, 8..128 devices
  nice -n 10 .venv/bin/python benchmarks/sizing.py --model=mvdiffusion --record  # wan2_1_14b
  .venv/bin/python benchmarks/sizing.py --model=mvdiffusion --mesh=fsdp=-1,tensor=2 --devices=16,32,64
  .venv/bin/python benchmarks/sizing.py --devices=64,128,256 --mesh=data=2,fsdp=-1,tensor=1 --mfu=0.4

Time on a 2-core CPU shared with other jobs (load ~4): 30-60 s per LRM large program, ~20 s per
wan2_1_14b one. The first size compiles 5 LRM programs (4 for the diffusion model), each further size 1
where the raw totals agree: 5.4-7.5 min for the LRM on the default sizes, 2.3 min for
wan2_1_14b (8, 16, 32; its global batch of 32 rules out 64 and 128 on a pure FSDP mesh). More sizes:
`--devices=8,16,32,64,128,256`; the default, 8 to 128, holds the smallest fitting slice of every chip in
`CHIPS` for both models and the paper's 128 A100s.

Prints Markdown tables and a JSON summary; `--record` puts them in the "Pretraining sizing plan
(issue 14)" section of benchmarks/RESULTS.md, replacing an earlier block of the same model, variant,
mesh and options (its `### ` heading).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import sys
import time
from types import SimpleNamespace

import jax
import ml_collections
import numpy as np

import mvdiffusion as mvd  # benchmarks/ (this script's folder) is on sys.path
import train_step
from vfusion3d_jax.configs import load_config
from vfusion3d_jax.train import losses, metrics, sharding, trainer

RESULTS = mvd.RESULTS
SECTION = "## Pretraining sizing plan (issue 14)"
SECTION_INTRO = (
    "`benchmarks/sizing.py`: the training step compiled without weights for N fake CPU devices; per-device "
    "memory from `compiled.memory_analysis()` (total = argument + output − alias + temp), FLOPs from "
    "`compiled.cost_analysis()` with every layer and ray chunk counted; step time and days at a stated MFU "
    "(assumed). The script's docstring has the method and its caveats.")
GIB = 2.0**30
HEADROOM = 0.10  # of HBM kept free: runtime, collectives' buffers, fragmentation
DEFAULT_VARIANTS = {"lrm": "large", "mvdiffusion": "wan2_1_14b"}
# The VFusion3D paper's LRM pretraining: 128 A100s for about 6 days.
PAPER = dict(model="lrm", chip="A100 80GB", devices=128, days=6.0)


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: float  # dense bf16 FLOP/s per chip
    hbm_bytes: float
    hbm: str  # as its maker states it


CHIPS = (
    Chip("TPU v5e", train_step.PEAK_FLOPS["TPU v5e"], 16 * GIB, "16 GiB"),
    Chip("TPU v5p", train_step.PEAK_FLOPS["TPU v5p"], 95 * GIB, "95 GiB"),
    Chip("A100 80GB", train_step.PEAK_FLOPS["NVIDIA A100-SXM4-80GB"], 80e9, "80 GB"),
    Chip("H100 SXM", train_step.PEAK_FLOPS["NVIDIA H100"], 80e9, "80 GB"),
)
CAVEATS = (
    "Memory is XLA:CPU's buffer assignment, an approximation of the TPU/GPU compilers' (fusion, layouts and "
    "rematerialisation differ; bf16 may be upcast on CPU); attention is XLA's default (materialised f32 "
    "scores), which a fused attention (cuDNN, TPU splash) shrinks. FLOPs are XLA-counted model FLOPs of this "
    "code, rematerialised forwards included. MFU is assumed, not measured. Fits = total per device ≤ "
    f"{1 - HEADROOM:.0%} of HBM.")


# --------------------------------------------------------------------------- configs and shapes


def parse_mesh(text: str) -> dict[str, int]:
    """Mesh axis sizes from "data=2,fsdp=-1,tensor=1" (axes left out: 1)."""
    mesh = {axis: 1 for axis in sharding.MESH_AXES}
    for item in filter(None, text.split(",")):
        axis, _, size = item.partition("=")
        if axis not in mesh:
            raise ValueError(f"unknown mesh axis {axis!r}; the axes are {sharding.MESH_AXES}")
        mesh[axis] = int(size)
    return mesh


def mesh_label(mesh: dict[str, int]) -> str:
    return ",".join(f"{axis}={size}" for axis, size in mesh.items())


def with_mesh(config: ml_collections.ConfigDict, mesh: dict[str, int]) -> ml_collections.ConfigDict:
    for axis, size in mesh.items():
        config.mesh.shape[axis] = size
    return config


def base_config(args) -> ml_collections.ConfigDict:
    if args.model == "lrm":
        return with_mesh(load_config(f"lrm.py:{args.variant}"), args.mesh)
    return mvd.bench_config(args.variant, None, None, None, mesh=args.mesh)


def data_parallel_size(config: ml_collections.ConfigDict, num_devices: int) -> int:
    """How many ways N devices split the batch under the config's mesh and rules (no jax devices needed)."""
    sizes = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh.shape, num_devices)))
    return sharding.data_parallel_size(sizes, sharding.logical_rules(config.mesh.logical_rules))


def slice_sizes(config: ml_collections.ConfigDict, sizes: list[int]) -> tuple[list[int], dict[int, str]]:
    """(sizes the mesh and global batch allow, {skipped size: why})."""
    usable, skipped = [], {}
    for size in sizes:
        try:
            parallel = data_parallel_size(config, size)
        except ValueError as error:
            skipped[size] = str(error)
            continue
        if config.data.batch_size % parallel:
            skipped[size] = (f"global batch {config.data.batch_size} is not divisible by the data-parallel size "
                             f"{parallel} of mesh {mesh_label(dict(config.mesh.shape))}")
        else:
            usable.append(size)
    return usable, skipped


@dataclasses.dataclass
class ShapeGroup:
    """Stages that feed the step batches of one shape: one compiled program."""

    stages: list[str]
    steps: int
    data: list[ml_collections.ConfigDict]  # each stage's input config
    shapes: dict  # model input → (global shape, dtype)

    @property
    def name(self) -> str:
        return "+".join(self.stages)


def stage_groups(config: ml_collections.ConfigDict, args) -> list[ShapeGroup]:
    groups: dict[tuple, ShapeGroup] = {}
    for stage in trainer.make_stages(config):
        if args.model == "lrm":
            one = train_step.synthetic_batch(stage, 1)  # shapes of one example; dtypes as the pipeline's
            shapes = {key: ((stage.data.batch_size,) + np.shape(value)[1:], np.float32) for key, value in one.items()}
        else:
            view = SimpleNamespace(data=stage.data, model=config.model, codec=config.codec)
            shapes = mvd.clip_shapes(view, latent_of(config, args), args.text_tokens)
        key = tuple(sorted((name, shape) for name, (shape, _) in shapes.items()))
        if key in groups:
            groups[key].stages.append(stage.name)
            groups[key].steps += stage.num_steps
            groups[key].data.append(stage.data)
        else:
            groups[key] = ShapeGroup([stage.name], stage.num_steps, [stage.data], shapes)
    return list(groups.values())


def latent_of(config: ml_collections.ConfigDict, args) -> bool:
    return mvd.uses_vae(config) if args.latent is None else args.latent


def describe_shapes(group: ShapeGroup, args) -> str:
    if args.model == "lrm":
        source, targets = group.shapes["source_image"][0], group.shapes["target_images"][0]
        renders = [f"{name} {'whole' if data.target_resolution == targets[2] else 'patches of'} "
                   f"{data.target_resolution} px renders" for name, data in zip(group.stages, group.data)]
        return (f"{targets[0]} × {targets[1]} views of {targets[2]} px ({', '.join(renders)}), "
                f"{source[1]} px source")
    clip, data = group.shapes["clip_images"][0], group.data[0]
    return (f"{clip[0]} × {data.num_frames} × {data.clip_resolution} px → latents "
            f"{'×'.join(map(str, clip[1:]))}, {group.shapes['caption_bytes'][0][1]} text tokens")


# --------------------------------------------------------------------------- compiling


def lpips_spec(config: ml_collections.ConfigDict, mesh):
    """`jax.ShapeDtypeStruct`s of the LPIPS weights the LRM loss takes (replicated), or None."""
    if not losses.uses_lpips(config.train.loss):
        return None
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=replicated),
                        metrics.load_lpips_params(config.train.loss.lpips_net))


def lrm_config(args, group: ShapeGroup, layer_counts: tuple[int, int] | None = None) -> ml_collections.ConfigDict:
    """The LRM config on `args.mesh`; with `layer_counts` (encoder, transformer), those depths and one ray
    chunk per object (no loop left for the FLOP count), else `--render_chunk` rays per chunk."""
    overrides = dict(train__render_chunk_size=args.render_chunk)
    if layer_counts is not None:
        _, views, height, width, _ = group.shapes["target_images"][0]
        overrides = dict(train__render_chunk_size=views * height * width,
                         model__encoder__num_layers=layer_counts[0], model__transformer__num_layers=layer_counts[1])
    return with_mesh(load_config(f"lrm.py:{args.variant}", **overrides), args.mesh)


def compile_lrm(config: ml_collections.ConfigDict, shapes: dict, devices, *, unroll: bool):
    """(compiled step, abstract state, compile seconds): shapes only, nothing allocated."""
    mesh = sharding.make_mesh(config.mesh.shape, devices)
    rules = sharding.logical_rules(config.mesh.logical_rules)
    with sharding.activate(mesh, rules), (mvd.unrolled_layer_scans() if unroll else contextlib.nullcontext()):
        _, state = trainer.abstract_train_state(config, mesh, rules)
        inputs = list(mvd.abstract_inputs(state, shapes, mesh, rules))
        inputs[4] = lpips_spec(config, mesh)
        step = trainer.make_train_step(config, state)
        start = time.perf_counter()
        compiled = step.lower(*inputs).compile()
    return compiled, state, time.perf_counter() - start


def lrm_counted_flops(args, group: ShapeGroup, devices) -> float:
    """FLOPs per device with every encoder layer, transformer layer and ray chunk counted (the docstring's
    two-stack extrapolation), or NaN when the four programs do not extrapolate."""
    full = lrm_config(args, group).model
    depths = (full.encoder.num_layers, full.transformer.num_layers)
    flops = {}
    for counts in ((1, 1), (2, 1), (1, 2), (2, 2)):
        config = lrm_config(args, group, counts)
        compiled = compile_lrm(config, group.shapes, devices, unroll=True)[0]
        flops[counts] = mvd.flops_of(compiled)
    encoder, transformer = flops[2, 1] - flops[1, 1], flops[1, 2] - flops[1, 1]
    interaction = flops[2, 2] - flops[2, 1] - flops[1, 2] + flops[1, 1]
    print(f"  N={len(devices)}: per-device GFLOP with (encoder, transformer) layers "
          f"{ {counts: round(value / 1e9, 1) for counts, value in flops.items()} }; per encoder layer "
          f"{encoder / 1e9:.1f}, per transformer layer {transformer / 1e9:.1f}, interaction {interaction / 1e9:.2f}",
          flush=True)
    if min(encoder, transformer) <= 0 or abs(interaction) > 0.02 * min(encoder, transformer):
        print("  inconsistent partitioning of the 1- and 2-layer programs: no counted FLOPs", flush=True)
        return math.nan
    return flops[1, 1] + (depths[0] - 1) * encoder + (depths[1] - 1) * transformer


RAW_AGREEMENT = 0.01  # --count_flops=adaptive reuses a count where the raw totals agree this closely


def count_flops(args, group: ShapeGroup, devices) -> float:
    """FLOPs per device of the step with every layer (and, for the LRM, ray chunk) counted."""
    if args.model == "lrm":
        return lrm_counted_flops(args, group, devices)
    data, latent = group.data[0], latent_of(base_config(args), args)
    flops_args = SimpleNamespace(batch=data.batch_size, frames=data.num_frames, resolution=data.clip_resolution,
                                 text_tokens=args.text_tokens)
    return mvd.counted_flops(args.variant, flops_args, latent, args.mesh, devices)[0]


def measure(args, group: ShapeGroup, num_devices: int, reference: dict | None) -> dict:
    """One slice size and stage shape: per-device bytes, FLOPs per step, seconds. `reference`: the row of
    the first size compiled for this stage shape, whose count `--count_flops=adaptive` may reuse."""
    devices = jax.devices()[:num_devices]
    start = time.perf_counter()
    if args.model == "lrm":
        config = lrm_config(args, group)
        compiled, state, compile_s = compile_lrm(config, group.shapes, devices, unroll=False)
    else:
        data, latent = group.data[0], latent_of(base_config(args), args)
        config = mvd.bench_config(args.variant, data.batch_size, data.num_frames, data.clip_resolution, mesh=args.mesh)
        compiled, state, _, compile_s = mvd.compile_step(config, latent, args.text_tokens, devices=devices)
    raw = mvd.flops_of(compiled) * num_devices
    ratio = raw / reference["raw_flops"] if reference and reference["raw_flops"] else math.nan
    if args.count_flops == "none":
        flops, source = math.nan, "not counted"
    elif args.count_flops == "adaptive" and reference and math.isnan(reference["flops"]):
        flops, source = math.nan, f"not counted (N={reference['devices']}'s count failed)"
    elif args.count_flops == "adaptive" and reference and abs(ratio - 1) <= RAW_AGREEMENT:
        flops, source = reference["flops"] * ratio, f"N={reference['devices']}'s × raw ratio {ratio:.4f}"
    else:
        flops = count_flops(args, group, devices) * num_devices
        source = "counted here" if not math.isnan(flops) else ("counted here: n/a, the programs of 1, 2 (and 3) "
                                                               "layers are partitioned differently")
    memory = compiled.memory_analysis()
    resolved = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh.shape, num_devices)))
    ema = 0 if state.ema_state is None else mvd.per_device_bytes(state.ema_state, state.ema_shardings)
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
             + memory.temp_size_in_bytes)
    return dict(
        devices=num_devices, group=group.name, mesh=resolved,
        per_device_batch=group.data[0].batch_size // data_parallel_size(config, num_devices),
        params_bytes=mvd.per_device_bytes(state.model_state, state.model_shardings),
        optimizer_bytes=mvd.per_device_bytes(state.optimizer_state, state.optimizer_shardings), ema_bytes=ema,
        argument_bytes=memory.argument_size_in_bytes, output_bytes=memory.output_size_in_bytes,
        alias_bytes=memory.alias_size_in_bytes, temp_bytes=memory.temp_size_in_bytes, total_bytes=total,
        raw_flops=raw, flops=flops, flops_source=source, compile_s=compile_s, seconds=time.perf_counter() - start)


# --------------------------------------------------------------------------- the plan


def plan(rows: list[dict], groups: list[ShapeGroup], mfu: float) -> list[dict]:
    """Per chip and compiled N: whether the step fits, its step time per stage shape and the days."""
    by_size: dict[int, dict[str, dict]] = {}
    for row in rows:
        by_size.setdefault(row["devices"], {})[row["group"]] = row
    entries = []
    for chip in CHIPS:
        for size, measured in sorted(by_size.items()):
            peak = max(row["total_bytes"] for row in measured.values())
            step_s = {name: row["flops"] / (size * chip.peak_flops * mfu) for name, row in measured.items()}
            days = sum(group.steps * step_s[group.name] for group in groups) / 86400
            entries.append(dict(chip=chip.name, devices=size, peak_bytes=peak,
                                fits=peak <= (1 - HEADROOM) * chip.hbm_bytes, step_s=step_s, days=days))
    return entries


def fmt_days(days: float) -> str:
    return "n/a" if math.isnan(days) else f"{days:.1f}" if days >= 1 else f"{days:.2f}"


def fmt_pflop(flops: float) -> str:
    return "n/a" if math.isnan(flops) else f"{flops / 1e15:.3f}"


def fmt_seconds(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds:.2f}" if seconds < 10 else f"{seconds:.0f}"


def tables(rows: list[dict], groups: list[ShapeGroup], entries: list[dict], skipped: dict[int, str], args) -> list[str]:
    """The Markdown of the measurements, the plan and the footer."""
    lines = ["Stages: " + "; ".join(f"{group.name} ({group.steps:,} steps): {describe_shapes(group, args)}"
                                    for group in groups), ""]
    lines += ["| N | mesh | stages | batch per device | params GiB | optimiser GiB | EMA GiB | argument / output / "
              "alias / temp GiB | total GiB per device | PFLOP per step (XLA raw / counted) | counted FLOPs from | "
              "s (its compiles) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['devices']} | {mesh_label(row['mesh'])} | {row['group']} | {row['per_device_batch']} | "
            f"{row['params_bytes'] / GIB:.2f} | {row['optimizer_bytes'] / GIB:.2f} | {row['ema_bytes'] / GIB:.2f} | "
            f"{row['argument_bytes'] / GIB:.2f} / {row['output_bytes'] / GIB:.2f} / {row['alias_bytes'] / GIB:.2f} / "
            f"{row['temp_bytes'] / GIB:.2f} | **{row['total_bytes'] / GIB:.2f}** | {row['raw_flops'] / 1e15:.3f} / "
            f"**{fmt_pflop(row['flops'])}** | {row['flops_source']} | {row['seconds']:.0f} |")
    for size, why in sorted(skipped.items()):
        lines.append(f"| {size} | skipped: {why} | | | | | | | | | | |")
    sizes = sorted({row["devices"] for row in rows})
    lines += ["", f"Plan at MFU {args.mfu:.0%} (assumed); fits = total per device ≤ {1 - HEADROOM:.0%} of HBM; "
              "days = Σ stages steps × step time:", "",
              "| chip | peak bf16 TFLOP/s | HBM | smallest N that fits | total per device there GiB | step s "
              "there | days there | days at N = " + ", ".join(map(str, sizes)) + " (× = does not fit) |",
              "|---|---|---|---|---|---|---|---|"]
    for chip in CHIPS:
        mine = [entry for entry in entries if entry["chip"] == chip.name]
        fitting = [entry for entry in mine if entry["fits"]]
        at_each = ", ".join(fmt_days(entry["days"]) if entry["fits"] else "×" for entry in mine)
        if fitting:
            best = fitting[0]
            step = " + ".join(fmt_seconds(value) for value in best["step_s"].values())
            lines.append(f"| {chip.name} | {chip.peak_flops / 1e12:.0f} | {chip.hbm} | **{best['devices']}** | "
                         f"{best['peak_bytes'] / GIB:.1f} | {step} | **{fmt_days(best['days'])}** | {at_each} |")
        else:
            lines.append(f"| {chip.name} | {chip.peak_flops / 1e12:.0f} | {chip.hbm} | none of {sizes} | | | | "
                         f"{at_each} |")
    lines.append("")
    if args.model == PAPER["model"]:
        paper = next((entry for entry in entries
                      if entry["chip"] == PAPER["chip"] and entry["devices"] == PAPER["devices"]), None)
        if paper is None:
            lines.append(f"Reference: the VFusion3D paper trained the LRM on {PAPER['devices']} A100s for about "
                         f"{PAPER['days']:g} days; {PAPER['devices']} is not among the sizes compiled here.")
        else:
            lines.append(f"Reference: the VFusion3D paper trained the LRM on {PAPER['devices']} A100s for about "
                         f"{PAPER['days']:g} days; this estimate for {PAPER['devices']} × {PAPER['chip']} at MFU "
                         f"{args.mfu:.0%}: **{fmt_days(paper['days'])} days** ("
                         f"{'fits' if paper['fits'] else 'does not fit'}: {paper['peak_bytes'] / GIB:.1f} GiB per "
                         "device)" + ("" if math.isnan(paper["days"]) else
                                      f"; {PAPER['days']:g} days would be MFU "
                                      f"{args.mfu * paper['days'] / PAPER['days']:.1%} (the paper's own batch and "
                                      "step counts may differ from this config's)") + ".")
        lines.append("")
    lines.append("Caveats: " + CAVEATS)
    return lines


def block_heading(args) -> str:
    options = []
    if args.model == "lrm" and args.render_chunk != 4096:
        options.append(f"{args.render_chunk} rays per chunk")
    if args.model == "mvdiffusion":
        options.append(f"{args.text_tokens} text tokens")
    return f"### {args.model}:{args.variant}, mesh {mesh_label(args.mesh)}" + "".join(f", {o}" for o in options)


def record(heading: str, body: list[str]) -> None:
    """Puts `heading` + `body` in the section of RESULTS.md, replacing a block with the same heading."""
    lines = RESULTS.read_text().splitlines()
    if SECTION not in lines:
        lines += ["", SECTION, "", SECTION_INTRO]
    section = lines.index(SECTION)
    end = next((i for i in range(section + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    block = [heading, ""] + body
    if heading in lines[section:end]:
        start = lines.index(heading, section)
        stop = next((i for i in range(start + 1, end) if lines[i].startswith(("### ", "## "))), end)
        while stop > start + 1 and not lines[stop - 1].strip():
            stop -= 1
        lines[start:stop] = block
    else:
        while end > section + 1 and not lines[end - 1].strip():
            end -= 1
        lines[end:end] = [""] + block + ([""] if end < len(lines) else [])
    RESULTS.write_text("\n".join(lines) + "\n")
    print(f"recorded under {heading!r} in {RESULTS}")


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lrm", choices=sorted(DEFAULT_VARIANTS))
    parser.add_argument("--variant", default=None, help="config variant (default: lrm large, mvdiffusion wan2_1_14b)")
    parser.add_argument("--devices", default="8,16,32,64,128", help="comma-separated slice sizes to compile")
    parser.add_argument("--mesh", default="data=1,fsdp=-1,tensor=1",
                        help="mesh axis sizes, one may be -1 (default: FSDP over all devices)")
    parser.add_argument("--mfu", type=float, default=0.35, help="model FLOPs utilisation assumed for the plan")
    parser.add_argument("--render_chunk", type=int, default=4096, help="LRM: rays per render chunk (memory program)")
    parser.add_argument("--text_tokens", type=int, default=512, help="diffusion: umT5 tokens per caption")
    parser.add_argument("--latent", action=argparse.BooleanOptionalAction, default=None,
                        help="diffusion: cached latents and text embeddings (default: for VAE variants)")
    parser.add_argument("--count_flops", default="adaptive", choices=("adaptive", "each", "none"),
                        help="compile the unrolled programs that count every layer's FLOPs at the first size only "
                             "(reused where the raw totals agree), at each size, or nowhere (no step times)")
    parser.add_argument("--record", action="store_true", help=f"put the tables in {RESULTS.name}")
    parser.add_argument("--command_line", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.variant = args.variant or DEFAULT_VARIANTS[args.model]
    args.mesh = parse_mesh(args.mesh)
    config = base_config(args)
    sizes, skipped = slice_sizes(config, sorted({int(size) for size in args.devices.split(",") if size}))
    if not sizes:
        sys.exit(f"no slice size of {args.devices} fits the mesh and global batch: {skipped}")
    if not os.environ.get(mvd.CHILD_ENV):
        start = time.perf_counter()
        code = mvd.rerun_on_cpu_devices(__file__, max(sizes),
                                        sys.argv[1:] + [f"--command_line={mvd.command_line(args)}"])
        print(f"done in {time.perf_counter() - start:.0f} s")
        sys.exit(code)

    start = time.perf_counter()
    print(f"jax {jax.__version__}, {jax.device_count()} fake {jax.devices()[0].platform} devices, "
          f"load {os.getloadavg()[0]:.1f}; {args.model}:{args.variant}, mesh {mesh_label(args.mesh)}, sizes {sizes}"
          + (f", skipped {sorted(skipped)}" if skipped else ""), flush=True)
    groups = stage_groups(config, args)
    rows = []
    for size in sizes:
        for group in groups:
            reference = next((row for row in rows if row["group"] == group.name), None)
            row = measure(args, group, size, reference)
            rows.append(row)
            print(f"N={size} {group.name}: total {row['total_bytes'] / GIB:.2f} GiB per device (temp "
                  f"{row['temp_bytes'] / GIB:.2f}), {row['flops'] / 1e15:.3f} PFLOP per step counted "
                  f"({row['raw_flops'] / 1e15:.3f} raw; {row['flops_source']}); {row['seconds']:.0f} s", flush=True)
    entries = plan(rows, groups, args.mfu)
    elapsed = time.perf_counter() - start
    heading = block_heading(args)
    body = [f"{datetime.date.today()}, {os.cpu_count()} CPU cores (load {os.getloadavg()[0]:.1f}), "
            f"{elapsed / 60:.1f} min: `{mvd.command_line(args)}`", ""] + tables(rows, groups, entries, skipped, args)
    print("\n" + heading + "\n\n" + "\n".join(body))
    print(json.dumps(dict(rows=rows, plan=entries, skipped=skipped, elapsed_s=elapsed), default=str))
    if args.record:
        record(heading, body)


if __name__ == "__main__":
    main()
