"""Captions of rendered objects: the text of `object/caption`, made from what each asset is.

`render-data` captions every object it renders; the video diffusion model's text encoder
learns from them (`data.example` has the contract, `data.clips` the batch encoding).

* Procedural objects are described from their own parameters (`assets.procedural_parts`):
  each part's shape (box, sphere, ellipsoid, cylinder, cone, capsule, torus, tube), colour
  words and texture pattern, largest part first, parts much smaller than the largest marked
  "small", identical parts counted: "a red torus", "a pale blue and orange checkered box
  and a small green sphere", "two dark purple cones".
* pybullet_data objects are named by a table of what they are ("pybullet_data/duck_vhacd"
  -> "a duck", "kuka_iiwa/model" -> "a robot arm"), else by their file name.
* pybullet_data's random blobs take their URDF colour: "a dark green blob".
* User meshes are named by their file name: "chairs/OfficeChair_02.glb" -> "an office chair"
  (folder names when the file name says nothing, such as `model_normalized.obj`).

Colours are named from hue, saturation and value with a small fixed vocabulary (red, orange,
yellow, green, cyan, blue, purple, pink, brown, white, grey, black; "dark" and "pale"), so
the tiny text encoder sees each word many times.
"""

from __future__ import annotations

import colorsys
import os
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence

from vfusion3d_jax.data import assets

# (upper end of the hue range in degrees, name), in order; hue 0 is red.
_HUE_NAMES = ((12, "red"), (40, "orange"), (68, "yellow"), (160, "green"), (195, "cyan"), (255, "blue"),
              (290, "purple"), (340, "pink"), (360, "red"))
_SHAPE_PLURALS = {"box": "boxes", "torus": "tori"}
_COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
# How each texture pattern describes a part; `colours` is "red" or "red and blue".
_PATTERN_PHRASES = {
    "flat": "{colours} {shape}",
    "checker": "{colours} checkered {shape}",
    "stripes": "{colours} striped {shape}",
    "noise": "mottled {colours} {shape}",
    "dots": "{first} {shape} with {second} dots",
    "gradient": "{colours} gradient {shape}",
}
# A part whose bounding box is smaller than this fraction of the largest part's is "small".
_SMALL_PART = 0.6

# pybullet_data objects whose file names do not say what they are: (regex on the id after
# "pybullet_data/", caption), first match wins.
_PYBULLET_CAPTIONS = (
    (r"soccerball", "a soccer ball"),
    (r"teddy", "a teddy bear"),
    (r"jenga", "a jenga block"),
    (r"lego", "a lego brick"),
    (r"^tray/", "a tray"),
    (r"sphere2red", "a red sphere"),
    (r"racecar/meshes/cone", "a traffic cone"),
    (r"racecar/racecar", "a toy race car"),
    (r"bicycle", "a bicycle"),
    (r"r2d2", "an r2d2 robot"),
    (r"kuka_iiwa|franka_panda|xarm/xarm6", "a robot arm"),
    (r"gripper", "a robot gripper"),
    (r"xarm/", "a robot arm link"),
    (r"laikago/upper_leg", "a robot leg"),
    (r"^a1/|aliengo|laikago|mini_cheetah|quadruped/", "a four-legged robot"),
    (r"table_square", "a square table"),
)
# Words of file and folder names that say nothing about the object.
_NAME_NOISE = frozenset({
    "vhacd", "col", "mod", "textured", "texture", "zup", "yup", "lores", "hires", "lowpoly", "highpoly", "model",
    "models", "mesh", "meshes", "normalized", "scene", "untitled", "export", "final", "obj", "urdf", "asset",
})
_NAME_NOISE_PATTERN = re.compile(r"\d+|v\d+|lod\d+|[0-9a-f]{8,}")  # numbers, versions, hashes


