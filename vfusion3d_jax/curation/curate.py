"""Curation of orbits: the `curate` command. Orbit shards in, the same shards with scores out.

    python -m vfusion3d_jax curate --checkpoint=LRM_RUN --data='data/synthetic/shards/*.tfrecord' --workdir=OUT

Every orbit of the selected sources (`config.sources`, synthetic by default) gets its
label-free quality (`quality.py`: the LRM's re-renders, the visual hull and edge sharpness,
combined into one score in [0, 1]) written into its record's `meta/quality`; every other
feature of the record, known to this schema or not, is kept as it was, and records of other
sources are copied unchanged. The pipeline then selects what trains, e.g.
`--config.data.quality_min=0.5` (records of unknown quality, such as rendered ones, are kept
unless `keep_unknown_quality` is off).

    OUT/shards/<input shard name>             the records, in their order, with meta/quality
    OUT/shards/<name>.scores.jsonl            per scored orbit: object id, quality and its terms
    OUT/summary.json                          counts, the score's quantiles, what was skipped
    OUT/sheet.png                             the lowest- and highest-scoring orbits this run scored, view by view
    OUT/curate_config.json                    the settings the shards were made with

Learned curation (`estimators.py`, `config.classifier`, `config.elevation`): a quality
classifier and an elevation estimator on the LRM encoder's features add `p_good` and
`elevation_estimate` to each orbit's scores, and may replace `meta/quality` and
`meta/elevation_deg`; their held-out accuracy and error go into the summary.

Shards are written atomically and split over processes as `generate` splits them; a restarted
job skips the shards that exist. A corrupt record ends its shard's reading (the records before
it are kept, the rest listed as skipped); an orbit with fewer than two views keeps NaN.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import tqdm
from absl import flags, logging
from PIL import Image

from vfusion3d_jax import errors, visualize
from vfusion3d_jax.configs import load_config
from vfusion3d_jax.curation import estimators
from vfusion3d_jax.curation.estimators import ImageFeatures
from vfusion3d_jax.curation.quality import TERMS, QualityScorer
from vfusion3d_jax.data import example, pipeline, storage, tfrecord
from vfusion3d_jax.data.pipeline import composite_on_white
from vfusion3d_jax.inference.generate import own_shards
from vfusion3d_jax.inference.reconstruct import Reconstructor

SHARD_DIR = "shards"
SUMMARY_FILE = "summary.json"
SHEET_FILE = "sheet.png"
SETTINGS_FILE = "curate_config.json"
SOURCES = ("synthetic", "rendered", "all")
SHEET_VIEWS = 8  # views per sheet row
# A classifier bootstrapped from the scores learns from the first this many scored orbits (their
# features are kept in memory until the scores are known).
MAX_BOOTSTRAP_ORBITS = 20_000


def _scores_path(path: Path) -> Path:
    return path.with_name(path.name + ".scores.jsonl")


def _sheet_row(orbit: dict) -> np.ndarray:
    views = np.linspace(0, orbit["num_views"] - 1, min(SHEET_VIEWS, orbit["num_views"])).round().astype(int)
    return np.concatenate(list(composite_on_white(orbit["images"][views])[0]), axis=1)


class _Extremes:
    """The `rows` lowest- and highest-scoring orbits seen so far, with their sheet rows."""

    def __init__(self, rows: int):
        self.rows = rows
        self.items: list[tuple[float, str, np.ndarray]] = []

    def add(self, quality: float, object_id: str, orbit: dict) -> None:
        if self.rows and math.isfinite(quality):
            self.items.append((quality, object_id, _sheet_row(orbit)))
            self.items.sort(key=lambda item: item[0])
            if len(self.items) > 2 * self.rows:
                self.items = self.items[:self.rows] + self.items[-self.rows:]

    def sheet(self) -> np.ndarray | None:
        if not self.items:
            return None
        return visualize.labelled_rows([(f"{object_id}  quality {quality:.3f}", row)
                                        for quality, object_id, row in self.items])


@dataclasses.dataclass
class _Learned:
    """The learned estimators of a job, and the features of the orbits it scored (for a bootstrap)."""

    features: ImageFeatures
    classifier: estimators.QualityClassifier | None = None
    elevation: estimators.ElevationEstimator | None = None
    scored_features: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def annotate(self, orbits: list[dict], rows: list[dict]) -> None:
        """Adds p_good / elevation_estimate to the score rows, keeping the features for a bootstrap."""
        features = self.features.of_orbits(orbits)
        for orbit, row, feature in zip(orbits, rows, features):
            if len(self.scored_features) < MAX_BOOTSTRAP_ORBITS:
                self.scored_features[orbit["object_id"]] = feature
            if self.classifier is not None:
                row["p_good"] = float(self.classifier(feature[None])[0])
            if self.elevation is not None:
                row["elevation_estimate"] = float(self.elevation(feature[None])[0])


def curate_shard(source: str, path: Path, scorer: QualityScorer, config: ml_collections.ConfigDict,
                 extremes: _Extremes, bar: tqdm.tqdm, learned: _Learned) -> dict:
    """Scores one input shard into `path` (atomically) and its scores file; returns its summary."""
    start = time.perf_counter()
    records, skipped = [], []
    try:
        for record in tfrecord.iterate_records(source):
            records.append(record)
    except tfrecord.CorruptRecordError as error:
        skipped.append(dict(input=source, reason=f"{error}; the rest of the shard is skipped"))
    chosen, scores = [], {}
    for index, record in enumerate(records):
        metadata = example.read_metadata(record)
        if config.sources in ("all", metadata.source):
            if metadata.num_views >= 2:
                chosen.append(index)
            else:
                skipped.append(dict(input=f"{source}#{index}", reason="fewer than two views: quality stays NaN"))
    for first in range(0, len(chosen), config.batch_size):
        batch = chosen[first:first + config.batch_size]
        orbits = [example.decode_orbit(records[index]) for index in batch]
        rows = [dict(object_id=orbit["object_id"], **terms) for orbit, terms in zip(orbits, scorer.terms(orbits))]
        learned.annotate(orbits, rows)
        for index, orbit, row in zip(batch, orbits, rows):
            scores[index] = row
            extremes.add(row["quality"], orbit["object_id"], orbit)
        bar.update(len(batch))
    with tfrecord.TFRecordWriter(path) as writer:
        for index, record in enumerate(records):
            row = scores.get(index)
            if row is None:
                writer.write(record)
                continue
            quality = row["p_good"] if config.classifier.as_quality else row["quality"]
            elevation = row["elevation_estimate"] if config.elevation.replace else None
            writer.write(example.replace_metadata(record, quality=quality, elevation_deg=elevation))
    lines = "".join(json.dumps(dict(shard=path.name, **scores[index])) + "\n" for index in sorted(scores))
    storage.write_text_atomically(_scores_path(path), lines)
    return dict(shard=path.name, records=len(records), scored=len(scores), skipped=skipped,
                seconds=round(time.perf_counter() - start, 3))


def _orbits_of(glob: str, keep=lambda metadata: True) -> list[dict]:
    """Decoded orbits of the shards `glob` whose metadata `keep` accepts."""
    orbits = []
    for path in pipeline.expand_paths(glob):
        for record in tfrecord.iterate_records(path):
            if keep(example.read_metadata(record)):
                orbits.append(example.decode_orbit(record))
    return orbits


def _fit_elevation(config: ml_collections.ConfigDict, features: ImageFeatures, workdir: Path, report: dict
                   ) -> estimators.ElevationEstimator | None:
    """The elevation estimator of `config.elevation`: loaded, or fitted on rendered orbits (then saved)."""
    if config.estimator:
        return estimators.ElevationEstimator.load(config.estimator)
    if not config.train_data:
        return None
    orbits = _orbits_of(config.train_data, lambda metadata: metadata.source == "rendered")
    if len(orbits) < 4:
        raise errors.EmptyInputError(f"elevation.train_data {config.train_data} has {len(orbits)} rendered orbits; "
                                     "the estimator needs at least 4")
    x, y = features.of_orbits(orbits), np.array([orbit["elevation_deg"] for orbit in orbits])
    train, held = estimators.held_out_split(len(orbits), config.held_out_fraction)
    error = np.abs(estimators.ElevationEstimator.fit(x[train], y[train])(x[held]) - y[held])
    report.update(elevation_estimator=dict(
        train_orbits=len(train), held_out_orbits=len(held), held_out_mean_abs_error_deg=float(error.mean()),
        predict_the_mean_error_deg=float(np.abs(y[train].mean() - y[held]).mean())))
    estimator = estimators.ElevationEstimator.fit(x, y)  # then on all of them
    estimator.save(workdir / "elevation.npz")
    return estimator


def _fit_classifier(config: ml_collections.ConfigDict, features: ImageFeatures, data: str, report: dict
                    ) -> estimators.QualityClassifier | None:
    """The classifier of `config.classifier` when it exists before scoring: loaded, or fitted on labels."""
    if config.model:
        return estimators.QualityClassifier.load(config.model)
    if not config.labels:
        if config.as_quality:
            raise errors.InvalidConfigValueError("classifier.as_quality needs classifier.model or classifier.labels")
        return None
    labels = estimators.read_labels(config.labels)
    orbits = _orbits_of(data, lambda metadata: metadata.object_id in labels)
    missing = sorted(set(labels) - {orbit["object_id"] for orbit in orbits})
    if missing:
        logging.warning("%d labelled objects are not in the data, e.g. %s", len(missing), missing[:3])
    x, y = features.of_orbits(orbits), np.array([labels[orbit["object_id"]] for orbit in orbits])
    report.update(classifier=_classifier_accuracy(x, y, config.held_out_fraction, "labels file"))
    return estimators.QualityClassifier.fit(x, y)


def _classifier_accuracy(x: np.ndarray, y: np.ndarray, held_out_fraction: float, labels: str) -> dict:
    train, held = estimators.held_out_split(len(y), held_out_fraction)
    predicted = estimators.QualityClassifier.fit(x[train], y[train])(x[held]) > 0.5
    return dict(labels=labels, train=len(train), held_out=len(held),
                held_out_accuracy=float(np.mean(predicted == y[held].astype(bool))))


def read_scores(path: Path) -> list[dict]:
    """The per-orbit scores that `curate` wrote beside an output shard."""
    scores_path = _scores_path(path)
    if not scores_path.exists():
        return []
    return [json.loads(line) for line in scores_path.read_text().splitlines() if line.strip()]


def curate(checkpoint: str, data: str, workdir: str | Path, config: ml_collections.ConfigDict | None = None,
           scorer: QualityScorer | None = None) -> dict:
    """Scores the orbits of the shards `data` (globs, comma-separated) into `workdir`; returns the summary."""
    start = time.perf_counter()
    config = config if config is not None else load_config("curate.py")
    if config.sources not in SOURCES:
        raise errors.InvalidConfigValueError(f"config.sources must be one of {SOURCES}, got {config.sources!r}")
    sources = [Path(path) for path in pipeline.expand_paths(data)]
    names = [path.name for path in sources]
    if len(set(names)) != len(names):
        raise errors.InvalidConfigValueError("input shards with the same file name would overwrite each other: "
                                             f"{sorted({n for n in names if names.count(n) > 1})[:3]}")
    workdir = Path(workdir)
    shard_dir = workdir / SHARD_DIR
    shard_dir.mkdir(parents=True, exist_ok=True)
    storage.claim_workdir(workdir / SETTINGS_FILE, dict(config.to_dict(), checkpoint=str(checkpoint),
                                                        data=[str(p) for p in sources]), "curate")
    if scorer is None:
        reconstructor = Reconstructor.from_checkpoint(
            str(checkpoint), ml_collections.ConfigDict(dict(batch_size=config.batch_size)))
        scorer = QualityScorer(reconstructor, resolution=config.resolution, hull_resolution=config.hull_resolution)
    report: dict = {}
    features = ImageFeatures(scorer.reconstructor)
    learned = _Learned(features, _fit_classifier(config.classifier, features, data, report),
                       _fit_elevation(config.elevation, features, workdir, report))
    mine = own_shards(len(sources), jax.process_index(), jax.process_count())
    pending = [index for index in mine if not (shard_dir / names[index]).exists()]
    logging.info("curate: %d shards, this process writes %d (%d already complete)", len(sources), len(mine),
                 len(mine) - len(pending))
    extremes = _Extremes(config.sheet_rows)
    shard_summaries = []
    with tqdm.tqdm(desc="curate", unit="orbit", disable=jax.process_index() != 0) as bar:
        for index in pending:
            shard_summaries.append(curate_shard(str(sources[index]), shard_dir / names[index], scorer, config,
                                                extremes, bar, learned))
    rows = [row for index in mine for row in read_scores(shard_dir / names[index])]
    qualities = [row["quality"] for row in rows]
    if learned.classifier is None and not config.classifier.model and learned.scored_features:
        # No labels: the label-free score's extremes teach the classifier (saved for later jobs).
        try:
            labels = estimators.bootstrap_labels({row["object_id"]: row["quality"] for row in rows
                                                  if row["object_id"] in learned.scored_features},
                                                 config.classifier.bootstrap_fraction)
            ids = sorted(labels)
            x, y = np.stack([learned.scored_features[i] for i in ids]), np.array([labels[i] for i in ids])
            report.update(classifier=_classifier_accuracy(x, y, config.classifier.held_out_fraction,
                                                          "bootstrapped from the label-free score's extremes"))
            estimators.QualityClassifier.fit(x, y).save(workdir / "classifier.npz")
        except errors.InvalidConfigValueError as error:  # too few orbits: the scores stand alone
            report.update(classifier=dict(skipped=str(error)))
    finite = np.asarray([q for q in qualities if math.isfinite(q)], np.float64)
    skipped = [item for summary in shard_summaries for item in summary["skipped"]]
    summary = dict(
        shard_dir=str(shard_dir), shards=len(mine), shards_curated_now=len(pending), scored=len(qualities),
        quality_quantiles={f"{q:g}": float(np.quantile(finite, q)) for q in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)}
        if finite.size else {},
        quality_mean=float(finite.mean()) if finite.size else None, terms=list(TERMS),
        seconds=round(time.perf_counter() - start, 2), skipped=skipped, **report)
    suffix = "" if jax.process_count() == 1 else f".process{jax.process_index():03d}"
    storage.write_json_atomically(workdir / (Path(SUMMARY_FILE).stem + suffix + ".json"), summary)
    sheet = extremes.sheet()
    if sheet is not None:
        Image.fromarray(sheet).save(workdir / (Path(SHEET_FILE).stem + suffix + ".png"))
    return summary


def format_summary(summary: dict) -> str:
    quantiles = summary["quality_quantiles"]
    spread = (f"; quality min {quantiles['0']:.3f}, median {quantiles['0.5']:.3f}, max {quantiles['1']:.3f}"
              if quantiles else "")
    lines = [f"{summary['scored']} orbits scored in {summary['shards']} shard(s) under {summary['shard_dir']} "
             f"({summary['shards_curated_now']} curated now, {summary['seconds']} s){spread}"]
    if "classifier" in summary:
        classifier = summary["classifier"]
        lines.append(f"quality classifier: {classifier['skipped']}" if "skipped" in classifier else
                     f"quality classifier ({classifier['labels']}): held-out accuracy "
                     f"{classifier['held_out_accuracy']:.3f} on {classifier['held_out']} orbits")
    if "elevation_estimator" in summary:
        elevation = summary["elevation_estimator"]
        lines.append(f"elevation estimator: held-out error {elevation['held_out_mean_abs_error_deg']:.1f} deg on "
                     f"{elevation['held_out_orbits']} rendered orbits (predicting the mean: "
                     f"{elevation['predict_the_mean_error_deg']:.1f} deg)")
    lines += [f"  skipped {item['input']}: {item['reason']}" for item in summary["skipped"][:20]]
    return "\n".join(lines)


def curate_command(config: ml_collections.ConfigDict | None, workdir: str | None, args: list[str]) -> None:
    """CLI `curate`: --checkpoint=LRM_DIR --data=GLOB --workdir=OUT."""
    if args:
        raise errors.UsageError(f"curate takes no positional arguments, got {args}")
    checkpoint, data = flags.FLAGS.checkpoint, flags.FLAGS.data
    if not checkpoint or not data or not workdir:
        raise errors.UsageError("curate needs --checkpoint=DIR (an LRM run or `convert` output), --data=GLOB "
                                "(orbit shards) and --workdir=OUT")
    print(format_summary(curate(checkpoint, data, workdir, config)))
