"""Unit checks of the T5 building blocks against hand-computed values and plain numpy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repeat_lm.models import attention as attention_lib
from repeat_lm.models import cpu_layouts, layers

KEY = jax.random.key(0)


@pytest.mark.parametrize("relative_position, bidirectional, bucket", [
    # Bidirectional (encoder): 16 buckets per direction, 8 exact; keys after the query use buckets 16-31.
    (0, True, 0), (-1, True, 1), (-7, True, 7), (-8, True, 8), (1, True, 17), (8, True, 24),
    (-16, True, 10),  # 8 + floor(8 * log(16/8) / log(128/8)) = 8 + 2
    (-20, True, 10),  # 8 + floor(8 * log(2.5) / log(16)) = 8 + floor(2.64)
    (-127, True, 15), (-128, True, 15), (200, True, 31),
    # Unidirectional (decoder): 32 buckets, 16 exact; keys after the query fold into bucket 0.
    (5, False, 0), (0, False, 0), (-15, False, 15), (-16, False, 16),
    (-32, False, 21),  # 16 + floor(16 * log(2) / log(8)) = 16 + 5
    (-100, False, 30), (-127, False, 31), (-1000, False, 31),
])
def test_relative_position_bucket_hand_values(relative_position, bidirectional, bucket):
  assert int(layers.relative_position_bucket(jnp.int32(relative_position), bidirectional, 32, 128)) == bucket


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_bucket_matches_float64_formula(bidirectional):
  def reference(rel):
    num_buckets, offset = (16, 16 * (rel > 0)) if bidirectional else (32, 0)
    n = abs(rel) if bidirectional else max(-rel, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
      return offset + n
    large = max_exact + int(math.log(n / max_exact) / math.log(128 / max_exact) * (num_buckets - max_exact))
    return offset + min(large, num_buckets - 1)

  rel = np.arange(-600, 601)
  got = np.asarray(layers.relative_position_bucket(jnp.asarray(rel, jnp.int32), bidirectional, 32, 128))
  np.testing.assert_array_equal(got, [reference(int(r)) for r in rel])


@pytest.mark.parametrize("buckets, distance", [(32, 16), (2, 128), (8, 4)])
def test_bucket_settings_without_a_logarithmic_range_are_refused(buckets, distance):
  from repeat_lm.models import T5Config
  with pytest.raises(ValueError, match="need at least 4 buckets and a max distance above num_buckets // 2"):
    T5Config(relative_attention_num_buckets=buckets, relative_attention_max_distance=distance)


@pytest.mark.parametrize("buckets, distance", [(32, 8), (32, 0), (2, 128), (32, 16.5)])
def test_the_bucketing_and_the_bias_refuse_what_t5config_refuses(buckets, distance):
  """Called directly, 32 buckets up to distance 8 put far keys in bucket -2147483641 (a NaN bias after the gather),
  distance 0 put every far key in one bucket, 2 buckets raised ZeroDivisionError."""
  with pytest.raises(ValueError, match="need at least 4 buckets and a max distance above num_buckets // 2"):
    layers.relative_position_bucket(jnp.arange(-20, 21), True, buckets, distance)
  bias = layers.RelativePositionBias(num_heads=2, num_buckets=buckets, max_distance=distance)
  with pytest.raises(ValueError, match="need at least 4 buckets"):
    bias.init(jax.random.key(0), 8, 8, True)


@pytest.mark.parametrize("field, value", [("num_heads", 0), ("emb_dim", -4), ("num_encoder_layers", 0),
                                          ("head_dim", 1.5), ("mlp_dim", True), ("emb_dim", 512.0),
                                          ("relative_attention_num_buckets", 32.0)])
def test_sizes_below_one_or_not_whole_are_refused(field, value):
  # emb_dim = 512. (a float) passed and failed at init: 'Shapes must be 1D sequences of ... integer type'.
  from repeat_lm.models import T5Config
  with pytest.raises(ValueError, match=f"sizes must be whole numbers of at least 1: {{'{field}'"):
    T5Config(**{field: value})


@pytest.mark.parametrize("rates", [{"dropout_rate": 1.5}, {"dropout_rate": "0.1"}, {"droppath_rate": None}])
def test_dropout_rates_outside_zero_one_or_not_numbers_are_refused(rates):
  # --gin.DROPOUT_RATE="'0.1'" ended `train` in a TypeError traceback ('<=' between float and str).
  from repeat_lm.models import T5Config
  with pytest.raises(ValueError, match=r"Dropout and DropPath rates must lie in \[0, 1\)"):
    T5Config(**rates)


@pytest.mark.parametrize("dtype", ["bfloat61", "int32"])
def test_a_dtype_that_is_not_a_float_is_refused_at_config_time(dtype):
  # --gin.t5.T5Config.dtype="'bfloat61'" used to pass the config and end in a bare TypeError when the model was built.
  from repeat_lm.models import T5Config
  with pytest.raises(ValueError, match=f"dtype='{dtype}' is not a floating-point dtype"):
    T5Config(dtype=dtype)


def test_relative_position_bias_shape_and_values():
  module = layers.RelativePositionBias(num_heads=3)
  positions = jnp.arange(5)
  params = module.init(KEY, positions, positions, True)
  bias = module.apply(params, positions, positions, True)
  assert bias.shape == (1, 3, 5, 5)
  table = params["params"]["rel_embedding"]
  assert bias[0, 2, 4, 1] == table[2, 3]  # key 1, query 4: offset -3, bucket 3
  assert bias[0, 2, 1, 4] == table[2, 16 + 3]  # offset +3: upper half


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("q_len,k_len", [(7, 7), (1, 9), (9, 4), (300, 300)])
def test_toeplitz_bias_equals_gather_with_gradients(bidirectional, q_len, k_len):
  """The lengths path (tiling) gives the gather path's bias and the same table gradient."""
  module = layers.RelativePositionBias(num_heads=3)
  params = module.init(KEY, q_len, k_len, bidirectional)
  weights = jax.random.normal(jax.random.key(1), (1, 3, q_len, k_len))
  by_lengths = lambda p: module.apply(p, q_len, k_len, bidirectional)
  by_positions = lambda p: module.apply(p, jnp.arange(q_len), jnp.arange(k_len), bidirectional)
  np.testing.assert_array_equal(by_lengths(params), by_positions(params))
  grad = lambda f: jax.grad(lambda p: jnp.sum(f(p) * weights))(params)["params"]["rel_embedding"]
  np.testing.assert_allclose(grad(by_lengths), grad(by_positions), rtol=1e-4, atol=1e-5)  # sum order


