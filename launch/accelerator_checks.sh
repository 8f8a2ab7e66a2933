#!/usr/bin/env bash
# The checks that need a GPU, in one go (run from the repository root on the GPU host):
#   1. cuDNN attention against XLA's, bias gradients included (tests marked `accelerator`);
#   2. `repeat-lm bench accelerator`: T5 v1.1 Base step variants (scan, remat, cuDNN, batch), one process each.
# Usage: launch/accelerator_checks.sh [OUT_DIR [bench accelerator flags...]]
#   (BUDGET_S: seconds after which no new benchmark variant starts; PROFILE=1 first traces the T5 v1.1 Base step
#   of gin/runs/accelerator.gin, unrolled + no remat + cuDNN, into OUT_DIR/profile: ops.md there, the raw
#   trace as OUT_DIR/step.xplane.pb, and a table of it in the report)
# PYTHON: the interpreter (default: .venv/bin/python where the repository has one, else python3).
# Exit status: the tests' if they failed (the benchmark still runs after them), else the benchmark's.
set -uo pipefail
# The repository's .venv where there is one (pip install -e '.[gpu]'), else the python3 on PATH (an image whose
# system Python already has jax with CUDA): a bare python3 beside an unactivated .venv had no jax.
PY=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
out=${1:-runs/accelerator}
shift || true
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  "$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax',
optax.__version__, jax.devices())"; } 2>&1 | tee "$out/device.txt"
JAX_PLATFORMS=cuda timeout 300 "$PY" -m pytest -q -m accelerator -p no:cacheprovider \
  tests/models/test_attention_impl.py 2>&1 | tee "$out/pytest_accelerator.log"
tests_rc=$?  # pytest's (or timeout's 124), not tee's: pipefail
if [ "${PROFILE:-0}" = 1 ]; then
  # An earlier run's trace must not stand in for this one's: a failed profiling run reported the old kernel table.
  rm -rf "$out/profile" "$out/step.xplane.pb"
  # The unrolled variant's process took about 3 minutes on an H200 (init and step compile included, 2026-11-30).
  timeout 300 "$PY" -m repeat_lm.cli bench train --gin_file=gin/models/t5_1_1_base.gin --batch_size=128 --steps=3 --rounds=1 \
    --gin.SCAN_LAYERS=False --gin.REMAT_POLICY="'none'" --gin.t5.T5Config.attention_implementation="'cudnn'" \
    --profile_dir="$out/profile" \
    2>&1 | tee "$out/profile.log"
  profile_rc=$?  # the profiling run's (or timeout's 124), not tee's: pipefail
  # Only a trace of a profiling run that succeeded: without one the variants are still measured, and reported
  # without it.
  if [ "$profile_rc" -eq 0 ]; then
    find "$out/profile" -name '*.xplane.pb' -exec cp {} "$out/step.xplane.pb" \;
  else
    echo "accelerator_checks.sh: the profiling run failed (exit $profile_rc; $out/profile.log); no kernel table" >&2
  fi
  rm -rf "$out/profile/plugins"
  [ -f "$out/step.xplane.pb" ] && set -- --profile_xplane="$out/step.xplane.pb" \
    --profile_variant="unrolled, remat none, cudnn attention, batch 128" "$@"
fi
"$PY" -m repeat_lm.cli bench accelerator --out="$out/performance_accelerator.md" \
  --time_budget_s="${BUDGET_S:-300}" "$@" 2>&1 | tee "$out/bench.log"
bench_rc=$?
cat "$out/performance_accelerator.md"
report_rc=$?
# Only the last command's status reached the caller: failed cuDNN tests left the script exiting 0.
for rc in "$tests_rc" "$bench_rc" "$report_rc"; do
  [ "$rc" -eq 0 ] || exit "$rc"
done
