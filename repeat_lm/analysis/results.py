"""Read the results table of `repeat-lm collect` (CSV or Parquet, one row per run) and each run's metrics.jsonl.

Required of the table: a header row; `run`; the numeric columns below (empty cells read as NaN); `model_dir` (the
run's directory, absolute or relative to the CSV's folder) for curves. Every other column is kept as text in
`Run.extra`: the varied gin values (e.g. `DROPOUT_RATE`) and anything else collect adds.

Refused, naming the line: a row with more or fewer cells than the header (an unquoted comma shifts every later
column), and text or a negative number in a numeric column (all of them are counts, losses or accuracies).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import fnmatch
import json
import math
from pathlib import Path

import numpy as np

from repeat_lm import checks

NUMERIC = ("params", "params_per_token", "flops_per_token", "unique_tokens", "epochs", "tokens_seen",
           "final_eval_tokens", "final_eval_loss", "best_eval_loss", "final_eval_accuracy", "best_eval_accuracy",
           "best_step")
# Not factors of an experiment even when they differ between runs.
NOT_FACTORS = {"run", "status", "model_dir", "params_per_token", "flops_per_token", "tokens_seen", "best_step",
               "final_eval_tokens", "final_eval_loss", "best_eval_loss", "final_eval_accuracy", "best_eval_accuracy",
               "error", "model_error", "train_steps"}
# Outcomes collect adds: fine-tuning scores (eval/squad_em -> squad_em) and fine-tuning stages' statuses.
NOT_FACTOR_SUFFIXES = ("_s", "_hours", "_status", "_em", "_f1", "_f1a", "_accuracy")
# repeat_lm's statuses (experiments/status.py) of a run that has not ended: not imported from there, since a table
# may come from elsewhere; any other status (finished, failed, or a hand-made table's own) counts as ended.
UNFINISHED = ("pending", "running", "interrupted")


@dataclasses.dataclass
class Run:
  run: str
  status: str
  model_dir: str | None
  params: float = math.nan
  params_per_token: float = math.nan
  flops_per_token: float = math.nan
  unique_tokens: float = math.nan
  epochs: float = math.nan
  tokens_seen: float = math.nan  # at the last train record
  final_eval_tokens: float = math.nan  # at the final evaluation (collect.tokens_at_step)
  final_eval_loss: float = math.nan
  best_eval_loss: float = math.nan
  final_eval_accuracy: float = math.nan
  best_eval_accuracy: float = math.nan
  best_step: float = math.nan
  extra: dict[str, str] = dataclasses.field(default_factory=dict)

  def get(self, column: str):
    """A column's value: numbers as float, other text as str, missing as None."""
    if column in NUMERIC:
      return getattr(self, column)
    if column in ("run", "status", "model_dir"):
      return getattr(self, column)
    raw = self.extra.get(column)
    return None if raw is None or raw == "" else _maybe_float(raw)


@dataclasses.dataclass
class Curve:
  """One metric of one run at its evaluation points."""
  step: np.ndarray
  tokens_seen: np.ndarray  # NaN where unknown (see load_curve)
  value: np.ndarray

  @property
  def tokens_known(self) -> bool:
    return bool(np.isfinite(self.tokens_seen).all())


def _maybe_float(text: str):
  try:
    value = float(text)
  except ValueError:
    return text
  # Every NaN cell ("nan", as csv writes a float NaN) is the one math.nan object, as an empty cell is: NaN != NaN,
  # so distinct NaN objects would each be a group of their own when runs are grouped by a column's value.
  return math.nan if math.isnan(value) else value


def _float(text: str | None) -> float:
  """A numeric cell: empty (a missing value, e.g. an unfinished run's loss) is NaN; text is a ValueError, not NaN,
  which would leave the run out of a fit unnamed, or read its unique_tokens as "every token fresh"."""
  value = math.nan if text in (None, "") else _maybe_float(text)
  if not isinstance(value, float):
    raise ValueError(f"{text!r} is not a number")
  return value


