"""The multi-view video diffusion model end to end: conditioning, training steps, sampling.

Real components at tiny size: made-up orbits written as TFRecords, the clip pipeline, the shared
trainer with the mvdiffusion task, the Wan transformer imported from diffusers' fixture.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import WAN_FIXTURE_DIR, first_batch, init_train_state, single_device_mesh, write_orbit_folder
from flax import nnx
from flax.nnx import traversals

from vfusion3d_jax import diffusion
from vfusion3d_jax.configs import load_config
from vfusion3d_jax.data import pipeline
from vfusion3d_jax.inference import sample
from vfusion3d_jax.models.mvdiffusion import MultiViewDiffusion
from vfusion3d_jax.models.wan import convert as wan_convert
from vfusion3d_jax.train import mvdiffusion_task, sharding, trainer

NUM_VIEWS = 6


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Two made-up orbits to train on (and to memorise), one held out."""
    return str(write_orbit_folder(tmp_path_factory.mktemp("orbits"), {"train": (1, 2), "holdout": (1, 1)},
                                  num_views=NUM_VIEWS, resolution=16))


def small_config(data_dir: str, **overrides):
    """`tiny` made smaller: 3 frames of 16 px (every other view of the orbit), 2 narrow layers, a
    one-layer text encoder; mesh data=2, fsdp=2, tensor=2 over the 8 fake devices."""
    fields = dict(
        data_dir=data_dir,
        data__num_frames=3,
        data__clip_stride=2,
        data__clip_resolution=16,
        data__batch_size=4,
        data__read_threads=1,
        data__read_buffer_size=4,
        model__num_layers=2,
        model__num_attention_heads=2,
        model__attention_head_dim=32,
        model__ffn_dim=128,
        conditioning__text_encoder__num_layers=1,
        conditioning__text_encoder__dim=32,
        mesh__shape__data=2,
        mesh__shape__fsdp=2,
        mesh__shape__tensor=2,
        train__optimizer__warmup_steps=5,
        train__log_every=1,
        eval__every=0,
        sample__num_steps=8,
    )
    fields.update(overrides)
    return load_config("mvdiffusion.py:tiny", **fields)


def _step(config, mesh, num_steps: int = 1, history: list | None = None):
    """`num_steps` training steps on the first batch; (initial params, final params, metrics, optimiser
    state, EMA as a pure dict or None). `history`, if given, receives the parameters after each step."""
    state, rules = init_train_state(config, mesh)
    initial = jax.device_get(nnx.to_pure_dict(state.model_state))
    with sharding.activate(mesh, rules):
        batch = pipeline.to_global_arrays(first_batch(config), mesh, sharding.batch_spec(rules))
        step = trainer.make_train_step(config, state)
        model_state, optimizer_state, ema_state = state.model_state, state.optimizer_state, state.ema_state
        for i in range(num_steps):
            model_state, optimizer_state, ema_state, metrics = step(model_state, optimizer_state, ema_state, batch,
                                                                    None, jnp.uint32(i))
            if history is not None:
                history.append(jax.device_get(nnx.to_pure_dict(model_state)))
    ema = None if ema_state is None else jax.device_get(nnx.to_pure_dict(ema_state))
    return initial, jax.device_get(nnx.to_pure_dict(model_state)), jax.device_get(metrics), optimizer_state, ema


def _flat(tree) -> dict:
    return {"/".join(map(str, path)): value for path, value in traversals.flatten_mapping(tree).items()}


