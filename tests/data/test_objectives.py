"""Span corruption: length arithmetic (reference.md section 4), mask invariants, reconstruction, statistics."""

import logging

import numpy as np
import pytest
import seqio
import tensorflow as tf

from repeat_lm.data import objectives

V = 32100  # T5's vocabulary with 100 extra ids: <extra_id_0> = 32099


def corrupt(tokens, seed=(1, 2), vocab_size=V, density=0.15, mu=3.0):
  out = objectives.span_corrupt(tf.constant(tokens, tf.int32), tf.constant(seed, tf.int64), vocab_size, density, mu)
  return out['inputs'].numpy(), out['targets'].numpy()


def mask(length, seed=(1, 2), density=0.15, mu=3.0):
  return objectives.noise_span_mask(tf.constant(length), tf.constant(seed, tf.int64), density, mu).numpy()


@pytest.mark.parametrize('mu, density, raw, targets', [
    (3, 0.15, 568, 114), (8, 0.15, 588, 100), (64, 0.15, 600, 92),
    (3, 0.5, 766, 512), (8, 0.5, 908, 512), (64, 0.5, 1006, 512)])
def test_random_spans_lengths_reference_cases(mu, density, raw, targets):
  assert objectives.random_spans_lengths(512, density, mu) == (raw, targets)


@pytest.mark.parametrize('mu, density', [(3, 0.15), (8, 0.15), (64, 0.15), (3, 0.5), (8, 0.5), (64, 0.5)])
def test_full_chunk_fills_the_lengths_exactly(mu, density):
  raw, targets_length = objectives.random_spans_lengths(512, density, mu)
  for seed in [(0, 0), (5, 7), (123, 9)]:
    inputs, targets = corrupt(np.arange(3, 3 + raw), seed, density=density, mu=mu)
    assert len(inputs) + 1 == 512  # + EOS
    assert len(targets) + 1 == targets_length


@pytest.mark.parametrize('inputs_length, density, mu', [(128, 0.15, 64), (256, 0.15, 64), (8, 0.15, 3), (3, 0.15, 3),
                                                         (20, 0.5, 64)])
def test_short_inputs_and_long_spans_still_fit(inputs_length, density, mu):
  # round(num_noise / mu) is 0 here; the mask still makes one span, and the lengths must count it.
  raw, targets_length = objectives.random_spans_lengths(inputs_length, density, mu)
  for seed in [(0, 0), (5, 7)]:
    inputs, targets = corrupt(np.arange(3, 3 + raw), seed, density=density, mu=mu)
    assert len(inputs) + 1 == inputs_length and len(targets) + 1 == targets_length
    assert inputs[-1] >= V - 100  # the chunk ends in noise: its last input is a sentinel, kept within the length


@pytest.mark.parametrize('inputs_length', [1, 2])
def test_inputs_too_short_for_any_noise_are_a_clear_error(inputs_length):
  vocab = seqio.PassThroughVocabulary(size=V, eos_id=1)
  features = {'inputs': seqio.Feature(vocab), 'targets': seqio.Feature(vocab)}
  dataset = tf.data.Dataset.from_tensors({'targets': tf.range(3, 40, dtype=tf.int32)})
  with pytest.raises(ValueError, match=f'inputs length {inputs_length} is too short.*use at least 3'):
    objectives.span_corruption(dataset, {'inputs': inputs_length, 'targets': 8}, features)


def test_span_lengths_refuse_the_settings_a_denoiser_refuses():
  # random_spans_lengths (behind span_corruption and dropout_schedule.steps_per_epoch) took them unchecked: -0.15 gave
  # (511, 3) and mu -3 gave (600, 92) without a word, mu 0 a ZeroDivisionError; density 1 looped forever (last here,
  # so that the old code fails on the first case instead of hanging).
  for density, mu, named in [(-0.15, 3.0, 'noise_density=-0.15'), (0.15, -3.0, 'mean_noise_span_length=-3.0'),
                             (0.15, 0.0, 'mean_noise_span_length=0.0'), (float('nan'), 3.0, 'noise_density=nan'),
                             (1.0, 3.0, 'noise_density=1.0')]:
    with pytest.raises(ValueError, match=f'span corruption: {named} must'):
      objectives.random_spans_lengths(512, density, mu)


