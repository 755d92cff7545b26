"""Fine-tuning on the tiny Wan transformer: parameter filters, LoRA in scanned blocks, merge, EMA.

Real optimisation steps (jitted, on split graphdef/state as the trainer runs them) on a tiny
video batch of `configs/mvdiffusion.py:tiny` (2 frames of 16 px: 32 tokens), so each test
compiles one step of a 4-block scanned model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from vfusion3d_jax import errors
from vfusion3d_jax.configs import load_config
from vfusion3d_jax.models import LRM
from vfusion3d_jax.models.wan.transformer import WanTransformer
from vfusion3d_jax.train import finetune, sharding
from vfusion3d_jax.train import optimizer as optimizer_lib

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")


@pytest.fixture(scope="module")
def model_config() -> ml_collections.ConfigDict:
    return load_config("mvdiffusion.py:tiny").model


@pytest.fixture(scope="module")
def batch(model_config) -> dict[str, jax.Array]:
    keys = jax.random.split(jax.random.key(0), 3)
    return dict(
        video=jax.random.normal(keys[0], (2, 2, 16, 16, model_config.in_channels)),
        timestep=jnp.array([200.0, 700.0]),
        text=jax.random.normal(keys[1], (2, 5, model_config.text_dim)),
        target=jax.random.normal(keys[2], (2, 2, 16, 16, model_config.out_channels)),
    )


def finetune_config(**fields) -> ml_collections.ConfigDict:
    config = finetune.finetune_config()
    config.update(fields)
    return config


def loss_fn(model: WanTransformer, batch: dict[str, jax.Array]) -> jax.Array:
    prediction = model(batch["video"], batch["timestep"], batch["text"])
    return jnp.mean(jnp.square(prediction - batch["target"]))


@nnx.jit
def predict(model: WanTransformer, batch: dict[str, jax.Array]) -> jax.Array:
    return model(batch["video"], batch["timestep"], batch["text"])


def train(model: nnx.Module, optimizer: nnx.Optimizer, wrt, batch, num_steps: int) -> tuple[list[float], nnx.State]:
    """`num_steps` steps of one jitted step on split states, as the trainer runs it; (losses, last gradients).

    The model and optimizer are updated in place.
    """
    model_graphdef, model_state = nnx.split(model)
    optimizer_graphdef, optimizer_state = nnx.split(optimizer)

    @jax.jit
    def step(model_state, optimizer_state):
        model = nnx.merge(model_graphdef, model_state)
        optimizer = nnx.merge(optimizer_graphdef, optimizer_state)
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model, batch)
        optimizer.update(model, grads)
        return nnx.state(model), nnx.state(optimizer), loss, grads

    losses = []
    for _ in range(num_steps):
        model_state, optimizer_state, loss, grads = step(model_state, optimizer_state)
        losses.append(float(loss))
    nnx.update(model, model_state)
    nnx.update(optimizer, optimizer_state)
    return losses, grads


def flat_arrays(state: nnx.State) -> dict[str, np.ndarray]:
    return {finetune.path_string(path): np.asarray(variable[...]) for path, variable in nnx.to_flat_state(state)}


def moment_paths(optimizer: nnx.Optimizer) -> set[str]:
    """The parameter paths of the optimiser's Adam moments (mu, nu)."""
    paths = set()
    for path, _ in nnx.to_flat_state(nnx.state(optimizer)):
        moment = next((i for i, part in enumerate(path) if part in ("mu", "nu")), None)
        if moment is not None:
            paths.add(finetune.path_string(path[moment + 1:]))
    return paths


# --------------------------------------------------------------------------- parameter filter


