"""Corpus reading: JSONL(.gz), bad input, validation split, SeqIO source sharding, the default Wikipedia corpus."""

import gzip
import json
import logging
import threading
import time

import numpy as np
import pytest
import seqio

from repeat_lm.data import sources


def write_jsonl(path, texts, gz=False, raw_lines=()):
  data = b''.join(json.dumps({'text': t, 'url': 'u'}).encode() + b'\n' for t in texts) + b''.join(raw_lines)
  path.write_bytes(gzip.compress(data) if gz else data)
  return str(path)


def test_reads_jsonl_and_gz_in_order(tmp_path):
  a = write_jsonl(tmp_path / 'a.jsonl', ['one', 'two'])
  b = write_jsonl(tmp_path / 'b.jsonl.gz', ['three'], gz=True)
  assert sources.read_jsonl([a, b])[0] == ['one', 'two', 'three']
  # A directory or a glob: files sorted by name, so the document order is fixed.
  assert sources.load_corpus(str(tmp_path), 0.5).documents == ('one', 'two', 'three')
  assert sources.load_corpus(str(tmp_path / '*.json*'), 0.5).documents == ('one', 'two', 'three')


def test_empty_documents_skipped_and_counted(tmp_path, caplog):
  path = write_jsonl(tmp_path / 'a.jsonl', ['x', '', '  \n\t', 'y'], raw_lines=[b'\n'])
  with caplog.at_level(logging.WARNING):
    docs, stats = sources.read_jsonl([path])
  assert docs == ['x', 'y'] and stats.skipped_empty == 2 and stats.documents == 2
  assert 'skipped 2 empty' in caplog.text


def test_invalid_utf8_replaced_and_counted(tmp_path, caplog):
  bad_bytes = b'{"text": "caf\xe9 \xff ok"}\n'
  lone_surrogate = b'{"text": "half \\udc80 pair"}\n'
  path = write_jsonl(tmp_path / 'a.jsonl', ['fine'], raw_lines=[bad_bytes, lone_surrogate])
  with caplog.at_level(logging.WARNING):
    docs, stats = sources.read_jsonl([path])
  assert stats.replaced_invalid_utf8 == 2
  assert docs[0] == 'fine' and docs[1] == 'caf\ufffd \ufffd ok' and '\ufffd' in docs[2]
  assert 'invalid UTF-8 in 2' in caplog.text
  for d in docs:
    d.encode('utf-8')  # every document is valid UTF-8 now


@pytest.mark.parametrize('name', ['missing.jsonl.gz', 'nothing-*.json.gz', 'empty_dir'])
def test_missing_corpus_is_a_clear_error(tmp_path, name):
  (tmp_path / 'empty_dir').mkdir()
  path = str(tmp_path / name)
  with pytest.raises(FileNotFoundError, match='Point the corpus at an existing path') as e:
    sources.load_corpus(path)
  assert path in str(e.value)


def test_malformed_json_names_file_and_line(tmp_path):
  path = write_jsonl(tmp_path / 'a.jsonl', ['ok'], raw_lines=[b'{"text": "cut off\n'])
  with pytest.raises(ValueError, match=r'a\.jsonl:2'):
    sources.read_jsonl([path])


@pytest.mark.parametrize('n, fraction, expected',
                         [(100, 0.05, 5), (10, 0.05, 1), (2, 0.0, 1), (2, 0.9, 1), (1000, 0.1, 100)])
def test_validation_split_is_the_disjoint_tail(n, fraction, expected):
  corpus = sources.Corpus('c', tuple(f'doc {i}' for i in range(n)), fraction)
  train, validation = corpus.split('train'), corpus.split('validation')
  assert len(validation) == corpus.num_validation == expected
  assert validation == corpus.documents[-expected:]
  assert not set(train) & set(validation) and train + validation == corpus.documents


def test_corpus_needs_two_documents():
  with pytest.raises(ValueError, match='at least 2'):
    sources.Corpus('c', ('only',))


def source_docs(source, split, **kwargs):
  return [ex['text'].decode() for ex in source.get_dataset(split, **kwargs).as_numpy_iterator()]


def test_source_shards_are_disjoint_and_cover_the_split(tmp_path):
  path = write_jsonl(tmp_path / 'a.jsonl', [f'doc {i}' for i in range(40)])
  source = sources.CorpusSource(path, 0.1)
  shards = [source_docs(source, 'train', shuffle=True, seed=3, shard_info=seqio.ShardInfo(i, 3)) for i in range(3)]
  assert sorted(sum(shards, [])) == sorted(f'doc {i}' for i in range(36))
  assert source_docs(source, 'validation', shuffle=False) == [f'doc {i}' for i in range(36, 40)]


def test_source_shuffle_is_seeded_and_new_each_epoch(tmp_path):
  path = write_jsonl(tmp_path / 'a.jsonl', [f'doc {i}' for i in range(50)])
  source = sources.CorpusSource(path)
  ds = source.get_dataset('train', shuffle=True, seed=7).repeat(2)
  epochs = np.array([ex['text'] for ex in ds.as_numpy_iterator()]).reshape(2, -1)
  again = np.array([ex['text'] for ex in source.get_dataset('train', shuffle=True, seed=7).repeat(2)]).reshape(2, -1)
  np.testing.assert_array_equal(epochs, again)
  assert sorted(epochs[0]) == sorted(epochs[1]) and list(epochs[0]) != list(epochs[1])


def test_atomic_write_survives_racing_writers(tmp_path):
  target = tmp_path / 'sub' / 'model.bin'
  payloads = [bytes([i]) * 200_000 for i in range(8)]
  threads = [threading.Thread(target=sources.atomic_write_bytes, args=(target, p)) for p in payloads]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert target.read_bytes() in payloads  # one complete payload, never a mix
  assert [p.name for p in target.parent.iterdir()] == ['model.bin']  # no temp files left


def test_default_wiki_corpus(wiki_ready):
  start = time.perf_counter()
  corpus = sources.load_corpus('wiki')
  assert time.perf_counter() - start < 5  # cached: no re-extraction
  assert len(corpus.documents) > 100 and corpus.num_validation == 5
  text = '\n'.join(corpus.documents)
  assert len(text) > 2_500_000
  for markup in ('[[', ']]', '{{', "'''", '<ref', '==', 'thumb|'):
    assert markup not in text, markup
  assert 'Anarchism is a political philosophy' in corpus.documents[0]  # case and punctuation kept
