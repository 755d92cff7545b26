"""Orbits from images and captions for real: rendered orbits on disk → `train` → a checkpoint on
disk → `sample` → videos, sheets and frames on disk.

A very small `configs/mvdiffusion.py:tiny` (4 frames of 16 px, 2 blocks, 2 sampling steps) trains
for 3 steps through the `train` command once per session (conftest `mvdiffusion_checkpoint`); `sample` then runs once through its
command line, and the other cases share one `OrbitSampler` (one compile) through `sample.sample`.
The model is barely trained, so the tests check the plumbing (files, frames, seeds, the input
view, the image condition dropped), not the orbits' quality.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import MVDIFFUSION_FRAMES, MVDIFFUSION_RESOLUTION, run_cli
from PIL import Image

from vfusion3d_jax import cameras, errors
from vfusion3d_jax.configs import load_config
from vfusion3d_jax.data import clips
from vfusion3d_jax.inference import media, preprocess, sample
from vfusion3d_jax.models import convert
from vfusion3d_jax.visualize import to_uint8

NUM_FRAMES, RESOLUTION, BORDER_RATIO = MVDIFFUSION_FRAMES, MVDIFFUSION_RESOLUTION, 0.55
PROMPT = "a red torus"


@pytest.fixture(scope="module")
def checkpoint(mvdiffusion_checkpoint) -> str:
    return mvdiffusion_checkpoint


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A folder of two images (a cut-out with alpha, a photo on a plain background) and one unreadable file."""
    folder = tmp_path_factory.mktemp("inputs")
    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[10:30, 20:45] = (200, 60, 30, 255)
    Image.fromarray(rgba).save(folder / "cutout.png")
    photo = np.full((50, 50, 3), 235, np.uint8)
    photo[12:40, 15:35] = (30, 90, 200)
    Image.fromarray(photo).save(folder / "photo.jpg")
    (folder / "notes.jpg").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def sampler(checkpoint):
    """One compiled sampler for the in-process cases (two inputs per call)."""
    return sample.OrbitSampler.from_checkpoint(checkpoint, load_config("sample.py", batch_size=2))


def _frames(out_dir) -> np.ndarray:
    return np.stack([np.asarray(Image.open(out_dir / sample.FRAMES_DIR / f"{i:03d}.png")) for i in range(NUM_FRAMES)])


def test_orbit_poses_are_those_of_a_clip_cut_from_a_rendered_orbit():
    orbit = cameras.orbit_cam2world(cameras.orbit_azimuths(NUM_FRAMES, 30.0), 20.0, 1.5)
    np.testing.assert_allclose(sample.orbit_relative_pose(NUM_FRAMES, 20.0), clips.relative_pose(orbit), atol=1e-4)


