"""Scaling laws: the published constants give the published behaviour (checked against the formulas written out
here), and the fitters recover known constants from noisy synthetic runs within their bootstrap intervals."""

import json
import math

import numpy as np
import pytest

from repeat_lm.analysis import laws

DC = laws.DATA_CONSTRAINED
R_D, R_N = 15.387756, 5.309743


def test_published_constants():
  assert DC.A == pytest.approx(520.82, abs=0.01)
  assert DC.B == pytest.approx(1487.72, abs=0.01)
  assert DC.E == pytest.approx(1.8691, abs=1e-4)
  assert (DC.alpha, DC.beta, DC.R_D_star, DC.R_N_star) == (0.3526596, 0.3526596, R_D, R_N)
  c = laws.CHINCHILLA
  # Chinchilla 70B on 1.4T tokens, written out.
  assert laws.predict(c, 70e9, 1.4e12) == pytest.approx(1.69 + 406.4 / 70e9 ** 0.34 + 410.7 / 1.4e12 ** 0.28)


def _u_n(u):
  """D_to_N(U) = (U G)^(beta/alpha) G, G = (alpha A / (beta B))^(1/(alpha+beta)), from the reference."""
  g = (DC.alpha * DC.A / (DC.beta * DC.B)) ** (1 / (DC.alpha + DC.beta))
  return (u * g) ** (DC.beta / DC.alpha) * g


def test_single_epoch_reduces_to_chinchilla_form():
  u = d = 1e10
  for n in (1e6, 1e7, 0.99 * _u_n(u)):
    assert n <= _u_n(u)
    want = DC.E + DC.A / n ** DC.alpha + DC.B / d ** DC.beta
    assert laws.predict(DC, n, d, u) == pytest.approx(want, rel=1e-12)
    assert laws.predict(DC, n, d) == pytest.approx(want, rel=1e-12)  # U omitted: every token unique


def test_effective_data_saturates():
  u = 1e9
  assert laws.effective_data(DC, 1e6 * u, u) == pytest.approx(u * (1 + R_D), rel=1e-9)
  # Beyond saturation, more epochs change nothing.
  assert laws.predict(DC, 1e8, 1e6 * u, u) == pytest.approx(laws.predict(DC, 1e8, 1e7 * u, u), rel=1e-9)


def test_four_epochs_nearly_as_good_as_unique():
  u = 1e9
  d_prime = u + u * R_D * (1 - math.exp(-3 / R_D))  # 4 epochs: R_D = 3
  assert laws.effective_data(DC, 4 * u, u) == pytest.approx(d_prime, rel=1e-12)
  assert d_prime / (4 * u) > 0.85
  # The loss cost of 4 epochs instead of 4x unique data is small next to the gain of 4 epochs over 1.
  n = _u_n(u)
  repeated, unique, one = (laws.predict(DC, n, 4 * u, u), laws.predict(DC, n, 4 * u, 4 * u),
                           laws.predict(DC, n, u, u))
  assert repeated - unique < 0.1 * (one - unique)


def test_fortieth_epoch_worth_nearly_nothing():
  u = 1e9
  marginal = (laws.effective_data(DC, 41 * u, u) - laws.effective_data(DC, 40 * u, u)) / u
  assert marginal == pytest.approx(R_D * (math.exp(-39 / R_D) - math.exp(-40 / R_D)), rel=1e-9)
  assert marginal < 0.1


def test_excess_parameters_decay():
  u = 1e9
  u_n = _u_n(u)
  n = 10 * u_n
  want = u_n + u_n * R_N * (1 - math.exp(-9 / R_N))
  assert laws.effective_params(DC, n, u) == pytest.approx(want, rel=1e-9)
  assert laws.effective_params(DC, 1e4 * u_n, u) == pytest.approx(u_n * (1 + R_N), rel=1e-6)


def test_compute_optimal_is_the_minimum():
  c, compute = laws.CHINCHILLA, 1e22
  n_opt, d_opt = laws.compute_optimal(c, compute)
  assert 6 * n_opt * d_opt == pytest.approx(compute)
  ns = np.geomspace(n_opt / 10, n_opt * 10, 20001)
  brute = ns[np.argmin(laws.chinchilla_loss(c, ns, compute / (6 * ns)))]
  assert brute == pytest.approx(n_opt, rel=1e-3)
  a, b = laws.optimal_exponents(c)
  assert (a, b) == pytest.approx((0.28 / 0.62, 0.34 / 0.62))
  # D_to_N is the same split seen from the data side.
  assert laws.d_to_n(c, d_opt) == pytest.approx(n_opt, rel=1e-9)


def _ci_contains(fit, truth: laws.Constants):
  ci = fit.ci()
  return {k: ci[k] for k, v in truth.to_dict().items() if not ci[k][0] <= v <= ci[k][1]}


