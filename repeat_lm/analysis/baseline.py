"""What repetition costs against an unrepeated baseline (RQ1): a run's metric against the baseline's at equal tokens.

`repeat-lm analyze degradation --baseline=SPEC [--match=COL,...]`. SPEC picks the baseline run(s) the way
`analyze proxy` picks runs (a glob on `run`, or COL=VALUE,...), e.g. the fresh run that sees every token once. Each
other run is paired with the baseline that has its value in every `--match` column (e.g. `model` when the table holds
a fresh baseline per model size); with no `--match` there must be exactly one baseline.

cost: the run's metric minus the baseline's at the same tokens seen, in the worsening direction (loss: run minus
baseline; accuracy: baseline minus run), so a positive cost is how much worse the run is. The baseline's curve is
linear in tokens seen between its evaluations; a run's evaluations outside the baseline's range are not compared. The
cost reported is the one at the run's last compared evaluation (`cost_tokens`). A NaN (diverged) evaluation of the run
costs infinitely much; one of the baseline leaves its neighbourhood uncompared.

behind from: the first compared evaluation from which the run stays worse than the baseline by more than the onset's
tolerance (`--tolerance`, else 0.5% of the baseline's value there) through its last compared evaluation, with at
least degradation.MIN_POINTS points: where the repeated run falls behind for good, in tokens and epochs of its unique
data. It is an onset against the baseline rather than against the run's own best.

A pair without both curves compares the table's final values when the two final evaluations' tokens agree within
TABLE_TOKENS_RTOL (no "behind from" then); otherwise the row says why nothing was compared.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from repeat_lm.analysis import plots, report, results, scaling

TABLE_TOKENS_RTOL = 0.01


def pair(runs: list[results.Run], spec: str, match: Sequence[str] = ()) -> tuple[list[results.Run], dict]:
  """(the baseline runs, {run name: its baseline Run, or why it has none}) for every run that is not a baseline."""
  baselines = results.select(runs, spec)
  if not baselines:
    raise ValueError(f"--baseline={spec!r} matched no run{results.selector_hint(runs, '--baseline', spec)}; it takes "
                     "a glob on `run` or COL=VALUE[,COL=VALUE] (e.g. --baseline='*_e0' or --baseline=epochs=1).")
  missing = [c for c in match if c not in results.columns(runs)]
  if missing:
    raise ValueError(f"--match: no column {', '.join(map(repr, missing))}; columns: "
                     f"{', '.join(results.columns(runs))}.")
  others = [r for r in runs if r.run not in {b.run for b in baselines}]  # run names are unique (read_results)
  if not others:
    raise ValueError(f"--baseline={spec!r} matched every run ({len(runs)}): nothing is left to compare with it.")
  key = lambda r: tuple(results.key(r.get(c)) for c in match)  # noqa: E731 - one place that defines a pair
  by_key: dict[tuple, results.Run] = {}
  for b in baselines:
    if key(b) in by_key:
      # Which one a run meets would be an accident of the table's order.
      differ = [c for c in results.varied_factors(baselines) if c not in match]
      raise ValueError(f"Baselines `{by_key[key(b)].run}` and `{b.run}` share "
                       + (f"their values of --match={','.join(match)}" if match else "the comparison (no --match)")
                       + ": each run needs exactly one baseline. "
                       + (f"Add the column(s) they differ in to --match ({', '.join(differ)})." if differ else
                          "Narrow --baseline to one of them."))
    by_key[key(b)] = b
  pairs = {}
  for r in others:
    b = by_key.get(key(r))
    pairs[r.run] = b if b is not None else (
        "no baseline has its " + ", ".join(f"{c}={report.fmt(r.get(c))}" for c in match))
  return baselines, pairs


def compare(run: results.Curve, base: results.Curve, *, higher_is_better: bool, tolerance: float | None,
            rel_tolerance: float, min_points: int) -> dict:
  """The cost curve of `run` against `base` at the run's evaluations inside the baseline's range of tokens seen."""
  order = np.argsort(base.tokens_seen, kind="stable")
  bx, by = base.tokens_seen[order], base.value[order]
  inside = (run.tokens_seen >= bx[0] * (1 - 1e-9)) & (run.tokens_seen <= bx[-1] * (1 + 1e-9))
  tokens, value = run.tokens_seen[inside], run.value[inside]
  base_value = np.interp(tokens, bx, by)  # NaN next to a NaN evaluation of the baseline: not compared there
  bad = np.where(np.isnan(value), np.inf, -value if higher_is_better else value)
  cost = bad - (-base_value if higher_is_better else base_value)
  keep = np.isfinite(base_value)
  tokens, value, base_value, cost = tokens[keep], value[keep], base_value[keep], cost[keep]
  if tokens.size == 0:
    return {"compared_points": 0, "why": (f"its evaluations ({_span(run.tokens_seen)} tokens) lie outside the "
                                          f"baseline's with a finite value ({_span(bx)})")}
  tol = np.full(cost.shape, float(tolerance)) if tolerance is not None else rel_tolerance * np.abs(base_value)
  behind = cost > tol
  not_behind = np.flatnonzero(~behind)
  start = int(not_behind[-1]) + 1 if not_behind.size else 0
  behind_from = start if cost.size - start >= min_points else None
  return {"compared_points": int(cost.size), "tokens": tokens, "cost_curve": cost,
          "cost": float(cost[-1]), "cost_tokens": float(tokens[-1]), "value": float(value[-1]),
          "baseline_value": float(base_value[-1]),
          "behind_from_tokens": None if behind_from is None else float(tokens[behind_from])}


def _span(tokens: np.ndarray) -> str:
  return f"{np.nanmin(tokens):.4g}-{np.nanmax(tokens):.4g}" if np.isfinite(tokens).any() else "unknown"


def rows(runs: list[results.Run], pairs: dict, curves: dict[str, results.Curve], metric_suffix: str, *,
         higher_is_better: bool, tolerance: float | None, rel_tolerance: float, min_points: int
         ) -> tuple[list[dict], dict[str, dict]]:
  """(one row per paired run, {run: its compare() result with a cost curve}) in the table's order."""
  out, compared = [], {}
  for r in runs:
    b = pairs.get(r.run)
    if b is None:  # a baseline itself
      continue
    row = {"run": r.run, "baseline": b.run if isinstance(b, results.Run) else None, "source": None,
           "compared_points": 0, "cost_tokens": math.nan, "value": math.nan, "baseline_value": math.nan,
           "cost": math.nan, "behind_from_tokens": None, "behind_from_epoch": None, "why": None}
    if isinstance(b, str):
      row["why"] = b
    elif r.run in curves and b.run in curves:
      c, bc = curves[r.run], curves[b.run]
      if not (c.tokens_known and bc.tokens_known):
        row["why"] = "tokens seen are unknown for " + " and ".join(
            f"`{n}`" for n, k in ((r.run, c.tokens_known), (b.run, bc.tokens_known)) if not k)
      else:
        res = compare(c, bc, higher_is_better=higher_is_better, tolerance=tolerance, rel_tolerance=rel_tolerance,
                      min_points=min_points)
        row.update(source="curves", **{k: v for k, v in res.items() if k not in ("tokens", "cost_curve")})
        if res["compared_points"]:
          compared[r.run] = res
          t = res["behind_from_tokens"]
          row["behind_from_epoch"] = t / r.unique_tokens if t is not None and r.unique_tokens > 0 else None
    else:
      _from_table(row, r, b, metric_suffix, higher_is_better)
    out.append(row)
  return out, compared


