"""Import of the official VFusion3D weights into the NNX `LRM`, and Orbax save/load of the result.

    python -m vfusion3d_jax convert --checkpoint=vfusion3d.pth --workdir=runs/vfusion3d_large \
        [--config=configs/lrm.py:large]

Reads the official `state_dict` from a `.safetensors` file or a torch `.pth/.pt/.bin` pickle
(`torch.load(path)['model_state_dict']`, read here *without torch*: see `read_torch_checkpoint`),
strips a single common key prefix (`module.`, `model.`, ...), checks the key set and every shape
strictly against the model of the config, maps PyTorch layouts onto the NNX state and writes
an Orbax checkpoint in the same layout as training runs (`<workdir>/checkpoints/0/{model,config}`),
which `load_lrm` restores.

Without `--config` the architecture is inferred from the checkpoint's shapes, starting from the
`large` variant (attention head counts cannot be seen in shapes and come from that config).
With `--config`, any difference between the config and the checkpoint is an error that lists
every differing field.

The mapping is one table of rules (`_rules`), used in both directions: `import_state_dict`
(official -> NNX) and `export_state_dict` (NNX -> official; applied to an abstract state it
gives the expected keys and shapes without allocating anything).

Layouts: Linear (out, in) -> kernel (in, out); Conv2d (out, in, kh, kw) -> (kh, kw, in, out);
ConvTranspose2d (in, out, kh, kw) -> (in, kh, kw, out); the fused self-attention `in_proj_weight`
[Wq; Wk; Wv] -> three kernels; per-layer tensors are stacked on the scanned "layers" axis.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from absl import flags, logging
from etils import epath
from flax import nnx, traverse_util
from flax.nnx import traversals

from vfusion3d_jax import errors
from vfusion3d_jax.data import remote
from vfusion3d_jax.models.lrm import LRM, abstract_lrm

CHECKPOINT_SUBDIR = "checkpoints"  # under a run's workdir
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# The official inferrer's input: the canonical source camera at distance 1 (cameras.
# CANONICAL_SOURCE_CAM2WORLD) and objects recentred with a border ratio of 0.2.
OFFICIAL_INFERENCE = dict(source_distance=1.0, border_ratio=0.2)
# A key every official checkpoint has; whatever precedes it is the common prefix.
ANCHOR_KEY = "camera_embedder.mlp.0.weight"

NnxPath = tuple[Any, ...]


class CheckpointMismatchError(errors.InvalidCheckpointError):
    """The checkpoint does not fit the model: missing, unexpected or misshapen tensors, or config fields."""


# ----------------------------------------------------------------------------------------------
# Reading torch checkpoints without torch.


_TORCH_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """What the pickle's `torch.FloatStorage` etc. resolve to: just the element type."""

    dtype: Any


class _Unsupported:
    """Stand-in for any other class or function in the pickle: absorbs its arguments, runs nothing.

    Checkpoints often hold optimiser state or training metadata beside the weights; those parts
    become inert placeholders instead of executing code.
    """

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


def _rebuild_tensor_v2(storage: np.ndarray, storage_offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                       requires_grad: bool = False, backward_hooks: Any = None, metadata: Any = None) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2: a (possibly strided) view of a storage, copied to a contiguous array."""
    size, stride = tuple(size), tuple(stride)
    if len(size) != len(stride):
        raise ValueError(f"tensor size {size} and stride {stride} differ in rank")
    # Index of the last element read (an empty tensor reads none).
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) if all(size) else -1
    if storage_offset < 0 or min(stride, default=0) < 0 or last >= storage.size:
        raise ValueError(f"tensor of size {size}, stride {stride} at offset {storage_offset} overruns its storage "
                         f"of {storage.size} elements")
    view = np.lib.stride_tricks.as_strided(storage[storage_offset:], shape=size,
                                           strides=tuple(s * storage.itemsize for s in stride))
    return np.array(view)


def _rebuild_parameter(data: np.ndarray, requires_grad: bool = False, backward_hooks: Any = None) -> np.ndarray:
    """torch._utils._rebuild_parameter: an nn.Parameter is its data here."""
    return data


class _TorchUnpickler(pickle.Unpickler):
    """Restricted unpickler of torch's zip format: tensors become NumPy arrays, nothing else is constructed."""

    _ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }

    def __init__(self, file, load_storage: Callable[[str, Any, int], np.ndarray]):
        super().__init__(file)
        self._load_storage = load_storage

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name in _TORCH_STORAGE_DTYPES:
            return _StorageType(_TORCH_STORAGE_DTYPES[name])
        return type(name, (_Unsupported,), {"__module__": f"unsupported.{module}"})

    def persistent_load(self, pid: Any) -> np.ndarray:
        kind, storage_type, key, _location, numel = pid
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise ValueError(f"unsupported persistent object {pid!r} in torch checkpoint")
        return self._load_storage(str(key), storage_type.dtype, int(numel))