def test_fit_chinchilla_recovers_constants():
  truth = laws.CHINCHILLA
  rng = np.random.default_rng(1)
  n = np.repeat(np.geomspace(1e7, 1e10, 6), 6)
  d = np.tile(np.geomspace(1e9, 1e12, 6), 6)
  loss = laws.chinchilla_loss(truth, n, d) * np.exp(rng.normal(0, 0.005, n.size))
  fit = laws.fit("chinchilla", n, d, loss, bootstrap=20, seed=1, n_starts=4)
  assert _ci_contains(fit, truth) == {}
  assert fit.constants.alpha == pytest.approx(truth.alpha, abs=0.03)
  assert fit.constants.beta == pytest.approx(truth.beta, abs=0.03)
  assert fit.constants.E == pytest.approx(truth.E, abs=0.1)


def test_fit_is_huber_robust_to_outlying_runs():
  """Hoffmann et al.'s Huber loss with delta 1e-3 (reference section 5) is nearly an L1 fit of log residuals: two
  runs 30% off (a diverged or mislabelled run) leave the fit where it was. Least squares would move alpha, beta and
  E by 0.02-0.03."""
  rng = np.random.default_rng(1)
  n = np.repeat(np.geomspace(1e7, 1e10, 6), 6)
  d = np.tile(np.geomspace(1e9, 1e12, 6), 6)
  loss = laws.chinchilla_loss(laws.CHINCHILLA, n, d) * np.exp(rng.normal(0, 0.005, n.size))
  outlying = loss.copy()
  outlying[[0, 7]] *= 1.3
  clean, dirty = (laws.fit("chinchilla", n, d, x, n_starts=4).constants for x in (loss, outlying))
  for name in ("E", "alpha", "beta"):
    assert getattr(dirty, name) == pytest.approx(getattr(clean, name), abs=2e-3), name


def test_fit_data_constrained_recovers_constants():
  rng = np.random.default_rng(0)
  n, u, epochs = np.meshgrid([3e7, 1e8, 3e8, 1e9], [1e9, 1e10, 1e11], [1, 2, 4, 8, 16, 32, 64], indexing="ij")
  n, u = n.ravel(), u.ravel()
  d = u * epochs.ravel()
  loss = laws.predict(DC, n, d, u) * np.exp(rng.normal(0, 0.005, n.size))
  fit = laws.fit("data-constrained", n, d, loss, u, bootstrap=20, seed=0, n_starts=4)
  assert _ci_contains(fit, DC) == {}
  assert fit.constants.R_D_star == pytest.approx(R_D, rel=0.25)


def test_fit_flags_a_constant_the_runs_do_not_determine():
  """Every run has N <= U_N = D_to_N(U) (20+ unique tokens per parameter), so no run has excess parameters for R_N*
  to discount: the optimum leaves R_N* on its bound e^10 (the law's value is 5.31), and every bootstrap refit with
  it. The fit says so instead of reporting 22026 as an estimate."""
  rng = np.random.default_rng(0)
  n, u, epochs = np.meshgrid([1e7, 3e7, 1e8], [2e9, 1e10, 5e10], [1, 2, 4, 8, 16, 32], indexing="ij")
  n, u = n.ravel(), u.ravel()
  assert (n / _u_n(u)).max() < 1
  loss = laws.predict(DC, n, u * epochs.ravel(), u) * np.exp(rng.normal(0, 0.003, n.size))
  fit = laws.fit("data-constrained", n, u * epochs.ravel(), loss, u, n_starts=2)
  assert fit.constants.R_N_star == pytest.approx(math.exp(10))
  assert fit.at_bounds == ["R_N_star"]
  assert fit.constants.R_D_star == pytest.approx(R_D, rel=0.25)  # the rest is still determined


@pytest.mark.parametrize("kwargs, match", [({"delta": 0.0}, "Huber delta"), ({"delta": math.nan}, "Huber delta"),
                                            ({"n_starts": 0}, "n_starts"), ({"bootstrap": -1}, "--bootstrap"),
                                            ({"bootstrap": 2.0}, "--bootstrap")])
def test_fit_refuses_settings_it_would_mishandle(kwargs, match):
  """delta 0 or NaN made every start cost the same and returned the first grid point (E=e^-1, A=B=1) as fitted
  constants; n_starts=0 was an IndexError inside the optimiser; bootstrap=-1 a fit without intervals."""
  n = np.repeat(np.geomspace(1e7, 1e10, 3), 3)
  d = np.tile(np.geomspace(1e9, 1e12, 3), 3)
  with pytest.raises(ValueError, match=match):
    laws.fit("chinchilla", n, d, laws.chinchilla_loss(laws.CHINCHILLA, n, d), **kwargs)


