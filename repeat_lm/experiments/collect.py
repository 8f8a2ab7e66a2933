"""`repeat-lm collect`: every run under a sweep ROOT as one row of a table (CSV or Parquet), the table
`repeat-lm analyze` reads (docs/analysis.md).

A row holds the run's status (runs still going or failed are rows too), its varied gin values (from status.json),
its model's parameters and FLOPs (models/info.py on the run's own gin), its data (unique tokens, epochs, tokens
seen), its validation loss and accuracy (final and best, and the step of the best accuracy, from metrics.jsonl) and
the scores of its fine-tuning stages (eval/squad_em of ROOT/RUN/ft_squad -> column squad_em; with several stages
ft_<stage>_squad_em, one set per stage).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from repeat_lm import files
from repeat_lm.analysis import results
from repeat_lm.experiments import status as status_lib

BASE_COLUMNS = ("run", "status", "model_dir", "params", "params_per_token", "flops_per_token", "unique_tokens",
                "epochs", "tokens_seen", "final_eval_tokens", "final_eval_loss", "best_eval_loss",
                "final_eval_accuracy", "best_eval_accuracy", "best_step", "final_step", "train_steps",
                "final_train_loss", "elapsed_s", "error", "model_error")
# Columns that hold text whatever their cells (all empty when no run failed): Parquet types them as strings, so the
# schema of two sweeps' tables is the same and they concatenate.
TEXT_COLUMNS = ("run", "status", "model_dir", "error", "model_error")
# Evaluation keys that are the pre-training objective's, not a fine-tuning task's score.
_OBJECTIVE_EVAL = {"eval/loss", "eval/accuracy", "eval/z_loss"}
# The MoE router's statistics (eval/moe_router_confidence, ...) are the model's, not a task's score.
_MODEL_EVAL_PREFIX = "eval/moe_"
# Switch drops a few percent of its routing assignments at capacity 1.25; an MoE whose sparse layers drop this share or
# more at its last evaluation sends most tokens to a few experts, and a result it stands in for (a proxy's best rate)
# is suspect.
MOE_DROPPED_WARNING = 0.2


def metrics_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Final and best validation loss/accuracy (best_step: of the best accuracy, the paper's metric), tokens seen."""
  out: dict[str, Any] = {}
  train = [r for r in records if "train/loss" in r]
  if train:
    last = max(train, key=lambda r: r["step"])
    # Tokens seen that are missing, "nan" or "inf" are unknown (NaN, an empty cell), and measure no unique tokens:
    # round() of NaN or inf ended collect, for every run of the table, with an error that named no file.
    seen = results.number(last.get("train/tokens_seen"))
    out.update(final_step=last["step"], final_train_loss=results.number(last["train/loss"]),
               tokens_seen=seen if math.isfinite(seen) else math.nan)
    epochs = results.number(last.get("train/epochs"))
    unique = out["tokens_seen"] / epochs if epochs > 0 else math.nan
    if math.isfinite(unique) and unique > 0:
      out["measured_unique_tokens"] = round(unique)
  evals = sorted((r for r in records if "eval/loss" in r), key=lambda r: r["step"])
  if evals:
    loss = [results.number(r["eval/loss"]) for r in evals]
    acc = [results.number(r.get("eval/accuracy")) for r in evals]
    out.update(final_eval_loss=loss[-1], final_eval_accuracy=acc[-1],
               final_eval_tokens=tokens_at_step(train, evals[-1]["step"]))
    if "eval/moe_fraction_dropped" in evals[-1]:
      out["final_eval_moe_fraction_dropped"] = results.number(evals[-1]["eval/moe_fraction_dropped"])
    finite_loss = [v for v in loss if math.isfinite(v)]
    finite_acc = [(v, r["step"]) for v, r in zip(acc, evals) if math.isfinite(v)]
    out["best_eval_loss"] = min(finite_loss) if finite_loss else math.nan
    if finite_acc:
      best = max(finite_acc, key=lambda t: t[0])  # the first step reaching the best value
      out.update(best_eval_accuracy=best[0], best_step=best[1])
  return out


