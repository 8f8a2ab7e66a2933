"""Scaling-law fits on a results table, and the paper's question: does an encoder-decoder need tokens linearly in
parameters (Chinchilla's D_opt / N_opt constant in C)?

A run enters a fit with finite `params`, tokens (D) and `final_eval_loss`; `unique_tokens` (U) is used by the
data-constrained law (missing: every token unique). D is `final_eval_tokens`, the tokens seen when that loss was
measured (a run stopped between evaluations has trained past its last one), else `tokens_seen` for tables written
before that column. Compute is C = 6 N D, as in the laws.
"""

from __future__ import annotations

import collections
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from repeat_lm import checks
from repeat_lm.analysis import laws, plots, report, results


def loss_tokens(r: results.Run) -> float:
  """D of a run's point: the tokens seen at its final evaluation (see the module docstring)."""
  return _loss_tokens_column(r)[1]


def _loss_tokens_column(r: results.Run) -> tuple[str, float]:
  """(column, value) of loss_tokens: the column is named where a run is left out for its value."""
  if math.isfinite(r.final_eval_tokens):
    return "final_eval_tokens", r.final_eval_tokens
  return "tokens_seen", r.tokens_seen


def left_out(runs: list[results.Run], max_epochs: float | None = None) -> dict[str, str]:
  """{run: why} for the runs a fit cannot use: "29 runs (of 30)" named neither the run nor the reason (an
  unfinished run's empty loss, a typo'd cell, a run past --max_epochs)."""
  # NaN or a cut <= 0 (`analyze fit --max_epochs` takes any float) dropped every run of known unique tokens and
  # fitted the rest as if nothing were wrong.
  if max_epochs is not None and not max_epochs > 0:
    raise ValueError(f"--max_epochs={max_epochs} must be a number of epochs > 0 (or left out: every run).")
  why = {}
  for r in runs:
    # The tokens column is the one read: a run evaluated last at step 0 read "tokens_seen=0" of a tokens_seen of 5e8.
    for name, x in (("params", r.params), _loss_tokens_column(r), ("final_eval_loss", r.final_eval_loss)):
      if not (math.isfinite(x) and x > 0):
        why[r.run] = f"no {name}" if math.isnan(x) else f"{name}={x:g}"
        break
    else:
      if r.unique_tokens < 0:  # not "unknown" (empty, read as every token fresh): impossible
        why[r.run] = f"unique_tokens={r.unique_tokens:g}"
      elif max_epochs is not None and r.unique_tokens > 0 and loss_tokens(r) / r.unique_tokens > max_epochs + 1e-9:
        why[r.run] = f"{loss_tokens(r) / r.unique_tokens:.3g} epochs > --max_epochs={max_epochs:g}"
  return why


def left_out_note(why: dict[str, str]) -> str:
  """A sentence naming the runs a fit left out and why ("" if none)."""
  if not why:
    return ""
  return (f"\n\nLeft out {len(why)} run{'s' if len(why) > 1 else ''}: "
          + "; ".join(f"`{run}` ({reason})" for run, reason in why.items()) + ".")


def repeated(used: list[results.Run]) -> dict[str, float]:
  """{run: epochs} of the fitted runs that saw their unique tokens more than once."""
  return {r.run: loss_tokens(r) / r.unique_tokens for r in used
          if r.unique_tokens > 0 and loss_tokens(r) > r.unique_tokens * (1 + 1e-9)}


def repeated_note(law: str, epochs: dict[str, float], leave_out: str = "") -> str:
  """Under the Chinchilla law, a sentence on the fitted runs that repeat their data ("" if none or another law):
  it reads every token as fresh, and a table of runs repeated up to 256 times was fitted without a word.
  leave_out: how the command at hand leaves them out, if it can."""
  if law != "chinchilla" or not epochs:
    return ""
  return (f"\n\n**{len(epochs)} of the fitted runs repeat their data** (up to {max(epochs.values()):.3g} epochs): "
          "the Chinchilla law counts every token seen as fresh, so it reads their losses as those of more unique "
          f"data than they had. {leave_out}`--law=data-constrained` models the repetition.")


