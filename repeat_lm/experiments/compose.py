"""Each run's gin: the experiment gin (its model include swapped for the run's), the run's bindings and MODEL_DIR,
flattened into one self-contained file (gin's config_str), so ROOT/RUN/run.gin parses on its own and keeps the
configuration a run was started with even when the shared gin files change later.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import gin

from repeat_lm import gin_utils
from repeat_lm.experiments import sweep

# The experiment's own model: the one `include '.../gin/models/X.gin'` line a run's 'model' replaces.
_MODEL_INCLUDE = re.compile(r"""^include\s+(['"])(?P<path>[^'"]*gin/models/[^'"]+)\1\s*$""", re.M)
# Model settings a fine-tuning stage inherits from its pre-training run (values that are not macros).
MODEL_CONFIGURABLES = ("repeat_lm.models.t5.T5Config", "repeat_lm.models.moe.MoeConfig")
# How the model is laid out and computed, not what it is: a fine-tuning stage inherits them too, so a run that needed
# `--gin.MODEL_PARALLEL=8 --gin.SCAN_LAYERS=True` to fit (rq2_factors.gin's XL) fine-tunes with them, from a
# checkpoint of the same layout, rather than with the fine-tuning gin's single-device defaults.
LAYOUT_MACROS = ("MODEL_PARALLEL", "EXPERT_PARALLEL", "SCAN_LAYERS", "REMAT_POLICY")


@dataclasses.dataclass
class Experiment:
  path: str
  text: str
  model: str | None  # the experiment gin's own model gin (its include line), if any
  runs: list[sweep.RunSpec]
  bindings: tuple[str, ...] = ()  # command-line bindings applied to every run, after the experiment's


def _resolve_path(path: str) -> Path:
  for base in ["", *gin_utils.default_search_paths()]:
    candidate = Path(base) / path
    if candidate.is_file():
      return candidate
  # The shipped experiments, so that a research question named without its folder or suffix ('rq1_repetition_cpu',
  # 'rq6') is answered with the names there are, not one example.
  shipped = sorted({p.stem for base in gin_utils.default_search_paths()
                    for p in (Path(base) / "gin" / "experiments").glob("*.gin")})
  close = difflib.get_close_matches(Path(path).stem, shipped, n=1, cutoff=0.8)
  hint = f"did you mean --experiment=gin/experiments/{close[0]}.gin? " if close else ""
  known = f"gin/experiments/ holds {', '.join(f'{s}.gin' for s in shipped)}" if shipped else \
      "e.g. --experiment=gin/experiments/rq1_repetition_cpu.gin"
  raise gin_utils.GinConfigError(f"Experiment gin {path!r} not found (searched the current directory and "
                                 f"{gin_utils.REPO_ROOT}); {hint}{known}.")


def load(path: str, bindings: Sequence[str] = ()) -> Experiment:
  """Parse an experiment gin and expand its SWEEP into runs."""
  try:
    text = _resolve_path(path).read_text(encoding="utf-8")
  except UnicodeDecodeError as e:  # its message names no file
    raise gin_utils.GinConfigError(f"Experiment gin {path!r} is not UTF-8 text (byte {e.object[e.start]:#04x} at "
                                   f"offset {e.start}); pass a gin file, e.g. "
                                   "--experiment=gin/experiments/rq1_repetition_cpu.gin.") from e
  includes = [m["path"] for m in _MODEL_INCLUDE.finditer(text)]
  if len(includes) > 1:
    raise gin_utils.GinConfigError(f"{path} includes several model gins ({includes}); an experiment includes one "
                                   "and its arms swap it with 'model'.")
  # The CLI's prelude, so command-line bindings may name any configurable (checkpoint.CheckpointConfig.period=10).
  gin_utils.parse([path], [*bindings, "gin_utils.macro_value.value = %SWEEP"], prelude=gin_utils.CLI_PRELUDE)
  try:
    value = gin.configurable(gin_utils.macro_value)()
  except Exception as e:  # an unbound or unparsable SWEEP
    raise gin_utils.GinConfigError(f"{path} must bind SWEEP to a sweep.Grid or a list of them "
                                   f"(docs/experiments.md): {type(e).__name__}: {e}") from e
  runs = sweep.expand_all(value)
  if any(r.model for r in runs) and not includes:
    raise gin_utils.GinConfigError(f"{path}: arms set 'model', but the experiment has no `include "
                                   "'gin/models/...'` line for it to replace.")
  return Experiment(path, text, includes[0] if includes else None, runs, tuple(bindings))


def _parse_text(text: str, bindings: Sequence[str]) -> None:
  gin.clear_config()
  # The prelude opens with dynamic registration, which gin accepts only once and before any import.
  text = re.sub(r"^from __gin__ import dynamic_registration\s*$", "", text, flags=re.M)
  try:
    # The text's includes, looked up under the default paths only (not an earlier parse's --gin_search_path).
    with gin_utils.quiet_search_misses(), gin_utils.only_search_paths(gin_utils.default_search_paths()):
      gin.parse_config_files_and_bindings([], [gin_utils.CLI_PRELUDE + text, *bindings], finalize_config=False)
  except Exception as e:  # gin raises several types for the same mistake
    raise gin_utils.GinConfigError(f"Could not compose the run's gin ({type(e).__name__}): {e}") from e


def _drop_sweep_bindings() -> None:
  """The grid describes the experiment, not the run: keep it out of the run's gin."""
  config = gin.config._CONFIG  # pylint: disable=protected-access
  for key in [k for k in config if k[1].startswith("repeat_lm.experiments.") or k == ("SWEEP", "gin.macro")]:
    del config[key]


