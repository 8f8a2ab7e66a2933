"""`repeat-lm data stats|show` and `repeat-lm bench data`: what a person runs to inspect a task."""

import json
import random
import time

import numpy as np
import pytest
import seqio
import sentencepiece as spm

from repeat_lm import cli
from repeat_lm.bench import data as bench_data
from repeat_lm.data import denoisers, pipeline, stats, tasks

from data_helpers import write_jsonl  # pylint: disable=wrong-import-order

KEYS = {'examples', 'input_tokens', 'target_tokens', 'unique_source_tokens', 'epochs', 'noise_density',
        'mean_noise_span_length', 'doc_repeats_min', 'doc_repeats_max'}


def run(capsys, *argv):
  assert cli.main(list(argv)) == 0
  return capsys.readouterr().out


def test_stats_of_a_corpus_without_a_registered_task(capsys, c4_path, t5_vocab_file):
  out = run(capsys, 'data', 'stats', f'--corpus={c4_path}', f'--vocab={t5_vocab_file}', '--unique_tokens=65536',
            '--epochs=8')
  s = json.loads(out)  # one JSON object, nothing else on stdout
  assert KEYS <= set(s)
  assert (s['unique_source_tokens'], s['epochs'], s['doc_repeats_min'], s['doc_repeats_max']) == (65536, 8, 8, 8)
  assert s['examples'] == 8 * s['examples_per_epoch'] and s['input_tokens'] > s['target_tokens'] > 0
  assert s['noise_density'] == pytest.approx(0.15, abs=0.002)
  assert s['mean_noise_span_length'] == pytest.approx(3.0, abs=0.05)


def test_stats_of_a_task_with_a_limit_and_the_validation_split(capsys, c4_d16):
  s = json.loads(run(capsys, 'data', 'stats', f'--task={c4_d16}', '--max_examples=10'))
  assert s['examples'] == 10 and s['doc_repeats_min'] == 0 and 0 < s['epochs'] < 1
  v = json.loads(run(capsys, 'data', 'stats', f'--task={c4_d16}', '--split=validation'))
  assert v['doc_repeats_min'] == v['doc_repeats_max'] == 1 and v['epochs'] == 1


def test_stats_of_ul2(c4_path, t5_vocab_file):
  name = tasks.repeated_task(corpus=c4_path, vocabulary=t5_vocab_file, objective='ul2', unique_tokens=2**14,
                             epochs=2)
  s = stats.task_stats(name, feature_lengths={'inputs': 512, 'targets': 512})
  assert set(s['denoisers']) == {'R_mu3_r0.15', 'R_mu8_r0.15', 'X_mu3_r0.5', 'X_mu8_r0.5', 'X_mu64_r0.15',
                                 'X_mu64_r0.5', 'S_r0.25'}
  x = denoisers.UL2_DENOISERS[2]
  assert s['denoisers'][x.name]['raw_length'] == denoisers.raw_length(x, 512, 512, 4) < 766  # '[NLG]': 4 tokens


def test_show_prints_readable_examples(capsys, c4_d16):
  out = run(capsys, 'data', 'show', f'--task={c4_d16}', '-n', '3')
  assert out.count('--- example') == 3 and '<extra_id_0>' in out and 'targets: <extra_id_0>' in out


def test_errors_are_clear(capsys, c4_path):
  assert cli.main(['data', 'stats', '--corpus', c4_path, '--task', 'x']) == 2
  assert 'either --task=NAME or --corpus=PATH' in capsys.readouterr().err
  assert cli.main(['data', 'stats', '--corpus', '/no/such/file.jsonl']) == 2
  assert '/no/such/file.jsonl' in capsys.readouterr().err


def test_impossible_counts_and_starts_are_errors(capsys):
  # They gave an IndexError traceback (--start=-5), 'examples: -3' or an empty listing with exit code 0.
  task = 'repeat_lm.wiki.wiki8k.span.d14.e2'
  for argv, match in ((['show', '--start=-5'], '--start=-5'), (['show', '-n', '0'], '-n=0'),
                      (['stats', '--max_examples=-3'], '--max_examples=-3'),
                      (['show', '--start=100000000'], '--start=100000000 is past the')):
    assert cli.main(['data', argv[0], f'--task={task}', *argv[1:]]) == 2
    assert match in capsys.readouterr().err


