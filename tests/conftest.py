"""Shared test setup: 8 fake CPU devices (sharding tests), float32 matmuls, fixture paths."""

import os
import subprocess
import sys

# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path

import jax
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

# The official code's outputs on a tiny random model; part of the repository (see its README.md).
FIXTURE_DIR = Path(__file__).resolve().parent / "fixtures" / "vfusion3d_reference"
# diffusers' Wan outputs on tiny random weights, float32 and float64 (see its README.md).
WAN_FIXTURE_DIR = Path(__file__).resolve().parent / "fixtures" / "wan_reference"
# Our float32 error may exceed diffusers' float32 error by this factor: both round at every
# operation, in different orders and with different kernels (exp, sin, matmul and convolution blocking).
SPREAD_MULTIPLE = 4.0


def float32_spread(reference: dict, key: str) -> float:
    """Max |float32 - float64| of diffusers' own runs on the fixture's tensor `key`."""
    return float(np.max(np.abs(reference[f"float32/{key}"].astype(np.float64) - reference[f"float64/{key}"])))


def assert_matches_diffusers(reference: dict, ours: dict, keys, label: str) -> None:
    """Each `ours[key]` has the fixture's shape and lies within SPREAD_MULTIPLE x diffusers' own
    float32 spread of its float64 result."""
    for key in sorted(keys):
        reference64 = reference[f"float64/{key}"]
        actual = np.asarray(ours[key], np.float64)
        assert actual.shape == reference64.shape, key
        spread = float32_spread(reference, key)
        error = np.max(np.abs(actual - reference64))
        assert error <= SPREAD_MULTIPLE * spread, (
            f"{label} {key}: max |ours - float64| {error:.3g} > {SPREAD_MULTIPLE} x diffusers' float32 spread "
            f"{spread:.3g}")


@pytest.fixture(scope="session")
def reference():
    """The official VFusion3D reference arrays (see tests/fixtures/vfusion3d_reference/README.md)."""
    return dict(np.load(FIXTURE_DIR / "reference.npz"))


def first_batch(config) -> dict:
    """The model inputs of the first batch of `config`'s first training stage (host arrays)."""
    from vfusion3d_jax.data import pipeline
    from vfusion3d_jax.train import trainer

    return trainer.model_inputs(config, next(pipeline.make_iterator(trainer.make_stages(config)[0].data)))


def init_train_state(config, mesh):
    """`config`'s initial train state on `mesh`, and the logical rules it was placed with."""
    from vfusion3d_jax.train import sharding, trainer

    rules = sharding.logical_rules(config.mesh.logical_rules)
    with sharding.activate(mesh, rules):
        create, abstract = trainer.abstract_train_state(config, mesh, rules)
        return trainer.initialize_train_state(create, abstract), rules


def single_device_mesh():
    from vfusion3d_jax.train import sharding

    return sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])



def save_random_lrm(root: Path, seed: int = 0) -> str:
    """A random `fixture`-size LRM (64 px source views) saved in the training/convert checkpoint
    layout under `root`; its path."""
    from flax import nnx

    from vfusion3d_jax.configs import load_config
    from vfusion3d_jax.models import convert
    from vfusion3d_jax.models.lrm import LRM

    config = load_config("lrm.py:fixture")
    convert.save_checkpoint(root, nnx.to_pure_dict(nnx.state(LRM(config.model, rngs=nnx.Rngs(seed)), nnx.Param)),
                            config)
    return str(root)


