"""Orbit clips for the video diffusion model (`config.data.example = 'clip'`) on real renders:
frames are the orbit's views in order, cameras are relative to frame 0, captions travel as
bytes, the stream is seeded and resumable, and records without the optional features work."""

import numpy as np
import pytest
from tensorflow_datasets.proto import tf_example_pb2

from vfusion3d_jax import cameras
from vfusion3d_jax.configs import config_module, load_config
from vfusion3d_jax.data import clips, example, pipeline, tfrecord
from vfusion3d_jax.data.render_assets import render_dataset

common_config = config_module("common.py")

NUM_VIEWS, RESOLUTION = 8, 16
REQUIRED = ("views/image", "views/cam2world", "views/intrinsics", "object/id", "object/source",
            "meta/elevation_deg", "meta/quality")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """(shard glob, records by source index): 2 pybullet_data objects and 2 procedural ones, rendered
    by `render-data` at 16 px with 8 views."""
    root = tmp_path_factory.mktemp("orbits")
    config = load_config("data.py:tiny", assets="pybullet_objects,procedural", max_assets_per_source=2,
                         num_procedural=2, num_views=NUM_VIEWS, resolution=RESOLUTION, supersample=1,
                         num_surface_points=0, holdout_fraction=0.0, shard_size=2, num_workers=1)
    render_dataset(config, str(root), [])
    glob = str(root / "shards" / "train-*.tfrecord")
    source = pipeline.OrbitSource(glob)
    return glob, [source[i].data for i in range(len(source))]


@pytest.fixture(scope="module")
def minimal(rendered, tmp_path_factory):
    """The same records with only the contract's required features (no caption, azimuth, count, size)."""
    _, records = rendered
    path = tmp_path_factory.mktemp("minimal") / "minimal-00000-of-00001.tfrecord"
    with tfrecord.TFRecordWriter(path) as writer:
        for record in records:
            proto = tf_example_pb2.Example.FromString(record)
            for key in list(proto.features.feature):
                if key not in REQUIRED:
                    del proto.features.feature[key]
            writer.write(proto.SerializeToString())
    return str(path)


def _config(glob, **overrides):
    config = common_config.input_config()
    config.mixture.rendered.glob = glob
    config.update(dict(example="clip", num_frames=4, clip_resolution=RESOLUTION, batch_size=2, num_epochs=1,
                       read_threads=2, read_buffer_size=4))
    config.update(overrides)
    return config


def _batches(config):
    return list(pipeline.make_iterator(config, shard_index=0, shard_count=1))


def _examples(batches):
    """The batches split into examples (dicts of per-example arrays)."""
    return [{key: value[n] for key, value in batch.items()} for batch in batches
            for n in range(len(batch["record_index"]))]


class _FixedStart:
    """An rng stand-in whose start view is chosen by the test."""

    def __init__(self, start):
        self.start = start

    def integers(self, high):
        assert 0 <= self.start < high
        return self.start


def test_frames_are_the_orbit_views_in_order_with_captions(rendered):
    glob, records = rendered
    batches = _batches(_config(glob))
    batch = batches[0]
    assert batch["clip_images"].shape == (2, 4, RESOLUTION, RESOLUTION, 3) and batch["clip_images"].dtype == np.float32
    assert batch["clip_masks"].shape == (2, 4, RESOLUTION, RESOLUTION, 1)
    assert batch["clip_cameras"].shape == (2, 4, 25) and batch["clip_relative_pose"].shape == (2, 4, 3)
    assert batch["caption_bytes"].shape == (2, 48) and batch["caption_bytes"].dtype == np.uint8
    assert batch["caption_length"].dtype == np.int32 and batch["is_synthetic"].shape == (2,)
    examples = _examples(batches)
    assert sorted(e["record_index"] for e in examples) == list(range(len(records)))
    for clip in examples:
        orbit = example.decode_orbit(records[clip["record_index"]])
        views = clip["clip_view_indices"]
        # render-data stores views by increasing azimuth: every 8 // 4 = 2nd view from the start.
        np.testing.assert_array_equal(views, (views[0] + 2 * np.arange(4)) % NUM_VIEWS)
        rgba = orbit["images"][views].astype(np.float32) / 255.0
        np.testing.assert_allclose(clip["clip_masks"], rgba[..., 3:], atol=1e-6)
        np.testing.assert_allclose(clip["clip_images"], rgba[..., :3] * rgba[..., 3:] + 1.0 - rgba[..., 3:], atol=1e-6)
        # Azimuths step by 360 / 8 * 2 degrees; elevations are the orbit's.
        np.testing.assert_allclose(clip["clip_relative_pose"][:, 0], 90.0 * np.arange(4), atol=1e-3)
        np.testing.assert_allclose(clip["clip_relative_pose"][:, 1:], orbit["elevation_deg"], atol=1e-3)
        # The caption, zero-padded; render-data captions every object.
        length = clip["caption_length"]
        assert 0 < length <= 48 and not clip["caption_bytes"][length:].any()
        caption = bytes(clip["caption_bytes"][:length]).decode("utf-8")
        assert orbit["caption"].startswith(caption) and caption.startswith("a")


