"""Repeated-subset tasks: names, registration, the acceptance setting on C4 (D = 2^16, E = 8), masks, UL2, SeqIO."""

import os
import subprocess
import sys
import textwrap

import gin
import numpy as np
import pytest
import seqio

from repeat_lm.data import denoisers, sources, stats, tasks, vocab

from data_helpers import LENGTHS  # pylint: disable=wrong-import-order


def test_default_task_registers_lazily(tmp_path):
  # A fresh process with an empty cache: importing registers the task but reads and trains nothing.
  code = textwrap.dedent("""
      import seqio
      from repeat_lm.data import tasks
      task = seqio.get_mixture_or_task(tasks.WIKI_TASK)
      assert set(task.splits) == {'train', 'validation'}, task.splits
      assert set(task.output_features) == {'inputs', 'targets'}
      tasks.ensure_registered('repeat_lm.c4.t5.ul2.d27.e8.static')  # by name: registers, reads nothing either
  """)
  env = dict(os.environ, REPEAT_LM_CACHE=str(tmp_path / 'cache'))
  subprocess.run([sys.executable, '-c', code], check=True, env=env, timeout=120)
  assert not (tmp_path / 'cache').exists()


@pytest.mark.parametrize('name, expected', [
    ('repeat_lm.c4.t5.span.d27.e8', {'source': 'c4', 'unique_tokens': 2**27, 'epochs': 2**8}),
    ('repeat_lm.c4.t5.span.d35.e0', {'unique_tokens': 2**35, 'epochs': 1}),
    ('repeat_lm.c4.t5.span.d27.t35', {'unique_tokens': 2**27, 'total_tokens': 2**35}),
    ('repeat_lm.wikipedia.t5.ul2.d23.e12.static.nomode', {'objective': 'ul2', 'epochs': 2**12,
                                                          'static_masks': True, 'mode_tokens': False}),
    ('repeat_lm.wiki.wiki8k.span_r0p5_mu8.dn1000.en3.v10', {'unique_tokens': 1000, 'epochs': 3,
                                                              'validation_tokens': 1024}),
    ('repeat_lm.wiki.wiki8k.span.dall.einf', {'unique_tokens': None, 'epochs': None})])
def test_name_scheme(name, expected):
  kwargs = tasks.parse_name(name)
  assert expected.items() <= kwargs.items()
  assert tasks.ensure_registered(name) == name
  spec = tasks.spec(name)
  if 'total_tokens' in expected:  # the total form is registered under the epochs form too
    assert tasks.spec('repeat_lm.c4.t5.span.d27.e8') == spec and spec.epochs == 2**8
  else:
    assert tasks.task_name(spec) == name  # names round-trip


def test_the_papers_grid_has_distinct_names():
  names = {tasks.ensure_registered(f'repeat_lm.c4.t5.span.d{d}.e{e}') for d in range(23, 36) for e in range(13)}
  assert len(names) == 13 * 13 and all(n in seqio.TaskRegistry.names() for n in names)


@pytest.mark.parametrize('name', ['repeat_lm.c4.t5.span.d27', 'repeat_lm.nope.t5.span.d27.e8',
                                  'repeat_lm.c4.nope.span.d27.e8', 'repeat_lm.c4.t5.mlm.d27.e8', 'c4_d27'])
def test_bad_names_are_clear_errors(name):
  with pytest.raises(ValueError, match='scheme|Unknown source|Unknown objective|not|vocab'):
    tasks.ensure_registered(name)


def test_budget_errors():
  with pytest.raises(ValueError, match='multiple of unique_tokens'):
    tasks.repeated_task('c4', unique_tokens=3, total_tokens=10)
  with pytest.raises(ValueError, match='positive integer'):
    tasks.repeated_task('c4', unique_tokens=0, epochs=1)
  with pytest.raises(ValueError, match='validation_tokens must be a positive integer'):
    tasks.repeated_task('c4', unique_tokens=12, epochs=1, validation_tokens=0)


@pytest.mark.parametrize('kwargs', [{'epochs': True}, {'epochs': float('nan')}, {'total_tokens': True},
                                    {'epochs': '4'}, {'validation_tokens': True}])
def test_a_count_that_is_not_a_whole_number_is_refused(kwargs):
  """epochs=True (True == 1 to Python) registered a one-epoch task; NaN failed in int() naming no setting."""
  with pytest.raises(ValueError, match='must be a positive integer'):
    tasks.repeated_task('c4', **{'unique_tokens': 12, **kwargs})


