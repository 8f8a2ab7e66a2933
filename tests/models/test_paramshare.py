"""ParamShare: one parameter set per stack (or per group of k layers) at the FLOPs of the full depth."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from repeat_lm.models import info, t5
from repeat_lm.train import flops

B, S, T = 4, 12, 6
BASE = t5.T5Config(vocab_size=64, dtype="float32", emb_dim=16, num_heads=2, head_dim=8, num_encoder_layers=4,
                   num_decoder_layers=4, mlp_dim=32)


def make_batch():
  rng = np.random.default_rng(0)
  enc, dec = rng.integers(1, 64, (B, S)), rng.integers(1, 64, (B, T))
  dec_in = np.concatenate([np.zeros((B, 1), int), dec[:, :-1]], axis=1)
  return dict(encoder_input_tokens=jnp.asarray(enc, jnp.int32), decoder_input_tokens=jnp.asarray(dec_in, jnp.int32),
              decoder_target_tokens=jnp.asarray(dec, jnp.int32))


@functools.cache
def init(cfg: t5.T5Config):
  return jax.jit(lambda k: t5.Transformer(cfg).init(k, **make_batch(), enable_dropout=False))(jax.random.key(0))


@functools.cache
def forward(cfg: t5.T5Config):
  return jax.jit(lambda p, b: t5.Transformer(cfg).apply({"params": p}, **b, enable_dropout=False))


def one_layer_param_count(cfg: t5.T5Config) -> int:
  """Closed form of a model with a single layer per stack (what 'all' sharing should store)."""
  d, a, f, k = cfg.emb_dim, cfg.num_heads * cfg.head_dim, cfg.mlp_dim, len(cfg.mlp_activations) + 1
  return (2 * cfg.vocab_size * d + (4 * d * a + k * d * f + 2 * d) + (8 * d * a + k * d * f + 3 * d)
          + 2 * cfg.relative_attention_num_buckets * cfg.num_heads + 2 * d)


@pytest.mark.parametrize("scan", [False, True])
def test_all_sharing_stores_one_layer_per_stack_and_keeps_full_flops(scan):
  cfg = dataclasses.replace(BASE, param_share="all", scan_layers=scan)
  shapes = jax.eval_shape(lambda: t5.Transformer(cfg).init(jax.random.key(0), **make_batch(), enable_dropout=False))
  assert t5.param_count(shapes["params"]) == one_layer_param_count(BASE)
  assert info.param_counts(cfg)["params_total"] == one_layer_param_count(BASE)
  assert flops.train_flops_per_sequence(cfg, 512, 114) == flops.train_flops_per_sequence(BASE, 512, 114)
  one_layer = dataclasses.replace(BASE, num_encoder_layers=1, num_decoder_layers=1)
  assert flops.train_flops_per_sequence(cfg, 512, 114) > 3 * flops.train_flops_per_sequence(one_layer, 512, 114)


def _unshare(shared_stack: dict, k: int, n: int) -> dict:
  """Unscanned shared params (layers_u for group u) -> an unshared stack where layer i holds group i // k's."""
  out = {key: v for key, v in shared_stack.items() if not key.startswith("layers_")}
  return out | {f"layers_{i}": shared_stack[f"layers_{i // k}"] for i in range(n)}


