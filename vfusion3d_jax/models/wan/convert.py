"""Import of diffusers Wan checkpoints into NNX: the `WanTransformer` (and Orbax save/load) and the `WanVAE`.

    python -m vfusion3d_jax convert --checkpoint=/path/to/Wan2.1-T2V-1.3B-Diffusers/transformer \
        --workdir=runs/wan2_1_1_3b [--config=configs/mvdiffusion.py:wan2_1_1_3b]

A checkpoint is a diffusers model folder: `config.json` and `diffusion_pytorch_model.safetensors`,
or shards listed by a `*.safetensors.index.json`; a pipeline folder works too, the model being
read from its `transformer/` (`WanTransformer3DModel`) or `vae/` (`AutoencoderKLWan`). The
architecture is the checkpoint's own `config.json`, whose fields are `config.model`'s (the
transformer) and `config.codec.vae`'s (the VAE) in configs/mvdiffusion.py; with `--config`, an
architecture field that differs from the checkpoint's is an error that lists every difference.
Tensors are read lazily with `safetensors` (NumPy, no torch), one at a time, so converting the
14B models needs about one copy of the weights in memory.

Each model's mapping is one table from diffusers' names to NNX paths, used in both directions:
`import_state_dict` / `import_vae_state_dict` (diffusers -> NNX) and `export_state_dict` /
`export_vae_state_dict` (NNX -> diffusers; on an abstract state they give the expected keys and
shapes without allocating). The transformer's table lists its modules (`_TOP_LEVEL`, `_BLOCK` and
their optional parts); the VAE's modules keep diffusers' names, so its table gives each module
name's kind (`_VAE_MODULE_KINDS`) and the few renamed containers (`_VAE_RENAMES`). Layouts: Linear
(out, in) -> kernel (in, out); Conv3d (D, C, t, h, w) -> (t, h, w, C, D); Conv2d (D, C, h, w) ->
(h, w, C, D); 1 x 1 convolutions -> Linear kernels (C, D); RMSNorm and LayerNorm `weight` and the
VAE's `gamma` (C, 1, 1[, 1]) -> `scale` (C,); per-block tensors are stacked on the scanned "layers" axis.

The Orbax checkpoint has the training layout of the LRM's (`<workdir>/checkpoints/0/{model,config}`,
written by `vfusion3d_jax.models.convert.save_checkpoint`); `load_wan_transformer` restores it.
The VAE is loaded straight from its diffusers folder (`load_diffusers_vae`; `config.codec.checkpoint`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from flax.nnx import traversals
from safetensors import safe_open

from vfusion3d_jax.configs import config_module
from vfusion3d_jax.models import convert as lrm_convert
from vfusion3d_jax.models.convert import CheckpointMismatchError
from vfusion3d_jax.models.wan.transformer import WanTransformer, abstract_wan_transformer
from vfusion3d_jax.models.wan.vae import WanVAE, abstract_wan_vae

CONFIG_FILE = "config.json"
CLASS_NAME = "WanTransformer3DModel"
PIPELINE_SUBFOLDER = "transformer"
VAE_CLASS_NAME = "AutoencoderKLWan"
VAE_PIPELINE_SUBFOLDER = "vae"
# Every architecture field of WanTransformer3DModel's config.json, with diffusers' defaults
# (checkpoints saved by older diffusers lack the newer fields).
DIFFUSERS_DEFAULTS = dict(
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
    pos_embed_seq_len=None,
)
# Tensors diffusers itself skips when loading (`_keys_to_ignore_on_load_unexpected`).
IGNORED_KEY_PARTS = ("norm_added_q",)
# Every architecture field of AutoencoderKLWan's config.json, with diffusers' defaults (the Wan 2.1 VAE).
VAE_DIFFUSERS_DEFAULTS = dict(
    base_dim=96, decoder_base_dim=None, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2, attn_scales=(),
    temperal_downsample=(False, True, True), dropout=0.0,
    latents_mean=(-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
                  -0.3632, -0.1922, -0.9497, 0.2503, -0.2921),
    latents_std=(2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
                 1.6382, 1.1253, 2.8251, 1.916),
    is_residual=False, in_channels=3, out_channels=3, patch_size=None, scale_factor_temporal=4, scale_factor_spatial=8,
)
# config.json fields diffusers 0.42.1 accepts and ignores: the released Wan 2.2 VAE's `clip_output`
# (decode always clamps to [-1, 1]).
VAE_IGNORED_FIELDS = ("clip_output",)
# How to run a VAE whose config.json is all there is (the run fields of `config.codec.vae`).
VAE_RUN_DEFAULTS = dict(dtype="float32", param_dtype="float32")
# A base config when no variant of configs/mvdiffusion.py has the checkpoint's architecture:
# its run settings (dtype, remat, ...) are kept, its architecture replaced by the checkpoint's.
DEFAULT_BASE_VARIANT = "wan2_1_1_3b"

NnxPath = tuple[Any, ...]


# ----------------------------------------------------------------------------------------------
# Reading diffusers checkpoint folders.


def model_directory(path: str | Path, subfolder: str = PIPELINE_SUBFOLDER) -> Path:
    """The folder holding a model's config.json: `path` itself, or a pipeline's `subfolder` ("transformer", "vae")."""
    path = Path(path)
    for candidate in (path, path / subfolder):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    raise CheckpointMismatchError(f"no {CONFIG_FILE} in {path} or {path / subfolder}")


def is_diffusers_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a diffusers WanTransformer3DModel folder (or a pipeline folder with one)."""
    try:
        return read_diffusers_config(path).get("_class_name") == CLASS_NAME
    except (CheckpointMismatchError, OSError, ValueError):
        return False


