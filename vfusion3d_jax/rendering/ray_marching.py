"""Ray marching primitives of the official (EG3D-style) VFusion3D renderer, per ray and batched.

Every function works on arrays with any leading batch shape and the samples of a ray on the last
axis, and reproduces the official arithmetic (`ImportanceRenderer`, `MipRayMarcher2`,
`get_ray_limits_box`) including its quirks, as specified in
tests/fixtures/vfusion3d_reference/README.md:

* `intersect_box`: slab test; rays that miss get tmin = -1, tmax = -2 (t is not clamped to >= 0).
* `fix_missed_rays`: missing rays get the [min, max] of the valid rays' *starts* (a reduction over
  all rays passed in: the official renderer couples every ray of one call).
* `stratified_depths`: D depths per ray, jittered within their strata.
* `march_rays`: midpoint marcher that averages *raw* densities before the activation.
* `sample_importance`: EG3D's smoothed-weight inverse CDF (which drops the last bin), in a
  gather-based and a gather-free (compare-and-reduce) form that give identical results.
* `merge_samples`: merges the sorted coarse and importance samples (the official sorts them).

Depths carry no gradient in the official model (ray limits come from detached rays and
importance sampling runs under no_grad); callers apply `jax.lax.stop_gradient` accordingly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vfusion3d_jax.rendering.triplane import activate_density

# Raw density of a sample outside the box: (-FLT_MAX) / 3, finite so that averaging two of them
# cannot overflow; softplus of any average involving it is exactly 0.
OUT_OF_BOX_RAW_DENSITY = np.float32(np.finfo(np.float32).min) / np.float32(3)
TRANSMITTANCE_EPS = 1e-10
IMPORTANCE_WEIGHT_OFFSET = 0.01
PDF_EPS = 1e-5
INVERSE_CDF_METHODS = ("gather", "compare")


def intersect_box(origins: jax.Array, directions: jax.Array, box_min: float = -1.0,
                  box_max: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Entry and exit distances (..., ) of rays (..., 3) through the axis-aligned cube [box_min, box_max]^3.

    Official slab test (Kellnhofer): rays that miss the box get tmin = -1, tmax = -2.
    """
    inv_dir = 1 / directions  # +-inf for axis-parallel rays, as in the official code
    negative = inv_dir < 0
    near = (jnp.where(negative, box_max, box_min) - origins) * inv_dir
    far = (jnp.where(negative, box_min, box_max) - origins) * inv_dir
    tmin, tmax = near[..., 0], far[..., 0]
    missed = jnp.zeros(tmin.shape, dtype=bool)
    for axis in (1, 2):
        missed = missed | (tmin > far[..., axis]) | (near[..., axis] > tmax)
        tmin = jnp.maximum(tmin, near[..., axis])
        tmax = jnp.minimum(tmax, far[..., axis])
    return jnp.where(missed, -1.0, tmin), jnp.where(missed, -2.0, tmax)


