"""Vocabularies: T5's SentencePiece model, and a small one trained once on the default Wikipedia corpus.

Both are `seqio.SentencePieceVocabulary` with 100 extra ids (sentinels), numbered down from the top as in T5:
T5's is 32,100 ids (<extra_id_0> = 32099), the default one 8,100 ids (<extra_id_0> = 8099).

In gin (`from __gin__ import dynamic_registration` + `from repeat_lm.data import vocab`):
  VOCABULARY = @vocab.t5_vocabulary()
  vocab.t5_vocabulary.path = 'gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model'
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import seqio
import sentencepiece as spm
import tensorflow as tf
from google.protobuf import message

from repeat_lm import checks, files
from repeat_lm.data import sources

log = logging.getLogger(__name__)

EXTRA_IDS = 100  # T5's sentinel count
T5_VOCAB_PATH = 'gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model'
DEFAULT_VOCAB_PIECES = 8000  # + 100 extra ids = 8100 ids; the tiny model pads its embedding to 8192
# Bump when training settings change so a stale cached model is not reused.
_DEFAULT_VOCAB_VERSION = 1


def check_extra_ids(extra_ids: int) -> None:
  """A whole number of sentinels >= 0. seqio takes a negative count: -5 made an 8,000-id vocabulary whose
  '<extra_id_0>' (the top id) was the ordinary piece '‘', so span corruption's sentinels were text tokens; True was
  one sentinel."""
  if not checks.is_count(extra_ids, 0):
    raise ValueError(f'extra_ids={extra_ids!r}: the number of sentinel ids must be a whole number >= 0 (T5: '
                     f'{EXTRA_IDS}).')


def t5_vocabulary(path: str | None = None, extra_ids: int = EXTRA_IDS) -> seqio.SentencePieceVocabulary:
  """T5's 32k SentencePiece vocabulary (pad 0, eos 1, unk 2) plus `extra_ids` sentinels.

  path: None = $REPEAT_LM_T5_VOCAB if set (a local copy, for machines without GCS access), else `T5_VOCAB_PATH`.
  """
  check_extra_ids(extra_ids)
  path = path or os.environ.get('REPEAT_LM_T5_VOCAB') or T5_VOCAB_PATH
  return _FileVocabulary(path, extra_ids=extra_ids)


# What TensorFlow's file system raises for a missing or unreachable file (local or gs://).
UNREADABLE = (tf.errors.OpError, OSError)


class _FileVocabulary(seqio.SentencePieceVocabulary):
  """seqio's vocabulary, whose (lazy) first read names the file and the fix when the model cannot be read, instead
  of TensorFlow's file-system traceback (e.g. gs://t5-data on a machine without network access)."""

  def _model_context(self):
    try:
      return super()._model_context()
    except UNREADABLE as e:
      raise unreadable_model_error(self._sentencepiece_model_file, e) from e
    # Read, but not a SentencePiece model: the wrong file or a truncated copy fail to parse (DecodeError); an empty
    # file parses as an empty model that SentencePiece refuses to load (RuntimeError 'unk is not defined').
    except (message.DecodeError, RuntimeError) as e:
      raise _model_error(ValueError, f'{self._sentencepiece_model_file!r} is not a SentencePiece model ({e})',
                         "Point REPEAT_LM_T5_VOCAB (or vocab.t5_vocabulary.path in gin, or --vocab) at T5's "
                         'cc_all.32000.100extra/sentencepiece.model or another .model file.') from e


def _model_error(cls: type[Exception], problem: str, fix: str) -> Exception:
  """`cls('PROBLEM. FIX')` with PROBLEM kept as its `problem`: a caller whose own flag names the file
  (inference.vocabulary_of's --vocabulary) gives its own fix instead of this one."""
  error = cls(f'{problem}. {fix}')
  error.problem = problem
  return error


def unreadable_model_error(path: str, error: Exception) -> FileNotFoundError:
  """The error for a SentencePiece model that cannot be read: the file, the reason, and how to point at a copy."""
  reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  return _model_error(FileNotFoundError, f'Cannot read the SentencePiece model {path!r} ({reason})',
                      'Point REPEAT_LM_T5_VOCAB (or vocab.t5_vocabulary.path in gin, or --vocab) at a local copy, '
                      "e.g. T5's cc_all.32000.100extra/sentencepiece.model.")


def _training_lines(documents: Iterable[str]) -> Iterator[str]:
  for doc in documents:
    for line in doc.splitlines():
      if line.strip():
        yield line


def train_sentencepiece(documents: Iterable[str], path: Path, vocab_size: int = DEFAULT_VOCAB_PIECES) -> None:
  """Trains a T5-style unigram model (pad 0, eos 1, unk 2, no bos) and writes it atomically to `path`."""
  spm.set_random_generator_seed(0)  # sentence sampling; with the fixed input order the model is reproducible
  # model_writer (not model_prefix) keeps temp paths out of the stored trainer spec: same corpus -> same bytes.
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=_training_lines(documents),
      model_writer=model,
      model_type='unigram',
      vocab_size=vocab_size,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      # Bytes for characters outside the learned pieces instead of <unk>: text round-trips exactly.
      byte_fallback=True,
      character_coverage=0.9995,
      input_sentence_size=200_000,  # caps time and memory; the default corpus has fewer lines than this
      shuffle_input_sentence=True,
      max_sentence_length=16_384,  # Wikipedia paragraphs are long lines
      num_threads=2,
      minloglevel=2,
  )
  files.atomic_write_bytes(path, model.getvalue())


def _default_vocab_file() -> Path:
  return sources.cache_dir() / 'vocab' / f'wiki_unigram_{DEFAULT_VOCAB_PIECES}_v{_DEFAULT_VOCAB_VERSION}.model'


def default_vocabulary_path(path: Path | None = None) -> Path:
  """Trains the default vocabulary on the default corpus's train split once; returns the cached model path."""
  path = path or _default_vocab_file()
  if not path.exists():
    start = time.time()
    train_sentencepiece(sources.load_corpus('wiki').split('train'), path)
    log.info('Trained the default vocabulary in %.1f s -> %s', time.time() - start, path)
  return path


class _LazyDefaultVocabulary(seqio.SentencePieceVocabulary):
  """A SentencePieceVocabulary whose model file is built on first use, not on construction.

  Registering a task or parsing a gin file builds vocabulary objects; training must wait until one is used.
  """

  def _model_context(self):
    if self._model is None:
      default_vocabulary_path(Path(self._sentencepiece_model_file))
    return super()._model_context()

  @property
  def sentencepiece_model_file(self) -> str:
    default_vocabulary_path(Path(self._sentencepiece_model_file))
    return self._sentencepiece_model_file


def default_vocabulary(extra_ids: int = EXTRA_IDS) -> seqio.SentencePieceVocabulary:
  """The 8000-piece unigram vocabulary of the default Wikipedia corpus, + `extra_ids` sentinels (8100 ids).

  Cheap to call: the model is trained (2-8 s on 2 cores) and cached under `sources.cache_dir()` on first use.
  """
  check_extra_ids(extra_ids)
  # The path is fixed now (the cache dir at call time); the file is made on first use.
  return _LazyDefaultVocabulary(str(_default_vocab_file()), extra_ids=extra_ids)
