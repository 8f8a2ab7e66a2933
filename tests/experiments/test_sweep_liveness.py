"""Who is running a run: SLURM jobs recorded on their batch host, a local attempt after a SLURM one, a trainer its
killed sweep left behind, a sweep's lost terminal; one squeue call per sweep or collect; a finished run that a broken
configuration cannot turn into a failed one."""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import types

import pytest

from experiment_helpers import tiny_experiment
from repeat_lm.experiments import collect, runner, status, sweep


def _fake(bin_dir, name, body):
  bin_dir.mkdir(exist_ok=True)
  path = bin_dir / name
  path.write_text("#!/bin/sh\n" + body)
  path.chmod(0o755)


def _squeue(tmp_path, monkeypatch, alive=True):
  """A stand-in squeue logging its calls: every job listed (alive) or unknown to the controller."""
  log = tmp_path / "squeue.calls"
  body = f'echo "$*" >> {log}\n' + ('for a in "$@"; do case "$a" in --jobs) next=1;; *) [ -n "$next" ] && '
                                    'echo "$a" | tr , "\\n"; next=;; esac; done\n' if alive else
                                    'echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1\n')
  _fake(tmp_path / "bin", "squeue", body)
  monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
  return log


def test_a_job_started_on_this_host_by_the_batch_script_is_running(tmp_path, monkeypatch):
  _squeue(tmp_path, monkeypatch, alive=True)
  run = tmp_path / "run"
  status.write(run, status="running", job_id="7", host=None, pid=None)  # sweep --launcher=slurm --submit
  (run / status.GIN_FILE).write_text("TRAIN_STEPS = 3\n")  # run-status records only runs the sweep wrote
  # launch/slurm.sbatch on this host (one-node cluster, or a sweep from inside an allocation): a process that exits
  subprocess.run([sys.executable, "-m", "repeat_lm.cli", "run-status", f"--run_dir={run}", "--started"], check=True,
                 env={**os.environ, "SLURM_JOB_ID": "7"}, capture_output=True)
  assert status.effective(status.read(run)) == "running"  # squeue lists job 7: not resubmitted


def test_a_local_attempt_after_a_cancelled_job_is_running(tmp_path, monkeypatch):
  _squeue(tmp_path, monkeypatch, alive=False)
  run = tmp_path / "run"
  status.write(run, status="running", job_id="5", host=None, pid=None)
  assert status.effective(status.read(run)) == "interrupted"
  status.started(run)  # the local launcher trains it now, in this (live) process
  assert status.effective(status.read(run)) == "running"


def _sweep_process(tmp_path, name="a"):
  """A local sweep in a subprocess whose 'trainer' sleeps (writing its pid first); returns (sweep, pid file)."""
  exp = tiny_experiment(tmp_path / "exp.gin", arms=f"[{{'name': '{name}'}}]")
  pid_file = tmp_path / "trainer.pid"
  script = textwrap.dedent(f"""
      import sys
      from repeat_lm.experiments import runner
      runner._local_command = lambda stage: [sys.executable, "-c",
          "import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"]
      runner.run_sweep({exp!r}, {str(tmp_path / 'root')!r}, runner.Options(stream=sys.stderr))
      """)
  sweep = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while not (pid_file.exists() and pid_file.read_text()):
    assert time.time() < deadline and sweep.poll() is None, "the sweep did not start its trainer"
    time.sleep(0.2)
  time.sleep(0.5)
  return sweep, int(pid_file.read_text())


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


@pytest.mark.slow
def test_a_killed_sweeps_trainer_keeps_its_run(tmp_path):
  sweep, trainer = _sweep_process(tmp_path)
  run = tmp_path / "root" / "a"
  try:
    sweep.kill()
    sweep.wait()
    assert _alive(trainer)  # its own session: SIGKILL of the sweep leaves it training
    assert status.effective(status.read(run)) == "running"
    assert not status.acquire(run)  # a second sweep must not start a second trainer on the same MODEL_DIR
  finally:
    os.kill(trainer, signal.SIGKILL)


@pytest.mark.slow
def test_a_lost_terminal_stops_the_trainer_like_sigterm(tmp_path):
  sweep, trainer = _sweep_process(tmp_path)
  try:
    sweep.send_signal(signal.SIGHUP)
    sweep.wait(timeout=60)
    time.sleep(0.5)
    assert not _alive(trainer)
    record = status.read(tmp_path / "root" / "a")
    assert record["status"] == "pending" and "interrupted" in record["error"]
  finally:
    if _alive(trainer):
      os.kill(trainer, signal.SIGKILL)


