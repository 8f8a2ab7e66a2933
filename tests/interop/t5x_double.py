"""A test double of T5X's calling conventions, so repeat_lm's contract with T5X is checked without T5X installed.

Written from T5X's documented behaviour (t5x/models.py, t5x/contrib/moe/models.py, t5x/decoding.py,
t5x/adafactor.py, t5x/partitioning.py), not copied from it. What it holds a module to:
  - init: `module.init(rng, ones(enc), ones(dec), ones(dec), decode=False, enable_dropout=False)` (float32 tokens
    unless input types are given: t5x/eval.py gives none) must return a 'params_axes' collection (T5X refuses a model
    without it) whose names T5X's partitioning and Adafactor factor rules know;
  - training: `module.apply({'params'}, <the batch keys of seqio.EncDecFeatureConverter>, enable_dropout=...,
    rngs={'dropout'}, mutable=...)`; the MoE model class also asks for mutable=['intermediates'] and averages every
    leaf named as in MOE_METRICS into its loss;
  - decoding: the cache is created by `module.apply({'params'}, ones(inputs), ones(targets), ones(targets),
    decode=True, enable_dropout=False, mutable=['cache'])`; encoded inputs come from `method=module.encode`; every
    step calls `method=module.decode` with [B, 1] tokens, decode=True, max_decode_length and mutable=['cache']; beam
    search repeats every example in place ([el0, el0, el1, el1]) in inputs and cache, on cache axis
    `1 if module.scan_layers else 0`, leaving `cache_index` leaves alone.
It also provides stand-ins for the T5X names a gin file binds (`install_stand_ins`).
"""

from __future__ import annotations

import functools
import re
import sys
import types
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import unfreeze

ENC_DEC_FEATURES = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")
PACKING_FEATURES = ("encoder_segment_ids", "decoder_segment_ids", "encoder_positions", "decoder_positions")
# Logical axis names T5X's standard partitioning rules map (t5x.partitioning.standard_logical_axis_rules), and the
# names its MoE partitioner adds.
STANDARD_AXES = frozenset({"batch", "vocab", "embed", "mlp", "heads", "kv", "joined_kv", "relpos_buckets",
                           "abspos_buckets", "length", "layers", "stack", "mlp_activations"})
MOE_AXES = STANDARD_AXES | {"expert", "expert_mlp", "expert_replicas", "unmodeled"}
# Adafactor's factor rules (t5x.adafactor.standard_logical_factor_rules / contrib.moe.adafactor_utils).
FACTOR_RULES = {"vocab": "column", "embed": "row", "mlp": "column", "heads": "column", "kv": "column",
                "joined_kv": "column", "relpos_buckets": None, "layers": "batch", "stack": "batch",
                "mlp_activations": "column", "layer_norm_scale": None}
MOE_FACTOR_RULES = {**FACTOR_RULES, "expert": "batch", "expert_mlp": "column", "unmodeled": None}
MOE_METRICS = ("auxiliary_loss", "router_z_loss", "fraction_tokens_left_behind", "expert_usage", "router_confidence")


def logical_axes(variables: Mapping[str, Any]) -> dict[tuple[str, ...], tuple[str, ...]]:
  """{param path: logical axis names} from the 'params_axes' collection (param_with_axes stores '<name>_axes')."""
  flat = traverse_util.flatten_dict(unfreeze(variables["params_axes"]))
  return {k[:-1] + (k[-1][:-len("_axes")],): tuple(v.names) for k, v in flat.items()}


def flat_batch_beam_expand(x: jax.Array, beam_size: int, offset: int = 0) -> jax.Array:
  """[.., B, ..] -> [.., B * beam, ..], each example repeated in place (T5X's layout for beam search)."""
  return jnp.repeat(x, beam_size, axis=offset)


def cache_map(fn, cache: Any) -> Any:
  """Apply fn to every cache leaf except the `cache_index` counters (T5X's decoding.cache_map)."""
  flat = traverse_util.flatten_dict(unfreeze(cache))
  return traverse_util.unflatten_dict({k: v if k[-1] == "cache_index" else fn(v) for k, v in flat.items()})


