"""The synthetic-data engine for real: a trained checkpoint on disk → `generate` → synthetic orbit
TFRecords → the data contract's readers and the Grain pipeline.

Inputs of all three kinds: an image pool of single-view orbit records (`render-data`), a folder
of images with an unreadable file, a prompts file with an empty line. The model is the barely
trained session checkpoint (conftest `mvdiffusion_checkpoint`), so the tests check the engine
(files, ids, cameras, metadata, determinism, resume, skips), not the orbits' quality.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from conftest import MVDIFFUSION_FRAMES, MVDIFFUSION_RESOLUTION, run_cli
from PIL import Image

from vfusion3d_jax import cameras, errors
from vfusion3d_jax.configs import load_config
from vfusion3d_jax.data import clips, example, pipeline, tfrecord
from vfusion3d_jax.data.render_assets import render_dataset
from vfusion3d_jax.inference import generate, sample

POOL_OBJECTS = 3


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """Paths of the three kinds of input: `orbits` (glob), `images` (folder), `prompts` (file)."""
    root = tmp_path_factory.mktemp("inputs")
    pool = load_config("data.py:image_pool", num_procedural=POOL_OBJECTS, resolution=24, supersample=1,
                       num_workers=1)
    render_dataset(pool, str(root / "pool"), [])
    images = root / "images"
    images.mkdir()
    rgba = np.zeros((30, 40, 4), np.uint8)
    rgba[8:24, 10:30] = (40, 160, 60, 255)
    Image.fromarray(rgba).save(images / "green.png")
    (images / "broken.jpg").write_text("not an image")
    prompts = root / "prompts.txt"
    prompts.write_text("a red torus\n\n  a blue box  \n")
    return dict(orbits=str(root / "pool" / "shards" / "*.tfrecord"), images=str(images), prompts=str(prompts))


def _config(inputs: dict, **overrides):
    fields = dict(inputs__orbits=inputs["orbits"], inputs__images=inputs["images"], inputs__prompts=inputs["prompts"],
                  shard_size=2, batch_size=2, elevation_deg=15.0)
    fields.update(overrides)
    return load_config("generate.py:tiny", **fields)


@pytest.fixture(scope="module")
def sampler(mvdiffusion_checkpoint):
    """One compiled sampler (2 orbits per call) for the in-process runs."""
    return sample.OrbitSampler.from_checkpoint(mvdiffusion_checkpoint, load_config("generate.py:tiny", batch_size=2))


def _records(workdir) -> dict[str, bytes]:
    """Every record of a `generate` workdir's shards, by object id."""
    records = {}
    for path in sorted((workdir / generate.SHARD_DIR).glob("*.tfrecord")):
        for record in tfrecord.iterate_records(path):
            records[example.read_metadata(record).object_id] = record
    return records