def test_one_squeue_call_per_sweep_and_per_collect(tmp_path, monkeypatch):
  # Fine-tuning stages' jobs too: each cost a call of its own, asked before the stages' records were prefetched.
  log = _squeue(tmp_path, monkeypatch, alive=True)
  arms = "[" + ", ".join(f"{{'name': 'r{i}'}}" for i in range(3)) + "]"
  exp = tiny_experiment(tmp_path / "exp.gin", arms=arms,
                        finetune="sweep.Grid.finetune = [@s/sweep.Finetune()]\ns/sweep.Finetune.name = 'squad'")
  root = tmp_path / "root"
  runner.run_sweep(exp, root, runner.Options(dry_run=True, stream=io.StringIO()))
  for i in range(3):
    status.write(root / f"r{i}", status="running", job_id=str(100 + i), host=None, pid=None)
    status.write(root / f"r{i}" / "ft_squad", status="running", job_id=str(200 + i), host=None, pid=None)
  result = runner.run_sweep(exp, root, runner.Options(launcher="slurm", stream=io.StringIO()))
  assert result["status"] == {"running": 6}
  assert len(log.read_text().splitlines()) == 1, log.read_text()
  log.unlink()
  rows = collect.collect(root)
  assert {r["status"] for r in rows} == {"running"} and len(log.read_text().splitlines()) == 1


def test_a_configuration_that_no_longer_composes_leaves_a_finished_run_finished(tmp_path):
  exp = tiny_experiment(tmp_path / "exp.gin", arms="[{'name': 'a'}]")
  root = tmp_path / "root"
  runner.run_sweep(exp, root, runner.Options(dry_run=True, stream=io.StringIO()))
  status.write(root / "a", status="finished", returncode=0)
  broken = tiny_experiment(tmp_path / "exp.gin", arms="[{'name': 'a', 'model': 'gin/models/renamed.gin'}]")
  runner.run_sweep(broken, root, runner.Options(dry_run=True, stream=io.StringIO()))
  assert status.read(root / "a")["status"] == "finished"


def test_a_run_another_sweep_finishes_before_the_lock_is_taken_is_not_run_again(tmp_path, monkeypatch):
  """Another sweep runs 'a' when this one looks at it (running: the lock decides), then finishes it and lets go of its
  lock before this one takes it: the run is read again under the lock, and not trained a second time."""
  exp = tiny_experiment(tmp_path / "exp.gin", "[{'name': 'a'}]")
  root = tmp_path / "root"
  runner.run_sweep(exp, root, runner.Options(dry_run=True, stream=io.StringIO()))
  status.write(root / "a", status="running", host=socket.gethostname(), pid=os.getppid())  # the other sweep
  acquire = status.acquire

  def other_sweep_finishes_first(run_dir):
    status.write(run_dir, status="finished", pid=None)
    return acquire(run_dir)

  monkeypatch.setattr(status, "acquire", other_sweep_finishes_first)
  monkeypatch.setattr(runner, "_run_blocking", lambda *a: pytest.fail("a finished run was trained again"))
  log = io.StringIO()
  runner.run_sweep(exp, root, runner.Options(stream=log))
  assert "[1/1] a: finished, skipped" in log.getvalue() and not (root / "a" / status.LOCK_FILE).exists()


# The error as `repeat-lm: error:` gives it, and as a traceback's last line does under --log_level=DEBUG (the
# exception named with its module).
@pytest.mark.parametrize("error", ["TrainingDivergedError: Training diverged at step 3: summed loss nan",
                                   "repeat_lm.train.trainer.TrainingDivergedError: Training diverged at step 3"])
def test_a_diverged_run_is_retried_only_once_its_configuration_changes(tmp_path, monkeypatch, error):
  # Resuming is exact: a retry would restore the last good checkpoint and diverge again at the same step.
  exp = tiny_experiment(tmp_path / "exp.gin", "[{'name': 'a'}]")
  root = tmp_path / "root"
  runner.run_sweep(exp, root, runner.Options(dry_run=True, stream=io.StringIO()))
  status.write(root / "a", status="failed", returncode=2, error=error)
  monkeypatch.setattr(runner, "_run_blocking", lambda *a: pytest.fail("a diverged run was retried"))
  log = io.StringIO()
  runner.run_sweep(exp, root, runner.Options(stream=log))
  assert "[1/1] a: diverged, not retried" in log.getvalue()
  lower = tiny_experiment(tmp_path / "exp.gin", "[{'name': 'a', 'optim.make_schedule.base_learning_rate': 0.5}]")
  runner.run_sweep(lower, root, runner.Options(dry_run=True, stream=io.StringIO()))
  assert status.read(root / "a")["status"] == "pending"  # new settings: runnable again


