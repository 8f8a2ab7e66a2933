"""Onset of degradation on hand-made curves, and the analysis of a synthetic table."""

import json
import math

import numpy as np
import pytest

from repeat_lm.analysis import degradation, results
from curve_helpers import write_curve


def test_rises_after_minimum():
  loss = [4.0, 3.0, 2.5, 2.2, 2.1, 2.12, 2.2, 2.3, 2.4]
  o = degradation.detect(loss, higher_is_better=False, tolerance=0.05)
  assert (o.best_index, o.best_value, o.final_value) == (4, 2.1, 2.4)
  assert o.gap == pytest.approx(0.3)
  assert o.onset_index == 6  # 2.12 is within 0.05 of 2.1; 2.2 onwards never returns
  assert o.improved


def test_accuracy_falls_after_peak():
  acc = [0.3, 0.5, 0.6, 0.62, 0.61, 0.58, 0.55]
  o = degradation.detect(acc, higher_is_better=True)  # tolerance 0.5% of 0.62 = 0.0031
  assert (o.best_index, o.onset_index) == (3, 4)
  assert o.gap == pytest.approx(0.07)


def test_noisy_but_not_degrading():
  rng = np.random.default_rng(0)
  acc = np.concatenate([np.linspace(0.3, 0.6, 10), 0.6 + rng.uniform(-0.001, 0.001, 30)])
  o = degradation.detect(acc, higher_is_better=True)
  assert o.onset_index is None
  assert o.gap < o.tolerance


def test_dip_that_recovers_is_not_degradation():
  loss = [3.0, 2.0, 2.5, 2.6, 2.0, 2.01]
  assert degradation.detect(loss, higher_is_better=False, tolerance=0.05).onset_index is None


def test_single_bad_last_point_is_not_sustained():
  loss = [3.0, 2.0, 2.0, 2.0, 2.5]
  assert degradation.detect(loss, higher_is_better=False, tolerance=0.05).onset_index is None
  assert degradation.detect(loss, higher_is_better=False, tolerance=0.05, min_points=1).onset_index == 4


def test_never_improves():
  flat = degradation.detect([2.0, 2.001, 2.0, 2.002], higher_is_better=False, tolerance=0.01)
  assert (flat.best_index, flat.onset_index, flat.improved) == (0, None, False)
  worse = degradation.detect([2.0, 2.2, 2.4, 2.6], higher_is_better=False, tolerance=0.01)
  assert (worse.best_index, worse.onset_index, worse.improved) == (0, 1, False)
  assert worse.gap == pytest.approx(0.6)


def test_divergence_counts_as_worst():
  o = degradation.detect([3.0, 2.0, float("nan"), float("nan")], higher_is_better=False, tolerance=0.01)
  assert (o.best_index, o.onset_index, o.gap) == (1, 2, float("inf"))


def test_a_curve_that_never_had_a_finite_value_has_no_best_and_no_onset():
  o = degradation.detect([float("nan")] * 4, higher_is_better=False)  # the relative tolerance of a NaN best
  assert (o.best_index, o.onset_index, o.improved) == (0, None, False)
  assert np.isnan(o.best_value) and np.isnan(o.gap) and np.isnan(o.tolerance)


def test_a_row_from_the_table_gives_the_best_step_only_for_accuracy():
  # collect's best_step is where the best accuracy was reached; the best loss's step is not in the table.
  run = results.Run(run="r", status="finished", model_dir=None, best_eval_loss=2.5, final_eval_loss=2.6,
                    best_eval_accuracy=0.62, final_eval_accuracy=0.6, best_step=1000.0)
  (loss_row,), _ = degradation.run_rows([run], "eval/loss")
  (acc_row,), _ = degradation.run_rows([run], "eval/accuracy")
  assert loss_row["best"] == 2.5 and np.isnan(loss_row["best_step"])
  assert (acc_row["best"], acc_row["best_step"]) == (0.62, 1000.0)


