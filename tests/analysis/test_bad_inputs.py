"""Degenerate inputs get clear messages, not confident wrong answers."""

import math

import numpy as np
import pytest

from repeat_lm.analysis import degradation, laws, planner, results, scaling


def _chinchilla_runs(n, d):
  return np.asarray(n, float), np.asarray(d, float), laws.predict(laws.CHINCHILLA, np.asarray(n), np.asarray(d))


@pytest.mark.parametrize("case, match", [
    ("same_n", "same params N"), ("same_ratio", "linear function of log N"), ("duplicates", "2 distinct of 6"),
    ("two_sizes", "^2 model sizes cannot fix alpha: .*; add runs at a third model size.$"),
    ("two_token_counts", "^2 token counts cannot fix beta: .*; add runs at a third token count.$"),
    ("ratio_rounded_to_steps", r"within 0.1%\) a linear function of log N")])
def test_unidentifiable_chinchilla_fits_are_refused(case, match):
  """two_sizes: E + A / N^alpha at 2 sizes is 2 numbers for 3 unknowns, so every alpha fits (T5-Base and -Large, the
  likeliest design): the fit returned alpha 0.29 (0.34) with nothing flagged, and chinchilla-check "excluded 1" from
  a b / a interval of 3.98-4.79. ratio_rounded_to_steps: 20 tokens per parameter rounded up to whole 128 x 512-token
  steps (20.0000-20.0033) passed an absolute rank test, and the fit put alpha on its bound."""
  if case == "same_n":
    n, d = np.full(8, 1e8), np.geomspace(1e9, 1e11, 8)
  elif case == "same_ratio":
    n = np.geomspace(1e7, 1e10, 8)
    d = 20 * n
  elif case == "two_sizes":
    n, d = (x.ravel() for x in np.meshgrid([2.5e8, 7.8e8], [1e9, 3e9, 1e10, 3e10, 1e11]))
  elif case == "two_token_counts":
    n, d = (x.ravel() for x in np.meshgrid([1e7, 3e7, 1e8, 3e8, 1e9], [1e9, 1e11]))
  elif case == "ratio_rounded_to_steps":
    n = np.geomspace(1e7, 1e9, 8)
    d = np.ceil(20 * n / (128 * 512)) * (128 * 512)
  else:
    n, d = np.array([1e8, 1e9] * 3), np.full(6, 1e10)
  n, d, loss = _chinchilla_runs(n, d)
  with pytest.raises(ValueError, match=match):
    laws.fit("chinchilla", n, d, loss)


def test_data_constrained_fit_needs_a_repeated_run():
  n, d = (x.ravel() for x in np.meshgrid([1e7, 3e7, 1e8, 3e8], [1e9, 3e9, 1e10]))
  loss = laws.predict(laws.DATA_CONSTRAINED, n, d, d)
  with pytest.raises(ValueError, match="No run repeats data"):
    laws.fit("data-constrained", n, d, loss, d)


def test_fit_refuses_nan_losses():
  n, d = (x.ravel() for x in np.meshgrid([1e7, 1e8, 1e9], [1e9, 1e10, 1e11]))
  n, d, loss = _chinchilla_runs(n, d)
  loss[0] = math.nan
  with pytest.raises(ValueError, match="positive, finite"):
    laws.fit("chinchilla", n, d, loss)


def test_fit_refuses_runs_that_all_have_one_loss():
  # E = 3 fits them exactly with any A, B, alpha, beta that make their terms negligible: the optimiser stopped at
  # alpha 1.2, beta 0.78 and chinchilla-check called b / a = 0.65 (interval of width 1e-15) "excludes 1".
  n, d = (x.ravel() for x in np.meshgrid([1e7, 1e8, 1e9], [1e9, 1e10, 1e11]))
  with pytest.raises(ValueError, match=r"Every run has the same final loss \(3\)"):
    laws.fit("chinchilla", n, d, np.full(n.size, 3.0))


def test_fit_plot_draws_one_curve_per_params_without_unique_tokens(tmp_path, monkeypatch):
  runs = [results.Run(run=f"r{i}", status="done", model_dir=None, params=n, tokens_seen=d,
                      final_eval_loss=float(laws.predict(laws.CHINCHILLA, n, d)))
          for i, (n, d) in enumerate((n, d) for n in (1e7, 1e8, 1e9) for d in (1e9, 1e10, 1e11))]
  saved = {}
  real = scaling.plots.save
  monkeypatch.setattr(scaling.plots, "save", lambda path, series, **kw: (saved.update({path.name: series}),
                                                                           real(path, series, **kw))[1])
  scaling.fit_report(runs, "chinchilla", tmp_path, bootstrap=0)
  labels = [s.label for s in saved["fit_loss_vs_tokens.png"] if s.label]
  assert labels == ["N=1e+07", "N=1e+08", "N=1e+09"]


