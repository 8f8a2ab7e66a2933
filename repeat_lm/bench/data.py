"""`repeat-lm bench data`: throughput of the input pipeline exactly as the trainer consumes it (`get_batches`).

Reports host batches, examples and tokens per second after a warm-up, the one-off setup (tokenising the subset,
drawing the first epoch's order), and the cost of starting at a late step (resume). With `train_step_s`, also how many
times faster than the training step the pipeline produces batches (it should be >= 5x, so input never stalls the step).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from repeat_lm import checks
from repeat_lm.data import pipeline


@dataclasses.dataclass(frozen=True)
class DataBenchConfig:
  steps: int = 50  # timed host batches
  warmup: int = 3
  shard_id: int = 0
  num_shards: int = 1
  resume_step: int = 100_000  # a late step, to time the first batch after a resume
  train_step_s: float | None = None  # the training step's time, to compare against

  def __post_init__(self):
    if self.steps < 1:
      raise ValueError(f"--steps={self.steps}: time at least one batch.")
    if self.warmup < 0:
      raise ValueError(f"warmup={self.warmup}: must be >= 0.")
    if not 0 <= self.shard_id < self.num_shards:
      raise ValueError(f"shard_id={self.shard_id} with --num_shards={self.num_shards}: need num_shards >= 1 and "
                       "0 <= shard_id < num_shards.")
    # NaN passed a `<= 0` test and printed "nanx faster than a nans training step".
    if self.train_step_s is not None and not (checks.finite_number(self.train_step_s) and self.train_step_s > 0):
      raise ValueError(f"--train_step_s={self.train_step_s}: a step time must be a finite number of seconds > 0.")


def _tokens(batch) -> tuple[int, int]:
  return int((batch['encoder_input_tokens'] > 0).sum()), int((batch['decoder_target_tokens'] > 0).sum())


def _examples(batch) -> int:
  """Examples with targets in a host batch: one per decoder segment where rows are packed (other SeqIO tasks:
  seqio's converter puts several examples in a row), else one per row with loss weights."""
  segments = batch.get('decoder_segment_ids')
  if segments is None:
    return int((batch['decoder_loss_weights'].sum(1) > 0).sum())
  starts = (segments != 0) & np.concatenate([np.ones_like(segments[:, :1], bool), segments[:, 1:] != segments[:, :-1]],
                                            axis=1)
  return int(starts.sum())


def timed_batches(total: int | None, bench: DataBenchConfig, task: str) -> int:
  """How many batches are timed: `bench.steps`, or what a finite stream holds after the first batch and the warm-up
  (a short task ended the loop in a bare StopIteration)."""
  if total is None or total >= 1 + bench.warmup + bench.steps:
    return bench.steps
  if total < 2 + bench.warmup:
    raise ValueError(f"{task} holds {total} batch(es) of this size; timing needs at least {2 + bench.warmup} (the "
                     f"first, {bench.warmup} of warm-up and one timed): use a smaller --batch_size or a task with "
                     "more examples.")
  return total - 1 - bench.warmup


def run_benchmark(cfg: pipeline.DatasetConfig, bench: DataBenchConfig = DataBenchConfig()) -> dict:
  start = time.perf_counter()  # the setup includes building the stream, which num_batches may do first
  total = pipeline.num_batches(cfg)
  steps = timed_batches(total, bench, cfg.mixture_or_task_name)
  batches = pipeline.get_batches(cfg, shard_id=bench.shard_id, num_shards=bench.num_shards)
  first = next(batches)
  setup_s = time.perf_counter() - start
  for _ in range(bench.warmup):
    next(batches)
  inputs = targets = examples = 0
  start = time.perf_counter()
  for _ in range(steps):
    batch = next(batches)
    i, t = _tokens(batch)
    inputs, targets, examples = inputs + i, targets + t, examples + _examples(batch)
  elapsed = time.perf_counter() - start
  batches.close()
  resume_step = bench.resume_step if total is None else min(bench.resume_step, total - 1)
  start = time.perf_counter()
  late = pipeline.get_batches(cfg, start_step=resume_step, shard_id=bench.shard_id, num_shards=bench.num_shards)
  next(late)
  late.close()
  resume_s = time.perf_counter() - start
  lengths = cfg.task_feature_lengths
  padded = first['encoder_input_tokens'].shape[0] * (lengths['inputs'] + lengths['targets'])
  result = {
      'task': cfg.mixture_or_task_name, 'split': cfg.split, 'batch_size': cfg.batch_size,
      'host_rows': first['encoder_input_tokens'].shape[0], 'num_shards': bench.num_shards,
      'feature_lengths': dict(lengths), 'setup_s': setup_s, 'resume_step': resume_step,
      'resume_first_batch_s': resume_s,
      'timed_batches': steps, 'stream_batches': total,  # fewer than --steps where the stream ends first
      'batch_time_s': elapsed / steps,
      'batches_per_s': steps / elapsed,
      'examples_per_s': examples / elapsed,
      'tokens_per_s': (inputs + targets) / elapsed,  # non-padding input + target tokens
      'row_tokens_per_s': padded * steps / elapsed,  # what the training step consumes, padding included
      'input_fill': inputs / max(steps * first['encoder_input_tokens'].size, 1),
  }
  if bench.train_step_s:
    result['train_step_s'] = bench.train_step_s
    result['times_faster_than_training'] = bench.train_step_s / result['batch_time_s']
  return result


def format_report(r: dict) -> str:
  lines = [f"{r['task']} [{r['split']}]: host batch {r['host_rows']} rows of {r['feature_lengths']} "
           f"({r['num_shards']} host(s))",
           f"setup {r['setup_s']:.2f}s; {r['batch_time_s'] * 1e3:.2f} ms/batch over {r['timed_batches']} batches"
           + (f" (the stream holds {r['stream_batches']})" if r.get('stream_batches') is not None else "")
           + f"; {r['examples_per_s']:.0f} examples/s; "
           f"{r['tokens_per_s']:.0f} tokens/s ({r['row_tokens_per_s']:.0f} incl. padding); first batch at step "
           f"{r['resume_step']} in {r['resume_first_batch_s']:.2f}s"]
  if 'times_faster_than_training' in r:
    lines.append(f"{r['times_faster_than_training']:.1f}x faster than a {r['train_step_s']}s training step")
  return '\n'.join(lines)
