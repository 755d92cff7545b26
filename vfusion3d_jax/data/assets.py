"""3D assets to render: where they come from, and how each is loaded, oriented and normalised.

Sources (the `assets` config field: comma-separated names and/or paths, so no commas in paths):

* `pybullet_objects`: the objects that ship inside the `pybullet_data` package (no
  download): every URDF (its links placed by forward kinematics at zero joint angles, its
  visual meshes, primitives and colours) plus the OBJ files no URDF references. Skipped by
  rule (`_EXCLUDED`): flat or scene-sized things (plane, terrain, stadium, samurai temple,
  cloth, heightmaps), collision variants (`_vhacd`, `_col`, `_mod` meshes), toy robots drawn
  as thin lines (cartpole, pendulum, TwoJointRobot), two that cannot load (husky needs ROS
  substitutions, racecar_differential a mesh that is not shipped), URDFs that are not
  well-formed XML or have no visuals, and duplicates: URDFs whose visuals draw the same mesh
  files and primitives (`cube.urdf`, `cube_small.urdf`, ...) count once. Famous objects come
  first (`FEATURED_OBJECTS`) so that small caps pick recognisable ones. 59 objects: textured
  props (duck, soccer ball, jenga, tray, table, domino), coloured toys, robots.
* `pybullet_blobs`: `pybullet_data/random_urdfs`, 1000 random convex-ish blobs, flat colours.
* `procedural`: `num_procedural` objects made of 1-4 primitives (box, sphere, ellipsoid,
  cylinder, cone, capsule, torus, tube) with random sizes, poses, flat colours and
  procedural textures (checker, stripes, noise, dots, gradient) on box-projected UVs;
  object i is a pure function of (seed, i): an unlimited, reproducible supply.
* `builtin`: all three above.
* anything else: a mesh file, a folder (searched recursively for .obj/.glb/.gltf/.ply/.stl/
  .off) or a glob; whatever trimesh loads, textures included.

Orientation: world +z is up. Each asset has an up axis in its own file: `+z` for
pybullet_data (its URDF convention; the few meshes it stores y-up are listed in
`PYBULLET_UP_AXES`) and for procedural objects, `+y` for user files (the glTF convention,
and what most OBJ exporters write). `up_axis` in the config overrides it for every asset.
A `+y` asset is turned by +90 degrees about x (y -> z, z -> -y), as Blender imports glTF.

Normalisation (the same for every asset, after orientation): translate the centre of the
axis-aligned bounding box to the origin and scale uniformly so that the longest side of the
box is `object_size` (0.9 by default: the asset lies in [-0.45, 0.45]^3, well inside the
renderer's [-1, 1]^3 box). Why this size: the official model's source camera sits at
distance 1 with fx = 0.75, where a larger object would fill or overflow the frame, and its
turntable radius is 1.5; at radius 1.5, fx = 0.75 a 0.9 cube fills at most 92% of the
image from any azimuth at elevations 0-45 degrees (`render_assets` checks its config).
"""

from __future__ import annotations

import collections
import colorsys
import dataclasses
import glob
import math
import os
import re
import xml.etree.ElementTree as ElementTree
import numpy as np
import pybullet_data
import trimesh
from PIL import Image

from vfusion3d_jax import errors

PYBULLET_DATA = pybullet_data.getDataPath()
SOURCES = ("pybullet_objects", "pybullet_blobs", "procedural")
ALIASES = {"builtin": SOURCES}
MESH_EXTENSIONS = (".obj", ".glb", ".gltf", ".ply", ".stl", ".off")
UP_AXES = ("+x", "-x", "+y", "-y", "+z", "-z")
DEFAULT_UP_AXIS = {"pybullet_objects": "+z", "pybullet_blobs": "+z", "procedural": "+z", "user": "+y"}

# pybullet_data assets to leave out, by path relative to pybullet_data (see the docstring).
_EXCLUDED = re.compile(
    r"plane|terrain|stadium|samurai|cloth|heightmap"  # flat or scene-sized
    r"|_vhacd\.obj$|_col\.obj$|_mod\.obj$"  # collision and physics variants of other meshes
    r"|cartpole|pendulum|TwoJointRobot"  # drawn as thin lines: nothing to see
    r"|husky|racecar_differential"  # need ROS substitutions / a mesh file that is not shipped
    r"|random_urdfs/")  # listed by pybullet_blobs