def test_a_second_interrupt_kills_the_trainer_before_the_lock_goes(tmp_path, monkeypatch):
  """Ctrl-C asks the trainer to checkpoint and stop; a second Ctrl-C while it saves must not leave it training after
  the sweep has let go of the run's lock (a second sweep would start another trainer on the same MODEL_DIR)."""
  exp = tiny_experiment(tmp_path / "exp.gin", "[{'name': 'a'}]")
  root = tmp_path / "root"
  # A trainer slow to act on SIGTERM (a long checkpoint save): here it ignores it.
  trainer = ["sh", "-c", "trap '' TERM; exec sleep 60"]
  monkeypatch.setattr(runner, "_local_command", lambda stage: trainer)
  started = []

  class Interrupted(subprocess.Popen):  # Ctrl-C while the trainer runs, and again while the sweep waits for it
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      if self.args == trainer:  # not another command (platform's `uname -p`)
        started.append(self)

    def wait(self, timeout=None):
      if timeout in (2.0, 120):
        try:
          return super().wait(0.3)
        except subprocess.TimeoutExpired:
          raise KeyboardInterrupt from None
      return super().wait(timeout)

  monkeypatch.setattr(subprocess, "Popen", Interrupted)
  try:
    with pytest.raises(KeyboardInterrupt):
      runner.run_sweep(exp, root, runner.Options(stream=io.StringIO()))
    assert started[0].poll() is not None  # not left running...
    assert status.read(root / "a")["status"] == "pending"  # ...and its run resumes from its last checkpoint
  finally:
    if started and started[0].poll() is None:
      started[0].kill()
      started[0].wait()


def test_squeue_lists_array_and_heterogeneous_jobs_by_their_parts(tmp_path, monkeypatch):
  # `squeue --format=%i` prints array job 7 as 7_1 and 7_[2-4], heterogeneous job 8 as 8+0: both jobs are alive.
  _fake(tmp_path / "bin", "squeue", 'printf "7_1\\n7_[2-4]\\n8+0\\n"\n')
  monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
  with status.slurm_cache():
    status.prefetch_slurm([{"status": "running", "job_id": "7"}, {"status": "running", "job_id": "8"}])
    assert status._slurm_job_alive("7") is True and status._slurm_job_alive("8") is True  # noqa: SLF001


def test_squeue_answers_are_kept_for_a_minute_not_a_whole_sweep(tmp_path, monkeypatch):
  # A sweep lasts hours: a job's answer from its start must not speak for it after the job has ended.
  log = _squeue(tmp_path, monkeypatch, alive=True)
  clock = [0.0]
  monkeypatch.setattr(status, "time", types.SimpleNamespace(monotonic=lambda: clock[0], time=time.time))
  with status.slurm_cache():
    for now, calls in ((0.0, 1), (30.0, 1), (61.0, 2)):
      clock[0] = now
      assert status._slurm_job_alive("7") is True  # noqa: SLF001
      assert len(log.read_text().splitlines()) == calls, now


def test_a_run_waiting_for_a_best_value_is_not_run(tmp_path):
  # Run with the default in the meantime, it would finish with a value the Best has not chosen, and stay finished.
  waiting = "DROPOUT_RATE: best of moe_* by final_eval_accuracy"
  stage = runner.Stage("dense", tmp_path / "dense", "train", sweep.RunSpec("dense", None, ()), waiting=[waiting])
  assert runner._claimable(stage) == f"waiting for {waiting}"  # noqa: SLF001


