"""Scaling laws: Chinchilla (Hoffmann et al. 2022, approach 3) and data-constrained (Muennighoff et al. 2023).

Shapes: N parameters, D tokens seen, U unique tokens (U_D), C = 6 N D training FLOPs. Every function takes numpy
arrays or floats and broadcasts.

Fitting follows Hoffmann et al. (approach 3): minimise the Huber loss (delta 1e-3) of log-loss residuals
log L_hat - log L, with log L_hat written as a logsumexp of (a - alpha log N, b - beta log D, e) so that A = e^a,
B = e^b, E = e^e stay positive, using L-BFGS-B started from a grid of initialisations.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
from scipy import optimize
from threadpoolctl import threadpool_limits

from repeat_lm import checks

LAWS = ("chinchilla", "data-constrained")
HUBER_DELTA = 1e-3
# A term below this share of the predicted loss at every run moves no log residual by more than a thousandth of the
# Huber delta: the runs cannot tell its coefficient and exponent from any others that keep it negligible, and the
# optimiser leaves them where it started.
NEGLIGIBLE = 1e-6
# A direction of theta along which the predictions change by less than FLAT of the most they change along any (a
# singular value of the Jacobian of log L_hat below FLAT of the largest) is one the runs do not determine. At the true
# constants: ~1e-11 (central-difference noise) for designs that cannot determine the law (two model sizes, a term no
# run changes), 3e-7 for tokens per parameter that vary by 0.003%, 1e-4 to 1e-3 for designs that determine it (a 3 x 3
# grid of N and D: 3e-4).
FLAT = 1e-6
# A constant loads on such a direction when its share of the singular vector is at least this: the constants the
# direction leaves alone have ~1e-9 (two model sizes: E 0.05, A 1.0, alpha 0.06; B, beta 1e-9).
LOADING = 1e-3
# A bootstrap interval is not trusted when more than this share of its refits left the constant on a bound or
# undetermined: the percentiles then mix estimates with bound or start values.
UNTRUSTED_SHARE = 0.05
# A resample that fails check_identifiable (at most as many distinct points as constants, 2 model sizes, ...) is drawn
# again, up to this many draws per refit in all.
MAX_DRAWS_PER_REFIT = 10
# The optimiser's starts for a bootstrap refit besides the full-data optimum: _starts with this n_starts, the best
# grid point of the resample and the best where every term counts (_starts). From the optimum alone a refit in a flat
# direction stayed where it started, and the interval was far too narrow.
BOOTSTRAP_STARTS = 1


@dataclasses.dataclass(frozen=True)
class Constants:
  """L = E + A / N^alpha + B / D^beta; with R_D_star and R_N_star set, N and D become N' and D'."""
  E: float
  A: float
  B: float
  alpha: float
  beta: float
  R_D_star: float | None = None
  R_N_star: float | None = None

  @property
  def law(self) -> str:
    return "chinchilla" if self.R_D_star is None else "data-constrained"

  def to_dict(self) -> dict[str, float]:
    return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

  @classmethod
  def from_dict(cls, d: dict) -> Constants:
    d = d.get("constants", d)
    if not isinstance(d, dict):  # {"constants": 5} ended in "argument of type 'int' is not iterable"
      raise ValueError(f'"constants" holds a JSON {type(d).__name__}, not an object of constants; give '
                       '{"constants": {"E": ..., "A": ...}} or the constants at the top level.')
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [k for k in names[:5] if k not in d]
    if missing:
      raise ValueError(f"Constants need {', '.join(names[:5])} (and R_D_star, R_N_star for the data-constrained "
                       f"law); missing: {', '.join(missing)}.")
    # A null read as "left out" and ended in a TypeError from the constructor; `analyze fit --json` writes a
    # non-finite number as null, so its own output could do this.
    null = [k for k in names[:5] if d[k] is None]
    if null:
      raise ValueError(f"Constant {', '.join(null)} is null; give every constant as a positive JSON number (a fit "
                       "that wrote null did not find a finite value: refit, or take the published constants).")
    values = {}
    for k in names:
      if d.get(k) is None:  # R_D_star / R_N_star: null or absent is the chinchilla law
        continue
      # {"A": [1]} ended in a TypeError traceback and "x" named no constant; float() also took true as 1.0 and
      # "1.69" as a number.
      if not checks.real_number(d[k]):
        raise ValueError(f"Constant {k}={d[k]!r} is not a number; give every constant as a JSON number, as "
                         "`repeat-lm analyze fit --json` prints them.")
      values[k] = float(d[k])
    c = cls(**values)
    if (c.R_D_star is None) != (c.R_N_star is None):
      raise ValueError("The data-constrained law needs both R_D_star and R_N_star; got only "
                       f"{'R_D_star' if c.R_N_star is None else 'R_N_star'}.")
    bad = [f"{k}={v}" for k, v in c.to_dict().items() if not (math.isfinite(v) and v > 0)]
    if bad:
      raise ValueError(f"Every constant must be positive and finite; got {', '.join(bad)}.")
    return c


CHINCHILLA = Constants(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
# Muennighoff et al.'s C4 fit; A, B, E are published as logs, kept unrounded here.
DATA_CONSTRAINED = Constants(E=math.exp(0.6254804), A=math.exp(6.255414), B=math.exp(7.3049974), alpha=0.3526596,
                             beta=0.3526596, R_D_star=15.387756, R_N_star=5.309743)
PUBLISHED = {"chinchilla": CHINCHILLA, "data-constrained": DATA_CONSTRAINED}


def read_record(path: str | Path, flag: str = "--law-constants") -> dict:
  """The JSON object of a constants file: the one `analyze fit --json` prints (with what the fit did not determine
  and the counts it saw), or {"constants": {...}}. `flag`: the command-line option that named the file, for the
  error messages."""
  path = Path(path)
  fix = "pass the JSON object `repeat-lm analyze fit --json` prints"
  if not path.is_file():
    raise FileNotFoundError(f"{flag}={path}: no such file; {fix}.")
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{flag}={path} is not JSON ({e}); {fix}.") from e
  if not isinstance(data, dict):
    raise ValueError(f"{flag}={path} holds a JSON {type(data).__name__}, not an object; {fix}.")
  return data


def load_constants(path: str | Path, flag: str = "--law-constants", record: dict | None = None) -> Constants:
  """Constants from a JSON file (read_record), or from its `record` where the caller has read it already."""
  data = read_record(path, flag) if record is None else record
  try:
    return Constants.from_dict(data)
  except ValueError as e:  # from_dict names the key; only here is the file known
    raise ValueError(f"{flag}={path}: {e}") from e


def constants_for(law: str, path: str | Path | None = None, flag: str = "--law-constants",
                  record: dict | None = None) -> Constants:
  """The law's constants: from `path` (or its `record`, read_record's), else the published ones."""
  if law not in LAWS:
    raise ValueError(f"Unknown law {law!r}; choose one of {', '.join(LAWS)}.")
  c = load_constants(path, flag, record) if path else PUBLISHED[law]
  if law == "data-constrained" and c.R_D_star is None:
    # Named with the file and the fix: a Chinchilla fit's JSON (`analyze fit --law=chinchilla --json`) is the
    # likely file, and the message named neither it nor what to pass instead.
    raise ValueError(f"{flag}={path}: the data-constrained law needs R_D_star and R_N_star, which these constants "
                     "lack (a Chinchilla fit's?). Pass what `repeat-lm analyze fit --law=data-constrained --json` "
                     f"prints, or leave {flag} out for the published constants.")
  return c if law == "data-constrained" else dataclasses.replace(c, R_D_star=None, R_N_star=None)


# ---- the laws ----

def chinchilla_loss(c: Constants, n, d):
  return c.E + c.A / np.power(n, c.alpha) + c.B / np.power(d, c.beta)


def effective(unique, repeats, r_star):
  """U + U R* (1 - exp(-R / R*)): R repeats worth R* (1 - e^{-R/R*}) fresh copies."""
  return unique + unique * r_star * -np.expm1(-repeats / r_star)


def d_to_n(c: Constants, d):
  """The compute-optimal parameter count for D tokens: (D G)^(beta/alpha) G."""
  g = _g(c)
  return np.power(d * g, c.beta / c.alpha) * g


def effective_data(c: Constants, d, u):
  """D' from D tokens seen out of U unique (R_D = D / U - 1 repeated epochs)."""
  return effective(u, np.maximum(np.asarray(d, float) / u - 1.0, 0.0), c.R_D_star)