def test_camera_embedding_starts_at_zero_so_an_imported_model_is_unchanged():
    imported, model_config = wan_convert.load_diffusers(WAN_FIXTURE_DIR / "transformer_t2v", dtype="float32")
    config = load_config("mvdiffusion.py:tiny")
    config.model = model_config
    config.conditioning.text_encoder = None
    config.conditioning.input_view_channels = False  # the imported transformer takes its latents alone
    config.flow.prediction = "velocity"  # and predicts the velocity
    model = MultiViewDiffusion(config, rngs=nnx.Rngs(0))
    nnx.update(model.transformer, nnx.state(imported))
    reference = np.load(WAN_FIXTURE_DIR / "transformer_t2v.npz")
    video = jnp.moveaxis(jnp.asarray(reference["hidden_states"]), 1, -1)  # (B, F, H, W, C)
    text = jnp.asarray(reference["encoder_hidden_states"])
    sigmas = jnp.asarray(reference["timestep"]) / 1000.0
    poses = jax.random.uniform(jax.random.key(0), video.shape[:2] + (3,), maxval=360.0)
    keep_none = jnp.zeros(video.shape[0], bool)
    with_camera = model(video, sigmas, video[:, 0], poses, text, keep_none)
    expected = imported(video, sigmas * 1000.0, text)
    np.testing.assert_allclose(with_camera, expected, atol=2e-5 * float(jnp.abs(expected).max()))
    # Once trained (a non-zero output layer), the poses do change the prediction.
    model.camera_embedding.fc2.kernel[...] = jax.random.normal(jax.random.key(1), model.camera_embedding.fc2.kernel.shape)
    assert not np.allclose(model(video, sigmas, video[:, 0], poses, text, keep_none), expected, atol=1e-3)


def test_input_view_channels_need_the_matching_input_width():
    config = load_config("mvdiffusion.py:tiny")  # input_view_channels: RGB + the input view + its flag
    assert config.model.in_channels == 2 * config.model.out_channels + 1
    config.conditioning.input_view_channels = False
    with pytest.raises(ValueError, match="takes 3"):
        MultiViewDiffusion(config, rngs=nnx.Rngs(0))


