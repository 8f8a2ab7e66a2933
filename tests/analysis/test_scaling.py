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
  # Six fresh runs, and a repeated one that diverged (no final loss): the fit has no repeated point, so `auto` is
  # the chinchilla law, not a data-constrained fit that cannot determine R_D*.
  runs = [results.Run(run=f"n{n:g}_d{d:g}", status="done", model_dir=None, params=n, tokens_seen=d, unique_tokens=1e10,
                      final_eval_loss=float(laws.predict(laws.CHINCHILLA, n, d)))
          for n in (1e7, 3e7, 1e8) for d in (1e8, 1e9)]
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
