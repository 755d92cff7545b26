"""A trained LRM as an image-to-3D function: images → triplanes → rendered views and meshes.

    reconstructor = Reconstructor.from_checkpoint("runs/lrm_tiny")   # or a `convert` output
    planes = reconstructor.planes(images)                             # (N, S, S, 3) in [0, 1]
    frames = reconstructor.render(planes, cameras.turntable_cameras(80), resolution=256)
    mesh = reconstructor.mesh(planes[0], resolution=256)

Both checkpoint kinds share one layout (`<dir>/checkpoints/<step>/{model,config}`), and the
stored config says how to feed the model (`config.inference`: the source camera's distance and
the object framing; absent in old checkpoints, which get the official values). Rendering is
deterministic (stratified midpoints), so a video does not flicker and a metric is repeatable.
The forward pass sees `batch_size` images per call (the last call padded), one compiled shape.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import trimesh
from flax import nnx

from vfusion3d_jax import cameras, errors
from vfusion3d_jax.models.convert import OFFICIAL_INFERENCE, load_checkpoint_config, load_lrm
from vfusion3d_jax.models.lrm import LRM
from vfusion3d_jax.rendering import mesh as mesh_lib
from vfusion3d_jax.rendering.renderer import RenderOptions, render_views
from vfusion3d_jax.rendering.triplane import query_points


def resolve(value, default):
    """`value` unless it is None (a config field left to the checkpoint)."""
    return default if value is None else value


class Reconstructor:
    """An LRM with its input conventions and jitted inference functions.

    `model_config` is the checkpoint's experiment config (configs/lrm.py); `job_config` is a
    configs/infer.py config whose None fields fall back to the checkpoint's values.
    """

    def __init__(self, model: LRM, model_config: ml_collections.ConfigDict,
                 job_config: ml_collections.ConfigDict | None = None):
        job = job_config if job_config is not None else ml_collections.ConfigDict()
        inference = model_config.get("inference", None) or ml_collections.ConfigDict(OFFICIAL_INFERENCE)
        self.model_config = model_config
        self.source_size = int(resolve(job.get("source_size"), model_config.data.source_resolution))
        self.batch_size = int(job.get("batch_size") or 1)
        self.source_distance = float(resolve(job.get("source_distance"), inference.source_distance))
        self.border_ratio = float(resolve(job.get("border_ratio"), inference.border_ratio))
        self.options = RenderOptions(
            num_coarse=int(resolve(job.get("num_coarse"), model_config.render.num_coarse)),
            num_importance=int(resolve(job.get("num_importance"), model_config.render.num_importance)),
            deterministic=True,
            chunk_size=job.get("render_chunk_size"),
        )
        pose = cameras.CANONICAL_SOURCE_CAM2WORLD.astype(np.float64)
        pose[:3, 3] *= self.source_distance
        self.source_camera = cameras.source_camera(pose, cameras.intrinsics_matrix(*cameras.DEFAULT_INTRINSICS))
        self.graphdef, self.state = nnx.split(model)
        self._planes = jax.jit(self._planes_fn)
        self._render = jax.jit(self._render_fn, static_argnames=("resolution",))
        # Mesh fields bind the decoder state and planes as a jax.tree_util.Partial: the mesh
        # evaluators get them as inputs, not as constants that XLA folds at every compile.
        decoder_graphdef, self._decoder_state = nnx.split(model.decoder)

        def field(name: str, state: nnx.State, planes: jax.Array, points: jax.Array) -> jax.Array:
            return query_points(nnx.merge(decoder_graphdef, state), planes, points[None])[name][0]

        self._sigma = lambda state, planes, points: field("sigma", state, planes, points)[:, 0]
        self._rgb = functools.partial(field, "rgb")

    @classmethod
    def from_checkpoint(cls, checkpoint: str, job_config: ml_collections.ConfigDict | None = None,
                        step: int | None = None) -> Reconstructor:
        """A training run's workdir (newest checkpoint) or a `convert` output directory."""
        if checkpoint.endswith((".pth", ".pt", ".bin", ".safetensors")):
            raise errors.InvalidCheckpointError(
                f"{checkpoint} is an official weights file, not a checkpoint folder: `convert` imports it").with_hint(
                    "run `vfusion3d convert --checkpoint=FILE --workdir=DIR`, then pass DIR")
        return cls(load_lrm(checkpoint, step), load_checkpoint_config(checkpoint, step), job_config)

    @property
    def model(self) -> LRM:
        return nnx.merge(self.graphdef, self.state)

    def _planes_fn(self, state: nnx.State, images: jax.Array, source_cameras: jax.Array) -> jax.Array:
        model = nnx.merge(self.graphdef, state)
        return model.forward_planes(jnp.moveaxis(images, -1, 1), source_cameras)

    def _render_fn(self, state: nnx.State, planes: jax.Array, render_cameras: jax.Array, *,
                   resolution: int) -> jax.Array:
        decoder = nnx.merge(self.graphdef, state).decoder
        rendered = render_views(decoder, planes, render_cameras, resolution=resolution, options=self.options)
        return jnp.concatenate([jnp.clip(rendered["rgb"], 0.0, 1.0), rendered["opacity"]], axis=-1)

    def planes(self, images: np.ndarray, source_cameras: np.ndarray | None = None) -> jax.Array:
        """Images (N, S, S, 3) in [0, 1] over white (S = `source_size`) → planes (N, 3, C, 2r, 2r).

        `source_cameras` (N, 16) default to the canonical camera at `source_distance`. The
        network sees `batch_size` images per call, the last call padded: one compiled shape.
        """
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[1:] != (self.source_size, self.source_size, 3) or not len(images):
            raise ValueError(f"images must be (N, {self.source_size}, {self.source_size}, 3), got {images.shape}")
        if source_cameras is None:
            source_cameras = np.broadcast_to(self.source_camera, (len(images),) + self.source_camera.shape)
        count, size = len(images), self.batch_size
        pad = lambda x: np.concatenate([x, np.repeat(x[-1:], -count % size, axis=0)])
        images, source_cameras = pad(images), pad(np.asarray(source_cameras, np.float32))
        planes = [self._planes(self.state, jnp.asarray(images[i:i + size]), jnp.asarray(source_cameras[i:i + size]))
                  for i in range(0, len(images), size)]
        return jnp.concatenate(planes)[:count]

    def render(self, planes: jax.Array, render_cameras: np.ndarray, *, resolution: int,
               views_per_call: int | None = None, with_opacity: bool = False
               ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """RGB (N, M, h, w, 3) in [0, 1] of planes (N, ...) from cameras (M, 25) shared by all
        objects, or (N, M, 25); rendered `views_per_call` views at a time (the last call padded).
        `with_opacity` also returns the accumulated opacity (N, M, h, w, 1)."""
        render_cameras = np.asarray(render_cameras, np.float32)
        if render_cameras.ndim == 2:
            render_cameras = np.broadcast_to(render_cameras, (planes.shape[0],) + render_cameras.shape)
        num_views = render_cameras.shape[1]
        step = min(num_views, views_per_call or num_views)
        frames = []
        for start in range(0, num_views, step):
            chunk = render_cameras[:, start:start + step]
            if chunk.shape[1] < step:  # pad with the last view: one compiled shape
                chunk = np.concatenate([chunk, np.repeat(chunk[:, -1:], step - chunk.shape[1], axis=1)], axis=1)
            frames.append(self._render(self.state, planes, jnp.asarray(chunk), resolution=resolution))
        rgba = np.concatenate([np.asarray(f) for f in frames], axis=1)[:, :num_views]
        return (rgba[..., :3], rgba[..., 3:]) if with_opacity else rgba[..., :3]

    def mesh(self, planes: jax.Array, *, resolution: int = mesh_lib.DEFAULT_RESOLUTION,
             threshold: float = mesh_lib.DEFAULT_LEVEL, progress: bool = False) -> trimesh.Trimesh:
        """The coloured mesh of one object's planes (3, C, 2r, 2r): marching cubes of the density at
        `threshold`, vertex colours from the colour field. Raises mesh.EmptySurfaceError."""
        planes = jnp.asarray(planes)[None]
        density_fn, color_fn = (jax.tree_util.Partial(fn, self._decoder_state, planes)
                                for fn in (self._sigma, self._rgb))
        return mesh_lib.extract_mesh(density_fn, color_fn, resolution=resolution, level=threshold,
                                     coarse_resolution=(None if resolution <= mesh_lib.DEFAULT_COARSE_RESOLUTION
                                                        else mesh_lib.DEFAULT_COARSE_RESOLUTION),
                                     progress=progress)