def test_a_clean_predicting_model_turns_its_output_into_the_implied_velocity(data_dir):
    """`flow.prediction="clean"`: the transformer's output is x̂₀ and the model returns (x_σ − x̂₀)/σ
    (x_σ with the kept input frame clean); the same weights predicting the velocity return the
    transformer's output itself."""
    velocity_model = MultiViewDiffusion(small_config(data_dir, flow__prediction="velocity"), rngs=nnx.Rngs(0))
    clean_model = MultiViewDiffusion(small_config(data_dir, flow__prediction="clean"), rngs=nnx.Rngs(0))
    batch = first_batch(small_config(data_dir))
    clean = jnp.asarray(batch["clip_images"]) * 2 - 1
    noise = jax.random.normal(jax.random.key(0), clean.shape)
    noisy = diffusion.noisy_sample(clean, noise, jnp.full(len(clean), 0.5))
    text = velocity_model.encode_text(jnp.asarray(batch["caption_bytes"]))
    inputs = (jnp.full(len(clean), 0.5), clean[:, 0], jnp.asarray(batch["clip_relative_pose"]), text,
              jnp.ones(len(clean), bool))
    current = noisy.at[:, 0].set(clean[:, 0])  # the kept input frame is clean
    np.testing.assert_allclose(clean_model(noisy, *inputs), (current - velocity_model(noisy, *inputs)) / 0.5,
                               rtol=1e-5, atol=1e-5)
    # `flow.loss_space="clean"` scores that x̂₀ against x₀, over the generated frames.
    per_clip, _ = mvdiffusion_task.flow_matching_loss(clean_model, clean, noise, inputs[0], *inputs[2:],
                                                      loss_space="clean")
    predicted = velocity_model(noisy, *inputs)
    expected = jnp.mean(jnp.square(predicted - clean)[:, 1:], axis=(1, 2, 3, 4))
    np.testing.assert_allclose(per_clip, expected, rtol=1e-4)
    with pytest.raises(ValueError, match="flow.prediction"):
        MultiViewDiffusion(small_config(data_dir, flow__prediction="noise"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="flow.loss_space"):
        mvdiffusion_task.loss_fn(small_config(data_dir, flow__loss_space="noise"))


def test_the_kept_input_frame_is_clean_and_not_part_of_the_loss(data_dir):
    config = small_config(data_dir)
    model = MultiViewDiffusion(config, rngs=nnx.Rngs(0))
    batch = first_batch(config)
    clean = jnp.asarray(batch["clip_images"]) * 2 - 1
    noise = jax.random.normal(jax.random.key(0), clean.shape)
    text = model.encode_text(jnp.asarray(batch["caption_bytes"]))
    pose, keep = jnp.asarray(batch["clip_relative_pose"]), jnp.ones(len(clean), bool)
    sigmas = jnp.full((len(clean),), 0.6)
    # The kept frame 0 is replaced by the clean input: its noise does not matter.
    noisy = diffusion.noisy_sample(clean, noise, sigmas)
    other = noisy.at[:, 0].set(jax.random.normal(jax.random.key(1), noisy.shape[:1] + noisy.shape[2:]))
    np.testing.assert_allclose(model(noisy, sigmas, clean[:, 0], pose, text, keep),
                               model(other, sigmas, clean[:, 0], pose, text, keep), atol=1e-6)
    # Dropping the image condition makes frame 0 one of the generated frames again.
    assert not np.allclose(model(noisy, sigmas, clean[:, 0], pose, text, ~keep),
                           model(other, sigmas, clean[:, 0], pose, text, ~keep), atol=1e-4)


def test_sampling_is_deterministic_and_guidance_one_is_the_conditional_flow(data_dir):
    config = small_config(data_dir, sample__image_guidance=1.0, sample__text_guidance=1.0, sample__num_steps=4)
    model = MultiViewDiffusion(config, rngs=nnx.Rngs(0))
    model.camera_embedding.fc2.kernel[...] = 0.1 * jax.random.normal(jax.random.key(3),
                                                                     model.camera_embedding.fc2.kernel.shape)
    batch = first_batch(config)
    clean = jnp.asarray(batch["clip_images"]) * 2 - 1
    pose, caption = jnp.asarray(batch["clip_relative_pose"]), jnp.asarray(batch["caption_bytes"])
    noise = jax.random.normal(jax.random.key(0), clean.shape)
    sample = jax.jit(lambda state, noise: mvdiffusion_task.sample_orbits(
        nnx.merge(nnx.graphdef(model), state), config, clean[:, 0], pose, caption, noise))
    state = nnx.state(model)
    first, again = sample(state, noise), sample(state, noise)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, sample(state, jax.random.normal(jax.random.key(1), clean.shape)))
    graphdef = nnx.graphdef(model)

    def conditional(x, timestep):
        model = nnx.merge(graphdef, state, copy=True)
        sigmas = jnp.full((len(x),), timestep / 1000.0)
        return model(x, sigmas, clean[:, 0], pose, model.encode_text(caption), jnp.ones(len(x), bool))

    schedule = diffusion.unipc_flow_schedule(config.sample.num_steps, config.flow.shift)
    expected = diffusion.unipc_sample(conditional, noise, schedule).at[:, 0].set(clean[:, 0])
    np.testing.assert_allclose(first, expected, atol=1e-5)

    # From a strength (image-to-image): the copied input view noised to the cut schedule's first σ.
    config.sample.init_strength = 0.5
    partial = diffusion.from_strength(schedule, 0.5)
    start = diffusion.noisy_sample(jnp.broadcast_to(clean[:, :1], clean.shape), noise,
                                   jnp.full((len(clean),), partial.sigmas[0], jnp.float32))
    expected = diffusion.unipc_sample(conditional, start, partial).at[:, 0].set(clean[:, 0])
    from_input = mvdiffusion_task.sample_orbits(model, config, clean[:, 0], pose, caption, noise)
    np.testing.assert_allclose(from_input, expected, atol=1e-5)

    # Guidance of 3 confined to an interval the schedule never enters is the conditional flow too;
    # one it does enter changes the orbit. A reversed interval is a config error.
    config.sample.init_strength, config.sample.image_guidance = 1.0, 3.0
    config.sample.guidance_interval = (0.0, 1e-4)
    outside = mvdiffusion_task.sample_orbits(model, config, clean[:, 0], pose, caption, noise)
    np.testing.assert_allclose(outside, first, atol=1e-5)
    config.sample.guidance_interval = (0.5, 1.0)
    assert not np.allclose(mvdiffusion_task.sample_orbits(model, config, clean[:, 0], pose, caption, noise),
                           first, atol=1e-3)
    config.sample.guidance_interval = (0.8, 0.3)
    with pytest.raises(ValueError, match="guidance_interval"):
        mvdiffusion_task.sample_orbits(model, config, clean[:, 0], pose, caption, noise)


