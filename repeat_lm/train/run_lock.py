"""One trainer per MODEL_DIR: MODEL_DIR/.train.lock, held (flock) by process 0 while `trainer.train` runs.

Without it a second trainer on the same directory (a hand rerun beside a sweep's, a SLURM job requeued while its
predecessor still ran) resumed from the first one's checkpoint: its truncation of metrics.jsonl dropped the records
the first had written since, both then appended to it, and their saves of one step collided. The kernel releases a
flock when its holder dies, so a killed trainer leaves no stale lock; the file's text (host, pid, start) only names
the holder in the error. On a filesystem without locks (gcsfuse) the run goes ahead unlocked, as before.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import IO

LOCK_FILE = ".train.lock"

# The locks this process holds, by MODEL_DIR (a second train() of one directory in this process is refused too: flock
# locks belong to an open file, not to a process).
_held: dict[Path, IO[str]] = {}


class ModelDirBusyError(RuntimeError):
  """Another process is training this MODEL_DIR."""


def hold(model_dir: Path) -> None:
  """Take MODEL_DIR's lock for this process, or raise ModelDirBusyError naming its holder."""
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
        "this run another MODEL_DIR.") from None
  except OSError:  # no locks on this filesystem
    lock.close()
    return
  lock.seek(0)
  lock.truncate()
  lock.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}))
  lock.flush()
  _held[model_dir.resolve()] = lock


def release(model_dir: Path) -> None:
  """Let MODEL_DIR's lock go, if this process holds it (its text is left: the next holder rewrites it)."""
  lock = _held.pop(model_dir.resolve(), None)
  if lock is not None:
    lock.close()


def _describe(text: str) -> str:
  try:
    record = json.loads(text)
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(record["started"])))
    return f" (pid {int(record['pid'])} on {record['host']}, since {started})"
  except (ValueError, KeyError, TypeError):  # taken, but its record not yet written (or written by hand)
    return ""
