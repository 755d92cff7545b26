"""The one command line.

    python -m vfusion3d_jax <command> --config=configs/<file>.py:<variant> --workdir=DIR

Config overrides follow the config flag: `--config.render.resolution=64`; a key the
config does not have is an error. Each command lives in its own module and is
imported only when it runs, so `--help` and small commands start fast.
"""

from __future__ import annotations

import importlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

# command -> (module, function, one-line help). Every function takes (config, workdir, args).
COMMANDS = {
    "demo": ("vfusion3d_jax.demo", "run_demo", "the whole system on embedded defaults"),
    "render-data": ("vfusion3d_jax.data.render_assets", "render_dataset", "render 3D assets into orbit TFRecords"),
    "inspect-data": ("vfusion3d_jax.data.inspect", "inspect_dataset", "statistics and a contact sheet of TFRecords"),
    "train": ("vfusion3d_jax.train.trainer", "train_command", "train the triplane LRM (sharded, resumable)"),
    "convert": ("vfusion3d_jax.models.convert", "convert_command", "import official VFusion3D weights into Orbax"),
    "infer": ("vfusion3d_jax.inference.infer", "infer_command", "images to turntable videos and coloured meshes"),
    "evaluate": ("vfusion3d_jax.inference.evaluate", "evaluate_command",
                 "PSNR / SSIM / LPIPS / Chamfer of a checkpoint on held-out orbits"),
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file `path.py:variant`.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory of the command.")
flags.DEFINE_string("checkpoint", None, "`convert`: official weights (.pth/.safetensors); `infer`, `evaluate`: "
                    "a training run's workdir or a `convert` output.")
flags.DEFINE_string("inputs", None, "`infer`: an image, a folder of images or a glob.")
flags.DEFINE_string("data", None, "`evaluate`: orbit TFRecords (a glob; several separated by commas).")


def _usage() -> str:
    lines = ["usage: python -m vfusion3d_jax <command> [--config=FILE.py:VARIANT] [--workdir=DIR]", "commands:"]
    lines += [f"  {name:14s} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def _quiet_library_info(record) -> bool:
    """Keeps Orbax's per-save INFO chatter out of the log (warnings and errors still pass)."""
    return record.levelno > logging.converter.ABSL_TO_STANDARD[logging.INFO] or "/orbax/" not in record.pathname


def main(argv: list[str]) -> None:
    if logging.get_verbosity() <= logging.INFO:
        logging.get_absl_handler().addFilter(_quiet_library_info)
    if len(argv) < 2 or argv[1] not in COMMANDS:
        given = f"unknown command {argv[1]!r}\n" if len(argv) >= 2 else ""
        raise app.UsageError(given + _usage())
    module_name, function_name, _ = COMMANDS[argv[1]]
    command = getattr(importlib.import_module(module_name), function_name)
    logging.info("running %s", argv[1])
    command(_CONFIG.value, _WORKDIR.value, argv[2:])


def run() -> None:
    app.run(main, argv=sys.argv)