def test_cli_writes_synthetic_orbits_in_the_data_contract(mvdiffusion_checkpoint, inputs, tmp_path):
    out = tmp_path / "synthetic"
    result = run_cli("generate", "--config=configs/generate.py:tiny", f"--checkpoint={mvdiffusion_checkpoint}",
                     f"--config.inputs.orbits={inputs['orbits']}", f"--config.inputs.images={inputs['images']}",
                     f"--config.inputs.prompts={inputs['prompts']}", "--config.shard_size=2",
                     "--config.elevation_deg=15", f"--workdir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    orbits = POOL_OBJECTS + 1 + 2  # the pool, the readable image, the two prompts
    # 7 inputs listed (the pool, two files, two prompts; the empty line is not one), 2 per shard.
    assert f"{orbits} synthetic orbits in 4 shard(s)" in result.stdout
    assert "2 input(s) skipped" in result.stdout

    summary = json.loads((out / generate.SUMMARY_FILE).read_text())
    assert summary["inputs_by_kind"] == dict(image=2, orbit=POOL_OBJECTS, prompt=2)
    assert sorted(os.path.basename(item["input"]) for item in summary["skipped_inputs"]) == [
        "broken.jpg", "prompts.txt:2"]
    assert summary["generation"]["model_step"] == 3 and summary["orbits_per_second"] > 0
    assert sorted(path.name for path in (out / "shards").glob("*.tfrecord")) == [
        f"synthetic-0000{i}-of-00004.tfrecord" for i in range(4)]

    records = _records(out)
    pool = {example.read_metadata(r).object_id: r
            for path in pipeline.expand_paths(inputs["orbits"]) for r in tfrecord.iterate_records(path)}
    assert set(records) == ({f"synthetic/orbit/{object_id}" for object_id in pool}
                            | {"synthetic/image/green", "synthetic/prompt/prompt-00001", "synthetic/prompt/prompt-00003"})
    for object_id, record in records.items():
        orbit = example.decode_orbit(record)
        generation = example.read_generation(record)
        assert orbit["source"] == "synthetic" and np.isnan(orbit["quality"])
        assert orbit["images"].shape == (MVDIFFUSION_FRAMES, MVDIFFUSION_RESOLUTION, MVDIFFUSION_RESOLUTION, 4)
        assert generation["model_step"] == 3 and generation["sampler"]["num_steps"] == 2
        assert set(np.unique(orbit["images"][..., 3])) <= {0, 255}  # estimated from the white background
        # Cameras: an orbit around the origin at the record's elevation, 360/F degrees apart.
        pose = clips.relative_pose(orbit["cam2world"])
        np.testing.assert_allclose(pose[:, 0], 360.0 * np.arange(MVDIFFUSION_FRAMES) / MVDIFFUSION_FRAMES, atol=1e-3)
        np.testing.assert_allclose(pose[:, 1], orbit["elevation_deg"], atol=1e-3)
        kind = generation["condition"]["kind"]
        if kind == "orbit":  # starts at the input view: its angles, caption and pixels
            source = example.decode_orbit(pool[generation["condition"]["id"]])
            assert orbit["caption"] == source["caption"] != ""
            assert orbit["elevation_deg"] == pytest.approx(source["elevation_deg"])
            np.testing.assert_allclose(orbit["cam2world"][0], source["cam2world"][0], atol=1e-5)
            view, _ = pipeline.composite_on_white(pipeline.resize_rgba(source["images"][0], MVDIFFUSION_RESOLUTION))
            frame, _ = pipeline.composite_on_white(orbit["images"][:1])
            assert np.abs(frame[0] - view)[orbit["images"][0, ..., 3] > 0].max() <= 1 / 255 + 1e-6
        else:
            assert orbit["elevation_deg"] == pytest.approx(15.0)
            assert orbit["azimuth_deg"][0] == pytest.approx(0.0, abs=1e-3)
    assert [example.decode_orbit(records[f"synthetic/prompt/prompt-0000{line}"])["caption"] for line in (1, 3)] == [
        "a red torus", "a blue box"]
    assert example.decode_orbit(records["synthetic/image/green"])["caption"] == ""  # images carry none

    # The pipeline takes them unchanged: clips for the diffusion model, views for the LRM.
    config = load_config("mvdiffusion.py:tiny", data_dir=str(out), data__num_frames=MVDIFFUSION_FRAMES,
                         data__clip_stride=1, data__clip_resolution=MVDIFFUSION_RESOLUTION, data__batch_size=2)
    config.data.mixture.rendered.glob = str(out / "shards" / "synthetic-*.tfrecord")
    batch = next(pipeline.make_iterator(config.data))
    assert batch["clip_images"].shape == (2, MVDIFFUSION_FRAMES, MVDIFFUSION_RESOLUTION, MVDIFFUSION_RESOLUTION, 3)
    assert np.all(batch["is_synthetic"] == 1.0)


def test_deterministic_resumable_and_independent_of_batching(sampler, inputs, tmp_path):
    config = _config(inputs)
    first = generate.generate("ckpt", tmp_path / "first", config, sampler=sampler)
    assert first["shards_generated_now"] == 4 and first["skipped"] == 2
    shards = sorted((tmp_path / "first" / "shards").glob("*.tfrecord"))
    original = {path.name: path.read_bytes() for path in shards}
    mtimes = {path.name: os.stat(path).st_mtime_ns for path in shards}

    # A killed run: one shard gone, a partial temporary file in its place.
    shards[1].unlink()
    (shards[1].parent / f".{shards[1].name}.tmp-deadbeef").write_bytes(b"partial")
    resumed = generate.generate("ckpt", tmp_path / "first", config, sampler=sampler)
    assert resumed["shards_generated_now"] == 1 and resumed["orbits"] == first["orbits"]
    assert not list(shards[1].parent.glob(".*.tmp-*"))
    for path in shards:
        assert path.read_bytes() == original[path.name]  # the redone shard is the same, byte for byte
        if path != shards[1]:
            assert os.stat(path).st_mtime_ns == mtimes[path.name]  # the others were left alone

    # Shards of another size batch the orbits differently; each orbit stays the same.
    regrouped = generate.generate("ckpt", tmp_path / "regrouped", _config(inputs, shard_size=5), sampler=sampler)
    assert regrouped["shards"] == 2
    a, b = _records(tmp_path / "first"), _records(tmp_path / "regrouped")
    assert set(a) == set(b)
    for object_id in a:
        frames_a, frames_b = (example.decode_orbit(r[object_id])["images"].astype(int) for r in (a, b))
        assert np.abs(frames_a - frames_b).max() <= 1, object_id  # at most a rounding step

    # Another seed, other orbits (frame 0 of an image input stays the input).
    other = generate.generate("ckpt", tmp_path / "other", _config(inputs, sample__seed=7), sampler=sampler)
    c = _records(tmp_path / "other")
    assert other["orbits"] == first["orbits"]
    green_a, green_c = (example.decode_orbit(r["synthetic/image/green"])["images"] for r in (a, c))
    np.testing.assert_array_equal(green_a[0], green_c[0])
    assert not np.array_equal(green_a[1:], green_c[1:])

    with pytest.raises(ValueError, match="other settings"):
        generate.generate("ckpt", tmp_path / "first", _config(inputs, elevation_deg=30.0), sampler=sampler)


def test_several_orbits_per_input_and_shards_per_process(sampler, inputs, tmp_path):
    config = _config(inputs, inputs__orbits=None, inputs__images=None, orbits_per_input=3)
    generate.generate("ckpt", tmp_path, config, sampler=sampler)
    records = _records(tmp_path)
    assert sorted(records) == [f"synthetic/prompt/prompt-{line:05d}#{copy}" for line in (1, 3) for copy in range(3)]
    copies = [example.decode_orbit(records[f"synthetic/prompt/prompt-00001#{copy}"])["images"] for copy in range(3)]
    assert not np.array_equal(copies[0], copies[1])  # each its own noise
    # Processes split the shards by a function of the list alone: each shard once, none left out.
    for count in (1, 2, 3):
        owned = [generate.own_shards(7, index, count) for index in range(count)]
        assert sorted(sum(owned, [])) == list(range(7))


def test_without_inputs_or_with_clashing_ids_it_says_so(sampler, inputs, tmp_path):
    with pytest.raises(errors.UsageError, match="generate needs inputs"):
        generate.generate("ckpt", tmp_path, load_config("generate.py:tiny"), sampler=sampler)
    (tmp_path / "copy").mkdir()
    for path in pipeline.expand_paths(inputs["orbits"]):
        shutil.copy(path, tmp_path / "copy")
    twice = f"{inputs['orbits']},{tmp_path / 'copy' / '*.tfrecord'}"
    with pytest.raises(errors.InvalidConfigValueError, match="same object ids"):
        generate.generate("ckpt", tmp_path / "twice", _config(inputs, inputs__orbits=twice), sampler=sampler)


def test_generation_cameras_are_those_of_a_rendered_orbit():
    config = load_config("generate.py:tiny")
    cam2world, intrinsics = generate.orbit_cameras(30.0, 20.0, 8, config)
    rendered = cameras.orbit_cam2world(cameras.orbit_azimuths(8, 30.0), 20.0, 1.5)
    np.testing.assert_allclose(cam2world, rendered, atol=1e-5)
    np.testing.assert_allclose(intrinsics[0], cameras.intrinsics_matrix(0.75, 0.75, 0.5, 0.5), atol=1e-6)