# Listed first, in this order, so that capped lists (the tiny config) hold recognisable objects.
FEATURED_OBJECTS = (
    "duck_vhacd", "soccerball", "teddy_vhacd", "jenga/jenga", "tray/traybox", "table/table", "lego/lego",
    "objects/mug", "domino/domino", "bunny", "sphere2", "racecar/meshes/cone", "kuka_iiwa/model", "r2d2",
)
# pybullet_data meshes stored y-up (they lie on their side in pybullet's own examples).
PYBULLET_UP_AXES = {"duck_vhacd": "+y", "teddy_vhacd": "+y"}


class AssetError(RuntimeError):
    """An asset that cannot be loaded or rendered (missing file, unreadable mesh, nothing to draw)."""


@dataclasses.dataclass(frozen=True)
class AssetSpec:
    """A reference to one asset: cheap to list, sort and send to a worker process; loaded by `load_asset`.

    `group`: assets that share a group (variants of one robot) fall in the same split.
    """

    object_id: str  # stable and unique, e.g. "pybullet_data/duck_vhacd", "procedural/s0-000042"
    source: str  # one of SOURCES, or "user"
    path: str = ""  # URDF or mesh file; empty for procedural objects
    seed: int = 0  # procedural objects only
    up_axis: str = "+z"
    group: str = ""


# --- Listing -----------------------------------------------------------------------------------


def _pybullet_id(path: str) -> str:
    return "pybullet_data/" + os.path.splitext(os.path.relpath(path, PYBULLET_DATA))[0]


def _resolve_urdf_file(urdf_path: str, filename: str) -> str:
    """A URDF mesh path: relative to the URDF, or `package://` relative to a folder above it."""
    if not filename.startswith("package://"):
        return os.path.normpath(os.path.join(os.path.dirname(urdf_path), filename))
    relative = filename[len("package://"):]
    folder = os.path.dirname(urdf_path)
    while True:
        for candidate in (os.path.join(folder, relative), os.path.join(folder, relative.partition("/")[2])):
            if os.path.exists(candidate):
                return os.path.normpath(candidate)
        if folder in (PYBULLET_DATA, os.path.dirname(folder)):
            return os.path.normpath(os.path.join(os.path.dirname(urdf_path), relative))
        folder = os.path.dirname(folder)


def _urdf_visual_signature(urdf_path: str, robot: ElementTree.Element) -> tuple[str, ...]:
    """What a URDF draws, up to scale and colour: its visual mesh files (no extension) and primitives."""
    signature = []
    for visual in robot.iter("visual"):
        for geometry in visual.iterfind("geometry/*"):
            if geometry.tag == "mesh":
                signature.append(os.path.splitext(_resolve_urdf_file(urdf_path, geometry.get("filename", "")))[0])
            else:
                signature.append(geometry.tag)
    return tuple(sorted(signature))


def _pybullet_up_axis(object_id: str) -> str:
    return PYBULLET_UP_AXES.get(object_id.partition("/")[2], DEFAULT_UP_AXIS["pybullet_objects"])


def _featured_first(path: str) -> tuple[int, str]:
    """Sort key: featured objects in their order, then the rest by path."""
    name = _pybullet_id(path).partition("/")[2]
    return (FEATURED_OBJECTS.index(name) if name in FEATURED_OBJECTS else len(FEATURED_OBJECTS), path)


