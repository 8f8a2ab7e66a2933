"""Token-crisis planner: given U unique tokens and C FLOPs, choose parameters N (tokens D = C / 6N, epochs D / U)
minimising the data-constrained law, and compare with the Chinchilla-optimal choice that ignores the data limit.

Repetition thresholds (R_D = epochs - 1; the next repeated epoch is worth exp(-R_D / R_D*) of a fresh one):
`beyond_r_d_star` when R_D > R_D* (worth < 1/e = 37%: repetition stops paying; 16.4 epochs with the published
constants); `exhausted` when the next epoch is worth < 10% (R_D > R_D* ln 10: 36.4 epochs, Muennighoff et al.'s
"~40 epochs, repeated tokens worth ~nothing").
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import optimize

from repeat_lm.analysis import laws, plots, proxy, report, results, scaling

EXHAUSTED_VALUE = 0.1  # marginal value of an epoch, relative to fresh data, below which repetition is exhausted
LARGE_PARAMS = 7e8  # T5-Large scale (783M): the paper's larger models overfit more and gain more from dropout
NEAR_PARAMS = 2.0  # "similar params" for measured dropout: within this factor
SUFFICIENT_REL = 0.001  # "nearly the same loss" for the smallest sufficient compute: within 0.1%


def _loss(c: laws.Constants, log_n, compute: float, unique: float):
  n = np.exp(log_n)
  return laws.predict(c, n, compute / (6.0 * n), unique)


def optimal_params(c: laws.Constants, unique: float, compute: float, points: int = 4001) -> float:
  """argmin over N of the predicted loss at D = C / 6N: a grid over log N (4 decades either side of the
  Chinchilla optimum), then a bounded scalar search between the grid neighbours of the best point."""
  log_n0 = math.log(float(laws.compute_optimal(c, compute)[0]))
  grid = np.linspace(log_n0 - 4 * math.log(10), log_n0 + 4 * math.log(10), points)
  i = int(np.argmin(_loss(c, grid, compute, unique)))
  lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, points - 1)]
  res = optimize.minimize_scalar(lambda x: float(_loss(c, x, compute, unique)), bounds=(lo, hi), method="bounded",
                                 options={"xatol": 1e-10})
  return math.exp(res.x if res.fun <= _loss(c, grid[i], compute, unique) else grid[i])


def sufficient_compute(c: laws.Constants, unique: float, compute: float, loss: float) -> float:
  """The smallest compute whose plan comes within SUFFICIENT_REL of `loss` (bisection on log C; the planned loss
  never rises with compute). Far below `compute` when the data, not the compute, limits the loss."""
  planned = lambda log_c: float(_loss(c, math.log(optimal_params(c, unique, math.exp(log_c), 1001)),  # noqa: E731
                                      math.exp(log_c), unique))
  target = loss * (1 + SUFFICIENT_REL)
  step = 12 * math.log(10)
  lo, hi = math.log(compute) - step, math.log(compute)
  # Down in steps of 12 decades until a compute falls short: a floor fixed at 1e-12 C was itself "sufficient" for
  # C >= ~1e31 once the data had saturated the loss, and the answer was just 1e-12 C. The bound (300 decades) only
  # stops a law whose loss never rises as compute falls.
  for _ in range(25):
    if not planned(lo) <= target:
      break
    lo, hi = lo - step, lo
  else:
    return math.exp(lo)
  for _ in range(50):
    mid = (lo + hi) / 2
    lo, hi = (lo, mid) if planned(mid) <= target else (mid, hi)
  return math.exp(hi)


def marginal_epoch_value(c: laws.Constants, epochs: float) -> float:
  """What one more epoch is worth relative to fresh data: d D' / d D = exp(-R_D / R_D*)."""
  return math.exp(-max(epochs - 1.0, 0.0) / c.R_D_star)


