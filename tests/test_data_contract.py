"""Files from another writer that hold only the data contract's required features are readable,
and a reader leaves a data folder it may not write to untouched.

The minimal files come from a small writer here that builds the `tf.train.Example` protos
and the TFRecord framing by hand, independent of `vfusion3d_jax.data` (cameras included).
"""

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import struct
import subprocess

import google_crc32c
import numpy as np
import pytest
from PIL import Image
from tensorflow_datasets.proto import tf_example_pb2

from vfusion3d_jax.configs import load_config
from vfusion3d_jax.data import example, storage, tfrecord
from vfusion3d_jax.data.inspect import inspect_dataset
from vfusion3d_jax.data.pipeline import ExampleOptions, OrbitSource, make_training_example
from vfusion3d_jax.data.render_assets import OrbitSettings, orbit_cameras
from vfusion3d_jax.inference.evaluate import orbit_tasks

REQUIRED = ("views/image", "views/cam2world", "views/intrinsics", "object/id", "object/source",
            "meta/elevation_deg", "meta/quality")
DERIVED = ("views/count", "views/height", "views/width", "views/azimuth_deg")


# --------------------------------------------------------------------------- an independent writer


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _write_tfrecord(path, records):
    with open(path, "wb") as file:
        for data in records:
            length = struct.pack("<Q", len(data))
            file.write(length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data)))


def _look_at(azimuth_deg, elevation_deg, radius):
    """OpenGL-axes cam2world (camera looks along -z, +y up in the image) at an orbit position, world +z up."""
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    position = radius * np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
    back = position / np.linalg.norm(position)
    right = np.cross([0.0, 0.0, 1.0], back)
    right /= np.linalg.norm(right)
    up = np.cross(back, right)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, up, back, position
    return pose


def _png(rgba: np.ndarray, mode="RGBA") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _minimal_orbit(seed, *, num_views=4, height=12, width=10, mode="RGBA"):
    """(record bytes, what it holds) with only the required features."""
    rng = np.random.default_rng(seed)
    azimuths = (rng.uniform(0, 360) + 360.0 * np.arange(num_views) / num_views) % 360.0
    elevation = float(rng.uniform(0, 45))
    images = rng.integers(0, 256, size=(num_views, height, width, 4), dtype=np.uint8)
    if mode == "RGB":
        images[..., 3] = 255
    poses = np.stack([_look_at(a, elevation, 1.5) for a in azimuths]).astype(np.float32)
    intrinsics = np.tile(np.array([[0.75, 0, 0.5], [0, 0.75, 0.5], [0, 0, 1]], np.float32), (num_views, 1, 1))
    proto = tf_example_pb2.Example()
    feature = proto.features.feature
    feature["views/image"].bytes_list.value.extend(_png(image, mode) for image in images)
    feature["views/cam2world"].float_list.value.extend(poses.reshape(-1).tolist())
    feature["views/intrinsics"].float_list.value.extend(intrinsics.reshape(-1).tolist())
    feature["object/id"].bytes_list.value.append(f"other-writer-{seed}".encode())
    feature["object/source"].bytes_list.value.append(b"synthetic")
    feature["meta/elevation_deg"].float_list.value.append(elevation)
    feature["meta/quality"].float_list.value.append(float("nan"))
    truth = dict(images=images, cam2world=poses, intrinsics=intrinsics, azimuths=azimuths, elevation=elevation,
                 object_id=f"other-writer-{seed}")
    return proto.SerializeToString(), truth


def _write_minimal_folder(folder, shards=2, per_shard=3):
    folder.mkdir(parents=True, exist_ok=True)
    truths = []
    for shard in range(shards):
        records = []
        for i in range(per_shard):
            record, truth = _minimal_orbit(10 * shard + i)
            records.append(record)
            truths.append(truth)
        _write_tfrecord(folder / f"orbits-{shard:05d}-of-{shards:05d}.tfrecord", records)
    return truths


def _folder_snapshot(folder):
    """Every entry under `folder` with a hash of its bytes: equal snapshots, byte-identical folders."""
    snapshot = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            snapshot[os.path.relpath(os.path.join(root, name), folder)] = "dir"
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as file:
                snapshot[os.path.relpath(path, folder)] = hashlib.sha256(file.read()).hexdigest()
    return snapshot


