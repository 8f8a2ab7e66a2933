"""`repeat-lm demo`: the quick variant writes a report whose numbers are summary.json's, and reruns reuse its runs."""

import html
import json
import math

import numpy as np
import pytest

from repeat_lm import cli, demo
from repeat_lm.analysis import report
from repeat_lm.data import pipeline, tasks

FILES = ("report.html", "report.md", "summary.json", "eval_loss.png", "eval_accuracy.png", "train_loss.png")
RUN_KEYS = ("name", "unique_tokens", "epochs", "tokens_seen", "final_eval_loss", "best_eval_loss",
            "final_eval_accuracy", "best_eval_accuracy", "best_step")


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
  out = tmp_path_factory.mktemp("demo")
  assert cli.main(["demo", "--out", str(out), "--quick"]) == 0
  return out


@pytest.mark.slow
def test_quick_demo_writes_report_plots_and_summary(quick_demo):
  for name in FILES:
    assert (quick_demo / name).stat().st_size > 0, name
  summary = json.loads((quick_demo / "summary.json").read_text())
  runs = {r["name"]: r for r in summary["runs"]}
  assert list(runs) == ["fresh", "repeated", "repeated_dropout"]
  for run in runs.values():
    assert set(RUN_KEYS) <= set(run)
    assert all(math.isfinite(run[k]) for k in RUN_KEYS[1:]), run
    assert run["best_eval_loss"] <= run["final_eval_loss"] and run["best_eval_accuracy"] >= run["final_eval_accuracy"]
  # Same budget for every run; the repeated runs read a small subset many times.
  assert runs["repeated"]["unique_tokens"] < runs["fresh"]["unique_tokens"]
  assert runs["repeated"]["epochs"] > 4 * runs["fresh"]["epochs"]
  assert runs["repeated"]["tokens_seen"] == pytest.approx(runs["fresh"]["tokens_seen"], rel=0.05)
  assert summary["repeated_minus_fresh_final_eval_loss"] == pytest.approx(
      runs["repeated"]["final_eval_loss"] - runs["fresh"]["final_eval_loss"])
  assert summary["dropout_minus_repeated_final_eval_loss"] == pytest.approx(
      runs["repeated_dropout"]["final_eval_loss"] - runs["repeated"]["final_eval_loss"])
  assert summary["wall_time_s"] > 0


@pytest.mark.slow
def test_report_numbers_are_the_summary_numbers(quick_demo):
  summary = json.loads((quick_demo / "summary.json").read_text())
  md = (quick_demo / "report.md").read_text()
  page = (quick_demo / "report.html").read_text()
  for sentence in summary["findings"]:  # the sentences are written from the summary's numbers, verbatim
    assert sentence in md
    assert html.escape(sentence.split("`")[0], quote=False) in page
  for run in summary["runs"]:
    row = "| " + " | ".join(report.fmt(run[k]) for k in RUN_KEYS) + " |"
    assert row in md
    assert f"{run['final_eval_loss']:.4f}" in md
  assert md.count("data:image/png") == 0 and page.count("data:image/png;base64,") == 3


@pytest.mark.slow
def test_rerun_reuses_finished_runs(quick_demo):
  before = json.loads((quick_demo / "summary.json").read_text())
  assert cli.main(["demo", "--out", str(quick_demo), "--quick"]) == 0
  after = json.loads((quick_demo / "summary.json").read_text())
  assert all(r["reused"] for r in after["runs"])
  assert [r["final_eval_loss"] for r in after["runs"]] == [r["final_eval_loss"] for r in before["runs"]]


@pytest.mark.slow
def test_rerun_with_other_settings_names_what_changed(quick_demo, capsys):
  assert cli.main(["demo", "--out", str(quick_demo), "--quick", "--steps=7"]) == 2
  assert "(stored -> given: {'steps': (None, 7)})" in capsys.readouterr().err