def test_cli_writes_each_orbit_and_skips_the_unreadable_file(checkpoint, inputs, tmp_path):
    out = tmp_path / "out"
    result = run_cli("sample", f"--checkpoint={checkpoint}", f"--inputs={inputs}", f"--prompt={PROMPT}",
                  f"--workdir={out}", "--config.elevation_deg=20", "--config.sample.seed=3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 orbits sampled, 1 skipped" in result.stdout

    summary = json.loads((out / sample.SUMMARY_FILE).read_text())
    assert [item["name"] for item in summary["processed"]] == ["cutout", "photo"]
    assert [(os.path.basename(item["input"]), item["reason"]) for item in summary["skipped"]] == [
        ("notes.jpg", "not an image (unrecognised format)")]
    assert summary["step"] == 3 and summary["prompt"] == PROMPT and summary["elevation_deg"] == 20.0
    assert summary["sampling"]["seed"] == 3 and summary["sampling"]["num_steps"] == 2  # the job's, the checkpoint's
    assert (summary["num_frames"], summary["resolution"]) == (NUM_FRAMES, RESOLUTION)

    for name, file in (("cutout", "cutout.png"), ("photo", "photo.jpg")):
        folder = out / name
        assert media.count_video_frames(folder / "orbit.mp4") == NUM_FRAMES
        assert media.count_video_frames(folder / "orbit.gif") == NUM_FRAMES
        frames = _frames(folder)
        assert frames.shape == (NUM_FRAMES, RESOLUTION, RESOLUTION, 3)
        prepared = preprocess.prepare_image(inputs / file, RESOLUTION, border_ratio=BORDER_RATIO)
        np.testing.assert_array_equal(frames[0], to_uint8(prepared.image))  # the input view is frame 0
        sheet = np.asarray(Image.open(folder / "sheet.png"))
        assert sheet.shape == (RESOLUTION, NUM_FRAMES * RESOLUTION + (NUM_FRAMES - 1) * 2, 3)
        np.testing.assert_array_equal(sheet[:, :RESOLUTION], frames[0])  # input first


def test_same_seed_same_orbits_another_seed_others(sampler, inputs, tmp_path):
    def run(name, seed, files=None):
        config = load_config("sample.py", sample__seed=seed)
        chosen = inputs if files is None else [inputs / file for file in files]
        summary = sample.sample("checkpoint", chosen, PROMPT, tmp_path / name, config, sampler=sampler)
        return {item["name"]: _frames(tmp_path / name / item["name"]) for item in summary["processed"]}

    first, again, other = run("first", 0), run("again", 0), run("other", 1)
    for name in ("cutout", "photo"):
        np.testing.assert_array_equal(first[name], again[name])
        assert np.array_equal(first[name][0], other[name][0])  # the input view
        assert not np.array_equal(first[name][1:], other[name][1:])
    # An orbit does not depend on the other inputs of its batch.
    alone = run("alone", 0, ["photo.jpg"])
    assert np.abs(alone["photo"].astype(int) - first["photo"].astype(int)).max() <= 1


def test_text_only_orbits_drop_the_image(sampler, tmp_path):
    summary = sample.sample("checkpoint", None, PROMPT, tmp_path, load_config("sample.py"), sampler=sampler)
    assert [(item["input"], item["name"]) for item in summary["processed"]] == [(None, "a_red_torus")]
    assert media.count_video_frames(tmp_path / "a_red_torus" / "orbit.mp4") == NUM_FRAMES
    assert _frames(tmp_path / "a_red_torus").shape == (NUM_FRAMES, RESOLUTION, RESOLUTION, 3)

    # Without the image condition, the image given makes no difference to any frame.
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(2, RESOLUTION, RESOLUTION, 3)).astype(np.float32)
    pose = sample.orbit_relative_pose(NUM_FRAMES, 0.0)
    caption = sampler.caption(PROMPT)
    dropped = [sampler.sample(images[i:i + 1], np.array([False]), pose, caption, seed=0) for i in range(2)]
    np.testing.assert_array_equal(dropped[0], dropped[1])
    kept = sampler.sample(images, np.array([True, True]), pose, caption, seed=0)
    np.testing.assert_allclose(kept[:, 0], images, atol=1e-6)
    assert not np.allclose(kept[0, 1:], dropped[0][0, 1:])


def test_nothing_to_condition_on_is_a_usage_error(sampler, tmp_path):
    with pytest.raises(errors.UsageError, match="--prompt"):
        sample.sample("checkpoint", None, "", tmp_path, load_config("sample.py"), sampler=sampler)


def test_an_lrm_checkpoint_is_refused(tmp_path):
    convert.save_checkpoint(tmp_path, {"weights": np.zeros(1, np.float32)}, load_config("lrm.py:fixture"))
    with pytest.raises(errors.InvalidCheckpointError, match="not a multi-view diffusion model"):
        sample.load_orbit_model(tmp_path)


@pytest.mark.parametrize("field, value", [("num_steps", 0), ("init_strength", 0.0), ("init_strength", 1.5),
                                          ("sampler", "ddim"), ("guidance_interval", (0.8, 0.3)),
                                          ("guidance_interval", (0.0, 1.5))])
def test_sampler_settings_out_of_range_are_config_errors(field, value):
    checkpoint_config = load_config("mvdiffusion.py:tiny")
    job = load_config("sample.py")
    job.sample[field] = value
    with pytest.raises(errors.InvalidConfigValueError, match=field):
        sample.sampling_config(checkpoint_config, job)
    job.sample[field] = None  # the checkpoint's own settings are valid
    assert sample.sampling_config(checkpoint_config, job).sample.init_strength == 1.0
