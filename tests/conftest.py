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


@pytest.fixture(scope="session")
def reference():
    """The official VFusion3D reference arrays (see tests/fixtures/vfusion3d_reference/README.md)."""
    return dict(np.load(FIXTURE_DIR / "reference.npz"))
