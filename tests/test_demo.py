"""The README's main command, shrunk: every stage of `demo` runs for real and leaves its outputs."""

from __future__ import annotations

import json

from vfusion3d_jax.configs import load_config
from vfusion3d_jax.demo import run_demo
from vfusion3d_jax.inference import media


def test_demo_runs_every_stage(tmp_path, capsys):
    config = load_config("demo.py")
    config.data = load_config("data.py:tiny", max_assets_per_source=3, num_procedural=2, num_views=6, num_workers=1,
                              holdout_fraction=0.4)
    for stage, steps in (("low_res", 3), ("high_res", 0), ("finetune", 0)):
        config.lrm.train.stages[stage].num_steps = steps
    config.lrm.data.batch_size = config.lrm.eval.batch_size = 8  # the 8 fake devices of the tests
    config.lrm.render.num_coarse = config.lrm.render.num_importance = 8
    config.lrm.eval.every = 0
    config.evaluate.update(mesh_resolution=16, sheet_rows=1)
    config.infer.update(render_size=16, num_frames=3, preview_views=2, mesh_resolution=16)
    config.num_images = 1
    config.num_unseen = 2

    result = run_demo(config, str(tmp_path), [])

    printed = capsys.readouterr().out
    assert "Demo finished" in printed and "PSNR (dB)" in printed and "1 reconstructed, 0 skipped" in printed
    assert (tmp_path / "data" / "inspect" / "contact_sheet.png").exists()
    assert (tmp_path / "model" / "checkpoints" / "3").is_dir()
    written = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert written["overall"]["num_objects"] == result["report"]["overall"]["num_objects"] >= 1
    [item] = result["summary"]["processed"]
    assert media.count_video_frames(item["outputs"]["video"]) == 3
    assert set(result["seconds"]) == {"data", "train", "evaluate", "unseen", "infer"}
    # Both evaluations run the input-swap test and the foreground metrics.
    for report in (result["report"], result["unseen"]):
        assert {"fg_psnr", "iou", "conditioning_gain", "retrieval", "retrieval_chance"} <= set(report["overall"])
    assert result["unseen"]["overall"]["num_objects"] == 2
    assert "Input swap: conditioning gain" in printed and "Unseen objects" in printed
