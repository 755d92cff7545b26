"""Training and evaluation against a bucket: `gs://` data, workdir, checkpoints and logs.

A local Google Cloud Storage emulator (gcp-storage-emulator: the GCS JSON API over HTTP, in
memory) stands in for the bucket. Everything above it is what a pod uses: gcsfs behind
etils.epath and the shard reader, tensorstore's GCS driver behind Orbax, google-cloud-storage
behind tensorboardX, each pointed at the emulator by the variables real GCS clients honour.
"""

import json
import socket

import numpy as np
import pytest
from conftest import run_cli
from test_cli import TINY_TRAINING

from vfusion3d_jax.data import example, pipeline, remote, tfrecord

BUCKET = "vfusion3d-test"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def _with_generation_headers(download):
    """The emulator's media download, plus the `x-goog-generation` header that GCS sends and
    tensorstore reads (without it every read of Orbax's OCDBT manifest fails as malformed)."""

    def download_with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        if response.status.value in (200, 206):
            stored = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = stored["generation"]
            response["x-goog-metageneration"] = stored["metageneration"]

    return download_with_generation


@pytest.fixture(scope="module")
def bucket():
    """gs://BUCKET on a fresh in-memory emulator; this process and its children talk to it."""
    server_module = pytest.importorskip("gcp_storage_emulator.server")
    port = _free_port()
    with pytest.MonkeyPatch.context() as patch:
        objects = server_module.objects
        download = _with_generation_headers(objects.download)
        for _, handlers in server_module.HANDLERS:  # the routes
            for method, handler in list(handlers.items()):
                if handler is objects.download:
                    patch.setitem(handlers, method, download)
        patch.setattr(objects, "download", download)  # the JSON API's `alt=media` calls it by name
        server = server_module.create_server("localhost", port, in_memory=True, default_bucket=BUCKET)
        server.start()
        endpoint = f"http://localhost:{port}"
        patch.setenv("STORAGE_EMULATOR_HOST", endpoint)  # gcsfs, google-cloud-storage
        patch.setenv("TENSORSTORE_GCS_HTTP_URL", endpoint)  # tensorstore (Orbax's arrays)
        patch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")  # tensorstore asks for no credentials
        yield f"gs://{BUCKET}"
    server.stop()


def _objects(prefix: str) -> list[str]:
    return remote.glob(prefix.rstrip("/") + "/**", recursive=True)


def _upload_orbits(destination: str, rng, splits=(("train", 2), ("holdout", 1)), records=3) -> None:
    """Shards as another writer would leave them in a bucket: the data only, no offset index."""
    from etils import epath

    for split, shards in splits:
        for shard in range(shards):
            frames = b"".join(tfrecord.frame_record(example.encode_orbit(**example.random_orbit(
                rng, num_views=6, resolution=32))) for _ in range(records))
            epath.Path(f"{destination}/shards/{split}-{shard:05d}-of-{shards:05d}.tfrecord").write_bytes(frames)


def test_shards_in_a_bucket_are_globbed_and_read_without_writing_beside_them(bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("VFUSION3D_CACHE_DIR", str(tmp_path / "cache"))
    data = f"{bucket}/read_only_data"
    _upload_orbits(data, np.random.default_rng(0))
    before = _objects(data)

    shards = pipeline.expand_paths(f"{data}/shards/train-*.tfrecord")
    assert shards == [f"{data}/shards/train-00000-of-00002.tfrecord", f"{data}/shards/train-00001-of-00002.tfrecord"]
    for shard in shards:
        index = tfrecord.read_index(shard)  # built by a scan: the bucket has none
        records = [tfrecord.read_record(shard, offset, length) for offset, length in index]
        assert records == list(tfrecord.iterate_records(shard))
        assert all(example.decode_orbit(record)["images"].shape[0] == 6 for record in records)

    assert _objects(data) == before, "the reader wrote into a bucket it does not own"
    cached = sorted(p.name for p in (tmp_path / "cache" / "tfrecord_index").iterdir())
    assert len(cached) == 2 and all(name.endswith(".index") for name in cached)


def test_train_resume_and_evaluate_with_everything_in_a_bucket(bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("VFUSION3D_CACHE_DIR", str(tmp_path / "cache"))
    data, run, evaluation = f"{bucket}/orbits", f"{bucket}/runs/tiny", f"{bucket}/runs/tiny_eval"
    _upload_orbits(data, np.random.default_rng(1))
    training = ("train", f"--config.data_dir={data}", f"--workdir={run}", *TINY_TRAINING,
                "--config.train.checkpoint_every=2")

    first = run_cli(*training)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_cli(*training, "--config.train.stages.low_res.num_steps=6")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    evaluated = run_cli("evaluate", f"--checkpoint={run}", f"--data={data}/shards/holdout-*.tfrecord",
                        f"--workdir={evaluation}", "--config.chamfer=false", "--config.sheet_rows=1",
                        "--config.resolution=16", "--config.swap_group=3", "--config.num_coarse=4",
                        "--config.num_importance=4")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]

    from etils import epath

    steps = [json.loads(line)["step"] for line in epath.Path(f"{run}/metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6], "the resumed run must continue at step 5 and log each step once"
    objects = _objects(f"{bucket}/runs")
    assert any(p.startswith(f"{run}/checkpoints/6/") for p in objects)
    assert any(p.startswith(f"{run}/tensorboard/events.out.tfevents") for p in objects)
    report = json.loads(epath.Path(f"{evaluation}/metrics.json").read_text())
    assert report["data"] == f"{data}/shards/holdout-*.tfrecord" and report["objects"]
    assert epath.Path(f"{evaluation}/sheet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in _objects(data) if p.endswith(".index")], "indexes written beside a bucket's data"


def test_a_command_that_writes_locally_refuses_a_bucket_workdir_in_one_line(tmp_path):
    result = run_cli("render-data", "--config=configs/data.py:tiny", "--workdir=gs://some-bucket/orbits", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines == ["error: `render-data` writes to a local folder, not to gs://some-bucket/orbits; give a local "
                     "--workdir (or a gcsfuse mount) and copy it with `gcloud storage cp -r DIR gs://...`"]
    assert not list(tmp_path.iterdir()), "nothing may be written under a local folder named gs:"
