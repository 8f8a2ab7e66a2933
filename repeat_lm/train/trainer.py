"""The training loop: data -> sharded jitted step -> metrics, evaluation and checkpoints in MODEL_DIR.

Everything here is a gin configurable (`trainer.train.*`, `trainer.evaluate.*`); `cli.py` only parses flags.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import gin
import jax
import numpy as np
import optax

from repeat_lm.data import pipeline
from repeat_lm.models.encoder_decoder import EncoderDecoderModel, summarize
from repeat_lm.train import checkpoint as ckpt_lib
from repeat_lm.train import flops, metrics as metrics_lib, optim, partitioning, state as state_lib


class _StopSignal:
  """SIGTERM (preemption) asks for a checkpoint and a clean exit at the next step boundary."""

  def __init__(self):
    self.requested = False
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint and stopping at the next step.")
    self.requested = True

  def restore(self):
    if threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGTERM, self._previous)

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


def _eval_batches(cfg: pipeline.DatasetConfig, steps: int) -> list[dict[str, np.ndarray]]:
  it = pipeline.get_batches(cfg, shard_id=jax.process_index(), num_shards=jax.process_count())
  out = [b for _, b in zip(range(steps), it)]
  if not out:
    raise ValueError(f"The evaluation split of {cfg.mixture_or_task_name!r} gave no full batch of "
                     f"{cfg.batch_size}; lower the eval batch size.")
  return out


def _run_eval(eval_step, params, batches, lay) -> dict[str, float]:
  totals: dict[str, float] = {}
  for b in batches:
    sums = jax.device_get(eval_step(params, state_lib.global_batch(b, lay.batch_shardings)))
    for k, v in sums.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  return summarize(totals)


def _write_config(model_dir: Path, operative: bool) -> None:
  if jax.process_index() == 0:
    text = gin.operative_config_str() if operative else gin.config_str()
    (model_dir / "config.gin").write_text(text)


def train(*, model: EncoderDecoderModel, model_dir: str, train_dataset_cfg: pipeline.DatasetConfig,
          total_steps: int, eval_dataset_cfg: pipeline.DatasetConfig | None = None,
          partitioner: partitioning.Partitioner | None = None, optimizer: optax.GradientTransformation | None = None,
          learning_rate: optax.Schedule | float | None = None,
          checkpoint_cfg: ckpt_lib.CheckpointConfig = ckpt_lib.CheckpointConfig(), log_period: int = 100,
          eval_period: int = 1000, eval_steps: int = 20, random_seed: int = 0) -> dict[str, float]:
  """Train to `total_steps`, resuming from MODEL_DIR's latest checkpoint if there is one.

  Returns the last logged training metrics (plus the last evaluation, if any).
  """
  model_dir_path = Path(model_dir)
  model_dir_path.mkdir(parents=True, exist_ok=True)
  _write_config(model_dir_path, operative=False)
  partitioner = partitioner or partitioning.Partitioner()
  tx = optimizer or optim.make_optimizer(learning_rate=learning_rate)
  cfg = train_dataset_cfg
  if cfg.batch_size % partitioner.data_size:
    raise ValueError(f"Batch size {cfg.batch_size} is not divisible by the 'data' mesh axis "
                     f"({partitioner.data_size} devices); change BATCH_SIZE or the mesh.")
  first_sentinel = _check_vocab(model, cfg.mixture_or_task_name)
  lengths = pipeline.model_feature_lengths(cfg)
  batch_spec = state_lib.batch_specs(lengths, cfg.batch_size)
  lay = state_lib.layout(model, tx, partitioner, batch_spec, random_seed)
  checkpointer = ckpt_lib.Checkpointer(model_dir_path, checkpoint_cfg)
  writer = metrics_lib.MetricsWriter(model_dir_path)

  start = time.perf_counter()
  restored_meta: dict[str, Any] = {}
  if checkpointer.latest_step() is not None:
    state, restored_meta = checkpointer.restore(lay.abstract)
    writer.truncate_after(int(restored_meta["step"]))
  else:
    state = state_lib.init_state(model, tx, lay, partitioner, batch_spec, random_seed)
  step = int(jax.device_get(state["step"]))
  tokens_seen = float(restored_meta.get("tokens_seen", 0.0))
  logging.info("Starting at step %d of %d (%.1fs to build or restore the state)", step, total_steps,
               time.perf_counter() - start)

  train_step = state_lib.make_train_step(model, tx, lay, partitioner, random_seed, first_sentinel)
  eval_step = state_lib.make_eval_step(model, lay, partitioner) if eval_dataset_cfg else None
  eval_batches = _eval_batches(eval_dataset_cfg, eval_steps) if eval_dataset_cfg else []
  source_tokens = pipeline.source_token_count(cfg.mixture_or_task_name, cfg.split)
  flops_per_step = flops.train_flops_per_sequence(model.module.config, lengths["encoder_input_tokens"],
                                                  lengths["decoder_input_tokens"]) * cfg.batch_size
  peak, peak_source = flops.peak_flops_total()
  logging.info("Peak %.3g FLOP/s (%s); %.4g model FLOPs per step", peak, peak_source, flops_per_step)

  def meta(at_step: int) -> dict[str, Any]:
    return {"step": at_step, "tokens_seen": tokens_seen, "batches_consumed": at_step,
            "data": {"mixture_or_task_name": cfg.mixture_or_task_name, "seed": cfg.seed,
                     "batch_size": cfg.batch_size, "split": cfg.split}}

  batches: Iterator[dict[str, np.ndarray]] = pipeline.get_batches(
      cfg, start_step=step, shard_id=jax.process_index(), num_shards=jax.process_count())
  stop = _StopSignal()
  progress = metrics_lib.Progress(step, total_steps)
  window: dict[str, float] = {}
  window_steps, window_time, last = 0, 0.0, {}
  try:
    while step < total_steps:
      t0 = time.perf_counter()
      batch = state_lib.global_batch(next(batches), lay.batch_shardings)
      state, sums = train_step(state, batch)
      step += 1
      sums = jax.device_get(sums)
      window_time += time.perf_counter() - t0
      window_steps += 1
      for k, v in sums.items():
        window[k] = window.get(k, 0.0) + float(v) if k not in ("grad_norm", "param_norm") else float(v)
      tokens_seen += float(sums["source_tokens"])
      if step == 1 or step % log_period == 0 or step == total_steps:
        if not np.isfinite(window["loss_sum"]):
          raise FloatingPointError(f"Training loss is {window['loss_sum']} at step {step}; stopping before it is "
                                   f"checkpointed (last good checkpoint: {checkpointer.latest_step()}).")
        step_time = window_time / window_steps
        last = {f"train/{k}": v for k, v in summarize(window).items()}
        last.update({
            "train/learning_rate": optim.learning_rate_at(learning_rate, step - 1),
            "train/grad_norm": window["grad_norm"], "train/param_norm": window["param_norm"],
            "train/tokens_seen": tokens_seen, "train/step_time_s": step_time,
            "train/sequences_per_s": cfg.batch_size / step_time,
            "train/tokens_per_s": cfg.batch_size * (lengths["encoder_input_tokens"] +
                                                    lengths["decoder_input_tokens"]) / step_time,
            "train/mfu": flops_per_step / step_time / peak,
        })
        if source_tokens:
          last["train/epochs"] = tokens_seen / source_tokens
        writer.write(step, last)
        progress.update(window_steps, loss=last["train/loss"], acc=last["train/accuracy"])
        if step == 1:
          _write_config(model_dir_path, operative=True)
        window, window_steps, window_time = {}, 0, 0.0
      if eval_step and (step % eval_period == 0 or step == total_steps):
        result = {f"eval/{k}": v for k, v in _run_eval(eval_step, state["params"], eval_batches, lay).items()}
        writer.write(step, result)
        last.update(result)
      if checkpointer.should_save(step) or step == total_steps:
        checkpointer.save(step, state, meta(step))
      if stop.agreed():
        checkpointer.save(step, state, meta(step))
        logging.warning("Stopped at step %d after SIGTERM; the checkpoint is in %s", step, checkpointer.directory)
        break
  finally:
    progress.update(window_steps)
    progress.close()
    stop.restore()
    writer.close()
    checkpointer.close()
  _write_config(model_dir_path, operative=True)
  return last


def evaluate(*, model: EncoderDecoderModel, model_dir: str, eval_dataset_cfg: pipeline.DatasetConfig,
             partitioner: partitioning.Partitioner | None = None,
             optimizer: optax.GradientTransformation | None = None, eval_steps: int = 20,
             checkpoint_step: int | None = None, random_seed: int = 0) -> dict[str, float]:
  """Evaluate a checkpoint of MODEL_DIR on `eval_dataset_cfg`; writes `eval/*` to metrics.jsonl at its step."""
  partitioner = partitioner or partitioning.Partitioner()
  checkpointer = ckpt_lib.Checkpointer(model_dir)
  step = checkpoint_step if checkpoint_step is not None else checkpointer.latest_step()
  if step is None:
    raise FileNotFoundError(f"No checkpoint under {checkpointer.directory}; train first or point MODEL_DIR at a "
                            "directory with checkpoints.")
  _check_vocab(model, eval_dataset_cfg.mixture_or_task_name)
  lengths = pipeline.model_feature_lengths(eval_dataset_cfg)
  batch_spec = state_lib.batch_specs(lengths, eval_dataset_cfg.batch_size)
  # The optimizer only shapes the checkpoint's tree: it must be the one training used.
  lay = state_lib.layout(model, optimizer or optim.make_optimizer(), partitioner, batch_spec, random_seed)
  state, _ = checkpointer.restore(lay.abstract, step)
  checkpointer.close()
  result = {f"eval/{k}": v for k, v in _run_eval(state_lib.make_eval_step(model, lay, partitioner),
                                                 state["params"], _eval_batches(eval_dataset_cfg, eval_steps),
                                                 lay).items()}
  writer = metrics_lib.MetricsWriter(model_dir)
  writer.write(step, result)
  writer.close()
  return {"step": step, **result}
