"""Gin parsing the T5X way: --gin_file, --gin.KEY=VALUE bindings, search paths, and errors that say what to fix."""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib.metadata
import logging
import os
import re
import tokenize
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gin

# The repository's gin/ directory (present in a source checkout and in editable installs).
REPO_ROOT = Path(__file__).resolve().parent.parent


# Command-line bindings are parsed apart from the files' imports; this prelude gives them the short module names
# the shipped gin files use, so --gin.MIXTURE_OR_TASK_NAME=@tasks.span_corruption_task() works as in a file.
MODEL_PRELUDE = """from __gin__ import dynamic_registration
from repeat_lm import gin_utils
from repeat_lm import models
from repeat_lm.models import t5
from repeat_lm.models import moe
"""
CLI_PRELUDE = MODEL_PRELUDE + """from repeat_lm.data import pipeline
from repeat_lm.data import downstream
from repeat_lm.data import tasks
from repeat_lm.data import vocab
from repeat_lm.models import decoding
from repeat_lm.train import checkpoint
from repeat_lm.train import inference
from repeat_lm.train import optim
from repeat_lm.train import partitioning
from repeat_lm.train import trainer
"""


class GinConfigError(ValueError):
  pass


@functools.cache
def installed_gin_root() -> Path | None:
  """Where a wheel install put the shipped gin/ tree (<prefix>/share/repeat_lm, pyproject's data-files), if any."""
  try:
    files = importlib.metadata.distribution("repeat_lm").files or ()
  except importlib.metadata.PackageNotFoundError:
    return None
  for f in files:
    if f.as_posix().endswith("share/repeat_lm/gin/runs/pretrain.gin"):
      return Path(f.locate()).resolve().parents[2]
  return None


def default_search_paths() -> list[str]:
  """The current directory, the source checkout (editable installs) and the installed gin files (wheels)."""
  installed = installed_gin_root()
  return [os.getcwd(), str(REPO_ROOT), *([str(installed)] if installed else [])]


def split_gin_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Pull `--gin.KEY=VALUE` (or `--gin.KEY VALUE`) out of argv: (bindings, remaining args)."""
  bindings, rest = [], []
  argv = list(argv)
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--gin.") and not arg.startswith("--gin_"):
      key_value = arg[len("--gin."):]
      if "=" not in key_value:
        if i + 1 >= len(argv):
          raise GinConfigError(f"{arg} has no value; write it as {arg}=VALUE (strings in quotes: \"'text'\").")
        key_value = f"{key_value}={argv[i + 1]}"
        i += 1
      bindings.append(key_value)
    else:
      rest.append(arg)
    i += 1
  return bindings, rest


class _SearchMisses(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not record.pathname.endswith(os.path.join("gin", "resource_reader.py"))


@contextlib.contextmanager
def quiet_search_misses():
  """gin logs, as an ERROR, each search path a file is not under before it finds the file under a later one: two
  lines per `gin/...` file parsed outside the repository (the current directory is searched first). A file found
  under none raises, which the callers report."""
  quiet = _SearchMisses()
  logging.getLogger().addFilter(quiet)  # gin logs through the root logger
  try:
    yield
  finally:
    logging.getLogger().removeFilter(quiet)


@contextlib.contextmanager
def only_search_paths(paths: Sequence[str]):
  """Inside the block gin looks files up under exactly `paths` (after the path as given); afterwards as before. gin
  keeps one list per process that each add_config_file_search_path call extends and clear_config keeps: an earlier
  parse's --gin_search_path (or current directory) came first, and its folder's include won over this parse's."""
  prefixes = gin.config._LOCATION_PREFIXES  # pylint: disable=protected-access
  saved = list(prefixes)
  prefixes[:] = [""]
  for path in paths:
    gin.add_config_file_search_path(path)
  try:
    yield
  finally:
    prefixes[:] = saved


