"""ROOT/RUN/status.json: what a sweep knows about a run (pending, running, finished, failed, with the error text).

A run is finished only when its MODEL_DIR holds the checkpoint of its last step: a trainer stopped by SIGTERM
(preemption) also exits 0, and such a run stays pending and resumes from its checkpoint. One writer per run at a
time: ROOT/RUN/.lock (host and pid) keeps two sweeps on the same ROOT from training the same run twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from repeat_lm import checks, files
from repeat_lm.train import run_lock

STATUS_FILE, LOCK_FILE, LOG_FILE, GIN_FILE = "status.json", ".lock", "train.log", "run.gin"
# Held (flock) while status.json is read and rewritten; LOCK_FILE is the run's, held for a whole attempt.
STATUS_LOCK_FILE = ".status.lock"
PENDING, RUNNING, FINISHED, FAILED = "pending", "running", "finished", "failed"
# The line each attempt's command starts with in train.log (runner._run_blocking), so an error is read per attempt.
ATTEMPT_HEADER = "==== "
# A 'running' run whose process is gone (the sweep was killed): shown by collect, resumed by the next sweep.
INTERRUPTED = "interrupted"


# Largest pid os.kill takes (a C int); Linux's pid_max is far below it.
_PID_MAX = 2 ** 31 - 1


def _is_pid(value: Any) -> bool:
  return checks.whole_number(value) and 0 < value <= _PID_MAX


# What each field that readers convert or iterate must hold (None too, as the runner writes for a cleared field). A
# hand-edited file broke them with tracebacks: `values` [1, 2] or "abc" in collect's dict update, `pid` "abc" in int(),
# a pid past a C long in os.kill, and `finetune` "squad" was read as stages 's', 'q', 'u', ...
_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "status": (lambda v: isinstance(v, str), "a string"),
    "values": (lambda v: isinstance(v, dict), "an object"),
    "finetune": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of stage names"),
    "pid": (_is_pid, f"a process id (1-{_PID_MAX})"),
    "trainer_pid": (_is_pid, f"a process id (1-{_PID_MAX})"),
    "attempts": (checks.whole_number, "an integer"),
    "index": (checks.whole_number, "an integer"),
    "started": (checks.real_number, "a number"),
    "elapsed_s": (checks.real_number, "a number"),
}


def read(run_dir: str | Path) -> dict[str, Any]:
  """The run's record; a file no reader can use (not JSON, not an object, a field of the wrong type) reads as pending,
  with `error` naming the file (and the field): the next attempt resumes the run from its checkpoint."""
  path = Path(run_dir) / STATUS_FILE
  if not path.exists():
    return {"status": PENDING}
  try:
    record = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError):  # a crash between write and rename cannot do this, an editor can
    record = None
  # Valid JSON that is no object ('[]', '"done"') failed every reader with an AttributeError traceback.
  if not isinstance(record, dict):
    return {"status": PENDING, "error": f"unreadable {path}"}
  for key, (valid, kind) in _FIELDS.items():
    if record.get(key) is not None and not valid(record[key]):
      return {"status": PENDING, "error": f"unreadable {path}: its {key!r} is {_clip(record[key])}, not {kind} (fix "
              "or delete the file)"}
  return record


def _clip(value: Any, limit: int = 40) -> str:
  text = json.dumps(value)
  return text if len(text) <= limit else text[:limit] + "..."


def write(run_dir: str | Path, **updates: Any) -> dict[str, Any]:
  """Merge `updates` into status.json (atomically: readers never see half a file)."""
  return _update(run_dir, lambda record: updates)


def _update(run_dir: str | Path, updates: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
  """Merge `updates(current record)` into status.json, one process at a time: two sweeps on one ROOT (one recording
  a run's exit, the other writing the run's entry as it plans) would otherwise each write back what they read, and
  the later would undo the earlier (a finished run back to running)."""
  run_dir = Path(run_dir)
  with _locked(run_dir):
    return _merge(run_dir, updates)


def _merge(run_dir: Path, updates: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
  """_update's write, for a caller holding the status lock."""
  current = read(run_dir)
  record = {**current, **updates(current)}
  files.atomic_write_bytes(run_dir / STATUS_FILE,
                           (json.dumps(record, indent=1, sort_keys=True, default=str) + "\n").encode())
  return record


