# Sourced by the launchers: the training config that MODEL / CONFIG choose, and `run`, which runs a
# command or, with DRY_RUN=1 (--dry-run), prints it shell-quoted on one line.

case "${MODEL:-lrm}" in
  lrm) DEFAULT_CONFIG=configs/lrm.py:large ;;
  mvdiffusion) DEFAULT_CONFIG=configs/mvdiffusion.py:wan2_1_14b ;;
  *) echo "MODEL must be lrm or mvdiffusion, got $MODEL" >&2; exit 2 ;;
esac
CONFIG=${CONFIG:-$DEFAULT_CONFIG}

run() {
  if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}
