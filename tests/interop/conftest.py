"""Fixtures of the interop tests; the helpers they use live in interop_helpers.py (importable by the tests)."""

import sys
from pathlib import Path

import gin
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # interop_helpers, t5x_double

from interop_helpers import TINY, init_params, write_model_dir  # noqa: E402  pylint: disable=wrong-import-position


@pytest.fixture
def fresh_gin():
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
  return write_model_dir(tmp_path_factory.mktemp("tiny_run"), TINY, init_params(TINY))
