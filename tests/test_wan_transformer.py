"""The Wan diffusion transformer against diffusers: weight import, tensor-by-tensor parity, variants.

tests/fixtures/wan_reference/ (written by tools/make_wan_reference.py with diffusers itself;
its README says how) holds tiny random `WanTransformer3DModel` checkpoints in the
text-to-video, image-to-video and Wan 2.2 per-token-timestep forms, with their inputs and
diffusers' outputs and intermediate tensors in float32 and float64. Each checkpoint is imported
with the same code as a released one and run in float32; every tensor must be as close to
the float64 reference as a small multiple of diffusers' own float32-vs-float64 spread on that
tensor. No torch is needed.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SPREAD_MULTIPLE, WAN_FIXTURE_DIR, assert_matches_diffusers, float32_spread
from flax import nnx

from vfusion3d_jax.configs import load_config
from vfusion3d_jax.models import layers
from vfusion3d_jax.models.convert import CheckpointMismatchError
from vfusion3d_jax.models.wan import convert, transformer

FORMS = ("t2v", "i2v", "ti2v")
INPUT_KEYS = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_image")

# configs/mvdiffusion.py's documented parameter counts; the released checkpoints' sizes for the
# published shapes (equal to diffusers' WanTransformer3DModel built with their config.json).
PARAMETER_COUNTS = {
    "tiny": 2_731_248,
    "small": 121_645_888,
    "wan2_1_1_3b": 1_418_996_800,
    "wan2_1_14b": 14_288_491_584,
    "wan2_1_i2v_14b": 16_394_878_784,
    "wan2_2_ti2v_5b": 4_999_787_712,
}


def checkpoint_dir(form: str) -> Path:
    return WAN_FIXTURE_DIR / f"transformer_{form}"


@pytest.fixture(scope="module", params=FORMS)
def form(request):
    return request.param


@pytest.fixture(scope="module")
def reference(form):
    with np.load(WAN_FIXTURE_DIR / f"transformer_{form}.npz") as arrays:
        return dict(arrays)


@pytest.fixture(scope="module")
def imported(form):
    """The fixture checkpoint imported in float32: (model, config.model)."""
    return convert.load_diffusers(checkpoint_dir(form), dtype="float32")


def model_inputs(reference: dict) -> list:
    return [None if key not in reference else jnp.asarray(reference[key]) for key in INPUT_KEYS]


@nnx.jit
def _forward_with_intermediates(model, hidden_states, timestep, text, image):
    return model.forward_diffusers(hidden_states, timestep, text, image, return_intermediates=True)


@nnx.jit
def _forward(model, hidden_states, timestep, text, image):
    return model.forward_diffusers(hidden_states, timestep, text, image)


def test_transformer_matches_diffusers(form, reference, imported):
    model, _ = imported
    output, intermediates = _forward_with_intermediates(model, *model_inputs(reference))
    ours = dict(intermediates, output=output)
    expected_keys = {key.split("/", 1)[1] for key in reference if key.startswith("float64/")}
    assert set(ours) == expected_keys
    assert_matches_diffusers(reference, ours, expected_keys, form)


def test_rotary_split_is_diffusers(form, imported):
    _, config = imported
    head_dim = config.attention_head_dim
    frames, rows, cols = transformer.rotary_axis_dims(head_dim)
    assert (frames, rows, cols) == (head_dim - 2 * (2 * (head_dim // 6)), 2 * (head_dim // 6), 2 * (head_dim // 6))
    assert transformer.rotary_axis_dims(128) == (44, 42, 42)  # the released models' head size


def test_shared_per_token_timesteps_equal_one_per_example(form, reference, imported):
    """diffusers' two timestep forms agree when every token of an example has its example's timestep."""
    model, config = imported
    hidden_states, _, text, image = model_inputs(reference)
    batch, _, frames, height, width = hidden_states.shape
    patch_t, patch_h, patch_w = config.patch_size
    num_tokens = (frames // patch_t) * (height // patch_h) * (width // patch_w)
    per_example = jnp.array([937.5, 312.25])
    per_token = jnp.broadcast_to(per_example[:, None], (batch, num_tokens))
    # Not bit-equal (the matmuls have other shapes): equal within float32 rounding.
    difference = np.max(np.abs(_forward(model, hidden_states, per_example, text, image)
                               - _forward(model, hidden_states, per_token, text, image)))
    assert difference <= SPREAD_MULTIPLE * float32_spread(reference, "output")


def test_import_export_round_trip_is_exact(form):
    tensors = convert.SafetensorsWeights(checkpoint_dir(form))
    config = convert.model_config_from_diffusers(convert.read_diffusers_config(checkpoint_dir(form)),
                                                 load_config("mvdiffusion.py:tiny").model)
    exported = convert.export_state_dict(convert.import_state_dict(tensors, config), config)
    assert set(exported) == set(tensors)
    for key, value in exported.items():
        np.testing.assert_array_equal(value, tensors[key], err_msg=key)


def test_config_comes_from_the_checkpoint(form, imported):
    _, config = imported
    config_json = convert.read_diffusers_config(checkpoint_dir(form))
    assert convert.config_mismatches(config_json, config) == []
    assert config.num_layers == config_json["num_layers"]
    assert config.in_channels == config_json["in_channels"]


def test_strict_key_and_shape_check():
    directory = checkpoint_dir("i2v")
    config = convert.model_config_from_diffusers(convert.read_diffusers_config(directory),
                                                 load_config("mvdiffusion.py:tiny").model)
    tensors = dict(convert.SafetensorsWeights(directory))
    tensors.pop("blocks.1.attn2.add_k_proj.weight")
    tensors["blocks.0.attn1.to_q.weight"] = tensors["blocks.0.attn1.to_q.weight"][:, :-1]
    tensors["blocks.0.attn2.norm_added_q.weight"] = tensors["blocks.0.attn2.norm_added_k.weight"]  # skipped
    tensors["blocks.0.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointMismatchError) as raised:
        convert.import_state_dict(tensors, config)
    message = str(raised.value)
    assert "missing keys (1): blocks.1.attn2.add_k_proj.weight" in message
    assert "unexpected keys (1): blocks.0.extra.weight" in message
    assert "blocks.0.attn1.to_q.weight: checkpoint (32, 31), model (32, 32)" in message


def test_convert_writes_an_orbax_checkpoint_that_loads_the_same_model(tmp_path):
    directory = checkpoint_dir("ti2v")
    convert.convert(directory, tmp_path)
    restored, config = convert.load_wan_transformer(tmp_path)
    assert convert.config_mismatches(convert.read_diffusers_config(directory), config.model) == []
    direct, _ = convert.load_diffusers(directory, dtype=config.model.dtype)
    expected = nnx.to_pure_dict(nnx.state(direct, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(restored, nnx.Param)), expected)


def test_convert_refuses_a_config_of_another_architecture(tmp_path):
    with pytest.raises(CheckpointMismatchError, match=r"model\.num_attention_heads: checkpoint 2, config 3"):
        convert.convert(checkpoint_dir("t2v"), tmp_path, load_config("mvdiffusion.py:tiny"))


@pytest.mark.parametrize("variant, count", PARAMETER_COUNTS.items())
def test_parameter_count_of_variant(variant, count):
    assert transformer.count_parameters(load_config(f"mvdiffusion.py:{variant}").model) == count


def test_every_parameter_has_logical_axes():
    for variant in ("tiny", "wan2_1_i2v_14b"):
        model = transformer.abstract_wan_transformer(load_config(f"mvdiffusion.py:{variant}").model)
        for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            names = param.get_metadata().get("out_sharding")
            assert names is not None and len(names) == param.ndim, (variant, path, names)
            assert set(names) <= set(layers.LOGICAL_AXES) | {None}, (variant, path, names)


def _tiny_inputs(config, frames: int, size: int, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 3)
    video = jax.random.normal(keys[0], (2, frames, size, size, config.in_channels))
    text = jax.random.normal(keys[1], (2, 5, config.text_dim))
    timestep = jax.random.uniform(keys[2], (2,), maxval=1000.0)
    return video, timestep, text


def test_tiny_forward_runs_jitted():
    config = load_config("mvdiffusion.py:tiny").model
    model = transformer.WanTransformer(config, rngs=nnx.Rngs(0))
    video, timestep, text = _tiny_inputs(config, frames=8, size=32)
    prediction = nnx.jit(lambda m, *args: m(*args))(model, video, timestep, text)
    assert prediction.shape == video.shape[:-1] + (config.out_channels,)
    assert np.all(np.isfinite(prediction))


def test_remat_policies_give_the_same_output_and_gradient():
    config = load_config("mvdiffusion.py:tiny").model
    video, timestep, text = _tiny_inputs(config, frames=2, size=16, seed=1)

    def loss(model):
        return jnp.mean(model(video, timestep, text) ** 2)

    results = {}
    for policy in layers.REMAT_POLICIES:
        config.remat = policy
        model = transformer.WanTransformer(config, rngs=nnx.Rngs(0))
        value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
        results[policy] = (value, nnx.to_pure_dict(grads))
    reference_value, reference_grads = results.pop("none")

    def assert_same_to_rounding(grad, reference_grad):
        # Recomputed activations may be fused differently: a few float32 roundings of the largest entry.
        bound = 16 * np.finfo(np.float32).eps * np.max(np.abs(reference_grad))
        assert np.max(np.abs(grad - reference_grad)) <= bound

    for policy, (value, grads) in results.items():
        assert value == reference_value, policy  # the forward pass is the same computation
        jax.tree.map(assert_same_to_rounding, grads, reference_grads)
