"""status.json: finished only at the last step's checkpoint, failures with their error, locks, interrupted runs."""

import math
import os
import socket
import subprocess
import sys
import threading
import types

from repeat_lm import files
from repeat_lm.experiments import status


def make_run(tmp_path, steps=3, checkpoints=(), log=""):
  run = tmp_path / "run"
  (run / "checkpoints").mkdir(parents=True)
  (run / "run.gin").write_text(f"# header\nTRAIN_STEPS = {steps}\n")
  for s in checkpoints:
    (run / "checkpoints" / str(s)).mkdir()
  (run / "checkpoints" / "4.orbax-checkpoint-tmp-1").mkdir()  # a save in progress is no checkpoint
  (run / "train.log").write_text(log)
  return run


def dead_pid() -> int:
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def test_finished_only_with_the_last_steps_checkpoint(tmp_path):
  run = make_run(tmp_path, checkpoints=[2, 3])
  status.started(run)
  assert status.read(run)["status"] == "running" and status.read(run)["attempts"] == 1
  assert status.exited(run, 0)["status"] == "finished"
  assert files.checkpoint_steps(run) == [2, 3] and status.train_steps((run / "run.gin").read_text()) == 3


def test_the_last_step_is_trainer_train_total_steps_through_its_macro(tmp_path):
  # `--gin.trainer.train.total_steps=2` overrides TRAIN_STEPS, which the flattened gin still lists as 3: the trainer
  # stops (and checkpoints) at 2, so the run is finished there, not pending forever.
  run = make_run(tmp_path, checkpoints=[2])
  (run / "run.gin").write_text("TRAIN_STEPS = 3\ntrainer.train.total_steps = 2\n")
  status.started(run)
  assert status.exited(run, 0)["status"] == "finished"
  assert status.train_steps("FT_STEPS = 5\nTRAIN_STEPS = 3\ntrainer.train.total_steps = %FT_STEPS\n") == 5
  assert status.train_steps("TRAIN_STEPS = 3\ntrainer.train.total_steps = %TRAIN_STEPS\n") == 3


def test_exit_zero_before_the_last_step_stays_pending(tmp_path):
  run = make_run(tmp_path, checkpoints=[2])  # SIGTERM (preemption): the trainer saved step 2 and exited 0
  status.started(run)
  record = status.exited(run, 0)
  assert record["status"] == "pending" and "stopped at step 2" in record["error"]


def test_a_status_file_that_is_no_json_object_reads_as_unreadable_not_a_traceback(tmp_path):
  # '[]' or '"done"' (an editor's) failed collect and run-status with an AttributeError traceback; bytes that are not
  # UTF-8 with a UnicodeDecodeError that named no file.
  run = make_run(tmp_path, checkpoints=[3])
  for content in (b"[]", b'"done"', b"\xff\xfe{}"):
    (run / status.STATUS_FILE).write_bytes(content)
    assert status.read(run) == {"status": "pending", "error": f"unreadable {run / status.STATUS_FILE}"}
    assert status.exited(run, 0)["status"] == "finished"


def test_failure_keeps_the_error(tmp_path):
  run = make_run(tmp_path, log="INFO start\nrepeat-lm: error: ValueError: Unknown source 'nosuch'\n")
  status.started(run)
  record = status.exited(run, 2)
  assert record["status"] == "failed" and record["returncode"] == 2
  assert record["error"] == "ValueError: Unknown source 'nosuch'"
  (run / "train.log").write_text("Traceback (most recent call last):\n  File x\nMemoryError: out of memory\n")
  assert status.error_text(run / "train.log") == "MemoryError: out of memory"


def test_the_error_of_a_traceback_is_its_exception_not_the_lines_after_it(tmp_path):
  # launch/slurm.sbatch sends srun's own stderr to train.log too: its line about the failed task follows the traceback.
  log = ("==== 2026-01-01 00:00:00 SLURM job 7: train\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
         "    f()\nKeyError: 'inputs'\nsrun: error: node12: task 0: Exited with exit code 1\n")
  run = make_run(tmp_path, log=log)
  assert status.error_text(run / "train.log", returncode=1) == "KeyError: 'inputs'"


def test_the_error_is_the_last_attempts_own(tmp_path):
  first = "\n==== 2026-01-01 00:00:00 repeat-lm train\nrepeat-lm: error: ValueError: Unknown source 'nosuch'\n"
  run = make_run(tmp_path, log=first + "\n==== 2026-01-02 00:00:00 repeat-lm train\nI step 10\nI step 20\n")
  status.started(run)
  record = status.exited(run, -9)  # killed for memory: the attempt printed no error of its own
  assert record["status"] == "failed" and record["error"].startswith("killed by signal 9 (SIGKILL")
  assert status.error_text(run / "train.log") == "I step 10\nI step 20"
  (run / "train.log").write_text(first)
  assert status.error_text(run / "train.log", returncode=1) == "ValueError: Unknown source 'nosuch'"


