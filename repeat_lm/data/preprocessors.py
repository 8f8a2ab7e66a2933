"""SeqIO preprocessors for any SeqIO task: UL2's mixture of denoisers (or span corruption) over tokenised documents.

repeat_lm's own repeated tasks do not need this (their examples come from `plan`); it is for T5X users with their
own sources, e.g.
  preprocessors=[seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                 functools.partial(preprocessors.denoise, objective=denoisers.ul2()),
                 seqio.preprocessors.append_eos_after_trim]
Documents are joined into one stream and cut into chunks of `EXAMPLES_PER_CHUNK` times the longest denoiser's raw
length; each chunk is then cut into examples, each with a denoiser drawn from the objective's rates and that
denoiser's raw length (the last piece of a chunk is shorter). Every token lands in exactly one example. Seeds come
from SeqIO (`map_over_dataset`), so examples are reproducible given the seed passed to `get_dataset`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import seqio
import tensorflow as tf

from repeat_lm.data import denoisers as den_lib
from repeat_lm.data import hashing, objectives

# A chunk's last example is cut short. Chunks of one longest raw length (999 tokens for UL2 at 512/512, where every
# raw length is over half of that) held one whole example and one cut: 46% of the examples were cut short. 64 of them
# (~64k tokens, the size T5's select_random_chunk takes) cut about 1%.
EXAMPLES_PER_CHUNK = 64


def denoise(dataset: tf.data.Dataset, sequence_length: Mapping[str, int], output_features: Mapping[str, seqio.Feature],
            objective: den_lib.Objective | None = None) -> tf.data.Dataset:
  """Tokenised documents in 'targets' -> {'inputs', 'targets'} examples (no EOS) of `objective` (default: UL2)."""
  objective = objective or den_lib.ul2()
  vocabulary = output_features['targets'].vocabulary
  modes = [np.asarray(vocabulary.encode(d.mode) if objective.mode_tokens and d.mode else [], np.int32)
           for d in objective.denoisers]
  raw = [den_lib.raw_length(d, sequence_length['inputs'], sequence_length['targets'], len(m))
         for d, m in zip(objective.denoisers, modes)]
  vocab_size = vocabulary.vocab_size
  den_lib.warn_if_sentinels_overflow(objective, raw, getattr(vocabulary, 'extra_ids', 0) or 0)

  def examples(chunk: np.ndarray, seed: np.ndarray):
    key = hashing.derive(*(int(s) for s in seed))
    inputs, targets, pos, j = [], [], 0, 0
    while pos < len(chunk):
      d = int(hashing.choice(key, np.array([j]), objective.rates)[0])
      i, t = den_lib.corrupt(chunk[pos:pos + raw[d]], objective.denoisers[d], hashing.derive(key, j), vocab_size,
                             modes[d])
      inputs.append(i)
      targets.append(t)
      pos, j = pos + raw[d], j + 1
    lengths = lambda xs: np.array([len(x) for x in xs], np.int64)  # noqa: E731
    return (np.concatenate(inputs).astype(np.int32), lengths(inputs), np.concatenate(targets).astype(np.int32),
            lengths(targets))

  @seqio.map_over_dataset(num_seeds=1)
  def split(features, seed):
    flat_in, len_in, flat_tgt, len_tgt = tf.numpy_function(
        examples, [features['targets'], seed], (tf.int32, tf.int64, tf.int32, tf.int64), stateful=False)
    return {'inputs': tf.RaggedTensor.from_row_lengths(tf.reshape(flat_in, [-1]), tf.reshape(len_in, [-1])),
            'targets': tf.RaggedTensor.from_row_lengths(tf.reshape(flat_tgt, [-1]), tf.reshape(len_tgt, [-1]))}

  chunks = objectives.concat_and_chunk(dataset, EXAMPLES_PER_CHUNK * max(raw))
  return split(chunks).unbatch()