# Of the last `parse`: {macro: (the file that bound it, the later file that declared it %gin.REQUIRED again)}, and
# the configuration's keys then (a record of another configuration is not used). A run's run.gin before
# gin/runs/eval.gin read as "Required setting(s) not bound" of settings run.gin had bound.
_redeclared: dict[str, Any] = {"macros": {}, "config": frozenset()}


def _macros() -> list[str]:
  config = gin.config._CONFIG  # pylint: disable=protected-access
  return [scope for scope, selector in config if selector == "gin.macro"]


def parse(gin_files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str] = (),
          prelude: str = CLI_PRELUDE) -> None:
  """Parse files then bindings (later ones win), with readable errors."""
  gin.clear_config()
  _redeclared.update(macros={}, config=frozenset())
  paths = [*search_paths, *default_search_paths()]
  for f in gin_files:
    if not any((Path(p) / f).is_file() for p in ["", *paths]):
      # The --gin_search_path folders are named too: they were searched, and leaving them out read as ignored.
      searched = [*search_paths, *default_search_paths()[1:]]
      raise GinConfigError(f"Gin file {f!r} not found (searched {', '.join(searched)} and the current directory); "
                           "pass an existing path, e.g. --gin_file=gin/runs/smoke.gin.")
  # One parse per file and per binding (what gin.parse_config_files_and_bindings does in one go), so an error can
  # name its source: gin numbers the lines of the bindings joined after the prelude, and a tokenizer error (an
  # unclosed bracket) names no file (`_error_text` finds it).
  source, binding = "", None
  redeclared: dict[str, tuple[str, str]] = {}
  bound_by: dict[str, str] = {}  # macro -> the file that first bound it to a value
  required: set[str] = set()
  try:
    with quiet_search_misses(), only_search_paths(paths):
      for f in gin_files:
        source = f"--gin_file={f} (or a file it includes)"
        gin.parse_config_file(f)
        before, required = required, set(unbound_required_macros())
        # Only what this file made required: a macro still required from an earlier file stays that file's.
        redeclared.update({m: (bound_by[m], f) for m in required - before if m in bound_by})
        bound_by.update({m: f for m in _macros() if m not in required and m not in bound_by})
      for binding in bindings:
        source = f"--gin.{binding}"
        gin.parse_config(prelude + binding)
  except Exception as e:  # Gin reports syntax errors, unknown names and bad includes with various types.
    raise GinConfigError(
        f"Could not parse the gin configuration ({type(e).__name__}) in {source}: "
        f"{_error_text(e, prelude, binding)}\n"  # binding is None while the files are read
        "Check the --gin_file paths and the --gin.KEY=VALUE bindings: string values need inner quotes "
        "(--gin.MODEL_DIR=\"'/tmp/run'\"), names must exist in the imported modules."
        + (_quoting_hint(binding) if source.startswith("--gin.") else "")) from e
  _redeclared.update(macros=redeclared, config=frozenset(gin.config._CONFIG))  # pylint: disable=protected-access
  _check_macro_bindings_used(bindings)


