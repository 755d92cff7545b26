"""The LRM's training losses; their weights live in `config.train.loss`.

    total = Σ_b [w_mse(src_b) · MSE_b + w_fg(src_b) · foreground MSE_b + w_lpips(src_b) · LPIPS_b
                 + w_opacity(src_b) · opacity_b] / B + w_tv · TV(triplanes)

with MSE and LPIPS between rendered and target views, foreground MSE the same error over the
target's object pixels only (the object's colours weigh the same whatever its size in the
image: on small objects over white, the plain MSE is mostly background), opacity the MSE
between the rendered accumulated opacity and the foreground mask (VFusion3D's opacity loss),
and TV the triplane total variation (OpenLRM, weight 5e-4).

`src_b` is the data source of example b (synthetic = made by the video model,
rendered = rendered from a 3D asset). VFusion3D supervises synthetic views at the
image level: their pixels are not exactly consistent across views, so the pixel
loss can be switched off for them (weight 0) while LPIPS stays.

Rendered images and targets are (B, K, h, w, 3) in [0, 1]; opacities and masks
(B, K, h, w, 1); triplanes (B, 3, C, H, W).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from vfusion3d_jax.train import metrics


def per_example_mse(images: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean squared error over each example's views and pixels: (B,)."""
    error = jnp.square(images.astype(jnp.float32) - targets.astype(jnp.float32))
    return jnp.mean(error, axis=tuple(range(1, error.ndim)))


def per_example_foreground_mse(images: jax.Array, targets: jax.Array, masks: jax.Array) -> jax.Array:
    """Squared error averaged over the pixels of each example's views that the target's mask
    covers, weighted by the mask: (B,); 0 for an example without foreground."""
    error = jnp.mean(jnp.square(images.astype(jnp.float32) - targets.astype(jnp.float32)), axis=-1, keepdims=True)
    axes = tuple(range(1, error.ndim))
    weights = masks.astype(jnp.float32)
    return jnp.sum(error * weights, axis=axes) / jnp.maximum(jnp.sum(weights, axis=axes), 1.0)


def per_example_lpips(params: dict[str, Any], images: jax.Array, targets: jax.Array, net: str) -> jax.Array:
    """LPIPS averaged over each example's views: (B,). Views are batched through the network together."""
    batch, views = images.shape[:2]
    flat = lambda z: z.reshape((batch * views,) + z.shape[2:])
    return metrics.lpips(params, flat(images), flat(targets), net).reshape(batch, views).mean(axis=1)


def opacity_loss(opacity: jax.Array, masks: jax.Array) -> jax.Array:
    """MSE between the rendered accumulated opacity (ray weight) and the foreground mask: (B,)."""
    return per_example_mse(opacity, masks)


def triplane_tv(planes: jax.Array) -> jax.Array:
    """Total variation of the triplanes, OpenLRM's form: mean squared neighbour difference along H plus along W.

    Averaged over planes and examples; a scalar.
    """
    planes = planes.astype(jnp.float32)
    tv_h = jnp.mean(jnp.square(planes[..., 1:, :] - planes[..., :-1, :]), axis=(-3, -2, -1))
    tv_w = jnp.mean(jnp.square(planes[..., :, 1:] - planes[..., :, :-1]), axis=(-3, -2, -1))
    return jnp.mean(tv_h + tv_w)


def source_weights(weights: ml_collections.ConfigDict, is_synthetic: jax.Array) -> jax.Array:
    """Per-example weights (B,) from `weights.rendered`, `weights.synthetic` and the 0/1 source flag (B,)."""
    return jnp.where(is_synthetic > 0.5, weights.synthetic, weights.rendered).astype(jnp.float32)


def _is_used(weights: ml_collections.ConfigDict) -> bool:
    return weights.rendered != 0 or weights.synthetic != 0


def uses_lpips(config: ml_collections.ConfigDict) -> bool:
    """Whether `lrm_loss` with `config` (= `config.train.loss`) needs the LPIPS network's weights."""
    return _is_used(config.lpips)


def lrm_loss(rendered: dict[str, jax.Array], targets: jax.Array, masks: jax.Array, is_synthetic: jax.Array, *,
             lpips_params: dict[str, Any] | None, config: ml_collections.ConfigDict
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The weighted total (see the module docstring) and each term's unweighted batch mean.

    `rendered` holds the renderer's `rgb` and `opacity` and the model's `planes`;
    `config` is `config.train.loss`. Terms whose weights are all zero are not computed
    (LPIPS is the expensive one); the MSE is always reported.
    """
    mse = per_example_mse(rendered["rgb"], targets)
    per_example = source_weights(config.mse, is_synthetic) * mse
    terms = {"mse": jnp.mean(mse)}
    if _is_used(config.foreground_mse):
        foreground = per_example_foreground_mse(rendered["rgb"], targets, masks)
        per_example += source_weights(config.foreground_mse, is_synthetic) * foreground
        terms["foreground_mse"] = jnp.mean(foreground)
    if uses_lpips(config):
        lpips = per_example_lpips(lpips_params, rendered["rgb"], targets, config.lpips_net)
        per_example += source_weights(config.lpips, is_synthetic) * lpips
        terms["lpips"] = jnp.mean(lpips)
    if _is_used(config.opacity):
        opacity = opacity_loss(rendered["opacity"], masks)
        per_example += source_weights(config.opacity, is_synthetic) * opacity
        terms["opacity"] = jnp.mean(opacity)
    total = jnp.mean(per_example)
    if config.tv:
        tv = triplane_tv(rendered["planes"])
        total += config.tv * tv
        terms["tv"] = tv
    return total, terms