def pybullet_objects(up_axis: str | None = None) -> list[AssetSpec]:
    """The curated objects of pybullet_data (see the module docstring), featured ones first."""
    specs, seen_signatures, referenced_meshes = [], set(), set()
    # Featured URDFs first, so that of two duplicates the featured one is kept.
    for path in sorted(glob.glob(os.path.join(PYBULLET_DATA, "**", "*.urdf"), recursive=True), key=_featured_first):
        relative = os.path.relpath(path, PYBULLET_DATA)
        try:
            robot = ElementTree.parse(path).getroot()
        except ElementTree.ParseError:
            continue  # a few robot URDFs in pybullet_data are not well-formed XML
        for mesh in robot.iter("mesh"):
            referenced_meshes.add(_resolve_urdf_file(path, mesh.get("filename", "")))
        signature = _urdf_visual_signature(path, robot)
        if _EXCLUDED.search(relative) or not signature or signature in seen_signatures:
            continue
        seen_signatures.add(signature)
        object_id = _pybullet_id(path)
        specs.append(AssetSpec(
            object_id, "pybullet_objects", path,
            up_axis=up_axis or _pybullet_up_axis(object_id),
            # Variants of one robot share a folder; keep them on one side of the split.
            group=os.path.dirname(relative) or object_id,
        ))
    for path in sorted(glob.glob(os.path.join(PYBULLET_DATA, "**", "*.obj"), recursive=True)):
        relative = os.path.relpath(path, PYBULLET_DATA)
        if os.path.normpath(path) in referenced_meshes or _EXCLUDED.search(relative):
            continue
        object_id = _pybullet_id(path)
        specs.append(AssetSpec(object_id, "pybullet_objects", path,
                               up_axis=up_axis or _pybullet_up_axis(object_id), group=object_id))
    return sorted(specs, key=lambda spec: _featured_first(spec.path))


def pybullet_blobs(up_axis: str | None = None) -> list[AssetSpec]:
    """The 1000 random blobs of pybullet_data/random_urdfs."""
    paths = sorted(glob.glob(os.path.join(PYBULLET_DATA, "random_urdfs", "*", "*.urdf")))
    return [AssetSpec(_pybullet_id(p), "pybullet_blobs", p, up_axis=up_axis or DEFAULT_UP_AXIS["pybullet_blobs"],
                      group=_pybullet_id(p)) for p in paths]


def procedural_assets(count: int, seed: int, up_axis: str | None = None) -> list[AssetSpec]:
    """`count` procedural objects; object i depends only on (seed, i)."""
    specs = []
    for index in range(count):
        object_id = f"procedural/s{seed}-{index:06d}"
        object_seed = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
        specs.append(AssetSpec(object_id, "procedural", seed=object_seed,
                               up_axis=up_axis or DEFAULT_UP_AXIS["procedural"], group=object_id))
    return specs


def user_assets(pattern: str, up_axis: str | None = None) -> list[AssetSpec]:
    """Mesh files at `pattern`: a file, a folder (searched recursively) or a glob."""
    pattern = os.path.expanduser(pattern)
    if os.path.isdir(pattern):
        root = pattern
        paths = [p for p in glob.glob(os.path.join(pattern, "**", "*"), recursive=True)
                 if p.lower().endswith(MESH_EXTENSIONS)]
    else:
        root = os.path.dirname(pattern.split("*")[0].split("?")[0].split("[")[0]) or "."
        paths = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
    if not paths:
        raise errors.MissingInputError(f"no mesh files ({', '.join(MESH_EXTENSIONS)}) match {pattern!r}")
    specs = []
    for path in sorted(paths):
        object_id = "user/" + os.path.relpath(path, root).replace(os.sep, "/")
        specs.append(AssetSpec(object_id, "user", os.path.abspath(path), up_axis=up_axis or DEFAULT_UP_AXIS["user"],
                               group=object_id))
    return specs


