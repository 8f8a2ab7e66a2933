"""Cross-entropy, label smoothing and z-loss against a direct NumPy computation on random logits."""

import jax
import numpy as np
import pytest

from repeat_lm.models import EncoderDecoderModel, T5Config, Transformer, losses
from repeat_lm.models.encoder_decoder import summarize


def numpy_reference(logits, targets, z_loss, ls):
  vocab = logits.shape[-1]
  log_z = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
  log_p = logits - log_z[..., None]
  q = np.full(logits.shape, ls / (vocab - 1))
  np.put_along_axis(q, targets[..., None], 1.0 - ls, axis=-1)
  entropy = -np.sum(np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0), -1)
  return -np.sum(q * log_p, -1) - entropy + z_loss * log_z**2


@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("z", [0.0, 1e-4])
def test_matches_numpy(ls, z):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 17)).astype(np.float64) * 3
  targets = rng.integers(0, 17, size=(3, 5))
  got, got_z = losses.cross_entropy_with_z_loss(logits.astype(np.float32), targets, z_loss=z, label_smoothing=ls)
  np.testing.assert_allclose(np.asarray(got), numpy_reference(logits, targets, z, ls), rtol=1e-4, atol=1e-4)
  # The z-loss part (logged as train/z_loss, eval/z_loss) is z x logsumexp(logits)^2 itself, weight included.
  log_z = np.log(np.sum(np.exp(logits), -1))
  np.testing.assert_allclose(np.asarray(got_z), z * log_z**2, rtol=1e-5, atol=1e-12)


def test_perfect_smoothed_prediction_costs_zero():
  vocab, ls = 11, 0.2
  q = np.full((1, 1, vocab), ls / (vocab - 1))
  q[0, 0, 4] = 1 - ls
  loss, _ = losses.cross_entropy_with_z_loss(np.log(q).astype(np.float32), np.array([[4]]), label_smoothing=ls)
  assert abs(float(loss[0, 0])) < 1e-5


def test_normalizer():
  w = np.array([[1.0, 1.0, 0.0]])
  assert float(losses.loss_normalizer(w, "NUM_REAL_TARGET_TOKENS")) == 2.0
  assert float(losses.loss_normalizer(w, None)) == 1.0
  assert float(losses.loss_normalizer(w, 233472)) == 233472.0
  with pytest.raises(ValueError, match="NUM_REAL_TARGET_TOKENS"):
    losses.loss_normalizer(w, "tokens")


@pytest.mark.parametrize("ls", [1.0, -0.1])
def test_label_smoothing_outside_zero_one_is_refused(ls):
  from repeat_lm.models import EncoderDecoderModel, T5Config, Transformer
  with pytest.raises(ValueError, match=r"label_smoothing=.* must lie in \[0, 1\)"):
    EncoderDecoderModel(module=Transformer(T5Config(vocab_size=128)), label_smoothing=ls)


@pytest.mark.parametrize("kwargs, match", [({"label_smoothing": 1.0}, "label_smoothing"),
                                            ({"label_smoothing": -0.1}, "label_smoothing"),
                                            ({"z_loss": float("nan")}, "z_loss"), ({"z_loss": -1.0}, "z_loss"),
                                            # True == 1: z_loss=True (meant as "on") trained with z_loss 1.0; the
                                            # strings failed the range test with a bare TypeError.
                                            ({"z_loss": True}, "z_loss"), ({"z_loss": "1e-4"}, "z_loss"),
                                            ({"label_smoothing": "0.1"}, "label_smoothing")])
def test_the_loss_function_refuses_what_the_model_refuses(kwargs, match):
  """Called directly, label smoothing 1 or -0.1 and a NaN z_loss gave NaN losses and z_loss=-1 a loss that falls as
  the logits grow (-3.98 on a token the model gets wrong), where EncoderDecoderModel refused or should refuse them."""
  logits, targets = np.zeros((1, 2, 8), np.float32), np.array([[1, 2]])
  with pytest.raises(ValueError, match=match):
    losses.cross_entropy_with_z_loss(logits, targets, **kwargs)
  with pytest.raises(ValueError, match=match):
    EncoderDecoderModel(module=Transformer(T5Config(vocab_size=128)), **kwargs)


@pytest.mark.parametrize("factor", [0, -1.0, float("nan"), float("inf"), True])
def test_a_loss_normalizing_factor_that_is_not_positive_and_finite_is_refused(factor):
  """-1 negated the loss (training would ascend it) and 0 divided it by zero, silently, in the loss and the model."""
  with pytest.raises(ValueError, match="loss_normalizing_factor"):
    losses.loss_normalizer(np.ones((1, 2)), factor)
  with pytest.raises(ValueError, match="loss_normalizing_factor"):
    EncoderDecoderModel(module=Transformer(T5Config(vocab_size=128)), loss_normalizing_factor=factor)