@contextlib.contextmanager
def _read_only(folder):
    """Makes `folder` unwritable for this process, root included; yields whether that worked.

    Root ignores permission bits, so as root the folder is made immutable (`chattr +i`: no
    file can be created, renamed or removed in it), else bind-mounted read-only over itself.
    """
    folder = os.fspath(folder)
    undo = None
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        undo = ["chmod", "755", folder]
    elif shutil.which("chattr") and subprocess.run(["chattr", "+i", folder], capture_output=True).returncode == 0:
        undo = ["chattr", "-i", folder]
    elif shutil.which("mount") and subprocess.run(["mount", "--bind", "-o", "ro", folder, folder],
                                                   capture_output=True).returncode == 0:
        undo = ["umount", folder]
    try:
        yield undo is not None and not os.access(folder, os.W_OK)
    finally:
        if undo is not None:
            subprocess.run(undo, check=True)


# --------------------------------------------------------------------------- reading minimal records


def test_minimal_record_has_count_size_and_azimuth_derived():
    record, truth = _minimal_orbit(1, num_views=5, height=12, width=10)
    assert set(example.parse_example(record).features.feature) == set(REQUIRED)
    metadata = example.read_metadata(record)
    assert (metadata.num_views, metadata.height, metadata.width) == (5, 12, 10)
    assert metadata.object_id == truth["object_id"] and metadata.source == "synthetic"
    assert math.isnan(metadata.quality) and metadata.elevation_deg == pytest.approx(truth["elevation"], abs=1e-5)
    assert metadata.caption == ""  # object/caption is optional
    decoded = example.decode_orbit(record)
    np.testing.assert_array_equal(decoded["images"], truth["images"])
    np.testing.assert_array_equal(decoded["cam2world"], truth["cam2world"])
    np.testing.assert_array_equal(decoded["intrinsics"], truth["intrinsics"])
    assert decoded["azimuth_deg"].dtype == np.float32
    # Degrees from +x towards +y, in [0, 360): the positions this writer put the cameras at.
    difference = (decoded["azimuth_deg"] - truth["azimuths"] + 180.0) % 360.0 - 180.0
    np.testing.assert_allclose(difference, 0.0, atol=1e-3)
    assert np.all((decoded["azimuth_deg"] >= 0) & (decoded["azimuth_deg"] < 360))
    subset = example.decode_orbit(record, views=[3, 0])
    np.testing.assert_array_equal(subset["images"], truth["images"][[3, 0]])
    np.testing.assert_array_equal(subset["azimuth_deg"], decoded["azimuth_deg"][[3, 0]])


def test_minimal_record_with_rgb_pngs_is_all_foreground():
    record, truth = _minimal_orbit(2, num_views=2, mode="RGB")
    decoded = example.decode_orbit(record)
    np.testing.assert_array_equal(decoded["images"][..., :3], truth["images"][..., :3])
    assert np.all(decoded["images"][..., 3] == 255)


def test_derived_azimuths_equal_the_written_ones_for_project_records():
    # render-data's records: cameras from `orbit_cameras`, azimuths written by encode_orbit's default.
    settings = OrbitSettings.from_config(load_config("data.py:builtin"))
    images = np.zeros((settings.num_views, 4, 4, 4), np.uint8)
    for object_id in ["duck", "procedural-7", "sphere2"]:
        cam2world, intrinsics, elevation = orbit_cameras(object_id, settings)
        record = example.encode_orbit(images, cam2world, intrinsics, object_id=object_id, source="rendered",
                                      elevation_deg=elevation)
        parsed = example.parse_example(record)
        written = np.asarray(parsed.features.feature["views/azimuth_deg"].float_list.value, np.float32)
        for key in DERIVED:
            del parsed.features.feature[key]
        derived = example.decode_orbit(parsed)
        np.testing.assert_array_equal(derived["azimuth_deg"], written)
        assert (derived["num_views"], derived["height"], derived["width"]) == (settings.num_views, 4, 4)
    # Orbits written with explicit azimuths (`random_orbit`): the same angles, modulo 360.
    orbit = example.random_orbit(np.random.default_rng(3), num_views=8, resolution=8)
    parsed = example.parse_example(example.encode_orbit(**orbit))
    for key in DERIVED:
        del parsed.features.feature[key]
    difference = (example.decode_orbit(parsed)["azimuth_deg"] - orbit["azimuths_deg"] + 180) % 360 - 180
    np.testing.assert_allclose(difference, 0.0, atol=1e-3)


