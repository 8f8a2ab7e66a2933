"""The training loop: data -> sharded jitted step -> metrics, evaluation and checkpoints in MODEL_DIR.

Everything here is a gin configurable (`trainer.train.*`, `trainer.evaluate.*`); `cli.py` only parses flags.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import gin
import jax
import numpy as np
import optax
from jax.experimental import multihost_utils

from repeat_lm import checks, files
from repeat_lm.data import pipeline
from repeat_lm.models import moe as moe_lib, t5
from repeat_lm.models.encoder_decoder import EncoderDecoderModel, summarize
from repeat_lm.train import checkpoint as ckpt_lib
from repeat_lm.train import dropout_schedule as dropout_schedule_lib
from repeat_lm.train import flops, metrics as metrics_lib, optim, partitioning, prefetch, run_lock, state as state_lib


class _StopSignal:
  """SIGTERM (preemption) or a first Ctrl-C (SIGINT) asks for a checkpoint and a clean exit at the next step
  boundary. A second Ctrl-C goes to the handler from before (Python's: KeyboardInterrupt), to abort at once."""

  def __init__(self):
    self.requested = False
    self.name = ""  # of the signal that asked
    self._previous: dict[int, Any] = {}
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
      return
    for signum in (signal.SIGTERM, signal.SIGINT):
      # A SIGINT ignored on entry (a job started in the background by a shell) stays ignored.
      if signum == signal.SIGINT and signal.getsignal(signum) == signal.SIG_IGN:
        continue
      self._previous[signum] = signal.signal(signum, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.name = signal.Signals(signum).name
    if signum == signal.SIGINT:
      self._put_back(signum)  # before anything else: a second Ctrl-C, even during the save, aborts
    logging.warning("%s received: saving a checkpoint and stopping at the next step%s.", self.name,
                    " (Ctrl-C again aborts without it)" if signum == signal.SIGINT else "")
    self.requested = True

  def _put_back(self, signum: int) -> None:
    previous = self._previous.pop(signum)
    # None: a handler not set from Python, which Python cannot reinstall; the default is the nearest to it.
    signal.signal(signum, signal.SIG_DFL if previous is None else previous)

  def restore(self):
    for signum in list(self._previous):
      self._put_back(signum)

  def agreed(self) -> bool:
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.asarray(self.requested))))


def _check_vocab(model: EncoderDecoderModel, task: str) -> int | None:
  vocab = pipeline.vocabulary_for(task)
  if vocab.vocab_size > model.vocab_size:
    raise ValueError(
        f"Task {task!r} uses a vocabulary of {vocab.vocab_size} ids but the model's vocab_size is "
        f"{model.vocab_size}; set t5.T5Config.vocab_size to at least {vocab.vocab_size} (a multiple of 128).")
  extra_ids = getattr(vocab, "extra_ids", 0)
  return vocab.vocab_size - extra_ids if extra_ids else None


def _eval_batches(cfg: pipeline.DatasetConfig, steps: int,
                  partitioner: partitioning.Partitioner) -> list[dict[str, np.ndarray]]:
  partitioner.check_batch_size(f"Evaluation batch size {cfg.batch_size}", cfg.batch_size, "EVAL_BATCH_SIZE")
  shard_id, num_shards = partitioner.data_layout(cfg.batch_size)
  if cfg.seed is None:  # one draw for all hosts, as for training: per host, their rows would come from other streams
    cfg = dataclasses.replace(cfg, seed=_draw_seed())
  it = pipeline.get_batches(cfg, shard_id=shard_id, num_shards=num_shards)
  out = [b for _, b in zip(range(steps), it)]
  if not out:
    raise ValueError(f"The evaluation split of {cfg.mixture_or_task_name!r} gave no full batch of "
                     f"{cfg.batch_size}; lower the eval batch size.")
  return out


def _run_eval(eval_step, params, batches, partitioner: partitioning.Partitioner) -> dict[str, float]:
  totals: dict[str, float] = {}
  # Every feature of the evaluation batch, rows over the batch axes as make_eval_step expects: the evaluation and
  # training sets may be packed or not independently, and global_batch keeps only the features given a sharding.
  sharding = partitioner.batch_sharding()
  for b in batches:
    sums = jax.device_get(eval_step(params, state_lib.global_batch(b, {k: sharding for k in b})))
    for k, v in sums.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  return summarize(totals)


def _draw_seed() -> int:
  """The data seed of a run whose DatasetConfig.seed is None: drawn once, by process 0 on several hosts and broadcast.

  A draw per host would order each host's stream differently, so their rows of a global batch would repeat and miss
  examples; a draw per call would let the batch count checked before training differ from the stream read (a UL2
  layout depends on the seed). The checkpoints keep it (data_state), so the run resumes on the same stream.
  """
  seed = np.int32(int.from_bytes(os.urandom(4), "little") >> 1)
  if jax.process_count() > 1:
    seed = multihost_utils.broadcast_one_to_all(seed)
  return int(seed)


