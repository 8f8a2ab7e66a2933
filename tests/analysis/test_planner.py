"""The token-crisis planner: optimal under the law, monotone where it must be, warnings at the documented
thresholds, dropout advice citing the measured table."""

import math
import re
from pathlib import Path

import numpy as np
import pytest

from repeat_lm.analysis import laws, planner, results

DC = laws.DATA_CONSTRAINED


def test_monotone_in_unique_tokens():
  """More unique tokens at the same compute never recommends more epochs (nor a worse loss)."""
  for compute in np.geomspace(1e18, 1e24, 5):
    epochs, losses = [], []
    for unique in np.geomspace(1e7, 1e13, 13):
      n = planner.optimal_params(DC, unique, compute)
      epochs.append(compute / (6 * n * unique))
      losses.append(float(laws.predict(DC, n, compute / (6 * n), unique)))
    assert all(b <= a * (1 + 1e-9) for a, b in zip(epochs, epochs[1:])), (compute, epochs)
    assert all(b <= a + 1e-12 for a, b in zip(losses, losses[1:])), (compute, losses)


def test_plan_is_the_minimum():
  unique, compute = 1e9, 1e21
  p = planner.plan(unique, compute)
  rec = p["recommended"]
  ns = np.geomspace(1e6, 1e12, 20001)
  brute = laws.predict(DC, ns, compute / (6 * ns), unique).min()
  assert rec["predicted_loss"] <= brute + 1e-9
  assert rec["tokens"] == pytest.approx(compute / (6 * rec["params"]))
  assert rec["epochs"] == pytest.approx(rec["tokens"] / unique)
  assert p["chinchilla_optimal"]["predicted_loss"] >= rec["predicted_loss"]
  assert p["chinchilla_optimal"]["loss_ignoring_repetition"] < p["chinchilla_optimal"]["predicted_loss"]


def test_plentiful_data_is_chinchilla():
  compute = 1e21
  n_opt, d_opt = laws.compute_optimal(DC, compute)
  p = planner.plan(10 * d_opt, compute)
  assert p["recommended"]["params"] == pytest.approx(n_opt, rel=1e-4)
  assert p["recommended"]["epochs"] == pytest.approx(0.1, rel=1e-3)
  assert p["warnings"] == [] and p["dropout"]["advised"] is False
  assert p["sufficient"]["fraction_of_compute"] > 0.9


def test_thresholds_and_warnings():
  t = planner.thresholds(DC)
  assert t["beyond_r_d_star_epochs"] == pytest.approx(1 + 15.387756)
  assert t["exhausted_epochs"] == pytest.approx(1 + 15.387756 * math.log(10))  # 36.4: the "~40 epochs"
  assert planner.marginal_epoch_value(DC, t["exhausted_epochs"]) == pytest.approx(0.1)
  assert planner.marginal_epoch_value(DC, 4.0) > 0.8
  codes = lambda epochs: {w["code"] for w in planner.warnings_for(  # noqa: E731
      DC, {"epochs": epochs, "params": 1.0, "marginal_epoch_value": planner.marginal_epoch_value(DC, epochs)}, 1e9)}
  assert codes(4) == set()
  assert codes(20) == {"beyond_r_d_star"}
  assert codes(100) == {"exhausted"}
  # A tiny corpus and a big budget: the plan repeats far past the point where repetition pays.
  p = planner.plan(1e8, 1e21)
  assert "exhausted" in {w["code"] for w in p["warnings"]}
  assert p["sufficient"]["fraction_of_compute"] < 0.5


def _rated(specs):
  """Runs from (params, epochs, rate, best_eval_accuracy, best_eval_loss)."""
  return [results.Run(run=f"r{i}", status="done", model_dir=None, params=n, epochs=e, best_eval_accuracy=acc,
                      best_eval_loss=loss, extra={"DROPOUT_RATE": str(rate)})
          for i, (n, e, rate, acc, loss) in enumerate(specs)]


def test_dropout_advice_by_size_and_measured():
  assert planner.dropout_advice(2.5e8, 1.0)["advised"] is False
  small, large = planner.dropout_advice(2.5e8, 8.0), planner.dropout_advice(2.8e9, 8.0)
  assert small["advised"] and large["advised"] and "Large" in large["reason"]
  runs = _rated([(n, 8.0, rate, acc, math.nan) for n, rate, acc in [(2.5e8, 0.0, 0.60), (2.5e8, 0.1, 0.63),
                                                                     (2.5e8, 0.3, 0.62), (2.8e9, 0.0, 0.55),
                                                                     (2.8e9, 0.3, 0.66)]])
  m = planner.dropout_advice(3e8, 8.0, runs)["measured"]
  assert (m["column"], m["best_rate"], m["runs"], m["params_range"]) == ("DROPOUT_RATE", 0.1, 3, [2.5e8, 2.5e8])
  assert planner.measured_dropout(runs, 2e9)["best_rate"] == 0.3