def test_add_shared_bias_gradient_is_the_batch_sum():
  logits = jax.random.normal(KEY, (3, 2, 4, 5))
  bias = jax.random.normal(jax.random.key(1), (1, 2, 4, 5))
  weights = jax.random.normal(jax.random.key(2), (3, 2, 4, 5))
  loss = lambda add: lambda l, b: jnp.sum(jnp.tanh(add(l, b)) * weights)
  ours = jax.grad(loss(attention_lib.add_shared_bias), argnums=(0, 1))(logits, bias)
  plain = jax.grad(loss(lambda l, b: l + b), argnums=(0, 1))(logits, bias)
  np.testing.assert_array_equal(attention_lib.add_shared_bias(logits, bias), logits + bias)
  for got, want in zip(ours, plain):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_rms_norm_matches_numpy():
  x = jax.random.normal(KEY, (2, 3, 8)) * 3.0
  norm = layers.RMSNorm(epsilon=1e-6)
  params = {"params": {"scale": jnp.linspace(0.5, 2.0, 8)}}
  expected = np.asarray(x) / np.sqrt(np.mean(np.asarray(x) ** 2, -1, keepdims=True) + 1e-6) * np.linspace(0.5, 2, 8)
  np.testing.assert_allclose(norm.apply(params, x), expected, rtol=1e-5, atol=1e-6)
  assert norm.init(KEY, x)["params_axes"]["scale_axes"].names == ("embed",)


