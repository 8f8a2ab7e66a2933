"""RQ4: tune a hyper-parameter (dropout) on an MoE proxy instead of the dense model of similar parameter count.

Proxy cost = the whole MoE sweep + one dense run at the rate the sweep chose; direct cost = the dense model swept
over the same rates (the dense runs in the table at those rates, and for rates it lacks, the mean dense run). The
paper's example: (10.6K + 7.4K USD) / ~37K USD = 0.48x. Compute of a run = flops_per_token x tokens_seen; chip-hours
come from a `chip_hours` column when the table has one, else from FLOPs / `chip_flops_per_s`.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import stats

from repeat_lm.analysis import degradation, plots, report, results


UNFINISHED = results.UNFINISHED  # statuses of a run that has not ended


def _rate(value) -> bool:
  return isinstance(value, float) and math.isfinite(value)


def rate_column(runs: list[results.Run], column: str | None = None) -> str:
  """`column`, or the first column whose name contains 'dropout' with finite numbers in every given run."""
  candidates = [column] if column else [c for c in results.columns(runs) if "dropout" in c.lower()]
  for c in candidates:
    if all(_rate(r.get(c)) for r in runs):
      return c
  # A `nan` cell is a float too, but no rate: grouped as one, it could win the sweep as its best "rate".
  for c in candidates:
    missing = [r.run for r in runs if not _rate(r.get(c))]
    if len(missing) < len(runs):
      raise ValueError(f"{c}: no rate in run(s) {', '.join(missing)}; fill it in or leave them out of --sweep / "
                       "--dense.")
  if column:  # given, but "pass --rate_column" read as if it had not been
    raise ValueError(f"--rate_column={column}: "
                     + ("no such column" if column not in results.columns(runs) else "no numeric rate in any run")
                     + f"; name the column of the dropout rates (columns: {', '.join(results.columns(runs))}).")
  raise ValueError(f"No rate column: pass --rate_column (columns: {', '.join(results.columns(runs))}).")


def _final(run: results.Run, metric: str) -> float:
  suffix, _ = degradation.METRICS[metric]
  return getattr(run, f"final_eval_{suffix}")


def by_rate(runs: list[results.Run], column: str, metric: str) -> dict[float, float]:
  """Mean final metric per rate (several runs at one rate: seeds)."""
  groups = defaultdict(list)
  for r in runs:
    groups[r.get(column)].append(_final(r, metric))
  return {rate: float(np.mean(v)) for rate, v in sorted(groups.items())}


def best_rates(table: dict[float, float], higher_is_better: bool) -> list[float]:
  """The rates whose finite value is the best, in rate order ([] if none is finite). Rates that tie are all named:
  max() named the lowest of them (a rate of 0 when every run tied), though the runs cannot tell them apart. Equal up
  to rounding is a tie: the mean of 0.1, 0.2 and 0.3 is not 0.2 in floating point."""
  finite = {k: v for k, v in sorted(table.items()) if math.isfinite(v)}
  if not finite:
    return []
  best = (max if higher_is_better else min)(finite.values())
  return [k for k, v in finite.items() if math.isclose(v, best, rel_tol=1e-9)]


def _side_best_rates(table: dict[float, float], higher_is_better: bool, side: str, runs: Sequence[results.Run],
                     metric: str) -> list[float]:
  best = best_rates(table, higher_is_better)
  if not best:
    # "No run has a finite final metric." was false for the other side (RQ4's dense run still pending).
    names = ", ".join(f"{r.run} ({r.status})" for r in list(runs)[:6]) + (", ..." if len(runs) > 6 else "")
    raise ValueError(f"No {side} run has a finite final {metric} ({names}): wait for them to finish (sweep again) or "
                     "check the table's final_eval_* columns.")
  return best


def rank_agreement(a: dict[float, float], b: dict[float, float]) -> dict:
  """Spearman and Kendall correlations of the final metric over the rates both sweeps ran (needs 3 rates)."""
  common = sorted(set(a) & set(b))
  if len(common) < 3:
    return {"rates": common, "spearman": None, "kendall": None}
  x, y = [a[k] for k in common], [b[k] for k in common]
  # NaN (a diverged run's NaN metric, or a sweep whose metric ties at every rate) is no correlation: None, which
  # the report calls undefined, rather than "Spearman nan".
  with np.errstate(all="ignore"), warnings.catch_warnings():
    warnings.simplefilter("ignore", stats.ConstantInputWarning)  # said here as "undefined", not on stderr
    spearman, kendall = float(stats.spearmanr(x, y).statistic), float(stats.kendalltau(x, y).statistic)
  return {"rates": common, "spearman": spearman if math.isfinite(spearman) else None,
          "kendall": kendall if math.isfinite(kendall) else None}


def _why_no_agreement(a: dict[float, float], b: dict[float, float]) -> str:
  rates = sorted(set(a) & set(b))
  diverged = [f"{k:g}" for k in rates if not (math.isfinite(a[k]) and math.isfinite(b[k]))]
  if diverged:
    return f"the final metric is NaN at {', '.join(diverged)}: a diverged run"
  return "one side's final metric is the same at every rate, so it ranks nothing"


def _normalised(curve: results.Curve, grid: np.ndarray) -> np.ndarray:
  v = np.interp(grid, curve.tokens_seen, curve.value)
  if not np.isfinite(v).all():  # a diverged run: its NaN range would leave it a flat zero line, not no shape
    return np.full_like(v, math.nan)
  span = v.max() - v.min()
  return (v - v.min()) / span if span > 0 else np.zeros_like(v)


def curve_similarity(a: results.Curve, b: results.Curve, points: int = 50) -> dict | None:
  """Both curves on 50 common tokens-seen points (their overlap), each min-max normalised: Pearson r and mean
  absolute difference; also the mean absolute difference of the raw values. All NaN if either curve has a
  non-finite value in the overlap (a diverged run)."""
  lo, hi = max(a.tokens_seen.min(), b.tokens_seen.min()), min(a.tokens_seen.max(), b.tokens_seen.max())
  if not hi > lo:
    return None
  grid = np.linspace(lo, hi, points)
  na, nb = _normalised(a, grid), _normalised(b, grid)
  r = float(np.corrcoef(na, nb)[0, 1]) if na.std() > 0 and nb.std() > 0 else math.nan
  raw = np.interp(grid, a.tokens_seen, a.value) - np.interp(grid, b.tokens_seen, b.value)
  return {"pearson": r, "mad_normalised": float(np.abs(na - nb).mean()), "mad_raw": float(np.abs(raw).mean())}


def run_flops(run: results.Run) -> float:
  return run.flops_per_token * run.tokens_seen


def run_chip_hours(run: results.Run, chip_flops_per_s: float | None) -> float | None:
  measured = run.get("chip_hours")
  if isinstance(measured, float) and math.isfinite(measured):
    return measured
  return run_flops(run) / chip_flops_per_s / 3600.0 if chip_flops_per_s else None


def tuning_cost(sweep: list[results.Run], dense: list[results.Run], column: str, chosen: Sequence[float],
                cost=run_flops, what: str = "FLOPs (flops_per_token x tokens_seen)") -> dict:
  """Proxy (sweep + one dense run at the rate the sweep chose) vs direct (a dense run for every run of the sweep, at
  its rate: as many seeds per rate as the sweep ran), in units of `cost(run)`. `chosen`: the sweep's best rates; when
  they tie, the one dense run is at one of them, not known which, so it costs their mean. `what`: the cost's name,
  for the errors."""
  # A NaN cost (an empty flops_per_token) gave "nan vs nan = nanx", zero ones a ZeroDivisionError, negative ones a
  # confident ratio of two negative costs: none is a cost.
  costs = {r.run: cost(r) for r in sweep + dense}
  bad = {"missing": [k for k, v in costs.items() if v is None or math.isnan(v)],
         "negative": [k for k, v in costs.items() if v is not None and v < 0],
         "zero": [k for k, v in costs.items() if v == 0], "infinite": [k for k, v in costs.items() if v == math.inf]}
  bad = {k: v for k, v in bad.items() if v}
  if bad:
    raise ValueError(f"The {what} of a run must be a positive, finite number; it is "
                     + "; ".join(f"{k} in run(s) {', '.join(v)}" for k, v in bad.items())
                     + ". Fill in or fix those runs' cells (`repeat-lm collect` writes flops_per_token and "
                     "tokens_seen; a measured cost can go in a chip_hours column).")
  dense_at = defaultdict(list)
  for r in dense:
    dense_at[r.get(column)].append(cost(r))
  mean_dense = float(np.mean([cost(r) for r in dense]))
  one = lambda rate: float(np.mean(dense_at[rate])) if rate in dense_at else mean_dense  # noqa: E731
  proxy_sweep = float(sum(cost(r) for r in sweep))
  dense_run = float(np.mean([one(rate) for rate in chosen]))
  proxy = proxy_sweep + dense_run
  # The dense model tuned the way the proxy was: one dense run for every run of the sweep (seeds included).
  direct = float(sum(one(r.get(column)) for r in sweep))
  return {"proxy_sweep": proxy_sweep, "dense_run": dense_run, "proxy": proxy, "direct": direct,
          "ratio": proxy / direct}


def analyze(runs: list[results.Run], sweep_spec: str, dense_spec: str, out_dir: str | Path, *,
            metric: str = "eval/accuracy", column: str | None = None, price_per_chip_hour: float | None = None,
            chip_flops_per_s: float | None = None) -> dict:
  # The command's floats are taken as given, and a cost is a product of them: a negative price or throughput gave
  # negative chip-hours and USD, a NaN one NaN costs, all reported as numbers.
  for flag, value in (("--price_per_chip_hour", price_per_chip_hour), ("--chip_flops_per_s", chip_flops_per_s)):
    if value is not None and not (isinstance(value, (int, float)) and 0 < value < math.inf):
      raise ValueError(f"{flag}={value} must be a positive, finite number.")
  out_dir = Path(out_dir)
  sweep, dense = results.select(runs, sweep_spec), results.select(runs, dense_spec)
  if not sweep or not dense:
    raise ValueError(f"--sweep={sweep_spec!r} matched {len(sweep)} runs and --dense={dense_spec!r} {len(dense)}; "
                     "both need at least one (a glob on `run` or COL=VALUE,...)."
                     + results.selector_hint(runs, "--sweep", sweep_spec)
                     + results.selector_hint(runs, "--dense", dense_spec))
  if {r.run for r in sweep} & {r.run for r in dense}:
    raise ValueError("Some runs match both --sweep and --dense.")
  column = rate_column(sweep + dense, column)
  higher = degradation.METRICS[metric][1]
  # A run still pending, running or interrupted has no final metric yet (or a half-trained one): in a rate's mean it
  # made the rate NaN, which best_rate passed over and the report blamed on "a diverged run". Left out, and said.
  unfinished = {r.run: r.status for r in sweep + dense if r.status in UNFINISHED}
  done_sweep, done_dense = ([r for r in side if r.run not in unfinished] for side in (sweep, dense))
  moe_table, dense_table = by_rate(done_sweep, column, metric), by_rate(done_dense, column, metric)
  moe_best = _side_best_rates(moe_table, higher, "--sweep", sweep, metric)
  dense_best = _side_best_rates(dense_table, higher, "--dense", dense, metric)
  agreement = rank_agreement(moe_table, dense_table)
  curves = {r.run: results.load_curve(r, metric) for r in sweep + dense}
  # Curves are compared and drawn on tokens seen: one without them (results.load_curve) is left out, and named.
  no_tokens = [run for run, c in curves.items() if c is not None and not c.tokens_known]
  curves = {run: None if run in no_tokens else c for run, c in curves.items()}
  similarity = []
  for rate in agreement["rates"]:
    m = [r for r in done_sweep if r.get(column) == rate and curves[r.run] is not None]
    d = [r for r in done_dense if r.get(column) == rate and curves[r.run] is not None]
    if m and d:
      s = curve_similarity(curves[m[0].run], curves[d[0].run])
      if s:
        similarity.append({column: rate, "moe_run": m[0].run, "dense_run": d[0].run, **s})
  # A cost that cannot be computed is left out of `cost` and its reason kept in `cost_undefined`: the rates and
  # their agreement still stand without it.
  costs, undefined = {}, {}
  if unfinished:  # their tokens_seen, hence their cost, is not known until they finish
    undefined["flops"] = (f"{len(unfinished)} run(s) have not finished ("
                          + ", ".join(f"{k}: {v}" for k, v in unfinished.items()) + "), so the sweep's cost is not "
                          "known yet.")
  else:
    try:
      costs["flops"] = tuning_cost(sweep, dense, column, moe_best)
    except ValueError as e:
      undefined["flops"] = str(e)
  # Every run needs a number: a `nan` chip_hours cell (csv writes missing floats so) without --chip_flops_per_s has
  # none, and one missing run would make the sums fail.
  if not unfinished and all(run_chip_hours(r, chip_flops_per_s) is not None for r in sweep + dense):
    try:
      costs["chip_hours"] = tuning_cost(sweep, dense, column, moe_best, lambda r: run_chip_hours(r, chip_flops_per_s),
                                        "chip-hours (chip_hours, else FLOPs / --chip_flops_per_s)")
    except ValueError as e:
      undefined["chip_hours"] = str(e)
    if price_per_chip_hour and "chip_hours" in costs:
      costs["usd"] = {k: v * price_per_chip_hour if k != "ratio" else v for k, v in costs["chip_hours"].items()}
  elif not unfinished:
    # Said, not left out: --price_per_chip_hour (or a chip_hours column filled for some runs) asked for a cost in
    # chip-hours and USD, and the report gave FLOPs alone without a word.
    missing = [r.run for r in sweep + dense if run_chip_hours(r, chip_flops_per_s) is None]
    if price_per_chip_hour or len(missing) < len(sweep + dense):
      undefined["chip_hours"] = (f"run(s) {', '.join(missing)} have no chip_hours cell, and without "
                                 "--chip_flops_per_s their FLOPs cannot be converted; give --chip_flops_per_s (the "
                                 "achieved FLOP/s per chip) or fill in their chip_hours.")
  if price_per_chip_hour and "usd" not in costs and not unfinished:
    undefined["usd"] = "there is no cost in chip-hours to price (above)."
  result = {"rate_column": column, "metric": metric, "moe_by_rate": moe_table, "dense_by_rate": dense_table,
            # As planner.measured_dropout: a best rate only when one rate is best, else the tied ones.
            "moe_best_rate": moe_best[0] if len(moe_best) == 1 else None,
            "moe_tied_rates": moe_best if len(moe_best) > 1 else [],
            "dense_best_rate": dense_best[0] if len(dense_best) == 1 else None,
            "dense_tied_rates": dense_best if len(dense_best) > 1 else [],
            # The sweeps agree when a best rate of one is a best rate of the other: the MoE sweep that ties 0.2 and
            # 0.3 has not chosen against the dense model's 0.3. One dense rate (RQ4's design: the MoE's choice) is
            # its best by construction: no agreement measured. Nor with one MoE rate: that "sweep" chose nothing,
            # and was reported as agreeing with the dense model's best whenever it happened to be run at it.
            "same_best_rate": (bool(set(moe_best) & set(dense_best)) if len(dense_table) > 1 and len(moe_table) > 1
                               else None),
            "rank_agreement": agreement, "curve_similarity": similarity, "curves_without_tokens": no_tokens,
            "cost": costs, "cost_undefined": undefined, "unfinished": unfinished}
  result["report"] = _report(out_dir, result, sweep, dense, curves, column)
  return result


def _best(res: dict, side: str) -> list[float]:
  """The best rate of `side` ("moe" or "dense") in a list, or its tied rates."""
  best = res[f"{side}_best_rate"]
  return [best] if best is not None else res[f"{side}_tied_rates"]


def _listed(rates: list[float], last: str = "and") -> str:
  """[0.3] -> '0.3'; [0.1, 0.2, 0.3] -> '0.1, 0.2 and 0.3'."""
  head = ", ".join(f"{r:g}" for r in rates[:-1])
  return f"{head} {last} {rates[-1]:g}" if head else f"{rates[-1]:g}"


def _agreement(moe: list[float], dense: list[float]) -> str:
  """How the dense best rates stand to the MoE sweep's (same_best_rate in words)."""
  shared = [r for r in dense if r in moe]
  if not shared:
    return "a different rate" if len(dense) == 1 else "none of them among the MoE sweep's best"
  if dense == moe:
    return "the same rate" if len(dense) == 1 else "the same rates"
  if shared == dense:  # the MoE sweep ties them with others
    return "among the MoE sweep's tied best"
  return f"{_listed(shared)} {'is' if len(shared) == 1 else 'are'} the MoE sweep's best too"