def test_sharded_step_equals_single_device_step(data_dir):
    config = small_config(data_dir)
    single = _step(config, single_device_mesh())
    sharded = _step(config, sharding.make_mesh(config.mesh.shape))
    jax.tree.map(np.testing.assert_array_equal, single[0], sharded[0])  # same init
    np.testing.assert_allclose(sharded[2]["loss"], single[2]["loss"], rtol=1e-5)
    for part in (1, 4):  # the parameters and their EMA
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), sharded[part], single[part])


def test_frozen_parameters_stay_bit_identical_and_get_no_optimizer_state(data_dir):
    config = small_config(data_dir, train__finetune__mode="filter",
                          train__finetune__trainable=("^camera_embedding/", "^transformer/blocks/attn2/"))
    initial, final, _, optimizer_state, ema = _step(config, single_device_mesh(), num_steps=3)
    flat_initial, flat_final = (_flat(tree) for tree in (initial, final))
    trainable = [path for path in flat_initial if path.startswith(("camera_embedding/", "transformer/blocks/attn2/"))]
    assert trainable and len(trainable) < len(flat_initial)
    for path, value in flat_initial.items():
        if path not in trainable:
            np.testing.assert_array_equal(value, flat_final[path], err_msg=path)
    # (Some trainable ones get no gradient here: without captions every text key is the same.)
    for path in ("camera_embedding/fc2/kernel", "transformer/blocks/attn2/to_q/kernel"):
        assert not np.array_equal(flat_initial[path], flat_final[path]), path
    moments = _flat(nnx.to_pure_dict(optimizer_state))
    assert moments and not any("text_encoder" in path or "blocks/attn1" in path for path in moments)
    assert set(_flat(ema)) == set(trainable)  # the EMA averages what trains, nothing else


def test_ema_is_the_warmed_up_average_of_the_parameters_after_each_step(data_dir):
    config = small_config(data_dir, train__ema_decay=0.5)
    history = []
    initial, final, _, _, ema = _step(config, single_device_mesh(), num_steps=3, history=history)
    expected = _flat(initial)
    for step, params in enumerate(history):
        decay = min(0.5, (1 + step) / (10 + step))  # 0.1, 0.18, 0.25: the warm-up forgets the init fast
        expected = {path: decay * value + (1 - decay) * _flat(params)[path] for path, value in expected.items()}
    flat_ema = _flat(ema)
    assert set(flat_ema) == set(expected)
    moved = 0
    for path, value in flat_ema.items():
        np.testing.assert_allclose(value, expected[path], rtol=1e-5, atol=1e-7, err_msg=path)
        moved += not np.allclose(value, _flat(final)[path])
    assert moved > len(flat_ema) // 2  # an average, not a copy of the last parameters