def fit_data(runs: list[results.Run], max_epochs: float | None = None) -> tuple[list[results.Run], dict]:
  """The runs a fit can use and their arrays n, d, u, loss (`left_out` names the others)."""
  why = left_out(runs, max_epochs)
  used = [r for r in runs if r.run not in why]
  arrays = {"n": np.array([r.params for r in used]), "d": np.array([loss_tokens(r) for r in used]),
            "u": np.array([r.unique_tokens if r.unique_tokens > 0 else math.nan for r in used]),
            "loss": np.array([r.final_eval_loss for r in used])}
  return used, arrays


def fit_runs(runs: list[results.Run], law: str, *, bootstrap: int = 0, seed: int = 0,
             max_epochs: float | None = None) -> tuple[laws.Fit, list[results.Run], dict]:
  used, a = fit_data(runs, max_epochs)
  try:
    return laws.fit(law, a["n"], a["d"], a["loss"], a["u"], bootstrap=bootstrap, seed=seed), used, a
  except ValueError as e:
    why = left_out(runs, max_epochs)
    if not why or "distinct of" not in str(e):  # only the too-few-runs error is explained by the runs left out
      raise
    # "got 0 distinct of 0" of a table of 36 runs without a final_eval_loss column said nothing of why.
    reasons = collections.Counter(why.values()).most_common(3)
    raise ValueError(f"{e} Left out {len(why)} of {len(runs)} runs: "
                     + "; ".join(f"{n} with {reason}" if reason.startswith("no ") else f"{n} at {reason}"
                                 for reason, n in reasons)
                     + ("; ..." if len(set(why.values())) > 3 else "") + ".") from None


def constants_json(f: laws.Fit) -> dict:
  """The `analyze fit --json` object: the constants, `ci` {name: [lo, hi]}, and what was fitted."""
  return {**f.constants.to_dict(), "law": f.constants.law, "ci": f.ci(), "runs": f.n_points,
          "bootstrap": len(f.samples), "objective": f.objective, "at_bounds": f.at_bounds,
          "undetermined": f.undetermined, "redrawn": f.redrawn, "given_up": f.given_up,
          "refits_flagged": f.refits_flagged, "ci_untrusted": f.ci_untrusted}


def bounds_note(f: laws.Fit) -> str:
  """Sentences naming the constants the fit left on an edge of its search, or whose term is negligible at every run
  ("" if none)."""
  text = ""
  if f.at_bounds:
    names = ", ".join(f.at_bounds)
    text += (f"\n\n**{names} ran to the edge of the fit's search range**: the runs do not determine "
             f"{'it' if len(f.at_bounds) == 1 else 'them'} (or contradict the law), so the value and its interval are "
             "that edge, not an estimate.")
  negligible = [k for k in f.undetermined if k not in f.flat]
  if negligible:
    names = ", ".join(negligible)
    text += (f"\n\n**{names} {'is' if len(negligible) == 1 else 'are'} not determined by the runs**: "
             f"the law's term {'it enters' if len(negligible) == 1 else 'they enter'} is negligible (below "
             f"{laws.NEGLIGIBLE:g} of the predicted loss) at every run, so any value that keeps it so fits as well "
             "(or the runs contradict the law, e.g. a loss that grows with size); the value is where the search "
             "stopped, near its start, and the interval (often of no width) says nothing: not an estimate.")
  if f.flat:
    names = ", ".join(f.flat)
    text += (f"\n\n**{names} {'is' if len(f.flat) == 1 else 'are'} not determined by the runs**: changed together "
             "in one direction, the constants move no prediction (a singular value of the Jacobian of the predicted "
             f"log losses below {laws.FLAT:g} of the largest), so the runs fix only a combination of them, e.g. "
             "E + A / N^alpha at two model sizes, which every alpha matches with its own E and A. The value is where "
             "the search stopped and the interval says nothing: not an estimate. Add runs at more model sizes, "
             "token counts or unique tokens.")
  return text