def test_bfloat16_rms_norm_is_t5xs_product_with_a_float32_scale_gradient():
  """The output and input gradient are bit for bit T5X's (normalised x and scale multiplied in bfloat16); the
  scale's gradient sums unrounded float32 products, so it is at least as close to the exact sum as T5X's sum of
  rounded ones."""
  x = jax.random.normal(KEY, (4, 64, 32)).astype(jnp.bfloat16)
  g = jax.random.normal(jax.random.key(1), x.shape).astype(jnp.bfloat16)
  scale = jnp.linspace(0.5, 2.0, 32)

  def t5x(x, scale):
    x32 = x.astype(jnp.float32)
    y = (x32 * jax.lax.rsqrt(jnp.mean(x32 ** 2, -1, keepdims=True) + 1e-6)).astype(jnp.bfloat16)
    return y * scale.astype(jnp.bfloat16)

  ours = lambda x, scale: layers.RMSNorm(1e-6, jnp.bfloat16).apply({"params": {"scale": scale}}, x)
  (out, vjp), (want, want_vjp) = jax.vjp(ours, x, scale), jax.vjp(t5x, x, scale)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want, np.float32))
  (dx, dscale), (want_dx, want_dscale) = vjp(g), want_vjp(g)
  np.testing.assert_array_equal(np.asarray(dx, np.float32), np.asarray(want_dx, np.float32))
  x32 = np.asarray(x, np.float32)
  y = np.asarray((x32 / np.sqrt(np.mean(x32 ** 2, -1, keepdims=True) + 1e-6)).astype(jnp.bfloat16), np.float64)
  exact = np.sum(y * np.asarray(g, np.float64), axis=(0, 1))
  assert np.abs(dscale - exact).max() <= np.abs(want_dscale - exact).max()
  np.testing.assert_allclose(dscale, exact, rtol=2**-8)  # the sum rounded once (the scale enters as bfloat16)
  # What it is for: XLA:CPU reduces the float32 products in a fused pass, the rounded ones in a windowed reduction.
  program = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), (0, 1))).lower(
      x, scale).compile().as_text()
  assert "reduce-window" in program(t5x) and "reduce-window" not in program(ours)


@pytest.mark.parametrize("attend_dtype", [None, jnp.float32])
def test_bfloat16_tied_logits_are_float32_products(attend_dtype):
  """A bfloat16 embedder's attend (tied output logits) multiplies operands rounded to attend_dtype (default bfloat16)
  and returns the float32 sums, as T5X's float32 attend at TPU precision; not logits rounded to bfloat16."""
  embed = layers.Embed(256, 32, jnp.bfloat16, **({} if attend_dtype is None else {"attend_dtype": attend_dtype}))
  params = embed.init(KEY, jnp.zeros((1, 1), jnp.int32))
  x = jax.random.normal(jax.random.key(1), (2, 4, 32)) * 4.0
  logits, vjp = jax.vjp(lambda x, p: embed.apply(p, x, method=embed.attend), x, params)
  assert logits.dtype == jnp.float32
  rounded = lambda a: np.asarray(jnp.asarray(a, attend_dtype or jnp.bfloat16), np.float64)
  table = params["params"]["embedding"]
  np.testing.assert_allclose(logits, np.einsum("btd,vd->btv", rounded(x), rounded(table)), rtol=1e-5, atol=1e-4)
  g = jax.random.normal(jax.random.key(2), logits.shape)
  dx, dparams = vjp(g)
  np.testing.assert_allclose(dx, np.asarray(g) @ np.asarray(table), rtol=0.02, atol=0.2)
  np.testing.assert_allclose(dparams["params"]["embedding"], np.einsum("btv,btd->vd", g, x), rtol=0.02, atol=0.2)


def test_bfloat16_embedding_gradient_sums_repeated_tokens_in_float32():
  """A token's embedding gradient sums its occurrences in float32: scatter-added into a bfloat16 table, 1024 unit
  cotangents of one token stalled at 256 (bfloat16's ulp there is 2), the frequent tokens' rows 10-90% short."""
  embed = layers.Embed(4, 8, jnp.bfloat16)
  tokens = jnp.ones((1024,), jnp.int32)
  params = embed.init(KEY, tokens)
  out, vjp = jax.vjp(lambda p: embed.apply(p, tokens), params)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(out, jnp.asarray(params["params"]["embedding"], jnp.bfloat16)[tokens])
  (grad,) = vjp(jnp.ones_like(out))
  np.testing.assert_array_equal(grad["params"]["embedding"][1], np.full(8, 1024.0, np.float32))