@pytest.mark.parametrize("share", ["all", 2])
def test_shared_model_equals_unshared_model_with_tied_layers(share):
  cfg = dataclasses.replace(BASE, param_share=share, num_decoder_layers=2)
  layers = {"encoder": cfg.num_encoder_layers, "decoder": cfg.num_decoder_layers}
  k = {name: n if share == "all" else share for name, n in layers.items()}
  params = init(cfg)["params"]
  assert sum(key.startswith("layers_") for key in params["encoder"]) == layers["encoder"] // k["encoder"]
  tied = dict(params, **{name: _unshare(params[name], k[name], n) for name, n in layers.items()})
  batch = make_batch()
  unshared = dataclasses.replace(cfg, param_share="none")
  np.testing.assert_allclose(forward(cfg)(params, batch), forward(unshared)(tied, batch), atol=1e-5, rtol=1e-5)
  # Scanned sharing: the groups stacked on the 'layers' axis give the same outputs.
  scan_cfg = dataclasses.replace(cfg, scan_layers=True)
  stacked = dict(params)
  for name, n in layers.items():
    groups = [params[name][f"layers_{u}"] for u in range(n // k[name])]
    stacked[name] = {key: v for key, v in params[name].items() if not key.startswith("layers_")} | {
        "layers": jax.tree.map(lambda *xs: jnp.stack(xs, axis=t5.PARAM_SCAN_AXIS), *groups)}
  expected = jax.eval_shape(lambda: t5.Transformer(scan_cfg).init(jax.random.key(0), **batch, enable_dropout=False))
  assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(jnp.shape, expected["params"])
  np.testing.assert_allclose(forward(scan_cfg)(stacked, batch), forward(cfg)(params, batch), atol=1e-5, rtol=1e-5)


def test_shared_layers_keep_separate_decoding_caches():
  cfg = dataclasses.replace(BASE, param_share="all", num_encoder_layers=2, num_decoder_layers=2)
  model, batch = t5.Transformer(cfg), make_batch()
  variables = jax.jit(lambda k: model.init(k, **batch, enable_dropout=False, decode=True))(jax.random.key(0))
  params, cache = variables["params"], variables["cache"]
  # One cache per application of the shared layer: counters [2]; keys and values [B, 2, L, H, E], the batch first as
  # T5X's beam search expects of an unscanned module.
  flat = traverse_util.flatten_dict(cache)
  assert all(v.shape == ((2,) if k[-1] == "cache_index" else (B, 2, T, cfg.num_heads, cfg.head_dim))
             for k, v in flat.items())
  encoded = jax.jit(lambda p, x: model.apply({"params": p}, x, enable_dropout=False, method="encode"))(
      params, batch["encoder_input_tokens"])

  @jax.jit
  def decode_step(cache, token_Bx1):
    return model.apply({"params": params, "cache": cache}, encoded, batch["encoder_input_tokens"], token_Bx1,
                       token_Bx1, enable_dropout=False, decode=True, mutable=["cache"], method="decode")

  tokens, logits = [jnp.zeros((B, 1), jnp.int32)], []
  for _ in range(T):
    step, mutated = decode_step(cache, tokens[-1])
    cache = mutated["cache"]
    logits.append(step[:, 0])
    tokens.append(jnp.argmax(step[:, 0], axis=-1)[:, None].astype(jnp.int32))
  decoder_input = jnp.concatenate(tokens[:-1], axis=1)
  teacher_forced = dict(encoder_input_tokens=batch["encoder_input_tokens"], decoder_input_tokens=decoder_input,
                        decoder_target_tokens=jnp.ones_like(decoder_input))
  full = forward(cfg)(params, teacher_forced)
  np.testing.assert_allclose(jnp.stack(logits, axis=1), full, atol=1e-5, rtol=1e-5)


def test_bad_sharing_is_a_clear_error():
  with pytest.raises(ValueError, match="param_share"):
    dataclasses.replace(BASE, param_share=3)
  with pytest.raises(ValueError, match="param_share"):
    dataclasses.replace(BASE, param_share="some")
  # The contract is 'none' | 'all' | a positive int; True (== 1 in Python) must not quietly mean 'none', nor False.
  for flag in (True, False):
    with pytest.raises(ValueError, match="param_share"):
      dataclasses.replace(BASE, param_share=flag)


def test_moe_sharing_of_one_block_per_group_is_refused():
  """param_share = sparse_every would put one dense/sparse block in each group: nothing shared, the unshared model's
  parameter count, silently. It must be an error, and a multiple of two blocks must still share."""
  from repeat_lm.models import moe
  batch = make_batch()
  mcfg = moe.MoeConfig(num_experts=2, expert_mlp_dim=8, sparse_every=2)
  cfg = dataclasses.replace(BASE, num_encoder_layers=4, num_decoder_layers=4, moe=mcfg)
  count = lambda c: t5.param_count(jax.eval_shape(lambda: t5.Transformer(c).init(
      {"params": jax.random.key(0)}, **batch, enable_dropout=False))["params"])
  with pytest.raises(ValueError, match="no two layers"):
    count(dataclasses.replace(cfg, param_share=2))
  assert count(dataclasses.replace(cfg, param_share=4)) < count(cfg)
  # Any multiple of the block beyond one shares, not only multiples of two blocks: one block applied 3 times.
  six = dataclasses.replace(cfg, num_encoder_layers=6, num_decoder_layers=6)
  assert count(dataclasses.replace(six, param_share=6)) < count(six)
