"""TFRecord framing, CRC checks and offset indexes, and the orbit Example schema, on real files."""

import math
import os
import struct

import numpy as np
import pytest

from vfusion3d_jax import cameras
from vfusion3d_jax.data import example, tfrecord


def _reference_crc32c(data: bytes) -> int:
    """Bitwise CRC-32C (reflected polynomial 0x82F63B78), independent of google_crc32c."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _reference_masked(data: bytes) -> int:
    crc = _reference_crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _write_shard(path, records):
    with tfrecord.TFRecordWriter(path) as writer:
        for record in records:
            writer.write(record)


def _records(count=5, seed=0):
    rng = np.random.default_rng(seed)
    return [b""] + [rng.bytes(int(rng.integers(1, 300))) for _ in range(count - 1)]


def test_crc32c_known_answer():
    assert tfrecord.crc32c(b"123456789") == 0xE3069283
    assert _reference_crc32c(b"123456789") == 0xE3069283


def test_writer_bytes_equal_hand_built_frames(tmp_path):
    records = [b"hello", b"", b"\x00\xff" * 40]
    expected = b""
    for data in records:
        length = struct.pack("<Q", len(data))
        expected += length + struct.pack("<I", _reference_masked(length)) + data + struct.pack("<I", _reference_masked(data))
    path = tmp_path / "hand.tfrecord"
    _write_shard(path, records)
    assert path.read_bytes() == expected


def test_round_trip_sequential_and_random_access(tmp_path):
    records = _records(20)
    path = tmp_path / "shard.tfrecord"
    _write_shard(path, records)
    assert list(tfrecord.iterate_records(path)) == records
    index = tfrecord.read_index(path)
    assert index.shape == (20, 2) and index.dtype == np.uint64
    for n in np.random.default_rng(1).permutation(20):
        offset, length = index[n]
        assert tfrecord.read_record(path, offset, length) == records[n]
    assert sorted(os.listdir(tmp_path)) == ["shard.tfrecord", "shard.tfrecord.index"]  # no temp files left


def test_failed_writer_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with tfrecord.TFRecordWriter(tmp_path / "half.tfrecord") as writer:
            writer.write(b"first")
            raise RuntimeError("crash mid-shard")
    assert os.listdir(tmp_path) == []


def test_every_flipped_byte_is_detected_with_file_record_and_offset(tmp_path):
    records = [b"abc", b"", b"0123456789"]
    path = tmp_path / "flip.tfrecord"
    _write_shard(path, records)
    index = tfrecord.read_index(path)
    pristine = path.read_bytes()
    frame_starts = [int(offset) for offset, _ in index]
    for position in range(len(pristine)):
        corrupted = bytearray(pristine)
        corrupted[position] ^= 0x10
        path.write_bytes(bytes(corrupted))
        record = max(n for n, start in enumerate(frame_starts) if start <= position)
        offset, length = index[record]
        with pytest.raises(tfrecord.CorruptRecordError) as caught:
            tfrecord.read_record(path, offset, length, record_index=record)
        message = str(caught.value)
        assert str(path) in message and f"record {record} " in message and f"offset {int(offset)}" in message
        with pytest.raises(tfrecord.CorruptRecordError) as caught:
            list(tfrecord.iterate_records(path))
        assert caught.value.record_index == record and caught.value.offset == int(offset)


def test_missing_index_is_built_and_reads_identically(tmp_path):
    records = _records(12, seed=3)
    path = tmp_path / "foreign.tfrecord"
    _write_shard(path, records)
    written = tfrecord.read_index(path)
    os.remove(tfrecord.index_path(path))  # as a shard written by TensorFlow would be
    rebuilt = tfrecord.read_index(path)
    np.testing.assert_array_equal(rebuilt, written)
    assert os.path.exists(tfrecord.index_path(path))
    assert [tfrecord.read_record(path, o, n) for o, n in rebuilt] == records


def test_stale_index_is_rebuilt(tmp_path):
    path = tmp_path / "reused.tfrecord"
    _write_shard(path, _records(4, seed=5))
    stale = tfrecord.read_index(path)
    new_records = _records(7, seed=6)
    with open(path, "wb") as file:  # rewritten by a tool that does not know about indexes
        for record in new_records:
            file.write(tfrecord.frame_record(record))
    with open(tfrecord.index_path(path), "wb") as file:
        np.save(file, stale)
    index = tfrecord.read_index(path)
    assert len(index) == 7
    assert [tfrecord.read_record(path, o, n) for o, n in index] == new_records


def test_truncated_shard_is_reported(tmp_path):
    path = tmp_path / "cut.tfrecord"
    _write_shard(path, _records(3, seed=8))
    os.remove(tfrecord.index_path(path))
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    with pytest.raises(tfrecord.CorruptRecordError, match=r"record 2 at byte offset \d+: truncated record"):
        tfrecord.read_index(path)


def test_orbit_round_trip_and_partial_decode():
    orbit = example.random_orbit(np.random.default_rng(0), num_views=8, resolution=16, source="synthetic", quality=0.7)
    record = example.encode_orbit(**orbit)
    decoded = example.decode_orbit(record)
    np.testing.assert_array_equal(decoded["images"], orbit["images"])
    np.testing.assert_allclose(decoded["cam2world"], orbit["cam2world"], atol=1e-7)
    np.testing.assert_allclose(decoded["intrinsics"], orbit["intrinsics"], atol=1e-7)
    np.testing.assert_allclose(decoded["azimuth_deg"], orbit["azimuths_deg"], atol=1e-4)
    assert decoded["object_id"] == orbit["object_id"] and decoded["source"] == "synthetic"
    assert decoded["quality"] == pytest.approx(0.7) and decoded["num_views"] == 8
    assert decoded["elevation_deg"] == pytest.approx(orbit["elevation_deg"], abs=1e-4)
    subset = example.decode_orbit(record, views=[5, 2])
    np.testing.assert_array_equal(subset["images"], orbit["images"][[5, 2]])
    np.testing.assert_array_equal(subset["view_indices"], [5, 2])
    np.testing.assert_allclose(subset["cam2world"], orbit["cam2world"][[5, 2]], atol=1e-7)


def test_default_azimuths_and_unknown_quality():
    orbit = example.random_orbit(np.random.default_rng(1), num_views=4, resolution=8)
    del orbit["azimuths_deg"]
    decoded = example.decode_orbit(example.encode_orbit(**orbit))
    expected = np.mod(cameras.orbit_azimuths(4, 0.0) + decoded["azimuth_deg"][0], 360.0)
    np.testing.assert_allclose(decoded["azimuth_deg"], expected, atol=1e-3)
    assert math.isnan(decoded["quality"])


def test_surface_points_round_trip_and_absence():
    orbit = example.random_orbit(np.random.default_rng(5), num_views=2, resolution=4)
    points = np.random.default_rng(6).uniform(-0.45, 0.45, size=(50, 3))
    with_points = example.decode_orbit(example.encode_orbit(**orbit, surface_points=points), views=[])
    assert with_points["surface_points"].dtype == np.float32
    np.testing.assert_array_equal(with_points["surface_points"], points.astype(np.float32))
    without = example.encode_orbit(**orbit)
    assert "object/surface_points" not in example.parse_example(without).features.feature
    assert example.decode_orbit(without)["surface_points"] is None
    parsed = example.parse_example(example.encode_orbit(**orbit, surface_points=points))
    del parsed.features.feature["object/surface_points"].float_list.value[-1]
    with pytest.raises(example.OrbitSchemaError, match=r"'object/surface_points' .* 149 values, expected a multiple"):
        example.decode_orbit(parsed)
    with pytest.raises(ValueError, match=r"surface_points must be \(P, 3\)"):
        example.encode_orbit(**orbit, surface_points=points[:, :2])


def test_caption_round_trip_and_absence():
    orbit = example.random_orbit(np.random.default_rng(7), num_views=2, resolution=4)
    with_caption = example.encode_orbit(**orbit, caption="a grüne torus")
    assert example.read_metadata(with_caption).caption == "a grüne torus"
    assert example.decode_orbit(with_caption, views=[])["caption"] == "a grüne torus"
    without = example.encode_orbit(**orbit)
    assert "object/caption" not in example.parse_example(without).features.feature
    assert example.read_metadata(without).caption == "" and example.decode_orbit(without)["caption"] == ""
    # A damaged caption does not stop a reader (most never use it); a wrong type is a schema error.
    parsed = example.parse_example(with_caption)
    parsed.features.feature["object/caption"].bytes_list.value[0] = b"a \xff torus"
    assert example.read_metadata(parsed).caption == "a \ufffd torus"
    del parsed.features.feature["object/caption"]
    parsed.features.feature["object/caption"].int64_list.value.append(1)
    with pytest.raises(example.OrbitSchemaError, match="'object/caption' holds a int64_list"):
        example.read_metadata(parsed)


def test_orbit_in_a_shard(tmp_path):
    rng = np.random.default_rng(2)
    orbits = [example.random_orbit(rng, num_views=4, resolution=8) for _ in range(3)]
    path = tmp_path / "orbits.tfrecord"
    _write_shard(path, [example.encode_orbit(**orbit) for orbit in orbits])
    for orbit, record in zip(orbits, tfrecord.iterate_records(path)):
        np.testing.assert_array_equal(example.decode_orbit(record)["images"], orbit["images"])


def test_schema_errors_name_the_feature():
    record = example.encode_orbit(**example.random_orbit(np.random.default_rng(3), num_views=4, resolution=8))
    parsed = example.parse_example(record)
    del parsed.features.feature["meta/quality"]
    with pytest.raises(example.OrbitSchemaError, match="missing feature 'meta/quality'"):
        example.decode_orbit(parsed)
    parsed = example.parse_example(record)
    del parsed.features.feature["views/cam2world"].float_list.value[-1]
    with pytest.raises(example.OrbitSchemaError, match=r"'views/cam2world' has 63 values, expected 64"):
        example.decode_orbit(parsed)
    parsed = example.parse_example(record)
    parsed.features.feature["views/count"].int64_list.value[0] = 5
    with pytest.raises(example.OrbitSchemaError, match=r"'views/image' has 4 values, expected 5"):
        example.decode_orbit(parsed)
    with pytest.raises(ValueError, match="source must be one of"):
        example.encode_orbit(**{**example.random_orbit(np.random.default_rng(4), num_views=2, resolution=4),
                                "source": "scanned"})