def _parquet_rows(path: Path) -> list[dict[str, str]]:
  """The rows of collect's Parquet table as text, as csv.DictReader gives the CSV's: empty cells (null, NaN) read
  as "", and a whole float (collect stores every numeric column as float64) without its ".0"."""
  import pyarrow as pa  # noqa: PLC0415 - only Parquet tables need it
  import pyarrow.parquet as pq  # noqa: PLC0415

  def text(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
      return ""
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)

  try:
    table = pq.read_table(path)
  except (pa.ArrowException, OSError) as e:
    raise ValueError(f"{path} is not a Parquet table ({e}): pass the table `repeat-lm collect` writes.") from e
  return [{k: text(v) for k, v in row.items()} for row in table.to_pylist()]


def read_results(path: str | Path) -> list[Run]:
  path = Path(path)
  if path.is_dir():  # "no such results table" of a folder that exists (a sweep ROOT) sent users looking for a typo
    inside = path / "results.csv"
    raise ValueError(f"{path} is a folder, not a results table: pass the table "
                     + (f"in it ({inside})." if inside.is_file() else
                        f"`repeat-lm collect --root={path}` writes ({inside})."))
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such results table; `repeat-lm collect --root=SWEEP_ROOT` writes one "
                            "(SWEEP_ROOT/results.csv).")
  if path.suffix == ".parquet":  # `repeat-lm collect --out=results.parquet`
    rows = _parquet_rows(path)
    lines = list(range(2, len(rows) + 2))  # as the CSV's: the header is line 1
    reader = None
  else:
    try:
      # utf-8-sig: a table saved from a spreadsheet ("CSV UTF-8") starts with a byte-order mark, which would be read
      # as part of the first column's name (`\ufeffrun`), and the table refused for want of a `run` column.
      with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        # JSON (an `analyze fit --json` record, a demo's summary.json) read as a CSV whose header is its first line:
        # a one-line object was "no runs in the results table", as if the table had lost its rows.
        if reader.fieldnames and reader.fieldnames[0].lstrip().startswith(("{", "[")):
          raise ValueError(f"{path} holds JSON, not a results table: pass the CSV (or Parquet) `repeat-lm collect` "
                           "writes; a fit's JSON is what --constants / --law-constants read.")
        rows, lines = [], []
        for row in reader:
          rows.append(row)
          lines.append(reader.line_num)  # the row's (last) line: a quoted cell may span lines
    except UnicodeDecodeError as e:
      raise ValueError(f"{path} is not UTF-8 text (offset {e.start}): pass the CSV `repeat-lm collect` "
                       "writes.") from e
    except csv.Error as e:
      raise ValueError(f"{path} is not a CSV table ({e}): pass the CSV `repeat-lm collect` writes.") from e
  if not rows:
    raise ValueError(f"{path}: no runs in the results table.")
  if "run" not in rows[0]:
    raise ValueError(f"{path}: the results table needs a `run` column (the CSV `repeat-lm collect` writes).")
  if reader is not None:
    _check_cells(path, reader.fieldnames, rows, lines)
  seen: dict[str, int] = {}
  for line, row in zip(lines, rows):
    if row["run"] in seen:  # curves and plots are keyed by run: one would be drawn with the other's
      raise ValueError(f"{path}: run {row['run']!r} appears on lines {seen[row['run']]} and {line}; give every row its "
                       "own name (e.g. prefix the sweep's when concatenating tables).")
    seen[row["run"]] = line
  runs, dirs = [], {}
  for line, row in zip(lines, rows):
    model_dir = row.get("model_dir") or None
    if model_dir and not Path(model_dir).is_absolute():
      model_dir = str(path.parent / model_dir)
    # Two rows of one MODEL_DIR are one run twice (a table concatenated with itself under prefixed names, as the
    # duplicate-name error suggests): it counted twice in every mean, per-factor count and fit, without a word.
    # collect likewise reads a link to a run of its sweep as that run, not a row of its own.
    if model_dir:
      key = Path(model_dir).resolve()
      if key in dirs:
        first_line, first_run = dirs[key]
        raise ValueError(f"{path}: runs {first_run!r} (line {first_line}) and {row['run']!r} (line {line}) have the "
                         f"same model_dir {model_dir}: one run listed twice. Keep one row per run.")
      dirs[key] = (line, row["run"])
    known = {"run", "status", "model_dir", *NUMERIC}
    runs.append(Run(run=row["run"], status=row.get("status") or "", model_dir=model_dir,
                    extra={k: v for k, v in row.items() if k not in known and k is not None},
                    **{k: _numeric_cell(path, line, k, row.get(k)) for k in NUMERIC}))
  return runs


