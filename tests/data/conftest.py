"""Data-test fixtures: the shared C4 sample and T5 vocabulary (skipped when ../shared is absent), the default corpus."""

import gzip
import json

import pytest

from data_helpers import C4_SAMPLE, T5_VOCAB


@pytest.fixture(scope='session')
def c4_path() -> str:
  if not C4_SAMPLE.exists():
    pytest.skip(f'C4 sample not found at {C4_SAMPLE} (../shared is absent on this machine)')
  return str(C4_SAMPLE)


@pytest.fixture(scope='session')
def t5_vocab_file() -> str:
  if not T5_VOCAB.exists():
    pytest.skip(f'T5 vocabulary not found at {T5_VOCAB} (../shared is absent on this machine)')
  return str(T5_VOCAB)


@pytest.fixture(scope='session')
def c4_docs(c4_path) -> list:
  return [json.loads(line)['text'] for line in gzip.open(c4_path)]


@pytest.fixture(scope='session')
def c4_task(c4_path, t5_vocab_file) -> str:
  """The whole C4 sample's train split, unbounded epochs, T5 span corruption."""
  from repeat_lm.data import tasks  # pylint: disable=import-outside-toplevel
  return tasks.span_corruption_task(corpus=c4_path, vocabulary=t5_vocab_file)


@pytest.fixture(scope='session')
def c4_d16(c4_path, t5_vocab_file) -> str:
  """The acceptance setting: the first 2^16 tokens of the C4 sample, 8 epochs, dynamic masks."""
  from repeat_lm.data import tasks  # pylint: disable=import-outside-toplevel
  return tasks.repeated_task(corpus=c4_path, vocabulary=t5_vocab_file, unique_tokens=2**16, epochs=8)


@pytest.fixture(scope='session')
def wiki_ready() -> str:
  """The default corpus and vocabulary, built once into the cache ($REPEAT_LM_CACHE or ~/.cache/repeat_lm)."""
  from repeat_lm.data import tasks, vocab  # pylint: disable=import-outside-toplevel
  vocab.default_vocabulary().load_model()
  return tasks.WIKI_TASK
