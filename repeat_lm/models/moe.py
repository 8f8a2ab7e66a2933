"""Switch / top-k mixture-of-experts feed-forward layers: token-choice routing, dispatch, experts, statistics.

Shapes: B batch, L length, D emb_dim, G routing groups, S tokens per group, E experts, K experts chosen per token,
C expert capacity (slots per expert per group), F expert mlp_dim.

A sparse layer flattens its B x L tokens into G groups of S tokens; each group routes on its own. A router (float32,
no bias) scores every token against every expert; each token picks its K best experts; experts take tokens in
priority order (all first choices before any second choice; within a choice, token order or, with batch-prioritised
routing, most confident first) until their C slots are full. Tokens left without a slot skip the layer: the residual
connection around the FFN carries them unchanged. Expert outputs are scaled by the router probability (Switch: no
renormalisation over the K chosen).

Experts are sharded over the 'expert' mesh axis and groups over 'data' x 'expert'; the two sharding constraints around
the expert computation make XLA move tokens with an all-to-all. Two ways to move them inside a device, with identical
results: 'einsum' (one-hot dispatch / combine tensors [G, S, E, C]; cost grows with S) and 'gather' (slot -> token
indices; cost independent of S). See docs/performance-moe.md for which is faster where.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import partitioning as nn_partitioning

from repeat_lm import checks
from repeat_lm.models import cpu_layouts, layers

Array = jax.Array
param_with_axes = nn_partitioning.param_with_axes

DISPATCH_METHODS = ("einsum", "gather")
# Names of the per-layer statistics, summed over a stack's sparse layers; 'num_sparse_layers' turns sums into means.
STAT_NAMES = ("load_balancing_loss", "router_z_loss", "fraction_dropped", "fraction_left_behind", "router_confidence",
              "kept_router_confidence", "expert_usage_min", "expert_usage_max", "num_sparse_layers")
# flaxformer's router init: small normal weights, so routing starts near uniform.
router_init = nn.initializers.normal(stddev=2e-2)
# Experts accept the dense MlpBlock's activation names.
_ACTIVATIONS = layers._ACTIVATIONS  # pylint: disable=protected-access
# T5's kernel init per expert: fan_in is the contracted size, not E x it.
expert_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", batch_axis=(0,))


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  """Sparse feed-forward layers of a T5 (`T5Config.moe`); defaults are Switch-Base's (flaxformer switch_base.gin)."""
  num_experts: int = 128  # E
  expert_mlp_dim: int = 3072  # F of each expert
  expert_activations: tuple[str, ...] = ("relu",)  # as MlpBlock: ('gelu', 'linear') = gated GELU experts
  num_selected_experts: int = 1  # K: 1 = Switch, 2 = GShard / ST-MoE top-2
  train_capacity_factor: float = 1.25  # C = round(factor x S / E), at least min_expert_capacity
  eval_capacity_factor: float = 2.0  # used when dropout is off (evaluation, decoding)
  min_expert_capacity: int = 4
  group_size: int = 8192  # S, an upper bound: G is the smallest count >= tokens / group_size that fits the mesh
  jitter_noise: float = 0.0  # training only: router inputs scaled by U(1 - eps, 1 + eps) (Switch; T5X uses 0)
  batch_prioritized_routing: bool = False  # encoder only: in the decoder it would let later tokens outrank earlier
  # x mean over sparse layers of E x sum_e(fraction_e x mean_prob_e), within each routing group (as Switch)
  load_balancing_loss_weight: float = 0.01
  router_z_loss_weight: float = 0.0  # x mean over sparse layers of mean(logsumexp(router logits)^2); ST-MoE 1e-4
  sparse_every: int = 2  # every k-th FFN of each stack is sparse (1 = all); layers per stack must divide by k
  sparse_first: bool = False  # False: the last FFN of each k (flaxformer's MIXED layout); True: the first
  dispatch: str = "gather"  # 'gather' | 'einsum': same results; gather measured faster (docs/performance-moe.md)

  def __post_init__(self):
    object.__setattr__(self, "expert_activations", tuple(self.expert_activations))
    # Else a ZeroDivisionError (expert_mlp_dim 0: the experts' init) or a NoneType error (no activations) deep in init;
    # min_expert_capacity 0 lets a small factor x S / E round to 0 slots: an IndexError in the gather dispatch.
    sizes = {k: getattr(self, k) for k in ("num_experts", "expert_mlp_dim", "min_expert_capacity")}
    bad_sizes = {k: v for k, v in sizes.items() if not checks.is_count(v)}
    if bad_sizes:
      raise ValueError(f"MoeConfig sizes must be whole numbers of at least 1: {bad_sizes}.")
    check_activations("MoeConfig.expert_activations", self.expert_activations)
    # A gin string 'False' is truthy: sparse_first='False' made the first FFN of each k sparse, not the last.
    checks.check_bools(self, ("batch_prioritized_routing", "sparse_first"))
    # U(1 - eps, 1 + eps) must stay positive, or it flips router inputs' sign. A string ('0.01') failed the comparison
    # with a bare TypeError.
    if not checks.finite_number(self.jitter_noise) or not 0.0 <= self.jitter_noise < 1.0:
      raise ValueError(f"MoeConfig.jitter_noise={self.jitter_noise!r} must lie in [0, 1), a number (Switch: 0.01, "
                       "T5X: 0).")
    if self.dispatch not in DISPATCH_METHODS:
      raise ValueError(f"MoeConfig.dispatch={self.dispatch!r}; choose from {DISPATCH_METHODS}.")
    if not checks.is_count(self.num_selected_experts) or self.num_selected_experts > self.num_experts:
      raise ValueError(f"num_selected_experts={self.num_selected_experts!r} must be a whole number in [1, num_experts="
                       f"{self.num_experts}].")
    if not checks.is_count(self.sparse_every):
      raise ValueError(f"MoeConfig.sparse_every={self.sparse_every!r} must be >= 1, a whole number.")
    if not checks.is_count(self.group_size):
      raise ValueError(f"MoeConfig.group_size={self.group_size!r} must be >= 1, a whole number (tokens per routing "
                       "group, an upper bound).")
    # Finite too: NaN passed `<= 0` and the first training step failed in expert_capacity with a bare "cannot convert
    # float NaN to integer" (infinity: an OverflowError) that named no setting. Numbers only: a string failed in
    # math.isfinite with a bare TypeError, and True passed as a factor of 1.
    if not all(checks.finite_number(f) and f > 0 for f in (self.train_capacity_factor, self.eval_capacity_factor)):
      raise ValueError(f"MoeConfig capacity factors must be positive and finite, got train "
                       f"{self.train_capacity_factor!r}, eval {self.eval_capacity_factor!r} (for no dropped tokens, a "
                       "factor of num_experts gives every expert room for the whole group).")
    # Unchecked, True (meant as "on") weighted a loss 1.0, 100 x Switch's; a negative weight rewarded imbalance (or
    # growing router logits) and NaN made every loss NaN, all silently; a gin string failed at the first step.
    weights = {k: getattr(self, k) for k in ("load_balancing_loss_weight", "router_z_loss_weight")}
    bad_weights = {k: v for k, v in weights.items() if not checks.non_negative_number(v)}
    if bad_weights:
      raise ValueError(f"MoeConfig loss weights must be finite numbers >= 0: {bad_weights} (Switch: 0.01 load "
                       "balancing; ST-MoE: 1e-4 router z-loss; 0: off).")