def _warn_if_routing_groups_change(model: EncoderDecoderModel, cfg: pipeline.DatasetConfig, lengths: dict[str, int],
                                   saved_shards: int | None, shards: int) -> None:
  """An MoE model routes each batch in groups whose count is a multiple of the devices the batch is split over
  (moe.num_groups): resumed on another split, capacity and dropped tokens change, so the run continues, but not as
  one uninterrupted run on either mesh would (a 4x2 -> 8x1 resume: step 5's loss 9.12514 against 9.12488)."""
  moe_cfg = getattr(getattr(model.module, "config", None), "moe", None)
  if moe_cfg is None or saved_shards is None or saved_shards == shards:
    return
  tokens = [cfg.batch_size * lengths[k] for k in ("encoder_input_tokens", "decoder_input_tokens")]
  before, now = ([moe_lib.num_groups(n, moe_cfg.group_size, s) for n in tokens] for s in (saved_shards, shards))
  if before != now:
    logging.warning("The checkpoint was trained with the batch split over %d devices, this run over %d: the MoE "
                    "layers now route in %s groups (encoder, decoder) instead of %s, which changes expert capacity "
                    "and dropped tokens, so training does not continue exactly as one uninterrupted run. For that, "
                    "resume with DATA_PARALLEL x EXPERT_PARALLEL = %d.", saved_shards, shards, now, before,
                    saved_shards)


def _logged_rate(tx: optax.GradientTransformation, learning_rate: optax.Schedule | float | None, built_here: bool,
                 steps: tuple[int, int]) -> optax.Schedule | float | None:
  """The rate train/learning_rate logs: the optimizer's own where make_optimizer built it (warning if the trainer's
  `learning_rate` says otherwise at some step of the run), else the trainer's; None where neither is known."""
  own = optim.rate_of(tx)
  if own is None:
    return learning_rate if built_here or learning_rate is not None else None
  if learning_rate is not None:
    # Compared at this run's first and last steps and at powers of two between them (warm-up ends, decays).
    first, last = steps
    points = sorted({first, max(first, last - 1), *(2**k for k in range(31) if first < 2**k < last)})
    differ = next((s for s in points if not np.isclose(optim.learning_rate_at(learning_rate, s),
                                                       optim.learning_rate_at(own, s))), None)
    if differ is not None:
      logging.warning("trainer.train.learning_rate (%g at step %d) is not the optimizer's (%g, "
                      "optim.make_optimizer.learning_rate): the optimizer's is the one it trains and logs with; bind "
                      "LEARNING_RATE, which sets both.", optim.learning_rate_at(learning_rate, differ), differ,
                      optim.learning_rate_at(own, differ))
  return own


def _check_available(cfg: pipeline.DatasetConfig, total_steps: int) -> None:
  available = pipeline.num_batches(cfg)  # None: the stream never ends
  if available is not None and total_steps > available:
    raise ValueError(f"Task {cfg.mixture_or_task_name!r} holds {available} batches of {cfg.batch_size} (all its "
                     f"epochs), fewer than total_steps={total_steps}; lower TRAIN_STEPS or raise the task's epochs "
                     "(in a new MODEL_DIR where this one holds checkpoints: a run resumes on the data stream it "
                     "started on).")


def _write_config(model_dir: Path, operative: bool) -> None:
  if jax.process_index() == 0:
    text = gin.operative_config_str() if operative else gin.config_str()
    # Renamed into place: `infer`, `export` and a mismatching rerun rebuild the model from it, and a process killed
    # while rewriting it (it is rewritten at the first step and at the end) must not leave half a configuration.
    files.atomic_write_bytes(model_dir / "config.gin", text.encode())


# Step metrics that are a state, not a sum: a logging window reports the last step's value.
_LAST_VALUE_METRICS = ("grad_norm", "param_norm", "dropout_scale")
# An extra evaluation run with the loss-based one: (model, params, partitioner) -> {'eval/<name>': value}.
EvalFn = Callable[[EncoderDecoderModel, Any, partitioning.Partitioner], Mapping[str, float]]


class TrainingDivergedError(RuntimeError):
  """A step produced a non-finite loss, gradient or parameter; nothing of it was saved."""


