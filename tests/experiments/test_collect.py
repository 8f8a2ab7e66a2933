"""`repeat-lm collect`: one row per run with the columns docs/analysis.md requires, from status.json,
metrics.jsonl and the run's gin; CSV for `repeat-lm analyze`, Parquet via pyarrow; sweep.Best from the rows."""

import csv
import io
import json
import math
import os
import socket

import pytest

from experiment_helpers import tiny_experiment
from repeat_lm.analysis import results
from repeat_lm.experiments import collect, runner, status, sweep

REQUIRED = ["run", "status", "params", "params_per_token", "flops_per_token", "unique_tokens", "epochs", "tokens_seen",
            "final_eval_loss", "best_eval_loss", "final_eval_accuracy", "best_eval_accuracy", "best_step", "model_dir"]


def write_metrics(run_dir, evals, tokens_per_step=160.0, source_tokens=640.0):
  """Train records every step and eval records (loss, accuracy) at the given steps."""
  with (run_dir / "metrics.jsonl").open("w") as f:
    for step in range(1, max(evals) + 1):
      seen = step * tokens_per_step
      f.write(json.dumps({"step": step, "train/loss": 9.0 - step, "train/tokens_seen": seen,
                          "train/epochs": seen / source_tokens}) + "\n")
      if step in evals:
        loss, acc = evals[step]
        f.write(json.dumps({"step": step, "eval/loss": loss, "eval/accuracy": acc}) + "\n")


@pytest.fixture
def sweep_root(tmp_path, fresh_gin):
  """Three runs written by a dry run: 'a' finished (with a SQuAD stage), 'b' failed, 'c' running."""
  exp = tiny_experiment(tmp_path / "exp.gin", "[{'name': 'a'}, {'name': 'b', 'DROPOUT_RATE': 0.1}, {'name': 'c'}]",
                        "sweep.Grid.finetune = [@squad/sweep.Finetune()]\nsquad/sweep.Finetune.name = 'squad'")
  root = tmp_path / "root"
  runner.run_sweep(exp, root, runner.Options(dry_run=True, stream=io.StringIO()))
  write_metrics(root / "a", {1: (7.0, 0.1), 2: (6.0, 0.3), 3: ("nan", "nan")})
  status.write(root / "a", status="finished", elapsed_s=12.5)
  (root / "a" / "ft_squad").mkdir(exist_ok=True)
  (root / "a" / "ft_squad" / "metrics.jsonl").write_text(
      json.dumps({"step": 2, "eval/loss": 3.0, "eval/squad_em": 25.0, "eval/squad_f1": 40.0}) + "\n")
  status.write(root / "a" / "ft_squad", status="finished")
  status.write(root / "b", status="failed", error="ValueError: bad")
  write_metrics(root / "c", {1: (8.0, 0.05)})
  status.write(root / "c", status="running", host=socket.gethostname(), pid=os.getpid())
  return root


def test_one_row_per_run_with_the_analysis_columns(sweep_root, tmp_path):
  rows = collect.collect(sweep_root, tmp_path / "results.csv")
  assert [r["run"] for r in rows] == ["a", "b", "c"]
  a, b, c = rows
  assert (a["status"], b["status"], c["status"]) == ("finished", "failed", "running")
  # A diverged (NaN) last evaluation is the final value; the best ignores it.
  assert math.isnan(a["final_eval_loss"]) and a["best_eval_loss"] == 6.0
  assert (a["best_eval_accuracy"], a["best_step"], a["final_step"], a["tokens_seen"]) == (0.3, 2, 3, 480.0)
  assert a["unique_tokens"] == 640 and a["epochs"] == pytest.approx(0.75)  # measured: the task is unbounded
  assert a["params"] == a["params_per_token"] > 0
  # Training FLOPs of the tiny T5 (d 32, 2 x 16 heads, gated d_ff 64, 2+2 layers, V 8192) at 32/8 tokens, by
  # reference.md section 6: 3 x (2 x 786,432 encoder + 2 x 368,640 decoder + 4,194,304 logits) = 19,513,344 per
  # sequence; 8 sequences x 3 steps over the 480 tokens seen. (Checked against collect's own model_summary, lengths
  # read in the wrong order or the wrong key passed unnoticed.)
  assert a["flops_per_token"] == pytest.approx(19_513_344 * 8 * 3 / 480.0)
  assert (a["squad_em"], a["squad_f1"], a["ft_squad_status"]) == (25.0, 40.0, "finished")
  assert b["error"] == "ValueError: bad" and b.get("final_eval_loss") is None and b["ft_squad_status"] == "pending"
  assert (a["DROPOUT_RATE"], b["DROPOUT_RATE"], a["model"]) == (0.0, 0.1, "t5_1_1_tiny")
  assert a["model_dir"] == "root/a" and a["train_steps"] == 3

  runs = {r.run: r for r in results.read_results(tmp_path / "results.csv")}
  assert set(REQUIRED) <= set(results.columns(list(runs.values())))
  assert runs["a"].best_eval_accuracy == 0.3 and runs["b"].status == "failed"
  assert results.load_curve(runs["a"], "eval/loss") is not None