@pytest.mark.parametrize('kwargs, match', [({'static_masks': 'False'}, "static_masks='False' must be True or False"),
                                           ({'objective': 'ul2', 'mode_tokens': 'False'}, "{'mode_tokens': 'False'}")])
def test_a_flag_that_is_not_a_bool_is_refused(kwargs, match):
  """bool('False') is True: the string (from gin) registered a task with fixed masks (or with UL2 mode tokens)."""
  with pytest.raises(ValueError, match=match):
    tasks.repeated_task('c4', **{'unique_tokens': 12, 'epochs': 2, **kwargs})


@pytest.mark.parametrize('kwargs, setting', [({'ul2_rates': [1] * 7}, 'ul2_rates'),
                                             ({'objective': 'span_r0p5_mu8', 'ul2_rates': [1] * 7}, 'ul2_rates'),
                                             ({'mode_tokens': False}, 'mode_tokens=False'),
                                             ({'mode_tokens': 0}, 'mode_tokens=0'),
                                             ({'mode_tokens': 'False'}, "mode_tokens='False'")])
def test_ul2_settings_on_another_objective_are_refused(kwargs, setting):
  # ul2_rates turned the default 'span' objective into UL2 (an MLM arm of a sweep that kept the rates bound trained
  # UL2), and mode_tokens=False did nothing.
  with pytest.raises(ValueError, match=f"{setting}.* applies to objective='ul2' only"):
    tasks.repeated_task('c4', **{'unique_tokens': 12, 'epochs': 2, **kwargs})


@pytest.mark.parametrize('name, twice', [('repeat_lm.c4.t5.span.d27.e8.static.static', 'static'),
                                         ('repeat_lm.c4.t5.ul2.d27.e8.v10.nomode.v12', 'v<k>')])
def test_a_task_name_flag_given_twice_is_refused(name, twice):
  with pytest.raises(ValueError, match=rf"gives the flag\(s\) \['{twice}'\] more than once"):
    tasks.ensure_registered(name)


def test_a_name_with_a_flag_given_twice_still_parses():
  # collect reads every run's task name with parse_name: a run registered before the refusal must still be read.
  assert tasks.parse_name('repeat_lm.c4.t5.span.d27.e8.static.static')['static_masks'] is True


def test_nomode_on_a_span_task_name_is_refused():
  with pytest.raises(ValueError, match="mode_tokens=False / .nomode applies to objective='ul2' only"):
    tasks.ensure_registered('repeat_lm.c4.t5.span.d27.e8.nomode')


@pytest.mark.parametrize('validation, match', [(-0.5, r'in \[0, 1\)'), (1.5, r'in \[0, 1\)'),
                                               (float('nan'), 'number in'), (True, 'number in'),
                                               ('0.1', 'without quotes')])
def test_a_bad_validation_fraction_is_refused_when_the_task_is_configured(tmp_path, validation, match):
  # -0.5 failed as an invalid SeqIO task name, 1.5 and NaN only at the first read, '0.1' as a missing path.
  corpus = tmp_path / 'c.jsonl'
  corpus.write_text('{"text": "a"}\n{"text": "b"}\n')
  with pytest.raises(ValueError, match=match):
    tasks.repeated_task(corpus=str(corpus), validation=validation)


def test_fine_tuning_tasks_are_found_by_name_without_gin():
  # The data commands never imported repeat_lm.data.downstream, and said 'repeat_lm.squad_v1' did not exist.
  assert tasks.ensure_registered('repeat_lm.squad_v1') == 'repeat_lm.squad_v1'


def test_whole_valued_float_counts_still_register():
  assert tasks.spec(tasks.repeated_task('c4', unique_tokens=2.0**4, epochs=4.0)).epochs == 4


def test_registration_is_idempotent_and_replaces_changed_specs(tmp_path):
  corpus = tmp_path / 'c.jsonl'
  corpus.write_text('{"text": "a"}\n{"text": "b"}\n')
  name = tasks.repeated_task(corpus=str(corpus), epochs=2, name='test.idempotent')
  task = seqio.TaskRegistry.get(name)
  assert tasks.repeated_task(corpus=str(corpus), epochs=2, name='test.idempotent') == name
  assert seqio.TaskRegistry.get(name) is task
  tasks.repeated_task(corpus=str(corpus), epochs=3, name='test.idempotent')
  assert seqio.TaskRegistry.get(name) is not task
  derived = {tasks.span_corruption_task(corpus=str(corpus)), tasks.repeated_task(corpus=str(corpus), epochs=2),
             tasks.repeated_task(corpus=str(corpus), objective='ul2'),
             tasks.repeated_task(corpus=str(corpus), static_masks=True),
             tasks.repeated_task(corpus=str(corpus), validation=0.1),
             tasks.repeated_task(corpus=str(corpus), vocabulary='/some/where/t5.spm.model')}
  assert len(derived) == 6 and all(n.startswith('repeat_lm.c_') for n in derived)


