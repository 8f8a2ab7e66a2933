"""A real sweep: runs in `repeat-lm train` subprocesses, a failing run recorded (not fatal), a fine-tuning stage
after its run, nothing retrained on a second sweep, and `collect` giving one row per run."""

import csv
import io
import json
import os
import subprocess
import time
import types

import pytest

from experiment_helpers import tiny_experiment, write_squad
from repeat_lm import cli, files
from repeat_lm.analysis import results
from repeat_lm.experiments import runner, status, sweep


@pytest.mark.slow
def test_sweep_runs_records_failures_resumes_nothing_and_collects(tmp_path, fresh_gin, capsys):
  squad = write_squad(tmp_path / "squad")
  experiment = tiny_experiment(
      tmp_path / "exp.gin",
      # 'broken' names a source that does not exist: its trainer fails fast, inside its own process.
      arms="[{'name': 'tiny'}, {'name': 'broken', 'MIXTURE_OR_TASK_NAME': 'repeat_lm.nosuch.wiki8k.span.d10.e1'}]",
      finetune=f"""sweep.Grid.finetune = [@squad/sweep.Finetune()]
squad/sweep.Finetune.name = 'squad'
squad/sweep.Finetune.bindings = {{
    'MIXTURE_OR_TASK_NAME': '@downstream.squad_jsonl_task()', 'downstream.squad_jsonl_task.files': '{squad}',
    'TASK_FEATURE_LENGTHS': {{'inputs': 32, 'targets': 8}}, 'TRAIN_STEPS': 2, 'BATCH_SIZE': 8,
    'EVAL_BATCH_SIZE': 8, 'EVAL_PERIOD': 2, 'DROPOUT_RATE': 0.0, 'trainer.train.eval_steps': 1}}""")
  root = tmp_path / "root"
  log = io.StringIO()
  first = runner.run_sweep(experiment, root, runner.Options(stream=log))
  assert first["status"] == {"finished": 2, "failed": 1, "pending": 1}, log.getvalue()
  tiny, broken = status.read(root / "tiny"), status.read(root / "broken")
  assert tiny["status"] == "finished" and files.checkpoint_steps(root / "tiny") == [3]
  assert broken["status"] == "failed" and "nosuch" in broken["error"] and broken["returncode"] == 2
  assert status.read(root / "broken" / "ft_squad")["status"] == "pending"  # waits for its run
  assert status.read(root / "tiny" / "ft_squad")["status"] == "finished"
  assert "[1/2] tiny: finished" in log.getvalue() and "[2/2] broken: failed" in log.getvalue()

  # A second sweep trains nothing that finished (a failed run would be tried again: left out here, it costs time).
  log = io.StringIO()
  second = runner.run_sweep(experiment, root, runner.Options(stream=log, only="tiny"))
  assert second["status"] == {"finished": 2}
  assert "[1/1] tiny: finished, skipped" in log.getvalue() and "tiny/ft_squad: finished, skipped" in log.getvalue()
  assert status.read(root / "tiny")["attempts"] == 1 and status.read(root / "tiny" / "ft_squad")["attempts"] == 1

  capsys.readouterr()
  assert cli.main(["collect", f"--root={root}", f"--out={tmp_path / 'results.csv'}"]) == 0
  assert json.loads(capsys.readouterr().out)["rows"] == 2
  with (tmp_path / "results.csv").open() as f:
    rows = {r["run"]: r for r in csv.DictReader(f)}
  assert rows["tiny"]["status"] == "finished" and rows["broken"]["status"] == "failed"
  assert float(rows["tiny"]["params"]) > 0 and float(rows["tiny"]["final_eval_loss"]) > 0
  assert rows["tiny"]["best_step"] == "3" and rows["tiny"]["ft_squad_status"] == "finished"
  assert 0 <= float(rows["tiny"]["squad_f1"]) <= 100 and rows["broken"]["squad_f1"] == ""
  assert "nosuch" in rows["broken"]["error"] and rows["broken"]["final_eval_loss"] == ""
  [run] = [r for r in results.read_results(tmp_path / "results.csv") if r.run == "tiny"]
  assert results.load_curve(run, "eval/loss") is not None  # model_dir leads the analysis to the curves


def test_a_best_by_loss_picks_the_lowest_loss(tmp_path):
  # mode='min' (for a loss): dropout 0.1 reached loss 2.0, dropout 0.2 loss 3.0, so 0.1 is the best rate.
  for name, rate, loss in (("a", 0.1, 2.0), ("b", 0.2, 3.0)):
    status.write(tmp_path / name, status="finished", values={"DROPOUT_RATE": rate})
    (tmp_path / name / "metrics.jsonl").write_text(json.dumps({"step": 3, "eval/loss": loss}) + "\n")
  best = sweep.Best(runs="[ab]", column="DROPOUT_RATE", metric="final_eval_loss", mode="min")
  assert runner._resolve_best(best, tmp_path, ["a", "b"]) == (True, 0.1)  # noqa: SLF001


