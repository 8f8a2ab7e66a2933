"""Fixtures of the experiment tests; shared settings live in experiment_helpers.py (importable by the tests)."""

import gin
import pytest


@pytest.fixture
def fresh_gin():
  gin.clear_config()
  yield
  gin.clear_config()
