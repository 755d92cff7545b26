"""The LRM against the official reference: weight import, stage-by-stage parity, checkpoints.

The tiny random official model (tests/fixtures/vfusion3d_reference/model.safetensors) is
imported with the same code path as the released checkpoint and every stage is compared with
the official PyTorch outputs. `tests/data/tiny_torch_checkpoint.pth` was written once by
torch 2.13 `torch.save` (a state dict with a transposed, a float16, a bfloat16, a shared-storage
view, a 0-d and an int64 tensor, plus non-tensor entries) to test the torch-free reader:

    state["layer.weight"] = torch.arange(12.).reshape(3, 4)
    state["layer.weight_t"] = torch.arange(12.).reshape(3, 4).t()
    state["half"] = (torch.arange(6.) / 4).half().reshape(2, 3)
    state["bf16"] = (torch.arange(4.) / 2).bfloat16()
    state["shared.base"] = base = torch.arange(20.); state["shared.view"] = base[5:11].view(2, 3)
    state["scalar"] = torch.tensor(2.5); state["long"] = torch.arange(3)
    torch.save({"model_state_dict": state, "epoch": 7, "optimizer_state_dict": {...}}, path)
"""

import ast
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import FIXTURE_DIR
from flax import nnx

from vfusion3d_jax import cameras as cameras_lib
from vfusion3d_jax.configs import load_config
from vfusion3d_jax.models import convert, layers, lrm, vit
from vfusion3d_jax.rendering import RenderOptions, query_points
from vfusion3d_jax.rendering.triplane import sample_from_planes

DATA_DIR = Path(__file__).resolve().parent / "data"
FIXTURE_WEIGHTS = FIXTURE_DIR / "model.safetensors"
RENDER_OPTIONS = RenderOptions(num_coarse=8, num_importance=8, deterministic=True)


