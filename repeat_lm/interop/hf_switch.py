"""repeat_lm MoE models <-> Hugging Face `SwitchTransformersForConditionalGeneration`, both ways.

Hugging Face's Switch Transformer is narrower than repeat_lm's MoE, so only some layouts map (else ValueError says
which condition fails, on export and on import alike):
  - top-1 routing (num_selected_experts = 1), router without bias in float32 (repeat_lm's always is);
  - one non-gated activation shared by dense FFNs and experts, and expert_mlp_dim == mlp_dim (HF has one d_ff);
  - sparse FFNs where HF puts them: layer i of a stack is sparse iff i % step == 1 (step = layers // sparse layers),
    i.e. every FFN (sparse_every = 1) or every odd one (sparse_every = 2, sparse_first = False; Switch's layout),
    in both stacks (repeat_lm's MoeConfig places sparse FFNs alike in the encoder and the decoder).
Parameter sharing exports by copying the shared weights into every layer that uses them.

Tensor names, beyond T5's (see hf.py); sparse layer i of the encoder (the decoder's FFN sits at layer.2):
  encoder/layers_i/mlp/router [D, E]              encoder.block.i.layer.1.mlp.router.classifier.weight [E, D]
  encoder/layers_i/mlp/experts/wi [E, D, F]       encoder.block.i.layer.1.mlp.experts.expert_<e>.wi.weight [F, D]
  encoder/layers_i/mlp/experts/wo [E, F, D]       encoder.block.i.layer.1.mlp.experts.expert_<e>.wo.weight [D, F]
  dense layers: encoder/layers_i/mlp/{wi,wo}      encoder.block.i.layer.1.mlp.{wi,wo}.weight
Capacity differs in kind: HF gives each expert `expert_capacity` tokens per sequence, repeat_lm a capacity per routing
group (capacity factor x group tokens / experts, at least min_expert_capacity). The export sets a capacity no sequence
reaches, so HF drops no token; the import sets min_expert_capacity = expert_capacity, so repeat_lm never gives an
expert fewer slots per group than HF gives it per sequence. Logits agree wherever neither side drops a token.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from repeat_lm.interop import hf, layout
from repeat_lm.models import moe as moe_lib
from repeat_lm.models import t5

log = logging.getLogger(__name__)

NO_DROP_CAPACITY = 1 << 16  # tokens per expert per sequence: more than any sequence has
# SwitchTransformersConfig's defaults, for config.json files that leave a field out.
_HF_DEFAULTS = {"num_sparse_encoder_layers": 3, "num_sparse_decoder_layers": 3, "num_experts": 8,
                "expert_capacity": 64, "router_bias": False, "router_jitter_noise": 0.01, "router_dtype": "float32",
                "router_z_loss_coef": 0.001, "router_aux_loss_coef": 0.001, "dense_act_fn": "relu"}


def _hf_sparse_flags(num_layers: int, num_sparse: int) -> tuple[bool, ...]:
  """Which layers transformers' SwitchTransformersStack makes sparse."""
  step = num_layers // num_sparse if num_sparse > 0 else num_layers
  return tuple((i % step == 1 or step == 1) if step > 0 else False for i in range(num_layers))


def _our_flags(config: t5.T5Config) -> dict[str, tuple[bool, ...]]:
  return {"encoder": moe_lib.sparse_layer_flags(config.num_encoder_layers, config.moe),
          "decoder": moe_lib.sparse_layer_flags(config.num_decoder_layers, config.moe)}


def check_switch_layout(config: t5.T5Config, doing: str = "be exported as") -> None:
  """Raise ValueError naming every reason the MoE layout has no SwitchTransformers equivalent."""
  m = config.moe
  if m is None:
    raise ValueError("A dense T5 exports as T5ForConditionalGeneration, not SwitchTransformers.")
  reasons = []
  if m.num_selected_experts != 1:
    reasons.append(f"top-{m.num_selected_experts} routing (Hugging Face's Switch router is top-1 only)")
  if len(config.mlp_activations) != 1 or tuple(m.expert_activations) != tuple(config.mlp_activations):
    reasons.append(f"dense FFN activations {config.mlp_activations} and expert activations {m.expert_activations} "
                   "(Hugging Face's Switch uses one non-gated activation for both)")
  elif config.mlp_activations[0] not in ("relu", "gelu", "linear"):
    reasons.append(f"activation {config.mlp_activations[0]!r}")
  if m.expert_mlp_dim != config.mlp_dim:
    reasons.append(f"expert_mlp_dim {m.expert_mlp_dim} != mlp_dim {config.mlp_dim} (Hugging Face has one d_ff)")
  for stack, ours in _our_flags(config).items():
    theirs = _hf_sparse_flags(len(ours), sum(ours))
    if ours != theirs:
      reasons.append(f"{stack} sparse layers {[i for i, s in enumerate(ours) if s]} where Hugging Face would put them "
                     f"at {[i for i, s in enumerate(theirs) if s]} (use sparse_every=1, or 2 with sparse_first=False)")
  if reasons:
    raise ValueError(f"This MoE model cannot {doing} SwitchTransformersForConditionalGeneration: "
                     + "; ".join(reasons) + ".")