def read_torch_checkpoint(path: str | Path) -> Any:
    """The object of a torch zip-format checkpoint (torch >= 1.6 `torch.save`), tensors as NumPy arrays.

    The format is a zip of `<name>/data.pkl` (the pickled object; tensors refer to storages by
    key) and raw little-endian storages `<name>/data/<key>`. Only tensor reconstruction and
    OrderedDict are honoured; other objects become inert placeholders, so no code in the file runs.
    """
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a zip-format torch checkpoint (the legacy format of torch < 1.6 is not "
                         f"supported: re-save it with a newer torch, or as .safetensors)")
    with zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist() if name.endswith("data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"{path}: expected one data.pkl in the archive, found {pickles}")
        root = pickles[0][: -len("data.pkl")]
        names = set(archive.namelist())
        byteorder = archive.read(root + "byteorder").decode() if root + "byteorder" in names else "little"
        storages: dict[str, np.ndarray] = {}

        def load_storage(key: str, dtype: Any, numel: int) -> np.ndarray:
            if key not in storages:
                array = np.frombuffer(archive.read(f"{root}data/{key}"), dtype=dtype)
                if array.size != numel:
                    raise ValueError(f"{path}: storage {key} holds {array.size} elements, the pickle says {numel}")
                storages[key] = array.byteswap() if byteorder != sys.byteorder else array
            return storages[key]

        with archive.open(pickles[0]) as file:
            return _TorchUnpickler(file, load_storage).load()


def read_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """The official `state_dict` of a .safetensors file or a torch pickle (its 'model_state_dict' entry)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        import safetensors.numpy

        return dict(safetensors.numpy.load_file(path))
    if path.suffix not in TORCH_SUFFIXES:
        raise ValueError(f"unknown checkpoint type {path.suffix!r}: expected .safetensors or one of {TORCH_SUFFIXES}")
    loaded = read_torch_checkpoint(path)
    if isinstance(loaded, Mapping) and "model_state_dict" in loaded:
        loaded = loaded["model_state_dict"]
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path}: expected a state dict or a dict with 'model_state_dict', got {type(loaded)}")
    not_arrays = {key: type(value).__name__ for key, value in loaded.items() if not isinstance(value, np.ndarray)}
    if not_arrays:
        raise ValueError(f"{path}: entries that are not tensors: {not_arrays}")
    return dict(loaded)


def strip_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Removes a prefix common to all keys (e.g. 'module.' of DDP), found in front of `ANCHOR_KEY`."""
    prefixes = {key[: -len(ANCHOR_KEY)] for key in state_dict if key.endswith(ANCHOR_KEY)}
    if len(prefixes) != 1 or "" in prefixes:
        return dict(state_dict)  # nothing to strip; a missing anchor is reported by the strict check
    (prefix,) = prefixes
    outside = [key for key in state_dict if not key.startswith(prefix)]
    if outside:
        raise CheckpointMismatchError(f"keys do not share the prefix {prefix!r}: {outside[:10]}")
    return {key[len(prefix):]: value for key, value in state_dict.items()}


# ----------------------------------------------------------------------------------------------
# The mapping official <-> NNX.


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How one official tensor becomes NNX arrays (`to_nnx`) and back (`to_torch`)."""

    to_nnx: Callable[[Any], tuple[Any, ...]]
    to_torch: Callable[[tuple[Any, ...]], Any]


_SAME = _Layout(lambda w: (w,), lambda ws: ws[0])
_LINEAR = _Layout(lambda w: (w.T,), lambda ws: ws[0].T)
_CONV = _Layout(lambda w: (w.transpose(2, 3, 1, 0),), lambda ws: ws[0].transpose(3, 2, 0, 1))
_DECONV = _Layout(lambda w: (w.transpose(0, 2, 3, 1),), lambda ws: ws[0].transpose(0, 3, 1, 2))
_IN_PROJ = _Layout(
    lambda w: tuple(part.T for part in np.split(w, 3, axis=0)),
    lambda ws: jnp.concatenate([w.T for w in ws], axis=0),
)


@dataclasses.dataclass(frozen=True)
class _Rule:
    """Official `torch_key` <-> NNX parameters `paths`; `layer` indexes the stacked "layers" axis."""

    torch_key: str
    paths: tuple[NnxPath, ...]
    layout: _Layout
    layer: int | None = None


def _rules(config: ml_collections.ConfigDict) -> list[_Rule]:
    """Every official tensor of the LRM of `config` (a `config.model`), in official state_dict order."""
    rules: list[_Rule] = []

    def add(torch_key: str, path: NnxPath, layout: _Layout = _SAME, layer: int | None = None) -> None:
        rules.append(_Rule(torch_key, (path,), layout, layer))

    def linear(torch_prefix: str, path: NnxPath, layer: int | None = None, bias: bool = True) -> None:
        add(f"{torch_prefix}.weight", path + ("kernel",), _LINEAR, layer)
        if bias:
            add(f"{torch_prefix}.bias", path + ("bias",), _SAME, layer)

    def norm(torch_prefix: str, path: NnxPath, layer: int | None = None) -> None:
        add(f"{torch_prefix}.weight", path + ("scale",), _SAME, layer)
        add(f"{torch_prefix}.bias", path + ("bias",), _SAME, layer)

    embeddings = "encoder.model.embeddings"
    add(f"{embeddings}.cls_token", ("encoder", "cls_token"))
    add(f"{embeddings}.mask_token", ("encoder", "mask_token"))
    if config.encoder.num_register_tokens:
        add(f"{embeddings}.register_tokens", ("encoder", "register_tokens"))
    add(f"{embeddings}.position_embeddings", ("encoder", "pos_embed"))
    add(f"{embeddings}.patch_embeddings.projection.weight", ("encoder", "patch_embed", "kernel"), _CONV)
    add(f"{embeddings}.patch_embeddings.projection.bias", ("encoder", "patch_embed", "bias"))
    block = ("encoder", "blocks")
    for i in range(config.encoder.num_layers):
        layer = f"encoder.model.encoder.layer.{i}"
        norm(f"{layer}.norm1", block + ("norm1",), i)
        for name, ours in (("query", "query"), ("key", "key"), ("value", "value")):
            linear(f"{layer}.attention.attention.{name}", block + ("attention", ours), i)
        linear(f"{layer}.attention.output.dense", block + ("attention", "out"), i)
        add(f"{layer}.layer_scale1.lambda1", block + ("layer_scale1",), _SAME, i)
        norm(f"{layer}.norm2", block + ("norm2",), i)
        linear(f"{layer}.mlp.fc1", block + ("mlp", "fc1"), i)
        linear(f"{layer}.mlp.fc2", block + ("mlp", "fc2"), i)
        add(f"{layer}.layer_scale2.lambda1", block + ("layer_scale2",), _SAME, i)
    norm("encoder.model.layernorm", ("encoder", "norm"))

    linear("camera_embedder.mlp.0", ("camera_embedder", "fc1"))
    linear("camera_embedder.mlp.2", ("camera_embedder", "fc2"))

    add("transformer.pos_embed", ("transformer", "pos_embed"))
    block = ("transformer", "blocks")
    for i in range(config.transformer.num_layers):
        layer = f"transformer.layers.{i}"
        for n in (1, 2, 3):
            norm(f"{layer}.norm{n}.norm", block + (f"norm{n}", "norm"), i)
            linear(f"{layer}.norm{n}.mlp.1", block + (f"norm{n}", "modulation"), i)
            if n == 1:
                for name in ("query", "key", "value"):
                    add(f"{layer}.cross_attn.{name[0]}_proj_weight", block + ("cross_attention", name, "kernel"),
                        _LINEAR, i)
                linear(f"{layer}.cross_attn.out_proj", block + ("cross_attention", "out"), i, bias=False)
            if n == 2:
                fused = tuple(block + ("self_attention", name, "kernel") for name in ("query", "key", "value"))
                rules.append(_Rule(f"{layer}.self_attn.in_proj_weight", fused, _IN_PROJ, i))
                linear(f"{layer}.self_attn.out_proj", block + ("self_attention", "out"), i, bias=False)
        linear(f"{layer}.mlp.0", block + ("mlp", "fc1"), i)
        linear(f"{layer}.mlp.3", block + ("mlp", "fc2"), i)
    norm("transformer.norm", ("transformer", "norm"))
    add("transformer.deconv.weight", ("transformer", "upsampler", "kernel"), _DECONV)
    add("transformer.deconv.bias", ("transformer", "upsampler", "bias"))

    for k in range(config.decoder.num_layers):  # official nn.Sequential: Linear at 0, 2, 4, ...; ReLU between
        linear(f"synthesizer.decoder.net.{2 * k}", ("decoder", "layers", k))
    return rules


def export_state_dict(params: Mapping[str, Any], config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The official state_dict (PyTorch names and layouts) of NNX parameters (`nnx.to_pure_dict` form).

    Official extras the model does not use at inference (DINOv2's `mask_token`) are NNX
    parameters too, so the round trip is exact.
    """
    flat = traversals.flatten_mapping(params)
    state_dict, used = {}, set()
    for rule in _rules(config):
        arrays = tuple(flat[path] if rule.layer is None else flat[path][rule.layer] for path in rule.paths)
        state_dict[rule.torch_key] = rule.layout.to_torch(arrays)
        used.update(rule.paths)
    if set(flat) != used:  # a parameter without a rule is a bug in `_rules`
        raise AssertionError(f"NNX parameters without an official name: {sorted(map(str, set(flat) - used))}")
    return state_dict


def expected_state_dict_shapes(config: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
    """Official key -> shape for the LRM of `config`, computed from shapes only."""
    abstract = nnx.to_pure_dict(nnx.state(abstract_lrm(config), nnx.Param))
    exported = jax.eval_shape(lambda params: export_state_dict(params, config), abstract)
    return {rule.torch_key: tuple(exported[rule.torch_key].shape) for rule in _rules(config)}  # official order


def _describe(keys: list[str], limit: int = 20) -> str:
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_tensor_shapes(expected: Mapping[str, tuple[int, ...]], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Strict check of a checkpoint's tensors (`shapes`: key → shape) against a model's (`expected`):
    the same keys and shapes, else one error naming every difference."""
    missing = [key for key in expected if key not in shapes]
    unexpected = sorted(key for key in shapes if key not in expected)
    misshapen = [f"{key}: checkpoint {tuple(shapes[key])}, model {tuple(shape)}"
                 for key, shape in expected.items() if key in shapes and tuple(shapes[key]) != tuple(shape)]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_describe(unexpected)}")
    if misshapen:
        problems.append(f"shape mismatches ({len(misshapen)}): {_describe(misshapen)}")
    if problems:
        raise CheckpointMismatchError("checkpoint does not match the model:\n  " + "\n  ".join(problems))


def check_state_dict(state_dict: Mapping[str, Any], config: ml_collections.ConfigDict) -> None:
    """Strict check: same key set as the model of `config` and the same shapes, else an error naming them."""
    check_tensor_shapes(expected_state_dict_shapes(config), {key: tuple(value.shape) for key, value in state_dict.items()})


def import_state_dict(state_dict: Mapping[str, Any], config: ml_collections.ConfigDict) -> dict[str, Any]:
    """NNX parameters (nested `nnx.to_pure_dict` form, NumPy, param_dtype) from an official state_dict.

    A single common key prefix is stripped; keys and shapes are checked strictly first.
    """
    state_dict = strip_prefix(state_dict)
    check_state_dict(state_dict, config)
    dtype = np.dtype(config.param_dtype)
    flat: dict[NnxPath, Any] = {}
    per_layer: dict[NnxPath, list[np.ndarray]] = collections.defaultdict(list)
    for rule in _rules(config):
        arrays = rule.layout.to_nnx(np.asarray(state_dict[rule.torch_key]).astype(dtype))
        for path, array in zip(rule.paths, arrays, strict=True):
            if rule.layer is None:
                flat[path] = np.ascontiguousarray(array)
            else:
                per_layer[path].append(array)  # rules come in layer order
    flat.update({path: np.stack(arrays) for path, arrays in per_layer.items()})
    return traversals.unflatten_mapping(flat)


# ----------------------------------------------------------------------------------------------
# The architecture from the checkpoint's shapes.


def _count_indexed(state_dict: Mapping[str, Any], pattern: str) -> int:
    """Number of distinct indices captured by `pattern` among the keys (layers of a stack)."""
    return len({m.group(1) for key in state_dict if (m := re.match(pattern, key))})


def infer_model_config(state_dict: Mapping[str, Any], base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`base` (a `config.model`) with every field that the checkpoint's shapes determine taken from them.

    Head counts, dtypes, remat and the position-embedding resize rule are not visible in
    shapes and stay as in `base`.
    """
    state_dict = strip_prefix(state_dict)

    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise CheckpointMismatchError(f"cannot infer the architecture: the checkpoint has no {key!r}")
        return tuple(state_dict[key].shape)

    config = ml_collections.ConfigDict(base.to_dict())
    embeddings = "encoder.model.embeddings"
    encoder_dim = shape(f"{embeddings}.cls_token")[-1]
    patch_size = shape(f"{embeddings}.patch_embeddings.projection.weight")[-1]
    grid = int(round((shape(f"{embeddings}.position_embeddings")[1] - 1) ** 0.5))
    config.encoder.dim = encoder_dim
    config.encoder.patch_size = patch_size
    config.encoder.pretrain_image_size = grid * patch_size
    config.encoder.num_layers = _count_indexed(state_dict, r"encoder\.model\.encoder\.layer\.(\d+)\.")
    config.encoder.mlp_ratio = shape("encoder.model.encoder.layer.0.mlp.fc1.weight")[0] // encoder_dim
    config.encoder.num_register_tokens = (
        shape(f"{embeddings}.register_tokens")[1] if f"{embeddings}.register_tokens" in state_dict else 0)
    config.camera_embed_dim = shape("camera_embedder.mlp.0.weight")[0]
    num_tokens, dim = shape("transformer.pos_embed")[1:]
    config.transformer.dim = dim
    config.transformer.num_layers = _count_indexed(state_dict, r"transformer\.layers\.(\d+)\.")
    config.transformer.mlp_ratio = shape("transformer.layers.0.mlp.0.weight")[0] // dim
    config.triplane_low_res = int(round((num_tokens / 3) ** 0.5))
    config.triplane_dim = shape("transformer.deconv.weight")[1]
    config.decoder.hidden_dim = shape("synthesizer.decoder.net.0.weight")[0]
    config.decoder.num_layers = _count_indexed(state_dict, r"synthesizer\.decoder\.net\.(\d+)\.weight")
    return config


def config_mismatches(state_dict: Mapping[str, Any], config: ml_collections.ConfigDict) -> list[str]:
    """Fields of `config` (a `config.model`) that differ from what the checkpoint's shapes say."""
    inferred = traversals.flatten_mapping(infer_model_config(state_dict, config).to_dict(), sep=".")
    given = traversals.flatten_mapping(config.to_dict(), sep=".")
    return [f"model.{key}: checkpoint {inferred[key]}, config {given[key]}"
            for key in inferred if inferred[key] != given[key]]


# ----------------------------------------------------------------------------------------------
# Orbax checkpoints and the command.


def _checkpoint_manager(directory: str | os.PathLike, *, create: bool = False) -> ocp.CheckpointManager:
    """The manager of a run's checkpoints: `directory` is the workdir or its `checkpoints/` folder,
    local or in a bucket."""
    directory = epath.Path(directory)
    if not remote.is_url(directory):  # epath's absolute() would turn gs://b/x into $PWD/gs:/b/x
        directory = directory.absolute()
    if (directory / CHECKPOINT_SUBDIR).is_dir():
        directory = directory / CHECKPOINT_SUBDIR
    elif not (create or directory.is_dir()):
        raise errors.MissingCheckpointError(f"no checkpoint directory at {directory}").with_hint(
            "pass a training run's --workdir or a `convert` output")
    return ocp.CheckpointManager(directory, item_names=("model", "config"),
                                 options=ocp.CheckpointManagerOptions(create=create))


def save_checkpoint(workdir: str | os.PathLike, params: Mapping[str, Any], config: ml_collections.ConfigDict,
                    step: int = 0) -> epath.Path:
    """Writes `params` (pure dict) and `config` as step `step` of `<workdir>/checkpoints` (training layout)."""
    manager = _checkpoint_manager(epath.Path(workdir) / CHECKPOINT_SUBDIR, create=True)
    manager.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(params),
        config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
    ))
    manager.wait_until_finished()
    manager.close()
    return epath.Path(manager.directory) / str(step)


def _latest_step(manager: ocp.CheckpointManager, step: int | None) -> int:
    step = manager.latest_step() if step is None else step
    if step is None:
        raise errors.MissingCheckpointError(f"no checkpoint in {manager.directory}").with_hint(
            "pass a training run that has saved a step, or a `convert` output")
    return step


def checkpoint_step(checkpoint_dir: str | Path, step: int | None = None) -> int:
    """The step that a load of `checkpoint_dir` reads: `step` if given, else the newest one."""
    return _latest_step(_checkpoint_manager(checkpoint_dir), step)


def load_checkpoint_config(checkpoint_dir: str | Path, step: int | None = None) -> ml_collections.ConfigDict:
    """The config stored with a checkpoint (workdir or its `checkpoints/` folder; newest step by default)."""
    manager = _checkpoint_manager(checkpoint_dir)
    restored = manager.restore(_latest_step(manager, step), args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return ml_collections.ConfigDict(restored["config"])


def read_model(manager: ocp.CheckpointManager, step: int, target: dict) -> dict:
    """The model of checkpoint `step` as a pure dict, restored into `target` (a pure dict of
    `jax.ShapeDtypeStruct`s with shardings): the `model` item, with the parameters of the `ema` item
    over it where the run kept an average (what sampling and fine-tuning should start from)."""
    restored = manager.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore(target)))["model"]
    ema_dir = epath.Path(manager.directory) / str(step) / "ema"
    if not ema_dir.exists():
        return restored
    saved = {tuple(map(str, path)) for path in
             traverse_util.flatten_dict(ocp.StandardCheckpointHandler().metadata(ema_dir).tree)}
    flat_target = {tuple(map(str, path)): (path, leaf) for path, leaf in traverse_util.flatten_dict(target).items()}
    unknown = saved - set(flat_target)
    if unknown:
        raise errors.InvalidCheckpointError(
            f"the EMA of step {step} in {manager.directory} has parameters the model lacks: {sorted(unknown)[:3]}")
    ema_target = traverse_util.unflatten_dict({flat_target[path][0]: flat_target[path][1] for path in saved})
    ema = ocp.StandardCheckpointHandler().restore(ema_dir, args=ocp.args.StandardRestore(ema_target))
    flat = traverse_util.flatten_dict(restored)
    flat.update(traverse_util.flatten_dict(ema))
    logging.info("model of step %d: the EMA of %d parameter arrays over the trained ones", step, len(saved))
    return traverse_util.unflatten_dict(flat)


