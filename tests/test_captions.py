"""Captions of rendered objects (`object/caption`): colour words, procedural objects described
from their own parts, assets named by what they are."""

import pytest

from vfusion3d_jax.data import assets, captions
from vfusion3d_jax.data.assets import ProceduralPart


@pytest.mark.parametrize("rgb, name", [
    ((255, 0, 0), "red"), ((255, 140, 0), "orange"), ((250, 230, 30), "yellow"), ((30, 200, 40), "green"),
    ((0, 220, 220), "cyan"), ((20, 40, 230), "blue"), ((140, 30, 220), "purple"), ((240, 40, 180), "pink"),
    ((255, 190, 200), "pink"), ((140, 70, 20), "brown"), ((20, 30, 110), "dark blue"), ((170, 200, 240), "pale blue"),
    ((255, 255, 255), "white"), ((128, 128, 128), "grey"), ((10, 10, 10), "black"),
])
def test_colour_names(rgb, name):
    assert captions.colour_name(rgb) == name


def test_procedural_caption_from_parts():
    def part(kind, *colours, pattern="flat", size=1.0):
        return ProceduralPart(kind, pattern, colours, size)

    red, blue, green, white = (230, 20, 20), (20, 40, 230), (30, 200, 40), (255, 255, 255)
    assert captions.procedural_caption([part("torus", red)]) == "a red torus"
    # Largest part first; one under 0.6 of its size is small.
    assert captions.procedural_caption([part("sphere", green, size=0.4), part("box", blue)]) == (
        "a blue box and a small green sphere")
    # Parts that read the same are counted.
    assert captions.procedural_caption([part("sphere", red), part("box", blue, size=0.9), part("sphere", red)]) == (
        "two red spheres and a blue box")
    assert captions.procedural_caption([part("box", red, blue, pattern="checker")]) == "a red and blue checkered box"
    assert captions.procedural_caption([part("cone", (255, 140, 0), white, pattern="dots")]) == (
        "an orange cone with white dots")
    assert captions.procedural_caption([part("ellipsoid", red, red, pattern="noise")]) == "a mottled red ellipsoid"


def test_real_procedural_objects_are_told_apart_by_their_captions():
    specs = assets.procedural_assets(40, seed=0)
    texts = [captions.asset_caption(spec) for spec in specs]
    assert len(set(texts)) == len(texts)
    for spec, text in zip(specs, texts):
        for part in assets.procedural_parts(spec.seed):
            assert part.kind in text or captions._SHAPE_PLURALS.get(part.kind, part.kind + "s") in text
    assert captions.asset_caption(specs[0]) == captions.asset_caption(specs[0])  # a pure function of the seed


def test_asset_names():
    by_name = {spec.object_id: spec for spec in assets.pybullet_objects()}
    assert captions.asset_caption(by_name["pybullet_data/duck_vhacd"]) == "a duck"
    assert captions.asset_caption(by_name["pybullet_data/soccerball"]) == "a soccer ball"
    assert captions.asset_caption(by_name["pybullet_data/kuka_iiwa/model"]) == "a robot arm"
    assert captions.asset_caption(by_name["pybullet_data/toys/shape_sorter"]) == "a shape sorter"
    assert captions.asset_caption(assets.pybullet_blobs()[0]) == "a blue blob"  # its URDF colour: 0.04 0.07 0.91
    assert captions.name_caption("chairs/OfficeChair_02.glb") == "an office chair"
    assert captions.name_caption("furniture/wooden_table/models/model_normalized.obj") == "a wooden table"
    assert captions.name_caption("teapot/0001.ply") == "a teapot"
    assert captions.name_caption("0001/1234.ply") == "an object"
