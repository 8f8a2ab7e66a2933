"""Hugging Face interop: repeat_lm's T5 v1.1 <-> `transformers.T5ForConditionalGeneration`.

Parameter names (repeat_lm path -> Hugging Face tensor; i = layer; Linear weights are [out, in], so every kernel is
transposed):
  token_embedder/embedding                              shared.weight
  logits_dense/kernel                                   lm_head.weight (absent when logits_via_embedding: tied)
  {encoder,decoder}/relpos_bias/rel_embedding [H, N]    {encoder,decoder}.block.0.layer.0.SelfAttention
                                                          .relative_attention_bias.weight [N, H]
  encoder/layers_i/attention/{query,key,value,out}      encoder.block.i.layer.0.SelfAttention.{q,k,v,o}
  encoder/layers_i/pre_attention_layer_norm/scale       encoder.block.i.layer.0.layer_norm.weight
  encoder/layers_i/mlp/{wi_0,wi_1,wo | wi,wo}           encoder.block.i.layer.1.DenseReluDense.<same>
  encoder/layers_i/pre_mlp_layer_norm/scale             encoder.block.i.layer.1.layer_norm.weight
  decoder/layers_i/self_attention, pre_self_attention_layer_norm    decoder.block.i.layer.0.SelfAttention, layer_norm
  decoder/layers_i/encoder_decoder_attention, pre_cross_attention_.. decoder.block.i.layer.1.EncDecAttention, ..
  decoder/layers_i/mlp, pre_mlp_layer_norm              decoder.block.i.layer.2.DenseReluDense, layer_norm
  {encoder,decoder}/{encoder,decoder}_norm/scale        {encoder,decoder}.final_layer_norm.weight
Heads are laid out the same way on both sides (joined index h * head_dim + e), so no reshuffling is needed.

MoE (Switch) models export to and import from `SwitchTransformersForConditionalGeneration` through
`repeat_lm.interop.hf_switch`. Reading and writing safetensors needs only numpy; the config, tokenizer and Switch
export need `transformers`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from repeat_lm import files
from repeat_lm.interop import layout
from repeat_lm.models import moe as moe_lib
from repeat_lm.models import t5

log = logging.getLogger(__name__)

INSTALL_HINT = ("Hugging Face export/import needs transformers (and safetensors): pip install -e '.[hf]' "
                "(torch==2.13.0 transformers==5.24.0 safetensors==0.8.0).")
# repeat_lm activation -> Hugging Face ACT2FN name. repeat_lm's 'gelu' is the tanh approximation (= gelu_new).
_TO_HF_ACT = {"gelu": "gelu_new", "relu": "relu", "linear": "linear"}
_FROM_HF_ACT = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu", "linear": "linear"}
SAFETENSORS_INDEX = "model.safetensors.index.json"
EXPORT_MARK = "repeat_lm_export.json"  # an export directory's mark: a later export may replace what it holds
BIN_INDEX = "pytorch_model.bin.index.json"
# What write_tokenizer (T5Tokenizer.save_pretrained) leaves, in transformers 4 and 5.
TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")


def import_transformers():
  try:
    import transformers  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise RuntimeError(INSTALL_HINT) from e
  return transformers


# ---- configs ----

def feed_forward_proj(mlp_activations: tuple[str, ...]) -> str:
  """('gelu', 'linear') -> 'gated-gelu'; ('relu',) -> 'relu'. Raises for MLPs Hugging Face's T5 cannot express."""
  acts = tuple(mlp_activations)
  if len(acts) == 1 and acts[0] in _TO_HF_ACT:
    return _TO_HF_ACT[acts[0]]
  if len(acts) == 2 and acts[1] == "linear" and acts[0] in ("gelu", "relu"):
    return f"gated-{acts[0]}"  # transformers maps gated-gelu to gelu_new itself
  raise ValueError(f"mlp_activations={acts} has no Hugging Face T5 equivalent (supported: one of "
                   f"{sorted(_TO_HF_ACT)}, or ('gelu'|'relu', 'linear') gated).")


