"""The Wan VAE against diffusers (weight import, encode, decode, every documented intermediate) and the codecs.

tests/fixtures/wan_reference/ (written by tools/make_wan_reference.py with diffusers itself;
its README says how) holds tiny random `AutoencoderKLWan` checkpoints in the Wan 2.1 form and
the Wan 2.2 form (residual blocks, patch size 2), with a 9-frame video (the first frame, then
two chunks of 4: every causal-cache path runs), its posterior, a decoded latent and the
encoder's and decoder's stages, in float32 and float64. Each checkpoint is imported with the
same code as a released one and run in float32; every tensor must be as close to the float64
reference as a small multiple of diffusers' own float32-vs-float64 spread on that tensor.
No torch is needed.
"""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import SPREAD_MULTIPLE, WAN_FIXTURE_DIR, assert_matches_diffusers, float32_spread
from flax import nnx

from vfusion3d_jax import errors
from vfusion3d_jax.configs import config_module, load_config
from vfusion3d_jax.models import layers
from vfusion3d_jax.models.convert import CheckpointMismatchError
from vfusion3d_jax.models.wan import codec as codec_lib
from vfusion3d_jax.models.wan import convert, vae as vae_lib

FORMS = ("vae_2_1", "vae_2_2")
# Parameters of diffusers' AutoencoderKLWan built with the published vae/config.json (its state dict's sizes).
PUBLISHED_VAE_PARAMETERS = {"wan2_1_1_3b": 126_892_531, "wan2_2_ti2v_5b": 704_688_668}


def checkpoint_dir(form: str) -> Path:
    return WAN_FIXTURE_DIR / form


@functools.cache
def load_reference(form: str) -> dict:
    with np.load(WAN_FIXTURE_DIR / f"{form}.npz") as arrays:
        return dict(arrays)


@functools.cache
def import_vae(form: str):
    """The fixture checkpoint imported in float32: (WanVAE, config.codec.vae)."""
    return convert.load_diffusers_vae(checkpoint_dir(form))


@pytest.fixture(scope="module", params=FORMS)
def form(request):
    return request.param


@pytest.fixture(scope="module")
def reference(form):
    return load_reference(form)


@pytest.fixture(scope="module")
def imported(form):
    return import_vae(form)


@nnx.jit
def _encode_and_decode_diffusers(vae, video, latent):
    return (vae.encode_diffusers(video, return_intermediates=True),
            vae.decode_diffusers(latent, return_intermediates=True))


def test_vae_matches_diffusers(form, reference, imported):
    vae, _ = imported
    (mean, logvar, encoder_stages), (decoded, decoder_stages) = _encode_and_decode_diffusers(
        vae, jnp.asarray(reference["video"]), jnp.asarray(reference["latent"]))
    ours = dict(encoder_stages, **decoder_stages, latent_mean=mean, latent_logvar=logvar, decoded=decoded)
    expected_keys = {key.split("/", 1)[1] for key in reference if key.startswith("float64/")}
    assert expected_keys <= set(ours)  # the fixture leaves out the full-resolution decoder stages
    assert_matches_diffusers(reference, ours, expected_keys, form)


def test_import_export_round_trip_is_exact(form, imported):
    tensors = convert.SafetensorsWeights(checkpoint_dir(form), convert.VAE_PIPELINE_SUBFOLDER)
    vae, config = imported
    exported = convert.export_vae_state_dict(nnx.to_pure_dict(nnx.state(vae, nnx.Param)), config)
    assert set(exported) == set(tensors)
    for key, value in exported.items():
        np.testing.assert_array_equal(np.asarray(value), tensors[key], err_msg=key)


