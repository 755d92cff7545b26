"""The pod and cluster launchers, checked through `--dry-run`: the commands they would run."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GLOB = "gs://bucket/orbits/train-*.tfrecord"


def dry_run(script: str, *args: str, **environment: str) -> list[list[str]]:
    """The commands `launch/<script> --dry-run ARGS` prints, each split as the shell would."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "MODEL", "CONFIG"))}
    result = subprocess.run(["bash", str(REPO / "launch" / script), "--dry-run", *args], capture_output=True,
                            text=True, env=dict(env, **environment), timeout=60)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()]


def test_tpu_train_runs_the_cli_on_every_worker_with_flags_unexpanded():
    [command] = dry_run("tpu_v5.sh", "train", "my-v5p-64", "us-east5-a", "gs://bucket/runs/lrm",
                        f"--config.data.mixture.rendered.glob={GLOB}")
    assert command[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v5p-64", "--zone", "us-east5-a",
                           "--worker=all"]
    assert command[9] == "--command"
    on_worker = shlex.split(command[10])  # what each worker's shell runs
    python = on_worker.index(".venv/bin/python")
    assert "VFUSION3D_DISTRIBUTED=1" in on_worker[:python]
    assert on_worker[python + 1:python + 8] == [
        "-m", "vfusion3d_jax", "train", "--config=configs/lrm.py:large", "--workdir=gs://bucket/runs/lrm",
        f"--config.data.mixture.rendered.glob={GLOB}", "2>&1"]  # the glob reaches Python as typed
    assert on_worker[-4:-1] == ["|", "tee", "-a"] and on_worker[-1].startswith("~/vfusion3d_logs/my-v5p-64-")


def test_tpu_model_and_config_choose_the_training_config():
    [command] = dry_run("tpu_v5.sh", "train", "pod", "zone", "gs://b/run", MODEL="mvdiffusion")
    assert "--config=configs/mvdiffusion.py:wan2_1_14b" in shlex.split(command[-1])
    [command] = dry_run("tpu_v5.sh", "train", "pod", "zone", "gs://b/run", CONFIG="configs/lrm.py:base")
    assert "--config=configs/lrm.py:base" in shlex.split(command[-1])


@pytest.mark.parametrize("accelerator, runtime", [("v5p-64", "v2-alpha-tpuv5"),
                                                   ("v5litepod-64", "v2-alpha-tpuv5-lite")])
def test_tpu_create_queues_a_slice_of_either_generation(accelerator, runtime):
    [command] = dry_run("tpu_v5.sh", "create", "pod", "us-east5-a", accelerator, "--spot")
    assert command == ["gcloud", "compute", "tpus", "queued-resources", "create", "pod", "--node-id", "pod", "--zone",
                       "us-east5-a", "--accelerator-type", accelerator, "--runtime-version", runtime, "--spot"]


def test_tpu_logs_gathers_every_workers_log_and_delete_releases_the_slice():
    mkdir, scp = dry_run("tpu_v5.sh", "logs", "pod", "zone", "out")
    assert mkdir == ["mkdir", "-p", "out"]
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "pod:vfusion3d_logs/pod-*.log", "out/", "--zone",
                   "zone", "--worker=all"]
    [delete] = dry_run("tpu_v5.sh", "delete", "pod", "zone")
    assert delete[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "pod"]


def test_tpu_rejects_an_unknown_accelerator():
    result = subprocess.run(["bash", str(REPO / "launch" / "tpu_v5.sh"), "--dry-run", "create", "pod", "zone", "v4-8"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "v5p-N or v5litepod-N" in result.stderr


def test_slurm_submit_asks_for_one_task_per_gpu_a_warning_signal_and_requeue():
    mkdir, sbatch = dry_run("gpu_slurm.sh", "submit", "/shared/runs/lrm", f"--config.x={GLOB}", NODES="4",
                            GPUS_PER_NODE="8", PARTITION="a100")
    assert mkdir == ["mkdir", "-p", str(REPO / "logs")]
    options = dict(zip(sbatch[1:sbatch.index("--requeue")][::2], sbatch[2:sbatch.index("--requeue")][::2]))
    assert options["--nodes"] == "4" and options["--ntasks-per-node"] == "8" and options["--gpus-per-node"] == "8"
    assert options["--signal"] == "B:TERM@120"  # the batch script forwards SIGTERM before the time limit
    assert sbatch[sbatch.index("--partition") + 1] == "a100"
    # sbatch runs a copy of the script from its spool folder: the repository travels in the environment.
    assert sbatch[sbatch.index("--export") + 1].endswith(f",VFUSION3D_REPO={REPO}")
    assert sbatch[-4:] == [str(REPO / "launch" / "gpu_slurm.sh"), "run", "/shared/runs/lrm", f"--config.x={GLOB}"]


def test_slurm_run_starts_the_cli_in_every_task():
    [srun] = dry_run("gpu_slurm.sh", "run", "/shared/runs/mvd", "--config.train.checkpoint_every=500",
                     SLURM_JOB_ID="42", MODEL="mvdiffusion")
    assert srun[0] == "srun" and "--kill-on-bad-exit=1" in srun
    assert srun[srun.index("--export") + 1] == "ALL,VFUSION3D_DISTRIBUTED=1"
    python = srun.index(str(REPO / ".venv" / "bin" / "python"))
    assert srun[python + 1:] == ["-m", "vfusion3d_jax", "train", "--config=configs/mvdiffusion.py:wan2_1_14b",
                                "--workdir=/shared/runs/mvd", "--config.train.checkpoint_every=500"]


def test_slurm_run_outside_an_allocation_says_so():
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    result = subprocess.run(["bash", str(REPO / "launch" / "gpu_slurm.sh"), "run", "/tmp/run"], capture_output=True,
                            text=True, env=env, timeout=60)
    assert result.returncode != 0 and "inside a SLURM allocation" in result.stderr
