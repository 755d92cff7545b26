"""Imports go one way through the package's layers: data → rendering → models → diffusion → train → inference → curation.

A module may import its own layer and the layers before it, never one after it; the shared
modules at the top of the package (cameras, configs, visualize, errors, ...) import no layer;
the entry points (`main`, `demo`) tie everything together and may import anything. Imports
are read with `ast` from the source (those inside functions count too), so nothing is run.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "vfusion3d_jax"
LAYERS = ("data", "rendering", "models", "diffusion", "train", "inference", "curation")
ENTRY_POINTS = {"__init__", "__main__", "main", "demo"}


def _module_name(path: pathlib.Path, package: pathlib.Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: pathlib.Path, package_dir: pathlib.Path = PACKAGE) -> set[str]:
    """Full names of the vfusion3d_jax modules (or names inside them) that `path` imports."""
    module = _module_name(path, package_dir)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            # `from vfusion3d_jax import train` imports a layer by its name.
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in names if name.split(".")[0] == "vfusion3d_jax"}


def _layer(name: str) -> str | None:
    """The layer of the module `vfusion3d_jax.<layer>...`; None for a shared top-level module."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def _sources():
    return sorted(PACKAGE.rglob("*.py"))


def test_imports_follow_the_layers():
    violations = []
    for path in _sources():
        module = _module_name(path)
        own = _layer(module)
        if own is None and module.rpartition(".")[2] in ENTRY_POINTS and module.count(".") <= 1:
            continue  # the package itself and its entry points
        allowed = LAYERS[:LAYERS.index(own) + 1] if own else ()
        for imported in sorted(_imported_modules(path)):
            layer = _layer(imported)
            if layer is not None and layer not in allowed:
                violations.append(f"{module} imports {imported} ({own or 'shared module'} must not use {layer})")
    assert not violations, "imports against the layer order:\n" + "\n".join(violations)


@pytest.mark.parametrize("source, expected", [
    ("from vfusion3d_jax.inference import media", {"vfusion3d_jax.inference.media"}),
    ("from vfusion3d_jax import visualize, cameras", {"vfusion3d_jax.visualize", "vfusion3d_jax.cameras"}),
    ("import vfusion3d_jax.train.metrics as m", {"vfusion3d_jax.train.metrics"}),
    ("def f():\n    from ..inference import evaluate", {"vfusion3d_jax.inference.evaluate"}),
    ("from . import example", {"vfusion3d_jax.data.example"}),
    ("import numpy", set()),
])
def test_import_reader_sees_every_form(tmp_path, source, expected):
    # A module at vfusion3d_jax/data/probe.py of a package laid out like the real one.
    package_dir = tmp_path / "vfusion3d_jax"
    (package_dir / "data").mkdir(parents=True)
    probe = package_dir / "data" / "probe.py"
    probe.write_text(source)
    assert _imported_modules(probe, package_dir) == expected
    assert {_layer(name) for name in expected if _layer(name)} <= set(LAYERS)


def test_training_does_not_import_inference_and_pictures_live_below_it():
    training = set().union(*(_imported_modules(path) for path in (PACKAGE / "train").glob("*.py")))
    assert not any(_layer(name) == "inference" for name in training)
    assert "vfusion3d_jax.visualize" in _imported_modules(PACKAGE / "train" / "lrm_task.py")  # the eval grid
    assert not _imported_modules(PACKAGE / "visualize.py")