def test_cameras_are_canonical_at_frame_0_and_keep_the_relative_poses(rendered):
    glob, records = rendered
    for clip in _examples(_batches(_config(glob))):
        moved, intrinsics = cameras.split_render_camera(clip["clip_cameras"])
        canonical = cameras.CANONICAL_SOURCE_CAM2WORLD.astype(np.float64).copy()
        canonical[:3, 3] *= 1.5  # the orbit radius
        np.testing.assert_allclose(moved[0], canonical, atol=1e-5)
        stored = example.decode_orbit(records[clip["record_index"]], views=clip["clip_view_indices"])
        np.testing.assert_allclose(np.linalg.inv(moved[0]) @ moved, np.linalg.inv(stored["cam2world"][0])
                                   @ stored["cam2world"], atol=1e-5)
        np.testing.assert_allclose(intrinsics, stored["intrinsics"], atol=1e-6)
    # Without canonicalisation the cameras are the record's.
    for clip in _examples(_batches(_config(glob, canonicalize_cameras=False))):
        stored = example.decode_orbit(records[clip["record_index"]], views=clip["clip_view_indices"])
        np.testing.assert_allclose(clip["clip_cameras"][:, :16].reshape(-1, 4, 4), stored["cam2world"], atol=1e-6)


def test_views_wrap_around_in_azimuth_order_whatever_the_stored_order():
    azimuths = cameras.orbit_azimuths(NUM_VIEWS, offset_deg=10.0)
    cam2world = cameras.orbit_cam2world(azimuths, 20.0, 1.5)
    np.testing.assert_array_equal(clips.select_clip_views(_FixedStart(6), cam2world, 4), [6, 0, 2, 4])
    np.testing.assert_array_equal(clips.select_clip_views(_FixedStart(6), cam2world, 3, stride=1), [6, 7, 0])
    # Views stored out of order are still taken going around the orbit.
    shuffled = np.random.default_rng(0).permutation(NUM_VIEWS)
    views = clips.select_clip_views(_FixedStart(6), cam2world[shuffled], 4)
    steps = np.diff(np.concatenate([azimuths[shuffled][views], azimuths[shuffled][views[:1]] + 360.0])) % 360.0
    np.testing.assert_allclose(steps, 90.0, atol=1e-4)
    pose = clips.relative_pose(cam2world[shuffled][views])
    np.testing.assert_allclose(pose, np.stack([90.0 * np.arange(4), np.full(4, 20.0), np.full(4, 20.0)], -1),
                               atol=1e-4)
    with pytest.raises(ValueError, match="8 views cannot give 9 frames"):
        clips.select_clip_views(_FixedStart(0), cam2world, 9)
    with pytest.raises(ValueError, match="cannot give 3 frames 3 views apart"):
        clips.select_clip_views(_FixedStart(0), cam2world, 3, stride=3)


def test_consecutive_frames_with_clip_stride(rendered):
    glob, _ = rendered
    for clip in _examples(_batches(_config(glob, clip_stride=1))):
        views = clip["clip_view_indices"]
        np.testing.assert_array_equal(views, (views[0] + np.arange(4)) % NUM_VIEWS)
        np.testing.assert_allclose(clip["clip_relative_pose"][:, 0], 45.0 * np.arange(4), atol=1e-3)


