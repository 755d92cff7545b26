"""Training the tiny LRM for real: TFRecords on disk → Grain → sharded jitted steps → Orbax checkpoints.

The end-to-end tests shrink `configs/lrm.py:tiny` further (`small_config`); the
single-device step is compiled once per module and shared (`single_device`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import first_batch, init_train_state, single_device_mesh, write_orbit_folder
from flax import nnx
from skimage.metrics import structural_similarity

from vfusion3d_jax import cameras
from vfusion3d_jax.configs import load_config
from vfusion3d_jax.data import example, pipeline
from vfusion3d_jax.models import LRM, convert
from vfusion3d_jax.train import checkpointing, losses, lrm_task, metrics, optimizer, sharding, trainer

NUM_TRAIN, NUM_HELD_OUT = 8, 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A `render-data`-like directory: shards/train-*.tfrecord and shards/holdout-*.tfrecord."""
    return str(write_orbit_folder(tmp_path_factory.mktemp("orbits"),
                                  {"train": (1, NUM_TRAIN), "holdout": (1, NUM_HELD_OUT)}, num_views=6, resolution=32,
                                  source=lambda i: "synthetic" if i % 2 else "rendered"))


def small_config(data_dir: str, **overrides):
    """The tiny variant made smaller still, and the same for every end-to-end test (one program to compile).

    Two stages of 16 px renders (4 + 16 steps; 16 px patches of 32 px renders in the second),
    4 examples of 2 views, 8 + 8 samples, no LPIPS, no evaluation; mesh data=2, fsdp=2, tensor=2
    over the 8 fake devices.
    """
    fields = dict(
        data_dir=data_dir,
        data__batch_size=4,
        data__read_threads=1,
        data__read_buffer_size=4,
        mesh__shape__data=2,
        mesh__shape__fsdp=2,
        mesh__shape__tensor=2,
        render__num_coarse=8,
        render__num_importance=8,
        train__stages__low_res__num_steps=4,
        train__stages__low_res__target_resolution=16,
        train__stages__low_res__num_target_views=2,
        train__stages__high_res__num_steps=16,
        train__stages__high_res__target_resolution=32,
        train__stages__high_res__patch_size=16,
        train__stages__high_res__num_target_views=2,
        train__stages__finetune__num_steps=0,
        train__loss__lpips__rendered=0.0,
        train__loss__lpips__synthetic=0.0,
        train__optimizer__learning_rate=2e-3,
        train__optimizer__warmup_steps=2,
        train__log_every=1,
        eval__every=0,
    )
    fields.update(overrides)
    return load_config("lrm.py:tiny", **fields)


def _params(state: trainer.TrainState) -> dict:
    return jax.device_get(nnx.to_pure_dict(state.model_state))


# --------------------------------------------------------------------------- sharding


def test_mesh_and_rules_from_config():
    assert sharding.mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 2)
    assert sharding.mesh_shape({"fsdp": -1}, 8) == (1, 8, 1)
    with pytest.raises(ValueError, match="needs 4 devices"):
        sharding.mesh_shape({"data": 2, "tensor": 2}, 8)
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.mesh_shape({"model": 8}, 8)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    rules = sharding.logical_rules(load_config("lrm.py:tiny").mesh.logical_rules)
    assert sharding.batch_spec(rules) == jax.sharding.PartitionSpec(("data", "fsdp"))
    assert sharding.data_parallel_size(mesh.shape, rules) == 8
    with pytest.raises(ValueError, match="unknown mesh axis"):
        sharding.logical_rules([("embed", "model")])


def test_specs_that_do_not_divide_are_replicated():
    mesh = sharding.make_mesh({"fsdp": 8})
    spec = jax.sharding.PartitionSpec
    assert sharding.fit_spec(spec("fsdp", None), (16, 3), mesh) == spec("fsdp", None)
    assert sharding.fit_spec(spec("fsdp", None), (3, 16), mesh) == spec(None, None)
    assert sharding.fit_spec(spec("fsdp", "fsdp"), (16, 16), mesh) == spec("fsdp", None)  # one use per axis


