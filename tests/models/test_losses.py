"""Cross-entropy, label smoothing and z-loss against a direct NumPy computation on random logits."""

import numpy as np
import pytest

from repeat_lm.models import losses


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


def test_a_batch_without_target_tokens_divides_by_one():
  # An all-padding batch (a final partial batch's filler rows) has a zero loss sum; dividing by its 0 real tokens
  # would make the mean NaN.
  assert float(losses.loss_normalizer(np.zeros((2, 3)), "NUM_REAL_TARGET_TOKENS")) == 1.0