def test_tokens_at_the_final_evaluation():
  train = [{"step": s, "train/tokens_seen": 100.0 * s} for s in (10, 20, 30)]
  assert collect.tokens_at_step(train, 20) == 2000.0
  assert collect.tokens_at_step(train, 15) == 1500.0 and collect.tokens_at_step(train, 5) == 500.0
  assert collect.tokens_at_step(train, 40) == 4000.0  # past the last record, at its rate
  assert math.isnan(collect.tokens_at_step([], 10))
  # A run stopped between evaluations: its loss was measured at step 2's tokens, not at the last train record's.
  records = [*({"step": s, "train/loss": 2.0, "train/tokens_seen": 160.0 * s} for s in (1, 2, 3)),
             {"step": 2, "eval/loss": 3.0, "eval/accuracy": 0.5}]
  summary = collect.metrics_summary(records)
  assert (summary["tokens_seen"], summary["final_eval_tokens"], summary["final_eval_loss"]) == (480.0, 320.0, 3.0)


def test_every_fine_tuning_stage_keeps_its_scores(sweep_root):
  status.write(sweep_root / "a", finetune=["squad_lr1", "squad_lr2"])
  for name, em in (("squad_lr1", 70.0), ("squad_lr2", 80.0)):
    (sweep_root / "a" / f"ft_{name}").mkdir()
    (sweep_root / "a" / f"ft_{name}" / "metrics.jsonl").write_text(
        json.dumps({"step": 2, "eval/squad_em": em, "eval/squad_f1": em + 5}) + "\n")
  row = collect.row(sweep_root / "a")
  assert (row["ft_squad_lr1_squad_em"], row["ft_squad_lr2_squad_em"], row["ft_squad_lr2_squad_f1"]) == (70.0, 80.0,
                                                                                                       85.0)
  assert "squad_em" not in row


def test_a_model_that_cannot_be_built_says_why(sweep_root):
  gin_path = sweep_root / "b" / "run.gin"
  gin_path.write_text(gin_path.read_text() + "\nt5.T5Config.emb_dim = 10_bad\n")
  row = collect.row(sweep_root / "b")
  assert row["params"] is None and "run.gin, line" in row["model_error"]
  assert collect.row(sweep_root / "a")["model_error"] is None


def test_parquet(sweep_root, tmp_path):
  pq = pytest.importorskip("pyarrow.parquet")
  collect.collect(sweep_root, tmp_path / "results.parquet")
  table = pq.read_table(tmp_path / "results.parquet")
  assert table.num_rows == 3 and set(REQUIRED) <= set(table.column_names)
  assert table.column("squad_f1").to_pylist() == [40.0, None, None]
  # Text columns stay strings when every cell is empty (no run failed): one schema for every sweep's table.
  assert {c: str(table.schema.field(c).type) for c in ("error", "model_error", "final_eval_loss")} == \
      {"error": "string", "model_error": "string", "final_eval_loss": "double"}
  with pytest.raises(ValueError, match=".csv or a .parquet"):
    collect.collect(sweep_root, tmp_path / "results.txt")


