"""How an experiment gin says which runs it wants: `sweep.Grid` (axes x arms), `sweep.Finetune`, `sweep.Best`.

An experiment gin includes a model gin and a run gin, sets what every run shares, and binds `SWEEP` to one grid or a
list of grids (gin scopes tell them apart):

  from __gin__ import dynamic_registration
  from repeat_lm.experiments import sweep
  SWEEP = @sweep.Grid()
  sweep.Grid.axes = {'MIXTURE_OR_TASK_NAME': ['repeat_lm.c4.t5.span.d27.e8', 'repeat_lm.c4.t5.span.d35.e0'],
                     'DROPOUT_RATE': [0.0, 0.1]}          # product (default) -> 4 runs; mode = 'zip' pairs them
  sweep.Grid.arms = [{'name': 'moe', 'model': 'gin/models/moe_base.gin'}, {'model': 'gin/models/t5_1_1_large.gin'}]

Every key is a gin binding name (a macro such as DROPOUT_RATE, or `configurable.param`) and every value a Python
value written into the run's gin with repr; a string starting with '@' or '%' is written as a gin reference
('@tasks.repeated_task()'). Two keys are special: 'model' (a model gin that replaces the experiment gin's own
`include 'gin/models/...'` line) and 'name' (an arm's label). Runs = arms x axes (product or zip), each named from
its varied values: 'd27_e8_dropout0.1' (see `label`).
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

MODEL_KEY, NAME_KEY = "model", "name"


@dataclasses.dataclass(frozen=True)
class Best:
  """A value chosen from finished runs: `column` of the run among `runs` (a glob) with the best `metric`.

  RQ4: the dense model's DROPOUT_RATE = the rate of the MoE sweep's best final accuracy. Until every matching run has
  finished, the run that uses it waits (and its gin shows `default`).
  """
  runs: str
  column: str
  metric: str = "final_eval_accuracy"
  mode: str = "max"  # 'max' for accuracy, 'min' for loss
  default: Any = None

  def __post_init__(self):
    if self.mode not in ("max", "min"):  # any other word would silently pick the worst run
      raise ValueError(f"sweep.Best(runs={self.runs!r}).mode must be 'max' (accuracy) or 'min' (loss), got "
                       f"{self.mode!r}.")


@dataclasses.dataclass(frozen=True)
class Finetune:
  """A fine-tuning stage after every pre-training run: `repeat-lm finetune` from its final checkpoint.

  Its gin is the run's model gin, `gin_files`, the run's model settings (t5.T5Config, moe.MoeConfig bindings that
  are not macros) and `bindings`; it trains into ROOT/RUN/ft_<name>, and `collect` adds its scores (eval/squad_em ->
  column squad_em; ft_<name>_squad_em when a run has several stages).
  """
  name: str
  bindings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  gin_files: Sequence[str] = ("gin/runs/finetune.gin",)

  def __post_init__(self):
    # The stage trains into ROOT/RUN/ft_<name>, one folder: 'squad/v1' made ROOT/RUN/ft_squad/v1, which the sweep
    # could not tell back from its stage name (a StopIteration traceback), and '' made every stage 'ft_'.
    if not isinstance(self.name, str) or not self.name or "/" in self.name or "\\" in self.name:
      raise ValueError(f"sweep.Finetune.name must be a non-empty folder name without '/' (the stage trains into "
                       f"ROOT/RUN/ft_<name>), got {self.name!r}; e.g. name = 'squad_v1'.")


@dataclasses.dataclass(frozen=True)
class Grid:
  """Runs = arms x axes.

  axes: binding -> list of values; `mode` 'product' (every combination) or 'zip' (i-th values together).
  arms: runs that differ in several bindings at once (a model gin, its own settings); each a dict, may hold 'name'.
  bindings: fixed for every run of this grid (on top of the experiment gin).
  prefix: prepended to the run names ('<prefix>_<labels>'): tells grids of one experiment apart.
  labels: short names of binding keys in run names ({'LABEL_SMOOTHING': 'ls'}).
  finetune: stages run from each run's final checkpoint.
  """
  axes: Mapping[str, Sequence[Any]] = dataclasses.field(default_factory=dict)
  mode: str = "product"
  arms: Sequence[Mapping[str, Any]] = ({},)
  bindings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  prefix: str = ""
  labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
  finetune: Sequence[Finetune] = ()


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One run of an experiment: its name, model gin override and bindings (in order)."""
  name: str
  model: str | None
  bindings: tuple[tuple[str, Any], ...]
  finetune: tuple[Finetune, ...] = ()

  @property
  def best(self) -> dict[str, Best]:
    return {k: v for k, v in self.bindings if isinstance(v, Best)}