def check_activations(setting: str, names: Sequence[str]) -> None:
  """At least one known activation name (MlpBlock's: several multiply), else ValueError naming `setting`."""
  unknown = [n for n in names if n not in _ACTIVATIONS]
  if not names or unknown:
    raise ValueError(f"{setting}={tuple(names)!r}: give one or more of {sorted(_ACTIVATIONS)}, e.g. ('gelu', "
                     "'linear') for gated GELU or ('relu',).")


def sparse_layer_flags(num_layers: int, cfg: MoeConfig | None) -> tuple[bool, ...]:
  """Which FFNs of a stack are sparse: one in every `sparse_every`, the first or the last of each run."""
  if cfg is None:
    return (False,) * num_layers
  if num_layers % cfg.sparse_every:
    raise ValueError(f"A stack of {num_layers} layers cannot hold one sparse FFN in every {cfg.sparse_every}; "
                     "choose MoeConfig.sparse_every dividing the number of layers.")
  slot = 0 if cfg.sparse_first else cfg.sparse_every - 1
  return tuple(i % cfg.sparse_every == slot for i in range(num_layers))


def num_groups(num_tokens: int, group_size: int, min_groups: int = 1) -> int:
  """Smallest multiple of `min_groups` that is >= num_tokens / group_size and divides num_tokens.

  `min_groups` is the number of devices the batch is split over, so every device holds whole groups.
  """
  if num_tokens % min_groups:
    raise ValueError(f"{num_tokens} tokens cannot be split evenly over {min_groups} batch shards.")
  multiple = max(1, math.ceil(math.ceil(num_tokens / group_size) / min_groups))
  while num_tokens % (multiple * min_groups):
    multiple += 1
  return multiple * min_groups