def list_assets(assets: str, *, num_procedural: int = 0, seed: int = 0, up_axis: str = "auto",
                max_assets_per_source: int = 0) -> list[AssetSpec]:
    """The asset list a config names: `assets` is comma-separated source names and paths/globs.

    `max_assets_per_source` > 0 keeps the first that many of each entry (procedural objects
    are counted by `num_procedural` alone). Object ids must be unique across entries.
    """
    if up_axis != "auto" and _canonical_up_axis(up_axis) not in UP_AXES:
        raise ValueError(f"up_axis must be 'auto' or one of {UP_AXES}, got {up_axis!r}")
    override = None if up_axis == "auto" else _canonical_up_axis(up_axis)
    entries = []
    for entry in (e.strip() for e in assets.split(",") if e.strip()):
        entries.extend(ALIASES.get(entry, (entry,)))
    specs: list[AssetSpec] = []
    for entry in dict.fromkeys(entries):  # drop repeats, keep order
        if entry == "pybullet_objects":
            found = pybullet_objects(override)
        elif entry == "pybullet_blobs":
            found = pybullet_blobs(override)
        elif entry == "procedural":
            specs.extend(procedural_assets(num_procedural, seed, override))
            continue
        else:
            found = user_assets(entry, override)
        specs.extend(found[:max_assets_per_source] if max_assets_per_source > 0 else found)
    if not specs:
        raise errors.EmptyInputError(f"no assets in {assets!r} (num_procedural={num_procedural})")
    counts = collections.Counter(spec.object_id for spec in specs)
    duplicates = [object_id for object_id, count in counts.items() if count > 1]
    if duplicates:
        raise ValueError(f"asset ids appear twice: {sorted(duplicates)[:5]}")
    return specs


# --- Loading -----------------------------------------------------------------------------------


def _canonical_up_axis(axis: str) -> str:
    return axis if axis[:1] in "+-" else "+" + axis


def up_axis_rotation(up_axis: str) -> np.ndarray:
    """4x4 rotation taking the asset's `up_axis` to world +z by the smallest turn, so the other
    axes move as little as possible (+y: +90 degrees about x, y -> z and z -> -y; -z: a half
    turn about x)."""
    axis = _canonical_up_axis(up_axis)
    if axis not in UP_AXES:
        raise ValueError(f"up axis must be one of {UP_AXES}, got {up_axis!r}")
    if axis in ("+z", "-z"):
        return trimesh.transformations.rotation_matrix(0.0 if axis == "+z" else math.pi, [1.0, 0.0, 0.0])
    direction = np.zeros(3)
    direction["xyz".index(axis[1])] = 1.0 if axis[0] == "+" else -1.0
    # A quarter turn about direction x z (trimesh's align_vectors adds an arbitrary twist here).
    return trimesh.transformations.rotation_matrix(math.pi / 2, np.cross(direction, [0.0, 0.0, 1.0]))


def normalize(scene: trimesh.Scene, object_size: float) -> trimesh.Scene:
    """Centres the bounding box at the origin and scales its longest side to `object_size` (in place)."""
    if scene.is_empty or scene.bounds is None:
        raise AssetError("asset has no geometry")
    low, high = scene.bounds
    longest = float(np.max(high - low))
    if not np.isfinite(longest) or longest <= 0:
        raise AssetError(f"asset has degenerate bounds {low} .. {high}")
    transform = np.diag([object_size / longest] * 3 + [1.0])
    transform[:3, 3] = -(low + high) / 2 * (object_size / longest)
    scene.apply_transform(transform)
    return scene


def load_asset(spec: AssetSpec, object_size: float) -> trimesh.Scene:
    """The asset as a trimesh Scene: z-up, centred, longest side `object_size`. Raises AssetError."""
    try:
        if spec.source == "procedural":
            scene = procedural_object(spec.seed)
        elif spec.path.lower().endswith(".urdf"):
            scene = load_urdf(spec.path)
        else:
            scene = _load_mesh_file(spec.path)
        scene.apply_transform(up_axis_rotation(spec.up_axis))
        return normalize(scene, object_size)
    except AssetError:
        raise
    except Exception as error:  # trimesh raises many kinds of errors on broken files
        raise AssetError(f"{spec.object_id}: {type(error).__name__}: {error}") from error


def _load_mesh_file(path: str) -> trimesh.Scene:
    if not os.path.isfile(path):
        raise AssetError(f"mesh file not found: {path}")
    scene = trimesh.load(path, force="scene")
    if not any(isinstance(g, trimesh.Trimesh) and len(g.faces) for g in scene.geometry.values()):
        raise AssetError(f"no triangles in {path}")
    return scene


# --- URDF ---------------------------------------------------------------------------------------


