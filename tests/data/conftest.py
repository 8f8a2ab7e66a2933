"""Data-test fixtures: the shared C4 sample and T5 vocabulary (skipped when ../shared is absent), the default corpus."""

from pathlib import Path

import pytest

# ../shared beside the clone (in CI: ../shared relative to the checkout).
SHARED = Path(__file__).resolve().parents[2].parent / 'shared'
C4_SAMPLE = SHARED / 'data' / 'c4' / 'c4-sample.00000-of-00001.json.gz'
T5_VOCAB = SHARED / 'data' / 'vocab' / 't5_cc_all_32000.spm.model'


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
def c4_task(c4_path, t5_vocab_file) -> str:
  from repeat_lm.data import tasks  # pylint: disable=import-outside-toplevel
  return tasks.span_corruption_task(corpus=c4_path, vocabulary=t5_vocab_file)


@pytest.fixture(scope='session')
def wiki_ready() -> str:
  """The default corpus and vocabulary, built once into the cache ($REPEAT_LM_CACHE or ~/.cache/repeat_lm)."""
  from repeat_lm.data import tasks, vocab  # pylint: disable=import-outside-toplevel
  vocab.default_vocabulary().load_model()
  return tasks.WIKI_TASK
