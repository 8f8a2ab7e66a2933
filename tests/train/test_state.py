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


def test_source_tokens_are_neither_padding_eos_nor_sentinels():
  # T5's ids: 0 is padding, 1 EOS, and the sentinels are the vocabulary's last 100 ids (32000 .. 32099 of 32100).
  tokens = np.asarray([[0, 1, 2, 31999, 32000, 32099], [5, 32050, 1, 0, 0, 0]], np.int32)
  assert float(state_lib.count_source_tokens(tokens, 32000)) == 3  # 2, 31999 and 5
  assert float(state_lib.count_source_tokens(tokens, None)) == 6  # no sentinels known: they count as text


def test_parameter_init_and_dropout_draw_from_their_own_streams():
  # docs/architecture.md: init draws from fold_in(seed, 0), dropout from fold_in(fold_in(seed, 1), step).
  data = lambda key: np.asarray(jax.random.key_data(key))
  root = jax.random.key(7)
  np.testing.assert_array_equal(data(state_lib.purpose_key(7, state_lib.PARAMS_PURPOSE)),
                                data(jax.random.fold_in(root, 0)))
  np.testing.assert_array_equal(data(state_lib.purpose_key(7, state_lib.DROPOUT_PURPOSE)),
                                data(jax.random.fold_in(root, 1)))


def test_global_batch_keeps_only_the_features_given_a_sharding():
  # What trainer._run_eval relies on: a host batch's features without a sharding are left out, not a KeyError.
  sharding = partitioning.Partitioner(2, 1, devices=jax.devices()[:2]).batch_sharding()
  rows = np.arange(8, dtype=np.int32).reshape(4, 2)
  got = state_lib.global_batch({"encoder_input_tokens": rows, "targets_pretokenized": rows},
                               {"encoder_input_tokens": sharding})
  assert list(got) == ["encoder_input_tokens"] and got["encoder_input_tokens"].sharding == sharding
  np.testing.assert_array_equal(got["encoder_input_tokens"], rows)