def test_filter_freezes_the_rest_and_gives_it_no_optimizer_state(model_config, batch):
    config = finetune_config(mode="filter", trainable=(r"^blocks/attn2/", r"^proj_out/"))
    wrt = finetune.trainable_filter(config)
    model = finetune.apply_finetuning(WanTransformer(model_config, rngs=nnx.Rngs(0)), config, rngs=nnx.Rngs(1))
    trainable_before = flat_arrays(nnx.state(model, wrt))
    frozen_before = flat_arrays(nnx.state(model, nnx.Not(wrt)))
    assert trainable_before and all(path.startswith(("blocks/attn2/", "proj_out/")) for path in trainable_before)
    assert {"blocks/attn1/to_q/kernel", "patch_embedding/kernel", "scale_shift_table"} <= set(frozen_before)

    # The trainer's optimiser (clipping, AdamW with its weight-decay mask), built for the trainable part.
    optimizer_config = ml_collections.ConfigDict(dict(
        learning_rate=1e-3, warmup_steps=0, final_lr_fraction=1.0, grad_clip_norm=1.0, b1=0.9, b2=0.95,
        eps=1e-8, weight_decay=0.05, no_decay_patterns=()))
    tx = optimizer_lib.make_optimizer(optimizer_config, 10, nnx.state(model, wrt))
    optimizer = nnx.Optimizer(model, tx, wrt=wrt)
    assert moment_paths(optimizer) == set(trainable_before)

    _, grads = train(model, optimizer, wrt, batch, num_steps=3)

    assert set(flat_arrays(grads)) == set(trainable_before)
    frozen_after = flat_arrays(nnx.state(model, nnx.Not(wrt)))
    assert not [path for path, before in frozen_before.items() if not np.array_equal(frozen_after[path], before)]
    trainable_after = flat_arrays(nnx.state(model, wrt))
    unchanged = [path for path, before in trainable_before.items() if np.array_equal(trainable_after[path], before)]
    assert not unchanged


def test_trainable_filter_by_mode():
    param = nnx.Param(jnp.zeros(2))
    lora = finetune.LoRAParam(jnp.zeros(2))
    q_kernel = ("blocks", "attn1", "to_q", "kernel")
    ffn_kernel = ("blocks", "ffn", "fc1", "kernel")

    full = nnx.filterlib.to_predicate(finetune.trainable_filter(finetune_config()))
    assert full(q_kernel, param) and full(ffn_kernel, param)

    selected = nnx.filterlib.to_predicate(finetune.trainable_filter(finetune_config(mode="filter",
                                                                                    trainable=("attn1/",))))
    assert selected(q_kernel, param) and not selected(ffn_kernel, param)

    lora_only = nnx.filterlib.to_predicate(finetune.trainable_filter(finetune_config(mode="lora")))
    assert lora_only(q_kernel, lora) and not lora_only(q_kernel, param)

    lora_and_ffn = nnx.filterlib.to_predicate(finetune.trainable_filter(finetune_config(mode="lora",
                                                                                        trainable=("/ffn/",))))
    assert lora_and_ffn(q_kernel, lora) and lora_and_ffn(ffn_kernel, param) and not lora_and_ffn(q_kernel, param)


@pytest.mark.parametrize("fields, message", [
    (dict(mode="partial"), "unknown"),
    (dict(mode="full", trainable=("attn1",)), "mode is 'full'"),
    (dict(mode="filter"), "nothing would train"),
    (dict(mode="filter", trainable=("attn1/(",)), "invalid"),
])
def test_filter_config_errors(fields, message):
    with pytest.raises(errors.InvalidConfigValueError, match=message):
        finetune.trainable_filter(finetune_config(**fields))


def test_a_regex_that_matches_nothing_is_an_error(model_config):
    config = finetune_config(mode="filter", trainable=(r"^blokcs/attn2/",))
    with pytest.raises(errors.InvalidConfigValueError, match="matches no parameter"):
        nnx.eval_shape(lambda: finetune.apply_finetuning(WanTransformer(model_config, rngs=nnx.Rngs(0)), config,
                                                         rngs=nnx.Rngs(1)))


# --------------------------------------------------------------------------- LoRA