def test_attention_has_no_logit_scaling_and_scales_query_init():
  d, heads, head_dim = 256, 4, 64
  attention = attention_lib.MultiHeadAttention(heads, head_dim)
  x = jax.random.normal(KEY, (2, 5, d))
  variables = attention.init(KEY, x, x, None, None, True)
  p = variables["params"]
  assert variables["params_axes"]["query"]["kernel_axes"].names == ("embed", "joined_kv")
  assert variables["params_axes"]["out"]["kernel_axes"].names == ("joined_kv", "embed")
  # T5 folds 1/sqrt(head_dim) into the query init: std 1/sqrt(d * head_dim) instead of 1/sqrt(d).
  np.testing.assert_allclose(np.std(p["query"]["kernel"]) * math.sqrt(d * head_dim), 1.0, rtol=0.05)
  np.testing.assert_allclose(np.std(p["key"]["kernel"]) * math.sqrt(d), 1.0, rtol=0.05)

  q, k, v = ((np.asarray(x) @ np.asarray(p[n]["kernel"])).reshape(2, 5, heads, head_dim)
             for n in ("query", "key", "value"))
  logits = np.einsum("bqhe,bkhe->bhqk", q, k)  # no 1 / sqrt(head_dim) here
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhe->bqhe", weights, v).reshape(2, 5, -1) @ np.asarray(p["out"]["kernel"])
  np.testing.assert_allclose(attention.apply(variables, x, x, None, None, True), out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bias", [None, -20.0])
def test_float16_logits_keep_fully_masked_rows_finite(bias):
  """float16 logits (float32_logits=False): -1e10 would round to -inf, a padding row's softmax be NaN, and the next
  layer's weights @ v spread it to the real rows through their 0 weight on that key (0 x NaN). The stand-in keeps
  room below it: float16's lowest value itself (-65504) plus a logit or bias of -20 overflows to -inf as well."""
  attention = lambda dtype: attention_lib.MultiHeadAttention(2, 8, dtype, float32_logits=False)
  x = jax.random.normal(KEY, (1, 3, 16))
  valid = jnp.array([[True, True, False]])
  mask = attention_lib.make_attention_mask(valid, valid)  # row 2 fully masked
  bias = None if bias is None else jnp.full((1, 2, 3, 3), bias)
  params = attention(jnp.float32).init(KEY, x, x, bias, mask, True)
  def two_layers(dtype):
    h = attention(dtype).apply(params, x, x, bias, mask, True)
    return np.asarray(attention(dtype).apply(params, h, h, bias, mask, True), np.float32)
  half = two_layers(jnp.float16)
  assert np.isfinite(half).all()
  np.testing.assert_allclose(half[:, :2], two_layers(jnp.float32)[:, :2], rtol=0.02, atol=0.02)


def test_float32_logits_take_float32_queries_and_keys_on_the_autodiff_path(monkeypatch):
  """float32_logits (T5X's): q and k are cast to float32 before q.k, so bfloat16 activations do not round the
  logits. The autodiff path (GPU, TPU, REPEAT_LM_CPU_LAYOUTS=0) against float64 NumPy on the same bfloat16
  projections: logits of up to ~40 rounded to bfloat16 (steps of 0.125-0.25) move the weights by several percent,
  far beyond the bfloat16 rounding of the weights and outputs (a few 1e-3)."""
  monkeypatch.setattr(cpu_layouts, "explicit_transposes", lambda: False)
  heads, head_dim, d = 2, 16, 32
  x = (jax.random.normal(KEY, (2, 6, d)) * 4.0).astype(jnp.bfloat16)
  attention = attention_lib.MultiHeadAttention(heads, head_dim, dtype=jnp.bfloat16, float32_logits=True)
  p = attention.init(jax.random.key(1), x, x, None, None, True)["params"]
  r = lambda a: np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16), np.float64)  # a bfloat16 value
  q, k, v = (r(r(x) @ r(p[n]["kernel"])).reshape(2, 6, heads, head_dim) for n in ("query", "key", "value"))
  logits = np.einsum("bqhe,bkhe->bhqk", q, k)
  assert np.abs(logits).max() > 30
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  want = np.einsum("bhqk,bkhe->bqhe", weights, v).reshape(2, 6, -1) @ r(p["out"]["kernel"])
  got = np.asarray(attention.apply({"params": p}, x, x, None, None, True), np.float64)
  assert np.abs(got - want).max() < 0.008 * np.abs(want).max()  # rounded logits: 0.018


