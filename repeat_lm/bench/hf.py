"""Hugging Face's PyTorch T5 training step with the same dimensions, batch, lengths and optimizer family.

Needs the `bench` extra (torch, transformers).
"""

from __future__ import annotations

import time

import numpy as np

INSTALL_HINT = ("--compare=hf needs PyTorch and transformers: pip install -e '.[bench]' "
                "(or pip install torch==2.13.0 transformers==5.24.0).")


def _import():
  try:
    import torch
    import transformers
  except ImportError as e:
    raise RuntimeError(INSTALL_HINT) from e
  return torch, transformers


def hf_config(config):
  """transformers.T5Config equivalent to a repeat_lm T5Config (one mapping for bench and export: interop/hf.py)."""
  _import()  # the bench's install hint when torch or transformers is missing
  from repeat_lm.interop import hf  # pylint: disable=import-outside-toplevel
  return hf.hf_config(config)


class HfStep:
  """T5ForConditionalGeneration + transformers' Adafactor (T5 settings: factored, decay -0.8, clip 1.0)."""

  def __init__(self, config, bench_cfg, threads: int | None = None):
    torch, transformers = _import()
    import os
    self.torch = torch
    self.threads = threads or os.cpu_count() or 1
    torch.set_num_threads(self.threads)
    torch.manual_seed(bench_cfg.seed)
    self.model = transformers.T5ForConditionalGeneration(hf_config(config)).train()
    from transformers.optimization import Adafactor
    self.optimizer = Adafactor(self.model.parameters(), lr=1e-3, scale_parameter=True, relative_step=False,
                               warmup_init=False, decay_rate=-0.8, clip_threshold=1.0)
    rng = np.random.default_rng(bench_cfg.seed)
    b = bench_cfg.batch_size
    self.inputs = torch.from_numpy(rng.integers(2, config.vocab_size, (b, bench_cfg.inputs_length)))
    self.labels = torch.from_numpy(rng.integers(2, config.vocab_size, (b, bench_cfg.targets_length)))

  def step(self) -> float:
    loss = self.model(input_ids=self.inputs, labels=self.labels).loss
    loss.backward()
    self.optimizer.step()
    self.optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())

  def run(self, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
      self.step()
    return time.perf_counter() - start
