"""Exporting repeat_lm MoE models as Hugging Face `SwitchTransformersForConditionalGeneration`.

Hugging Face's Switch Transformer is narrower than repeat_lm's MoE, so only some layouts map (else ValueError says
which condition fails):
  - top-1 routing (num_selected_experts = 1), router without bias in float32 (repeat_lm's always is);
  - one non-gated activation shared by dense FFNs and experts, and expert_mlp_dim == mlp_dim (HF has one d_ff);
  - sparse FFNs where HF puts them: layer i of a stack is sparse iff i % step == 1 (step = layers // sparse layers),
    i.e. every FFN (sparse_every = 1) or every odd one (sparse_every = 2, sparse_first = False; Switch's layout).
Parameter sharing exports by copying the shared weights into every layer that uses them.

Tensor names, beyond T5's (see hf.py); sparse layer i of the encoder (the decoder's FFN sits at layer.2):
  encoder/layers_i/mlp/router [D, E]              encoder.block.i.layer.1.mlp.router.classifier.weight [E, D]
  encoder/layers_i/mlp/experts/wi [E, D, F]       encoder.block.i.layer.1.mlp.experts.expert_<e>.wi.weight [F, D]
  encoder/layers_i/mlp/experts/wo [E, F, D]       encoder.block.i.layer.1.mlp.experts.expert_<e>.wo.weight [D, F]
  dense layers: encoder/layers_i/mlp/{wi,wo}      encoder.block.i.layer.1.mlp.{wi,wo}.weight
Capacity differs in kind: HF gives each expert `expert_capacity` tokens per sequence, repeat_lm a capacity per routing
group (capacity factor x group tokens / experts). The export sets a capacity no sequence reaches, so HF drops no
token: logits match repeat_lm's whenever repeat_lm's evaluation capacity does not overflow either.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from repeat_lm.interop import hf, layout
from repeat_lm.models import moe as moe_lib
from repeat_lm.models import t5

NO_DROP_CAPACITY = 1 << 16  # tokens per expert per sequence: more than any sequence has


def _hf_sparse_flags(num_layers: int, num_sparse: int) -> tuple[bool, ...]:
  """Which layers transformers' SwitchTransformersStack makes sparse."""
  step = num_layers // num_sparse if num_sparse > 0 else num_layers
  return tuple((i % step == 1 or step == 1) if step > 0 else False for i in range(num_layers))


def check_switch_layout(config: t5.T5Config) -> None:
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
  for stack, n in (("encoder", config.num_encoder_layers), ("decoder", config.num_decoder_layers)):
    ours = moe_lib.sparse_layer_flags(n, m)
    theirs = _hf_sparse_flags(n, sum(ours))
    if ours != theirs:
      reasons.append(f"{stack} sparse layers {[i for i, s in enumerate(ours) if s]} where Hugging Face would put them "
                     f"at {[i for i, s in enumerate(theirs) if s]} (use sparse_every=1, or 2 with sparse_first=False)")
  if reasons:
    raise ValueError("This MoE model cannot be exported as SwitchTransformersForConditionalGeneration: "
                     + "; ".join(reasons) + ".")


def switch_config_dict(config: t5.T5Config, expert_capacity: int = NO_DROP_CAPACITY) -> dict[str, Any]:
  check_switch_layout(config)
  transformers = hf.import_transformers()
  m = config.moe
  num_sparse = {s: sum(moe_lib.sparse_layer_flags(n, m)) for s, n in
                (("encoder", config.num_encoder_layers), ("decoder", config.num_decoder_layers))}
  hf_cfg = transformers.SwitchTransformersConfig(
      vocab_size=config.vocab_size, d_model=config.emb_dim, d_kv=config.head_dim, d_ff=config.mlp_dim,
      expert_capacity=expert_capacity, num_layers=config.num_encoder_layers,
      num_sparse_encoder_layers=num_sparse["encoder"], num_decoder_layers=config.num_decoder_layers,
      num_sparse_decoder_layers=num_sparse["decoder"], num_heads=config.num_heads, num_experts=m.num_experts,
      router_bias=False, router_jitter_noise=0.0, router_dtype="float32", router_ignore_padding_tokens=False,
      relative_attention_num_buckets=config.relative_attention_num_buckets,
      relative_attention_max_distance=config.relative_attention_max_distance, dropout_rate=config.dropout_rate,
      layer_norm_epsilon=config.layer_norm_epsilon, router_z_loss_coef=m.router_z_loss_weight,
      router_aux_loss_coef=m.load_balancing_loss_weight, dense_act_fn=hf.feed_forward_proj(config.mlp_activations),
      tie_word_embeddings=config.logits_via_embedding, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  d = hf_cfg.to_dict()
  d.update(architectures=["SwitchTransformersForConditionalGeneration"], dtype="float32")
  return d


def to_switch_state_dict(params: Any, config: t5.T5Config) -> dict[str, np.ndarray]:
  """repeat_lm MoE params (any layout) -> {SwitchTransformers name: array}."""
  check_switch_layout(config)
  flags = {"encoder": moe_lib.sparse_layer_flags(config.num_encoder_layers, config.moe),
           "decoder": moe_lib.sparse_layer_flags(config.num_decoder_layers, config.moe)}

  def mlp_pairs(stack, i, hf_prefix, rl_prefix):
    if flags[stack][i]:
      return [(f"{hf_prefix}.mlp.router.classifier.weight", f"{rl_prefix}/mlp/router", True)]
    return [(f"{hf_prefix}.mlp.{n}.weight", f"{rl_prefix}/mlp/{n}/kernel", True) for n in ("wi", "wo")]

  state = hf.to_hf_state_dict(params, config, hf.name_pairs(config, mlp_pairs))
  flat = layout.to_per_layer(layout.flatten(params), layout.layouts_for(config))
  for stack, layer_flags in flags.items():
    ff = 1 if stack == "encoder" else 2
    for i, sparse in enumerate(layer_flags):
      if not sparse:
        continue
      prefix = f"{stack}.block.{i}.layer.{ff}.mlp.experts"
      wi = np.asarray(flat[f"{stack}/layers_{i}/mlp/experts/wi"])
      wo = np.asarray(flat[f"{stack}/layers_{i}/mlp/experts/wo"])
      for e in range(config.moe.num_experts):
        state[f"{prefix}.expert_{e}.wi.weight"] = np.ascontiguousarray(wi[e].T)
        state[f"{prefix}.expert_{e}.wo.weight"] = np.ascontiguousarray(wo[e].T)
  # Without tied embeddings transformers does not copy `shared` into the stacks' embedding tables: write them.
  state["encoder.embed_tokens.weight"] = state["decoder.embed_tokens.weight"] = state["shared.weight"]
  return state