def _floats(text: str | None, count: int, default: float) -> np.ndarray:
    values = [float(v) for v in (text or "").replace(",", " ").split()]  # some files separate by commas
    return np.array(values[:count] if values else [default] * count, np.float64)


def _origin_transform(element: ElementTree.Element | None) -> np.ndarray:
    """The 4x4 transform of a URDF <origin xyz rpy> (fixed-axis roll, pitch, yaw)."""
    origin = element.find("origin") if element is not None else None
    xyz = _floats(origin.get("xyz") if origin is not None else None, 3, 0.0)
    roll, pitch, yaw = _floats(origin.get("rpy") if origin is not None else None, 3, 0.0)
    transform = trimesh.transformations.euler_matrix(roll, pitch, yaw, axes="sxyz")
    transform[:3, 3] = xyz
    return transform


def _urdf_geometry(urdf_path: str, geometry: ElementTree.Element) -> trimesh.Scene | None:
    """The geometry of a URDF <visual>, or None for a primitive of zero size (it draws nothing)."""
    sizes = [float(geometry.get(key, 1.0)) for key in ("radius", "length")]
    if geometry.tag != "mesh" and min(sizes + list(_floats(geometry.get("size"), 3, 1.0))) <= 0:
        return None
    if geometry.tag == "mesh":
        scene = _load_mesh_file(_resolve_urdf_file(urdf_path, geometry.get("filename", "")))
        scene.apply_transform(np.diag(list(_floats(geometry.get("scale"), 3, 1.0)) + [1.0]))
        return scene
    if geometry.tag == "box":
        mesh = trimesh.creation.box(extents=_floats(geometry.get("size"), 3, 1.0))
    elif geometry.tag == "sphere":
        mesh = trimesh.creation.icosphere(subdivisions=3, radius=float(geometry.get("radius", 1.0)))
    elif geometry.tag == "cylinder":
        mesh = trimesh.creation.cylinder(radius=float(geometry.get("radius", 1.0)),
                                         height=float(geometry.get("length", 1.0)), sections=32)
    elif geometry.tag == "capsule":
        mesh = trimesh.creation.capsule(radius=float(geometry.get("radius", 1.0)),
                                        height=float(geometry.get("length", 1.0)), count=[32, 16])
    else:
        raise AssetError(f"unsupported URDF geometry <{geometry.tag}> in {urdf_path}")
    return trimesh.Scene(mesh)


def _has_image_texture(mesh: trimesh.Trimesh) -> bool:
    material = getattr(mesh.visual, "material", None)
    return isinstance(mesh.visual, trimesh.visual.TextureVisuals) and mesh.visual.uv is not None and (
        getattr(material, "image", None) is not None or getattr(material, "baseColorTexture", None) is not None)


def load_urdf(path: str) -> trimesh.Scene:
    """A URDF's visuals as one scene: links placed at zero joint angles, URDF colours on untextured meshes."""
    robot = ElementTree.parse(path).getroot()
    named_colours = {m.get("name"): m.find("color").get("rgba") for m in robot.findall("material")
                     if m.find("color") is not None}
    links = {link.get("name"): link for link in robot.findall("link")}
    parent_of = {}
    for joint in robot.findall("joint"):
        child, parent = joint.find("child"), joint.find("parent")
        if child is not None and parent is not None:
            parent_of[child.get("link")] = (parent.get("link"), _origin_transform(joint))

    def link_pose(name: str, depth: int = 0) -> np.ndarray:
        if name not in parent_of:
            return np.eye(4)
        if depth > len(links):
            raise AssetError(f"joint cycle in {path}")
        parent, joint_origin = parent_of[name]
        return link_pose(parent, depth + 1) @ joint_origin

    scene = trimesh.Scene()
    for name, link in links.items():
        for visual in link.findall("visual"):
            geometry = visual.find("geometry")
            if geometry is None or len(geometry) == 0:
                continue
            part = _urdf_geometry(path, geometry[0])
            if part is None:
                continue
            material = visual.find("material")
            rgba = None
            if material is not None:
                colour = material.find("color")
                rgba = colour.get("rgba") if colour is not None else named_colours.get(material.get("name"))
            transform = link_pose(name) @ _origin_transform(visual)
            for mesh in part.dump(concatenate=False):
                if rgba is not None and not _has_image_texture(mesh):
                    mesh.visual = trimesh.visual.ColorVisuals(
                        mesh, face_colors=np.clip(np.round(_floats(rgba, 4, 1.0) * 255), 0, 255).astype(np.uint8))
                scene.add_geometry(mesh, transform=transform)
    if scene.is_empty:
        raise AssetError(f"no visual geometry in {path}")
    return scene


