"""The encoder-decoder model: a T5X-shaped Flax module plus its loss.

This plays the role of `t5x.models.EncoderDecoderModel`: the trainer knows the network only through the T5X call
signature (`__call__`, `encode`, `decode`) and through `loss_and_metrics` here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from repeat_lm.models import losses, moe

Batch = Mapping[str, jax.Array]

# Batch keys of seqio.EncDecFeatureConverter that the module takes as arguments.
_MODULE_INPUTS = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens", "encoder_segment_ids",
                  "decoder_segment_ids", "encoder_positions", "decoder_positions")


@dataclasses.dataclass
class EncoderDecoderModel:
  module: nn.Module
  z_loss: float = 1e-4
  label_smoothing: float = 0.0
  loss_normalizing_factor: float | str | None = "NUM_REAL_TARGET_TOKENS"

  def __post_init__(self):
    # The loss functions' own checks, so a bad setting fails when the model is configured, not at the first step.
    losses.check_label_smoothing(self.label_smoothing)
    losses.check_z_loss(self.z_loss)
    losses.check_loss_normalizing_factor(self.loss_normalizing_factor)

  @property
  def vocab_size(self) -> int:
    return self.module.config.vocab_size

  def init(self, rng: jax.Array, batch: Batch) -> dict[str, Any]:
    """Variables ({'params', 'params_axes'}) for batches shaped like `batch` (arrays or ShapeDtypeStructs)."""
    inputs = {k: jnp.ones(batch[k].shape, jnp.int32) for k in _MODULE_INPUTS if k in batch}
    return self.module.init({"params": rng, "dropout": rng}, **inputs, enable_dropout=False)

  def logits(self, params, batch: Batch, *, dropout_rng: jax.Array | None = None,
             dropout_scale: jax.Array | float | None = None) -> jax.Array:
    """Logits [B, T, V]; dropout only with a `dropout_rng`, its rates times `dropout_scale` (the schedule's factor)."""
    return self.logits_and_moe_stats(params, batch, dropout_rng=dropout_rng, dropout_scale=dropout_scale)[0]

  def logits_and_moe_stats(self, params, batch: Batch, *, dropout_rng: jax.Array | None = None,
                           dropout_scale: jax.Array | float | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`logits`, plus the MoE routing statistics averaged over sparse layers ({} for a dense model).

    The encoder and decoder sow their summed statistics into 'intermediates' once per stack (after the layers,
    outside any scan), so this works with scanned layers too.
    """
    inputs = {k: batch[k] for k in _MODULE_INPUTS if k in batch}
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    if dropout_scale is not None:  # only then, so modules without the argument keep working
      inputs["dropout_scale"] = dropout_scale
    logits, state = self.module.apply({"params": params}, **inputs, enable_dropout=dropout_rng is not None,
                                      rngs=rngs, mutable=["intermediates"])
    return logits, moe.summarize_stats(moe.collect_stats(state.get("intermediates", {})))

  def loss_and_metrics(self, params, batch: Batch, *, dropout_rng: jax.Array | None = None,
                       dropout_scale: jax.Array | float | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Normalised loss for gradients, and summed metrics (divide by `weight_sum` to average across steps/hosts)."""
    logits_BxTxV, moe_means = self.logits_and_moe_stats(params, batch, dropout_rng=dropout_rng,
                                                        dropout_scale=dropout_scale)
    targets_BxT = batch["decoder_target_tokens"]
    weights_BxT = batch.get("decoder_loss_weights")
    if weights_BxT is None:
      weights_BxT = (targets_BxT > 0).astype(jnp.float32)
    weights_BxT = weights_BxT.astype(jnp.float32)
    token_loss_BxT, token_z_loss_BxT = losses.cross_entropy_with_z_loss(
        logits_BxTxV, targets_BxT, z_loss=self.z_loss, label_smoothing=self.label_smoothing)
    loss = jnp.sum(token_loss_BxT * weights_BxT) / losses.loss_normalizer(weights_BxT, self.loss_normalizing_factor)
    # "The target has the largest logit", from a max reduction: argmax's (value, index) reduction was XLA:CPU's
    # slowest kernel of the T5 v1.1 small step (63 ms of 3.6 s). A tie for the top counts as correct.
    target_logit_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    correct_BxT = (target_logit_BxT >= jnp.max(logits_BxTxV, axis=-1)).astype(jnp.float32)
    metrics = {
        "loss_sum": jnp.sum(token_loss_BxT * weights_BxT),
        "z_loss_sum": jnp.sum(token_z_loss_BxT * weights_BxT),
        "correct_sum": jnp.sum(correct_BxT * weights_BxT),
        "weight_sum": jnp.sum(weights_BxT),
    }
    if moe_means:  # MoE: weighted auxiliary losses join the loss; statistics are reported per layer, per step
      loss += moe.aux_loss(moe_means, self.module.config.moe)
      # Scaled by weight_sum so that `summarize`'s division gives a token-weighted mean over steps.
      metrics.update({f"moe_{k}_sum": v * metrics["weight_sum"] for k, v in moe_means.items()})
    return loss, metrics


def summarize(metric_sums: Mapping[str, Any]) -> dict[str, float]:
  """Per-token averages from the sums of `loss_and_metrics` (after summing over steps or hosts)."""
  weight = max(float(metric_sums["weight_sum"]), 1.0)
  return {
      "loss": float(metric_sums["loss_sum"]) / weight,
      "z_loss": float(metric_sums["z_loss_sum"]) / weight,
      "accuracy": float(metric_sums["correct_sum"]) / weight,
      # MoE routing statistics (moe_load_balancing_loss, moe_router_z_loss, moe_fraction_dropped, ...).
      **{k[:-len("_sum")]: float(v) / weight for k, v in metric_sums.items()
         if k.startswith("moe_") and k.endswith("_sum")},
  }
