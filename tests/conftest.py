"""Test-wide setup: 8 virtual CPU devices so sharding over a real (data x model) mesh is exercised."""

import os
from pathlib import Path

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
# ../shared beside the clone: real C4 sample and the T5 vocabulary. Absent on some machines; tests then skip.
SHARED = REPO_ROOT.parent / "shared"
C4_SAMPLE = SHARED / "data" / "c4" / "c4-sample.00000-of-00001.json.gz"
T5_VOCAB = SHARED / "data" / "vocab" / "t5_cc_all_32000.spm.model"


@pytest.fixture
def c4_sample() -> Path:
  if not C4_SAMPLE.exists():
    pytest.skip(f"C4 sample not found at {C4_SAMPLE} (../shared is absent on this machine)")
  return C4_SAMPLE


@pytest.fixture
def t5_vocab_path() -> Path:
  if not T5_VOCAB.exists():
    pytest.skip(f"T5 vocabulary not found at {T5_VOCAB} (../shared is absent on this machine)")
  return T5_VOCAB