# --- Procedural objects -------------------------------------------------------------------------

_PRIMITIVES = ("box", "sphere", "ellipsoid", "cylinder", "cone", "capsule", "torus", "tube")
_PATTERNS = ("flat", "checker", "stripes", "noise", "dots", "gradient")  # flat: face colours, no texture
_TEXTURE_SIZE = 128


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.25, 0.95), rng.uniform(0.45, 1.0))
    return np.round(np.array(rgb) * 255).astype(np.uint8)


def _primitive(kind: str, rng: np.random.Generator) -> trimesh.Trimesh:
    size = rng.uniform(0.3, 1.0, size=3)
    if kind == "box":
        return trimesh.creation.box(extents=size)
    if kind == "sphere":
        return trimesh.creation.icosphere(subdivisions=3, radius=size[0] / 2)
    if kind == "ellipsoid":
        mesh = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
        mesh.apply_scale(size)
        return mesh
    if kind == "cylinder":
        return trimesh.creation.cylinder(radius=size[0] / 2, height=size[2], sections=32)
    if kind == "cone":
        return trimesh.creation.cone(radius=size[0] / 2, height=size[2], sections=32)
    if kind == "capsule":
        return trimesh.creation.capsule(radius=size[0] / 3, height=size[2], count=[32, 16])
    if kind == "torus":
        major = size[0] / 2
        return trimesh.creation.torus(major, major * rng.uniform(0.15, 0.45), major_sections=48, minor_sections=16)
    if kind == "tube":
        outer = size[0] / 2
        return trimesh.creation.annulus(r_min=outer * rng.uniform(0.5, 0.85), r_max=outer, height=size[2], sections=32)
    raise ValueError(f"unknown primitive {kind!r}")


def procedural_texture(pattern: str, first: np.ndarray, second: np.ndarray, rng: np.random.Generator,
                       size: int = _TEXTURE_SIZE) -> np.ndarray:
    """A (size, size, 3) uint8 texture with the given pattern of RGB colours `first` and `second`
    (the background and the dots of `dots`) and random frequencies."""
    y, x = np.meshgrid((np.arange(size) + 0.5) / size, (np.arange(size) + 0.5) / size, indexing="ij")
    if pattern == "checker":
        cells = rng.integers(2, 9)
        mix = ((np.floor(x * cells) + np.floor(y * cells)) % 2).astype(np.float64)
    elif pattern == "stripes":
        angle, count = rng.uniform(0, math.pi), rng.integers(3, 12)
        mix = (np.sin(2 * math.pi * count * (x * math.cos(angle) + y * math.sin(angle))) > 0).astype(np.float64)
    elif pattern == "noise":
        # Value noise: random grids at three octaves, bicubically upsampled and summed.
        mix = np.zeros_like(x)
        for octave, cells in enumerate((4, 8, 16)):
            grid = Image.fromarray(rng.uniform(0, 255, size=(cells, cells)).astype(np.uint8))
            mix += np.asarray(grid.resize((size, size), Image.Resampling.BICUBIC), np.float64) / 255 * 0.5 ** octave
        mix = np.clip((mix - mix.min()) / max(np.ptp(mix), 1e-6), 0.0, 1.0)
    elif pattern == "dots":
        cells, radius = rng.integers(3, 9), rng.uniform(0.15, 0.4)
        mix = (np.hypot(x * cells % 1 - 0.5, y * cells % 1 - 0.5) < radius).astype(np.float64)
    elif pattern == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        mix = np.clip(0.5 + (x - 0.5) * math.cos(angle) + (y - 0.5) * math.sin(angle), 0.0, 1.0)
    else:
        raise ValueError(f"unknown texture pattern {pattern!r}")
    texture = first * (1.0 - mix[..., None]) + second * mix[..., None]
    return np.round(texture).astype(np.uint8)


