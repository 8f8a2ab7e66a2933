"""One trainer per MODEL_DIR: MODEL_DIR/.train.lock, held (flock) by process 0 while `trainer.train` runs.

Without it a second trainer on the same directory (a hand rerun beside a sweep's, a SLURM job requeued while its
predecessor still ran) resumed from the first one's checkpoint: its truncation of metrics.jsonl dropped the records
the first had written since, both then appended to it, and their saves of one step collided. On a local filesystem
the kernel releases a flock when its holder dies, so a killed trainer leaves no stale lock; on NFS the server holds a
crashed host's lock until its lease ends (NFSv4, about 90 s) or until the lock is cleared (NFSv3), and
REPEAT_LM_IGNORE_TRAIN_LOCK=1 then lets a rerun go ahead. The file's text (host, pid, start) only names the holder.
On a filesystem without locks (gcsfuse; Lustre mounted without flock) the run goes ahead unlocked, with a warning.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import IO

LOCK_FILE = ".train.lock"
# Set to 1 to train without taking (or honouring) MODEL_DIR's lock: for a lock a crashed host left on NFS.
IGNORE_ENV = "REPEAT_LM_IGNORE_TRAIN_LOCK"


class ModelDirBusyError(RuntimeError):
  """Another process is training this MODEL_DIR."""


def hold(model_dir: Path) -> IO[str] | None:
  """Take MODEL_DIR's lock for this process: the open lock file, for `release`; None where none was taken (no locks
  on this filesystem, or IGNORE_ENV). ModelDirBusyError, naming the holder, where another process holds it (another
  train() of the same directory in this process too: a flock belongs to an open file, not to a process)."""
  if os.environ.get(IGNORE_ENV, "0") == "1":
    logging.warning("%s=1: training %s without its lock; another trainer on it would not be stopped.", IGNORE_ENV,
                    model_dir)
    return None
  lock = (model_dir / LOCK_FILE).open("a+", encoding="utf-8")
  try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    lock.seek(0)
    holder = _describe(lock.read())
    lock.close()
    raise ModelDirBusyError(
        f"MODEL_DIR {model_dir} is being trained by another process{holder}: two trainers on one directory overwrite "
        "each other's metrics and checkpoints. Stop that one (its checkpoints resume with the same command), or give "
        f"this run another MODEL_DIR. If that process is gone (a crashed host's lock left on NFS), set {IGNORE_ENV}=1."
    ) from None
  except OSError as e:
    lock.close()
    logging.warning("%s cannot be locked on this filesystem (%s): training without the lock that keeps a second "
                    "trainer off the directory.", model_dir / LOCK_FILE, e.strerror or e)
    return None
  try:
    lock.seek(0)
    lock.truncate()
    lock.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}))
    lock.flush()
  except OSError:  # a full disk: the lock is held all the same, its record names no holder
    pass
  return lock


def release(lock: IO[str] | None) -> None:
  """Let a lock `hold` took go (its text is left: the next holder rewrites it)."""
  if lock is not None:
    lock.close()


def holder(model_dir: Path) -> str | None:
  """Who holds MODEL_DIR's lock, in words, or None where no process does (or it cannot be told): for a sweep, which
  must neither rewrite the run's files under a trainer started by hand nor launch a second one."""
  try:
    with (model_dir / LOCK_FILE).open("r", encoding="utf-8") as lock:
      try:
        fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released with the file
      except BlockingIOError:
        return f"a trainer{_describe(lock.read())}"
      except OSError:
        return None
  except OSError:  # no lock file: never trained, or by a version before it
    return None
  return None


def _describe(text: str) -> str:
  try:
    record = json.loads(text)
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(record["started"])))
    return f" (pid {int(record['pid'])} on {record['host']}, since {started})"
  except (ValueError, KeyError, TypeError):  # taken, but its record not yet written (or written by hand)
    return ""