def test_derivable_features_are_still_checked_when_present():
    record, _ = _minimal_orbit(4, num_views=3, height=12, width=10)
    checks = [
        ("views/count", lambda f: f.int64_list.value.append(4), r"'views/image' has 3 values, expected 4"),
        ("views/height", lambda f: f.int64_list.value.append(13), r"is 10x12 \(WxH\), views/width x views/height say 10x13"),
        ("views/width", lambda f: f.int64_list.value.append(11), r"is 10x12 \(WxH\), views/width x views/height say 11x12"),
        ("views/azimuth_deg", lambda f: f.float_list.value.extend([0.0, 1.0]), r"'views/azimuth_deg' has 2 values, expected 3"),
        ("views/count", lambda f: f.float_list.value.append(3.0), r"'views/count' holds a float_list, expected a int64_list"),
    ]
    for key, fill, message in checks:
        parsed = example.parse_example(record)
        fill(parsed.features.feature[key])
        with pytest.raises(example.OrbitSchemaError, match=message):
            example.decode_orbit(parsed)
    parsed = example.parse_example(record)
    del parsed.features.feature["views/image"].bytes_list.value[:]
    with pytest.raises(example.OrbitSchemaError, match="has no views"):
        example.read_metadata(parsed)
    parsed = example.parse_example(record)
    parsed.features.feature["views/image"].bytes_list.value[0] = b"not a png"
    with pytest.raises(example.OrbitSchemaError, match="view 0 of 'other-writer-4' is not a readable image"):
        example.read_metadata(parsed)
    for key in REQUIRED:
        parsed = example.parse_example(record)
        del parsed.features.feature[key]
        with pytest.raises(example.OrbitSchemaError, match=f"missing feature '{key}'"):
            example.decode_orbit(parsed)


# --------------------------------------------------------------------------- where readers write