def effective_params(c: Constants, n, u):
  """N': parameters beyond U_N = min(N, D_to_N(U)) count as repeated parameters (R_N = N / U_N - 1)."""
  u_n = np.minimum(n, d_to_n(c, u))
  return effective(u_n, np.maximum(np.asarray(n, float) / u_n - 1.0, 0.0), c.R_N_star)


def predict(c: Constants, n, d, u=None):
  """Predicted loss; the data-constrained law with U = None (or U >= D) sees every token once."""
  if c.R_D_star is None:
    return chinchilla_loss(c, n, d)
  u = np.minimum(d, np.inf if u is None else u)
  return c.E + c.A / np.power(effective_params(c, n, u), c.alpha) + c.B / np.power(effective_data(c, d, u), c.beta)


def _g(c: Constants) -> float:
  return (c.alpha * c.A / (c.beta * c.B)) ** (1.0 / (c.alpha + c.beta))


def compute_optimal(c: Constants, compute):
  """(N_opt, D_opt) minimising the Chinchilla form at C = 6 N D (unlimited unique data)."""
  n = _g(c) * np.power(np.asarray(compute, float) / 6.0, c.beta / (c.alpha + c.beta))
  return n, np.asarray(compute, float) / (6.0 * n)


def optimal_exponents(c: Constants) -> tuple[float, float]:
  """(a, b) in N_opt ~ C^a, D_opt ~ C^b; b / a = alpha / beta, 1 when tokens should grow linearly in parameters."""
  return c.beta / (c.alpha + c.beta), c.alpha / (c.alpha + c.beta)


