"""Rasterising meshes with pybullet's CPU renderer (TinyRenderer): RGBA views of one asset.

A real, textured rasteriser that needs no GPU, no display and no download. `Rasterizer` owns
one pybullet DIRECT client (one per process: the client is not shared across processes) and
turns a normalised `trimesh` mesh plus cameras in the conventions of `vfusion3d_jax.cameras`
into uint8 RGBA images (alpha = foreground mask, from pybullet's segmentation buffer) on a
white background, and metric depth.

Cameras map onto pybullet's OpenGL matrices exactly:
* view matrix = inverse(cam2world) (our cameras already use OpenGL axes), column-major;
* projection matrix from the normalised intrinsics (fx, fy, cx, cy) so that a world point
  lands on the pixel `cameras.project_points` predicts, off-centre principal points
  included; pybullet returns images with row 0 at the top, like ours (y down).

What the renderer draws: every mesh part becomes a triangle list with UVs, corner normals
and one RGB texture. Image textures (OBJ `map_Kd`, glTF base colour times its factor) are
used as they are (at most `MAX_TEXTURE_SIZE` pixels a side); flat material colours become a
1x1 texture; face and vertex colours (vertex colours averaged per face) become a small
palette texture with every face's UVs on its colour's texel. Normals are smooth within 30
degrees and flat across sharper edges, so boxes look like boxes and spheres stay round.

Lighting is Lambertian plus ambient from one light fixed in the world (not in the camera),
so a surface point has the same colour in every view: orbits stay 3D-consistent for a
reconstruction model whose colours do not depend on the viewing direction. No specular,
no shadows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import os
import tempfile
from typing import NamedTuple

import numpy as np
import pybullet
import trimesh
from PIL import Image

MAX_TEXTURE_SIZE = 1024
# Corner normals: smooth where a face's normal is within this angle of the averaged vertex normal.
SMOOTH_ANGLE_DEG = 30.0
# More distinct face colours than this are quantised to 5 bits per channel.
MAX_PALETTE_COLOURS = 4096
# Near and far planes cover the [-1, 1]^3 box that normalised assets live in.
_BOX_HALF_DIAGONAL = math.sqrt(3.0)


@dataclasses.dataclass(frozen=True)
class Lighting:
    """One directional light fixed in the world; `direction` points from the object to the light."""

    direction: tuple[float, float, float] = (0.35, 0.25, 1.0)  # from above, a little to the side
    ambient: float = 0.55
    diffuse: float = 0.5
    specular: float = 0.0


@dataclasses.dataclass(frozen=True)
class TexturedPart:
    """A triangle list pybullet can draw: one texture, UVs in OBJ convention (v = 0 is the image bottom)."""

    vertices: np.ndarray  # (N, 3) float
    faces: np.ndarray  # (F, 3) int, indices into vertices and uv
    uv: np.ndarray  # (N, 2) float in [0, 1]
    corner_normals: np.ndarray  # (F, 3, 3) unit normal at each corner of each face
    texture: np.ndarray  # (h, w, 3) uint8, row 0 at the top


class RenderedViews(NamedTuple):
    rgba: np.ndarray  # (V, H, W, 4) uint8; white where alpha is 0
    depth: np.ndarray  # (V, H, W) float32 distance along the camera's viewing axis; inf on background


def view_matrix(cam2world: np.ndarray) -> list[float]:
    """pybullet's 16-float view matrix (column-major world-to-camera, OpenGL axes) of a cam2world."""
    return np.linalg.inv(np.asarray(cam2world, np.float64)).T.reshape(16).tolist()


def projection_matrix(intrinsics: np.ndarray, near: float, far: float) -> list[float]:
    """pybullet's 16-float OpenGL projection matrix (column-major) from normalised intrinsics.

    With u = fx * x / -z + cx (right) and v = fy * -y / -z + cy (down) in OpenGL camera
    coordinates, NDC x = 2u - 1 and NDC y = 1 - 2v (pybullet's row 0 is the image top).
    """
    fx, fy, cx, cy = intrinsics[0, 0], intrinsics[1, 1], intrinsics[0, 2], intrinsics[1, 2]
    if intrinsics[0, 1] != 0:
        raise ValueError("skewed intrinsics are not supported by the rasteriser")
    matrix = np.array([
        [2 * fx, 0.0, 1 - 2 * cx, 0.0],
        [0.0, 2 * fy, 2 * cy - 1, 0.0],
        [0.0, 0.0, -(far + near) / (far - near), -2 * far * near / (far - near)],
        [0.0, 0.0, -1.0, 0.0],
    ])
    return matrix.T.reshape(16).tolist()