def test_too_few_runs():
  with pytest.raises(ValueError, match="more than 5 runs"):
    laws.fit("chinchilla", [1e8] * 3, [1e9] * 3, [3.0] * 3)
  # Six runs, but only three (N, D) points: their unique tokens do not enter the chinchilla law.
  n, d, u = [1e8, 1e8, 3e8, 3e8, 1e9, 1e9], [2e9, 2e9, 2e9, 2e9, 5e10, 5e10], [1e8, 1e9] * 3
  with pytest.raises(ValueError, match="got 3 distinct of 6"):
    laws.fit("chinchilla", n, d, laws.predict(DC, np.array(n), np.array(d), np.array(u)), u)


def test_constants_file_round_trip(tmp_path):
  path = tmp_path / "c.json"
  path.write_text(json.dumps({**DC.to_dict(), "ci": {}, "law": "data-constrained"}))
  assert laws.constants_for("data-constrained", path) == DC
  assert laws.constants_for("chinchilla", path).R_D_star is None
  path.write_text(json.dumps(laws.CHINCHILLA.to_dict()))
  with pytest.raises(ValueError, match="R_D_star"):
    laws.constants_for("data-constrained", path)


def test_bad_constants_files_name_the_file_and_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such file; pass the JSON object `repeat-lm analyze fit --json`"):
    laws.load_constants(tmp_path / "missing.json")
  for name, text in (("bad.json", "{not json"), ("list.json", "[1, 2]")):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=f"{name} (is not JSON|holds a JSON list)"):
      laws.load_constants(tmp_path / name)
  (tmp_path / "ok.json").write_text(json.dumps({"constants": {"E": 1.7, "A": 400, "B": 410, "alpha": 0.34,
                                                              "beta": 0.28}}))
  assert laws.load_constants(tmp_path / "ok.json").A == 400


def test_fit_flags_the_constants_of_a_term_negligible_at_every_run():
  """A loss that grows with N: the fit makes A / N^alpha ~1e-12 of the loss, and A = e^0, alpha = 2.0 stay at the
  grid start, off every bound: at_bounds was empty and they read as fitted, with bootstrap intervals of no width."""
  n = np.repeat([1e6, 3e6, 1e7, 3e7, 1e8, 3e8], 5)
  d = n * np.tile([5, 10, 20, 40, 80], 6)
  fit = laws.fit("chinchilla", n, d, n ** 0.1)
  assert fit.at_bounds == [] and {"A", "alpha"} <= set(fit.undetermined)
  # A law the runs determine flags nothing.
  n, d = (x.ravel() for x in np.meshgrid([1e7, 3e7, 1e8, 3e8], [1e9, 3e9, 1e10, 3e10]))
  assert laws.fit("chinchilla", n, d, laws.chinchilla_loss(laws.CHINCHILLA, n, d), n_starts=2).undetermined == []



def test_fit_does_not_stop_where_a_term_it_needs_is_negligible_at_every_start():
  """The 8 best grid points were all starts with the B term ~1e-12 of the loss (tied objectives, zero gradient):
  the fit stopped there and called B and beta undetermined though the tokens term is plain in the runs."""
  n, d = np.repeat([1e6, 3e6, 1e7, 3e7, 1e8], 4), np.tile([1e8, 3e8, 1e9, 3e9], 5)
  truth = laws.Constants(E=2.29, A=42.4, B=113.3, alpha=0.434, beta=0.422)
  noise = np.exp(np.random.default_rng(0).normal(0, 3e-3, n.size))
  loss = laws.predict(truth, n, d) * noise
  fit = laws.fit("chinchilla", n, d, loss)
  at_truth = laws._Objective(n, d, d, loss, laws.HUBER_DELTA)(laws._to_theta(truth))[0]  # noqa: SLF001
  assert fit.undetermined == [] and fit.objective <= at_truth
  # Loss growing with N (larger models on repeated data): only A and alpha are undetermined, not the tokens term.
  n, d = (x.ravel() for x in np.meshgrid([1e7, 3e7, 1e8, 3e8, 1e9], [1e9, 3e9, 1e10, 3e10], indexing="ij"))
  loss = 2.0 + 0.1 * np.log10(n / 1e7) + 300 / d ** 0.3
  fit = laws.fit("chinchilla", n, d, loss)
  assert fit.undetermined == ["A", "alpha"] and fit.constants.beta == pytest.approx(0.3, abs=0.05)