# ---- fitting ----
# theta = (e, a, b, alpha, beta[, log R_D*, log R_N*]); log-space keeps E, A, B, R* positive without constraints.

_BOUNDS = [(-3.0, 3.0), (-10.0, 40.0), (-10.0, 40.0), (0.01, 5.0), (0.01, 5.0), (-5.0, 10.0), (-5.0, 10.0)]
# Hoffmann et al.'s grid, exponent 0 replaced by 0.1 (the data-constrained law takes log alpha).
_GRID = {"e": [-1.0, -0.5, 0.0, 0.5, 1.0], "a": [0.0, 5.0, 10.0, 15.0, 20.0, 25.0],
         "b": [0.0, 5.0, 10.0, 15.0, 20.0, 25.0], "alpha": [0.1, 0.5, 1.0, 1.5, 2.0],
         "beta": [0.1, 0.5, 1.0, 1.5, 2.0], "log_r_d": [0.0, math.log(10.0), math.log(100.0)],
         "log_r_n": [0.0, math.log(10.0), math.log(100.0)]}
_NAMES = ("E", "A", "B", "alpha", "beta", "R_D_star", "R_N_star")


@dataclasses.dataclass
class Fit:
  constants: Constants
  objective: float  # summed Huber loss at the optimum
  n_points: int
  samples: list[Constants] = dataclasses.field(default_factory=list)  # bootstrap refits
  # Constants the optimum left on an edge of the search (_BOUNDS): the runs do not determine them (or contradict the
  # law), and their value and bootstrap interval are the edge's, not an estimate.
  at_bounds: list[str] = dataclasses.field(default_factory=list)
  # Constants, not on a bound, of a term negligible at every run (_negligible) or on a direction along which no
  # prediction moves (_flat): their value is where the search stopped and their interval says nothing.
  undetermined: list[str] = dataclasses.field(default_factory=list)
  flat: list[str] = dataclasses.field(default_factory=list)  # those of `undetermined` that _flat found (not negligible)
  redrawn: int = 0  # bootstrap resamples that failed check_identifiable and were drawn again
  given_up: int = 0  # bootstrap refits left out: MAX_DRAWS_PER_REFIT draws in all found no resample for them
  # {constant: bootstrap refits that left it on a bound or undetermined}
  refits_flagged: dict[str, int] = dataclasses.field(default_factory=dict)

  @property
  def ci_untrusted(self) -> list[str]:
    """Constants whose interval is not trusted: over UNTRUSTED_SHARE of the refits left them on a bound or
    undetermined."""
    return [k for k, count in self.refits_flagged.items() if count > UNTRUSTED_SHARE * len(self.samples)]

  def ci(self, level: float = 0.95) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of every constant (empty without bootstrap samples)."""
    if not self.samples:
      return {}
    q = [50 * (1 - level), 50 * (1 + level)]
    out = {}
    for name in self.constants.to_dict():
      values = np.array([getattr(s, name) for s in self.samples])
      out[name] = [float(v) for v in np.percentile(values, q)]
    return out


def _to_constants(theta: np.ndarray) -> Constants:
  t = [float(x) for x in theta]
  extra = {"R_D_star": math.exp(t[5]), "R_N_star": math.exp(t[6])} if len(t) == 7 else {}
  return Constants(E=math.exp(t[0]), A=math.exp(t[1]), B=math.exp(t[2]), alpha=t[3], beta=t[4], **extra)


def _to_theta(c: Constants) -> np.ndarray:
  t = [math.log(c.E), math.log(c.A), math.log(c.B), c.alpha, c.beta]
  if c.R_D_star is not None:
    t += [math.log(c.R_D_star), math.log(c.R_N_star)]
  return np.array(t)


def _log_predict(theta: np.ndarray, log_n, log_d, log_u) -> np.ndarray:
  """log L_hat for theta of shape (..., P) and data of shape (n,): (..., n)."""
  return _log_sum(_log_terms(theta, log_n, log_d, log_u))


def _log_sum(terms: np.ndarray) -> np.ndarray:
  """log of the sum of the law's terms from their logs (3, ...)."""
  top = terms.max(axis=0)
  return top + np.log(np.exp(terms - top).sum(axis=0))


