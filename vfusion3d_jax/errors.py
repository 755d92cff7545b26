"""The errors a user can act on, one class per kind, each with its own exit status.

The command line (`main.py`) prints such an error as one line: what is wrong, where, and what
to do (its `hint`), and exits with the kind's `exit_code`; `--verbose` adds the traceback, and
`<workdir>/error.log` keeps it. Anything else is a bug and keeps Python's traceback (status 1).

Library code raises these (or subclasses of them, such as `tfrecord.CorruptRecordError`); each
kind also derives from the built-in exception callers caught before (`FileNotFoundError`,
`ValueError`, ...), so `except ValueError` still works.

| status | kind                        | e.g.                                                       |
|--------|-----------------------------|------------------------------------------------------------|
| 2      | `UsageError`                | unknown command or flag, a missing `--workdir`             |
| 3      | `UnknownConfigKeyError`     | `--config.train.stpes=3`                                   |
| 4      | `InvalidConfigValueError`   | `--config.train.seed=abc`, an unknown variant              |
| 5      | `InputError`                | a data glob that matches nothing, a dataset with no records |
| 6      | `CorruptDataError`          | a flipped byte or a truncated tail in a TFRecord shard      |
| 7      | `CheckpointError`           | no checkpoint in the folder, weights that do not fit        |
| 8      | `NonFiniteError`            | a NaN loss or gradient (`config.train.nonfinite=stop`)      |
"""

from __future__ import annotations


class UserFacingError(Exception):
    """An error the user can fix; `str(error)` says what and where, `hint` what to do."""

    exit_code = 1
    hint = ""  # a class default; `with_hint` sets one per instance (it pickles with the instance)

    def with_hint(self, hint: str) -> UserFacingError:
        self.hint = hint
        return self

    def one_line(self) -> str:
        """The message and the hint on one line."""
        text = " ".join(str(self).split())
        if not self.hint:
            return text
        return f"{text} {self.hint}" if text.endswith(("?", ".")) else f"{text}; {self.hint}"


class UsageError(UserFacingError):
    """The command line is wrong: an unknown command or flag, a required flag missing."""

    exit_code = 2


class UnknownConfigKeyError(UserFacingError, KeyError):
    """A `--config.x` override (or a `load_config` override) names a field the config does not have."""

    exit_code = 3

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InvalidConfigValueError(UserFacingError, ValueError):
    """A config value, config file or variant that cannot be used."""

    exit_code = 4


class InputError(UserFacingError):
    """The input is missing or empty."""

    exit_code = 5


class MissingInputError(InputError, FileNotFoundError):
    """No file matches an input path or glob."""


class EmptyInputError(InputError, ValueError):
    """The input exists but holds nothing to work on."""


class CorruptDataError(UserFacingError, OSError):
    """Stored data whose framing or checksum does not check out."""

    exit_code = 6


class CheckpointError(UserFacingError):
    """A checkpoint that is missing or does not fit."""

    exit_code = 7


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """No checkpoint folder, or no checkpoint in it."""


class InvalidCheckpointError(CheckpointError, ValueError):
    """A checkpoint that is not one of ours, or whose tensors do not fit the model."""


class NonFiniteError(UserFacingError, FloatingPointError):
    """A NaN or infinite value where the state must stay finite."""

    exit_code = 8


def find_user_facing(error: BaseException) -> UserFacingError | None:
    """The first `UserFacingError` in `error`'s chain of causes and contexts, else None.

    Libraries wrap errors that happen inside them (Grain re-raises a worker's error from its
    own code); the user's error is somewhere in the chain.
    """
    seen, pending = set(), [error]
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, UserFacingError):
            return current
        pending += [current.__cause__, current.__context__]
    return None