def test_a_record_write_cut_short_keeps_the_earlier_record(tmp_path, monkeypatch):
  """demo_run.json is read before a rerun trains anything: written in place, one cut by a full disk after training
  stopped every rerun with a JSONDecodeError."""
  record = {"settings": {"steps": 3}, "steps": 3, "seed": 0, "task": "t"}

  def disk_full(*args):
    raise OSError(28, "No space left on device")

  def train_run(*args):
    monkeypatch.setattr(demo.files.os, "replace", disk_full)  # the disk fills while the run trains
    return 5.0

  monkeypatch.setattr(demo, "train_run", train_run)
  with pytest.raises(OSError, match="No space"):
    demo._train_and_record(demo.QUICK, None, tmp_path, record, 3, 0)
  monkeypatch.undo()
  demo._check_settings(tmp_path, record)
  assert json.loads((tmp_path / "demo_run.json").read_text()) == {**record, "train_wall_s": 0.0}
  assert [p.name for p in tmp_path.iterdir()] == ["demo_run.json"]


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_steps_below_one_are_refused(tmp_path, capsys, steps):
  assert cli.main(["demo", "--out", str(tmp_path), "--quick", f"--steps={steps}"]) == 2
  assert "give at least 1 step" in capsys.readouterr().err
  assert not any(tmp_path.iterdir())  # refused before anything was written


def test_steps_beyond_the_budget_are_refused_before_training(tmp_path, capsys):
  # The fresh run's task holds the budget once, so the trainer could not run more steps than it has batches.
  budget = demo.budget_steps(demo.QUICK, demo.run_specs(demo.QUICK))
  assert cli.main(["demo", "--out", str(tmp_path), "--quick", f"--steps={2 * budget}"]) == 2
  assert f"give at most {budget} steps" in capsys.readouterr().err
  assert not any(tmp_path.iterdir())


def test_every_run_evaluates_on_the_same_held_out_text():
  s = demo.QUICK
  batches = []
  for run in demo.run_specs(s):
    cfg = pipeline.DatasetConfig(tasks.ensure_registered(demo.task_name(s, run)),
                                 {"inputs": s.inputs_length, "targets": s.targets_length}, split="validation",
                                 batch_size=s.eval_batch_size, shuffle=False, seed=0)
    batches.append([b for _, b in zip(range(2), pipeline.get_batches(cfg))])
  for other in batches[1:]:
    for a, b in zip(batches[0], other):
      assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_evaluations_fall_on_logging_steps():
  for steps in (464, 1000, 5000):
    period, log_period = demo.eval_periods(demo.FULL, steps)
    assert period % log_period == 0 and steps // period >= demo.FULL.evals - 4


def _run(name, final, best, best_step, steps=100, unique=1000, tokens=32000.0, train=(5.0, 4.0)):
  return {"name": name, "final_eval_loss": final, "best_eval_loss": best, "best_step": best_step, "steps": steps,
          "unique_tokens": unique, "epochs": tokens / unique, "tokens_seen": tokens,
          "best_tokens_seen": tokens * best_step / steps, "final_eval_accuracy": 0.3, "final_train_loss": train[1],
          "dropout_rate": 0.2 if "dropout" in name else 0.0,
          "curves": {"train_step": [best_step, steps], "train_loss": list(train)}}


def test_findings_follow_the_numbers():
  fresh = _run("fresh", 5.0, 5.0, 100, unique=32000)
  overfit = _run("repeated", 6.0, 5.5, 20)
  helped = _run("repeated_dropout", 5.8, 5.5, 30)
  text = " ".join(demo.findings({"fresh": fresh, "repeated": overfit, "repeated_dropout": helped}, seed=0))
  assert "1.0000 higher (worse)" in text and "rose by 0.5000" in text and "overfit" in text
  assert "helped" in text and "(-0.2000)" in text and "recovering 20% of the gap" in text
  assert "no overfitting" in text  # the fresh run was best at its last step

  hurt = _run("repeated_dropout", 6.1, 6.1, 100)
  better = _run("repeated", 4.9, 4.9, 100)
  text = " ".join(demo.findings({"fresh": fresh, "repeated": better, "repeated_dropout": hurt}, seed=1))
  assert "0.1000 lower (better)" in text and "did not help" in text and "(+1.2000)" in text
  assert "it overfit" not in text and "recovering" not in text and text.count("no overfitting") == 3