def with_article(phrase: str) -> str:
    """"a red box", "an orange box": the article by the phrase's first letter."""
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def colour_name(rgb: Sequence[float]) -> str:
    """A colour's name from its RGB (0-255): a hue word, "dark"/"pale" variants, or white/grey/black."""
    hue, saturation, value = colorsys.rgb_to_hsv(*(float(c) / 255.0 for c in rgb))
    if value < 0.2:
        return "black"
    if saturation < 0.2:
        return "white" if value > 0.85 else "grey"
    name = next(name for upper, name in _HUE_NAMES if hue * 360.0 < upper)
    if value < 0.55:
        return "brown" if name == "orange" else f"dark {name}"
    if saturation < 0.4:
        return "pink" if name == "red" else f"pale {name}"
    return name


def _part_phrase(kind: str, pattern: str, colours: tuple[str, ...], small: bool, count: int) -> str:
    first, second = (colours * 2)[:2]
    shape = _SHAPE_PLURALS.get(kind, kind + "s") if count > 1 else kind
    phrase = _PATTERN_PHRASES[pattern].format(
        colours=first if first == second else f"{first} and {second}", first=first, second=second, shape=shape)
    phrase = f"small {phrase}" if small else phrase
    return f"{_COUNT_WORDS[count]} {phrase}" if count > 1 else with_article(phrase)


def procedural_caption(parts: Sequence[assets.ProceduralPart]) -> str:
    """The caption of a procedural object from its parts' descriptions (largest part first)."""
    largest = max(part.size for part in parts)
    # Parts that read the same are counted ("two red spheres"); the dict keeps the largest-first order.
    counts: dict[tuple, int] = {}
    for part in sorted(parts, key=lambda part: -part.size):
        small = len(parts) > 1 and part.size < _SMALL_PART * largest
        words = (part.kind, part.pattern, tuple(colour_name(colour) for colour in part.colours), small)
        counts[words] = counts.get(words, 0) + 1
    phrases = [_part_phrase(*words, count) for words, count in counts.items()]
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _name_words(component: str) -> list[str]:
    """The meaningful lower-case words of a file or folder name ("OfficeChair_02.glb" -> office, chair)."""
    stem = os.path.splitext(component)[0] if "." in component else component
    stem = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", stem)  # camelCase -> camel Case
    words = []
    for word in re.split(r"[^A-Za-z0-9]+", stem.lower()):
        word = re.sub(r"(?<=[a-z]{3})\d+$", "", word)  # "sphere2" -> "sphere", but "r2d2" stays
        if len(word) > 1 and word not in _NAME_NOISE and not _NAME_NOISE_PATTERN.fullmatch(word):
            words.append(word)
    return words


def name_caption(path: str) -> str:
    """"a duck" from "duck_vhacd": the words of the last path component that has any ("an object" if none)."""
    for component in reversed(path.replace(os.sep, "/").split("/")):
        words = _name_words(component)
        if words:
            return with_article(" ".join(words))
    return "an object"


def _urdf_colour(path: str) -> tuple[float, ...] | None:
    """The first <color rgba> of a URDF as RGB 0-255, None when it has none."""
    colour = ElementTree.parse(path).getroot().find(".//color")
    if colour is None or not colour.get("rgba"):
        return None
    return tuple(255.0 * float(value) for value in colour.get("rgba").split()[:3])


def asset_caption(spec: assets.AssetSpec) -> str:
    """The caption `render-data` writes for an asset (see the module docstring)."""
    if spec.source == "procedural":
        return procedural_caption(assets.procedural_parts(spec.seed))
    name = spec.object_id.partition("/")[2]
    if spec.source == "pybullet_blobs":
        colour = _urdf_colour(spec.path)
        return with_article(f"{colour_name(colour)} blob") if colour is not None else "a blob"
    if spec.source == "pybullet_objects":
        for pattern, caption in _PYBULLET_CAPTIONS:
            if re.search(pattern, name):
                return caption
    return name_caption(name)