def _log_terms(theta: np.ndarray, log_n, log_d, log_u) -> np.ndarray:
  """log of the law's three terms (A / N'^alpha, B / D'^beta, E): (3, ..., n)."""
  col = lambda i: theta[..., i, None]  # noqa: E731
  e, a, b, alpha, beta = (col(i) for i in range(5))
  if theta.shape[-1] == 7:
    r_d, r_n = np.exp(col(5)), np.exp(col(6))
    log_g = (np.log(alpha) + a - np.log(beta) - b) / (alpha + beta)
    log_un = np.minimum(log_n, beta / alpha * (log_u + log_g) + log_g)
    log_n = log_un + np.log1p(r_n * -np.expm1(-np.maximum(np.exp(log_n - log_un) - 1.0, 0.0) / r_n))
    log_d = log_u + np.log1p(r_d * -np.expm1(-np.maximum(np.exp(log_d - log_u) - 1.0, 0.0) / r_d))
  return np.stack(np.broadcast_arrays(a - alpha * log_n, b - beta * log_d, e))


def _at_bounds(theta: np.ndarray) -> list[str]:
  return [name for name, x, (lo, hi) in zip(_NAMES, theta, _BOUNDS) if min(x - lo, hi - x) <= 1e-6]


# The constants each term of _log_terms depends on: R_N* enters only through N', R_D* only through D'.
_TERM_CONSTANTS = (("A", "alpha", "R_N_star"), ("B", "beta", "R_D_star"), ("E",))