def test_a_run_whose_gin_composes_again_is_run_again(tmp_path):
  # A model gin that did not exist failed 'a' at composing; with the arm fixed the next sweep runs it.
  exp = tiny_experiment(tmp_path / "exp.gin", arms="[{'name': 'a', 'model': 'gin/models/renamed.gin'}]")
  root = tmp_path / "root"
  runner.run_sweep(exp, root, runner.Options(dry_run=True, stream=io.StringIO()))
  assert status.read(root / "a")["status"] == "failed"
  exp = tiny_experiment(tmp_path / "exp.gin", arms="[{'name': 'a'}]")
  runner.run_sweep(exp, root, runner.Options(dry_run=True, stream=io.StringIO()))
  record = status.read(root / "a")
  assert record["status"] == "pending" and record["error"] is None and runner._claimable(  # noqa: SLF001
      runner.Stage("a", root / "a", "train", sweep.RunSpec("a", None, ()))) is None


def test_a_relative_root_gives_its_runs_an_absolute_model_dir(tmp_path, monkeypatch):
  # docs: MODEL_DIR = ROOT/RUN; a relative one would move with the directory `repeat-lm train` is started from.
  monkeypatch.chdir(tmp_path)
  exp = tiny_experiment(tmp_path / "exp.gin", arms="[{'name': 'a'}]")
  runner.run_sweep(exp, "root", runner.Options(dry_run=True, stream=io.StringIO()))
  # gin wraps a long line: the value is looked for, not the line.
  text = (tmp_path / "root" / "a" / "run.gin").read_text()
  assert f"'{tmp_path.resolve() / 'root' / 'a'}'" in text and "'root/a'" not in text


def test_a_finished_run_keeps_the_gin_it_ran_with(tmp_path):
  # docs/experiments.md: a finished run whose configuration changed since is not re-run; its run.gin still says what
  # its results were trained with (collect reads its parameters and steps from it).
  exp = tiny_experiment(tmp_path / "exp.gin", arms="[{'name': 'a'}]")
  root = tmp_path / "root"
  runner.run_sweep(exp, root, runner.Options(dry_run=True, stream=io.StringIO()))
  status.write(root / "a", status="finished", returncode=0)
  before = (root / "a" / "run.gin").read_text()
  exp = tiny_experiment(tmp_path / "exp.gin", arms="[{'name': 'a', 'TRAIN_STEPS': 7}]")
  runner.run_sweep(exp, root, runner.Options(dry_run=True, stream=io.StringIO()))
  assert (root / "a" / "run.gin").read_text() == before and status.last_step(root / "a") == 3


@pytest.mark.parametrize("holder", ["sweep", "slurm"])
def test_a_run_being_trained_keeps_its_gin_and_values_until_that_attempt_ends(tmp_path, monkeypatch, caplog, holder):
  """A second sweep on the ROOT, its experiment changed, rewrote run.gin (in place) and the recorded values of a run
  the first sweep (or a SLURM job) was training: the attempt ended at the old TRAIN_STEPS and was judged by the new
  one, and collect labelled its results with values it was not trained with."""
  arms = "[{'name': 'a', 'TRAIN_STEPS': %d}, {'name': 'b', 'TRAIN_STEPS': 4}]"
  root, run = tmp_path / "root", tmp_path / "root" / "a"
  quiet = runner.Options(dry_run=True, stream=io.StringIO())

  def sweep_with(steps):
    runner.run_sweep(tiny_experiment(tmp_path / "exp.gin", arms=arms % steps), root, quiet)
  sweep_with(3)
  before = (run / "run.gin").read_text()
  if holder == "sweep":
    assert status.acquire(run)  # this (live) process holds its lock, as the sweep training it does
  else:
    _squeue(tmp_path, monkeypatch, alive=True)
    status.submitted(run, "7")
  record = status.read(run)
  sweep_with(7)
  assert (run / "run.gin").read_text() == before and status.read(run) == record
  assert "a is being trained by" in caplog.text and "the change applies after that attempt" in caplog.text
  broken = tiny_experiment(tmp_path / "broken.gin", arms="[{'name': 'a', 'model': 'gin/models/renamed.gin'}]")
  runner.run_sweep(broken, root, quiet)
  assert status.read(run) == record  # not recorded as failed to compose under the attempt
  if holder == "sweep":
    status.release(run)
  else:
    status.exited(run, 1)
  with (run / "run.gin").open() as reader:  # a trainer starting as it is rewritten: the whole old gin, or the new
    sweep_with(7)
    assert reader.read() == before
  assert status.last_step(run) == 7 and status.read(run)["values"]["TRAIN_STEPS"] == 7


