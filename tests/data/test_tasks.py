"""SeqIO task registration: lazy default task, idempotence, naming, errors, gin, exact lengths on C4."""

import os
import subprocess
import sys
import textwrap

import gin
import pytest
import seqio

from repeat_lm.data import objectives, pipeline, sources, tasks, vocab


def test_default_task_registers_lazily(tmp_path):
  # A fresh process with an empty cache: importing registers the task but reads and trains nothing.
  code = textwrap.dedent("""
      import seqio
      from repeat_lm.data import tasks
      task = seqio.get_mixture_or_task(tasks.WIKI_TASK)
      assert set(task.splits) == {'train', 'validation'}, task.splits
      assert set(task.output_features) == {'inputs', 'targets'}
  """)
  env = dict(os.environ, REPEAT_LM_CACHE=str(tmp_path / 'cache'))
  subprocess.run([sys.executable, '-c', code], check=True, env=env, timeout=120)
  assert not (tmp_path / 'cache').exists()


def test_registration_is_idempotent_and_replaces_changed_specs(tmp_path):
  corpus = tmp_path / 'c.jsonl'
  corpus.write_text('{"text": "a"}\n{"text": "b"}\n')
  name = tasks.span_corruption_task(name='test.idempotent', corpus=str(corpus))
  task = seqio.TaskRegistry.get(name)
  assert tasks.span_corruption_task(name='test.idempotent', corpus=str(corpus)) == name
  assert seqio.TaskRegistry.get(name) is task  # same spec: untouched
  tasks.span_corruption_task(name='test.idempotent', corpus=str(corpus), noise_density=0.5)
  assert seqio.TaskRegistry.get(name) is not task  # different spec: replaced
  seqio.TaskRegistry.remove(name)


def test_derived_names(tmp_path):
  corpus = tmp_path / 'my-corpus.jsonl.gz'
  corpus.write_bytes(b'')
  base = tasks.span_corruption_task(corpus=str(corpus))
  assert base.startswith('repeat_lm.span_corruption.my_corpus_') and base.endswith('.wiki8k.r0.15_mu3')
  assert tasks.span_corruption_task() == 'repeat_lm.span_corruption.wiki.wiki8k.r0.15_mu3'
  names = {base, tasks.span_corruption_task(corpus=str(corpus), mean_noise_span_length=8),
           tasks.span_corruption_task(corpus=str(corpus), noise_density=0.5),
           tasks.span_corruption_task(corpus=str(corpus), validation_fraction=0.1),
           tasks.span_corruption_task(corpus=str(corpus), vocabulary='/some/where/t5.spm.model')}
  assert len(names) == 5


def test_missing_corpus_fails_at_registration(tmp_path):
  missing = str(tmp_path / 'nope' / 'c4-*.json.gz')
  with pytest.raises(FileNotFoundError, match='Point the corpus at an existing path') as e:
    tasks.span_corruption_task(corpus=missing)
  assert missing in str(e.value)


def test_gin_binds_a_task_name(c4_path, t5_vocab_file):
  gin.clear_config()
  try:
    gin.parse_config(textwrap.dedent(f"""
        from __gin__ import dynamic_registration
        from repeat_lm.data import pipeline
        from repeat_lm.data import tasks
        from repeat_lm.data import vocab
        MIXTURE_OR_TASK_NAME = @tasks.span_corruption_task()
        tasks.span_corruption_task.corpus = '{c4_path}'
        tasks.span_corruption_task.vocabulary = @vocab.t5_vocabulary()
        vocab.t5_vocabulary.path = '{t5_vocab_file}'
        pipeline.DatasetConfig.mixture_or_task_name = %MIXTURE_OR_TASK_NAME
        pipeline.DatasetConfig.task_feature_lengths = {{'inputs': 64, 'targets': 14}}
        DEFAULT_VOCAB = @vocab.default_vocabulary()
    """))
    cfg = gin.get_configurable(pipeline.DatasetConfig)()
    default_vocab = gin.query_parameter('%DEFAULT_VOCAB').scoped_configurable_fn()
  finally:
    gin.clear_config()
  task = seqio.get_mixture_or_task(cfg.mixture_or_task_name)
  assert task.output_features['targets'].vocabulary.vocab_size == 32100
  assert isinstance(default_vocab, seqio.SentencePieceVocabulary)


def test_c4_examples_have_exact_lengths(c4_task):
  task = seqio.get_mixture_or_task(c4_task)
  ds = task.get_dataset({'inputs': 512, 'targets': 114}, split='train', shuffle=False, seed=0)
  examples = list(ds.take(50).as_numpy_iterator())
  assert {len(ex['inputs']) for ex in examples} == {512}
  assert {len(ex['targets']) for ex in examples} == {114}
  for ex in examples:
    assert ex['inputs'][-1] == 1 and ex['targets'][-1] == 1  # EOS
    assert ex['targets'][0] == 32099 and 32099 in ex['inputs']


def test_validation_and_train_documents_are_disjoint(c4_task):
  source = seqio.get_mixture_or_task(c4_task).source
  train = {ex['text'] for ex in source.get_dataset('train', shuffle=False).as_numpy_iterator()}
  validation = {ex['text'] for ex in source.get_dataset('validation', shuffle=False).as_numpy_iterator()}
  assert len(validation) == 50 and len(train) == 950 and not train & validation


def test_masks_are_redrawn_each_epoch(c4_task, t5_vocab_file):
  # Two unshuffled epochs read the same token stream, but chunk boundaries and masks are drawn afresh.
  task = seqio.get_mixture_or_task(c4_task)
  lengths = {'inputs': 64, 'targets': 14}
  one = list(task.get_dataset(lengths, split='validation', shuffle=False, seed=0).as_numpy_iterator())
  two = list(task.get_dataset(lengths, split='validation', shuffle=False, seed=0, num_epochs=2).as_numpy_iterator())

  def stream(examples):
    return sum((objectives.uncorrupt(ex['inputs'][:-1], ex['targets'][:-1], 32000) for ex in examples), [])

  n = len(stream(one))
  both = stream(two)
  assert len(both) == 2 * n and both[:n] == both[n:] == stream(one)
  # Same text, different corruption: the second epoch's examples are not the first epoch's again.
  first_inputs = {tuple(ex['inputs']) for ex in two[:len(one)]}
  assert sum(tuple(ex['inputs']) in first_inputs for ex in two[len(one):]) < 2


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
  # Same bytes as the copy built (possibly by another process) in the session's cache.
  real = seqio.get_mixture_or_task(wiki_ready).output_features['targets'].vocabulary
  assert vocab_path.read_bytes() == open(real.sentencepiece_model_file, 'rb').read()
