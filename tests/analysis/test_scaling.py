"""Which (N, D, loss) points a fit uses: D is the tokens seen when the loss was measured."""

import math

import numpy as np
import pytest

from repeat_lm.analysis import laws, results, scaling


def test_a_fit_pairs_the_final_loss_with_the_tokens_at_that_evaluation():
  stopped = results.Run(run="stopped", status="failed", model_dir=None, params=1e7, tokens_seen=9.8e7,
                        final_eval_tokens=6.5e7, final_eval_loss=2.9, unique_tokens=1e7)
  older = results.Run(run="older", status="finished", model_dir=None, params=1e7, tokens_seen=5e7,
                      final_eval_loss=3.1, unique_tokens=1e7)  # a table from before final_eval_tokens
  unusable = results.Run(run="nan", status="running", model_dir=None, params=1e7, tokens_seen=1e7)
  used, arrays = scaling.fit_data([stopped, older, unusable])
  assert [r.run for r in used] == ["stopped", "older"]
  np.testing.assert_array_equal(arrays["d"], [6.5e7, 5e7])
  np.testing.assert_array_equal(arrays["loss"], [2.9, 3.1])
  # The epoch cut reads the same D: 6.5 epochs at its evaluation, 9.8 at its last train record.
  assert [r.run for r in scaling.fit_data([stopped], max_epochs=7)[0]] == ["stopped"]
  # ... and leaves out a run past the cut (6.5 epochs > 6), keeping one within it (5): without this, a cut that
  # dropped nothing passed.
  assert [r.run for r in scaling.fit_data([stopped, older], max_epochs=6)[0]] == ["older"]
  assert math.isnan(results.Run(run="x", status="", model_dir=None).final_eval_tokens)


@pytest.mark.parametrize("cut", [math.nan, -1.0, 0.0])
def test_an_epoch_cut_that_is_no_number_of_epochs_is_refused(cut):
  # It kept only the runs without a unique-token count (the cut cannot apply to them) and the fit went on.
  run = results.Run(run="r", status="finished", model_dir=None, params=1e7, tokens_seen=5e7, final_eval_loss=3.1,
                    unique_tokens=1e7)
  with pytest.raises(ValueError, match="--max_epochs"):
    scaling.fit_data([run], max_epochs=cut)


def test_auto_law_looks_only_at_the_runs_the_fit_uses(tmp_path):
  # Nine fresh runs, and a repeated one that diverged (no final loss): the fit has no repeated point, so `auto` is
  # the chinchilla law, not a data-constrained fit that cannot determine R_D*.
  runs = [results.Run(run=f"n{n:g}_d{d:g}", status="done", model_dir=None, params=n, tokens_seen=d, unique_tokens=1e10,
                      final_eval_loss=float(laws.predict(laws.CHINCHILLA, n, d)))
          for n in (1e7, 3e7, 1e8) for d in (1e8, 1e9, 1e10)]
  runs.append(results.Run(run="repeated", status="failed", model_dir=None, params=1e7, tokens_seen=1e9,
                          unique_tokens=1e7))
  assert scaling.chinchilla_check(runs, tmp_path, bootstrap=0)["law"] == "chinchilla"


def test_predict_counts_epochs_against_the_unique_tokens_given():
  # 1e9 tokens of 1e10 unique ones: a tenth of an epoch, every token fresh (the law takes U_D = min(U, D) = D).
  out = scaling.prediction(laws.DATA_CONSTRAINED, 5e7, 1e9, 1e10)
  assert (out["unique_tokens"], out["epochs"]) == (1e10, pytest.approx(0.1))
  assert out["loss"] == pytest.approx(float(laws.predict(laws.DATA_CONSTRAINED, 5e7, 1e9)))
  assert out["effective_tokens"] == pytest.approx(1e9)
  # Repeated data is as before.
  out = scaling.prediction(laws.DATA_CONSTRAINED, 5e7, 1e10, 1e9)
  assert (out["unique_tokens"], out["epochs"]) == (1e9, pytest.approx(10.0))


