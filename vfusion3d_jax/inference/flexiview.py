"""FlexiView3D's image to 3D (`infer --config=configs/infer.py:flexiview`): one image → candidate
views from the multi-view diffusion model → the candidates that agree with the image → FlexRM →
3D Gaussians.

    python -m vfusion3d_jax infer --config=configs/infer.py:flexiview --checkpoint=FLEXRM_RUN \
        --config.diffusion_checkpoint=MVDIFFUSION_RUN --inputs=IMAGE_OR_FOLDER --workdir=OUT

1. The image is prepared as for the LRM (alpha or background removal, recentring) at FlexRM's
   view side and at the diffusion model's.
2. The diffusion model generates `num_candidate_orbits` orbits from it (one noise seed each); every
   frame but the first (the input itself) is a candidate view, with the camera it was generated
   for: an orbit at `input_elevation_deg` (the elevation assumed for the image), canonicalised so
   that the input view has FlexRM's reference camera, as in training.
3. Each candidate is scored by its consistency with the input view (`inference.view_selection`:
   mutual nearest neighbours of FlexRM's encoder patch features on the two foregrounds, kept when
   the epipolar geometry of the two known cameras allows them), and `select_views` keeps
   `num_views - 1` of those scoring at least `min_consistency`, chosen to cover the object.
4. FlexRM reconstructs the input and the chosen views (padded to a view bucket) into Gaussians.

Per image, under OUT/<image name>/:
    input.png          FlexRM's reference view (foreground recentred, over white)
    candidates.png     the candidate views, one row per orbit
    selected.png       FlexRM's input views: the image, then the chosen candidates
    gaussians.ply      the Gaussians in the layout 3DGS viewers read (inference/ply.py)
    turntable.mp4/.gif and views.png, rendered from the Gaussians
and OUT/summary.json: per image its outputs and every candidate's orbit, frame, azimuth,
consistency score, match count and whether it was chosen; skipped inputs with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import logging
from flax import nnx

from vfusion3d_jax import cameras, errors, visualize
from vfusion3d_jax.configs import load_config
from vfusion3d_jax.data import pipeline
from vfusion3d_jax.inference import media, preprocess, view_selection
from vfusion3d_jax.inference.ply import write_gaussians_ply
from vfusion3d_jax.inference.reconstruct import resolve
from vfusion3d_jax.inference.sample import OrbitSampler, orbit_relative_pose
from vfusion3d_jax.models import convert, flexrm
from vfusion3d_jax.models.convert import OFFICIAL_INFERENCE
from vfusion3d_jax.models.flexrm import FlexRM, Gaussians
from vfusion3d_jax.rendering import splatting
from vfusion3d_jax.train import metrics

SUMMARY_FILE = "summary.json"


class FlexReconstructor:
    """A trained FlexRM with jitted functions: posed views → Gaussians → rendered images."""

    def __init__(self, model: FlexRM, config: ml_collections.ConfigDict):
        """`config`: the checkpoint's experiment config (configs/flexrm.py)."""
        self.config = config
        self.view_size = int(config.view_resolution)
        self.view_buckets = tuple(config.model.view_buckets)
        self.patch_size = int(config.model.encoder.patch_size)
        self.num_prefix_tokens = 1 + int(config.model.encoder.num_register_tokens)
        self.settings = flexrm.splat_settings(config)
        self.train_resolution = int(config.splatting.resolution)
        self.graphdef, self.state = nnx.split(model)
        self._gaussians = jax.jit(self._gaussians_fn)
        self._features = jax.jit(self._features_fn)
        self._render = jax.jit(self._render_fn, static_argnames=("resolution", "settings"))

    @classmethod
    def from_checkpoint(cls, checkpoint: str, step: int | None = None) -> FlexReconstructor:
        """A `train --config=configs/flexrm.py:VARIANT` run (its newest checkpoint by default)."""
        task = convert.load_checkpoint_config(checkpoint, step).get("task", "lrm")
        if task != "flexrm":
            raise errors.InvalidCheckpointError(f"{checkpoint} holds a {task!r} model, not FlexRM").with_hint(
                "pass a `train --config=configs/flexrm.py:VARIANT` run, or use configs/infer.py:infer for the LRM")
        model, config = convert.load_model(checkpoint, flexrm.abstract_flexrm, step)
        return cls(model, config)

    def _features_fn(self, state: nnx.State, images: jax.Array) -> jax.Array:
        encoder = nnx.merge(self.graphdef, state).encoder
        return encoder(jnp.moveaxis(images, -1, 1))[:, self.num_prefix_tokens:]

    def _gaussians_fn(self, state: nnx.State, images: jax.Array, source_cameras: jax.Array, mask: jax.Array
                      ) -> Gaussians:
        return nnx.merge(self.graphdef, state)(jnp.moveaxis(images, -1, 2), source_cameras, mask)

    def _render_fn(self, gaussians: Gaussians, render_cameras: jax.Array, *, resolution: int,
                   settings: splatting.SplatSettings):
        rgb, alpha, info = flexrm.render_gaussians(gaussians, render_cameras, resolution, settings)
        return jnp.concatenate([jnp.clip(rgb, 0.0, 1.0), alpha], axis=-1), info

    def patch_features(self, images: np.ndarray) -> np.ndarray:
        """Encoder patch tokens (N, n², D) of views (N, S, S, 3) in [0, 1] over white."""
        return np.asarray(self._features(self.state, jnp.asarray(images, jnp.float32)))

    def gaussians(self, images: np.ndarray, source_cameras: np.ndarray) -> Gaussians:
        """The Gaussians (N = 3·R²·G) of one object's views (V, S, S, 3) with their cameras (V, 16),
        view 0 the reference; padded to a view bucket (one compiled shape per bucket)."""
        images, source_cameras, mask = flexrm.pad_views(np.asarray(images, np.float32)[None],
                                                        np.asarray(source_cameras, np.float32)[None],
                                                        buckets=self.view_buckets)
        return self._gaussians(self.state, jnp.asarray(images), jnp.asarray(source_cameras), jnp.asarray(mask))[0]

    def render(self, gaussians: Gaussians, render_cameras: np.ndarray, resolution: int, *,
               with_opacity: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """RGB (M, h, w, 3) in [0, 1] of one object's Gaussians from cameras (M, 25) (and, asked,
        their alpha (M, h, w, 1)).

        The rasteriser's capacities are the training ones scaled to the render's area; when the
        Gaussians need more, the views are rendered again with what the first pass reported
        (inference, unlike training, can afford a second compile rather than an incomplete image).
        """
        scale = (resolution / self.train_resolution) ** 2
        settings = dataclasses.replace(self.settings, max_intersections=int(np.ceil(
            self.settings.max_intersections * max(scale, 1.0) / 1024)) * 1024)
        batch = jax.tree.map(lambda x: x[None], gaussians)
        cameras_ = jnp.asarray(render_cameras, jnp.float32)[None]
        rgba, info = self._render(batch, cameras_, resolution=resolution, settings=settings)
        try:
            splatting.check_capacity(info, settings)
        except splatting.SplatCapacityError as error:
            logging.info("rendering again with larger capacities: %s", error)
            settings = dataclasses.replace(
                settings, max_intersections=max(settings.max_intersections, int(np.max(info["num_intersections"]))),
                max_per_tile=max(settings.max_per_tile, int(np.max(info["max_tile_count"]))))
            rgba, info = self._render(batch, cameras_, resolution=resolution, settings=settings)
            splatting.check_capacity(info, settings)
        rgba = np.asarray(rgba[0])
        return (rgba[..., :3], rgba[..., 3:]) if with_opacity else rgba[..., :3]


@dataclasses.dataclass(frozen=True)
class CandidatePool:
    """Candidate views of one input with the cameras they were generated for."""

    images: np.ndarray  # (K, S, S, 3) at FlexRM's view side
    source_cameras: np.ndarray  # (K, 16)
    render_cameras: np.ndarray  # (K, 25)
    orbit: np.ndarray  # (K,) which generated orbit
    frame: np.ndarray  # (K,) which frame of it (1..F-1)
    azimuth_deg: np.ndarray  # (K,) azimuth from the input view


def orbit_cameras(num_frames: int, elevation_deg: float, radius: float, focal: float) -> tuple[np.ndarray, np.ndarray]:
    """Source (F, 16) and render (F, 25) cameras of a generated orbit: frames evenly spaced around
    the circle at `elevation_deg` and `radius` with normalised focal length `focal`, canonicalised
    to frame 0 (the input view gets the reference camera FlexRM was trained with)."""
    azimuths = 360.0 * np.arange(num_frames) / num_frames
    cam2world = cameras.orbit_cam2world(azimuths, elevation_deg, radius)
    cam2world = pipeline.canonicalize_to_source(cam2world, cam2world[0])
    intrinsics = cameras.intrinsics_matrix(focal, focal, 0.5, 0.5)
    return (cameras.source_camera(cam2world, intrinsics).astype(np.float32),
            cameras.render_camera(cam2world, intrinsics).astype(np.float32))


def job_orbit_cameras(num_frames: int, config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
    """`orbit_cameras` of the flexiview config: `input_elevation_deg`, `radius`, `fov_deg`."""
    return orbit_cameras(num_frames, config.input_elevation_deg, config.radius, cameras.fov_to_focal(config.fov_deg))


def resize_views(images: np.ndarray, size: int) -> np.ndarray:
    """Views (N, h, w, 3) resized to (N, size, size, 3) (bilinear with antialiasing)."""
    images = jnp.asarray(images, jnp.float32)
    return np.asarray(jax.image.resize(images, images.shape[:1] + (size, size, 3), "linear"))


def patch_foreground(images: np.ndarray, patch_size: int) -> np.ndarray:
    """(N, n²) bool: the patches of views (N, S, S, 3) over white that show some of the object."""
    num, size = images.shape[:2]
    grid = size // patch_size
    dark = metrics.silhouettes(images[:, :grid * patch_size, :grid * patch_size])
    return dark.reshape(num, grid, patch_size, grid, patch_size).any(axis=(2, 4)).reshape(num, -1)


def generate_candidates(sampler: OrbitSampler, image: np.ndarray, num_orbits: int, seed: int, view_size: int,
                        elevation_deg: float, frame_cameras: tuple[np.ndarray, np.ndarray]) -> CandidatePool:
    """The candidate views of one image (at the sampler's side, (h, h, 3)): every frame but the
    first of `num_orbits` orbits at `elevation_deg`, seeds seed, seed + 1, ...; `frame_cameras`
    are the (source, render) cameras of the orbit's frames (`orbit_cameras`)."""
    frames = sampler.num_frames
    pose = orbit_relative_pose(frames, elevation_deg)
    orbits = sampler.sample(np.repeat(image[None], num_orbits, 0), np.ones(num_orbits, bool), pose,
                            sampler.caption(""), seed + np.arange(num_orbits))  # (O, F, h, h, 3)
    source_cameras, render_cameras = frame_cameras
    orbit, frame = (a.ravel() for a in np.meshgrid(np.arange(num_orbits), np.arange(1, frames), indexing="ij"))
    return CandidatePool(images=resize_views(orbits[orbit, frame], view_size), source_cameras=source_cameras[frame],
                         render_cameras=render_cameras[frame], orbit=orbit, frame=frame,
                         azimuth_deg=(360.0 * frame / frames).astype(np.float32))


def consistency_scores(reconstructor: FlexReconstructor, image: np.ndarray, pool: CandidatePool,
                       input_render_camera: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scores (K,), matches (K,)): each candidate's epipolar consistency with the input view."""
    features = reconstructor.patch_features(np.concatenate([image[None], pool.images]))
    foreground = patch_foreground(np.concatenate([image[None], pool.images]), reconstructor.patch_size)
    results = [view_selection.epipolar_consistency(features[0], features[k + 1], input_render_camera,
                                                   pool.render_cameras[k], foreground_a=foreground[0],
                                                   foreground_b=foreground[k + 1])
               for k in range(len(pool.images))]
    return np.array([score for score, _ in results]), np.array([count for _, count in results])


def reconstruct_image(reconstructor: FlexReconstructor, sampler: OrbitSampler | None, path: Path, out_dir: Path,
                      config: ml_collections.ConfigDict, border_ratio: float) -> dict:
    """One image through the chain; writes its outputs and returns its summary entry."""
    prepared = preprocess.prepare_image(path, reconstructor.view_size, border_ratio=border_ratio,
                                        recenter_object=config.recenter)
    input_source, input_render = (camera[0] for camera in job_orbit_cameras(1, config))
    views, view_cameras, candidates = [prepared.image], [input_source], []
    outputs = {"input": media.write_png(prepared.image, out_dir / "input.png")}
    if config.num_views > 1:
        small = preprocess.prepare_image(path, sampler.resolution, border_ratio=border_ratio,
                                         recenter_object=config.recenter).image
        pool = generate_candidates(sampler, small, config.num_candidate_orbits, config.candidate_seed,
                                   reconstructor.view_size, config.input_elevation_deg,
                                   job_orbit_cameras(sampler.num_frames, config))
        scores, matches = consistency_scores(reconstructor, prepared.image, pool, input_render)
        chosen = view_selection.select_views(pool.render_cameras, scores, config.num_views - 1,
                                             reference_camera=input_render, min_score=config.min_consistency)
        views += list(pool.images[chosen])
        view_cameras += list(pool.source_cameras[chosen])
        candidates = [dict(orbit=int(pool.orbit[k]), frame=int(pool.frame[k]), azimuth_deg=float(pool.azimuth_deg[k]),
                           consistency=round(float(scores[k]), 4), matches=int(matches[k]), chosen=bool(k in chosen))
                      for k in range(len(scores))]
        columns = sampler.num_frames - 1
        outputs["candidates"] = media.write_png(visualize.image_grid(pool.images, columns=columns),
                                                out_dir / "candidates.png")
    outputs["selected"] = media.write_png(visualize.image_grid(np.stack(views), columns=len(views)),
                                          out_dir / "selected.png")
    gaussians = reconstructor.gaussians(np.stack(views), np.stack(view_cameras))
    outputs["ply"] = write_gaussians_ply(jax.device_get(gaussians), out_dir / "gaussians.ply")
    turntable = cameras.turntable_cameras(config.num_frames, config.elevation_deg, config.radius)
    frames = reconstructor.render(gaussians, turntable, config.render_size)
    outputs["video"] = media.write_mp4(frames, out_dir / "turntable.mp4", config.fps)
    outputs["gif"] = media.write_gif(frames, out_dir / "turntable.gif", config.fps)
    preview = cameras.turntable_cameras(config.preview_views, config.preview_elevation_deg, config.radius)
    outputs["views"] = media.write_png(visualize.image_grid(reconstructor.render(gaussians, preview,
                                                                                 config.render_size),
                                                            columns=min(4, config.preview_views)),
                                       out_dir / "views.png")
    return dict(input=str(path), name=out_dir.name, had_alpha=prepared.had_alpha, num_views=len(views),
                gaussians=int(gaussians.count), candidates=candidates,
                outputs={key: str(value) for key, value in outputs.items()})


def infer_flexiview(checkpoint: str, inputs, workdir: str | Path, config: ml_collections.ConfigDict | None = None
                    ) -> dict:
    """Reconstructs every image of `inputs` (a file, folder, glob or list) with FlexRM; the summary."""
    config = config if config is not None else load_config("infer.py:flexiview")
    if not 1 <= config.num_views <= flexrm.VIEW_BUCKETS[-1]:
        raise errors.InvalidConfigValueError(
            f"config.num_views must be in 1..{flexrm.VIEW_BUCKETS[-1]} (the input and the chosen candidates), "
            f"got {config.num_views}")
    if config.num_views > 1 and not config.get("diffusion_checkpoint"):
        raise errors.InvalidConfigValueError(
            "FlexiView3D with num_views > 1 needs --config.diffusion_checkpoint=DIR (a `train "
            "--config=configs/mvdiffusion.py` run) to generate the candidate views; --config.num_views=1 uses "
            "the image alone")
    workdir = Path(workdir)
    reconstructor = FlexReconstructor.from_checkpoint(checkpoint)
    sampler = None
    if config.num_views > 1:
        sampler = OrbitSampler.from_checkpoint(config.diffusion_checkpoint,
                                               load_config("sample.py", batch_size=config.num_candidate_orbits))
    inference = reconstructor.config.get("inference", None) or ml_collections.ConfigDict(OFFICIAL_INFERENCE)
    border_ratio = float(resolve(config.get("border_ratio"), inference.border_ratio))
    paths = preprocess.find_images(inputs)
    names = dict(zip(paths, preprocess.output_names(paths)))
    summary = dict(checkpoint=str(checkpoint), diffusion_checkpoint=config.get("diffusion_checkpoint"),
                   num_views=config.num_views, processed=[], skipped=[])
    start = time.perf_counter()
    for path in tqdm.tqdm(paths, desc="image to Gaussians", unit="image"):
        try:
            summary["processed"].append(reconstruct_image(reconstructor, sampler, path, workdir / names[path], config,
                                                          border_ratio))
        except preprocess.ImageSkipped as error:
            logging.warning("skipping %s: %s", path, error)
            summary["skipped"].append(dict(input=str(path), reason=str(error)))
        except Exception as error:  # noqa: BLE001 - one image's failure must not lose the others
            logging.exception("%s: failed", path)
            summary["skipped"].append(dict(input=str(path), reason=f"failed: {type(error).__name__}: {error}"))
    summary["seconds"] = round(time.perf_counter() - start, 1)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def format_summary(summary: dict, workdir: str | Path) -> str:
    lines = [f"{len(summary['processed'])} reconstructed with FlexRM from {summary['num_views']} view(s) at most, "
             f"{len(summary['skipped'])} skipped in {summary['seconds']} s; outputs in {workdir}"]
    for item in summary["processed"]:
        chosen = [f"{c['azimuth_deg']:.0f}° ({c['consistency']:.2f})" for c in item["candidates"] if c["chosen"]]
        lines.append(f"  {item['name']}: {item['num_views']} views, {item['gaussians']:,} Gaussians"
                     + (f"; chose {', '.join(chosen)} of {len(item['candidates'])} candidates" if chosen else ""))
    lines += [f"  skipped {item['input']}: {item['reason']}" for item in summary["skipped"]]
    return "\n".join(lines)