def test_config_comes_from_the_checkpoint(form, imported):
    _, config = imported
    config_json = convert.read_diffusers_config(checkpoint_dir(form), convert.VAE_PIPELINE_SUBFOLDER)
    assert convert.vae_config_mismatches(config_json, config) == []
    assert config.z_dim == config_json["z_dim"] and config.is_residual == config_json["is_residual"]
    # The released Wan 2.2 config's `clip_output` is ignored, as by diffusers; an unknown field is not.
    assert convert.vae_architecture_fields({**config_json, "clip_output": False}) == \
        convert.vae_architecture_fields(config_json)
    with pytest.raises(CheckpointMismatchError, match="does not implement: .'spatial_tiles'."):
        convert.vae_architecture_fields({**config_json, "spatial_tiles": 2})


def test_strict_key_and_shape_check():
    tensors = dict(convert.SafetensorsWeights(checkpoint_dir("vae_2_2"), convert.VAE_PIPELINE_SUBFOLDER))
    config = convert.vae_config_from_diffusers(
        convert.read_diffusers_config(checkpoint_dir("vae_2_2"), convert.VAE_PIPELINE_SUBFOLDER))
    tensors.pop("decoder.up_blocks.0.upsampler.time_conv.bias")
    tensors["encoder.mid_block.attentions.0.norm.gamma"] = np.ones((16, 1, 1, 1), np.float32)
    tensors["decoder.up_blocks.0.upsamplers.0.resample.1.weight"] = np.zeros((12, 12, 3, 3), np.float32)
    with pytest.raises(CheckpointMismatchError) as raised:
        convert.import_vae_state_dict(tensors, config)
    message = str(raised.value)
    assert "missing keys (1): decoder.up_blocks.0.upsampler.time_conv.bias" in message
    assert "unexpected keys (1): decoder.up_blocks.0.upsamplers.0.resample.1.weight" in message
    assert "encoder.mid_block.attentions.0.norm.gamma: checkpoint (16, 1, 1, 1), model (16, 1, 1)" in message


@pytest.mark.parametrize("variant, z_dim, spatial_stride", [("wan2_1_1_3b", 16, 8), ("wan2_2_ti2v_5b", 48, 16)])
def test_published_vae_shapes(variant, z_dim, spatial_stride):
    config = load_config(f"mvdiffusion.py:{variant}")
    assert vae_lib.count_vae_parameters(config.codec.vae) == PUBLISHED_VAE_PARAMETERS[variant]
    codec = codec_lib.abstract_codec(config.codec)
    assert (codec.latent_channels, codec.frame_stride, codec.spatial_stride) == (z_dim, 4, spatial_stride)
    # 81 frames of 480 x 832, the Wan pipelines' default video.
    latents = nnx.eval_shape(lambda c, v: c.encode(v), codec, jax.ShapeDtypeStruct((1, 81, 480, 832, 3), jnp.float32))
    assert latents.shape == (1, *codec.latent_shape(81, 480, 832))


def test_every_variant_codec_feeds_its_transformer():
    for variant in config_module("mvdiffusion.py").VARIANTS:
        config = load_config(f"mvdiffusion.py:{variant}")
        assert codec_lib.abstract_codec(config.codec).latent_channels == config.model.out_channels, variant


def test_every_vae_parameter_has_logical_axes():
    vae = vae_lib.abstract_wan_vae(load_config("mvdiffusion.py:wan2_2_ti2v_5b").codec.vae)
    for path, param in nnx.to_flat_state(nnx.state(vae, nnx.Param)):
        names = param.get_metadata().get("out_sharding")
        assert names is not None and len(names) == param.ndim, (path, names)
        assert set(names) <= set(layers.LOGICAL_AXES) | {None}, (path, names)