def test_analyze_table(results_csv, tmp_path):
  runs = results.read_results(results_csv)
  out = degradation.analyze(runs, tmp_path / "out", group_by="unique_tokens")
  rows = {r["run"]: r for r in out["runs"]}
  # 12.5 epochs of 2^20 tokens degrade past ~4 epochs (the fixture's curve); 0.78 epochs of 2^24 never do.
  repeated, fresh = rows["dense_n1e+07_u1048576_s200"], rows["dense_n1e+07_u16777216_s200"]
  assert repeated["onset_step"] is not None and 4 < repeated["onset_epoch"] < 12.5
  assert repeated["onset_tokens"] == repeated["onset_step"] * 2 ** 16
  assert fresh["onset_step"] is None and fresh["gap"] == 0
  by_u = {row["unique_tokens"]: row for row in out["by_factor"]["unique_tokens"]}
  # At 2^20 tokens all 200-step runs degrade; the three 100-step ones (6.25 epochs) only at their last point, the
  # three 50-step ones (3.1 epochs) not at all.
  assert by_u[2.0 ** 24]["degrading"] == 0 and by_u[2.0 ** 20]["degrading"] == by_u[2.0 ** 20]["runs"] - 6
  assert [p.split("/")[-1] for p in out["plots"]] == ["eval_accuracy_by_unique_tokens.png"]
  assert (tmp_path / "out" / "report.html").stat().st_size > 10_000  # the PNG is inlined


def test_unknown_metric():
  with pytest.raises(ValueError, match="--metric"):
    degradation.run_rows([], "eval/f1")


def test_a_step_evaluated_twice_is_one_evaluation_point(tmp_path):
  """`repeat-lm eval` of the final checkpoint appends a second record at its step: still one (the last) point, so a
  single bad final evaluation is not sustained degradation."""
  import json
  lines = []
  for step, acc in ((100, 0.5), (200, 0.6), (300, 0.6), (400, 0.6), (500, 0.55)):
    lines += [{"step": step, "train/loss": 2.0, "train/tokens_seen": step * 1000.0},
              {"step": step, "eval/accuracy": acc}]
  lines.append({"step": 500, "eval/accuracy": 0.551})
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
  run = results.Run(run="r", status="finished", model_dir=str(tmp_path), unique_tokens=1e5)
  (row,), curves = degradation.run_rows([run], "eval/accuracy")
  assert list(curves["r"].step) == [100, 200, 300, 400, 500] and curves["r"].value[-1] == 0.551
  assert row["onset_step"] is None and row["final"] == 0.551


def test_zero_tolerance_counts_a_tie_with_the_best_as_within():
  # tolerance 0: the best itself and a later equal point are within (bad <= best), degradation starts after them.
  o = degradation.detect([3.0, 2.0, 2.0, 2.5, 2.6], higher_is_better=False, tolerance=0.0)
  assert (o.best_index, o.onset_index, o.gap) == (1, 3, pytest.approx(0.6))


def test_improved_means_better_than_the_first_point_by_more_than_the_tolerance():
  # 0.5% of 0.999 is ~0.005: 1.000 -> 0.999 is within it, so the run never improved; 1.000 -> 0.9 did.
  assert not degradation.detect([1.0, 0.999, 1.0], higher_is_better=False).improved
  assert degradation.detect([1.0, 0.9, 1.0], higher_is_better=False).improved


def test_factor_summary_takes_the_median_onset_and_leaves_diverged_gaps_out():
  runs = [{"lr": 1.0}] * 3 + [{"lr": 2.0}]
  row = lambda gap, onset: {"gap": gap, "onset_step": None if onset is None else 1.0, "onset_epoch": onset,
                            "source": "curve"}
  rows = [row(0.1, 1.0), row(0.3, 2.0), row(float("inf"), 6.0), row(0.2, None)]
  by_lr = {s["lr"]: s for s in degradation.factor_summary(runs, rows, "lr")}
  assert by_lr[1.0]["median_onset_epoch"] == 2.0 and by_lr[1.0]["mean_gap"] == pytest.approx(0.2)
  assert by_lr[1.0]["degrading"] == 3 and by_lr[2.0]["degrading"] == 0 and by_lr[2.0]["median_onset_epoch"] is None


