"""Cross-entropy with z-loss and label smoothing, with T5X's semantics.

Shapes: B batch, T decoder length, V vocabulary.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

NUM_REAL_TARGET_TOKENS = "NUM_REAL_TARGET_TOKENS"


def _concrete(value) -> bool:
  # A traced setting (under jax.jit) has no value to check here; only numbers known now are checked.
  return not isinstance(value, jax.core.Tracer)


def _not_a_number(value) -> bool:
  # A bool is a number to Python (True == 1): z_loss=True (meant as "on") trained with a z-loss weight of 1, 10^4 x
  # T5X's, without a word; a gin string ('1e-4') failed the range test with a bare TypeError naming no setting.
  return isinstance(value, (bool, np.bool_, str))


def check_label_smoothing(label_smoothing: float) -> None:
  """label_smoothing in [0, 1): 1 leaves no mass on the target and a negative one a negative probability, and both
  make the loss's constant (the smoothed targets' entropy) NaN."""
  if _concrete(label_smoothing) and (_not_a_number(label_smoothing) or not 0.0 <= label_smoothing < 1.0):
    raise ValueError(f"label_smoothing={label_smoothing} must lie in [0, 1) (LABEL_SMOOTHING; 0.1 is usual).")


def check_z_loss(z_loss: float) -> None:
  """A finite z_loss >= 0: NaN makes every loss NaN, and a negative one rewards growing logits instead of
  penalising them."""
  if _concrete(z_loss) and (_not_a_number(z_loss) or not 0.0 <= z_loss < math.inf):
    raise ValueError(f"z_loss={z_loss} must be a finite number >= 0 (Z_LOSS; T5X uses 1e-4).")


def check_loss_normalizing_factor(loss_normalizing_factor: float | str | None) -> None:
  """None, 'NUM_REAL_TARGET_TOKENS' or a positive, finite number: 0 divides the loss by zero and a negative number
  turns training into gradient ascent on the loss."""
  factor = loss_normalizing_factor
  if factor is None or not _concrete(factor):
    return
  if isinstance(factor, str):
    if factor == NUM_REAL_TARGET_TOKENS:
      return
    raise ValueError(f"Unknown loss_normalizing_factor {factor!r}: use a number, None or 'NUM_REAL_TARGET_TOKENS'.")
  if isinstance(factor, bool) or not 0.0 < factor < math.inf:
    raise ValueError(f"loss_normalizing_factor={factor!r} must be a positive, finite number (or None or "
                     "'NUM_REAL_TARGET_TOKENS').")


def cross_entropy_with_z_loss(logits_BxTxV: jax.Array, targets_BxT: jax.Array, *, z_loss: float = 0.0,
                              label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """Per-token (loss, z_loss part), both [B, T] float32.

  loss = -sum_v q_v log p_v - c + z_loss * logsumexp(logits)^2, where q is the smoothed target distribution
  (confidence 1 - ls on the target, ls / (V - 1) elsewhere) and c = -sum_v q_v log q_v is q's entropy, subtracted so
  that a perfect prediction of q costs zero (T5X's "normalizing constant").
  """
  check_label_smoothing(label_smoothing)
  check_z_loss(z_loss)
  logits_BxTxV = logits_BxTxV.astype(jnp.float32)
  vocab = logits_BxTxV.shape[-1]
  confidence = 1.0 - label_smoothing
  low_confidence = label_smoothing / (vocab - 1)
  normalizing_constant = -(confidence * np.log(confidence) +
                           (vocab - 1) * low_confidence * np.log(low_confidence + 1e-20))
  log_z_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
  target_logit_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  # sum_v q_v (logits_v - log_z), written without materialising the one-hot target distribution [B, T, V].
  target_log_prob_BxT = target_logit_BxT - log_z_BxT
  if label_smoothing:
    mean_log_prob_BxT = jnp.sum(logits_BxTxV, axis=-1) - vocab * log_z_BxT
    others_BxT = mean_log_prob_BxT - target_log_prob_BxT
    cross_entropy_BxT = -(confidence * target_log_prob_BxT + low_confidence * others_BxT)
  else:
    cross_entropy_BxT = -target_log_prob_BxT
  z_loss_BxT = z_loss * jnp.square(log_z_BxT)
  return cross_entropy_BxT - normalizing_constant + z_loss_BxT, z_loss_BxT


def loss_normalizer(weights_BxT: jax.Array, loss_normalizing_factor: float | str | None) -> jax.Array:
  """The divisor of the summed token loss.

  'NUM_REAL_TARGET_TOKENS' gives a mean per target token (what metrics show); a number gives T5X's constant factor
  (e.g. batch x target length, so the gradient scale does not depend on padding); None gives a plain sum.
  """
  check_loss_normalizing_factor(loss_normalizing_factor)
  if loss_normalizing_factor is None:
    return jnp.asarray(1.0, jnp.float32)
  if loss_normalizing_factor == NUM_REAL_TARGET_TOKENS:
    return jnp.maximum(jnp.sum(weights_BxT.astype(jnp.float32)), 1.0)
  return jnp.asarray(float(loss_normalizing_factor), jnp.float32)