def test_chinchilla_check_gives_no_verdict_from_an_exponent_on_its_bound(tmp_path):
  # Larger models end worse (the paper's repeated-data finding): the law cannot fit a loss that rises with N, and
  # the fit parks alpha on its bound 5, where b / a = alpha / beta = 5 / 0.28 = 17.9 "excluded 1" with confidence.
  runs = [results.Run(run=f"n{n:g}_d{d:g}", status="done", model_dir=None, params=n, tokens_seen=d,
                      final_eval_loss=float(laws.chinchilla_loss(laws.CHINCHILLA, 1e8, d)) * (1 + 0.01 * math.log10(n)))
          for n in (1e7, 1e8, 1e9) for d in (1e9, 1e10, 1e11)]
  out = scaling.chinchilla_check(runs, tmp_path, law="chinchilla", bootstrap=2)
  assert out["linear"] is None
  assert out["constants"]["alpha"] == pytest.approx(5.0) and out["at_bounds"] == ["alpha"]
  assert "alpha ran to the edge of the fit's search range" in (tmp_path / "report.md").read_text()


def test_a_fit_names_the_runs_it_leaves_out_and_why(tmp_path):
  # "Fitted ... to 8 runs (of 10)" named neither the run left out nor why.
  runs = [results.Run(run=f"n{n:g}_d{d:g}", status="done", model_dir=None, params=n, tokens_seen=d,
                      final_eval_loss=float(laws.predict(laws.CHINCHILLA, n, d)))
          for n in (1e7, 3e7, 1e8) for d in (1e8, 1e9, 1e10)]
  runs += [results.Run(run="unfinished", status="running", model_dir=None, params=1e7, tokens_seen=5e8),
           results.Run(run="no_params", status="done", model_dir=None, tokens_seen=5e8, final_eval_loss=3.0)]
  assert scaling.left_out(runs) == {"unfinished": "no final_eval_loss", "no_params": "no params"}
  out = scaling.fit_report(runs, "chinchilla", tmp_path, bootstrap=0)
  assert out["runs"] == 9 and out["left_out"] == {"unfinished": "no final_eval_loss", "no_params": "no params"}
  assert "Left out 2 runs: `unfinished` (no final_eval_loss); `no_params` (no params)." in \
      (tmp_path / "report.md").read_text()
  repeated = results.Run(run="repeated", status="done", model_dir=None, params=1e7, tokens_seen=1e9,
                         unique_tokens=1e8, final_eval_loss=3.0)
  assert scaling.left_out([repeated], max_epochs=4) == {"repeated": "10 epochs > --max_epochs=4"}


def test_a_chinchilla_fit_says_which_runs_repeat_their_data(tmp_path):
  # Runs repeated up to 256 times were fitted as if every token were fresh, without a word.
  runs = [results.Run(run=f"n{n:g}_d{d:g}", status="done", model_dir=None, params=n, tokens_seen=d, unique_tokens=u,
                      final_eval_loss=float(laws.predict(laws.CHINCHILLA, n, d)))
          for n in (1e7, 3e7, 1e8) for d, u in ((1e8, 1e8), (1e9, 2.5e8), (1e10, 1e8))]
  out = scaling.fit_report(runs, "chinchilla", tmp_path, bootstrap=0)
  assert out["repeated"] == {f"n{n:g}_d{d:g}": pytest.approx(e) for n in (1e7, 3e7, 1e8)
                             for d, e in ((1e9, 4.0), (1e10, 100.0))}
  assert "**6 of the fitted runs repeat their data** (up to 100 epochs)" in (tmp_path / "report.md").read_text()
  assert scaling.repeated(scaling.fit_data(runs, max_epochs=1)[0]) == {}
  assert scaling.repeated_note("data-constrained", out["repeated"]) == ""
  # chinchilla-check names them too, without fit's --max_epochs, which it does not have.
  check = scaling.chinchilla_check(runs, tmp_path / "check", law="chinchilla", bootstrap=0)
  assert check["repeated"] == out["repeated"]
  text = (tmp_path / "check" / "report.md").read_text()
  assert "**6 of the fitted runs repeat their data**" in text and "--max_epochs" not in text


