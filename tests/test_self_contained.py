"""A fresh clone is all the tests and the package need: no path reaches outside the repository.

The reference data live in `tests/fixtures/`; the code names paths relative to its own files.
What is checked: `Path(__file__).parents[N]` and `.parent.parent…` chains that climb above the
repository root, relative paths out of it (`../`), and absolute paths of someone's machine
(`/work/`, home folders, a `shared/` fixture folder beside the checkout). User-supplied paths and
the user's cache directory (`~/.cache`, data/storage.py) are the user's, not the repository's.
"""

from __future__ import annotations

import re
from pathlib import Path

from conftest import FIXTURE_DIR

ROOT = Path(__file__).resolve().parents[1]
SCANNED_FOLDERS = ("vfusion3d_jax", "tests", "configs", "benchmarks", "launch", "notebooks")
SCANNED_FILES = ("Makefile", "setup.cfg", "pyproject.toml")
SUFFIXES = {".py", ".sh", ".ipynb", ".cfg", ".toml"}

_PARENTS_INDEX = re.compile(r"__file__\)[\w().]*?\.parents\[(\d+)\]")
_PARENT_CHAIN = re.compile(r"__file__\)(?:\.resolve\(\)|\.absolute\(\))?((?:\.parent\b)+)")
_OUTSIDE_LITERALS = re.compile(r"""(['"`]\.\.[/\\'"`]|[/\\]\.\.[/\\]|/work/|/home/|/Users/|/root/|shared/fixtures|"""
                               r"""os\.pardir)""")


def _scanned_files() -> list[Path]:
    files = [ROOT / name for name in SCANNED_FILES if (ROOT / name).exists()]
    for folder in SCANNED_FOLDERS:
        files += [path for path in (ROOT / folder).rglob("*")
                  if path.is_file() and path.suffix in SUFFIXES and "fixtures" not in path.relative_to(ROOT).parts
                  and "__pycache__" not in path.parts]
    return [path for path in files if path.resolve() != Path(__file__).resolve()]


def outside_references(text: str, location: Path) -> list[str]:
    """`file:line: text` of every reference in `text`, the file at `location` (relative to the root),
    that leaves the repository."""
    depth = len(location.parts) - 1  # folders between the root and the file
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        # parents[N] and N + 1 `.parent`s are the folder N + 1 levels up: the root when N == depth.
        levels = [int(match) for match in _PARENTS_INDEX.findall(line)]
        levels += [chain.count(".parent") - 1 for chain in _PARENT_CHAIN.findall(line)]
        if any(level > depth for level in levels) or _OUTSIDE_LITERALS.search(line):
            found.append(f"{location}:{number}: {line.strip()}")
    return found


def test_reference_fixture_is_inside_the_repository():
    assert FIXTURE_DIR.resolve().is_relative_to(ROOT)
    for name in ("reference.npz", "reference_posembed_size.npz", "model.safetensors", "config.json", "keys.txt",
                 "keys_released_model.txt", "README.md"):
        assert (FIXTURE_DIR / name).is_file(), name


def test_the_scan_catches_paths_out_of_the_repository():
    # The checker itself, on lines like those it must reject and accept in a file tests/probe.py.
    bad = ['A = Path(__file__).resolve().parents[2] / "shared"', 'B = Path(__file__).parent.parent.parent / "x"',
           'C = "../shared/fixtures/vfusion3d_reference"', "D = '/work/shared/x'"]
    good = ['E = Path(__file__).resolve().parents[1] / "configs"', 'F = Path(__file__).resolve().parent / "data"',
            'G = os.path.join(base, "x")']
    found = outside_references("\n".join(bad + good), Path("tests/probe.py"))
    assert [line.split(": ", 1)[1] for line in found] == bad


def test_no_code_reaches_outside_the_repository():
    files = _scanned_files()
    assert any(path.name == "conftest.py" for path in files) and any(path.parent.name == "configs" for path in files)
    found = [reference for path in files
             for reference in outside_references(path.read_text(errors="replace"), path.relative_to(ROOT))]
    assert not found, "paths that leave the repository:\n" + "\n".join(found)
