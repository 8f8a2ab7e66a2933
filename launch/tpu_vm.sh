#!/usr/bin/env bash
# One repeat-lm command on every worker of a Cloud TPU VM (a pod slice): the same `repeat-lm train` on each host,
# jax.distributed initialised from the TPU environment (repeat_lm/train/distributed.py). `repeat-lm sweep
# --launcher=tpu-vm` prints (or, with --submit, runs) one such line per run:
#   launch/tpu_vm.sh --tpu=my-v4-64 --zone=us-central2-b [--project=P] train --gin_file=/mnt/runs/rq1/d27_e8/run.gin
# Needs: gcloud on this machine; on every worker the repository at REPO_DIR (default: this checkout's path) with
# its .venv installed with the tpu extra (pip install -e '.[tpu]'); the run directory on storage that every worker
# sees at the same path (Filestore/NFS, or a gcsfuse mount), since MODEL_DIR is a local path to the trainer.
# Exit code: non-zero if any worker failed (gcloud reports the first failure).
set -euo pipefail
TPU="" ZONE="" PROJECT=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu=*) TPU="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    *) break ;;
  esac
  shift
done
if [[ -z "$TPU" || -z "$ZONE" || $# -eq 0 ]]; then
  echo "usage: $0 --tpu=NAME --zone=ZONE [--project=P] train|finetune|eval --gin_file=..." >&2
  exit 2
fi
REPO_DIR="${REPO_DIR:-$(cd "$(dirname "$0")/.." && pwd)}"
GCLOUD=(gcloud compute tpus tpu-vm)
# Never an empty array: under set -u, bash before 4.4 (macOS's 3.2) stops at "${EMPTY[@]}" as an unbound variable.
WHERE=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project="$PROJECT")
# Every worker's address, exported as TPU_WORKER_HOSTNAMES: a sign of the pod that distributed.py reads besides its
# Cloud TPU VM check (on which jax reads the workers from the VM's metadata); the worker id comes from metadata either
# way. A failed describe (a mistyped TPU or zone, no tpu.nodes.get permission) ends the launch with gcloud's error,
# which was discarded: the ssh below needs the same access.
if ! HOSTS="$("${GCLOUD[@]}" describe "$TPU" "${WHERE[@]}" \
    --format='value[delimiter=","](networkEndpoints[].ipAddress)')"; then
  echo "tpu_vm.sh: \`gcloud compute tpus tpu-vm describe $TPU ${WHERE[*]}\` failed (its error is above): check the" \
    "TPU's name, zone and project, and your access to it" >&2
  exit 1
fi
ENV=""
[[ "$HOSTS" == *,* ]] && ENV="TPU_WORKER_HOSTNAMES=$HOSTS "
COMMAND="cd $(printf %q "$REPO_DIR") && ${ENV}.venv/bin/repeat-lm $(printf '%q ' "$@")"
exec "${GCLOUD[@]}" ssh "$TPU" "${WHERE[@]}" --worker=all --command="$COMMAND"
