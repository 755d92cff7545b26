#!/usr/bin/env bash
# Pretraining on a Cloud TPU v5e / v5p slice: the same `train` command as a local run, on every
# worker of the slice at once (one process per worker, VFUSION3D_DISTRIBUTED=1).
#
#   launch/tpu_v5.sh [--dry-run] create NAME ZONE ACCELERATOR [--spot]   # a queued resource, e.g. v5p-64, v5litepod-64
#   launch/tpu_v5.sh [--dry-run] status NAME ZONE                        # the queued resource's state
#   launch/tpu_v5.sh [--dry-run] setup  NAME ZONE                        # clone or update the repo, make the venv
#   launch/tpu_v5.sh [--dry-run] train  NAME ZONE WORKDIR [--config.x=VALUE ...]  # WORKDIR seen by every worker
#   launch/tpu_v5.sh [--dry-run] logs   NAME ZONE [DIR]                  # every worker's log, into DIR
#   launch/tpu_v5.sh [--dry-run] delete NAME ZONE
#
# --dry-run prints each command (one per line, shell-quoted) instead of running it.
# MODEL=lrm (default) or mvdiffusion picks the config (configs/lrm.py:large or
# configs/mvdiffusion.py:wan2_1_14b); CONFIG=file.py:variant overrides it. REPO_URL, REPO_DIR,
# RUNTIME (the TPU software version; by default the one for the accelerator's generation) too.
#
# A preempted or restarted slice resumes where it stopped: run `train` again with the same
# workdir (SIGTERM makes every worker save the current step first; see README "Pretraining").
set -euo pipefail

DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
usage="usage: $0 [--dry-run] create|status|setup|train|logs|delete NAME ZONE [...]"
ACTION=${1:?$usage}
NAME=${2:?$usage}
ZONE=${3:?$usage}
shift 3

REPO_URL=${REPO_URL:-https://github.com/your-org/vfusion3d_jax.git}
REPO_DIR=${REPO_DIR:-'$HOME/vfusion3d_jax'}  # expanded on the worker
LOG_DIR=vfusion3d_logs  # on each worker, in the home directory
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # CONFIG and run

on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "$1"
}

case "$ACTION" in
  create)
    ACCELERATOR=${1:?accelerator type, e.g. v5p-64 or v5litepod-64}
    shift
    case "$ACCELERATOR" in
      v5p-*) RUNTIME=${RUNTIME:-v2-alpha-tpuv5} ;;
      v5litepod-*) RUNTIME=${RUNTIME:-v2-alpha-tpuv5-lite} ;;
      *) echo "accelerator must be v5p-N or v5litepod-N, got $ACCELERATOR" >&2; exit 2 ;;
    esac
    run gcloud compute tpus queued-resources create "$NAME" --node-id "$NAME" --zone "$ZONE" \
      --accelerator-type "$ACCELERATOR" --runtime-version "$RUNTIME" "$@"
    ;;
  status)
    run gcloud compute tpus queued-resources describe "$NAME" --zone "$ZONE" --format 'value(state.state)'
    ;;
  setup)
    on_all_workers "set -e; if [ -d $REPO_DIR ]; then git -C $REPO_DIR pull --ff-only; else git clone $REPO_URL $REPO_DIR; fi;
      cd $REPO_DIR && python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip &&
      .venv/bin/pip install -q -c constraints.txt -e '.[tpu,gcs]'"
    ;;
  train)
    WORKDIR=${1:?workdir every worker sees: gs://BUCKET/runs/NAME, or a shared file system}
    shift
    # Each flag quoted, so globs reach Python unexpanded; each worker's output also goes to its
    # own log file (collected by `logs`).
    FLAGS=""
    if [ $# -gt 0 ]; then FLAGS=$(printf " %q" "$@"); fi
    on_all_workers "set -o pipefail; mkdir -p ~/$LOG_DIR && cd $REPO_DIR && VFUSION3D_DISTRIBUTED=1 .venv/bin/python -m vfusion3d_jax train \
--config=$CONFIG --workdir=$WORKDIR$FLAGS 2>&1 | tee -a ~/$LOG_DIR/$NAME-\$(hostname).log"
    ;;
  logs)
    DEST=${1:-logs/$NAME}
    run mkdir -p "$DEST"
    run gcloud compute tpus tpu-vm scp "$NAME:$LOG_DIR/$NAME-*.log" "$DEST/" --zone "$ZONE" --worker=all
    ;;
  delete)
    run gcloud compute tpus queued-resources delete "$NAME" --zone "$ZONE" --force --quiet
    ;;
  *)
    echo "unknown action $ACTION; $usage" >&2
    exit 2
    ;;
esac
