"""Curation for real: rendered orbits on disk, made to look generated and broken on purpose →
`curate` with an LRM checkpoint → the same shards with `meta/quality`, scores and a sheet.

The LRM is the random `fixture` model (its re-renders carry no signal), so the checks on the
score's behaviour use the model-free terms (visual hull, sharpness); the LRM's own path is
the `evaluate` code, tested there.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli, save_random_lrm
from PIL import Image
from scipy import ndimage

from vfusion3d_jax import cameras, errors
from vfusion3d_jax.configs import load_config
from vfusion3d_jax.curation import consistency, corruptions, curate, estimators, quality
from vfusion3d_jax.data import example, pipeline, tfrecord
from vfusion3d_jax.data.render_assets import render_dataset


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> str:
    """A glob of rendered orbits of 5 procedural objects: 8 views of 32 px."""
    root = tmp_path_factory.mktemp("data")
    render_dataset(load_config("data.py:tiny", assets="procedural", num_procedural=5, holdout_fraction=0.0,
                               num_surface_points=0, num_workers=1), str(root), [])
    return str(root / "shards" / "*.tfrecord")


@pytest.fixture(scope="module")
def orbits(rendered) -> list[dict]:
    return [example.decode_orbit(record) for path in pipeline.expand_paths(rendered)
            for record in tfrecord.iterate_records(path)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return save_random_lrm(tmp_path_factory.mktemp("lrm"))


def _encode(orbit: dict, source: str, **extra) -> bytes:
    return example.encode_orbit(orbit["images"], orbit["cam2world"], orbit["intrinsics"], object_id=orbit["object_id"],
                                source=source, elevation_deg=orbit["elevation_deg"], caption=orbit["caption"], **extra)


def test_hull_and_sharpness_tell_good_orbits_from_broken_copies(orbits):
    rng = np.random.default_rng(0)
    for index, orbit in enumerate(orbits):
        others = orbits[:index] + orbits[index + 1:]
        good = corruptions.as_generated(orbit)
        render_cameras = cameras.render_camera(orbit["cam2world"], orbit["intrinsics"])

        def hull_min(candidate):
            return consistency.hull_ious(candidate["images"][..., 3] > 127, render_cameras).min()

        def sharpness_min(candidate):
            return np.nanmin(quality.edge_sharpness(pipeline.composite_on_white(candidate["images"])[0]))

        assert hull_min(good) > 0.8, orbit["object_id"]  # one rigid object: its silhouettes agree
        for kind in ("shuffled", "swapped", "mirrored"):
            broken = corruptions.CORRUPTIONS[kind](orbit, rng, others)
            assert hull_min(broken) < hull_min(good), (orbit["object_id"], kind)
        assert sharpness_min(corruptions.blurred(orbit, rng, others)) < 0.6 < sharpness_min(good)


def test_edge_sharpness_known_answers():
    step = np.ones((1, 32, 32, 3), np.float32)
    step[:, 8:24, 8:24] = 0.2  # a hard-edged square
    assert quality.edge_sharpness(step)[0] == pytest.approx(1.0)
    soft = ndimage.gaussian_filter(step, sigma=(0, 1.5, 1.5, 0), mode="nearest")
    assert quality.edge_sharpness(soft)[0] < 0.5
    assert np.isnan(quality.edge_sharpness(np.ones((1, 8, 8, 3), np.float32))[0])  # nothing there


def test_roc_auc_known_answers():
    assert corruptions.roc_auc([2, 3], [0, 1]) == 1.0
    assert corruptions.roc_auc([0, 1], [2, 3]) == 0.0
    assert corruptions.roc_auc([1, 1], [1, 1]) == 0.5


def test_replace_metadata_keeps_every_other_feature(orbits):
    record = _encode(orbits[0], "synthetic", generation=dict(seed=3))
    parsed = example.parse_example(record)
    parsed.features.feature["other_team/note"].bytes_list.value.append(b"kept")  # a feature we do not know
    replaced = example.replace_metadata(parsed.SerializeToString(), quality=0.25, elevation_deg=12.0)
    again = example.parse_example(replaced)
    assert again.features.feature["other_team/note"].bytes_list.value == [b"kept"]
    assert example.read_metadata(replaced).quality == 0.25 and example.read_metadata(replaced).elevation_deg == 12.0
    assert example.read_generation(replaced) == dict(seed=3)
    np.testing.assert_array_equal(example.decode_orbit(replaced)["images"], orbits[0]["images"])


def test_cli_scores_synthetic_orbits_and_keeps_the_rest(orbits, rendered, checkpoint, tmp_path):
    data = tmp_path / "in"
    data.mkdir()
    rng = np.random.default_rng(1)
    good, broken = corruptions.as_generated(orbits[0]), corruptions.shuffled(orbits[1], rng, orbits)
    with tfrecord.TFRecordWriter(data / "mixed-00000-of-00002.tfrecord") as writer:
        writer.write(_encode(good, "synthetic"))
        writer.write(_encode(orbits[2], "rendered"))
    with tfrecord.TFRecordWriter(data / "mixed-00001-of-00002.tfrecord") as writer:
        writer.write(_encode(dict(broken, object_id="broken"), "synthetic"))
    inputs = {path.name: list(tfrecord.iterate_records(path)) for path in sorted(data.glob("*.tfrecord"))}

    out = tmp_path / "out"
    args = ("curate", f"--checkpoint={checkpoint}", f"--data={data / '*.tfrecord'}", f"--workdir={out}",
            "--config.resolution=32", "--config.hull_resolution=32", "--config.batch_size=2",
            f"--config.elevation.train_data={rendered}")
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 orbits scored in 2 shard(s)" in result.stdout

    for name, records in inputs.items():
        written = list(tfrecord.iterate_records(out / "shards" / name))
        assert len(written) == len(records)
        for before, after in zip(records, written):
            metadata = example.read_metadata(after)
            if metadata.source == "rendered":
                assert after == before  # not selected: copied unchanged
                continue
            assert 0.0 <= metadata.quality <= 1.0
            assert metadata.elevation_deg == example.read_metadata(before).elevation_deg  # elevation.replace is off
            assert example.replace_metadata(after, quality=float("nan")) == example.replace_metadata(
                before, quality=float("nan"))  # nothing else changed
    scores = {row["object_id"]: row for name in inputs for row in curate.read_scores(out / "shards" / name)}
    assert set(scores) == {good["object_id"], "broken"}
    assert set(quality.TERMS) | {"quality", "elevation_estimate"} < set(scores["broken"])
    assert scores["broken"]["hull_iou_min"] < scores[good["object_id"]]["hull_iou_min"]
    summary = json.loads((out / curate.SUMMARY_FILE).read_text())
    assert summary["scored"] == 2 and summary["quality_quantiles"]["0"] <= summary["quality_quantiles"]["1"]
    assert summary["elevation_estimator"]["train_orbits"] + summary["elevation_estimator"]["held_out_orbits"] == 5
    assert "too few" in summary["classifier"]["skipped"]  # 2 orbits: no bootstrap
    assert (out / "elevation.npz").exists()
    assert Image.open(out / curate.SHEET_FILE).size[0] > 0

    # The pipeline's filter keeps the rendered orbit (unknown quality) and the better synthetic one.
    threshold = (scores[good["object_id"]]["quality"] + scores["broken"]["quality"]) / 2
    kept = [pipeline.MetadataFilter(quality_min=threshold)(example.read_metadata(r))
            for name in inputs for r in tfrecord.iterate_records(out / "shards" / name)]
    assert sum(kept) == 2 and kept[1]

    # A restart redoes only what is missing, byte for byte.
    first = (out / "shards" / "mixed-00001-of-00002.tfrecord").read_bytes()
    (out / "shards" / "mixed-00001-of-00002.tfrecord").unlink()
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(1 curated now" in result.stdout
    assert (out / "shards" / "mixed-00001-of-00002.tfrecord").read_bytes() == first


def test_labels_train_the_classifier_that_then_writes_quality(orbits, checkpoint, tmp_path):
    data = tmp_path / "in"
    data.mkdir()
    rng = np.random.default_rng(2)
    with tfrecord.TFRecordWriter(data / "synthetic-00000-of-00001.tfrecord") as writer:
        for index, orbit in enumerate(orbits):
            writer.write(_encode(dict(corruptions.as_generated(orbit), object_id=f"good-{index}"), "synthetic"))
            writer.write(_encode(dict(corruptions.noised(orbit, rng, orbits), object_id=f"bad-{index}"), "synthetic"))
    labels = tmp_path / "labels.txt"
    labels.write_text("# hand labels\n" + "".join(f"good-{i},good\nbad-{i},bad\n" for i in range(len(orbits))))
    config = load_config("curate.py", resolution=32, hull_resolution=24, batch_size=5, classifier__labels=str(labels),
                         classifier__as_quality=True)
    summary = curate.curate(checkpoint, str(data / "*.tfrecord"), tmp_path / "out", config)
    assert summary["classifier"]["labels"] == "labels file" and summary["classifier"]["held_out"] == 2
    rows = {row["object_id"]: row for row in curate.read_scores(tmp_path / "out" / "shards" /
                                                                 "synthetic-00000-of-00001.tfrecord")}
    for record in tfrecord.iterate_records(tmp_path / "out" / "shards" / "synthetic-00000-of-00001.tfrecord"):
        metadata = example.read_metadata(record)
        assert metadata.quality == pytest.approx(rows[metadata.object_id]["p_good"])  # as_quality
    # Noise is what the labels teach: the classifier ranks good above bad on the data it learned.
    assert np.mean([rows[f"good-{i}"]["p_good"] > rows[f"bad-{i}"]["p_good"] for i in range(len(orbits))]) >= 0.8


def test_estimators_known_answers(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6))
    y = 3.0 * x[:, 0] - 2.0 * x[:, 2] + 10.0
    elevation = estimators.ElevationEstimator.fit(x, y, l2=1e-6)
    np.testing.assert_allclose(elevation(x[:5]), y[:5], atol=1e-3)
    labels = (x[:, 1] + 0.5 * x[:, 3] > 0).astype(int)
    classifier = estimators.QualityClassifier.fit(x, labels, l2=1.0)
    assert np.mean((classifier(x) > 0.5) == labels) > 0.95
    classifier.save(tmp_path / "classifier.npz")
    np.testing.assert_allclose(estimators.QualityClassifier.load(tmp_path / "classifier.npz")(x), classifier(x))
    with pytest.raises(errors.InvalidConfigValueError, match="not a saved elevation"):
        estimators.ElevationEstimator.load(tmp_path / "classifier.npz")
    train, held = estimators.held_out_split(10, 0.2)
    assert len(held) == 2 and sorted(np.concatenate([train, held])) == list(range(10))


def test_labels_file_and_bootstrap(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("# comment\nsynthetic/image/a,good\n\nsynthetic/orbit/x,y,bad  # ids may hold commas\n")
    assert estimators.read_labels(path) == {"synthetic/image/a": 1, "synthetic/orbit/x,y": 0}
    path.write_text("a,maybe\n")
    with pytest.raises(errors.InvalidConfigValueError, match="labels.txt:1"):
        estimators.read_labels(path)
    scores = {f"o{i:02d}": float(i) for i in range(30)} | {"nan": float("nan")}
    labels = estimators.bootstrap_labels(scores, 0.2)  # 6 of each: the 20% extremes
    assert labels == {f"o{i:02d}": 0 for i in range(6)} | {f"o{i:02d}": 1 for i in range(24, 30)}
    assert len(estimators.bootstrap_labels(scores, 0.05)) == 10  # at least 5 of each
    with pytest.raises(errors.InvalidConfigValueError, match="too few"):
        estimators.bootstrap_labels({f"o{i}": float(i) for i in range(9)})