def test_best_resolves_from_finished_runs_only(sweep_root):
  # 'a' diverged at its last evaluation (final accuracy NaN): only its best accuracy can pick it.
  assert runner._resolve_best(sweep.Best(runs="[ab]", column="DROPOUT_RATE", default=0.3), sweep_root,  # noqa: SLF001
                              ["a", "b", "c"]) == (False, 0.3)
  best = sweep.Best(runs="[ab]", column="DROPOUT_RATE", metric="best_eval_accuracy", default=0.3)
  assert runner._resolve_best(best, sweep_root, ["a", "b", "c"]) == (True, 0.0)  # noqa: SLF001 ('b' failed)
  waiting = sweep.Best(runs="*", column="DROPOUT_RATE", default=0.3)
  assert runner._resolve_best(waiting, sweep_root, ["a", "b", "c"]) == (False, 0.3)  # noqa: SLF001 ('c' runs)
  misspelt = sweep.Best(runs="[ab]", column="DROPOUT", metric="best_eval_accuracy")
  with pytest.raises(ValueError, match="no column 'DROPOUT'; choose one of .*'DROPOUT_RATE'"):
    runner._resolve_best(misspelt, sweep_root, ["a", "b", "c"])  # noqa: SLF001
  # A misspelt metric would otherwise leave the dependent run waiting on every sweep, its gin at the default.
  wrong_metric = sweep.Best(runs="[ab]", column="DROPOUT_RATE", metric="best_eval_acc")
  with pytest.raises(ValueError, match="no finished run of those has a metric 'best_eval_acc'; choose .*'best_eval_acc"):
    runner._resolve_best(wrong_metric, sweep_root, ["a", "b", "c"])  # noqa: SLF001


def test_best_picks_the_best_run_in_the_direction_asked(sweep_root):
  # Two finished runs: 'a' (DROPOUT_RATE 0.0) best accuracy 0.3, best loss 6.0; 'b' (0.1) 0.5 and 5.0. With one
  # finished candidate, as above, any pick (the worst included) gave the same value.
  write_metrics(sweep_root / "b", {1: (7.0, 0.2), 2: (5.0, 0.5), 3: (5.5, 0.4)})
  status.write(sweep_root / "b", status="finished", error=None)
  resolve = lambda **kw: runner._resolve_best(sweep.Best(runs="[ab]", column="DROPOUT_RATE", **kw),  # noqa: SLF001
                                              sweep_root, ["a", "b", "c"])
  assert resolve(metric="best_eval_accuracy") == (True, 0.1)
  assert resolve(metric="best_eval_accuracy", mode="min") == (True, 0.0)
  assert resolve(metric="best_eval_loss", mode="min") == (True, 0.1)


def test_fine_tuning_scores_leave_out_the_moe_router_statistics():
  """An MoE's fine-tuning evaluation also logs router statistics: they are no task score, and in the table they would
  be read as experiment factors by `analyze` (a plot per statistic)."""
  scores = collect.downstream_scores([{"step": 2, "eval/loss": 3.0, "eval/squad_em": 25.0, "eval/squad_f1": 40.0,
                                       "eval/moe_router_confidence": 0.3, "eval/moe_load_balancing_loss": 1.3}])
  assert scores == {"squad_em": 25.0, "squad_f1": 40.0}


def test_an_moe_that_drops_most_tokens_is_named_in_a_warning():
  # RQ4 CPU's first stand-in dropped 58% of its tokens at the last evaluation, and the table of losses showed nothing.
  def evals(dropped):
    return [{"step": 1, "eval/loss": 3.0, "eval/moe_fraction_dropped": 0.9},
            {"step": 2, "eval/loss": 2.0, **({} if dropped is None else {"eval/moe_fraction_dropped": dropped})}]
  rows = [{"run": name, **collect.metrics_summary(evals(dropped))}
          for name, dropped in (("collapsed", 0.58), ("working", 0.05), ("dense", None))]
  assert [r.get("final_eval_moe_fraction_dropped") for r in rows] == [0.58, 0.05, None]
  (line,) = collect.moe_warnings(rows)
  assert line.startswith("collapsed: its sparse layers dropped 58% of their routing assignments")


def test_an_interrupted_write_leaves_the_previous_table_whole(tmp_path, monkeypatch):
  out = tmp_path / "results.csv"
  collect.write_table([{"run": "a", "final_eval_loss": 2.5}], out)
  before = out.read_text()

  def interrupted(self, rows):
    self.writerow(next(iter(rows)))
    raise KeyboardInterrupt  # Ctrl-C (or a full disk) after the first row of the new table
  monkeypatch.setattr(collect.csv.DictWriter, "writerows", interrupted)
  with pytest.raises(KeyboardInterrupt):
    collect.write_table([{"run": "b", "final_eval_loss": 3.0}, {"run": "c", "final_eval_loss": 4.0}], out)
  assert out.read_text() == before
  assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]  # no temporary file left behind