def hf_config(config: t5.T5Config):
  """transformers.T5Config equivalent to a repeat_lm T5Config (T5 v1.1: gated GELU, untied logits)."""
  transformers = import_transformers()
  return transformers.T5Config(
      vocab_size=config.vocab_size, d_model=config.emb_dim, d_kv=config.head_dim, d_ff=config.mlp_dim,
      num_layers=config.num_encoder_layers, num_decoder_layers=config.num_decoder_layers,
      num_heads=config.num_heads, relative_attention_num_buckets=config.relative_attention_num_buckets,
      relative_attention_max_distance=config.relative_attention_max_distance, dropout_rate=config.dropout_rate,
      layer_norm_epsilon=config.layer_norm_epsilon, feed_forward_proj=feed_forward_proj(config.mlp_activations),
      tie_word_embeddings=config.logits_via_embedding, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def unexportable_regularisation(config: t5.T5Config) -> list[str]:
  """Training-time settings Hugging Face's T5 and Switch configs cannot state. They have one `dropout_rate`, applied
  to attention probabilities, embeddings and residual branches, FFN activations (experts' too), and no stochastic
  depth: config.json would claim another regularisation than the model's (attention_dropout_rate=0 under
  dropout_rate=0.1 was written as 0.1 everywhere), and fine-tuning the export in Hugging Face would silently train
  another model. The weights compute the same function either way."""
  places = [p for p in t5.DROPOUT_PLACES if p != "expert" or getattr(config, "moe", None) is not None]
  problems = [f"{p}_dropout_rate={config.dropout_rate_for(p)} differs from dropout_rate={config.dropout_rate}"
              for p in places if config.dropout_rate_for(p) != config.dropout_rate]
  if config.droppath_rate > 0:
    problems.append(f"droppath_rate={config.droppath_rate} (Hugging Face's T5 has no stochastic depth)")
  return problems


def check_exportable(config: t5.T5Config) -> None:
  """Raise ValueError for an MoE layout Switch cannot hold (`hf_switch.check_switch_layout`), or naming every
  regularisation setting config.json cannot state (`unexportable_regularisation`)."""
  if getattr(config, "moe", None) is not None:
    # Checked here, before export_hf creates and marks the directory: a refused Switch layout left an OUT holding
    # only repeat_lm_export.json.
    from repeat_lm.interop import hf_switch  # pylint: disable=import-outside-toplevel
    hf_switch.check_switch_layout(config)
  problems = unexportable_regularisation(config)
  if problems:
    raise ValueError("Hugging Face's config has a single dropout_rate, used in every place, and no DropPath, so it "
                     f"cannot state this model's regularisation: {'; '.join(problems)}. Nothing was exported. The "
                     "weights do not depend on it: export with the rates Hugging Face should fine-tune with, e.g. "
                     "--gin.t5.T5Config.<place>_dropout_rate=None (each place then follows dropout_rate) and "
                     "--gin.t5.T5Config.droppath_rate=0.0 (Python: dataclasses.replace(config, ...)).")


def hf_config_dict(config: t5.T5Config) -> dict[str, Any]:
  """config.json contents. transformers 5 forces `tie_word_embeddings=True` on the object and keeps untied T5 v1.1
  apart with `scale_decoder_outputs=False`; the file states the truth for readers of every version."""
  d = hf_config(config).to_dict()
  d.update(architectures=["T5ForConditionalGeneration"], tie_word_embeddings=config.logits_via_embedding,
           scale_decoder_outputs=config.logits_via_embedding, dtype="float32")
  return d


def t5_config_from_hf(hf: Mapping[str, Any], **overrides) -> t5.T5Config:
  """repeat_lm T5Config from a Hugging Face config.json dict (T5, or SwitchTransformers through `hf_switch`);
  `overrides` (dtype, scan_layers, ...) win."""
  model_type = hf.get("model_type", "t5")
  if model_type == "switch_transformers":
    from repeat_lm.interop import hf_switch  # pylint: disable=import-outside-toplevel
    return hf_switch.t5_config_from_switch(hf, **overrides)
  if model_type != "t5":
    raise ValueError(f"Only T5 and SwitchTransformers checkpoints import into repeat_lm; this one is "
                     f"model_type={model_type!r}.")
  proj = hf.get("feed_forward_proj", "relu")
  gated = proj.startswith("gated-")
  act = hf.get("dense_act_fn") or proj.split("-")[-1]
  act = "gelu_new" if gated and act == "gelu" else act  # transformers' own backward-compatible reading
  act = activation_from_hf(act)
  kwargs = base_config_kwargs(hf)
  kwargs["mlp_activations"] = (act, "linear") if gated else (act,)
  kwargs.update(overrides)
  return t5.T5Config(**kwargs)


# T5Config settings that leave no trace in parameter shapes: weights read under other values compute another function.
SHAPELESS_FIELDS = ("mlp_activations", "relative_attention_num_buckets", "relative_attention_max_distance",
                    "layer_norm_epsilon", "logits_via_embedding")


def architecture_diffs(theirs: t5.T5Config, ours: t5.T5Config) -> list[str]:
  """Hyper-parameters that leave no trace in parameter shapes, where a checkpoint's config (`theirs`) and the model's
  differ: weights read under `ours` would silently compute another function. Both dense, or both MoE."""
  diffs = [f"{f}: checkpoint {getattr(theirs, f)!r} vs model {getattr(ours, f)!r}" for f in SHAPELESS_FIELDS
           if getattr(theirs, f) != getattr(ours, f)]
  if ours.moe is not None and theirs.moe is not None:  # routing and expert activations do not show in shapes either
    diffs += [f"moe.{f}: checkpoint {getattr(theirs.moe, f)!r} vs model {getattr(ours.moe, f)!r}"
              for f in ("num_selected_experts", "expert_activations")
              if getattr(theirs.moe, f) != getattr(ours.moe, f)]
    for stack, n in (("encoder", ours.num_encoder_layers), ("decoder", ours.num_decoder_layers)):
      our_flags, their_flags = moe_lib.sparse_layer_flags(n, ours.moe), moe_lib.sparse_layer_flags(n, theirs.moe)
      if our_flags != their_flags:
        diffs.append(f"{stack} sparse layers: checkpoint {[i for i, s in enumerate(their_flags) if s]} vs model "
                     f"{[i for i, s in enumerate(our_flags) if s]} (moe.sparse_every / sparse_first)")
  return diffs


def _config_with_overrides(hf: Mapping[str, Any], overrides: Mapping[str, Any]) -> t5.T5Config:
  """t5_config_from_hf with `overrides`, refusing those that change what the weights compute: load_params (an
  INITIAL_CHECKPOINT_PATH) refuses a model gin that differs so, and load_hf took the same settings as overrides and
  returned the weights under another architecture (logits_via_embedding=True: logits off by 6.5)."""
  config = t5_config_from_hf(hf, **overrides)
  diffs = architecture_diffs(t5_config_from_hf(hf), config) if overrides else []
  if diffs:
    raise ValueError(f"The overrides change the architecture the checkpoint was trained with ({'; '.join(diffs)}): "
                     "its weights would compute another function. Override settings such as dtype, dropout rates, "
                     "scan_layers, param_share or MoE capacity factors only.")
  return config


def activation_from_hf(act: str) -> str:
  if act not in _FROM_HF_ACT:
    raise ValueError(f"Hugging Face activation {act!r} has no repeat_lm equivalent (supported: "
                     f"{sorted(_FROM_HF_ACT)}).")
  return _FROM_HF_ACT[act]


def base_config_kwargs(hf: Mapping[str, Any]) -> dict[str, Any]:
  """The T5Config fields T5 and SwitchTransformers config.json files spell alike."""
  # A config.json without model_type reads as T5; one of some other tool's would otherwise fail with a bare KeyError.
  missing = [k for k in ("vocab_size", "d_model", "num_heads", "d_kv", "d_ff", "num_layers") if k not in hf]
  if missing:
    raise ValueError(f"This config.json (model_type={hf.get('model_type')!r}) is not a Hugging Face T5 or "
                     f"SwitchTransformers config: it lacks {missing}.")
  return dict(
      vocab_size=hf["vocab_size"], emb_dim=hf["d_model"], num_heads=hf["num_heads"], head_dim=hf["d_kv"],
      mlp_dim=hf["d_ff"], num_encoder_layers=hf["num_layers"],
      num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
      dropout_rate=float(hf.get("dropout_rate", 0.0)), logits_via_embedding=_scales_decoder_outputs(hf),
      relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
      relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
      layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6), dtype="float32")