def tokens_at_step(train: Sequence[dict[str, Any]], step: int) -> float:
  """Tokens seen at `step` from the train records, as analysis reads curves (`results.tokens_at`); NaN without any.
  The final evaluation of a run that stopped early can lie between train records; a scaling-law point pairs its loss
  with these tokens, not the last train record's."""
  points = [(float(r["step"]), results.number(r.get("train/tokens_seen"))) for r in train]
  points = [(s, t) for s, t in points if math.isfinite(t) and s > 0]
  if not points:
    return math.nan
  return float(results.tokens_at(np.array([float(step)]), *map(list, zip(*points)))[0])


def downstream_scores(records: Sequence[dict[str, Any]]) -> dict[str, float]:
  """A fine-tuning stage's task scores at its last evaluation: eval/squad_em -> squad_em."""
  scores: dict[str, float] = {}
  for r in sorted(records, key=lambda r: r["step"]):
    for k, v in r.items():
      if k.startswith("eval/") and k not in _OBJECTIVE_EVAL and not k.startswith(_MODEL_EVAL_PREFIX):
        scores[k[len("eval/"):]] = results.number(v)
  return scores


def model_summary(gin_path: str | Path) -> dict[str, Any]:
  """Parameters and FLOPs of the model a run gin builds, at its feature lengths; {} if it cannot be built."""
  from repeat_lm import gin_utils  # noqa: PLC0415 - jax and the model stack load only when a table is built
  from repeat_lm.models import info  # noqa: PLC0415
  import gin  # noqa: PLC0415
  try:
    config = gin_utils.configured_macro([str(gin_path)], [], "MODEL").module.config
    # The same parse still holds the run's plain macros.
    lengths, batch, task = (gin.query_parameter(f"%{k}") for k in ("TASK_FEATURE_LENGTHS", "BATCH_SIZE",
                                                                   "MIXTURE_OR_TASK_NAME"))
    m = info.model_info(config, lengths["inputs"], lengths["targets"])
  except Exception as e:  # a row is still worth having without its parameter count
    return {"model_error": f"{type(e).__name__}: {e}"}
  return {"params": m["params_total"], "params_per_token": m["params_per_token"],
          "flops_per_sequence": m["train_flops_per_sequence"], "flops_per_slot": m["train_flops_per_token"],
          "batch_size": batch, "task": task if isinstance(task, str) else None}


