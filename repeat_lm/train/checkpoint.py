"""Orbax checkpoints of the train state plus the JSON metadata needed for exact resume.

Orbax writes each step into a temporary directory and renames it when complete, so a crash mid-save never leaves a
half-written checkpoint that looks finished; saves are asynchronous so training continues while they are written.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
from pathlib import Path
from typing import Any, Coroutine, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
try:  # private: settled_reads() patches it, and does nothing in an Orbax without it
  from orbax.checkpoint._src import asyncio_utils as orbax_asyncio  # pylint: disable=protected-access
except ImportError:  # pragma: no cover
  orbax_asyncio = None
# Orbax's own loop runner, before _settle_orbax_loops replaces it (the tests put it back to check settled_reads alone).
ORBAX_RUN_SYNC = getattr(orbax_asyncio, "_run_sync_via_new_loop", None)

from repeat_lm import checks


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  period: int = 1000           # Save every `period` steps (and at the end, and on SIGTERM).
  keep: int | None = 3         # Keep the last `keep` checkpoints; None keeps all.
  async_save: bool = True

  def __post_init__(self):
    if not checks.whole_number(self.period) or self.period < 1:
      raise ValueError(f"CheckpointConfig.period={self.period!r}: save every N >= 1 steps, a whole number (the last "
                       "step and SIGTERM always save).")
    if self.keep is not None and not checks.whole_number(self.keep):
      raise ValueError(f"CheckpointConfig.keep={self.keep!r}: keep the newest N checkpoints, a whole number (no "
                       "quotes), or None: all.")
    if self.keep is not None and self.keep < 1:
      raise ValueError(f"CheckpointConfig.keep={self.keep} would delete every checkpoint; keep N >= 1 (or None: "
                       "all).")
    checks.check_bools(self, ("async_save",))  # a gin string 'False' is truthy: it saved asynchronously


class CheckpointError(RuntimeError):
  pass


# What Orbax says when the configured state is not the one saved (another model or optimizer), not corrupt files:
# another tree, or a leaf of another shape ('Requested shape: (32, 64) is not compatible with the stored shape').
# Checked before restoring (`stored_state_mismatch`); these are the fallback where the metadata cannot be read.
_MISMATCH_SIGNS = ("do not match", "tree structure", "not compatible with the stored shape")


# Orbax's error for a failed array read pastes the whole TensorStore spec after this (60 lines, in a message meant to be
# one); the read's own error is its cause ('OUT_OF_RANGE: Error reading "params.w/0.0" in OCDBT database ...').
_TENSORSTORE_DETAILS = " See full TensorStore details"


def brief_error(e: BaseException) -> str:
  """'Type: first line' of an Orbax or TensorStore error, for a one-line message."""
  if _TENSORSTORE_DETAILS in str(e) and e.__cause__ is not None:
    return brief_error(e.__cause__)
  # A TensorStore message may also end in its whole spec (`... does not exist [tensorstore_spec='{...}']`, ~2,400
  # characters on one line): the path it names says enough.
  text = re.sub(r"\s*\[tensorstore_spec=.*", "", str(e).split(_TENSORSTORE_DETAILS)[0], flags=re.S)
  lines = text.strip().splitlines()
  return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


# How long a failed restore waits for its other reads (they read on, or fail as fast); then they are cancelled.
_SETTLE_S = 60.0


def _run_settled(coro: Coroutine[Any, Any, Any]) -> Any:
  """Orbax's asyncio_utils._run_sync_via_new_loop, except that the tasks `coro` leaves behind (when one read fails,
  asyncio.gather raises at once and the other reads run on) finish before the loop is closed."""
  loop = asyncio.new_event_loop()
  try:
    asyncio.set_event_loop(loop)
    return loop.run_until_complete(coro)
  finally:
    try:
      pending = asyncio.all_tasks(loop)
      if pending:  # gather() collects their errors: none is left unretrieved
        with contextlib.suppress(asyncio.TimeoutError):
          loop.run_until_complete(asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), _SETTLE_S))
    finally:
      asyncio.set_event_loop(None)
      loop.close()


# Orbax's log messages of a failed background write (futures/future.py, async_checkpointer.py, checkpoint_manager.py).
_WRITE_ERROR_SIGNS = ("_SignalingThread.run() raised an exception", "in background save thread",
                      "Save Finalize thread")


class _OneLineWriteErrors(logging.Filter):
  """Orbax logs each failed background write of a save with its whole traceback (six of ~60 lines for one full
  disk); the save's CheckpointError says what failed and what was kept. One line each, unless logging at DEBUG."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info and any(sign in str(record.msg) for sign in _WRITE_ERROR_SIGNS) and \
        logging.getLogger().getEffectiveLevel() > logging.DEBUG:
      record.exc_info, record.exc_text = None, None
      record.msg, record.args = record.getMessage().splitlines()[0][:300], ()
    return True