def expert_capacity(tokens_per_group: int, num_experts: int, capacity_factor: float, minimum: int) -> int:
  """round(factor x S / E), at least `minimum`; never more than S (an expert cannot get a token twice)."""
  return min(max(int(round(capacity_factor * tokens_per_group / num_experts)), minimum), tokens_per_group)


def _batch_shards() -> int:
  """Devices the 'batch' logical axis is split over under the current mesh and rules (1 outside a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return 1
  axes = nn.logical_to_mesh_axes(("batch",))[0]
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[a] for a in axes if a in mesh.shape)


class Routing(NamedTuple):
  expert_GxSxK: Array  # int32 chosen experts, best first
  position_GxSxK: Array  # int32 slot in the chosen expert's buffer (meaningful where kept)
  kept_GxSxK: Array  # bool: a real token that found a slot
  gate_GxSxK: Array  # float32 router probability of the choice, 0 where not kept
  stats: dict[str, Array]  # float32 scalars named as in STAT_NAMES


def route_tokens(logits_GxSxE: Array, valid_GxS: Array, *, num_selected: int, capacity: int,
                 batch_prioritized: bool = False) -> Routing:
  """Token-choice top-K routing with expert capacity, plus the layer's statistics (over real tokens only)."""
  logits_GxSxE = logits_GxSxE.astype(jnp.float32)
  groups, group_len, num_experts = logits_GxSxE.shape
  k = num_selected
  valid_GxS = valid_GxS.astype(bool)
  probs_GxSxE = jax.nn.softmax(logits_GxSxE, axis=-1)
  top_prob_GxSxK, expert_GxSxK = jax.lax.top_k(probs_GxSxE, k)

  # Slot = how many earlier assignments the expert already took. Assignments are ordered choice-major (every token's
  # first choice before any second choice), then by token: array order, or most confident first (BPR).
  choice_GxKxSxE = jax.nn.one_hot(jnp.swapaxes(expert_GxSxK, 1, 2), num_experts, dtype=jnp.int32)
  choice_GxKxSxE *= valid_GxS[:, None, :, None].astype(jnp.int32)  # padding takes no slots
  if batch_prioritized:
    order_GxS = jnp.argsort(-top_prob_GxSxK[..., 0], axis=-1, stable=True)
    choice_GxKxSxE = jnp.take_along_axis(choice_GxKxSxE, order_GxS[:, None, :, None], axis=2)
  taken_GxKxSxE = jnp.cumsum(choice_GxKxSxE.reshape(groups, k * group_len, num_experts), axis=1).reshape(
      choice_GxKxSxE.shape)
  position_GxKxS = jnp.sum((taken_GxKxSxE - 1) * choice_GxKxSxE, axis=-1)
  if batch_prioritized:
    position_GxKxS = jnp.take_along_axis(position_GxKxS, jnp.argsort(order_GxS, axis=-1)[:, None, :], axis=2)
  position_GxSxK = jnp.swapaxes(position_GxKxS, 1, 2)
  kept_GxSxK = valid_GxS[..., None] & (position_GxSxK < capacity)
  gate_GxSxK = jnp.where(kept_GxSxK, top_prob_GxSxK, 0.0)

  # Statistics over the real tokens of all groups, except the load-balancing loss: capacity binds per group, so
  # (as Switch / flaxformer) it is E x sum_e(fraction_e x mean_prob_e) within each group, then averaged over groups
  # (weighted by real tokens). Pooled over groups it reads 1 and has no gradient when each group sends all its
  # tokens to a different expert, which drops half of them at capacity factor 1.
  valid_f = valid_GxS.astype(jnp.float32)
  valid_G = jnp.sum(valid_f, axis=1)
  num_valid = jnp.maximum(jnp.sum(valid_G), 1.0)
  routed_GxE = jnp.einsum("gske,gs->ge", jax.nn.one_hot(expert_GxSxK, num_experts, dtype=jnp.float32), valid_f)
  prob_sum_GxE = jnp.einsum("gse,gs->ge", probs_GxSxE, valid_f)
  # Per group: E x sum_e(routed_e / n x prob_sum_e / n) (fractions sum to K); weighted by n / num_valid.
  balance_G = num_experts * jnp.sum(routed_GxE * prob_sum_GxE, axis=1) / jnp.maximum(valid_G, 1.0)
  routed_E = jnp.sum(routed_GxE, axis=0)
  log_z_GxS = jax.nn.logsumexp(logits_GxSxE, axis=-1)
  usage_E = routed_E * num_experts / (k * num_valid)  # 1 = perfectly balanced
  stats = {
      "load_balancing_loss": jnp.sum(balance_G) / num_valid,
      "router_z_loss": jnp.sum(jnp.square(log_z_GxS) * valid_f) / num_valid,
      "fraction_dropped": 1.0 - jnp.sum(kept_GxSxK.astype(jnp.float32)) / (k * num_valid),
      # flaxformer's two (what T5X logs as fraction_tokens_left_behind / router_confidence): the share of tokens no
      # expert processed, and the mean gate of the assignments kept. Both equal the two above only for top-1 with
      # nothing dropped.
      "fraction_left_behind": 1.0 - jnp.sum(jnp.any(kept_GxSxK, axis=-1).astype(jnp.float32)) / num_valid,
      "router_confidence": jnp.sum(top_prob_GxSxK[..., 0] * valid_f) / num_valid,
      "kept_router_confidence": jnp.sum(gate_GxSxK) / jnp.maximum(jnp.sum(kept_GxSxK.astype(jnp.float32)), 1.0),
      "expert_usage_min": jnp.min(usage_E),
      "expert_usage_max": jnp.max(usage_E),
      "num_sparse_layers": jnp.ones((), jnp.float32),
  }
  return Routing(expert_GxSxK, position_GxSxK, kept_GxSxK, gate_GxSxK, stats)


