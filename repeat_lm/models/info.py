"""Parameter and FLOP accounting of a model: `repeat-lm model-info` and the zoo table of docs/models.md.

Parameter counts come from `jax.eval_shape` of the real module's `init` (shapes only, nothing allocated), classified
by their logical axes: 'vocab' marks the embedding and output projection, 'expert' marks expert weights, of which a
token uses K of E. FLOPs come from the one counter, `repeat_lm.train.flops`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from repeat_lm.models import moe, stack, t5
from repeat_lm.train import flops, partitioning

# (model gin, dense reference gin): MoE models are compared with the dense model of similar parameter count (the
# paper's RQ4 pairs) or, for Switch, with their FLOP-matched T5 v1.1 size; ParamShare with the model it shares.
ZOO: tuple[tuple[str, str | None], ...] = (
    ("t5_1_1_small", None), ("t5_1_1_base", None), ("t5_1_1_large", None), ("t5_1_1_xl", None), ("t5_1_1_xxl", None),
    *((f"switch_base_{e}", "t5_1_1_base") for e in (8, 16, 32, 64, 128)),
    *((f"switch_large_{e}", "t5_1_1_large") for e in (8, 16, 32, 64, 128)),
    ("moe_base", "t5_1_1_large"), ("moe_large", "t5_1_1_xl"),
    ("paramshare_base", "t5_1_1_base"), ("paramshare_large", "t5_1_1_large"),
)
DOC_BEGIN, DOC_END = "<!-- zoo-table:begin -->", "<!-- zoo-table:end -->"


def load_config(gin_file: str, bindings: Sequence[str] = (), search_paths: Sequence[str] = ()) -> t5.T5Config:
  """The T5Config of the MODEL a model gin builds."""
  from repeat_lm import gin_utils  # noqa: PLC0415
  return model_config(gin_utils.configured_macro([gin_file], bindings, "MODEL", search_paths))


def model_config(model: Any) -> t5.T5Config:
  """The T5Config of a gin's MODEL, or a ValueError naming what MODEL is when it is no model (a T5Config, a module)."""
  config = getattr(getattr(model, "module", None), "config", None)
  if not isinstance(config, t5.T5Config):
    raise ValueError(f"The gin's MODEL is a {type(model).__name__}, not a model (EncoderDecoderModel): include a "
                     "model gin such as gin/models/t5_1_1_small.gin, or bind MODEL as it does.")
  return config


@functools.lru_cache(maxsize=None)
def abstract_variables(config: t5.T5Config) -> dict[str, Any]:
  """Shapes of the module's variables, by eval_shape of its init; scanned (same counts, much faster to trace)."""
  config = dataclasses.replace(config, scan_layers=True, remat_policy="none")
  tokens = jnp.ones((1, 8), jnp.int32)
  init = functools.partial(t5.Transformer(config).init, {"params": jax.random.key(0), "dropout": jax.random.key(0)},
                           tokens, tokens, tokens, enable_dropout=False)
  return jax.eval_shape(init)


def param_counts(config: t5.T5Config) -> dict[str, int]:
  variables = abstract_variables(config)
  params = traverse_util.flatten_dict(variables["params"])
  axes = traverse_util.flatten_dict(partitioning.params_logical_axes(variables["params_axes"]))
  sizes = {path: int(np.prod(p.shape)) for path, p in params.items()}
  total = sum(sizes.values())
  embedding = sum(n for path, n in sizes.items() if "vocab" in axes[path])
  experts = sum(n for path, n in sizes.items() if "expert" in axes[path])
  used_fraction = config.moe.num_selected_experts / config.moe.num_experts if config.moe else 1.0
  return {"params_total": total, "params_embedding": embedding, "params_non_embedding": total - embedding,
          "params_experts": experts, "params_per_token": int(round(total - experts * (1.0 - used_fraction)))}


