"""Corpus reading: JSONL(.gz), bad input, validation split, local text sources, the default Wikipedia corpus."""

import bz2
import gzip
import logging
import lzma
import os
import re
import threading
import time

import pytest

from repeat_lm.data import sources

from data_helpers import write_jsonl  # pylint: disable=wrong-import-order


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


@pytest.mark.parametrize('encoding', ['utf-16', 'utf-16-be', 'utf-32'])
def test_utf16_or_32_corpus_says_to_re_encode(tmp_path, encoding):
  path = tmp_path / 'a.jsonl'
  path.write_bytes('{"text": "caf\u00e9"}\n'.encode(encoding))
  with pytest.raises(ValueError, match=r'a\.jsonl:1: the file looks UTF-16 or UTF-32 encoded.*re-encode'):
    sources.read_jsonl([str(path)])


@pytest.mark.parametrize('name, packed, kind', [
    ('a.jsonl.bz2', bz2.compress, 'bzip2'), ('a.jsonl.xz', lzma.compress, 'xz'),
    ('a.jsonl.zst', lambda b: b'\x28\xb5\x2f\xfd\x00\x58' + b, 'zstd'), ('a.json', gzip.compress, 'gzip')])
def test_a_compressed_corpus_is_named_as_such_not_as_utf16(tmp_path, name, packed, kind):
  # Compressed bytes hold NUL bytes, which read as the UTF-16 diagnosis ('re-encode it with iconv') before.
  path = tmp_path / name
  path.write_bytes(packed(b'{"text": "one"}\n' * 50))
  with pytest.raises(ValueError, match=rf'{name}: the file is {kind}-compressed'):
    sources.read_jsonl([str(path)])


def test_malformed_json_names_file_and_line(tmp_path):
  path = write_jsonl(tmp_path / 'a.jsonl', ['ok'], raw_lines=[b'{"text": "cut off\n'])
  with pytest.raises(ValueError, match=r'a\.jsonl:2'):
    sources.read_jsonl([path])


@pytest.mark.parametrize('n, fraction, expected',
                         [(100, 0.05, 5), (10, 0.05, 1), (2, 0.0, 1), (2, 0.9, 1), (1000, 0.1, 100),
                          (70, 0.05, 4)])  # round(3.5) = 4: rounded, not floored
def test_validation_split_is_the_disjoint_tail(n, fraction, expected):
  corpus = sources.Corpus('c', tuple(f'doc {i}' for i in range(n)), fraction)
  train, validation = corpus.split('train'), corpus.split('validation')
  assert len(validation) == corpus.num_validation == expected
  assert validation == corpus.documents[-expected:]
  assert not set(train) & set(validation) and train + validation == corpus.documents


def test_corpus_needs_two_documents():
  with pytest.raises(ValueError, match='at least 2'):
    sources.Corpus('c', ('only',))


def docs_of(source, split):
  stats = sources.ReadStats()
  return list(source.documents(split, stats)), stats


def test_local_text_with_a_validation_fraction_or_file(tmp_path):
  path = write_jsonl(tmp_path / 'a.jsonl', [f'doc {i}' for i in range(40)])
  source = sources.LocalText(path, 0.1)
  assert docs_of(source, 'train')[0] == [f'doc {i}' for i in range(36)]
  assert docs_of(source, 'validation')[0] == [f'doc {i}' for i in range(36, 40)]
  held_out = write_jsonl(tmp_path / 'v.jsonl.gz', ['held out'], gz=True)
  separate = sources.LocalText(path, held_out)
  assert docs_of(separate, 'train')[0] == [f'doc {i}' for i in range(40)]
  assert docs_of(separate, 'validation')[0] == ['held out']
  assert separate.tag != source.tag != sources.LocalText(path).tag
  assert sources.LocalText(path).fingerprint() == sources.LocalText(path).fingerprint()
  with pytest.raises(ValueError, match="Unknown split 'test'"):
    docs_of(source, 'test')


def test_a_validation_fractions_read_counts_are_all_of_the_whole_corpus(tmp_path):
  # Read and cleaned once, so a split's stats report that reading: the kept count too, however little is consumed.
  path = write_jsonl(tmp_path / 'a.jsonl', [f'doc {i}' for i in range(40)] + ['  '])
  stats = sources.ReadStats()
  next(sources.LocalText(path, 0.1).documents('train', stats))
  assert (stats.documents, stats.skipped_empty) == (40, 1)


