"""Flow-matching schedules and samplers against diffusers' schedulers (tests/fixtures/wan_reference)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import WAN_FIXTURE_DIR
from flax import nnx

from vfusion3d_jax import diffusion
from vfusion3d_jax.models.mvdiffusion import MIN_VELOCITY_SIGMA, velocity_from_clean

SCHEDULES = {"euler": diffusion.flow_euler_schedule, "unipc": diffusion.unipc_flow_schedule}


@pytest.fixture(scope="module")
def schedulers():
    return dict(np.load(WAN_FIXTURE_DIR / "schedulers.npz"))


def _reference(schedulers, name):
    prefix = f"{name}/"
    return {key[len(prefix):]: value for key, value in schedulers.items() if key.startswith(prefix)}


def _shift(reference) -> float:
    config = json.loads(str(reference["config"]))
    return config.get("shift", config.get("flow_shift"))


@pytest.mark.parametrize("name", ["euler_shift3", "euler_shift5", "unipc_shift3", "unipc_shift5"])
def test_schedule_matches_diffusers(schedulers, name):
    reference = _reference(schedulers, name)
    schedule = SCHEDULES[name.split("_")[0]](len(reference["timesteps"]), _shift(reference))
    np.testing.assert_allclose(schedule.sigmas, reference["sigmas"], atol=1e-6)
    np.testing.assert_allclose(schedule.timesteps, reference["timesteps"], atol=1e-3)


@pytest.mark.parametrize("name", ["euler_shift3", "euler_shift5", "unipc_shift3", "unipc_shift5"])
def test_sampler_steps_match_diffusers(schedulers, name):
    """Fixed model outputs per step (the velocity looked up by timestep): every intermediate sample."""
    reference = _reference(schedulers, name)
    method = name.split("_")[0]
    schedule = SCHEDULES[method](len(reference["timesteps"]), _shift(reference))
    outputs = jnp.asarray(reference["step_model_outputs"])
    timesteps = jnp.asarray(schedule.timesteps, jnp.float32)

    def velocity(x, timestep):
        return outputs[jnp.argmax(timesteps == timestep)]

    initial = jnp.asarray(reference["step_samples"][0])
    _, trajectory = diffusion.SAMPLERS[method](velocity, initial, schedule, return_trajectory=True)
    expected, exact = reference["step_samples"], reference["step_samples_float64"]
    spread = np.abs(expected.astype(np.float64) - exact).max()  # diffusers' own float32 error
    error = np.abs(np.asarray(trajectory, np.float64) - exact).max()
    assert error <= 2 * spread, (error, spread)


def test_flow_matching_interpolates_noise_and_data():
    clean, noise = jnp.ones((2, 3)), jnp.full((2, 3), -1.0)
    sigmas = jnp.array([0.0, 0.25])
    noisy = diffusion.noisy_sample(clean, noise, sigmas)
    np.testing.assert_allclose(noisy, [[1.0] * 3, [0.5] * 3])
    # Following the true velocity from any noise level lands on the data.
    np.testing.assert_allclose(noisy - sigmas[:, None] * diffusion.velocity_target(clean, noise), clean)
    drawn = diffusion.training_sigmas(jax.random.key(0), (4096,), shift=3.0)
    assert 0 <= float(drawn.min()) and float(drawn.max()) < 1
    assert float(jnp.median(drawn)) == pytest.approx(0.75, abs=0.03)  # shift 3 maps 0.5 to 0.75


@pytest.mark.parametrize("method", ["euler", "unipc"])
def test_samplers_integrate_a_known_flow_exactly(method):
    """For data concentrated at x₀ the true velocity is (x − x₀)/σ; both samplers must land on x₀."""
    target = jnp.array([[0.3, -0.7, 1.2]])
    schedule = SCHEDULES[method](12, 3.0)
    sigmas = jnp.asarray(schedule.sigmas[:-1], jnp.float32)
    timesteps = jnp.asarray(schedule.timesteps, jnp.float32)

    def velocity(x, timestep):
        sigma = sigmas[jnp.argmax(timesteps == timestep)]
        return (x - target) / sigma

    sample = diffusion.SAMPLERS[method](velocity, jax.random.normal(jax.random.key(0), (1, 3)), schedule)
    np.testing.assert_allclose(sample, target, atol=1e-5)
    # A model that predicts the clean sample (`flow.prediction="clean"`) and is right gives the
    # same velocity wherever σ is above the clip, so the samplers land on its prediction too.
    clean_velocity = lambda x, timestep: velocity_from_clean(
        x, target, sigmas[jnp.argmax(timesteps == timestep)][None])
    sample = diffusion.SAMPLERS[method](clean_velocity, jax.random.normal(jax.random.key(0), (1, 3)), schedule)
    if float(sigmas.min()) >= MIN_VELOCITY_SIGMA:
        np.testing.assert_allclose(sample, target, atol=1e-5)
    else:  # Euler's last σ (0.009) is under the clip: the last step leaves a sliver of that σ's noise
        assert 1e-4 < float(jnp.abs(sample - target).max()) < 0.05


def test_a_clean_prediction_implies_the_flow_velocity_above_the_clip():
    clean, noise = jax.random.normal(jax.random.key(0), (2, 2, 5, 3))
    sigmas = jnp.array([0.7, 0.01])
    implied = velocity_from_clean(diffusion.noisy_sample(clean, noise, sigmas), clean, sigmas)
    np.testing.assert_allclose(implied[0], diffusion.velocity_target(clean, noise)[0], atol=1e-5)
    # Below the clip the implied velocity is shrunk by σ / clip, never blown up by 1 / σ.
    np.testing.assert_allclose(implied[1], diffusion.velocity_target(clean, noise)[1] * 0.01 / 0.05, atol=1e-5)


@pytest.mark.parametrize("method", ["euler", "unipc"])
def test_sampling_from_a_strength_starts_at_that_noise_level_and_lands_on_the_data(method):
    """Image-to-image: the cut schedule starts at the first σ ≤ strength, and integrating the true
    flow from the target noised to that level still lands on the target."""
    target = jnp.array([[0.3, -0.7, 1.2]])
    full = SCHEDULES[method](20, 1.0)
    for strength in (1.0, 0.6, 0.3, 1e-4):
        schedule = diffusion.from_strength(full, strength)
        assert schedule.sigmas[0] <= max(strength, full.sigmas[-2]) + 1e-6
        assert schedule.num_steps >= 1 and schedule.sigmas[-1] == 0.0
        np.testing.assert_array_equal(schedule.sigmas, full.sigmas[-schedule.num_steps - 1:])
    assert diffusion.from_strength(full, 1.0).num_steps == 20
    assert diffusion.from_strength(full, 0.6).sigmas[0] > diffusion.from_strength(full, 0.3).sigmas[0]
    with pytest.raises(ValueError, match="strength"):
        diffusion.from_strength(full, 0.0)

    schedule = diffusion.from_strength(full, 0.5)
    sigmas = jnp.asarray(schedule.sigmas[:-1], jnp.float32)
    timesteps = jnp.asarray(schedule.timesteps, jnp.float32)

    def velocity(x, timestep):
        return (x - target) / sigmas[jnp.argmax(timesteps == timestep)]

    start = diffusion.noisy_sample(target, jax.random.normal(jax.random.key(1), (1, 3)), jnp.asarray(sigmas[:1]))
    np.testing.assert_allclose(diffusion.SAMPLERS[method](velocity, start, schedule), target, atol=1e-5)


def test_guidance_scale_one_is_the_conditional_prediction():
    def model(x, timestep, *, context):
        return x * context[:, :1] + timestep

    x = jnp.arange(6.0).reshape(2, 3)
    conditions = [dict(context=jnp.zeros((2, 4))), dict(context=jnp.ones((2, 4))),
                  dict(context=jnp.full((2, 4), 3.0))]
    velocity = diffusion.guided_velocity(model, conditions, [1.0, 1.0])
    np.testing.assert_allclose(velocity(x, 2.0), model(x, 2.0, context=conditions[-1]["context"]))
    guided = diffusion.guided_velocity(model, conditions[:2], [5.0])(x, 2.0)
    np.testing.assert_allclose(guided, 2.0 + 5.0 * x)  # v₀ + 5·(v₁ − v₀)


def test_guidance_in_an_interval_guides_inside_it_and_is_the_conditional_prediction_outside():
    def model(x, timestep, *, context):
        return x * context[:, :1] + timestep

    x = jnp.arange(6.0).reshape(2, 3)
    conditions = [dict(context=jnp.zeros((2, 4))), dict(context=jnp.ones((2, 4)))]
    velocity = jax.jit(diffusion.guided_velocity(model, conditions, [5.0], interval=(0.3, 0.8)))
    for timestep in (300.0, 550.0, 800.0):  # σ 0.3, 0.55, 0.8: guided, ends included
        np.testing.assert_allclose(velocity(x, jnp.float32(timestep)), timestep + 5.0 * x)
    for timestep in (100.0, 950.0):  # outside: the conditional prediction v₁
        np.testing.assert_allclose(velocity(x, jnp.float32(timestep)), timestep + x)


def _load_transformer(name):
    from vfusion3d_jax.models.wan import convert as wan_convert

    return wan_convert.load_diffusers(WAN_FIXTURE_DIR / f"transformer_{name}", dtype="float32")[0]


@pytest.mark.parametrize("task, method", [("t2v", "unipc"), ("t2v", "euler"), ("i2v", "unipc")])
def test_guided_sampling_matches_diffusers_pipeline(task, method):
    """The Wan pipelines' denoising loop (tests/fixtures/wan_reference/README.md): the imported
    transformer, guidance 5 and the sampler give diffusers' latents after every step."""
    reference = dict(np.load(WAN_FIXTURE_DIR / f"sampling_{task}.npz"))
    model = _load_transformer(task)
    config = json.loads(str(reference[f"{method}/config"]))
    schedule = SCHEDULES[method](len(reference[f"{method}/float32/timesteps"]),
                                 config.get("shift", config.get("flow_shift")))
    np.testing.assert_allclose(schedule.timesteps, reference[f"{method}/float32/timesteps"], atol=1e-3)
    extra = jnp.asarray(reference["condition"]) if task == "i2v" else None
    image = dict(encoder_hidden_states_image=jnp.asarray(reference["image_embeds"])) if task == "i2v" else {}

    graphdef, state = nnx.split(model)

    def sample(state, initial):
        def model_velocity(latents, timestep, *, encoder_hidden_states):
            model = nnx.merge(graphdef, state, copy=True)  # fresh Variables: NNX ones do not cross traces
            if extra is not None:  # image-to-video: mask and image latents concatenated as channels
                latents = jnp.concatenate([latents, jnp.concatenate([extra] * (len(latents) // len(extra)))], axis=1)
            batch_image = {key: jnp.concatenate([value] * len(latents)) for key, value in image.items()}
            return model.forward_diffusers(latents, jnp.full((len(latents),), timestep), encoder_hidden_states,
                                           **batch_image)

        conditions = [dict(encoder_hidden_states=jnp.asarray(reference["negative_prompt_embeds"])),
                      dict(encoder_hidden_states=jnp.asarray(reference["prompt_embeds"]))]
        velocity = diffusion.guided_velocity(model_velocity, conditions, [float(reference["guidance_scale"])])
        return diffusion.SAMPLERS[method](velocity, initial, schedule, return_trajectory=True)[1]

    trajectory = jax.jit(sample)(state, jnp.asarray(reference["initial_latents"]))
    expected, exact = reference[f"{method}/float32/latents"], reference[f"{method}/float64/latents"]
    spread = np.abs(expected.astype(np.float64) - exact).max()
    error = np.abs(np.asarray(trajectory, np.float64) - exact).max()
    assert error <= 4 * spread, (error, spread)