def write_gin(run_dir: str | Path, text: str, **updates: Any) -> str | None:
  """Write the run's run.gin and merge `updates` into status.json, unless an attempt is running it: then neither, and
  who runs it is returned (see `running`). Rewritten under it, a run's record named settings it was not trained with
  (collect's values; TRAIN_STEPS, which its exit is judged by), and a trainer starting meanwhile read half a gin.

  Under the status lock, which `acquire` takes the run's lock under: an attempt that starts is either seen here or
  reads the new run.gin, written whole (atomically)."""
  run_dir = Path(run_dir)
  with _locked(run_dir):
    who = running(run_dir)
    if who is None:
      files.atomic_write_bytes(run_dir / GIN_FILE, text.encode())
      _merge(run_dir, lambda record: updates)
  return who


@contextlib.contextmanager
def _locked(run_dir: Path):
  """Holds STATUS_LOCK_FILE (flock) for the block: one process at a time reads and rewrites the run's files."""
  run_dir.mkdir(parents=True, exist_ok=True)
  with (run_dir / STATUS_LOCK_FILE).open("a") as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    except OSError:  # a filesystem without locks (gcsfuse): as before, the last writer wins
      pass
    yield


def train_steps(gin_text: str) -> int | None:
  """The steps a flattened run gin trains to: trainer.train.total_steps, read through the macro it names (TRAIN_STEPS
  unless bound otherwise). A literal `--gin.trainer.train.total_steps=N` overrides TRAIN_STEPS, which the flattened
  gin still lists: reading that macro first would wait for a checkpoint the trainer never writes."""
  m = re.search(r"^trainer\.train\.total_steps = (\S+)\s*$", gin_text, re.M)
  value = m.group(1) if m else "%TRAIN_STEPS"
  if value.startswith("%"):
    m = re.search(rf"^{re.escape(value[1:])} = (\d+)\s*$", gin_text, re.M)
    value = m.group(1) if m else ""
  return int(value) if value.isdigit() else None


def last_step(run_dir: str | Path) -> int | None:
  """The step the run's gin trains to (None without a readable run.gin)."""
  gin_path = Path(run_dir) / GIN_FILE
  return train_steps(gin_path.read_text()) if gin_path.exists() else None


def is_complete(run_dir: str | Path) -> bool:
  steps = last_step(run_dir)
  return steps is not None and steps in files.checkpoint_steps(run_dir)


def error_text(log_path: str | Path, tail: int = 15, returncode: int | None = None) -> str:
  """The error the last attempt in a log printed: `repeat-lm: error: ...`, else the last traceback's exception, else
  (killed by a signal, `returncode` < 0) the signal, else the tail.

  train.log holds every attempt, each after a `==== TIME COMMAND` line (runner._run_blocking); an earlier attempt's
  error is not this one's (an attempt killed for memory prints nothing)."""
  path = Path(log_path)
  if not path.exists():
    return f"no log at {path}"
  try:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
  except OSError as e:  # a directory, or no permission: the exit is still recorded (else the run stayed `running`)
    return f"log {path} unreadable ({type(e).__name__}: {e.strerror or e})"
  headers = [i for i, line in enumerate(lines) if line.startswith(ATTEMPT_HEADER)]
  if headers:
    lines = lines[headers[-1] + 1:]
  for line in reversed(lines):
    if "repeat-lm: error:" in line:
      return line.split("repeat-lm: error:", 1)[1].strip()
  tracebacks = [i for i, line in enumerate(lines) if line.startswith("Traceback")]
  if tracebacks:
    # The exception is the traceback's first unindented line (its frames are indented); lines after it are not the
    # error: srun's "srun: error: node1: task 0: Exited with exit code 1", another process's log.
    after = [line for line in lines[tracebacks[-1] + 1:] if not line[:1].isspace()]
    return (after[0] if after else lines[-1]).strip()
  if returncode is not None and returncode < 0:
    name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
    killed = f"killed by signal {-returncode} ({name}"
    return killed + (", often the out-of-memory killer)" if -returncode == signal.SIGKILL else ")")
  return "\n".join(lines[-tail:])