def thresholds(c: laws.Constants) -> dict:
  return {"beyond_r_d_star_epochs": 1 + c.R_D_star,
          "exhausted_epochs": 1 + c.R_D_star * math.log(1 / EXHAUSTED_VALUE)}


def _choice(c: laws.Constants, n: float, compute: float, unique: float) -> dict:
  d = compute / (6.0 * n)
  return {"params": n, "tokens": d, "epochs": d / unique, "predicted_loss": float(laws.predict(c, n, d, unique)),
          "effective_tokens": float(laws.effective_data(c, d, min(unique, d))),
          "effective_params": float(laws.effective_params(c, n, min(unique, d))),
          "marginal_epoch_value": marginal_epoch_value(c, d / unique)}


def warnings_for(c: laws.Constants, choice: dict, unique: float) -> list[dict]:
  t, epochs, out = thresholds(c), choice["epochs"], []
  if epochs > t["exhausted_epochs"]:
    out.append({"code": "exhausted", "message": f"{epochs:.3g} epochs: one more repeated epoch is worth "
                f"{choice['marginal_epoch_value']:.1%} of fresh data (< {EXHAUSTED_VALUE:.0%} beyond "
                f"{t['exhausted_epochs']:.3g} epochs); find more unique data or spend less compute."})
  elif epochs > t["beyond_r_d_star_epochs"]:
    out.append({"code": "beyond_r_d_star", "message": f"{epochs:.3g} epochs > 1 + R_D* = "
                f"{t['beyond_r_d_star_epochs']:.3g}: repetition stops paying (the next epoch is worth "
                f"{choice['marginal_epoch_value']:.1%} of fresh data)."})
  u_n = float(laws.d_to_n(c, unique))
  if choice["params"] > u_n * 1.001:
    out.append({"code": "excess_params", "message": f"{choice['params']:.3g} parameters exceed U_N = {u_n:.3g} "
                "(compute-optimal for the unique tokens): the excess is worth less (R_N*)."})
  return out


def dropout_advice(params: float, epochs: float, runs: list[results.Run] | None = None) -> dict:
  """Whether to pre-train with dropout (the paper: it helps under repetition, more for larger models), with the
  best rate measured among the table's runs of similar size when a table is given."""
  if epochs <= 1.0:
    advice = {"advised": False, "reason": "no repetition: T5 pre-trains without dropout"}
  elif params >= LARGE_PARAMS:
    advice = {"advised": True, "reason": "repeated data at Large scale or above: the paper finds larger models "
              "degrade more and gain more from dropout (its MoE-proxy sweep preferred 0.2-0.3 for XL)"}
  else:
    advice = {"advised": True, "reason": "repeated data: the paper's T5-Base on 2^27 tokens x 2^8 epochs gained "
              "from dropout (61.7 -> 63.0 C4 validation accuracy)"}
  advice["measured"], why = _measure(runs, params) if runs else (None, None)
  if why:
    # A table given (--results) but nothing in it to measure: said, not silently left out of the plan.
    advice["unmeasured"] = why
  return advice


def measured_dropout(runs: list[results.Run], params: float) -> dict | None:
  """Best dropout rate by mean best_eval_accuracy (else lowest best_eval_loss) among runs within NEAR_PARAMS x of
  `params` (else the nearest size), preferring runs that repeat data."""
  return _measure(runs, params)[0]


