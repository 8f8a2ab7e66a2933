"""Decoding with a partitioner: what predict_tokens reads back from the devices."""

import jax
import numpy as np

from repeat_lm.models import decoding
from repeat_lm.train import inference, partitioning


def test_decoded_rows_are_gathered_before_they_are_read(monkeypatch):
  """On several hosts device_get cannot read rows held by another process's devices: the tokens, which the decoder
  returns split over 'data' like its batch, must be replicated on every device before they are fetched (else
  multi-host fine-tuning crashed at its first PredictionEval)."""
  partitioner = partitioning.Partitioner(4, 2)
  # The decoder's output layout, without compiling a decoder: rows split over the batch devices.
  monkeypatch.setattr(decoding, "decode", lambda module, params, x, cfg, rng: jax.device_put(
      np.asarray(x)[:, ::-1].copy(), partitioner.batch_sharding()))
  fetched = []
  device_get = jax.device_get

  def checked_device_get(x):
    fetched.append(x.is_fully_replicated)
    return device_get(x)

  monkeypatch.setattr(jax, "device_get", checked_device_get)
  inputs = np.arange(2, 18, dtype=np.int32).reshape(8, 2)
  tokens = inference.predict_tokens(None, None, inputs, decoding.DecodeConfig(), batch_size=8, partitioner=partitioner)
  assert fetched == [True]
  assert tokens == [row[::-1].tolist() for row in inputs]