def check_recordable(run_dir: str | Path, exit_code: int | None = None) -> None:
  """Raise ValueError unless an attempt of `run_dir` may be recorded from outside a sweep (`repeat-lm run-status`,
  launch/slurm.sbatch): a run directory the sweep wrote (it holds run.gin), and a run not recorded as finished,
  except for another exit 0 of a run whose last checkpoint is there (`exit_code`; None: an attempt's start).

  A typo'd path recorded the attempt in a new directory (the real run was never updated), and a stray job flipped a
  finished run to running, then failed. Not is_complete() alone: a run that just trained its last step is complete
  before its exit is recorded. A requeued job of a finished run trains nothing and exits 0: refused, its sbatch
  script would read "not finished" and exit 75, failing the fine-tuning jobs chained on it."""
  run_dir = Path(run_dir)
  if not (run_dir / GIN_FILE).is_file():
    what = "is a file, not a run directory" if run_dir.is_file() else \
        "does not exist" if not run_dir.exists() else f"holds no {GIN_FILE}"
    raise ValueError(f"{run_dir} {what}: --run_dir must be a run directory written by `repeat-lm sweep` "
                     f"(ROOT/RUN, holding {GIN_FILE}); check the path.")
  if read(run_dir).get("status") == FINISHED and not (exit_code == 0 and is_complete(run_dir)):
    complete = "its last checkpoint is there" if is_complete(run_dir) else "recorded so"
    raise ValueError(f"{run_dir} is finished ({complete}): not recording another attempt of it. To train it again, "
                     f"delete {run_dir / STATUS_FILE} (it resumes from its checkpoint) or {run_dir} (afresh).")


def started(run_dir: str | Path, job_id: str | None = None, **info: Any) -> dict[str, Any]:
  """Record an attempt's start: by this process (its liveness is its pid's, and its trainer's, see `trainer_started`)
  or, with `job_id`, by a SLURM job (its liveness is squeue's: the process recording it exits at once). Either way
  the other identity of an earlier attempt is cleared, so a stale job id or pid never speaks for this attempt."""
  return _update(run_dir, lambda record: dict(
      status=RUNNING, started=time.time(), host=socket.gethostname(), pid=None if job_id else os.getpid(),
      job_id=job_id or None, trainer_pid=None, attempts=int(record.get("attempts") or 0) + 1, error=None,
      returncode=None, elapsed_s=_elapsed_so_far(run_dir, record), **info))


def submitted(run_dir: str | Path, job_id: str, **info: Any) -> dict[str, Any]:
  """Record a SLURM submission: running as `job_id`, its start unknown until the job records it (`started`)."""
  return _update(run_dir, lambda record: dict(
      status=RUNNING, job_id=job_id, host=None, pid=None, started=None, elapsed_s=_elapsed_so_far(run_dir, record),
      **info))


def _elapsed_so_far(run_dir: str | Path, record: dict[str, Any]) -> float:
  """The recorded elapsed_s, plus the time of an attempt killed before recording its exit (still recorded running,
  with its start): from its start to the trainer's last line in train.log. Without it a run's elapsed_s, the cost
  collect reports, held only the attempt that finished (21.5 s of a run that trained ~60 s over two). metrics.jsonl is
  not asked: `repeat-lm eval` appends to it long after. A submission clears `started` (`submitted`), so a start is
  never counted twice."""
  elapsed, begun = float(record.get("elapsed_s") or 0.0), record.get("started")
  log = Path(run_dir) / LOG_FILE
  if record.get("status") != RUNNING or not checks.finite_number(begun) or not log.is_file():
    return elapsed
  return elapsed + max(log.stat().st_mtime - float(begun), 0.0)


def trainer_started(run_dir: str | Path, trainer_pid: int) -> None:
  """Record the trainer's pid (status.json and the lock): a sweep killed without forwarding a signal (SIGKILL, a lost
  terminal) leaves its trainer running in its own session, and the run must not read as interrupted (or its lock as
  stale) while that trainer still writes MODEL_DIR."""
  write(run_dir, trainer_pid=trainer_pid)
  path = Path(run_dir) / LOCK_FILE
  if path.exists():
    # Replaced whole: a lock truncated by a kill (or a full disk) mid-write names no holder, and every later sweep
    # would skip the run as held by another host.
    files.atomic_write_bytes(path, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                 "trainer_pid": trainer_pid}).encode())


