"""Image to 3D for real: rendered orbits and user images on disk → a checkpoint on disk → videos,
meshes and metrics on disk, through the same functions as the `infer` and `evaluate` commands.

The model is the small `fixture` variant with random weights (saved as a checkpoint, as training
and `convert` save them); its density never reaches the official mesh level, so the mesh tests
take the level from the density itself.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import glob

import jax.numpy as jnp
import numpy as np
import pytest
import trimesh
from conftest import FIXTURE_DIR, run_cli, save_random_lrm
from PIL import Image

from vfusion3d_jax import cameras
from vfusion3d_jax.configs import load_config
from vfusion3d_jax.data.example import decode_orbit
from vfusion3d_jax.data.render_assets import render_dataset
from vfusion3d_jax.data.tfrecord import iterate_records
from vfusion3d_jax.inference import evaluate, infer, media
from vfusion3d_jax.inference.reconstruct import Reconstructor
from vfusion3d_jax.models import convert
from vfusion3d_jax.rendering.triplane import query_grid
from vfusion3d_jax.train.metrics import chamfer_distance

NUM_FRAMES = 6


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    """Real renders of built-in assets (with ground-truth surface points), 32 px, 6 views."""
    root = tmp_path_factory.mktemp("data")
    config = load_config("data.py:tiny", max_assets_per_source=3, num_procedural=2, num_views=6, num_workers=1,
                         holdout_fraction=0.4)
    render_dataset(config, str(root), [])
    return str(root)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A random `fixture`-size LRM saved in the training/convert checkpoint layout."""
    return save_random_lrm(tmp_path_factory.mktemp("checkpoint"))


@pytest.fixture(scope="module")
def infer_config(checkpoint):
    """Small renders; the mesh level is the median density of the model on an image (a surface exists)."""
    reconstructor = Reconstructor.from_checkpoint(checkpoint)
    planes = reconstructor.planes(np.ones((1, reconstructor.source_size, reconstructor.source_size, 3), np.float32))
    median = float(jnp.median(query_grid(reconstructor.model.decoder, planes, 24)["sigma"]))
    return load_config("infer.py", render_size=24, num_frames=NUM_FRAMES, fps=6.0, preview_views=4,
                       mesh_resolution=32, mesh_threshold=median, batch_size=2)


