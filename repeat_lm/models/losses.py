"""Cross-entropy with z-loss and label smoothing, with T5X's semantics.

Shapes: B batch, T decoder length, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def cross_entropy_with_z_loss(logits_BxTxV: jax.Array, targets_BxT: jax.Array, *, z_loss: float = 0.0,
                              label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """Per-token (loss, z_loss part), both [B, T] float32.

  loss = -sum_v q_v log p_v - c + z_loss * logsumexp(logits)^2, where q is the smoothed target distribution
  (confidence 1 - ls on the target, ls / (V - 1) elsewhere) and c = -sum_v q_v log q_v is q's entropy, subtracted so
  that a perfect prediction of q costs zero (T5X's "normalizing constant").
  """
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
  if loss_normalizing_factor is None:
    return jnp.asarray(1.0, jnp.float32)
  if loss_normalizing_factor == "NUM_REAL_TARGET_TOKENS":
    return jnp.maximum(jnp.sum(weights_BxT.astype(jnp.float32)), 1.0)
  if isinstance(loss_normalizing_factor, str):
    raise ValueError(f"Unknown loss_normalizing_factor {loss_normalizing_factor!r}: use a number, None or "
                     "'NUM_REAL_TARGET_TOKENS'.")
  return jnp.asarray(float(loss_normalizing_factor), jnp.float32)
