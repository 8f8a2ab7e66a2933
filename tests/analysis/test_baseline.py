"""`analyze degradation --baseline`: a run's cost against its unrepeated baseline at equal tokens seen."""

import json
import math

import numpy as np
import pytest

from repeat_lm import cli
from repeat_lm.analysis import baseline, degradation, results
from curve_helpers import write_curve


def _curve(tokens, values):
  tokens = np.asarray(tokens, float)
  return results.Curve(np.arange(1.0, tokens.size + 1), tokens, np.asarray(values, float))


def _compare(run, base, higher=False, tolerance=None):
  return baseline.compare(run, base, higher_is_better=higher, tolerance=tolerance, rel_tolerance=0.005,
                          min_points=2)


def test_the_cost_is_the_gap_to_the_baseline_interpolated_at_the_runs_tokens():
  # Baseline loss 10 - t/200 on evaluations every 200 tokens; the run evaluates between them (every 300), where the
  # baseline's value is the line through its neighbours: at 900 tokens, 10 - 4.5 = 5.5.
  base = _curve([200, 400, 600, 800, 1000], [9, 8, 7, 6, 5])
  run = _curve([300, 600, 900], [8.5, 7.0, 6.5])
  res = _compare(run, base)
  np.testing.assert_allclose(res["cost_curve"], [0.0, 0.0, 1.0])
  assert res["cost"] == pytest.approx(1.0) and res["cost_tokens"] == 900 and res["baseline_value"] == 5.5
  # Behind for good needs 2 points: one worse point at the end is not yet "behind".
  assert res["behind_from_tokens"] is None


def test_behind_from_is_where_the_run_stays_worse_beyond_the_tolerance():
  base = _curve([100, 200, 300, 400, 500, 600], [6.0, 5.0, 4.0, 4.0, 4.0, 4.0])
  # Within 0.5% of the baseline at 100 and 300 (a dip back), behind from 400 on.
  run = _curve([100, 200, 300, 400, 500, 600], [6.01, 5.2, 4.01, 4.1, 4.3, 4.6])
  res = _compare(run, base)
  assert res["behind_from_tokens"] == 400 and res["cost"] == pytest.approx(0.6)
  # An absolute tolerance above every gap: never behind.
  assert _compare(run, base, tolerance=1.0)["behind_from_tokens"] is None


def test_accuracy_costs_the_baseline_minus_the_run():
  base = _curve([100, 200, 300], [0.30, 0.40, 0.50])
  run = _curve([100, 200, 300], [0.30, 0.35, 0.38])
  res = _compare(run, base, higher=True)
  np.testing.assert_allclose(res["cost_curve"], [0.0, 0.05, 0.12], atol=1e-12)
  assert res["behind_from_tokens"] == 200


def test_only_evaluations_inside_the_baselines_range_are_compared():
  base = _curve([100, 200], [5.0, 4.0])
  res = _compare(_curve([50, 150, 250], [6.0, 4.6, 4.0]), base)
  assert res["compared_points"] == 1 and res["cost_tokens"] == 150 and res["cost"] == pytest.approx(0.1)
  res = _compare(_curve([300, 400], [4.0, 3.0]), base)
  assert res["compared_points"] == 0 and "outside the baseline's" in res["why"] and "100-200" in res["why"]


def test_a_nan_evaluation_of_the_run_costs_infinitely_much_one_of_the_baseline_is_not_compared():
  base = _curve([100, 200, 300, 400], [5.0, 4.0, math.nan, 3.0])
  res = _compare(_curve([100, 200, 400], [5.0, math.nan, 3.0]), base)
  assert res["compared_points"] == 3 and math.isinf(res["cost_curve"][1]) and res["cost"] == 0.0
  res = _compare(_curve([250, 400], [3.5, 3.1]), base)  # 250 lies next to the baseline's NaN
  assert res["compared_points"] == 1 and res["cost_tokens"] == 400


def _run(name, **kw):
  extra = {k: str(kw.pop(k)) for k in list(kw) if k not in {f.name for f in results.Run.__dataclass_fields__.values()}}
  return results.Run(run=name, status="finished", model_dir=kw.pop("model_dir", None), extra=extra, **kw)


