"""FlexiView3D's image to 3D (`infer --config=configs/infer.py:flexiview`, inference/flexiview.py).

The chain runs on the session's barely trained FlexRM micro (conftest `flexrm_run`) and
multi-view diffusion tiny (conftest `mvdiffusion_checkpoint`) runs: these tests check the
plumbing (candidates, their cameras and scores, the choice, the Gaussians and their files), not
the quality of either model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import MVDIFFUSION_FRAMES, run_cli
from PIL import Image

from vfusion3d_jax import cameras
from vfusion3d_jax.configs import load_config
from vfusion3d_jax.data import pipeline
from vfusion3d_jax.inference import flexiview, media
from vfusion3d_jax.inference.ply import read_gaussians_ply
from vfusion3d_jax.models import flexrm

# The modules that use the session's FlexRM micro run (conftest `flexrm_run`) share a test worker,
# so the run is trained once.
pytestmark = pytest.mark.xdist_group("flexrm_run")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder with a red disc (RGBA) and a file that is not an image."""
    root = tmp_path_factory.mktemp("images")
    yy, xx = np.mgrid[:64, :64]
    disc = (xx - 30) ** 2 + (yy - 34) ** 2 < 18**2
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[disc] = (200, 30, 40, 255)
    Image.fromarray(rgba).save(root / "disc.png")
    (root / "broken.png").write_bytes(b"not a png")
    return root


def test_orbit_cameras_give_the_input_the_training_reference_camera():
    """Frame 0 of a candidate orbit is where the pipeline puts every source view (the canonical
    pose at the orbit's radius); the others turn around the object's (canonical) up axis."""
    config = load_config("infer.py:flexiview")
    source, render = flexiview.job_orbit_cameras(4, config)
    focal = cameras.fov_to_focal(config.fov_deg)
    intrinsics = cameras.intrinsics_matrix(focal, focal, 0.5, 0.5)
    tilted = cameras.orbit_cam2world(np.array([0.0, 90.0]), config.input_elevation_deg, config.radius)
    expected = pipeline.canonicalize_to_source(tilted, tilted[0])
    np.testing.assert_allclose(source[0], cameras.source_camera(expected[0], intrinsics), atol=1e-5)
    np.testing.assert_allclose(render[1], cameras.render_camera(expected[1], intrinsics), atol=1e-5)
    reference = cameras.CANONICAL_SOURCE_CAM2WORLD.astype(np.float64).copy()
    reference[:3, 3] *= config.radius
    np.testing.assert_allclose(source[0], cameras.source_camera(reference, intrinsics), atol=1e-5)
    distances = np.linalg.norm(cameras.split_render_camera(render)[0][:, :3, 3], axis=-1)
    np.testing.assert_allclose(distances, config.radius, rtol=1e-5)


def test_patch_foreground_marks_the_patches_that_show_the_object():
    view = np.ones((1, 28, 28, 3), np.float32)
    view[0, 3:5, 16:18] = 0.2  # inside patch (row 0, column 2) of a 4 x 4 grid of 7 px patches
    foreground = flexiview.patch_foreground(view, 7)
    assert foreground.shape == (1, 16) and np.nonzero(foreground[0])[0].tolist() == [2]


def test_cli_reconstructs_an_image_from_it_and_chosen_generated_views(flexrm_run, mvdiffusion_checkpoint, images,
                                                                       tmp_path):
    workdir = tmp_path / "out"
    result = run_cli("infer", "--config=configs/infer.py:flexiview", f"--checkpoint={flexrm_run[1]}",
                     f"--config.diffusion_checkpoint={mvdiffusion_checkpoint}", f"--inputs={images}",
                     f"--workdir={workdir}", "--config.num_views=3", "--config.num_candidate_orbits=2",
                     "--config.render_size=32", "--config.num_frames=4", "--config.preview_views=2")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert [item["name"] for item in summary["processed"]] == ["disc"]
    assert [item["input"].endswith("broken.png") for item in summary["skipped"]] == [True]
    item = summary["processed"][0]
    # Every frame but the input of each of the 2 orbits is a candidate; 2 are chosen (3 views).
    candidates = item["candidates"]
    assert len(candidates) == 2 * (MVDIFFUSION_FRAMES - 1)
    assert sorted((c["orbit"], c["frame"]) for c in candidates) == [
        (o, f) for o in range(2) for f in range(1, MVDIFFUSION_FRAMES)]
    assert all(0.0 <= c["consistency"] <= 1.0 and c["matches"] >= 0 for c in candidates)
    chosen = [c for c in candidates if c["chosen"]]
    assert item["num_views"] == 3 and len(chosen) == 2
    assert len({c["azimuth_deg"] for c in chosen}) == 2  # coverage: two different directions
    # The Gaussians: FlexRM micro's count, finite, in the file a 3DGS viewer reads.
    config = load_config("flexrm.py:micro")
    gaussians = read_gaussians_ply(workdir / "disc" / "gaussians.ply")
    assert item["gaussians"] == gaussians.count == flexrm.gaussian_count(config.model)
    assert np.all(np.isfinite(gaussians.means)) and np.all((gaussians.opacities > 0) & (gaussians.opacities < 1))
    assert media.count_video_frames(workdir / "disc" / "turntable.mp4") == 4
    selected = np.asarray(Image.open(workdir / "disc" / "selected.png"))
    size = config.view_resolution
    assert selected.shape[:2] == (size, 3 * size + 2 * 2)  # 3 views side by side, 2 px apart
    assert (workdir / "disc" / "candidates.png").exists() and (workdir / "disc" / "views.png").exists()
    assert "disc: 3 views" in result.stdout


def test_one_view_needs_no_diffusion_model(flexrm_run, images, tmp_path):
    config = load_config("infer.py:flexiview", num_views=1, render_size=32, num_frames=2, preview_views=2)
    summary = flexiview.infer_flexiview(str(flexrm_run[1]), images / "disc.png", tmp_path, config)
    item = summary["processed"][0]
    assert item["num_views"] == 1 and item["candidates"] == []
    assert not (tmp_path / "disc" / "candidates.png").exists()
    assert (tmp_path / "disc" / "gaussians.ply").exists()


def test_errors_are_one_line(flexrm_run, mvdiffusion_checkpoint, images, tmp_path):
    # A diffusion run is not a FlexRM.
    result = run_cli("infer", "--config=configs/infer.py:flexiview", f"--checkpoint={mvdiffusion_checkpoint}",
                     "--config.num_views=1", f"--inputs={images}", f"--workdir={tmp_path / 'a'}")
    assert result.returncode != 0 and "not FlexRM" in result.stderr and "Traceback" not in result.stderr
    # Generated views need a diffusion model.
    result = run_cli("infer", "--config=configs/infer.py:flexiview", f"--checkpoint={flexrm_run[1]}",
                     f"--inputs={images}", f"--workdir={tmp_path / 'b'}")
    assert result.returncode != 0 and "diffusion_checkpoint" in result.stderr and "Traceback" not in result.stderr