def _measure(runs: list[results.Run], params: float) -> tuple[dict | None, str | None]:
  """(measured_dropout's answer, None), or (None, why the table has none)."""
  # The first dropout column holding a number in some run (a text one, e.g. DROPOUT_SCHEDULE, is not a rate).
  column = next((c for c in results.columns(runs) if "dropout" in c.lower()
                 and any(isinstance(r.get(c), float) and math.isfinite(r.get(c)) for r in runs)), None)
  if not column:
    return None, "the table has no column whose name contains `dropout` with a number (a rate) in any run"
  # Finite rates only: a `nan` cell (no rate) would be a group of its own and could come out as the best rate.
  rated = [r for r in runs if isinstance(r.get(column), float) and math.isfinite(r.get(column)) and r.params > 0]
  if not rated:
    return None, f"no run with a {column} has a positive `params`"
  repeated = [r for r in rated if r.epochs > 1] or rated
  near = [r for r in repeated if abs(math.log(r.params / params)) <= math.log(NEAR_PARAMS)]
  if not near:
    closest = min(abs(math.log(r.params / params)) for r in repeated)
    near = [r for r in repeated if math.isclose(abs(math.log(r.params / params)), closest)]
  use_acc = any(math.isfinite(r.best_eval_accuracy) for r in near)
  score = (lambda r: r.best_eval_accuracy) if use_acc else (lambda r: -r.best_eval_loss)
  by_rate: dict[float, list[float]] = {}
  for r in near:
    if math.isfinite(score(r)):
      by_rate.setdefault(r.get(column), []).append(score(r))
  if not by_rate:
    return None, (f"no run with a {column} near this size ({len(near)} within {NEAR_PARAMS:g}x, or the nearest) has a "
                  "finite best_eval_accuracy or best_eval_loss")
  means = {rate: float(np.mean(v)) for rate, v in sorted(by_rate.items())}
  # Rates that share the best score: none of them is "the best", and the table cannot tell them apart.
  tied = proxy.best_rates(means, higher_is_better=True)
  metric = "best_eval_accuracy" if use_acc else "best_eval_loss"
  return {"column": column, "metric": metric, "runs": len(near),
          "params_range": [min(r.params for r in near), max(r.params for r in near)],
          "best_rate": tied[0] if len(tied) == 1 else None, "tied": tied if len(tied) > 1 else [],
          "by_rate": {k: (v if use_acc else -v) for k, v in means.items()}}, None


def plan(unique_tokens: float, compute: float, constants: laws.Constants = laws.DATA_CONSTRAINED,
         runs: list[results.Run] | None = None, fit: dict | None = None) -> dict:
  """The recommendation (keys documented in docs/analysis.md). `fit`: the `analyze fit --json` record the constants
  came from; what it did not determine, and a plan outside the runs it saw, join the warnings (scaling.fit_caveats):
  a constant left on its bound (R_N* without a run past U_N) moves the plan silently otherwise."""
  c = constants
  if c.R_D_star is None:
    raise ValueError("The planner needs data-constrained constants (R_D_star, R_N_star).")
  if not (unique_tokens > 0 and 0 < compute < math.inf):
    raise ValueError(f"--unique-tokens must be positive and --compute positive and finite; got {unique_tokens:g} "
                     f"and {compute:g}.")
  rec = _choice(c, optimal_params(c, unique_tokens, compute), compute, unique_tokens)
  n_chin = float(laws.compute_optimal(c, compute)[0])
  chin = _choice(c, n_chin, compute, unique_tokens)
  chin["loss_ignoring_repetition"] = float(laws.chinchilla_loss(c, n_chin, chin["tokens"]))
  enough = sufficient_compute(c, unique_tokens, compute, rec["predicted_loss"])
  sufficient = {"compute": enough, "fraction_of_compute": enough / compute,
                **_choice(c, optimal_params(c, unique_tokens, enough), enough, unique_tokens)}
  return {"unique_tokens": unique_tokens, "compute": compute, "constants": c.to_dict(), "recommended": rec,
          # >= 0 up to rounding: the plan is the minimum over N.
          "chinchilla_optimal": chin, "loss_saved": max(chin["predicted_loss"] - rec["predicted_loss"], 0.0),
          "sufficient": sufficient, "thresholds": thresholds(c), "warnings": warnings_for(c, rec, unique_tokens)
          + (scaling.fit_caveats(fit, rec["params"], rec["tokens"], unique_tokens, what="this plan", names={
              "params": "the planned N", "tokens": "the planned D", "epochs": "the planned epochs"}) if fit else []),
          "dropout": dropout_advice(rec["params"], rec["epochs"], runs)}