# --------------------------------------------------------------------------- metrics


def test_metrics_known_answers():
    rng = np.random.default_rng(0)
    images = rng.uniform(0.1, 0.9, size=(2, 40, 40, 3)).astype(np.float32)
    assert np.all(np.isinf(metrics.psnr(images, images)))
    np.testing.assert_allclose(metrics.ssim(images, images), 1.0, atol=1e-6)
    # A uniform error of 0.1 is an MSE of 0.01: exactly 20 dB.
    np.testing.assert_allclose(metrics.psnr(images + 0.1, images), 20.0, atol=1e-4)
    noisy = np.clip(images + rng.normal(0.0, 0.05, images.shape), 0, 1).astype(np.float32)
    expected = [structural_similarity(noisy[i], images[i], gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False, data_range=1.0, channel_axis=-1) for i in range(2)]
    np.testing.assert_allclose(metrics.ssim(noisy, images), expected, atol=1e-5)


def test_foreground_metrics_known_answers():
    references = np.ones((1, 10, 10, 3), np.float32)  # white, with a 4 x 5 grey object
    masks = np.zeros((1, 10, 10, 1), np.float32)
    references[:, 2:6, 2:7], masks[:, 2:6, 2:7] = 0.5, 1.0
    images, opacity = references.copy(), masks.copy()
    images[:, 2:6, 2:7] += 0.1  # an error of 0.1 on the object only: 20 dB there, 20 + 10 log10(5) overall
    np.testing.assert_allclose(metrics.foreground_psnr(images, references, opacity, masks), 20.0, atol=1e-4)
    np.testing.assert_allclose(metrics.psnr(images, references), 20.0 + 10 * np.log10(5), atol=1e-4)
    # The rendered silhouette one column wider: 20 of 24 pixels shared; the extra column (white on
    # white, no error) joins the foreground too.
    opacity[:, 2:6, 7] = 1.0
    np.testing.assert_allclose(metrics.silhouette_iou(opacity, masks), 20 / 24, atol=1e-6)
    np.testing.assert_allclose(metrics.foreground_psnr(images, references, opacity, masks),
                               -10 * np.log10(0.01 * 20 / 24), atol=1e-4)
    empty = np.zeros_like(masks)
    assert np.isnan(metrics.foreground_psnr(references, references, empty, empty)[0])
    assert metrics.silhouette_iou(empty, empty)[0] == 1.0


def test_input_swap_known_answers():
    scores = np.array([[20.0, 10.0, 12.0], [11.0, 18.0, 19.0], [9.0, 9.0, 15.0]])
    result = metrics.input_swap(scores)
    np.testing.assert_allclose(result["gain"], [20 - 11, 18 - 15, 15 - 9])
    np.testing.assert_array_equal(result["retrieved"], [True, False, True])
    same = metrics.input_swap(np.full((4, 4), 12.0))  # the input makes no difference: ties never retrieve
    assert np.all(same["gain"] == 0.0) and not np.any(same["retrieved"])
    with pytest.raises(ValueError, match="N >= 2"):
        metrics.input_swap(np.ones((1, 1)))


def test_lpips_pretrained_weights():
    yy, xx = np.mgrid[0:64, 0:64] / 63.0
    smooth = np.stack([xx, yy, (xx + yy) / 2], axis=-1)[None].astype(np.float32)
    rng = np.random.default_rng(0)
    params = metrics.load_lpips_params("alexnet")
    np.testing.assert_allclose(metrics.lpips(params, smooth, smooth), 0.0, atol=1e-6)
    distances = [float(metrics.lpips(params, np.clip(smooth + rng.normal(0, sigma, smooth.shape), 0, 1)
                                     .astype(np.float32), smooth)[0]) for sigma in (0.02, 0.1, 0.4)]
    assert distances[0] < distances[1] < distances[2]
    # Pretrained, not random: the heads' weights are the published non-negative ones and strong
    # noise is a large perceptual distance.
    assert 0.5 < distances[2] < 1.2
    with pytest.raises(ValueError, match="at least 32"):
        metrics.lpips(params, smooth[:, :16, :16], smooth[:, :16, :16])


