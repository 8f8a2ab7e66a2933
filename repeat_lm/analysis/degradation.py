"""Multi-epoch degradation (RQ1/RQ2): best validation value, final value, gap and onset of degradation per run.

Onset (the definition the report states): with `bad` = loss, or -accuracy, and `best` its first minimum over the
evaluation points, a point is *within tolerance* when bad <= bad[best] + tol (tol = `tolerance`, else
`rel_tolerance` x |best value|, 0.5% by default). Degradation is sustained from the first point after the last
within-tolerance point, provided at least `min_points` (2) evaluation points lie from it (included) to the end and
none returns within tolerance; that point is the onset. A NaN (diverged) evaluation counts as worse than any value;
a curve with no finite value has no best (nor its step), no gap and no onset. A run whose final evaluation is not
finite (a curve's last point, or a table row with a best value) is `diverged`: the report says so instead of
nan / inf, and counts such runs per factor value (their gaps are not in the mean gap).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from repeat_lm.analysis import baseline as vs_baseline
from repeat_lm.analysis import plots, report, results

METRICS = {"eval/accuracy": ("accuracy", True), "eval/loss": ("loss", False)}  # name -> (column suffix, higher better)
REL_TOLERANCE = 0.005
MIN_POINTS = 2


@dataclasses.dataclass
class Onset:
  best_index: int
  best_value: float
  final_value: float
  gap: float  # how much worse the final value is than the best, in metric units (>= 0)
  onset_index: int | None  # None: no sustained degradation
  improved: bool  # the best is better than the first point by more than the tolerance
  tolerance: float


def detect(values, *, higher_is_better: bool, tolerance: float | None = None, rel_tolerance: float = REL_TOLERANCE,
           min_points: int = MIN_POINTS) -> Onset:
  """Onset of sustained degradation in one curve (see the module docstring)."""
  if tolerance is not None and not (math.isfinite(tolerance) and tolerance >= 0):
    raise ValueError(f"--tolerance must be a finite number >= 0 (metric units); got {tolerance}.")
  if not (math.isfinite(rel_tolerance) and rel_tolerance >= 0):
    raise ValueError(f"The relative tolerance must be a finite number >= 0; got {rel_tolerance}.")
  v = np.asarray(values, float)
  if v.size == 0:
    raise ValueError("An empty curve has no best point.")
  bad = np.where(np.isnan(v), np.inf, -v if higher_is_better else v)
  best = int(np.argmin(bad))
  if not np.isfinite(bad[best]):  # every evaluation diverged: nothing to measure degradation from
    return Onset(best, float(v[best]), float(v[-1]), math.nan, None, False, math.nan)
  tol = float(tolerance) if tolerance is not None else rel_tolerance * abs(v[best])
  within = np.flatnonzero(bad <= bad[best] + tol)
  start = int(within[-1]) + 1
  onset = start if v.size - start >= min_points else None
  gap = float(bad[-1] - bad[best]) if np.isfinite(bad[-1]) else math.inf
  return Onset(best, float(v[best]), float(v[-1]), gap, onset, bool(bad[best] < bad[0] - tol), tol)


def run_rows(runs: list[results.Run], metric: str, tolerance: float | None = None,
             rel_tolerance: float = REL_TOLERANCE) -> tuple[list[dict], dict[str, results.Curve]]:
  """One summary row per run, from its curve when MODEL_DIR/metrics.jsonl exists, else from the table (no onset)."""
  if metric not in METRICS:
    raise ValueError(f"--metric must be one of {', '.join(METRICS)}; got {metric!r}.")
  suffix, higher = METRICS[metric]
  rows, curves = [], {}
  for r in runs:
    curve = results.load_curve(r, metric)
    row = {"run": r.run, "status": r.status, "source": "curve" if curve is not None else "table"}
    if curve is None:
      best, final = getattr(r, f"best_eval_{suffix}"), getattr(r, f"final_eval_{suffix}")
      # The table's best_step is the best accuracy's; the best loss's step is not in it.
      row.update(best=best, best_step=r.best_step if higher else math.nan, best_tokens=math.nan, final=final,
                 gap=(best - final) if higher else (final - best), onset_step=None, onset_tokens=None,
                 onset_epoch=None, improved=None,
                 # Both empty is a run without an evaluation (e.g. unfinished), not a diverged one.
                 diverged=not math.isfinite(final) and math.isfinite(best))
    else:
      curves[r.run] = curve
      o = detect(curve.value, higher_is_better=higher, tolerance=tolerance, rel_tolerance=rel_tolerance)
      # Tokens seen unknown (results.load_curve): an onset step, but no onset tokens or epoch.
      onset_tokens = (float(curve.tokens_seen[o.onset_index]) if o.onset_index is not None and curve.tokens_known
                      else None)
      # A curve with no finite value has no best: no step or tokens of one either (not its first evaluation's).
      has_best = math.isfinite(o.best_value)
      row.update(best=o.best_value, best_step=float(curve.step[o.best_index]) if has_best else math.nan,
                 best_tokens=float(curve.tokens_seen[o.best_index]) if has_best else math.nan,
                 final=o.final_value, gap=o.gap,
                 onset_step=None if o.onset_index is None else float(curve.step[o.onset_index]),
                 onset_tokens=onset_tokens,
                 onset_epoch=onset_tokens / r.unique_tokens if onset_tokens is not None and r.unique_tokens > 0
                 else None, improved=o.improved, diverged=not math.isfinite(o.final_value))
    rows.append(row)
  if runs and not curves and not any(math.isfinite(row[k]) for row in rows for k in ("best", "final")):
    # Every number would be NaN, and the report would say that nothing degrades.
    raise ValueError(f"No run has a curve (model_dir/metrics.jsonl) or a final or best `{metric}` in the table "
                     f"(columns final_eval_{suffix}, best_eval_{suffix}): nothing to measure. Analyse the table "
                     "`repeat-lm collect` wrote, in place (its model_dir cells are relative to it).")
  return rows, curves


def _slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _sort_key(value):
  # NaN (an empty cell, e.g. `unique_tokens` of a run without repetition) last: compared as a number it is neither
  # smaller nor larger than anything, and sorted() would leave the other values out of order around it.
  if isinstance(value, float):
    return (2, 0.0, "") if math.isnan(value) else (0, value, "")
  return (1, 0.0, str(value))


def factor_summary(runs: list[results.Run], rows: list[dict], factor: str) -> list[dict]:
  """Per value of `factor`: runs, how many degrade, how many diverged, mean gap (of the runs with a finite one),
  median onset epoch."""
  groups = defaultdict(list)
  for r, row in zip(runs, rows):
    groups[r.get(factor)].append(row)
  out = []
  for value in sorted(groups, key=_sort_key):
    g = groups[value]
    onsets = [row["onset_epoch"] for row in g if row["onset_epoch"] is not None]
    gaps = [row["gap"] for row in g if math.isfinite(row["gap"])]
    # Counted, since their infinite gaps are left out of the mean: a group of a diverged and a healthy run read
    # as "mean gap 0", no degradation on average.
    with_curves = [row for row in g if row["source"] == "curve"]
    # Onsets come from curves: a group without one has an unknown count (None), not 0.
    out.append({factor: value, "runs": len(g),
                "degrading": sum(row["onset_step"] is not None for row in with_curves) if with_curves else None,
                "diverged": sum(bool(row.get("diverged")) for row in g),
                "mean_gap": float(np.mean(gaps)) if gaps else math.nan,
                "median_onset_epoch": float(np.median(onsets)) if onsets else None})
  return out


def _shown(rows: list[dict], every_diverged=lambda row: row.get("diverged")) -> list[dict]:
  """Rows for the report: a diverged run's (or an all-diverged group's) non-finite numbers read `diverged`, not
  nan / inf. The returned rows, and the JSON, keep the numbers. A run read from the table alone has no best step or
  best tokens whether it diverged or not (the table holds neither): those stay nan, not `diverged`."""
  def label(row, k, v):
    unknown = row.get("source") == "table" and k in ("best_step", "best_tokens")
    return ("diverged" if every_diverged(row) and isinstance(v, float) and not math.isfinite(v) and not unknown
            else v)
  return [{k: label(row, k, v) for k, v in row.items()} for row in rows]


def plot_factor(path: Path, runs: list[results.Run], rows: list[dict], curves: dict, metric: str,
                factor: str | None) -> Path:
  """Metric vs tokens seen, one line per run, coloured by the factor's value; x marks the onset."""
  values = sorted({r.get(factor) for r in runs} if factor else {None}, key=_sort_key)
  palette = dict(zip(values, plots.colors(len(values))))
  series, labelled = [], set()
  for r, row in zip(runs, rows):
    if r.run not in curves:
      continue
    c, value = curves[r.run], r.get(factor) if factor else None
    label = (f"{factor}={report.fmt(value)}" if value not in labelled else None) if factor else r.run
    labelled.add(value)
    series.append(plots.Series(c.tokens_seen, c.value, label, palette[value]))
    if row["onset_step"] is not None:
      series.append(plots.Series([row["onset_tokens"]], [c.value[c.step == row["onset_step"]][0]], None,
                                 palette[value], "x"))
  title = f"{metric} vs tokens seen" + (f", by {factor}" if factor else "")
  return plots.save(path, series, title=title, xlabel="tokens seen", ylabel=metric)


