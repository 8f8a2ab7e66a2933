"""Vocabulary files: what a model file that cannot be used says."""

import pytest

from repeat_lm.data import sources, subset, vocab

from conftest import write_jsonl  # pylint: disable=wrong-import-order


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