def read_diffusers_config(path: str | Path, subfolder: str = PIPELINE_SUBFOLDER) -> dict[str, Any]:
    """A model's config.json as a dict (by default the transformer's)."""
    return json.loads((model_directory(path, subfolder) / CONFIG_FILE).read_text())


class SafetensorsWeights(Mapping):
    """The tensors of a checkpoint folder by name, read from their (possibly sharded) files on access.

    `shape(key)` reads only the header, so the whole key set and every shape can be checked
    before any tensor is loaded.
    """

    def __init__(self, path: str | Path, subfolder: str = PIPELINE_SUBFOLDER):
        directory = model_directory(path, subfolder)
        indexes = sorted(directory.glob("*.safetensors.index.json"))
        if len(indexes) > 1:
            raise CheckpointMismatchError(f"several shard indexes in {directory}: {[p.name for p in indexes]}")
        if indexes:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
            self._file_of = {key: directory / name for key, name in weight_map.items()}
        else:
            files = sorted(directory.glob("*.safetensors"))
            if len(files) != 1:
                raise CheckpointMismatchError(f"expected one .safetensors file (or a shard index) in {directory}, "
                                              f"found {[p.name for p in files]}")
            with safe_open(files[0], framework="numpy") as file:
                self._file_of = {key: files[0] for key in file.keys()}
        self._open: dict[Path, Any] = {}

    def _file(self, key: str):
        path = self._file_of[key]
        if path not in self._open:
            self._open[path] = safe_open(path, framework="numpy")
        return self._open[path]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file(key).get_slice(key).get_shape())

    def __getitem__(self, key: str) -> np.ndarray:
        return self._file(key).get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)


def _shape(tensors: Mapping[str, Any], key: str) -> tuple[int, ...]:
    return tensors.shape(key) if isinstance(tensors, SafetensorsWeights) else tuple(np.shape(tensors[key]))


# ----------------------------------------------------------------------------------------------
# The config from config.json.