@pytest.mark.slow  # ~2-3 minutes: three training runs; the EMA's update is tested above and in test_finetune
def test_the_ema_is_checkpointed_resumed_exactly_and_is_what_readers_load(data_dir, tmp_path):
    config = small_config(data_dir, train__stages__main__num_steps=4, train__checkpoint_every=2)
    whole = trainer.train_and_evaluate(config, str(tmp_path / "whole"))
    trainer.train_and_evaluate(small_config(data_dir, train__stages__main__num_steps=4, train__checkpoint_every=2,
                                            train__stop_after=2), str(tmp_path / "resumed"))
    assert (tmp_path / "resumed" / "checkpoints" / "2" / "ema").is_dir()
    resumed = trainer.train_and_evaluate(config, str(tmp_path / "resumed"))
    for part in ("model_state", "ema_state"):
        jax.tree.map(np.testing.assert_array_equal, *(jax.device_get(nnx.to_pure_dict(getattr(state, part)))
                                                      for state in (whole, resumed)))
    # A run that starts keeping an EMA on resume starts it from the restored parameters.
    trainer.train_and_evaluate(small_config(data_dir, train__stages__main__num_steps=4, train__checkpoint_every=2,
                                            train__stop_after=2, train__ema_decay=0.0), str(tmp_path / "plain"))
    assert not (tmp_path / "plain" / "checkpoints" / "2" / "ema").exists()
    later = trainer.train_and_evaluate(config, str(tmp_path / "plain"))
    assert (tmp_path / "plain" / "checkpoints" / "4" / "ema").is_dir()
    ema, params = (_flat(jax.device_get(nnx.to_pure_dict(part))) for part in (later.ema_state, later.model_state))
    assert set(ema) == set(params) and all(np.all(np.isfinite(value)) for value in ema.values())
    # Sampling (and anything else that loads the model) reads the average, not the last parameters.
    model, _, step = sample.load_orbit_model(tmp_path / "whole")
    assert step == 4
    loaded = _flat(jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    averaged = _flat(jax.device_get(nnx.to_pure_dict(whole.ema_state)))
    trained = _flat(jax.device_get(nnx.to_pure_dict(whole.model_state)))
    assert set(averaged) == set(loaded)
    for path, value in averaged.items():
        np.testing.assert_array_equal(loaded[path], value, err_msg=path)
    assert sum(not np.array_equal(loaded[path], trained[path]) for path in loaded) > len(loaded) // 2


@pytest.mark.slow
def test_tiny_memorises_orbits_and_samples_them_back(data_dir, tmp_path):
    """Trained on two orbits through the `train` path (1200 steps, ~4 minutes on 2 cores), the model
    samples each orbit back from its first frame at less than half the squared error of the
    trivial answer, the input copied to every frame (measured with `tiny`'s clean prediction and
    loss: 0.053 against 0.45; with velocity prediction and loss 0.14)."""
    config = small_config(data_dir, train__stages__main__num_steps=1200, train__optimizer__learning_rate=2e-3,
                          conditioning__image_dropout=0.0, conditioning__text_dropout=0.0,
                          sample__image_guidance=1.0, sample__text_guidance=1.0, sample__num_steps=12,
                          train__checkpoint_every=1000)
    state = trainer.train_and_evaluate(config, str(tmp_path / "run"))
    model = nnx.merge(state.model_graphdef, state.model_state)
    data = trainer.make_stages(config)[0].data
    data.batch_size, data.num_epochs = 2, 1
    scores = []
    for batch in pipeline.make_iterator(data):
        truth = jnp.asarray(batch["clip_images"]) * 2 - 1
        orbits = mvdiffusion_task.sample_orbits(model, config, truth[:, 0], jnp.asarray(batch["clip_relative_pose"]),
                                                jnp.asarray(batch["caption_bytes"]),
                                                jax.random.normal(jax.random.key(0), truth.shape))
        sampled = float(jnp.mean(jnp.square(orbits[:, 1:] - truth[:, 1:])))
        copied = float(jnp.mean(jnp.square(truth[:, :1] - truth[:, 1:])))
        scores.append((sampled, copied))
    for sampled, copied in scores:
        assert sampled < 0.5 * copied, scores