def test_the_functions_behind_the_commands_check_the_counts_too():
  # The command checked them, task_stats and show_examples (the library's inspection API) did not: max_examples -3
  # gave 'examples': -3 and n 0 an empty listing without a word, start 2.5 a TypeError.
  task = 'repeat_lm.wiki.wiki8k.span.d14.e2'
  with pytest.raises(ValueError, match='--max_examples=-3: counts must be at least 1'):
    stats.task_stats(task, max_examples=-3)
  with pytest.raises(ValueError, match='-n=0: counts must be at least 1'):
    stats.show_examples(task, n=0)
  with pytest.raises(ValueError, match=r'--start=2.5: counts .* --start \(a global example index\) at least 0'):
    stats.show_examples(task, start=2.5)


def test_bench_data(capsys, c4_d16):
  out = run(capsys, 'bench', 'data', f'--task={c4_d16}', '--batch_size=8', '--inputs_length=512',
            '--targets_length=114', '--steps=5', '--num_shards=2', '--train_step_s=6', '--json')
  r = json.loads(out)
  assert r['host_rows'] == 4 and r['examples_per_s'] > 0 and r['tokens_per_s'] > 0
  assert r['times_faster_than_training'] > 5  # the small model's CPU step at batch 8 takes ~6 s


def test_bench_data_of_a_corpus_task(capsys, c4_path, t5_vocab_file):
  # docs/data.md's C4-sample rows: a corpus task's name is registered only by the process that builds it, so
  # `--task=<that name>` failed in a new process and the rows could not be measured from the command line.
  r = json.loads(run(capsys, 'bench', 'data', f'--corpus={c4_path}', f'--vocab={t5_vocab_file}', '--unique_tokens=65536',
                     '--epochs=2', '--objective=ul2', '--batch_size=8', '--inputs_length=512', '--targets_length=512',
                     '--steps=3', '--json'))
  assert r['task'] == tasks.repeated_task(corpus=c4_path, vocabulary=t5_vocab_file, objective='ul2',
                                          unique_tokens=65536, epochs=2)
  assert r['feature_lengths'] == {'inputs': 512, 'targets': 512} and r['examples_per_s'] > 0
  assert cli.main(['bench', 'data', f'--corpus={c4_path}', '--task=repeat_lm.wiki_span_corruption']) == 2
  assert 'either --task=NAME or --corpus=PATH' in capsys.readouterr().err


@pytest.mark.parametrize('kwargs,match', [({'steps': 0}, '--steps=0'), ({'num_shards': 0}, '--num_shards=0'),
                                          ({'shard_id': 2, 'num_shards': 2}, 'shard_id=2'),
                                          ({'train_step_s': 0.0}, '--train_step_s=0.0'),
                                          ({'train_step_s': float('nan')}, '--train_step_s=nan'),
                                          ({'train_step_s': float('inf')}, '--train_step_s=inf')])
def test_bench_data_rejects_bad_settings(kwargs, match):
  from repeat_lm.bench import data as bench_data
  with pytest.raises(ValueError, match=match):
    bench_data.DataBenchConfig(**kwargs)


def test_corpus_flags_with_a_task_are_an_error_not_ignored(capsys, c4_d16):
  assert cli.main(['data', 'stats', f'--task={c4_d16}', '--unique_tokens=1024', '--epochs=2']) == 2
  assert '--unique_tokens, --epochs describe a --corpus task' in capsys.readouterr().err


def test_max_examples_of_an_unbounded_task_are_all_measured(c4_path, t5_vocab_file):
  # They were capped at one epoch (8 examples here) without a word: 'examples: 8' for --max_examples=20.
  name = tasks.repeated_task(corpus=c4_path, vocabulary=t5_vocab_file, unique_tokens=2**12)
  s = stats.task_stats(name, max_examples=20)
  assert s['task_epochs'] is None and s['examples_per_epoch'] == 8
  assert (s['examples'], s['epochs_touched']) == (20, 3) and s['epochs'] > 2
  assert stats.task_stats(name)['examples'] == 8  # without a limit: one epoch


def test_noise_is_measured_with_a_vocabulary_whose_unk_is_1(c4_docs, c4_path, tmp_path):
  # SentencePiece ids 0 and 1 can be text (unk 1 here, unk 0 by SentencePiece's default); measuring stripped them as
  # padding and EOS, which the stream's examples do not carry: a quarter of the tokens gone, mean span 2.2 for mu 3.
  model = tmp_path / 'unk1.model'
  lines = [line for d in c4_docs[:40] for line in d.splitlines() if line]
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(model.with_suffix('')), vocab_size=300,
                                 pad_id=0, unk_id=1, eos_id=2, bos_id=-1, minloglevel=2)
  rng = random.Random(0)
  texts = [' '.join(rng.choice(['the', 'of', 'model', '你好', '数据']) for _ in range(400)) for _ in range(30)]
  vocab = seqio.SentencePieceVocabulary(str(model), extra_ids=100)
  name = tasks.repeated_task(corpus=write_jsonl(tmp_path / 'c.jsonl', texts), vocabulary=vocab, unique_tokens=2**13,
                             epochs=1, name='test.stats_unk1')
  assert (tasks.store(name, 'train').tokens == 1).mean() > 0.2
  s = stats.task_stats(name)
  # 85 noise tokens in 28 spans per full 568-token chunk (T5's rounding).
  assert s['noise_density'] == pytest.approx(0.15, abs=0.002)
  assert s['mean_noise_span_length'] == pytest.approx(3.0, abs=0.05)


