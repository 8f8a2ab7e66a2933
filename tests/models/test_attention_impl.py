"""T5Config.attention_implementation: jax.nn.dot_product_attention ('xla', 'cudnn') against the einsum path."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from repeat_lm.models import attention as attention_lib
from repeat_lm.models import layers, t5

KEY = jax.random.key(0)
B, S, T = 3, 6, 4  # batch, encoder length, decoder length
TINY = t5.T5Config(vocab_size=64, dtype="float32", emb_dim=16, num_heads=2, head_dim=8, num_encoder_layers=1,
                   num_decoder_layers=1, mlp_dim=32)


def make_batch(vocab_size: int, b: int, s: int, t: int) -> dict[str, jnp.ndarray]:
  """Tokens with trailing padding: rows 0 and 1 padded in the encoder, row 0 in the decoder (fully masked rows)."""
  rng = np.random.default_rng(0)
  enc, dec = rng.integers(1, vocab_size, (b, s)), rng.integers(1, vocab_size, (b, t))
  enc[0, s // 2:], enc[1, s - 1:], dec[0, t // 2:] = 0, 0, 0
  dec_in = np.concatenate([np.zeros((b, 1), int), dec[:, :-1]], axis=1)
  return {k: jnp.asarray(v, jnp.int32) for k, v in
          dict(encoder_input_tokens=enc, decoder_input_tokens=dec_in, decoder_target_tokens=dec).items()}


def loss_logits_grads(cfg: t5.T5Config, params, batch):
  """Loss over real targets, all logits [B, T, V], and d loss / d params (every one, relpos tables included)."""
  def loss(p):
    logits = t5.Transformer(cfg).apply({"params": p}, **batch, enable_dropout=False)
    # A loss that reaches every logit of every real target, not just one class.
    weights = (batch["decoder_target_tokens"] > 0)[..., None] * jnp.linspace(-1.0, 1.0, cfg.vocab_size)
    return jnp.sum(jax.nn.log_softmax(logits) * weights), logits
  (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return value, logits, traverse_util.flatten_dict(grads, sep="/")


@functools.cache
def tiny_params():
  batch = make_batch(TINY.vocab_size, B, S, T)
  return t5.Transformer(TINY).init(KEY, **batch, enable_dropout=False)["params"]


def assert_xla_equals_einsum(cfg: t5.T5Config, params, batch, grads_atol: float = 1e-6):
  """Run `cfg` with the einsum path and with 'xla'; the real positions' logits and every gradient must agree.

  Returns (einsum loss, xla loss, xla logits, xla gradients) for the caller's own checks.
  """
  loss_e, logits_e, grads_e = loss_logits_grads(cfg, params, batch)
  loss_x, logits_x, grads_x = loss_logits_grads(dataclasses.replace(cfg, attention_implementation="xla"), params,
                                                batch)
  real = np.asarray(batch["decoder_target_tokens"] > 0)
  np.testing.assert_allclose(np.asarray(logits_x)[real], np.asarray(logits_e)[real], rtol=1e-5, atol=1e-6)
  assert grads_x.keys() == grads_e.keys()
  for name in grads_e:
    np.testing.assert_allclose(grads_x[name], grads_e[name], rtol=1e-5, atol=grads_atol, err_msg=name)
  return loss_e, loss_x, logits_x, grads_x


def test_xla_equals_einsum_in_t5_logits_and_all_gradients():
  """Padding (encoder, decoder, cross) and causal masks, fully masked padding rows, the relative bias's gradient.

  Unpacked rows reach the kernel as lengths (padded query rows come out zero, not a uniform average: their logits
  differ, and no loss reads them); every gradient is the same.
  """
  batch = make_batch(TINY.vocab_size, B, S, T)
  assert not np.asarray(batch["decoder_target_tokens"] > 0).all()
  loss_e, loss_x, logits_x, grads_x = assert_xla_equals_einsum(TINY, tiny_params(), batch)
  assert np.isfinite(logits_x).all()  # padded rows included
  np.testing.assert_allclose(loss_x, loss_e, rtol=1e-5)
  for stack in ("encoder", "decoder"):  # the learned bias gets a real gradient through the library call
    assert np.abs(grads_x[f"{stack}/relpos_bias/rel_embedding"]).max() > 1e-3


def packed_batch(vocab_size: int) -> dict[str, jnp.ndarray]:
  """Two rows, each packing two examples (segments 1 and 2) before trailing padding, as T5X's packed features."""
  rng = np.random.default_rng(1)
  def pack(lengths, total):
    tokens, segments = np.zeros((len(lengths), total), int), np.zeros((len(lengths), total), int)
    for row, parts in enumerate(lengths):
      start = 0
      for segment, n in enumerate(parts, 1):
        tokens[row, start:start + n], segments[row, start:start + n] = rng.integers(2, vocab_size, n), segment
        start += n
    return tokens, segments
  enc, enc_seg = pack([(3, 2), (2, 4)], S)
  dec, dec_seg = pack([(2, 1), (2, 2)], T)
  dec_in = np.where(np.roll(dec_seg, 1, axis=1) == dec_seg, np.roll(dec, 1, axis=1), 0)  # each segment starts at 0
  return {k: jnp.asarray(v, jnp.int32) for k, v in
          dict(encoder_input_tokens=enc, decoder_input_tokens=dec_in, decoder_target_tokens=dec,
               encoder_segment_ids=enc_seg, decoder_segment_ids=dec_seg).items()}