def _as_tuple(value: Any) -> Any:
    """Lists (JSON's, a restored config's) as tuples, so that fields compare equal to configs/mvdiffusion.py's."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _fields(config_json: Mapping[str, Any], class_name: str, defaults: Mapping[str, Any],
            ignored: tuple[str, ...] = ()) -> dict[str, Any]:
    """A config.json's architecture fields with `defaults` filled in; another class or an unknown field is an error."""
    if config_json.get("_class_name", class_name) != class_name:
        raise CheckpointMismatchError(f"the checkpoint is a {config_json['_class_name']}, not a {class_name}")
    given = {key: value for key, value in config_json.items() if not key.startswith("_") and key not in ignored}
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise CheckpointMismatchError(f"config.json fields this {class_name} does not implement: {unknown}")
    return {key: _as_tuple(value) for key, value in {**defaults, **given}.items()}


def _mismatches(fields: Mapping[str, Any], config: ml_collections.ConfigDict, prefix: str) -> list[str]:
    return [f"{prefix}.{key}: checkpoint {value}, config {_as_tuple(config[key])}"
            for key, value in fields.items() if _as_tuple(config[key]) != value]


def architecture_fields(config_json: Mapping[str, Any]) -> dict[str, Any]:
    """A WanTransformer3DModel config.json's architecture fields, defaults filled in, as config.model holds them."""
    fields = _fields(config_json, CLASS_NAME, DIFFUSERS_DEFAULTS)
    fields["out_channels"] = fields["out_channels"] or fields["in_channels"]  # diffusers' rule for None
    return fields


