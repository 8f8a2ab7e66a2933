"""A subset is identified by its content for resuming: a touched or copied corpus with the same text still resumes."""

import gzip
import os
import shutil

import pytest

from repeat_lm.data import pipeline, sources, subset, tasks


def _new_process():
  """Forget every in-process memo, as a restarted run would."""
  subset._MEMO.clear()  # pylint: disable=protected-access
  tasks._STREAMS.clear()  # pylint: disable=protected-access
  sources._load_cached.cache_clear()  # pylint: disable=protected-access


def _cfg(path, vocab):
  name = tasks.repeated_task(corpus=str(path), vocabulary=vocab, unique_tokens=2**12, epochs=2)
  return pipeline.DatasetConfig(name, {'inputs': 512, 'targets': 114}, batch_size=4)


def test_resume_survives_a_touched_corpus_but_not_a_changed_one(tmp_path, c4_path, t5_vocab_file):
  path = tmp_path / 'c4.json.gz'
  shutil.copy(c4_path, path)
  saved = pipeline.data_state(_cfg(path, t5_vocab_file), 5)
  st = os.stat(path)
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, new mtime (a copy, a touch)
  _new_process()
  pipeline.check_resume(_cfg(path, t5_vocab_file), saved)  # the same stream: resumes
  path.write_bytes(gzip.compress(b"{\"text\": \"Other words entirely, a different corpus.\"}\n" * 2000))
  _new_process()
  with pytest.raises(ValueError, match='different data stream'):
    pipeline.check_resume(_cfg(path, t5_vocab_file), saved)