def test_missing_corpus_fails_at_registration(tmp_path):
  missing = str(tmp_path / 'nope' / 'c4-*.json.gz')
  with pytest.raises(FileNotFoundError, match='Point the corpus at an existing path') as e:
    tasks.repeated_task(corpus=missing)
  assert missing in str(e.value)


def test_gin_binds_a_task_with_static_masks(c4_path, t5_vocab_file):
  gin.clear_config()
  try:
    gin.parse_config(textwrap.dedent(f"""
        from __gin__ import dynamic_registration
        from repeat_lm.data import pipeline
        from repeat_lm.data import tasks
        MIXTURE_OR_TASK_NAME = @tasks.repeated_task()
        tasks.repeated_task.corpus = '{c4_path}'
        tasks.repeated_task.vocabulary = '{t5_vocab_file}'
        tasks.repeated_task.unique_tokens = 4096
        tasks.repeated_task.epochs = 2
        tasks.repeated_task.static_masks = True
        pipeline.DatasetConfig.mixture_or_task_name = %MIXTURE_OR_TASK_NAME
        pipeline.DatasetConfig.task_feature_lengths = {{'inputs': 64, 'targets': 16}}
    """))
    cfg = gin.get_configurable(pipeline_config())()
  finally:
    gin.clear_config()
  spec = tasks.spec(cfg.mixture_or_task_name)
  assert spec.static_masks and spec.unique_tokens == 4096 and spec.epochs == 2
  assert cfg.mixture_or_task_name.endswith('.span.d12.e1.static')


def pipeline_config():
  from repeat_lm.data import pipeline  # pylint: disable=import-outside-toplevel
  return pipeline.DatasetConfig


# ---------------------------------------------------------------------------------------------------- acceptance


@pytest.fixture(params=['c4', 'wiki'])
def d16_e8(request):
  """D = 2^16 tokens, E = 8 epochs on the shared C4 sample (T5 vocabulary) and on the default local corpus."""
  if request.param == 'c4':
    return request.getfixturevalue('c4_d16')
  request.getfixturevalue('wiki_ready')
  return tasks.ensure_registered('repeat_lm.wiki.wiki8k.span.d16.e3')  # 2^16 tokens x 2^3 epochs


def test_d16_e8_exact_subset_epochs_and_repeats(d16_e8):
  s = stats.task_stats(d16_e8)
  assert s['unique_source_tokens'] == s['subset_tokens'] == 2**16
  assert s['epochs'] == 8 and s['epochs_touched'] == 8 and s['source_tokens'] == 8 * 2**16
  assert s['doc_repeats_min'] == s['doc_repeats_max'] == 8
  stream = tasks.stream(d16_e8, 'train', LENGTHS, 0)
  for e in range(8):  # each epoch alone: exactly the 2^16 subset tokens, each once
    r = stream.examples_per_epoch
    tokens = sum(b - a for g in range(e * r, (e + 1) * r) for _, a, b in stream.pieces(g))
    assert tokens == 2**16
  # Sampling error of the measured rates over 928 examples: the density is exact per chunk (round(568 * 0.15) =
  # 85), the mean span length 85 / round(85 / 3) = 3.04 per full chunk.
  assert s['noise_density'] == pytest.approx(0.15, abs=0.002)
  assert s['mean_noise_span_length'] == pytest.approx(3.0, abs=0.05)
  full = [g for g in range(40) if len(stream.raw(g)) == 568]
  assert len(full) >= 38
  for g in full:  # reference.md section 4: 568 raw tokens -> 512 inputs and 114 targets, with EOS
    ex = stream.example(g)
    assert (len(ex.inputs) + 1, len(ex.targets) + 1) == (512, 114)