def _error_text(e: Exception, prelude: str = "", binding: str | None = None) -> str:
  """gin's message for `e`, except for an error of Python's tokenizer (a TokenError: ('EOF in multi-line
  statement', (2, 0)); or an IndentationError of '<tokenize>'), which names no file: then its message with the file
  gin was reading (the innermost parse_config_file, so an included file's own path) and the line. In a `binding`
  parsed after `prelude`, any syntax error's line is the binding's own (gin counts the prelude's lines too).

  Python 3.12's tokenizer raises a TokenError for more than unclosed brackets (a malformed number such as 10_bad or
  0b2), where 3.11 gave gin's SyntaxError, which names both. No column: the tokenizers count them from 0 (3.11) or
  1 (3.12)."""
  text, origin = str(e), e
  # gin re-raises an included file's error as a proxy without args (its text extended by the include's location,
  # which is kept after ours); the original is its context.
  while isinstance(origin, tokenize.TokenError) and not origin.args and origin.__context__ is not None:
    origin = origin.__context__
  if isinstance(origin, tokenize.TokenError) and len(origin.args) == 2 and isinstance(origin.args[1], tuple):
    message, line = origin.args[0], origin.args[1][0]
  elif isinstance(origin, SyntaxError) and origin.lineno and (binding is not None or
                                                               origin.filename in ("<tokenize>", "<string>")):
    message, line = origin.msg, origin.lineno
  else:
    return text
  # Dropped: 3.12's own "(detected at line N)" counts a binding's prelude lines too.
  message = re.sub(r" \(detected at line \d+\)", "", str(message))
  files = [frame.f_locals.get("config_file_with_prefix", frame.f_locals.get("config_file"))
           for frame, _ in traceback.walk_tb(e.__traceback__) if frame.f_code.co_name == "parse_config_file"]
  path = files[-1] if files and isinstance(files[-1], str) else None
  if binding is not None:
    line, last, where = line - prelude.count("\n"), binding.count("\n") + 1, ""
  else:
    try:
      last = len(Path(path).read_text(errors="replace").splitlines()) if path else line
    except OSError:  # a path only gin's own file readers open
      last = line
    where = f"{path}, " if path else ""
  # 3.11 puts an unclosed bracket's error at the line after the last; the last is where the text ends.
  return f"{message} ({where}line {max(1, min(line, last))}){text[len(str(origin)):]}"


def _quoting_hint(binding: str | None) -> str:
  """' For a string, quote it: --gin.KEY="'VALUE'".' where VALUE is a bare word gin cannot read (staged:4, adamw):
  gin's own message ('malformed node or string ... ast.Name') says neither."""
  key, _, value = (binding or "").partition("=")
  value = value.strip()
  if value.lower() in ("true", "false", "none") and value != value.capitalize():
    return f" Gin spells {value} as {value.capitalize()}: --gin.{key.strip()}={value.capitalize()}."
  if not value or value[0] in "'\"[{(@%-0123456789." or value.lower() in ("true", "false", "none", "inf", "nan"):
    return ""
  return f" For a string, quote it: --gin.{key.strip()}=\"'{value}'\"."


def _referenced_macros(value, out: set[str]) -> None:
  """Adds the names of the macros a bound gin value (possibly nested in lists, tuples and dicts) refers to."""
  if isinstance(value, gin.config.ConfigurableReference):
    if value.selector == "gin.macro":
      out.add("/".join(value.scopes))
  elif isinstance(value, dict):
    for k, v in value.items():
      _referenced_macros(k, out)
      _referenced_macros(v, out)
  elif isinstance(value, (list, tuple, set)):
    for v in value:
      _referenced_macros(v, out)


def _check_macro_bindings_used(bindings: Sequence[str]) -> None:
  """A binding of a macro nothing refers to (--gin.DROPOUT_RAT=0.1) would be accepted by gin and change nothing."""
  keys = [b.partition("=")[0].strip() for b in bindings]
  macros = [k for k in keys if re.fullmatch(r"[A-Za-z_][\w/]*", k)]  # no '.': a macro, not configurable.param
  if not macros:
    return
  config = gin.config._CONFIG  # pylint: disable=protected-access
  referenced: set[str] = set()
  for params in config.values():
    for value in params.values():
      _referenced_macros(value, referenced)
  unused = [m for m in macros if m not in referenced]
  if unused:
    defined = sorted(m for m in _macros() if m in referenced)
    hints = [f"--gin.{m}" + (f" (did you mean {', '.join(close)}?)" if (close := difflib.get_close_matches(
        m, defined, n=2)) else "") for m in unused]
    one = len(unused) == 1
    raise GinConfigError(f"{'; '.join(hints)}: no gin file uses {'this macro' if one else 'these macros'}, so "
                         f"{'the binding' if one else 'these bindings'} would change nothing. Check the spelling, or "
                         "include the gin file that uses it (a run gin such as gin/runs/pretrain.gin for run "
                         "settings).")