def exited(run_dir: str | Path, returncode: int, log: str | Path | None = None) -> dict[str, Any]:
  """Record how a run's command ended: finished, failed (with the error), or pending (stopped early: resumes)."""
  run_dir = Path(run_dir)
  record = read(run_dir)
  elapsed = float(record.get("elapsed_s") or 0.0) + time.time() - float(record.get("started") or time.time())
  log = Path(log) if log else run_dir / LOG_FILE
  if returncode == 0 and is_complete(run_dir):
    return write(run_dir, status=FINISHED, returncode=0, error=None, finished=time.time(), elapsed_s=elapsed)
  if returncode == 0:
    steps, last = files.checkpoint_steps(run_dir), last_step(run_dir)
    if steps and last is not None and steps[-1] > last:
      # TRAIN_STEPS lowered after the run trained past it: the trainer restores the later checkpoint, has nothing to
      # train and exits 0. Not preempted (every sweep would run it again, to the same end) and not finished at
      # TRAIN_STEPS (its weights and metrics are of a later step).
      return write(run_dir, status=FAILED, returncode=0, elapsed_s=elapsed, finished=time.time(),
                   error=f"its checkpoint is at step {steps[-1]}, past its last step {last} (TRAIN_STEPS was lowered "
                   f"after it trained): set TRAIN_STEPS to {steps[-1]} or more, or delete {run_dir} to train it "
                   "afresh")
    return write(run_dir, status=PENDING, returncode=0, elapsed_s=elapsed,
                 error=f"stopped at step {steps[-1] if steps else 0} before its last step (SIGTERM or preemption); "
                 "the next sweep resumes it from its checkpoint")
  return write(run_dir, status=FAILED, returncode=returncode, error=error_text(log, returncode=returncode),
               elapsed_s=elapsed, finished=time.time())


def settle(run_dir: str | Path) -> dict[str, Any]:
  """Record as finished a run recorded running whose processes are gone (interrupted) but whose last step's checkpoint
  exists: its sweep (or SLURM job's batch script) was killed while its trainer went on to the end. The trainer writes
  the last evaluation before that checkpoint, so the run's results are whole. Without it the next sweep started a
  trainer that restored the last step and trained nothing (a model build and restore; on SLURM a queued job), and a
  run's exit code is not known. Returns the record."""
  run_dir = Path(run_dir)
  with _locked(run_dir):
    record = read(run_dir)
    if effective(record) != INTERRUPTED or not is_complete(run_dir):
      return record
    return _merge(run_dir, lambda current: dict(
        status=FINISHED, error=None, returncode=None, finished=time.time(),
        elapsed_s=_elapsed_so_far(run_dir, current)))


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def effective(record: dict[str, Any]) -> str:
  """The recorded status, or 'interrupted' for a run recorded as running whose process is gone: a process of this
  host, or a SLURM job that squeue no longer lists (scancel, a node failure: the batch script never recorded its
  exit, and the run would otherwise be skipped as submitted by every later sweep)."""
  state = record.get("status") or PENDING  # null (a cleared field, or a hand edit) too: it showed as an empty status
  if state != RUNNING:
    return state
  if record.get("job_id"):  # a SLURM job: the pid (if any) is of the short-lived `run-status` that recorded it
    return INTERRUPTED if _slurm_job_alive(str(record["job_id"])) is False else state
  # A record not from read() (a caller's dict) may hold any pid: only a valid one is asked about.
  pids = [record[k] for k in ("pid", "trainer_pid") if _is_pid(record.get(k))]
  if record.get("host") == socket.gethostname() and pids and not any(_alive(p) for p in pids):
    return INTERRUPTED
  return state


# squeue's answers within one `sweep` or `collect` (slurm_cache): one squeue call for all the runs' jobs, not one per
# run and per look at it.
_SQUEUE_TTL_S = 60.0
_squeue_cache: dict[str, tuple[float, bool | None]] | None = None


@contextlib.contextmanager
def slurm_cache():
  """Within the block, squeue's answers are kept (for _SQUEUE_TTL_S); prefetch_slurm asks for many jobs at once."""
  global _squeue_cache
  outer = _squeue_cache
  _squeue_cache = {} if outer is None else outer
  try:
    yield
  finally:
    _squeue_cache = outer


def prefetch_slurm(records: Iterable[dict[str, Any]]) -> None:
  """Inside slurm_cache: one squeue call for the jobs of every running record (else one call per job, later)."""
  if _squeue_cache is None:
    return
  now = time.monotonic()
  ids = sorted({str(r["job_id"]) for r in records if r.get("status") == RUNNING and r.get("job_id")} -
               {j for j, (t, _) in _squeue_cache.items() if now - t < _SQUEUE_TTL_S})
  if len(ids) < 2:
    return
  try:
    out = subprocess.run(["squeue", "--noheader", "--jobs", ",".join(ids), "--format=%i"], capture_output=True,
                         text=True, timeout=60, check=False)
  except (OSError, subprocess.SubprocessError):
    return
  if out.returncode != 0:  # e.g. an id the controller has forgotten: they are asked one by one instead
    return
  listed = {tok.split("_")[0].split("+")[0] for tok in out.stdout.split()}
  now = time.monotonic()
  for j in ids:
    _squeue_cache[j] = (now, j in listed)