def test_c4_examples_have_the_reference_lengths(c4_d16):
  task = seqio.get_mixture_or_task(c4_d16)
  examples = list(task.get_dataset(LENGTHS, split='train', seed=0).take(60).as_numpy_iterator())
  stream = tasks.stream(c4_d16, 'train', LENGTHS, 0)
  full = [ex for g, ex in enumerate(examples) if len(stream.raw(g)) == 568]
  assert len(full) >= 55 and {len(ex['inputs']) for ex in full} == {512}
  assert {len(ex['targets']) for ex in full} == {114}
  for ex in full:
    assert ex['inputs'][-1] == 1 and ex['targets'][-1] == 1 and ex['targets'][0] == 32099


def test_seqio_gives_the_pipelines_examples_and_ends_after_e_epochs(c4_path, t5_vocab_file):
  name = tasks.repeated_task(corpus=c4_path, vocabulary=t5_vocab_file, unique_tokens=2**12, epochs=2)
  task = seqio.get_mixture_or_task(name)
  lengths = {'inputs': 64, 'targets': 16}
  stream = tasks.stream(name, 'train', lengths, 7)
  examples = list(task.get_dataset(lengths, split='train', seed=7, num_epochs=None).as_numpy_iterator())
  assert len(examples) == stream.total_examples == 2 * stream.examples_per_epoch
  for g, ex in enumerate(examples):
    e = stream.example(g)
    assert ex['inputs'][:-1].tolist() == e.inputs.tolist() and ex['targets'][:-1].tolist() == e.targets.tolist()
  shards = [list(task.get_dataset(lengths, split='train', seed=7, shard_info=seqio.ShardInfo(i, 3)))
            for i in range(3)]
  assert sum(len(s) for s in shards) == len(examples)


def doc_noise(stream, g, doc):
  """{position in `doc`: noise?} for the part of `doc` that example g holds, read back from the example."""
  ex = stream.example(g)
  spans, span = {}, None
  first = stream.vocab_size - 100
  for t in ex.targets.tolist():  # each sentinel, then its span's tokens
    if t >= first:
      span = spans.setdefault(t, [])
    else:
      span.append(t)
  mask = []
  for t in ex.inputs.tolist():  # a sentinel in the inputs stands for its span: noise
    mask.extend([True] * len(spans[t]) if t >= first else [False])
  assert len(mask) == len(stream.raw(g))
  result, pos = {}, 0
  for d, a, b in stream.pieces(g):
    if d == doc:
      result.update({a + i: mask[pos + i] for i in range(b - a)})
    pos += b - a
  return result


@pytest.mark.parametrize('static', [False, True])
def test_two_epochs_of_a_document_get_new_or_the_same_masks(d16_e8, static):
  spec = tasks.spec(d16_e8)
  name = tasks.repeated_task(spec.source, vocabulary=spec.vocabulary, unique_tokens=2**16, epochs=8,
                             static_masks=static)
  stream = tasks.stream(name, 'train', LENGTHS, 0)
  r, doc = stream.examples_per_epoch, 3
  masks = []
  for e in (0, 1):
    holders = [g for g in range(e * r, (e + 1) * r) if any(d == doc for d, _, _ in stream.pieces(g))]
    mask = {}
    for g in holders:
      mask.update(doc_noise(stream, g, doc))
    masks.append([mask[i] for i in sorted(mask)])
  assert len(masks[0]) == len(masks[1]) == len(stream.store.document(doc))
  assert (masks[0] == masks[1]) == static


def test_validation_never_overlaps_training(c4_path, t5_vocab_file):
  name = tasks.repeated_task(corpus=c4_path, vocabulary=t5_vocab_file)  # D = the whole train split
  train, validation = tasks.store(name, 'train'), tasks.store(name, 'validation')
  train_docs = {train.document(i).tobytes() for i in range(train.num_documents)}
  valid_docs = {validation.document(i).tobytes() for i in range(validation.num_documents)}
  assert len(train_docs) == 950 and len(valid_docs) == 50 and not train_docs & valid_docs
  corpus = sources.load_corpus(c4_path)
  assert not set(corpus.split('train')) & set(corpus.split('validation'))
  # No training example, of any subset size, holds validation text: subsets are prefixes of the train split.
  small = tasks.repeated_task(corpus=c4_path, vocabulary=t5_vocab_file, unique_tokens=2**16, epochs=1)
  sub = tasks.store(small, 'train')
  np.testing.assert_array_equal(sub.tokens[:-1000], train.tokens[:len(sub.tokens) - 1000])