def dispatch_einsum(x_GxSxD: Array, r: Routing, num_experts: int, capacity: int) -> tuple[Array, Array]:
  """(expert inputs [G, E, C, D], combine tensor [G, S, E, C]) through one-hot einsums."""
  dtype = x_GxSxD.dtype
  expert_GxSxKxE = jax.nn.one_hot(r.expert_GxSxK, num_experts, dtype=dtype) * r.kept_GxSxK[..., None].astype(dtype)
  slot_GxSxKxC = jax.nn.one_hot(r.position_GxSxK, capacity, dtype=dtype)  # positions >= C give zero rows
  dispatch_GxSxExC = jnp.einsum("gske,gskc->gsec", expert_GxSxKxE, slot_GxSxKxC)
  combine_GxSxExC = jnp.einsum("gske,gskc->gsec", expert_GxSxKxE * r.gate_GxSxK[..., None].astype(dtype),
                               slot_GxSxKxC)
  return jnp.einsum("gsec,gsd->gecd", dispatch_GxSxExC, x_GxSxD), combine_GxSxExC


def combine_einsum(out_GxExCxD: Array, combine_GxSxExC: Array) -> Array:
  return jnp.einsum("gsec,gecd->gsd", combine_GxSxExC, out_GxExCxD)


def _slots(r: Routing, num_experts: int, capacity: int) -> Array:
  """Flat slot e * C + c of every assignment; dropped ones point at the spare slot E * C."""
  return jnp.where(r.kept_GxSxK, r.expert_GxSxK * capacity + r.position_GxSxK, num_experts * capacity)