def unbound_required_macros() -> list[str]:
  """Macros still set to %gin.REQUIRED (gin would pass its sentinel object on instead of failing)."""
  # gin 0.5 keeps macros as bindings of the 'gin.macro' configurable, scoped by the macro's name.
  return sorted(scope for (scope, selector), params in gin.config._CONFIG.items()  # pylint: disable=protected-access
                if selector == "gin.macro" and repr(params.get("value")) == "%gin.REQUIRED")


def check_required() -> None:
  missing = unbound_required_macros()
  if missing:
    example = " ".join(f"--gin.{m}=..." for m in missing)
    same = _redeclared["config"] == frozenset(gin.config._CONFIG)  # pylint: disable=protected-access
    redeclared = {m: _redeclared["macros"][m] for m in missing if same and m in _redeclared["macros"]}
    order = ""
    for first, later in dict.fromkeys(redeclared.values()):
      names = [m for m in redeclared if redeclared[m] == (first, later)]
      order += (f" {later} declares {', '.join(names)} required again after {first} bound "
                f"{'it' if len(names) == 1 else 'them'} (a later file wins): give --gin_file={later} first, then "
                f"--gin_file={first}.")
    raise GinConfigError(f"Required setting(s) not bound: {', '.join(missing)}.{order} Bind them on the command line "
                         f"({example}; strings in inner quotes, e.g. --gin.MODEL_DIR=\"'/tmp/run'\") or in a gin file.")


def call_configured(fn, **kwargs):
  """Call a gin-configured function, turning gin's missing-REQUIRED errors into an instruction."""
  check_required()
  try:
    return gin.configurable(fn)(**kwargs)
  except (RuntimeError, ValueError, TypeError) as e:
    msg = str(e)
    if "REQUIRED" in msg or "Required bindings" in msg or "gin.REQUIRED" in msg:
      raise GinConfigError(
          f"{msg}\nA required setting is missing: bind it on the command line, e.g. --gin.MODEL_DIR=\"'/tmp/run'\" "
          "--gin.TRAIN_STEPS=1000, or in a gin file.") from e
    if isinstance(e, TypeError) and "required keyword-only argument" in msg and f"{fn.__name__}()" in msg:
      # Nothing binds the function's own arguments: the gin files are for another command (e.g. `eval` given the
      # pre-training gin, which configures trainer.train only).
      raise GinConfigError(
          f"{msg}\nThe gin files configure no {fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}: include the run gin "
          f"of this command (gin/runs/{'eval' if fn.__name__ == 'evaluate' else 'pretrain'}.gin) after the model "
          "gin.") from e
    raise


def macro_value(value=gin.REQUIRED):
  """Returns what gin binds to `value`: a probe for reading a macro (bound by `configured_macro`)."""
  return value


def configured_macro(gin_files: Sequence[str], bindings: Sequence[str], macro: str,
                     search_paths: Sequence[str] = ()):
  """Parse gin and return the value of `macro` (e.g. the MODEL a model gin builds)."""
  # Only the model modules: reading a model gin must not depend on the data stack.
  parse(gin_files, [*bindings, f"gin_utils.macro_value.value = %{macro}"], search_paths, prelude=MODEL_PRELUDE)
  if macro not in _macros():  # unbound; any other failure to build it is the model's own error, named below
    raise GinConfigError(f"The gin files {list(gin_files)} do not define {macro}: include a model gin such as "
                         "gin/models/t5_1_1_small.gin.")
  try:
    return gin.configurable(macro_value)()
  except Exception as e:
    raise GinConfigError(f"{macro} of the gin files {list(gin_files)} could not be built: {type(e).__name__}: {e}\n"
                         "Fix the binding it names (--gin.KEY=VALUE or the gin file).") from e