def _from_table(row: dict, r: results.Run, b: results.Run, suffix: str, higher_is_better: bool) -> None:
  """The table's final values, when the two final evaluations saw the same tokens (within TABLE_TOKENS_RTOL)."""
  value, base_value = getattr(r, f"final_eval_{suffix}"), getattr(b, f"final_eval_{suffix}")
  t, bt = scaling.loss_tokens(r), scaling.loss_tokens(b)  # tokens seen at the final evaluations
  if not (math.isfinite(t) and math.isfinite(bt) and math.isclose(t, bt, rel_tol=TABLE_TOKENS_RTOL)):
    row["why"] = (f"no curve for both (metrics.jsonl), and the table's final evaluations are at {t:.4g} and {bt:.4g} "
                  "tokens: not the same budget")
  elif not math.isfinite(base_value):
    row["why"] = f"the baseline's final_eval_{suffix} is not a number"
  else:
    bad = math.inf if math.isnan(value) else (-value if higher_is_better else value)
    row.update(source="table", compared_points=1, cost_tokens=t, value=value, baseline_value=base_value,
               cost=bad - (-base_value if higher_is_better else base_value))


def analyze(runs: list[results.Run], curves: dict[str, results.Curve], spec: str, match: Sequence[str], *,
            metric: str, suffix: str, higher_is_better: bool, tolerance: float | None, rel_tolerance: float,
            min_points: int, out_dir) -> tuple[dict, tuple]:
  """({spec, match, baselines, runs: rows}, the report's section with its plot of cost vs tokens seen)."""
  baselines, pairs = pair(runs, spec, match)
  table, compared = rows(runs, pairs, curves, suffix, higher_is_better=higher_is_better, tolerance=tolerance,
                         rel_tolerance=rel_tolerance, min_points=min_points)
  direction = "baseline minus run" if higher_is_better else "run minus baseline"
  text = (f"Baseline{'s' if len(baselines) > 1 else ''} (--baseline={spec}): "
          + ", ".join(f"`{b.run}`" for b in baselines)
          + (f", paired with each run by {', '.join(f'`{c}`' for c in match)}" if match else "") + ". "
          f"Cost: how much worse a run's `{metric}` is than its baseline's at the same tokens seen ({direction}; "
          "positive is worse), at the run's last evaluation within the baseline's range. Behind from: the first "
          "evaluation from which the run stays worse than its baseline by more than the tolerance.")
  measured = [row for row in table if row["compared_points"]]
  found = []
  finite = [row for row in measured if math.isfinite(row["cost"])]
  if finite:
    worst = max(finite, key=lambda row: row["cost"])
    found.append(f"Largest cost: `{worst['run']}`, {worst['cost']:.4g} at {worst['cost_tokens']:.4g} tokens "
                 f"({worst['value']:.4g} against {worst['baseline_value']:.4g}).")
  diverged = [row["run"] for row in measured if not math.isfinite(row["cost"])]
  if diverged:  # an infinite cost: the run's evaluation there is NaN
    found.append(f"Diverged where compared: {', '.join(f'`{r}`' for r in diverged)}.")
  if measured:
    behind = [row for row in measured if row["behind_from_tokens"] is not None]
    epoch = lambda row: (f" (epoch {row['behind_from_epoch']:.3g})"  # noqa: E731
                         if row["behind_from_epoch"] is not None else "")
    found.append(f"{len(behind)} of the {len(measured)} compared runs fall behind their baseline for good"
                 + (": " + ", ".join(f"`{row['run']}` from {row['behind_from_tokens']:.4g} tokens{epoch(row)}"
                                     for row in behind) if behind else "") + ".")
  unmeasured = [row for row in table if not row["compared_points"]]
  if unmeasured:
    found.append("Not compared: " + "; ".join(f"`{row['run']}` ({row['why']})" for row in unmeasured) + ".")
  text += "".join(f"\n\n{paragraph}" for paragraph in found)
  pngs = [_plot(out_dir, compared, metric)] if compared else []
  section = ("Against the baseline", text, pngs, table)
  return {"spec": spec, "match": list(match), "baselines": [b.run for b in baselines], "runs": table}, section


def _plot(out_dir, compared: dict[str, dict], metric: str):
  series = [plots.Series(res["tokens"], res["cost_curve"], run, color)
            for (run, res), color in zip(compared.items(), plots.colors(len(compared)))]
  lo = min(float(res["tokens"][0]) for res in compared.values())
  hi = max(float(res["tokens"][-1]) for res in compared.values())
  series.append(plots.Series([lo, hi], [0.0, 0.0], "baseline", "black", "--"))
  slug = metric.replace("/", "_")
  return plots.save(out_dir / f"{slug}_cost_vs_baseline.png", series, title=f"{metric}: cost against the baseline",
                    xlabel="tokens seen", ylabel=f"cost ({metric}, positive is worse)")
