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

Shards are written atomically and split over processes as `generate` splits them; a restarted
job skips the shards that exist. A corrupt record ends its shard's reading (the records before
it are kept, the rest listed as skipped); an orbit with fewer than two views keeps NaN.
"""

from __future__ import annotations

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


def curate_shard(source: str, path: Path, scorer: QualityScorer, config: ml_collections.ConfigDict,
                 extremes: _Extremes, bar: tqdm.tqdm) -> dict:
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
        for index, orbit, terms in zip(batch, orbits, scorer.terms(orbits)):
            scores[index] = dict(object_id=orbit["object_id"], **terms)
            extremes.add(terms["quality"], orbit["object_id"], orbit)
        bar.update(len(batch))
    with tfrecord.TFRecordWriter(path) as writer:
        for index, record in enumerate(records):
            writer.write(example.replace_metadata(record, quality=scores[index]["quality"])
                         if index in scores else record)
    lines = "".join(json.dumps(dict(shard=path.name, **scores[index])) + "\n" for index in sorted(scores))
    storage.write_text_atomically(_scores_path(path), lines)
    return dict(shard=path.name, records=len(records), scored=len(scores), skipped=skipped,
                seconds=round(time.perf_counter() - start, 3))


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
    mine = own_shards(len(sources), jax.process_index(), jax.process_count())
    pending = [index for index in mine if not (shard_dir / names[index]).exists()]
    logging.info("curate: %d shards, this process writes %d (%d already complete)", len(sources), len(mine),
                 len(mine) - len(pending))
    extremes = _Extremes(config.sheet_rows)
    shard_summaries = []
    with tqdm.tqdm(desc="curate", unit="orbit", disable=jax.process_index() != 0) as bar:
        for index in pending:
            shard_summaries.append(curate_shard(str(sources[index]), shard_dir / names[index], scorer, config,
                                                extremes, bar))
    qualities = [row["quality"] for index in mine for row in read_scores(shard_dir / names[index])]
    finite = np.asarray([q for q in qualities if math.isfinite(q)], np.float64)
    skipped = [item for summary in shard_summaries for item in summary["skipped"]]
    summary = dict(
        shard_dir=str(shard_dir), shards=len(mine), shards_curated_now=len(pending), scored=len(qualities),
        quality_quantiles={f"{q:g}": float(np.quantile(finite, q)) for q in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)}
        if finite.size else {},
        quality_mean=float(finite.mean()) if finite.size else None, terms=list(TERMS),
        seconds=round(time.perf_counter() - start, 2), skipped=skipped)
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
