#!/usr/bin/env bash
# Train on every host of a Cloud TPU VM slice (v4-32, v5p-128, ...), from your workstation.
#
#   export TPU_NAME=my-v5p-128 ZONE=us-east5-a            # PROJECT optional
#   bash launch/tpu_pod.sh setup                            # copy this repo + install, all hosts
#   bash launch/tpu_pod.sh train --config configs/stage2.py \
#       --workdir /mnt/shared/runs/stage2 --config.init.hf_llava=/mnt/shared/hf/llava-1.5-7b-hf \
#       --config.data.sources="[{'kind': 'arrayrecord', 'path': '/mnt/shared/data/mix665k'}]"
#   bash launch/tpu_pod.sh logs                             # tail host 0's log
#   bash launch/tpu_pod.sh stop
#   DRY_RUN=1 bash launch/tpu_pod.sh train ...              # print the commands, run none
#
# Before renting the slice, check that the run fits it (no TPU needed):
#   python -m mmjax.aot --config configs/stage2.py:llava15_7b --topology v5p-128
# The stage recipes pick the TPU settings themselves (splash attention, scanned layers, the
# TPU remat policy: runtime.*=auto), so the train command needs no runtime overrides.
#
# Every host runs the same command; jax.distributed finds the slice by itself (mmjax
# distributed.mode=auto sees libtpu). The work dir, weights and data must be paths every host
# sees (a Filestore/NFS share or a gcsfuse mount): checkpoints are written by all hosts.
# Multi-slice (queued resources with several slices): add --config.mesh_dcn.data=NUM_SLICES;
# the mesh's ICI part (--config.mesh.*) then describes one slice.
# A preemption notice (maintenance event) makes every host save at the same step and exit 75;
# run the same train command again to resume.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REMOTE_DIR=${REMOTE_DIR:-mmjax}
GCLOUD=(gcloud compute tpus tpu-vm)
EXTRA=(--zone "$ZONE" ${PROJECT:+--project "$PROJECT"})
# DRY_RUN=1: print each command (shell-quoted, one per line) instead of running it
run() {
  if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}
on_all() { run "${GCLOUD[@]}" ssh "$TPU_NAME" "${EXTRA[@]}" --worker=all --command "$1"; }

action=${1:?usage: tpu_pod.sh setup|train ARGS...|logs|stop}
shift
case "$action" in
  setup)
    cd "$(dirname "$0")/.."
    run tar czf /tmp/mmjax-src.tgz --exclude=.venv --exclude=.git --exclude=runs .
    run "${GCLOUD[@]}" scp /tmp/mmjax-src.tgz "$TPU_NAME":/tmp/ "${EXTRA[@]}" --worker=all
    # the project's `tpu` extra: libtpu for the pinned jax (an unpinned jax[tpu] would
    # upgrade jax under flax and orbax)
    on_all "mkdir -p ~/$REMOTE_DIR && tar xzf /tmp/mmjax-src.tgz -C ~/$REMOTE_DIR && \
      cd ~/$REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]' && \
      .venv/bin/python -c 'import jax; print(jax.devices())'"
    ;;
  train)
    args=$(printf '%q ' "$@")
    on_all "cd ~/$REMOTE_DIR && nohup .venv/bin/python -m mmjax.train $args\
> ~/mmjax-train.log 2>&1 & echo started on \$(hostname)"
    ;;
  logs)
    run "${GCLOUD[@]}" ssh "$TPU_NAME" "${EXTRA[@]}" --worker=0 --command "tail -n 50 -f ~/mmjax-train.log"
    ;;
  stop)
    on_all "pkill -TERM -f mmjax.train || true"  # SIGTERM: saves a checkpoint, then exits
    ;;
  *) echo "unknown action $action" >&2; exit 2 ;;
esac