class EncoderDecoderModel:
  """t5x.models.EncoderDecoderModel's contract with its module (constructor arguments as in T5X)."""
  axes = STANDARD_AXES
  factor_rules = FACTOR_RULES

  def __init__(self, module, input_vocabulary=None, output_vocabulary=None, optimizer_def=None, decode_fn=None,
               feature_converter_cls=None, label_smoothing=0.0, z_loss=0.0, loss_normalizing_factor=None):
    self.module = module
    self.input_vocabulary, self.output_vocabulary = input_vocabulary, output_vocabulary
    self.optimizer_def, self.decode_fn = optimizer_def, decode_fn
    self.label_smoothing, self.z_loss, self.loss_normalizing_factor = label_smoothing, z_loss, loss_normalizing_factor

  def get_initial_variables(self, rng: jax.Array, input_shapes: Mapping[str, tuple[int, ...]],
                            input_types: Mapping[str, Any] | None = None):
    # As T5X: token arrays are float32 unless `input_types` says otherwise (t5x/eval.py passes no input_types), so
    # the module must cast tokens itself; packing features are int32 ones when their shapes are given.
    input_types = input_types or {}
    enc = jnp.ones(input_shapes["encoder_input_tokens"], input_types.get("encoder_input_tokens", jnp.float32))
    dec = jnp.ones(input_shapes["decoder_input_tokens"], input_types.get("decoder_input_tokens", jnp.float32))
    packing = {k: jnp.ones(input_shapes[k], input_types.get(k, jnp.int32)) for k in PACKING_FEATURES
               if k in input_shapes}
    variables = jax.jit(lambda r: self.module.init(r, enc, dec, dec, **packing, decode=False,
                                                   enable_dropout=False))(rng)
    if "params_axes" not in variables:
      raise ValueError("T5X needs a 'params_axes' collection: create parameters with param_with_axes.")
    params = traverse_util.flatten_dict(unfreeze(variables["params"]))
    axes = logical_axes(variables)
    if set(params) != set(axes):
      raise ValueError(f"Parameters without logical axes: {sorted(set(params) ^ set(axes))[:5]}")
    for path, names in axes.items():
      if len(names) != params[path].ndim:
        raise ValueError(f"{path}: {len(names)} axis names for a {params[path].ndim}-D parameter.")
      unknown = set(names) - self.axes
      if unknown:
        raise ValueError(f"{path}: logical axes {sorted(unknown)} are not in T5X's partitioning rules.")
      unfactorable = set(names) - set(self.factor_rules)
      if unfactorable:
        raise ValueError(f"{path}: logical axes {sorted(unfactorable)} have no Adafactor factor rule.")
    return variables

  def _compute_logits(self, params, batch, dropout_rng=None, mutable=False):
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    return self.module.apply(
        {"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
        batch["decoder_target_tokens"], encoder_segment_ids=batch.get("encoder_segment_ids"),
        decoder_segment_ids=batch.get("decoder_segment_ids"), encoder_positions=batch.get("encoder_positions"),
        decoder_positions=batch.get("decoder_positions"), decode=False, enable_dropout=rngs is not None, rngs=rngs,
        mutable=mutable)

  def _cross_entropy(self, logits, batch):
    targets = batch["decoder_target_tokens"]
    weights = batch.get("decoder_loss_weights", (targets > 0).astype(jnp.float32))
    log_z = jax.nn.logsumexp(logits, axis=-1)
    token_loss = log_z - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] + self.z_loss * log_z ** 2
    return jnp.sum(token_loss * weights) / jnp.maximum(jnp.sum(weights), 1.0)

  def loss_fn(self, params, batch, dropout_rng):
    return jax.jit(self._loss)(params, batch, dropout_rng)

  def _loss(self, params, batch, dropout_rng):
    logits = self._compute_logits(params, batch, dropout_rng)
    loss = self._cross_entropy(logits, batch)
    return loss, {"loss": loss}

  @functools.partial(jax.jit, static_argnums=0)
  def score_batch(self, params, batch):
    """Sum of target log-probabilities per sequence."""
    logits = self._compute_logits(params, batch)
    log_p = jnp.take_along_axis(jax.nn.log_softmax(logits), batch["decoder_target_tokens"][..., None], -1)[..., 0]
    return jnp.sum(log_p * (batch["decoder_target_tokens"] > 0), axis=-1)

  def predict_batch(self, params, batch, num_decodes: int = 1, eos_id: int = 1):
    """Greedy decoding through T5X's cache plumbing with `num_decodes` in-place copies per example (the layout beam
    search uses); returns the first copy's tokens [B, L]."""
    inputs = jnp.asarray(batch["encoder_input_tokens"])
    target_shape = batch["decoder_input_tokens"].shape
    offset = 1 if getattr(self.module, "scan_layers", False) else 0

    @jax.jit
    def prepare(params, inputs):
      _, variables_with_cache = self.module.apply(
          {"params": params}, jnp.ones(inputs.shape, inputs.dtype), jnp.ones(target_shape, jnp.int32),
          jnp.ones(target_shape, jnp.int32), decode=True, enable_dropout=False, mutable=["cache"])
      cache = cache_map(lambda x: flat_batch_beam_expand(x, num_decodes, offset), variables_with_cache["cache"])
      encoded = self.module.apply({"params": params}, inputs, enable_dropout=False, method=self.module.encode)
      return cache, flat_batch_beam_expand(encoded, num_decodes)

    cache, encoded = prepare(params, inputs)
    raw_inputs = flat_batch_beam_expand(inputs, num_decodes)

    @jax.jit
    def tokens_to_logits(token_Bx1, cache):
      logits, new_vars = self.module.apply(
          {"params": params, "cache": cache}, encoded, raw_inputs, token_Bx1, token_Bx1, enable_dropout=False,
          decode=True, max_decode_length=target_shape[1], mutable=["cache"], method=self.module.decode)
      return logits[:, 0], new_vars["cache"]

    token = jnp.zeros((raw_inputs.shape[0], 1), jnp.int32)
    done = jnp.zeros((raw_inputs.shape[0],), bool)
    out = []
    for _ in range(target_shape[1]):
      logits, cache = tokens_to_logits(token, cache)
      nxt = jnp.where(done, 0, jnp.argmax(logits, -1))
      out.append(nxt)
      done |= nxt == eos_id
      token = nxt[:, None].astype(jnp.int32)
    return np.asarray(jnp.stack(out, axis=1))[::num_decodes]