def test_storage_decisions(tmp_path, monkeypatch):
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/vda / ext4 rw 0 0\nserver:/export {tmp_path}/nfs nfs4 rw 0 0\n"
                      f"bucket {tmp_path}/my\\040bucket fuse.gcsfuse rw 0 0\n")
    (tmp_path / "nfs" / "data").mkdir(parents=True)
    (tmp_path / "my bucket").mkdir()
    (tmp_path / "local").mkdir()
    assert storage.filesystem_type(tmp_path / "nfs" / "data", mounts_file=os.fspath(mounts)) == "nfs4"
    assert storage.is_remote(tmp_path / "nfs" / "data", mounts_file=os.fspath(mounts))
    assert storage.is_remote(tmp_path / "my bucket", mounts_file=os.fspath(mounts))
    assert not storage.is_remote(tmp_path / "nfsdata", mounts_file=os.fspath(mounts))  # a prefix, not inside
    assert not storage.is_remote(tmp_path / "local", mounts_file=os.fspath(mounts))
    assert storage.is_remote("gs://bucket/data/train-00000-of-00001.tfrecord")
    assert not storage.may_write(tmp_path / "nfs" / "data", mounts_file=os.fspath(mounts))
    assert storage.may_write(tmp_path / "local", mounts_file=os.fspath(mounts))
    assert not storage.may_write(tmp_path / "missing", mounts_file=os.fspath(mounts))

    monkeypatch.setenv(storage.CACHE_DIR_ENV, os.fspath(tmp_path / "cache"))
    first = storage.cache_path("tfrecord_index", tmp_path / "a" / "x.tfrecord", 10, 1)
    assert first.startswith(os.fspath(tmp_path / "cache" / "tfrecord_index" / "x.tfrecord-"))
    assert first != storage.cache_path("tfrecord_index", tmp_path / "a" / "x.tfrecord", 11, 1)  # rewritten
    assert first != storage.cache_path("tfrecord_index", tmp_path / "b" / "x.tfrecord", 10, 1)  # elsewhere
    monkeypatch.delenv(storage.CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", os.fspath(tmp_path / "xdg"))
    assert storage.cache_dir() == os.fspath(tmp_path / "xdg" / "vfusion3d_jax")


def test_read_only_folder_of_minimal_files(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    truths = _write_minimal_folder(data, shards=2, per_shard=3)
    cache = tmp_path / "cache"
    monkeypatch.setenv(storage.CACHE_DIR_ENV, os.fspath(cache))
    before = _folder_snapshot(data)
    with _read_only(data) as read_only:
        if not read_only:
            pytest.skip("no way to make a folder unwritable for this process here (chattr, bind mount)")
        assert not storage.may_write(data)
        shards = sorted(os.fspath(p) for p in data.glob("*.tfrecord"))
        indexes = [tfrecord.read_index(shard) for shard in shards]
        assert [len(index) for index in indexes] == [3, 3]
        for shard, index in zip(shards, indexes):
            cached = tfrecord.cached_index_path(shard)
            assert cached.startswith(os.fspath(cache / "tfrecord_index")) and os.path.exists(cached)
            np.testing.assert_array_equal(np.load(cached), index)
            np.testing.assert_array_equal(tfrecord.read_index(shard), index)  # the second read finds it

        # The training input pipeline: random access through the cached indexes.
        source = OrbitSource(os.fspath(data / "*.tfrecord"))
        assert len(source) == 6
        options = ExampleOptions(num_target_views=2, target_resolution=8, source_resolution=8)
        training_example = make_training_example(source[4].data, np.random.default_rng(0), options)
        assert training_example["target_images"].shape == (2, 8, 8, 3)

        # inspect-data, writing its report to the cache instead of the data folder.
        report = inspect_dataset(None, None, [os.fspath(data)])
        assert report["records"] == 6 and report["objects"] == 6 and report["shards"] == 2
        assert report["image_sizes"] == {"12x10": 6} and report["views_per_record"] == {"4": 6}
        assert report["quality"]["unknown"] == 6 and report["per_source"] == {"synthetic": 6}
        assert report["contact_sheet"].startswith(os.fspath(cache / "inspect"))
        with open(os.path.join(os.path.dirname(report["contact_sheet"]), "inspect.json")) as file:
            assert json.load(file)["records"] == 6
        assert "records 6" in capsys.readouterr().out

        # Evaluation's reader.
        tasks = list(orbit_tasks(os.fspath(data / "*.tfrecord"), source_view=0, source_size=16, resolution=8))
        assert [task.object_id for task in tasks] == [truth["object_id"] for truth in truths]
        assert tasks[0].target_images.shape == (3, 8, 8, 3) and tasks[0].target_cameras.shape == (3, 25)
    assert _folder_snapshot(data) == before


def test_writable_folder_keeps_the_index_beside_the_shard(tmp_path, monkeypatch):
    data = tmp_path / "data"
    _write_minimal_folder(data, shards=1, per_shard=2)
    monkeypatch.setenv(storage.CACHE_DIR_ENV, os.fspath(tmp_path / "cache"))
    shard = os.fspath(next(data.glob("*.tfrecord")))
    index = tfrecord.read_index(shard)
    assert len(index) == 2 and os.path.exists(tfrecord.index_path(shard))
    assert not (tmp_path / "cache").exists()
    report = inspect_dataset(None, None, [os.fspath(data)])
    assert report["contact_sheet"] == os.path.join(os.fspath(data), "contact_sheet.png")


def test_index_stays_in_memory_when_the_cache_cannot_be_written_either(tmp_path, monkeypatch):
    data = tmp_path / "data"
    _write_minimal_folder(data, shards=1, per_shard=2)
    shard = os.fspath(next(data.glob("*.tfrecord")))
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache directory would be")
    monkeypatch.setenv(storage.CACHE_DIR_ENV, os.fspath(blocker))
    before = _folder_snapshot(data)
    with _read_only(data) as read_only:
        if not read_only:
            pytest.skip("no way to make a folder unwritable for this process here (chattr, bind mount)")
        index = tfrecord.read_index(shard)
        assert len(index) == 2
        assert tfrecord.read_index(shard) is index  # from memory
    assert _folder_snapshot(data) == before