def test_findings_at_the_edges():
  fresh = _run("fresh", 5.0, 5.0, 100, unique=32000)
  # The repeated run ended where it was lowest before (rise 0): not overfitting. Its lowest point at step 20 of 100
  # had read 6400 of its 32000 tokens: epoch 6.4 of a 1000-token subset.
  flat = _run("repeated", 5.5, 5.5, 20)
  assert "no overfitting" in demo._overfitting(flat) and "rose by" not in demo._overfitting(flat)
  assert "epoch 6.4" in demo._overfitting(_run("repeated", 6.0, 5.5, 20))
  # Repeating beat fresh data: dropout helping further recovers no gap; an equal loss is no help.
  better = _run("repeated", 4.9, 4.9, 100)
  text = " ".join(demo.findings({"fresh": fresh, "repeated": better, "repeated_dropout": _run("repeated_dropout", 4.8,
                                                                                             4.8, 100)}, seed=0))
  assert "helped" in text and "(-0.1000)" in text and "recovering" not in text
  text = " ".join(demo.findings({"fresh": fresh, "repeated": better, "repeated_dropout": _run("repeated_dropout", 4.9,
                                                                                             4.9, 100)}, seed=0))
  assert "did not help" in text and "(+0.0000)" in text


def test_steps_equal_to_the_budget_are_accepted(tmp_path, monkeypatch):
  # "give at most {budget} steps": the budget itself is allowed (the first check after it reads the run folders).
  monkeypatch.setattr(demo, "budget_steps", lambda s, specs: 10)

  class Reached(Exception):
    pass

  def reached(*_):
    raise Reached
  monkeypatch.setattr(demo, "_check_settings", reached)
  with pytest.raises(Reached):
    demo.run_demo(tmp_path, quick=True, steps=10)
  with pytest.raises(ValueError, match="give at most 10 steps"):
    demo.run_demo(tmp_path, quick=True, steps=11)


def test_the_budget_is_what_every_run_can_read(monkeypatch):
  # Full batches of the run with the fewest examples: the trainer stops every other run at that step too.
  examples = {"repeat_lm.wiki.wiki8k.span.d14.e0": 100, "repeat_lm.wiki.wiki8k.span.d11.e3": 90}
  monkeypatch.setattr(tasks, "ensure_registered", lambda name: name)
  monkeypatch.setattr(pipeline, "example_stream",
                      lambda cfg: type("Stream", (), {"total_examples": examples[cfg.mixture_or_task_name]}))
  assert demo.budget_steps(demo.QUICK, demo.run_specs(demo.QUICK)) == 90 // demo.QUICK.batch_size


def test_the_training_time_is_summed_over_resumes(tmp_path, monkeypatch):
  record = {"settings": {"steps": 3}, "steps": 3, "seed": 0, "task": "t"}
  (tmp_path / "demo_run.json").write_text(json.dumps({**record, "train_wall_s": 2.0}))  # the interrupted first try
  monkeypatch.setattr(demo, "train_run", lambda *args: 5.0)
  demo._train_and_record(demo.QUICK, None, tmp_path, record, 3, 0)
  assert json.loads((tmp_path / "demo_run.json").read_text())["train_wall_s"] == 7.0


def test_summary_best_values_are_each_metric_s_best(tmp_path):
  # The lowest loss (step 10) and the highest accuracy (step 20) fall on different evaluations.
  records = [{"step": 10, "train/tokens_seen": 640.0, "train/loss": 5.0}, {"step": 10, "eval/loss": 4.0,
             "eval/accuracy": 0.30}, {"step": 20, "train/tokens_seen": 1280.0, "train/loss": 4.0},
             {"step": 20, "eval/loss": 4.5, "eval/accuracy": 0.35}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  run = demo.run_specs(demo.QUICK)[1]
  s = demo.summarise_run(run, tmp_path, demo.QUICK)
  assert (s["best_eval_loss"], s["best_step"], s["final_eval_loss"]) == (4.0, 10, 4.5)
  assert (s["best_eval_accuracy"], s["final_eval_accuracy"]) == (0.35, 0.35)
  assert s["epochs"] == 1280.0 / 2**11 and s["tokens_seen"] == 1280.0


def test_a_line_cut_mid_write_neither_stops_a_rerun_nor_the_summary(tmp_path):
  # A killed `repeat-lm eval` appending to a finished run leaves half a record: parsed line by line, the rerun's
  # state check and the summary stopped with a JSONDecodeError that named no file.
  records = [{"step": 10, "train/tokens_seen": 640.0, "train/loss": 5.0}, {"step": 10, "eval/loss": 4.0,
             "eval/accuracy": 0.30}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 20, "eval/lo')
  assert demo._latest_eval_step(tmp_path) == 10
  s = demo.summarise_run(demo.run_specs(demo.QUICK)[1], tmp_path, demo.QUICK)
  assert s["final_eval_loss"] == 4.0 and s["tokens_seen"] == 640.0