def _without_sweep_import(text: str) -> str:
  return re.sub(r"^from repeat_lm\.experiments import \w+\n", "", text, flags=re.M)


def experiment_text(exp: Experiment, model: str | None) -> str:
  if not model or model == exp.model:
    return exp.text
  return _MODEL_INCLUDE.sub(lambda m: f"include '{model}'", exp.text, count=1)


def _binding(key: str, value: Any, resolved: Mapping[str, Any]) -> str:
  if isinstance(value, sweep.Best):
    value = resolved.get(key, value.default)
  return f"{key} = {sweep.render(value)}"


def query(key: str) -> Any:
  """The value of `key` (a macro or `configurable.param`) in the parsed config: its binding, else the Python
  default of the parameter (so a run that leaves param_share alone reads 'none', not an empty cell) where the config
  uses its configurable at all, else None (a dense run has no moe.MoeConfig.num_experts)."""
  try:
    value = gin.query_parameter(f"%{key}" if "." not in key else key)
  except (ValueError, KeyError):
    return _default(key)
  return str(value) if isinstance(value, gin.config.ConfigurableReference) else value


def _default(key: str) -> Any:
  if "." not in key:
    return None
  name, param = key.split("/")[-1].rsplit(".", 1)
  match = gin.config._REGISTRY.get_match(name)  # pylint: disable=protected-access
  # Dynamic registration is process-wide: whether gin knows a configurable this config never uses depends on the runs
  # composed before it, so a dense run read MoeConfig's 128 experts after an MoE arm and None before one.
  if match is None or not _uses(match.selector):
    return None
  p = inspect.signature(match.wrapped).parameters.get(param)
  if p is None or p.default is inspect.Parameter.empty or repr(p.default) == "<factory>":
    return None
  return p.default


def _uses(selector: str) -> bool:
  """Whether the parsed config binds a parameter of the configurable `selector` or refers to it."""
  config = gin.config._CONFIG  # pylint: disable=protected-access
  # A reference's registered selector: the one written ('moe.MoeConfig', through the prelude's imports) is not
  # `selector` ('repeat_lm.models.moe.MoeConfig'), and a model that left every MoeConfig setting at its default read
  # as unused.
  return any(s == selector for _, s in config) or any(ref.config_key[1] == selector for ref in _bound_references())