# ---- values -> gin text ----

def render(value: Any) -> str:
  """A Python value as gin source; '@...' / '%...' strings are references, written as they are."""
  if isinstance(value, str) and value[:1] in ("@", "%"):
    return value
  if isinstance(value, Best):
    return render(value.default)
  if isinstance(value, (list, tuple)):
    inner = ", ".join(render(v) for v in value)
    return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
  if isinstance(value, Mapping):
    return "{" + ", ".join(f"{render(k)}: {render(v)}" for k, v in value.items()) + "}"
  return repr(value)


# ---- run names ----

_TOKEN_SPLIT = re.compile(r"[./:_\s]+")


def _short_key(key: str, labels: Mapping[str, str]) -> str:
  if key in labels:
    return labels[key]
  short = key.rsplit(".", 1)[-1].lower()
  return short[: -len("_rate")] if short.endswith("_rate") else short


def _string_labels(values: Sequence[str]) -> dict[str, str]:
  """Distinct strings -> the tokens that tell them apart: common leading and trailing tokens dropped.

  'repeat_lm.c4.t5.span.d27.e8' vs '...d35.e0' -> 'd27_e8', 'd35_e0'; 'gin/models/t5_1_1_large.gin' -> 'large'.
  """
  distinct = list(dict.fromkeys(values))
  toks = {v: [t for t in _TOKEN_SPLIT.split(Path(v).stem if v.endswith(".gin") else v) if t] for v in distinct}
  if len(distinct) < 2:
    return {v: "_".join(t) for v, t in toks.items()}
  lists = list(toks.values())
  head = 0
  while all(len(t) > head for t in lists) and len({t[head] for t in lists}) == 1:
    head += 1
  tail = 0
  while all(len(t) > head + tail for t in lists) and len({t[-1 - tail] for t in lists}) == 1:
    tail += 1
  return {v: "_".join(t[head:len(t) - tail]) or "_".join(t) for v, t in toks.items()}


def label(key: str, value: Any, siblings: Sequence[Any], labels: Mapping[str, str] = {}) -> str:
  """The part of a run name for `key = value`, given every value `key` takes in the grid (`siblings`)."""
  if isinstance(value, Best):
    return f"{_short_key(key, labels)}best"
  if isinstance(value, str):
    strings = [v for v in siblings if isinstance(v, str)] or [value]
    text = _string_labels(strings)[value]
    # A string that varies names itself ('d27_e8', 'large'); a lone one is prefixed with its key.
    return text if key == MODEL_KEY or len(set(strings)) > 1 else f"{_short_key(key, labels)}_{text}"
  if isinstance(value, float):
    text = f"{value:g}"
  elif isinstance(value, (list, tuple, Mapping)):
    items = value.values() if isinstance(value, Mapping) else value
    text = "-".join(str(v) for v in items)
  else:
    text = str(value).lower() if isinstance(value, bool) or value is None else str(value)
  return f"{_short_key(key, labels)}{text}"