def test_a_running_run_of_a_dead_process_reads_as_interrupted(tmp_path):
  run = make_run(tmp_path)
  status.write(run, status="running", host=socket.gethostname(), pid=dead_pid())
  assert status.effective(status.read(run)) == "interrupted"
  status.write(run, pid=os.getpid())
  assert status.effective(status.read(run)) == "running"


def test_a_slurm_job_squeue_no_longer_lists_reads_as_interrupted(tmp_path, monkeypatch):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  squeue = bin_dir / "squeue"  # job 1 is queued; any other id is unknown to the controller, as after scancel
  squeue.write_text('#!/bin/sh\ncase "$*" in *"--jobs 1 "*) echo RUNNING;; '
                    '*) echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1;; esac\n')
  squeue.chmod(0o755)
  run = make_run(tmp_path)
  status.write(run, status="running", job_id="1", host=None, pid=None)
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  assert status.effective(status.read(run)) == "running"
  status.write(run, job_id="2")
  assert status.effective(status.read(run)) == "interrupted"


def test_lock_is_exclusive_and_stale_locks_are_taken_over(tmp_path):
  run = make_run(tmp_path)
  assert status.acquire(run) and not status.acquire(run)  # held by this (live) process
  status.release(run)
  (run / ".lock").write_text(f'{{"host": "{socket.gethostname()}", "pid": {dead_pid()}}}')
  assert status.acquire(run)


def test_a_lock_write_cut_short_leaves_no_lock_that_names_no_holder(tmp_path, monkeypatch):
  """A lock left empty (a full disk as acquire writes it, a kill as trainer_started rewrites it) named no holder:
  every later sweep skipped the run as held by another host, forever."""
  import errno
  run = make_run(tmp_path)

  def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  with monkeypatch.context() as m:
    m.setattr(status.json, "dump", disk_full)
    try:
      status.acquire(run)
    except OSError:
      pass
  assert status.acquire(run)

  replace = os.replace
  with monkeypatch.context() as m:  # the lock's rewrite fails (status.json's goes through): it keeps its holder
    m.setattr(status.files.os, "replace",
              lambda src, dst: disk_full() if str(dst).endswith(".lock") else replace(src, dst))
    try:
      status.trainer_started(run, os.getpid())
    except OSError:
      pass
  assert status.json.loads((run / ".lock").read_text())["pid"] == os.getpid()
  assert sorted(p.name for p in run.iterdir() if p.name.startswith(".lock")) == [".lock"]
  status.release(run)


def test_two_processes_writing_one_status_file_lose_no_update(tmp_path):
  """Two sweeps on one ROOT write the same run's status.json (one records the run's exit, the other the run's entry
  as it plans): each merge is of the record as the other left it, so neither undoes the other's update."""
  code = ("import sys; from repeat_lm.experiments import status\n"
          "lost = 0\n"
          "for i in range(300):\n"
          "  status.write(sys.argv[1], **{sys.argv[2]: i})\n"
          "  lost += status.read(sys.argv[1]).get(sys.argv[2]) != i\n"
          "print(lost)\n")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
  procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), key], stdout=subprocess.PIPE, text=True,
                            env=env) for key in ("a", "b")]
  assert [int(p.communicate(timeout=60)[0]) for p in procs] == [0, 0]
  assert status.read(tmp_path) == {"status": "pending", "a": 299, "b": 299}


def test_a_checkpoint_past_the_last_step_fails_and_says_why(tmp_path):
  # TRAIN_STEPS lowered (3) after the run checkpointed step 4: the trainer has nothing to train and exits 0. Pending
  # ("stopped before its last step") would have every sweep run it again, to the same end.
  run = make_run(tmp_path, checkpoints=[2, 4])
  status.started(run)
  record = status.exited(run, 0)
  assert record["status"] == "failed" and "checkpoint is at step 4, past its last step 3" in record["error"]


