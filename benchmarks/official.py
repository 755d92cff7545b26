"""The official VFusion3D renderer next to this project's, for the side-by-side benchmarks.

`benchmarks/renderer.py --official=PATH` and `benchmarks/mesh.py --official=PATH` time the
official PyTorch code and this project's in one process, on the same weights and inputs, after
checking that both give the same numbers. PATH is a checkout of facebookresearch/vfusion3d
(its `lrm/` package; only `lrm/models/rendering/` is imported, which needs nothing but torch);
torch comes with the `reference` extra (`pip install -e '.[reference]'`; the mesh comparison
also uses its PyMCubes, as the official inferrer does). Nothing in the package or the tests
imports this file.

Weights are made here in the official layout (`net.{2k}.weight` (out, in), `net.{2k}.bias`) and
loaded into both decoders; the project's side uses the mapping of `models/convert.py`
(`synthesizer.decoder.net.{2k}` -> `decoder.layers[k]`, kernel transposed).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import statistics
import sys
import time

import numpy as np
from flax import nnx
import jax.numpy as jnp

from vfusion3d_jax.rendering import TriplaneDecoder

HIDDEN, NUM_LAYERS = 64, 4  # the official decoder's fixed width and depth


class OfficialUnavailable(RuntimeError):
    """The official code or torch cannot be loaded; the message says what to do."""


def load(path: str):
    """The official `lrm.models.rendering.synthesizer_part` module and torch, from a checkout at `path`."""
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        raise OfficialUnavailable("torch is not installed: pip install -e '.[reference]' (in a separate "
                                  "environment: the project itself never needs torch)") from None
    package = os.path.join(os.path.abspath(path), "lrm", "models", "rendering", "synthesizer_part.py")
    if not os.path.isfile(package):
        raise OfficialUnavailable(f"{path} is not a checkout of facebookresearch/vfusion3d (no {package})")
    sys.path.insert(0, os.path.abspath(path))
    try:
        synthesizer = importlib.import_module("lrm.models.rendering.synthesizer_part")
    finally:
        sys.path.remove(os.path.abspath(path))
    return torch, synthesizer


def describe_torch(torch) -> str:
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads"


def decoder_weights(seed: int, channels: int) -> dict[str, np.ndarray]:
    """Random weights of the official decoder (3C -> 64 -> 64 -> 64 -> 4), official names and layout.

    Weights as torch's default `nn.Linear` init (uniform, bound 1/sqrt(fan_in)); biases small
    and random rather than the official zero init, so that the check covers them too.
    """
    rng = np.random.default_rng(seed)
    widths = (3 * channels,) + (HIDDEN,) * (NUM_LAYERS - 1) + (4,)
    weights = {}
    for k, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        bound = 1.0 / np.sqrt(fan_in)
        weights[f"net.{2 * k}.weight"] = rng.uniform(-bound, bound, (fan_out, fan_in)).astype(np.float32)
        weights[f"net.{2 * k}.bias"] = rng.uniform(-0.1 * bound, 0.1 * bound, fan_out).astype(np.float32)
    return weights


def project_decoder(weights: dict[str, np.ndarray], channels: int) -> TriplaneDecoder:
    """This project's decoder holding official-layout `weights` (convert.py's mapping)."""
    decoder = TriplaneDecoder(channels, HIDDEN, NUM_LAYERS, rngs=nnx.Rngs(0))
    for k, layer in enumerate(decoder.layers):
        layer.kernel[...] = jnp.asarray(weights[f"net.{2 * k}.weight"].T)
        layer.bias[...] = jnp.asarray(weights[f"net.{2 * k}.bias"])
    return decoder


def official_synthesizer(torch, synthesizer, weights: dict[str, np.ndarray], channels: int, samples_per_ray: int):
    """The official `TriplaneSynthesizer` (ray sampler, `ImportanceRenderer`, `OSGDecoder`) with `weights`."""
    module = synthesizer.TriplaneSynthesizer(triplane_dim=channels, samples_per_ray=samples_per_ray)
    module.decoder.load_state_dict({name: torch.from_numpy(value) for name, value in weights.items()})
    return module.eval()


@contextlib.contextmanager
def deterministic_draws(torch):
    """The official renderer's random draws made deterministic, as `RenderOptions(deterministic=True)`.

    The official code draws the stratified jitter with `torch.rand_like` and the importance
    uniforms with `torch.rand(R, K)`; inside this block they are 0.5 and (k + 0.5) / K, the
    reference fixture's patch (tests/fixtures/vfusion3d_reference/config.json).
    """
    rand_like, rand = torch.rand_like, torch.rand

    def half_like(tensor, *args, **kwargs):
        return torch.full_like(tensor, 0.5)

    def midpoints(rays, count, *args, device=None, **kwargs):
        return ((torch.arange(count, dtype=torch.float32, device=device) + 0.5) / count).expand(rays, count)

    torch.rand_like, torch.rand = half_like, midpoints
    try:
        yield
    finally:
        torch.rand_like, torch.rand = rand_like, rand


def time_interleaved(fns, repeats: int, warmup: int = 1) -> list[tuple[float, float]]:
    """(median, best) wall time of each function (which must finish its work before returning).

    After `warmup` calls of each, the functions take turns, one call each per round, so on a
    shared machine a burst of load from other jobs falls on both sides of a comparison alike.
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, fn_times in zip(fns, times):
            start = time.perf_counter()
            fn()
            fn_times.append(time.perf_counter() - start)
    return [(statistics.median(t), min(t)) for t in times]


def load_average() -> str:
    return "load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