def test_lora_trains_only_adapters_and_merges_into_the_original_structure(model_config, batch):
    model = WanTransformer(model_config, rngs=nnx.Rngs(0))
    original_graphdef, original_state = nnx.split(model)
    original_output = predict(model, batch)

    config = finetune_config(mode="lora", lora=dict(rank=4, alpha=8.0, targets=finetune.DEFAULT_LORA_TARGETS))
    wrt = finetune.trainable_filter(config)
    finetune.apply_finetuning(model, config, rngs=nnx.Rngs(1))

    # Adapters on q, k, v, out of both attentions of the scanned blocks, stacked like the kernels.
    adapters = flat_arrays(nnx.state(model, finetune.LoRAParam))
    assert set(adapters) == {f"blocks/{attention}/{projection}/lora_{which}" for attention in ("attn1", "attn2")
                             for projection in ATTENTION_PROJECTIONS for which in "ab"}
    num_layers, dim = model_config.num_layers, model_config.num_attention_heads * model_config.attention_head_dim
    assert adapters["blocks/attn1/to_q/lora_a"].shape == (num_layers, dim, 4)
    assert adapters["blocks/attn1/to_q/lora_b"].shape == (num_layers, 4, dim)
    assert isinstance(model.blocks.attn1.to_q, finetune.LoRALinear)
    # The base parameters keep their paths: a pretrained checkpoint restores into them as is.
    base_state = nnx.state(model, nnx.Not(finetune.LoRAParam))
    assert jax.tree.structure(base_state) == jax.tree.structure(original_state)

    # B = 0: the adapted model computes exactly what the pretrained one did.
    np.testing.assert_array_equal(predict(model, batch), original_output)

    base_before = flat_arrays(base_state)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=wrt)
    assert moment_paths(optimizer) == set(adapters)
    losses, _ = train(model, optimizer, wrt, batch, num_steps=6)

    assert losses[-1] < 0.99 * losses[0], losses
    base_after = flat_arrays(nnx.state(model, nnx.Not(finetune.LoRAParam)))
    assert all(np.array_equal(base_after[path], before) for path, before in base_before.items())
    adapters_after = flat_arrays(nnx.state(model, finetune.LoRAParam))
    assert not [path for path, before in adapters.items() if np.array_equal(adapters_after[path], before)]

    adapted_output = predict(model, batch)
    assert not np.allclose(adapted_output, original_output)
    finetune.merge_lora(model)

    merged_graphdef, merged_state = nnx.split(model)
    assert merged_graphdef == original_graphdef
    assert jax.tree.structure(merged_state) == jax.tree.structure(original_state)
    np.testing.assert_allclose(predict(model, batch), adapted_output, rtol=1e-5, atol=1e-5)
    # Only the adapted kernels moved.
    merged = flat_arrays(merged_state)
    changed = {path for path, before in base_before.items() if not np.array_equal(merged[path], before)}
    assert changed == {f"blocks/{attention}/{projection}/kernel" for attention in ("attn1", "attn2")
                       for projection in ATTENTION_PROJECTIONS}


def test_lora_scale_is_alpha_over_rank():
    base = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    adapted = finetune.LoRALinear(base, rank=2, alpha=6.0, rngs=nnx.Rngs(1))
    adapted.lora_b[...] = jnp.ones((2, 2))
    x = jnp.arange(3.0)[None]
    expected = x @ base.kernel[...] + base.bias[...] + 3.0 * (x @ adapted.lora_a[...] @ adapted.lora_b[...])
    np.testing.assert_allclose(adapted(x), expected, rtol=1e-6)


def test_default_targets_find_the_lrm_attention_projections():
    config = load_config("lrm.py:tiny").model
    model = nnx.eval_shape(lambda: finetune.add_lora(LRM(config, rngs=nnx.Rngs(0)), rank=2, alpha=2.0,
                                                     rngs=nnx.Rngs(1)))
    adapted = {finetune.path_string(path[:-1]) for path, _ in nnx.to_flat_state(nnx.state(model, finetune.LoRAParam))}
    assert adapted and all(path.rsplit("/", 1)[-1] in ("query", "key", "value", "out") for path in adapted)
    assert {path.split("/")[-2] for path in adapted} >= {"self_attention", "cross_attention"}