def test_two_sweeps_taking_over_one_stale_lock_do_not_both_get_it(tmp_path, monkeypatch):
  run = make_run(tmp_path)
  (run / ".lock").write_text(f'{{"host": "{socket.gethostname()}", "pid": {dead_pid()}}}')
  alive, got, other = status._alive, [], []

  def other_sweep_looks_too(pid):  # the other sweep reads the dead holder before this one replaces the lock
    if not other:
      other.append(threading.Thread(target=lambda: got.append(status.acquire(run))))
      other[0].start()
      other[0].join(timeout=0.5)
    return alive(pid)

  monkeypatch.setattr(status, "_alive", other_sweep_looks_too)
  got.append(status.acquire(run))
  other[0].join(timeout=10)
  assert sorted(got) == [False, True]


def test_a_lock_held_on_another_host_is_never_taken_over(tmp_path):
  # A pid is only this host's to check: the same number being dead here says nothing of the sweep on that host.
  run = make_run(tmp_path)
  (run / ".lock").write_text(f'{{"host": "not-{socket.gethostname()}", "pid": {dead_pid()}}}')
  assert not status.acquire(run)


def test_a_run_recorded_running_on_another_host_stays_running(tmp_path):
  # Its pid is the other host's: the same number being dead here says nothing of it (collect showed 'interrupted').
  assert status.effective({"status": "running", "host": f"not-{socket.gethostname()}", "pid": dead_pid()}) == "running"


def test_elapsed_time_adds_up_over_attempts(tmp_path, monkeypatch):
  # 100 s in earlier attempts, then this one from t=1000 to t=1010: 110 s in all.
  run = make_run(tmp_path, checkpoints=[3])
  status.write(run, status="running", started=1000.0, elapsed_s=100.0)
  monkeypatch.setattr(status, "time", types.SimpleNamespace(time=lambda: 1010.0))
  assert status.exited(run, 0)["elapsed_s"] == 110.0


def test_an_attempt_killed_before_recording_its_exit_still_counts(tmp_path, monkeypatch):
  # Killed (SIGKILL) at t=1060, the trainer's last line: the next attempt's start adds those 60 s, where elapsed_s
  # had held only the attempt that finished.
  run = make_run(tmp_path, checkpoints=[3])
  status.write(run, status="running", started=1000.0, elapsed_s=100.0, pid=dead_pid())
  (run / status.LOG_FILE).write_text("step 2\n")
  os.utime(run / status.LOG_FILE, (1060.0, 1060.0))
  (run / "metrics.jsonl").write_text("{}\n")  # `repeat-lm eval` of the killed run, later: not its trainer's time
  os.utime(run / "metrics.jsonl", (1900.0, 1900.0))
  monkeypatch.setattr(status, "time", types.SimpleNamespace(time=lambda: 2000.0))
  assert status.started(run)["elapsed_s"] == 160.0
  assert status.exited(run, 0)["elapsed_s"] == 160.0  # this attempt: no time between its start and exit here
  # An attempt that recorded its exit adds nothing on the next, nor does a start that is no finite time.
  assert status.started(run)["elapsed_s"] == 160.0 and status.exited(run, 0)["elapsed_s"] == 160.0
  for begun in (math.nan, -math.inf):
    status.write(run, status="running", started=begun, pid=dead_pid())
    assert status.started(run)["elapsed_s"] == 160.0
  # A SLURM job killed (node failure) after its own start at t=1000: its requeued start counts it. Submitting a run
  # counts a killed attempt once and clears the start, so the job's own start is the next one counted.
  status.write(run, status="running", started=1000.0, job_id="42", pid=None)
  assert status.started(run, job_id="42")["elapsed_s"] == 220.0
  status.write(run, status="running", started=1000.0, pid=dead_pid(), job_id=None)
  record = status.submitted(run, "43")
  assert (record["elapsed_s"], record["started"], record["job_id"]) == (280.0, None, "43")
  assert status.started(run, job_id="43")["elapsed_s"] == 280.0


def test_a_slurm_job_squeue_cannot_answer_for_stays_running(tmp_path, monkeypatch):
  # No squeue (or no controller): nothing says the job is gone, so the recorded status stands.
  monkeypatch.setattr(status, "_query_job", lambda job_id: None)
  run = make_run(tmp_path)
  status.write(run, status="running", job_id="3", host=None, pid=None)
  assert status.effective(status.read(run)) == "running"


def test_a_run_killed_by_a_signal_names_it_and_suspects_memory_only_for_sigkill(tmp_path):
  run = make_run(tmp_path, log="I step 10\n")
  assert status.error_text(run / "train.log", returncode=-9) == \
      "killed by signal 9 (SIGKILL, often the out-of-memory killer)"
  assert status.error_text(run / "train.log", returncode=-15) == "killed by signal 15 (SIGTERM)"