class MoeEncoderDecoderModel(EncoderDecoderModel):
  """t5x.contrib.moe.models.MoeEncoderDecoderModel: the loss adds the auxiliary losses the module sows."""
  axes = MOE_AXES
  factor_rules = MOE_FACTOR_RULES

  def __init__(self, module, input_vocabulary=None, output_vocabulary=None, optimizer_def=None, decode_fn=None,
               feature_converter_cls=None, label_smoothing=0.0, z_loss=0.0, loss_normalizing_factor=None,
               aux_loss_factor=0.0, router_z_loss_factor=0.0):
    super().__init__(module, input_vocabulary, output_vocabulary, optimizer_def, decode_fn, feature_converter_cls,
                     label_smoothing, z_loss, loss_normalizing_factor)
    self.aux_loss_factor, self.router_z_loss_factor = aux_loss_factor, router_z_loss_factor

  def diversity_metrics(self, state) -> dict[str, jax.Array]:
    flat = traverse_util.flatten_dict(unfreeze(state))
    out = {}
    for metric in MOE_METRICS:
      values = [jnp.asarray(v, jnp.float32) for k, v in flat.items() if k[-1] == metric]
      if not values:
        raise ValueError(f"Unable to find expert metric: {metric}. Check that MoE metrics and losses are sown.")
      out[metric] = sum(values) / len(values)
    return out

  def _loss(self, params, batch, dropout_rng):
    logits, state = self._compute_logits(params, batch, dropout_rng, mutable=["intermediates"])
    metrics = self.diversity_metrics(state)
    loss = (self._cross_entropy(logits, batch) + self.aux_loss_factor * metrics["auxiliary_loss"].mean() +
            self.router_z_loss_factor * metrics["router_z_loss"].mean())
    return loss, {"loss": loss, **{f"experts/{k}": v.mean() for k, v in metrics.items()}}