def test_a_long_error_is_cut_after_a_sentence_and_points_at_the_whole_message():
  # Cut at 200 characters, RQ2 CPU's missing-corpus error ended "... or use corpus='wiki' for the.".
  error = ("FileNotFoundError: No corpus files found at '/x/c4.json.gz' (a JSONL file or a glob). Point the corpus at "
           "an existing path, or use corpus='wiki' for the built-in sample.\nTraceback ...")
  assert runner.error_summary(error, 100) == ("FileNotFoundError: No corpus files found at '/x/c4.json.gz' (a JSONL "
                                              "file or a glob). ... (the whole message: RUN/status.json)")
  assert runner.error_summary("a b " + "x" * 50, 20) == "a b ... (the whole message: RUN/status.json)"
  assert runner.error_summary("x" * 50, 20) == "x" * 20 + " ... (the whole message: RUN/status.json)"
  assert runner.error_summary("short\nsecond line", 100) == "short" and runner.error_summary(None, 100) == ""
  # "e.g." ends no sentence (it left "(e.g. ..." open), nor does one in the first half of the limit (it threw away
  # most of the room); a sentence ending at the limit itself is kept.
  assert runner.error_summary("give a fraction (e.g. 0.05) or a path to a corpus. More", 40) == (
      "give a fraction (e.g. 0.05) or a path ... (the whole message: RUN/status.json)")
  assert runner.error_summary("Bad x. " + "word " * 20, 40).startswith("Bad x. word word word word word word")
  assert runner.error_summary("a" * 19 + ". more", 20) == "a" * 19 + ". ... (the whole message: RUN/status.json)"


def test_an_interrupted_run_whose_last_checkpoint_exists_is_recorded_finished_without_a_trainer(tmp_path,
                                                                                               monkeypatch):
  """The sweep was killed and its trainer went on to the last step: the next sweep started a trainer that restored
  that step and trained nothing (a queued job on SLURM). A run whose checkpoint is short of its last step resumes."""
  exp = tiny_experiment(tmp_path / "exp.gin", arms="[{'name': 'done'}, {'name': 'short'}]")
  root = tmp_path / "root"
  runner.run_sweep(exp, root, runner.Options(dry_run=True, stream=io.StringIO()))
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()
  for name, step in (("done", 3), ("short", 2)):  # TRAIN_STEPS = 3
    (root / name / "checkpoints" / str(step)).mkdir(parents=True)
    status.write(root / name, status="running", host=socket.gethostname(), pid=gone.pid, started=time.time() - 5)
  trained = []
  def fake_run(stage, command, *args):
    trained.append(stage.name)
    (stage.run_dir / "checkpoints" / "3").mkdir(exist_ok=True)
    return 0
  monkeypatch.setattr(runner, "_run_blocking", fake_run)
  result = runner.run_sweep(exp, root, runner.Options(stream=io.StringIO()))
  assert trained == ["short"] and result["status"] == {"finished": 2}
  record = status.read(root / "done")
  assert record["status"] == "finished" and record["error"] is None and record["elapsed_s"] >= 0


def test_a_best_whose_runs_all_failed_says_so_where_it_waits(tmp_path):
  """Its value comes from finished runs only: with every run it names failed (diverged ones are not retried
  unchanged), the run waited on every sweep, its line naming only the runs and the metric."""
  exp = tiny_experiment(tmp_path / "exp.gin", arms="[{'name': 'moe1', 'DROPOUT_RATE': 0.1}, "
                        "{'name': 'moe2', 'DROPOUT_RATE': 0.2}, {'name': 'dense', 'DROPOUT_RATE': @sweep.Best()}]",
                        finetune="sweep.Best.runs = 'moe*'\nsweep.Best.column = 'DROPOUT_RATE'")
  root = tmp_path / "root"
  runner.run_sweep(exp, root, runner.Options(dry_run=True, stream=io.StringIO()))
  status.write(root / "moe1", status="failed", error="TrainingDivergedError: Training diverged at step 2")
  out = io.StringIO()
  runner.run_sweep(exp, root, runner.Options(dry_run=True, stream=out))
  assert "waiting for DROPOUT_RATE: best of moe* by final_eval_accuracy\n" in out.getvalue()  # moe2 has not run
  status.write(root / "moe2", status="failed", error="ValueError: bad")
  out = io.StringIO()
  runner.run_sweep(exp, root, runner.Options(dry_run=True, stream=out))
  assert ("waiting for DROPOUT_RATE: best of moe* by final_eval_accuracy (all 2 of those runs failed, 1 diverged: the "
          "next sweep retries them, a diverged one only once its settings change)") in out.getvalue()