def bootstrap_note(f: laws.Fit) -> str:
  """Sentences on the bootstrap: resamples drawn again because they could not determine the law, refits given up,
  and constants whose interval is not trusted besides those bounds_note names ("" if none)."""
  text = ""
  if f.redrawn or f.given_up:
    text += (f"\n\n{f.redrawn} bootstrap resample{'s' if f.redrawn != 1 else ''} could not determine the law (too "
             "few distinct runs, 2 model sizes, ...) and were drawn again"
             + (f"; {f.given_up} of {len(f.samples) + f.given_up} refits were given up after "
                f"{laws.MAX_DRAWS_PER_REFIT} draws per refit, so the intervals rest on {len(f.samples)}"
                if f.given_up else "") + ". The intervals describe only resamples that determine the law: where many "
             "were drawn again, they can be narrower than the runs warrant.")
  untrusted = [k for k in f.ci_untrusted if k not in {*f.at_bounds, *f.undetermined}]
  if untrusted:
    counts = ", ".join(f"{k} in {f.refits_flagged[k]}" for k in untrusted)
    text += (f"\n\n**The bootstrap interval{'s' if len(untrusted) > 1 else ''} of {', '.join(untrusted)} "
             f"{'is' if len(untrusted) == 1 else 'are'} not trustworthy**: over {laws.UNTRUSTED_SHARE:.0%} of the "
             f"{len(f.samples)} refits left {'it' if len(untrusted) == 1 else 'them'} on a bound of the search or "
             f"undetermined ({counts}): the resampled runs often cannot determine "
             f"{'it' if len(untrusted) == 1 else 'them'}, and the interval mixes estimates with bound or start "
             "values. More runs, or runs spread wider, narrow this.")
  return text


def _predicted(c: laws.Constants, a: dict):
  return laws.predict(c, a["n"], a["d"], np.where(np.isfinite(a["u"]), a["u"], a["d"]))


def _fit_plots(out_dir: Path, f: laws.Fit, used: list[results.Run], a: dict) -> list[Path]:
  pred = _predicted(f.constants, a)
  scatter = plots.save(out_dir / "fit_observed_vs_predicted.png",
                       [plots.Series(pred, a["loss"], "runs", style="o")], diagonal=True,
                       title=f"{f.constants.law} fit: final eval loss", xlabel="predicted", ylabel="observed")
  groups = defaultdict(list)  # one fitted curve per (N, U)
  for i, r in enumerate(used):
    groups[(r.params, float(a["u"][i]) if math.isfinite(a["u"][i]) else math.inf)].append(i)  # NaN != NaN
  palette = plots.colors(len(groups))
  series = []
  for color, ((n, u), idx) in zip(palette, sorted(groups.items(), key=lambda kv: (kv[0][0], np.nan_to_num(kv[0][1])))):
    d = np.geomspace(a["d"][idx].min() / 1.5, a["d"][idx].max() * 1.5, 60)
    label = f"N={n:.3g}" + (f", U={u:.3g}" if math.isfinite(u) else "")
    series.append(plots.Series(d, laws.predict(f.constants, n, d, u if math.isfinite(u) else d), label, color))
    series.append(plots.Series(a["d"][idx], a["loss"][idx], None, color, "o"))
  curves = plots.save(out_dir / "fit_loss_vs_tokens.png", series, logx=True, title="fit (lines) vs runs (dots)",
                      xlabel="tokens seen D", ylabel="final eval loss")
  return [scatter, curves]