def test_earliest_onset_compares_tokens_when_a_run_has_no_unique_tokens(tmp_path):
  # `late` degrades from step 40 (4000 tokens, epoch 4 of its 1000 unique tokens); `early`, with no unique_tokens
  # (no onset epoch), from step 20 (2000 tokens): the earliest onset is `early`'s.
  runs = [results.Run(run="late", status="done", unique_tokens=1000.0,
                      model_dir=write_curve(tmp_path / "late", [0.5, 0.6, 0.6, 0.5, 0.4, 0.3])),
          results.Run(run="early", status="done",
                      model_dir=write_curve(tmp_path / "early", [0.6, 0.5, 0.4, 0.3, 0.2, 0.1]))]
  out = degradation.analyze(runs, tmp_path / "out")
  assert [r["onset_step"] for r in out["runs"]] == [40.0, 20.0]
  text = (tmp_path / "out" / "report.md").read_text()
  assert "Earliest onset: `early` at step 20." in text
  # The report states the rule the code applies: 2 points counting the onset (here 20 and 30 of [0.6, 0.5, 0.4]).
  assert "at least 2 evaluation points from it to the end" in text
  assert degradation.detect([0.6, 0.5, 0.4], higher_is_better=True).onset_index == 1


def test_factor_summary_sorts_values_with_an_empty_cell_last():
  # unique_tokens in the experiment's order, the fresh run's cell empty (NaN): NaN used to stop the sort.
  values = [2.0 ** 27, math.nan, 2.0 ** 29, 2.0 ** 23, 2.0 ** 25]
  runs = [{"unique_tokens": v} for v in values]
  rows = [{"gap": 0.0, "onset_step": None, "onset_epoch": None, "source": "curve"}] * len(runs)
  order = [s["unique_tokens"] for s in degradation.factor_summary(runs, rows, "unique_tokens")]
  assert order[:4] == [2.0 ** 23, 2.0 ** 25, 2.0 ** 27, 2.0 ** 29] and math.isnan(order[4])


def test_runs_without_curves_have_an_unknown_degradation_not_none(tmp_path):
  # A results table copied away from its runs: "0 show sustained degradation" beside gaps of 0.11-0.18.
  runs = [results.Run(run=f"r{i}", status="finished", model_dir=str(tmp_path / "gone"), final_eval_loss=6.8,
                      best_eval_loss=6.6, extra={"dropout": str(rate)}) for i, rate in enumerate((0.0, 0.1))]
  out = degradation.analyze(runs, tmp_path / "out", metric="eval/loss")
  text = (tmp_path / "out" / "report.md").read_text()
  assert "No run has a curve, so no onset of degradation can be measured." in text
  assert "2 run(s) have none" in text and "their degradation is unknown" in text
  assert all(s["degrading"] is None for s in out["by_factor"]["dropout"])
  # Nor a curve, nor the metric's columns: nothing to measure, refused (every number was NaN, exit 0).
  bare = [results.Run(run="r", status="finished", model_dir=str(tmp_path / "gone"))]
  with pytest.raises(ValueError, match="No run has a curve .* or a final or best `eval/loss` in the table"):
    degradation.analyze(bare, tmp_path / "out2", metric="eval/loss")


def test_a_curve_without_a_finite_value_has_no_best_step(tmp_path):
  run = results.Run(run="r", status="failed", model_dir=write_curve(tmp_path / "r", ["nan", "nan"]))
  (row,), _ = degradation.run_rows([run], "eval/accuracy")
  assert math.isnan(row["best"]) and math.isnan(row["best_step"]) and math.isnan(row["best_tokens"])