def assert_close(actual, expected, tol=1e-5):
    """Max abs difference within tol relative to the reference's magnitude (at least tol absolute)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    error = np.max(np.abs(actual - expected))
    assert error <= tol * max(1.0, np.max(np.abs(expected))), f"max abs error {error}"


def model_from(state_dict, model_config) -> lrm.LRM:
    graphdef, state = nnx.split(lrm.abstract_lrm(model_config))
    nnx.replace_by_pure_dict(state, convert.import_state_dict(state_dict, model_config))
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def fixture_config():
    return load_config("lrm.py:fixture")


@pytest.fixture(scope="module")
def state_dict():
    return convert.read_checkpoint(FIXTURE_WEIGHTS)


@nnx.jit(static_argnames=("resolution", "options"))
def _all_stages(model: lrm.LRM, inputs: dict, *, resolution: int, options: RenderOptions) -> dict:
    images = inputs["input_image"]
    image_feats, enc_layers = model.encoder(images, return_layer_outputs=True)
    cond = model.embed_camera(inputs["input_source_camera"])
    tokens, tf_layers = model.transformer.tokens(image_feats, cond, return_layer_outputs=True)
    planes = model.transformer.planes(tokens)
    points = query_points(model.decoder, planes, inputs["input_points"])
    rendered = model(images, inputs["input_source_camera"], inputs["input_render_cameras"], resolution=resolution,
                     options=options)
    return {
        "enc_pixel_values": vit.normalize_images(images),
        "enc_pos_embed_resized": model.encoder.position_embeddings(*images.shape[-2:]),
        "enc_embeddings": model.encoder.embed(vit.normalize_images(images)),
        "enc_layer_outputs": enc_layers,
        "image_feats": image_feats,
        "camera_embeddings": cond,
        "tf_layer_outputs": tf_layers,
        "tf_final_norm": tokens,
        "planes": planes,
        "planes_from_call": rendered["planes"],
        "points_sigma": points["sigma"],
        "points_rgb": points["rgb"],
        # The official renders are channel-first (N, M, ch, h, w).
        "render8_rgb": jnp.moveaxis(rendered["rgb"], -1, 2),
        "render8_depth": jnp.moveaxis(rendered["depth"], -1, 2),
        "render8_weight": jnp.moveaxis(rendered["opacity"], -1, 2),
    }


def _run_all_stages(model, reference):
    inputs = {name: jnp.asarray(reference[name]) for name in
              ("input_image", "input_source_camera", "input_render_cameras", "input_points")}
    return jax.device_get(_all_stages(model, inputs, resolution=8, options=RENDER_OPTIONS))


@pytest.fixture(scope="module")
def outputs(reference, state_dict, fixture_config):
    return _run_all_stages(model_from(state_dict, fixture_config.model), reference)


@pytest.fixture(scope="module")
def size_rule_outputs(reference, state_dict):
    config = load_config("lrm.py:fixture", model__encoder__resize_rule="size")
    return _run_all_stages(model_from(state_dict, config.model), reference)


STAGES = ["enc_pixel_values", "enc_pos_embed_resized", "enc_embeddings", "enc_layer_outputs", "image_feats",
          "camera_embeddings", "tf_layer_outputs", "tf_final_norm", "planes", "points_sigma", "points_rgb"]
RENDERS = ["render8_rgb", "render8_depth", "render8_weight"]


@pytest.mark.parametrize("stage", STAGES)
def test_stage_matches_official(outputs, reference, stage):
    assert_close(outputs[stage], reference[stage])


@pytest.mark.parametrize("name", RENDERS)
def test_render_matches_official(outputs, reference, name):
    assert_close(outputs[name], reference[name], tol=1e-4)


def test_call_returns_the_planes_of_forward_planes(outputs):
    np.testing.assert_array_equal(outputs["planes_from_call"], outputs["planes"])


def test_size_resize_rule_matches_newer_transformers(size_rule_outputs):
    reference = dict(np.load(FIXTURE_DIR / "reference_posembed_size.npz"))
    for name in STAGES + RENDERS:
        if name in reference:
            assert_close(size_rule_outputs[name], reference[name], tol=1e-4 if name in RENDERS else 1e-5)
    # The two rules really differ here (by up to 0.27 in the position embeddings).
    legacy = np.load(FIXTURE_DIR / "reference.npz")["enc_pos_embed_resized"]
    assert np.max(np.abs(reference["enc_pos_embed_resized"] - legacy)) > 0.1


def test_bicubic_matrix_is_identity_at_same_size_and_keeps_constants():
    np.testing.assert_array_equal(vit.bicubic_resize_matrix(5, 5, vit.resize_step(5, 5, "size")), np.eye(5))
    for size in (3, 4, 8):  # down- and up-sampling, with clamped border taps
        matrix = vit.bicubic_resize_matrix(5, size, vit.resize_step(5, size, "legacy"))
        np.testing.assert_allclose(matrix.sum(axis=1), 1.0, rtol=1e-6)


# Import, export and checkpoint files ---------------------------------------------------------


def test_config_matches_checkpoint_and_is_inferred(state_dict, fixture_config):
    assert convert.config_mismatches(state_dict, fixture_config.model) == []
    # Everything but the head counts (invisible in shapes) comes from the checkpoint.
    inferred = convert.infer_model_config(state_dict, load_config("lrm.py:large").model)
    inferred.encoder.num_heads, inferred.transformer.num_heads = 4, 4
    expected = fixture_config.model.to_dict()
    assert {k: v for k, v in inferred.to_dict().items() if k not in ("dtype", "remat")} == {
        k: v for k, v in expected.items() if k not in ("dtype", "remat")}
    mismatches = convert.config_mismatches(state_dict, load_config("lrm.py:tiny").model)
    assert "model.encoder.dim: checkpoint 48, config 64" in mismatches


def test_export_inverts_import(state_dict, fixture_config):
    exported = convert.export_state_dict(convert.import_state_dict(state_dict, fixture_config.model),
                                         fixture_config.model)
    assert sorted(exported) == sorted(state_dict)  # safetensors files store keys sorted
    for key, value in state_dict.items():
        np.testing.assert_array_equal(np.asarray(exported[key]), value, err_msg=key)


def test_common_prefix_is_stripped(state_dict, fixture_config):
    plain = convert.import_state_dict(state_dict, fixture_config.model)
    prefixed = convert.import_state_dict({f"module.{k}": v for k, v in state_dict.items()}, fixture_config.model)
    jax.tree.map(np.testing.assert_array_equal, prefixed, plain)
    mixed = {f"module.{k}": v for k, v in state_dict.items()}
    mixed["other.transformer.norm.bias"] = mixed.pop("module.transformer.norm.bias")
    with pytest.raises(convert.CheckpointMismatchError, match="other.transformer.norm.bias"):
        convert.import_state_dict(mixed, fixture_config.model)


def test_missing_unexpected_and_misshapen_keys_are_named(state_dict, fixture_config):
    broken = dict(state_dict)
    del broken["transformer.layers.1.self_attn.in_proj_weight"]
    broken["transformer.layers.2.mlp.0.weight"] = np.zeros((256, 64), np.float32)
    broken["transformer.deconv.bias"] = np.zeros((9,), np.float32)
    with pytest.raises(convert.CheckpointMismatchError) as error:
        convert.import_state_dict(broken, fixture_config.model)
    message = str(error.value)
    assert "missing keys (1): transformer.layers.1.self_attn.in_proj_weight" in message
    assert "unexpected keys (1): transformer.layers.2.mlp.0.weight" in message
    assert "transformer.deconv.bias: checkpoint (9,), model (8,)" in message


def test_torch_checkpoint_is_read_without_torch():
    state = convert.read_checkpoint(DATA_DIR / "tiny_torch_checkpoint.pth")
    expected = {
        "layer.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
        "layer.weight_t": np.arange(12, dtype=np.float32).reshape(3, 4).T,
        "half": (np.arange(6, dtype=np.float32) / 4).astype(np.float16).reshape(2, 3),
        "bf16": (np.arange(4, dtype=np.float32) / 2).astype(ml_dtypes.bfloat16),
        "shared.base": np.arange(20, dtype=np.float32),
        "shared.view": np.arange(5, 11, dtype=np.float32).reshape(2, 3),
        "scalar": np.array(2.5, np.float32),
        "long": np.arange(3, dtype=np.int64),
    }
    assert list(state) == list(expected)
    for key, value in expected.items():
        assert state[key].dtype == value.dtype, key
        np.testing.assert_array_equal(state[key], value, err_msg=key)
    everything = convert.read_torch_checkpoint(DATA_DIR / "tiny_torch_checkpoint.pth")
    assert everything["epoch"] == 7 and everything["optimizer_state_dict"] == {"param_groups": [{"lr": 0.1}]}


def test_torch_reader_runs_no_code_from_the_file(tmp_path):
    marker = tmp_path / "pwned"
    command = f"touch {marker}".encode()
    # Protocol-2 pickle of os.system(command): GLOBAL, argument tuple, REDUCE.
    payload = b"\x80\x02cos\nsystem\nX" + len(command).to_bytes(4, "little") + command + b"\x85R."
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", payload)
    loaded = convert.read_torch_checkpoint(path)
    assert isinstance(loaded, convert._Unsupported) and not marker.exists()
    with pytest.raises(ValueError, match="entries that are not tensors|expected a state dict"):
        convert.read_checkpoint(path)


def test_legacy_torch_format_is_refused(tmp_path):
    path = tmp_path / "old.pth"
    path.write_bytes(b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.")  # the magic number torch < 1.6 writes first
    with pytest.raises(ValueError, match="legacy format"):
        convert.read_checkpoint(path)


def test_convert_to_orbax_and_load_round_trip(tmp_path, state_dict, fixture_config, reference):
    directory = convert.convert(FIXTURE_WEIGHTS, tmp_path, fixture_config)
    assert directory == tmp_path / "checkpoints" / "0"
    loaded = convert.load_lrm(tmp_path)
    stored = convert.load_checkpoint_config(tmp_path)
    assert stored.model.to_dict() == fixture_config.model.to_dict()
    assert stored.inference.to_dict() == convert.OFFICIAL_INFERENCE  # the official input framing
    direct = model_from(state_dict, fixture_config.model)
    images, cameras = jnp.asarray(reference["input_image"]), jnp.asarray(reference["input_source_camera"])
    forward = nnx.jit(lambda model: model.forward_planes(images, cameras))
    np.testing.assert_array_equal(np.asarray(forward(loaded)), np.asarray(forward(direct)))
    with pytest.raises(convert.CheckpointMismatchError, match="model.transformer.dim: checkpoint 64, config 128"):
        convert.convert(FIXTURE_WEIGHTS, tmp_path / "other", load_config("lrm.py:tiny"))


# The released configuration, from shapes only -------------------------------------------------


def _released_keys() -> dict[str, tuple[int, ...]]:
    lines = (FIXTURE_DIR / "keys_released_model.txt").read_text().splitlines()
    return {key: tuple(ast.literal_eval(shape)) for key, shape in (line.split("\t")[:2] for line in lines)}


def test_large_config_has_the_released_parameters():
    config = load_config("lrm.py:large").model
    released = _released_keys()
    assert lrm.count_parameters(config) == sum(int(np.prod(shape)) for shape in released.values()) == 452_135_700
    assert list(convert.expected_state_dict_shapes(config).items()) == list(released.items())


def test_every_parameter_has_logical_axes_covered_by_the_rules():
    config = load_config("lrm.py:large")
    covered = {name for name, _ in config.mesh.logical_rules}
    decoder_paths = set()
    for path, variable in nnx.to_flat_state(nnx.state(lrm.abstract_lrm(config.model), nnx.Param)):
        if path[0] == "decoder":  # the renderer's module, replicated
            decoder_paths.add(path)
            continue
        names = variable.get_metadata().get("out_sharding")
        assert names is not None and len(names) == variable.ndim, path
        assert set(names) - {None} <= set(layers.LOGICAL_AXES) <= covered, path
        assert (names[0] == layers.LAYER_AXIS) == ("blocks" in path), path
    assert decoder_paths


# Options that the parity tests do not reach ---------------------------------------------------


@pytest.fixture(scope="module")
def mlp_stack():
    return nnx.jit(lambda: layers.stack_layers(lambda rngs: layers.Mlp(8, 16, rngs=rngs), 3, nnx.Rngs(0)))()


def _stack_gradients(stack, remat):
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))

    def loss(blocks):
        return jnp.sum(layers.scan_layers(blocks, x, lambda mlp, h: h + mlp(h), remat=remat)[0] ** 2)

    return nnx.state(nnx.jit(nnx.grad(loss))(stack))


@pytest.mark.parametrize("remat", ["full", "dots_with_no_batch_dims"])
def test_remat_gives_the_same_gradients(mlp_stack, remat):
    jax.tree.map(np.testing.assert_array_equal, _stack_gradients(mlp_stack, remat), _stack_gradients(mlp_stack, "none"))


def test_register_tokens_follow_cls():
    config = load_config("lrm.py:fixture", model__encoder__num_register_tokens=2).model.encoder
    encoder = nnx.eval_shape(lambda: vit.VisionTransformer(config, rngs=nnx.Rngs(0)))
    images = jax.ShapeDtypeStruct((1, 3, 70, 71), jnp.float32)  # 5 x 5 patches; the 71st column belongs to none
    assert nnx.eval_shape(lambda e, x: e(x), encoder, images).shape == (1, 1 + 2 + 25, 48)


def test_patch_mask_substitutes_the_mask_token(state_dict, fixture_config, reference):
    encoder = model_from(state_dict, fixture_config.model).encoder
    pixels = vit.normalize_images(jnp.asarray(reference["input_image"]))
    mask = jnp.zeros((2, 16), bool).at[1, 3].set(True)
    tokens = nnx.jit(lambda e: e.embed(pixels, mask))(encoder)
    expected = np.array(reference["enc_embeddings"])
    expected[1, 1 + 3] = encoder.mask_token[...][0] + reference["enc_pos_embed_resized"][0, 1 + 3]
    assert_close(tokens, expected)


def test_bfloat16_compute_stays_close(state_dict, reference):
    config = load_config("lrm.py:fixture", model__dtype="bfloat16", model__remat="full")
    model = model_from(state_dict, config.model)
    images, cameras = jnp.asarray(reference["input_image"]), jnp.asarray(reference["input_source_camera"])
    planes = nnx.jit(lambda model: model.forward_planes(images, cameras))(model)
    assert planes.dtype == jnp.float32
    relative = np.abs(np.asarray(planes) - reference["planes"]).max() / np.abs(reference["planes"]).max()
    assert relative < 0.03, relative  # bfloat16 keeps 8 mantissa bits
    grads = nnx.eval_shape(lambda m: nnx.grad(lambda m: m.forward_planes(images, cameras).sum())(m), model)
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(grads))} == {jnp.dtype(jnp.float32)}


def test_source_projection_matches_the_camera_model():
    points = lrm.triplane_token_points(4)
    intrinsics = cameras_lib.intrinsics_matrix(0.8, 0.7, 0.52, 0.47)
    cam2world = cameras_lib.orbit_cam2world(np.array([0.0, 37.0]), np.array([0.0, 20.0]), 1.7)
    source = jnp.asarray(cameras_lib.source_camera(cam2world, intrinsics))
    projected = np.asarray(lrm.project_to_source(jnp.asarray(points), source))
    for view in range(2):
        assert_close(projected[view], cameras_lib.project_points(points, cam2world[view], intrinsics))


def test_token_points_are_the_token_centres_of_the_planes():
    """A plane whose 2x2 pixels of token t hold t, read at token t's point, gives t on t's plane."""
    low_res = 4
    token_ids = np.arange(3 * low_res**2, dtype=np.float32).reshape(3, 1, low_res, low_res)
    planes = jnp.asarray(token_ids.repeat(2, axis=2).repeat(2, axis=3))
    features = sample_from_planes(planes, jnp.asarray(lrm.triplane_token_points(low_res)))  # (3, P, 1)
    own_plane = np.asarray(features)[np.repeat(np.arange(3), low_res**2), np.arange(3 * low_res**2), 0]
    np.testing.assert_allclose(own_plane, token_ids.ravel(), atol=1e-5)


def test_bilinear_sample_matches_map_coordinates_with_zero_padding():
    grid = jax.random.normal(jax.random.key(0), (2, 5, 6, 3))
    coords = jax.random.uniform(jax.random.key(1), (2, 40, 2), minval=-1.5, maxval=6.5)
    sampled = lrm.bilinear_sample(grid, coords)
    for n in range(2):
        for d in range(3):
            expected = jax.scipy.ndimage.map_coordinates(grid[n, :, :, d], [coords[n, :, 1], coords[n, :, 0]],
                                                         order=1, mode="constant", cval=0.0)
            assert_close(sampled[n, :, d], expected)


@pytest.mark.parametrize("field", ["source_projection", "source_planes"])
def test_source_projection_starts_at_zero_and_learns(field):
    config = load_config("lrm.py:fixture", **{f"model__{field}": True}).model
    model = lrm.LRM(config, rngs=nnx.Rngs(0))
    images = jax.random.uniform(jax.random.key(0), (2, 3, 64, 64))
    source = jnp.asarray(cameras_lib.canonical_source_camera())[None].repeat(2, 0)
    without = model.transformer(model.encode_image(images), model.embed_camera(source))
    assert_close(model.forward_planes(images, source), without)
    grads = nnx.grad(lambda m: jnp.sum(m.forward_planes(images, source) ** 2))(model)
    for kernel in (getattr(grads, field).proj.kernel, getattr(grads, field).colour_proj.kernel):
        assert np.abs(np.asarray(kernel[...])).max() > 0


def test_source_planes_put_the_input_colour_on_the_plane_facing_the_camera():
    """Left two patch columns of the image red, the rest white; with the skip's kernel passing the
    colours into channels 0-2, the facing plane's texels are red where they project onto red
    patches and white where they project onto white ones, scaled by how squarely the plane faces."""
    config = load_config("lrm.py:fixture", model__source_planes=True).model
    model = lrm.LRM(config, rngs=nnx.Rngs(0))
    kernel = np.zeros(model.source_planes.colour_proj.kernel.shape, np.float32)
    kernel[:, :3] = np.eye(3)
    model.source_planes.colour_proj.kernel[...] = jnp.asarray(kernel)
    size, patch = 64, config.encoder.patch_size
    images = np.ones((1, 3, size, size), np.float32)
    images[:, 1:, :, :2 * patch] = 0.0
    source = jnp.asarray(cameras_lib.canonical_source_camera())[None]
    without = model.transformer(model.encode_image(jnp.asarray(images)), model.embed_camera(source))
    skip = np.asarray(model.forward_planes(jnp.asarray(images), source) - without)  # (1, 3, C, R, R)
    side = skip.shape[-1]
    uv = np.asarray(lrm.project_to_source(jnp.asarray(lrm.triplane_token_points(side)), source))[0]
    cells = uv.reshape(3, side, side, 2) * size / patch - 0.5  # patch-grid coordinates
    view_axis = np.asarray(source)[0, :12].reshape(3, 4)[:, 2]
    facing = np.abs(lrm.PLANE_NORMALS @ view_axis) / np.linalg.norm(view_axis)
    plane = int(np.argmax(facing))
    cells, colours = cells[plane], skip[0, plane, :3] / facing[plane]
    rows_inside = (cells[..., 1] >= 0) & (cells[..., 1] <= size // patch - 1)
    red_cells = rows_inside & (cells[..., 0] >= 0) & (cells[..., 0] <= 1)
    white_cells = rows_inside & (cells[..., 0] >= 2) & (cells[..., 0] <= size // patch - 1)
    assert red_cells.sum() >= 3 and white_cells.sum() >= 3
    np.testing.assert_allclose(colours[0][red_cells | white_cells], 1.0, atol=1e-4)
    np.testing.assert_allclose(colours[1][red_cells], 0.0, atol=1e-4)
    np.testing.assert_allclose(colours[1][white_cells], 1.0, atol=1e-4)