def test_ul2_mode_tokens_and_per_denoiser_statistics(c4_path, t5_vocab_file):
  name = tasks.repeated_task(corpus=c4_path, vocabulary=t5_vocab_file, objective='ul2', unique_tokens=2**17,
                             epochs=2)
  lengths = {'inputs': 512, 'targets': 512}
  stream = tasks.stream(name, 'train', lengths, 0)
  voc = tasks.spec(name).vocabulary
  for g in range(40):
    ex = stream.example(g)
    mode = stream.objective.denoisers[ex.denoiser].mode
    assert voc.decode(ex.inputs[:len(voc.encode(mode))].tolist()) == mode
  s = stats.task_stats(name, feature_lengths=lengths)
  for d in stream.objective.denoisers:
    got = s['denoisers'][d.name]
    assert got['examples'] > 20, d.name
    assert got['noise_density'] == pytest.approx(d.noise_density, abs=0.02), d.name
    if d.prefix_lm:
      assert got['mean_noise_span_length'] == pytest.approx(d.noise_density * got['raw_length'], rel=0.15)
    else:
      noise, spans = denoisers.span_counts(got['raw_length'], d.noise_density,
                                           d.mean_noise_span_length)
      assert got['mean_noise_span_length'] == pytest.approx(noise / spans, rel=0.05), d.name
  rates = np.array([s['denoisers'][d.name]['examples'] for d in stream.objective.denoisers]) / s['examples']
  # Denoisers are drawn per position of the epoch's layout (the same in every epoch): R independent draws.
  sigma = np.sqrt(np.array(denoisers.UL2_RATES) * (1 - np.array(denoisers.UL2_RATES)) / stream.examples_per_epoch)
  assert (np.abs(rates - denoisers.UL2_RATES) < 4 * sigma).all()
  off = tasks.repeated_task(corpus=c4_path, vocabulary=t5_vocab_file, objective='ul2', mode_tokens=False,
                            unique_tokens=2**17, epochs=2)
  assert tasks.stream(off, 'train', lengths, 0).example(0).inputs[0] != voc.encode('[NLU]')[0]


def test_mixture_of_repeated_tasks(c4_d16, c4_path, t5_vocab_file, monkeypatch):
  monkeypatch.setenv('REPEAT_LM_T5_VOCAB', t5_vocab_file)
  tasks.register_source('c4sample', sources.LocalText(c4_path))
  other = 'repeat_lm.c4sample.t5.span.d14.e2'  # 't5' by name: the same model file as c4_d16's path
  name = tasks.repeated_mixture([c4_d16, other], [0.5, 0.5])
  assert name in seqio.MixtureRegistry.names() and tasks.mixture(name)[1] == (0.5, 0.5)
  assert tasks.repeated_mixture([c4_d16, other], [0.5, 0.5]) == name


def test_a_mixture_of_two_vocabularies_is_refused(c4_path, t5_vocab_file, monkeypatch):
  # SeqIO refuses it when reading; the pipeline interleaved it, and the trainer checked the model's vocab_size
  # against the first task's (by name) vocabulary only: 8,100 ids passed the tiny model's 8,192 rows while the T5
  # task's batches held ids up to 32,099.
  monkeypatch.setenv('REPEAT_LM_T5_VOCAB', t5_vocab_file)
  tasks.register_source('zc4', sources.LocalText(c4_path))
  with pytest.raises(ValueError, match='share one vocabulary'):
    tasks.repeated_mixture(['repeat_lm.wiki.wiki8k.span.d14.e2', 'repeat_lm.zc4.t5.span.d14.e2'], [0.5, 0.5])


def test_default_vocabulary(wiki_ready):
  v = seqio.get_mixture_or_task(wiki_ready).output_features['targets'].vocabulary
  assert v.vocab_size == 8100 and (v.pad_id, v.eos_id, v.unk_id, v.tokenizer.bos_id()) == (0, 1, 2, -1)
  assert v.tokenizer.id_to_piece(8099).endswith('<extra_id_0>')
  text = 'Hello world, Zürich ɑ 日本.'
  assert v.decode(v.encode(text)) == text  # byte fallback: no <unk>


def test_default_artefacts_are_built_once_and_reproducibly(wiki_ready, tmp_path, monkeypatch):
  monkeypatch.setenv('REPEAT_LM_CACHE', str(tmp_path))
  corpus_path = sources.default_wiki_path()
  vocab_path = vocab.default_vocabulary_path()
  stamps = corpus_path.stat().st_mtime_ns, vocab_path.stat().st_mtime_ns
  assert sources.default_wiki_path() == corpus_path and vocab.default_vocabulary_path() == vocab_path
  assert (corpus_path.stat().st_mtime_ns, vocab_path.stat().st_mtime_ns) == stamps  # reused, not rebuilt
  real = seqio.get_mixture_or_task(wiki_ready).output_features['targets'].vocabulary
  assert vocab_path.read_bytes() == open(real.sentencepiece_model_file, 'rb').read()