def dispatch_gather(x_GxSxD: Array, r: Routing, num_experts: int, capacity: int) -> Array:
  """Expert inputs [G, E, C, D] by gathering, for every slot, the token that holds it (empty slots read zeros)."""
  groups, group_len, d = x_GxSxD.shape
  slots = num_experts * capacity
  slot_GxSK = _slots(r, num_experts, capacity).reshape(groups, -1)
  token_GxSK = jnp.broadcast_to(jnp.arange(group_len)[:, None], r.kept_GxSxK.shape[1:]).reshape(-1)
  # Kept assignments own distinct slots; dropped ones all write the spare slot, which is cut off.
  token_for_slot_GxEC = jax.vmap(lambda s: jnp.full((slots + 1,), group_len, jnp.int32).at[s].set(token_GxSK))(
      slot_GxSK)[:, :slots]
  x_padded = jnp.concatenate([x_GxSxD, jnp.zeros((groups, 1, d), x_GxSxD.dtype)], axis=1)  # row S reads zeros
  inputs_GxECxD = jnp.take_along_axis(x_padded, token_for_slot_GxEC[..., None], axis=1)
  return inputs_GxECxD.reshape(groups, num_experts, capacity, d)


def combine_gather(out_GxExCxD: Array, r: Routing, num_experts: int, capacity: int) -> Array:
  groups, _, _, d = out_GxExCxD.shape
  group_len, k = r.kept_GxSxK.shape[1:]
  out_padded = jnp.concatenate([out_GxExCxD.reshape(groups, -1, d), jnp.zeros((groups, 1, d), out_GxExCxD.dtype)],
                               axis=1)
  slot_GxSK = _slots(r, num_experts, capacity).reshape(groups, -1)
  out_GxSxKxD = jnp.take_along_axis(out_padded, slot_GxSK[..., None], axis=1).reshape(groups, group_len, k, d)
  return jnp.einsum("gskd,gsk->gsd", out_GxSxKxD, r.gate_GxSxK.astype(out_GxSxKxD.dtype))


