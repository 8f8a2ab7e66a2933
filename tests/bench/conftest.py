"""Fixtures of the benchmark tests."""

import pytest

from repeat_lm.train import flops


@pytest.fixture(autouse=True)
def small_matmul_probe(monkeypatch):
  """The CPU peak probes (repeat_lm's, and the Hugging Face peer's) at 256^3 instead of 2048^3 and 3072^3.

  A benchmark probes once and again beside every timed round: ~4 s a probe on the 2-core CI host, paid by every
  test here that runs one. These tests check what is done with the peak; tests/train/test_flops.py checks the probe.
  """
  real = flops.matmul_rate
  monkeypatch.setattr(flops, "matmul_rate", lambda sizes=(), dtype="float32", repeats=1: real((256,), dtype, 1))
  monkeypatch.setattr(flops, "PROBE_SIZES", (256,))  # what the Hugging Face peer's torch.matmul probe multiplies
  flops.measured_matmul_peak.cache_clear()
  yield
  flops.measured_matmul_peak.cache_clear()  # the small probe's rate must not serve later tests