def _scales_decoder_outputs(hf: Mapping[str, Any]) -> bool:
  """Original T5 ties the output layer to the embedding and scales by d_model^-0.5; T5 v1.1 does neither. transformers
  records this as scale_decoder_outputs (5.x) or tie_word_embeddings (4.x, default True)."""
  if "scale_decoder_outputs" in hf:
    return bool(hf["scale_decoder_outputs"])
  return hf.get("tie_word_embeddings", True) is not False


# ---- parameter names ----

def _attention_pairs(hf_prefix: str, rl_prefix: str) -> list[tuple[str, str, bool]]:
  return [(f"{hf_prefix}.{h}.weight", f"{rl_prefix}/{r}/kernel", True)
          for h, r in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out"))]


def mlp_names(mlp_activations: tuple[str, ...]) -> list[str]:
  return ["wi"] if len(mlp_activations) == 1 else [f"wi_{i}" for i in range(len(mlp_activations))]


def _dense_mlp_pairs(hf_prefix: str, rl_prefix: str, config: t5.T5Config) -> list[tuple[str, str, bool]]:
  return [(f"{hf_prefix}.{n}.weight", f"{rl_prefix}/{n}/kernel", True) for n in [*mlp_names(config.mlp_activations),
                                                                              "wo"]]


def name_pairs(config: t5.T5Config, mlp_pairs=None) -> list[tuple[str, str, bool]]:
  """(Hugging Face name, repeat_lm path, transpose?) for every tensor of the model, in the per-layer layout.

  mlp_pairs(stack, i, hf_prefix, rl_prefix): the feed-forward tensors of layer i; defaults to T5's dense MLP
  (`DenseReluDense`). The Switch exporter passes its own.
  """
  mlp_pairs = mlp_pairs or (lambda stack, i, hf, rl: _dense_mlp_pairs(f"{hf}.DenseReluDense", f"{rl}/mlp", config))
  pairs = [("shared.weight", "token_embedder/embedding", False),
           ("encoder.final_layer_norm.weight", "encoder/encoder_norm/scale", False),
           ("decoder.final_layer_norm.weight", "decoder/decoder_norm/scale", False)]
  for stack in ("encoder", "decoder"):
    pairs.append((f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                  f"{stack}/relpos_bias/rel_embedding", True))
  if not config.logits_via_embedding:
    pairs.append(("lm_head.weight", "logits_dense/kernel", True))
  for i in range(config.num_encoder_layers):
    hf, rl = f"encoder.block.{i}.layer", f"encoder/layers_{i}"
    pairs += _attention_pairs(f"{hf}.0.SelfAttention", f"{rl}/attention")
    pairs += [(f"{hf}.0.layer_norm.weight", f"{rl}/pre_attention_layer_norm/scale", False),
              (f"{hf}.1.layer_norm.weight", f"{rl}/pre_mlp_layer_norm/scale", False)]
    pairs += mlp_pairs("encoder", i, f"{hf}.1", rl)
  for i in range(config.num_decoder_layers):
    hf, rl = f"decoder.block.{i}.layer", f"decoder/layers_{i}"
    pairs += _attention_pairs(f"{hf}.0.SelfAttention", f"{rl}/self_attention")
    pairs += _attention_pairs(f"{hf}.1.EncDecAttention", f"{rl}/encoder_decoder_attention")
    pairs += [(f"{hf}.0.layer_norm.weight", f"{rl}/pre_self_attention_layer_norm/scale", False),
              (f"{hf}.1.layer_norm.weight", f"{rl}/pre_cross_attention_layer_norm/scale", False),
              (f"{hf}.2.layer_norm.weight", f"{rl}/pre_mlp_layer_norm/scale", False)]
    pairs += mlp_pairs("decoder", i, f"{hf}.2", rl)
  return pairs


def _transpose(x: np.ndarray, transpose: bool) -> np.ndarray:
  # Expert kernels [E, in, out] turn into per-expert tensors before they get here, so 2-D is all there is.
  return np.ascontiguousarray(np.asarray(x).T) if transpose else np.ascontiguousarray(np.asarray(x))


def to_hf_state_dict(params: Mapping[str, Any], config: t5.T5Config, pairs=None) -> dict[str, np.ndarray]:
  """repeat_lm params (either layout) -> {Hugging Face name: float array}."""
  flat = layout.to_per_layer(layout.flatten(params), layout.layouts_for(config))
  pairs = pairs or name_pairs(config)
  missing = [rl for _, rl, _ in pairs if rl not in flat]
  if missing:
    raise ValueError(f"Parameters missing for export (is the config the one the params were built with?): "
                     f"{missing[:8]}")
  return {hf: _transpose(flat[rl], tr) for hf, rl, tr in pairs}


def from_hf_state_dict(state: Mapping[str, np.ndarray], config: t5.T5Config, pairs=None) -> dict[str, np.ndarray]:
  """{Hugging Face name: array} -> flat repeat_lm params (per-layer layout). An MoE config reads SwitchTransformers
  names (`hf_switch`); `pairs` (as name_pairs gives them) restricts the read to those tensors."""
  if pairs is None and getattr(config, "moe", None) is not None:
    from repeat_lm.interop import hf_switch  # pylint: disable=import-outside-toplevel
    return hf_switch.from_switch_state_dict(state, config)
  pairs = pairs or name_pairs(config)
  state = dict(state)
  if not config.logits_via_embedding and "lm_head.weight" not in state:
    # A model saved while its output layer was tied to the embedding (transformers 5 ties by default) stores only
    # shared.weight; without decoder-output scaling that is an untied layer holding the embedding.
    state["lm_head.weight"] = state["shared.weight"]
  missing = [hf for hf, _, _ in pairs if hf not in state]
  if missing:
    raise ValueError(f"The Hugging Face checkpoint lacks {len(missing)} tensors this model needs, e.g. {missing[:5]}.")
  # repeat_lm keeps parameters in float32 whatever the checkpoint's storage dtype.
  return {rl: _transpose(state[hf], tr).astype(np.float32) for hf, rl, tr in pairs}


# ---- files ----

def read_json(file: Path) -> Any:
  """A Hugging Face directory's JSON file (config.json, an index). A cut or damaged one failed as a bare
  JSONDecodeError, naming no file."""
  try:
    return json.loads(file.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise _unreadable(file, "JSON", e) from e


def _weight_files(path: Path, index: str, single: str) -> list[str]:
  """The weight files of one format in `path`: the shards its `index` names where there is one, else `single`."""
  if (path / index).exists():
    return sorted(set(read_json(path / index)["weight_map"].values()))
  return [single]


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
  """All tensors of a from_pretrained-style directory: model.safetensors or pytorch_model.bin, either sharded."""
  from safetensors import SafetensorError, safe_open  # pylint: disable=import-outside-toplevel
  path = Path(path)
  if (path / SAFETENSORS_INDEX).exists() or (path / "model.safetensors").exists():
    files = _weight_files(path, SAFETENSORS_INDEX, "model.safetensors")
  elif (path / "pytorch_model.bin").exists() or (path / BIN_INDEX).exists():
    # Large Hub checkpoints saved before safetensors (e.g. Switch's many-expert ones) come as .bin shards + index.
    import torch  # pylint: disable=import-outside-toplevel
    state = {}
    for name in _weight_files(path, BIN_INDEX, "pytorch_model.bin"):
      try:
        state.update(torch.load(path / name, map_location="cpu", weights_only=True))
      except (FileNotFoundError, PermissionError):  # their messages name the file already
        raise
      except Exception as e:  # pylint: disable=broad-except
        # A cut or damaged file fails as RuntimeError (zip), EOFError, OSError (EINVAL) or UnpicklingError, none
        # naming the file; cli.main would show some as a bare traceback.
        raise _unreadable(path / name, "PyTorch weights", e) from e
    return {k: v.float().numpy() for k, v in state.items()}
  else:
    raise FileNotFoundError(f"No model.safetensors, {SAFETENSORS_INDEX}, pytorch_model.bin or {BIN_INDEX} in {path}.")
  state = {}
  for name in files:
    try:
      with safe_open(str(path / name), framework="numpy") as f:
        for key in f.keys():
          state[key] = f.get_tensor(key)
    except SafetensorError as e:  # not an OSError/ValueError: cli.main would show a bare traceback naming no file
      raise _unreadable(path / name, "safetensors", e) from e
  return state


def _unreadable(file: Path, kind: str, error: BaseException) -> ValueError:
  detail = (str(error).strip().splitlines() or [""])[0][:200]
  return ValueError(f"{file} is not a readable {kind} file, it is truncated or corrupt ({type(error).__name__}: "
                    f"{detail}). Re-export it (repeat-lm export hf) or re-download it.")


def weight_files(out_dir: Path) -> list[str]:
  """The weight files in out_dir, of any layout save_pretrained writes: an export replaces them all."""
  return [*(n for n in ("model.safetensors", SAFETENSORS_INDEX, "pytorch_model.bin", BIN_INDEX)
            if (out_dir / n).exists()), *sorted(p.name for p in out_dir.glob("model-*-of-*.safetensors"))]


def replaced_files(out_dir: Path) -> list[str]:
  """The files in out_dir an export replaces or deletes: config, weights (any earlier layout) and tokenizer."""
  others = ("config.json", "generation_config.json", *TOKENIZER_FILES)
  return sorted([*weight_files(out_dir), *(n for n in others if (out_dir / n).exists())])


def write_safetensors(state: Mapping[str, np.ndarray], out_dir: Path, max_shard_bytes: int = 5 * 2**30, *,
                      others: Mapping[str, bytes] | None = None, replaces: Sequence[str] = ()) -> list[str]:
  """One model.safetensors, or shards plus model.safetensors.index.json past `max_shard_bytes` (as save_pretrained).
  others: the export's other files (name -> contents: config.json, tokenizer), written beside the weights and moved in
  with them; replaces: names of an earlier export's files to remove with its weights (`others` may take their place).

  An earlier export's weight files go first, as save_pretrained removes them: a sharded export's index left beside a
  new single file would make readers of the index (load_hf) and of the file (transformers) see different models.
  config.json goes first too, and comes back last: an export cut short while its files move in leaves no config.json
  (no reader takes the directory for a model; the export run again completes it), never new weights beside an earlier
  model's config."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  others = others or {}
  stale = [*(["config.json"] if "config.json" in others else []), *weight_files(out_dir), *replaces]
  staging = out_dir / ".weights_staging"
  shutil.rmtree(staging, ignore_errors=True)
  staging.mkdir()
  try:
    for name, data in others.items():
      (staging / name).write_bytes(data)
    names = _write_safetensors_to(state, staging, max_shard_bytes, save_file)
  except BaseException as e:
    shutil.rmtree(staging, ignore_errors=True)  # the earlier export's weights are still in place
    if isinstance(e, Exception) and not isinstance(e, OSError) and "os error" in str(e):  # safetensors' I/O errors
      raise OSError(f"Writing the weights into {out_dir} failed ({e}); any earlier export there is untouched") from e
    raise
  for name in stale:  # only once the new files are complete
    (out_dir / name).unlink(missing_ok=True)
  for name in sorted((p.name for p in staging.iterdir()), key=lambda name: (name == "config.json", name)):
    (staging / name).chmod(0o644)  # safetensors writes 0600: the export's other files, and a shared one, are 0644
    (staging / name).replace(out_dir / name)
  staging.rmdir()
  return names


def _write_safetensors_to(state: Mapping[str, np.ndarray], out_dir: Path, max_shard_bytes: int, save_file) -> list[str]:
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for key in sorted(state):
    nbytes = state[key].nbytes
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][key] = state[key]
    size += nbytes
  if len(shards) == 1:
    save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return ["model.safetensors"]
  names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  weight_map = {}
  for name, shard in zip(names, shards):
    save_file(shard, str(out_dir / name), metadata={"format": "pt"})
    weight_map.update({k: name for k in shard})
  index = {"metadata": {"total_size": int(sum(v.nbytes for v in state.values()))}, "weight_map": weight_map}
  (out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
  return names


def write_tokenizer(sentencepiece_model: str | Path, out_dir: str | Path, extra_ids: int = 100) -> None:
  """spiece.model + tokenizer.json + tokenizer_config.json, so `AutoTokenizer.from_pretrained(out_dir)` gives a
  T5Tokenizer with the same ids as the SeqIO vocabulary (pad 0, eos 1, unk 2, <extra_id_0> = vocab_size - 1).
  sentencepiece_model: a local path or any path SeqIO reads (gs://...).

  Converting the SentencePiece model needs no network. One known difference: transformers' T5 tokenizer has no byte
  fallback, so characters outside a byte-fallback vocabulary (like the default Wikipedia one) become <unk> there.
  """
  _write_tokenizer_model(read_sentencepiece_model(sentencepiece_model), out_dir, extra_ids)


def read_sentencepiece_model(path: str | Path) -> bytes:
  """The model file's bytes, local or remote: SeqIO reads vocabularies through TensorFlow's file systems, and T5's
  default one is gs://t5-data/... (vocab.T5_VOCAB_PATH), which the local file functions cannot open."""
  if "://" not in str(path):
    return Path(path).read_bytes()
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  with tf.io.gfile.GFile(str(path), "rb") as f:
    return f.read()


def _write_tokenizer_model(model: bytes, out_dir: str | Path, extra_ids: int) -> None:
  out_dir = Path(out_dir)
  _sentencepiece_ids(model)  # a clear error for a file that is no SentencePiece model (export_hf checks its own)
  _move_tokenizer_in(_stage_tokenizer(model, out_dir, extra_ids), out_dir)


def _sentencepiece_ids(model: bytes) -> tuple[int, int]:
  """The SentencePiece model's pieces (ids before the extra ids) and its EOS id (-1 where it has none)."""
  import sentencepiece  # pylint: disable=import-outside-toplevel
  try:  # transformers would report an unreadable file as a tiktoken one that needs the tiktoken package
    processor = sentencepiece.SentencePieceProcessor(model_proto=model)
  except RuntimeError as e:
    raise ValueError(f"The vocabulary is no SentencePiece model ({e}); nothing was exported.") from e
  return processor.get_piece_size(), processor.eos_id()


def _stage_tokenizer(model: bytes, out_dir: Path, extra_ids: int) -> Path:
  """The tokenizer files, converted into OUT_DIR/.tokenizer_staging/out (removed again if the conversion fails). The
  model has been read as a SentencePiece model (`_sentencepiece_ids`)."""
  transformers = import_transformers()
  out_dir.mkdir(parents=True, exist_ok=True)
  staging = out_dir / ".tokenizer_staging"
  shutil.rmtree(staging, ignore_errors=True)
  (staging / "out").mkdir(parents=True)
  try:
    (staging / "spiece.model").write_bytes(model)
    tokenizer = transformers.T5Tokenizer.from_pretrained(str(staging), extra_ids=extra_ids)
    tokenizer.save_pretrained(str(staging / "out"))
    (staging / "out" / "spiece.model").write_bytes(model)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return staging


def _tokenizer_files(model: bytes, out_dir: Path, extra_ids: int) -> dict[str, bytes]:
  """The tokenizer files' contents by name, for export_hf to move in with the weights."""
  staging = _stage_tokenizer(model, out_dir, extra_ids)
  try:
    return {p.name: p.read_bytes() for p in (staging / "out").iterdir()}
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def _move_tokenizer_in(staging: Path, out_dir: Path) -> None:
  written = {p.name for p in (staging / "out").iterdir()}
  for name in TOKENIZER_FILES:  # an earlier export's file that this transformers version does not write
    if name not in written:
      (out_dir / name).unlink(missing_ok=True)
  for name in sorted(written):
    (staging / "out" / name).replace(out_dir / name)
  shutil.rmtree(staging, ignore_errors=True)


def _generation_config(eos_id: int) -> bytes:
  # T5 starts decoding from the pad id 0 and stops at EOS (1 in T5's vocabulary); generate() reads these.
  return json.dumps({"decoder_start_token_id": 0, "eos_token_id": eos_id, "pad_token_id": 0}, indent=2).encode()


def export_hf(params: Mapping[str, Any], config: Any, out_dir: str | Path, *,
              sentencepiece_model: str | Path | None = None, extra_ids: int = 100,
              dtype: str = "float32", max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> Path:
  """Write a directory that `transformers` loads with from_pretrained (config, safetensors weights, tokenizer).

  config: the module's T5Config; a dense one exports as T5ForConditionalGeneration, one with `moe` as
  SwitchTransformersForConditionalGeneration (see `hf_switch`; raises ValueError when the layout does not map).
  dtype: 'float32' (exact) or 'bfloat16' (half the size).
  overwrite: replace model files in `out_dir` that no earlier export marked as its own (EXPORT_MARK).
  """
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"export dtype={dtype!r}: choose 'float32' (exact) or 'bfloat16' (half the size).")
  if isinstance(params, Mapping) and "params" in params:
    # The variables of module.init: every parameter was reported missing, which read as the wrong config.
    raise ValueError(f"export_hf takes the parameter tree, and this holds collections ({', '.join(map(str, params))})"
                     ": pass variables['params'].")
  check_exportable(config)  # before anything is written
  out_dir = Path(out_dir)
  if (out_dir / "checkpoints").is_dir() or (out_dir / "config.gin").exists():
    # Its config.json would sit beside the checkpoints, and readers that look for a Hugging Face directory first
    # would take the export for the run.
    raise ValueError(f"{out_dir} is a repeat_lm MODEL_DIR (it holds checkpoints/ or config.gin): export to a "
                     "directory of its own, e.g. --out=MODEL_DIR/hf.")
  # Where the files really land: 'checkpoints/../hf' is beside the checkpoints, a symlink to checkpoints/20 in them.
  owner = files.model_dir_around(out_dir)
  if owner is not None:
    # A step directory is deleted with its checkpoint once training saves `keep` newer ones, the export with it.
    raise ValueError(f"{out_dir} is inside the checkpoints of the MODEL_DIR {owner}, which training manages "
                     "(a step's directory is deleted with its checkpoint): export beside them, e.g. "
                     f"--out={owner / 'hf'}.")
  # Read before anything is written: a vocabulary that cannot be read leaves an earlier export as it was.
  spm_bytes = read_sentencepiece_model(sentencepiece_model) if sentencepiece_model is not None else None
  pieces, eos_id = _sentencepiece_ids(spm_bytes) if spm_bytes is not None else (0, -1)
  # The model learnt to end with its vocabulary's EOS (pipeline rows end with it; SentencePiece's own default is 2):
  # generate() must stop there, not at T5's 1, which is another token in such a vocabulary.
  eos_id = eos_id if eos_id >= 0 else 1
  if spm_bytes is not None and (ids := pieces + extra_ids) > config.vocab_size:
    # As `export hf --vocabulary` checks it: the tokenizer's ids past the embedding table wrote an export that failed
    # only when used (transformers: 'IndexError: index out of range in self').
    raise ValueError(f"The vocabulary has {ids} ids (with {extra_ids} extra ids) but the model's vocab_size is "
                     f"{config.vocab_size}: it is not the vocabulary this model was trained with; nothing was "
                     "exported.")
  earlier = replaced_files(out_dir) if out_dir.is_dir() else []
  if earlier and not overwrite and not (out_dir / EXPORT_MARK).exists():
    # Another model's directory lost its config.json and pytorch_model.bin to an export pointed at it. Files the
    # export leaves alone (a Hub clone's README.md, .git) are no reason to refuse.
    raise FileExistsError(f"{out_dir} holds model files this export would replace or delete ({', '.join(earlier[:4])}"
                          f"{', ...' if len(earlier) > 4 else ''}), and no {EXPORT_MARK} marks them as an earlier "
                          "repeat_lm export's: export to another directory, or pass --overwrite (overwrite=True) to "
                          "replace them")
  if earlier:
    # Replaced as documented (an earlier export's, or --overwrite), but said: the export replaced a model silently.
    whose = "an earlier repeat_lm export's" if (out_dir / EXPORT_MARK).exists() else "unmarked (--overwrite)"
    log.warning("Replacing the model files in %s (%s: %s%s).", out_dir, whose, ", ".join(earlier[:6]),
                ", ..." if len(earlier) > 6 else "")
  out_dir.mkdir(parents=True, exist_ok=True)
  # Marked before any weights are written, so an export that fails part-way can be run again into the same place.
  (out_dir / EXPORT_MARK).write_text(json.dumps({"written_by": "repeat-lm export hf", "dtype": dtype}) + "\n")
  if getattr(config, "moe", None) is None:
    state, config_json = to_hf_state_dict(params, config), hf_config_dict(config)
  else:
    from repeat_lm.interop import hf_switch  # pylint: disable=import-outside-toplevel
    state, config_json = hf_switch.to_switch_state_dict(params, config), hf_switch.switch_config_dict(config)
  np_dtype = np.dtype(np.float32) if dtype == "float32" else np.dtype(__import__("ml_dtypes").bfloat16)
  state = {k: v.astype(np_dtype) for k, v in state.items()}
  config_json["dtype"] = dtype
  config_json["eos_token_id"] = eos_id
  # The tokenizer is converted before any file is replaced: a SentencePiece model transformers cannot read (or no
  # transformers) would otherwise fail the export with the new weights beside an earlier export's tokenizer.
  tokenizer = _tokenizer_files(spm_bytes, out_dir, extra_ids) if spm_bytes is not None else {}
  # An earlier export's tokenizer goes with its weights: AutoTokenizer would load it beside these as theirs. config.json
  # and the tokenizer move in with the weights: written after them, in place, an export cut short left the new weights
  # beside the earlier model's config.json, or half of one.
  stale = [name for name in TOKENIZER_FILES if (out_dir / name).exists()]
  write_safetensors(state, out_dir, max_shard_bytes, replaces=TOKENIZER_FILES, others={
      "config.json": json.dumps(config_json, indent=2, sort_keys=True).encode(),
      "generation_config.json": _generation_config(eos_id), **tokenizer})
  if stale and not tokenizer:
    log.warning("Removed an earlier export's tokenizer from %s (%s): this export has none.", out_dir, ", ".join(stale))
  log.info("Exported %d tensors to %s", len(state), out_dir)
  return out_dir


def load_hf(path: str | Path, **config_overrides) -> tuple[t5.T5Config, dict[str, Any]]:
  """(T5Config, params in the config's layout) from a Hugging Face T5 (v1.1 or original) or SwitchTransformers
  directory.

  config_overrides: e.g. dtype='bfloat16', dropout_rate=0.1, scan_layers=True (the params are then stacked) or
  param_share (only if the checkpoint's layers of a group are equal); for Switch, moe={...} overrides MoeConfig
  fields (e.g. capacity factors).
  """
  path = Path(path)
  if not (path / "config.json").exists():
    raise FileNotFoundError(f"{path} has no config.json: point at a directory written by save_pretrained.")
  config = _config_with_overrides(read_json(path / "config.json"), config_overrides)
  flat = from_hf_state_dict(read_state_dict(path), config)
  return config, layout.unflatten(layout.from_per_layer(flat, layout.layouts_for(config)))


def from_hf_model(model: Any, **config_overrides) -> tuple[t5.T5Config, dict[str, Any]]:
  """(T5Config, params) from a live T5ForConditionalGeneration or SwitchTransformersForConditionalGeneration, without
  writing files."""
  config = _config_with_overrides(model.config.to_dict(), config_overrides)
  state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
  flat = from_hf_state_dict(state, config)
  return config, layout.unflatten(layout.from_per_layer(flat, layout.layouts_for(config)))


def describe_mapping(config: t5.T5Config) -> list[tuple[str, str]]:
  """(repeat_lm path, Hugging Face name) pairs, for documentation and debugging."""
  config = dataclasses.replace(config, scan_layers=False)
  if getattr(config, "moe", None) is None:
    return [(rl, hf) for hf, rl, _ in name_pairs(config)]
  from repeat_lm.interop import hf_switch  # pylint: disable=import-outside-toplevel
  pairs = [(rl, hf) for hf, rl, _ in hf_switch.switch_name_pairs(config)]
  for hf_prefix, rl_prefix in hf_switch.expert_prefixes(config):
    pairs += [(f"{rl_prefix}/{n}", f"{hf_prefix}.expert_<e>.{n}.weight") for n in ("wi", "wo")]
  return pairs
