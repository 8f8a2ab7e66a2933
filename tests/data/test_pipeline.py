"""Batches for the trainer: shapes, determinism, O(1) resume, host-count independence, finite streams, eval."""

import itertools
import json
import math
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import seqio
import tensorflow as tf

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


def test_c4_batches_at_512_114(c4_d16):
  cfg = pipeline.DatasetConfig(c4_d16, {'inputs': 512, 'targets': 114}, batch_size=4)
  lengths = pipeline.model_feature_lengths(cfg)
  assert set(lengths) == PACKED_KEYS
  for batch in take(cfg, 2):
    for k, v in batch.items():
      assert v.dtype == np.int32 and v.shape == (4, lengths[k]), k
    # A full 568-token chunk fills a row exactly: one segment, no padding.
    assert (batch['encoder_segment_ids'] == 1).all() and (batch['decoder_loss_weights'] == 1).all()
    np.testing.assert_array_equal(batch['decoder_input_tokens'][:, 1:], batch['decoder_target_tokens'][:, :-1])
    np.testing.assert_array_equal(batch['encoder_positions'][0], np.arange(512))


@pytest.mark.parametrize('lengths', [{'inputs': 512, 'targets': 114}, {'inputs': 512, 'targets': 128}])
def test_rows_are_what_seqios_feature_converter_makes(c4_d16, lengths):
  for pack in (True, False):  # 512/128: the targets do not fill the row
    cfg = pipeline.DatasetConfig(c4_d16, lengths, batch_size=4, pack=pack)
    ours = take(cfg, 1)[0]
    task = seqio.get_mixture_or_task(c4_d16)
    ds = task.get_dataset(lengths, split='train', seed=0).take(4)
    theirs = next(iter(seqio.EncDecFeatureConverter(pack=pack)(ds, lengths).batch(4).as_numpy_iterator()))
    assert ours.keys() == theirs.keys()
    for k in ours:
      np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)


def test_rows_end_with_the_vocabularys_eos_as_seqio_does(c4_docs, c4_path, tmp_path):
  # SentencePiece's own default is eos 2 (T5's is 1): SeqIO's append_eos_after_trim (and T5X's decoding) use the
  # vocabulary's, so the rows must end with it too.
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  model = tmp_path / 'eos2.model'
  lines = [line for d in c4_docs[:40] for line in d.splitlines() if line]
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(model.with_suffix('')), vocab_size=300,
                                 pad_id=0, unk_id=1, eos_id=2, bos_id=-1, minloglevel=2)
  vocab = seqio.SentencePieceVocabulary(str(model), extra_ids=100)
  name = tasks.repeated_task(corpus=c4_path, vocabulary=vocab, unique_tokens=2**10, epochs=1, name='test.eos2')
  batch = take(pipeline.DatasetConfig(name, SMALL, batch_size=4, pack=False), 1)[0]
  for key in ('encoder_input_tokens', 'decoder_target_tokens'):
    rows = batch[key]
    last = [row[np.flatnonzero(row)[-1]] for row in rows]  # each row's last token before the padding
    assert last == [vocab.eos_id] * len(rows), key
  np.testing.assert_array_equal(batch['decoder_input_tokens'][:, 1:], batch['decoder_target_tokens'][:, :-1])


def test_same_config_same_batches_other_seed_other_batches(c4_d16):
  cfg = pipeline.DatasetConfig(c4_d16, SMALL, batch_size=8, seed=3)
  assert_same(take(cfg, 3), take(cfg, 3))
  other = take(pipeline.DatasetConfig(c4_d16, SMALL, batch_size=8, seed=4), 1)[0]
  assert not np.array_equal(other['encoder_input_tokens'], take(cfg, 1)[0]['encoder_input_tokens'])