def _check_cells(path: Path, header: list[str], rows: list[dict], lines: list[int]) -> None:
  """Every row has the header's number of cells. csv.DictReader files a row's extra cells under the key None and
  fills missing ones with None: one cell too many (an unquoted comma) shifted every later column into the wrong
  one, and the shifted numbers entered the fits. A column named twice (tables joined by hand) keeps only its last
  cell, so its rows were blamed for a missing cell."""
  twice = [k for k, n in collections.Counter(header).items() if n > 1]
  if twice:
    raise ValueError(f"{path}: the header names column {', '.join(map(repr, twice))} more than once: only one of its "
                     "cells would be read. Give every column its own name, or drop the copy.")
  for line, row in zip(lines, rows):
    extra = row.get(None) or []
    cells = len(header) + len(extra) if extra else sum(v is not None for k, v in row.items() if k is not None)
    if cells != len(header):
      raise ValueError(f"{path}: line {line} has {cells} cells, the header {len(header)}: every later column of that "
                       "row would be read as the wrong one. Quote a cell that holds a comma, or fix the row.")


def _numeric_cell(path: Path, line: int, column: str, text: str | None) -> float:
  try:
    value = _float(text)
  except ValueError:
    raise ValueError(f"{path}: line {line}: {column}={text!r} is not a number; give a number, or leave the cell "
                     "empty for a missing value.") from None
  if value < 0:  # counts, losses and accuracies: a negative unique_tokens read as "every token fresh"
    raise ValueError(f"{path}: line {line}: {column}={text} is negative, which a {column} cannot be; fix the cell, or "
                     "leave it empty for a missing value.")
  return value


def columns(runs: list[Run]) -> list[str]:
  return list(dict.fromkeys(["run", "status", "model_dir", *NUMERIC, *(k for r in runs for k in r.extra)]))


def varied_factors(runs: list[Run]) -> list[str]:
  """Columns that describe an experiment and take at least two values: unique_tokens, params, epochs and the gin
  columns (timings and metrics excluded: names with '/', ending in one of NOT_FACTOR_SUFFIXES, or starting with
  final_/best_)."""
  out = []
  for col in columns(runs):
    if col in NOT_FACTORS or "/" in col or col.endswith(NOT_FACTOR_SUFFIXES) or col.startswith(("final_", "best_")):
      continue
    values = {key(r.get(col)) for r in runs} - {None}
    if len(values) >= 2:
      out.append(col)
  return out


def key(value):
  """A cell as a comparable value: None for an empty cell or NaN (which equals nothing, itself included)."""
  return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def select(runs: list[Run], spec: str) -> list[Run]:
  """Runs matching `spec`: `COL=VALUE[,COL=VALUE...]` (VALUE may be a glob; numbers compare as numbers) or a glob
  on the run name."""
  if "=" not in spec:
    return [r for r in runs if fnmatch.fnmatchcase(r.run, spec)]
  conditions = [c.split("=", 1) for c in spec.split(",") if c.strip()]
  # 'model=moe,a*' mixes the two forms: the name glob has no column to compare (it failed to unpack).
  bad = [c[0].strip() for c in conditions if len(c) != 2 or not c[0].strip()]
  if bad:
    raise ValueError(f"Run selector {spec!r}: {', '.join(repr(b) for b in bad)} is not COLUMN=VALUE. Give either "
                     "COLUMN=VALUE conditions joined by commas, or one glob on the run name (not both).")
  return [r for r in runs if all(_matches(r.get(k.strip()), v.strip()) for k, v in conditions)]


def selector_hint(runs: list[Run], flag: str, spec: str) -> str:
  """' (FLAG: no column 'X'; columns: ...)' for a COL=VALUE selector on columns the table lacks (a misspelt
  'modle=moe_large' matched nothing, and the error did not say why), else ''."""
  if "=" not in spec:
    return ""
  known = columns(runs)
  named = dict.fromkeys(part.split("=", 1)[0].strip() for part in spec.split(","))
  unknown = [c for c in named if c and c not in known]
  return (f" ({flag}: no column {', '.join(map(repr, unknown))}; columns: {', '.join(known)})" if unknown else "")


