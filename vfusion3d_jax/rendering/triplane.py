"""Triplane features and the triplane decoder MLP (the official `sample_from_planes` and `OSGDecoder`).

A triplane is three feature planes (3, C, H, W). A point (x, y, z) in [-1, 1]^3 reads plane 0
at (u, v) = (x, y), plane 1 at (x, z) and plane 2 at (z, y), where u addresses the width (last)
axis and v the height axis. Interpolation is bilinear with align_corners=False and zero padding,
exactly as `torch.nn.functional.grid_sample` does in the official code. The decoder maps the
concatenated features (3C) through Linear/ReLU layers to a raw density and three raw colours;
`activate_density` and `activate_rgb` turn them into the official density and colour.

The fast path used by the renderer folds the decoder's first layer into the planes: bilinear
interpolation and the first Linear are both linear, so interpolating planes already multiplied by
the first layer's kernel (`TriplaneDecoder.project_planes`) gives the same pre-activation. That
reads `hidden` (64) instead of C (80) channels per tap and removes the largest matmul (3C x hidden)
per sample. Planes are kept channels-last and zero-padded (`plane_table`), so the two horizontal
taps of a lookup are one gather of 2C contiguous values and taps outside a plane read zeros without
masking. The lookup has a custom gradient that scatter-adds all taps into one buffer.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

NUM_PLANES = 3


def activate_density(raw_sigma: jax.Array) -> jax.Array:
    """Official density activation: softplus(raw - 1)."""
    return jax.nn.softplus(raw_sigma - 1)


def activate_rgb(raw_rgb: jax.Array) -> jax.Array:
    """Official colour activation (MipNeRF's widened sigmoid): sigmoid * 1.002 - 0.001."""
    return jax.nn.sigmoid(raw_rgb) * (1 + 2 * 0.001) - 0.001


def plane_table(planes_hwc: jax.Array) -> jax.Array:
    """Lookup table of channels-last planes: (..., 3, H, W, C) -> zero-padded (..., 3, H+2, W+2, C).

    With a one-pixel border of zeros, bilinear taps outside a plane read zeros (grid_sample's zero
    padding) without masking, and every tap is one gather of C contiguous values.
    """
    return jnp.pad(planes_hwc, ((0, 0),) * (planes_hwc.ndim - 3) + ((1, 1), (1, 1), (0, 0)))


def bilinear_taps(table_shape: tuple[int, ...], points: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Top-left tap rows (..., 3) in the flattened `plane_table` and tap weights (..., 3, 4) of `points` (..., 3).

    grid_sample's unnormalisation for align_corners=False and its tap weights (nw, ne, sw, se). A
    cell whose taps all lie outside the plane gets weight 0; its row is clamped in floating point
    before the integer conversion (this keeps XLA:CPU's gathers vectorised, and NaN or huge
    coordinates still give in-bounds rows).
    """
    num_planes, rows, cols, _ = table_shape
    height, width = rows - 2, cols - 2
    # Per plane: u addresses the width axis, v the height axis.
    u = jnp.stack([points[..., 0], points[..., 0], points[..., 2]], axis=-1)
    v = jnp.stack([points[..., 1], points[..., 2], points[..., 1]], axis=-1)
    x = ((u + 1) * width - 1) / 2
    y = ((v + 1) * height - 1) / 2
    x0, y0 = jnp.floor(x), jnp.floor(y)
    inside = (x0 >= -1) & (x0 <= width - 1) & (y0 >= -1) & (y0 <= height - 1)
    col = jnp.clip(x0, -1, width - 1).astype(jnp.int32) + 1
    row = jnp.clip(y0, -1, height - 1).astype(jnp.int32) + 1
    index = (jnp.arange(num_planes, dtype=jnp.int32) * rows + row) * cols + col
    right, left = x - x0, (x0 + 1) - x
    down, up = jnp.where(inside, y - y0, 0.0), jnp.where(inside, (y0 + 1) - y, 0.0)
    weights = jnp.stack([left * up, right * up, left * down, right * down], axis=-1)
    return index, weights


def _materialize(x: jax.Array) -> jax.Array:
    """Identity that XLA:CPU computes once into a buffer instead of fusing it into its consumers.

    XLA:CPU fuses cheap elementwise producers into a gather's consumer and re-evaluates them for
    every gathered channel, which makes the lookup ~10x slower; an identity scatter is not
    fusible. (It scatters over the flattened leading axes; under `vmap` the mapped axes become
    batch axes of the scatter, so sharded ones stay local.) Other backends re-evaluate such
    producers cheaply, so this is CPU-only.
    """
    if jax.default_backend() != "cpu":
        return x
    flat = x.reshape((-1,) + x.shape[-1:])
    positions = jnp.arange(flat.shape[0])
    flat = jnp.zeros_like(flat).at[positions].set(flat, indices_are_sorted=True, unique_indices=True)
    return flat.reshape(x.shape)


def interpolate_planes(table: jax.Array, points: jax.Array, *, sum_planes: bool = False) -> jax.Array:
    """Bilinear features at `points` (..., 3) from a `plane_table` (3, H+2, W+2, C), in float32.

    Returns the per-plane features (..., 3, C), or their sum over planes (..., C) if `sum_planes`.
    `points` are in plane coordinates ([-1, 1] spans the plane); taps outside a plane read zeros.
    """
    index, weights = bilinear_taps(table.shape, points)
    index, weights = _materialize(index), _materialize(weights)
    pixels = table.reshape(-1, table.shape[-1])
    return _weighted_taps(table.shape[2], sum_planes, pixels, index, weights)


def _row_pairs(pixels: jax.Array, rows: jax.Array) -> jax.Array:
    """(pixels[rows], pixels[rows + 1]) as (..., 2, C): one windowed gather of two adjacent rows.

    The two horizontal taps of a bilinear lookup are adjacent rows of the flattened table; reading
    them as one 2C-long window is about twice as fast on CPU as two gathers.
    """
    dims = jax.lax.GatherDimensionNumbers(offset_dims=(rows.ndim, rows.ndim + 1), collapsed_slice_dims=(),
                                          start_index_map=(0,))
    return jax.lax.gather(pixels, rows[..., None], dims, slice_sizes=(2, pixels.shape[-1]),
                          mode="promise_in_bounds")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _weighted_taps(cols: int, sum_planes: bool, pixels: jax.Array, index: jax.Array,
                   weights: jax.Array) -> jax.Array:
    """Bilinear features from flattened planes (R, C), top-left rows (..., 3), tap weights (..., 3, 4).

    Per plane, the top and bottom tap pairs are two windowed gathers, weighted and summed by slices:
    XLA fuses them into one loop that never materialises the gathered rows.
    """
    features = []
    for plane in range(NUM_PLANES):
        top = _row_pairs(pixels, index[..., plane]).astype(jnp.float32)
        bottom = _row_pairs(pixels, index[..., plane] + cols).astype(jnp.float32)
        tap_weights = weights[..., plane, :, None]
        features.append(top[..., 0, :] * tap_weights[..., 0, :] + top[..., 1, :] * tap_weights[..., 1, :]
                        + bottom[..., 0, :] * tap_weights[..., 2, :] + bottom[..., 1, :] * tap_weights[..., 3, :])
    return sum(features[1:], features[0]) if sum_planes else jnp.stack(features, axis=-2)


def _weighted_taps_forward(cols, sum_planes, pixels, index, weights):
    # Materialised: the backward pass reads these features (e.g. for a ReLU mask) from many fusions.
    features = _materialize(_weighted_taps(cols, sum_planes, pixels, index, weights))
    return features, (pixels, index, weights)


def _weighted_taps_backward(cols, sum_planes, residuals, cotangent):
    pixels, index, weights = residuals
    # Autodiff would give every gather its own zero-initialised buffer and sum them; here all
    # twelve taps scatter-add into one buffer in place (single rows: faster than row pairs here).
    pixels_cotangent = jnp.zeros(pixels.shape, jnp.float32)
    weights_cotangent = []
    for plane in range(NUM_PLANES):
        plane_cotangent = cotangent if sum_planes else cotangent[..., plane, :]
        for tap, offset in enumerate((0, 1, cols, cols + 1)):
            pixels_cotangent = pixels_cotangent.at[index[..., plane] + offset].add(
                plane_cotangent * weights[..., plane, tap, None], mode="promise_in_bounds")
        for offset in (0, cols):
            pair = _row_pairs(pixels, index[..., plane] + offset).astype(jnp.float32)
            weights_cotangent.append(jnp.sum(pair * plane_cotangent[..., None, :], axis=-1))
    weights_cotangent = jnp.concatenate(weights_cotangent, axis=-1).reshape(weights.shape)
    return pixels_cotangent.astype(pixels.dtype), None, weights_cotangent


_weighted_taps.defvjp(_weighted_taps_forward, _weighted_taps_backward)


def sample_from_planes(planes: jax.Array, points: jax.Array) -> jax.Array:
    """Official `sample_from_planes` for one object: (3, C, H, W), (..., 3) -> (3, ..., C)."""
    if planes.ndim != 4 or planes.shape[0] != NUM_PLANES:
        raise ValueError(f"planes must be (3, C, H, W), got {planes.shape}")
    features = interpolate_planes(plane_table(jnp.moveaxis(planes, 1, -1)), points)
    return jnp.moveaxis(features, -2, 0)


class TriplaneDecoder(nnx.Module):
    """The official `OSGDecoder`: 3C -> hidden -> ... -> 4 with ReLU in between (raw sigma, raw rgb).

    `layers[i]` corresponds to torch's `net.{2i}` (kernel layout (in, out)). `dtype` is the
    compute dtype of the matmuls (float32 or bfloat16); outputs are always float32.
    """

    def __init__(self, feature_dim: int, hidden_dim: int = 64, num_layers: int = 4, *,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        widths = (NUM_PLANES * feature_dim,) + (hidden_dim,) * (num_layers - 1) + (4,)
        self.feature_dim = feature_dim
        self.hidden_dim = hidden_dim
        self.dtype = dtype
        # The official decoder zero-initialises its biases.
        self.layers = nnx.List([
            nnx.Linear(fan_in, fan_out, bias_init=nnx.initializers.zeros_init(), dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs)
            for fan_in, fan_out in zip(widths[:-1], widths[1:])
        ])

    def __call__(self, features: jax.Array, *, dtype: Any = None) -> jax.Array:
        """Raw outputs (..., 4) = [raw sigma, raw rgb] of concatenated plane features (..., 3C)."""
        dtype = dtype or self.dtype
        first = jnp.dot(features.astype(dtype), self.layers[0].kernel[...].astype(dtype),
                        preferred_element_type=jnp.float32)
        return self.decode_first_layer(first, dtype=dtype)

    def project_planes(self, planes: jax.Array) -> jax.Array:
        """Planes through the first layer's kernel: (..., 3, C, H, W) -> channels-last (..., 3, H, W, hidden).

        Interpolating these equals interpolating the planes and then applying the first layer
        (without its bias). Computed in float32.
        """
        kernel = self.layers[0].kernel[...].astype(jnp.float32)
        kernel = kernel.reshape(NUM_PLANES, self.feature_dim, -1)
        return jnp.einsum("...pchw,pco->...phwo", planes.astype(jnp.float32), kernel)

    def decode_first_layer(self, first_layer: jax.Array, *, dtype: Any = None) -> jax.Array:
        """Raw outputs (..., 4) from the first layer's output before its bias (..., hidden)."""
        dtype = dtype or self.dtype
        x = first_layer + self.layers[0].bias[...].astype(jnp.float32)
        for layer in self.layers[1:]:
            x = jnp.dot(jax.nn.relu(x).astype(dtype), layer.kernel[...].astype(dtype),
                        preferred_element_type=jnp.float32) + layer.bias[...].astype(jnp.float32)
        return x


def decode_points(decoder: TriplaneDecoder, table: jax.Array, points: jax.Array, *,
                  dtype: Any = None) -> jax.Array:
    """Raw decoder outputs (..., 4) at `points` (..., 3) in plane coordinates (the fast path).

    `table` = `plane_table(decoder.project_planes(planes))` of one object: (3, H+2, W+2, hidden).
    """
    return decoder.decode_first_layer(interpolate_planes(table, points, sum_planes=True), dtype=dtype)


def _query_object(decoder: TriplaneDecoder, planes: jax.Array, points: jax.Array,
                  chunk_size: int) -> dict[str, jax.Array]:
    table = plane_table(decoder.project_planes(planes))
    flat = points.reshape(-1, 3)
    raw = jax.lax.map(lambda p: decode_points(decoder, table, p), flat,
                      batch_size=min(chunk_size, flat.shape[0]))
    raw = raw.reshape(points.shape[:-1] + (4,))
    return {"sigma": activate_density(raw[..., :1]), "rgb": activate_rgb(raw[..., 1:])}


def query_points(decoder: TriplaneDecoder, planes: jax.Array, points: jax.Array, *,
                 chunk_size: int = 2**18) -> dict[str, jax.Array]:
    """The official `forward_points`: planes (N, 3, C, H, W), points (N, ..., 3) ->
    dict(sigma (N, ..., 1) activated, rgb (N, ..., 3)). No box masking; memory bounded by `chunk_size` points.
    """
    if planes.ndim != 5 or planes.shape[1] != NUM_PLANES:
        raise ValueError(f"planes must be (N, 3, C, H, W), got {planes.shape}")
    if points.shape[0] != planes.shape[0] or points.shape[-1] != 3:
        raise ValueError(f"points must be (N, ..., 3) with N = {planes.shape[0]}, got {points.shape}")
    return jax.vmap(lambda p, x: _query_object(decoder, p, x, chunk_size))(planes, points)


def query_grid(decoder: TriplaneDecoder, planes: jax.Array, grid_size: int) -> dict[str, jax.Array]:
    """The official `forward_grid`: values on a grid_size^3 grid over [-1, 1]^3.

    Returns sigma (N, G, G, G, 1) (activated) and rgb (N, G, G, G, 3); index [n, i, j, k] is the point
    (x_i, y_j, z_k) with x_i = linspace(-1, 1, G)[i]. Points are generated one x-slice at a time, so
    memory beyond the outputs is O(G^2).
    """
    if planes.ndim != 5 or planes.shape[1] != NUM_PLANES:
        raise ValueError(f"planes must be (N, 3, C, H, W), got {planes.shape}")
    coords = jnp.linspace(-1.0, 1.0, grid_size, dtype=jnp.float32)

    def query_object(object_planes):
        table = plane_table(decoder.project_planes(object_planes))

        def query_slice(x):
            y, z = jnp.meshgrid(coords, coords, indexing="ij")
            points = jnp.stack([jnp.broadcast_to(x, y.shape), y, z], axis=-1)
            return decode_points(decoder, table, points)

        raw = jax.lax.map(query_slice, coords)
        return {"sigma": activate_density(raw[..., :1]), "rgb": activate_rgb(raw[..., 1:])}

    return jax.lax.map(query_object, planes)