def test_same_seed_same_clips_and_the_iterator_resumes(rendered):
    glob, _ = rendered
    config = _config(glob, num_epochs=None, batch_size=1)
    first, again = (pipeline.make_iterator(config, shard_index=0, shard_count=1) for _ in range(2))
    head = [next(first) for _ in range(3)]
    for want, got in zip(head, [next(again) for _ in range(3)]):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    state = first.get_state()
    expected = [next(first) for _ in range(6)]  # into the next epoch: other start views
    resumed = pipeline.make_iterator(config, shard_index=0, shard_count=1)
    resumed.set_state(state)
    for want, got in zip(expected, [next(resumed) for _ in range(6)]):
        assert want.keys() == got.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    other_seed = pipeline.make_iterator(_config(glob, num_epochs=None, batch_size=1, seed=1),
                                        shard_index=0, shard_count=1)
    assert not all(np.array_equal(a["clip_view_indices"], b["clip_view_indices"])
                   for a, b in zip(head, [next(other_seed) for _ in range(3)]))


def test_random_hue_turns_every_frame_of_a_clip_alike(rendered):
    glob, _ = rendered
    plain, turned = (_batches(_config(glob, random_hue=hue))[0] for hue in (False, True))
    for key in ("clip_view_indices", "clip_cameras", "clip_masks", "caption_bytes"):
        np.testing.assert_array_equal(turned[key], plain[key])
    opaque = plain["clip_masks"][..., 0] == 1.0
    assert np.abs(turned["clip_images"] - plain["clip_images"])[opaque].mean() > 0.02
    for n in range(2):
        # One colour rotation maps every frame of the clip (opaque pixels are linear in it, up to
        # uint8 rounding); frames turned by different angles would not fit one.
        before, after = plain["clip_images"][n][opaque[n]], turned["clip_images"][n][opaque[n]]
        rotation, *_ = np.linalg.lstsq(before, after, rcond=None)
        np.testing.assert_allclose(before @ rotation, after, atol=0.03)


def test_records_without_optional_features_give_the_same_clips_without_caption(rendered, minimal):
    glob, _ = rendered
    full, bare = _batches(_config(glob)), _batches(_config(minimal))
    for want, got in zip(full, bare, strict=True):
        for key in ("clip_images", "clip_masks", "clip_cameras", "clip_relative_pose", "clip_view_indices"):
            np.testing.assert_allclose(got[key], want[key], atol=1e-4, err_msg=key)
        np.testing.assert_array_equal(got["caption_length"], 0)
        np.testing.assert_array_equal(got["caption_bytes"], 0)


def test_caption_bytes_are_cut_after_a_whole_word_and_zero_padded():
    encoded, length = clips.encode_caption("a red torus", 16)
    assert length == 11 and bytes(encoded[:11]) == b"a red torus" and not encoded[11:].any()
    encoded, length = clips.encode_caption("a red torus, a small blue box", 20)
    assert bytes(encoded[:length]) == b"a red torus, a small"
    encoded, length = clips.encode_caption("a red torus, a small blue box", 13)
    assert bytes(encoded[:length]) == b"a red torus"  # no dangling comma
    encoded, length = clips.encode_caption("ein grünes Würfelchen", 12)  # a multi-byte character at the cut
    assert bytes(encoded[:length]).decode("utf-8") == "ein grünes"
    encoded, length = clips.encode_caption("Würfelchen", 2)  # one long word: cut at a character boundary
    assert bytes(encoded[:length]).decode("utf-8") == "W"  # "ü" is 2 bytes and does not fit
    assert clips.encode_caption("", 4)[1] == 0


def test_clip_config_errors_are_clear(rendered):
    glob, _ = rendered
    with pytest.raises(ValueError, match="config.example must be one of"):
        pipeline.make_iterator(_config(glob, example="video"), shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match="8 views cannot give 16 frames"):
        next(pipeline.make_iterator(_config(glob, num_frames=16), shard_index=0, shard_count=1))
    with pytest.raises(ValueError, match="clip_stride must be >= 1"):
        pipeline.make_iterator(_config(glob, clip_stride=0), shard_index=0, shard_count=1)
