"""Learned curation, as VFusion3D did it: small models on image-encoder features.

VFusion3D kept ~2.7M of ~4M generated orbits with an SVM on DINO features trained on ~2K hand
labels, and estimated each synthetic orbit's elevation (the video model was not told it). Here
the features are the LRM's own image encoder (its ViT, DINO-initialised at scale): the CLS token
and the mean of the patch tokens of an orbit's first view, standardised. On them:

* `QualityClassifier`: L2-regularised logistic regression, good (1) against bad (0), from a
  labels file (`read_labels`: one `object_id,good|bad` per line) or, without labels,
  bootstrapped from the label-free score's extremes (`bootstrap_labels`);
* `ElevationEstimator`: ridge regression to the elevation in degrees, trained on rendered
  orbits (their elevation is known) and applied to synthetic ones.

Both are closed-form or Newton fits in NumPy (features are a few hundred wide, sets a few
thousand), saved as `.npz`, and report their error on a held-out part of their training set.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vfusion3d_jax import errors
from vfusion3d_jax.data.pipeline import composite_on_white, resize_rgba
from vfusion3d_jax.inference.reconstruct import Reconstructor


class ImageFeatures:
    """(N, 2·D) features of images: the LRM encoder's CLS token and its mean patch token."""

    def __init__(self, reconstructor: Reconstructor, batch_size: int = 16):
        self.size = reconstructor.source_size
        self.batch_size = batch_size
        graphdef, self._state = reconstructor.graphdef, reconstructor.state
        # The weights are an argument, not constants folded into the compiled program.
        self._encode = jax.jit(lambda state, images: _pooled(
            nnx.merge(graphdef, state).encode_image(jnp.moveaxis(images, -1, 1))))

    def of_orbits(self, orbits: list[dict], view: int = 0) -> np.ndarray:
        """Features of view `view` of decoded orbits (`example.decode_orbit`), over white."""
        images = np.stack([composite_on_white(resize_rgba(orbit["images"][view], self.size))[0] for orbit in orbits])
        return self(images)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """images (N, S, S, 3) in [0, 1] (S = the LRM's source size) → float64 (N, 2·D)."""
        count, size = len(images), self.batch_size
        padded = np.concatenate([images, np.repeat(images[-1:], -count % size, axis=0)]).astype(np.float32)
        parts = [np.asarray(self._encode(self._state, padded[i:i + size])) for i in range(0, len(padded), size)]
        return np.concatenate(parts)[:count].astype(np.float64)


def _pooled(tokens: jax.Array) -> jax.Array:
    return jnp.concatenate([tokens[:, 0], jnp.mean(tokens[:, 1:], axis=1)], axis=-1)


@dataclasses.dataclass
class _Standardiser:
    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray) -> _Standardiser:
        return cls(features.mean(axis=0), features.std(axis=0) + 1e-6)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return (np.asarray(features, np.float64) - self.mean) / self.scale


def _with_bias(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x, np.ones((len(x), 1))], axis=1)


def _penalty(width: int, l2: float) -> np.ndarray:
    """The L2 penalty of a design with a bias column last: the bias is not shrunk."""
    penalty = l2 * np.eye(width)
    penalty[-1, -1] = 0.0
    return penalty


class _LinearModel:
    """Weights on standardised features plus a bias, saved as `.npz` with its kind."""

    KIND = ""

    def __init__(self, standardiser: _Standardiser, weights: np.ndarray):
        self.standardiser, self.weights = standardiser, weights

    def _linear(self, features: np.ndarray) -> np.ndarray:
        return _with_bias(self.standardiser(features)) @ self.weights

    def save(self, path: str | Path) -> None:
        np.savez(path, kind=self.KIND, mean=self.standardiser.mean, scale=self.standardiser.scale,
                 weights=self.weights)

    @classmethod
    def load(cls, path: str | Path):
        data = _load(path, cls.KIND)
        return cls(_Standardiser(data["mean"], data["scale"]), data["weights"])


class ElevationEstimator(_LinearModel):
    """Ridge regression from image features to the orbit's elevation in degrees."""

    KIND = "elevation"

    @classmethod
    def fit(cls, features: np.ndarray, elevations: np.ndarray, l2: float = 10.0) -> ElevationEstimator:
        standardiser = _Standardiser.fit(features)
        x = _with_bias(standardiser(features))
        return cls(standardiser, np.linalg.solve(x.T @ x + _penalty(x.shape[1], l2),
                                                 x.T @ np.asarray(elevations, np.float64)))

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return self._linear(features)


class QualityClassifier(_LinearModel):
    """L2-regularised logistic regression from image features to P(good)."""

    KIND = "quality"

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, l2: float = 10.0, iterations: int = 25
            ) -> QualityClassifier:
        labels = np.asarray(labels, np.float64)
        if labels.min() == labels.max():
            raise errors.InvalidConfigValueError("the quality classifier needs good and bad examples, got one kind")
        standardiser = _Standardiser.fit(features)
        x = _with_bias(standardiser(features))
        penalty = _penalty(x.shape[1], l2)
        weights = np.zeros(x.shape[1])
        for _ in range(iterations):  # Newton's method: the loss is convex
            p = 1.0 / (1.0 + np.exp(-(x @ weights)))
            gradient = x.T @ (p - labels) + penalty @ weights
            hessian = (x * (p * (1.0 - p))[:, None]).T @ x + penalty
            weights -= np.linalg.solve(hessian, gradient)
        return cls(standardiser, weights)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """P(good) per row."""
        return 1.0 / (1.0 + np.exp(-self._linear(features)))


def _load(path: str | Path, kind: str) -> dict:
    with np.load(path) as data:
        if str(data.get("kind", "")) != kind:
            raise errors.InvalidConfigValueError(f"{path} is not a saved {kind} estimator")
        return {key: data[key] for key in data.files}


def read_labels(path: str | Path) -> dict[str, int]:
    """A labels file: one `object_id,good` or `object_id,bad` per line (# comments, blank lines ignored)."""
    labels = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        object_id, _, label = line.rpartition(",")
        if label.strip() not in ("good", "bad") or not object_id:
            raise errors.InvalidConfigValueError(f"{path}:{number}: expected `object_id,good` or `object_id,bad`, "
                                                 f"got {line!r}")
        labels[object_id.strip()] = int(label.strip() == "good")
    return labels


MIN_BOOTSTRAP_LABELS = 5  # of each kind: fewer cannot be split into a training and a held-out part


def bootstrap_labels(scores: dict[str, float], fraction: float = 0.2) -> dict[str, int]:
    """Labels without a labels file: the `fraction` best label-free scores good, the worst bad
    (at least MIN_BOOTSTRAP_LABELS of each)."""
    ranked = sorted((score, object_id) for object_id, score in scores.items() if np.isfinite(score))
    count = max(MIN_BOOTSTRAP_LABELS, int(len(ranked) * fraction))
    if 2 * count > len(ranked):
        raise errors.InvalidConfigValueError(f"{len(ranked)} scored orbits are too few to bootstrap labels from")
    return {object_id: 0 for _, object_id in ranked[:count]} | {object_id: 1 for _, object_id in ranked[-count:]}


def held_out_split(count: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) index arrays: a seeded `fraction` held out, at least one of each when count ≥ 2."""
    order = np.random.default_rng(seed).permutation(count)
    held = min(max(1, round(count * fraction)), count - 1) if count >= 2 else 0
    return np.sort(order[held:]), np.sort(order[:held])