def sanitize(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-_") or "run"


# ---- expansion ----

def _axis_points(grid: Grid) -> list[list[tuple[str, Any]]]:
  keys = list(grid.axes)
  columns = [list(grid.axes[k]) for k in keys]
  if grid.mode == "zip":
    if len({len(c) for c in columns}) > 1:
      raise ValueError(f"Grid mode 'zip' needs axes of equal length, got "
                       f"{ {k: len(c) for k, c in zip(keys, columns)} }.")
    combos = list(zip(*columns)) if columns else [()]
  elif grid.mode == "product":
    combos = list(itertools.product(*columns))
  else:
    raise ValueError(f"Grid mode must be 'product' or 'zip', got {grid.mode!r}.")
  return [list(zip(keys, combo)) for combo in combos]


def _repeated(names: Iterable[str]) -> list[str]:
  """The names that occur more than once, sorted."""
  return sorted(n for n, count in collections.Counter(names).items() if count > 1)


# Names that are no directory of their own under ROOT: ROOT/. is ROOT, ROOT/.. its parent (another run's, maybe).
_NOT_RUN_NAMES = (".", "..")


def expand(grid: Grid) -> list[RunSpec]:
  """The grid's runs, arms outermost, each with a name made of its arm's and axes' labels."""
  if not isinstance(grid.axes, Mapping):
    raise ValueError(f"sweep.Grid.axes must be a dict of binding -> list of values, got {grid.axes!r}.")
  scalars = [k for k, values in grid.axes.items() if not isinstance(values, (list, tuple))]
  if scalars:  # a number had no len() (a TypeError traceback); a string would have been one run per character
    raise ValueError(f"sweep.Grid axes {sorted(scalars)} are not lists: give each axis a list of values, e.g. "
                     f"{{{scalars[0]!r}: [{grid.axes[scalars[0]]!r}]}} (or bind a value every run shares in "
                     "`bindings`).")
  empty = sorted(k for k, values in grid.axes.items() if not len(values))
  if empty:  # a product over an empty axis has no runs, and a sweep of nothing would look like a finished one
    raise ValueError(f"sweep.Grid axes {empty} have no values (a grid over them has no runs): give each axis at "
                     "least one value, or drop it.")
  stage_dupes = _repeated(f.name for f in grid.finetune)
  if stage_dupes:  # stages of one name would share ROOT/RUN/ft_<name>: one never runs
    raise ValueError(f"sweep.Finetune names {stage_dupes} are not unique: each stage trains into ROOT/RUN/ft_<name>; "
                     "give every stage its own name.")
  arms = [dict(a) for a in (grid.arms or [{}])]
  arm_values: dict[str, list[Any]] = {}
  for arm in arms:
    for k, v in arm.items():
      arm_values.setdefault(k, []).append(v)
  runs = []
  for arm in arms:
    model = arm.get(MODEL_KEY)
    arm_bindings = [(k, v) for k, v in arm.items() if k not in (MODEL_KEY, NAME_KEY)]
    if NAME_KEY in arm:
      arm_label = [str(arm[NAME_KEY])]
    else:
      arm_label = [label(k, v, arm_values[k], grid.labels) for k, v in arm.items()]
    for point in _axis_points(grid):
      point_label = [label(k, v, grid.axes[k], grid.labels) for k, v in point]
      axis_model = dict(point).get(MODEL_KEY)
      parts = [grid.prefix] if grid.prefix else []
      parts += [p for p in arm_label + point_label if p]
      bindings = [*grid.bindings.items(), *arm_bindings, *((k, v) for k, v in point if k != MODEL_KEY)]
      name = sanitize("_".join(parts) or "base")
      if name in _NOT_RUN_NAMES:  # the run would write (and train) in ROOT itself or in ROOT's parent
        raise ValueError(f"sweep.Grid arm {arm!r}{f' (prefix {grid.prefix!r})' if grid.prefix else ''} names its "
                         f"run {name!r}, which is not a directory name under ROOT: give the arm another 'name' (or "
                         "the grid another prefix).")
      runs.append(RunSpec(name, axis_model or model, tuple(bindings), tuple(grid.finetune)))
  return runs


def expand_all(sweep: Grid | Sequence[Grid]) -> list[RunSpec]:
  """Runs of one grid or of several; names must be unique across them."""
  grids = [sweep] if isinstance(sweep, Grid) else list(sweep)
  if not grids or not all(isinstance(g, Grid) for g in grids):
    raise ValueError(f"SWEEP must be a sweep.Grid or a list of them, got {sweep!r}.")
  runs = [r for g in grids for r in expand(g)]
  dupes = _repeated(r.name for r in runs)
  if dupes:
    raise ValueError(f"Run names are not unique: {dupes}. Give the arms a 'name', the grids a `prefix`, or "
                     "`labels` that tell the values apart.")
  for run in runs:  # a Best over no run, or over the run that waits for it, would keep that run waiting forever
    for key, best in run.best.items():
      matched = [r.name for r in select(runs, best.runs)]
      if not matched or run.name in matched:
        raise ValueError(f"Run {run.name}: {key} = sweep.Best(runs={best.runs!r}) matches "
                         f"{'its own run' if matched else 'none of the runs'}; the runs are {[r.name for r in runs]}.")
  return runs


def _globs(only: str | None) -> list[str]:
  """The comma-separated globs of --only."""
  return [p.strip() for p in (only or "").split(",") if p.strip()]


def select(runs: Sequence[RunSpec], only: str | None) -> list[RunSpec]:
  """Runs whose name matches one of the comma-separated globs of `only` (all runs without it)."""
  if not only:
    return list(runs)
  patterns = _globs(only)
  return [r for r in runs if any(fnmatch.fnmatchcase(r.name, p) for p in patterns)]


def check_only(runs: Sequence[RunSpec], only: str | None) -> None:
  """Every glob of --only must match a run: a mistyped one beside one that matches was dropped without a word, and
  the run it meant never trained."""
  unmatched = [p for p in _globs(only) if not any(fnmatch.fnmatchcase(r.name, p) for r in runs)]
  if unmatched:
    raise ValueError(f"--only={only!r}: {', '.join(repr(p) for p in unmatched)} "
                     f"match{'es' if len(unmatched) == 1 else ''} none of the {len(runs)} runs: "
                     f"{[r.name for r in runs]}.")
