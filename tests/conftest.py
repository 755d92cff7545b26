"""Shared test setup: 8 fake CPU devices (sharding tests), float32 matmuls, fixture paths."""

import os

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