def test_attention_kernels_are_untruncated_normals_and_mlp_kernels_truncated():
  # T5X / flaxformer's T5: variance_scaling(1, 'fan_in', 'normal') for attention, 'truncated_normal' for the MLP.
  # A truncated normal of that variance never exceeds 2 / 0.8796 = 2.27 standard deviations; 256 x 256 draws from a
  # normal do (P(|z| > 3) = 0.27%: ~177 of them).
  d, heads, head_dim = 256, 4, 64
  x = jax.random.normal(KEY, (1, 2, d))
  p = attention_lib.MultiHeadAttention(heads, head_dim).init(KEY, x, x, None, None, True)["params"]
  for name, std in (("query", (d * head_dim) ** -0.5), ("key", d ** -0.5), ("value", d ** -0.5),
                    ("out", (heads * head_dim) ** -0.5)):
    assert np.abs(np.asarray(p[name]["kernel"])).max() / std > 3.0, name
  p = layers.MlpBlock(mlp_dim=256).init(KEY, x, True)["params"]
  assert np.abs(np.asarray(p["wi_0"]["kernel"])).max() / d ** -0.5 < 2.28


def test_attention_cache_shapes_and_single_step_updates():
  attention = attention_lib.MultiHeadAttention(2, 4, decode=True, decode_length=6)
  x = jax.random.normal(KEY, (3, 6, 8))
  variables = attention.init(KEY, x, x, None, None, True)
  cache = variables["cache"]
  assert cache["cached_key"].shape == cache["cached_value"].shape == (3, 6, 2, 4)
  assert int(cache["cache_index"]) == 0
  step = {"params": variables["params"], "cache": cache}
  _, mutated = attention.apply(step, x[:, :1], x[:, :1], None, None, True, mutable=["cache"])
  assert int(mutated["cache"]["cache_index"]) == 1
  assert np.abs(np.asarray(mutated["cache"]["cached_key"][:, 1:])).max() == 0  # only position 0 written
  # The next step writes at position 1: the cache holds both steps' keys, in order.
  step = {"params": variables["params"], "cache": mutated["cache"]}
  _, mutated = attention.apply(step, x[:, 1:2], x[:, 1:2], None, None, True, mutable=["cache"])
  keys = (np.asarray(x[:, :2]) @ np.asarray(variables["params"]["key"]["kernel"])).reshape(3, 2, 2, 4)
  np.testing.assert_allclose(mutated["cache"]["cached_key"][:, :2], keys, rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(mutated["cache"]["cached_key"][:, 2:])).max() == 0
  with pytest.raises(ValueError, match="one position per call"):
    attention.apply(step, x[:, :2], x[:, :2], None, None, True, mutable=["cache"])


@pytest.mark.parametrize("activations, kernels", [(("gelu", "linear"), {"wi_0", "wi_1", "wo"}),
                                                  (("relu",), {"wi", "wo"})])
def test_mlp_block(activations, kernels):
  mlp = layers.MlpBlock(mlp_dim=16, activations=activations)
  x = jax.random.normal(KEY, (2, 3, 8))
  variables = mlp.init(KEY, x, True)
  p = variables["params"]
  assert set(p) == kernels
  assert variables["params_axes"]["wo"]["kernel_axes"].names == ("mlp", "embed")
  if activations == ("gelu", "linear"):
    h = np.asarray(jax.nn.gelu(x @ p["wi_0"]["kernel"], approximate=True)) * np.asarray(x @ p["wi_1"]["kernel"])
  else:
    h = np.maximum(np.asarray(x @ p["wi"]["kernel"]), 0)
  np.testing.assert_allclose(mlp.apply(variables, x, True), h @ np.asarray(p["wo"]["kernel"]), rtol=1e-5, atol=1e-5)


def _gated_gelu_and_grads(f, gate, linear, probe):
  out, pull = jax.vjp(f, gate, linear)
  return (out, *pull(probe.astype(out.dtype)))


