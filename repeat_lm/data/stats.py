"""What a task really gives: measured token counts, noise statistics and per-document repeat counts.

Everything is measured from the examples the trainer would get (the same `plan.Stream`): noise density and mean
span length are read back from each example's sentinels (`denoisers.measure`); which source tokens an example holds
comes from the stream's document pieces, so `doc_repeats_min/max` count how often every document of the subset was
really seen.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any

import numpy as np
import seqio

from repeat_lm import checks
from repeat_lm.data import denoisers as den_lib
from repeat_lm.data import plan, tasks

DEFAULT_LENGTHS = {'inputs': 512, 'targets': 114}
_MAX_BITMAP_TOKENS = 1 << 31  # a bool per subset token to count unique ones; beyond this, unique counts are skipped


def _number(x: float) -> float | int:
  return int(x) if float(x).is_integer() else round(float(x), 6)


def check_selection(counts: Mapping[str, int | None], start: int | None = None) -> None:
  """Which examples to read, by flag name: counts (None: all) at least 1, the first global index at least 0. Checked by
  `data stats` / `data show` and by the functions behind them: a negative count gave 'examples: -3' or an empty
  listing, a negative start an IndexError, a fractional one a TypeError."""
  bad = [f"{flag}={value!r}" for flag, value in counts.items() if value is not None and not checks.is_count(value)]
  bad += [f"--start={start!r}"] if start is not None and not checks.is_count(start, 0) else []
  if bad:
    raise ValueError(f"{', '.join(bad)}: counts must be at least 1 and --start (a global example index) at least 0.")


def _stream(task: str, split: str, lengths: Mapping[str, int], seed: int) -> plan.Stream:
  tasks.ensure_registered(task)
  if tasks.mixture(task):
    raise ValueError(f'{task!r} is a mixture; inspect its tasks one by one: {list(tasks.mixture(task)[0])}.')
  if tasks.spec(task) is None:
    raise ValueError(f'{task!r} is a SeqIO task or mixture but not a repeated pre-training task (a fine-tuning task, '
                     'for one); data stats/show inspect those: register one with tasks.repeated_task, or use a name '
                     'from the scheme in docs/data.md.')
  # Training is shuffled; the validation split is read the way evaluation reads it: one ordered pass.
  return tasks.stream(task, split, lengths, seed, shuffle=split == 'train')


def task_stats(task: str, split: str = 'train', max_examples: int | None = None,
               feature_lengths: Mapping[str, int] = DEFAULT_LENGTHS, seed: int = 0) -> dict[str, Any]:
  """One JSON-able dict; see docs/data.md for every key. Unbounded streams: one epoch unless max_examples."""
  check_selection({'--max_examples': max_examples})
  stream = _stream(task, split, feature_lengths, seed)
  total = stream.total_examples
  if max_examples is None:  # all of a bounded stream; one epoch of an unbounded one
    n = total if total is not None else stream.examples_per_epoch
  else:  # an unbounded stream has as many as asked for (capping at one epoch measured fewer than asked, silently)
    n = max_examples if total is None else min(total, max_examples)
  store, objective, vocab_size = stream.store, stream.objective, stream.vocab_size
  covered = np.zeros(store.num_documents, np.int64)
  seen = np.zeros(store.num_tokens, bool) if store.num_tokens <= _MAX_BITMAP_TOKENS else None
  per = collections.defaultdict(lambda: np.zeros(5, np.int64))  # examples, raw, noise, spans, inputs
  input_tokens = target_tokens = 0
  epochs = set()
  for g in range(n):
    ex = stream.example(g)
    d = objective.denoisers[ex.denoiser]
    # Nothing to strip (examples carry no EOS or padding): stripping ids 0 and 1 dropped the text tokens of
    # vocabularies whose unk is 0 (SentencePiece's default) or 1, which shortened the measured spans.
    raw, noise, spans = den_lib.measure(ex.inputs, ex.targets, d, vocab_size, len(stream.mode_ids[ex.denoiser]),
                                        strip=False)
    per[ex.denoiser] += (1, raw, noise, spans, len(ex.inputs) + 1)
    input_tokens += len(ex.inputs) + 1  # + EOS, as in the batch
    target_tokens += len(ex.targets) + 1
    epochs.add(ex.epoch)
    for doc, a, b in stream.pieces(g):
      covered[doc] += b - a
      if seen is not None:
        seen[store.offsets[doc] + a:store.offsets[doc] + b] = True
  totals = sum(per.values()) if per else np.zeros(5, np.int64)
  repeats = covered / store.doc_lengths
  source_tokens = int(covered.sum())
  out = {
      'task': task, 'split': split, 'feature_lengths': dict(feature_lengths), 'seed': seed,
      'examples': n, 'input_tokens': input_tokens, 'target_tokens': target_tokens,
      'source_tokens': source_tokens,
      'unique_source_tokens': None if seen is None else int(seen.sum()),
      'epochs': _number(source_tokens / store.num_tokens),
      'epochs_touched': len(epochs),
      'noise_density': _number(totals[2] / max(totals[1], 1)),
      'mean_noise_span_length': _number(totals[2] / max(totals[3], 1)),
      'doc_repeats_min': _number(repeats.min()), 'doc_repeats_max': _number(repeats.max()),
      'documents': store.num_documents, 'subset_tokens': store.num_tokens,
      'task_epochs': stream.epochs, 'examples_per_epoch': stream.examples_per_epoch,
      'static_masks': stream.static_masks,
      'input_fill': _number(input_tokens / max(n * feature_lengths['inputs'], 1)),
      'target_fill': _number(target_tokens / max(n * feature_lengths['targets'], 1)),
      'store': {k: v for k, v in store.info.items() if k != 'fingerprint'},
  }
  if len(objective.denoisers) > 1:
    out['denoisers'] = {
        d.name: {'rate': rate, 'raw_length': raw_len, 'examples': int(per[i][0]),
                 'noise_density': _number(per[i][2] / max(per[i][1], 1)),
                 'mean_noise_span_length': _number(per[i][2] / max(per[i][3], 1)),
                 'mean_inputs': _number(per[i][4] / max(per[i][0], 1))}
        for i, (d, rate, raw_len) in enumerate(zip(objective.denoisers, objective.rates, stream.raw_lengths))}
  else:
    out['raw_length'] = stream.raw_lengths[0]
  return out


def show_examples(task: str, n: int = 3, split: str = 'train', start: int = 0,
                  feature_lengths: Mapping[str, int] = DEFAULT_LENGTHS, seed: int = 0) -> list[dict[str, Any]]:
  """Examples start..start+n decoded to text (sentinels as <extra_id_k>), with where they come from."""
  check_selection({'-n': n}, start)
  stream = _stream(task, split, feature_lengths, seed)
  vocabulary: seqio.Vocabulary = tasks.spec(task).vocabulary
  out = []
  last = stream.total_examples if stream.total_examples is not None else start + n
  if stream.total_examples is not None and start >= last:  # else nothing is shown, as if the stream were empty
    raise ValueError(f'--start={start} is past the {last} examples of this stream (indices 0 to {last - 1}).')
  for g in range(start, min(start + n, last)):
    ex = stream.example(g)
    out.append({'index': g, 'epoch': ex.epoch, 'example_in_epoch': ex.index,
                'denoiser': stream.objective.denoisers[ex.denoiser].name,
                'documents': sorted({doc for doc, _, _ in stream.pieces(g)}),
                'inputs': vocabulary.decode(ex.inputs.tolist()), 'targets': vocabulary.decode(ex.targets.tolist()),
                'input_tokens': len(ex.inputs) + 1, 'target_tokens': len(ex.targets) + 1})
  return out


def format_examples(examples: list[dict[str, Any]]) -> str:
  blocks = []
  for ex in examples:
    blocks.append(f"--- example {ex['index']} (epoch {ex['epoch']}, #{ex['example_in_epoch']} in the epoch; "
                  f"{ex['denoiser']}; documents {ex['documents']}; {ex['input_tokens']} input / "
                  f"{ex['target_tokens']} target tokens)\ninputs:  {ex['inputs']}\ntargets: {ex['targets']}")
  return '\n'.join(blocks)
