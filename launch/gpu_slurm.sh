#!/usr/bin/env bash
# Pretraining on a SLURM GPU cluster: one process per GPU, the same `train` command as a local run.
#
#   launch/gpu_slurm.sh [--dry-run] submit WORKDIR [--config.x=VALUE ...]   # sbatch this script
#   launch/gpu_slurm.sh [--dry-run] run    WORKDIR [--config.x=VALUE ...]   # inside the allocation (what sbatch runs)
#
# --dry-run prints each command (shell-quoted) instead of running it.
# NODES (default 1), GPUS_PER_NODE (8), CPUS_PER_GPU (12), TIME (24:00:00), PARTITION and ACCOUNT
# size the job; MODEL=lrm (default) or mvdiffusion picks the config (configs/lrm.py:large or
# configs/mvdiffusion.py:wan2_1_14b), CONFIG=file.py:variant overrides it. Run it from the
# repository on a shared file system, set up once with
# `make setup && .venv/bin/pip install -c constraints.txt -e '.[gpu,gcs]'`.
#
# Every task calls jax.distributed.initialize() (VFUSION3D_DISTRIBUTED=1), which reads the
# coordinator (the first node), the process count and each task's id and GPU from SLURM's
# environment. Two minutes before the time limit SLURM signals the batch script, which passes
# SIGTERM to every task: they save the current step together and exit; the script then requeues
# the job, which resumes from that checkpoint.
set -euo pipefail

DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
usage="usage: $0 [--dry-run] submit|run WORKDIR [flags...]"
ACTION=${1:?$usage}
WORKDIR=${2:?$usage}
shift 2

# Under sbatch this file runs from SLURM's spool folder: `submit` passes the repository along.
REPO_DIR=${VFUSION3D_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
source "$REPO_DIR/launch/common.sh"  # CONFIG and run
NODES=${NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}

case "$ACTION" in
  submit)
    options=(--job-name "vfusion3d-${MODEL:-lrm}" --nodes "$NODES" --ntasks-per-node "$GPUS_PER_NODE"
             --gpus-per-node "$GPUS_PER_NODE" --cpus-per-task "${CPUS_PER_GPU:-12}" --time "${TIME:-24:00:00}"
             --signal B:TERM@120 --requeue --open-mode append --output "$REPO_DIR/logs/%x-%j.out")
    if [ -n "${PARTITION:-}" ]; then options+=(--partition "$PARTITION"); fi
    if [ -n "${ACCOUNT:-}" ]; then options+=(--account "$ACCOUNT"); fi
    run mkdir -p "$REPO_DIR/logs"
    run sbatch "${options[@]}" --export "ALL,MODEL=${MODEL:-lrm},CONFIG=$CONFIG,VFUSION3D_REPO=$REPO_DIR" "$REPO_DIR/launch/gpu_slurm.sh" \
      run "$WORKDIR" "$@"
    ;;
  run)
    : "${SLURM_JOB_ID:?run inside a SLURM allocation (use submit)}"
    # One task per GPU, each task's output in its own file (logs/<job>-<task>.log).
    step=(srun --kill-on-bad-exit=1 --output "$REPO_DIR/logs/%x-%j-%t.log" --chdir "$REPO_DIR"
          --export "ALL,VFUSION3D_DISTRIBUTED=1"
          "$REPO_DIR/.venv/bin/python" -m vfusion3d_jax train "--config=$CONFIG" "--workdir=$WORKDIR" "$@")
    if [ "$DRY_RUN" = 1 ]; then run "${step[@]}"; exit 0; fi
    # At the time limit (--signal B:TERM@120) every task gets SIGTERM, saves and exits; then requeue.
    preempted=0
    trap 'preempted=1; kill -TERM "$step_pid" 2>/dev/null || true' TERM
    "${step[@]}" &
    step_pid=$!
    status=0
    wait "$step_pid" || status=$?
    if [ "$preempted" = 1 ]; then
      wait "$step_pid" || status=$?
      echo "preempted: the tasks saved their step; requeueing job $SLURM_JOB_ID"
      scontrol requeue "$SLURM_JOB_ID"
    fi
    exit "$status"
    ;;
  *)
    echo "unknown action $ACTION; $usage" >&2
    exit 2
    ;;
esac