# ---- names ----

def switch_name_pairs(config: t5.T5Config) -> list[tuple[str, str, bool]]:
  """(Hugging Face name, repeat_lm path, transpose?) of every tensor except the experts' (see expert_prefixes)."""
  flags = _our_flags(config)

  def mlp_pairs(stack, i, hf_prefix, rl_prefix):
    if flags[stack][i]:
      return [(f"{hf_prefix}.mlp.router.classifier.weight", f"{rl_prefix}/mlp/router", True)]
    return [(f"{hf_prefix}.mlp.{n}.weight", f"{rl_prefix}/mlp/{n}/kernel", True) for n in ("wi", "wo")]

  return hf.name_pairs(config, mlp_pairs)


def expert_prefixes(config: t5.T5Config) -> list[tuple[str, str]]:
  """(Hugging Face module, repeat_lm path) of every sparse layer's experts, per-layer layout."""
  out = []
  for stack, flags in _our_flags(config).items():
    ff = 1 if stack == "encoder" else 2  # the decoder's FFN follows self- and cross-attention
    out += [(f"{stack}.block.{i}.layer.{ff}.mlp.experts", f"{stack}/layers_{i}/mlp/experts")
            for i, sparse in enumerate(flags) if sparse]
  return out


# ---- export ----

def switch_config_dict(config: t5.T5Config, expert_capacity: int = NO_DROP_CAPACITY) -> dict[str, Any]:
  check_switch_layout(config)
  transformers = hf.import_transformers()
  m = config.moe
  num_sparse = {stack: sum(flags) for stack, flags in _our_flags(config).items()}
  hf_cfg = transformers.SwitchTransformersConfig(
      vocab_size=config.vocab_size, d_model=config.emb_dim, d_kv=config.head_dim, d_ff=config.mlp_dim,
      expert_capacity=expert_capacity, num_layers=config.num_encoder_layers,
      num_sparse_encoder_layers=num_sparse["encoder"], num_decoder_layers=config.num_decoder_layers,
      num_sparse_decoder_layers=num_sparse["decoder"], num_heads=config.num_heads, num_experts=m.num_experts,
      router_bias=False, router_jitter_noise=m.jitter_noise, router_dtype="float32", router_ignore_padding_tokens=False,
      relative_attention_num_buckets=config.relative_attention_num_buckets,
      relative_attention_max_distance=config.relative_attention_max_distance, dropout_rate=config.dropout_rate,
      layer_norm_epsilon=config.layer_norm_epsilon, router_z_loss_coef=m.router_z_loss_weight,
      router_aux_loss_coef=m.load_balancing_loss_weight, dense_act_fn=hf.feed_forward_proj(config.mlp_activations),
      tie_word_embeddings=config.logits_via_embedding, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  d = hf_cfg.to_dict()
  d.update(architectures=["SwitchTransformersForConditionalGeneration"], dtype="float32")
  return d


def to_switch_state_dict(params: Any, config: t5.T5Config) -> dict[str, np.ndarray]:
  """repeat_lm MoE params (any layout: scanned, shared or per-layer) -> {SwitchTransformers name: array}."""
  check_switch_layout(config)
  state = hf.to_hf_state_dict(params, config, switch_name_pairs(config))
  flat = layout.to_per_layer(layout.flatten(params), layout.layouts_for(config))
  for hf_prefix, rl_prefix in expert_prefixes(config):
    for n in ("wi", "wo"):  # [E, in, out] -> one [out, in] Linear weight per expert
      kernel = np.asarray(flat[f"{rl_prefix}/{n}"])
      for e in range(config.moe.num_experts):
        state[f"{hf_prefix}.expert_{e}.{n}.weight"] = np.ascontiguousarray(kernel[e].T)
  # Without tied embeddings transformers does not copy `shared` into the stacks' embedding tables: write them.
  state["encoder.embed_tokens.weight"] = state["decoder.embed_tokens.weight"] = state["shared.weight"]
  return state


# ---- import ----

def _placement(flags: Mapping[str, tuple[bool, ...]]) -> tuple[int, bool] | None:
  """(sparse_every, sparse_first) that gives every stack these sparse layers, or None if no MoeConfig does."""
  for every in range(1, max(len(f) for f in flags.values()) + 1):
    if any(len(f) % every for f in flags.values()):
      continue
    for first in (False, True):
      cfg = moe_lib.MoeConfig(sparse_every=every, sparse_first=first)
      if all(moe_lib.sparse_layer_flags(len(f), cfg) == f for f in flags.values()):
        return every, first
  return None


def t5_config_from_switch(hf_cfg: Mapping[str, Any], **overrides) -> t5.T5Config:
  """repeat_lm MoE T5Config from a SwitchTransformers config.json dict; ValueError if the layout has no equivalent.

  overrides: T5Config fields; `moe` may be a dict of MoeConfig fields to change (e.g. eval_capacity_factor).
  """
  get = lambda key: hf_cfg.get(key, _HF_DEFAULTS.get(key))  # noqa: E731
  kwargs = hf.base_config_kwargs(hf_cfg)
  flags = {"encoder": _hf_sparse_flags(kwargs["num_encoder_layers"], get("num_sparse_encoder_layers")),
           "decoder": _hf_sparse_flags(kwargs["num_decoder_layers"], get("num_sparse_decoder_layers"))}
  reasons, act = [], None
  try:
    act = hf.activation_from_hf(get("dense_act_fn"))
  except ValueError as e:
    reasons.append(str(e).rstrip("."))
  if get("router_bias"):
    reasons.append("a router with a bias (router_bias=True; repeat_lm's router has none)")
  placement = _placement(flags)
  if placement is None:
    where = "; ".join(f"{s} {[i for i, x in enumerate(f) if x]} of {len(f)}" for s, f in flags.items())
    reasons.append(f"sparse layers at {where} (repeat_lm makes one FFN in every k sparse, the first or the last of "
                   "each k, alike in both stacks: Switch's every-layer or every-odd-layer layouts)")
  if reasons:
    raise ValueError("This SwitchTransformers checkpoint has no repeat_lm equivalent: " + "; ".join(reasons) + ".")
  if get("router_dtype") != "float32":
    log.warning("The checkpoint's router ran in %s; repeat_lm's runs in float32, so routing near ties may differ.",
                get("router_dtype"))
  # NO_DROP_CAPACITY is what the export writes so that Hugging Face drops no token, not a capacity the model trained
  # with: as a minimum it would give every expert a whole routing group (E x the expert compute), so keep the default.
  capacity = get("expert_capacity")
  min_capacity = capacity if capacity < NO_DROP_CAPACITY else moe_lib.MoeConfig.min_expert_capacity
  moe = moe_lib.MoeConfig(
      num_experts=get("num_experts"), expert_mlp_dim=kwargs["mlp_dim"], expert_activations=(act,),
      num_selected_experts=1, min_expert_capacity=min_capacity, jitter_noise=get("router_jitter_noise"),
      load_balancing_loss_weight=get("router_aux_loss_coef"), router_z_loss_weight=get("router_z_loss_coef"),
      sparse_every=placement[0], sparse_first=placement[1])
  moe_overrides = overrides.pop("moe", None)
  if isinstance(moe_overrides, Mapping):
    moe = dataclasses.replace(moe, **moe_overrides)
  elif moe_overrides is not None:
    moe = moe_overrides
  kwargs.update(mlp_activations=(act,), moe=moe)
  kwargs.update(overrides)
  return t5.T5Config(**kwargs)


def from_switch_state_dict(state: Mapping[str, np.ndarray], config: t5.T5Config) -> dict[str, np.ndarray]:
  """{SwitchTransformers name: array} -> flat repeat_lm params (per-layer layout); the inverse of
  to_switch_state_dict."""
  check_switch_layout(config, "be read from")
  if any(k.endswith("router.classifier.bias") for k in state):
    raise ValueError("The checkpoint's routers have a bias (router_bias=True); repeat_lm's router has none.")
  for name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
    # transformers 5 unties these from `shared` along with lm_head when tie_word_embeddings=False.
    if name in state and not np.array_equal(np.asarray(state[name]), np.asarray(state["shared.weight"])):
      raise ValueError(f"The checkpoint's {name} differs from shared.weight (untied input embeddings); repeat_lm's "
                       "encoder and decoder read one shared token embedding.")
  flat = hf.from_hf_state_dict(state, config, switch_name_pairs(config))
  for hf_prefix, rl_prefix in expert_prefixes(config):
    for n in ("wi", "wo"):
      names = [f"{hf_prefix}.expert_{e}.{n}.weight" for e in range(config.moe.num_experts)]
      missing = [name for name in names if name not in state]
      if missing:
        raise ValueError(f"The checkpoint lacks {len(missing)} expert tensors of this {config.moe.num_experts}-expert "
                         f"model, e.g. {missing[:3]}.")
      flat[f"{rl_prefix}/{n}"] = np.stack([np.asarray(state[name]).T for name in names]).astype(np.float32)
  return flat