def _bound_references() -> Iterator[gin.config.ConfigurableReference]:
  """Every reference (@name or %MACRO) among the parsed config's bound values, inside containers too."""
  def walk(value):
    if isinstance(value, gin.config.ConfigurableReference):
      yield value
    elif isinstance(value, Mapping):
      for k, v in value.items():
        yield from walk(k)
        yield from walk(v)
    elif isinstance(value, (list, tuple, set)):
      for v in value:
        yield from walk(v)
  for params in gin.config._CONFIG.values():  # pylint: disable=protected-access
    for value in params.values():
      yield from walk(value)


def _check_macros_used(spec: sweep.RunSpec) -> None:
  """Every macro the run binds is referred to (%NAME) by the parsed config. gin accepts a binding of a macro nothing
  reads: an axis {'DROPUT_RATE': [0.0, 0.1]} made runs that all trained the same model, and collect reported the
  typo as a factor."""
  config = gin.config._CONFIG  # pylint: disable=protected-access
  used = {ref.scoped_selector.split("/")[0] for ref in _bound_references() if ref.selector == "gin.macro"}
  macros = sorted(scope for scope, selector in config if selector == "gin.macro")
  unused = [k for k, _ in spec.bindings if "." not in k and "/" not in k and k not in used
            and k not in (sweep.MODEL_KEY, sweep.NAME_KEY)]
  if unused:
    close = {k: difflib.get_close_matches(k, [m for m in macros if m not in unused], n=1) for k in unused}
    hints = "; ".join(f"{k}: did you mean {close[k][0]}?" for k in unused if close[k])
    raise gin_utils.GinConfigError(
        f"Run {spec.name} binds {', '.join(unused)}, which no setting of its configuration refers to (as %NAME): "
        f"every value would train the same model. Check the name{'s' if len(unused) > 1 else ''} in the "
        f"experiment's axes and bindings{' (' + hints + ')' if hints else ''}.")


# What `repeat-lm train` calls itself (cli.py): its parameters are used though nothing refers to it.
_ENTRY_POINTS = ("repeat_lm.train.trainer.train",)


def _check_configurables_used(spec: sweep.RunSpec) -> None:
  """Every configurable whose parameter the run binds is one its configuration uses: referred to (@name) or called by
  `repeat-lm train`. gin accepts a binding of any registered configurable: an axis {'moe.MoeConfig.num_experts':
  [8, 16]} on a dense model made runs that all trained the same model, and collect reported 8 and 16 as a factor."""
  referred = {ref.config_key[1] for ref in _bound_references()}
  unused = []
  for key, _ in spec.bindings:
    if "." not in key:
      continue
    name = key.rsplit(".", 1)[0].split("/")[-1]
    match = gin.config._REGISTRY.get_match(name)  # pylint: disable=protected-access
    if match is not None and match.selector not in _ENTRY_POINTS and match.selector not in referred:
      unused.append((key, name))
  if unused:
    raise gin_utils.GinConfigError(
        f"Run {spec.name} binds {', '.join(k for k, _ in unused)}, but nothing in its configuration uses "
        f"{', '.join(sorted({f'@{n}()' for _, n in unused}))} (e.g. a dense model has no moe.MoeConfig): every value "
        "would train the same model. Give the run a model that uses it (its 'model'), or drop the binding.")