def test_an_all_padding_row_gets_length_one_and_changes_nothing_else():
  """The all-zero rows of a final partial batch: finite, and the real rows' logits and all gradients as einsum's."""
  batch = make_batch(TINY.vocab_size, B, S, T)
  batch = {k: v.at[2].set(0) for k, v in batch.items()}  # row 2: no tokens at all
  np.testing.assert_array_equal(attention_lib.padding_lengths(batch["encoder_input_tokens"] > 0), [S // 2, S - 1, 1])
  loss_e, loss_x, logits_x, _ = assert_xla_equals_einsum(TINY, tiny_params(), batch)
  assert np.isfinite(logits_x).all() and np.isfinite(loss_x)
  np.testing.assert_allclose(loss_x, loss_e, rtol=1e-5)


def test_xla_equals_einsum_in_a_scanned_rematerialised_stack():
  """The lengths ride through nn.scan (as broadcast inputs) and remat like the masks."""
  cfg = dataclasses.replace(TINY, num_encoder_layers=2, num_decoder_layers=2, scan_layers=True,
                            remat_policy="minimal")
  batch = make_batch(cfg.vocab_size, B, S, T)
  params = t5.Transformer(cfg).init(KEY, **batch, enable_dropout=False)["params"]
  # Two layers of float32 rounding: gradients differ by a few 1e-6 absolute.
  assert_xla_equals_einsum(cfg, params, batch, grads_atol=1e-5)


def test_xla_equals_einsum_on_packed_rows():
  """Packed examples keep the boolean (segment) mask in the library call, and match the einsum path."""
  assert_xla_equals_einsum(TINY, tiny_params(), packed_batch(TINY.vocab_size))


def library_calls(monkeypatch, batch, cfg: t5.T5Config = TINY) -> list[dict]:
  """The arguments of every jax.nn.dot_product_attention call of one 'xla' forward pass (encoder layer first,
  then the decoder layer's self- and cross-attention)."""
  calls, original = [], jax.nn.dot_product_attention
  def spy(q, k, v, bias=None, mask=None, **kwargs):
    calls.append(dict(kwargs, bias=bias, mask=mask))
    return original(q, k, v, bias, mask, **kwargs)
  monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
  cfg = dataclasses.replace(cfg, attention_implementation="xla")
  t5.Transformer(cfg).apply({"params": tiny_params()}, **batch, enable_dropout=False)
  return calls


def test_unpacked_rows_reach_the_kernel_as_lengths_with_the_bias_unbroadcast(monkeypatch):
  """No [B, H, Q, K] bias + mask for cuDNN to read and return a gradient of: the [1, H, Q, K] bias as it is."""
  batch = make_batch(TINY.vocab_size, B, S, T)
  encoder, self_attention, cross = library_calls(monkeypatch, batch)
  enc_lengths, dec_lengths = [np.sum(np.asarray(batch[k]) > 0, axis=1) for k in
                              ("encoder_input_tokens", "decoder_target_tokens")]
  assert enc_lengths.tolist() == [S // 2, S - 1, S] and dec_lengths.tolist() == [T // 2, T, T]
  for call, bias_shape, (q_len, k_len), causal in (
      (encoder, (1, TINY.num_heads, S, S), (enc_lengths, enc_lengths), False),
      (self_attention, (1, TINY.num_heads, T, T), (dec_lengths, dec_lengths), True),
      (cross, None, (dec_lengths, enc_lengths), False)):
    assert call["mask"] is None
    assert (call["bias"] is None if bias_shape is None else call["bias"].shape == bias_shape)
    np.testing.assert_array_equal(call["query_seq_lengths"], q_len)
    np.testing.assert_array_equal(call["key_value_seq_lengths"], k_len)
    assert call["is_causal"] is causal


def test_packed_rows_and_the_opt_out_reach_the_kernel_as_a_mask(monkeypatch):
  for call in library_calls(monkeypatch, packed_batch(TINY.vocab_size)):
    assert call["mask"] is not None and "query_seq_lengths" not in call and "is_causal" not in call
  opt_out = dataclasses.replace(TINY, attention_padding_lengths=False)
  for call in library_calls(monkeypatch, make_batch(TINY.vocab_size, B, S, T), opt_out):
    assert call["mask"] is not None and "query_seq_lengths" not in call


CUDNN_CALL = re.compile(r"custom_call @__cudnn\$(\w+)\((?:.*?)\) \{.*?mask_type\\22: \\22(\w+)\\22.*?\} : "
                        r"\((.*?)\) -> \((.*?)\)")


def cuda_program(monkeypatch, cfg: t5.T5Config) -> tuple[str, list[tuple[str, str, list[str], list[str]]]]:
  """The training gradient's StableHLO as lowered for an NVIDIA GPU, from this CPU process, and its cuDNN calls
  (kernel, mask type, operand types, result types) in program order.

  jax lowers cuDNN attention without a GPU once its cuDNN version probe is answered (in jax 0.10.2 the version
  gates only multi-latent attention and compute capability 10.3, neither T5's), and `default_backend` reads 'gpu'
  so the model takes its GPU paths (no CPU layouts).
  """
  try:
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_lowering
  except ImportError:
    pytest.skip("this jax has no jax._src.cudnn.fused_attention_stablehlo to lower cuDNN attention without a GPU")
  if not hasattr(cudnn_lowering, "check_cudnn_version"):
    pytest.skip("this jax's cuDNN lowering has no check_cudnn_version to answer without a GPU")
  monkeypatch.setattr(cudnn_lowering, "check_cudnn_version", lambda: 91000)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  batch = make_batch(cfg.vocab_size, B, S, T)
  def loss(params):
    return jnp.sum(t5.Transformer(cfg).apply({"params": params}, **batch, enable_dropout=False).astype(jnp.float32))
  text = jax.jit(jax.grad(loss)).trace(tiny_params()).lower(lowering_platforms=("cuda",)).as_text()
  split = lambda types: re.findall(r"tensor<([^>]*)>", types)
  return text, [(m[1], m[2], split(m[3]), split(m[4])) for m in CUDNN_CALL.finditer(text)]


def test_the_gpu_program_gives_cudnn_lengths_and_the_unbroadcast_bias(monkeypatch):
  """What the GPU would run, checked here: cuDNN masks the padding itself (PADDING, PADDING_CAUSAL in the
  decoder's self-attention) from the lengths, reads the [1, H, Q, K] bias and returns its [1, H, Q, K] gradient,
  and no [B, H, Q, K] tensor is left in the program. The opt-out (attention_padding_lengths=False) is the peer
  that shows the check can fail: jax folds the mask into [B, H, Q, K] biases, cuDNN gets NO_MASK."""
  cfg = dataclasses.replace(TINY, dtype="bfloat16", attention_implementation="cudnn")
  h = cfg.num_heads
  text, calls = cuda_program(monkeypatch, cfg)
  q_kv = lambda q, k: [f"{B}x{q}x{h}x8xbf16", f"{B}x{k}x{h}x8xbf16", f"{B}x{k}x{h}x8xbf16"]
  lengths = [f"{B}xi32", f"{B}xi32"]
  assert [c[:3] for c in calls if not c[0].endswith("Backward")] == [
      ("fmhaScaleBiasSoftmax", "PADDING", q_kv(S, S) + [f"1x{h}x{S}x{S}xbf16"] + lengths),
      ("fmhaScaleBiasSoftmax", "PADDING_CAUSAL", q_kv(T, T) + [f"1x{h}x{T}x{T}xbf16"] + lengths),
      ("fmhaSoftmax", "PADDING", q_kv(T, S) + lengths)]
  backward = {(kernel, mask): results for kernel, mask, _, results in calls if kernel.endswith("Backward")}
  assert backward.keys() == {("fmhaScaleBiasSoftmaxBackward", "PADDING"),
                             ("fmhaScaleBiasSoftmaxBackward", "PADDING_CAUSAL"), ("fmhaSoftmaxBackward", "PADDING")}
  # dq, dk, dv, then the bias gradient, already summed over the batch by cuDNN.
  assert backward["fmhaScaleBiasSoftmaxBackward", "PADDING"][3] == f"1x{h}x{S}x{S}xbf16"
  assert backward["fmhaScaleBiasSoftmaxBackward", "PADDING_CAUSAL"][3] == f"1x{h}x{T}x{T}xbf16"
  full = [rf"tensor<{B}x{h}x{q}x{k}x" for q, k in ((S, S), (T, T), (T, S))]
  assert not any(re.search(pattern, text) for pattern in full)

  text, calls = cuda_program(monkeypatch, dataclasses.replace(cfg, attention_padding_lengths=False))
  assert {mask for _, mask, _, _ in calls} == {"NO_MASK"}
  assert re.search(full[0], text) and re.search(full[1], text)


def test_xla_attention_layer_equals_einsum_with_bias_mask_and_fully_masked_rows():
  heads, head_dim, q_len, k_len = 2, 8, 4, 6
  x_q = jax.random.normal(KEY, (2, q_len, 16))
  x_kv = jax.random.normal(jax.random.key(1), (2, k_len, 16))
  bias = jax.random.normal(jax.random.key(2), (1, heads, q_len, k_len))
  mask = attention_lib.make_attention_mask(jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool),
                                    jnp.array([[1, 1, 1, 1, 0, 0], [1] * 6], bool))
  mask &= jnp.tril(jnp.ones((q_len, k_len), bool), k=2)[None, None]  # a causal-style band too
  einsum = attention_lib.MultiHeadAttention(heads, head_dim)
  xla = attention_lib.MultiHeadAttention(heads, head_dim, implementation="xla")
  params = einsum.init(KEY, x_q, x_kv, bias, mask, True)["params"]

  # The loss reads the rows that see a key: a fully masked row's output is a placeholder whose gradient is a
  # convention (the select in 'xla' stops it, the einsum path's additive mask passes it), and no model loss reads one.
  sees_a_key_BxQx1 = jnp.any(mask, axis=-1)[:, 0, :, None]
  assert not sees_a_key_BxQx1.all()

  def out_and_grads(module):
    out = lambda p, b: module.apply({"params": p}, x_q, x_kv, b, mask, True)
    f = lambda p, b: jnp.sum(jnp.where(sees_a_key_BxQx1, jnp.sin(out(p, b)), 0.0))
    return module.apply({"params": params}, x_q, x_kv, bias, mask, True), jax.grad(f, argnums=(0, 1))(params, bias)

  out_e, (grads_e, dbias_e) = out_and_grads(einsum)
  out_x, (grads_x, dbias_x) = out_and_grads(xla)
  assert np.isfinite(out_x).all()  # row 0, query 3 sees no key at all
  np.testing.assert_allclose(out_x, out_e, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dbias_x, dbias_e, rtol=1e-5, atol=1e-6)
  assert np.abs(dbias_x).max() > 1e-3
  for a, b in zip(jax.tree.leaves(grads_x), jax.tree.leaves(grads_e)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_cached_decoding_runs_einsum_and_matches():
  """With 'xla' the encoder uses the library and the cached decoder the einsum path; steps equal the einsum config."""
  batch, params = make_batch(TINY.vocab_size, B, S, T), tiny_params()
  logits = {}
  for impl in (None, "xla"):
    model = t5.Transformer(dataclasses.replace(TINY, attention_implementation=impl))
    cache = model.init(KEY, **batch, enable_dropout=False, decode=True)["cache"]
    encoded = model.apply({"params": params}, batch["encoder_input_tokens"], enable_dropout=False, method="encode")
    token = jnp.zeros((B, 1), jnp.int32)
    logits[impl], _ = model.apply({"params": params, "cache": cache}, encoded, batch["encoder_input_tokens"], token,
                                  token, enable_dropout=False, decode=True, mutable=["cache"], method="decode")
  np.testing.assert_allclose(logits["xla"], logits[None], rtol=1e-5, atol=1e-6)


def test_attention_dropout_is_refused():
  with pytest.raises(ValueError, match="attention_dropout_rate=0 or attention_implementation=None"):
    dataclasses.replace(TINY, attention_implementation="xla", dropout_rate=0.1)
  # Other dropout places are fine once the attention rate is 0.
  dataclasses.replace(TINY, attention_implementation="xla", dropout_rate=0.1, attention_dropout_rate=0.0)
  attention = attention_lib.MultiHeadAttention(2, 8, dropout_rate=0.1, implementation="xla")
  x = jax.random.normal(KEY, (2, 4, 16))
  variables = attention.init(KEY, x, x, None, None, True)
  attention.apply(variables, x, x, None, None, True)  # deterministic: no dropout to drop
  with pytest.raises(ValueError, match="attention_dropout_rate=0 or attention_implementation=None"):
    attention.apply(variables, x, x, None, None, False, rngs={"dropout": KEY})


def test_unknown_implementation_is_refused():
  with pytest.raises(ValueError, match="attention_implementation='flash'"):
    dataclasses.replace(TINY, attention_implementation="flash")


@pytest.mark.parametrize("kwargs, match", [
    (dict(head_dim=64, dtype=jnp.float32, q_len=8, k_len=8), "bfloat16 or float16"),
    (dict(head_dim=12, dtype=jnp.bfloat16, q_len=8, k_len=8), "multiple of 8"),
    (dict(head_dim=264, dtype=jnp.bfloat16, q_len=8, k_len=8), "at most 256"),
    (dict(head_dim=256, dtype=jnp.bfloat16, q_len=8, k_len=8, max_head_dim=128), "at most 128"),
    (dict(head_dim=64, dtype=jnp.bfloat16, q_len=7, k_len=8), "even query and key lengths"),
    (dict(head_dim=64, dtype=jnp.float16, q_len=8, k_len=1), "even query and key lengths"),
    (dict(head_dim=64, dtype=jnp.bfloat16, q_len=8, k_len=6), None),
    (dict(head_dim=64, dtype=jnp.bfloat16), None),  # config time: lengths unknown
])
def test_cudnn_restrictions(kwargs, match):
  reason = attention_lib.cudnn_attention_restriction(**kwargs)
  if match is None:
    assert reason is None
  else:
    assert match in reason


def test_cudnn_restrictions_are_enforced_at_config_and_trace_time():
  with pytest.raises(ValueError, match="cudnn.*bfloat16 or float16"):
    dataclasses.replace(TINY, attention_implementation="cudnn")  # TINY is float32
  with pytest.raises(ValueError, match="cudnn.*multiple of 8"):
    dataclasses.replace(TINY, dtype="bfloat16", head_dim=12, attention_implementation="cudnn")
  attention = attention_lib.MultiHeadAttention(2, 8, dtype=jnp.bfloat16, implementation="cudnn")
  x = jax.random.normal(KEY, (2, 5, 16))
  variables = attention.init(KEY, x, x, None, None, True)  # init runs the einsum path: no GPU needed
  mask = jnp.ones((2, 1, 5, 5), bool)
  with pytest.raises(ValueError, match="even query and key lengths, got Q=5, K=5"):
    attention.apply(variables, x, x, None, mask, True)
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
      attention.apply(variables, x[:, :4], x[:, :4], None, mask[:, :, :4, :4], True)


@pytest.mark.parametrize("capability, max_head_dim", [("8.0", 128), ("8.9", 128), ("9.0", 256), ("10.0", 256)])
def test_cudnn_head_dim_limit_follows_the_gpu_generation(monkeypatch, capability, max_head_dim):
  """cuDNN's flash attention takes head_dim up to 256 from Hopper (compute capability 9.0) on, 128 on Ampere / Ada
  (jax's check_is_flash_attention); "10.0" must compare as a version, not as a string."""
  class Gpu:
    compute_capability = capability
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "devices", lambda *a: [Gpu()])
  assert attention_lib._cudnn_max_head_dim() == max_head_dim


def relative_error(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


@pytest.mark.accelerator
def test_cudnn_is_as_accurate_as_xla_in_bfloat16_with_bias_gradients():
  """Run on a GPU with `JAX_PLATFORMS=cuda pytest -q -m accelerator tests/models/test_attention_impl.py`.

  Both bfloat16 kernels are measured against the float32 einsum model with the same parameters: cuDNN must be about
  as close to it as XLA's kernel, in the real logits and in every parameter gradient, the relative-position tables
  (whose gradient is cuDNN's dbias) included. (Comparing the two bfloat16 runs' summed losses directly is
  ill-conditioned: the test loss cancels, and on an H200 the two differed by 3.7% with every logit close.)
  """
  if jax.default_backend() != "gpu":
    pytest.skip("cuDNN attention needs an NVIDIA GPU (tests default to JAX_PLATFORMS=cpu; set JAX_PLATFORMS=cuda)")
  b, s, t = 4, 16, 8  # even lengths: cuDNN's backward with a bias needs them
  cfg = t5.T5Config(vocab_size=128, dtype="bfloat16", emb_dim=64, num_heads=4, head_dim=16, num_encoder_layers=2,
                    num_decoder_layers=2, mlp_dim=128)
  batch = make_batch(cfg.vocab_size, b, s, t)
  params = t5.Transformer(cfg).init(KEY, **batch, enable_dropout=False)["params"]
  _, logits_r, grads_r = loss_logits_grads(dataclasses.replace(cfg, dtype="float32"), params, batch)
  _, logits_x, grads_x = loss_logits_grads(dataclasses.replace(cfg, attention_implementation="xla"), params, batch)
  _, logits_c, grads_c = loss_logits_grads(dataclasses.replace(cfg, attention_implementation="cudnn"), params,
                                           batch)
  assert np.isfinite(logits_c).all()  # padded (fully masked) rows included
  real = np.asarray(batch["decoder_target_tokens"] > 0)
  errors = {"logits": (relative_error(np.asarray(logits_c)[real], np.asarray(logits_r)[real]),
                       relative_error(np.asarray(logits_x)[real], np.asarray(logits_r)[real]))}
  for name in grads_r:
    assert np.isfinite(grads_c[name]).all(), name
    errors[name] = relative_error(grads_c[name], grads_r[name]), relative_error(grads_x[name], grads_r[name])
  for name, (cudnn, xla) in errors.items():  # bfloat16 rounding: a few 1e-3 to 1e-2
    assert cudnn < max(3 * xla, 3e-2), (name, cudnn, xla)
  for stack in ("encoder", "decoder"):  # cuDNN really returns the bias gradient, not zeros
    assert np.abs(grads_c[f"{stack}/relpos_bias/rel_embedding"]).max() > 1e-3
