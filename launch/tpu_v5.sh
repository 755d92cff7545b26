#!/usr/bin/env bash
# Trains the LRM on a Cloud TPU v5 pod slice: the same module as a local run, on every worker.
#
#   launch/tpu_v5.sh setup  NAME ZONE                      # once: clone/refresh the repo, make the venv
#   launch/tpu_v5.sh train  NAME ZONE gs://BUCKET/runs/lrm [extra flags...]
#
# Example:
#   launch/tpu_v5.sh train my-v5p-64 us-east5-a gs://my-bucket/runs/lrm-large \
#       --config.data.mixture.rendered.glob='gs://my-bucket/orbits/rendered/train-*.tfrecord'
#
# VFUSION3D_DISTRIBUTED=1 makes every worker call jax.distributed.initialize(); on TPU VMs
# JAX finds the coordinator itself. REPO_URL, REPO_DIR and CONFIG may be overridden.
set -euo pipefail

ACTION=${1:?usage: $0 setup|train NAME ZONE [WORKDIR] [flags...]}
NAME=${2:?TPU name}
ZONE=${3:?zone}
shift 3
REPO_URL=${REPO_URL:-https://github.com/your-org/vfusion3d_jax.git}
REPO_DIR=${REPO_DIR:-\$HOME/vfusion3d_jax}
CONFIG=${CONFIG:-configs/lrm.py:large}

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "$1"
}

case "$ACTION" in
  setup)
    on_all_workers "set -e; if [ -d $REPO_DIR ]; then git -C $REPO_DIR pull --ff-only; else git clone $REPO_URL $REPO_DIR; fi;
      cd $REPO_DIR && python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip &&
      .venv/bin/pip install -q -c constraints.txt -e '.[tpu]'"
    ;;
  train)
    WORKDIR=${1:?workdir, e.g. gs://BUCKET/runs/NAME}
    shift
    # Quote each extra flag so globs reach Python unexpanded.
    FLAGS=""
    if [ $# -gt 0 ]; then FLAGS=$(printf " %q" "$@"); fi
    on_all_workers "cd $REPO_DIR && VFUSION3D_DISTRIBUTED=1 .venv/bin/python -m vfusion3d_jax train \
      --config=$CONFIG --workdir=$WORKDIR $FLAGS"
    ;;
  *)
    echo "unknown action $ACTION (setup|train)" >&2
    exit 2
    ;;
esac