def model_info(config: t5.T5Config, inputs_length: int = 512, targets_length: int = 114,
               reference: t5.T5Config | None = None) -> dict[str, Any]:
  """Parameters and training FLOPs of `config` at the given feature lengths, and ratios to a reference model."""
  per_sequence = flops.train_flops_per_sequence(config, inputs_length, targets_length)
  moe_cfg = config.moe
  info: dict[str, Any] = {
      **param_counts(config),
      "train_flops_per_sequence": per_sequence,
      # Every encoder input and decoder target token; training = 3 x forward, no remat, no capacity padding.
      "train_flops_per_token": per_sequence / (inputs_length + targets_length),
      "inputs_length": inputs_length, "targets_length": targets_length,
      "layers": [config.num_encoder_layers, config.num_decoder_layers], "emb_dim": config.emb_dim,
      "mlp_dim": config.mlp_dim, "mlp_activations": list(config.mlp_activations),
      "param_share": config.param_share,
      "sparse_layers": [sum(moe.sparse_layer_flags(n, moe_cfg)) for n in (config.num_encoder_layers,
                                                                          config.num_decoder_layers)],
  }
  # A shared group of k layers is one block (a dense layer and its sparse_every - 1 neighbours, or one dense layer)
  # applied k / block times (stack.apply_layers): its distinct layers are the block's, not one.
  block = moe_cfg.sparse_every if moe_cfg else 1
  info["distinct_layers"] = [n if (share := stack.share_group_size(config.param_share, n)) == 1
                             else n // share * block
                             for n in (config.num_encoder_layers, config.num_decoder_layers)]
  if moe_cfg:
    info["moe"] = {"num_experts": moe_cfg.num_experts, "top_k": moe_cfg.num_selected_experts,
                   "expert_mlp_dim": moe_cfg.expert_mlp_dim, "expert_activations": list(moe_cfg.expert_activations),
                   "sparse_every": moe_cfg.sparse_every, "group_size": moe_cfg.group_size,
                   "capacity_factor": [moe_cfg.train_capacity_factor, moe_cfg.eval_capacity_factor]}
  if reference is not None:
    ref_flops = flops.train_flops_per_sequence(reference, inputs_length, targets_length)
    ref_params = param_counts(reference)["params_total"]
    info.update(reference_params_total=ref_params, reference_train_flops_per_sequence=ref_flops,
                flops_ratio_to_reference=per_sequence / ref_flops,
                params_ratio_to_reference=info["params_total"] / ref_params)
  return info


def zoo(inputs_length: int = 512, targets_length: int = 114, gin_dir: str = "gin/models") -> list[dict[str, Any]]:
  """model_info of every zoo model with its reference."""
  rows = []
  for name, ref in ZOO:
    config = load_config(f"{gin_dir}/{name}.gin")
    reference = load_config(f"{gin_dir}/{ref}.gin") if ref else None
    rows.append({"model": name, "reference": ref,
                 **model_info(config, inputs_length, targets_length, reference)})
  return rows


def _count(n: float) -> str:
  return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _activation_name(activations: Sequence[str]) -> str:
  return "gated-GELU" if list(activations) == ["gelu", "linear"] else "/".join(activations)


def zoo_markdown(rows: Sequence[dict[str, Any]]) -> str:
  lengths = f"{rows[0]['inputs_length']}/{rows[0]['targets_length']}" if rows else ""
  lines = [
      f"| model | layers enc/dec | d_model | FFN | experts | params | params / token | embedding params | "
      f"train GFLOP / seq ({lengths}) | reference | FLOPs vs ref | params vs ref |",
      "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  for r in rows:
    ffn = f"{r['mlp_dim']} {_activation_name(r['mlp_activations'])}"
    if "moe" in r:
      m = r["moe"]
      experts = (f"{m['num_experts']} x {m['expert_mlp_dim']} {_activation_name(m['expert_activations'])}, "
                 f"top-{m['top_k']}, every {m['sparse_every']}"
                 f"{'nd' if m['sparse_every'] == 2 else 'th'} FFN")
    else:
      experts = "-"
    layers = "/".join(map(str, r["layers"]))
    if r["param_share"] not in ("none", 1):
      layers += f" (shared: {'/'.join(map(str, r['distinct_layers']))} distinct)"
    ref = r.get("reference")
    lines.append(
        f"| {r['model']} | {layers} | {r['emb_dim']} | {ffn} | {experts} | {_count(r['params_total'])} | "
        f"{_count(r['params_per_token'])} | {_count(r['params_embedding'])} | "
        f"{r['train_flops_per_sequence'] / 1e9:.1f} | {ref or '-'} | "
        f"{'%.3fx' % r['flops_ratio_to_reference'] if ref else '-'} | "
        f"{'%.3fx' % r['params_ratio_to_reference'] if ref else '-'} |")
  return "\n".join(lines) + "\n"


def update_doc(path: str | Path, table: str) -> None:
  """Replace the generated block between DOC_BEGIN and DOC_END of a markdown file."""
  path = Path(path)
  text = path.read_text()
  pattern = re.compile(re.escape(DOC_BEGIN) + ".*?" + re.escape(DOC_END), re.S)
  if not pattern.search(text):
    raise ValueError(f"{path} has no {DOC_BEGIN} ... {DOC_END} block to replace.")
  path.write_text(pattern.sub(lambda _: f"{DOC_BEGIN}\n{table}{DOC_END}", text))
