"""Multi-head attention of the T5 v1.1 encoder-decoder: masks, the shared relative-bias add, the einsum kernel and
jax.nn.dot_product_attention ('xla' | 'cudnn') with cuDNN's restrictions, and the decoding cache.

Shape letters as in layers.py: B batch, Q query length, K key length, L cache length, H heads, E head_dim, D emb_dim.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from repeat_lm.models import cpu_layouts
from repeat_lm.models.layers import Array, DenseGeneral, DType, dropout

# Masked logits get this value rather than -inf, so a fully masked (padding) row gives a finite, uniform softmax.
NEG_INF = -1e10


def masked_logit(dtype: DType) -> float:
  """NEG_INF, or half the lowest finite value of a logits dtype too narrow to hold it (float16: -32752).

  In float16 -1e10 rounds to -inf: a fully masked (padding) row's softmax is then NaN, and weights @ v spreads it to
  every position of the next layer through the 0 weight on that masked key (0 x NaN = NaN).
  """
  return max(NEG_INF, float(jnp.finfo(dtype).min) / 2)


# MultiHeadAttention's kernels: None is its own einsum path; the others name jax.nn.dot_product_attention's backends.
ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn")
# T5X's and flaxformer's T5 (1.0 and 1.1) attention kernels: an untruncated normal of variance 1 / fan_in, where their
# MLP and logits kernels are truncated (layers.default_kernel_init).
attention_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")


@jax.custom_vjp
def add_shared_bias(logits_BxHxQxK: Array, bias_1xHxQxK: Array) -> Array:
  """logits + bias (broadcast over the batch), with the bias gradient summed over the batch as a matmul.

  The plain broadcast's gradient is a reduction that XLA:CPU merged across all layers into one strided pass over
  every layer's [B, H, Q, K] logits gradient (~0.2 s of a 3.5 s T5-small step); a matmul with a ones vector per
  layer streams each gradient while it is hot (3.54 -> 3.33 s). Same values, same sum, a different kernel.
  """
  return logits_BxHxQxK + bias_1xHxQxK


def _add_shared_bias_fwd(logits_BxHxQxK, bias_1xHxQxK):
  return logits_BxHxQxK + bias_1xHxQxK, None


def _add_shared_bias_bwd(_, g_BxHxQxK):
  return g_BxHxQxK, cpu_layouts.batch_sum(g_BxHxQxK).astype(g_BxHxQxK.dtype)


add_shared_bias.defvjp(_add_shared_bias_fwd, _add_shared_bias_bwd)


def make_attention_mask(query_valid_BxQ: Array, key_valid_BxK: Array) -> Array:
  """Pairwise mask [B, 1, Q, K] (the 1 broadcasts over heads) from per-position validity."""
  return query_valid_BxQ[:, None, :, None] & key_valid_BxK[:, None, None, :]


def make_segment_mask(query_segments_BxQ: Array, key_segments_BxK: Array) -> Array:
  """Packed examples only attend within their own segment: [B, 1, Q, K]."""
  return query_segments_BxQ[:, None, :, None] == key_segments_BxK[:, None, None, :]


def padding_lengths(valid_BxL: Array) -> Array:
  """Lengths [B] (int32) of right-padded rows from per-position validity: the count of valid positions, at least 1.
  Only a mask that is nothing but right padding (T5's unpacked examples) is described by them; packing is not.

  An all-padding row (the zero rows that fill a final partial batch) gets length 1, so it attends to its first
  position rather than to nothing: finite either way, no loss reads it, and no kernel is asked for an empty sequence.
  """
  return jnp.maximum(jnp.sum(valid_BxL, axis=-1, dtype=jnp.int32), 1)


def make_causal_mask(length: int) -> Array:
  """[1, 1, T, T], true where key position <= query position."""
  positions = jnp.arange(length)
  return (positions[None, :] <= positions[:, None])[None, None]


def cudnn_attention_restriction(head_dim: int, dtype: DType, q_len: int | None = None, k_len: int | None = None,
                                max_head_dim: int = 256) -> str | None:
  """The restriction of jax.nn.dot_product_attention(implementation='cudnn') that T5 attention breaks, or None.

  Checked for training with a bias or mask (T5 always has one: the relative position bias in self-attention, the
  padding mask in cross-attention; jax folds a boolean mask into the bias). From jax 0.10.2's
  jax/_src/cudnn/fused_attention_stablehlo.py (check_layout, check_is_flash_attention) and cudnn-frontend's
  sdpa_backward validation; docs/models.md has the list. Lengths None (config time) skip the length check.
  """
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return (f"cuDNN takes q/k/v and the bias in bfloat16 or float16 only (T5Config.dtype), got "
            f"{jnp.dtype(dtype).name}")
  if head_dim % 8 or head_dim > max_head_dim:
    return (f"cuDNN needs head_dim a multiple of 8 and at most {max_head_dim} (256 from Hopper on, 128 before), got "
            f"{head_dim}")
  if q_len is not None and k_len is not None and (q_len % 2 or k_len % 2):
    # jax raises only under differentiation; whether gradients follow is unknown here, so this is always checked.
    return (f"cuDNN's backward pass with a bias (or mask) needs even query and key lengths, got Q={q_len}, "
            f"K={k_len}; pad the feature lengths to even numbers")
  return None


class MultiHeadAttention(nn.Module):
  """Multi-head dot-product attention without 1/sqrt(E) in the forward pass (folded into the query init, as T5).

  With `decode=True` (self-attention in the decoder) keys and values go to a `cache` collection: the first call
  (cache absent, full-length inputs) creates zero `cached_key`/`cached_value` [B, L, H, E] and `cache_index`; each
  later call takes one query position, writes its key/value at `cache_index` and attends over the whole cache. The
  caller provides the matching mask (keys <= index) and bias row, since it owns positions.

  `lengths` (query lengths [B], key lengths [B]; None when packed) may describe the mask as right padding
  (positions below the lengths, intersected with causality when `causal`): the library path then passes them and
  `is_causal` instead of the boolean mask, so cuDNN takes T5's [1, H, Q, K] bias as it is. With a boolean mask jax
  adds the two into one [B, H, Q, K] bias in HBM per layer, and cuDNN returns its [B, H, Q, K] gradient for jax to
  sum over the batch. Rows past a query length then come out zero (jax's XLA kernel zeroes them) rather than a
  uniform average; no loss reads them. The einsum path always uses the mask.

  `implementation` None runs the einsum path below. 'xla' or 'cudnn' call jax.nn.dot_product_attention with
  scale=1.0; it computes logits in float32 whatever `float32_logits` says, has no attention dropout (an error with a
  rate > 0 when not deterministic), and 'cudnn' takes the bias in `dtype` (see cudnn_attention_restriction). With
  decode=True, and during init (parameters are the same), the einsum path runs: one cached query position gains
  nothing from a fused kernel, and cuDNN's lengths would be odd.
  """
  num_heads: int
  head_dim: int
  dtype: DType = jnp.float32
  dropout_rate: float = 0.0
  float32_logits: bool = True
  decode: bool = False
  decode_length: int | None = None  # cache length L; defaults to the key length of the first (init) call
  implementation: str | None = None  # one of ATTENTION_IMPLEMENTATIONS
  causal: bool = False  # the mask is causal (decoder self-attention); read only with `lengths`
  dropout_broadcast_length: bool = False  # one attention-dropout draw for every query (T5X's broadcast_dropout)

  @nn.compact
  def __call__(self, inputs_q_BxQxD: Array, inputs_kv_BxKxD: Array, bias_1xHxQxK: Array | None,
               mask_Bx1xQxK: Array | None, deterministic: bool, dropout_scale: Array | float = 1.0,
               lengths: tuple[Array, Array] | None = None) -> Array:
    if self.implementation not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"implementation={self.implementation!r}; choose from {ATTENTION_IMPLEMENTATIONS}.")
    projection = lambda name, init=attention_kernel_init: DenseGeneral(
        (self.num_heads, self.head_dim), kernel_axes=("embed", "joined_kv"), dtype=self.dtype, kernel_init=init,
        name=name)
    # T5 scales the query init instead of the logits; at the same init this equals dividing q.k by sqrt(E).
    query_init = lambda *a: attention_kernel_init(*a) / np.sqrt(self.head_dim).astype(np.float32)
    heads_axes = ("batch", "length", "heads", "kv")
    q_BxQxHxE = nn.with_logical_constraint(projection("query", query_init)(inputs_q_BxQxD), heads_axes)
    k_BxKxHxE = nn.with_logical_constraint(projection("key")(inputs_kv_BxKxD), heads_axes)
    v_BxKxHxE = nn.with_logical_constraint(projection("value")(inputs_kv_BxKxD), heads_axes)

    if self.decode:
      k_BxKxHxE, v_BxKxHxE = self._update_cache(k_BxKxHxE, v_BxKxHxE)

    if self.implementation is None or self.decode or self.is_initializing():
      out_BxQxHxE = self._einsum_attention(q_BxQxHxE, k_BxKxHxE, v_BxKxHxE, bias_1xHxQxK, mask_Bx1xQxK,
                                           deterministic, dropout_scale)
    else:
      out_BxQxHxE = self._library_attention(q_BxQxHxE, k_BxKxHxE, v_BxKxHxE, bias_1xHxQxK, mask_Bx1xQxK,
                                            deterministic, lengths)
    out_BxQxHxE = nn.with_logical_constraint(out_BxQxHxE, heads_axes)
    out_BxQxD = DenseGeneral(inputs_q_BxQxD.shape[-1], kernel_axes=("joined_kv", "embed"), num_in_axes=2,
                             dtype=self.dtype, kernel_init=attention_kernel_init, name="out")(out_BxQxHxE)
    return nn.with_logical_constraint(out_BxQxD, ("batch", "length", "embed"))

  def _einsum_attention(self, q_BxQxHxE: Array, k_BxKxHxE: Array, v_BxKxHxE: Array, bias_1xHxQxK: Array | None,
                        mask_Bx1xQxK: Array | None, deterministic: bool, dropout_scale: Array | float) -> Array:
    logits_dtype = jnp.float32 if self.float32_logits else self.dtype
    # The CPU core's dots take q and k in the activation dtype and accumulate in float32 (cpu_layouts.wide_matmul):
    # the float32 logits of float32 copies, since widening a bfloat16 value is exact, at bfloat16 dot speed. Logits
    # kept in the activation dtype (float32_logits=False) are the einsum path's.
    cpu_core = cpu_layouts.explicit_transposes() and self.float32_logits
    qk_dtype = self.dtype if cpu_core else logits_dtype
    q_BxQxHxE, k_BxKxHxE = q_BxQxHxE.astype(qk_dtype), k_BxKxHxE.astype(qk_dtype)
    v_BxKxHxE = v_BxKxHxE.astype(self.dtype)
    # An additive mask, as T5X's, not a select of the logits: the backward pass is then the identity on the
    # logits, where the select cost XLA:CPU a pass over [B, H, Q, K] per layer (0.16 s of the 3.4 s T5 v1.1
    # small step). In float32 -1e10 absorbs any logit under 512 in magnitude, so masked logits still become one
    # constant; masked keys get weight exactly 0, hence gradient 0, as with the select. float16 logits take a
    # finite stand-in (masked_logit).
    additive_mask = (None if mask_Bx1xQxK is None
                     else jnp.where(mask_Bx1xQxK, 0.0, masked_logit(logits_dtype)).astype(logits_dtype))
    bias = None if bias_1xHxQxK is None else bias_1xHxQxK.astype(logits_dtype)
    # Both paths drop out attention weights, as T5 (Mesh TF), T5X and Hugging Face do.
    if cpu_core:  # the same values; every backward dot in YNNPACK's form (cpu_layouts.py)
      heads_major = cpu_layouts.swapped_heads  # [B, L, H, E] <-> [B, H, L, E], row-major both ways
      batch, q_len, heads = q_BxQxHxE.shape[:3]
      k_len = k_BxKxHxE.shape[1]
      # Cache-sized batch slices (cpu_layouts.attention_batch_chunks); with attention dropout one slice, so the
      # dropout mask is drawn as on every other path.
      dropping = self.dropout_rate > 0.0 and not deterministic
      chunks = 1 if dropping else cpu_layouts.attention_batch_chunks(batch, heads, q_len, k_len)
      rows = batch // chunks  # the chunk count divides the batch
      outs = []
      # A mask shared by the batch ([1, 1, Q, K]) serves every slice as it is.
      masks = (additive_mask,) * chunks if additive_mask is None or additive_mask.shape[0] == 1 else (
          cpu_layouts.batch_slices(additive_mask, rows))
      for q, k, v, mask in zip(*(cpu_layouts.batch_slices(x, rows) for x in (q_BxQxHxE, k_BxKxHxE, v_BxKxHxE)),
                               masks):
        # Each slice goes to heads-major and back on its own, and the float32 products are rounded once, joined:
        # alone, moving T5-small's [8, 6, 512, 64] encoder output that way took 0.21 ms against 1.34 for the whole
        # batch's bfloat16 transpose; inside the step the two were within the noise of 6 interleaved rounds.
        q, k, v = heads_major(q), heads_major(k), heads_major(v)
        # The weights come back in q's dtype, self.dtype here (qk_dtype above).
        weights_BxHxQxK = dropout(cpu_layouts.attention_weights(q, k, bias, mask), self.dropout_rate, deterministic,
                                  dropout_scale, self.dropout_broadcast_length)
        outs.append(heads_major(cpu_layouts.attention_values(weights_BxHxQxK, v)))
      return (outs[0] if chunks == 1 else jnp.concatenate(outs)).astype(self.dtype)
    logits_BxHxQxK = jnp.einsum("bqhe,bkhe->bhqk", q_BxQxHxE, k_BxKxHxE)
    if bias is not None:
      logits_BxHxQxK = add_shared_bias(logits_BxHxQxK, bias)
    if additive_mask is not None:
      logits_BxHxQxK = logits_BxHxQxK + additive_mask
    weights_BxHxQxK = jax.nn.softmax(logits_BxHxQxK.astype(jnp.float32), axis=-1).astype(self.dtype)
    weights_BxHxQxK = dropout(weights_BxHxQxK, self.dropout_rate, deterministic, dropout_scale,
                              self.dropout_broadcast_length)
    return jnp.einsum("bhqk,bkhe->bqhe", weights_BxHxQxK, v_BxKxHxE)

  def _library_attention(self, q_BxQxHxE: Array, k_BxKxHxE: Array, v_BxKxHxE: Array, bias_1xHxQxK: Array | None,
                         mask_Bx1xQxK: Array | None, deterministic: bool,
                         lengths: tuple[Array, Array] | None) -> Array:
    """jax.nn.dot_product_attention; on unmasked rows it equals the einsum path with float32 logits.

    Every path turns masked logits into one constant after adding the bias (adding -1e10 there; -0.7 x float32 max
    in 'xla'; -2**41 in 'cudnn', added in bfloat16 and so swamping the bias), so a fully masked (padding) row is a
    uniform softmax everywhere: finite, and without effect on the loss. (Such a row's own gradient differs: zero
    from the selects here, passed through the einsum path's addition; the model's loss never depends on one.)
    """
    if self.dropout_rate > 0.0 and not deterministic:
      raise ValueError(f"attention implementation {self.implementation!r} (jax.nn.dot_product_attention) has no "
                       f"attention-probability dropout, but the rate is {self.dropout_rate}: set "
                       "attention_dropout_rate=0 or attention_implementation=None.")
    bias = bias_1xHxQxK
    if self.implementation == "cudnn":
      # Without a bias or mask the lengths are free; T5 always has one of them.
      masked = bias_1xHxQxK is not None or mask_Bx1xQxK is not None or lengths is not None
      sizes = (q_BxQxHxE.shape[1], k_BxKxHxE.shape[1]) if masked else (None, None)
      reason = cudnn_attention_restriction(self.head_dim, self.dtype, *sizes, max_head_dim=_cudnn_max_head_dim())
      if reason is None and jax.default_backend() != "gpu":
        reason = f"cuDNN attention needs an NVIDIA GPU, the default backend is {jax.default_backend()!r}; use 'xla'"
      if reason is not None:
        raise ValueError(f"attention_implementation='cudnn': {reason}.")
      if bias is not None:  # cuDNN adds the bias in the q/k/v dtype; a float32 bias gave NaN gradients (jax #32242)
        bias = bias.astype(self.dtype)
    # q/k/v in the activation dtype, as the einsum path's weights @ v; the library takes q.k in float32 itself.
    q, k, v = (x.astype(self.dtype) for x in (q_BxQxHxE, k_BxKxHxE, v_BxKxHxE))
    if lengths is None:
      return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask_Bx1xQxK, scale=1.0,
                                          implementation=self.implementation)
    query_lengths_B, key_lengths_B = lengths
    return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=1.0, is_causal=self.causal,
                                        query_seq_lengths=query_lengths_B, key_value_seq_lengths=key_lengths_B,
                                        implementation=self.implementation)

  def _update_cache(self, k_BxQxHxE: Array, v_BxQxHxE: Array) -> tuple[Array, Array]:
    """Create the cache (first call) or write this step's key/value and return the full cached keys/values."""
    is_initialized = self.has_variable("cache", "cached_key")
    batch, length, heads, head_dim = k_BxQxHxE.shape
    cache_shape = (batch, self.decode_length or length, heads, head_dim)
    cached_key = self.variable("cache", "cached_key", jnp.zeros, cache_shape, self.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, cache_shape, self.dtype)
    cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))
    if not is_initialized:  # init call: shapes only; attend over the given (full-length) keys as usual
      return k_BxQxHxE, v_BxQxHxE
    if length != 1:
      raise ValueError(f"Cached decoding takes one position per call, got {length}.")
    index = cache_index.value
    start = (0, index, 0, 0)
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, k_BxQxHxE.astype(self.dtype), start)
    cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, v_BxQxHxE.astype(self.dtype), start)
    cache_index.value = index + 1
    return cached_key.value, cached_value.value


def _cudnn_max_head_dim() -> int:
  """cuDNN's largest head_dim on this GPU: 256 from Hopper (compute capability 9.0) on, 128 before."""
  capability = getattr(jax.devices()[0], "compute_capability", None) if jax.default_backend() == "gpu" else None
  if capability is None:
    return 256
  return 256 if tuple(int(x) for x in str(capability).split(".")[:2]) >= (9, 0) else 128