def model_config_from_diffusers(config_json: Mapping[str, Any],
                                base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`base` (a `config.model`) with its architecture replaced by the checkpoint's config.json."""
    config = ml_collections.ConfigDict(base.to_dict())
    for key, value in architecture_fields(config_json).items():
        config[key] = value
    return config


def config_mismatches(config_json: Mapping[str, Any], config: ml_collections.ConfigDict) -> list[str]:
    """Architecture fields of `config` (a `config.model`) that differ from the checkpoint's config.json."""
    return _mismatches(architecture_fields(config_json), config, "model")


def vae_architecture_fields(config_json: Mapping[str, Any]) -> dict[str, Any]:
    """An AutoencoderKLWan config.json's architecture fields, defaults filled in, as config.codec.vae holds them."""
    return _fields(config_json, VAE_CLASS_NAME, VAE_DIFFUSERS_DEFAULTS, VAE_IGNORED_FIELDS)


def vae_config_from_diffusers(config_json: Mapping[str, Any],
                              base: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """A `config.codec.vae`: the checkpoint's architecture, run fields (dtype, ...) from `base` or the defaults."""
    run = VAE_RUN_DEFAULTS if base is None else {key: base[key] for key in VAE_RUN_DEFAULTS}
    return ml_collections.ConfigDict({**vae_architecture_fields(config_json), **run})


def vae_config_mismatches(config_json: Mapping[str, Any], config: ml_collections.ConfigDict) -> list[str]:
    """Architecture fields of `config` (a `config.codec.vae`) that differ from the checkpoint's config.json."""
    return _mismatches(vae_architecture_fields(config_json), config, "codec.vae")


def _matching_variant(config_json: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The full config of the configs/mvdiffusion.py variant with the checkpoint's architecture, else the default's."""
    configs = config_module("mvdiffusion.py")
    for variant in configs.VARIANTS:
        config = configs.get_config(variant)
        if not config_mismatches(config_json, config.model):
            return config
    config = configs.get_config(DEFAULT_BASE_VARIANT)
    logging.info("no variant of configs/mvdiffusion.py has this architecture; run settings from %s",
                 DEFAULT_BASE_VARIANT)
    return config


# ----------------------------------------------------------------------------------------------
# The mapping diffusers <-> NNX.


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How a diffusers tensor becomes an NNX array (`to_nnx`) and back (`to_diffusers`)."""

    to_nnx: Callable[[Any], Any]
    to_diffusers: Callable[[Any], Any]


_SAME = _Layout(lambda w: w, lambda w: w)
_LINEAR = _Layout(lambda w: w.T, lambda w: w.T)
_CONV3D = _Layout(lambda w: w.transpose(2, 3, 4, 1, 0), lambda w: w.transpose(4, 3, 0, 1, 2))
_CONV2D = _Layout(lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1))
_POINTWISE_CONV3D = _Layout(lambda w: w[:, :, 0, 0, 0].T, lambda w: w.T[:, :, None, None, None])
_POINTWISE_CONV2D = _Layout(lambda w: w[:, :, 0, 0].T, lambda w: w.T[:, :, None, None])
_CHANNEL_GAMMA3D = _Layout(lambda w: w.reshape(-1), lambda w: w.reshape(-1, 1, 1, 1))
_CHANNEL_GAMMA2D = _Layout(lambda w: w.reshape(-1), lambda w: w.reshape(-1, 1, 1))

# Module kinds: (diffusers parameter name, NNX parameter name, layout) of each of their tensors;
# a "tensor" is a bare nn.Parameter (named by the module path alone).
_KINDS = {
    "linear": (("weight", "kernel", _LINEAR), ("bias", "bias", _SAME)),
    "conv3d": (("weight", "kernel", _CONV3D), ("bias", "bias", _SAME)),
    "layer_norm": (("weight", "scale", _SAME), ("bias", "bias", _SAME)),
    "rms_norm": (("weight", "scale", _SAME),),
    "tensor": ((None, None, _SAME),),
    # The VAE's: its Conv2d, 1 x 1 Conv3d and Conv2d (as Linear), and WanRMS_norm over (C, 1, 1, 1) or (C, 1, 1).
    "conv2d": (("weight", "kernel", _CONV2D), ("bias", "bias", _SAME)),
    "pointwise_conv3d": (("weight", "kernel", _POINTWISE_CONV3D), ("bias", "bias", _SAME)),
    "pointwise_conv2d": (("weight", "kernel", _POINTWISE_CONV2D), ("bias", "bias", _SAME)),
    "channel_rms_norm3d": (("gamma", "scale", _CHANNEL_GAMMA3D),),
    "channel_rms_norm2d": (("gamma", "scale", _CHANNEL_GAMMA2D),),
}

_EMBEDDER = ("condition_embedder",)
# diffusers module -> NNX module path, kind.
_TOP_LEVEL = (
    ("patch_embedding", ("patch_embedding",), "conv3d"),
    ("condition_embedder.time_embedder.linear_1", _EMBEDDER + ("time_embedder", "fc1"), "linear"),
    ("condition_embedder.time_embedder.linear_2", _EMBEDDER + ("time_embedder", "fc2"), "linear"),
    ("condition_embedder.time_proj", _EMBEDDER + ("time_proj",), "linear"),
    ("condition_embedder.text_embedder.linear_1", _EMBEDDER + ("text_embedder", "fc1"), "linear"),
    ("condition_embedder.text_embedder.linear_2", _EMBEDDER + ("text_embedder", "fc2"), "linear"),
    ("proj_out", ("proj_out",), "linear"),
    ("scale_shift_table", ("scale_shift_table",), "tensor"),
)
_IMAGE_EMBEDDER = (  # image-to-video (image_dim)
    ("condition_embedder.image_embedder.norm1", _EMBEDDER + ("image_embedder", "norm1"), "layer_norm"),
    ("condition_embedder.image_embedder.ff.net.0.proj", _EMBEDDER + ("image_embedder", "ff", "fc1"), "linear"),
    ("condition_embedder.image_embedder.ff.net.2", _EMBEDDER + ("image_embedder", "ff", "fc2"), "linear"),
    ("condition_embedder.image_embedder.norm2", _EMBEDDER + ("image_embedder", "norm2"), "layer_norm"),
)
_IMAGE_POSITIONS = (  # first-last-frame models (pos_embed_seq_len)
    ("condition_embedder.image_embedder.pos_embed", _EMBEDDER + ("image_embedder", "pos_embed"), "tensor"),
)
# Per block: "blocks.<i>." + diffusers module -> ("blocks",) + NNX module path, layer i.
_BLOCK = tuple(
    (f"{attn}.{name}", (attn, ours), kind)
    for attn in ("attn1", "attn2")
    for name, ours, kind in (("to_q", "to_q", "linear"), ("to_k", "to_k", "linear"), ("to_v", "to_v", "linear"),
                             ("to_out.0", "to_out", "linear"), ("norm_q", "norm_q", "rms_norm"),
                             ("norm_k", "norm_k", "rms_norm"))
) + (
    ("ffn.net.0.proj", ("ffn", "fc1"), "linear"),
    ("ffn.net.2", ("ffn", "fc2"), "linear"),
    ("scale_shift_table", ("scale_shift_table",), "tensor"),
)
_BLOCK_CROSS_ATTN_NORM = (("norm2", ("norm2",), "layer_norm"),)  # cross_attn_norm
_BLOCK_IMAGE_KV = (  # image-to-video (added_kv_proj_dim)
    ("attn2.add_k_proj", ("attn2", "add_k_proj"), "linear"),
    ("attn2.add_v_proj", ("attn2", "add_v_proj"), "linear"),
    ("attn2.norm_added_k", ("attn2", "norm_added_k"), "rms_norm"),
)


# The VAE's NNX modules keep diffusers' names: a module's own name gives the kind of its tensors.
_VAE_MODULE_KINDS = {
    "conv_in": "conv3d", "conv_out": "conv3d", "conv1": "conv3d", "conv2": "conv3d", "time_conv": "conv3d",
    "resample": "conv2d",
    "conv_shortcut": "pointwise_conv3d", "quant_conv": "pointwise_conv3d", "post_quant_conv": "pointwise_conv3d",
    "to_qkv": "pointwise_conv2d", "proj": "pointwise_conv2d",
    "norm1": "channel_rms_norm3d", "norm2": "channel_rms_norm3d", "norm_out": "channel_rms_norm3d",
    "norm": "channel_rms_norm2d",
}
# NNX module name -> diffusers': the resamplers' conv is item 1 of `nn.Sequential(upsample or pad, Conv2d)`.
_VAE_RENAMES = {"resample": "resample.1"}


@dataclasses.dataclass(frozen=True)
class _Rule:
    """diffusers tensor `key` <-> NNX parameter `path`; `layer` indexes the stacked "layers" axis."""

    key: str
    path: NnxPath
    layout: _Layout
    layer: int | None = None


def _expand(module: str, path: NnxPath, kind: str, layer: int | None = None) -> list[_Rule]:
    """The rules of every tensor of the diffusers module `module` (NNX module `path`) of kind `kind`."""
    return [_Rule(module if name is None else f"{module}.{name}", path if ours is None else path + (ours,), layout,
                  layer) for name, ours, layout in _KINDS[kind]]


def _rules(config: ml_collections.ConfigDict) -> list[_Rule]:
    """Every diffusers tensor of the WanTransformer of `config` (a `config.model`)."""
    top_level = _TOP_LEVEL
    if config.image_dim is not None:
        top_level += _IMAGE_EMBEDDER
    if config.pos_embed_seq_len is not None:
        top_level += _IMAGE_POSITIONS
    block = _BLOCK
    if config.cross_attn_norm:
        block += _BLOCK_CROSS_ATTN_NORM
    if config.added_kv_proj_dim is not None:
        block += _BLOCK_IMAGE_KV
    rules = [rule for entry in top_level for rule in _expand(*entry)]
    for layer in range(config.num_layers):
        for module, path, kind in block:
            rules += _expand(f"blocks.{layer}.{module}", ("blocks",) + path, kind, layer)
    return rules


def _vae_rules(config: ml_collections.ConfigDict) -> list[_Rule]:
    """Every diffusers tensor of the WanVAE of `config` (a `config.codec.vae`), from its modules' names."""
    params = nnx.to_flat_state(nnx.state(abstract_wan_vae(config), nnx.Param))
    modules = dict.fromkeys(path[:-1] for path, _ in params)  # in order, each once
    return [rule for module in modules
            for rule in _expand(".".join(_VAE_RENAMES.get(part, str(part)) for part in module), module,
                                _VAE_MODULE_KINDS[module[-1]])]


def _export(params: Mapping[str, Any], rules: list[_Rule]) -> dict[str, Any]:
    flat = traversals.flatten_mapping(params)
    state_dict, used = {}, set()
    for rule in rules:
        array = flat[rule.path] if rule.layer is None else flat[rule.path][rule.layer]
        state_dict[rule.key] = rule.layout.to_diffusers(array)
        used.add(rule.path)
    if set(flat) != used:  # a parameter without a rule is a bug in the table
        raise AssertionError(f"NNX parameters without a diffusers name: {sorted(map(str, set(flat) - used))}")
    return state_dict


def _expected_shapes(abstract_model: nnx.Module, export: Callable[[Any], dict[str, Any]]
                     ) -> dict[str, tuple[int, ...]]:
    abstract = nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param))
    return {key: tuple(value.shape) for key, value in jax.eval_shape(export, abstract).items()}