def summary(p: dict) -> str:
  rec, chin = p["recommended"], p["chinchilla_optimal"]
  lines = [f"U = {p['unique_tokens']:.3g} unique tokens, C = {p['compute']:.3g} FLOPs (C = 6ND).",
           f"Recommended: N = {rec['params']:.3g} parameters, D = {rec['tokens']:.3g} tokens = "
           f"{rec['epochs']:.3g} epochs; predicted loss {rec['predicted_loss']:.4f}.",
           f"Chinchilla-optimal (ignores the data limit): N = {chin['params']:.3g}, D = {chin['tokens']:.3g} = "
           f"{chin['epochs']:.3g} epochs; loss {chin['loss_ignoring_repetition']:.4f} if every token were fresh, "
           f"{chin['predicted_loss']:.4f} once repetition is counted ({p['loss_saved']:.3g} worse than the plan).",
           f"Dropout: {'advised' if p['dropout']['advised'] else 'not needed'} ({p['dropout']['reason']})."]
  enough = p["sufficient"]
  if enough["fraction_of_compute"] < 0.9:
    lines.append(f"{enough['fraction_of_compute']:.1%} of the compute (C = {enough['compute']:.3g}: N = "
                 f"{enough['params']:.3g}, {enough['epochs']:.3g} epochs) gets within {SUFFICIENT_REL:.1%} of this "
                 f"loss ({enough['predicted_loss']:.4f}): the unique data, not the compute, limits it.")
  m = p["dropout"]["measured"]
  if p["dropout"].get("unmeasured"):
    lines.append(f"Measured: nothing from the results table: {p['dropout']['unmeasured']}.")
  if m:
    best = (f"best {m['column']} = {m['best_rate']:g}" if m["best_rate"] is not None else
            f"no best {m['column']}: {', '.join(f'{r:g}' for r in m['tied'])} tie")
    lines.append(f"Measured: {best} by {m['metric']} over {m['runs']} runs with "
                 f"{m['params_range'][0]:.3g}-{m['params_range'][1]:.3g} parameters.")
  lines += [f"Warning: {w['message']}" for w in p["warnings"]]
  return "\n".join(lines)


def write_plan_report(p: dict, out_dir: str | Path) -> dict:
  out_dir = Path(out_dir)
  c = laws.Constants(**p["constants"])
  log_n0 = math.log(p["chinchilla_optimal"]["params"])
  ns = np.exp(np.linspace(log_n0 - 3 * math.log(10), log_n0 + 2 * math.log(10), 200))
  ds = p["compute"] / (6 * ns)
  rec, chin = p["recommended"], p["chinchilla_optimal"]
  png = plots.save(out_dir / "plan_loss_vs_params.png", [
      plots.Series(ns, laws.predict(c, ns, ds, p["unique_tokens"]), "data-constrained law", "tab:blue"),
      plots.Series(ns, laws.chinchilla_loss(c, ns, ds), "ignoring repetition", "tab:grey", "--"),
      plots.Series([rec["params"]], [rec["predicted_loss"]], "plan", "tab:blue", "o"),
      plots.Series([chin["params"]], [chin["predicted_loss"]], "Chinchilla-optimal", "tab:red", "x")],
      logx=True, title=f"predicted loss at C = {p['compute']:.3g}, U = {p['unique_tokens']:.3g}",
      xlabel="parameters N (D = C / 6N)", ylabel="predicted loss")
  rows = [{"choice": name, **{k: v for k, v in ch.items() if k != "loss_ignoring_repetition"}}
          for name, ch in (("plan", rec), ("Chinchilla-optimal", chin))]
  text = summary(p).replace("\n", "\n\n")
  return report.write_report(out_dir, "Token-crisis plan", [("Plan", text, [png], rows)])
