"""The label-free quality of an orbit: is it one 3D object, seen from the cameras it claims?

Three independent checks, each per view, so that one bad view shows:

* **Reconstruction** (`lrm_*`): the LRM reconstructs the object from the orbit's first view and
  renders it at the other views' cameras (`evaluate`'s path); each generated view is compared
  with its re-render: foreground PSNR, LPIPS and silhouette IoU (rendered opacity against the
  orbit's alpha; for synthetic orbits the alpha `generate` estimated from the background).
* **Visual hull** (`hull_*`, `consistency.py`): the silhouettes carved into a hull with the
  cameras; each silhouette against the hull's projection.
* **Sharpness** (`sharpness_*`, `edge_sharpness`): how abruptly the object's outline meets the
  white background, relative to the local contrast: about 1 for a rendered (anti-aliased)
  view, about 0.35 after a 1.5 px blur. Object-independent: every object has an outline.

The score (`quality_score`, in [0, 1], higher is better) is the geometric mean of the three
checks, each in [0, 1]: the reconstruction's agreement (the mean of its mean silhouette IoU,
its worst view's IoU and 1 − its mean LPIPS), the hull's worst view's IoU, and the worst
view's sharpness. A geometric mean, so that failing any one check sinks the orbit; worst
views, so that a single swapped or broken view is not diluted by 15 good ones. The hull
catches frames in the wrong order or direction even where the LRM is too weak to tell; the
reconstruction catches texture that does not follow the object (noise, views of another
colour) and grows more telling as the LRM improves; sharpness catches blur, which the others
reward. (Chosen on one set of objects in `benchmarks/curation.py`, reported on another.) `benchmarks/curation.py` measures how well it separates good orbits from
broken copies of them (shuffled, a view swapped, blurred, noised, mirrored).
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from scipy import ndimage

from vfusion3d_jax import cameras
from vfusion3d_jax.curation import consistency
from vfusion3d_jax.data.pipeline import composite_on_white
from vfusion3d_jax.inference.evaluate import model_predictor, orbit_task
from vfusion3d_jax.inference.reconstruct import Reconstructor
from vfusion3d_jax.train import metrics

TERMS = ("lrm_fg_psnr", "lrm_lpips", "lrm_iou", "lrm_iou_min", "hull_iou", "hull_iou_min", "sharpness",
         "sharpness_min")
# Edge-sharpness parameters: outline pixels are where the darkness (1 - min channel) crosses this;
# contrast is measured over a CONTRAST_WINDOW-pixel square, and never taken below MIN_CONTRAST.
OUTLINE_DARKNESS = 0.1
CONTRAST_WINDOW = 5
MIN_CONTRAST = 0.1

_image_metrics = jax.jit(metrics.image_metrics)


def edge_sharpness(frames: np.ndarray) -> np.ndarray:
    """float (V,): per view (V, H, W, 3) in [0, 1] over white, the median over the object's outline
    pixels of the steepest one-pixel step of darkness nearby, divided by the local contrast; 1
    for a hard edge, lower the softer. NaN for a view without an object."""
    darkness = 1.0 - np.min(frames, axis=-1)
    values = []
    for view in darkness:
        step = np.maximum(np.abs(np.diff(view, axis=1, append=view[:, -1:])),
                          np.abs(np.diff(view, axis=0, append=view[-1:])))
        steepest = ndimage.maximum_filter(step, 3)
        contrast = ndimage.maximum_filter(view, CONTRAST_WINDOW) - ndimage.minimum_filter(view, CONTRAST_WINDOW)
        mask = view > OUTLINE_DARKNESS
        outline = mask ^ ndimage.binary_erosion(mask)
        ratios = steepest[outline] / np.maximum(contrast[outline], MIN_CONTRAST)
        values.append(float(np.median(ratios)) if ratios.size else np.nan)
    return np.asarray(values)


def quality_score(terms: dict) -> float:
    """The documented combination of an orbit's terms (module docstring), in [0, 1]."""
    reconstruction = np.nanmean(np.clip([terms["lrm_iou"], terms["lrm_iou_min"], 1.0 - terms["lrm_lpips"]], 0, 1))
    checks = np.array([reconstruction, terms["hull_iou_min"], terms["sharpness_min"]], np.float64)
    checks = np.clip(checks[np.isfinite(checks)], 1e-6, 1.0)
    return float(np.exp(np.mean(np.log(checks)))) if checks.size else float("nan")


class QualityScorer:
    """Scores decoded orbits (`example.decode_orbit`) with an LRM checkpoint's reconstructions."""

    def __init__(self, reconstructor: Reconstructor, *, resolution: int = 64, hull_resolution: int = 48,
                 lpips_params=None):
        self.reconstructor = reconstructor
        self.resolution = resolution
        self.hull_resolution = hull_resolution
        self.lpips_params = (lpips_params if lpips_params is not None
                             else metrics.load_lpips_params(metrics.EVAL_LPIPS_NET))
        self._predict = model_predictor(reconstructor, ml_collections.ConfigDict(dict(swap_group=1, chamfer=False)))

    def terms(self, orbits: list[dict]) -> list[dict]:
        """The terms (`TERMS`) and `quality` of each orbit; view 0 is the reconstruction's source."""
        tasks = [orbit_task(orbit, source_view=0, source_size=self.reconstructor.source_size,
                            resolution=self.resolution) for orbit in orbits]
        results = []
        for orbit, task, prediction in zip(orbits, tasks, self._predict(tasks)):
            per_view = jax.device_get(_image_metrics(
                np.asarray(prediction.images, np.float32), task.target_images, self.lpips_params,
                opacity=np.asarray(prediction.opacity, np.float32), masks=task.target_masks))
            masks = np.stack([frame[..., 3] > 127 for frame in orbit["images"]])
            hull = consistency.hull_ious(masks, cameras.render_camera(orbit["cam2world"], orbit["intrinsics"]),
                                         resolution=self.hull_resolution)
            sharpness = edge_sharpness(composite_on_white(orbit["images"])[0])
            terms = dict(lrm_fg_psnr=float(np.nanmean(per_view["fg_psnr"])), lrm_lpips=float(np.mean(per_view["lpips"])),
                         lrm_iou=float(np.mean(per_view["iou"])), lrm_iou_min=float(np.min(per_view["iou"])),
                         hull_iou=float(np.mean(hull)), hull_iou_min=float(np.min(hull)),
                         sharpness=float(np.nanmean(sharpness)), sharpness_min=float(np.nanmin(sharpness)))
            results.append(dict(terms, quality=quality_score(terms)))
        return results
