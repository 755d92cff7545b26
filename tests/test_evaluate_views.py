"""`evaluate` of FlexRM checkpoints over numbers of input views (inference/evaluate_views.py).

The split of an orbit into inputs and targets, the even spread of input views, the chart, and
the command end to end on the session's barely trained FlexRM micro and diffusion runs
(conftest) and a random LRM: every run (rendered inputs per view count; generated ones, curated
and random; the LRM from the source view) written and summarised. The quality of the models is not tested here.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import run_cli, save_random_lrm

from vfusion3d_jax import errors, visualize
from vfusion3d_jax.inference import evaluate_views

# The modules that use the session's FlexRM micro run (conftest `flexrm_run`) share a test worker,
# so the run is trained once.
pytestmark = pytest.mark.xdist_group("flexrm_run")


def test_targets_are_never_inputs():
    pool, targets = evaluate_views.split_views(16, source_view=3)
    assert pool[0] == 3 and len(pool) == len(targets) == 8
    assert not set(pool) & set(targets) and set(pool) | set(targets) == set(range(16))
    assert all((view - 3) % 2 == 0 for view in pool) and all((view - 3) % 2 == 1 for view in targets)


def test_input_views_are_spread_around_the_orbit_from_the_source():
    pool = [0, 2, 4, 6, 8, 10, 12, 14]
    assert evaluate_views.spread(pool, 1) == [0]
    assert evaluate_views.spread(pool, 2) == [0, 8]
    assert evaluate_views.spread(pool, 4) == [0, 4, 8, 12]
    assert evaluate_views.spread(pool, 8) == pool
    # Each count's views contain the smaller counts' views (more views only add information).
    assert set(evaluate_views.spread(pool, 2)) <= set(evaluate_views.spread(pool, 4))
    with pytest.raises(errors.InvalidConfigValueError, match="input pool of 8"):
        evaluate_views.spread(pool, 9)


def test_line_chart_draws_every_series_in_its_colour():
    chart = visualize.line_chart({"a": [(1, 10.0), (2, 12.0), (4, 15.0)], "b": [(2, 11.0), (4, math.nan)]},
                                 title="PSNR", x_label="views", log2_x=True)
    assert chart.dtype == np.uint8 and chart.shape == (240, 360, 3)
    for colour in visualize.SERIES_COLOURS[:2]:
        assert np.any(np.all(chart == colour, axis=-1)), colour


@pytest.fixture(scope="module")
def lrm_checkpoint(tmp_path_factory) -> str:
    """A random `fixture`-size LRM (64 px source views, FlexRM micro's are 56) as a checkpoint."""
    return save_random_lrm(tmp_path_factory.mktemp("lrm"))


def test_cli_compares_view_counts_generated_inputs_and_the_lrm(flexrm_run, mvdiffusion_checkpoint, lrm_checkpoint,
                                                               tmp_path):
    data, run = flexrm_run
    workdir = tmp_path / "eval"
    result = run_cli("evaluate", f"--checkpoint={run}", f"--data={data}/shards/holdout-*.tfrecord",
                     f"--workdir={workdir}", "--config.num_views=1,2", "--config.sheet_rows=1",
                     f"--config.diffusion_checkpoint={mvdiffusion_checkpoint}",
                     f"--config.lrm_checkpoint={lrm_checkpoint}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((workdir / "metrics.json").read_text())
    runs = [(run_["inputs"], run_["num_views"]) for run_ in summary["runs"]]
    assert runs == [("lrm", 1), ("rendered", 1), ("rendered", 2), ("curated", 2), ("random", 2)]
    for entry in summary["runs"]:
        # 2 held-out orbits of 6 views: 3 targets each (odd offsets), never inputs; one swap group.
        assert entry["num_objects"] == 2 and entry["num_views"] in (1, 2)
        assert entry["retrieval_chance"] == 0.5 and all(math.isfinite(entry[k]) for k in ("psnr", "fg_psnr", "iou"))
        folder = workdir / f"{entry['inputs']}_{entry['num_views']}_views"
        report = json.loads((folder / "metrics.json").read_text())
        assert report["inputs"] == entry["inputs"] and report["overall"]["num_views"] == 2 * 3
        assert (folder / "sheet.png").exists()
    assert (workdir / "views.png").exists() and "| curated | 2 |" in (workdir / "metrics.md").read_text()
    assert "| rendered | 1 |" in result.stdout
