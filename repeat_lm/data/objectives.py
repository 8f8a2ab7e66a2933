"""T5 span corruption in TensorFlow ops, so it runs inside tf.data / SeqIO.

A raw chunk of L tokens gets a noise mask of num_noise = round(L * density) tokens (clamped to [1, L-1]) in
num_spans = round(num_noise / mean_span) spans (at least 1). Non-noise and noise spans alternate, starting with
non-noise, so the chunk always ends in a noise span. Each noise span becomes one sentinel in the inputs; the targets
are each sentinel followed by its span. Sentinels count down from vocab_size - 1 (<extra_id_0>).

Randomness is stateless: a mask is a pure function of (seed, chunk length). T5's arithmetic: docs/data.md.
With more noise spans than extra ids (e.g. mu 3, r 0.5 at 512 inputs: 128 spans), sentinels run on into ordinary
token ids, as in T5; `span_corruption` warns when that can happen.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import seqio
import tensorflow as tf

from repeat_lm.data import denoisers as den_lib

log = logging.getLogger(__name__)


def _corrupted_lengths(raw_length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
  """(inputs, targets) lengths, each with one EOS, for a chunk of `raw_length` tokens, with the clamps
  `noise_span_mask` applies (at least one span; T5's own arithmetic omits them, and so promised one token too few
  where round(num_noise / mean_span) is 0: short inputs or long spans; at 512/0.15/3 the clamps are inactive)."""
  num_noise, num_spans = den_lib.span_counts(raw_length, noise_density, mean_noise_span_length)
  return raw_length - num_noise + num_spans + 1, num_noise + num_spans + 1


def random_spans_lengths(inputs_length: int, noise_density: float = 0.15,
                         mean_noise_span_length: float = 3.0) -> tuple[int, int]:
  """(raw_tokens_length, targets_length): the longest raw chunk whose corrupted inputs fit `inputs_length`.

  512 -> (568, 114) at the T5 defaults. At noise_density 0.5 a chunk one token shorter is used when that brings the
  targets down to `inputs_length` (T5 does the same, so 512/512 stays a round number).
  """
  den_lib.check_noise(noise_density, mean_noise_span_length, 'span corruption')  # as a Denoiser checks them
  raw_length = inputs_length - 1
  while _corrupted_lengths(raw_length + 1, noise_density, mean_noise_span_length)[0] <= inputs_length:
    raw_length += 1
  targets_length = _corrupted_lengths(raw_length, noise_density, mean_noise_span_length)[1]
  if noise_density == 0.5 and targets_length > inputs_length:
    raw_length -= 1
    targets_length = _corrupted_lengths(raw_length, noise_density, mean_noise_span_length)[1]
  return raw_length, targets_length


def _random_segmentation(num_items: tf.Tensor, num_segments: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Lengths [num_segments] of a uniformly random split of `num_items` into non-empty segments.

  Picks num_segments - 1 distinct cut points among the num_items - 1 gaps (a random permutation's prefix), so every
  composition is equally likely.
  """
  scores = tf.random.stateless_uniform([num_items - 1], seed=seed)
  cuts = tf.sort(tf.argsort(scores)[:num_segments - 1] + 1)
  bounds = tf.concat([[0], cuts, [num_items]], axis=0)
  return bounds[1:] - bounds[:-1]


def noise_span_mask(length: tf.Tensor, seed: tf.Tensor, noise_density: float = 0.15,
                    mean_noise_span_length: float = 3.0) -> tf.Tensor:
  """bool [length], True on noise tokens. Chunks shorter than 2 tokens get no noise (nothing to hide from)."""
  length = tf.cast(length, tf.int32)

  def mask():
    # float64 and round-half-to-even: the same arithmetic as `random_spans_lengths` in Python.
    num_noise = tf.cast(tf.round(tf.cast(length, tf.float64) * noise_density), tf.int32)
    num_noise = tf.clip_by_value(num_noise, 1, length - 1)
    num_spans = tf.cast(tf.round(tf.cast(num_noise, tf.float64) / mean_noise_span_length), tf.int32)
    # Every span needs >= 1 token on both sides of the alternation.
    num_spans = tf.clip_by_value(num_spans, 1, tf.minimum(num_noise, length - num_noise))
    seed_noise, seed_clean = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    noise_lengths = _random_segmentation(num_noise, num_spans, seed_noise)
    clean_lengths = _random_segmentation(length - num_noise, num_spans, seed_clean)
    span_lengths = tf.reshape(tf.stack([clean_lengths, noise_lengths], axis=1), [-1])  # clean, noise, clean, ...
    span_starts = tf.cumsum(span_lengths, exclusive=True)[1:]
    is_start = tf.math.unsorted_segment_sum(tf.ones_like(span_starts), span_starts, length)
    span_index = tf.cumsum(is_start)
    return tf.equal(span_index % 2, 1)

  return tf.cond(length < 2, lambda: tf.zeros([length], tf.bool), mask)


def _replace_spans(tokens: tf.Tensor, span_mask: tf.Tensor, vocab_size: int) -> tf.Tensor:
  """Each run of True in `span_mask` -> one sentinel (vocab_size - 1, vocab_size - 2, ...); other tokens kept."""
  previous = tf.concat([[False], span_mask[:-1]], axis=0)
  first = span_mask & ~previous
  sentinels = tf.cast(vocab_size, tokens.dtype) - tf.cumsum(tf.cast(first, tokens.dtype))
  return tf.boolean_mask(tf.where(first, sentinels, tokens), ~(span_mask & previous))