def test_gated_gelu_is_autodiffs_in_float32_and_rounds_once_in_bfloat16():
  gate, linear, probe = jax.random.normal(KEY, (3, 64, 48))
  autodiff = lambda a, b: jax.nn.gelu(a, approximate=True) * b
  want = _gated_gelu_and_grads(autodiff, gate, linear, probe)  # float32: the reference
  for got, ref in zip(_gated_gelu_and_grads(layers.gated_gelu, gate, linear, probe), want):
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)

  bf16 = [x.astype(jnp.bfloat16) for x in (gate, linear, probe)]
  on_bf16 = [jax.tree.map(lambda x: x.astype(jnp.float32), r)
             for r in (_gated_gelu_and_grads(layers.gated_gelu, *bf16), _gated_gelu_and_grads(autodiff, *bf16))]
  ours, per_op = on_bf16
  # The float32 computation on the bfloat16 inputs, rounded once (to within one bfloat16 step: the float32 values
  # may differ in their last bits, e.g. where the compiler fuses a multiply-add, and round the other way).
  wide = [x.astype(jnp.float32) for x in bf16]
  once = _gated_gelu_and_grads(autodiff, *wide)
  for got, ref in zip(ours, once):
    np.testing.assert_allclose(got, ref.astype(jnp.bfloat16).astype(jnp.float32), rtol=2**-7, atol=1e-30)
  # Autodiff's bfloat16 form rounds after every op: further from the float32 result than one rounding.
  error = lambda r: max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(r, once))
  assert error(ours) < error(per_op)


def test_activate_takes_gated_gelu_for_gelu_linear_and_multiplies_otherwise():
  x, y = jax.random.normal(KEY, (2, 4, 8))
  np.testing.assert_array_equal(layers.activate(("gelu", "linear"), (x, y)), layers.gated_gelu(x, y))
  np.testing.assert_array_equal(layers.activate(("relu",), (x,)), jax.nn.relu(x))
  np.testing.assert_array_equal(layers.activate(("relu", "linear"), (x, y)), jax.nn.relu(x) * y)


def test_masks():
  valid = jnp.array([[True, True, False]])
  np.testing.assert_array_equal(attention_lib.make_attention_mask(valid, valid)[0, 0],
                                [[1, 1, 0], [1, 1, 0], [0, 0, 0]])
  segments = jnp.array([[1, 1, 2]])
  np.testing.assert_array_equal(attention_lib.make_segment_mask(segments, segments)[0, 0],
                                [[1, 1, 0], [1, 1, 0], [0, 0, 1]])
  np.testing.assert_array_equal(attention_lib.make_causal_mask(3)[0, 0], [[1, 0, 0], [1, 1, 0], [1, 1, 1]])


def test_plain_gelu_is_the_tanh_approximation():
  # 'gelu' exports as Hugging Face's gelu_new: 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))).
  x = np.linspace(-4, 4, 33, dtype=np.float32)
  want = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
  np.testing.assert_allclose(layers.activate(("gelu",), (jnp.asarray(x),)), want, rtol=1e-6, atol=1e-6)


def test_relative_position_table_init_is_t5xs_fan_avg_uniform():
  # T5X / flaxformer: variance_scaling(1.0, 'fan_avg', 'uniform'), so U(-l, l) with l = sqrt(6 / (H + N)): never
  # beyond l, and spread up to it (a normal of the same variance passes l with probability 8%).
  heads, buckets = 16, 32
  table = np.asarray(layers.RelativePositionBias(heads).init(KEY, 4, 4, True)["params"]["rel_embedding"])
  limit = np.sqrt(6 / (heads + buckets))
  assert table.shape == (heads, buckets)
  assert np.abs(table).max() <= limit and np.abs(table).max() > 0.95 * limit


def test_rms_norm_default_epsilon_is_t5s():
  # T5 / T5X layer norm epsilon 1e-6: x = 1e-3 everywhere has mean square 1e-6, so y = 1e-3 / sqrt(2e-6) = 0.7071.
  x = jnp.full((1, 4), 1e-3)
  norm = layers.RMSNorm()
  np.testing.assert_allclose(norm.apply(norm.init(KEY, x), x), np.full((1, 4), 1 / np.sqrt(2)), rtol=1e-5)