def test_resume_at_any_step_is_bitwise_and_cheap(c4_d16):
  cfg = pipeline.DatasetConfig(c4_d16, SMALL, batch_size=8, seed=1)
  per_epoch = tasks.stream(c4_d16, 'train', SMALL, 1).examples_per_epoch  # 937 examples: ~117 batches
  full = take(cfg, 260)  # crosses two epoch boundaries
  for k in [1, 4, 116, 117, 118, per_epoch // 8 * 2 - 1, 250]:
    assert_same(full[k:k + 3], take(cfg, 3, start_step=k))
  start = time.perf_counter()
  take(cfg, 1, start_step=pipeline.num_batches(cfg) - 1)  # the very last batch: no replay
  assert time.perf_counter() - start < 1.0


def test_host_rows_make_the_global_batch_for_any_host_count(c4_d16):
  cfg = pipeline.DatasetConfig(c4_d16, SMALL, batch_size=8, seed=2)
  single = take(cfg, 3, start_step=50)
  for hosts in (2, 4, 8):
    shards = [take(cfg, 3, start_step=50, shard_id=i, num_shards=hosts) for i in range(hosts)]
    for step in range(3):
      parts = [s[step] for s in shards]
      assert all(p['encoder_input_tokens'].shape == (8 // hosts, 64) for p in parts)
      assert_same([{k: np.concatenate([p[k] for p in parts]) for k in single[step]}], [single[step]])
  with pytest.raises(ValueError, match='not divisible'):
    take(cfg, 1, num_shards=3)


def test_resume_in_a_new_process_on_other_hosts_is_bitwise_equal(c4_path, t5_vocab_file, c4_d16, tmp_path):
  # What a restarted trainer does: a fresh process, the same config, start_step=k, here as host 1 of 2.
  code = textwrap.dedent(f"""
      import itertools, numpy as np
      from repeat_lm.data import pipeline, tasks
      name = tasks.repeated_task(corpus={c4_path!r}, vocabulary={t5_vocab_file!r}, unique_tokens=2**16, epochs=8)
      cfg = pipeline.DatasetConfig(name, {SMALL!r}, batch_size=8, seed=1)
      batches = list(itertools.islice(pipeline.get_batches(cfg, start_step=125, shard_id=1, num_shards=2), 2))
      arrays = {{f'{{i}}/{{k}}': v for i, b in enumerate(batches) for k, v in b.items()}}
      np.savez({str(tmp_path / 'b.npz')!r}, **arrays)
  """)
  subprocess.run([sys.executable, '-c', code], check=True, timeout=120)
  saved = np.load(tmp_path / 'b.npz')
  here = take(pipeline.DatasetConfig(c4_d16, SMALL, batch_size=8, seed=1), 2, start_step=125)
  assert_same([{k: v[4:] for k, v in b.items()} for b in here], [{k: saved[f'{i}/{k}'] for k in b}
                                                                  for i, b in enumerate(here)])


def test_finite_training_stream_ends_padded_after_its_epochs(c4_path, t5_vocab_file):
  name = tasks.repeated_task(corpus=c4_path, vocabulary=t5_vocab_file, unique_tokens=2**12, epochs=3)
  cfg = pipeline.DatasetConfig(name, SMALL, batch_size=16, seed=0)
  batches = list(pipeline.get_batches(cfg))
  stream = tasks.stream(name, 'train', SMALL, 0)
  assert len(batches) == pipeline.num_batches(cfg) == -(-stream.total_examples // 16)
  assert source_tokens(batches) == 3 * 2**12  # every token of the subset, three times, nothing else
  last_rows = stream.total_examples - 16 * (len(batches) - 1)
  assert (batches[-1]['decoder_loss_weights'][last_rows:] == 0).all()
  assert (batches[-1]['decoder_loss_weights'][:last_rows].sum(1) > 0).all()


def test_eval_stream_is_one_padded_pass_and_shards_cover_it(c4_task):
  cfg = pipeline.DatasetConfig(c4_task, SMALL, split='validation', batch_size=16, shuffle=False)
  full = list(pipeline.get_batches(cfg))
  assert all(b['encoder_input_tokens'].shape == (16, 64) for b in full)
  assert (full[-1]['encoder_segment_ids'].max(axis=1) == 0).any()  # final batch padded with empty rows
  expected = pipeline.source_token_count(c4_task, 'validation')
  assert source_tokens(full) == expected  # every validation token, exactly once
  shards = [list(pipeline.get_batches(cfg, shard_id=i, num_shards=2)) for i in range(2)]
  assert len(shards[0]) == len(shards[1]) == len(full)  # every host runs the same number of eval steps
  assert sum(source_tokens(s) for s in shards) == expected
  assert_same(full, list(pipeline.get_batches(cfg)))


@pytest.mark.parametrize('kwargs', [dict(num_epochs=-1), dict(num_epochs=0), dict(start_step=2.5),
                                    dict(start_step=-1), dict(num_shards=0)])
def test_get_batches_refuses_counts_that_are_none(c4_d16, kwargs):
  # A repeated task's epochs are checked when it is registered, but get_batches' own were not: num_epochs -1
  # (tf.data's 'forever') or 0 gave no batches, start_step 2.5 batches from example 20 of 8-row batches.
  cfg = pipeline.DatasetConfig(c4_d16, SMALL, batch_size=8)
  with pytest.raises(ValueError, match=f'get_batches {{\'{next(iter(kwargs))}\''):
    take(cfg, 1, **kwargs)


def test_validation_stream_when_shuffled_repeats(c4_task):
  cfg = pipeline.DatasetConfig(c4_task, SMALL, split='validation', batch_size=32, seed=0)
  batches = take(cfg, 12)  # 12 x 32 rows > 238 chunks of one epoch
  assert source_tokens(batches) > pipeline.source_token_count(c4_task, 'validation')


def test_steps_per_epoch_is_counted_from_the_stream_for_ul2_too(c4_path, t5_vocab_file):
  from repeat_lm.train import dropout_schedule
  name = tasks.repeated_task(corpus=c4_path, vocabulary=t5_vocab_file, objective='ul2', mode_tokens=False,
                             unique_tokens=2**14, epochs=2)
  cfg = pipeline.DatasetConfig(name, SMALL, batch_size=8, seed=1)
  steps = pipeline.steps_per_epoch(cfg)
  # The first epoch holds each of the 2^14 tokens once: whole batches before its end hold fewer, through it more.
  assert source_tokens(take(cfg, math.floor(steps))) <= 2**14 <= source_tokens(take(cfg, math.ceil(steps)))
  # Span corruption's estimate (the fallback) is far off for UL2's mix of chunk lengths.
  assert steps > 1.2 * dropout_schedule.steps_per_epoch(2**14, 8, SMALL['inputs'])


def test_data_state_and_resume_check(c4_d16):
  cfg = pipeline.DatasetConfig(c4_d16, SMALL, batch_size=8, seed=1)
  state = pipeline.data_state(cfg, 200)
  per_epoch = state['examples_per_epoch']
  assert state['examples_consumed'] == 1600 and (state['epoch'], state['example_in_epoch']) == divmod(1600, per_epoch)
  assert state['epochs'] == 8 and state['unique_tokens'] == 2**16 and state['store_fingerprint']
  pipeline.check_resume(cfg, state)
  pipeline.check_resume(cfg, {'step': 3})  # an older checkpoint without the details: nothing to compare
  with pytest.raises(ValueError, match='batch_size was 8'):
    pipeline.check_resume(pipeline.DatasetConfig(c4_d16, SMALL, batch_size=16, seed=1), state)
  with pytest.raises(ValueError, match='shuffle was True'):  # one ordered pass is another stream
    pipeline.check_resume(pipeline.DatasetConfig(c4_d16, SMALL, batch_size=8, seed=1, shuffle=False), state)
  with pytest.raises(ValueError, match='pack was True'):  # other rows for the model
    pipeline.check_resume(pipeline.DatasetConfig(c4_d16, SMALL, batch_size=8, seed=1, pack=False), state)


def test_resume_check_sees_changes_a_name_does_not_spell(c4_path, t5_vocab_file):
  def refused(name, state):
    with pytest.raises(ValueError, match='stream_definition'):
      pipeline.check_resume(pipeline.DatasetConfig(name, SMALL, batch_size=8), state)

  # A task registered under a custom name with another objective (same examples per epoch at 64/14).
  tasks.repeated_task(corpus=c4_path, vocabulary=t5_vocab_file, unique_tokens=2**14, epochs=2, name='resume_t')
  cfg = pipeline.DatasetConfig('resume_t', SMALL, batch_size=8)
  state = pipeline.data_state(cfg, 3)
  pipeline.check_resume(cfg, state)
  tasks.repeated_task(corpus=c4_path, vocabulary=t5_vocab_file, unique_tokens=2**14, epochs=2, name='resume_t',
                      objective='span_r0p15_mu3p1')
  assert pipeline.data_state(cfg, 3)['examples_per_epoch'] == state['examples_per_epoch']
  refused('resume_t', state)
  # A mixture whose rates changed under its name.
  a = tasks.repeated_task(corpus=c4_path, vocabulary=t5_vocab_file, unique_tokens=2**14, epochs=2)
  b = tasks.repeated_task(corpus=c4_path, vocabulary=t5_vocab_file, unique_tokens=2**15, epochs=2)
  tasks.repeated_mixture([a, b], [0.5, 0.5], name='resume_mix')
  cfg = pipeline.DatasetConfig('resume_mix', SMALL, batch_size=8)
  state = pipeline.data_state(cfg, 3)
  pipeline.check_resume(cfg, state)
  tasks.repeated_mixture([a, b], [0.2, 0.8], name='resume_mix')
  refused('resume_mix', state)


def test_a_mixture_counts_the_unique_tokens_of_its_subsets_once(c4_path, t5_vocab_file):
  # The first 2^14 tokens of a corpus are inside its first 2^15, whatever the objective: 2^15 unique tokens, not
  # 2^14 + 2^15 (train/epochs and a mixture's epoch-based dropout schedule divide by this count).
  a = tasks.repeated_task(corpus=c4_path, vocabulary=t5_vocab_file, unique_tokens=2**14, epochs=2)
  b = tasks.repeated_task(corpus=c4_path, vocabulary=t5_vocab_file, unique_tokens=2**15, epochs=2, objective='ul2')
  assert pipeline.source_token_count(tasks.repeated_mixture([a, b], [0.5, 0.5]), 'train') == 2**15
  assert pipeline.source_token_count(tasks.repeated_mixture([a, a], [0.3, 0.7]), 'train') == 2**14


def test_other_seqio_tasks_fall_back_to_a_global_stream():
  vocab = seqio.PassThroughVocabulary(size=100)
  name = 'test.foreign_task'
  if name not in seqio.TaskRegistry.names():
    seqio.TaskRegistry.add(
        name, source=seqio.FunctionDataSource(
            lambda split, shuffle_files, seed=None: tf.data.Dataset.range(3, 40).map(
                lambda i: {'inputs': tf.fill([i % 7 + 2], tf.cast(i, tf.int32)),
                           'targets': tf.fill([i % 3 + 1], tf.cast(i, tf.int32))}), splits=['train']),
        output_features={'inputs': seqio.Feature(vocab), 'targets': seqio.Feature(vocab)}, preprocessors=[],
        metric_fns=[])
  cfg = pipeline.DatasetConfig(name, {'inputs': 16, 'targets': 8}, batch_size=4, shuffle=False)
  full = list(pipeline.get_batches(cfg))
  halves = [list(pipeline.get_batches(cfg, shard_id=i, num_shards=2)) for i in range(2)]
  for b, x, y in zip(full, *halves):
    np.testing.assert_array_equal(np.concatenate([x['encoder_input_tokens'], y['encoder_input_tokens']]),
                                  b['encoder_input_tokens'])
  assert_same(full[2:], list(pipeline.get_batches(cfg, start_step=2)))
  assert pipeline.source_token_count(name, 'train') is None and pipeline.num_batches(cfg) is None


def test_default_corpus_end_to_end(wiki_ready):
  cfg = pipeline.DatasetConfig(wiki_ready, SMALL, batch_size=8)
  batches = take(cfg, 3)
  assert pipeline.vocabulary_for(wiki_ready).vocab_size == 8100
  for b in batches:
    assert b['encoder_input_tokens'].shape == (8, 64) and b['decoder_target_tokens'].shape == (8, 14)
    assert b['encoder_input_tokens'].max() < 8100 and (b['encoder_input_tokens'] == 8099).any()
  row = batches[0]
  text = objectives.uncorrupt(row['encoder_input_tokens'][0][:-1], row['decoder_target_tokens'][0][:-1], 8000)
  assert len(text) == objectives.random_spans_lengths(64)[0]
  assert pipeline.source_token_count(wiki_ready, 'validation') > 10_000
  assert pipeline.num_batches(cfg) is None  # unbounded epochs


def test_the_trainer_refuses_more_steps_than_a_finite_task_holds(c4_path, t5_vocab_file, tmp_path):
  from repeat_lm.models import EncoderDecoderModel, T5Config, Transformer  # pylint: disable=import-outside-toplevel
  from repeat_lm.train import trainer  # pylint: disable=import-outside-toplevel
  name = tasks.repeated_task(corpus=c4_path, vocabulary=t5_vocab_file, unique_tokens=2**12, epochs=1)
  cfg = pipeline.DatasetConfig(name, SMALL, batch_size=8)
  model = EncoderDecoderModel(module=Transformer(T5Config(vocab_size=32128, num_encoder_layers=1,
                                                          num_decoder_layers=1)))
  with pytest.raises(ValueError, match=f'holds {pipeline.num_batches(cfg)} batches of 8'):
    trainer.train(model=model, model_dir=str(tmp_path), total_steps=10**6, train_dataset_cfg=cfg)


@pytest.mark.parametrize('kwargs,match', [({'batch_size': 0}, 'batch_size=0: the global batch'),
                                          # True is 1 to Python: a run of one-example batches
                                          ({'batch_size': True}, 'batch_size=True: the global batch'),
                                          # said "must hold at least one example", which 16.5 does
                                          ({'batch_size': 16.5}, 'batch_size=16.5: .* must be a whole number'),
                                          ({'batch_size': '16'}, "batch_size='16': .* whole number .no quotes"),
                                          # a TypeError from parse_name's regex at the first task lookup
                                          ({'mixture_or_task_name': None}, 'mixture_or_task_name=None: give a task'),
                                          ({'mixture_or_task_name': 5}, "name=5: .* in quotes, e.g. MIXTURE_OR_TASK"),
                                          ({'task_feature_lengths': {'inputs': 0, 'targets': 8}},
                                           "task_feature_lengths {'inputs': 0}"),
                                          ({'task_feature_lengths': {'inputs': 512}}, "has no 'targets': give both"),
                                          # silently ignored
                                          ({'task_feature_lengths': {'inputs': 8, 'targets': 8, 'extra': 5}},
                                           "has 'extra', which no model here reads"),
                                          # a list: a TypeError traceback from dict()
                                          ({'task_feature_lengths': [512, 114]}, r"=\[512, 114\]: give a dict"),
                                          # int() truncated: seed 0.9 read seed 0's stream, True seed 1's
                                          ({'seed': 0.9}, 'seed=0.9: a whole number'),
                                          ({'seed': True}, 'seed=True: a whole number')])
def test_dataset_config_rejects_empty_batches_and_lengths(kwargs, match):
  args = {'mixture_or_task_name': 'any', 'task_feature_lengths': {'inputs': 16, 'targets': 8}, **kwargs}
  with pytest.raises(ValueError, match=match):
    pipeline.DatasetConfig(**args)
  assert pipeline.DatasetConfig('any', {'inputs': np.int64(16), 'targets': 8}, batch_size=np.int32(2))


@pytest.mark.parametrize('kwargs', [{'shuffle': 'False'}, {'pack': 'False'}, {'use_cached': 1}])
def test_dataset_config_refuses_a_flag_that_is_not_a_bool(kwargs):
  """A gin string 'False' is truthy: shuffle='False' gave the shuffled training stream, not one ordered pass."""
  with pytest.raises(ValueError, match=f"True or False .no quotes.: {{'{next(iter(kwargs))}'"):
    pipeline.DatasetConfig('any', {'inputs': 16, 'targets': 8}, **kwargs)


def test_numpy_integers_in_the_config_reach_the_checkpoint_as_json(c4_d16):
  # The config accepts numpy integers (above); the trainer's checkpoint metadata is JSON, which refused np.int32 at the
  # first save of such a run.
  cfg = pipeline.DatasetConfig(c4_d16, {'inputs': np.int64(64), 'targets': np.int32(14)}, batch_size=np.int32(8),
                               seed=np.int64(1))
  state = json.loads(json.dumps(pipeline.data_state(cfg, 3)))
  assert state['batch_size'] == 8 and state['task_feature_lengths'] == SMALL and state['seed'] == 1
  pipeline.check_resume(cfg, state)


@pytest.mark.parametrize('objective', ['ul2', 'span_r0p5_mu3'])
def test_source_tokens_per_step_count_the_text_exactly(c4_path, t5_vocab_file, objective):
  """UL2's mode tokens and the sentinels past the 100 extra ids (128 spans at mu 3, r 0.5) are ordinary ids, so
  counting ids overcounts the text; the stream's chunk lengths do not: all epochs = epochs x D."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from repeat_lm.train import state  # pylint: disable=import-outside-toplevel
  name = tasks.repeated_task(corpus=c4_path, vocabulary=t5_vocab_file, objective=objective, unique_tokens=2**14,
                             epochs=2)
  cfg = pipeline.DatasetConfig(name, {'inputs': 512, 'targets': 512}, batch_size=4)
  steps, count = pipeline.num_batches(cfg), pipeline.source_tokens_per_step(cfg)
  assert sum(count(s) for s in range(1, steps + 1)) == 2 * 2**14
  first = 32000
  by_ids = sum(float(state.count_source_tokens(jnp.asarray(b['encoder_input_tokens']), first) +
                     state.count_source_tokens(jnp.asarray(b['decoder_target_tokens']), first))
               for b in pipeline.get_batches(cfg))
  assert by_ids > 2 * 2**14  # what the trainer logged before
