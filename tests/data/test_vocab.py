"""Vocabulary files: what a model file that cannot be used says."""

import pytest

from repeat_lm.data import sources, subset, vocab

from data_helpers import write_jsonl  # pylint: disable=wrong-import-order


def test_an_empty_model_file_names_the_file(tmp_path):
  # A 0-byte copy (an interrupted download) parses as an empty model; SentencePiece then raised a bare
  # RuntimeError('INTERNAL: unk is not defined.') that named no file.
  path = tmp_path / 'spiece.model'
  path.write_bytes(b'')
  empty = vocab.t5_vocabulary(str(path))
  with pytest.raises(ValueError, match=r"spiece.model' is not a SentencePiece model.*Point REPEAT_LM_T5_VOCAB"):
    empty.encode('hello')
  corpus = sources.LocalText(write_jsonl(tmp_path / 'a.jsonl', ['one two', 'three']))
  with pytest.raises(ValueError, match=r"spiece.model' is not a SentencePiece model"):
    subset.build_store(corpus, 'train', empty, 2)


def test_t5_vocabulary_has_its_sentinels_at_the_top(t5_vocab_file):
  # reference.md section 4: 32,000 pieces + 100 extra ids, <extra_id_0> = 32099.
  v = vocab.t5_vocabulary(t5_vocab_file)
  assert v.vocab_size == 32100 and v.tokenizer.id_to_piece(32099).endswith('<extra_id_0>')


def test_an_explicit_path_wins_over_the_environment(t5_vocab_file, monkeypatch):
  monkeypatch.setenv('REPEAT_LM_T5_VOCAB', '/elsewhere/spiece.model')
  assert vocab.t5_vocabulary(t5_vocab_file)._sentencepiece_model_file == t5_vocab_file  # pylint: disable=protected-access
  assert vocab.t5_vocabulary()._sentencepiece_model_file == '/elsewhere/spiece.model'  # pylint: disable=protected-access
  monkeypatch.delenv('REPEAT_LM_T5_VOCAB')
  assert vocab.t5_vocabulary()._sentencepiece_model_file == vocab.T5_VOCAB_PATH  # pylint: disable=protected-access


def test_a_trained_model_has_t5_s_special_ids_and_byte_fallback(tmp_path):
  # T5's layout: pad 0, eos 1, unk 2, no bos; characters it never saw come back exactly (bytes, not <unk>).
  docs = [f'the quick brown fox {i} jumps over the lazy dog\nanother line about cats {i * 7}' for i in range(300)]
  vocab.train_sentencepiece(docs, tmp_path / 'm.model', vocab_size=400)
  sp = vocab.t5_vocabulary(str(tmp_path / 'm.model'))
  assert (sp.tokenizer.pad_id(), sp.tokenizer.eos_id(), sp.tokenizer.unk_id(), sp.tokenizer.bos_id()) == (0, 1, 2, -1)
  assert sp.decode(sp.encode('Zürich 日本')) == 'Zürich 日本' and 2 not in sp.encode('Zürich 日本')


def test_an_existing_default_model_is_not_retrained(tmp_path, monkeypatch):
  path = tmp_path / 'wiki.model'
  path.write_bytes(b'cached')

  def no_corpus(*args, **kwargs):
    raise AssertionError('the default corpus was read to retrain a cached model')

  monkeypatch.setattr(sources, 'load_corpus', no_corpus)
  assert vocab.default_vocabulary_path(path) == path and path.read_bytes() == b'cached'


def test_a_missing_model_file_says_why(tmp_path):
  # The file and the reason (the file system's first line), not just the exception's class name.
  missing = str(tmp_path / 'missing.model')
  with pytest.raises(FileNotFoundError, match=r"missing.model' \(.*No such file or directory\)"):
    vocab.t5_vocabulary(missing).encode('x')


@pytest.mark.parametrize('extra_ids', [-5, 2.5, True])
def test_a_sentinel_count_that_is_not_a_count_is_refused(extra_ids):
  # -5 gave an 8,000-id vocabulary whose top id, where span corruption puts <extra_id_0>, was the text piece '‘'.
  for make in (vocab.default_vocabulary, vocab.t5_vocabulary):
    with pytest.raises(ValueError, match='extra_ids='):
      make(extra_ids=extra_ids)