class Experts(nn.Module):
  """E independent feed-forward blocks applied to their own token buffers [E, G, C, D]."""
  num_experts: int
  mlp_dim: int
  activations: Sequence[str] = ("relu",)
  dtype: layers.DType = jnp.float32
  dropout_rate: float = 0.0
  dropout_broadcast_length: bool = False  # one draw for every capacity slot of an expert's group

  @nn.compact
  def __call__(self, x_ExGxCxD: Array, deterministic: bool, dropout_scale: Array | float = 1.0) -> Array:
    e, d, f = self.num_experts, x_ExGxCxD.shape[-1], self.mlp_dim
    # Per expert: [E, G, C, in] @ [E, in, out]; on CPU with the kernel gradient in YNNPACK's form (cpu_layouts.py).
    matmul = (cpu_layouts.matmul if cpu_layouts.explicit_transposes()
              else lambda x, k: jnp.einsum("egci,eio->egco", x, k))
    hidden_axes = ("expert", "expert_replicas", "length", "expert_mlp")
    projections = []
    for i, name in enumerate(self.activations):
      if name not in _ACTIVATIONS:
        raise ValueError(f"Unknown expert activation {name!r}; choose from {sorted(_ACTIVATIONS)}.")
      kernel = param_with_axes("wi" if len(self.activations) == 1 else f"wi_{i}", expert_init, (e, d, f),
                               jnp.float32, axes=("expert", "embed", "expert_mlp"))
      projections.append(nn.with_logical_constraint(matmul(x_ExGxCxD, jnp.asarray(kernel, self.dtype)), hidden_axes))
    hidden = layers.activate(self.activations, projections)
    hidden = layers.dropout(hidden, self.dropout_rate, deterministic, dropout_scale, self.dropout_broadcast_length)
    wo = param_with_axes("wo", expert_init, (e, f, d), jnp.float32, axes=("expert", "expert_mlp", "embed"))
    return matmul(hidden, jnp.asarray(wo, self.dtype))


class MoeBlock(nn.Module):
  """Drop-in for MlpBlock: x [B, L, D] -> (y [B, L, D], routing statistics). Tokens with valid=False (padding)
  take no capacity, get zeros, and are left out of the statistics."""
  config: MoeConfig
  dtype: layers.DType = jnp.float32
  dropout_rate: float = 0.0  # expert dropout: T5Config.dropout_rate_for('expert')
  batch_prioritized: bool = False  # the encoder passes MoeConfig.batch_prioritized_routing, the decoder False
  dropout_broadcast_length: bool = False

  @nn.compact
  def __call__(self, x_BxLxD: Array, valid_BxL: Array | None, deterministic: bool,
               dropout_scale: Array | float = 1.0) -> tuple[Array, dict]:
    cfg = self.config
    batch, length, d = x_BxLxD.shape
    e = cfg.num_experts
    groups = num_groups(batch * length, cfg.group_size, _batch_shards())
    group_len = batch * length // groups
    factor = cfg.eval_capacity_factor if deterministic else cfg.train_capacity_factor
    capacity = expert_capacity(group_len, e, factor, cfg.min_expert_capacity)
    token_axes, expert_major_axes = ("batch", "unmodeled", "length", "embed"), ("expert", "expert_replicas",
                                                                                 "length", "embed")

    x_GxSxD = nn.with_logical_constraint(jnp.asarray(x_BxLxD, self.dtype).reshape(groups, group_len, d),
                                         ("batch", "length", "embed"))
    valid_GxS = (jnp.ones((groups, group_len), bool) if valid_BxL is None
                 else valid_BxL.reshape(groups, group_len))
    router_in_GxSxD = x_GxSxD.astype(jnp.float32)  # the router runs in float32 (Switch: selective precision)
    if cfg.jitter_noise > 0 and not deterministic:
      router_in_GxSxD *= jax.random.uniform(self.make_rng("dropout"), router_in_GxSxD.shape, jnp.float32,
                                            1.0 - cfg.jitter_noise, 1.0 + cfg.jitter_noise)
    router_kernel = param_with_axes("router", router_init, (d, e), jnp.float32, axes=("embed", "unmodeled"))
    logits_GxSxE = jnp.einsum("gsd,de->gse", router_in_GxSxD, router_kernel)
    r = route_tokens(logits_GxSxE, valid_GxS, num_selected=cfg.num_selected_experts, capacity=capacity,
                     batch_prioritized=self.batch_prioritized)

    if cfg.dispatch == "einsum":
      inputs_GxExCxD, combine_GxSxExC = dispatch_einsum(x_GxSxD, r, e, capacity)
    else:
      inputs_GxExCxD = dispatch_gather(x_GxSxD, r, e, capacity)
    # Groups sharded over data x expert -> experts over 'expert', groups over 'data': an all-to-all, and back.
    inputs_GxExCxD = nn.with_logical_constraint(inputs_GxExCxD, token_axes)
    inputs_ExGxCxD = nn.with_logical_constraint(jnp.swapaxes(inputs_GxExCxD, 0, 1), expert_major_axes)
    out_ExGxCxD = Experts(e, cfg.expert_mlp_dim, cfg.expert_activations, self.dtype, self.dropout_rate,
                          self.dropout_broadcast_length, name="experts")(inputs_ExGxCxD, deterministic,
                                                                        dropout_scale)
    out_ExGxCxD = nn.with_logical_constraint(out_ExGxCxD, expert_major_axes)
    out_GxExCxD = nn.with_logical_constraint(jnp.swapaxes(out_ExGxCxD, 0, 1), token_axes)

    if cfg.dispatch == "einsum":
      y_GxSxD = combine_einsum(out_GxExCxD, combine_GxSxExC)
    else:
      y_GxSxD = combine_gather(out_GxExCxD, r, e, capacity)
    y_BxLxD = nn.with_logical_constraint(y_GxSxD.reshape(batch, length, d), ("batch", "length", "embed"))
    return y_BxLxD, r.stats


