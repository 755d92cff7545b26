"""The command line: usage, unknown commands and config typos fail loudly."""

import subprocess
import sys


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "vfusion3d_jax", *args], capture_output=True, text=True, timeout=300)


def test_unknown_command_lists_commands():
    result = _cli("no-such-command")
    assert result.returncode != 0
    assert "unknown command" in result.stderr and "render-data" in result.stderr


def test_config_typo_is_an_error(tmp_path):
    result = _cli("render-data", "--config=configs/data.py:tiny", "--config.resolutoin=16", f"--workdir={tmp_path}")
    assert result.returncode != 0
    assert "resolutoin" in result.stderr
    assert not (tmp_path / "shards").exists()
