"""The Colab notebook `notebooks/demo.ipynb`: committed clean, and runs end to end in QUICK mode.

The run executes every cell headless with nbclient in a fresh kernel (this venv's Python), in a
temporary working directory, exactly as a user's Jupyter would: render tiny data, train 10 steps,
reconstruct a held-out view, show the turntable, the views and the 3D mesh viewer, evaluate.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sys
from pathlib import Path

import nbformat

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "demo.ipynb"
QUICK_WORKDIR = Path("runs") / "notebook-quick"  # the notebook's WORKDIR in QUICK mode, relative to its cwd
QUICK_FRAMES = 8  # infer_config.num_frames in the notebook's QUICK mode
CELL_TIMEOUT_S = 300


def _code_cells(notebook) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def _tagged(notebook, tag: str):
    cells = [cell for cell in notebook.cells if tag in cell.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def test_committed_notebook_is_valid_and_has_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    assert notebook.nbformat == 4
    assert notebook.metadata.kernelspec.name == "python3"
    for cell in _code_cells(notebook):
        assert cell.outputs == [], f"cell {cell.id} has stored outputs"
        assert cell.execution_count is None, f"cell {cell.id} has an execution count"
        assert "execution" not in cell.metadata, f"cell {cell.id} has stored execution timings"
        # Plain Python, no shell magics: the notebook stays valid Python outside IPython/Colab.
        ast.parse(cell.source)
    assert "QUICK" in _tagged(notebook, "parameters").source
    _tagged(notebook, "view-3d")


def _kernel_env() -> dict[str, str]:
    """The kernel's environment: this one in QUICK mode, on one CPU device like a user's session.

    conftest.py gives the test process 8 fake CPU devices through XLA_FLAGS; that flag is dropped
    (other XLA flags are kept) so the notebook runs on a single device, as it does for a user.
    """
    env = dict(os.environ)
    env["VFUSION3D_NOTEBOOK_QUICK"] = "1"
    env["JAX_PLATFORMS"] = "cpu"
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    return env


def _outputs_of(cell) -> tuple[set[str], str, str]:
    """(MIME types displayed, stdout+stderr text, text/html) of an executed cell."""
    mimes, text, html = set(), "", ""
    for output in cell.outputs:
        if output.output_type == "stream":
            text += output.text
        elif output.output_type in ("display_data", "execute_result"):
            mimes.update(output.data)
            html += output.data.get("text/html", "")
    return mimes, text, html


def test_notebook_runs_in_quick_mode(tmp_path):
    import nbclient

    from vfusion3d_jax.inference.media import count_video_frames

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # A first cell that reports which Python the kernel runs: it must be this venv's, where the
    # package is installed.
    probe = nbformat.v4.new_code_cell(
        "import json, sys\nprint(json.dumps({'prefix': sys.prefix, 'executable': sys.executable}))")
    notebook.cells.insert(0, probe)
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute(env=_kernel_env())  # raises CellExecutionError on the first failing cell
    finally:
        nbformat.write(notebook, tmp_path / "executed.ipynb")  # for a look after a failure

    kernel = json.loads(_outputs_of(probe)[1])
    assert os.path.realpath(kernel["prefix"]) == os.path.realpath(sys.prefix), (
        f"the notebook ran in {kernel['executable']}, not this environment's Python ({sys.executable})")
    for cell in _code_cells(notebook):
        errors = [output for output in cell.outputs if output.output_type == "error"]
        assert not errors, f"cell {cell.id}: {errors}"

    workdir = tmp_path / QUICK_WORKDIR
    checkpoints = workdir / "model" / "checkpoints"
    assert checkpoints.is_dir() and any(path.name.isdigit() for path in checkpoints.iterdir()), checkpoints
    assert (workdir / "model" / "metrics.jsonl").is_file()

    summary = json.loads((workdir / "reconstructions" / "summary.json").read_text())
    assert summary["processed"] and not summary["skipped"], summary
    outputs = summary["processed"][0]["outputs"]
    assert count_video_frames(outputs["video"]) == QUICK_FRAMES
    assert count_video_frames(outputs["gif"]) == QUICK_FRAMES
    assert Path(outputs["views"]).is_file() and Path(outputs["views"]).name == "views.png"

    shown = [_outputs_of(cell) for cell in _code_cells(notebook)]
    mimes = set().union(*(cell_mimes for cell_mimes, _, _ in shown))
    assert {"image/png", "text/html", "text/markdown"} <= mimes, mimes
    html = "".join(cell_html for _, _, cell_html in shown)
    assert "data:image/gif;base64," in html and "data:video/mp4;base64," in html, "no turntable GIF or video shown"
    mimes, text, html = _outputs_of(_tagged(notebook, "view-3d"))
    if "mesh.glb" in outputs:
        assert "text/html" in mimes and "<iframe" in html, "the 3D view cell showed no viewer"
    else:
        assert outputs["mesh_note"] in text, "the 3D view cell did not explain the missing mesh"
    assert (workdir / "evaluation" / "metrics.json").is_file()
