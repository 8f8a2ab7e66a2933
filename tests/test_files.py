"""files.atomic_write_bytes: a file is replaced whole, or not at all."""

import os
import threading

import pytest

from repeat_lm import files


def test_atomic_write_survives_racing_writers(tmp_path):
  target = tmp_path / 'sub' / 'model.bin'
  payloads = [bytes([i]) * 200_000 for i in range(8)]
  threads = [threading.Thread(target=files.atomic_write_bytes, args=(target, p)) for p in payloads]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert target.read_bytes() in payloads  # one complete payload, never a mix
  assert [p.name for p in target.parent.iterdir()] == ['model.bin']  # no temp files left


def test_a_write_failing_part_way_leaves_the_earlier_file(tmp_path, monkeypatch):
  target = tmp_path / 'status.json'
  files.atomic_write_bytes(target, b'{"status": "finished"}')
  fdopen = os.fdopen

  class DiskFull:  # writes half, then the disk is full
    def __init__(self, f):
      self.f = f

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self.f.close()

    def write(self, data):
      self.f.write(data[:len(data) // 2])
      raise OSError(28, 'No space left on device')

  monkeypatch.setattr(files.os, 'fdopen', lambda fd, mode: DiskFull(fdopen(fd, mode)))
  with pytest.raises(OSError, match='No space'):
    files.atomic_write_bytes(target, b'{"status": "running", "pid": 1234}')
  monkeypatch.undo()
  assert target.read_bytes() == b'{"status": "finished"}'
  assert [p.name for p in tmp_path.iterdir()] == ['status.json']


def test_the_file_is_readable_by_other_users(tmp_path):
  # mkstemp creates 0600: a shared cache (a corpus, a vocabulary) written by one user must stay readable by others.
  target = tmp_path / 'vocab.model'
  files.atomic_write_bytes(target, b'x')
  assert target.stat().st_mode & 0o777 == 0o644


def test_missing_parent_folders_are_made(tmp_path):
  target = tmp_path / 'a' / 'b' / 'c' / 'status.json'
  files.atomic_write_bytes(target, b'{}')
  assert target.read_bytes() == b'{}'


def test_the_temp_file_is_renamed_from_the_target_folder(tmp_path, monkeypatch):
  # A rename is atomic within one file system only: a temp file elsewhere (/tmp) fails across devices (EXDEV).
  renamed = []
  replace = os.replace
  monkeypatch.setattr(files.os, 'replace', lambda src, dst: (renamed.append(src), replace(src, dst)))
  files.atomic_write_bytes(tmp_path / 'out' / 'model.bin', b'x')
  (src,) = renamed
  assert os.path.dirname(src) == str(tmp_path / 'out')


def test_the_data_is_synced_before_the_rename_and_the_rename_after(tmp_path, monkeypatch):
  # A filesystem may commit the rename before the data it names: after a crash, a zero-length metrics.jsonl.
  events = []
  fsync, replace = os.fsync, os.replace

  def synced(fd):
    kind = 'dir' if os.path.isdir(f'/proc/self/fd/{fd}') else 'file'
    events.append((kind, os.fstat(fd).st_size if kind == 'file' else None))
    fsync(fd)
  monkeypatch.setattr(files.os, 'fsync', synced)
  monkeypatch.setattr(files.os, 'replace', lambda src, dst: (events.append(('rename', None)), replace(src, dst)))
  files.atomic_write_bytes(tmp_path / 'metrics.jsonl', b'{"step": 1}\n')
  assert events == [('file', 12), ('rename', None), ('dir', None)]
