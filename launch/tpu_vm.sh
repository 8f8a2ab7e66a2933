#!/usr/bin/env bash
# One repeat-lm command on every worker of a Cloud TPU VM (a pod slice): the same `repeat-lm train` on each host,
# jax.distributed initialised from the TPU environment (repeat_lm/train/distributed.py). `repeat-lm sweep
# --launcher=tpu-vm` prints (or, with --submit, runs) one such line per run:
#   launch/tpu_vm.sh --tpu=my-v4-64 --zone=us-central2-b [--project=P] train --gin_file=/mnt/runs/rq1/d27_e8/run.gin
# Needs: gcloud on this machine; on every worker the repository at REPO_DIR (default: this checkout's path) with
# its .venv installed with the tpu extra (pip install -e '.[tpu]'); the run directory on storage that every worker
# sees at the same path (Filestore/NFS, or a gcsfuse mount), since MODEL_DIR is a local path to the trainer.
# Exit code: non-zero if any worker failed (gcloud reports the first failure). Stopping it (Ctrl-C, SIGTERM, SIGHUP)
# sends every worker's trainer SIGTERM: they checkpoint and exit, and it waits for them.
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
# Each worker notes its trainer's pid in a file named for this launch (expanded there: its TMPDIR, else /tmp; exec
# makes the shell's pid the trainer's), through which a stop reaches the trainers (below).
PID_FILE="\"\${TMPDIR:-/tmp}\"/repeat_lm.$(date +%Y%m%d%H%M%S).$$.pid"
COMMAND="cd $(printf %q "$REPO_DIR") && echo \$\$ > $PID_FILE && ${ENV}exec .venv/bin/repeat-lm $(printf '%q ' "$@")"
"${GCLOUD[@]}" ssh "$TPU" "${WHERE[@]}" --worker=all --command="$COMMAND" &
gcloud_pid=$!
# A stop of this script (Ctrl-C, a sweep's SIGTERM, a closed terminal) never reached the trainers: gcloud runs a
# --command under `ssh -T`, and sshd signals a command without a terminal nothing when its client goes, so they trained
# on, holding the TPU and MODEL_DIR's lock, while the sweep recorded the run as checkpointed. It is sent to them as
# SIGTERM (they checkpoint at their next step and exit) over a second ssh; gcloud, which ignores Ctrl-C as a
# background job, then returns with their exit.
stopping="" signalled=""
# shellcheck disable=SC2317  # run by the trap
stop() {
  signalled=1
  if [[ -n "$stopping" ]]; then
    echo "tpu_vm.sh: already stopping: waiting for the trainers to checkpoint and exit" >&2
    return
  fi
  stopping=1
  echo "tpu_vm.sh: stopping: SIGTERM to the trainer on every worker; waiting for them to checkpoint and exit" >&2
  # A worker without the file never started its trainer, one whose kill fails has none left: nothing to stop there.
  "${GCLOUD[@]}" ssh "$TPU" "${WHERE[@]}" --worker=all \
    --command="kill -TERM \$(cat $PID_FILE 2>/dev/null) 2>/dev/null; rm -f $PID_FILE" ||
    echo "tpu_vm.sh: could not reach every worker (gcloud's error is above): stop its trainer by hand" >&2
}
trap stop INT TERM HUP
while :; do
  signalled="" rc=0
  wait "$gcloud_pid" || rc=$?
  # A trapped signal ends the wait early with its own status (> 128): wait again, for gcloud's (bash keeps it once
  # gcloud has exited), which is the trainers' exit.
  [[ -n "$signalled" ]] || break
done
exit "$rc"