# --------------------------------------------------------------------------- losses and optimiser


def test_losses_weight_sources_separately():
    config = load_config("lrm.py:tiny").train.loss
    targets = jnp.zeros((2, 1, 4, 4, 3))
    rendered = dict(rgb=jnp.full((2, 1, 4, 4, 3), 0.5), opacity=jnp.ones((2, 1, 4, 4, 1)),
                    planes=jnp.zeros((2, 3, 2, 4, 4)))
    masks = jnp.ones((2, 1, 4, 4, 1))
    with config.unlocked():
        config.lpips.rendered = config.lpips.synthetic = 0.0
    rendered_only, _ = losses.lrm_loss(rendered, targets, masks, jnp.array([0.0, 0.0]), lpips_params=None,
                                       config=config)
    synthetic_only, terms = losses.lrm_loss(rendered, targets, masks, jnp.array([1.0, 1.0]), lpips_params=None,
                                            config=config)
    np.testing.assert_allclose(rendered_only, 0.25)  # MSE 0.25, opacity 0, TV 0
    np.testing.assert_allclose(synthetic_only, 0.0)  # the pixel loss is off for synthetic orbits
    np.testing.assert_allclose(terms["mse"], 0.25)
    planes = jnp.zeros((1, 3, 1, 4, 4)).at[..., ::2, :].set(1.0)
    np.testing.assert_allclose(losses.triplane_tv(planes), 1.0)  # every row step changes by 1


def test_weight_decay_mask_spares_norms_and_biases():
    model = nnx.eval_shape(lambda: LRM(load_config("lrm.py:tiny").model, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    mask = optimizer.weight_decay_mask(params)
    flat = {jax.tree_util.keystr(path): value for path, value in jax.tree_util.tree_leaves_with_path(mask)}
    norms = [name for name in flat if "norm" in name and "modulation" not in name]
    biases = [name for name in flat if name.endswith("['bias']")]
    assert norms and biases and not any(flat[name] for name in norms + biases)
    # Stacked (scanned) layers: a bias of shape (layers, dim) is still a bias, a kernel still a kernel.
    assert not flat["['transformer']['blocks']['mlp']['fc1']['bias']"]
    assert flat["['transformer']['blocks']['mlp']['fc1']['kernel']"]
    assert flat["['transformer']['pos_embed']"]  # OpenLRM decays learned embeddings
    assert flat["['encoder']['patch_embed']['kernel']"]
    exempt = optimizer.weight_decay_mask(params, ("pos_embed",))
    assert not exempt["transformer"]["pos_embed"]
    # The optimiser applies exactly this mask: a step on zero gradients moves only decayed weights.
    tx = optimizer.make_optimizer(load_config("lrm.py:tiny", train__optimizer__warmup_steps=0).train.optimizer,
                                  100, params)

    @jax.jit
    def first_update(arrays):
        updates, _ = tx.update(jax.tree.map(jnp.zeros_like, arrays), tx.init(arrays), arrays)
        return jax.tree.map(lambda u: jnp.any(u != 0), updates)

    moved = first_update(jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), nnx.to_pure_dict(params)))
    assert jax.tree.map(bool, moved) == nnx.to_pure_dict(mask)


def test_learning_rate_schedule():
    config = load_config("lrm.py:tiny", train__optimizer__warmup_steps=20).train.optimizer
    schedule = optimizer.learning_rate_schedule(config, total_steps=100)
    np.testing.assert_allclose(schedule(0), 0.0)
    np.testing.assert_allclose(schedule(10), config.learning_rate / 2, rtol=1e-6)  # warm-up of 20
    np.testing.assert_allclose(schedule(20), config.learning_rate, rtol=1e-6)
    np.testing.assert_allclose(schedule(100), 0.0, atol=1e-9)