def fit_report(runs: list[results.Run], law: str, out_dir: str | Path, *, bootstrap: int = 100, seed: int = 0,
               max_epochs: float | None = None) -> dict:
  out_dir = Path(out_dir)
  f, used, a = fit_runs(runs, law, bootstrap=bootstrap, seed=seed, max_epochs=max_epochs)
  why = left_out(runs, max_epochs)
  ci, published = f.ci(), laws.PUBLISHED[law].to_dict()
  rows = [{"constant": k, "fitted": v, "ci_low": ci.get(k, [None])[0], "ci_high": ci.get(k, [None, None])[1],
           "published": published.get(k)} for k, v in f.constants.to_dict().items()]
  resid = np.log(_predicted(f.constants, a)) - np.log(a["loss"])
  text = (f"Fitted the {law} law to {f.n_points} runs (of {len(runs)}) by Huber loss (delta {laws.HUBER_DELTA:g}) on "
          f"log-loss residuals with L-BFGS-B from a grid of starts; intervals: 2.5-97.5 percentiles of "
          f"{len(f.samples)} bootstrap refits. RMS log residual {np.sqrt(np.mean(resid ** 2)):.3g}, largest "
          f"{np.abs(resid).max():.3g}.")
  c = f.constants
  if c.R_D_star is not None:
    four = laws.effective(1.0, 3.0, c.R_D_star) / 4.0
    text += (f"\n\nWith the fitted R_D* = {c.R_D_star:.3g}: 4 epochs are worth {four:.1%} of 4 epochs of unique "
             f"data, and a repeated epoch is worth half a fresh one after {1 + c.R_D_star * math.log(2):.3g} epochs.")
  epochs = repeated(used)
  text += (left_out_note(why) + repeated_note(law, epochs, "`--max_epochs=1` leaves them out; ") + bounds_note(f)
           + bootstrap_note(f))
  paths = report.write_report(out_dir, f"Scaling-law fit ({law})",
                              [("Constants", text, _fit_plots(out_dir, f, used, a), rows)])
  return {**constants_json(f), "left_out": why, "repeated": epochs if law == "chinchilla" else {},
          "fitted_range": fitted_range(a), "report": paths}


def fitted_range(a: dict) -> dict[str, list[float]]:
  """[lo, hi] of the fitted runs' params, tokens, unique tokens (runs that know them) and epochs D / U_D, at least 1:
  the law reads fewer as fresh data (U_D = min(U, D)), and a run of unknown U as 1. fit_caveats notes a prediction
  outside them; repetition is the least certain part of the law to extrapolate."""
  out = {"params": a["n"], "tokens": a["d"], "unique_tokens": a["u"][np.isfinite(a["u"])],
         "epochs": np.maximum(a["d"] / np.where(np.isfinite(a["u"]), a["u"], a["d"]), 1.0)}
  return {k: [float(v.min()), float(v.max())] for k, v in out.items() if v.size}