def _check(tensors: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]],
           ignored_key_parts: tuple[str, ...] = ()) -> None:
    """Strict check: the model's key set and shapes, else an error naming every difference."""
    present = [key for key in tensors if not any(part in key for part in ignored_key_parts)]
    lrm_convert.check_tensor_shapes(expected, {key: _shape(tensors, key) for key in present})


def _import(tensors: Mapping[str, Any], rules: list[_Rule], dtype: Any, num_layers: int = 0) -> dict[str, Any]:
    """NNX parameters from diffusers tensors fetched one at a time (a lazy `SafetensorsWeights` keeps at most
    the parameters built so far and one block's tensors in memory)."""
    flat: dict[NnxPath, Any] = {}
    per_layer: dict[NnxPath, list[np.ndarray]] = collections.defaultdict(list)
    for rule in rules:
        array = rule.layout.to_nnx(np.asarray(tensors[rule.key]).astype(dtype))
        if rule.layer is None:
            flat[rule.path] = np.ascontiguousarray(array)
        else:
            per_layer[rule.path].append(array)  # rules come in layer order
            if len(per_layer[rule.path]) == num_layers:
                flat[rule.path] = np.stack(per_layer.pop(rule.path))
    return traversals.unflatten_mapping(flat)


def export_state_dict(params: Mapping[str, Any], config: ml_collections.ConfigDict) -> dict[str, Any]:
    """diffusers' state dict (names and layouts) of WanTransformer parameters (`nnx.to_pure_dict` form)."""
    return _export(params, _rules(config))