def span_corrupt(tokens: tf.Tensor, seed: tf.Tensor, vocab_size: int, noise_density: float = 0.15,
                 mean_noise_span_length: float = 3.0) -> dict[str, tf.Tensor]:
  """1-D tokens -> {'inputs', 'targets'} (no EOS). Same (seed, length) -> same mask."""
  noise = noise_span_mask(tf.size(tokens), seed, noise_density, mean_noise_span_length)
  # A chunk too short for noise keeps all its tokens in the inputs and has nothing to predict.
  targets = tf.cond(tf.reduce_any(noise), lambda: _replace_spans(tokens, ~noise, vocab_size), lambda: tokens[:0])
  return {'inputs': _replace_spans(tokens, noise, vocab_size), 'targets': targets}


def uncorrupt(inputs: np.ndarray, targets: np.ndarray, first_sentinel: int) -> list[int]:
  """The raw chunk back from one example (EOS/padding stripped first): each sentinel -> its target span.

  `first_sentinel` is the lowest sentinel id (vocab_size - extra_ids). For checks and analysis, not for training.
  """
  spans: dict[int, list[int]] = {}
  span: list[int] = []
  for t in targets:
    if t >= first_sentinel:
      span = spans.setdefault(int(t), [])
    else:
      span.append(int(t))
  out: list[int] = []
  for t in inputs:
    out.extend(spans[int(t)] if t >= first_sentinel else [int(t)])
  return out


def concat_and_chunk(dataset: tf.data.Dataset, chunk_length: int, key: str = 'targets') -> tf.data.Dataset:
  """Concatenates `key` of consecutive examples into one token stream and cuts it into `chunk_length` pieces.

  Nothing is dropped: a long document spans several chunks and the last chunk may be shorter. Documents are
  joined without a separator, as in T5.
  """
  dtype = dataset.element_spec[key].dtype

  # Per document, not per token (unbatch + batch is ~1.5x slower): carry the stream's unfinished tail from one
  # document to the next and emit the whole chunks; an end marker flushes the shorter last chunk.
  def step(tail, doc_and_end):
    tokens, is_end = doc_and_end
    stream = tf.concat([tail, tokens], axis=0)
    num_full = tf.size(stream) // chunk_length
    rest = tf.size(stream) - num_full * chunk_length
    flush = tf.cast(is_end & (rest > 0), tf.int32)
    row_lengths = tf.concat([tf.fill([num_full], chunk_length), tf.fill([flush], rest)], axis=0)
    used = tf.reduce_sum(row_lengths)
    return stream[used:], tf.RaggedTensor.from_row_lengths(stream[:used], row_lengths)

  docs = dataset.map(lambda ex: (ex[key], False))
  end = tf.data.Dataset.from_tensors((tf.zeros([0], dtype), True))
  chunks = docs.concatenate(end).scan(tf.zeros([0], dtype), step).unbatch()
  return chunks.map(lambda chunk: {key: chunk})


def span_corruption(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
                    output_features: Mapping[str, seqio.Feature], noise_density: float = 0.15,
                    mean_noise_span_length: float = 3.0) -> tf.data.Dataset:
  """SeqIO preprocessor: tokenised documents in 'targets' -> span-corrupted {'inputs', 'targets'} chunks.

  Chunks have the raw length that fills `sequence_length['inputs']`; no EOS is added (follow with
  `seqio.preprocessors.append_eos_after_trim`). Seeds come from SeqIO (`map_over_dataset(num_seeds=1)`): one per
  chunk, in stream order, derived from the seed given to `get_dataset`.
  """
  if not sequence_length or not sequence_length.get('inputs'):
    raise ValueError("span_corruption needs sequence_length['inputs'] (the task_feature_lengths).")
  raw_length, targets_length = random_spans_lengths(
      sequence_length['inputs'], noise_density, mean_noise_span_length)
  if raw_length < 2:  # a 1-token chunk has nothing to hide; 0 tokens cannot be chunked at all
    raise ValueError(f"span_corruption: inputs length {sequence_length['inputs']} is too short, no chunk of 2+ "
                     "tokens fits (its inputs need a token, a sentinel and EOS); use at least 3.")
  if sequence_length.get('targets', targets_length) < targets_length:
    log.warning("targets length %d < %d needed for inputs length %d: targets will be truncated.",
                sequence_length['targets'], targets_length, sequence_length['inputs'])
  vocabulary = output_features['targets'].vocabulary
  vocab_size = vocabulary.vocab_size
  max_spans = int(round(round(raw_length * noise_density) / mean_noise_span_length))
  if max_spans > vocabulary.extra_ids:
    # As in T5: sentinels keep counting down into ordinary token ids. Say so rather than corrupt silently.
    log.warning('%d noise spans per chunk but only %d extra ids: the last %d sentinels reuse ordinary token ids.',
                max_spans, vocabulary.extra_ids, max_spans - vocabulary.extra_ids)

  @seqio.map_over_dataset(num_seeds=1)
  def corrupt(features, seed):
    return span_corrupt(features['targets'], seed, vocab_size, noise_density, mean_noise_span_length)

  return corrupt(concat_and_chunk(dataset, raw_length))