def run_gin(exp: Experiment, spec: sweep.RunSpec, model_dir: str, varied: Sequence[str],
            resolved: Mapping[str, Any] = {}) -> tuple[str, dict[str, Any]]:
  """(the run's self-contained gin text, the effective value of every key in `varied` plus 'model')."""
  bindings = [_binding(k, v, resolved) for k, v in spec.bindings]
  _parse_text(experiment_text(exp, spec.model), [*bindings, *exp.bindings, f"MODEL_DIR = {model_dir!r}"])
  _check_macros_used(spec)
  _check_configurables_used(spec)
  values = {k: query(k) for k in varied if k not in (sweep.MODEL_KEY, sweep.NAME_KEY)}
  model = spec.model or exp.model
  values[sweep.MODEL_KEY] = Path(model).stem if model else None
  _drop_sweep_bindings()
  unresolved = [f"{k} (best of {v.runs} by {v.metric}; default {v.default!r} until they finish)"
                for k, v in spec.best.items() if k not in resolved]
  header = [f"# Run {spec.name} of {exp.path}, written by `repeat-lm sweep`: every binding, so it parses on its own.",
            f"#   repeat-lm train --gin_file={Path(model_dir) / 'run.gin'}",
            f"# model = {values[sweep.MODEL_KEY]!r}",
            *(f"# {k} = {sweep.render(values.get(k, v))}" for k, v in spec.bindings),
            *(f"# Waiting for: {u}" for u in unresolved)]
  return "\n".join(header) + "\n" + _without_sweep_import(gin.config_str()), values


def layout_bindings() -> list[str]:
  """The parsed config's LAYOUT_MACROS that it binds, as gin lines."""
  lines = []
  for name in LAYOUT_MACROS:
    try:
      value = gin.query_parameter(f"%{name}")
    except (ValueError, KeyError):
      continue
    if not isinstance(value, gin.config.ConfigurableReference):
      lines.append(f"{name} = {value!r}")
  return lines


def model_bindings() -> list[str]:
  """Non-macro bindings of the parsed config's model configurables, as gin lines."""
  lines = []
  for (scope, selector), params in gin.config._CONFIG.items():  # pylint: disable=protected-access
    if selector in MODEL_CONFIGURABLES and not scope:
      name = ".".join(selector.rsplit(".", 2)[-2:])
      for param, value in params.items():
        is_macro = isinstance(value, gin.config.ConfigurableReference) and value.selector == "gin.macro"
        if not is_macro and not isinstance(value, gin.config._UnknownConfigurableReference):  # pylint: disable=protected-access
          lines.append(f"{name}.{param} = {value!r}" if not isinstance(value, gin.config.ConfigurableReference)
                       else f"{name}.{param} = {value}")
  return lines


def finetune_gin(exp: Experiment, spec: sweep.RunSpec, ft: sweep.Finetune, pretrain_gin: str, model_dir: str) -> str:
  """A fine-tuning stage's gin: the run's model (gin and settings), `ft.gin_files`, `ft.bindings`, and the
  pre-training run's MODEL_DIR as INITIAL_CHECKPOINT_PATH."""
  _parse_text(pretrain_gin, [])
  carried = model_bindings() + layout_bindings()
  pretrain_dir = query("MODEL_DIR")
  model = spec.model or exp.model
  includes = [f"include '{f}'" for f in ([model] if model else []) + list(ft.gin_files)]
  bindings = [*carried, *(f"{k} = {sweep.render(v)}" for k, v in ft.bindings.items()),
              f"INITIAL_CHECKPOINT_PATH = {pretrain_dir!r}", f"MODEL_DIR = {model_dir!r}"]
  _parse_text("\n".join(includes) + "\n", bindings)
  header = [f"# Fine-tuning stage {ft.name} of run {spec.name} ({exp.path}), written by `repeat-lm sweep`.",
            f"#   repeat-lm finetune --gin_file={Path(model_dir) / 'run.gin'}"]
  return "\n".join(header) + "\n" + gin.config_str()


def varied_keys(runs: Sequence[sweep.RunSpec]) -> list[str]:
  """Every binding key any run sets, plus 'model' when runs differ in model: the table's factor columns."""
  keys = list(dict.fromkeys(k for r in runs for k, _ in r.bindings))
  return keys + [sweep.MODEL_KEY]


def check_parses(text: str) -> None:
  """Raise GinConfigError unless `text` parses alone (what `repeat-lm train --gin_file=run.gin` will do)."""
  _parse_text(text, [])
