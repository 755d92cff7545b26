"""The README's main command: the whole system on embedded defaults, on a CPU.

    python -m vfusion3d_jax demo --workdir=runs/demo

Today it builds the built-in dataset (rendered from assets that ship with the
installed packages: no download) and inspects it; each later stage of the system
(training, reconstruction, export) joins this path as it lands. `--config` picks
the data config (default: configs/data.py:tiny).
"""

from __future__ import annotations

from pathlib import Path

from absl import logging

from vfusion3d_jax.configs import load_config
from vfusion3d_jax.data.inspect import inspect_dataset
from vfusion3d_jax.data.render_assets import render_dataset

DEFAULT_DATA_CONFIG = "data.py:tiny"


def run_demo(config, workdir: str | None, args: list[str]) -> None:
    workdir = Path(workdir or "runs/demo")
    data_config = config if config is not None else load_config(DEFAULT_DATA_CONFIG)
    data_dir = workdir / "data"
    logging.info("demo: rendering the built-in dataset into %s", data_dir)
    render_dataset(data_config, str(data_dir), [])
    inspect_dataset(None, str(workdir / "inspect"), [str(data_dir)])
    print(f"\nDemo finished. Dataset: {data_dir}  Contact sheet and statistics: {workdir / 'inspect'}")