def test_a_fit_left_without_runs_says_why_they_were_left_out(tmp_path):
  # A table without a final_eval_loss column: "got 0 distinct of 0" of 9 runs, and no word of why.
  runs = [results.Run(run=f"n{n:g}_d{d:g}", status="done", model_dir=None, params=n, tokens_seen=d)
          for n in (1e7, 3e7, 1e8) for d in (1e8, 1e9, 1e10)]
  with pytest.raises(ValueError, match=r"got 0 distinct of 0\. Left out 9 of 9 runs: 9 with no final_eval_loss\.$"):
    scaling.fit_report(runs, "chinchilla", tmp_path, bootstrap=0)

def test_chinchilla_check_gives_no_verdict_from_exponents_of_a_negligible_term(tmp_path):
  # Loss grows with model size: the fit drives A / N^alpha to ~1e-12 of the loss, where A and alpha never move from
  # their start (1, 2.0), off every bound; they were reported as fitted with zero-width intervals and b / a =
  # alpha / beta "excluded 1".
  runs = [results.Run(run=f"r{n:g}_{t}", status="finished", model_dir=None, params=n, tokens_seen=n * t,
                      final_eval_loss=n ** 0.1) for n in (1e6, 3e6, 1e7, 3e7, 1e8, 3e8) for t in (5, 10, 20, 40, 80)]
  out = scaling.chinchilla_check(runs, tmp_path / "check", law="chinchilla", bootstrap=3)
  assert out["at_bounds"] == [] and {"A", "alpha"} <= set(out["undetermined"])
  assert out["linear"] is None
  text = (tmp_path / "check" / "report.md").read_text()
  assert "none: the runs do not determine alpha or beta" in text and "not determined by the runs" in text
  fit = scaling.fit_report(runs, "chinchilla", tmp_path / "fit", bootstrap=0)
  assert {"A", "alpha"} <= set(fit["undetermined"])


def _runs(n, d, loss, u=None) -> list[results.Run]:
  u = np.full(np.shape(n), math.nan) if u is None else u
  return [results.Run(run=f"n{a:g}_d{b:g}_u{c:g}", status="done", model_dir=None, params=a, tokens_seen=b,
                      unique_tokens=c, final_eval_loss=x) for a, b, c, x in zip(n, d, u, loss)]


def test_a_left_out_run_names_the_tokens_column_it_was_left_out_for():
  # D is final_eval_tokens where the table has it: "tokens_seen=0" named a column of 5e8.
  run = results.Run(run="r", status="done", model_dir=None, params=1e7, tokens_seen=5e8, final_eval_tokens=0.0,
                    final_eval_loss=10.4)
  assert scaling.left_out([run]) == {"r": "final_eval_tokens=0"}
  older = results.Run(run="older", status="done", model_dir=None, params=1e7, tokens_seen=0.0, final_eval_loss=3.0)
  assert scaling.left_out([older]) == {"older": "tokens_seen=0"}


def test_a_prediction_past_the_fitted_repetition_says_it_extrapolates():
  """The note checked params and tokens only: 1000 epochs from a fit to runs of at most 64 read as a plain loss,
  though repetition is the least certain part of the law to extrapolate."""
  record = {"fitted_range": {"params": [1e7, 1e9], "tokens": [1e9, 1e11], "unique_tokens": [1e9, 1e10],
                             "epochs": [1.0, 64.0]}}
  out = scaling.prediction(laws.DATA_CONSTRAINED, 1e8, 1e10, 1e7, record)
  assert out["epochs"] == pytest.approx(1000)
  assert out["note"] == ("--unique-tokens=1e+07 lies outside the fitted runs' 1e+09-1e+10: an extrapolation; "
                         "epochs=1000 lies outside the fitted runs' 1-64: an extrapolation")
  # Fewer than one epoch is fresh data to the law, as the fitted runs' single epochs are.
  assert "note" not in scaling.prediction(laws.DATA_CONSTRAINED, 1e8, 1e9, 5e9, record)
  # The chinchilla law ignores unique tokens: no note on them (only that they are ignored).
  chinchilla = scaling.prediction(laws.CHINCHILLA, 1e8, 1e10, 1e7, record)
  assert "outside" not in chinchilla["note"] and "--unique-tokens ignored" in chinchilla["note"]