def _negligible(theta: np.ndarray, log_n, log_d, log_u) -> list[str]:
  """Constants of a term below NEGLIGIBLE of the prediction at every run (those on a bound excepted: _at_bounds
  names them). E.g. a loss that grows with N: the fit drives A / N^alpha to ~0 and A, alpha stay at their start."""
  with np.errstate(all="ignore"):
    terms = _log_terms(theta, log_n, log_d, log_u)
    share = np.exp(terms - _log_predict(theta, log_n, log_d, log_u))
  names = set(_NAMES[:theta.size])
  out = [k for i, ks in enumerate(_TERM_CONSTANTS) if np.all(share[i] < NEGLIGIBLE) for k in ks if k in names]
  bounded = set(_at_bounds(theta))
  return [k for k in _NAMES if k in out and k not in bounded]


def _flat(theta: np.ndarray, obj: _Objective) -> list[str]:
  """Constants that load on a direction of theta along which no prediction moves (FLAT, LOADING), those on a bound
  excepted (_at_bounds names them). E.g. two model sizes fix E + A / N^alpha at two N only: every alpha fits as well,
  with its own E and A, and the optimiser stops anywhere in that valley, off every bound."""
  _, jac = obj.predict(theta)
  _, s, vt = np.linalg.svd(np.nan_to_num(jac.T), full_matrices=True)
  # Directions past the number of runs have no singular value: no run constrains them at all.
  s = np.concatenate([s, np.zeros(vt.shape[0] - s.size)])
  loads = np.abs(vt[s < FLAT * s[0]]) >= LOADING
  bounded = set(_at_bounds(theta))
  return [k for k, flat in zip(_NAMES, loads.any(axis=0)) if flat and k not in bounded]


def _undetermined(theta: np.ndarray, obj: _Objective) -> tuple[list[str], list[str]]:
  """(undetermined, flat): the constants, not on a bound, that _negligible or _flat finds, and those only _flat
  finds."""
  negligible = _negligible(theta, *obj.data)
  flat = [k for k in _flat(theta, obj) if k not in negligible]
  return [k for k in _NAMES if k in negligible or k in flat], flat


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
  return np.where(np.abs(r) <= delta, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))


