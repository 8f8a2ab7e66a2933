"""The train state's layout and the jitted train / eval steps on the tiny model."""

import jax
import numpy as np
import optax
import pytest

from repeat_lm.models import EncoderDecoderModel, T5Config, Transformer
from repeat_lm.models.encoder_decoder import summarize
from repeat_lm.train import partitioning, state as state_lib, trainer

TINY = T5Config(vocab_size=64, dtype="float32", emb_dim=16, num_heads=2, head_dim=8, num_encoder_layers=1,
                num_decoder_layers=1, mlp_dim=32)
TOKENS = {"encoder_input_tokens": 16, "decoder_input_tokens": 8, "decoder_target_tokens": 8,
          "decoder_loss_weights": 8}
PACKING = {"encoder_segment_ids": 16, "encoder_positions": 16, "decoder_segment_ids": 8, "decoder_positions": 8}


def two_per_row(batch_size):
  """Packed rows of two examples each (segments 1 and 2), so dropping the segment ids changes the loss."""
  rng = np.random.default_rng(0)
  batch = {k: rng.integers(2, TINY.vocab_size, (batch_size, n)).astype(np.int32) for k, n in TOKENS.items()}
  batch["decoder_loss_weights"] = np.ones((batch_size, 8), np.int32)
  for prefix, n in (("encoder", 16), ("decoder", 8)):
    batch[f"{prefix}_segment_ids"] = np.repeat([[1] * (n // 2) + [2] * (n // 2)], batch_size, 0).astype(np.int32)
    batch[f"{prefix}_positions"] = np.repeat([list(range(n // 2)) * 2], batch_size, 0).astype(np.int32)
  batch["decoder_input_tokens"][:, [0, 4]] = 0  # each example's decoder input starts from 0
  return batch


@pytest.mark.parametrize("train_packed", [True, False])
def test_evaluation_batches_need_not_have_the_training_batches_features(train_packed):
  # The validation set packed or not independently of the training set (validation/DatasetConfig.pack): the eval
  # step took the training layout's batch shardings, so an unpacked eval batch failed at the first evaluation
  # (a pytree mismatch, after eval_period steps of training) and a packed one lost its segment ids on the way.
  model, partitioner = EncoderDecoderModel(Transformer(TINY)), partitioning.Partitioner(2, 1, devices=jax.devices()[:2])
  lay = state_lib.layout(model, optax.identity(), partitioner,
                         state_lib.batch_specs({**TOKENS, **PACKING} if train_packed else TOKENS, 4), 0)
  params = model.init(jax.random.key(0), state_lib.batch_specs(TOKENS, 4))["params"]
  packed = two_per_row(4)
  batch = {k: v for k, v in packed.items() if k in TOKENS} if train_packed else packed
  eval_step = state_lib.make_eval_step(model, lay, partitioner)
  got = trainer._run_eval(eval_step, params, [batch], partitioner)  # pylint: disable=protected-access
  want = summarize(jax.device_get(jax.jit(model.loss_and_metrics)(jax.device_get(params), batch)[1]))
  assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
  assert got["accuracy"] == want["accuracy"]