def _settle_orbax_loops() -> None:
  """From the first save on, every Orbax event loop of this process settles its tasks before it is closed (as
  settled_reads does for one restore). A save's background writes that failed (a full disk) left their other writes
  running against a closed loop: 1,400 lines of 'Event loop is closed' tracebacks around the error. A save that
  succeeds leaves no task behind, so nothing changes for it."""
  if getattr(orbax_asyncio, "_run_sync_via_new_loop", None) is not None:
    orbax_asyncio._run_sync_via_new_loop = _run_settled  # pylint: disable=protected-access
  absl_logger = logging.getLogger("absl")  # Orbax logs through absl's logging, i.e. this logger
  if not any(isinstance(f, _OneLineWriteErrors) for f in absl_logger.filters):
    absl_logger.addFilter(_OneLineWriteErrors())


@contextlib.contextmanager
def settled_reads() -> Iterator[None]:
  """Within this, a restore (or metadata read) that fails leaves no read behind. Orbax closes a restore's event loop as
  soon as one read fails: the reads still in flight printed 'RuntimeError: Event loop is closed' tracebacks (their
  TensorStore callbacks) and, once collected, 'Exception ignored in: <coroutine object
  _read_array_index_and_device_put>' ones, up to 1,500 lines after the error message. Closing the CheckpointManager
  does not help: the loop is one Orbax makes for each call (asyncio_utils.run_sync)."""
  original = getattr(orbax_asyncio, "_run_sync_via_new_loop", None)
  if original is None:  # another Orbax version: nothing to settle here (tests/train/test_checkpoint.py notices)
    yield
    return
  orbax_asyncio._run_sync_via_new_loop = _run_settled  # pylint: disable=protected-access
  try:
    yield
  finally:
    orbax_asyncio._run_sync_via_new_loop = original  # pylint: disable=protected-access


def _path_name(path: tuple) -> str:
  """A leaf's path such as 'opt_state/0/v_row/w': Orbax's metadata holds a NamedTuple's fields (optax's states) as
  dict keys, so attribute, key and index steps are all written the same way."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
  """Leaf shapes by their _path_name."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {_path_name(path): tuple(leaf.shape) for path, leaf in leaves}


def stored_shapes(state_dir: Path) -> dict[str, tuple[int, ...]] | None:
  """Leaf shapes of the state saved in `state_dir`, from its metadata (state/_METADATA); None if Orbax cannot read
  that file (Orbax writes it before a checkpoint is committed, so a committed checkpoint without it is damaged, and its
  restore, which reads the same file, fails and says so)."""
  handler = ocp.StandardCheckpointHandler()
  try:
    # The handler, not a Checkpointer, whose metadata() logs any failure and returns None: a relative directory, which
    # Orbax refuses, then read as missing metadata, and a relative MODEL_DIR skipped this comparison altogether (eval
    # scored a checkpoint's first layers as a smaller model). The restore is handed the absolute path too. Settled: it
    # reads each array's metadata, and a damaged step fails one while others are in flight (see settled_reads).
    with settled_reads():
      metadata = handler.metadata(state_dir.absolute())
  except Exception:  # pylint: disable=broad-except  # the file missing or damaged: left to the restore's error
    return None
  finally:
    handler.close()
  # Not caught: metadata of a form this code does not expect would otherwise pass as 'cannot tell' and let a partial
  # restore read a subset of the parameters without complaint.
  return _shapes_by_path(metadata.tree)