def test_a_run_linked_or_moved_aside_is_no_second_row_of_its_name(sweep_root, tmp_path):
  """A symlink to a run of ROOT is that run again; a run moved aside (`mv a a.old`, swept again) keeps a's
  status.json: either way two rows named 'a' made the table unreadable to `analyze`."""
  (sweep_root / "latest").symlink_to(sweep_root / "a", target_is_directory=True)
  (sweep_root / "a.old").mkdir()
  (sweep_root / "a.old" / "status.json").write_text((sweep_root / "a" / "status.json").read_text())
  assert [p.name for p in collect.run_dirs(sweep_root)] == ["a", "a.old", "b", "c"]
  assert collect.row(sweep_root / "a.old")["run"] == "a.old"


def test_a_task_named_by_its_total_tokens_has_epochs_total_over_unique():
  # d27.t35: 2^27 unique tokens in a budget of 2^35 tokens seen, i.e. 2^8 epochs (docs/data.md: E = T/D).
  assert collect.task_data("repeat_lm.c4.t5.span.d27.t35") == {"unique_tokens": 2 ** 27, "epochs": 2 ** 8}


def test_fine_tuning_scores_are_the_last_evaluations_and_leave_out_the_z_loss():
  records = [{"step": 20, "eval/squad_em": 30.0, "eval/z_loss": 1e-4}, {"step": 10, "eval/squad_em": 10.0}]
  assert collect.downstream_scores(records) == {"squad_em": 30.0}


def test_the_best_step_is_the_first_evaluation_reaching_the_best_accuracy():
  records = [{"step": s, "eval/loss": 2.0, "eval/accuracy": a} for s, a in ((10, 0.5), (20, 0.6), (30, 0.6))]
  summary = collect.metrics_summary(records)
  assert (summary["best_eval_accuracy"], summary["best_step"]) == (0.6, 20)


def test_run_directories_come_in_the_experiments_order_not_by_name(tmp_path):
  for index, name in enumerate(["zeta", "alpha"]):
    status.write(tmp_path / name, run=name, index=index)
  assert [p.name for p in collect.run_dirs(tmp_path)] == ["zeta", "alpha"]


def test_a_cut_line_in_the_middle_of_metrics_skips_only_that_line(tmp_path):
  # A crash mid-write, then a restart appending: the records after the cut line are the run's too.
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "tr\n{"step": 3}\n')
  assert [r["step"] for r in results.read_metrics(tmp_path)] == [1, 3]


def test_table_cells_of_mappings_are_json_and_bool_factors_stay_text(tmp_path):
  collect.write_table([{"run": "a", "TASK_FEATURE_LENGTHS": {"targets": 114, "inputs": 512}}], tmp_path / "t.csv")
  with (tmp_path / "t.csv").open() as f:
    assert next(csv.DictReader(f))["TASK_FEATURE_LENGTHS"] == '{"inputs": 512, "targets": 114}'
  pq = pytest.importorskip("pyarrow.parquet")
  collect.write_table([{"run": "a", "SCAN_LAYERS": True}, {"run": "b", "SCAN_LAYERS": False}], tmp_path / "t.parquet")
  assert pq.read_table(tmp_path / "t.parquet").column("SCAN_LAYERS").to_pylist() == ["True", "False"]


def test_best_waits_while_a_run_it_names_still_runs(sweep_root):
  # docs/experiments.md: the run that uses a Best waits until every run it names has finished (or failed). 'a' has
  # finished (best accuracy 0.3) but 'c' still runs, and may yet do better: no value is chosen, the default stands.
  best = sweep.Best(runs="[ac]", column="DROPOUT_RATE", metric="best_eval_accuracy", default=0.3)
  assert runner._resolve_best(best, sweep_root, ["a", "b", "c"]) == (False, 0.3)  # noqa: SLF001


def test_a_link_whose_name_sorts_first_still_leaves_the_row_to_its_run(sweep_root):
  # The link is that run again, whatever its name: the row keeps the run's own name ('0latest' sorts before 'a').
  (sweep_root / "0latest").symlink_to(sweep_root / "a", target_is_directory=True)
  assert [p.name for p in collect.run_dirs(sweep_root)] == ["a", "b", "c"]


def test_measured_unique_tokens_win_over_the_task_names_nominal_count(sweep_root, monkeypatch):
  # docs/experiments.md: unique_tokens is measured (tokens seen / train/epochs) where the metrics say, the task name's
  # D (2^27 for d27) only without them. 'a' saw 480 tokens in 0.75 epochs: 640 unique tokens.
  monkeypatch.setattr(collect, "model_summary", lambda gin_path: {"task": "repeat_lm.c4.t5.span.d27.e8"})
  r = collect.row(sweep_root / "a")
  assert r["unique_tokens"] == 640 and r["epochs"] == collect.task_data("repeat_lm.c4.t5.span.d27.e8")["epochs"]


