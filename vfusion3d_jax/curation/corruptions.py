"""Deliberately broken copies of good orbits: what a quality score must tell apart from the real thing.

Each takes a decoded orbit (`example.decode_orbit`) and returns a copy whose views are broken
the way a video diffusion model breaks them, cameras unchanged:

    shuffled   the views after the first in a random order (frames that ignore the cameras)
    swapped    one view (not the first) replaced by a view of another object
    blurred    every view blurred (Gaussian, `BLUR_SIGMA` px at 64 px)
    noised     every view with Gaussian noise (`NOISE_SIGMA` of the range)
    mirrored   every view flipped left-right (the object turning the wrong way)

`as_generated` gives good and broken orbits alike what a generated orbit has: views over white,
alpha estimated from the background (`generate`'s rule), so a score cannot tell them apart by a
true alpha that synthetic orbits never have.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

from vfusion3d_jax.data.pipeline import composite_on_white
from vfusion3d_jax.train.metrics import silhouettes

BLUR_SIGMA = 1.5  # px at 64 px
NOISE_SIGMA = 0.15


def _over_white(orbit: dict) -> np.ndarray:
    return composite_on_white(orbit["images"])[0]


def _with_views(orbit: dict, rgb: np.ndarray) -> dict:
    """The orbit with views `rgb` (V, H, W, 3) in [0, 1] and their alpha estimated from the background."""
    rgb = np.clip(rgb, 0.0, 1.0)
    alpha = np.where(silhouettes(rgb), 255, 0).astype(np.uint8)
    images = np.concatenate([np.round(rgb * 255.0).astype(np.uint8), alpha[..., None]], axis=-1)
    return dict(orbit, images=images)


def as_generated(orbit: dict) -> dict:
    """The orbit as `generate` would write it: views over white, alpha estimated from the background."""
    return _with_views(orbit, _over_white(orbit))


def shuffled(orbit: dict, rng: np.random.Generator, others: list[dict]) -> dict:
    rgb = _over_white(orbit)
    order = np.concatenate([[0], 1 + rng.permutation(len(rgb) - 1)])
    while len(rgb) > 2 and np.array_equal(order, np.arange(len(rgb))):
        order = np.concatenate([[0], 1 + rng.permutation(len(rgb) - 1)])
    return _with_views(orbit, rgb[order])


def swapped(orbit: dict, rng: np.random.Generator, others: list[dict]) -> dict:
    rgb = _over_white(orbit).copy()
    other = others[rng.integers(len(others))]
    view = int(rng.integers(1, len(rgb)))
    rgb[view] = _over_white(other)[int(rng.integers(len(other["images"])))]
    return _with_views(orbit, rgb)


def blurred(orbit: dict, rng: np.random.Generator, others: list[dict]) -> dict:
    rgb = _over_white(orbit)
    sigma = BLUR_SIGMA * rgb.shape[1] / 64
    return _with_views(orbit, ndimage.gaussian_filter(rgb, sigma=(0, sigma, sigma, 0), mode="nearest"))


def noised(orbit: dict, rng: np.random.Generator, others: list[dict]) -> dict:
    rgb = _over_white(orbit)
    return _with_views(orbit, rgb + rng.normal(0.0, NOISE_SIGMA, rgb.shape).astype(np.float32))


def mirrored(orbit: dict, rng: np.random.Generator, others: list[dict]) -> dict:
    return _with_views(orbit, _over_white(orbit)[:, :, ::-1])


CORRUPTIONS: dict[str, Callable[[dict, np.random.Generator, list[dict]], dict]] = dict(
    shuffled=shuffled, swapped=swapped, blurred=blurred, noised=noised, mirrored=mirrored)


def roc_auc(good: np.ndarray, bad: np.ndarray) -> float:
    """P(a good orbit scores higher than a broken one), ties counting half: the ROC AUC."""
    good, bad = np.asarray(good, np.float64)[:, None], np.asarray(bad, np.float64)[None, :]
    return float(np.mean((good > bad) + 0.5 * (good == bad)))