def stored_state_mismatch(stored: dict[str, tuple[int, ...]] | None, abstract_state: Any, shown: int = 3) -> str | None:
  """How the saved state (its leaf shapes `stored`, from `stored_shapes`) differs from `abstract_state` (leaves
  missing, extra or of another shape); None if it matches or the metadata could not be read (then the restore itself
  decides). Comparing first means a configuration change is named leaf by leaf and no array read is started."""
  if stored is None:
    return None
  wanted = _shapes_by_path(abstract_state)
  problems = [f"{k} is missing from the checkpoint" for k in wanted if k not in stored]
  problems += [f"{k} is in the checkpoint but not in the configured state" for k in stored if k not in wanted]
  problems += [f"{k} has shape {stored[k]} in the checkpoint, {wanted[k]} configured" for k in wanted
               if k in stored and stored[k] != wanted[k]]
  if not problems:
    return None
  more = f" (and {len(problems) - shown} more)" if len(problems) > shown else ""
  return "; ".join(problems[:shown]) + more


def non_finite_leaves(tree: Any) -> list[str]:
  """The paths of `tree`'s floating-point arrays (not scalars) holding a NaN or an infinity (one fused check on the
  devices). Scalars are left out: an optimizer may hold an infinity by design there (optax's reduce_on_plateau
  starts its best value at inf), while the arrays a damaged file spoils are the parameters and their statistics.

  Each answer is a scalar, so every process holds all of it: read from its own shard, as device_get could not from
  an array spanning processes. One check per set of devices the arrays live on (one jit refuses arrays of several:
  a parameter restored onto one device beside others sharded over the mesh); host (numpy) arrays are checked there."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  floats = [(path, x) for path, x in leaves if jnp.issubdtype(x.dtype, jnp.inexact) and x.ndim]
  finite: list[bool] = [True] * len(floats)
  on_devices: dict[frozenset, list[int]] = {}
  for i, (_, x) in enumerate(floats):
    if isinstance(x, jax.Array):
      on_devices.setdefault(frozenset(x.sharding.device_set), []).append(i)
    else:
      finite[i] = bool(np.isfinite(x).all())
  for group in on_devices.values():
    answers = jax.jit(lambda xs: [jnp.isfinite(x).all() for x in xs])([floats[i][1] for i in group])
    for i, answer in zip(group, answers):
      finite[i] = bool(answer.addressable_shards[0].data)
  return [_path_name(path) for (path, _), ok in zip(floats, finite) if not ok]


def damaged_text(bad: list[str]) -> str:
  """Why a checkpoint whose arrays `bad` (non_finite_leaves) hold NaN or infinity is damaged, not a divergence."""
  return (f"holds non-finite values in {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}: it is damaged "
          "(training saves a step only once its loss, gradients and parameters were read finite)")


def step_before(steps: list[int], step: int) -> int | None:
  """The latest of `steps` before `step` (what a damaged checkpoint's error points at), or None."""
  return max((s for s in steps if s < step), default=None)


class Checkpointer:
  """Saves/restores {'state': train state pytree, 'meta': JSON dict} under MODEL_DIR/checkpoints/<step>."""

  def __init__(self, model_dir: str | Path, config: CheckpointConfig = CheckpointConfig()):
    self.directory = Path(model_dir) / "checkpoints"
    self.config = config
    # The step's directory is made before save() returns (only the arrays and JSON are written in the background): made
    # in the background, a directory that cannot be made (read-only, full disk) was reported only at the next save, a
    # period later, and its writer threads then waited 300 s for it, holding the failed process open.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep, save_interval_steps=1, enable_async_checkpointing=config.async_save, create=True,
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
    self._manager = ocp.CheckpointManager(self.directory.absolute(), options=options)
    self._saving: int | None = None  # the step being written in the background, until it is seen finished

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    return step % self.config.period == 0

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    if step in self._manager.all_steps():
      return
    _settle_orbax_loops()
    self.wait()  # as Orbax's save does first; a failure of the previous save is reported as that step's
    self._saving = step
    with self._save_errors():
      self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       meta=ocp.args.JsonSave(meta)), force=True)

  @contextlib.contextmanager
  def _save_errors(self) -> Iterator[None]:
    """A failed write (a full disk, a folder gone) as one CheckpointError that names the step and the checkpoint a
    rerun resumes from; it was a raw TensorStore error after Orbax's tracebacks, with no word of what was kept."""
    try:
      yield
    except (OSError, ValueError, RuntimeError) as e:  # TensorStore's I/O errors are ValueErrors; a bug stays a bug
      failed, self._saving = self._saving, None
      # Orbax drops the steps its retention will delete from its list when the save starts, before the write is
      # committed, and deletes them only after: with keep=1 the list was empty while the previous step was intact on
      # disk, and the message said none was written. Listed afresh from the directory instead.
      with contextlib.suppress(Exception):
        self._manager.reload()
      kept = step_before(self.all_steps(), failed) if failed is not None else self.latest_step()
      raise CheckpointError(
          f"Saving {f'checkpoint {failed}' if failed is not None else 'a checkpoint'} under {self.directory} failed "
          f"({brief_error(e)}). "
          + (f"The checkpoints up to step {kept} are intact: free space (or fix the folder) and run the same command "
             f"to resume from step {kept}." if kept is not None else "No earlier checkpoint was written.")) from e

  def _checked_step(self, step: int | None, target: Any, only: str = "") -> tuple[int, dict | None]:
    """`step` (the latest if None) once it exists and its stored leaf shapes (those whose path starts with `only`)
    are `target`'s, with those shapes (None where the metadata cannot be read); else CheckpointError."""
    if step is not None and not checks.whole_number(step):
      # A gin string ('20') or float (20.0) was reported as a missing step beside a list holding it, or as corrupt.
      raise CheckpointError(f"Checkpoint step {step!r} is not a whole number: give one of the steps "
                            f"{self.all_steps()} as an int (CHECKPOINT_STEP=20, no quotes), or None for the latest.")
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"No checkpoint found under {self.directory}.")
    self._check_step_exists(step)
    stored = stored_shapes(self.directory / str(step) / "state")
    if stored is not None and only:
      stored = {k: v for k, v in stored.items() if k.startswith(only)}
    mismatch = stored_state_mismatch(stored, target)
    if mismatch is not None:
      # Parameters that match under an optimizer state that does not: no model setting to restore, and the advice to
      # use the checkpoint's config.gin is wrong where that is the configuration (a state layout of an earlier version).
      params_match = (not only and isinstance(target, dict) and "params" in target and stored_state_mismatch(
          {k: v for k, v in stored.items() if k.startswith("params/")}, {"params": target["params"]}) is None)
      raise CheckpointError(self._mismatch_message(step, mismatch, params_match))
    return step, stored

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restore onto `abstract_state` (ShapeDtypeStructs carrying the target shardings)."""
    step, stored = self._checked_step(step, abstract_state)
    try:
      with settled_reads():
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax raises many types; all mean the same thing to the user.
      # Without readable metadata the checkpoint is damaged, whatever the restore's error looks like (a missing
      # state/_METADATA makes Orbax guess the tree: 'pytree structure error').
      if stored is not None and any(sign in str(e) for sign in _MISMATCH_SIGNS):
        raise CheckpointError(self._mismatch_message(step, str(e))) from e
      raise CheckpointError(self._unreadable_message(step, brief_error(e))) from e
    meta = restored["meta"]
    if not isinstance(meta, dict) or "step" not in meta:  # valid JSON, but not what save wrote: KeyError in train
      raise CheckpointError(self._unreadable_message(step, f"meta/metadata holds {str(meta)[:80]!r}, not a dict with "
                                                           "'step'"))
    bad = non_finite_leaves(restored["state"])
    if bad:
      # Training never saves a step it has not checked finite, so these were damaged on disk (the data files carry no
      # checksums). Restored as they were, the next step "diverged" and the error blamed the learning rate, naming
      # this step as the good one to resume from: a loop no lower rate could end.
      raise CheckpointError(f"Checkpoint {self.directory / str(step)} {damaged_text(bad)}. It was left untouched; "
                            f"{self._set_aside_hint(step)}.")
    logging.info("Restored checkpoint %s", self.directory / str(step))
    return restored["state"], dict(meta)

  def _set_aside_hint(self, step: int) -> str:
    """What to do with damaged checkpoint `step`: move it aside to resume from the one before, or start afresh."""
    older = step_before(self.all_steps(), step)
    return (f"move it aside (mv {self.directory / str(step)} {self.directory / str(step)}.bad) to resume from step "
            f"{older}" if older is not None else "delete it or point MODEL_DIR at a fresh directory")

  def _unreadable_message(self, step: int, detail: str) -> str:
    return (f"Checkpoint {self.directory / str(step)} could not be restored ({detail}). It was left untouched. If it "
            f"is corrupt, {self._set_aside_hint(step)}. If the model or optimizer configuration changed since it was "
            "written, use the configuration it was written with (MODEL_DIR/config.gin).")

  def _check_step_exists(self, step: int) -> None:
    if step not in self.all_steps():
      raise CheckpointError(f"No checkpoint of step {step} under {self.directory}; it holds steps {self.all_steps()} "
                            "(CHECKPOINT_STEP picks one of them; None: the latest).")

  def _mismatch_message(self, step: int, detail: str, params_match: bool = False) -> str:
    head = (f"Checkpoint {self.directory / str(step)} holds a different model or optimizer state than the one "
            f"configured ({detail}). It was left untouched. ")
    if params_match:
      return head + (
          "Its parameters fit the configured model: only the optimizer state differs (another optimizer, or the "
          "layout of an earlier repeat_lm: Adafactor no longer factors a block axis or a >= 128-expert router). "
          "Evaluation, inference and export read it as it is; to train on from its parameters with a fresh optimizer "
          f"state (from step 0), set INITIAL_CHECKPOINT_PATH = '{self.directory.parent}' with a new MODEL_DIR.")
    return head + (f"Use the configuration it was written with ({self.directory.parent / 'config.gin'}), or point "
                   "MODEL_DIR at a fresh directory.")

  def restore_params(self, abstract_params: Any, step: int | None = None) -> tuple[Any, int]:
    """Only the parameters (for evaluation, export or initialisation): any optimizer's checkpoint will do."""
    target = {"params": abstract_params}
    # A partial restore reads only what the target names: a model with fewer layers (or blocks) than the checkpoint
    # would load a subset of its parameters without complaint. Compare the parameters leaf by leaf first.
    step, _ = self._checked_step(step, target, only="params/")
    # A separate manager: this one may already have bound the 'state' item to the full-state handler.
    with ocp.CheckpointManager(self.directory.absolute()) as reader:
      try:
        with settled_reads():
          restored = reader.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
              target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))
      except Exception as e:
        if any(sign in str(e) for sign in _MISMATCH_SIGNS):
          raise CheckpointError(self._mismatch_message(step, str(e))) from e
        raise CheckpointError(
            f"Parameters of checkpoint {self.directory / str(step)} could not be restored "
            f"({brief_error(e)}). It was left untouched. If it is corrupt or truncated, another step can be "
            f"read (steps here: {self.all_steps()}).{self._other_step(step)} If the model changed since it was "
            f"written, use {self.directory.parent / 'config.gin'}.") from e
    # As restore's check: evaluated as they were, a damaged step's NaN parameters were reported as its eval loss.
    bad = non_finite_leaves(restored["state"])
    if bad:
      raise CheckpointError(f"Checkpoint {self.directory / str(step)} {damaged_text(bad)}. It was left untouched; "
                            f"steps here: {self.all_steps()}.{self._other_step(step)}")
    return restored["state"]["params"], step

  def _other_step(self, step: int) -> str:
    """How an evaluation reads the step before a damaged `step`, where there is one."""
    older = step_before(self.all_steps(), step)
    return f" CHECKPOINT_STEP={older} evaluates the step before it." if older is not None else ""

  def wait(self) -> None:
    with self._save_errors():
      self._manager.wait_until_finished()
    self._saving = None

  def close(self) -> None:
    try:
      self.wait()
    except BaseException:
      with contextlib.suppress(Exception):  # the failed save's error is the one to report
        self._manager.close()
      raise
    self._manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) for a tree of arrays or ShapeDtypeStructs."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), tree)