def test_a_root_without_runs_does_not_overwrite_a_table(tmp_path):
  # A --root that is not the sweep's (a typo, its parent) holds no runs: the table already there is kept.
  out = tmp_path / "results.csv"
  out.write_text("run,status\nold,finished\n")
  (tmp_path / "root").mkdir()
  with pytest.raises(ValueError, match="holds no sweep runs .*no table written"):
    collect.collect(tmp_path / "root", out)
  assert out.read_text() == "run,status\nold,finished\n"
  # Nor is an empty table written where there was none: it passed for a result (exit 0), then was refused.
  with pytest.raises(ValueError, match="holds no sweep runs"):
    collect.collect(tmp_path / "root", tmp_path / "new.csv")
  assert not (tmp_path / "new.csv").exists()


def test_the_best_loss_leaves_out_a_diverged_evaluation():
  # A NaN first evaluation (diverged, then recovered) is no best loss: min() starting from NaN would keep it.
  records = [{"step": s, "eval/loss": v, "eval/accuracy": 0.5} for s, v in ((10, "nan"), (20, 3.0), (30, 2.5))]
  assert collect.metrics_summary(records)["best_eval_loss"] == 2.5


def test_a_run_without_metrics_has_the_flops_per_token_of_its_row(sweep_root):
  # Before any train record: the 19,513,344 training FLOPs of a tiny-T5 sequence (reference.md section 6, as in the
  # test above) over its 32 + 8 tokens, so that the proxy can cost a run that has not started.
  assert collect.row(sweep_root / "b")["flops_per_token"] == pytest.approx(19_513_344 / 40)


def test_the_final_evaluation_is_paired_with_the_tokens_seen_at_its_own_step():
  # Evaluations at steps 10 and 25, 100 tokens a step: the final one saw 2500 tokens (not the first's 1000).
  records = [*({"step": s, "train/loss": 2.0, "train/tokens_seen": 100.0 * s} for s in (10, 20, 30)),
             {"step": 25, "eval/loss": 2.5}, {"step": 10, "eval/loss": 3.0}]
  assert collect.metrics_summary(records)["final_eval_tokens"] == 2500.0


def test_unknown_tokens_seen_measure_no_unique_tokens(tmp_path):
  # A train record with train/epochs but tokens seen missing, "inf" or "nan": round(NaN or inf) ended collect for the
  # whole table (ValueError / OverflowError, naming no file). The tokens are unknown: empty cells, no crash.
  for name, tokens in (("missing", {}), ("inf", {"train/tokens_seen": "inf"}), ("nan", {"train/tokens_seen": "nan"})):
    (tmp_path / name).mkdir()
    (tmp_path / name / "status.json").write_text('{"status": "finished", "values": {"DROPOUT_RATE": 0.1}}')
    (tmp_path / name / "metrics.jsonl").write_text(
        json.dumps({"step": 10, "train/loss": 4.0, "train/epochs": 0.5, **tokens}) + "\n")
  rows = collect.collect(tmp_path, tmp_path / "results.csv")
  assert [r["run"] for r in rows] == ["inf", "missing", "nan"]
  for r in rows:
    assert math.isnan(r["tokens_seen"]) and r["unique_tokens"] is None and r["final_step"] == 10
  assert "measured_unique_tokens" not in collect.metrics_summary(
      [{"step": 1, "train/loss": 1.0, "train/tokens_seen": 100.0, "train/epochs": 1e-320}])  # 100 / 1e-320 is inf


def test_a_hand_edited_status_file_is_a_row_that_says_so_not_a_traceback(tmp_path):
  # `values` that is no object, `finetune` that is a string and a pid that is text or past a C long ended collect with
  # a TypeError / ValueError / OverflowError; "squad" was read as stages 's', 'q', 'u', ... (columns ft_s_status).
  bad = {"values_list": {"status": "finished", "values": [1, 2]}, "values_text": {"status": "finished", "values": "abc"},
         "finetune": {"status": "finished", "finetune": "squad"},
         "pid_text": {"status": "running", "host": socket.gethostname(), "pid": "abc"},
         "pid_huge": {"status": "running", "host": socket.gethostname(), "pid": 10 ** 30}}
  for name, record in bad.items():
    (tmp_path / name).mkdir()
    (tmp_path / name / "status.json").write_text(json.dumps(record))
    (tmp_path / name / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1}\n')
  rows = {r["run"]: r for r in collect.collect(tmp_path, tmp_path / "results.csv")}
  field = {"values_list": "values", "values_text": "values", "finetune": "finetune", "pid_text": "pid",
           "pid_huge": "pid"}
  for name, key in field.items():
    assert rows[name]["status"] == "pending" and rows[name]["final_step"] == 1
    assert rows[name]["error"].startswith(f"unreadable {tmp_path / name / 'status.json'}: its '{key}' is ")
    assert collect.outcome(tmp_path / name)["status"] == "pending"
  assert not any(k.startswith("ft_") for r in rows.values() for k in r)