def test_traced_loss_settings_are_not_checked():
  z = jax.jit(lambda z: losses.cross_entropy_with_z_loss(np.zeros((1, 1, 4), np.float32), np.array([[0]]),
                                                         z_loss=z)[1])(1e-4)
  assert np.isfinite(np.asarray(z)).all()


def test_a_batch_without_target_tokens_divides_by_one():
  # An all-padding batch (a final partial batch's filler rows) has a zero loss sum; dividing by its 0 real tokens
  # would make the mean NaN.
  assert float(losses.loss_normalizer(np.zeros((2, 3)), "NUM_REAL_TARGET_TOKENS")) == 1.0


@pytest.mark.parametrize("explicit_weights", [False, True])
def test_metric_sums_count_only_the_weighted_target_tokens(explicit_weights):
  # The trainer's and evaluation's loss and accuracy are these sums / weight_sum; the tests that compare logged
  # metrics compute their expectations with the same sums, on batches whose weights were all 1 and whose random
  # model predicted no target, so accuracy could count padding or nothing at all unseen there.
  cfg = T5Config(vocab_size=64, dtype="float32", emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                 num_encoder_layers=1, num_decoder_layers=1)
  model = EncoderDecoderModel(Transformer(cfg), z_loss=1e-3, label_smoothing=0.1)
  rng = np.random.default_rng(0)
  targets = rng.integers(2, 64, (3, 6)).astype(np.int32)
  targets[0, 2:], targets[1, 4:] = 0, 0  # rows ending in padding
  dec = rng.integers(2, 64, (3, 6)).astype(np.int32)
  dec[:, 0], dec[targets == 0] = 0, 0
  batch = {"encoder_input_tokens": rng.integers(2, 64, (3, 8)).astype(np.int32), "decoder_input_tokens": dec,
           "decoder_target_tokens": targets}
  weights = (targets > 0).astype(np.float64)
  if explicit_weights:  # the feature converter's weights; here one real token is also left out of the loss
    weights[2, 0] = 0.0
    batch["decoder_loss_weights"] = weights.astype(np.int32)
  params = jax.jit(model.init)(jax.random.key(0), batch)["params"]
  logits_fn = jax.jit(model.logits)
  # Make every other real target the model's prediction (the decoder reads its inputs, not these ids): some tokens
  # are right, the weighted-out one among them.
  predicted = np.asarray(logits_fn(params, batch)).argmax(-1)
  right = (targets > 0) & (predicted > 0) & (np.arange(6) % 2 == 0)
  targets[right] = predicted[right]
  logits = np.asarray(logits_fn(params, batch), np.float64)
  correct = logits.argmax(-1) == targets
  assert (correct * weights).sum() >= 3 and (not explicit_weights or correct[2, 0])
  loss, sums = jax.jit(model.loss_and_metrics)(params, batch)
  token_loss = numpy_reference(logits, targets, 1e-3, 0.1)
  log_z = np.log(np.sum(np.exp(logits), -1))
  np.testing.assert_allclose(sums["weight_sum"], weights.sum())
  np.testing.assert_allclose(sums["loss_sum"], np.sum(token_loss * weights), rtol=1e-5)
  np.testing.assert_allclose(sums["z_loss_sum"], np.sum(1e-3 * log_z**2 * weights), rtol=1e-5)
  np.testing.assert_allclose(sums["correct_sum"], np.sum(correct * weights))
  np.testing.assert_allclose(loss, np.sum(token_loss * weights) / weights.sum(), rtol=1e-5)


def test_summarize_divides_every_sum_by_the_weight_sum():
  # train/ and eval/ loss, z_loss, accuracy and MoE statistics are per-token means of sums collected over steps.
  sums = {"loss_sum": 12.0, "z_loss_sum": 0.3, "correct_sum": 6.0, "weight_sum": 8.0, "moe_router_z_loss_sum": 2.0}
  assert summarize(sums) == pytest.approx({"loss": 1.5, "z_loss": 0.0375, "accuracy": 0.75,
                                           "moe_router_z_loss": 0.25})
  # No weighted token at all: the sums are 0, and so are the means (not NaN).
  empty = summarize({"loss_sum": 0.0, "z_loss_sum": 0.0, "correct_sum": 0.0, "weight_sum": 0.0})
  assert empty == {"loss": 0.0, "z_loss": 0.0, "accuracy": 0.0}