def load_model(checkpoint_dir: str | Path, abstract_model: Callable[[ml_collections.ConfigDict], nnx.Module],
               step: int | None = None) -> tuple[nnx.Module, ml_collections.ConfigDict]:
    """The model of a converted (or trained) checkpoint, on the default device, and the checkpoint's
    config; `abstract_model(config.model)` gives the model's shapes (e.g. `abstract_lrm`). A run that
    kept an EMA gives its averaged parameters (`read_model`)."""
    manager = _checkpoint_manager(checkpoint_dir)
    step = _latest_step(manager, step)
    config = ml_collections.ConfigDict(
        manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])
    graphdef, state = nnx.split(abstract_model(config.model))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, read_model(manager, step, target))
    return nnx.merge(graphdef, state), config


def load_lrm(checkpoint_dir: str | Path, step: int | None = None) -> LRM:
    """The LRM of a converted (or trained) checkpoint, on the default device, config from the checkpoint."""
    return load_model(checkpoint_dir, abstract_lrm, step)[0]


def convert(checkpoint: str | Path, workdir: str | Path, config: ml_collections.ConfigDict | None = None) -> Path:
    """Official checkpoint -> Orbax checkpoint in `workdir`; returns the step directory.

    `config` is a full experiment config (configs/lrm.py); None = infer the architecture from the
    checkpoint, starting from `configs/lrm.py:large`.
    """
    state_dict = strip_prefix(read_checkpoint(checkpoint))
    if config is None:
        from vfusion3d_jax.configs import load_config

        config = load_config("lrm.py:large")
        config.model = infer_model_config(state_dict, config.model)
        logging.info("architecture inferred from %s; head counts (not visible in shapes) from the large config: "
                     "encoder %d, transformer %d", checkpoint, config.model.encoder.num_heads,
                     config.model.transformer.num_heads)
    else:
        mismatches = config_mismatches(state_dict, config.model)
        if mismatches:
            raise CheckpointMismatchError(
                "the checkpoint does not fit the config (pick another variant, override these fields, or omit "
                "--config to infer them):\n  " + "\n  ".join(mismatches))
    params = import_state_dict(state_dict, config.model)
    # The released weights expect the official inferrer's input (see configs/lrm.py `inference`).
    config = config.copy_and_resolve_references()
    config.inference = ml_collections.ConfigDict(OFFICIAL_INFERENCE)
    directory = save_checkpoint(workdir, params, config)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    logging.info("converted %s (%d tensors, %d parameters) into %s", checkpoint, len(state_dict), num_params,
                 directory)
    return directory


def convert_command(config: ml_collections.ConfigDict | None, workdir: str | None, args: list[str]) -> None:
    """CLI `convert`: `--checkpoint=PATH --workdir=DIR [--config=configs/lrm.py:VARIANT]`."""
    checkpoint = flags.FLAGS.checkpoint if "checkpoint" in flags.FLAGS else None
    if not checkpoint or not workdir:
        raise errors.UsageError("convert needs --checkpoint=PATH (.pth/.pt/.bin or .safetensors) and --workdir=DIR")
    if args:
        raise errors.UsageError(f"convert takes no positional arguments, got {args}")
    from vfusion3d_jax.models.wan import convert as wan_convert  # imports this module

    if wan_convert.is_diffusers_checkpoint(checkpoint):
        wan_convert.convert(checkpoint, workdir, config)
    else:
        convert(checkpoint, workdir, config)