def test_a_row_from_the_table_has_a_gap_that_is_how_much_worse_the_final_value_is():
  # Loss 2.5 -> 2.6 is 0.1 worse; accuracy 0.62 -> 0.60 is 0.02 worse: both gaps positive, in metric units.
  run = results.Run(run="r", status="finished", model_dir=None, best_eval_loss=2.5, final_eval_loss=2.6,
                    best_eval_accuracy=0.62, final_eval_accuracy=0.6, best_step=1000.0)
  (loss_row,), _ = degradation.run_rows([run], "eval/loss")
  (acc_row,), _ = degradation.run_rows([run], "eval/accuracy")
  assert loss_row["gap"] == pytest.approx(0.1) and acc_row["gap"] == pytest.approx(0.02)


def test_a_flat_curve_with_zero_tolerance_never_improved():
  # "improved" means better than the first point by MORE than the tolerance: a tie at tolerance 0 is not.
  assert not degradation.detect([2.0, 2.0, 2.0], higher_is_better=False, tolerance=0.0).improved


def test_the_relative_tolerance_is_a_fraction_of_the_best_value_not_of_the_first():
  # 0.5% of the best loss 2.0 is 0.01: 2.02 is already outside it, so degradation starts at index 2. (0.5% of the
  # first value, 10.0, would be 0.05 and keep 2.02 and 2.05 within: no sustained degradation.)
  o = degradation.detect([10.0, 2.0, 2.02, 2.05, 2.06], higher_is_better=False)
  assert o.tolerance == pytest.approx(0.01) and o.onset_index == 2


def test_best_tokens_are_the_tokens_seen_at_the_best_evaluation(tmp_path):
  # Evaluations at steps 10, 20, 30 with 100 tokens a step: the best (0.6) is at step 20, i.e. 2000 tokens seen.
  run = results.Run(run="r", status="done", model_dir=write_curve(tmp_path / "r", [0.5, 0.6, 0.55]))
  (row,), _ = degradation.run_rows([run], "eval/accuracy")
  assert (row["best_step"], row["best_tokens"]) == (20.0, 2000.0)


def test_the_report_names_the_run_with_the_largest_gap(tmp_path):
  # `big` falls 0.6 -> 0.3 (gap 0.3); `small` 0.6 -> 0.55 (gap 0.05).
  runs = [results.Run(run="small", status="done", model_dir=write_curve(tmp_path / "small", [0.5, 0.6, 0.58, 0.55])),
          results.Run(run="big", status="done", model_dir=write_curve(tmp_path / "big", [0.5, 0.6, 0.4, 0.3]))]
  degradation.analyze(runs, tmp_path / "out")
  assert "Largest gap: `big` (0.3)." in (tmp_path / "out" / "report.md").read_text()


def test_each_factor_value_is_named_once_in_the_legend(tmp_path, monkeypatch):
  # Two runs at lr 1 and one at lr 2: the legend names lr=1 and lr=2 once each, not one entry per run.
  runs = [results.Run(run=name, status="done", model_dir=write_curve(tmp_path / name, [0.5, 0.6, 0.6]),
                      extra={"lr": lr}) for name, lr in (("a", "1"), ("b", "1"), ("c", "2"))]
  rows, curves = degradation.run_rows(runs, "eval/accuracy")
  drawn = []
  monkeypatch.setattr(degradation.plots, "save", lambda path, series, **kw: drawn.extend(series) or path)
  degradation.plot_factor(tmp_path / "p.png", runs, rows, curves, "eval/accuracy", "lr")
  assert [s.label for s in drawn] == ["lr=1", None, "lr=2"]