def chinchilla_check(runs: list[results.Run], out_dir: str | Path, *, law: str = "auto", bootstrap: int = 100,
                     seed: int = 0) -> dict:
  """Fit the law, derive a, b of N_opt ~ C^a, D_opt ~ C^b (b / a = alpha / beta) with bootstrap intervals, and the
  compute-optimal tokens per parameter at the runs' budgets. `auto`: chinchilla if no run repeats data."""
  out_dir = Path(out_dir)
  if law == "auto":
    # Only the runs the fit can use count: a repeated run that diverged (no final loss) would otherwise pick the
    # data-constrained law for a fit that has no repeated point to determine R_D*.
    repeats = bool(repeated(fit_data(runs)[0]))
    law = "data-constrained" if repeats else "chinchilla"
  f, used, _ = fit_runs(runs, law, bootstrap=bootstrap, seed=seed)
  why = left_out(runs)
  epochs = repeated(used) if law == "chinchilla" else {}
  samples = f.samples
  exp_a, exp_b = laws.optimal_exponents(f.constants)
  ratio_ci = _interval([_b_over_a(s) for s in samples])
  # An exponent on the edge of the search, or one the runs do not determine, is not an estimate, and neither is
  # b / a = alpha / beta; nor is an interval whose refits often left one there.
  undetermined = {"alpha", "beta"} & {*f.at_bounds, *f.undetermined}
  untrusted = {"alpha", "beta"} & set(f.ci_untrusted)
  linear = None if ratio_ci is None or undetermined or untrusted else bool(ratio_ci[0] <= 1.0 <= ratio_ci[1])
  budgets = sorted({float(f"{6 * r.params * loss_tokens(r):.3g}") for r in used})
  rows = []
  for c_budget in budgets:
    n_opt, d_opt = laws.compute_optimal(f.constants, c_budget)
    interval = _interval([_tokens_per_param(s, c_budget) for s in samples]) or [None, None]
    runs_here = [r for r in used if math.isclose(6 * r.params * loss_tokens(r), c_budget, rel_tol=5e-3)]
    rows.append({"compute_C": c_budget, "N_opt": float(n_opt), "D_opt": float(d_opt),
                 "tokens_per_param": float(d_opt / n_opt), "ci_low": interval[0], "ci_high": interval[1],
                 "runs_tokens_per_param": ", ".join(f"{loss_tokens(r) / r.params:.3g}" for r in runs_here)})
  ref_a, ref_b = laws.optimal_exponents(laws.CHINCHILLA)
  verdict = ("none: the runs do not determine alpha or beta (below)" if undetermined else
             "none: the bootstrap refits often left alpha or beta on a bound or undetermined, so the interval is not "
             "trustworthy (below)" if untrusted else
             ("no interval: every bootstrap refit was given up (below)" if f.given_up else
              "no bootstrap, so no interval: rerun with --bootstrap") if linear is None else
             ("consistent with 1: tokens should grow linearly with parameters" if linear else
              "excludes 1: tokens should not grow linearly with parameters"))
  text = (f"Fitted the {law} law to {f.n_points} runs. Compute-optimal exponents: N_opt ~ C^{exp_a:.3f}, "
          f"D_opt ~ C^{exp_b:.3f}; b / a = alpha / beta = {_b_over_a(f.constants):.3f}"
          + (f" (95% bootstrap interval {ratio_ci[0]:.3f}-{ratio_ci[1]:.3f}, {len(samples)} refits)" if ratio_ci
             else "") + f": {verdict}.\n\nFor comparison, Chinchilla's published constants give a = {ref_a:.3f}, "
          f"b = {ref_b:.3f} (b / a = {ref_b / ref_a:.3f}). The table lists the fitted compute-optimal tokens per "
          "parameter at each compute budget of the runs (C = 6 N D) next to the runs' own tokens per parameter."
          + left_out_note(why) + repeated_note(law, epochs) + bounds_note(f) + bootstrap_note(f))
  png = _check_plot(out_dir / "compute_optimal.png", f, budgets, used)
  paths = report.write_report(out_dir, "Do encoder-decoders need tokens linearly in parameters?",
                              [("Answer", text, [png], rows)])
  return {"law": law, "constants": f.constants.to_dict(), "ci": f.ci(), "at_bounds": f.at_bounds,
          "undetermined": f.undetermined, "left_out": why, "repeated": epochs, "a": exp_a, "b": exp_b,
          "b_over_a": _b_over_a(f.constants), "b_over_a_ci": ratio_ci, "linear": linear, "verdict": verdict,
          "ci_untrusted": f.ci_untrusted, "budgets": rows, "report": paths}


def _check_plot(path: Path, f: laws.Fit, budgets: list[float], used: list[results.Run]) -> Path:
  cs = np.geomspace(min(budgets) / 10, max(budgets) * 10, 50)
  n_opt, d_opt = laws.compute_optimal(f.constants, cs)
  bands = {}
  if f.samples:
    ns = np.array([laws.compute_optimal(s, cs)[0] for s in f.samples])
    lo, hi = np.percentile(ns, [2.5, 97.5], axis=0)
    bands = {"n": (lo, hi), "d": (cs / (6 * hi), cs / (6 * lo))}
  run_c = [6 * r.params * loss_tokens(r) for r in used]
  series = [plots.Series(cs, n_opt, "N_opt (fit)", "tab:blue", band=bands.get("n")),
            plots.Series(cs, d_opt, "D_opt (fit)", "tab:orange", band=bands.get("d")),
            plots.Series(run_c, [r.params for r in used], "runs: N", "tab:blue", "o"),
            plots.Series(run_c, [loss_tokens(r) for r in used], "runs: D", "tab:orange", "x")]
  return plots.save(path, series, logx=True, logy=True, title="compute-optimal N and D (C = 6ND)",
                    xlabel="compute C (FLOPs)", ylabel="parameters / tokens")


