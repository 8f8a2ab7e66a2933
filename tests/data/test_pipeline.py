"""Batches for the trainer: shapes, determinism, resume, sharding, finite eval streams, the default corpus."""

import itertools
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from repeat_lm.data import objectives, pipeline, tasks

SMALL = {'inputs': 64, 'targets': 14}  # 64 inputs need 70 raw tokens and 14 targets
PACKED_KEYS = {'encoder_input_tokens', 'decoder_input_tokens', 'decoder_target_tokens', 'decoder_loss_weights',
               'encoder_segment_ids', 'encoder_positions', 'decoder_segment_ids', 'decoder_positions'}


def take(cfg, n, **kwargs):
  return list(itertools.islice(pipeline.get_batches(cfg, **kwargs), n))


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def source_tokens(batches, first_sentinel=32000):
  """Text tokens in batches: every raw token is in exactly one of inputs or targets (not pad, EOS or sentinel)."""
  def count(t):
    return int(((t > 1) & (t < first_sentinel)).sum())
  return sum(count(b['encoder_input_tokens']) + count(b['decoder_target_tokens']) for b in batches)


def test_c4_batches_at_512_114(c4_task):
  cfg = pipeline.DatasetConfig(c4_task, {'inputs': 512, 'targets': 114}, batch_size=4)
  lengths = pipeline.model_feature_lengths(cfg)
  assert set(lengths) == PACKED_KEYS
  assert lengths['encoder_input_tokens'] == 512 and lengths['decoder_target_tokens'] == 114
  for batch in take(cfg, 2):
    assert set(batch) == PACKED_KEYS
    for k, v in batch.items():
      assert v.dtype == np.int32 and v.shape == (4, lengths[k]), k
    # A full 568-token chunk fills a row exactly: one segment, no padding.
    assert (batch['encoder_segment_ids'] == 1).all() and (batch['decoder_loss_weights'] == 1).all()
    np.testing.assert_array_equal(batch['decoder_input_tokens'][:, 1:], batch['decoder_target_tokens'][:, :-1])


def test_same_config_same_batches(c4_task):
  cfg = pipeline.DatasetConfig(c4_task, SMALL, batch_size=8, seed=3)
  assert_same(take(cfg, 3), take(cfg, 3))
  other = take(pipeline.DatasetConfig(c4_task, SMALL, batch_size=8, seed=4), 1)[0]
  assert not np.array_equal(other['encoder_input_tokens'], take(cfg, 1)[0]['encoder_input_tokens'])


def test_resume_equals_uninterrupted(c4_task):
  cfg = pipeline.DatasetConfig(c4_task, SMALL, batch_size=8, seed=1)
  assert_same(take(cfg, 6)[4:], take(cfg, 2, start_step=4))


def test_resume_in_a_new_process_is_bitwise_equal(c4_path, t5_vocab_file, tmp_path):
  # What a restarted trainer does: a fresh process, same config, start_step=k.
  code = textwrap.dedent(f"""
      import itertools, numpy as np
      from repeat_lm.data import pipeline, tasks
      name = tasks.span_corruption_task(corpus={c4_path!r}, vocabulary={t5_vocab_file!r})
      cfg = pipeline.DatasetConfig(name, {SMALL!r}, batch_size=8, seed=1)
      batches = list(itertools.islice(pipeline.get_batches(cfg, start_step=5), 2))
      arrays = {{f'{{i}}/{{k}}': v for i, b in enumerate(batches) for k, v in b.items()}}
      np.savez({str(tmp_path / 'b.npz')!r}, **arrays)
  """)
  subprocess.run([sys.executable, '-c', code], check=True, timeout=120)
  saved = np.load(tmp_path / 'b.npz')
  here = take(pipeline.DatasetConfig(tasks.span_corruption_task(corpus=c4_path, vocabulary=t5_vocab_file), SMALL,
                                     batch_size=8, seed=1), 7)[5:]
  assert_same(here, [{k: saved[f'{i}/{k}'] for k in b} for i, b in enumerate(here)])


def test_resume_across_epochs(c4_task):
  # The validation split is ~16k tokens = ~230 raw chunks: step 40 x 8 rows lies in the second epoch.
  cfg = pipeline.DatasetConfig(c4_task, SMALL, split='validation', batch_size=8, seed=5)
  assert_same(take(cfg, 42)[40:], take(cfg, 2, start_step=40))


def test_shards_differ_and_together_make_the_global_batch(c4_task):
  cfg = pipeline.DatasetConfig(c4_task, SMALL, batch_size=8, seed=2)
  shard0, shard1 = take(cfg, 2, shard_id=0, num_shards=2), take(cfg, 2, shard_id=1, num_shards=2)
  for a, b in zip(shard0, shard1):
    assert a['encoder_input_tokens'].shape == b['encoder_input_tokens'].shape == (4, 64)
    assert not np.array_equal(a['encoder_input_tokens'], b['encoder_input_tokens'])
  with pytest.raises(ValueError, match='not divisible'):
    take(cfg, 1, num_shards=3)


def test_eval_stream_is_one_padded_pass_and_shards_cover_it(c4_task):
  cfg = pipeline.DatasetConfig(c4_task, SMALL, split='validation', batch_size=16, shuffle=False)
  full = list(pipeline.get_batches(cfg))
  assert all(b['encoder_input_tokens'].shape == (16, 64) for b in full)
  assert (full[-1]['encoder_segment_ids'].max(axis=1) == 0).any()  # final batch padded with empty rows
  expected = pipeline.source_token_count(c4_task, 'validation')
  assert source_tokens(full) == expected  # every validation token, exactly once
  shards = [list(pipeline.get_batches(cfg, shard_id=i, num_shards=2)) for i in range(2)]
  assert sum(source_tokens(s) for s in shards) == expected
  assert_same(full, list(pipeline.get_batches(cfg)))


def test_training_stream_repeats(c4_task):
  cfg = pipeline.DatasetConfig(c4_task, SMALL, split='validation', batch_size=32, seed=0)
  batches = take(cfg, 12)  # 12 x 32 rows > 230 chunks of one epoch
  assert source_tokens(batches) > pipeline.source_token_count(c4_task, 'validation')


def test_vocabulary_for(c4_task):
  vocab = pipeline.vocabulary_for(c4_task)
  assert vocab.vocab_size == 32100 and vocab.extra_ids == 100


def test_default_corpus_end_to_end(wiki_ready):
  cfg = pipeline.DatasetConfig(wiki_ready, SMALL, batch_size=8)
  batches = take(cfg, 3)
  assert pipeline.vocabulary_for(wiki_ready).vocab_size == 8100
  for b in batches:
    assert b['encoder_input_tokens'].shape == (8, 64) and b['decoder_target_tokens'].shape == (8, 14)
    assert b['encoder_input_tokens'].max() < 8100 and (b['encoder_input_tokens'] == 8099).any()
  row = batches[0]
  first = row['encoder_segment_ids'][0] == 1
  text = objectives.uncorrupt(row['encoder_input_tokens'][0][first][:-1],
                              row['decoder_target_tokens'][0][row['decoder_segment_ids'][0] == 1][:-1], 8000)
  assert len(text) == objectives.random_spans_lengths(64)[0]
  assert pipeline.source_token_count(wiki_ready, 'validation') > 10_000