def test_progress_times_and_eta():
  assert runner._fmt_time(3 * 3600 + 125) == "3:02:05" and runner._fmt_time(125) == "2:05"  # noqa: SLF001
  assert runner._fmt_time(None) == "?"  # noqa: SLF001
  progress = runner._Progress(io.StringIO(), total=4)  # noqa: SLF001
  progress.durations = [100.0, 200.0]
  # 30 s left of the current run, then 2 more runs of the mean 150 s each.
  assert progress.eta(2, 30.0, 50.0) == 330.0


def test_the_step_shown_is_the_last_one_written(tmp_path):
  # metrics.jsonl grows by a train record, then an eval record, per step; the progress line shows the newest step,
  # and a line cut mid-write (the trainer is writing it) is passed over.
  with (tmp_path / "metrics.jsonl").open("w") as f:
    for step in range(1, 6):
      f.write(json.dumps({"step": step, "train/loss": 1.0}) + "\n")
      f.write(json.dumps({"step": step, "eval/loss": 2.0}) + "\n")
    f.write('{"step": 6, "train/lo')
  assert runner._last_step(tmp_path) == 5  # noqa: SLF001


def test_a_runs_eta_is_its_steps_left_at_its_measured_rate(tmp_path, monkeypatch):
  # A fake trainer that writes one step per 40 s poll: at step 2 of 10 its rate is 40 s per step, so 8 steps are left
  # and the sweep (no run after it) ends in 8 x 40 = 320 s.
  run_dir = tmp_path / "r"
  run_dir.mkdir()
  (run_dir / status.GIN_FILE).write_text("TRAIN_STEPS = 10\n")
  clock = [1000.0]

  class Trainer:
    pid, polls = os.getpid(), 0

    def wait(self, timeout=None):
      self.polls += 1
      if self.polls > 2:
        return 0
      clock[0] += 40.0
      with (run_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": self.polls, "train/loss": 1.0}) + "\n")
      raise subprocess.TimeoutExpired("trainer", timeout)

  monkeypatch.setattr(runner, "time", types.SimpleNamespace(time=lambda: clock[0], strftime=time.strftime))
  monkeypatch.setattr(runner, "subprocess", types.SimpleNamespace(
      Popen=lambda *a, **k: Trainer(), TimeoutExpired=subprocess.TimeoutExpired, STDOUT=subprocess.STDOUT))
  out = io.StringIO()
  stage = runner.Stage("r", run_dir, "train", sweep.RunSpec("r", None, ()))
  assert runner._run_blocking(stage, ["trainer"], runner._Progress(out, total=1), 1, 1, 0) == 0  # noqa: SLF001
  assert out.getvalue().splitlines()[-1] == "[1/1] r: step 2/10, 1:20 elapsed, sweep ETA 5:20"


def test_an_experiment_is_the_same_however_its_path_is_spelt(tmp_path, monkeypatch):
  # './gin/x.gin', an absolute path and 'gin/x.gin' warned 'two experiments share this ROOT' for every run.
  (tmp_path / "gin").mkdir()
  (tmp_path / "gin" / "x.gin").write_text("")
  (tmp_path / "gin" / "y.gin").write_text("")
  monkeypatch.chdir(tmp_path)
  assert runner.same_experiment("gin/x.gin", "./gin/x.gin")
  assert runner.same_experiment("gin/x.gin", str(tmp_path / "gin" / "x.gin"))
  assert runner.same_experiment("/elsewhere/gin/x.gin", "gin/x.gin")  # recorded from another working directory
  assert not runner.same_experiment("gin/x.gin", "gin/y.gin")


def test_a_sweep_into_a_root_of_another_experiment_warns(tmp_path, caplog):
  # rq5 swept into rq3's ROOT said nothing, and collect interleaved both experiments in one table.
  for name, experiment in (("a", "gin/experiments/rq3.gin"), ("b", "gin/experiments/rq3.gin"),
                           ("c", "gin/experiments/rq5.gin")):
    status.write(tmp_path / name, experiment=experiment, status="finished")
  exp = types.SimpleNamespace(path="gin/experiments/rq5.gin")
  with caplog.at_level("WARNING"):
    runner.warn_of_other_experiments(exp, tmp_path)
  assert f"{tmp_path} already holds 2 run(s) of another experiment, gin/experiments/rq3.gin" in caplog.text
  assert "rq5.gin" not in caplog.text