class _Objective:
  """Summed Huber loss of log residuals and its gradient (central differences of log L_hat: cheap and exact to
  ~1e-10 here, and the same code serves both laws)."""

  def __init__(self, n, d, u, loss, delta: float):
    self.data = (np.log(n), np.log(d), np.log(np.minimum(u, d)))
    self.log_loss = np.log(loss)
    self.delta = delta

  def predict(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log L_hat at theta (n,) and its Jacobian in theta (P, n)."""
    h = 1e-6
    p = theta.size
    probes = np.concatenate([theta[None], theta + h * np.eye(p), theta - h * np.eye(p)])
    with np.errstate(all="ignore"):
      f = _log_predict(probes, *self.data)
    return f[0], (f[1:p + 1] - f[p + 1:]) / (2 * h)

  def __call__(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
    f, jac = self.predict(theta)
    r = f - self.log_loss
    p = theta.size
    dr = np.clip(r, -self.delta, self.delta)  # Huber derivative
    value = float(_huber(r, self.delta).sum())
    if not np.isfinite(value):
      return 1e30, np.zeros(p)
    return value, np.nan_to_num(jac @ dr)


def _grid(law: str) -> np.ndarray:
  keys = list(_GRID)[:5] + (list(_GRID)[5:] if law == "data-constrained" else [])
  mesh = np.meshgrid(*[_GRID[k] for k in keys], indexing="ij")
  return np.stack([m.ravel() for m in mesh], axis=-1)


def _grid_scores(grid: np.ndarray, obj: _Objective, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """For K weightings of the runs (weights (n, K): ones for the fit, a resample's counts of each run for a bootstrap
  refit), each grid point's objective and whether its A and B terms are each at least NEGLIGIBLE of the prediction
  at some run the weighting keeps: two (G, K) arrays. One pass over the grid serves the fit or a block of resamples
  (a pass per resample made a 100-refit bootstrap of the data-constrained law 30 s slower)."""
  kept = (weights > 0).astype(float)
  values = np.empty((len(grid), weights.shape[1]))
  live = np.empty((len(grid), weights.shape[1]), bool)
  for rows in np.array_split(np.arange(len(grid)), max(1, len(grid) // 4096)):
    with np.errstate(all="ignore"):
      terms = _log_terms(grid[rows], *obj.data)
      log_pred = _log_sum(terms)
      per_run = _huber(log_pred - obj.log_loss, obj.delta)
      share = np.exp(terms[:2] - log_pred)
    bad = ~np.isfinite(per_run)  # a run the weighting leaves out must not make the point inf (inf * 0 is NaN)
    values[rows] = np.where(bad.astype(float) @ kept > 0, np.inf, np.where(bad, 0.0, per_run) @ weights)
    live[rows] = np.all((share >= NEGLIGIBLE).astype(float) @ kept > 0, axis=0)
  return values, live


def _starts(grid: np.ndarray, values: np.ndarray, live: np.ndarray, n_starts: int) -> np.ndarray:
  """The optimiser's starts: the `n_starts` best grid points, and the `n_starts` best of those whose A and B terms
  are each at least NEGLIGIBLE of the prediction at some run (`values`, `live`: one column of _grid_scores).

  The best points alone could all be starts where a term is ~1e-12 of the loss (a large alpha with a small A): their
  objectives tie, the term's gradient is zero there, so L-BFGS-B never moved it, and the fit stopped at a worse
  optimum than one inside the bounds and reported that term's constants as undetermined (8.2e-5 for a table whose
  generating constants give 3.9e-5, B and beta "not determined")."""
  order = np.argsort(values, kind="stable")
  chosen = list(order[:n_starts]) + [i for i in order[live[order]][:n_starts] if i not in set(order[:n_starts])]
  return grid[chosen]


def _minimise(obj: _Objective, starts: np.ndarray) -> tuple[np.ndarray, float]:
  best, best_value = starts[0], np.inf
  bounds = _BOUNDS[:starts.shape[1]]
  for start in starts:
    res = optimize.minimize(obj, start, jac=True, method="L-BFGS-B", bounds=bounds,
                            # The objective is ~1e-4 in absolute terms: scipy's default ftol would stop at once.
                            options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 2000})
    if res.fun < best_value:
      best, best_value = res.x, float(res.fun)
  return best, best_value


def check_identifiable(law: str, n, d, u, n_params: int) -> None:
  """Refuse data that cannot determine the law's constants: too few distinct (N, D, U) points, one N, one D, for the
  chinchilla law fewer than 3 of either, tokens per parameter (nearly) the same for every run (alpha and beta trade
  off), and for the data-constrained law no run that repeats data (R_D* free). What passes may still leave constants
  undetermined: the fit's Jacobian check (_flat) names them."""
  # The chinchilla law sees (N, D) only: runs that differ only in U are one point to it.
  u = np.minimum(u, d) if law == "data-constrained" else d
  points = np.unique(np.stack([n, d, u], axis=-1), axis=0) if n.size else np.zeros((0, 3))
  if len(points) <= n_params:
    raise ValueError(f"Fitting the {law} law ({n_params} constants) needs more than {n_params} runs with a final "
                     f"loss at distinct (params, tokens{', unique tokens' if law == 'data-constrained' else ''}); "
                     f"got {len(points)} distinct of {n.size}.")
  log_n, log_d = np.log(points[:, 0]), np.log(points[:, 1])
  for name, logs, symbol, exponent in (("model size", log_n, "N", "alpha"), ("token count", log_d, "D", "beta")):
    distinct = 1 + int(np.sum(np.diff(np.sort(logs)) > 1e-9))
    if distinct == 1:
      raise ValueError(f"Every run has the same {'params' if symbol == 'N' else 'tokens'} {symbol}: its exponent and "
                       f"coefficient cannot be fitted; add runs that vary {symbol}.")
    # The chinchilla law's term A / N^alpha at 2 sizes is 2 numbers for 3 unknowns beside it (E, A, alpha): every
    # alpha fits as well, with its own E and A. The data-constrained law can do with 2 once repetition couples the
    # terms (N' depends on U and D); its fit's Jacobian check names what a design leaves undetermined.
    if law == "chinchilla" and distinct == 2:
      raise ValueError(f"2 {name}s cannot fix {exponent}: with E and the coefficient of its term that is 3 unknowns "
                       f"from 2 values of {symbol}, so every {exponent} fits as well; add runs at a third {name}.")
  # Relative: an absolute rank test passed tokens per parameter rounded to whole steps (20.0000-20.0033; 3e-7 by the
  # Jacobian's singular values, FLAT), and the fit put alpha on its bound. At 0.1% off the line the smallest singular
  # value is still 7e-6 of the largest; designs that determine the law have 1e-4 or more.
  design = np.stack([np.ones_like(log_n), log_n], axis=-1)
  off_line = log_d - design @ np.linalg.lstsq(design, log_d, rcond=None)[0]
  if np.sqrt(np.mean(off_line ** 2)) < 1e-3:
    raise ValueError("log D is (within 0.1%) a linear function of log N in every run (e.g. the same tokens per "
                     "parameter): alpha and beta cannot be told apart; add runs off that line.")
  if law == "data-constrained" and not np.any(points[:, 1] > points[:, 2] * (1 + 1e-9)):
    raise ValueError("No run repeats data (tokens seen > unique tokens): the data-constrained law's R_D* cannot be "
                     "fitted; fit the chinchilla law, or add repeated runs.")


