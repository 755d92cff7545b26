"""Training FlexRM with the project's trainer (`config.task = "flexrm"`, train/flexrm_task.py).

End to end through the command line on a few made-up orbits (`micro`, shrunk further): train,
evaluate, checkpoint, resume; NeRF then Gaussians in one run. And the loss itself on a known
scene: Gaussians that made the targets score (almost) zero, random ones do not, also when the
targets are patches rendered with the patch cameras.
"""

from __future__ import annotations

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import logging
from conftest import FLEXRM_MICRO_TRAINING, run_cli

from vfusion3d_jax import cameras
from vfusion3d_jax.configs import load_config
from vfusion3d_jax.data import pipeline
from vfusion3d_jax.models import flexrm
from vfusion3d_jax.models.flexrm import Gaussians
from vfusion3d_jax.rendering import splatting
from vfusion3d_jax.train import flexrm_task, trainer

# The modules that use the session's FlexRM micro run (conftest `flexrm_run`) share a test worker,
# so the run is trained once.
pytestmark = pytest.mark.xdist_group("flexrm_run")

MICRO_TRAINING = FLEXRM_MICRO_TRAINING


@pytest.fixture(scope="module")
def data_dir(flexrm_run):
    return flexrm_run[0]


def _records(workdir, split: str) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["split"] == split]


def _assert_finite_train_steps(workdir, steps) -> list[dict]:
    train = _records(workdir, "train")
    assert [record["step"] for record in train] == list(steps)
    for record in train:
        assert math.isfinite(record["loss"]) and math.isfinite(record["mse"]) and math.isfinite(record["opacity"])
    return train


# --------------------------------------------------------------------------- the command line


