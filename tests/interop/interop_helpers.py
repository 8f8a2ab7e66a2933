"""Helpers shared by the interop tests: tiny configs, batches with padding, initial parameters, a MODEL_DIR writer."""

import dataclasses
import functools
from pathlib import Path

import gin
import jax
import jax.numpy as jnp
import numpy as np

from repeat_lm.models import moe, t5

REPO_ROOT = Path(__file__).resolve().parents[2]
# Tiny dense T5 v1.1 (the vocabulary fits the default 8,100-id SentencePiece model, for tokenizer checks).
TINY = t5.T5Config(vocab_size=8192, dtype="float32", emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                   num_encoder_layers=2, num_decoder_layers=2)
# T5 v1.1 Small's dimensions (vocabulary 32128), for the 'small' comparison with short sequences.
SMALL = t5.T5Config(vocab_size=32128, dtype="float32", emb_dim=512, num_heads=6, head_dim=64, mlp_dim=1024,
                    num_encoder_layers=8, num_decoder_layers=8)
# Switch-style MoE: ReLU everywhere, experts as wide as the dense FFNs, odd layers sparse, capacity that never binds.
TINY_SWITCH = dataclasses.replace(
    TINY, vocab_size=512, num_encoder_layers=4, num_decoder_layers=4, mlp_activations=("relu",),
    moe=moe.MoeConfig(num_experts=4, expert_mlp_dim=64, expert_activations=("relu",), sparse_every=2,
                      eval_capacity_factor=4.0, min_expert_capacity=64))


def make_batch(vocab_size: int, batch: int = 3, inputs: int = 12, targets: int = 7, seed: int = 0):
  """Encoder/decoder tokens with trailing padding in some rows; decoder inputs are the targets shifted right."""
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, vocab_size, (batch, inputs))
  enc[0, inputs * 2 // 3:] = 0
  tgt = rng.integers(2, vocab_size, (batch, targets))
  tgt[min(1, batch - 1), targets // 2:] = 0
  dec = np.concatenate([np.zeros((batch, 1), np.int64), tgt[:, :-1]], axis=1)
  dec[tgt == 0] = 0
  return {"encoder_input_tokens": enc.astype(np.int32), "decoder_input_tokens": dec.astype(np.int32),
          "decoder_target_tokens": tgt.astype(np.int32)}


@functools.cache
def init_params(config: t5.T5Config, seed: int = 0):
  """The model's own initialisation (jitted: scanned models compile much faster)."""
  tokens = jnp.ones((1, 8), jnp.int32)
  module = t5.Transformer(config)
  return jax.jit(lambda: module.init(jax.random.key(seed), tokens, tokens, tokens, enable_dropout=False)["params"])()


def random_params(config: t5.T5Config, seed: int = 0):
  """Parameters drawn in numpy at the scales of the model's initialisation, without compiling an init (fast)."""
  tokens = jnp.ones((1, 8), jnp.int32)
  module = t5.Transformer(config)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), tokens, tokens, tokens, enable_dropout=False))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    keys = [getattr(k, "key", "") for k in path]
    shape = leaf.shape
    if keys[-1] == "scale":  # not exactly 1, so a misplaced norm scale would show
      return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    if keys[-1] == "embedding":
      return rng.standard_normal(shape).astype(np.float32)
    if keys[-1] == "rel_embedding":
      return (0.25 * rng.standard_normal(shape)).astype(np.float32)
    if keys[-1] == "router":
      return (0.02 * rng.standard_normal(shape)).astype(np.float32)
    fan_in = shape[-2] if "experts" in keys else shape[0]
    std = 1.0 / np.sqrt(fan_in) / (np.sqrt(config.head_dim) if "query" in keys else 1.0)
    return (std * rng.standard_normal(shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes["params"])


def logits(config: t5.T5Config, params, batch) -> np.ndarray:
  module = t5.Transformer(config)
  return np.asarray(jax.jit(lambda p, b: module.apply({"params": p}, **b, enable_dropout=False))(params, batch))


def hf_logits(model, batch) -> np.ndarray:
  """transformers' logits with repeat_lm's masks: encoder padding masked; the decoder's causal mask suffices for the
  non-padding positions that are compared."""
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    enc = torch.tensor(batch["encoder_input_tokens"], dtype=torch.long)
    return model(input_ids=enc, attention_mask=(enc != 0).long(),
                 decoder_input_ids=torch.tensor(batch["decoder_input_tokens"], dtype=torch.long)).logits.numpy()


def max_diff(ours, theirs, batch) -> float:
  real = batch["decoder_target_tokens"] > 0  # padding positions differ by design (masked queries)
  return float(np.abs(ours - theirs)[real].max())


def sharpen_routers(params, factor: float = 100.0):
  """Router kernels scaled up, so tokens really go to different experts (near-uniform routers hide mix-ups)."""
  from repeat_lm.interop import layout  # pylint: disable=import-outside-toplevel
  flat = {k: np.asarray(v) for k, v in layout.flatten(params).items()}
  return layout.unflatten({k: v * factor if k.endswith("mlp/router") else v for k, v in flat.items()})


def write_model_dir(model_dir: Path, config: t5.T5Config, params, task: str = "repeat_lm.wiki_span_corruption",
                    step: int = 5) -> Path:
  """A MODEL_DIR as the trainer leaves it: config.gin (the model gin + run settings) and one Orbax checkpoint. An MoE
  config is written over gin/models/switch_tiny.gin with every MoeConfig field bound."""
  from repeat_lm import gin_utils
  from repeat_lm.train import checkpoint, optim
  overrides = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
               if f.name in ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim", "num_encoder_layers",
                             "num_decoder_layers", "scan_layers", "dtype", "mlp_activations", "logits_via_embedding",
                             "param_share")}
  bindings = [f"t5.T5Config.{k} = {v!r}" for k, v in overrides.items()]
  model_gin = "gin/models/t5_1_1_tiny.gin"
  if config.moe is not None:
    model_gin = "gin/models/switch_tiny.gin"
    bindings += [f"moe.MoeConfig.{f.name} = {getattr(config.moe, f.name)!r}" for f in dataclasses.fields(config.moe)]
  gin_utils.parse([model_gin, "gin/runs/pretrain.gin"],
                  [*bindings, f"MODEL_DIR = {str(model_dir)!r}", "TRAIN_STEPS = 10",
                   f"MIXTURE_OR_TASK_NAME = {task!r}", "TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 8}"])
  model_dir.mkdir(parents=True, exist_ok=True)
  (model_dir / "config.gin").write_text(gin.config_str())
  gin.clear_config()
  tx = optim.make_optimizer()
  state = {"step": jnp.asarray(step, jnp.int32), "params": params, "opt_state": tx.init(params)}
  ckpt = checkpoint.Checkpointer(model_dir, checkpoint.CheckpointConfig(async_save=False))
  ckpt.save(step, state, {"step": step})
  ckpt.close()
  return model_dir