def expected_shapes(config: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
    """diffusers key -> shape for the WanTransformer of `config`, from shapes only."""
    return _expected_shapes(abstract_wan_transformer(config), lambda params: export_state_dict(params, config))


def check_state_dict(tensors: Mapping[str, Any], config: ml_collections.ConfigDict) -> None:
    """Strict check of a transformer checkpoint's key set and shapes (`_check`)."""
    _check(tensors, expected_shapes(config), IGNORED_KEY_PARTS)


def import_state_dict(tensors: Mapping[str, Any], config: ml_collections.ConfigDict) -> dict[str, Any]:
    """WanTransformer parameters (nested `nnx.to_pure_dict` form, NumPy, param_dtype) from diffusers tensors,
    keys and shapes checked strictly first."""
    check_state_dict(tensors, config)
    return _import(tensors, _rules(config), np.dtype(config.param_dtype), config.num_layers)


def export_vae_state_dict(params: Mapping[str, Any], config: ml_collections.ConfigDict) -> dict[str, Any]:
    """diffusers' state dict (names and layouts) of WanVAE parameters (`nnx.to_pure_dict` form)."""
    return _export(params, _vae_rules(config))


def expected_vae_shapes(config: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
    """diffusers key -> shape for the WanVAE of `config` (a `config.codec.vae`), from shapes only."""
    return _expected_shapes(abstract_wan_vae(config), lambda params: export_vae_state_dict(params, config))


def import_vae_state_dict(tensors: Mapping[str, Any], config: ml_collections.ConfigDict) -> dict[str, Any]:
    """WanVAE parameters (nested `nnx.to_pure_dict` form, NumPy, param_dtype) from diffusers tensors,
    keys and shapes checked strictly first."""
    _check(tensors, expected_vae_shapes(config))
    return _import(tensors, _vae_rules(config), np.dtype(config.param_dtype))


# ----------------------------------------------------------------------------------------------
# Models from checkpoints.


def _model_from_params(abstract_model: nnx.Module, params: Mapping[str, Any]) -> nnx.Module:
    graphdef, state = nnx.split(abstract_model)
    nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, params))
    return nnx.merge(graphdef, state)


