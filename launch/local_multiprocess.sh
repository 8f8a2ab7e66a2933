#!/usr/bin/env bash
# One repeat-lm command as N processes on this machine, joined by jax.distributed over 127.0.0.1, each with D CPU
# devices: the multi-host code path (one block of batch rows per process) without a cluster.
#   launch/local_multiprocess.sh 2 4 train --gin_file=gin/runs/smoke.gin --gin.MODEL_DIR="'/tmp/smoke_2proc'"
# Same as: repeat-lm launch-local --num_processes=2 --devices_per_process=4 -- train ...
set -euo pipefail
# PYTHON: the interpreter (default: the checkout's .venv/bin/python where it has one, else python3).
if [[ $# -lt 3 ]]; then
  echo "usage: [PYTHON=python] $0 NUM_PROCESSES DEVICES_PER_PROCESS COMMAND [ARGS...]" >&2
  exit 2
fi
if [[ -z "${PYTHON:-}" ]]; then
  PYTHON="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"
  [[ -x "$PYTHON" ]] || PYTHON=python3
fi
exec "$PYTHON" -m repeat_lm.experiments.launch_local --num_processes="$1" --devices_per_process="$2" -- "${@:3}"