@pytest.mark.parametrize('length', [2, 3, 10, 37, 100, 568, 1006])
def test_mask_has_exact_noise_count_and_alternating_spans(length):
  num_noise = min(max(round(length * 0.15), 1), length - 1)
  num_spans = max(1, round(num_noise / 3))
  for seed in range(5):
    m = mask(length, (seed, 42))
    starts = np.flatnonzero(m & ~np.concatenate([[False], m[:-1]]))
    assert m.sum() == num_noise
    assert len(starts) == num_spans
    assert not m[0] and m[-1]  # starts with non-noise, so (alternating) ends with noise


def test_short_chunks():
  assert not mask(1).any()
  inputs, targets = corrupt([7])
  assert inputs.tolist() == [7] and targets.tolist() == []


@pytest.mark.parametrize('density, mu', [(0.15, 3.0), (0.5, 8.0), (0.15, 64.0)])
def test_inputs_and_targets_reconstruct_the_original(density, mu):
  rng = np.random.default_rng(0)
  for seed in range(10):
    tokens = rng.integers(3, 32000, size=rng.integers(2, 700))
    inputs, targets = corrupt(tokens, (seed, 1), density=density, mu=mu)
    assert objectives.uncorrupt(inputs, targets, V - 100) == tokens.tolist()


def test_sentinels_count_down_from_vocab_size_minus_one():
  inputs, targets = corrupt(np.arange(3, 571))
  sentinels_in = inputs[inputs >= V - 100]
  sentinels_tgt = targets[targets >= V - 100]
  assert sentinels_in[0] == 32099 and targets[0] == 32099
  np.testing.assert_array_equal(sentinels_in, 32099 - np.arange(len(sentinels_in)))
  np.testing.assert_array_equal(sentinels_tgt, sentinels_in)


def test_sentinels_with_the_t5_vocabulary(t5_vocab_file):
  vocabulary = seqio.SentencePieceVocabulary(t5_vocab_file, extra_ids=100)
  features = {'targets': seqio.Feature(vocabulary)}
  ds = tf.data.Dataset.from_tensors({'targets': tf.range(3, 3 + 568, dtype=tf.int32)})
  with seqio.utils.map_seed_manager(0):
    ex = next(iter(objectives.span_corruption(ds, {'inputs': 512, 'targets': 114}, features)))
  assert vocabulary.vocab_size == 32100
  assert ex['targets'][0] == 32099 and 32099 in ex['inputs'].numpy()
  assert vocabulary.tokenizer.id_to_piece(32099).endswith('<extra_id_0>')


def test_measured_density_and_mean_span_length():
  noise = spans = total = 0
  first_half = 0
  for seed in range(300):
    m = mask(568, (seed, 3))
    starts = m & ~np.concatenate([[False], m[:-1]])
    noise, spans, total = noise + m.sum(), spans + starts.sum(), total + m.size
    first_half += m[:284].sum()
  assert noise / total == pytest.approx(0.15, abs=0.005)
  assert noise / spans == pytest.approx(3.0, abs=0.1)
  assert first_half / noise == pytest.approx(0.5, abs=0.03)  # noise spread over the whole chunk


def test_span_lengths_vary():
  lengths = []
  for seed in range(50):
    m = mask(568, (seed, 4)).astype(int)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], m, [0]])))
    lengths += (edges[1::2] - edges[::2]).tolist()
  assert min(lengths) == 1 and max(lengths) > 6 and np.mean(lengths) == pytest.approx(3.0, abs=0.1)


def test_same_seed_same_output_different_seed_different():
  tokens = np.arange(3, 571)
  a, b, c = corrupt(tokens, (1, 2)), corrupt(tokens, (1, 2)), corrupt(tokens, (2, 1))
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not np.array_equal(a[0], c[0])