def test_camera_noise_only_moves_synthetic_cameras():
    config = load_config("lrm.py:tiny", train__camera_noise__source=True).train.camera_noise
    batch = _host_batch_from_orbits()
    source, render = lrm_task.inject_camera_noise(jax.random.key(0), batch["source_camera"], batch["target_cameras"],
                                                 jnp.array([0.0, 1.0]), config)
    np.testing.assert_array_equal(source[0], batch["source_camera"][0])
    np.testing.assert_array_equal(render[0], batch["target_cameras"][0])
    assert not np.allclose(render[1], batch["target_cameras"][1])
    assert not np.allclose(source[1], batch["source_camera"][1])
    np.testing.assert_array_equal(render[1, :, 16:], batch["target_cameras"][1, :, 16:])  # intrinsics kept
    rotation = np.asarray(render[1, :, :16]).reshape(-1, 4, 4)[:, :3, :3]
    np.testing.assert_allclose(rotation @ np.swapaxes(rotation, -1, -2), np.broadcast_to(np.eye(3), rotation.shape),
                               atol=1e-5)


def _host_batch_from_orbits() -> dict:
    rng = np.random.default_rng(1)
    orbits = [example.random_orbit(rng, num_views=4, resolution=8) for _ in range(2)]
    return dict(
        source_camera=jnp.asarray(np.stack([cameras.source_camera(o["cam2world"][0], o["intrinsics"][0])
                                            for o in orbits])),
        target_cameras=jnp.asarray(np.stack([cameras.render_camera(o["cam2world"], o["intrinsics"])
                                             for o in orbits])),
    )


# --------------------------------------------------------------------------- checkpoints


def test_checkpointer_refuses_non_finite_state(tmp_path, data_dir):
    mesh = single_device_mesh()
    rules = sharding.logical_rules(small_config(data_dir).mesh.logical_rules)
    _, abstract = trainer.abstract_train_state(small_config(data_dir), mesh, rules)
    model_state, optimizer_state = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                                                (abstract.model_state, abstract.optimizer_state))
    poisoned = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan) if x.dtype == jnp.float32 else x, model_state)
    checkpointer = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), save_interval_steps=1, max_to_keep=2)
    with pytest.raises(checkpointing.NonFiniteStateError):
        checkpointer.save(1, poisoned, optimizer_state, data_iterator=None, progress={})
    assert checkpointer.save(2, model_state, optimizer_state, data_iterator=None, progress={})
    checkpointer.close()
    assert checkpointer.all_steps() == [2]


# --------------------------------------------------------------------------- training


@dataclasses.dataclass
class CompiledStep:
    config: Any
    mesh: jax.sharding.Mesh
    rules: sharding.LogicalRules
    state: trainer.TrainState
    step: Any
    batch: dict

    def fresh_states(self):
        """Copies of the initial states (the step donates its inputs)."""
        return jax.tree.map(jnp.copy, (self.state.model_state, self.state.optimizer_state, self.state.ema_state))


@pytest.fixture(scope="module")
def single_device(data_dir) -> CompiledStep:
    """The initial state on one device and its jitted train step, compiled once for the module."""
    config = small_config(data_dir)
    mesh = single_device_mesh()
    state, rules = init_train_state(config, mesh)
    with sharding.activate(mesh, rules):
        batch = pipeline.to_global_arrays(first_batch(config), mesh, sharding.batch_spec(rules))
        return CompiledStep(config, mesh, rules, state, trainer.make_train_step(config, state), batch)