def _slurm_job_alive(job_id: str) -> bool | None:
  """Whether squeue lists the job (pending, running, requeued...); None where squeue cannot say (not installed, no
  controller), which leaves the recorded status as it is."""
  if _squeue_cache is not None and job_id in _squeue_cache and \
      time.monotonic() - _squeue_cache[job_id][0] < _SQUEUE_TTL_S:
    return _squeue_cache[job_id][1]
  alive = _query_job(job_id)
  if _squeue_cache is not None:
    _squeue_cache[job_id] = (time.monotonic(), alive)
  return alive


def _query_job(job_id: str) -> bool | None:
  try:
    out = subprocess.run(["squeue", "--noheader", "--jobs", job_id, "--format=%T"], capture_output=True, text=True,
                         timeout=20, check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  if out.returncode == 0:
    return bool(out.stdout.strip())
  # A job that ended long enough ago is unknown to the controller: squeue fails, naming the job id.
  return False if "invalid job id" in out.stderr.lower() else None


def _holder(run_dir: Path) -> dict[str, Any] | None:
  """What the run's lock says of its holder (host, pid, trainer_pid); None without a lock or for a stale one (its
  processes, of this host, are gone). One that cannot be read counts as held."""
  try:
    holder = json.loads((run_dir / LOCK_FILE).read_text())
  except FileNotFoundError:
    return None
  except (OSError, json.JSONDecodeError):
    return {}
  pids = [int(holder.get(k) or 0) for k in ("pid", "trainer_pid")]
  if holder.get("host") == socket.gethostname() and not any(p and _alive(p) for p in pids):
    return None
  return holder


def running(run_dir: str | Path) -> str | None:
  """Who is training the run now, in words, or None: its lock's live holder (a sweep), a trainer holding its
  MODEL_DIR's lock (one started by hand on its run.gin: run_lock.py), or the attempt its record says is running (a
  SLURM job holds no sweep lock)."""
  run_dir = Path(run_dir)
  holder = _holder(run_dir)
  if holder is not None:
    pid, trainer = holder.get("pid"), holder.get("trainer_pid")
    if holder.get("host") == socket.gethostname() and _is_pid(pid) and not _alive(pid) and _is_pid(trainer):
      # Its sweep was killed (SIGKILL): naming the sweep's pid sent the user after a process that is gone.
      return (f"a trainer (host {holder['host']}, pid {trainer}) left by its killed sweep (pid {pid}; "
              f"`kill -TERM {trainer}` checkpoints and stops it)")
    return f"a sweep (host {holder.get('host', '?')}, pid {holder.get('pid', '?')})"
  trainer = run_lock.holder(run_dir)  # MODEL_DIR = ROOT/RUN
  if trainer is not None:
    return trainer
  record = read(run_dir)
  if effective(record) != RUNNING:
    return None
  return f"SLURM job {record['job_id']}" if record.get("job_id") else \
      f"host {record.get('host')}, pid {record.get('pid')}"


def acquire(run_dir: str | Path) -> bool:
  """Take the run's lock; False if a live process (or one on another host) holds it."""
  path = Path(run_dir) / LOCK_FILE
  # Under the status lock: two sweeps finding one stale lock would otherwise both remove it, the later one removing
  # the lock the earlier had just taken in its place, and both would train the run.
  with _locked(path.parent):
    if run_lock.holder(path.parent) is not None:
      # A trainer started by hand on the run's gin: the sweep's own would be refused at once and recorded failed.
      return False
    for _ in range(2):
      try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      except FileExistsError:
        if _holder(path.parent) is not None:
          return False
        path.unlink(missing_ok=True)  # its sweep died: the lock is stale
        continue
      try:
        with os.fdopen(fd, "w") as f:
          json.dump({"host": socket.gethostname(), "pid": os.getpid()}, f)
      except BaseException:  # a full disk: an empty lock names no holder, and every later sweep would skip the run
        path.unlink(missing_ok=True)
        raise
      return True
  return False


def release(run_dir: str | Path) -> None:
  (Path(run_dir) / LOCK_FILE).unlink(missing_ok=True)