def test_latent_normalisation_is_the_wan_pipelines():
    """The I2V pipeline's condition: (encode(video).mode() - latents_mean) * (1 / latents_std), Wan 2.1 VAE."""
    vae, _ = import_vae("vae_2_1")
    with np.load(WAN_FIXTURE_DIR / "sampling_i2v.npz") as arrays:
        latent = np.moveaxis(arrays["vae_latent_condition"], 1, -1)
        normalised = np.moveaxis(arrays["condition"][:, 4:], 1, -1)  # after the 4 mask channels
    np.testing.assert_array_equal(vae.normalize_latents(jnp.asarray(latent)), normalised)
    np.testing.assert_allclose(vae.denormalize_latents(vae.normalize_latents(latent)), latent, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Codecs.


def _codec_config(**fields) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(fields)


def test_identity_codec_round_trip_and_shapes():
    codec = codec_lib.make_codec(load_config("mvdiffusion.py:tiny").codec)
    assert isinstance(codec, codec_lib.IdentityCodec)
    video = jax.random.uniform(jax.random.key(0), (2, 8, 32, 32, 3), minval=-1.0, maxval=1.0)
    latents = codec.encode(video)
    assert latents.shape == (2, *codec.latent_shape(8, 32, 32))
    np.testing.assert_array_equal(codec.decode(latents), video)
    with pytest.raises(ValueError, match="expected videos"):
        codec.encode(video[..., :2])


def test_wan_vae_codec_shapes_agree_with_latent_shape(form, imported):
    codec = codec_lib.make_codec(_codec_config(kind="wan_vae", checkpoint=str(checkpoint_dir(form))))
    assert isinstance(codec, codec_lib.WanVAECodec) and codec.latent_channels == imported[1].z_dim
    frames, height, width = 9, 2 * codec.spatial_stride, 3 * codec.spatial_stride
    latent_shape = codec.latent_shape(frames, height, width)
    latents = nnx.eval_shape(lambda c, v: c.encode(v), codec,
                             jax.ShapeDtypeStruct((2, frames, height, width, 3), jnp.float32))
    assert latents.shape == (2, *latent_shape)
    video = nnx.eval_shape(lambda c, z: c.decode(z), codec, latents)
    assert video.shape == (2, frames, height, width, 3)
    with pytest.raises(ValueError, match=r"needs 1 \+ 4·k frames"):
        codec.latent_shape(8, height, width)
    with pytest.raises(ValueError, match=f"multiples of {codec.spatial_stride}"):
        codec.latent_shape(frames, height + 4, width)


def test_wan_vae_codec_encodes_the_normalised_posterior_mean():
    """codec.encode = normalise(mean), codec.decode = decode(denormalise), on the Wan 2.2 fixture (the
    codec code is the same for both forms; one keeps the test fast)."""
    reference = load_reference("vae_2_2")
    vae, _ = import_vae("vae_2_2")
    codec = codec_lib.WanVAECodec(vae)
    video = jnp.moveaxis(jnp.asarray(reference["video"]), 1, -1)
    latent = jnp.moveaxis(jnp.asarray(reference["latent"]), 1, -1)
    latents, decoded = nnx.jit(lambda c, v, z: (c.encode(v), c.decode(c.vae.normalize_latents(z))))(
        codec, video, latent)
    # Normalising and back adds two float32 roundings to the encoder's error.
    tolerance = 2 * SPREAD_MULTIPLE * float32_spread(reference, "latent_mean")
    expected_mean = np.moveaxis(reference["float64/latent_mean"], 1, -1)
    np.testing.assert_allclose(vae.denormalize_latents(latents), expected_mean, rtol=0, atol=tolerance)
    np.testing.assert_allclose(decoded, np.moveaxis(reference["float64/decoded"], 1, -1), rtol=0,
                               atol=SPREAD_MULTIPLE * float32_spread(reference, "decoded"))


def test_make_codec_errors():
    published = load_config("mvdiffusion.py:wan2_1_1_3b").codec
    with pytest.raises(errors.InvalidConfigValueError, match="config.codec.checkpoint is not set"):
        codec_lib.make_codec(published)
    with published.unlocked():
        published.checkpoint = str(checkpoint_dir("vae_2_1"))
    with pytest.raises(CheckpointMismatchError, match=r"codec\.vae\.base_dim: checkpoint 4, config 96"):
        codec_lib.make_codec(published)
    with pytest.raises(errors.InvalidConfigValueError, match="unknown codec kind 'pixels'"):
        codec_lib.make_codec(_codec_config(kind="pixels"))