def test_evaluation_reports_foreground_input_swap_and_source_gradient(data_dir):
    config = small_config(data_dir, eval__every=1, eval__num_batches=1, eval__batch_size=4, eval__resolution=32,
                          eval__input_swap=3, eval__grid_rows=2)
    mesh = single_device_mesh()
    state, rules = init_train_state(config, mesh)
    with sharding.activate(mesh, rules):
        eval_step = trainer.make_eval_step(config, state, mesh, rules)
        lpips_params = metrics.load_lpips_params(metrics.EVAL_LPIPS_NET)
        values, grid = trainer.evaluate(config, eval_step, state.model_state, lpips_params, mesh, rules)
    assert set(values) == {"psnr", "ssim", "lpips", "fg_psnr", "iou", "conditioning_gain", "retrieval",
                           "retrieval_chance", "source_gradient"}
    assert all(np.isfinite(value) for value in values.values()), values
    assert values["retrieval_chance"] == 0.25 and 0.0 <= values["retrieval"] <= 1.0 and 0.0 <= values["iou"] <= 1.0
    assert values["source_gradient"] > 0.0  # the renders respond to the source image from step 0
    # The untrained model: about as good (or bad) from any source.
    assert abs(values["conditioning_gain"]) < 2.0
    assert grid.shape[0] == 2 * 32 and grid.shape[2] == 3


def test_loss_decreases_on_a_fixed_batch(single_device):
    model_state, optimizer_state, ema_state = single_device.fresh_states()
    history = []
    with sharding.activate(single_device.mesh, single_device.rules):
        for step in range(trainer.total_steps(single_device.config)):
            model_state, optimizer_state, ema_state, step_metrics = single_device.step(
                model_state, optimizer_state, ema_state, single_device.batch, None, jnp.uint32(step))
            history.append(jax.device_get(step_metrics))
    assert all(bool(m["finite"]) for m in history)
    first, last = history[:3], history[-3:]
    for term in ("loss", "mse", "opacity"):
        before, after = np.mean([m[term] for m in first]), np.mean([m[term] for m in last])
        assert after < 0.7 * before, (term, [float(m[term]) for m in history])


def test_a_non_finite_step_leaves_the_state_unchanged(single_device):
    model_state, optimizer_state, ema_state = single_device.fresh_states()
    before = jax.device_get((nnx.to_pure_dict(model_state), nnx.to_pure_dict(optimizer_state)))
    batch = dict(single_device.batch, source_camera=single_device.batch["source_camera"].at[0, 0].set(jnp.nan))
    with sharding.activate(single_device.mesh, single_device.rules):
        model_state, optimizer_state, _, step_metrics = single_device.step(model_state, optimizer_state, ema_state,
                                                                           batch, None, jnp.uint32(5))
    assert not bool(step_metrics["finite"]) and not np.isfinite(float(step_metrics["loss"]))
    after = jax.device_get((nnx.to_pure_dict(model_state), nnx.to_pure_dict(optimizer_state)))
    jax.tree.map(np.testing.assert_array_equal, after, before)


@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run(tmp_path, data_dir):
    # 2N = 6 steps across the stage boundary at step 4; the interrupted job stops after N = 3,
    # mid-stage, so the resumed job needs the Grain iterator's saved position, then switches stage.
    straight = trainer.train_and_evaluate(small_config(data_dir, train__stop_after=6), str(tmp_path / "straight"))

    workdir = str(tmp_path / "resumed")
    trainer.train_and_evaluate(small_config(data_dir, train__stop_after=3), workdir)
    progress = json.loads((tmp_path / "resumed" / "checkpoints" / "3" / "progress" / "metadata").read_text())
    assert progress == {"data_stage": 0, "step": 3}
    resumed = trainer.train_and_evaluate(small_config(data_dir, train__stop_after=6), workdir)

    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), _params(straight),
                 _params(resumed))
    logged = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged] == [1, 2, 3, 4, 5, 6]

    # The checkpoint serves inference (`load_lrm`) and other runs (`train.init_checkpoint`).
    trained = jax.device_get(nnx.to_pure_dict(nnx.state(convert.load_lrm(workdir))))
    jax.tree.map(np.testing.assert_array_equal, trained, _params(resumed))
    mesh = sharding.make_mesh(small_config(data_dir).mesh.shape)
    rules = sharding.logical_rules(small_config(data_dir).mesh.logical_rules)
    _, abstract = trainer.abstract_train_state(small_config(data_dir), mesh, rules)
    initial = checkpointing.restore_model(workdir, abstract.model_state, abstract.model_shardings)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(nnx.to_pure_dict(initial)), _params(resumed))