def test_an_interrupted_run_whose_last_checkpoint_exists_is_shown_finished(tmp_path):
  # The sweep was killed; its trainer went on to the last step. collect showed 'interrupted' beside final metrics.
  import subprocess
  import sys
  run = tmp_path / "run"
  (run / "checkpoints" / "2").mkdir(parents=True)
  (run / "run.gin").write_text("TRAIN_STEPS = 3\n")
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()
  status.write(run, status="running", host=socket.gethostname(), pid=gone.pid)
  assert collect.shown_status(run, status.read(run)) == "interrupted"  # step 2 of 3
  (run / "checkpoints" / "3").mkdir()
  assert collect.shown_status(run, status.read(run)) == "finished"
  assert status.effective(status.read(run)) == "interrupted"  # the record itself is the next sweep's to update


@pytest.mark.parametrize("out, message", [("results.txt", "write a .csv or a .parquet file"),
                                          ("table.csv", "is a directory"),
                                          ("a_file/results.csv", "is a file, not a folder")])
def test_a_wrong_out_is_refused_before_any_row_is_built(tmp_path, monkeypatch, out, message):
  """A wrong --out was named only after every run's model had been built for its row (minutes for a full-scale
  sweep)."""
  run = tmp_path / "root" / "a"
  run.mkdir(parents=True)
  status.write(run, status="finished")
  (tmp_path / "table.csv").mkdir()
  (tmp_path / "a_file").write_text("")
  monkeypatch.setattr(collect, "row", lambda *a, **k: pytest.fail("a row was built before --out was checked"))
  with pytest.raises(ValueError, match=message):
    collect.collect(tmp_path / "root", tmp_path / out)


def test_a_finished_run_whose_metrics_stop_short_of_its_last_step_is_named_in_a_warning(sweep_root, capsys):
  """A finished run's metrics.jsonl cut after step 2 of 3 (or emptied) gave a 'finished' row whose final values were
  step 2's, without a word."""
  from repeat_lm import cli  # noqa: PLC0415
  rows = {r["run"]: r for r in collect.collect(sweep_root)}
  assert rows["a"]["final_step"] == 3 and collect.metrics_warnings(rows.values()) == []  # 'c' is running: no warning
  lines = (sweep_root / "a" / "metrics.jsonl").read_text().splitlines()
  (sweep_root / "a" / "metrics.jsonl").write_text("\n".join(l for l in lines if '"step": 3' not in l) + "\n")
  assert cli.main(["collect", f"--root={sweep_root}"]) == 0
  (line,) = json.loads(capsys.readouterr().out)["warnings"]
  assert line.startswith("a: finished at step 3, but its metrics.jsonl ends at step 2 (cut or replaced since)")
  (sweep_root / "a" / "metrics.jsonl").write_text("")
  (line,) = collect.metrics_warnings(collect.collect(sweep_root))
  assert "its metrics.jsonl holds no training record" in line


def test_a_null_index_or_attempts_is_no_traceback(tmp_path):
  """status.json's fields may be null (read() accepts it, as the runner writes cleared fields): an index of null ended
  collect with a TypeError (the sort compared it with the others' numbers), attempts of null the next start."""
  for name, index in (("a", 0), ("b", None), ("c", 1)):
    (tmp_path / name).mkdir()
    (tmp_path / name / "run.gin").write_text("TRAIN_STEPS = 3\n")
    status.write(tmp_path / name, status="pending", index=index, attempts=None)
  assert [d.name for d in collect.run_dirs(tmp_path)] == ["a", "c", "b"]
  assert status.started(tmp_path / "b")["attempts"] == 1
  status.write(tmp_path / "a", status=None)  # nor was a null status a status: an empty cell, counted under null
  assert status.effective(status.read(tmp_path / "a")) == "pending"
  assert collect.collect(tmp_path)[0]["status"] == "pending"