def _check_finite(sums: Mapping[str, Any], step: int, checkpointer: ckpt_lib.Checkpointer) -> None:
  """Raise TrainingDivergedError, naming the step and the last good checkpoint, if step `step` went non-finite.

  The loss and gradient norm cover the forward and backward pass, the parameter norm the update (its sum of squares
  also overflows once parameters grow past ~1e19 in float32, which is divergence too). Metrics are read one step
  late, so step `step` + 1 may already have run from the diverged state; the loop saves only steps it has checked,
  and raising here drops both.
  """
  values = {k: float(sums[k]) for k in ("loss_sum", "grad_norm", "param_norm")}
  if all(np.isfinite(v) for v in values.values()):
    return
  checkpointer.wait()  # a save still being written belongs to an earlier, finite step: let it finish
  good = checkpointer.latest_step()
  where = (f"the last good checkpoint is step {good} ({checkpointer.directory / str(good)}); training resumes "
           "from it when run again" if good is not None else "no checkpoint had been written yet")
  raise TrainingDivergedError(
      f"Training diverged at step {step}: summed loss {values['loss_sum']}, gradient norm {values['grad_norm']}, "
      f"parameter norm {values['param_norm']}. Stopped before saving this step or any later one; {where}. Lower "
      "the learning rate or weight decay (or add gradient clipping) before resuming.")


def _hold_model_dir(model_dir: Path) -> Any:
  """Process 0 takes MODEL_DIR's lock (run_lock.py), and every process stops if it is held: the others would go on
  to their first collective and wait there for process 0, to fail much later on a heartbeat timeout that named no
  cause. Returns the lock (None on other processes) for run_lock.release."""
  lock, busy = None, None
  if jax.process_index() == 0:
    try:
      lock = run_lock.hold(model_dir)
    except run_lock.ModelDirBusyError as e:
      busy = e
  if jax.process_count() > 1 and bool(multihost_utils.broadcast_one_to_all(np.asarray(busy is not None))):
    busy = busy or run_lock.ModelDirBusyError(
        f"MODEL_DIR {model_dir} is being trained by another process: process 0 found its lock held (its log names "
        "the holder). Stop that trainer, or give this run another MODEL_DIR.")
  if busy is not None:
    raise busy
  return lock


def _agreed_latest_step(checkpointer: ckpt_lib.Checkpointer) -> int | None:
  """The newest checkpoint step, the same on every process, or a CheckpointError.

  Each process lists the directory itself. Where a shared filesystem caches listings (NFS attribute caching,
  gcsfuse's list cache) one host saw an older step, or none, and restored that step's shards (or a fresh state) beside
  the others': a mixed state and a data position per host, with nothing failing."""
  latest = checkpointer.latest_step()
  if jax.process_count() == 1:
    return latest
  seen = [int(s) for s in multihost_utils.process_allgather(np.asarray(-1 if latest is None else latest, np.int64))]
  if len(set(seen)) > 1:
    listed = ", ".join(f"process {i}: {s if s >= 0 else 'none'}" for i, s in enumerate(seen))
    raise ckpt_lib.CheckpointError(
        f"The processes see different newest checkpoints under {checkpointer.directory} ({listed}): the filesystem "
        "lists the directory differently on different hosts (a cached listing). Make its listings consistent (e.g. "
        "NFS mounted with actimeo=0, gcsfuse without its list cache) and run the same command again.")
  return latest


def _dropout_rate(model: EncoderDecoderModel) -> float:
  """The largest dropout rate the model applies at schedule factor 1 (logged x the factor as train/dropout_rate).

  DROPOUT_RATE unless a per-place override (t5.T5Config.<place>_dropout_rate) of a place the model has differs: read
  from DROPOUT_RATE alone, a run with DROPOUT_RATE 0 and hidden_dropout_rate 0.1 (or an MoE's expert_dropout_rate)
  logged a rate of 0 while dropout ran at every step.
  """
  cfg = getattr(model.module, "config", None)
  if not hasattr(cfg, "dropout_rate_for"):  # another module: its own single rate, if any
    return float(getattr(cfg, "dropout_rate", 0.0))
  moe_cfg = getattr(cfg, "moe", None)
  places = ["attention", "hidden"]
  if moe_cfg is None or moe_cfg.sparse_every > 1:  # some FFNs dense
    places.append("mlp")
  if moe_cfg is not None:
    places.append("expert")
  return max(float(cfg.dropout_rate_for(p)) for p in places)


