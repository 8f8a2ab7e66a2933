"""One job as N processes on this machine: `jax.distributed` over localhost, each process with its share of CPU devices.

`repeat-lm launch-local --num_processes=2 --devices_per_process=4 -- train --gin_file=...` (or
`python -m repeat_lm.experiments.launch_local ...`, or launch/local_multiprocess.sh) runs `repeat-lm train ...` twice
with JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT, JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=0/1 and 4 CPU devices each: the
same code path as a multi-host pod (distributed.maybe_initialize, one block of batch rows per process), on a laptop.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

from repeat_lm import runtime


# Seconds the other processes get to exit on SIGTERM once one has failed, before they are killed. Their trainers take
# SIGTERM as "checkpoint at the next step", but every step and checkpoint is a collective with the failed process:
# they only wait in it, until jax's heartbeat timeout (100 s) ends them.
PEER_GRACE_S = 10.0


# At most max(MIN_PROCESS_CAP, PROCESSES_PER_CPU x CPUs) processes unless $MAX_PROCESSES_ENV raises the cap. Each is a
# whole Python + JAX runtime (hundreds of MB, its own threads) and every step waits for the slowest, so past a few per
# core they only timeshare; a typo (--num_processes=100000) started ~2,000 of them on a 2-core machine before it was
# stopped. The floor keeps the usual 2-8 process emulations of a pod runnable on a small CI machine.
PROCESSES_PER_CPU, MIN_PROCESS_CAP = 4, 8
MAX_PROCESSES_ENV = "REPEAT_LM_MAX_LOCAL_PROCESSES"


def max_processes() -> int:
  """The most processes launch() starts: $REPEAT_LM_MAX_LOCAL_PROCESSES if set, else the cap above."""
  override = os.environ.get(MAX_PROCESSES_ENV, "").strip()
  if override:
    if not override.isdigit():
      raise ValueError(f"{MAX_PROCESSES_ENV}={override!r} must be a whole number of processes (or unset).")
    return int(override)
  return max(MIN_PROCESS_CAP, PROCESSES_PER_CPU * (os.cpu_count() or 1))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(process_id: int, num_processes: int, port: int, devices_per_process: int,
                base: Mapping[str, str] | None = None) -> dict[str, str]:
  """The environment of process `process_id`: coordinator, rank, and `devices_per_process` CPU devices."""
  env = runtime.child_env(base)
  # Our device count replaces any inherited one (tests force 8 devices for single-process runs).
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).split()
  # jax_num_cpu_devices, when set, wins over the XLA flag: an exported JAX_NUM_CPU_DEVICES=8 gave every process 8.
  env.pop("JAX_NUM_CPU_DEVICES", None)
  env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes),
             JAX_PROCESS_ID=str(process_id), JAX_PLATFORMS="cpu",
             XLA_FLAGS=" ".join([*flags, f"--xla_force_host_platform_device_count={devices_per_process}"]))
  return env


# Lines of the first failing process repeated once every process has exited (see launch).
FAILED_TAIL_LINES = 5


# How repeat-lm's command line reports an error it caught (cli.py): the line that names a failure's cause.
ERROR_PREFIX = "repeat-lm: error:"


def _pump(stream, prefix: str, sink, tail: collections.deque, errors: list[str]) -> None:
  for line in iter(stream.readline, ""):
    sink.write(prefix + line)
    sink.flush()
    tail.append(prefix + line)
    if line.startswith(ERROR_PREFIX):
      errors.append(prefix + line)


def launch(argv: Sequence[str], num_processes: int, devices_per_process: int = 1, port: int | None = None) -> int:
  """Run `repeat-lm <argv>` as `num_processes` processes; returns 0, or the first failing process's exit code.

  Output is interleaved line by line, prefixed with `[p<i>] `. If one process fails the others are terminated (killed
  if still there after PEER_GRACE_S), so a crash never leaves its peers waiting in a collective.
  """
  if num_processes < 1 or devices_per_process < 1:
    raise ValueError(f"num_processes ({num_processes}) and devices_per_process ({devices_per_process}) must be >= 1.")
  cap = max_processes()
  if num_processes > cap:
    why = f"${MAX_PROCESSES_ENV}" if os.environ.get(MAX_PROCESSES_ENV, "").strip() else \
        f"{PROCESSES_PER_CPU} per CPU, at least {MIN_PROCESS_CAP}"
    raise ValueError(f"num_processes ({num_processes}) is more than this machine runs usefully ({cap}: {why}): pass "
                     f"fewer, or set {MAX_PROCESSES_ENV}={num_processes} if you mean it.")
  if port is not None and not 1 <= port <= 65535:  # else JAX_COORDINATOR_ADDRESS=127.0.0.1:70000 failed later
    raise ValueError(f"port ({port}) must be a TCP port, 1-65535; leave it out for a free one.")
  port = port or free_port()
  procs, pumps, tails, errors = [], [], [], []
  # SIGTERM (a job's time limit, `timeout`, kill) and SIGHUP (a closed terminal) act as Ctrl-C: forwarded to the
  # processes as SIGTERM, whose trainers then checkpoint and stop. Left to its default either killed this process
  # alone and orphaned them, training on.
  main = threading.current_thread() is threading.main_thread()
  signums = [s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
  previous = {s: signal.signal(s, _interrupt) for s in signums} if main else {}
  rc, failed = 0, []  # failed: (process index, exit code), in the order they were found
  try:
    for i in range(num_processes):
      # Each in its own session, out of the terminal's reach: Ctrl-C (SIGINT to the terminal's whole process group)
      # interrupted the trainers themselves, which stopped without a checkpoint; it now reaches this process alone,
      # which forwards it as SIGTERM.
      p = subprocess.Popen(runtime.cli_command(*argv), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True,
                           env=process_env(i, num_processes, port, devices_per_process))
      tails.append(collections.deque(maxlen=FAILED_TAIL_LINES))
      errors.append([])
      t = threading.Thread(target=_pump, args=(p.stdout, f"[p{i}] ", sys.stderr, tails[-1], errors[-1]), daemon=True)
      t.start()
      procs.append(p)
      pumps.append(t)
    pending = list(procs)
    kill_at = None
    while pending:
      if kill_at is not None and time.monotonic() >= kill_at:
        for other in pending:
          other.kill()
        kill_at = None
      for p in list(pending):
        try:
          code = p.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
          continue
        pending.remove(p)
        if code:
          failed.append((procs.index(p), code))
        if code and not rc:
          rc = code
          for other in pending:  # its peers would block in the next collective
            other.terminate()
          kill_at = time.monotonic() + PEER_GRACE_S
  except KeyboardInterrupt:
    rc = 130
    for p in procs:
      p.terminate()
  finally:
    for p in procs:
      try:
        p.wait(timeout=30)
      except subprocess.TimeoutExpired:
        p.kill()
    for t in pumps:
      t.join(timeout=5)
    for s, handler in previous.items():
      signal.signal(s, handler)
  cause = failure_cause(failed, errors)
  if cause is not None:
    rc = dict(failed)[cause]
    lines = [e for e in errors[cause][-1:] if e not in tails[cause]] + list(tails[cause])
    if lines:
      # Its error came first, and the peers it took down printed theirs after it (a JAX distributed-service abort and
      # its stack trace, 15 lines or more): the cause, said again where the reader looks.
      sys.stderr.write(f"launch-local: process {cause} failed first (exit {rc}); its last lines:\n" + "".join(lines))
  return rc


def failure_cause(failed: Sequence[tuple[int, int]], errors: Sequence[Sequence[str]]) -> int | None:
  """The process whose failure took the others down: the first found failed, unless it aborted (SIGABRT) and another
  exited with repeat-lm's own error. Process 0 hosts the coordination service: when it stops on an error its peers
  abort, often before it has finished exiting, and the poll found them first: the summary named a victim and its C++
  stack. Any other signal (the OOM killer's SIGKILL, a segfault) is a cause in its own right, which peers then report
  as errors of their own."""
  if not failed:
    return None
  first, code = failed[0]
  own_error = [i for i, c in failed if c > 0 and errors[i]]
  return own_error[0] if code == -signal.SIGABRT and own_error else first


def _interrupt(signum, frame):
  del frame
  raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
  from repeat_lm import cli  # noqa: PLC0415 - argument parsing lives in cli.py
  sys.exit(cli.main(["launch-local", *sys.argv[1:]]))