def test_sharded_step_equals_single_device_step(single_device):
    config = single_device.config
    mesh = sharding.make_mesh(config.mesh.shape)  # data=2, fsdp=2, tensor=2
    state, rules = init_train_state(config, mesh)
    jax.tree.map(np.testing.assert_array_equal, _params(state), _params(single_device.state))  # same init
    results = []
    with sharding.activate(mesh, rules):
        batch = pipeline.to_global_arrays(first_batch(config), mesh, sharding.batch_spec(rules))
        results.append(trainer.make_train_step(config, state)(state.model_state, state.optimizer_state,
                                                              state.ema_state, batch, None, jnp.uint32(3)))
    with sharding.activate(single_device.mesh, single_device.rules):
        results.append(single_device.step(*single_device.fresh_states(), single_device.batch, None, jnp.uint32(3)))
    (sharded, _, sharded_metrics), (single, _, single_metrics) = jax.device_get(
        [(nnx.to_pure_dict(model_state), None, step_metrics) for model_state, _, _, step_metrics in results])
    np.testing.assert_allclose(sharded_metrics["loss"], single_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(sharded_metrics["grad_norm"], single_metrics["grad_norm"], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), sharded, single)


def test_fsdp_shards_parameters_and_optimizer_state(data_dir):
    config = small_config(data_dir)
    state, _ = init_train_state(config, sharding.make_mesh({"fsdp": 8}))
    full = sum(x.nbytes for x in jax.tree.leaves((state.model_state, state.optimizer_state)))
    per_device = sharding.per_device_bytes((state.model_state, state.optimizer_state))
    # Everything with an "embed" axis is split 8 ways; small replicated leftovers (the decoder MLP,
    # norms of the camera embedder) keep the share a little above 1/8.
    assert per_device / full < 0.2, (per_device, full)
    kernel = state.model_state["transformer"]["blocks"]["mlp"]["fc1"]["kernel"][...]  # (layers, embed, mlp)
    assert kernel.addressable_shards[0].data.shape == (kernel.shape[0], kernel.shape[1] // 8, kernel.shape[2])


class _PoisonThirdBatch(grain.DatasetIterator):
    """Passes batches through, but the third one gets a NaN source camera; checkpointable like the rest."""

    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self._count = 0

    def __next__(self) -> dict:
        batch = next(self._parent)
        self._count += 1
        if self._count == 3:
            batch = dict(batch, source_camera=np.full_like(batch["source_camera"], np.nan))
        return batch

    def get_state(self) -> dict:
        return dict(parent=self._parent.get_state(), count=self._count)

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._count = state["count"]


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_batch_stops_or_skips_and_never_checkpoints_nan(tmp_path, data_dir, monkeypatch, policy):
    make_iterator = pipeline.make_iterator
    monkeypatch.setattr(trainer.pipeline, "make_iterator",
                        lambda data_config, **kwargs: _PoisonThirdBatch(make_iterator(data_config, **kwargs)))
    config = small_config(data_dir, train__checkpoint_every=1, train__checkpoint_keep=10, train__nonfinite=policy,
                          train__stop_after=4)
    workdir = tmp_path / policy
    if policy == "stop":
        with pytest.raises(trainer.NonFiniteLossError, match="non-finite training step 3"):
            trainer.train_and_evaluate(config, str(workdir))
    else:
        state = trainer.train_and_evaluate(config, str(workdir))
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(_params(state)))
    checkpointer = checkpointing.Checkpointer(str(workdir / "checkpoints"), save_interval_steps=1, max_to_keep=None)
    steps = checkpointer.all_steps()
    assert steps == ([1, 2] if policy == "stop" else [1, 2, 3, 4]), steps
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(entry["param_norm"]) for entry in logged)
    if policy == "skip":
        assert [entry["skipped_steps"] for entry in logged] == [0, 0, 1, 1]