def test_lora_targets_that_match_nothing_are_an_error():
    model = nnx.eval_shape(lambda: WanTransformer(load_config("mvdiffusion.py:tiny").model, rngs=nnx.Rngs(0)))
    with pytest.raises(errors.InvalidConfigValueError, match="match no nnx.Linear"):
        finetune.add_lora(model, rank=2, alpha=2.0, targets=("attn9/",), rngs=nnx.Rngs(1))


@pytest.mark.parametrize("config_name", ["mvdiffusion.py:tiny", "lrm.py:tiny"])
def test_lora_params_are_placed_by_the_mesh_rules(model_config, config_name):
    config = load_config(config_name)
    if "mesh" not in config:
        pytest.skip(f"{config_name} has no mesh rules yet")
    rules = sharding.logical_rules(config.mesh.logical_rules)
    lora = finetune_config(mode="lora", lora=dict(rank=4, alpha=4.0, targets=finetune.DEFAULT_LORA_TARGETS))

    def create() -> nnx.State:
        model = WanTransformer(model_config, rngs=nnx.Rngs(0))
        return nnx.state(finetune.apply_finetuning(model, lora, rngs=nnx.Rngs(1)), finetune.LoRAParam)

    abstract = jax.eval_shape(create)
    known = {name for name, _ in rules}
    for path, variable in nnx.to_flat_state(abstract):
        axes = variable.get_metadata()["out_sharding"]
        assert len(axes) == len(variable.shape) and axes[0] == "layers", (path, axes)
        assert set(axes) - {None} <= known, (path, axes)

    # Shape first, then a jitted init straight into the shardings (8 fake devices).
    mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=2))
    shardings = sharding.state_shardings(abstract, mesh, rules)
    state = jax.jit(create, out_shardings=shardings)()
    spec = {finetune.path_string(path): variable[...].sharding.spec for path, variable in nnx.to_flat_state(state)}
    embed, heads = dict(rules)["embed"], dict(rules)["heads"]
    embed = embed if isinstance(embed, str) or embed is None else tuple(embed)
    assert spec["blocks/attn1/to_q/lora_a"] == jax.sharding.PartitionSpec(None, embed, None)
    assert spec["blocks/attn1/to_q/lora_b"] == jax.sharding.PartitionSpec(None, None, heads)
    assert spec["blocks/attn1/to_out/lora_a"] == jax.sharding.PartitionSpec(None, heads, None)


# --------------------------------------------------------------------------- EMA


def test_ema_decay_warms_up():
    assert float(finetune.ema_decay(0, 0.999)) == pytest.approx(0.1)
    assert float(finetune.ema_decay(8, 0.999)) == pytest.approx(0.5)
    assert float(finetune.ema_decay(10**6, 0.999)) == pytest.approx(0.999)


def test_ema_update_math():
    ema = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(4.0, jnp.bfloat16)}
    params = {"w": jnp.array([3.0, 0.0]), "b": jnp.array(0.0, jnp.bfloat16)}

    fixed = finetune.ema_update(ema, params, 0.75)
    np.testing.assert_allclose(fixed["w"], [1.5, 1.5])
    assert fixed["b"].dtype == jnp.bfloat16 and float(fixed["b"]) == 3.0

    # Warm-up under jit with a traced step: d = min(0.75, 1/10) = 0.1 at step 0.
    warmed = jax.jit(lambda e, p, step: finetune.ema_update(e, p, 0.75, step=step))(ema, params, jnp.int32(0))
    np.testing.assert_allclose(warmed["w"], [0.1 * 1.0 + 0.9 * 3.0, 0.1 * 2.0], rtol=1e-6)


def test_ema_of_nnx_state_tracks_the_parameters():
    model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    ema = finetune.init_ema(nnx.state(model, nnx.Param))
    # Its own buffers: the trainer's step donates the model state.
    assert ema["kernel"][...].unsafe_buffer_pointer() != model.kernel[...].unsafe_buffer_pointer()
    model.kernel[...] = model.kernel[...] + 1.0
    for step in range(200):
        ema = finetune.ema_update(ema, nnx.state(model, nnx.Param), 0.9, step=step)
    np.testing.assert_allclose(ema["kernel"][...], model.kernel[...], atol=1e-6)
    nnx.update(model, ema)  # sampling with the average
