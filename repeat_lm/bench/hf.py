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
  """transformers.T5Config equivalent to a repeat_lm T5Config (T5 v1.1: gated GELU, untied logits)."""
  _, transformers = _import()
  gated = len(config.mlp_activations) == 2
  return transformers.T5Config(
      vocab_size=config.vocab_size, d_model=config.emb_dim, d_kv=config.head_dim, d_ff=config.mlp_dim,
      num_layers=config.num_encoder_layers, num_decoder_layers=config.num_decoder_layers,
      num_heads=config.num_heads, relative_attention_num_buckets=config.relative_attention_num_buckets,
      relative_attention_max_distance=config.relative_attention_max_distance, dropout_rate=config.dropout_rate,
      layer_norm_epsilon=config.layer_norm_epsilon,
      feed_forward_proj="gated-gelu" if gated else config.mlp_activations[0],
      tie_word_embeddings=config.logits_via_embedding, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


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
