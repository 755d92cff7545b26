"""The error kinds behind the CLI's one-line reports (the CLI itself: test_cli.py)."""

from __future__ import annotations

import pickle

import pytest

from vfusion3d_jax import errors
from vfusion3d_jax.configs import load_config
from vfusion3d_jax.data import tfrecord
from vfusion3d_jax.main import unknown_key_error


def test_each_kind_has_its_own_exit_status_and_keeps_its_builtin_base():
    kinds = [errors.UsageError, errors.UnknownConfigKeyError, errors.InvalidConfigValueError, errors.InputError,
             errors.CorruptDataError, errors.CheckpointError, errors.NonFiniteError]
    codes = [kind.exit_code for kind in kinds]
    assert len(set(codes)) == len(codes) and 1 not in codes and 0 not in codes
    assert issubclass(errors.MissingInputError, FileNotFoundError)
    assert issubclass(errors.MissingCheckpointError, FileNotFoundError)
    assert issubclass(errors.UnknownConfigKeyError, KeyError)
    assert issubclass(errors.InvalidConfigValueError, ValueError)
    assert issubclass(tfrecord.CorruptRecordError, OSError)
    assert str(errors.UnknownConfigKeyError("unknown config key 'x'")) == "unknown config key 'x'"  # not quoted


def test_one_line_joins_message_and_hint():
    error = errors.MissingInputError("no files\n  in folder x").with_hint("give a folder of images")
    assert error.one_line() == "no files in folder x; give a folder of images"
    assert errors.UsageError("unknown flag --a; did you mean --b?").with_hint("see --help").one_line() == (
        "unknown flag --a; did you mean --b? see --help")


def test_corrupt_record_errors_survive_pickling_with_their_hint():
    # Grain's worker processes send errors back pickled.
    error = tfrecord.CorruptRecordError("/data/x.tfrecord", 8, 343699, "data CRC mismatch").with_hint("skip it")
    restored = pickle.loads(pickle.dumps(error))
    assert type(restored) is tfrecord.CorruptRecordError
    assert (restored.path, restored.record_index, restored.offset, restored.reason) == (
        "/data/x.tfrecord", 8, 343699, "data CRC mismatch")
    assert restored.one_line() == "corrupt TFRecord /data/x.tfrecord: record 8 at byte offset 343699: data CRC mismatch; skip it"


def test_the_users_error_is_found_inside_wrapping_errors():
    corrupt = tfrecord.CorruptRecordError("x", 1, 2, "bad")
    try:
        try:
            raise corrupt
        except OSError as inner:
            raise RuntimeError("worker failed") from inner
    except RuntimeError as outer:
        assert errors.find_user_facing(outer) is corrupt
    try:
        try:
            raise corrupt
        except OSError:
            raise RuntimeError("while handling")  # implicit context, no `from`
    except RuntimeError as outer:
        assert errors.find_user_facing(outer) is corrupt
    assert errors.find_user_facing(RuntimeError("a bug")) is None


def test_unknown_keys_suggest_the_closest_existing_key():
    config = load_config("lrm.py:tiny")
    assert unknown_key_error(config, "train.optimizer.learnig_rate").one_line() == (
        "unknown config key 'train.optimizer.learnig_rate'; did you mean 'train.optimizer.learning_rate'?")
    assert unknown_key_error(config, "trian.seed").hint == "did you mean 'train.seed'?"
    far = unknown_key_error(config, "render.zzzzzz")
    assert far.hint == "'render' has: num_coarse, num_importance, resolution"
    with pytest.raises(errors.UnknownConfigKeyError, match="unknown config key 'train.stpes'"):
        load_config("lrm.py:tiny", train__stpes=3)