def test_micro_trains_evaluates_and_resumes(flexrm_run, tmp_path):
    data_dir, trained = flexrm_run
    train = _assert_finite_train_steps(trained, [1, 2])
    for record in train:  # every Gaussian step reports the rasteriser's capacity use
        assert record["splat_overflow"] == 0 and record["splat_overflow_steps"] == 0
        assert 0 < record["splat_max_tile_count"] <= record["splat_num_intersections"]
    evals = _records(trained, "eval")
    assert [record["step"] for record in evals] == [0, 2]
    for key in ("psnr", "fg_psnr", "iou", "ssim", "lpips"):
        assert math.isfinite(evals[-1][key]), key
    assert (trained / "eval" / "eval_step_0000002.png").exists()
    assert (trained / "checkpoints" / "2").is_dir()

    # One more step (evaluation off, to save its compilation), in a copy of the shared run: it
    # resumes at step 2 from its checkpoint and trains step 3 only.
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    result = run_cli("train", *MICRO_TRAINING, "--config.train.stages.gaussians.num_steps=3", "--config.eval.every=0",
                     f"--config.data_dir={data_dir}", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_finite_train_steps(workdir, [1, 2, 3])
    assert [record["step"] for record in _records(workdir, "eval")] == [0, 2]
    assert (workdir / "checkpoints" / "3").is_dir()


@pytest.mark.slow
def test_nerf_stage_then_gaussian_stage(data_dir, tmp_path):
    workdir = tmp_path / "run"
    result = run_cli("train", *MICRO_TRAINING, "--config.train.stages.nerf.num_steps=2",
                     "--config.train.stages.nerf.target_resolution=16", "--config.render.num_coarse=4",
                     "--config.render.num_importance=4", "--config.eval.every=0",
                     f"--config.data_dir={data_dir}", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    train = _assert_finite_train_steps(workdir, [1, 2, 3, 4])
    # The NeRF steps render no Gaussians; the Gaussian steps report the rasteriser.
    assert [("splat_overflow" in record) for record in train] == [False, False, True, True]


# --------------------------------------------------------------------------- stages and monitor


def test_renderer_is_a_stage_option_not_a_data_field():
    config = load_config("flexrm.py:tiny")
    nerf, gaussians = trainer.make_stages(config)
    assert nerf.options == (("renderer", "nerf"),) and gaussians.options == (("renderer", "gaussians"),)
    assert "renderer" not in nerf.data and nerf.data.target_resolution == 32 and gaussians.data.target_resolution == 64
    assert nerf.data.num_input_views == 4 and nerf.data.min_input_views == 1
    # The LRM's stages have no options: one train step serves all of them, as before.
    assert all(stage.options == () for stage in trainer.make_stages(load_config("lrm.py:tiny")))
    with pytest.raises(ValueError, match="renderer"):
        flexrm_task.loss_fn(config, renderer="mesh")
    with pytest.raises(ValueError, match="view bucket"):
        flexrm_task.create_model(load_config("flexrm.py:micro", data__num_input_views=3), None)
    with pytest.raises(ValueError, match="stages.nerf.renderer"):
        flexrm_task.create_model(load_config("flexrm.py:micro", train__stages__nerf__renderer="mesh"), None)
    # Evaluation keeps the first eval.num_input_views of the (all valid) input views.
    config.eval.num_input_views = 2
    assert flexrm_task.eval_view_mask(config, jnp.ones((2, 4), bool)).tolist() == [[True, True, False, False]] * 2
    config.eval.num_input_views = 5
    with pytest.raises(ValueError, match="num_input_views"):
        flexrm_task.eval_view_mask(config, jnp.ones((2, 4), bool))


def test_overflow_is_warned_and_counted_or_stops(monkeypatch):
    config = load_config("flexrm.py:micro")
    settings = flexrm.splat_settings(config)
    warnings = []
    monkeypatch.setattr(logging, "warning", lambda message, *args: warnings.append(message % args))
    monitor = flexrm_task.step_monitor(config)
    fine = dict(splat_overflow=0.0, splat_num_intersections=100.0, splat_max_tile_count=50.0)
    over = dict(splat_overflow=3.0, splat_num_intersections=2.0 * settings.max_intersections,
                splat_max_tile_count=50.0)
    counts = []
    for step, values in enumerate([fine, over, {"loss": 1.0}, fine, over], start=1):
        values = dict(values)
        monitor(step, values)
        counts.append(values.get("splat_overflow_steps"))
    assert counts == [0, 1, None, 1, 2]  # NeRF steps (no splat metrics) are left alone
    assert len(warnings) == 2 and "training step 2: 3 Gaussian render(s) incomplete" in warnings[0]
    assert f"max_intersections={2 * settings.max_intersections}" in warnings[0]
    config.train.splat_overflow = "stop"
    with pytest.raises(splatting.SplatCapacityError, match="max_intersections"):
        flexrm_task.step_monitor(config)(1, dict(over))


# --------------------------------------------------------------------------- the loss


def test_input_noise_touches_only_valid_non_reference_views():
    images = jnp.full((64, 4, 6, 6, 3), 0.5)
    mask = jnp.asarray(np.arange(4) < np.random.default_rng(0).integers(1, 5, size=(64, 1)))
    noisy = np.asarray(flexrm_task.add_input_noise(jax.random.key(0), images, mask, 0.5, 0.1))
    changed = np.any(noisy != 0.5, axis=(2, 3, 4))  # (64, 4)
    assert not changed[:, 0].any()  # the reference view stays clean
    assert not changed[~np.asarray(mask)].any()  # so do masked views
    noisy_examples = changed.any(axis=1)
    eligible = np.asarray(mask)[:, 1:].any(axis=1)
    assert 0.25 < noisy_examples[eligible].mean() < 0.75  # about half of the examples that can be
    # A chosen example gets noise on every valid non-reference view.
    assert np.array_equal(changed[noisy_examples, 1:], np.asarray(mask)[noisy_examples, 1:])
    assert noisy.min() >= 0 and noisy.max() <= 1
    always = np.asarray(flexrm_task.add_input_noise(jax.random.key(1), images, mask, 1.0, 0.1))
    assert np.array_equal(np.any(always != 0.5, axis=(2, 3, 4))[:, 1:], np.asarray(mask)[:, 1:])
    assert np.array_equal(flexrm_task.add_input_noise(jax.random.key(1), images, mask, 0.0, 0.1), images)


class _FixedGaussians:
    """Stands in for FlexRM in `loss_fn`: whatever the views, these Gaussians."""

    def __init__(self, gaussians: Gaussians, channels: int):
        self.fixed, self.channels = gaussians, channels

    def forward_planes(self, images, input_cameras, view_mask):
        return jnp.zeros((images.shape[0], 3, self.channels, 4, 4)) + 0.0 * jnp.mean(images)

    def gaussians(self, planes):
        return self.fixed


def _ball(seed: int, count: int = 256, colored: bool = True) -> Gaussians:
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=(count, 3))
    means = 0.45 * direction / np.linalg.norm(direction, axis=1, keepdims=True) * rng.uniform(0.5, 1, (count, 1))
    colors = np.clip(means / 0.9 + 0.5, 0, 1) if colored else rng.uniform(size=(count, 3))
    return Gaussians(means=jnp.asarray(means[None], jnp.float32),
                     quats=jnp.tile(jnp.array([1.0, 0, 0, 0]), (1, count, 1)), scales=jnp.full((1, count, 3), 0.08), opacities=jnp.full((1, count), 0.8),
                     colors=jnp.asarray(colors[None], jnp.float32))


def test_loss_is_near_zero_for_the_gaussians_that_made_the_targets():
    """Targets: 16 px patches of 32 px renders of a known object; the loss renders the patch
    cameras at the patch side, so the true Gaussians reproduce the crops exactly."""
    config = load_config("flexrm.py:micro", train__loss__lpips__rendered=0.0, train__loss__lpips__synthetic=0.0,
                         train__loss__tv=0.0, train__input_noise__probability=1.0)
    settings = flexrm.splat_settings(config)
    full, patch = 32, 16
    intrinsics = cameras.intrinsics_matrix(*cameras.DEFAULT_INTRINSICS)
    cam2world = cameras.orbit_cam2world(np.array([20.0, 140.0]), 25.0, 1.6)
    target_cameras = cameras.render_camera(cam2world, intrinsics)[None]  # (1, 2, 25)
    offsets = np.array([[8, 4], [0, 16]])
    patch_cameras = cameras.render_camera(
        cam2world, pipeline.patch_intrinsics(np.stack([intrinsics] * 2), full, patch, offsets))[None]
    truth = _ball(0)
    images, alphas, _ = flexrm.render_gaussians(truth, jnp.asarray(target_cameras), full, settings)
    crop = lambda x: np.stack([x[0, k, r:r + patch, c:c + patch] for k, (r, c) in enumerate(offsets)])[None]
    size = config.view_resolution
    batch = dict(input_images=jnp.full((1, 2, size, size, 3), 0.5), input_cameras=jnp.zeros((1, 2, 16)),
                 input_mask=jnp.array([[True, True]]), target_images=jnp.asarray(crop(np.asarray(images))),
                 target_masks=jnp.asarray(crop(np.asarray(alphas))), target_cameras=jnp.asarray(target_cameras),
                 target_patch_cameras=jnp.asarray(patch_cameras), is_synthetic=jnp.zeros(1))
    assert 0.05 < float(jnp.mean(batch["target_masks"])) < 0.95  # the patches hold object and background
    loss = flexrm_task.loss_fn(config, renderer="gaussians")

    @jax.jit
    def evaluate(gaussians):
        model = _FixedGaussians(gaussians, config.model.triplane_dim)
        return loss(model, batch, jax.random.key(0), None)

    true_loss, true_terms = evaluate(truth)
    moved = truth.replace(means=truth.means + jnp.array([0.12, 0.0, 0.0]))
    for other in (_ball(1, colored=False), moved):
        other_loss, other_terms = evaluate(other)
        assert float(other_loss) > 100 * float(true_loss) and float(other_loss) > 1e-2
        assert float(other_terms["opacity"]) > float(true_terms["opacity"])
    assert float(true_loss) < 1e-4 and float(true_terms["opacity"]) < 1e-4
    assert float(true_terms["splat_overflow"]) == 0 and float(true_terms["splat_num_intersections"]) > 0