def write_orbit_folder(root: Path, splits: dict[str, tuple[int, int]], *, num_views: int, resolution: int,
                       seed: int = 0, source=lambda index: "rendered") -> Path:
    """A `render-data`-like folder of random orbits: root/shards/<split>-<k>-of-<n>.tfrecord, where
    splits[split] = (n shards, orbits per shard), drawn from one generator in split, shard, orbit
    order; `source(i)` names the i-th orbit of a shard's `object/source`."""
    from vfusion3d_jax.data import example, tfrecord

    (root / "shards").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, (shards, per_shard) in splits.items():
        for shard in range(shards):
            with tfrecord.TFRecordWriter(root / "shards" / f"{split}-{shard:05d}-of-{shards:05d}.tfrecord") as writer:
                for index in range(per_shard):
                    writer.write(example.encode_orbit(**example.random_orbit(
                        rng, num_views=num_views, resolution=resolution, source=source(index))))
    return root


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """`python -m vfusion3d_jax ARGS` in a subprocess on one CPU device, as a user runs it (the tests'
    8 fake devices are for sharding)."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "vfusion3d_jax", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=env, cwd=cwd)


# The multi-view diffusion run of `mvdiffusion_checkpoint`: 4 frames of 16 px, 2 blocks, 2 sampling steps.
MVDIFFUSION_FRAMES, MVDIFFUSION_RESOLUTION = 4, 16
_MVDIFFUSION_TRAINING = (
    "--config.data.num_frames=4", "--config.data.clip_resolution=16", "--config.data.batch_size=2",
    "--config.data.read_threads=1", "--config.data.read_buffer_size=2", "--config.model.num_layers=2",
    "--config.conditioning.text_encoder.num_layers=1", "--config.train.stages.main.num_steps=3",
    "--config.train.optimizer.warmup_steps=1", "--config.eval.every=0", "--config.sample.num_steps=2",
)


@pytest.fixture(scope="session")
def mvdiffusion_checkpoint(tmp_path_factory) -> str:
    """A 3-step `train --config=configs/mvdiffusion.py:tiny` run (made smaller) on 4 procedural
    objects' orbits (16 px, 8 views), through the command line; its workdir. Barely trained: for
    the plumbing of `sample` and `generate`, not the orbits' quality."""
    from vfusion3d_jax.configs import load_config
    from vfusion3d_jax.data.render_assets import render_dataset

    root = tmp_path_factory.mktemp("mvdiffusion")
    data = load_config("data.py:tiny", assets="procedural", num_procedural=4, num_views=8,
                       resolution=MVDIFFUSION_RESOLUTION, supersample=1, num_surface_points=0, holdout_fraction=0.0,
                       num_workers=1)
    render_dataset(data, str(root / "data"), [])
    result = run_cli("train", "--config=configs/mvdiffusion.py:tiny", f"--config.data_dir={root / 'data'}",
                     *_MVDIFFUSION_TRAINING, f"--workdir={root / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    return str(root / "run")


# FlexRM micro with a 2-step Gaussian stage, no LPIPS, evaluation at the end of every run.
FLEXRM_MICRO_TRAINING = (
    "--config=configs/flexrm.py:micro", "--config.data.read_threads=1", "--config.data.read_buffer_size=2",
    "--config.train.stages.nerf.num_steps=0", "--config.train.stages.gaussians.num_steps=2",
    "--config.train.loss.lpips.rendered=0.0", "--config.train.loss.lpips.synthetic=0.0",
    "--config.train.log_every=1", "--config.train.checkpoint_every=100", "--config.eval.every=100",
    "--config.eval.num_batches=1",
)


@pytest.fixture(scope="session")
def flexrm_run(tmp_path_factory) -> tuple[Path, Path]:
    """(data folder, workdir) of a 2-step `train --config=configs/flexrm.py:micro` run through the
    command line on 6 training and 2 held-out random orbits of 6 views at 32 px. Barely trained:
    for the plumbing of training and of `infer --config=configs/infer.py:flexiview`. Read-only."""
    root = tmp_path_factory.mktemp("flexrm")
    data = write_orbit_folder(root / "data", {"train": (1, 6), "holdout": (1, 2)}, num_views=6, resolution=32)
    result = run_cli("train", *FLEXRM_MICRO_TRAINING, f"--config.data_dir={data}", f"--workdir={root / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FlexRM (micro)" in result.stdout
    return data, root / "run"