def test_the_onset_is_marked_on_its_curve(tmp_path, monkeypatch):
  # 0.5, 0.6, 0.4, 0.3 at steps 10..40 (100 tokens a step): degradation from step 30, marked x at (3000, 0.4).
  run = results.Run(run="r", status="done", model_dir=write_curve(tmp_path / "r", [0.5, 0.6, 0.4, 0.3]))
  rows, curves = degradation.run_rows([run], "eval/accuracy")
  drawn = []
  monkeypatch.setattr(degradation.plots, "save", lambda path, series, **kw: drawn.extend(series) or path)
  degradation.plot_factor(tmp_path / "p.png", [run], rows, curves, "eval/accuracy", None)
  assert [(list(s.x), list(s.y), s.style) for s in drawn if s.style == "x"] == [([3000.0], [0.4], "x")]


def test_the_report_states_the_relative_tolerance_as_a_share_of_the_best_value(tmp_path):
  run = results.Run(run="r", status="done", model_dir=write_curve(tmp_path / "r", [0.5, 0.6, 0.58]))
  degradation.analyze([run], tmp_path / "out")
  assert "(0.50% of the best value)" in (tmp_path / "out" / "report.md").read_text()


def test_diverged_runs_are_counted_per_group_and_named_not_printed_as_nan(tmp_path):
  # A run whose last evaluations are NaN printed "final nan | gap inf"; its group "mean_gap nan"; a group of it and a
  # healthy run "degrading 1, mean_gap 0", as if nothing degraded on average.
  def loss_curve(model_dir, losses):
    import json
    model_dir.mkdir(parents=True)
    lines = [{"step": 10 * (i + 1), "train/tokens_seen": 1000.0 * (i + 1)} for i in range(len(losses))]
    lines += [{"step": 10 * (i + 1), "eval/loss": v} for i, v in enumerate(losses)]
    (model_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return str(model_dir)
  runs = [results.Run(run=name, status="finished", extra={"model": model, "DROPOUT_RATE": "0.1"},
                      model_dir=loss_curve(tmp_path / name, losses))
          for name, model, losses in (("ok", "ok", [5, 4, 3, 2.9, 2.8]), ("div", "div", [5, 4, "nan", "nan", "nan"]))]
  out = degradation.analyze(runs, tmp_path / "out", metric="eval/loss")
  assert [r["diverged"] for r in out["runs"]] == [False, True]
  by_model = {s["model"]: s for s in out["by_factor"]["model"]}
  assert by_model["div"]["diverged"] == 1 and by_model["ok"]["diverged"] == 0
  assert math.isnan(by_model["div"]["mean_gap"])  # the JSON keeps numbers (null)
  by_rate = degradation.factor_summary(runs, out["runs"], "DROPOUT_RATE")
  assert (by_rate[0]["runs"], by_rate[0]["degrading"], by_rate[0]["diverged"], by_rate[0]["mean_gap"]) == (2, 1, 1, 0)
  text = (tmp_path / "out" / "report.md").read_text()
  assert "1 diverged (final `eval/loss` not finite): `div`." in text
  assert "| div | finished | curve | 4 | 20 | 2000 | diverged | diverged |" in text
  assert "| div | 1 | 1 | 1 | diverged |" in text
  assert " nan " not in text and " inf " not in text
  # A diverged run known from the table alone: its final and gap read `diverged`, but the best step and tokens it
  # never had (the table holds neither) stay unknown, not `diverged`.
  runs = [results.Run(run="tab", status="failed", model_dir=None, best_eval_loss=3.0, final_eval_loss=math.nan)]
  degradation.analyze(runs, tmp_path / "table", metric="eval/loss")
  assert "| tab | failed | table | 3 | nan | nan | diverged | diverged |" in (tmp_path / "table" / "report.md").read_text()


def test_a_curve_of_unknown_tokens_seen_has_no_onset_tokens_or_epoch_and_is_named(tmp_path):
  """An eval-only metrics.jsonl and no tokens_seen in the table: the steps were read as tokens, onset 4000 "tokens"
  at step 4000 and epoch 3e-5 of 2^27 unique tokens, drawn on the tokens-seen axis."""
  import json
  model_dir = tmp_path / "evals_only"
  model_dir.mkdir()
  accuracies = [0.5, 0.6, 0.62, 0.6, 0.55, 0.5]
  (model_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": 1000 * (i + 1), "eval/accuracy": a}) + "\n"
                                                   for i, a in enumerate(accuracies)))
  runs = [results.Run(run="evals_only", status="done", model_dir=str(model_dir), unique_tokens=2.0 ** 27),
          results.Run(run="timed", status="done", unique_tokens=1000.0,
                      model_dir=write_curve(tmp_path / "timed", [0.5, 0.6, 0.6, 0.5, 0.4, 0.3]))]
  out = degradation.analyze(runs, tmp_path / "out")
  row = out["runs"][0]
  assert (row["onset_step"], row["onset_tokens"], row["onset_epoch"]) == (4000.0, None, None)
  assert row["best_step"] == 3000.0 and math.isnan(row["best_tokens"])
  text = (tmp_path / "out" / "report.md").read_text()
  assert "Tokens seen are unknown for 1 run(s) with curves" in text and "`evals_only`; their onset tokens" in text
  # The earliest onset is ranked among the runs with tokens seen only: step 4000 of one run is not 40 of another.
  assert "Earliest onset of the runs whose tokens seen are known: `timed` at step 40 (epoch 4)." in text