def _matches(value, pattern: str) -> bool:
  if value is None:
    return False
  if isinstance(value, float):
    want = _maybe_float(pattern)
    if isinstance(want, float):
      return math.isclose(value, want, rel_tol=1e-9, abs_tol=1e-12)
    value = f"{value:g}"
  return fnmatch.fnmatchcase(str(value), pattern)


def number(value) -> float:
  """A metrics.jsonl value as a float: the trainer writes non-finite values as "nan" / "inf" strings; a null (as a
  strict-JSON tool writes NaN) or any other non-number is NaN."""
  try:
    return float(value)
  except (TypeError, ValueError):
    return math.nan


def read_metrics(model_dir: str | Path) -> list[dict]:
  """The records of MODEL_DIR/metrics.jsonl ([] without one): JSON objects with a numeric `step`. Other lines are
  skipped: blank ones, one cut by a crash mid-write, and lines of corrupt bytes (decoded with replacement, so that
  they fail to parse rather than end collect and analyze with a UnicodeDecodeError that names no file), as are
  objects without a step, which every reader sorts and keys by."""
  path = Path(model_dir) / "metrics.jsonl"
  if not path.is_file():
    return []
  records = []
  for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(record, dict) and checks.finite_number(record.get("step")):
      records.append(record)
  return records


def load_curve(run: Run, metric: str) -> Curve | None:
  """`metric` (e.g. 'eval/accuracy') at every step that logged it, with tokens seen at that step; None without a
  metrics.jsonl. Eval records carry no `train/tokens_seen`: it is interpolated from the train records by step.
  Without train records, the table's `tokens_seen` at its `final_step` gives the tokens per step, else tokens are
  unknown (NaN)."""
  if not run.model_dir:
    return None
  steps, values, train_steps, train_tokens = [], [], [], []
  for record in read_metrics(run.model_dir):
    if "train/tokens_seen" in record and math.isfinite(number(record["train/tokens_seen"])):
      train_steps.append(float(record["step"]))
      train_tokens.append(number(record["train/tokens_seen"]))
    if metric in record:
      steps.append(float(record["step"]))
      values.append(number(record[metric]))
  if not steps:
    return None
  # One point per step: a step evaluated twice (`repeat-lm eval` of a checkpoint already evaluated in training)
  # keeps its last record, as collect's final value does; a duplicate would count as two evaluation points.
  by_step = dict(zip(steps, values))
  step = np.array(sorted(by_step))
  return Curve(step, _tokens_at(step, train_steps, train_tokens, run), np.array([by_step[s] for s in step]))


def _tokens_at(step: np.ndarray, train_steps: list[float], train_tokens: list[float], run: Run) -> np.ndarray:
  if any(s > 0 for s in train_steps):
    return tokens_at(step, train_steps, train_tokens)
  # No train records (an eval-only log, a table from elsewhere): a constant number of tokens per step, from the
  # table's tokens_seen and the step it was counted at, collect's final_step (the last train record's; the last
  # evaluation's step is earlier when a run stopped between evaluations). Without them the tokens are unknown: the
  # step numbers read as tokens gave onsets in steps and epochs off by the tokens per step.
  last = run.get("final_step")
  if 0 < run.tokens_seen < math.inf and isinstance(last, float) and 0 < last < math.inf:
    return step * (run.tokens_seen / last)
  return np.full(step.shape, math.nan)


def tokens_at(step: np.ndarray, train_steps: list[float], train_tokens: list[float]) -> np.ndarray:
  """Tokens seen at each `step` from train records (step, tokens seen), at least one past step 0: linear between
  them from 0 tokens at step 0, past the last one at its rate. Also what collect pairs a final evaluation with."""
  xs, ys = np.array([0.0, *train_steps]), np.array([0.0, *train_tokens])
  order = np.argsort(xs, kind="stable")
  xs, ys = xs[order], ys[order]
  tokens = np.interp(step, xs, ys)
  beyond = step > xs[-1]  # evaluations after the last train record: extrapolate at the last rate
  tokens[beyond] = ys[-1] * step[beyond] / xs[-1]
  return tokens
