"""The one command line (`vfusion3d`, or `python -m vfusion3d_jax`).

    vfusion3d <command> [--config=configs/<file>.py:<variant>] [--config.x.y=VALUE ...] --workdir=DIR

Every command with a config has a default one (`vfusion3d <command> --help` names it and its
variants), so `--config.x.y=VALUE` overrides work without `--config`; a key the config does not
have is an error. Each command lives in its own module and is imported only when it runs, so
`--help` and small commands start fast.

Failures the user can fix (`errors.UserFacingError`: corrupt data, missing input, a bad
checkpoint, a config typo, ...) are printed as one line, `error: what, where; what to do`, and
exit with the kind's status (errors.py); `--verbose` prints the traceback too, and
`<workdir>/error.log` keeps it. Anything else is a bug: Python's traceback, status 1.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import re
import sys
import traceback

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from vfusion3d_jax import errors
from vfusion3d_jax.configs import CONFIG_DIR, load_config


@dataclasses.dataclass(frozen=True)
class Command:
    """A command: where it lives, what it takes, and its config file."""

    module: str
    function: str  # called as function(config, workdir, positional args)
    help: str
    arguments: str  # the usage line after the command name
    flags: tuple[str, ...] = ("workdir",)
    config_file: str | None = None  # in configs/
    variants: tuple[str, ...] = ()  # of config_file; () = get_config() takes no variant
    default_variant: str | None = None  # used without --config; None (with variants) = no default config

    @property
    def default_config(self) -> str | None:
        """`file.py[:variant]` used when the command line names no config; None if there is none."""
        if self.config_file is None or (self.variants and self.default_variant is None):
            return None
        return f"{self.config_file}:{self.default_variant}" if self.default_variant else self.config_file


_LRM_VARIANTS = ("fixture", "tiny", "small", "base", "large")
COMMANDS = {
    "demo": Command("vfusion3d_jax.demo", "run_demo", "the whole system on embedded defaults", "[--workdir=DIR]",
                    config_file="demo.py"),
    "render-data": Command("vfusion3d_jax.data.render_assets", "render_dataset",
                           "render 3D assets into orbit TFRecords", "--workdir=DIR",
                           config_file="data.py", variants=("builtin", "demo", "tiny"), default_variant="builtin"),
    "inspect-data": Command("vfusion3d_jax.data.inspect", "inspect_dataset",
                            "statistics and a contact sheet of TFRecords", "PATH [--workdir=DIR]"),
    "train": Command("vfusion3d_jax.train.trainer", "train_command", "train the triplane LRM (sharded, resumable)",
                     "--workdir=DIR", config_file="lrm.py", variants=_LRM_VARIANTS, default_variant="tiny"),
    "convert": Command("vfusion3d_jax.models.convert", "convert_command",
                       "import official VFusion3D weights into Orbax", "--checkpoint=WEIGHTS --workdir=DIR",
                       flags=("checkpoint", "workdir"), config_file="lrm.py", variants=_LRM_VARIANTS),
    "infer": Command("vfusion3d_jax.inference.infer", "infer_command",
                     "images to turntable videos and coloured meshes",
                     "--checkpoint=DIR --inputs=IMAGE_OR_FOLDER --workdir=DIR", flags=("checkpoint", "inputs", "workdir"),
                     config_file="infer.py", variants=("infer", "evaluate"), default_variant="infer"),
    "evaluate": Command("vfusion3d_jax.inference.evaluate", "evaluate_command",
                        "PSNR / SSIM / LPIPS / Chamfer of a checkpoint on held-out orbits",
                        "--checkpoint=DIR --data=GLOB --workdir=DIR", flags=("checkpoint", "data", "workdir"),
                        config_file="infer.py", variants=("infer", "evaluate"), default_variant="evaluate"),
}
# What a command without a default config does instead.
_NO_DEFAULT_CONFIG = {
    "convert": "without --config the architecture is read from the checkpoint",
    "inspect-data": "it takes no config: the data describe themselves",
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file `path.py:variant`.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory of the command.")
flags.DEFINE_string("checkpoint", None, "`convert`: official weights (.pth/.safetensors); `infer`, `evaluate`: "
                    "a training run's workdir or a `convert` output.")
flags.DEFINE_string("inputs", None, "`infer`: an image, a folder of images or a glob.")
flags.DEFINE_string("data", None, "`evaluate`: orbit TFRecords (a glob; several separated by commas).")
flags.DEFINE_bool("verbose", False, "On an error, print its traceback as well as the one-line message.")

ERROR_LOG = "error.log"  # in the workdir: the traceback of the error that stopped the command
_HELP_FLAGS = ("-h", "--help", "-?", "--helpshort")
_CONFIG_FLAG = re.compile(r"^--?config(=|$)")
_OVERRIDE_FLAG = re.compile(r"^--?(?:no)?config\.([^=]+)")


def _program() -> str:
    return "vfusion3d" if os.path.basename(sys.argv[0]) == "vfusion3d" else "python -m vfusion3d_jax"


def _usage() -> str:
    lines = [f"usage: {_program()} <command> [--config=FILE.py:VARIANT] [--config.FIELD=VALUE ...] [--workdir=DIR]",
             "commands:"]
    lines += [f"  {name:14s} {command.help}" for name, command in COMMANDS.items()]
    lines.append(f"`{_program()} <command> --help` lists a command's flags, config file and variants.")
    return "\n".join(lines)


def command_help(name: str) -> str:
    """`<command> --help`: its usage, config file, default config and variants, and flags."""
    command = COMMANDS[name]
    config_arg = ""
    if command.config_file:
        config_arg = f" [--config=configs/{command.config_file}{':VARIANT' if command.variants else ''}]"
        config_arg += " [--config.FIELD=VALUE ...]"
    lines = [f"usage: {_program()} {name} {command.arguments}{config_arg}", f"  {command.help}", ""]
    if command.config_file:
        lines.append(f"config file: configs/{command.config_file} (its fields and their meanings are in it)")
        if command.variants:
            lines.append(f"  variants: {', '.join(command.variants)}")
        if command.default_config:
            lines.append(f"  default: configs/{command.default_config}")
        else:
            lines.append(f"  default: none ({_NO_DEFAULT_CONFIG[name]})")
        lines.append("  override any field with --config.FIELD=VALUE; a field the config does not have is an error")
    else:
        lines.append(f"config: none ({_NO_DEFAULT_CONFIG[name]})")
    lines += ["", "flags:"]
    for flag_name in (*command.flags, "verbose"):
        lines.append(f"  --{flag_name:12s} {flags.FLAGS[flag_name].help}")
    return "\n".join(lines)


def _config_spec(argv: list[str]) -> tuple[int, str] | None:
    """(position, `file.py:variant`) of the --config value in argv, or None."""
    for position, arg in enumerate(argv):
        if _CONFIG_FLAG.match(arg):
            if "=" in arg:
                return position, arg.split("=", 1)[1]
            return (position, argv[position + 1]) if position + 1 < len(argv) else None
    return None


def _resolve_config_file(spec: str) -> str:
    """`spec` with its file made an absolute path: as given, else in the repository's configs/."""
    path, colon, variant = spec.partition(":")
    for candidate in (path, os.path.join(CONFIG_DIR, os.path.basename(path))):
        if os.path.isfile(candidate):
            return os.path.abspath(candidate) + colon + variant
    available = ", ".join(sorted(p.name for p in CONFIG_DIR.glob("*.py")))
    raise errors.InvalidConfigValueError(f"config file {path!r} not found").with_hint(
        f"config files: {available} (in {CONFIG_DIR})")