def test_streaming_reads_only_what_it_needs(tmp_path):
  path = write_jsonl(tmp_path / 'a.jsonl', ['first'], raw_lines=[b'{"text": "cut off\n'])
  source = sources.LocalText(path, write_jsonl(tmp_path / 'v.jsonl', ['v']))
  stats = sources.ReadStats()
  assert next(source.documents('train', stats)) == 'first'  # the malformed line after it is never parsed


def test_validation_files_inside_the_training_corpus_are_an_error(tmp_path):
  write_jsonl(tmp_path / 'a.jsonl', ['a'])
  held_out = write_jsonl(tmp_path / 'b.jsonl', ['b'])
  with pytest.raises(ValueError, match=r'validation files are also training files .*b.jsonl'):
    sources.LocalText(str(tmp_path), held_out)  # the directory holds b.jsonl too


def test_corrupt_gzip_names_the_file(tmp_path):
  path = tmp_path / 'bad.jsonl.gz'
  data = gzip.compress(b''.join(b'{"text": "%s"}\n' % os.urandom(20).hex().encode() for _ in range(1000)))
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match='bad.jsonl.gz: corrupt or truncated gzip'):
    sources.read_jsonl([str(path)])


def test_gigantic_documents_are_truncated_and_counted(tmp_path, caplog):
  path = write_jsonl(tmp_path / 'a.jsonl', ['x' * 50, 'short'])
  with caplog.at_level(logging.WARNING):
    docs, stats = sources.read_jsonl([path], max_chars=20)
  assert docs == ['x' * 20, 'short'] and stats.truncated_long == 1
  assert 'truncated 1 longer than the document limit' in caplog.text


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


def test_a_document_of_exactly_the_limit_is_not_truncated(tmp_path):
  docs, stats = sources.read_jsonl([write_jsonl(tmp_path / 'a.jsonl', ['x' * 20, 'y' * 21])], max_chars=20)
  assert docs == ['x' * 20, 'y' * 20] and stats.truncated_long == 1


@pytest.mark.parametrize('limit', [-5, 0, 10.5, True])
def test_a_document_limit_that_is_not_a_count_is_refused(tmp_path, limit):
  """As a slice bound, -5 kept 'hello ' of 'hello world', 0 kept every document as '' and True one character; the
  sources that configure the limit took all of them."""
  with pytest.raises(ValueError, match='max_document_chars='):
    sources.clean_document('hello world', sources.ReadStats(), limit)
  with pytest.raises(ValueError, match='max_document_chars='):
    sources.LocalText(write_jsonl(tmp_path / 'a.jsonl', ['a b', 'c d']), max_document_chars=limit)
  from repeat_lm.data import tfds_text
  with pytest.raises(ValueError, match='max_document_chars='):
    tfds_text.TfdsText('c4/en:3.0.1', max_document_chars=limit)


def test_a_validation_fraction_of_one_is_refused():
  # [0, 1): holding out everything leaves no training documents.
  with pytest.raises(ValueError, match=r'validation_fraction must be in \[0, 1\)'):
    sources.Corpus('c', ('a', 'b', 'c'), 1.0)


def test_a_genuine_replacement_character_is_not_invalid_utf8(tmp_path):
  # U+FFFD written as valid UTF-8 (bytes EF BF BD) is text, not a decoding repair.
  path = tmp_path / 'a.jsonl'
  path.write_bytes('{"text": "a \ufffd b"}\n'.encode('utf-8'))
  docs, stats = sources.read_jsonl([str(path)])
  assert docs == ['a \ufffd b'] and stats.replaced_invalid_utf8 == 0


def test_a_directory_reads_only_its_jsonl_files(tmp_path):
  write_jsonl(tmp_path / 'a.jsonl', ['one', 'two'])
  (tmp_path / 'README.md').write_text('not a corpus\n')
  assert sources.resolve_paths(str(tmp_path)) == [str(tmp_path / 'a.jsonl')]