def _write_inputs(folder) -> dict[str, str]:
    """Good, odd and bad files; returns name -> what should happen ('ok' or a reason fragment)."""
    folder.mkdir()
    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[10:30, 20:45] = (200, 60, 30, 255)
    Image.fromarray(rgba).save(folder / "cutout.png")
    photo = np.full((50, 50, 3), 235, np.uint8)
    photo[12:40, 15:35] = (30, 90, 200)
    Image.fromarray(photo).save(folder / "photo.jpg")
    Image.fromarray(photo[..., 0]).save(folder / "gray.png")
    Image.fromarray((photo[..., 1].astype(np.uint16) * 257)).save(folder / "sixteen_bit.png")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image")
    whole = (folder / "cutout.png").read_bytes()
    (folder / "truncated.png").write_bytes(whole[: len(whole) // 2])
    Image.fromarray(np.full((30, 30, 3), 128, np.uint8)).save(folder / "blank.png")  # nothing to cut out
    return {"cutout": "ok", "photo": "ok", "gray": "ok", "sixteen_bit": "ok", "empty": "empty",
            "notes": "not an image", "truncated": "", "blank": "foreground"}


def test_infer_writes_every_output_and_skips_bad_files(tmp_path, checkpoint, infer_config):
    expected = _write_inputs(tmp_path / "inputs")
    summary = infer.infer(checkpoint, str(tmp_path / "inputs"), tmp_path / "out", infer_config)

    processed = {item["name"]: item for item in summary["processed"]}
    skipped = {item["input"].rsplit("/", 1)[1].split(".")[0]: item["reason"] for item in summary["skipped"]}
    assert set(processed) == {name for name, outcome in expected.items() if outcome == "ok"}
    assert set(skipped) == {name for name, outcome in expected.items() if outcome != "ok"}
    for name, reason in skipped.items():
        assert expected[name] in reason, (name, reason)
    assert json.loads((tmp_path / "out" / infer.SUMMARY_FILE).read_text()) == summary
    assert processed["cutout"]["had_alpha"] and not processed["photo"]["had_alpha"]

    outputs = processed["cutout"]["outputs"]
    assert media.count_video_frames(outputs["video"]) == NUM_FRAMES
    assert media.count_video_frames(outputs["gif"]) == NUM_FRAMES
    assert Image.open(outputs["input"]).size == (64, 64)  # the fixture model's source size
    sheet = np.asarray(Image.open(outputs["views"]))
    assert sheet.shape == (24, 4 * 24 + 3 * 2, 3)  # 4 views in a row, 2 px apart
    for suffix in (".glb", ".obj"):
        mesh = trimesh.load(outputs[f"mesh{suffix}"], force="mesh", process=False)
        assert len(mesh.faces) > 0
        colors = mesh.visual.vertex_colors
        assert colors.shape == (len(mesh.vertices), 4)
        assert np.ptp(colors[:, :3]) > 0  # colours from the field, not a default grey
        assert np.all(np.abs(mesh.vertices) <= 1.0 + 1e-5)


def test_infer_cli_and_duplicate_names(tmp_path, checkpoint):
    folder = tmp_path / "inputs"
    folder.mkdir()
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[8:24, 8:24] = (0, 160, 0, 255)
    for name in ("shoe.png", "shoe.webp"):
        Image.fromarray(rgba).save(folder / name)
    result = subprocess.run(
        [sys.executable, "-m", "vfusion3d_jax", "infer", f"--checkpoint={checkpoint}", f"--inputs={folder}",
         f"--workdir={tmp_path / 'out'}", "--config.render_size=16",  # overrides of the default config
         "--config.num_frames=3", "--config.preview_views=2", "--config.export_mesh=False"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 reconstructed, 0 skipped" in result.stdout
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"shoe_png", "shoe_webp", infer.SUMMARY_FILE}
    assert media.count_video_frames(tmp_path / "out" / "shoe_png" / "turntable.mp4") == 3


def test_cli_text_to_3d_reconstructs_the_generated_view(checkpoint, mvdiffusion_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a blue box\n\n")
    out = tmp_path / "out"
    result = run_cli("infer", f"--checkpoint={checkpoint}", "--prompt=a red torus", f"--workdir={out}",
                     f"--config.diffusion_checkpoint={mvdiffusion_checkpoint}", f"--config.prompts_file={prompts}",
                     "--config.render_size=16", "--config.num_frames=3", "--config.preview_views=2",
                     "--config.export_mesh=False")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 reconstructed, 0 skipped" in result.stdout
    for name in ("a_red_torus", "a_blue_box"):
        folder = out / name
        orbit, view = np.asarray(Image.open(folder / "orbit.png")), np.asarray(Image.open(folder / f"{name}.png"))
        np.testing.assert_array_equal(orbit[:, :view.shape[1]], view)  # the orbit's first frame is the input
        assert media.count_video_frames(folder / "turntable.mp4") == 3 and (folder / "views.png").exists()
    summary = json.loads((out / infer.SUMMARY_FILE).read_text())
    assert [item["name"] for item in summary["processed"]] == ["a_red_torus", "a_blue_box"]
    without = run_cli("infer", f"--checkpoint={checkpoint}", "--prompt=a red torus", f"--workdir={tmp_path / 'x'}")
    assert without.returncode != 0 and "diffusion_checkpoint" in without.stderr


def test_infer_refuses_an_unconverted_weights_file(tmp_path):
    with pytest.raises(ValueError, match="convert"):
        Reconstructor.from_checkpoint(str(tmp_path / "vfusion3d.pth"))


def test_source_camera_follows_the_checkpoint(checkpoint, tmp_path, reference):
    # A project checkpoint: the source camera at the training orbits' distance (configs/lrm.py).
    ours = Reconstructor.from_checkpoint(checkpoint)
    np.testing.assert_allclose(ours.source_camera[[3, 7, 11]], [1.5, 0.0, 0.0])
    assert ours.border_ratio == pytest.approx(0.55)
    # Converted official weights: the official canonical camera (distance 1) and border 0.2, and
    # the planes of the official model (tests/fixtures reference) through the inference path.
    convert.convert(FIXTURE_DIR / "model.safetensors", tmp_path, load_config("lrm.py:fixture"))
    official = Reconstructor.from_checkpoint(str(tmp_path))
    np.testing.assert_allclose(official.source_camera, cameras.canonical_source_camera())
    assert official.border_ratio == pytest.approx(0.2)
    images = np.moveaxis(reference["input_image"], 1, -1)
    planes = official.planes(images, reference["input_source_camera"])
    np.testing.assert_allclose(np.asarray(planes), reference["planes"], atol=2e-4)


# Evaluation ----------------------------------------------------------------------------------


def test_chamfer_distance_known_answers():
    """The metric the surface points are for: mean of the two mean Euclidean nearest-neighbour distances."""
    grid = np.stack(np.meshgrid(*[np.arange(4.0)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
    assert chamfer_distance(grid, grid) == dict(chamfer=0.0, accuracy=0.0, completeness=0.0)
    shifted = chamfer_distance(grid + [0.1, 0.0, 0.0], grid)  # spacing 1: each point's nearest is its copy
    for value in shifted.values():
        assert value == pytest.approx(0.1)
    partial = chamfer_distance(grid[:2], np.concatenate([grid[:2], [[0.0, 0.0, 4.0]]]))  # 3 from (0, 0, 1)
    assert partial == pytest.approx(dict(chamfer=0.5, accuracy=0.0, completeness=1.0))  # a missed part
    with pytest.raises(ValueError, match="points is empty"):
        chamfer_distance(np.zeros((0, 3)), grid)
    with pytest.raises(ValueError, match=r"reference must be \(N, 3\)"):
        chamfer_distance(grid, grid[:, :2])


def _tasks(data_dir: str, split: str = "*"):
    return list(evaluate.orbit_tasks(f"{data_dir}/shards/{split}-*.tfrecord", source_view=0, source_size=64))


def _oracle(tasks):
    return [evaluate.Prediction(task.target_images, task.target_masks, task.surface_points) for task in tasks]


def test_ground_truth_as_its_own_prediction_is_perfect(tmp_path, data_dir):
    tasks = _tasks(data_dir)
    report = evaluate.evaluate_orbits(tasks, _oracle, batch_size=2, progress=False)
    overall = report["overall"]
    assert overall["num_objects"] == len(tasks) and overall["num_views"] == 5 * len(tasks)
    assert overall["psnr"] == math.inf
    assert overall["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert overall["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert overall["chamfer"] == 0.0 and overall["empty_meshes"] == 0
    assert overall["fg_psnr"] == math.inf and overall["iou"] == 1.0

    paths = evaluate.write_report(report, tmp_path, sheet_rows=1)
    written = json.loads(paths["json"].read_text())
    assert written["overall"]["psnr"] == math.inf and len(written["objects"]) == len(tasks)
    # PSNR, foreground PSNR, silhouette IoU, SSIM, LPIPS, Chamfer
    assert "| inf | inf | 1.0000 | 1.0000 | 0.0000 | 0.0000 |" in paths["markdown"].read_text().replace("1.00 ", "1.0000 ")
    assert Image.open(paths["sheet"]).size[1] > 2 * 32  # worst and best rows


def test_a_worse_prediction_scores_worse(data_dir):
    tasks = _tasks(data_dir)
    faded = lambda images: images * 0.8 + 0.1  # a known error: |error| = 0.2 |1 - 2 x|
    predict = lambda ts: [evaluate.Prediction(faded(t.target_images), surface_points=t.surface_points + 0.05)
                          for t in ts]
    report = evaluate.evaluate_orbits(tasks, predict, batch_size=3, progress=False)
    for task, item in zip(tasks, report["objects"]):
        expected = np.mean([-10 * np.log10(np.mean((faded(view) - view) ** 2)) for view in task.target_images])
        assert item["psnr"] == pytest.approx(expected, rel=1e-4)
        assert item["ssim"] < 1.0 and item["lpips"] > 0.0
        assert 0.0 < item["chamfer"] <= 0.05 * math.sqrt(3) + 1e-6  # every point moved by 0.087


def _swap_predictor(render_from):
    """Group renders where task i's views "reconstructed from source j" are `render_from(tasks, i, j)`."""

    def predict(tasks):
        predictions = []
        for i, task in enumerate(tasks):
            group = np.stack([render_from(tasks, i, j) for j in range(len(tasks))])
            own = group[i]
            predictions.append(evaluate.Prediction(own, task.target_masks, group_images=group,
                                                   group_opacity=np.stack([task.target_masks] * len(tasks))))
        return predictions

    return predict


def test_input_swap_rewards_a_model_that_uses_its_input(data_dir):
    tasks = _tasks(data_dir)
    assert len(tasks) >= 3
    # From its own source an object comes out faded (finite PSNR); from another source it comes
    # out as that other object: the input decides the reconstruction.
    sees = _swap_predictor(lambda ts, i, j: ts[i].target_images * 0.9 + 0.05 if i == j else ts[j].target_images)
    report = evaluate.evaluate_orbits(tasks, sees, batch_size=len(tasks), progress=False)
    overall = report["overall"]
    assert overall["retrieval"] == 1.0 and overall["retrieval_chance"] == pytest.approx(1 / len(tasks))
    scores = evaluate.swap_scores(tasks, sees(tasks))
    expected = np.mean(np.diag(scores) - (scores.sum(axis=1) - np.diag(scores)) / (len(tasks) - 1))
    assert overall["conditioning_gain"] == pytest.approx(expected) and expected > 3
    assert "Input swap: conditioning gain" in evaluate.overall_table(overall)

    # The mean object, whatever the input: no gain, and a tie is no retrieval.
    mean_object = _swap_predictor(lambda ts, i, j: np.mean([t.target_images for t in ts], axis=0))
    overall = evaluate.evaluate_orbits(tasks, mean_object, batch_size=len(tasks), progress=False)["overall"]
    assert overall["conditioning_gain"] == pytest.approx(0.0, abs=1e-9) and overall["retrieval"] == 0.0
    # White background carries the plain PSNR of the mean object; the foreground metrics don't.
    assert overall["fg_psnr"] < overall["psnr"] - 3


def test_orbit_task_moves_geometry_with_the_cameras(data_dir):
    """Ground truth in the canonical frame projects where it did in the record's frame."""
    record = next(iterate_records(sorted(glob.glob(f"{data_dir}/shards/train-*.tfrecord"))[0]))
    orbit = decode_orbit(record)
    task = evaluate.orbit_task(orbit, source_view=2, source_size=64)
    cam2world, intrinsics = cameras.split_render_camera(task.target_cameras)
    original = [v for v in range(orbit["num_views"]) if v != 2]
    for moved, view in zip(cam2world, original):
        np.testing.assert_allclose(
            cameras.project_points(task.surface_points, moved, intrinsics[0]),
            cameras.project_points(orbit["surface_points"], orbit["cam2world"][view], orbit["intrinsics"][view]),
            atol=1e-4)
    np.testing.assert_allclose(task.source_camera[[3, 7, 11]], [np.linalg.norm(orbit["cam2world"][2][:3, 3]), 0, 0],
                               atol=1e-5)


def test_evaluate_command_on_a_checkpoint(tmp_path, checkpoint, data_dir):
    result = subprocess.run(
        [sys.executable, "-m", "vfusion3d_jax", "evaluate", f"--checkpoint={checkpoint}",
         f"--data={data_dir}/shards/holdout-*.tfrecord", f"--workdir={tmp_path}",
         "--config=configs/infer.py:evaluate", "--config.mesh_resolution=24"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["overall"]["num_objects"] == len(_tasks(data_dir, "holdout")) >= 1
    for item in written["objects"]:
        assert 0 < item["psnr"] < 40 and 0 < item["lpips"] < 1
        assert math.isnan(item["chamfer"]) and "empty mesh" in item["note"]  # random weights: no surface at 1.0
    assert "PSNR (dB)" in result.stdout and (tmp_path / "sheet.png").exists()


def test_evaluate_meshes_are_compared_with_the_ground_truth(tmp_path, checkpoint, data_dir, infer_config):
    config = load_config("infer.py:evaluate", mesh_resolution=24, mesh_threshold=infer_config.mesh_threshold,
                         chamfer_points=512, sheet_rows=1)
    report = evaluate.evaluate(checkpoint, f"{data_dir}/shards/holdout-*.tfrecord", tmp_path, config)
    assert report["overall"]["empty_meshes"] == 0
    for item in report["objects"]:
        # A random model's surface is somewhere in the box: far from the object, but not further than the box.
        assert 0.0 < item["accuracy"] < 2 * math.sqrt(3) and 0.0 < item["completeness"] < 2 * math.sqrt(3)
        assert item["chamfer"] == pytest.approx(0.5 * (item["accuracy"] + item["completeness"]))