@pytest.mark.parametrize("tolerance", [-0.01, math.nan])
def test_bad_tolerance_is_named(tolerance):
  with pytest.raises(ValueError, match="--tolerance"):
    degradation.detect([3.0, 2.0, 2.5, 2.6], higher_is_better=False, tolerance=tolerance)


def test_constants_need_both_r_stars_and_positive_values():
  base = {"E": 1.87, "A": 520.0, "B": 1487.0, "alpha": 0.35, "beta": 0.35}
  with pytest.raises(ValueError, match="both R_D_star and R_N_star"):
    laws.Constants.from_dict({**base, "R_D_star": 15.4})
  with pytest.raises(ValueError, match="R_D_star=0"):
    laws.Constants.from_dict({**base, "R_D_star": 0, "R_N_star": 5.3})
  # A list ended in a TypeError traceback; a string in "could not convert string to float" naming no constant; true
  # was read as 1.0 and "1.69" as a number, though a constant is a JSON number.
  for bad in ([1], "x", True, "520.0"):
    with pytest.raises(ValueError, match=r"Constant A=.* is not a number"):
      laws.Constants.from_dict({**base, "A": bad})


def test_a_data_constrained_fit_without_any_unique_tokens_names_the_column():
  """A table without unique_tokens was told "no run repeats data" of runs seen for up to 12.5 epochs: their
  repetition was unknown, not absent."""
  n = np.array([1e7, 1e7, 3e7, 3e7, 1e8, 1e8, 3e8, 3e8])
  d = np.array([1e8, 3e8, 1e8, 3e8, 1e9, 3e9, 1e9, 3e9])
  loss = laws.predict(laws.CHINCHILLA, n, d)
  with pytest.raises(ValueError, match="unique_tokens column is missing"):
    laws.fit("data-constrained", n, d, loss, np.full(n.shape, np.nan))
  with pytest.raises(ValueError, match="No run repeats data"):  # known, and never repeated: that message holds
    laws.fit("data-constrained", n, d, loss, d * 2)


def test_plan_refuses_infinite_compute():
  with pytest.raises(ValueError, match="--compute positive and finite"):
    planner.plan(1e9, math.inf)


def test_predict_chinchilla_says_unique_tokens_are_ignored():
  assert "ignored" in scaling.prediction(laws.CHINCHILLA, 1e8, 1e10, 1e8)["note"]
  assert "note" not in scaling.prediction(laws.DATA_CONSTRAINED, 1e8, 1e10, 1e8)


def test_measured_dropout_skips_a_text_dropout_column():
  def run(name, schedule, rate, acc):
    return results.Run(run=name, status="done", model_dir=None, params=2.5e8, epochs=256.0, best_eval_accuracy=acc,
                       extra={"DROPOUT_SCHEDULE": schedule, "DROPOUT_RATE": str(rate)})
  runs = [run("a", "", 0.0, 0.617), run("b", "", 0.1, 0.630), run("c", "staged:4ep", 0.1, 0.628)]
  m = planner.measured_dropout(runs, 2.5e8)
  assert m is not None and m["column"] == "DROPOUT_RATE" and m["best_rate"] == 0.1


def test_duplicate_run_names_are_refused(tmp_path):
  table = tmp_path / "results.csv"
  table.write_text("run,status,final_eval_loss\nbase,finished,3.0\nlarge,finished,2.9\nbase,finished,3.1\n")
  with pytest.raises(ValueError, match="run 'base' appears on lines 2 and 4"):
    results.read_results(table)


def test_one_run_listed_twice_under_two_names_is_refused(tmp_path):
  # A table concatenated with itself under prefixed names (what the duplicate-name error suggests for two tables):
  # the run counted twice in every mean and fit.
  table = tmp_path / "results.csv"
  table.write_text("run,status,model_dir,final_eval_loss\na_base,finished,runs/base,3.0\nlarge,finished,runs/large,"
                   f"2.9\nb_base,finished,{tmp_path}/runs/./base,3.0\nnone1,finished,,1\nnone2,finished,,1\n")
  with pytest.raises(ValueError, match=r"runs 'a_base' \(line 2\) and 'b_base' \(line 4\) have the same model_dir "
                                       r".*one run listed twice"):
    results.read_results(table)


def test_a_chinchilla_fit_given_for_the_data_constrained_law_names_the_file_and_the_fix(tmp_path):
  # `plan --law-constants=` a Chinchilla fit's JSON said only "needs R_D_star and R_N_star in the constants".
  fit = tmp_path / "fit.json"
  fit.write_text('{"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28, "law": "chinchilla"}')
  with pytest.raises(ValueError, match=rf"--law-constants={fit}: the data-constrained law needs R_D_star and R_N_star"
                                       r".*analyze fit --law=data-constrained --json"):
    laws.constants_for("data-constrained", fit)
