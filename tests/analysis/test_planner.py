"""The token-crisis planner: optimal under the law, monotone where it must be, warnings at the documented
thresholds, dropout advice citing the measured table."""

import math

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


def test_dropout_advice_by_size_and_measured():
  assert planner.dropout_advice(2.5e8, 1.0)["advised"] is False
  small, large = planner.dropout_advice(2.5e8, 8.0), planner.dropout_advice(2.8e9, 8.0)
  assert small["advised"] and large["advised"] and "Large" in large["reason"]
  runs = [results.Run(run=f"r{i}", status="done", model_dir=None, params=n, epochs=8.0, best_eval_accuracy=acc,
                      extra={"DROPOUT_RATE": str(rate)})
          for i, (n, rate, acc) in enumerate([(2.5e8, 0.0, 0.60), (2.5e8, 0.1, 0.63), (2.5e8, 0.3, 0.62),
                                              (2.8e9, 0.0, 0.55), (2.8e9, 0.3, 0.66)])]
  m = planner.dropout_advice(3e8, 8.0, runs)["measured"]
  assert (m["column"], m["best_rate"], m["runs"], m["params_range"]) == ("DROPOUT_RATE", 0.1, 3, [2.5e8, 2.5e8])
  assert planner.measured_dropout(runs, 2e9)["best_rate"] == 0.3


def test_rejects_chinchilla_constants():
  with pytest.raises(ValueError, match="data-constrained"):
    planner.plan(1e9, 1e21, laws.CHINCHILLA)


def test_measured_dropout_skips_a_nan_rate():
  # A `nan` cell is a float but no rate: it must not come out as the best rate.
  runs = [results.Run(run=f"r{i}", status="done", model_dir=None, params=2.5e8, epochs=8.0, best_eval_accuracy=acc,
                      extra={"DROPOUT_RATE": rate}) for i, (rate, acc) in enumerate([("0.0", 0.60), ("0.1", 0.63),
                                                                                        ("nan", 0.64)])]
  m = planner.measured_dropout(runs, 2.5e8)
  assert (m["best_rate"], m["runs"], list(m["by_rate"])) == (0.1, 2, [0.0, 0.1])