def _dropout_schedule(spec, model: EncoderDecoderModel, cfg: pipeline.DatasetConfig,
                      source_tokens: int | None, total_steps: int) -> Callable[[jax.Array], jax.Array] | None:
  """The step -> factor function of DROPOUT_SCHEDULE; epochs become steps with this run's steps per epoch.

  None without a schedule, so the step passes no `dropout_scale` and modules without that argument still work.
  """
  if spec is None:
    return None
  epoch_steps = None
  if dropout_schedule_lib.uses_epochs(spec) and source_tokens:
    # Counted from the task's own stream where it has one; the span-corruption estimate otherwise (a mixture).
    epoch_steps = pipeline.steps_per_epoch(cfg) or dropout_schedule_lib.steps_per_epoch(
        source_tokens, cfg.batch_size, cfg.task_feature_lengths["inputs"])
  schedule = dropout_schedule_lib.resolve(spec, epoch_steps)
  model_cfg = getattr(model.module, "config", None)
  rates = [model_cfg.dropout_rate_for(p) for p in t5.DROPOUT_PLACES] if hasattr(model_cfg, "dropout_rate_for") else []
  if not any(rates):
    logging.warning("DROPOUT_SCHEDULE=%r has no effect: every dropout rate of the model is 0.", spec)
  if rates and max(rates) * dropout_schedule_lib.max_factor(schedule) >= 1.0:
    raise ValueError(f"DROPOUT_SCHEDULE={spec!r} multiplies the dropout rates (up to {max(rates)}) by up to "
                     f"{dropout_schedule_lib.max_factor(schedule)}: every rate times factor must stay below 1.")
  logging.info("Dropout schedule %r -> %s%s", spec, schedule,
               f" ({epoch_steps:.1f} steps per epoch)" if epoch_steps else "")
  if any(rates) and total_steps >= 1 and isinstance(schedule, dropout_schedule_lib.DropoutSchedule) and \
      schedule.kind != "constant":
    # The factor changes only at its steps: checked there and at the last update (step total_steps - 1). A switch
    # past the run (staged:50ep on a short run) trained a 'staged dropout' arm as the no-dropout one, without a word.
    points = [s for s in schedule.steps if s < total_steps] + [total_steps - 1]
    if max(float(schedule(p)) for p in points) == 0.0:
      logging.warning("DROPOUT_SCHEDULE=%r keeps dropout off through TRAIN_STEPS=%d: this run trains without "
                      "dropout; raise TRAIN_STEPS, or switch it on earlier.", spec, total_steps)
  return schedule


def _check_counts(settings: dict[str, tuple[int, int]]) -> None:
  """Each gin setting's (value, minimum): a clear error before anything is written, not a failure mid-run."""
  for name, (value, minimum) in settings.items():
    # A string ('50') failed comparing with a TypeError traceback, a fraction (2.5) deep in the input pipeline.
    if not checks.is_count(value, minimum):
      raise ValueError(f"{name}={value!r}: must be >= {minimum}, a whole number (no quotes).")


def _check_unseen_settings(model: EncoderDecoderModel, step_dir: Path) -> None:
  """What the checkpoint's shapes do not show, compared with the MODEL_DIR's config.gin as INITIAL_CHECKPOINT_PATH's
  loader does: parameter sharing hides a stack's depth (2 distinct layers and 4 layers with param_share=2 hold the
  same tree), and the same weights serve other activations, position buckets or norm epsilons. A model differing so
  would resume, or be evaluated, on the parameters without a word."""
  from repeat_lm.interop import load as load_lib  # pylint: disable=import-outside-toplevel
  load_lib.check_model_dir_config(step_dir, getattr(model.module, "config", None))


def _check_model_dir(model_dir: str, writing: bool = False) -> None:
  """An empty MODEL_DIR (say --gin.MODEL_DIR="'$MODEL_DIR'" with the shell variable unset) is the current directory
  to Path: the run would write, or resume, checkpoints wherever the command was started. `writing` (training): not
  inside another run's checkpoints."""
  if not isinstance(model_dir, (str, os.PathLike)):  # an unquoted number (MODEL_DIR=20261130): a TypeError traceback
    raise ValueError(f"MODEL_DIR={model_dir!r} is not a path: bind a string, e.g. --gin.MODEL_DIR=\"'/tmp/run'\".")
  if not str(model_dir).strip():
    raise ValueError("MODEL_DIR is empty: bind it to the run's directory, e.g. --gin.MODEL_DIR=\"'/tmp/run'\" (a shell "
                     "variable inside the quotes may be unset).")
  if os.path.exists(model_dir) and not os.path.isdir(model_dir):  # a bare FileExistsError from makedirs
    raise ValueError(f"MODEL_DIR={model_dir} is a file, not a directory: bind the run's directory.")
  if writing and (owner := files.model_dir_around(model_dir)) is not None:
    # A step directory of another run (T5X's checkpoint_<step> habit): that run deletes it when its checkpoints
    # rotate, and this run's checkpoints, records and config.gin with it.
    raise ValueError(f"MODEL_DIR={model_dir} is inside the checkpoints of the run {owner}, whose step directories "
                     "training deletes as it goes: give this run a directory of its own.")