def task_data(task: str | None) -> dict[str, Any]:
  """Unique tokens and epochs a task name of the repeated scheme spells (docs/data.md)."""
  if not task:
    return {}
  from repeat_lm.data import tasks  # noqa: PLC0415
  spec = tasks.parse_name(task)
  if not spec:
    return {}
  d = spec.get("unique_tokens")
  e = spec.get("epochs") or (spec["total_tokens"] // d if spec.get("total_tokens") and d else None)
  return {"unique_tokens": d, "epochs": e}


def _relative(path: Path, out_dir: Path | None) -> str:
  if out_dir is None:
    return str(path.resolve())
  try:
    return os.path.relpath(path.resolve(), out_dir.resolve())
  except ValueError:
    return str(path.resolve())


def shown_status(run_dir: str | Path, record: dict[str, Any]) -> str:
  """The status collect shows: status_lib.effective, except that an interrupted run whose last step's checkpoint
  exists is finished, as docs/experiments.md defines it (a sweep killed while its trainer went on to the end showed
  'interrupted' beside the final metrics until the next sweep recorded it)."""
  state = status_lib.effective(record)
  return status_lib.FINISHED if state == status_lib.INTERRUPTED and status_lib.is_complete(run_dir) else state


def outcome(run_dir: str | Path) -> dict[str, Any]:
  """Status, varied values and validation metrics of a run: the cheap part of a row (no model is built)."""
  record = status_lib.read(run_dir)
  return {"status": shown_status(run_dir, record), **(record.get("values") or {}),
          **metrics_summary(results.read_metrics(run_dir))}


def row(run_dir: str | Path, out_dir: Path | None = None) -> dict[str, Any]:
  """One run's row (see the module docstring); `model_dir` relative to `out_dir` (absolute without it)."""
  run_dir = Path(run_dir)
  record = status_lib.read(run_dir)
  gin_path = run_dir / status_lib.GIN_FILE
  gin_text = gin_path.read_text() if gin_path.exists() else ""
  # The directory's name, not status.json's `run`: a run moved aside (`mv a a.old`, then swept again) keeps the
  # record of `a`, and two rows named `a` make the table unreadable to `analyze`.
  r: dict[str, Any] = {"run": run_dir.name, "status": shown_status(run_dir, record),
                       "model_dir": _relative(run_dir, out_dir), "train_steps": status_lib.train_steps(gin_text),
                       "elapsed_s": record.get("elapsed_s"), "error": record.get("error")}
  m = model_summary(gin_path) if gin_text else {}
  # A gin the model cannot be built from leaves params empty; model_error says why.
  r.update(params=m.get("params"), params_per_token=m.get("params_per_token"), model_error=m.get("model_error"))
  summary = metrics_summary(results.read_metrics(run_dir))
  r.update({k: v for k, v in summary.items() if k != "measured_unique_tokens"})
  data = task_data(m.get("task"))
  r["unique_tokens"] = summary.get("measured_unique_tokens") or data.get("unique_tokens")
  r["epochs"] = data.get("epochs") or (summary["tokens_seen"] / r["unique_tokens"]
                                       if r["unique_tokens"] and summary.get("tokens_seen") else None)
  if m.get("flops_per_sequence"):
    # FLOPs per token seen, so that flops_per_token x tokens_seen is the run's training FLOPs (analysis.md);
    # before any metrics, per token of the (inputs + targets) row.
    seen, step = summary.get("tokens_seen"), summary.get("final_step")
    r["flops_per_token"] = (m["flops_per_sequence"] * m["batch_size"] * step / seen if seen and step
                            else m["flops_per_slot"])
  r.update(record.get("values") or {})
  stages = record.get("finetune") or []
  for name in stages:
    ft_dir = run_dir / f"ft_{name}"
    r[f"ft_{name}_status"] = shown_status(ft_dir, status_lib.read(ft_dir))
    scores = downstream_scores(results.read_metrics(ft_dir))
    # One stage: squad_em. Several (say two learning rates on one task) would write the same names, so each
    # stage's scores carry its name: ft_squad_lr1_squad_em.
    r.update(scores if len(stages) == 1 else {f"ft_{name}_{k}": v for k, v in scores.items()})
  return r


def run_dirs(root: str | Path) -> list[Path]:
  """Run directories of a sweep ROOT, in the experiment's order (status.json `index`), then by name."""
  root = Path(root)
  # A file (often ROOT/results.csv) was reported as "does not exist; run sweep first".
  if root.exists() and not root.is_dir():
    raise ValueError(f"Sweep root {root} is a file, not a directory: pass the directory given to "
                     "`repeat-lm sweep --root` (ROOT, not ROOT/results.csv).")
  if not root.is_dir():
    raise FileNotFoundError(f"Sweep root {root} does not exist; run `repeat-lm sweep --root={root} ...` first.")
  dirs = [p for p in root.iterdir() if p.is_dir() and ((p / status_lib.STATUS_FILE).exists() or
                                                       (p / status_lib.GIN_FILE).exists())]
  # A symlink to a run of ROOT (`latest -> d27_e8`) is that run again, not a row of its own; one to a run elsewhere
  # (another sweep's, linked in to compare) is kept.
  seen: set[Path] = set()
  unique = []
  for p in sorted(dirs, key=lambda p: (p.is_symlink(), p.name)):
    if p.resolve() not in seen:
      seen.add(p.resolve())
      unique.append(p)
  # An index of null (status.json's fields may be null: read() accepts it) sorts last, as a missing one: compared with
  # the others' numbers it ended collect with a TypeError traceback.
  return sorted(unique, key=lambda p: (_index(status_lib.read(p)), p.name))


def _index(record: dict[str, Any]) -> float:
  index = record.get("index")
  return math.inf if index is None else index


def collect(root: str | Path, out: str | Path | None = None) -> list[dict[str, Any]]:
  """Rows of every run under `root`; written to `out` (.csv, or .parquet via pyarrow) if given."""
  out_dir = Path(out).parent if out else None
  dirs = run_dirs(root)
  if not dirs and out:
    # Written, an empty table passed for a result (exit 0) the first time, and was refused the next.
    raise ValueError(f"{root} holds no sweep runs (no RUN/status.json or RUN/run.gin): no table written to {out}. "
                     "Point --root at the directory given to `repeat-lm sweep --root`.")
  if out:  # before the rows: a wrong --out was named only after every run's model had been built (minutes)
    check_out(out)
  with status_lib.slurm_cache():  # one squeue call for all the runs' jobs
    status_lib.prefetch_slurm(status_lib.read(p) for d in dirs for p in [d, *d.glob("ft_*")])
    rows = [row(d, out_dir) for d in dirs]
  if out:
    write_table(rows, out)
  return rows


def moe_warnings(rows: Sequence[dict[str, Any]]) -> list[str]:
  """One line per MoE run whose sparse layers dropped MOE_DROPPED_WARNING or more of their routing assignments at its
  last evaluation (the collapse a table of losses does not show)."""
  dropped = {r["run"]: r["final_eval_moe_fraction_dropped"] for r in rows
             if (r.get("final_eval_moe_fraction_dropped") or 0.0) >= MOE_DROPPED_WARNING}
  return [f"{run}: its sparse layers dropped {share:.0%} of their routing assignments (token x chosen expert) at the "
          "last evaluation (final_eval_moe_fraction_dropped): the router sends most tokens to a few experts and the "
          "rest of them skip those experts, so the MoE is not the model it stands for; look at its "
          "train/moe_expert_usage_max and moe_router_confidence, and raise the capacity factors, the "
          "load-balancing weight or the router's experts per token (top-2)." for run, share in dropped.items()]


def metrics_warnings(rows: Sequence[dict[str, Any]]) -> list[str]:
  """One line per finished run whose metrics.jsonl does not reach its last step: the trainer records that step (and
  evaluates at it) before saving the checkpoint that makes the run finished, so the file was cut or replaced since,
  and the row's final_* and best_* values are of an earlier step (a table of them read as the runs' results)."""
  lines = []
  for r in rows:
    last, logged = r.get("train_steps"), r.get("final_step")
    if r.get("status") == status_lib.FINISHED and last and logged != last:
      lines.append(f"{r['run']}: finished at step {last}, but its metrics.jsonl "
                   f"{f'ends at step {logged}' if logged is not None else 'holds no training record'} (cut or "
                   "replaced since): its final_* and best_* values are not its last step's. `repeat-lm eval "
                   "--gin_file=gin/runs/eval.gin --gin_file=RUN/run.gin` evaluates its last checkpoint again.")
  return lines


def columns(rows: Sequence[dict[str, Any]]) -> list[str]:
  return list(dict.fromkeys([*BASE_COLUMNS, *(k for r in rows for k in r)]))


def _cell(value: Any) -> Any:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return None
  if isinstance(value, (dict, list, tuple)):
    return json.dumps(value, sort_keys=True)
  return value


def check_out(out: str | Path) -> None:
  """Raise ValueError unless `out` names a .csv or .parquet file that can be written (no directory, no file where
  one of its folders would be)."""
  out = Path(out)
  if out.suffix not in (".parquet", ".csv"):
    raise ValueError(f"--out={out}: write a .csv or a .parquet file.")
  files.check_writable_file(out, f"--out={out}")


def write_table(rows: Sequence[dict[str, Any]], out: str | Path) -> Path:
  out = Path(out)
  check_out(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  # Written beside `out` and renamed over it: a collect interrupted mid-write leaves the previous table whole.
  tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
  try:
    _write_table(rows, tmp, parquet=out.suffix == ".parquet")
    tmp.replace(out)
  finally:
    tmp.unlink(missing_ok=True)
  return out


def _write_table(rows: Sequence[dict[str, Any]], out: Path, parquet: bool) -> None:
  cols = columns(rows)
  cells = [{c: _cell(r.get(c)) for c in cols} for r in rows]
  if parquet:
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415
    data = {}
    for c in cols:
      values = [r[c] for r in cells]
      numeric = c not in TEXT_COLUMNS and all(
          v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values)
      data[c] = pa.array([None if v is None else float(v) for v in values], pa.float64()) if numeric else \
          pa.array([None if v is None else str(v) for v in values], pa.string())
    pq.write_table(pa.table(data), out)
  else:
    with out.open("w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=cols)
      writer.writeheader()
      writer.writerows({c: "" if v is None else v for c, v in r.items()} for r in cells)