def analyze(runs: list[results.Run], out_dir: str | Path, *, metric: str = "eval/accuracy",
            group_by: str | None = None, tolerance: float | None = None,
            rel_tolerance: float = REL_TOLERANCE, baseline: str | None = None, match: Sequence[str] = ()) -> dict:
  """Rows, per-factor summaries, plots and report.{md,html} in out_dir; with `baseline` (a run selector), each other
  run's cost against its baseline at equal tokens seen (analysis/baseline.py)."""
  out_dir = Path(out_dir)
  rows, curves = run_rows(runs, metric, tolerance, rel_tolerance)
  factors = [group_by] if group_by else results.varied_factors(runs)
  if group_by and group_by not in results.columns(runs):
    raise ValueError(f"--group_by={group_by}: no such column; columns: {', '.join(results.columns(runs))}.")
  # The plots are on tokens seen: a curve without them is left out (named in the report), not drawn on its steps.
  plotted = {run: c for run, c in curves.items() if c.tokens_known}
  pngs, summaries = [], {}
  for factor in factors or [None]:
    name = f"{_slug(metric)}_by_{_slug(factor)}.png" if factor else f"{_slug(metric)}.png"
    if plotted:
      pngs.append(plot_factor(out_dir / name, runs, rows, plotted, metric, factor))
    if factor:
      summaries[factor] = factor_summary(runs, rows, factor)
  degrading = [row for row in rows if row["onset_step"] is not None]
  diverged = [row["run"] for row in rows if row["diverged"]]
  tol_text = (f"{tolerance:g} (absolute)" if tolerance is not None else f"{rel_tolerance:.2%} of the best value")
  without = [row["run"] for row in rows if row["source"] != "curve"]
  # A run still going is measured on its evaluations so far: "no onset" there is not "no degradation" (proxy leaves
  # such runs out; here their rows stay, named as provisional).
  unfinished = [(r.run, r.status) for r in runs if r.status in results.UNFINISHED]
  text = (f"{len(rows)} runs, {len(curves)} with curves (metrics.jsonl); metric `{metric}`. "
          + (f"{len(degrading)} of the {len(curves)} with curves show sustained degradation." if curves else
             "No run has a curve, so no onset of degradation can be measured.")
          + (f" Onset needs a run's curve, and {len(without)} run(s) have none (no metrics.jsonl in their model_dir, "
             f"e.g. a table moved away from its runs): {', '.join(f'`{r}`' for r in without[:8])}"
             f"{', ...' if len(without) > 8 else ''}; their degradation is unknown." if without else "")
          + (f" {len(diverged)} diverged (final `{metric}` not finite): {', '.join(f'`{r}`' for r in diverged)}."
             if diverged else "")
          + (f" **Provisional**: {len(unfinished)} run(s) have not finished ("
             + ", ".join(f"`{run}` ({status})" for run, status in unfinished) + "): their best, gap and onset are from "
             "the evaluations so far, and one without an onset may yet degrade. Analyse again once they finish."
             if unfinished else "")
          + (f" Tokens seen are unknown for {len(curves) - len(plotted)} run(s) with curves (no train/tokens_seen in "
             "their metrics.jsonl, nor `tokens_seen` and `final_step` in the table): "
             f"{', '.join(f'`{r}`' for r in curves if r not in plotted)}; their onset tokens and epochs are unknown, "
             "and the plots leave them out." if len(plotted) < len(curves) else "") + "\n\n"
          f"Onset: the first evaluation point after which `{metric}` never comes back within the tolerance "
          f"({tol_text}) of the run's best value, with at least {MIN_POINTS} evaluation points from it to the end. "
          "Gap: how much worse the final value is than the best. Onset epoch = tokens seen at the onset / unique "
          "tokens.")
  if degrading:
    # Epochs compare runs of different unique tokens; a run without unique_tokens has none, and ranking it after
    # every run that has would name a later onset as the earliest: then compare tokens seen. A run of unknown tokens
    # seen has neither, and its steps are not another run's: it is not ranked.
    timed = [row for row in degrading if row["onset_tokens"] is not None]
    by_epoch = all(row["onset_epoch"] is not None for row in timed)
    first = min(timed, key=lambda row: row["onset_epoch"] if by_epoch else row["onset_tokens"], default=None)
    largest = max(rows, key=lambda row: row["gap"] if math.isfinite(row["gap"]) else -math.inf)
    earliest = ""
    if first:
      earliest = (f"Earliest onset{' of the runs whose tokens seen are known' if len(timed) < len(degrading) else ''}"
                  f": `{first['run']}` at step {report.fmt(first['onset_step'])}"
                  + (f" (epoch {first['onset_epoch']:.3g})" if first["onset_epoch"] is not None else "") + ". ")
    text += (f"\n\n{earliest}Largest gap{' of a run that did not diverge' if diverged else ''}: `{largest['run']}` "
             f"({largest['gap']:.4g}).")
    # The docs' "a curve that never improves but worsens has its onset at the second point (`improved` false)":
    # counted among the degrading runs, such a run did not learn rather than overfit, and `improved` was computed
    # but never shown.
    never = [row["run"] for row in degrading if row["improved"] is False]
    if never:
      text += (f" {len(never)} of the degrading runs never improved on their first evaluation (`improved` false): "
               f"{', '.join(f'`{r}`' for r in never)}; they worsened from the start rather than after a best.")
  sections = [("Summary", text, pngs, _shown(rows))]
  against = None
  if baseline:
    against, section = vs_baseline.analyze(
        runs, curves, baseline, match, metric=metric, suffix=METRICS[metric][0], higher_is_better=METRICS[metric][1],
        tolerance=tolerance, rel_tolerance=rel_tolerance, min_points=MIN_POINTS, out_dir=out_dir)
    sections.append(section)
  all_diverged = lambda g: g["diverged"] and g["diverged"] == g["runs"]  # noqa: E731 - no run with a finite gap
  sections += [(f"By {f}", f"Runs grouped by `{f}`; `mean_gap` over the runs that did not diverge.", None,
                _shown(s, all_diverged)) for f, s in summaries.items()]
  paths = report.write_report(out_dir, f"Degradation ({metric})", sections)
  return {"metric": metric, "runs": rows, "by_factor": summaries, "unfinished": dict(unfinished),
          **({"baseline": against} if against else {}),
          "plots": [str(p) for section in sections for p in (section[2] or ())], **paths}