def test_chunking_keeps_every_token():
  docs = [np.arange(3, 8), np.arange(100, 1300), np.arange(2000, 2003), np.arange(5000, 5200)]
  ds = tf.data.Dataset.from_generator(lambda: ({'targets': d.astype(np.int32)} for d in docs),
                                      output_signature={'targets': tf.TensorSpec([None], tf.int32)})
  chunks = [c['targets'].numpy() for c in objectives.concat_and_chunk(ds, 568)]
  assert [len(c) for c in chunks[:-1]] == [568] * (len(chunks) - 1)
  np.testing.assert_array_equal(np.concatenate(chunks), np.concatenate(docs))


def test_preprocessor_output_is_reconstructible_and_seeded():
  vocab = seqio.PassThroughVocabulary(size=1000)
  features = {'targets': seqio.Feature(vocab)}
  tokens = np.arange(3, 900, dtype=np.int32)
  ds = tf.data.Dataset.from_tensors({'targets': tokens})

  def run(seed):
    with seqio.utils.map_seed_manager(seed):
      return list(objectives.span_corruption(ds, {'inputs': 64, 'targets': 14}, features).as_numpy_iterator())

  out = run(0)
  assert [len(ex['inputs']) for ex in out[:-1]] == [63] * (len(out) - 1)
  rebuilt = sum((objectives.uncorrupt(ex['inputs'], ex['targets'], 900) for ex in out), [])
  assert rebuilt == tokens.tolist()
  assert all(np.array_equal(x['inputs'], y['inputs']) for x, y in zip(out, run(0)))
  assert any(not np.array_equal(x['inputs'], y['inputs']) for x, y in zip(out, run(1)))


def test_warns_when_spans_outnumber_sentinels(caplog):
  features = {'targets': seqio.Feature(seqio.PassThroughVocabulary(size=32100, eos_id=1))}
  ds = tf.data.Dataset.from_tensors({'targets': tf.range(3, 800, dtype=tf.int32)})
  with caplog.at_level(logging.WARNING):
    objectives.span_corruption(ds, {'inputs': 512, 'targets': 512}, features, noise_density=0.5)
  assert '128 noise spans per chunk but only 0 extra ids' in caplog.text


def test_dense_noise_keeps_a_clean_token_before_every_span():
  # 6 noise tokens of 8 at mu 1: round(6 / 1) = 6 spans would need 6 clean tokens; the clamp gives 2 (section 4).
  for seed in range(2):
    m = mask(8, (seed, 3), density=0.75, mu=1.0)
    starts = m & ~np.concatenate([[False], m[:-1]])
    assert len(m) == 8 and m.sum() == 6 and starts.sum() == 2 and not m[0] and m[-1]


def test_uncorrupt_counts_the_lowest_sentinel_as_one():
  # first_sentinel is the lowest sentinel id itself (vocab_size - extra_ids), so a chunk using every extra id
  # (here: two, 32099 and 32098) reads back whole.
  inputs, targets = [5, 32099, 7, 32098], [32099, 11, 12, 32098, 13]
  assert objectives.uncorrupt(inputs, targets, first_sentinel=32098) == [5, 11, 12, 7, 13]


def test_a_stream_ending_on_a_chunk_boundary_gives_no_empty_chunk():
  # 5 + 7 = 12 tokens in chunks of 4: three full chunks, and no fourth, empty one (it would become an example with
  # no tokens at all).
  docs = [np.arange(3, 8, dtype=np.int32), np.arange(10, 17, dtype=np.int32)]
  ds = tf.data.Dataset.from_generator(lambda: ({'targets': d} for d in docs),
                                      output_signature={'targets': tf.TensorSpec([None], tf.int32)})
  chunks = [c['targets'].numpy().tolist() for c in objectives.concat_and_chunk(ds, 4)]
  assert chunks == [[3, 4, 5, 6], [7, 10, 11, 12], [13, 14, 15, 16]]


def test_noise_and_clean_spans_are_drawn_independently():
  # Half noise, so both segmentations split 30 tokens into 10 parts; with one seed for both every noise span would
  # be as long as the clean span before it.
  same = []
  for seed in range(10):
    m = mask(60, (seed, 5), density=0.5, mu=3.0)
    runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[-1], m.astype(int), [-1]]))))
    same.append(np.array_equal(runs[0::2], runs[1::2]))
  assert not any(same)
