"""Writing files that later commands read: whole or not at all."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def model_dir_around(path: str | Path) -> Path | None:
  """The MODEL_DIR whose checkpoints/ holds `path` (itself included), where the path really leads ('..' and symlinks
  followed), or None. Training deletes a step's directory with its checkpoint: nothing else may be written in there.
  """
  real = Path(path).resolve()
  return next((p.parent for p in [real, *real.parents]
               if p.name == "checkpoints" and (p.parent / "config.gin").exists()), None)


def checkpoint_steps(model_dir: str | Path) -> list[int]:
  """Steps of MODEL_DIR's finished checkpoints (Orbax renames a checkpoint to its step only once it is complete)."""
  d = Path(model_dir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def check_writable_file(path: str | Path, name: str) -> None:
  """Before a long measurement whose result goes to `path` (`name` says which, e.g. '--out=report.md'): it must be
  writable as a file, not a directory, and no file may stand where one of its folders would be (missing folders are
  created). Found only at the end, either lost every number measured."""
  p = Path(path)
  if p.is_dir():
    raise ValueError(f"{name} is a directory; name a file.")
  for parent in p.parents:
    if parent.exists():
      if not parent.is_dir():
        raise ValueError(f"{name}: {parent} is a file, not a folder; name a path in a folder.")
      break


def atomic_write_bytes(path: Path, data: bytes) -> None:
  """Writes via a temp file in the same directory + rename, so readers never see a partial file.

  Two racing writers each rename a complete file; the last rename wins and both leave a valid file behind.

  The data reaches the disk before the rename does: on filesystems that may commit a rename ahead of the data it
  names (XFS, some NFS and Lustre setups; ext4 guards only some cases), a machine that died soon after left a
  zero-length file, and a resume's rewritten metrics.jsonl held every result of its run.
  """
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache should be readable by others
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
  _sync_directory(path.parent)


def _sync_directory(directory: Path) -> None:
  """Commits a rename in `directory` to disk, where the platform lets a directory be opened and synced."""
  try:
    dir_fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(dir_fd)
  except OSError:  # some filesystems refuse fsync on a directory; the rename stands as written
    pass
  finally:
    os.close(dir_fd)