def test_pairs_need_one_baseline_each():
  runs = [_run("small_fresh", model="small"), _run("base_fresh", model="base"), _run("small_d8", model="small"),
          _run("base_d8", model="base"), _run("large_d8", model="large")]
  with pytest.raises(ValueError, match=r"`small_fresh` and `base_fresh` share the comparison \(no --match\).*"
                                       r"Add the column\(s\) they differ in to --match \(model\)"):
    baseline.pair(runs, "*_fresh")
  baselines, pairs = baseline.pair(runs, "*_fresh", ["model"])
  assert [b.run for b in baselines] == ["small_fresh", "base_fresh"]
  assert pairs["small_d8"].run == "small_fresh" and pairs["base_d8"].run == "base_fresh"
  assert pairs["large_d8"] == "no baseline has its model=large"
  with pytest.raises(ValueError, match=r"matched no run \(--baseline: no column 'epoch'; columns: run, status"):
    baseline.pair(runs, "epoch=1")
  with pytest.raises(ValueError, match=r"--match: no column 'modle'"):
    baseline.pair(runs, "*_fresh", ["modle"])
  with pytest.raises(ValueError, match="matched every run"):
    baseline.pair(runs, "*")


def test_runs_without_curves_compare_the_tables_finals_at_one_budget():
  fresh = _run("fresh", final_eval_loss=4.0, final_eval_tokens=1000.0)
  runs = [fresh, _run("d8", final_eval_loss=4.5, final_eval_tokens=1005.0),
          _run("short", final_eval_loss=4.2, final_eval_tokens=500.0),
          _run("diverged", final_eval_loss=math.nan, final_eval_tokens=1000.0)]
  _, pairs = baseline.pair(runs, "fresh")
  table, compared = baseline.rows(runs, pairs, {}, "loss", higher_is_better=False, tolerance=None,
                                  rel_tolerance=0.005, min_points=2)
  by_run = {row["run"]: row for row in table}
  assert by_run["d8"]["source"] == "table" and by_run["d8"]["cost"] == pytest.approx(0.5) and not compared
  short = by_run["short"]
  assert short["compared_points"] == 0 and "500 and 1000 tokens: not the same budget" in short["why"]
  assert math.isinf(by_run["diverged"]["cost"])


def test_degradation_reports_the_cost_against_the_baseline(tmp_path):
  runs = [_run("fresh", unique_tokens=6000.0, model_dir=write_curve(tmp_path / "fresh", [6, 5, 4.5, 4.2, 4.0, 3.9], metric="eval/loss")),
          _run("d8", unique_tokens=500.0, model_dir=write_curve(tmp_path / "d8", [6, 5.1, 4.8, 4.9, 5.2, 5.4], metric="eval/loss")),
          _run("moved", unique_tokens=500.0)]
  out = degradation.analyze(runs, tmp_path / "out", metric="eval/loss", baseline="fresh")
  d8, moved = out["baseline"]["runs"]
  assert out["baseline"]["baselines"] == ["fresh"] and d8["baseline"] == "fresh"
  # Behind from step 20 (2000 tokens, epoch 4 of 500 unique tokens); cost 5.4 - 3.9 at the last evaluation.
  assert d8["cost"] == pytest.approx(1.5) and d8["behind_from_tokens"] == 2000 and d8["behind_from_epoch"] == 4
  assert moved["compared_points"] == 0 and "not the same budget" in moved["why"]
  text = (tmp_path / "out" / "report.md").read_text()
  assert "## Against the baseline" in text and "Largest cost: `d8`, 1.5 at 6000 tokens (5.4 against 3.9)." in text
  assert "1 of the 1 compared runs fall behind their baseline for good: `d8` from 2000 tokens (epoch 4)." in text
  assert "Not compared: `moved` (no curve for both" in text
  png = tmp_path / "out" / "eval_loss_cost_vs_baseline.png"
  assert png.stat().st_size > 0 and out["plots"].count(str(png)) == 1 and text.count(png.name) == 1


def test_the_cli_takes_a_baseline_and_refuses_match_without_one(tmp_path, capsys):
  table = tmp_path / "results.csv"
  table.write_text("run,status,model_dir,final_eval_loss,final_eval_tokens\nfresh,finished,,4.0,100\n"
                   "d8,finished,,4.25,100\n")
  assert cli.main(["analyze", "degradation", f"--results={table}", "--metric=eval/loss", "--baseline=fresh",
                   "--json"]) == 0
  (row,) = json.loads(capsys.readouterr().out)["baseline"]["runs"]
  assert row["run"] == "d8" and row["cost"] == 0.25
  assert cli.main(["analyze", "degradation", f"--results={table}", "--match=model"]) == 2
  assert "--match pairs runs with a --baseline" in capsys.readouterr().err