def add_stats(a: dict | None, b: dict | None) -> dict | None:
  """Sum two statistics dicts (None = no sparse layer)."""
  if a is None or b is None:
    return b if a is None else a
  return jax.tree.map(jnp.add, a, b)


SOW_NAME = "moe_stats"  # what Encoder / Decoder sow into 'intermediates': a stack's summed statistics
# T5X's MoeEncoderDecoderModel (t5x/contrib/moe/models.py) averages every 'intermediates' leaf with these names and
# adds aux_loss_factor x auxiliary_loss + router_z_loss_factor x router_z_loss to its loss: T5X name -> ours.
T5X_STAT_NAMES = {"auxiliary_loss": "load_balancing_loss", "router_z_loss": "router_z_loss",
                  "fraction_tokens_left_behind": "fraction_left_behind", "router_confidence": "kept_router_confidence",
                  "expert_usage": "expert_usage_min"}


def sow_stats(module: nn.Module, stats: dict) -> None:
  """Sow a stack's summed statistics (for EncoderDecoderModel) and their per-layer means under T5X's names (for
  t5x.contrib.moe's model class); call once per stack, outside any scan."""
  module.sow("intermediates", SOW_NAME, stats)
  means = summarize_stats(stats)
  for t5x_name, name in T5X_STAT_NAMES.items():
    module.sow("intermediates", t5x_name, means[name])


def collect_stats(intermediates: Any) -> dict | None:
  """Sum every `SOW_NAME` entry of an 'intermediates' collection (each a tuple of sown dicts)."""
  total = None
  if isinstance(intermediates, Mapping):
    for key, value in intermediates.items():
      if key == SOW_NAME:
        for sown in value:
          total = add_stats(total, dict(sown))
      else:
        total = add_stats(total, collect_stats(value))
  return total


def summarize_stats(stats: dict | None) -> dict[str, Array]:
  """Per-layer means of summed statistics (empty for a dense model)."""
  if not stats:
    return {}
  count = jnp.maximum(stats["num_sparse_layers"], 1.0)
  return {k: v / count for k, v in stats.items() if k != "num_sparse_layers"}


def aux_loss(means: dict[str, Array], cfg: MoeConfig | None) -> Array:
  """Weighted auxiliary losses added to the training loss: T5X's convention, weight x mean over sparse layers."""
  if cfg is None or not means:
    return jnp.zeros((), jnp.float32)
  return (cfg.load_balancing_loss_weight * means["load_balancing_loss"] +
          cfg.router_z_loss_weight * means["router_z_loss"])