def box_projected_uv(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """A copy with one vertex per face corner and UVs projected along each face's dominant normal axis.

    The two other coordinates, rescaled by the mesh's bounding box, give UVs in [0, 1]: no
    wrapping is needed and the texture keeps its scale on every side.
    """
    corners = mesh.vertices[mesh.faces]  # (F, 3, 3)
    dominant = np.argmax(np.abs(mesh.face_normals), axis=-1)
    low, extent = mesh.bounds[0], np.maximum(mesh.extents, 1e-9)
    unit = (corners - low) / extent
    other_axes = np.array([[1, 2], [0, 2], [0, 1]])[dominant]  # (F, 2)
    uv = np.take_along_axis(unit, np.repeat(other_axes[:, None, :], 3, axis=1), axis=-1)
    num_faces = len(mesh.faces)
    return trimesh.Trimesh(corners.reshape(-1, 3), np.arange(3 * num_faces).reshape(num_faces, 3),
                           visual=trimesh.visual.TextureVisuals(uv=uv.reshape(-1, 2)), process=False)


@dataclasses.dataclass(frozen=True)
class ProceduralPart:
    """What one primitive of a procedural object looks like: the words of its caption."""

    kind: str  # one of _PRIMITIVES
    pattern: str  # one of _PATTERNS
    colours: tuple[tuple[int, int, int], ...]  # RGB 0-255: one for "flat", else the texture's two
    size: float  # longest side of its bounding box, before the object is normalised


def _procedural_parts(seed: int) -> list[tuple[trimesh.Trimesh, np.ndarray, ProceduralPart]]:
    """Each part of procedural object `seed`: (mesh, transform in the object, description)."""
    rng = np.random.default_rng(seed)
    parts = []
    placed_vertices = []  # world-space vertices of the parts so far
    for _ in range(int(rng.integers(1, 5))):
        kind = str(rng.choice(_PRIMITIVES))
        mesh = _primitive(kind, rng)
        size = float(np.max(mesh.extents))
        pattern = str(rng.choice(_PATTERNS))
        if pattern == "flat":
            colours = (_random_colour(rng),)
            mesh.visual = trimesh.visual.ColorVisuals(mesh, face_colors=colours[0])
        else:
            colours = (_random_colour(rng), _random_colour(rng))
            mesh = box_projected_uv(mesh)
            mesh.visual = trimesh.visual.TextureVisuals(
                uv=mesh.visual.uv, image=Image.fromarray(procedural_texture(pattern, *colours, rng)))
        transform = trimesh.transformations.random_rotation_matrix(rng.uniform(size=3))
        if placed_vertices:
            # Attach to an earlier part: the point 70% of the way from this part's origin to one of
            # its vertices lands on a vertex of an earlier part, so the two overlap.
            anchor = placed_vertices[int(rng.integers(len(placed_vertices)))]
            own_vertex = trimesh.transform_points(mesh.vertices, transform)[int(rng.integers(len(mesh.vertices)))]
            transform[:3, 3] = anchor - 0.7 * own_vertex
        placed_vertices.extend(trimesh.transform_points(mesh.vertices, transform))
        description = ProceduralPart(kind, pattern, tuple(tuple(int(c) for c in colour) for colour in colours), size)
        parts.append((mesh, transform, description))
    return parts


def procedural_object(seed: int) -> trimesh.Scene:
    """A random compound of primitives with colours and textures; a pure function of `seed`."""
    scene = trimesh.Scene()
    for mesh, transform, _ in _procedural_parts(seed):
        scene.add_geometry(mesh, transform=transform)
    return scene


def procedural_parts(seed: int) -> list[ProceduralPart]:
    """The descriptions of the parts of `procedural_object(seed)`, in the order they were made."""
    return [description for _, _, description in _procedural_parts(seed)]
