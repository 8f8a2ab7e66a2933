"""Invariants of the T5 v1.1 Transformer: parameter counts, sharding, scan, remat, cached decoding, packing, gin."""

import dataclasses
import functools
import re
from pathlib import Path

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import repeat_lm.models as models
from repeat_lm.models import t5
from repeat_lm.train import partitioning

REPO_ROOT = Path(__file__).resolve().parents[2]
B, S, T = 8, 16, 8  # batch, encoder length, decoder length
TINY = t5.T5Config(vocab_size=256, dtype="float32", emb_dim=32, num_heads=4, head_dim=8, num_encoder_layers=2,
                   num_decoder_layers=2, mlp_dim=64)
RNGS = {"params": jax.random.key(0), "dropout": jax.random.key(1)}


def make_batch(seed: int = 0) -> dict[str, jnp.ndarray]:
  """Random tokens with trailing padding (0) of varying length in both encoder and decoder."""
  rng = np.random.default_rng(seed)
  enc = rng.integers(1, TINY.vocab_size, (B, S))
  dec = rng.integers(1, TINY.vocab_size, (B, T))
  enc[np.arange(S)[None] >= rng.integers(S // 2, S + 1, (B, 1))] = 0
  dec[np.arange(T)[None] >= rng.integers(T // 2, T + 1, (B, 1))] = 0
  dec_in = np.concatenate([np.zeros((B, 1), int), dec[:, :-1]], axis=1)  # shifted right, BOS = 0
  return dict(encoder_input_tokens=jnp.asarray(enc, jnp.int32), decoder_input_tokens=jnp.asarray(dec_in, jnp.int32),
              decoder_target_tokens=jnp.asarray(dec, jnp.int32))


def init(cfg: t5.T5Config, batch=None, **kwargs):
  if batch is None and not kwargs:
    return _init_cached(cfg)
  batch = make_batch() if batch is None else batch
  return t5.Transformer(cfg).init(RNGS, **batch, enable_dropout=False, **kwargs)


@functools.cache
def _init_cached(cfg: t5.T5Config):  # several tests share the same initial params; init is slow-ish on CPU
  return init(cfg, make_batch())


def forward(cfg: t5.T5Config, params, batch, **kwargs):
  return t5.Transformer(cfg).apply({"params": params}, **batch, enable_dropout=False, **kwargs)


def stack_layers(params: dict) -> dict:
  """Unscanned params (layers_0, layers_1, ...) -> the scanned layout (one 'layers' entry, stacked on axis 1)."""
  out = dict(params)
  for stack in ("encoder", "decoder"):
    names = sorted((k for k in params[stack] if k.startswith("layers_")), key=lambda k: int(k.split("_")[1]))
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs, axis=t5.PARAM_SCAN_AXIS), *[params[stack][n] for n in names])
    out[stack] = {k: v for k, v in params[stack].items() if k not in names} | {"layers": stacked}
  return out


def expected_param_count(cfg: t5.T5Config) -> int:
  """Closed form: embedding + untied logits + layers + one relative-bias table per stack + final norms."""
  d, a, f, k = cfg.emb_dim, cfg.num_heads * cfg.head_dim, cfg.mlp_dim, len(cfg.mlp_activations) + 1
  encoder_layer = 4 * d * a + k * d * f + 2 * d
  decoder_layer = 8 * d * a + k * d * f + 3 * d
  return (2 * cfg.vocab_size * d + cfg.num_encoder_layers * encoder_layer + cfg.num_decoder_layers * decoder_layer
          + 2 * cfg.relative_attention_num_buckets * cfg.num_heads + 2 * d)


@pytest.mark.parametrize("scan", [False, True])
def test_every_param_has_logical_axes_of_its_rank(scan):
  variables = jax.eval_shape(functools.partial(init, dataclasses.replace(TINY, scan_layers=scan), make_batch()))
  params = traverse_util.flatten_dict(variables["params"])
  axes = traverse_util.flatten_dict(partitioning.params_logical_axes(variables["params_axes"]))
  assert params.keys() == axes.keys()
  for path, param in params.items():
    assert len(axes[path]) == param.ndim, path
    assert ("layers" in axes[path]) == (scan and "layers" in path), path
  assert t5.param_count(variables["params"]) == expected_param_count(TINY)


@pytest.mark.parametrize("size, published", [("base", 247_577_856), ("large", 783.2e6), ("xl", 2.85e9)])
def test_param_count_matches_t5_v1_1(size, published):
  dims = {"base": (12, 768, 2048, 12), "large": (24, 1024, 2816, 16), "xl": (24, 2048, 5120, 32)}[size]
  layers, d, f, h = dims
  # scan keeps tracing fast; shapes only (eval_shape), nothing is allocated.
  cfg = t5.T5Config(emb_dim=d, mlp_dim=f, num_heads=h, num_encoder_layers=layers, num_decoder_layers=layers,
                    scan_layers=True)
  batch = {k: jnp.ones((1, 8), jnp.int32) for k in ("encoder_input_tokens", "decoder_input_tokens",
                                                    "decoder_target_tokens")}
  params = jax.eval_shape(functools.partial(init, cfg, batch))["params"]
  count = t5.param_count(params)
  assert count == expected_param_count(cfg)
  if size == "base":
    assert count == published
  assert abs(count - published) / published < 0.005


@pytest.mark.parametrize("attention", [None, "xla"])  # 'xla': padding goes to the kernel as [B] lengths, sharded too
def test_sharded_equals_unsharded(attention):
  partitioner = partitioning.Partitioner(data_parallel=4, model_parallel=2)
  batch = make_batch()
  variables = init(TINY)
  cfg = dataclasses.replace(TINY, attention_implementation=attention)
  expected = jax.jit(functools.partial(forward, cfg))(variables["params"], batch)

  shardings = partitioner.tree_shardings(partitioning.params_logical_axes(variables["params_axes"]))
  params = jax.device_put(variables["params"], shardings)
  assert params["logits_dense"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "model")
  batch = jax.device_put(batch, partitioner.batch_sharding())
  # jax.set_mesh makes flax's logical constraints inside the model real (the legacy `with mesh:` does not).
  with partitioner.mesh, jax.set_mesh(partitioner.mesh), partitioner.axis_rules():
    logits = jax.jit(functools.partial(forward, cfg))(params, batch)
  assert logits.sharding.spec[0] == "data"
  np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-5)


def test_scan_equals_no_scan():
  batch = make_batch()
  params = init(TINY)["params"]
  scan_cfg = dataclasses.replace(TINY, scan_layers=True)
  stacked = stack_layers(params)
  expected_shapes = jax.eval_shape(functools.partial(init, scan_cfg, batch))["params"]
  assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(jnp.shape, expected_shapes)
  assert t5.param_count(stacked) == t5.param_count(params)
  np.testing.assert_allclose(forward(scan_cfg, stacked, batch), forward(TINY, params, batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy, scan", [("minimal", False), ("full", False), ("full", True)])
def test_remat_gives_the_same_gradients(policy, scan):
  base_cfg = dataclasses.replace(TINY, scan_layers=scan)
  actual = _gradients(dataclasses.replace(base_cfg, remat_policy=policy))
  jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, atol=1e-6, rtol=1e-5), actual, _gradients(base_cfg))


@functools.cache
def _gradients(cfg: t5.T5Config):
  """Gradients of a log-likelihood-like loss at the shared initial params (remat must not change them)."""
  batch = make_batch()
  params = init(dataclasses.replace(cfg, remat_policy="none"))["params"]
  loss = lambda p: jnp.mean(jax.nn.log_softmax(forward(cfg, p, batch))[..., 1] ** 2)
  return jax.jit(jax.grad(loss))(params)


@pytest.mark.parametrize("scan, cache_length", [(False, T), (True, T + 3)])
def test_cached_greedy_decoding_matches_teacher_forcing(scan, cache_length):
  cfg = dataclasses.replace(TINY, scan_layers=scan)
  model = t5.Transformer(cfg)
  batch = make_batch()
  variables = init(cfg, batch, decode=True)  # full-length decoder inputs set the cache length L = T
  params, cache = variables["params"], variables["cache"]
  encoded = model.apply({"params": params}, batch["encoder_input_tokens"], enable_dropout=False, method="encode")
  if cache_length != T:  # T5X's way: a decode-mode apply with the real params; max_decode_length sets L
    _, mutated = model.apply({"params": params}, encoded, batch["encoder_input_tokens"],
                             batch["decoder_input_tokens"], batch["decoder_target_tokens"], enable_dropout=False,
                             decode=True, max_decode_length=cache_length, mutable=["cache"], method="decode")
    cache = mutated["cache"]
  assert {x.shape[-3] for path, x in traverse_util.flatten_dict(cache).items() if path[-1] == "cached_key"} == {
      cache_length}

  @jax.jit
  def step(cache, token_Bx1):
    logits, mutated = model.apply({"params": params, "cache": cache}, encoded, batch["encoder_input_tokens"],
                                  token_Bx1, token_Bx1, enable_dropout=False, decode=True,
                                  max_decode_length=cache_length,
                                  mutable=["cache"], method="decode")
    return logits[:, 0], mutated["cache"]

  token_Bx1 = jnp.zeros((B, 1), jnp.int32)
  tokens, step_logits, cache_at_start = [], [], cache
  for _ in range(T):
    tokens.append(token_Bx1)
    logits_BxV, cache = step(cache, token_Bx1)
    step_logits.append(logits_BxV)
    token_Bx1 = jnp.argmax(logits_BxV, axis=-1)[:, None].astype(jnp.int32)
  decoder_input = jnp.concatenate(tokens, axis=1)
  teacher_forced = dict(encoder_input_tokens=batch["encoder_input_tokens"], decoder_input_tokens=decoder_input,
                        decoder_target_tokens=jnp.ones_like(decoder_input))
  full = forward(cfg, params, teacher_forced)
  np.testing.assert_allclose(jnp.stack(step_logits, axis=1), full, atol=1e-5, rtol=1e-5)

  # __call__ with decode=True takes a step too, finding the cache length from the cache itself.
  first, _ = model.apply({"params": params, "cache": cache_at_start}, batch["encoder_input_tokens"],
                         decoder_input[:, :1], decoder_input[:, :1], enable_dropout=False, decode=True,
                         mutable=["cache"])
  np.testing.assert_allclose(first[:, 0], step_logits[0], atol=1e-5, rtol=1e-5)


def test_packed_sequences_equal_separate_ones():
  rng = np.random.default_rng(1)
  lengths = [(6, 5), (9, 3)]  # (encoder, decoder) tokens of two examples
  examples = [(rng.integers(1, TINY.vocab_size, s), rng.integers(1, TINY.vocab_size, t)) for s, t in lengths]

  def row(parts, length):
    tokens, segments, positions = np.zeros(length, int), np.zeros(length, int), np.zeros(length, int)
    start = 0
    for i, part in enumerate(parts):
      tokens[start:start + len(part)], segments[start:start + len(part)] = part, i + 1
      positions[start:start + len(part)] = np.arange(len(part))
      start += len(part)
    return [jnp.asarray(x[None], jnp.int32) for x in (tokens, segments, positions)]

  shift = lambda t: np.concatenate([[0], t[:-1]])
  enc, enc_seg, enc_pos = row([e for e, _ in examples], S)
  dec, dec_seg, dec_pos = row([d for _, d in examples], T)
  dec_in, _, _ = row([shift(d) for _, d in examples], T)
  params = init(TINY)["params"]
  packed = forward(TINY, params, dict(encoder_input_tokens=enc, decoder_input_tokens=dec_in, decoder_target_tokens=dec,
                                      encoder_segment_ids=enc_seg, decoder_segment_ids=dec_seg,
                                      encoder_positions=enc_pos, decoder_positions=dec_pos))
  start = 0
  for e, d in examples:
    (enc_1, *_), (dec_1, *_), (dec_in_1, *_) = row([e], S), row([d], T), row([shift(d)], T)
    alone = forward(TINY, params, dict(encoder_input_tokens=enc_1, decoder_input_tokens=dec_in_1,
                                       decoder_target_tokens=dec_1))
    np.testing.assert_allclose(packed[0, start:start + len(d)], alone[0, :len(d)], atol=1e-5, rtol=1e-5)
    start += len(d)


def test_bfloat16_activations_and_tied_logits():
  batch = make_batch()
  params = init(TINY)["params"]
  expected = forward(TINY, params, batch)
  bf16 = forward(dataclasses.replace(TINY, dtype="bfloat16"), params, batch)
  assert bf16.dtype == jnp.float32
  assert np.abs(bf16 - expected).max() < 0.05 * np.abs(expected).max()
  tied = dataclasses.replace(TINY, logits_via_embedding=True)
  tied_params = init(tied, batch)["params"]
  assert "logits_dense" not in tied_params
  assert t5.param_count(tied_params) == t5.param_count(params) - TINY.emb_dim * TINY.vocab_size
  assert np.isfinite(forward(tied, tied_params, batch)).all()


@pytest.mark.parametrize("logits_dot_in_fp32, operands", [(False, "bf16"), (True, "f32")])
def test_bfloat16_logits_dense_operands(logits_dot_in_fp32, operands):
  """A bfloat16 model's logits_dense multiplies bfloat16 operands into float32 logits (T5X's float32 logits_dense
  at TPU's default precision), or exact float32 ones with logits_dot_in_fp32; the logits are float32 either way."""
  cfg = dataclasses.replace(TINY, dtype="bfloat16", logits_dot_in_fp32=logits_dot_in_fp32)
  batch = make_batch()
  lowered = jax.jit(lambda p: forward(cfg, p, batch)).lower(init(TINY)["params"]).as_text()
  d, v = TINY.emb_dim, TINY.vocab_size
  logits_dots = re.findall(rf"dot_general.*: \(tensor<[0-9x]*x{d}x(\w+)>, tensor<{d}x{v}x(\w+)>\) -> "
                           rf"tensor<[0-9x]*x{v}xf32>", lowered)
  assert logits_dots == [(operands, operands)], logits_dots


def test_dropout_only_when_enabled():
  cfg = dataclasses.replace(TINY, dropout_rate=0.3, num_encoder_layers=1, num_decoder_layers=1)
  model, batch = t5.Transformer(cfg), make_batch()
  params = init(cfg, batch)["params"]
  @functools.partial(jax.jit, static_argnums=1)
  def run(seed, enable):
    return model.apply({"params": params}, **batch, enable_dropout=enable, rngs={"dropout": jax.random.key(seed)})

  np.testing.assert_array_equal(run(1, False), run(2, False))
  np.testing.assert_array_equal(run(1, True), run(1, True))
  assert not np.allclose(run(1, True), run(2, True))
  assert not np.allclose(run(1, True), run(1, False))


MODEL_GINS = sorted((REPO_ROOT / "gin" / "models").glob("t5_1_1_*.gin"))  # the dense sizes; MoE: test_info.py
# size: (layers per stack, emb_dim, mlp_dim, heads, head_dim, vocab)
SIZES = {"tiny": (2, 64, 128, 4, 16, 8192), "small": (8, 512, 1024, 6, 64, 32128),
         "base": (12, 768, 2048, 12, 64, 32128), "large": (24, 1024, 2816, 16, 64, 32128),
         "xl": (24, 2048, 5120, 32, 64, 32128), "xxl": (24, 4096, 10240, 64, 64, 32128)}


class _PlaceholderModel:  # one class for all parametrizations: gin refuses to re-register a different one
  pass


@pytest.mark.parametrize("gin_file", MODEL_GINS, ids=lambda p: p.name)
def test_model_gin_parses_and_sets_dimensions(gin_file, monkeypatch):
  if not hasattr(models, "EncoderDecoderModel"):  # until the wrapper lands, stand in for it so MODEL resolves
    monkeypatch.setattr(models, "EncoderDecoderModel", _PlaceholderModel, raising=False)
  gin.clear_config()
  gin.add_config_file_search_path(str(REPO_ROOT))
  try:
    gin.parse_config_files_and_bindings([str(gin_file)], ["DROPOUT_RATE = 0.1"], skip_unknown=False)
    cfg = t5.T5Config(**gin.get_bindings("repeat_lm.models.t5.T5Config"))
  finally:
    gin.clear_config()
  layers, d, f, h, e, v = SIZES[gin_file.stem.removeprefix("t5_1_1_")]
  assert (cfg.num_encoder_layers, cfg.num_decoder_layers, cfg.emb_dim, cfg.mlp_dim, cfg.num_heads, cfg.head_dim,
          cfg.vocab_size) == (layers, layers, d, f, h, e, v)
  assert cfg.dropout_rate == 0.1 and cfg.mlp_activations == ("gelu", "linear")


def test_all_sizes_have_a_gin():
  assert {p.stem.removeprefix("t5_1_1_") for p in MODEL_GINS} == set(SIZES)


@pytest.mark.parametrize("kwargs", [{"scan_layers": "False"}, {"logits_via_embedding": "False"},
                                    {"dropout_broadcast_length": 1}, {"float32_attention_logits": 0},
                                    {"attention_padding_lengths": "True"}, {"logits_dot_in_fp32": None}])
def test_config_refuses_a_flag_that_is_not_a_bool(kwargs):
  """A gin string 'False' is truthy: scan_layers='False' scanned the layers (another parameter layout) silently."""
  with pytest.raises(ValueError, match=f"True or False .no quotes.: {{'{next(iter(kwargs))}'"):
    dataclasses.replace(TINY, **kwargs)
  assert dataclasses.replace(TINY, scan_layers=np.bool_(True)).scan_layers


@pytest.mark.parametrize("activations", [(), ("gelu", "swish")])
def test_config_rejects_unusable_mlp_activations(activations):
  """No activation (or an unknown one) used to pass the config; () failed in init with a NoneType AttributeError."""
  with pytest.raises(ValueError, match="T5Config.mlp_activations"):
    t5.T5Config(mlp_activations=activations)