# ---- stand-ins for the T5X names a gin file binds ----

class Adafactor:
  def __init__(self, learning_rate=None, decay_rate=0.8, step_offset=0, multiply_by_parameter_scale=True,
               clipping_threshold=1.0, logical_factor_rules=None, **kwargs):
    self.decay_rate, self.step_offset, self.logical_factor_rules = decay_rate, step_offset, logical_factor_rules


def standard_logical_factor_rules():
  return dict(FACTOR_RULES)


def moe_logical_factor_rules():
  return dict(MOE_FACTOR_RULES)


class PjitPartitioner:
  def __init__(self, num_partitions=None, model_parallel_submesh=None, params_on_devices=True,
               logical_axis_rules=None, **kwargs):
    self.logical_axis_rules = logical_axis_rules


class MoePjitPartitioner(PjitPartitioner):
  def __init__(self, num_expert_partitions=None, num_partitions=None, model_parallel_submesh=None,
               params_on_devices=True, logical_axis_rules=None, state_filter_fn=None, **kwargs):
    super().__init__(num_partitions, model_parallel_submesh, params_on_devices, logical_axis_rules)
    # Which optimizer-state paths ('encoder/.../wi/v_row') get 'expert' put before their logical axes; None: T5X's
    # default for a factored Adafactor, DEFAULT_EXPERT_STATE_PREFIX.
    self.state_filter_fn = state_filter_fn


# t5x/contrib/moe/partitioning.py's filter for a factored Adafactor's moments, written for flaxformer's expert names.
DEFAULT_EXPERT_STATE_PREFIX = r".*expert.*/kernel/v_.*"


def match_fn(prefix):
  """t5x.contrib.moe.training_utils.match_fn: true for names the regex matches from their start."""
  return lambda name: bool(prefix) and re.match(prefix, name) is not None


def standard_logical_axis_rules(activation_partitioning_dims=1, parameter_partitioning_dims=1,
                                additional_rules=None):
  return [(name, None) for name in sorted(STANDARD_AXES)] + list(additional_rules or [])


def moe_standard_logical_axis_rules(activation_partitioning_dims=1, parameter_partitioning_dims=1,
                                    additional_rules=None):
  return [(name, None) for name in sorted(MOE_AXES)] + list(additional_rules or [])


def install_stand_ins(monkeypatch) -> None:
  """Register fake `t5x`, `t5x.models`, `t5x.adafactor`, `t5x.partitioning` and `t5x.contrib.moe.*` modules."""
  def module(name, **attrs):
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    monkeypatch.setitem(sys.modules, name, m)
    return m

  t5x = module("t5x")
  t5x.models = module("t5x.models", EncoderDecoderModel=EncoderDecoderModel)
  t5x.adafactor = module("t5x.adafactor", Adafactor=Adafactor,
                         standard_logical_factor_rules=standard_logical_factor_rules)
  t5x.partitioning = module("t5x.partitioning", PjitPartitioner=PjitPartitioner,
                            standard_logical_axis_rules=standard_logical_axis_rules)
  t5x.contrib = module("t5x.contrib")
  t5x.contrib.moe = module("t5x.contrib.moe")
  t5x.contrib.moe.models = module("t5x.contrib.moe.models", MoeEncoderDecoderModel=MoeEncoderDecoderModel)
  t5x.contrib.moe.adafactor_utils = module("t5x.contrib.moe.adafactor_utils",
                                           logical_factor_rules=moe_logical_factor_rules)
  t5x.contrib.moe.training_utils = module("t5x.contrib.moe.training_utils", match_fn=match_fn)
  t5x.contrib.moe.partitioning = module("t5x.contrib.moe.partitioning", MoePjitPartitioner=MoePjitPartitioner,
                                        standard_logical_axis_rules=moe_standard_logical_axis_rules)
