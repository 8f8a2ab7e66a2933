"""Two processes joined by jax.distributed on localhost train exactly like one process with the same devices."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from repeat_lm import cli
from repeat_lm.experiments import launch_local
from experiment_helpers import TINY_BINDINGS

# The same mesh in both runs: data 4 x model 2 over 8 CPU devices (2 processes x 4, or this process's 8).
ARGS = ["--gin_file=gin/models/t5_1_1_tiny.gin", "--gin_file=gin/runs/pretrain.gin", "--gin.DATA_PARALLEL=4",
        "--gin.MODEL_PARALLEL=2", *(f"--gin.{b}" for b in TINY_BINDINGS)]


def records(model_dir):
  return [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]


def test_process_env_splits_devices_and_names_the_coordinator():
  env = launch_local.process_env(1, 2, 1234, 4, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --foo"})
  assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:1234" and env["JAX_PROCESS_ID"] == "1"
  assert env["JAX_NUM_PROCESSES"] == "2"
  assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=4"


def test_process_env_device_count_wins_over_an_inherited_jax_num_cpu_devices():
  # JAX takes JAX_NUM_CPU_DEVICES over the XLA flag: exported for a single-process run, it gave each process its
  # count (`jax.distributed: process 0 of 2, 8 local / 16 global devices` for --devices_per_process=4).
  env = launch_local.process_env(0, 2, 1234, 4, {"JAX_NUM_CPU_DEVICES": "8"})
  assert "JAX_NUM_CPU_DEVICES" not in env and env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4"


@pytest.mark.slow
def test_sigterm_is_forwarded_to_the_processes(monkeypatch):
  # Left to SIGTERM's default, launch-local died alone and its processes trained on as orphans.
  started = []
  real_popen = launch_local.subprocess.Popen

  def sleeper(cmd, **kwargs):
    del cmd
    p = real_popen([sys.executable, "-c", "import time; time.sleep(60)"], **kwargs)
    started.append(p)
    return p

  monkeypatch.setattr(launch_local.subprocess, "Popen", sleeper)
  threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
  assert launch_local.launch(["train"], num_processes=2) == 130
  assert len(started) == 2 and all(p.returncode == -signal.SIGTERM for p in started)
  assert signal.getsignal(signal.SIGTERM) is not launch_local._interrupt  # pylint: disable=protected-access


# launch() with stand-in processes: each says `ready`, exits 0 on SIGTERM (a trainer's checkpoint-and-stop).
_CTRL_C_LAUNCHER = """
import signal, subprocess, sys
# Ctrl-C's KeyboardInterrupt even where SIGINT came ignored (a shell's background job): set here, not in a preexec_fn,
# which would run Python in a child forked from the multithreaded test process.
signal.signal(signal.SIGINT, signal.default_int_handler)
from repeat_lm.experiments import launch_local
child = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: (print('checkpointed'), sys.exit(0))); "
         "print('ready', flush=True); time.sleep(60)")
