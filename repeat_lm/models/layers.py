"""Building blocks of the T5 v1.1 encoder-decoder: norm, projections, relative position bias, attention, MLP.

Shape letters: B batch, S encoder length, T decoder length, Q query length, K key length, L cache (maximum decode)
length, D emb_dim, H heads, E head_dim, F mlp_dim, V vocab, N buckets.

Every parameter is float32 and created with `param_with_axes`, so `init` also returns a `params_axes` collection of
logical axis names. Computation runs in each module's `dtype` (bfloat16 in training), with float32 where precision
matters (norm statistics, attention logits when asked, softmax).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import partitioning as nn_partitioning

from repeat_lm.models import regularisation

param_with_axes = nn_partitioning.param_with_axes
Array = jax.Array
DType = jnp.dtype | type

# T5's kernel init: truncated normal with variance 1 / fan_in, fan_in being the contracted size.
default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
# Masked logits get this value rather than -inf, so a fully masked (padding) row gives a finite, uniform softmax.
NEG_INF = -1e10
# MultiHeadAttention's kernels: None is its own einsum path; the others name jax.nn.dot_product_attention's backends.
ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn")


def dropout(x: Array, rate: float, deterministic: bool, scale: Array | float = 1.0) -> Array:
  """Plain (unbroadcast) dropout at `rate * scale`, like Hugging Face's T5; draws from the 'dropout' rng stream.

  Call from a compact method. `scale` is the dropout schedule's (possibly traced) factor, see regularisation.py.
  """
  if rate == 0.0 or deterministic:
    return x
  return regularisation.Dropout(rate)(x, deterministic=False, scale=scale)


class RMSNorm(nn.Module):
  """T5 layer norm: scale by the root mean square (no mean subtraction, no bias), statistics in float32."""
  epsilon: float = 1e-6
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = param_with_axes("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32, axes=("embed",))
    x32 = x.astype(jnp.float32)
    mean_square = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(mean_square + self.epsilon)
    return y.astype(self.dtype) * scale.astype(self.dtype)


class DenseGeneral(nn.Module):
  """Bias-free projection contracting the last `num_in_axes` axes of x into `features`.

  The kernel is stored flattened as a 2-D [prod(in), prod(features)] matrix, so every projection has exactly two
  logical axes (e.g. ('embed', 'joined_kv')); it is reshaped on use.
  """
  features: int | Sequence[int]
  kernel_axes: tuple[str, str]
  num_in_axes: int = 1
  dtype: DType = jnp.float32
  kernel_init: Callable = default_kernel_init

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    batch_shape, in_shape = x.shape[:-self.num_in_axes], x.shape[-self.num_in_axes:]
    kernel = param_with_axes("kernel", self.kernel_init, (int(np.prod(in_shape)), int(np.prod(features))),
                             jnp.float32, axes=self.kernel_axes)
    x_2d = jnp.asarray(x, self.dtype).reshape(*batch_shape, -1)
    y = x_2d @ jnp.asarray(kernel, self.dtype)
    return y.reshape(*batch_shape, *features)


class Embed(nn.Module):
  """Token embedding table [V, D]; `attend` projects onto it (tied logits)."""
  num_embeddings: int
  features: int
  dtype: DType = jnp.float32
  embedding_init: Callable = nn.initializers.normal(stddev=1.0)

  def setup(self):
    self.embedding = param_with_axes("embedding", self.embedding_init, (self.num_embeddings, self.features),
                                     jnp.float32, axes=("vocab", "embed"))

  def __call__(self, tokens: Array) -> Array:
    return jnp.take(jnp.asarray(self.embedding, self.dtype), tokens, axis=0)

  def attend(self, x_BxTxD: Array) -> Array:
    return jnp.einsum("btd,vd->btv", jnp.asarray(x_BxTxD, self.dtype), jnp.asarray(self.embedding, self.dtype))


def relative_position_bucket(relative_position: Array, bidirectional: bool, num_buckets: int = 32,
                             max_distance: int = 128) -> Array:
  """T5's bucketing of `key_position - query_position` (Mesh TF / Hugging Face semantics).

  Half of the buckets (all of them if unidirectional) hold exact small distances, the rest grow logarithmically up
  to `max_distance`; bidirectional bucketing gives keys after the query (positive offsets) the upper half.
  Unidirectional bucketing folds keys after the query into bucket 0 (they are masked anyway).
  """
  relative_position = jnp.asarray(relative_position)
  bucket = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    bucket += (relative_position > 0).astype(relative_position.dtype) * num_buckets
    distance = jnp.abs(relative_position)
  else:
    distance = jnp.maximum(-relative_position, 0)
  max_exact = num_buckets // 2
  # log(0) is avoided by clamping; those entries take the exact branch below. Float32 as in the reference.
  clamped = jnp.maximum(distance, max_exact).astype(jnp.float32)
  log_ratio = jnp.log(clamped / max_exact) / np.log(max_distance / max_exact)
  large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(relative_position.dtype)
  large = jnp.minimum(large, num_buckets - 1)
  return bucket + jnp.where(distance < max_exact, distance, large)


class RelativePositionBias(nn.Module):
  """One learned scalar per (head, bucket), turned into an additive attention bias [1, H, Q, K].

  Positions are either lengths (positions 0..n-1: training, scoring, the encoder) or arrays, so the decoder can ask
  for a single traced query position while decoding with a cache.
  """
  num_heads: int
  num_buckets: int = 32
  max_distance: int = 128
  embedding_init: Callable = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")

  @nn.compact
  def __call__(self, query_positions_Q: Array | int, key_positions_K: Array | int, bidirectional: bool) -> Array:
    table_HxN = param_with_axes("rel_embedding", self.embedding_init, (self.num_heads, self.num_buckets),
                                jnp.float32, axes=("heads", "relpos_buckets"))
    if isinstance(query_positions_Q, int) and isinstance(key_positions_K, int):
      return toeplitz_bias(table_HxN, query_positions_Q, key_positions_K, bidirectional, self.num_buckets,
                           self.max_distance)[None]
    relative_QxK = key_positions_K[None, :] - query_positions_Q[:, None]
    buckets_QxK = relative_position_bucket(relative_QxK, bidirectional, self.num_buckets, self.max_distance)
    return jnp.take(table_HxN, buckets_QxK, axis=1)[None]  # float32; attention casts it to its logits dtype


def toeplitz_bias(table_HxN: Array, q_len: int, k_len: int, bidirectional: bool, num_buckets: int,
                  max_distance: int) -> Array:
  """The bias [H, Q, K] for positions 0..Q-1 and 0..K-1, built from its Q + K - 1 distinct offsets.

  bias[h, q, k] depends on k - q only. Gathering table[h, bucket(k - q)] for every (q, k) gives the same values, but
  its gradient is a scatter-add over Q x K updates that XLA:CPU lays out head-minor; it cost about as much as the
  rest of the encoder's backward pass on T5-small. Here each offset is gathered once (R = Q + K - 1 values) and
  the Toeplitz matrix is made by tiling and reshaping, whose gradient is a plain sum over rows.
  """
  r = q_len + k_len - 1
  offsets_R = jnp.arange(-(q_len - 1), k_len)
  per_offset_HxR = jnp.take(table_HxN, relative_position_bucket(offsets_R, bidirectional, num_buckets,
                                                                max_distance), axis=1)
  # Tiled with period R + 1 and cut into rows of R, row q is the period shifted right by q:
  # rows[h, q, j] = padded[h, (j - q) mod (R + 1)]; with j = k + Q - 1 that is per_offset[h, k - q + Q - 1].
  padded_HxR1 = jnp.pad(per_offset_HxR, ((0, 0), (0, 1)))
  rows_HxQxR = jnp.tile(padded_HxR1, (1, q_len))[:, :q_len * r].reshape(-1, q_len, r)
  return rows_HxQxR[:, :, q_len - 1:]


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
  ones_B = jnp.ones((g_BxHxQxK.shape[0],), g_BxHxQxK.dtype)
  return g_BxHxQxK, jnp.einsum("b,bhqk->hqk", ones_B, g_BxHxQxK)[None]


add_shared_bias.defvjp(_add_shared_bias_fwd, _add_shared_bias_bwd)


def make_attention_mask(query_valid_BxQ: Array, key_valid_BxK: Array) -> Array:
  """Pairwise mask [B, 1, Q, K] (the 1 broadcasts over heads) from per-position validity."""
  return query_valid_BxQ[:, None, :, None] & key_valid_BxK[:, None, None, :]


def make_segment_mask(query_segments_BxQ: Array, key_segments_BxK: Array) -> Array:
  """Packed examples only attend within their own segment: [B, 1, Q, K]."""
  return query_segments_BxQ[:, None, :, None] == key_segments_BxK[:, None, None, :]


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

  @nn.compact
  def __call__(self, inputs_q_BxQxD: Array, inputs_kv_BxKxD: Array, bias_1xHxQxK: Array | None,
               mask_Bx1xQxK: Array | None, deterministic: bool, dropout_scale: Array | float = 1.0) -> Array:
    if self.implementation not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"implementation={self.implementation!r}; choose from {ATTENTION_IMPLEMENTATIONS}.")
    projection = lambda name, init=default_kernel_init: DenseGeneral(
        (self.num_heads, self.head_dim), kernel_axes=("embed", "joined_kv"), dtype=self.dtype, kernel_init=init,
        name=name)
    # T5 scales the query init instead of the logits; at the same init this equals dividing q.k by sqrt(E).
    query_init = lambda *a: default_kernel_init(*a) / np.sqrt(self.head_dim).astype(np.float32)
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
                                            deterministic)
    out_BxQxHxE = nn.with_logical_constraint(out_BxQxHxE, heads_axes)
    out_BxQxD = DenseGeneral(inputs_q_BxQxD.shape[-1], kernel_axes=("joined_kv", "embed"), num_in_axes=2,
                             dtype=self.dtype, name="out")(out_BxQxHxE)
    return nn.with_logical_constraint(out_BxQxD, ("batch", "length", "embed"))

  def _einsum_attention(self, q_BxQxHxE: Array, k_BxKxHxE: Array, v_BxKxHxE: Array, bias_1xHxQxK: Array | None,
                        mask_Bx1xQxK: Array | None, deterministic: bool, dropout_scale: Array | float) -> Array:
    logits_dtype = jnp.float32 if self.float32_logits else self.dtype
    logits_BxHxQxK = jnp.einsum("bqhe,bkhe->bhqk", q_BxQxHxE.astype(logits_dtype), k_BxKxHxE.astype(logits_dtype))
    if bias_1xHxQxK is not None:
      logits_BxHxQxK = add_shared_bias(logits_BxHxQxK, bias_1xHxQxK.astype(logits_dtype))
    if mask_Bx1xQxK is not None:
      logits_BxHxQxK = jnp.where(mask_Bx1xQxK, logits_BxHxQxK, jnp.asarray(NEG_INF, logits_dtype))
    weights_BxHxQxK = jax.nn.softmax(logits_BxHxQxK.astype(jnp.float32), axis=-1).astype(self.dtype)
    # Dropout on the attention weights, as in T5 (Mesh TF), T5X and Hugging Face.
    weights_BxHxQxK = dropout(weights_BxHxQxK, self.dropout_rate, deterministic, dropout_scale)
    return jnp.einsum("bhqk,bkhe->bqhe", weights_BxHxQxK, v_BxKxHxE.astype(self.dtype))

  def _library_attention(self, q_BxQxHxE: Array, k_BxKxHxE: Array, v_BxKxHxE: Array, bias_1xHxQxK: Array | None,
                         mask_Bx1xQxK: Array | None, deterministic: bool) -> Array:
    """jax.nn.dot_product_attention; on unmasked rows it equals the einsum path with float32 logits.

    Every path replaces masked logits by one constant after adding the bias (-1e10 there; -0.7 x float32 max in
    'xla'; -2**41 in 'cudnn', added in bfloat16 and so swamping the bias), so a fully masked (padding) row is a
    uniform softmax everywhere: finite, and without effect on the loss.
    """
    if self.dropout_rate > 0.0 and not deterministic:
      raise ValueError(f"attention implementation {self.implementation!r} (jax.nn.dot_product_attention) has no "
                       f"attention-probability dropout, but the rate is {self.dropout_rate}: set "
                       "attention_dropout_rate=0 or attention_implementation=None.")
    bias = bias_1xHxQxK
    if self.implementation == "cudnn":
      # Without a bias or mask the lengths are free; T5 always has one of them.
      lengths = ((q_BxQxHxE.shape[1], k_BxKxHxE.shape[1]) if bias_1xHxQxK is not None or mask_Bx1xQxK is not None
                 else (None, None))
      reason = cudnn_attention_restriction(self.head_dim, self.dtype, *lengths, max_head_dim=_cudnn_max_head_dim())
      if reason is None and jax.default_backend() != "gpu":
        reason = f"cuDNN attention needs an NVIDIA GPU, the default backend is {jax.default_backend()!r}; use 'xla'"
      if reason is not None:
        raise ValueError(f"attention_implementation='cudnn': {reason}.")
      if bias is not None:  # cuDNN adds the bias in the q/k/v dtype; a float32 bias gave NaN gradients (jax #32242)
        bias = bias.astype(self.dtype)
    # q/k/v in the activation dtype, as the einsum path's weights @ v; the library takes q.k in float32 itself.
    q, k, v = (x.astype(self.dtype) for x in (q_BxQxHxE, k_BxKxHxE, v_BxKxHxE))
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask_Bx1xQxK, scale=1.0,
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


_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),  # tanh approximation = Hugging Face's gelu_new
    "relu": jax.nn.relu,
    "linear": lambda x: x,
}


class MlpBlock(nn.Module):
  """Feed-forward block; with several activations their outputs multiply (('gelu', 'linear') = gated GELU)."""
  mlp_dim: int
  activations: Sequence[str] = ("gelu", "linear")
  dtype: DType = jnp.float32
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x_BxLxD: Array, deterministic: bool, dropout_scale: Array | float = 1.0) -> Array:
    hidden_BxLxF = None
    for i, name in enumerate(self.activations):
      if name not in _ACTIVATIONS:
        raise ValueError(f"Unknown MLP activation {name!r}; choose from {sorted(_ACTIVATIONS)}.")
      dense_name = "wi" if len(self.activations) == 1 else f"wi_{i}"
      h = DenseGeneral(self.mlp_dim, kernel_axes=("embed", "mlp"), dtype=self.dtype, name=dense_name)(x_BxLxD)
      h = _ACTIVATIONS[name](h)
      hidden_BxLxF = h if hidden_BxLxF is None else hidden_BxLxF * h
    hidden_BxLxF = dropout(hidden_BxLxF, self.dropout_rate, deterministic, dropout_scale)
    hidden_BxLxF = nn.with_logical_constraint(hidden_BxLxF, ("batch", "length", "mlp"))
    out_BxLxD = DenseGeneral(x_BxLxD.shape[-1], kernel_axes=("mlp", "embed"), dtype=self.dtype, name="wo")(hidden_BxLxF)
    return nn.with_logical_constraint(out_BxLxD, ("batch", "length", "embed"))
