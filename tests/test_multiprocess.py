"""Pod-scale training proven on this machine: several local processes form one mesh, preemption
(SIGTERM) saves and resumes bit-exactly, SIGKILL never leaves a checkpoint that fails to restore.
All slow (`pytest -m slow tests/test_multiprocess.py`, ~13 minutes on 2 cores).

Every run is `python -m vfusion3d_jax train` as a user starts it on a pod: one process per host,
`VFUSION3D_DISTRIBUTED=1` and the coordinator in `JAX_COORDINATOR_ADDRESS` (here localhost), each
process with 8 / P fake CPU devices, so P processes always make the same 8-device mesh.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from vfusion3d_jax.data import example, tfrecord
from vfusion3d_jax.models import convert
from vfusion3d_jax.train import checkpointing, sharding

STEPS = 24  # 12 epochs of 16 orbits in batches of 8: long enough for a signal to land mid-run
DEVICES = 8
# The tiny LRM made smaller (as tests/test_train.py's small_config), over a data 2 x fsdp 4 mesh: one
# example per device, parameters and optimiser state sharded 4 ways, gradients reduced across the
# processes. (No tensor axis: XLA:CPU can run a device's independent collectives in either order,
# and with tensor parallelism on fake devices that has deadlocked one process of 8 devices.)
TRAINING = (
    "--config.data.batch_size=8", "--config.data.read_threads=1", "--config.data.read_buffer_size=4",
    "--config.mesh.shape.data=2", "--config.mesh.shape.fsdp=4", "--config.mesh.shape.tensor=1",
    "--config.render.num_coarse=8", "--config.render.num_importance=8",
    "--config.train.stages.low_res.target_resolution=16", "--config.train.stages.low_res.num_target_views=2",
    "--config.train.stages.high_res.num_steps=0", "--config.train.stages.finetune.num_steps=0",
    "--config.train.loss.lpips.rendered=0", "--config.train.loss.lpips.synthetic=0",
    "--config.train.optimizer.learning_rate=2e-3", "--config.train.optimizer.warmup_steps=2",
    # Adam's default eps (1e-8) turns rounding-level differences of near-zero gradient components into
    # updates differing by up to the learning rate; 1e-4 keeps runs that differ only in rounding close.
    "--config.train.optimizer.eps=1e-4",
    "--config.train.log_every=1", "--config.eval.every=0", "--config.train.checkpoint_keep=100",
)
COMPARED_STEP = 2  # where one process and two are compared: the first update (step 1's learning rate is 0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("orbits")
    (root / "shards").mkdir()
    rng = np.random.default_rng(0)
    with tfrecord.TFRecordWriter(root / "shards" / "train-00000-of-00001.tfrecord") as writer:
        for i in range(16):
            writer.write(example.encode_orbit(**example.random_orbit(
                rng, num_views=6, resolution=32, source="synthetic" if i % 2 else "rendered")))
    return str(root)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def start(workdir: Path, data_dir: str, *, processes: int, checkpoint_every: int = COMPARED_STEP
          ) -> list[subprocess.Popen]:
    """Starts `processes` local processes of one `STEPS`-step training run in `workdir`; their
    output goes to `<workdir>.<process>.log`."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("JAX_")}
    environment.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES // processes}",
                       JAX_PLATFORMS="cpu")
    if processes > 1:
        environment.update({sharding.DISTRIBUTED_ENV: "1", "JAX_COORDINATOR_ADDRESS": f"localhost:{_free_port()}",
                            "JAX_NUM_PROCESSES": str(processes)})
    command = [sys.executable, "-m", "vfusion3d_jax", "train", f"--workdir={workdir}", f"--config.data_dir={data_dir}",
               f"--config.train.stages.low_res.num_steps={STEPS}",
               f"--config.train.checkpoint_every={checkpoint_every}", *TRAINING]
    running = []
    for process in range(processes):
        log = open(f"{workdir}.{process}.log", "a")
        running.append(subprocess.Popen(command, env=dict(environment, JAX_PROCESS_ID=str(process)),
                                        stdout=log, stderr=subprocess.STDOUT))
        log.close()
    return running


def finish(workdir: Path, running: list[subprocess.Popen]) -> None:
    """Waits for every process; each must exit 0 (else its log's tail is the failure)."""
    for process, handle in enumerate(running):
        status = handle.wait(timeout=600)
        assert status == 0, f"process {process} exited {status}:\n{Path(f'{workdir}.{process}.log').read_text()[-3000:]}"


def train(workdir: Path, data_dir: str, *, processes: int) -> None:
    finish(workdir, start(workdir, data_dir, processes=processes))


def logged_steps(workdir: Path) -> list[int]:
    """Steps in the run's metrics.jsonl so far (a line still being written is left for later)."""
    path = workdir / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("\n")]


