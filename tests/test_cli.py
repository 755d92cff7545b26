"""The command line: usage, unknown commands and config typos fail loudly."""

import subprocess
import sys


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "vfusion3d_jax", *args], capture_output=True, text=True, timeout=300)


def test_unknown_command_lists_commands():
    result = _cli("no-such-command")
    assert result.returncode != 0
    assert "unknown command" in result.stderr and "render-data" in result.stderr
