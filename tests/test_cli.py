"""The command line as a user calls it: one-line errors with their fix and their own exit status,
default configs that take overrides, `--help` per command.

Each case runs `python -m vfusion3d_jax ...` in a subprocess on real files: TFRecords with a
flipped byte or a truncated tail, a missing checkpoint folder, a glob that matches nothing,
config typos, and a training run whose loss becomes NaN.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import run_cli, write_orbit_folder

from vfusion3d_jax import errors
from vfusion3d_jax.data import tfrecord
from vfusion3d_jax.main import COMMANDS

SHARDS, RECORDS_PER_SHARD = 2, 3

# A few steps of an even smaller tiny model (one compile of ~20 s on a 2-core CPU).
TINY_TRAINING = (
    "--config.data.batch_size=2", "--config.data.read_threads=1", "--config.data.read_buffer_size=2",
    "--config.model.encoder.num_layers=1", "--config.model.transformer.num_layers=1",
    "--config.render.num_coarse=4", "--config.render.num_importance=4",
    "--config.train.stages.low_res.num_steps=4", "--config.train.stages.low_res.target_resolution=16",
    "--config.train.stages.low_res.num_target_views=2", "--config.train.stages.high_res.num_steps=0",
    "--config.train.stages.finetune.num_steps=0", "--config.train.loss.lpips.rendered=0.0",
    "--config.train.loss.lpips.synthetic=0.0", "--config.train.log_every=1", "--config.eval.every=0",
)


def _error_line(result) -> str:
    """The one error line; fails unless there is exactly one and no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A `render-data`-like folder: shards/train-0000{0,1}-of-00002.tfrecord (3 orbits each), one held-out shard."""
    return write_orbit_folder(tmp_path_factory.mktemp("orbits"),
                              {"train": (SHARDS, RECORDS_PER_SHARD), "holdout": (1, RECORDS_PER_SHARD)},
                              num_views=6, resolution=32)


def _damaged_copy(data_dir, tmp_path, *, flip: tuple[int, int] | None = None, truncate_shard: int | None = None):
    """A copy of `data_dir` with a flipped byte in (shard, record) and/or the last 100 bytes of a shard cut."""
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    if flip is not None:
        shard, record = flip
        path = copy / "shards" / f"train-{shard:05d}-of-{SHARDS:05d}.tfrecord"
        offset, length = tfrecord.read_index(path)[record]
        data = bytearray(path.read_bytes())
        data[int(offset) + 12 + int(length) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    if truncate_shard is not None:
        path = copy / "shards" / f"train-{truncate_shard:05d}-of-{SHARDS:05d}.tfrecord"
        path.write_bytes(path.read_bytes()[:-100])
    return copy


# --------------------------------------------------------------------------- usage and configs


def test_the_console_script_is_the_samerun_cli(tmp_path):
    # `make setup` installs it (setup.cfg console_scripts) beside the environment's python.
    script = os.path.join(os.path.dirname(sys.executable), "vfusion3d")
    assert os.access(script, os.X_OK), f"{script} missing: reinstall with `make setup`"
    result = subprocess.run([script, "train", "--config.train.stpes=3", f"--workdir={tmp_path}"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == errors.UnknownConfigKeyError.exit_code
    assert _error_line(result) == "error: unknown config key 'train.stpes'; did you mean 'train.stages'?"
    help_ = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=300)
    assert help_.returncode == 0 and help_.stdout.startswith("usage: vfusion3d <command>")


def test_unknown_command_lists_commands():
    result = run_cli("no-such-command")
    assert result.returncode == errors.UsageError.exit_code
    assert "unknown command" in result.stderr and "render-data" in result.stderr


def test_config_typo_names_the_closest_key(tmp_path):
    result = run_cli("render-data", "--config=configs/data.py:tiny", "--config.resolutoin=16", f"--workdir={tmp_path}")
    assert result.returncode == errors.UnknownConfigKeyError.exit_code
    assert _error_line(result) == "error: unknown config key 'resolutoin'; did you mean 'resolution'?"
    assert not (tmp_path / "shards").exists()
    # Nested keys, with the command's default config (no --config).
    result = run_cli("train", "--config.train.optimizer.learnig_rate=1e-3", f"--workdir={tmp_path}")
    assert result.returncode == errors.UnknownConfigKeyError.exit_code
    assert _error_line(result) == ("error: unknown config key 'train.optimizer.learnig_rate'; "
                                   "did you mean 'train.optimizer.learning_rate'?")


def test_invalid_config_values(tmp_path):
    result = run_cli("train", "--config.train.seed=abc", f"--workdir={tmp_path}")
    assert result.returncode == errors.InvalidConfigValueError.exit_code
    assert _error_line(result).startswith("error: invalid value 'abc' for config key 'train.seed'")
    result = run_cli("train", "--config=configs/lrm.py:tnyi", f"--workdir={tmp_path}")
    assert result.returncode == errors.InvalidConfigValueError.exit_code
    assert "unknown variant 'tnyi'" in _error_line(result)
    result = run_cli("train", "--config=configs/nope.py", f"--workdir={tmp_path}")
    assert result.returncode == errors.InvalidConfigValueError.exit_code
    assert "config file 'configs/nope.py' not found" in _error_line(result)


def test_usage_errors_are_one_line(tmp_path):
    result = run_cli("train")
    assert result.returncode == errors.UsageError.exit_code
    assert _error_line(result).startswith("error: train needs --workdir")
    result = run_cli("train", "--workdri=x")
    assert result.returncode == errors.UsageError.exit_code
    assert _error_line(result).startswith("error: unknown flag --workdri; did you mean --workdir?")
    # convert has no default config (it reads the architecture from the checkpoint): an override needs --config.
    result = run_cli("convert", "--checkpoint=x.pth", f"--workdir={tmp_path}", "--config.model.dtype=float32")
    assert result.returncode == errors.UsageError.exit_code
    assert "convert has no default config" in _error_line(result)


def test_default_configs_take_overrides_from_any_directory(tmp_path):
    # `infer --config.num_frames=8` without --config: the override is accepted; what stops the
    # command is the missing checkpoint, not the flag. Run from outside the repository.
    result = run_cli("infer", "--config.num_frames=8", f"--checkpoint={tmp_path / 'none'}", f"--inputs={tmp_path}",
                  f"--workdir={tmp_path / 'out'}", cwd=tmp_path)
    assert "Unknown command line flag" not in result.stderr
    assert result.returncode == errors.CheckpointError.exit_code
    assert _error_line(result) == (f"error: no checkpoint directory at {tmp_path / 'none'}; pass a training run's "
                                   "--workdir or a `convert` output")


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_of_each_command_lists_its_config_and_variants(name):
    result = run_cli(name, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    command = COMMANDS[name]
    assert result.stdout.startswith(f"usage: python -m vfusion3d_jax {name} ")
    if command.config_file:
        assert f"config file: configs/{command.config_file}" in result.stdout
        if command.variants:
            assert f"variants: {', '.join(command.variants)}" in result.stdout
        if command.default_config:
            assert f"default: configs/{command.default_config}" in result.stdout
    for flag in command.flags:
        assert f"--{flag}" in result.stdout


def test_every_listed_variant_and_default_config_loads():
    from vfusion3d_jax.configs import load_config

    for command in COMMANDS.values():
        for variant in command.variants:
            assert load_config(f"{command.config_file}:{variant}") is not None
        if command.default_config:
            assert load_config(command.default_config) is not None


# --------------------------------------------------------------------------- data, checkpoints, training


def test_a_glob_that_matches_nothing(tmp_path):
    result = run_cli("train", f"--config.data_dir={tmp_path / 'nothing'}", f"--workdir={tmp_path / 'run'}")
    assert result.returncode == errors.InputError.exit_code
    assert _error_line(result).startswith(f"error: no TFRecord shards match '{tmp_path / 'nothing'}/shards/")
    result = run_cli("inspect-data", str(tmp_path / "nothing" / "*.tfrecord"))
    assert result.returncode == errors.InputError.exit_code
    assert "no TFRecord shards at" in _error_line(result)


def test_a_flipped_byte_names_file_record_offset_and_the_fix(tmp_path, data_dir):
    data = _damaged_copy(data_dir, tmp_path, flip=(1, 2))
    offset = int(tfrecord.read_index(data / "shards" / "train-00001-of-00002.tfrecord")[2][0])
    args = ("train", f"--config.data_dir={data}", f"--workdir={tmp_path / 'run'}", *TINY_TRAINING,
            "--config.train.stages.low_res.num_steps=100")  # reads every record before the end
    result = run_cli(*args)
    assert result.returncode == errors.CorruptDataError.exit_code, result.stderr[-3000:]
    assert _error_line(result) == (
        f"error: corrupt TFRecord {data}/shards/train-00001-of-00002.tfrecord: record 2 at byte offset {offset}: "
        "data CRC mismatch; add --config.data.skip_corrupt=true to skip corrupt records and count them")
    # The traceback is kept in the workdir, and printed with --verbose.
    log = (tmp_path / "run" / "error.log").read_text()
    assert "Traceback (most recent call last)" in log and "CorruptRecordError" in log
    verbose = run_cli(*args, "--verbose")
    assert verbose.returncode == errors.CorruptDataError.exit_code
    assert "Traceback (most recent call last)" in verbose.stderr
    assert verbose.stderr.rstrip().splitlines()[-1] == _error_line(result)


def test_a_truncated_shard(tmp_path, data_dir):
    data = _damaged_copy(data_dir, tmp_path, truncate_shard=0)
    result = run_cli("train", f"--config.data_dir={data}", f"--workdir={tmp_path / 'run'}", *TINY_TRAINING)
    assert result.returncode == errors.CorruptDataError.exit_code, result.stderr[-3000:]
    line = _error_line(result)
    assert line.startswith(f"error: corrupt TFRecord {data}/shards/train-00000-of-00002.tfrecord: record 2 ")
    assert "truncated record" in line and line.endswith("--config.data.skip_corrupt=true to skip corrupt records "
                                                         "and count them")


def test_a_non_finite_loss_stops_with_its_status(tmp_path, data_dir):
    # A learning rate of 1e30 blows the parameters up after the first update.
    result = run_cli("train", f"--config.data_dir={data_dir}", f"--workdir={tmp_path / 'run'}", *TINY_TRAINING,
                  "--config.train.optimizer.learning_rate=1e30", "--config.train.optimizer.warmup_steps=0")
    assert result.returncode == errors.NonFiniteError.exit_code, result.stderr[-3000:]
    line = _error_line(result)
    assert line.startswith("error: non-finite training step 2: loss=nan") and "--config.train.nonfinite=skip" in line


def test_skip_corrupt_trains_on_and_reports_the_skipped_records(tmp_path, data_dir):
    # One flipped byte (train-00000, record 1) and a truncated tail (train-00001, its last record 2):
    # with skip_corrupt both are skipped, counted and named, and training goes on to the end.
    data = _damaged_copy(data_dir, tmp_path, flip=(0, 1), truncate_shard=1)
    workdir = tmp_path / "run"
    result = run_cli("train", f"--config.data_dir={data}", f"--workdir={workdir}", *TINY_TRAINING,
                  "--config.data.skip_corrupt=true", "--config.train.stages.low_res.num_steps=6")  # > 2 epochs
    assert result.returncode == 0, result.stderr[-3000:]
    flipped, truncated = (str(data / "shards" / f"train-{shard:05d}-of-00002.tfrecord") for shard in range(SHARDS))
    summary = json.loads((workdir / "summary.json").read_text())["corrupt_records_skipped"]
    assert summary["records"] == 2 and summary["files"] == {flipped: [1], truncated: [2]}
    assert summary["times"] >= 4  # read (and skipped) again each epoch
    assert f"skipped 2 corrupt records ({summary['times']} reads): {flipped} (record 1); {truncated} (record 2)" in (
        result.stdout)
    for path, record in ((flipped, 1), (truncated, 2)):
        assert f"skipped corrupt record {path}: record {record}" in result.stderr
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged] == [1, 2, 3, 4, 5, 6]
    assert logged[-1]["corrupt_records_skipped"] >= 2