def prepare_argv(argv: list[str]) -> list[str]:
    """The command line as config_flags must see it: the command's default config inserted when
    none is named (so `--config.x=...` overrides it), the config file as an absolute path."""
    argv = list(argv)
    command = COMMANDS[argv[1]]
    found = _config_spec(argv)
    if found is None:
        if command.default_config is None:
            override = next((arg for arg in argv if _OVERRIDE_FLAG.match(arg)), None)
            if override is not None:
                raise errors.UsageError(f"{argv[1]} has no default config to apply {override} to").with_hint(
                    f"{_NO_DEFAULT_CONFIG[argv[1]]}"
                    + (f"; name one: --config=configs/{command.config_file}:VARIANT" if command.config_file else ""))
            return argv
        return argv[:2] + [f"--config={CONFIG_DIR / command.default_config}"] + argv[2:]
    position, spec = found
    resolved = _resolve_config_file(spec)
    if "=" in argv[position]:
        argv[position] = f"--config={resolved}"
    else:
        argv[position + 1] = resolved
    return argv


def _flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        keys.append(prefix + key)
        if isinstance(value, ml_collections.ConfigDict):
            keys += _flat_keys(value, prefix + key + ".")
    return keys


def unknown_key_error(config: ml_collections.ConfigDict, key: str) -> errors.UnknownConfigKeyError:
    """The error for override `key` that `config` lacks, with the closest existing key."""
    keys = _flat_keys(config)
    parent = key.rpartition(".")[0]
    siblings = [k for k in keys if k.rpartition(".")[0] == parent]
    others = [k for k in keys if not key.startswith(k + ".")]  # never suggest the key's own parents
    close = (difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
             or difflib.get_close_matches(key, others, n=1, cutoff=0.6))
    error = errors.UnknownConfigKeyError(f"unknown config key {key!r}")
    if close:
        return error.with_hint(f"did you mean {close[0]!r}?")
    where = f"'{parent}'" if parent in keys else "the config"
    return error.with_hint(f"{where} has: {', '.join(k.rpartition('.')[2] for k in siblings or keys[:20])}")


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with config_flags' failures turned into one-line errors."""
    found = _config_spec(argv)
    spec = found[1] if found else None
    try:
        return flags.FLAGS(argv)
    except flags.IllegalFlagValueError as error:
        message = str(error)
        if message.startswith("flag --config="):  # the config file failed to load (e.g. an unknown variant)
            reason = [line.strip() for line in message.splitlines() if line.strip()][-1]
            reason = re.sub(r"^\w+(Error|Exception): ", "", reason)
            raise errors.InvalidConfigValueError(f"config {_display(spec)}: {reason}") from error
        match = re.match(r"flag --config\.([^=]+)=(.*?): (.*)", message, re.S)
        if match:
            key, value, reason = match.groups()
            current = _current_value(spec, key)
            raise errors.InvalidConfigValueError(f"invalid value {value!r} for config key {key!r}: {reason}").with_hint(
                f"it is now {current!r}" if current is not None else "see the config file for its type") from error
        raise errors.UsageError(message) from error
    except flags.Error as error:
        message = str(error)
        typo = re.match(r"Unknown command line flag '([^']+)'\. Did you mean: (.+?) \?$", message)
        if typo:
            message = f"unknown flag --{typo.group(1)}; did you mean --{typo.group(2).split(',')[0].strip()}?"
        raise errors.UsageError(message).with_hint(f"`{_program()} {argv[1]} --help` lists the flags") from error
    except (AttributeError, KeyError) as error:  # config_flags meets an override the locked config lacks
        config = load_config(spec)
        for arg in argv:
            match = _OVERRIDE_FLAG.match(arg)
            if match and not _has_key(config, match.group(1)):
                raise unknown_key_error(config, match.group(1)) from error
        raise