real_popen = subprocess.Popen
launch_local.subprocess.Popen = lambda cmd, **kwargs: real_popen([sys.executable, "-c", child], **kwargs)
sys.exit(launch_local.launch(["train"], num_processes=2))
"""


def test_ctrl_c_reaches_the_processes_only_as_sigterm():
  # A terminal's Ctrl-C is SIGINT to its whole foreground process group. The processes used to share the launcher's
  # group: each trainer got the SIGINT itself and died on KeyboardInterrupt without its checkpoint.
  launcher = subprocess.Popen([sys.executable, "-c", _CTRL_C_LAUNCHER], stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
  try:
    lines = [launcher.stderr.readline(), launcher.stderr.readline()]
    assert sorted(lines) == ["[p0] ready\n", "[p1] ready\n"], lines
    os.killpg(launcher.pid, signal.SIGINT)
    rest = launcher.communicate(timeout=60)[1]
  finally:
    if launcher.poll() is None:
      launcher.kill()
  assert launcher.returncode == 130
  assert "KeyboardInterrupt" not in rest and sorted(rest.splitlines()) == ["[p0] checkpointed", "[p1] checkpointed"]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, fresh_gin):
  # Each process reads only its half of every global batch (pipeline: host h's block of rows) and the mesh spans
  # both processes' devices, so the global batch, hence every loss, must be the single-process one.
  multi, single = tmp_path / "two_processes", tmp_path / "one_process"
  assert launch_local.launch(["train", *ARGS, f"--gin.MODEL_DIR='{multi}'"], num_processes=2,
                             devices_per_process=4) == 0
  assert cli.main(["train", *ARGS, f"--gin.MODEL_DIR='{single}'"]) == 0  # this process: 8 devices (conftest)
  two, one = records(multi), records(single)
  assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3, 3]
  for a, b in zip(two, one):
    for key in ("train/loss", "train/accuracy", "train/tokens_seen", "eval/loss"):
      if key in b:
        assert a[key] == pytest.approx(b[key], rel=1e-5), (key, a["step"])
  assert (multi / "checkpoints" / "3").is_dir()


def test_a_failure_kills_peers_that_outlast_sigterm(monkeypatch, tmp_path):
  # A trainer takes SIGTERM as "checkpoint at the next step", but with a peer gone every step and checkpoint is a
  # collective that never completes: terminated only, it lived on until jax's heartbeat timeout (100 s).
  ready = tmp_path / "ready"
  stubborn = ("import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              "pathlib.Path(sys.argv[1]).touch(); time.sleep(20)")
  started = []
  real_popen = launch_local.subprocess.Popen

  def stand_in(cmd, **kwargs):
    del cmd
    if not started:  # process 0 ignores SIGTERM (ready before process 1 fails); process 1 fails at once
      p = real_popen([sys.executable, "-c", stubborn, str(ready)], **kwargs)
      while not ready.exists() and p.poll() is None:
        time.sleep(0.01)
    else:
      p = real_popen([sys.executable, "-c", "import sys; sys.exit(3)"], **kwargs)
    started.append(p)
    return p

  monkeypatch.setattr(launch_local.subprocess, "Popen", stand_in)
  monkeypatch.setattr(launch_local, "PEER_GRACE_S", 0.5, raising=False)
  start = time.monotonic()
  assert launch_local.launch(["train"], num_processes=2) == 3
  assert time.monotonic() - start < 10 and started[0].returncode == -signal.SIGKILL


def test_the_first_failure_is_repeated_after_its_peers_output(monkeypatch, capsys):
  # The failing process's clear error came first; the peer it took down then printed a JAX distributed-service abort
  # and its stack trace, and the error scrolled out of sight.
  real_popen = launch_local.subprocess.Popen
  codes = iter(["import sys, time; print('repeat-lm: error: TRAIN_STEPS=-3 must be >= 0'); sys.exit(2)",
                "import time; time.sleep(0.5); print('F1201 Terminating process: fatal errors'); print('*** stack')"])

  def stand_in(cmd, **kwargs):
    del cmd
    return real_popen([sys.executable, "-c", next(codes)], **kwargs)

  monkeypatch.setattr(launch_local.subprocess, "Popen", stand_in)
  assert launch_local.launch(["train"], num_processes=2) == 2
  err = capsys.readouterr().err
  assert err.rstrip().endswith("launch-local: process 0 failed first (exit 2); its last lines:\n"
                               "[p0] repeat-lm: error: TRAIN_STEPS=-3 must be >= 0")


def test_the_process_with_repeat_lm_s_error_is_named_not_the_peer_it_aborted(monkeypatch, capsys):
  # Process 0 (the coordinator) failed with a clear error and took its peer down with SIGABRT; the poll found the
  # peer dead first, and the summary blamed it (exit -6) with its C++ stack.
  real_popen = launch_local.subprocess.Popen
  codes = iter(["import sys, time; time.sleep(1.5); print('repeat-lm: error: ValueError: Mesh shape data=3');"
                "print('shutting down the coordination service'); sys.exit(2)",
                "import os, signal; print('F1201 Terminating process: fatal errors'); print('*** stack');"
                "os.kill(os.getpid(), signal.SIGABRT)"])

  def stand_in(cmd, **kwargs):
    del cmd
    return real_popen([sys.executable, "-c", next(codes)], **kwargs)

  monkeypatch.setattr(launch_local, "PEER_GRACE_S", 30.0)  # process 0 must outlive the peer's abort
  monkeypatch.setattr(launch_local.subprocess, "Popen", stand_in)
  monkeypatch.setattr(real_popen, "terminate", lambda self: None)  # process 0 is already on its way out
  assert launch_local.launch(["train"], num_processes=2) == 2
  err = capsys.readouterr().err
  assert ("launch-local: process 0 failed first (exit 2); its last lines:\n"
          "[p0] repeat-lm: error: ValueError: Mesh") in err
  assert launch_local.failure_cause([(1, -6), (0, 2)], [["[p0] repeat-lm: error: x\n"], []]) == 0
  assert launch_local.failure_cause([(1, -6), (0, 2)], [[], []]) == 1  # no error line: the first found
  # Killed (the OOM killer's SIGKILL): the cause, though its peer then failed with an error of its own.
  assert launch_local.failure_cause([(1, -9), (0, 2)], [["[p0] repeat-lm: error: x\n"], []]) == 1
  assert launch_local.failure_cause([], [[], []]) is None


def test_no_processes_is_an_error_not_a_success():
  # launch() with nothing to run returned 0: a job script would read it as a finished run.
  with pytest.raises(ValueError, match="must be >= 1"):
    launch_local.launch(["train"], num_processes=0)


def test_too_many_processes_or_a_port_out_of_range_is_refused_before_any_starts(monkeypatch):
  # --num_processes=100000 started ~2,000 Pythons on a 2-core machine before it was stopped; --port=70000 or -5 went
  # into JAX_COORDINATOR_ADDRESS as it was.
  def no_process(*args, **kwargs):
    raise AssertionError("a process was started")
  monkeypatch.setattr(launch_local.subprocess, "Popen", no_process)
  monkeypatch.setattr(launch_local.os, "cpu_count", lambda: 2)
  monkeypatch.delenv("REPEAT_LM_MAX_LOCAL_PROCESSES", raising=False)
  with pytest.raises(ValueError, match=r"num_processes \(9\) is more than this machine runs usefully \(8: 4 per CPU, "
                     r"at least 8\): pass fewer, or set REPEAT_LM_MAX_LOCAL_PROCESSES=9"):
    launch_local.launch(["train"], num_processes=9)
  for port in (70000, 0, -5):
    with pytest.raises(ValueError, match=rf"port \({port}\) must be a TCP port, 1-65535"):
      launch_local.launch(["train"], num_processes=2, port=port)
  monkeypatch.setenv("REPEAT_LM_MAX_LOCAL_PROCESSES", "16")  # the override: more than the cap, deliberately
  assert launch_local.max_processes() == 16
  with pytest.raises(ValueError, match=r"\(16: \$REPEAT_LM_MAX_LOCAL_PROCESSES\)"):
    launch_local.launch(["train"], num_processes=17)
  monkeypatch.setenv("REPEAT_LM_MAX_LOCAL_PROCESSES", "lots")
  with pytest.raises(ValueError, match="must be a whole number"):
    launch_local.launch(["train"], num_processes=2)