# What fit_caveats calls each count, by default (`analyze predict`'s flags).
_COUNT_NAMES = {"params": "--params", "tokens": "--tokens", "unique_tokens": "--unique-tokens", "epochs": "epochs"}


def fit_caveats(fit: dict, n: float, d: float, u: float | None = None, *, names: dict[str, str] | None = None,
                what: str = "this prediction") -> list[dict]:
  """What a result from the constants of `analyze fit --json` (`fit`) at N = n, D = d (U = u unique tokens, for the
  data-constrained law) should say, as [{"code", "message"}]: the constants the runs did not determine
  (`undetermined_constants`), and counts outside the fitted runs' range (`extrapolation`, which a scaling law is for,
  but one that rests on the law holding there). `names`: what the counts are called (_COUNT_NAMES' keys), `what`: what
  rests on the constants. Constants without that record (published, or written by hand) have none."""
  names = {**_COUNT_NAMES, **(names or {})}
  notes = []
  unknown = [*(fit.get("at_bounds") or []), *(fit.get("undetermined") or [])]
  if unknown:
    notes.append({"code": "undetermined_constants", "message": f"the fit did not determine "
                  f"{', '.join(map(str, unknown))} (see its report): {what} rests on "
                  f"{'that value' if len(unknown) == 1 else 'those values'}"})
  ranges = fit.get("fitted_range") or {}
  counts = [("params", n), ("tokens", d)]
  if u is not None:  # epochs as fitted_range counts them
    counts += [("unique_tokens", u), ("epochs", max(d / u, 1.0))]
  for key, value in counts:
    lo, hi = (ranges.get(key) or [None, None])[:2]
    if checks.finite_number(lo) and checks.finite_number(hi) and not lo <= value <= hi:
      notes.append({"code": "extrapolation",
                    "message": f"{names[key]}={value:g} lies outside the fitted runs' {lo:g}-{hi:g}: an "
                               "extrapolation"})
  return notes


def prediction(c: laws.Constants, n: float, d: float, u: float | None = None, fit: dict | None = None) -> dict:
  """`analyze predict`: the predicted loss and, for the data-constrained law, the effective N' and D'; with `fit`
  (the `analyze fit --json` object the constants came from), its caveats (fit_caveats) in the note."""
  given = {"--params": n, "--tokens": d, **({} if u is None else {"--unique-tokens": u})}
  bad = {k: v for k, v in given.items() if not (math.isfinite(v) and v > 0)}
  if bad:  # the power laws of a non-positive count are NaN, not a loss
    raise ValueError(f"analyze predict needs positive, finite counts: {bad}.")
  out = {"law": c.law, "params": n, "tokens": d, "loss": float(laws.predict(c, n, d, u)), "constants": c.to_dict()}
  notes = ([caveat["message"] for caveat in fit_caveats(fit, n, d, u if c.R_D_star is not None else None)]
           if fit else [])
  if u is not None and c.R_D_star is None:
    notes.append("--unique-tokens ignored: the chinchilla law treats every token as fresh (repetition needs "
                 "--law=data-constrained)")
  if notes:
    out["note"] = "; ".join(notes)
  if c.R_D_star is not None:
    # The law takes U_D = min(U, D) (no more unique tokens than seen), but the epochs are D / U: 1e9 tokens of 1e10
    # unique ones are 0.1 epochs, as the planner reports them, not 1.
    u = d if u is None else u
    u_d = min(u, d)
    out.update(unique_tokens=u, epochs=d / u, effective_tokens=float(laws.effective_data(c, d, u_d)),
               effective_params=float(laws.effective_params(c, n, u_d)))
  return out


def _tokens_per_param(c: laws.Constants, compute: float) -> float:
  n_opt, d_opt = laws.compute_optimal(c, compute)
  return float(d_opt / n_opt)


def _b_over_a(c: laws.Constants) -> float:
  a, b = laws.optimal_exponents(c)
  return b / a


def _interval(values: list[float]) -> list[float] | None:
  """The 95% percentile interval of bootstrap values (None without any)."""
  return [float(v) for v in np.percentile(values, [2.5, 97.5])] if values else None
