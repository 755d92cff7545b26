"""The Grain orbit pipeline on real TFRecord shards of small synthetic orbits."""

import math

import jax
import numpy as np
import pytest
from PIL import Image

from vfusion3d_jax import cameras
from vfusion3d_jax.configs import config_module
from vfusion3d_jax.data import example, pipeline, tfrecord

common_config = config_module("common.py")

NUM_VIEWS, RESOLUTION = 8, 16


def _write_orbits(directory, name, *, num_shards=3, per_shard=8, source="rendered", qualities=None, seed=0):
    """Writes shards `name-*.tfrecord`; returns (glob, orbits in source-record order)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(exist_ok=True)
    orbits = []
    for shard in range(num_shards):
        with tfrecord.TFRecordWriter(directory / f"{name}-{shard:02d}.tfrecord") as writer:
            for _ in range(per_shard):
                quality = math.nan if qualities is None else qualities[len(orbits)]
                orbit = example.random_orbit(rng, num_views=NUM_VIEWS, resolution=RESOLUTION, source=source,
                                             quality=quality)
                writer.write(example.encode_orbit(**orbit))
                orbits.append(orbit)
    return str(directory / f"{name}-*.tfrecord"), orbits


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    return _write_orbits(tmp_path_factory.mktemp("rendered"), "rendered")


def _config(glob, **overrides):
    config = common_config.input_config()
    config.mixture.rendered.glob = glob
    config.update(dict(batch_size=4, source_resolution=RESOLUTION, target_resolution=RESOLUTION,
                       num_target_views=3, read_threads=2, read_buffer_size=8))
    config.update(overrides)
    return config


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _concat(batches, key):
    return np.concatenate([batch[key] for batch in batches])


def test_batch_shapes_and_ranges(rendered):
    glob, _ = rendered
    batch = next(pipeline.make_iterator(_config(glob), shard_index=0, shard_count=1))
    assert batch["source_image"].shape == (4, 16, 16, 3) and batch["source_image"].dtype == np.float32
    assert batch["source_camera"].shape == (4, 16)
    assert batch["target_images"].shape == (4, 3, 16, 16, 3) and batch["target_masks"].shape == (4, 3, 16, 16, 1)
    assert batch["target_cameras"].shape == (4, 3, 25) and batch["target_patch_cameras"].shape == (4, 3, 25)
    for key in ("source_image", "target_images", "target_masks"):
        assert batch[key].min() >= 0.0 and batch[key].max() <= 1.0
    # Background (alpha 0) is white; the mask marks the foreground disc.
    background = batch["target_masks"][..., 0] == 0
    assert background.any() and (~background).any()
    np.testing.assert_array_equal(batch["target_images"][background], 1.0)
    np.testing.assert_array_equal(batch["is_synthetic"], 0.0)


def test_every_record_once_per_epoch_in_shuffled_order(rendered):
    glob, orbits = rendered
    config = _config(glob, num_epochs=2, drop_remainder=False)
    records = _concat(list(pipeline.make_iterator(config, shard_index=0, shard_count=1)), "record_index")
    first, second = records[:len(orbits)], records[len(orbits):]
    assert sorted(first) == sorted(second) == list(range(len(orbits)))
    assert list(first) != sorted(first) and list(first) != list(second)


def test_views_follow_the_config_and_cameras_are_canonical(rendered):
    glob, orbits = rendered
    batches = list(pipeline.make_iterator(_config(glob, num_epochs=1), shard_index=0, shard_count=1))
    sources, targets = _concat(batches, "source_view_index"), _concat(batches, "target_view_indices")
    np.testing.assert_array_equal(targets[:, 0], sources)
    assert all(len(set(views)) == 3 for views in targets)
    canonical = cameras.CANONICAL_SOURCE_CAM2WORLD[:3, :3].reshape(-1)
    source_cameras = _concat(batches, "source_camera").reshape(-1, 16)
    np.testing.assert_allclose(source_cameras[:, [0, 1, 2, 4, 5, 6, 8, 9, 10]], np.tile(canonical, (len(sources), 1)),
                               atol=1e-5)
    np.testing.assert_allclose(source_cameras[:, [3, 7, 11]], np.tile([2.0, 0.0, 0.0], (len(sources), 1)), atol=1e-5)
    # The target cameras moved with the source camera: relative poses are those of the record.
    batch = batches[0]
    for n in range(len(batch["record_index"])):
        orbit = orbits[batch["record_index"][n]]
        stored = orbit["cam2world"][batch["target_view_indices"][n]]
        moved, _ = cameras.split_render_camera(batch["target_cameras"][n])
        np.testing.assert_allclose(np.linalg.inv(moved[0]) @ moved, np.linalg.inv(stored[0]) @ stored, atol=1e-5)

    config = _config(glob, num_epochs=1, include_source_in_targets=False, canonicalize_cameras=False)
    batches = list(pipeline.make_iterator(config, shard_index=0, shard_count=1))
    for source, views in zip(_concat(batches, "source_view_index"), _concat(batches, "target_view_indices")):
        assert source not in views and len(set(views)) == 3


def test_input_views_are_the_source_then_distinct_others_with_a_prefix_mask(rendered):
    glob, orbits = rendered
    plain = list(pipeline.make_iterator(_config(glob, num_epochs=1, random_hue=True), shard_index=0, shard_count=1))
    config = _config(glob, num_epochs=1, random_hue=True, num_input_views=4, min_input_views=2)
    batches = list(pipeline.make_iterator(config, shard_index=0, shard_count=1))
    # The input views are drawn after everything else: the LRM's part of each example is unchanged.
    for key in plain[0]:
        np.testing.assert_array_equal(_concat(batches, key), _concat(plain, key), err_msg=key)
    assert "input_images" not in plain[0]

    images, input_cameras = _concat(batches, "input_images"), _concat(batches, "input_cameras")
    mask, views = _concat(batches, "input_mask"), _concat(batches, "input_view_indices")
    assert images.shape == (len(orbits), 4, RESOLUTION, RESOLUTION, 3) and mask.dtype == bool
    counts = mask.sum(axis=1)
    np.testing.assert_array_equal(mask, np.arange(4) < counts[:, None])  # a prefix
    assert set(counts.tolist()) == {2, 3, 4}  # 24 draws from [2, 4]
    np.testing.assert_array_equal(views[:, 0], _concat(batches, "source_view_index"))
    np.testing.assert_array_equal(images[:, 0], _concat(batches, "source_image"))
    np.testing.assert_array_equal(input_cameras[:, 0], _concat(batches, "source_camera"))
    for n in range(len(orbits)):
        chosen = views[n, :counts[n]]
        assert len(set(chosen.tolist())) == counts[n] and (views[n, counts[n]:] == -1).all()
        np.testing.assert_array_equal(images[n, counts[n]:], 1.0)  # padding is white
        # Each input camera is its view's camera, moved into the source's canonical frame like the targets.
        orbit = orbits[_concat(batches, "record_index")[n]]
        stored = orbit["cam2world"][chosen]
        moved = np.concatenate([input_cameras[n, :counts[n], :12].reshape(-1, 3, 4),
                                np.tile([[[0, 0, 0, 1]]], (counts[n], 1, 1))], axis=1)
        np.testing.assert_allclose(np.linalg.inv(moved[0]) @ moved, np.linalg.inv(stored[0]) @ stored, atol=1e-5)

    with pytest.raises(ValueError, match="min_input_views"):
        next(pipeline.make_iterator(_config(glob, num_input_views=2, min_input_views=3), shard_index=0, shard_count=1))


def test_resume_from_state_gives_the_same_batches(tmp_path, rendered):
    glob, _ = rendered
    synthetic_glob, _ = _write_orbits(tmp_path, "synthetic", source="synthetic", seed=1)
    config = _config(glob, patch_size=8, target_resize_range=(10, 16), batch_size=3)
    config.mixture.synthetic.glob = synthetic_glob
    original = pipeline.make_iterator(config, shard_index=0, shard_count=1)
    _take(original, 5)
    state = original.get_state()
    expected = _take(original, 12)  # past the end of the first epoch
    resumed = pipeline.make_iterator(config, shard_index=0, shard_count=1)
    resumed.set_state(state)
    for want, got in zip(expected, _take(resumed, 12)):
        assert want.keys() == got.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_hosts_together_read_the_single_host_batches_once_each(rendered):
    glob, orbits = rendered
    batch_size, hosts = 6, 3
    config = _config(glob, num_epochs=1, batch_size=batch_size)
    single = list(pipeline.make_iterator(config, shard_index=0, shard_count=1))
    shares = [list(pipeline.make_iterator(config, shard_index=host, shard_count=hosts)) for host in range(hosts)]
    # Every host runs the same steps on batch_size // hosts examples; side by side, a host's batches
    # are block `host` of one host's batch: the very same examples, views and crops.
    assert [len(batches) for batches in shares] == [len(orbits) // batch_size] * hosts
    for step, batches in enumerate(zip(*shares)):
        assert all(len(batch["record_index"]) == batch_size // hosts for batch in batches)
        for key in single[step]:
            np.testing.assert_array_equal(np.concatenate([batch[key] for batch in batches]), single[step][key],
                                          err_msg=key)
    seen = np.concatenate([_concat(batches, "record_index") for batches in shares])
    assert len(set(seen.tolist())) == len(seen)  # no record twice in the epoch; none but the last partial batch left out
    assert len(orbits) - len(seen) == len(orbits) % batch_size


def test_mixture_weights_hold_after_filtering(tmp_path, rendered):
    glob, _ = rendered
    qualities = np.random.default_rng(2).uniform(0.0, 1.0, 48)
    synthetic_glob, _ = _write_orbits(tmp_path, "synthetic", source="synthetic", num_shards=2, per_shard=24,
                                      qualities=qualities, seed=3)
    config = _config(glob, quality_min=0.5, batch_size=8)
    config.mixture.synthetic.glob = synthetic_glob
    config.mixture.rendered.weight, config.mixture.synthetic.weight = 3.0, 1.0
    batches = _take(pipeline.make_iterator(config, shard_index=0, shard_count=1), 20)
    is_synthetic = _concat(batches, "is_synthetic")
    assert abs(is_synthetic.mean() - 0.25) < 0.03
    np.testing.assert_array_equal(_concat(batches, "dataset_index"), is_synthetic)  # names sort: rendered, synthetic
    synthetic_records = _concat(batches, "record_index")[is_synthetic == 1]
    assert np.all(qualities[synthetic_records] >= 0.5)


def test_quality_filter_and_unknown_quality_choice(tmp_path):
    qualities = np.array([0.9, 0.1, math.nan, 0.5, 0.49, math.nan, 0.7, 0.2])
    glob, _ = _write_orbits(tmp_path, "scored", num_shards=2, per_shard=4, qualities=qualities, source="synthetic")
    for keep_unknown, expected in ((True, [0, 2, 3, 5, 6]), (False, [0, 3, 6])):
        config = _config(glob, num_epochs=1, drop_remainder=False, quality_min=0.5, keep_unknown_quality=keep_unknown)
        batches = list(pipeline.make_iterator(config, shard_index=0, shard_count=1))
        assert sorted(_concat(batches, "record_index")) == expected
    # A dataset's own threshold wins over the pipeline's.
    config = _config(glob, num_epochs=1, drop_remainder=False, quality_min=0.0, keep_unknown_quality=False)
    config.mixture.rendered.quality_min = 0.6
    assert sorted(_concat(list(pipeline.make_iterator(config, shard_index=0, shard_count=1)), "record_index")) == [0, 6]
    config = _config(glob, num_epochs=1, drop_remainder=False)
    config.mixture.rendered.source = "rendered"  # these records are all synthetic
    with pytest.raises(StopIteration):
        next(pipeline.make_iterator(config, shard_index=0, shard_count=1))


def test_patches_are_crops_of_the_full_view_with_matching_cameras(rendered):
    glob, _ = rendered
    full = next(pipeline.make_iterator(_config(glob), shard_index=0, shard_count=1))
    patched = next(pipeline.make_iterator(_config(glob, patch_size=8), shard_index=0, shard_count=1))
    np.testing.assert_array_equal(patched["target_view_indices"], full["target_view_indices"])
    np.testing.assert_array_equal(patched["target_full_size"], 16)
    np.testing.assert_array_equal(patched["target_cameras"], full["target_cameras"])
    offsets = patched["target_crop_offsets"]
    assert offsets.min() >= 0 and offsets.max() <= 8 and len(np.unique(offsets.reshape(-1, 2), axis=0)) > 1
    cam2world, intrinsics = cameras.split_render_camera(full["target_cameras"])
    _, full_rays = cameras.pixel_rays(cam2world, intrinsics, resolution=16)
    full_rays = np.asarray(full_rays).reshape(4, 3, 16, 16, 3)
    patch_cam2world, patch_intrinsics = cameras.split_render_camera(patched["target_patch_cameras"])
    _, patch_rays = cameras.pixel_rays(patch_cam2world, patch_intrinsics, resolution=8)
    patch_rays = np.asarray(patch_rays).reshape(4, 3, 8, 8, 3)
    for n in range(4):
        for k in range(3):
            top, left = offsets[n, k]
            window = (slice(top, top + 8), slice(left, left + 8))
            np.testing.assert_array_equal(patched["target_images"][n, k], full["target_images"][n, k][window])
            np.testing.assert_array_equal(patched["target_masks"][n, k], full["target_masks"][n, k][window])
            np.testing.assert_allclose(patch_rays[n, k], full_rays[n, k][window], atol=1e-6)


def test_hue_rotation_turns_colours_and_keeps_greys():
    turn = pipeline.hue_rotation(2 * np.pi / 3)  # a third of a turn: red -> green -> blue -> red
    np.testing.assert_allclose(turn @ [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(turn @ [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(turn @ [0.3, 0.3, 0.3], [0.3, 0.3, 0.3], atol=1e-12)
    np.testing.assert_allclose(pipeline.hue_rotation(1.0) @ pipeline.hue_rotation(1.0).T, np.eye(3), atol=1e-12)
    rgba = np.array([[[200, 40, 40, 255], [128, 128, 128, 0]]], np.uint8)
    turned = pipeline.rotate_hue(rgba, 2 * np.pi / 3)
    np.testing.assert_array_equal(turned, [[[40, 200, 40, 255], [128, 128, 128, 0]]])


def test_random_hue_turns_every_view_of_an_example_alike(rendered):
    glob, _ = rendered
    plain = next(pipeline.make_iterator(_config(glob), shard_index=0, shard_count=1))
    turned = next(pipeline.make_iterator(_config(glob, random_hue=True), shard_index=0, shard_count=1))
    # The same views and cameras (the angle is drawn after them); masks unchanged, colours not.
    for key in ("target_view_indices", "source_view_index", "target_cameras", "target_masks"):
        np.testing.assert_array_equal(turned[key], plain[key])
    foreground = plain["target_masks"][..., 0] > 0.99
    assert np.abs(turned["target_images"] - plain["target_images"])[foreground].mean() > 0.05
    # One rotation per example: fitted on the source view, it maps every target view (colours
    # over white with full alpha are linear in the rotation, up to uint8 rounding).
    for n in range(4):
        source_plain, source_turned = plain["source_image"][n].reshape(-1, 3), turned["source_image"][n].reshape(-1, 3)
        rotation, *_ = np.linalg.lstsq(source_plain, source_turned, rcond=None)
        views = foreground[n]
        np.testing.assert_allclose(plain["target_images"][n][views] @ rotation, turned["target_images"][n][views],
                                   atol=0.03)


def test_random_mirror_flips_views_and_mirrors_cameras_with_the_world(rendered):
    glob, _ = rendered
    config = _config(glob, num_epochs=1, drop_remainder=False)
    plain = list(pipeline.make_iterator(config, shard_index=0, shard_count=1))
    config.random_mirror = True
    mirrored = list(pipeline.make_iterator(config, shard_index=0, shard_count=1))
    flipped = []
    for before, after in zip(plain, mirrored):
        # The same views (the mirror is drawn last); each example mirrored whole, or not at all.
        np.testing.assert_array_equal(after["target_view_indices"], before["target_view_indices"])
        for n in range(len(before["source_image"])):
            flip = not np.array_equal(after["source_image"][n], before["source_image"][n])
            flipped.append(flip)
            mirror = (lambda image: image[..., ::-1, :]) if flip else (lambda image: image)
            np.testing.assert_array_equal(after["source_image"][n], mirror(before["source_image"][n]))
            np.testing.assert_array_equal(after["target_images"][n], mirror(before["target_images"][n]))
            np.testing.assert_array_equal(after["target_masks"][n], mirror(before["target_masks"][n]))
            # The source camera is canonical either way; the others are the plain example's
            # cameras mirrored across the canonical source's plane (y = 0).
            np.testing.assert_allclose(after["source_camera"][n], before["source_camera"][n], atol=1e-6)
            cam2world, intrinsics = cameras.split_render_camera(before["target_cameras"][n])
            expected = cameras.render_camera(*cameras.mirror_cameras(cam2world, intrinsics)) if flip else \
                before["target_cameras"][n]
            np.testing.assert_allclose(after["target_cameras"][n], expected, atol=1e-5)
    assert len(flipped) == 24 and 4 <= sum(flipped) <= 20
    with pytest.raises(ValueError, match="random_mirror is for 'views' examples"):
        pipeline.example_options(_config(glob, example="clip", random_mirror=True))


def test_random_resize_crops_match_an_independent_decode(rendered):
    glob, orbits = rendered
    config = _config(glob, patch_size=8, target_resize_range=(10, 16), canonicalize_cameras=False, batch_size=8)
    batches = _take(pipeline.make_iterator(config, shard_index=0, shard_count=1), 3)
    sizes = _concat(batches, "target_full_size")
    assert sizes.min() >= 10 and sizes.max() <= 16 and len(set(sizes)) > 1
    batch = batches[0]
    for n, record in enumerate(batch["record_index"]):
        size = int(batch["target_full_size"][n])
        for k, view in enumerate(batch["target_view_indices"][n]):
            top, left = batch["target_crop_offsets"][n, k]
            assert 0 <= top <= size - 8 and 0 <= left <= size - 8
            resized = Image.fromarray(orbits[record]["images"][view], "RGBA").resize((size, size), Image.Resampling.BICUBIC)
            rgba = np.asarray(resized)[top:top + 8, left:left + 8].astype(np.float32) / 255.0
            np.testing.assert_allclose(batch["target_masks"][n, k], rgba[..., 3:], atol=1e-6)
            np.testing.assert_allclose(batch["target_images"][n, k], rgba[..., :3] * rgba[..., 3:] + 1 - rgba[..., 3:],
                                       atol=1e-6)
        np.testing.assert_allclose(batch["target_cameras"][n, :, :16].reshape(-1, 4, 4),
                                   orbits[record]["cam2world"][batch["target_view_indices"][n]], atol=1e-6)


def test_corrupt_record_raises_or_is_skipped_and_counted(tmp_path):
    glob, orbits = _write_orbits(tmp_path, "damaged", num_shards=2, per_shard=5)
    config = _config(glob, num_epochs=1, drop_remainder=False)
    order = _concat(list(pipeline.make_iterator(config, shard_index=0, shard_count=1)), "record_index")
    victim = int(order[3])  # a record in the middle of the shuffled epoch
    damaged = tmp_path / f"damaged-{victim // 5:02d}.tfrecord"
    offset, length = tfrecord.read_index(damaged)[victim % 5]
    data = bytearray(damaged.read_bytes())
    data[int(offset) + 12 + int(length) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))

    message = rf"{damaged}: record {victim % 5} at byte offset {int(offset)}: data CRC mismatch"
    with pytest.raises(tfrecord.CorruptRecordError, match=message):
        list(pipeline.make_iterator(config, shard_index=0, shard_count=1))

    config.skip_corrupt = True
    batches = list(pipeline.make_iterator(config, shard_index=0, shard_count=1))
    np.testing.assert_array_equal(_concat(batches, "record_index"), np.delete(order, 3))
    np.testing.assert_array_equal(_concat(batches, "corrupt_skipped"), np.eye(len(order) - 1, dtype=int)[3])


@pytest.mark.parametrize("stored_index", [True, False], ids=["writer_index", "no_index"])
def test_a_truncated_tail_and_a_flipped_byte_are_both_skipped_and_named(tmp_path, stored_index):
    glob, orbits = _write_orbits(tmp_path, "damaged", num_shards=2, per_shard=4)
    flipped, truncated = tmp_path / "damaged-00.tfrecord", tmp_path / "damaged-01.tfrecord"
    offset, length = tfrecord.read_index(flipped)[1]
    data = bytearray(flipped.read_bytes())
    data[int(offset) + 12 + int(length) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:-50])  # cuts into the last record (4 + 3 = record 7)
    if not stored_index:  # a shard from another writer: the index is rebuilt by a scan
        for path in tmp_path.glob("*.index"):
            path.unlink()

    config = _config(glob, num_epochs=1, drop_remainder=False)
    with pytest.raises(tfrecord.CorruptRecordError, match="truncated") as error:
        pipeline.make_iterator(config, shard_index=0, shard_count=1)
    assert error.value.hint == pipeline.SKIP_CORRUPT_HINT

    config.skip_corrupt = True
    batches = list(pipeline.make_iterator(config, shard_index=0, shard_count=1))
    assert sorted(_concat(batches, "record_index")) == [0, 2, 3, 4, 5, 6]
    assert _concat(batches, "corrupt_skipped").sum() == 2
    named = _concat(batches, "corrupt_skipped_records").reshape(-1, 2)
    assert sorted(map(tuple, named[named[:, 0] >= 0].tolist())) == [(0, 1), (0, 7)]

    tally = pipeline.SkippedRecordTally()
    new = [line for batch in batches for line in tally.update(batch, config)]
    assert sorted(new) == [f"{flipped}: record 1", f"{truncated}: record 3"]
    assert tally.summary() == dict(records=2, times=2, unnamed=0, files={str(flipped): [1], str(truncated): [3]})
    assert tally.update(batches[0] | {"corrupt_skipped": np.array([1]), "corrupt_skipped_records": np.array(
        [[[0, 1], [-1, -1], [-1, -1], [-1, -1]]])}, config) == []  # seen before: counted, not new
    assert (tally.records, tally.times) == (2, 3)
    assert tally.describe() == (f"skipped 2 corrupt records (3 reads): {flipped} (record 1); {truncated} (record 3)")


def test_to_global_arrays_shards_the_batch_over_devices(rendered):
    glob, _ = rendered
    batch = next(pipeline.make_iterator(_config(glob, batch_size=8), shard_index=0, shard_count=1))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    global_batch = pipeline.to_global_arrays(batch, mesh, jax.sharding.PartitionSpec("data"))
    assert global_batch["target_images"].shape == (8, 3, 16, 16, 3)
    assert len(global_batch["target_images"].addressable_shards) == 8
    assert global_batch["target_images"].addressable_shards[3].data.shape == (1, 3, 16, 16, 3)
    np.testing.assert_array_equal(np.asarray(global_batch["source_camera"]), batch["source_camera"])


def test_config_errors_are_clear(rendered):
    glob, _ = rendered
    with pytest.raises(ValueError, match="target_resize_range needs patch_size"):
        pipeline.make_iterator(_config(glob, target_resize_range=(8, 16)), shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match="not divisible"):
        pipeline.make_iterator(_config(glob, batch_size=4), shard_index=0, shard_count=3)
    with pytest.raises(FileNotFoundError, match="no TFRecord shards match"):
        pipeline.make_iterator(_config(glob + ".missing"), shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match="cannot give 1 source and 9 targets"):
        next(pipeline.make_iterator(_config(glob, num_target_views=9), shard_index=0, shard_count=1))


@pytest.mark.slow
def test_worker_processes_give_every_record_and_resume(rendered):
    glob, orbits = rendered
    config = _config(glob, num_epochs=1, worker_count=2, batch_size=2)
    iterator = pipeline.make_iterator(config, shard_index=0, shard_count=1)
    head = _take(iterator, 3)
    state = iterator.get_state()
    tail = list(iterator)
    assert sorted(_concat(head + tail, "record_index")) == list(range(len(orbits)))
    resumed = pipeline.make_iterator(config, shard_index=0, shard_count=1)
    resumed.set_state(state)
    for want, got in zip(tail, list(resumed), strict=True):
        np.testing.assert_array_equal(got["target_images"], want["target_images"])