def train(*, model: EncoderDecoderModel, model_dir: str, train_dataset_cfg: pipeline.DatasetConfig,
          total_steps: int, eval_dataset_cfg: pipeline.DatasetConfig | None = None,
          partitioner: partitioning.Partitioner | None = None, optimizer: optax.GradientTransformation | None = None,
          learning_rate: optax.Schedule | float | None = None,
          checkpoint_cfg: ckpt_lib.CheckpointConfig = ckpt_lib.CheckpointConfig(), log_period: int = 100,
          eval_period: int = 1000, eval_steps: int = 20, random_seed: int = 0,
          dropout_schedule: str | Callable[[jax.Array], jax.Array] | None = None,
          initial_checkpoint_path: str | None = None, eval_fn: EvalFn | None = None) -> dict[str, float]:
  """Train to `total_steps`, resuming from MODEL_DIR's latest checkpoint if there is one.

  `dropout_schedule` scales every dropout rate over training (DROPOUT_SCHEDULE; see dropout_schedule.py). A
  non-finite loss, gradient or parameter norm raises TrainingDivergedError before that step (or the next one, which
  may already have been dispatched: metrics are read one step late) is saved.
  `initial_checkpoint_path` (INITIAL_CHECKPOINT_PATH): when MODEL_DIR has no checkpoint yet, start from the parameters
  of a repeat_lm MODEL_DIR, a Hugging Face T5 directory or a T5X checkpoint (interop/load.py), with a fresh optimizer.
  `eval_fn(model, params, partitioner) -> {'eval/...': value}` runs with the evaluation (e.g. decoding + task metrics).
  Returns the last logged training metrics (plus the last evaluation, if any).
  """
  _check_counts({"TRAIN_STEPS (trainer.train.total_steps)": (total_steps, 0),
                 "trainer.train.log_period": (log_period, 1), "trainer.train.eval_period": (eval_period, 1),
                 "trainer.train.eval_steps": (eval_steps, 1)})
  _check_model_dir(model_dir, writing=True)
  model_dir_path = Path(model_dir)
  # Step folders, as the Checkpointer lists them; read before it is made, since it creates checkpoints/.
  resuming = bool(files.checkpoint_steps(model_dir_path))
  if initial_checkpoint_path and not resuming:
    # A fresh run starts from it: one that is missing or unreadable as a checkpoint fails now, not after the step
    # compiled (30 s for the smoke model) with a MODEL_DIR of config.gin and an empty checkpoints/ left behind.
    from repeat_lm.interop import load as load_lib  # pylint: disable=import-outside-toplevel
    load_lib.checkpoint_kind(initial_checkpoint_path)
  model_dir_path.mkdir(parents=True, exist_ok=True)
  lock = _hold_model_dir(model_dir_path)  # before anything in MODEL_DIR is written; released in the `finally`
  try:
    if not (model_dir_path / "config.gin").exists():
      if not resuming:  # a fresh run's record from the start, so that one failing before its first save has one
        _write_config(model_dir_path, operative=False)
      else:
        # Checkpoints copied without it: written now, it would be the configured model's, which _check_unseen_settings
        # then compared with itself, and which a failed restore left behind as the checkpoints' record (infer and export
        # build their model from it). Written only once the restore has succeeded, below.
        logging.warning("%s holds checkpoints but no config.gin: the configured model is checked against them by "
                        "parameter shapes only (a depth that param_share hides, another MLP activation or norm "
                        "epsilon is not seen). Copy the run's config.gin beside checkpoints/ to have it checked.",
                        model_dir_path)
    partitioner = partitioner or partitioning.Partitioner()
    tx = optimizer or optim.make_optimizer(learning_rate=learning_rate)
    cfg = train_dataset_cfg
    if cfg.seed is None:  # one stream for the whole run (and every host), kept in its checkpoints: see _draw_seed
      cfg = dataclasses.replace(cfg, seed=_draw_seed())
    first_sentinel = _check_vocab(model, cfg.mixture_or_task_name)
    lengths = pipeline.model_feature_lengths(cfg)
    source_tokens = pipeline.source_token_count(cfg.mixture_or_task_name, cfg.split)
    step_source_tokens = pipeline.source_tokens_per_step(cfg)  # None: count the ids the device saw instead
    if train_dataset_cfg.seed is not None:
      # A UL2 layout, and so the batch count, depends on the seed: an unseeded run is checked once its seed is known (a
      # resumed one would otherwise be refused for a batch count of the new draw, not of the stream it resumes on).
      _check_available(cfg, total_steps)
    schedule = _dropout_schedule(dropout_schedule, model, cfg, source_tokens, total_steps)
    batch_spec = state_lib.batch_specs(lengths, cfg.batch_size)
    lay = state_lib.layout(model, tx, partitioner, batch_spec, random_seed)
    checkpointer = ckpt_lib.Checkpointer(model_dir_path, checkpoint_cfg)
    writer = metrics_lib.MetricsWriter(model_dir_path)

    start = time.perf_counter()
    restored_meta: dict[str, Any] = {}
    resume_step = _agreed_latest_step(checkpointer)
    if resume_step is not None:
      # Before the restore, which compares shapes only: see _check_unseen_settings.
      _check_unseen_settings(model, checkpointer.directory / str(resume_step))
      state, restored_meta = checkpointer.restore(lay.abstract, step=resume_step)
      saved = restored_meta.get("data") or {}
      if train_dataset_cfg.seed is None and "seed" in saved:  # the seed drawn when the run started, not a new one
        cfg = dataclasses.replace(cfg, seed=saved["seed"])  # (None from checkpoints written before seeds were drawn)
        # A UL2 layout's chunks' lengths (static masks: their order) and steps per epoch depend on the seed too: count
        # this stream's, not the draw's.
        step_source_tokens = pipeline.source_tokens_per_step(cfg)
        schedule = _dropout_schedule(dropout_schedule, model, cfg, source_tokens, total_steps)
      if train_dataset_cfg.seed is None:
        _check_available(cfg, total_steps)
      pipeline.check_resume(cfg, saved)  # a changed data stream cannot resume exactly
      _warn_if_routing_groups_change(model, cfg, lengths, restored_meta.get("batch_shards"), partitioner.batch_shards)
      writer.truncate_after(int(restored_meta["step"]))
    else:
      if train_dataset_cfg.seed is None:
        _check_available(cfg, total_steps)
      writer.set_aside()
      state = state_lib.init_state(model, tx, lay, partitioner, batch_spec, random_seed)
      if initial_checkpoint_path:
        from repeat_lm.interop import load as load_lib  # pylint: disable=import-outside-toplevel
        # Fresh optimizer moments are zeros whatever the parameters, so only the parameters need replacing.
        state["params"] = load_lib.load_params(initial_checkpoint_path, lay.abstract["params"],
                                               config=getattr(model.module, "config", None))
    # Only now, with the state restored (or new), is this run's configuration the MODEL_DIR's: a rerun whose model
    # does not match the checkpoints fails above and leaves their config.gin as it was.
    _write_config(model_dir_path, operative=False)
    step = int(jax.device_get(state["step"]))
    tokens_seen = float(restored_meta.get("tokens_seen", 0.0))
    logging.info("Starting at step %d of %d (%.1fs to build or restore the state)", step, total_steps,
                 time.perf_counter() - start)
    if step >= total_steps:
      logging.warning("MODEL_DIR's checkpoint is at step %d, at or past TRAIN_STEPS=%d: nothing to train (raise "
                      "TRAIN_STEPS to continue, or point MODEL_DIR at a fresh directory).", step, total_steps)

    train_step = state_lib.make_train_step(model, tx, lay, partitioner, random_seed, first_sentinel, schedule)
    eval_step = state_lib.make_eval_step(model, lay, partitioner) if eval_dataset_cfg else None
    eval_batches = _eval_batches(eval_dataset_cfg, eval_steps, partitioner) if eval_dataset_cfg else []
    flops_per_step = flops.train_flops_per_sequence(model.module.config, lengths["encoder_input_tokens"],
                                                    lengths["decoder_input_tokens"]) * cfg.batch_size
    # For the logged MFU; `bench train` probes fully. On CPU the probe multiplies the model's activation dtype.
    peak, peak_source = flops.peak_flops_total(quick=True, dtype=model.module.config.dtype)
    logging.info("Peak %.3g FLOP/s (%s); %.4g model FLOPs per step", peak, peak_source, flops_per_step)

    def meta(at_step: int) -> dict[str, Any]:
      # The batch at step s is a function of the data config and s; `data` records both (and the epoch position).
      # The open logging window too: a resumed run then logs the same averages at the same steps as one that never
      # stopped (save and log periods need not align).
      return {"step": at_step, "tokens_seen": tokens_seen, "batches_consumed": at_step,
              "data": pipeline.data_state(cfg, at_step), "batch_shards": partitioner.batch_shards,
              # A copy: Orbax serialises the JSON in a background thread, after later steps have added to `window`.
              "log_window": {"sums": dict(window), "steps": window_steps, "seconds": window_time}}

    # This host's rows as the mesh places them: hosts that differ only along 'model' read the same rows.
    shard_id, num_shards = partitioner.data_layout(cfg.batch_size)
    batches: Iterator[dict[str, np.ndarray]] = pipeline.get_batches(
        cfg, start_step=step, shard_id=shard_id, num_shards=num_shards)
    progress = metrics_lib.Progress(step, total_steps)
    opened = restored_meta.get("log_window") or {}  # absent in checkpoints from before it was saved
    window: dict[str, float] = {k: float(v) for k, v in (opened.get("sums") or {}).items()}
    # `steps` and `seconds` count timed steps only, as does window["text_tokens"] (see `record`).
    window_steps, window_time, last = int(opened.get("steps", 0)), float(opened.get("seconds", 0.0)), {}
    # This process's first step also traced and compiled the step and waited for the first batch (seconds to minutes
    # on an accelerator): its read-to-read time is not step time. Step 1 is logged alone; after a resume that step sits
    # inside a window, and charged to it made step_time_s and MFU a multiple off. Its (seconds, text tokens) stand in
    # only for a window that holds no other step.
    first_step, first_timing = step + 1, (0.0, 0.0)
    # Steps this process ran and the progress bar has not counted: a restored window's steps are already in its start.
    unshown = 0
    # One-time costs of the first log (opening the TensorBoard writer, tracing the schedule) happen
    # here, not while step 2 runs: read-to-read time would charge them to step 2's window (2.5 s on CPU).
    writer.prepare("train")
    logged_rate = _logged_rate(tx, learning_rate, optimizer is None, (step, total_steps))
    logs_rate = logged_rate is not None  # else only the given optimizer knows its rate
    if logs_rate:
      optim.learning_rate_at(logged_rate, step)
    clock = time.perf_counter()  # when the last step was read (or the loop last paused for evaluation or a save)

    def record(at_step: int, device_sums: Mapping[str, jax.Array]) -> None:
      """Read step `at_step`'s metrics (waiting for that step only), check them, and log its window if it ends."""
      nonlocal tokens_seen, window, window_steps, window_time, last, clock, unshown, first_timing
      sums = jax.device_get(device_sums)
      _check_finite(sums, at_step, checkpointer)  # every step, before anything of it or a later step is saved
      now = time.perf_counter()
      # Read-to-read time: with the next step already queued this is the device's step time, not Python's.
      elapsed, clock = now - clock, now
      unshown += 1
      for k, v in sums.items():
        window[k] = window.get(k, 0.0) + float(v) if k not in _LAST_VALUE_METRICS else float(v)
      text_tokens = float(step_source_tokens(at_step) if step_source_tokens else sums["source_tokens"])
      tokens_seen += text_tokens
      if at_step == first_step:
        first_timing = (elapsed, text_tokens)
      else:
        window_time += elapsed
        window_steps += 1
        window["text_tokens"] = window.get("text_tokens", 0.0) + text_tokens
      if at_step == 1 or at_step % log_period == 0 or at_step == total_steps:
        seconds, steps, text = ((window_time, window_steps, window.get("text_tokens", 0.0)) if window_steps else
                                (first_timing[0], 1, first_timing[1]))
        step_time = seconds / steps
        last = {f"train/{k}": v for k, v in summarize(window).items()}
        if logs_rate:
          last["train/learning_rate"] = optim.learning_rate_at(logged_rate, at_step - 1)
        last.update({
            "train/grad_norm": window["grad_norm"], "train/param_norm": window["param_norm"],
            "train/tokens_seen": tokens_seen, "train/step_time_s": step_time,
            "train/sequences_per_s": cfg.batch_size / step_time,
            # Encoder + decoder positions, padding included (bench train's and T5X's convention); the text alone:
            "train/tokens_per_s": cfg.batch_size * (lengths["encoder_input_tokens"] +
                                                    lengths["decoder_input_tokens"]) / step_time,
            "train/text_tokens_per_s": text / seconds if seconds > 0 else 0.0,
            "train/mfu": flops_per_step / step_time / peak,
        })
        if source_tokens:
          last["train/epochs"] = tokens_seen / source_tokens
        # The schedule's factor at the window's last step (1 without a schedule) and the largest rate it gave.
        last["train/dropout_scale"] = window.get("dropout_scale", 1.0)
        last["train/dropout_rate"] = last["train/dropout_scale"] * _dropout_rate(model)
        writer.write(at_step, last)
        progress.update(unshown, loss=last["train/loss"], acc=last["train/accuracy"])
        unshown = 0
        if at_step == 1:
          _write_config(model_dir_path, operative=True)
        window, window_steps, window_time = {}, 0, 0.0

    # Metrics are read one step late: step s's are fetched only once step s+1 is dispatched, so the device always
    # has the next step queued while Python reads, checks and logs. `pending` is the dispatched step not yet read.
    pending: tuple[int, Mapping[str, jax.Array]] | None = None
    # Step s+1's batch is on the devices before step s finishes; the order (and so exact resume) is the stream's.
    device_batches = prefetch.DevicePrefetcher(batches, lambda b: state_lib.global_batch(b, lay.batch_shardings),
                                               depth=2, limit=total_steps - step)
    # Installed here, next to the `finally` that restores them: an error before the loop would leave Ctrl-C caught.
    stop = _StopSignal()
    try:
      while step < total_steps:
        state, sums = train_step(state, next(device_batches))  # on GPU and TPU donates (invalidates) the old state
        step += 1
        for v in sums.values():
          v.copy_to_host_async()  # the few scalars are on the host by the time they are read
        if pending is not None:
          record(*pending)  # raises TrainingDivergedError before the already dispatched step can be saved
        pending = (step, sums)
        stopping = stop.agreed()
        evaluating = bool(eval_step or eval_fn) and (step % eval_period == 0 or step == total_steps)
        saving = checkpointer.should_save(step) or step == total_steps or stopping
        if not (evaluating or saving):
          continue
        # Evaluation and checkpoints use this step's state: read and check the step first (the device idles here,
        # once per period), so a checkpoint only ever holds a step whose metrics were finite.
        record(*pending)
        pending = None
        if evaluating:
          result = {f"eval/{k}": v for k, v in _run_eval(eval_step, state["params"], eval_batches, partitioner).items()
                    } if eval_step else {}
          result.update(eval_fn(model, state["params"], partitioner) if eval_fn else {})
          writer.write(step, result)
          last.update(result)
        if saving:
          checkpointer.save(step, state, meta(step))
        if stopping:
          logging.warning("Stopped at step %d after %s; the checkpoint is in %s: run the same command to resume.",
                          step, stop.name or "another host's stop signal", checkpointer.directory)
          break
        clock = time.perf_counter()  # evaluation and saving are not step time
    finally:
      device_batches.close()
      progress.update(unshown)
      progress.close()
      writer.close()
      # Still under the SIGTERM handler: an asynchronous save (the last step's, or the one SIGTERM asked for) is
      # finished here, and a SIGTERM now must not kill the process before it is committed.
      try:
        checkpointer.close()
      finally:
        stop.restore()
    _write_config(model_dir_path, operative=True)
    return last
  finally:
    run_lock.release(lock)


