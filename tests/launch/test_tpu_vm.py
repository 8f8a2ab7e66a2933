"""launch/tpu_vm.sh run by bash with a stand-in gcloud whose `ssh --worker=all` runs the command on two local
"workers", as sshd would (through a shell, each with its own TMPDIR), and a stand-in repeat-lm."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "tpu_vm.sh"

# `describe` answers like a 2-worker pod, or fails as gcloud does without tpu.nodes.get ($DESCRIBE_FAILS).
GCLOUD = """#!/bin/bash
echo "$*" >> "$GCLOUD_CALLS"
if [ "$4" = describe ]; then
  [ -z "${DESCRIBE_FAILS:-}" ] || { echo "ERROR: (gcloud.compute.tpus.tpu-vm.describe) PERMISSION_DENIED" >&2; exit 1; }
  echo "10.0.0.2,10.0.0.3"; exit 0
fi
for a; do case "$a" in --command=*) cmd="${a#--command=}" ;; esac; done
pids=() rc=0
for w in 0 1; do
  mkdir -p "$WORKERS/$w/tmp dir"
  (cd "$WORKERS/$w" && exec env -u TPU_WORKER_HOSTNAMES TMPDIR="$WORKERS/$w/tmp dir" WORKER=$w bash -c "$cmd") &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""
# Records where it ran and what it got, one line per argument, in its worker's folder; with $TRAIN_WAIT set, trains
# until SIGTERM, then records it and exits 0, as a trainer that saved its checkpoint does.
# The trap comes first, before argv is written: the test signals only once both argv files exist, so a SIGTERM can
# never reach a stand-in that has not yet set its trap (a slow host would then see it die of the signal).
REPEAT_LM = """#!/bin/bash
[ -z "${TRAIN_WAIT:-}" ] || trap 'kill $! 2>/dev/null; echo "pid $$: SIGTERM" > "$WORKERS/$WORKER/stopped"; exit 0' TERM
{ echo "cwd=$PWD hosts=${TPU_WORKER_HOSTNAMES-unset}"; printf '[%s]\\n' "$@"; } > "$WORKERS/$WORKER/argv"
if [ -n "${TRAIN_WAIT:-}" ]; then
  sleep 60 > /dev/null 2>&1 & wait
fi
"""


def pod(tmp_path: Path, **env: str) -> dict[str, str]:
  """The environment of a tpu_vm.sh launch whose repository (its path has a space) and stand-ins live in tmp_path."""
  repo, bin_dir = tmp_path / "my repo", tmp_path / "bin"
  for d in (repo / ".venv" / "bin", bin_dir):
    d.mkdir(parents=True)
  for path, body in {bin_dir / "gcloud": GCLOUD, repo / ".venv" / "bin" / "repeat-lm": REPEAT_LM}.items():
    path.write_text(body)
    path.chmod(0o755)
  return {"PATH": f"{bin_dir}:/usr/bin:/bin", "REPO_DIR": str(repo), "GCLOUD_CALLS": str(tmp_path / "gcloud.calls"),
          "WORKERS": str(tmp_path / "workers"), **env}


def args(*command: str) -> list[str]:
  return ["bash", str(SCRIPT), "--tpu=my-pod", "--zone=us-central2-b", *command]


def test_every_worker_gets_the_command_as_typed(tmp_path):
  env = pod(tmp_path)
  command = ["train", "--gin_file=/mnt/runs/a b/run.gin", "--gin.MODEL_DIR='/mnt/runs/a b'", "--gin.X=\"it's\""]
  out = subprocess.run(args(*command), env=env, capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  for w in (0, 1):
    assert (tmp_path / "workers" / str(w) / "argv").read_text().splitlines() == [
        f"cwd={tmp_path / 'my repo'} hosts=10.0.0.2,10.0.0.3", *(f"[{a}]" for a in command)]


def test_a_failed_describe_ends_the_launch_with_gclouds_error(tmp_path):
  """Its error was discarded and the launch went on without the workers' addresses, exiting 0 however it ended."""
  env = pod(tmp_path, DESCRIBE_FAILS="1")
  out = subprocess.run(args("train", "--gin_file=/mnt/run.gin"), env=env, capture_output=True, text=True, timeout=60)
  assert out.returncode == 1 and "PERMISSION_DENIED" in out.stderr
  assert "`gcloud compute tpus tpu-vm describe my-pod --zone=us-central2-b` failed" in out.stderr
  assert [c.split()[3] for c in (tmp_path / "gcloud.calls").read_text().splitlines()] == ["describe"]  # no ssh


@pytest.mark.parametrize("ctrl_c", [False, True])
def test_stopping_the_launch_stops_every_workers_trainer(tmp_path, ctrl_c):
  """gcloud runs the command under `ssh -T`, whose remote command sshd signals nothing when the client goes: a stopped
  launch (a sweep's SIGTERM, Ctrl-C) left the trainers training on the pod while the sweep recorded a checkpoint. Each
  worker's trainer now gets SIGTERM through its pid file, and the launch waits for their exit."""
  env = pod(tmp_path, TRAIN_WAIT="1")
  workers = tmp_path / "workers"
  # Started as from a terminal, with SIGINT's default action: a pytest itself started in the background by a shell
  # (or a test before this one) can leave SIGINT ignored, which a non-interactive bash cannot trap, and the Ctrl-C
  # case then waited for a launch that never heard it.
  proc = subprocess.Popen(args("train", "--gin_file=/mnt/runs/a b/run.gin"), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  pids = []
  try:
    deadline = time.monotonic() + 30
    while len(pids) < 2 or len(list(workers.glob("*/argv"))) < 2:  # both trainers started, their traps set
      assert time.monotonic() < deadline and proc.poll() is None, "the trainers did not start"
      time.sleep(0.05)
      pids = [int(text) for f in workers.glob("*/tmp dir/repeat_lm.*.pid") if (text := f.read_text().strip())]
    if ctrl_c:  # a terminal's: SIGINT to its foreground process group, gcloud too
      os.killpg(proc.pid, signal.SIGINT)
    else:  # a sweep's stop: SIGTERM to the launch alone
      os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
  finally:
    for pid in pids:  # the old script left them running
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
  assert proc.returncode == 0, err
  assert "stopping: SIGTERM to the trainer on every worker" in err
  stopped = [(workers / str(w) / "stopped").read_text().split()[1].rstrip(":") for w in (0, 1)]
  assert sorted(map(int, stopped)) == sorted(pids) and not list(workers.glob("*/tmp dir/repeat_lm.*.pid"))