def wait_for_step(workdir: Path, step: int, running: list[subprocess.Popen]) -> None:
    """Blocks until the run has logged `step` (so it is training, past compilation)."""
    deadline = time.monotonic() + 600
    while not logged_steps(workdir) or logged_steps(workdir)[-1] < step:
        assert all(handle.poll() is None for handle in running), "a process ended before the signal"
        assert time.monotonic() < deadline, f"step {step} never logged"
        time.sleep(0.05)


def parameters(workdir: Path, step: int | None = None) -> dict:
    """The trained parameters of the run in `workdir` (its newest checkpoint, or that of `step`)."""
    return jax.device_get(nnx.to_pure_dict(nnx.state(convert.load_lrm(str(workdir), step=step))))


def checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(path.name) for path in (workdir / "checkpoints").iterdir() if path.name.isdigit())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, data_dir) -> Path:
    """The uninterrupted run: one process with all 8 devices."""
    workdir = tmp_path_factory.mktemp("runs") / "one_process"
    train(workdir, data_dir, processes=1)
    return workdir


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, data_dir) -> Path:
    """The uninterrupted run on 2 processes of 4 devices each."""
    workdir = tmp_path_factory.mktemp("runs") / "two_processes"
    train(workdir, data_dir, processes=2)
    return workdir


# Slow, as every test here: besides the minutes, one process of 8 fake CPU devices can deadlock in
# XLA:CPU's collective rendezvous (a device runs two independent collectives in the other order;
# seen in ~1 of 10 runs on this 2-core machine, more often under load), which CI must not meet.
@pytest.mark.slow
def test_two_processes_train_as_one_process_with_all_devices(one_process, two_processes):
    # Each host reads block p of every global batch (pipeline.HostShare), so both runs train on the
    # very same batches: their losses agree to float32 rounding from the first step.
    one, two = ([json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
                for run in (one_process, two_processes))
    np.testing.assert_allclose(two[:4], one[:4], rtol=1e-5)
    # Not bit-equal: across processes the gradient's all-reduce runs through gloo, which sums the
    # shards in another order than one process does. So the parameters are compared after the first
    # update, where a wrong batch or a missing reduction moves them by ~1e-3 (the learning rate).
    # Later steps drift apart: the renderer's importance sampling (a discontinuous function of the
    # coarse densities) turns rounding differences into other sample positions (6e-6 by step 4).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
                 parameters(one_process, COMPARED_STEP), parameters(two_processes, COMPARED_STEP))
    # Process 0 alone logs: every step once. Orbax saves collectively, the data position per host.
    assert logged_steps(two_processes) == list(range(1, STEPS + 1))
    assert sorted(path.name for path in (two_processes / "checkpoints" / str(STEPS) / "data").iterdir()
                  if path.suffix == ".json") == ["process_0-of-2.json", "process_1-of-2.json"]


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_saves_and_the_restart_ends_bit_identical(tmp_path, data_dir, one_process, two_processes, processes):
    workdir = tmp_path / f"preempted_{processes}"
    running = start(workdir, data_dir, processes=processes)
    wait_for_step(workdir, 2, running)
    # A preempted TPU VM or a SLURM job at its limit: the signal reaches one host (the last);
    # every process saves the same step and exits cleanly.
    running[-1].send_signal(signal.SIGTERM)
    finish(workdir, running)
    saved = checkpoint_steps(workdir)[-1]
    assert 2 <= saved < STEPS
    assert f"preempted: saved step {saved}" in Path(f"{workdir}.0.log").read_text()

    train(workdir, data_dir, processes=processes)  # the restart: the same command
    assert logged_steps(workdir) == list(range(1, STEPS + 1))
    uninterrupted = one_process if processes == 1 else two_processes
    jax.tree.map(np.testing.assert_array_equal, parameters(uninterrupted), parameters(workdir))


@pytest.mark.slow
def test_sigkill_loses_only_unsaved_steps_and_every_checkpoint_restores(tmp_path, data_dir, one_process):
    workdir = tmp_path / "killed"
    every = 3
    running = start(workdir, data_dir, processes=1, checkpoint_every=every)
    wait_for_step(workdir, 4, running)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 2.0))  # any moment: mid-step, mid-save
    running[0].send_signal(signal.SIGKILL)
    running[0].wait()
    reached = logged_steps(workdir)[-1] if logged_steps(workdir) else 0

    steps = checkpoint_steps(workdir)
    assert steps and steps[-1] >= reached - 2 * every  # at most the unsaved steps and the save in flight are lost
    for step in steps:  # a killed save leaves no half-written step: each one restores
        run = checkpointing.Checkpointer(str(workdir / "checkpoints"), save_interval_steps=every, max_to_keep=None)
        assert run.restore_progress(step)["step"] == step
        run.close()
        convert.load_lrm(str(workdir), step=step)

    train(workdir, data_dir, processes=1)
    jax.tree.map(np.testing.assert_array_equal, parameters(one_process), parameters(workdir))
