"""Exact token subsets: D tokens exactly, the crossing document cut, bad input counted, budgets never shrunk."""

import logging

import numpy as np
import pytest
import seqio

from repeat_lm.data import sources, subset

from data_helpers import write_jsonl  # pylint: disable=wrong-import-order


@pytest.fixture(scope='module')
def vocab(t5_vocab_file):
  return seqio.SentencePieceVocabulary(t5_vocab_file, extra_ids=100)


def test_first_d_tokens_in_source_order(c4_path, c4_docs, vocab):
  source = sources.LocalText(c4_path)
  store = subset.build_store(source, 'train', vocab, 2**16)
  assert store.num_tokens == 2**16 and len(store.tokens) == 2**16
  ids = vocab.tokenizer.encode(c4_docs[:store.num_documents])
  for i in range(store.num_documents - 1):  # whole documents, in the source's order
    assert store.document(i).tolist() == ids[i]
  last = store.document(store.num_documents - 1).tolist()
  assert 0 < len(last) < len(ids[-1]) and ids[-1][:len(last)] == last  # the crossing document is cut
  assert store.info['boundary_tokens_cut'] == len(ids[-1]) - len(last)
  assert store.tokens.dtype == np.uint16  # 32,100 ids fit in 16 bits


def test_a_budget_larger_than_the_source_is_an_error(c4_path, vocab):
  with pytest.raises(ValueError, match='fewer than the 1,048,576 unique tokens requested'):
    subset.build_store(sources.LocalText(c4_path), 'train', vocab, 2**20)


def test_a_source_may_yield_documents_from_any_iterator(vocab):
  # TextSource.documents returns an Iterator[str]: a list's iterator has no close(), unlike a generator.
  class ListSource:
    tag = 'list'

    def fingerprint(self):
      return 'list'

    def documents(self, split, stats):
      del split, stats
      return iter(['Some words of text.'] * 40)

  store = subset.build_store(ListSource(), 'train', vocab, 50)
  assert store.num_tokens == 50


@pytest.mark.parametrize('max_tokens', [-5, 0, True, 2.5])
def test_a_budget_that_is_no_count_is_refused(c4_path, vocab, max_tokens):
  # repeated_task refuses such budgets; build_store took them: -5 read the whole sample into 11,593 tokens with every
  # document cut short, 0 gave an empty store, True one token, 2.5 a slice TypeError.
  with pytest.raises(ValueError, match=f'max_tokens={max_tokens!r} must be a whole number of at least 1'):
    subset.build_store(sources.LocalText(c4_path), 'train', vocab, max_tokens)


def test_bad_input_is_counted_and_the_budget_kept(tmp_path, vocab, caplog):
  long_doc = 'word ' * 5000
  path = write_jsonl(tmp_path / 'bad.jsonl', ['First doc.', '', '   \n\t', long_doc, 'Tail ' * 100],
                     raw_lines=[b'{"text": "caf\xe9 \xff bytes"}\n', b'\n', b'   \n'])
  source = sources.LocalText(path, validation=0.2, max_document_chars=1000)
  with caplog.at_level(logging.WARNING):
    store = subset.build_store(source, 'train', vocab, 300)
  assert store.num_tokens == 300  # exactly the budget despite everything
  assert store.info['read_skipped_empty'] == 2 and store.info['read_truncated_long'] == 1
  assert store.info['read_replaced_invalid_utf8'] == 1
  assert 'truncated 1 longer than the document limit' in caplog.text and 'skipped 2 empty' in caplog.text
  assert len(store.document(1)) <= 1000  # the gigantic document was cut to 1000 characters before tokenising


def test_stores_are_cached_on_disk_and_memory_mapped(tmp_path, monkeypatch, c4_path, vocab):
  monkeypatch.setenv('REPEAT_LM_CACHE', str(tmp_path))
  monkeypatch.setattr(subset, '_DISK_CACHE_MIN_TOKENS', 0)
  source = sources.LocalText(c4_path)
  built = subset.get_store(source, 'validation', vocab, 5000, exact=False)
  subset._MEMO.clear()  # pylint: disable=protected-access
  loaded = subset.get_store(source, 'validation', vocab, 5000, exact=False)
  assert isinstance(loaded.tokens, np.memmap) and loaded is not built
  np.testing.assert_array_equal(loaded.tokens, built.tokens)
  np.testing.assert_array_equal(loaded.offsets, built.offsets)
  assert loaded.info == built.info and (tmp_path / 'subsets').is_dir()
  assert subset.get_store(source, 'validation', vocab, 5000, exact=False) is loaded  # memoised


def test_validation_is_the_held_out_tail(c4_path, c4_docs, vocab):
  source = sources.LocalText(c4_path)
  validation = subset.build_store(source, 'validation', vocab, None)
  train = subset.build_store(source, 'train', vocab, None)
  assert validation.num_documents == 50 and train.num_documents == 950
  assert validation.document(0).tolist() == vocab.tokenizer.encode(c4_docs[950])


class _ByteVocab:
  """Each character -> its code point plus `base` (letters past 65,536 with base 70,000); '~' -> no tokens."""

  def __init__(self, base=0, size=128):
    self.base, self.vocab_size = base, size

  def encode(self, text):
    return [self.base + ord(c) for c in text if c != '~']


class _Docs:
  """A source whose documents are given per split."""

  def __init__(self, name, **splits):
    self.tag, self._name, self._splits = name, name, splits

  def fingerprint(self):
    return self._name

  def documents(self, split, stats):
    del stats
    return iter(self._splits[split])


def test_ids_past_16_bits_are_stored_whole():
  # uint16 holds ids 0..65,535: a vocabulary of 70,128 ids needs int32, or id 70,097 would wrap to 4,561.
  store = subset.build_store(_Docs('wide', train=['abc']), 'train', _ByteVocab(70_000, 70_128), None)
  assert store.tokens.tolist() == [70_097, 70_098, 70_099]


def test_documents_without_tokens_are_skipped_and_counted(caplog):
  # '~~' tokenises to nothing: no empty document in the store (an example could not start in it), one counted.
  with caplog.at_level(logging.WARNING):
    store = subset.build_store(_Docs('tilde', train=['ab', '~~', 'cd']), 'train', _ByteVocab(), None)
  assert store.num_documents == 2 and store.offsets.tolist() == [0, 2, 4] and store.info['skipped_no_tokens'] == 1
  assert 'skipped 1 documents that tokenise to nothing' in caplog.text


def test_the_store_cache_keys_on_split_and_exactness(tmp_path, monkeypatch):
  monkeypatch.setenv('REPEAT_LM_CACHE', str(tmp_path))
  source = _Docs('keyed', train=['abcdef'], validation=['xyz'])
  assert subset.get_store(source, 'train', _ByteVocab(), None).num_tokens == 6
  assert subset.get_store(source, 'validation', _ByteVocab(), None).num_tokens == 3
  # A short, non-exact store of 10 tokens is not the answer to an exact request for 10: that is an error.
  assert subset.get_store(source, 'train', _ByteVocab(), 10, exact=False).num_tokens == 6
  with pytest.raises(ValueError, match='fewer than the 10 unique tokens'):
    subset.get_store(source, 'train', _ByteVocab(), 10, exact=True)


def test_content_hash_covers_document_boundaries():
  tokens = np.arange(3, 13, dtype=np.uint16)
  assert subset.content_hash(tokens, np.array([0, 4, 10])) != subset.content_hash(tokens, np.array([0, 5, 10]))
