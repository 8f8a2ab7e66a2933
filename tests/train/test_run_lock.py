"""One trainer per MODEL_DIR: a second one is refused before it writes anything, naming the first."""

import logging
import socket
import subprocess
import sys

import numpy as np
import pytest

from repeat_lm.train import run_lock, trainer

_HOLDER = ("import sys; from pathlib import Path; from repeat_lm.train import run_lock; "
           "lock = run_lock.hold(Path(sys.argv[1])); print('held', flush=True); sys.stdin.read()")


@pytest.fixture
def held_elsewhere(tmp_path):
  """tmp_path's lock, held by another process until the test ends."""
  holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline() == "held\n"
  yield holder
  holder.communicate("")  # its stdin closes: it exits, and the kernel lets its lock go


def test_a_second_trainer_is_refused_before_it_writes_anything(tmp_path, held_elsewhere):
  # A hand rerun beside a sweep's trainer truncated the first one's metrics.jsonl and collided with its saves.
  (tmp_path / "metrics.jsonl").write_text('{"step": 7}\n')
  with pytest.raises(run_lock.ModelDirBusyError, match=rf"MODEL_DIR {tmp_path} is being trained by another process "
                     rf"\(pid {held_elsewhere.pid} on .*\).*Stop that one.*or give this run another MODEL_DIR"):
    # Nothing past the lock is reached: no model or data is needed to show it.
    trainer.train(model=None, model_dir=str(tmp_path), train_dataset_cfg=None, total_steps=10)
  assert sorted(p.name for p in tmp_path.iterdir()) == [".train.lock", "metrics.jsonl"]
  assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 7}\n'


def test_the_lock_goes_with_its_holder(tmp_path, held_elsewhere):
  # A flock dies with its process: a killed trainer leaves nothing that blocks the rerun.
  assert run_lock.holder(tmp_path).startswith(f"a trainer (pid {held_elsewhere.pid} on {socket.gethostname()}, since ")
  held_elsewhere.kill()
  held_elsewhere.wait()
  assert run_lock.holder(tmp_path) is None
  lock = run_lock.hold(tmp_path)
  run_lock.release(lock)


def test_a_lock_left_by_a_crashed_host_can_be_overridden(tmp_path, held_elsewhere, monkeypatch, caplog):
  # On NFS the server keeps a crashed host's lock for its lease (NFSv4) or until cleared (NFSv3): the error names the
  # way past it, which trains without the lock.
  with pytest.raises(run_lock.ModelDirBusyError, match=f"set {run_lock.IGNORE_ENV}=1"):
    run_lock.hold(tmp_path)
  monkeypatch.setenv(run_lock.IGNORE_ENV, "1")
  with caplog.at_level(logging.WARNING):
    assert run_lock.hold(tmp_path) is None
  assert "without its lock" in caplog.text


def test_every_process_stops_when_process_0_finds_the_lock_held(tmp_path, monkeypatch):
  # Only process 0 takes the lock: the others went on to their first collective and waited there for it, failing
  # minutes later on a heartbeat timeout that named no cause.
  monkeypatch.setattr(trainer.jax, "process_count", lambda: 2)
  monkeypatch.setattr(trainer.jax, "process_index", lambda: 1)
  monkeypatch.setattr(trainer.multihost_utils, "broadcast_one_to_all", lambda x: np.asarray(True))  # process 0's
  with pytest.raises(run_lock.ModelDirBusyError, match="process 0 found its lock held"):
    trainer._hold_model_dir(tmp_path)  # pylint: disable=protected-access
  monkeypatch.setattr(trainer.multihost_utils, "broadcast_one_to_all", lambda x: np.asarray(False))
  assert trainer._hold_model_dir(tmp_path) is None  # pylint: disable=protected-access


def test_a_train_that_fails_lets_its_lock_go(tmp_path):
  # Released in train()'s `finally`: a notebook's failed call kept the lock from every later trainer of the directory.
  with pytest.raises(AttributeError):
    trainer.train(model=None, model_dir=str(tmp_path), train_dataset_cfg=None, total_steps=10)
  holder = subprocess.run([sys.executable, "-c", _HOLDER, str(tmp_path)], input="", capture_output=True, text=True,
                          check=False)
  assert holder.returncode == 0 and holder.stdout == "held\n", holder.stderr