def test_an_unfinished_run_is_named_and_the_answer_called_provisional(tmp_path):
  """A run still training has no onset yet: it was counted in "0 of 2 show sustained degradation" with no word that
  its curve stops mid-run (analyze proxy already calls such an answer provisional)."""
  runs = []
  for name, status, acc in (("done", "finished", [0.3, 0.5, 0.6, 0.6]), ("going", "running", [0.3, 0.5])):
    d = tmp_path / name
    d.mkdir()
    (d / "metrics.jsonl").write_text("".join(
        json.dumps({"step": 10 * (i + 1), "train/tokens_seen": 1000.0 * (i + 1), "eval/accuracy": a}) + "\n"
        for i, a in enumerate(acc)))
    runs.append(results.Run(run=name, status=status, model_dir=str(d), unique_tokens=500.0))
  out = degradation.analyze(runs, tmp_path / "out")
  assert out["unfinished"] == {"going": "running"}
  assert ("**Provisional**: 1 run(s) have not finished (`going` (running)): their best, gap and onset are from the "
          "evaluations so far" in (tmp_path / "out" / "report.md").read_text())


def test_a_run_that_never_improved_is_flagged_among_the_degrading_ones(tmp_path):
  """Loss rising from the first evaluation: its onset is the second point, and `improved` (false) was computed but
  shown nowhere, so a run that never learned read as one that overfit."""
  runs = []
  for name, loss in (("learns", [3.0, 2.0, 1.5, 1.8, 2.0]), ("broken", [3.0, 3.2, 3.5, 3.9, 4.2])):
    d = tmp_path / name
    d.mkdir()
    (d / "metrics.jsonl").write_text("".join(
        json.dumps({"step": 10 * (i + 1), "train/tokens_seen": 1000.0 * (i + 1), "eval/loss": v}) + "\n"
        for i, v in enumerate(loss)))
    runs.append(results.Run(run=name, status="finished", model_dir=str(d), unique_tokens=500.0))
  out = degradation.analyze(runs, tmp_path / "out", metric="eval/loss")
  assert [(row["run"], row["improved"], row["onset_step"]) for row in out["runs"]] == [
      ("learns", True, 40.0), ("broken", False, 20.0)]
  assert ("1 of the degrading runs never improved on their first evaluation (`improved` false): `broken`"
          in (tmp_path / "out" / "report.md").read_text())