def evaluate(*, model: EncoderDecoderModel, model_dir: str, eval_dataset_cfg: pipeline.DatasetConfig,
             partitioner: partitioning.Partitioner | None = None,
             optimizer: optax.GradientTransformation | None = None, eval_steps: int = 20,
             checkpoint_step: int | None = None, random_seed: int = 0,
             eval_fn: EvalFn | None = None) -> dict[str, float]:
  """Evaluate a checkpoint of MODEL_DIR on `eval_dataset_cfg` (and `eval_fn`, as in `train`); writes `eval/*` to
  metrics.jsonl at its step."""
  _check_counts({"trainer.evaluate.eval_steps": (eval_steps, 1)})
  _check_model_dir(model_dir)
  partitioner = partitioner or partitioning.Partitioner()
  if not (Path(model_dir) / "checkpoints").is_dir():  # before the Checkpointer, which would create it
    raise FileNotFoundError(f"No checkpoints directory under MODEL_DIR={model_dir}; train first or point MODEL_DIR "
                            "at a run's directory.")
  # The result is recorded in MODEL_DIR/metrics.jsonl: on a read-only run (an archived one) that failed only after
  # the whole evaluation, and its numbers were lost.
  record = Path(model_dir) / "metrics.jsonl"
  writable = jax.process_index() != 0 or os.access(record if record.exists() else model_dir, os.W_OK)
  if jax.process_count() > 1:  # process 0 writes it; every process stops, or the others would wait for it forever
    writable = bool(np.all(multihost_utils.process_allgather(np.asarray(writable))))
  if not writable:
    raise PermissionError(f"{record} cannot be written (a read-only file system or no permission), and evaluate "
                          "records its result there: copy the run somewhere writable (checkpoints/ and config.gin "
                          "suffice) and evaluate the copy.")
  checkpointer = ckpt_lib.Checkpointer(model_dir)
  step = checkpoint_step if checkpoint_step is not None else _agreed_latest_step(checkpointer)
  if step is None:
    raise FileNotFoundError(f"No checkpoint under {checkpointer.directory}; train first or point MODEL_DIR at a "
                            "directory with checkpoints.")
  _check_vocab(model, eval_dataset_cfg.mixture_or_task_name)
  lengths = pipeline.model_feature_lengths(eval_dataset_cfg)
  batch_spec = state_lib.batch_specs(lengths, eval_dataset_cfg.batch_size)
  # Only the parameters are read, so the optimizer (which shapes the rest of the layout) need not match training's.
  lay = state_lib.layout(model, optimizer or optim.make_optimizer(), partitioner, batch_spec, random_seed)
  _check_unseen_settings(model, checkpointer.directory / str(step))
  params, _ = checkpointer.restore_params(lay.abstract["params"], step)
  checkpointer.close()
  result = {f"eval/{k}": v for k, v in _run_eval(state_lib.make_eval_step(model, lay, partitioner),
                                                 params, _eval_batches(eval_dataset_cfg, eval_steps, partitioner),
                                                 partitioner).items()}
  result.update(eval_fn(model, params, partitioner) if eval_fn else {})
  writer = metrics_lib.MetricsWriter(model_dir)
  writer.write(step, result)
  writer.close()
  return {"step": step, **result}