def _display(spec: str | None) -> str | None:
    """A config spec as the user would write it: relative to the working directory when inside it."""
    if spec is None or not os.path.isabs(spec):
        return spec
    cwd = os.getcwd()
    return os.path.relpath(spec, cwd) if spec.startswith(cwd + os.sep) else spec


def _has_key(config: ml_collections.ConfigDict, key: str) -> bool:
    for part in key.split("."):
        if not isinstance(config, ml_collections.ConfigDict) or part not in config:
            return False
        config = config[part]
    return True


def _current_value(spec: str | None, key: str):
    try:
        config = load_config(spec)
        for part in key.split("."):
            config = config[part]
        return config
    except Exception:  # only a hint: never hide the error being reported
        return None


def _quiet_library_info(record) -> bool:
    """Keeps Orbax's per-save INFO chatter out of the log (warnings and errors still pass)."""
    return record.levelno > logging.converter.ABSL_TO_STANDARD[logging.INFO] or "/orbax/" not in record.pathname


def main(argv: list[str]) -> None:
    if logging.get_verbosity() <= logging.INFO:
        logging.get_absl_handler().addFilter(_quiet_library_info)
    command = COMMANDS[argv[1]]
    function = getattr(importlib.import_module(command.module), command.function)
    logging.info("running %s", argv[1])
    try:
        function(_CONFIG.value, _WORKDIR.value, argv[2:])
    except app.UsageError as error:
        raise errors.UsageError(str(error)).with_hint(f"`{_program()} {argv[1]} --help` lists the flags") from error


def report(error: errors.UserFacingError, cause: BaseException, argv: list[str], verbose: bool) -> int:
    """Prints `error` as one line (the traceback too when `verbose`), keeps the traceback in the
    workdir's error.log when there is a workdir; returns the exit status."""
    trace = "".join(traceback.format_exception(cause))
    if verbose:
        print(trace, file=sys.stderr, end="")
    line = error.one_line()
    print(f"error: {line}", file=sys.stderr, flush=True)
    workdir = flags.FLAGS["workdir"].value if flags.FLAGS.is_parsed() else None
    if workdir and os.path.isdir(workdir):
        try:
            with open(os.path.join(workdir, ERROR_LOG), "w") as file:
                file.write(f"$ {_program()} {' '.join(argv[1:])}\nerror: {line}\n\n{trace}")
        except OSError:
            pass
    return error.exit_code


def run(argv: list[str] | None = None) -> None:
    """The console script `vfusion3d` and `python -m vfusion3d_jax`."""
    argv = list(sys.argv if argv is None else argv)
    verbose = any(arg in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1") for arg in argv)
    if len(argv) >= 2 and argv[1] in _HELP_FLAGS:
        print(_usage())
        sys.exit(0)
    if len(argv) < 2 or argv[1] not in COMMANDS:
        problem = f"unknown command {argv[1]!r}" if len(argv) >= 2 else "no command given"
        print(f"error: {problem}\n{_usage()}", file=sys.stderr)
        sys.exit(errors.UsageError.exit_code)
    if any(arg in _HELP_FLAGS for arg in argv[2:]):
        print(command_help(argv[1]))
        sys.exit(0)
    try:
        argv = prepare_argv(argv)
        # config_flags reads the overrides from sys.argv itself.
        sys.argv = argv
        app.run(main, argv=argv, flags_parser=_parse_flags)
    except Exception as raised:  # SystemExit (a normal exit) passes
        error = errors.find_user_facing(raised)
        if error is None:
            raise
        sys.exit(report(error, raised, argv, verbose))