def _corner_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(F, 3, 3) normals: area-weighted vertex normals, or the face normal across sharp edges.

    Vertices are grouped by position, not by index, so UV seams and per-face vertices
    (palette and box-projected parts) still shade smoothly.
    """
    corners = np.asarray(vertices, np.float64)[faces]
    cross = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])  # length = 2 * area
    face_normals = cross / np.maximum(np.linalg.norm(cross, axis=-1, keepdims=True), 1e-20)
    _, position_index = np.unique(np.round(vertices, 6), axis=0, return_inverse=True)
    corner_position = position_index.reshape(-1)[faces]
    summed = np.zeros((position_index.max() + 1, 3))
    np.add.at(summed, corner_position, np.repeat(cross[:, None, :], 3, axis=1))
    vertex_normals = summed / np.maximum(np.linalg.norm(summed, axis=-1, keepdims=True), 1e-20)
    vertex_normals = vertex_normals[corner_position]
    cos_angle = np.sum(vertex_normals * face_normals[:, None, :], axis=-1, keepdims=True)
    return np.where(cos_angle >= math.cos(math.radians(SMOOTH_ANGLE_DEG)), vertex_normals, face_normals[:, None, :])


def _material_image(material) -> Image.Image | None:
    image = getattr(material, "image", None)  # SimpleMaterial (OBJ)
    if image is None:
        image = getattr(material, "baseColorTexture", None)  # PBRMaterial (glTF)
    return image


def _limit_texture(image: Image.Image) -> np.ndarray:
    image = image.convert("RGB")
    if max(image.size) > MAX_TEXTURE_SIZE:
        scale = MAX_TEXTURE_SIZE / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.LANCZOS, reducing_gap=2.0)  # box-reduce first: fast
    return np.asarray(image, dtype=np.uint8)


def _flat_part(vertices: np.ndarray, faces: np.ndarray, rgb: np.ndarray) -> TexturedPart:
    uv = np.full((len(vertices), 2), 0.5)
    texture = np.asarray(rgb, np.uint8)[:3].reshape(1, 1, 3)
    return TexturedPart(vertices, faces, uv, _corner_normals(vertices, faces), texture)


def _palette_part(vertices: np.ndarray, faces: np.ndarray, face_rgb: np.ndarray) -> TexturedPart:
    colours, face_colour = np.unique(face_rgb, axis=0, return_inverse=True)
    if len(colours) > MAX_PALETTE_COLOURS:
        colours, face_colour = np.unique(face_rgb // 8 * 8 + 4, axis=0, return_inverse=True)
    if len(colours) == 1:
        return _flat_part(vertices, faces, colours[0])
    side = math.ceil(math.sqrt(len(colours)))
    texture = np.zeros((side * side, 3), np.uint8)
    texture[: len(colours)] = colours
    face_colour = face_colour.reshape(-1)
    texel_x, texel_y = face_colour % side, face_colour // side
    face_uv = np.stack([(texel_x + 0.5) / side, 1.0 - (texel_y + 0.5) / side], axis=-1)
    # Every face gets its own three vertices so that each can sit on its own texel.
    num_faces = len(faces)
    return TexturedPart(
        vertices=vertices[faces].reshape(-1, 3),
        faces=np.arange(3 * num_faces).reshape(num_faces, 3),
        uv=np.repeat(face_uv, 3, axis=0),
        corner_normals=_corner_normals(vertices, faces),
        texture=texture.reshape(side, side, 3),
    )


def placed_geometries(mesh: trimesh.Trimesh | trimesh.Scene):
    """(geometry, world vertices, faces) of every triangle mesh; geometry is shared, not copied."""
    if isinstance(mesh, trimesh.Trimesh):
        yield mesh, np.asarray(mesh.vertices, np.float64), np.asarray(mesh.faces)
        return
    for node in mesh.graph.nodes_geometry:
        transform, name = mesh.graph[node]
        geometry = mesh.geometry[name]
        if not isinstance(geometry, trimesh.Trimesh) or len(geometry.faces) == 0:
            continue  # point clouds and paths have nothing to rasterise
        faces = np.asarray(geometry.faces)
        if np.linalg.det(transform[:3, :3]) < 0:  # a mirroring transform flips the winding
            faces = faces[:, ::-1]
        yield geometry, trimesh.transform_points(geometry.vertices, transform), faces


def textured_parts(mesh: trimesh.Trimesh | trimesh.Scene) -> list[TexturedPart]:
    """The drawable parts of a mesh or scene (scene transforms applied); see the module docstring."""
    parts, textures = [], {}  # by content: parts often share one image, even when loaded twice
    for geometry, vertices, faces in placed_geometries(mesh):
        visual = geometry.visual
        if isinstance(visual, trimesh.visual.TextureVisuals):
            image, uv = _material_image(visual.material), visual.uv
            if image is not None and uv is not None and len(uv) == len(vertices):
                key = hashlib.sha1(image.tobytes()).digest() + bytes(str((image.size, image.mode)), "ascii")
                if key not in textures:
                    textures[key] = _limit_texture(image)
                texture = textures[key]
                factor = getattr(visual.material, "baseColorFactor", None)
                if factor is not None:  # glTF: base colour = texture * factor
                    texture = np.round(texture * (np.asarray(factor[:3], np.float64) / 255.0)).astype(np.uint8)
                normals = _corner_normals(vertices, faces)
                parts.append(TexturedPart(vertices, faces, np.asarray(uv, np.float64), normals, texture))
            else:
                parts.append(_flat_part(vertices, faces, visual.material.main_color))
        else:
            parts.append(_palette_part(vertices, faces, np.asarray(visual.face_colors)[:, :3]))
    if not parts:
        raise ValueError("mesh has no triangles to render")
    return parts


def _write_obj(path: str, part: TexturedPart) -> None:
    """A minimal OBJ (positions, UVs, corner normals; no material: the texture is bound separately)."""
    num_vertices, num_faces = len(part.vertices), len(part.faces)
    # One %-format over a flat tuple: several times faster than a Python loop over rows.
    vertex_lines = ("v %.7g %.7g %.7g\n" * num_vertices) % tuple(np.ravel(part.vertices).tolist())
    uv_lines = ("vt %.7g %.7g\n" * num_vertices) % tuple(np.ravel(part.uv).tolist())
    normal_lines = ("vn %.6g %.6g %.6g\n" * 3 * num_faces) % tuple(np.ravel(part.corner_normals).tolist())
    # OBJ indices are 1-based; the normal of corner k of face f is row 3f + k.
    corners = np.stack([part.faces + 1, part.faces + 1, np.arange(1, 3 * num_faces + 1).reshape(num_faces, 3)], -1)
    face_lines = ("f %d/%d/%d %d/%d/%d %d/%d/%d\n" * num_faces) % tuple(corners.ravel().tolist())
    with open(path, "w") as file:
        file.write(vertex_lines + uv_lines + normal_lines + face_lines)


class Rasterizer:
    """Renders meshes with pybullet's TinyRenderer in a private DIRECT client.

    `supersample` > 1 renders each view that many times larger and averages blocks of
    pixels (anti-aliased edges and textures; alpha becomes fractional coverage).
    """

    def __init__(self, lighting: Lighting = Lighting(), supersample: int = 1):
        if supersample < 1:
            raise ValueError(f"supersample must be >= 1, got {supersample}")
        self.lighting, self.supersample = lighting, supersample
        self._client = pybullet.connect(pybullet.DIRECT)
        # pybullet caches meshes by file name, even across resetSimulation: every part gets a
        # file name never used before in this process.
        self._file_counter = itertools.count()

    def close(self) -> None:
        if self._client is not None:
            pybullet.disconnect(physicsClientId=self._client)
            self._client = None

    def __enter__(self) -> Rasterizer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _load(self, parts: list[TexturedPart], folder: str) -> None:
        textures: dict[int, int] = {}  # textured_parts gives parts that share an image the same array
        for part in parts:
            stem = os.path.join(folder, f"part{next(self._file_counter)}")
            _write_obj(stem + ".obj", part)
            shape = pybullet.createVisualShape(pybullet.GEOM_MESH, fileName=stem + ".obj", physicsClientId=self._client)
            os.remove(stem + ".obj")
            if shape < 0:
                raise RuntimeError("pybullet could not load a mesh part")
            body = pybullet.createMultiBody(baseMass=0, baseVisualShapeIndex=shape, physicsClientId=self._client)
            key = id(part.texture)
            if key not in textures:
                Image.fromarray(part.texture).save(stem + ".png", compress_level=0)  # a temporary file: speed over size
                textures[key] = pybullet.loadTexture(stem + ".png", physicsClientId=self._client)
                os.remove(stem + ".png")
            pybullet.changeVisualShape(body, -1, textureUniqueId=textures[key], rgbaColor=[1, 1, 1, 1],
                                       physicsClientId=self._client)

    def render(self, mesh: trimesh.Trimesh | trimesh.Scene, cam2world: np.ndarray, intrinsics: np.ndarray,
               resolution: int | tuple[int, int]) -> RenderedViews:
        """Views of `mesh` from cameras cam2world (V, 4, 4), normalised intrinsics (3, 3) or (V, 3, 3).

        `resolution` is the image side, or (height, width).
        """
        if self._client is None:
            raise RuntimeError("Rasterizer is closed")
        height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
        cam2world = np.asarray(cam2world, np.float64)
        intrinsics = np.broadcast_to(np.asarray(intrinsics, np.float64), cam2world.shape[:-2] + (3, 3))
        pybullet.resetSimulation(physicsClientId=self._client)
        with tempfile.TemporaryDirectory(prefix="vfusion3d_rasterize_") as folder:
            self._load(textured_parts(mesh), folder)
        rgba, depth = [], []
        for pose, camera in zip(cam2world, intrinsics):
            view_rgba, view_depth = self._render_view(pose, camera, height, width)
            rgba.append(view_rgba)
            depth.append(view_depth)
        pybullet.resetSimulation(physicsClientId=self._client)
        return RenderedViews(np.stack(rgba), np.stack(depth))

    def _render_view(self, cam2world: np.ndarray, intrinsics: np.ndarray, height: int, width: int):
        distance = float(np.linalg.norm(cam2world[:3, 3]))
        near = max(1e-3, distance - _BOX_HALF_DIAGONAL)
        far = distance + _BOX_HALF_DIAGONAL
        s = self.supersample
        light = self.lighting
        # TinyRenderer's samples sit half a pixel off the pixel centres that cameras.pixel_rays and
        # project_points use, in both axes; this shift of the principal point puts them back. Found
        # by rendering mirrored objects from mirrored cameras (tests/test_render_assets.py): the
        # views came out 1 px from each other's mirror image before, exact now.
        intrinsics = np.array(intrinsics, np.float64)
        intrinsics[0, 2] -= 0.5 / (width * s)
        intrinsics[1, 2] += 0.5 / (height * s)
        _, _, rgb, depth_buffer, segmentation = pybullet.getCameraImage(
            width * s, height * s, view_matrix(cam2world), projection_matrix(intrinsics, near, far),
            renderer=pybullet.ER_TINY_RENDERER, shadow=0, lightDirection=list(light.direction),
            lightColor=[1.0, 1.0, 1.0], lightAmbientCoeff=light.ambient, lightDiffuseCoeff=light.diffuse,
            lightSpecularCoeff=light.specular, physicsClientId=self._client)
        shape = (height * s, width * s)
        foreground = np.asarray(segmentation).reshape(shape) >= 0
        rgb = np.where(foreground[..., None], np.asarray(rgb, np.uint8).reshape(shape + (4,))[..., :3], 255)
        # OpenGL depth buffer -> distance along the viewing axis.
        ndc_z = 2.0 * np.asarray(depth_buffer, np.float64).reshape(shape) - 1.0
        depth = np.where(foreground, 2.0 * far * near / (far + near - ndc_z * (far - near)), np.inf)
        blocks = (height, s, width, s)
        colour = rgb.astype(np.float64).reshape(blocks + (3,)).mean(axis=(1, 3))
        alpha = foreground.reshape(blocks).mean(axis=(1, 3))
        rgba = np.concatenate([colour, 255.0 * alpha[..., None]], axis=-1)
        return np.round(rgba).astype(np.uint8), depth.reshape(blocks).min(axis=(1, 3)).astype(np.float32)