def test_a_null_constant_or_constants_that_are_no_object_name_the_key_and_the_file(tmp_path):
  # `analyze fit --json` writes a non-finite number as null: a null E was a TypeError from the constructor, and
  # {"constants": 5} "argument of type 'int' is not iterable".
  (tmp_path / "null.json").write_text(json.dumps({"E": None, "A": 406.4, "B": 410.7, "alpha": 0.3, "beta": 0.3}))
  with pytest.raises(ValueError, match=r"--law-constants=.*null.json: Constant E is null"):
    laws.load_constants(tmp_path / "null.json")
  (tmp_path / "nested.json").write_text(json.dumps({"constants": 5}))
  with pytest.raises(ValueError, match=r"--constants=.*nested.json: \"constants\" holds a JSON int, not an object"):
    laws.load_constants(tmp_path / "nested.json", "--constants")
  # A null R* is the chinchilla law, as before.
  (tmp_path / "chin.json").write_text(json.dumps({**laws.CHINCHILLA.to_dict(), "R_D_star": None, "R_N_star": None}))
  assert laws.load_constants(tmp_path / "chin.json") == laws.CHINCHILLA


def _grid_runs(*axes):
  return [x.ravel() for x in np.meshgrid(*axes, indexing="ij")]


def test_two_model_sizes_leave_the_data_constrained_fit_to_its_jacobian_check():
  """Not refused as the chinchilla law is: where runs have excess parameters (N > D_to_N(U)), N' depends on U and
  couples the terms, and two sizes recover the constants. With every N <= D_to_N(U), N' = N and the N term is
  Chinchilla's, which two sizes cannot fix: the fit returned alpha 0.92 (0.35) and flagged nothing. The Jacobian of
  the predictions at its optimum is singular (1e-11 of its largest singular value) along E, A, alpha; R_N* enters no
  prediction."""
  n, u, epochs = _grid_runs([2.5e8, 7.8e8], [2.0 ** 27, 2.0 ** 29, 2.0 ** 31, 2.0 ** 33], [1, 4, 16, 64])
  assert (n / _u_n(u)).max() > 1
  loss = laws.predict(DC, n, u * epochs, u) * np.exp(np.random.default_rng(0).normal(0, 0.003, n.size))
  fit = laws.fit("data-constrained", n, u * epochs, loss, u, n_starts=3)
  assert fit.at_bounds == [] and fit.undetermined == []
  assert (fit.constants.alpha, fit.constants.beta) == pytest.approx((DC.alpha, DC.beta), abs=0.02)
  n, u, epochs = _grid_runs([1e7, 1e8], [1e10, 1e11], [1, 4, 16, 64])
  assert (n / _u_n(u)).max() < 1
  fit = laws.fit("data-constrained", n, u * epochs, laws.predict(DC, n, u * epochs, u), u, n_starts=2)
  assert fit.at_bounds == [] and fit.undetermined == fit.flat == ["E", "A", "alpha", "R_N_star"]


def test_bootstrap_redraws_resamples_that_cannot_determine_the_law():
  """7 runs for 5 constants: most resamples hold at most 5 distinct runs, and their refits entered the interval: E's
  lower end was 0.29 with 10 refits and its bound e^-3 = 0.05 with 20 (the truth is 1.69). They are drawn again and
  counted."""
  n = np.array([1e7, 1e7, 1e8, 1e8, 1e9, 1e9, 3e8])
  d = np.array([1e9, 1e10, 1e9, 1e11, 1e10, 1e11, 3e10])
  loss = laws.chinchilla_loss(laws.CHINCHILLA, n, d) * np.exp(np.random.default_rng(0).normal(0, 0.005, n.size))
  fit = laws.fit("chinchilla", n, d, loss, bootstrap=10, seed=0, n_starts=4)
  assert len(fit.samples) == 10 and fit.redrawn > 10 and fit.given_up == 0
  assert fit.refits_flagged == {} and fit.ci_untrusted == []
  assert _ci_contains(fit, laws.CHINCHILLA) == {} and fit.ci()["E"][0] > 1.5


def test_bootstrap_refits_start_from_the_optimum_and_the_best_grid_points_of_their_resample(monkeypatch):
  """Each refit started only at the full-data optimum: in a flat direction it stayed there, and the interval was far
  too narrow (3.98-4.79 "excluded 1" where any b / a fits)."""
  calls = []
  minimise = laws._minimise  # noqa: SLF001
  monkeypatch.setattr(laws, "_minimise", lambda obj, starts: (calls.append(starts), minimise(obj, starts))[1])
  n, d = _grid_runs([1e7, 1e8, 1e9], [1e9, 1e10, 1e11])
  fit = laws.fit("chinchilla", n, d, laws.chinchilla_loss(laws.CHINCHILLA, n, d), bootstrap=2, n_starts=1)
  grid = laws._grid("chinchilla")  # noqa: SLF001
  for starts in calls[1:]:
    np.testing.assert_array_equal(starts[0], laws._to_theta(fit.constants))  # noqa: SLF001
    assert len(starts) >= 2 and all(any(np.array_equal(s, g) for g in grid) for s in starts[1:])
  assert len(calls) == 3