def model_from_params(params: Mapping[str, Any], config: ml_collections.ConfigDict) -> WanTransformer:
    """The WanTransformer of `config` (a `config.model`) holding `params` (pure dict)."""
    return _model_from_params(abstract_wan_transformer(config), params)


def vae_from_params(params: Mapping[str, Any], config: ml_collections.ConfigDict) -> WanVAE:
    """The WanVAE of `config` (a `config.codec.vae`) holding `params` (pure dict)."""
    return _model_from_params(abstract_wan_vae(config), params)


def load_diffusers(path: str | Path, **overrides: Any) -> tuple[WanTransformer, ml_collections.ConfigDict]:
    """The WanTransformer of a diffusers checkpoint folder and its `config.model`, without Orbax.

    The architecture comes from the checkpoint; `overrides` set run fields (e.g. dtype="bfloat16",
    remat="full"), on top of the matching configs/mvdiffusion.py variant's.
    """
    config_json = read_diffusers_config(path)
    config = model_config_from_diffusers(config_json, _matching_variant(config_json).model)
    config.update(overrides)
    return model_from_params(import_state_dict(SafetensorsWeights(path), config), config), config


def load_diffusers_vae(path: str | Path, **overrides: Any) -> tuple[WanVAE, ml_collections.ConfigDict]:
    """The WanVAE of a diffusers AutoencoderKLWan folder (or a pipeline folder with `vae/`) and its
    `config.codec.vae`: the checkpoint's architecture, `overrides` setting run fields (e.g. dtype="bfloat16")."""
    config = vae_config_from_diffusers(read_diffusers_config(path, VAE_PIPELINE_SUBFOLDER))
    config.update(overrides)
    params = import_vae_state_dict(SafetensorsWeights(path, VAE_PIPELINE_SUBFOLDER), config)
    return vae_from_params(params, config), config


def convert(checkpoint: str | Path, workdir: str | Path, config: ml_collections.ConfigDict | None = None) -> Path:
    """diffusers checkpoint folder -> Orbax checkpoint in `workdir`; returns the step directory.

    `config` is a full experiment config (configs/mvdiffusion.py); None = the variant with the
    checkpoint's architecture (else `DEFAULT_BASE_VARIANT` with the checkpoint's architecture).
    """
    config_json = read_diffusers_config(checkpoint)
    if config is None:
        config = _matching_variant(config_json)
        config.model = model_config_from_diffusers(config_json, config.model)
    else:
        mismatches = config_mismatches(config_json, config.model)
        if mismatches:
            raise CheckpointMismatchError(
                "the checkpoint does not fit the config (pick another variant, override these fields, or omit "
                "--config to take them from the checkpoint):\n  " + "\n  ".join(mismatches))
    params = import_state_dict(SafetensorsWeights(checkpoint), config.model)
    directory = lrm_convert.save_checkpoint(workdir, params, config)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    logging.info("converted %s (%d parameters) into %s", checkpoint, num_params, directory)
    return directory


def load_wan_transformer(checkpoint_dir: str | Path, step: int | None = None
                         ) -> tuple[WanTransformer, ml_collections.ConfigDict]:
    """The WanTransformer of a converted (or trained) Orbax checkpoint and its config, on the default device."""
    return lrm_convert.load_model(checkpoint_dir, abstract_wan_transformer, step)
