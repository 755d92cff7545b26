"""Loading the ml_collections config files in the repository's `configs/` folder.

The command line loads them through `config_flags` (so `--config.x.y=...` overrides
work and typos are errors); this module serves code that needs a named config
without a command line: the demo, notebooks and tests.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections

from vfusion3d_jax import errors

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def config_module(path: str):
    """Imports a config file by path (relative to `configs/` unless the path exists).

    Config files are loaded by path, not as a package, so they and their shared parts
    (`common.py`) are imported through here.
    """
    file = Path(path)
    if not file.exists():
        file = CONFIG_DIR / file.name
    if not file.exists():
        raise errors.InvalidConfigValueError(f"config file {path!r} not found (looked in . and {CONFIG_DIR})")
    module_spec = importlib.util.spec_from_file_location(f"_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def load_config(spec: str, **overrides) -> ml_collections.ConfigDict:
    """Loads `file.py:variant` (relative to `configs/` unless a path exists) and locks it.

    `overrides` use dotted keys written with double underscores, e.g.
    `load_config("data.py:tiny", render__resolution=32)`; an unknown key raises.
    """
    path, _, arg = spec.partition(":")
    module = config_module(path)
    config = module.get_config(arg) if arg else module.get_config()
    config = ml_collections.ConfigDict(config)
    config.lock()
    for dotted, value in overrides.items():
        _set_dotted(config, dotted.split("__"), value)
    return config


def _set_dotted(config: ml_collections.ConfigDict, keys: list[str], value) -> None:
    for depth, key in enumerate(keys):
        if not isinstance(config, ml_collections.ConfigDict) or key not in config:
            raise errors.UnknownConfigKeyError(f"unknown config key {'.'.join(keys[:depth + 1])!r}")
        if depth < len(keys) - 1:
            config = config[key]
    config[keys[-1]] = value