def test_a_process_of_another_user_is_alive(monkeypatch):
  # kill(pid, 0) failing with EPERM means the process exists (it is not ours to signal): its run is not interrupted.
  def kill(pid, sig):
    raise PermissionError(1, "Operation not permitted")
  monkeypatch.setattr(status.os, "kill", kill)
  assert status._alive(12345)


def test_each_attempt_is_counted(tmp_path):
  run = make_run(tmp_path)
  status.started(run)
  status.exited(run, 1)
  assert status.started(run)["attempts"] == 2


def test_a_field_of_the_wrong_type_reads_as_unreadable_naming_the_field(tmp_path):
  # Each failed a reader with a traceback: collect's dict update (values), int() and os.kill (pid), float()
  # (elapsed_s), the sort by index, and `finetune` "squad" was iterated as stages 's', 'q', 'u', ...
  run = make_run(tmp_path, checkpoints=[3])
  here = socket.gethostname()
  for key, value in (("values", [1, 2]), ("values", "abc"), ("finetune", "squad"), ("finetune", [1]), ("pid", "abc"),
                     ("pid", 10 ** 30), ("pid", -5), ("trainer_pid", True), ("elapsed_s", "1h"), ("index", "1"),
                     ("attempts", 1.5), ("status", ["finished"])):
    (run / status.STATUS_FILE).write_text(status.json.dumps({"status": "running", "host": here, key: value}))
    record = status.read(run)
    assert record["status"] == "pending" and \
        record["error"].startswith(f"unreadable {run / status.STATUS_FILE}: its {key!r} is "), (key, value)
    assert status.effective(record) == "pending"
  (run / status.STATUS_FILE).write_text('{"status": "finished", "values": {}, "finetune": [], "pid": null}')
  assert status.read(run) == {"status": "finished", "values": {}, "finetune": [], "pid": None}  # null is no value
  (run / status.STATUS_FILE).write_text('{"status": "finished", "values": "abc"}')
  status.started(run)  # the next attempt's record replaces the bad file, as it does one that is no JSON
  assert status.exited(run, 0)["status"] == "finished" and "values" not in status.read(run)


def test_a_pid_that_is_no_process_id_is_not_asked_about(tmp_path):
  # A record handed to effective() directly (not through read()): a text or huge pid was int()'d / sent to os.kill.
  here = socket.gethostname()
  for pid in ("abc", 10 ** 30, True):
    assert status.effective({"status": "running", "host": here, "pid": pid}) == "running"


def test_a_trainer_started_by_hand_on_a_run_is_seen_by_the_sweep(tmp_path):
  # `repeat-lm train` run by hand on ROOT/RUN/run.gin holds MODEL_DIR's lock, not the sweep's: the sweep rewrote its
  # run.gin under it, then launched a second trainer, refused at once, and recorded the run failed.
  holder = subprocess.Popen([sys.executable, "-c", "import sys; from pathlib import Path; "
                             "from repeat_lm.train import run_lock; lock = run_lock.hold(Path(sys.argv[1])); "
                             "print('held', flush=True); sys.stdin.read()", str(tmp_path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == "held\n"
    assert status.running(tmp_path).startswith(f"a trainer (pid {holder.pid} on ")
    assert not status.acquire(tmp_path)
    assert status.write_gin(tmp_path, "TRAIN_STEPS = 9\n", values={}) is not None
    assert not (tmp_path / status.GIN_FILE).exists()
  finally:
    holder.communicate("")
  assert status.running(tmp_path) is None and status.acquire(tmp_path)
  status.release(tmp_path)


def test_a_trainer_left_by_a_killed_sweep_is_named_not_the_sweep(tmp_path):
  """Its sweep gone (SIGKILL), the run was said to be run by 'a sweep (host, pid P)' of a process that no longer
  existed; the trainer that holds the run is named, with how to stop it."""
  run = make_run(tmp_path)
  sweep_pid, trainer = dead_pid(), os.getpid()
  (run / ".lock").write_text(f'{{"host": "{socket.gethostname()}", "pid": {sweep_pid}, "trainer_pid": {trainer}}}')
  assert status.running(run) == (f"a trainer (host {socket.gethostname()}, pid {trainer}) left by its killed sweep "
                                 f"(pid {sweep_pid}; `kill -TERM {trainer}` checkpoints and stops it)")
  assert not status.acquire(run)
  (run / ".lock").write_text(f'{{"host": "{socket.gethostname()}", "pid": {trainer}, "trainer_pid": {sweep_pid}}}')
  assert status.running(run) == f"a sweep (host {socket.gethostname()}, pid {trainer})"