def test_a_validation_cap_that_is_not_a_power_of_two_round_trips():
  # _count spells 1000 as 'vn1000' (as 'dn1000' / 'en3'); the scheme must read that spelling back.
  name = tasks.repeated_task('c4', unique_tokens=2**27, epochs=2**8, validation_tokens=1000)
  assert name == 'repeat_lm.c4.t5.span.d27.e8.vn1000'
  assert tasks.parse_name(name)['validation_tokens'] == 1000 and tasks.ensure_registered(name) == name


def test_epochs_that_disagree_with_the_total_are_refused():
  # 3 epochs of 4 tokens are 12 tokens, not 8.
  with pytest.raises(ValueError, match='epochs=3 x unique_tokens=4 != total_tokens=8'):
    tasks.repeated_task('c4', unique_tokens=4, epochs=3, total_tokens=8)


def test_source_names_are_only_letters_and_digits(c4_path):
  # A dot would split the task name's fields ('repeat_lm.c4.local.t5...' does not parse).
  with pytest.raises(ValueError, match='letters and digits'):
    tasks.register_source('c4.local', sources.LocalText(c4_path))


def test_re_registering_a_name_drops_the_old_spec_s_streams(tmp_path, t5_vocab_file):
  # The same name, epochs, lengths and seed, so the same stream key: only dropping the old spec's streams keeps the
  # dynamic-mask stream from serving the static-mask spec.
  corpus = tmp_path / 'c.jsonl'
  corpus.write_text(''.join(f'{{"text": "Document {i} has a few words of text."}}\n' for i in range(40)))
  tasks.repeated_task(corpus=str(corpus), vocabulary=t5_vocab_file, epochs=2, name='test.restream')
  assert not tasks.stream('test.restream', 'train', LENGTHS, 0).static_masks
  tasks.repeated_task(corpus=str(corpus), vocabulary=t5_vocab_file, epochs=2, static_masks=True, name='test.restream')
  assert tasks.stream('test.restream', 'train', LENGTHS, 0).static_masks


def test_validation_streams_by_shuffle(c4_d16):
  # Shuffled validation is unbounded (not the task's 8 epochs), unshuffled is one pass; and a shuffled and an
  # unshuffled stream of the same epochs are two streams, not one memoised for both.
  assert tasks.stream(c4_d16, 'validation', LENGTHS, 0).total_examples is None
  one = tasks.stream(c4_d16, 'validation', LENGTHS, 0, shuffle=False)
  assert one.total_examples == one.examples_per_epoch
  shuffled = tasks.stream(c4_d16, 'validation', LENGTHS, 0, shuffle=True, epochs=1)
  assert shuffled.shuffle and not tasks.stream(c4_d16, 'validation', LENGTHS, 0, shuffle=False, epochs=1).shuffle


@pytest.mark.parametrize('rates', [(1, -0.5), (float('nan'), 1), (0, 0), (-1, -1)])
def test_mixture_rates_are_checked_as_an_objective_s(rates):
  # Registered unchecked: the first three failed at the first batch with numpy's 'repeats may not contain negative
  # values', and (-1, -1) trained as (0.5, 0.5).
  a, b = tasks.ensure_registered('repeat_lm.c4.t5.span.d27.e8'), tasks.ensure_registered('repeat_lm.c4.t5.span.d29.e6')
  with pytest.raises(ValueError, match='Mixture rates must be finite and >= 0 with a positive sum'):
    tasks.repeated_mixture([a, b], rates)


def test_mixtures_are_named_and_replaced_by_their_rates():
  a, b = tasks.ensure_registered('repeat_lm.c4.t5.span.d27.e8'), tasks.ensure_registered('repeat_lm.c4.t5.span.d29.e6')
  assert tasks.repeated_mixture([a, b], [1, 1]) != tasks.repeated_mixture([a, b], [1, 3])
  tasks.repeated_mixture([a, b], [1, 1], name='test.mix_rates')
  assert tasks.repeated_mixture([a, b], [1, 3], name='test.mix_rates') == 'test.mix_rates'
  assert tasks.mixture('test.mix_rates') == ((a, b), (1.0, 3.0))