@pytest.mark.parametrize('pattern', ['*', 'part*', 'sub.jsonl'])
def test_a_directory_among_the_corpus_files_is_refused_not_read_as_empty(tmp_path, pattern):
  # tf.io.gfile opens a directory as an empty file: part1's documents were dropped without a word, and a glob of
  # directories only was reported as '0 non-empty documents'.
  (tmp_path / 'part1').mkdir()
  (tmp_path / 'sub.jsonl').mkdir()
  write_jsonl(tmp_path / 'part1' / 'a.jsonl', ['one'])
  write_jsonl(tmp_path / 'sub.jsonl' / 'b.jsonl', ['two'])
  write_jsonl(tmp_path / 'c.jsonl', ['three'])
  corpus = str(tmp_path if pattern == 'sub.jsonl' else tmp_path / pattern)
  with pytest.raises(ValueError, match=r'matches [12] director.*point the glob at the files') as e:
    sources.load_corpus(corpus, 0.5)
  assert repr(str(tmp_path / ('sub.jsonl' if pattern == 'sub.jsonl' else 'part1'))) in str(e.value)


def test_remote_corpus_files_are_not_each_asked_whether_they_are_directories(monkeypatch):
  # On GCS every isdir is a request: C4's 1,024 files cost 1,024 of them per resolve_paths.
  names = [f'gs://b/c4/c4-train.{i:05d}-of-01024.json.gz' for i in range(1024)] + ['gs://b/c4/part']
  asked = []
  monkeypatch.setattr(sources.tf.io.gfile, 'exists', lambda p: False)
  monkeypatch.setattr(sources.tf.io.gfile, 'glob', lambda p: names)
  monkeypatch.setattr(sources.tf.io.gfile, 'isdir', lambda p: asked.append(p) or p.endswith('part'))
  with pytest.raises(ValueError, match="matches 1 directory \\('gs://b/c4/part'\\)"):
    sources.resolve_paths('gs://b/c4/*')
  assert asked == ['gs://b/c4/*', 'gs://b/c4/part']  # the pattern itself, then the one name that is no corpus file


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_document(tmp_path):
  path = write_jsonl(tmp_path / 'a.jsonl', [], raw_lines=[b'\xef\xbb\xbf{"text": "first"}\n', b'{"text": "second"}\n'])
  gz = write_jsonl(tmp_path / 'b.jsonl.gz', [], raw_lines=[b'\xef\xbb\xbf{"text": "third"}\n'], gz=True)
  assert sources.read_jsonl([path, gz])[0] == ['first', 'second', 'third']


def test_fingerprint_follows_the_modification_time(tmp_path):
  # Rewritten with text of the same size: only the mtime tells the cached store is stale.
  path = tmp_path / 'a.jsonl'
  write_jsonl(path, ['abc'])
  os.utime(path, ns=(10**18, 10**18))
  before = sources.LocalText(str(path)).fingerprint()
  write_jsonl(path, ['xyz'])
  os.utime(path, ns=(2 * 10**18, 2 * 10**18))
  assert sources.LocalText(str(path)).fingerprint() != before


def test_local_text_reports_what_reading_did(tmp_path):
  # Documents kept and the empty ones skipped by the one reading of the whole corpus (the store's read_* info).
  path = write_jsonl(tmp_path / 'a.jsonl', [f'doc {i}' for i in range(10)] + ['', '  '])
  docs, stats = docs_of(sources.LocalText(path, 0.2), 'train')
  assert len(docs) == 8 and stats.documents == 10 and stats.skipped_empty == 2


def test_a_relative_corpus_that_matches_nothing_names_the_directory_it_was_read_from(tmp_path, monkeypatch):
  # RQ2 CPU's '../shared/...' swept from another directory named only the absolute path it became.
  monkeypatch.chdir(tmp_path)
  with pytest.raises(FileNotFoundError, match=rf"relative path '../shared/c4.json.gz', read from the current "
                                              rf"directory {re.escape(str(tmp_path))}"):
    sources.LocalText('../shared/c4.json.gz')
  with pytest.raises(FileNotFoundError, match=r"relative path 'held_out.jsonl'"):
    sources.LocalText(write_jsonl(tmp_path / 'a.jsonl', ['a', 'b']), 'held_out.jsonl')
  with pytest.raises(FileNotFoundError) as absolute:
    sources.LocalText(str(tmp_path / 'none.jsonl'))
  assert 'relative path' not in str(absolute.value)
  (tmp_path / 'empty').mkdir()  # found, but holds no corpus files: where it was read from is not the problem
  with pytest.raises(FileNotFoundError) as found:
    sources.LocalText('empty')
  assert 'relative path' not in str(found.value)