def test_bench_data_counts_every_example_of_a_packed_row(monkeypatch):
  """Other SeqIO tasks are read packed (DatasetConfig.pack): seqio's converter puts several examples in a row, and
  examples/s counted rows (here a third of the examples)."""
  # A batch of two packed rows as pipeline.get_batches reads them from such a task (examples of i % 7 + 2 input and
  # i % 3 + 1 target tokens, each token its example's id): examples 7-10 in the first row, 11-12 in the second.
  packed = {
      'encoder_input_tokens': np.array([[7] * 2 + [8] * 3 + [9] * 4 + [10] * 5 + [0] * 2,
                                        [11] * 6 + [12] * 7 + [0] * 3]),
      'encoder_segment_ids': np.array([[1] * 2 + [2] * 3 + [3] * 4 + [4] * 5 + [0] * 2, [1] * 6 + [2] * 7 + [0] * 3]),
      'decoder_target_tokens': np.array([[7, 7, 8, 8, 8, 9, 10, 10], [11, 11, 11, 12, 0, 0, 0, 0]]),
      'decoder_segment_ids': np.array([[1, 1, 2, 2, 2, 3, 4, 4], [1, 1, 1, 2, 0, 0, 0, 0]]),
      'decoder_loss_weights': np.array([[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0, 0]]),
  }
  monkeypatch.setattr(pipeline, 'get_batches', lambda cfg, **kwargs: (packed for _ in range(10)))
  monkeypatch.setattr(pipeline, 'num_batches', lambda cfg: None)
  cfg = pipeline.DatasetConfig('any', {'inputs': 16, 'targets': 8}, batch_size=2)
  r = bench_data.run_benchmark(cfg, bench_data.DataBenchConfig(steps=2, warmup=0))
  assert r['examples_per_s'] / r['batches_per_s'] == pytest.approx(6)
  assert r['tokens_per_s'] / r['batches_per_s'] == pytest.approx(14 + 13 + 8 + 4)  # padding not counted
  assert r['input_fill'] == pytest.approx(27 / 32)


def test_bench_data_times_what_a_finite_stream_holds():
  # A finite task shorter than the first batch + warm-up + --steps ended in a bare StopIteration.
  bench = bench_data.DataBenchConfig(steps=50, warmup=3)
  assert bench_data.timed_batches(None, bench, 't') == 50  # unending stream
  assert bench_data.timed_batches(54, bench, 't') == 50
  assert bench_data.timed_batches(9, bench, 't') == 5
  assert bench_data.timed_batches(5, bench, 't') == 1
  with pytest.raises(ValueError, match=r"t holds 4 batch\(es\).*at least 5.*smaller --batch_size"):
    bench_data.timed_batches(4, bench, 't')


def test_bench_data_on_a_short_task_reports_the_batches_it_timed(monkeypatch):
  row = {'encoder_input_tokens': np.ones((2, 4), int), 'decoder_target_tokens': np.ones((2, 2), int),
         'decoder_loss_weights': np.ones((2, 2), int)}
  monkeypatch.setattr(pipeline, 'get_batches', lambda cfg, **kwargs: (row for _ in range(6)))  # ends after 6
  # Counting the batches builds the stream (tokenising, the first epoch's order): part of the setup time.
  monkeypatch.setattr(pipeline, 'num_batches', lambda cfg: time.sleep(0.2) or 6)
  cfg = pipeline.DatasetConfig('any', {'inputs': 4, 'targets': 2}, batch_size=2)
  r = bench_data.run_benchmark(cfg, bench_data.DataBenchConfig(steps=50, warmup=3))
  assert r['timed_batches'] == 2 and r['stream_batches'] == 6 and r['setup_s'] >= 0.2
  assert 'over 2 batches (the stream holds 6)' in bench_data.format_report(r)


@pytest.mark.parametrize('task', ['repeat_lm.squad_v1', 'repeat_lm.super_glue.boolq'])
def test_stats_of_a_fine_tuning_task_says_what_it_is(task):
  with pytest.raises(ValueError, match='not a repeated pre-training task'):
    stats.task_stats(task)