def fix_missed_rays(tmin: jax.Array, tmax: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Official fix-up: if any ray is valid (tmax > tmin), every invalid ray gets
    start = min and end = max of the valid rays' tmin, both taken over *all* rays given."""
    valid = tmax > tmin
    lowest = jnp.min(jnp.where(valid, tmin, jnp.inf))
    highest = jnp.max(jnp.where(valid, tmin, -jnp.inf))
    keep = valid | ~jnp.any(valid)
    return jnp.where(keep, tmin, lowest), jnp.where(keep, tmax, highest)


def stratified_depths(start: jax.Array, end: jax.Array, jitter: jax.Array) -> jax.Array:
    """Depths (..., D): start + k/(D-1)*(end-start) + jitter_k*(end-start)/(D-1), jitter (..., D) in [0, 1).

    The official renderer draws the jitter uniformly; the last sample may lie past `end`.
    """
    num_samples = jitter.shape[-1]
    steps = jnp.arange(num_samples, dtype=jnp.float32) / (num_samples - 1)
    span = (end - start)[..., None]
    return (start[..., None] + steps * span) + jitter * (span / (num_samples - 1))


def march_rays(colors: jax.Array, raw_densities: jax.Array, depths: jax.Array) -> dict[str, jax.Array]:
    """The official midpoint ray marcher over S samples sorted along each ray.

    colors (..., S, 3), raw densities (..., S) (before activation), depths (..., S) ->
    rgb (..., 3) without background, opacity (...,) = sum of weights, depth (...,) = weighted mean
    interval depth (+inf where the opacity is 0; the caller clamps it), weights (..., S-1).
    """
    deltas = depths[..., 1:] - depths[..., :-1]
    colors_mid = (colors[..., :-1, :] + colors[..., 1:, :]) / 2
    densities_mid = activate_density((raw_densities[..., :-1] + raw_densities[..., 1:]) / 2)
    depths_mid = (depths[..., :-1] + depths[..., 1:]) / 2
    alpha = 1 - jnp.exp(-(densities_mid * deltas))
    # Exclusive cumulative product, as the official code (not a log-space sum) to match it exactly.
    transmittance = jnp.cumprod(1 - alpha + TRANSMITTANCE_EPS, axis=-1)
    transmittance = jnp.concatenate([jnp.ones_like(alpha[..., :1]), transmittance[..., :-1]], axis=-1)
    weights = alpha * transmittance
    opacity = jnp.sum(weights, axis=-1)
    depth_sum = jnp.sum(weights * depths_mid, axis=-1)
    # The official 0/0 = NaN becomes +inf; dividing by a safe value keeps gradients finite.
    has_weight = opacity > 0
    depth = jnp.where(has_weight, depth_sum / jnp.where(has_weight, opacity, 1), jnp.inf)
    return {
        # Per channel: the gradient w.r.t. the weights is then three fused products, not a
        # reduction over a length-3 axis (which XLA:CPU runs slowly).
        "rgb": jnp.stack([jnp.sum(weights * colors_mid[..., c], axis=-1) for c in range(3)], axis=-1),
        "opacity": opacity,
        "depth": depth,
        "weights": weights,
    }


def sample_importance(depths: jax.Array, weights: jax.Array, uniforms: jax.Array,
                      method: str = "gather") -> jax.Array:
    """Official importance sampling: depths (..., D) of the coarse pass, its weights (..., D-1) and
    draws `uniforms` (..., K) in [0, 1) -> K new depths (..., K), in draw order.

    The weights are max-pooled (kernel 2, padding 1), average-pooled (kernel 2) and offset by 0.01.
    The pdf over the coarse midpoints uses the pooled values 1..D-3 (+1e-5); as in EG3D, the cdf
    has D-2 entries paired with midpoints 0..D-3, so the last midpoint is never used.
    `method` selects the inverse-CDF implementation: "gather" (binary search + gathers; CPU/GPU)
    or "compare" (counts and masked sums, no gathers; TPU). Both give bit-identical results.
    """
    pooled = jnp.concatenate(
        [weights[..., :1], jnp.maximum(weights[..., :-1], weights[..., 1:]), weights[..., -1:]], axis=-1
    )
    smoothed = (pooled[..., :-1] + pooled[..., 1:]) / 2 + IMPORTANCE_WEIGHT_OFFSET
    bins = 0.5 * (depths[..., :-1] + depths[..., 1:])
    pdf_weights = smoothed[..., 1:-1] + PDF_EPS
    pdf = pdf_weights / jnp.sum(pdf_weights, axis=-1, keepdims=True)
    cdf = jnp.concatenate([jnp.zeros_like(pdf[..., :1]), jnp.cumsum(pdf, axis=-1)], axis=-1)
    bins = bins[..., : cdf.shape[-1]]
    last = cdf.shape[-1] - 1
    if method == "gather":
        search = functools.partial(jnp.searchsorted, side="right")
        for _ in range(cdf.ndim - 1):  # over the batch axes (not flattened: they may be sharded)
            search = jax.vmap(search)
        index = search(cdf, uniforms)
        below, above = jnp.maximum(index - 1, 0), jnp.minimum(index, last)

        def pick(values, where):
            return jnp.take_along_axis(values, where, axis=-1)
    elif method == "compare":
        # searchsorted(right=True) = number of cdf entries <= u.
        index = jnp.sum(cdf[..., None, :] <= uniforms[..., :, None], axis=-1)
        below, above = jnp.maximum(index - 1, 0), jnp.minimum(index, last)
        positions = jnp.arange(cdf.shape[-1])

        def pick(values, where):
            # A masked sum with exactly one non-zero term is exact, hence identical to a gather.
            return jnp.sum(jnp.where(positions == where[..., None], values[..., None, :], 0), axis=-1)
    else:
        raise ValueError(f"unknown inverse-CDF method {method!r}; expected one of {INVERSE_CDF_METHODS}")
    cdf_below, cdf_above = pick(cdf, below), pick(cdf, above)
    bins_below, bins_above = pick(bins, below), pick(bins, above)
    denominator = cdf_above - cdf_below
    denominator = jnp.where(denominator < PDF_EPS, 1, denominator)
    return bins_below + (uniforms - cdf_below) / denominator * (bins_above - bins_below)


def merge_samples(depths_a: jax.Array, colors_a: jax.Array, raw_densities_a: jax.Array,
                  depths_b: jax.Array, colors_b: jax.Array, raw_densities_b: jax.Array):
    """Merges two sample sets, each sorted by depth along the last axis, into one sorted set.

    Equivalent to the official concatenate-and-sort for sorted inputs, at a fraction of the cost
    of a general sort: a bitonic merge (log2 S compare-exchange stages of elementwise selects; no
    sort or gather primitive). Coarse depths are sorted whenever a ray's end >= start, and
    importance depths whenever the draws are (the inverse CDF is monotone). The only rays with
    end < start miss the box, so all their samples are empty and their order does not matter.
    Colours are (..., S, 3), depths and raw densities (..., S).
    """
    total = depths_a.shape[-1] + depths_b.shape[-1]
    size = 1 << (total - 1).bit_length()

    def bitonic(a, b, fill):
        # Ascending a, padding, descending b: a bitonic sequence of length `size`.
        padding = jnp.full(a.shape[:-1] + (size - total,), fill, a.dtype)
        return jnp.concatenate([a, padding, jnp.flip(b, axis=-1)], axis=-1)

    depths = bitonic(depths_a, depths_b, jnp.inf)
    values = [bitonic(a, b, 0) for a, b in zip(
        (colors_a[..., 0], colors_a[..., 1], colors_a[..., 2], raw_densities_a),
        (colors_b[..., 0], colors_b[..., 1], colors_b[..., 2], raw_densities_b))]
    stride = size // 2
    while stride:
        pairs = depths.shape[:-1] + (size // (2 * stride), 2, stride)
        first, second = depths.reshape(pairs)[..., 0, :], depths.reshape(pairs)[..., 1, :]
        swap = second < first

        def exchange(x):
            x = x.reshape(pairs)
            low = jnp.where(swap, x[..., 1, :], x[..., 0, :])
            high = jnp.where(swap, x[..., 0, :], x[..., 1, :])
            return jnp.stack([low, high], axis=-2).reshape(depths.shape)

        depths, values = exchange(depths), [exchange(x) for x in values]
        stride //= 2
    red, green, blue, raw_densities = (x[..., :total] for x in values)
    return depths[..., :total], jnp.stack([red, green, blue], axis=-1), raw_densities