def _resamples(law: str, n, d, u, n_params: int, count: int, rng) -> tuple[list[np.ndarray], int]:
  """Up to `count` resamples of the runs (indices, drawn with replacement) that pass check_identifiable, and how many
  draws failed it and were drawn again (MAX_DRAWS_PER_REFIT draws per refit in all). 49 of 60 resamples of 7 runs had
  at most 5 distinct points for the 5 constants, and their refits entered the interval."""
  out, redrawn = [], 0
  while len(out) < count and len(out) + redrawn < MAX_DRAWS_PER_REFIT * count:
    idx = rng.integers(0, n.size, n.size)
    try:
      check_identifiable(law, n[idx], d[idx], u[idx], n_params)
    except ValueError:
      redrawn += 1
      continue
    out.append(idx)
  return out, redrawn


def fit(law: str, n, d, loss, u=None, *, delta: float = HUBER_DELTA, n_starts: int = 8, bootstrap: int = 0,
        seed: int = 0) -> Fit:
  """Fit `law` to runs (N params, D tokens seen, U unique tokens, final loss).

  L-BFGS-B starts from the `n_starts` best points of the initialisation grid and the `n_starts` best of those where
  every term of the law counts at some run (_starts; all of the grid is evaluated; optimising from each of its
  4,500-40,500 points would take minutes for little gain). Bootstrap refits resample the runs with replacement
  (_resamples) and start from the full-data optimum and the best grid points of their resample (BOOTSTRAP_STARTS);
  refits that leave a constant on a bound or undetermined are counted (Fit.refits_flagged, Fit.ci_untrusted).
  """
  if law not in LAWS:
    raise ValueError(f"Unknown law {law!r}; choose one of {', '.join(LAWS)}.")
  # Checked here, not deep inside: a zero or NaN delta makes every residual cost 0 (or NaN, read as inf), so the fit
  # returned the first grid point as "the" constants; n_starts=0 failed with an IndexError in the optimiser; and
  # bootstrap=-1 (accepted by `analyze fit --bootstrap`) gave a fit with no intervals and no error.
  if not (isinstance(delta, (int, float, np.floating)) and not isinstance(delta, bool) and math.isfinite(delta)
          and delta > 0):
    raise ValueError(f"The Huber delta must be a positive, finite number; got {delta!r}.")
  if not checks.is_count(n_starts):
    raise ValueError(f"n_starts must be a whole number >= 1 (optimiser starts); got {n_starts!r}.")
  if not checks.is_count(bootstrap, 0):
    raise ValueError(f"--bootstrap must be a whole number >= 0 (refits for the intervals); got {bootstrap!r}.")
  n, d, loss = (np.asarray(x, float) for x in (n, d, loss))
  if law == "data-constrained" and u is not None and n.size and not np.isfinite(np.asarray(u, float)).any():
    # Unknown U reads as every token unique, so the error was "no run repeats data": not the table's problem, which
    # is that it says nothing of repetition (a table without the column, or one left empty).
    raise ValueError("No run has a known number of unique tokens (the results table's unique_tokens column is "
                     "missing, empty or <= 0 in every row): the data-constrained law's R_D* cannot be fitted. Fill "
                     "in unique_tokens (`repeat-lm collect` writes it), or fit the chinchilla law.")
  u = d if u is None else np.where(np.isfinite(np.asarray(u, float)), np.asarray(u, float), d)
  bad = ~(np.isfinite(n) & np.isfinite(d) & np.isfinite(loss) & (n > 0) & (d > 0) & (loss > 0) & (u > 0))
  if bad.any():
    raise ValueError(f"Every run of a fit needs positive, finite N, D, U and loss; {int(bad.sum())} of {n.size} "
                     "do not (scaling.fit_data leaves such runs out).")
  n_params = 7 if law == "data-constrained" else 5
  check_identifiable(law, n, d, u, n_params)
  if np.ptp(np.log(loss)) < 1e-9:
    # E alone fits them exactly, and any A, B, alpha, beta that make their terms negligible fit as well: the fit
    # would report whichever the optimiser stopped at, and every bootstrap refit the same (a zero-width interval).
    raise ValueError(f"Every run has the same final loss ({loss[0]:g}): the law's coefficients and exponents cannot "
                     "be fitted; check the table's final_eval_loss column.")
  obj = _Objective(n, d, u, loss, delta)
  grid = _grid(law)
  values, live = _grid_scores(grid, obj, np.ones((n.size, 1)))
  starts = _starts(grid, values[:, 0], live[:, 0], n_starts)
  # L-BFGS-B's tiny BLAS calls are ~20x slower when OpenBLAS wakes its threads for each.
  with threadpool_limits(1, user_api="blas"):
    theta, value = _minimise(obj, starts)
  undetermined, flat = _undetermined(theta, obj)
  result = Fit(_to_constants(theta), value, int(n.size), at_bounds=_at_bounds(theta), undetermined=undetermined,
               flat=flat)
  resamples, result.redrawn = _resamples(law, n, d, u, n_params, bootstrap, np.random.default_rng(seed))
  result.given_up = bootstrap - len(resamples)
  flagged = collections.Counter()
  for block in range(0, len(resamples), 64):  # (G, 64) grid scores at a time: 20 MB for the data-constrained grid
    idxs = resamples[block:block + 64]
    values, live = _grid_scores(grid, obj, np.stack([np.bincount(i, minlength=n.size) for i in idxs], axis=-1))
    with threadpool_limits(1, user_api="blas"):
      for k, idx in enumerate(idxs):
        sample_obj = _Objective(n[idx], d[idx], u[idx], loss[idx], delta)
        starts = np.concatenate([theta[None], _starts(grid, values[:, k], live[:, k], BOOTSTRAP_STARTS)])
        sample_theta, _ = _minimise(sample_obj, starts)
        result.samples.append(_to_constants(sample_theta))
        flagged.update([*_at_bounds(sample_theta), *_undetermined(sample_theta, sample_obj)[0]])
  result.refits_flagged = {k: flagged[k] for k in _NAMES if flagged[k]}
  return result