def test_rejects_chinchilla_constants():
  with pytest.raises(ValueError, match="data-constrained"):
    planner.plan(1e9, 1e21, laws.CHINCHILLA)


def test_measured_dropout_skips_a_nan_rate():
  # A `nan` cell is a float but no rate: it must not come out as the best rate.
  runs = _rated([(2.5e8, 8.0, rate, acc, math.nan) for rate, acc in [("0.0", 0.60), ("0.1", 0.63), ("nan", 0.64)]])
  m = planner.measured_dropout(runs, 2.5e8)
  assert (m["best_rate"], m["runs"], list(m["by_rate"])) == (0.1, 2, [0.0, 0.1])


def test_parameters_beyond_u_n_are_warned_about():
  # docs/analysis.md's example: U = 1.3e8 tokens make U_N = 6.63e6 parameters, and the plan's 6.7e8 exceed it.
  u_n = float(laws.d_to_n(DC, 1.3e8))
  assert u_n == pytest.approx(6.63e6, rel=1e-3)
  assert "excess_params" in {w["code"] for w in planner.plan(1.3e8, 1.5e20)["warnings"]}

  def codes(params):
    return {w["code"] for w in planner.warnings_for(DC, {"epochs": 4.0, "params": params,
                                                         "marginal_epoch_value": 0.8}, 1.3e8)}
  assert codes(0.5 * u_n) == set() and codes(2 * u_n) == {"excess_params"}


def test_without_repetition_the_effective_tokens_are_the_tokens_seen():
  # D' = D when nothing repeats (R_D = 0), however many more unique tokens there are than are seen.
  compute = 1e21
  p = planner.plan(10 * float(laws.compute_optimal(DC, compute)[1]), compute)
  assert p["recommended"]["effective_tokens"] == pytest.approx(p["recommended"]["tokens"], rel=1e-9)


def test_measured_dropout_prefers_runs_that_repeat_data():
  # The single-epoch run's rate scores best, but the advice is about repeated data: it is left out.
  runs = _rated([(2.5e8, 8.0, 0.0, 0.60, math.nan), (2.5e8, 8.0, 0.1, 0.63, math.nan),
                 (2.5e8, 1.0, 0.3, 0.70, math.nan)])
  m = planner.measured_dropout(runs, 2.5e8)
  assert (m["best_rate"], m["runs"]) == (0.1, 2)


def test_measured_dropout_falls_back_to_the_nearest_size():
  # No run within 2x of 5e9: the nearest size (1e9) decides, not every run.
  runs = _rated([(1e8, 8.0, 0.0, 0.70, math.nan), (1e8, 8.0, 0.3, 0.50, math.nan),
                 (1e9, 8.0, 0.0, 0.55, math.nan), (1e9, 8.0, 0.3, 0.60, math.nan)])
  m = planner.measured_dropout(runs, 5e9)
  assert (m["best_rate"], m["runs"], m["params_range"]) == (0.3, 2, [1e9, 1e9])


def test_measured_dropout_names_no_best_rate_when_rates_tie():
  # Every run at the same accuracy: "best DROPOUT_RATE = 0" was max()'s first key, not a measurement.
  runs = _rated([(2.5e8, 8.0, rate, 0.6, math.nan) for rate in (0.0, 0.1, 0.3)])
  m = planner.measured_dropout(runs, 2.5e8)
  assert (m["best_rate"], m["tied"]) == (None, [0.0, 0.1, 0.3])
  text = planner.summary(planner.plan(1.3e8, 1.5e20, runs=runs))
  assert "Measured: no best DROPOUT_RATE: 0, 0.1, 0.3 tie by best_eval_accuracy" in text
  one = planner.measured_dropout(_rated([(2.5e8, 8.0, 0.0, 0.6, math.nan), (2.5e8, 8.0, 0.1, 0.7, math.nan)]), 2.5e8)
  assert (one["best_rate"], one["tied"]) == (0.1, [])


def test_measured_dropout_without_accuracy_picks_the_lowest_loss():
  runs = _rated([(2.5e8, 8.0, 0.0, math.nan, 2.5), (2.5e8, 8.0, 0.1, math.nan, 2.3), (2.5e8, 8.0, 0.3, math.nan, 2.4)])
  m = planner.measured_dropout(runs, 2.5e8)
  assert (m["metric"], m["best_rate"]) == ("best_eval_loss", 0.1)
  assert m["by_rate"] == {0.0: pytest.approx(2.5), 0.1: pytest.approx(2.3), 0.3: pytest.approx(2.4)}