def test_chinchilla_check_gives_no_verdict_where_the_jacobian_finds_an_exponent_undetermined(tmp_path):
  # Two sizes and every N <= D_to_N(U): the data-constrained law's N term is Chinchilla's, which two sizes cannot fix.
  n, u, epochs = (x.ravel() for x in np.meshgrid([1e7, 1e8], [1e10, 1e11], [1, 4, 16, 64], indexing="ij"))
  runs = _runs(n, u * epochs, laws.predict(laws.DATA_CONSTRAINED, n, u * epochs, u), u)
  out = scaling.chinchilla_check(runs, tmp_path, bootstrap=0)
  assert out["law"] == "data-constrained" and out["linear"] is None
  assert {"E", "A", "alpha"} <= set(out["undetermined"]) and out["at_bounds"] == []
  assert out["verdict"] == "none: the runs do not determine alpha or beta (below)"
  assert "**E, A, alpha, R_N_star are not determined by the runs**: changed together" in \
      (tmp_path / "report.md").read_text()


def test_chinchilla_check_gives_no_verdict_when_bootstrap_refits_often_leave_an_exponent_undetermined(tmp_path):
  """3 x 3 runs spanning a factor of 4 in N and in D, 1% noise: the fit flags nothing, but a refit of 5 leaves E, A,
  B and beta on a bound or undetermined, and the interval of b / a (0.1-10 of 8 refits) read as "consistent with
  1"."""
  n, d = (x.ravel() for x in np.meshgrid([1e8, 2e8, 4e8], [1e10, 2e10, 4e10], indexing="ij"))
  loss = laws.chinchilla_loss(laws.CHINCHILLA, n, d) * np.exp(np.random.default_rng(0).normal(0, 0.01, n.size))
  out = scaling.chinchilla_check(_runs(n, d, loss), tmp_path, law="chinchilla", bootstrap=5)
  assert out["at_bounds"] == [] and out["undetermined"] == [] and "beta" in out["ci_untrusted"]
  assert out["linear"] is None and out["verdict"].startswith("none: the bootstrap refits often left alpha or beta")
  assert "not trustworthy**: over 5% of the 5 refits left" in (tmp_path / "report.md").read_text()


def test_a_report_says_how_many_resamples_were_redrawn_and_given_up():
  # 6 runs for 5 constants: a resample passes check_identifiable only if it draws every run (1.5%), so most refits
  # are given up after their 10 draws.
  n, d = np.array([1e7, 1e7, 1e8, 1e8, 1e9, 1e9]), np.array([1e9, 1e10, 1e10, 1e11, 1e9, 1e11])
  fit = laws.fit("chinchilla", n, d, laws.chinchilla_loss(laws.CHINCHILLA, n, d), bootstrap=2, n_starts=1)
  assert len(fit.samples) + fit.given_up == 2 and fit.given_up >= 1 and fit.redrawn == 10 * 2 - len(fit.samples)
  assert scaling.bootstrap_note(fit) == (
      f"\n\n{fit.redrawn} bootstrap resamples could not determine the law (too few distinct runs, 2 model sizes, ...) "
      f"and were drawn again; {fit.given_up} of 2 refits were given up after 10 draws per refit, so the intervals "
      f"rest on {len(fit.samples)}. The intervals describe only resamples that determine the law: where many were "
      "drawn again, they can be narrower than the runs warrant.")