def _report(out_dir: Path, res: dict, sweep, dense, curves, column: str) -> dict:
  metric = res["metric"]
  rates = sorted(set(res["moe_by_rate"]) | set(res["dense_by_rate"]))
  png = [plots.save(out_dir / "proxy_final_vs_rate.png",
                    [plots.Series(list(res["moe_by_rate"]), list(res["moe_by_rate"].values()), "MoE sweep",
                                  "tab:blue", "o-"),
                     plots.Series(list(res["dense_by_rate"]), list(res["dense_by_rate"].values()), "dense",
                                  "tab:orange", "s--")],
                    title=f"final {metric} by {column}", xlabel=column, ylabel=f"final {metric}")]
  palette = dict(zip(rates, plots.colors(len(rates))))
  series = [plots.Series(curves[r.run].tokens_seen, curves[r.run].value,
                         f"{'MoE' if r in sweep else 'dense'} {column}={r.get(column):g}", palette[r.get(column)],
                         "-" if r in sweep else "--") for r in sweep + dense if curves[r.run] is not None]
  if series:
    png.append(plots.save(out_dir / "proxy_curves.png", series, title=f"{metric}: MoE (solid) vs dense (dashed)",
                          xlabel="tokens seen", ylabel=metric))
  ag = res["rank_agreement"]
  moe, dense_best = _best(res, "moe"), _best(res, "dense")
  one_moe_rate = len(res["moe_by_rate"]) < 2
  dense_notes = ["a tie"] * (len(dense_best) > 1) + [_agreement(moe, dense_best)] * (not one_moe_rate)
  text = (f"MoE sweep: {len(sweep)} runs over {column} = {', '.join(f'{r:g}' for r in res['moe_by_rate'])}"
          + (": one rate, so the sweep chose nothing and says nothing of the dense model's best rate."
             if one_moe_rate else f"; best {_listed(moe)}{' (a tie)' if len(moe) > 1 else ''}.")
          + f" Dense: {len(dense)} runs"
          + (f"; best {_listed(dense_best)}" + (f" ({'; '.join(dense_notes)})." if dense_notes else ".")
             if len(res["dense_by_rate"]) > 1 else
             f", all at {_listed(dense_best)}: one rate, so whether it is the dense model's best is not measured."))
  if len(ag["rates"]) >= 3:
    text += f" Over the {len(ag['rates'])} rates both ran, rank agreement of final {metric}: " + (
        f"Spearman {ag['spearman']:.3f}, Kendall {ag['kendall']:.3f}." if ag["spearman"] is not None else
        f"undefined ({_why_no_agreement(res['moe_by_rate'], res['dense_by_rate'])}).")
  else:  # said, not left out: the JSON's null rank agreement had no word in the report
    shared = f" ({_listed(ag['rates'])})" if ag["rates"] else ""
    text += (f" Rank agreement needs 3 rates that both ran; they share {len(ag['rates'])}{shared}, so it is not "
             "measured.")
  if res["curves_without_tokens"]:
    text += (f" The curves of {', '.join(f'`{r}`' for r in res['curves_without_tokens'])} have no tokens seen (no "
             "train/tokens_seen in metrics.jsonl, nor `tokens_seen` and `final_step` in the table): left out of the "
             "curve plot and similarity.")
  if res["unfinished"]:
    text += (f"\n\n**Provisional**: {len(res['unfinished'])} run(s) have not finished ("
             + ", ".join(f"`{k}` ({v})" for k, v in res["unfinished"].items()) + "): the rates' means, the best rates "
             "and their agreement are from the finished runs alone. Analyse again once they finish.")
  text += (f"\n\nTuning cost, proxy (the MoE sweep + one dense run at {_listed(moe, 'or')}"
           + (", a tie: costed as the mean dense run at those rates" if len(moe) > 1 else "")
           + ") vs direct (dense at every swept rate): ")
  if "flops" in res["cost"]:
    flops = res["cost"]["flops"]
    text += f"{flops['proxy']:.3g} vs {flops['direct']:.3g} FLOPs = **{flops['ratio']:.3f}x**."
  else:
    text += f"in FLOPs undefined: {res['cost_undefined']['flops']}"
  for unit, name in (("chip_hours", "chip-hours"), ("usd", "USD")):
    if unit in res["cost"]:
      c = res["cost"][unit]
      text += f" In {name}: {c['proxy']:.4g} vs {c['direct']:.4g} ({c['ratio']:.3f}x)."
    elif unit in res["cost_undefined"]:
      text += f" In {name}: undefined: {res['cost_undefined'][unit]}"
  rows = [{column: r, "moe_final": res["moe_by_rate"].get(r), "dense_final": res["dense_by_rate"].get(r)}
          for r in rates]
  sections = [("Summary", text, png, rows)]
  if res["curve_similarity"]:
    sections.append(("Curve similarity", "Eval curves on common tokens-seen points, each min-max normalised: "
                     "Pearson r and mean absolute difference (normalised and raw).", None, res["curve_similarity"]))
  return report.write_report(out_dir, "MoE proxy for dense hyper-parameter tuning", sections)