def test_the_documented_example_is_what_the_planner_prints():
  # docs/analysis.md shows `repeat-lm plan --unique-tokens=1.3e8 --compute=1.5e20`: every line, including the share
  # of the compute that suffices and how much worse the Chinchilla choice is, must be what the code prints.
  doc = (Path(__file__).parents[2] / "docs" / "analysis.md").read_text()
  shown = doc.split("$ repeat-lm plan --unique-tokens=1.3e8 --compute=1.5e20\n", 1)[1].split("\n```", 1)[0]
  assert planner.summary(planner.plan(1.3e8, 1.5e20)) == shown


def test_dropout_advice_calls_t5_large_scale_large_from_7e8_parameters():
  # docs/analysis.md: "more so from T5-Large scale (N >= 7e8)".
  assert "Large" in planner.dropout_advice(7e8, 8.0)["reason"]
  assert "Large" not in planner.dropout_advice(6.9e8, 8.0)["reason"]


def test_the_sufficient_compute_does_not_depend_on_how_much_compute_was_planned():
  # 1e8 unique tokens saturate the loss long before 1e24 FLOPs: the smallest compute within 0.1% of the plan's loss
  # is ~6.8e18 whatever C. The search started 12 decades below C and took that floor as the answer when it already
  # sufficed: 1e24 at C = 1e36, 1e28 at C = 1e40.
  enough = {c: planner.plan(1e8, c)["sufficient"]["compute"] for c in (1e24, 1e36, 1e40)}
  assert enough[1e24] == pytest.approx(6.77e18, rel=0.01)
  assert enough[1e36] == pytest.approx(enough[1e24], rel=1e-6) and enough[1e40] == pytest.approx(enough[1e24], rel=1e-6)


def test_the_documented_columns_of_the_planner_are_the_ones_it_reads():
  """docs/analysis.md said the planner used the table's tokens_seen and unique_tokens, and epochs only as a factor of
  the plots: it reads params, epochs, best_eval_* and the dropout column (measured_dropout), and nothing else."""
  doc = (Path(__file__).parents[2] / "docs" / "analysis.md").read_text()
  table = doc.split("| column | used by |\n", 1)[1].split("\n\n", 1)[0]
  documented = {col for cols, used in re.findall(r"^\| (.+?) \| (.+) \|$", table, re.M) if "planner" in used
                for col in re.findall(r"`(\w+)`", cols)}
  # DROPOUT_RATE and model: the examples of the row of gin columns, one of which is the dropout column.
  assert documented == {"params", "epochs", "best_eval_accuracy", "best_eval_loss", "DROPOUT_RATE", "model"}
  # What a run's other columns hold does not change the measured rate.
  runs = _rated([(2.5e8, 8.0, 0.0, 0.60, math.nan), (2.5e8, 8.0, 0.1, 0.63, math.nan)])
  for r in runs:
    r.tokens_seen, r.unique_tokens, r.final_eval_accuracy, r.final_eval_loss = 1e9, 1e6, 0.9, 1.0
  assert planner.measured_dropout(runs, 2.5e8) == planner.measured_dropout(_rated(
      [(2.5e8, 8.0, 0.0, 0.60, math.nan), (2.5e8, 8.0, 0.1, 0.63, math.nan)]), 2.5e8)


def test_a_table_with_nothing_to_measure_is_said_not_silently_ignored():
  """`plan --results=TABLE` with no dropout column (RQ1's table): measured was null and the plan said nothing of the
  table it was asked to cite."""
  no_column = [results.Run(run="a", status="finished", model_dir=None, params=2.5e8, epochs=8.0,
                           best_eval_accuracy=0.6)]
  p = planner.plan(1.3e8, 1.5e20, runs=no_column)
  assert p["dropout"]["measured"] is None
  assert "no column whose name contains `dropout`" in p["dropout"]["unmeasured"]
  assert ("Measured: nothing from the results table: the table has no column whose name contains `dropout` with a "
          "number (a rate) in any run." in planner.summary(p))
  no_metric = _rated([(2.5e8, 8.0, rate, math.nan, math.nan) for rate in (0.0, 0.1)])
  assert "has a finite best_eval_accuracy or best_eval_loss" in planner.plan(1.3e8, 1.5e20, runs=no_metric)[
      "dropout"]["unmeasured"]
  assert "unmeasured" not in planner.plan(1.3e8, 1.5e20)["dropout"]  # no table, nothing to say
