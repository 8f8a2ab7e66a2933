"""The standalone UL2 SeqIO preprocessor: every token used once, mode tokens, lengths, seeds."""

import numpy as np
import pytest
import seqio
import tensorflow as tf

from repeat_lm.data import denoisers, objectives, preprocessors

LENGTHS = {'inputs': 512, 'targets': 512}
# The lowest sentinel to read back: X (mu 3, r 0.5) has 127 spans at 512/512, so its sentinels run below the 100 extra
# ids (to 31973); the test documents' ids stay under 7000.
FIRST_SENTINEL = 31000


@pytest.fixture(scope='module')
def features(t5_vocab_file):
  vocab = seqio.SentencePieceVocabulary(t5_vocab_file, extra_ids=100)
  return {'inputs': seqio.Feature(vocab), 'targets': seqio.Feature(vocab)}


def run(features, seed, objective=None):
  docs = [np.arange(3, 3 + n, dtype=np.int32) + 7 * k for k, n in enumerate([900, 6000, 50, 4000])]
  ds = tf.data.Dataset.from_generator(lambda: ({'targets': d} for d in docs),
                                      output_signature={'targets': tf.TensorSpec([None], tf.int32)})
  with seqio.utils.map_seed_manager(seed):
    return docs, list(preprocessors.denoise(ds, LENGTHS, features, objective).as_numpy_iterator())


def test_every_token_once_with_its_mode_token(features):
  vocab = features['targets'].vocabulary
  modes = {m: vocab.encode(m) for m in ('[NLU]', '[NLG]', '[S2S]')}
  docs, examples = run(features, 1)  # ~15 examples; at seed 0 none of them draws the prefix LM (p 0.78^15)
  stream, seen = [], set()
  for ex in examples:
    assert len(ex['inputs']) + 1 <= 512 and len(ex['targets']) + 1 <= 512
    mode = next(m for m, ids in modes.items() if ex['inputs'][:len(ids)].tolist() == ids)
    seen.add(mode)
    inputs = ex['inputs'][len(modes[mode]):]
    if mode == '[S2S]':
      stream += inputs.tolist() + ex['targets'].tolist()
    else:
      assert ex['targets'][0] == 32099
      stream += objectives.uncorrupt(inputs, ex['targets'], FIRST_SENTINEL)
  assert stream == np.concatenate(docs).tolist() and seen == set(modes)


def test_seeded_and_span_corruption_too(features):
  _, a = run(features, 1)
  _, b = run(features, 1)
  _, c = run(features, 2)
  assert all(np.array_equal(x['inputs'], y['inputs']) for x, y in zip(a, b))
  assert any(not np.array_equal(x['inputs'], y['inputs']) for x, y in zip(a, c))
  _, span = run(features, 0, denoisers.span_corruption())
  assert {len(ex['inputs']) for ex in span[:-1]} == {511} and {len(ex['targets']) for ex in span[:-1]} == {113}


def test_warns_when_spans_outnumber_the_extra_ids(features, caplog):
  # X (mu 3, r 0.5) at 512/512: 127 noise spans per full chunk, 100 extra ids (docs/data.md section 5: logged).
  import logging
  with caplog.at_level(logging.WARNING):
    run(features, 0)
  assert 'X_mu3_r0.5: 127 noise spans per 760-token chunk but only 100 extra ids' in caplog.text
  assert 'R_mu3_r0.15' not in caplog.text and 'S_r0.25' not in caplog.text


def test_only_the_last_example_is_cut_short(features):
  # Chunks of one longest raw length (999 at 512/512) held a whole example and a cut one: ~half the examples were cut,
  # where the repeated tasks' layout cuts only the last one.
  vocab = features['targets'].vocabulary
  objective = denoisers.ul2()
  modes = [vocab.encode(d.mode) for d in objective.denoisers]
  raw = {denoisers.raw_length(d, 512, 512, len(m)) for d, m in zip(objective.denoisers, modes)}
  _, examples = run(features, 0, objective)
  lengths = []
  for ex in examples:
    inputs = ex['inputs'][len(next(m for m in modes if ex['inputs'][:len(m)].tolist() == m)):]
    s2s = ex['inputs'][:len(modes[-1])].tolist() == modes[-1]
    rebuilt = inputs.tolist() + ex['targets'].tolist() if s2s else objectives.uncorrupt(inputs, ex['targets'],
                                                                                        FIRST_SENTINEL)
    lengths.append(len(rebuilt))
  assert len(examples) > 10 and all(n in raw for n in lengths[:-1])


def test_each_example_draws_its_own_mask(features):
  # Examples of one chunk with the same denoiser and length must not share a noise mask (one key per example).
  _, examples = run(features, 0, denoisers.span_corruption())
  sentinel_positions = {tuple(np.flatnonzero(ex['inputs'] >= FIRST_SENTINEL)) for ex in examples[:-1]}
  assert len(examples) > 10 and len(sentinel_positions) == len(examples) - 1


def test_no_mode_tokens_when_the_objective_has_them_off(features):
  vocab = features['targets'].vocabulary
  modes = [vocab.encode(m) for m in ('[NLU]', '[NLG]', '[S2S]')]
  _, examples = run(features, 1, denoisers.ul2(mode_tokens=False))
  assert len(examples) > 10
  assert not any(ex['inputs'][:len(m)].tolist() == m for ex in examples for m in modes)
