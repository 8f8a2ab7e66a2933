"""Building blocks of the T5 v1.1 encoder-decoder: norm, projections, relative position bias, MLP (attention.py has
attention).

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

from repeat_lm import checks
from repeat_lm.models import cpu_layouts, regularisation

param_with_axes = nn_partitioning.param_with_axes
Array = jax.Array
DType = jnp.dtype | type

# T5's MLP and logits kernel init: truncated normal with variance 1 / fan_in, fan_in being the contracted size
# (attention kernels: attention.attention_kernel_init).
default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def dropout(x: Array, rate: float, deterministic: bool, scale: Array | float = 1.0,
            broadcast_length: bool = False) -> Array:
  """Dropout at `rate * scale`; draws from the 'dropout' rng stream.

  Plain (one draw per element, like Hugging Face's T5), or with `broadcast_length` one draw shared along axis -2
  (the length of [B, L, D] / [B, L, F], the query of [B, H, Q, K]), as T5X / flaxformer's T5 (`broadcast_dims=(-2,)`,
  `broadcast_dropout=True`). Call from a compact method. `scale` is the dropout schedule's (possibly traced) factor.
  """
  if rate == 0.0 or deterministic:
    return x
  return regularisation.Dropout(rate, (-2,) if broadcast_length else ())(x, deterministic=False, scale=scale)


class RMSNorm(nn.Module):
  """T5 layer norm: scale by the root mean square (no mean subtraction, no bias), statistics in float32."""
  epsilon: float = 1e-6
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = param_with_axes("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32, axes=("embed",))
    if cpu_layouts.explicit_transposes() and x.dtype == jnp.float32 and jnp.dtype(self.dtype) == jnp.float32:
      return cpu_layouts.rms_norm(x, scale, self.epsilon)  # the same values; its backward reduces by dots
    x32 = x.astype(jnp.float32)
    mean_square = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(mean_square + self.epsilon)
    # T5X multiplies y and the scale in the activation dtype. Two bfloat16 values multiply exactly in float32, so
    # multiplying there and rounding once is that same product (and the same input gradient); the scale's gradient
    # then sums unrounded float32 products, which XLA:CPU reduces in one fused pass where bfloat16 products took a
    # materialised float32 copy and a slow windowed reduction: the norms' ops in T5-small's bfloat16 step took 83
    # ms against 153 (one profile each, `repeat-lm bench train --profile_dir`).
    wide = lambda a: a.astype(self.dtype).astype(jnp.float32)  # rounded to the activation dtype, as T5X's casts
    return (wide(y) * wide(scale)).astype(self.dtype)


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
  # A narrower dtype both operands are rounded to, the product accumulating in float32 and returned in float32
  # (`dtype` must then be float32): T5X's float32 projection at XLA's default precision on TPU. None: `dtype`.
  operand_dtype: DType | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    batch_shape, in_shape = x.shape[:-self.num_in_axes], x.shape[-self.num_in_axes:]
    kernel = param_with_axes("kernel", self.kernel_init, (int(np.prod(in_shape)), int(np.prod(features))),
                             jnp.float32, axes=self.kernel_axes)
    if self.operand_dtype is not None and jnp.dtype(self.operand_dtype) != jnp.dtype(self.dtype):
      if jnp.dtype(self.dtype) != jnp.float32:
        raise ValueError(f"DenseGeneral(operand_dtype={self.operand_dtype}) returns float32; got dtype={self.dtype}.")
      x_2d = jnp.asarray(x, self.operand_dtype).reshape(*batch_shape, -1)
      if cpu_layouts.explicit_transposes():
        y = cpu_layouts.rounded_matmul(x_2d, kernel, jnp.dtype(self.operand_dtype))
      else:  # GPU and TPU: autodiff of the same product (the kernel's gradient comes back in operand_dtype)
        y = jnp.matmul(x_2d, kernel.astype(self.operand_dtype), preferred_element_type=jnp.float32)
      return y.reshape(*batch_shape, *features)
    x_2d = jnp.asarray(x, self.dtype).reshape(*batch_shape, -1)
    kernel = jnp.asarray(kernel, self.dtype)
    y = cpu_layouts.matmul(x_2d, kernel) if cpu_layouts.explicit_transposes() else x_2d @ kernel
    return y.reshape(*batch_shape, *features)


class Embed(nn.Module):
  """Token embedding table [V, D]; `attend` projects onto it (tied logits)."""
  num_embeddings: int
  features: int
  dtype: DType = jnp.float32
  embedding_init: Callable = nn.initializers.normal(stddev=1.0)
  # The operand dtype of `attend` (None: `dtype`); its logits are float32 either way.
  attend_dtype: DType | None = None

  def setup(self):
    self.embedding = param_with_axes("embedding", self.embedding_init, (self.num_embeddings, self.features),
                                     jnp.float32, axes=("vocab", "embed"))

  def __call__(self, tokens: Array) -> Array:
    # Gather the float32 rows, then round: the same values as gathering from a rounded table, but the gradient's
    # scatter-add then sums a token's occurrences in float32. Into a bfloat16 table a frequent token's sum stalls once
    # its ulp passes twice the addends (1024 unit cotangents summed to 256).
    return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

  def attend(self, x_BxTxD: Array) -> Array:
    """float32 logits [B, T, V]: operands rounded to `attend_dtype`, products accumulated and returned in float32.

    T5X / flaxformer's tied embedder attends in float32 (attend_dtype, "for logit training stability"), which on TPU
    at default precision is this product, as DenseGeneral's `operand_dtype` computes logits_dense. A bfloat16 result
    would round every logit to 8 significant bits (steps of 1/32 at |logit| 4-8) before the loss and the accuracy.
    """
    operand_dtype = jnp.dtype(self.attend_dtype or self.dtype)
    if cpu_layouts.explicit_transposes() and operand_dtype != jnp.float32:
      return cpu_layouts.rounded_matmul(x_BxTxD, self.embedding, operand_dtype, True)
    return jnp.einsum("btd,vd->btv", jnp.asarray(x_BxTxD, operand_dtype), jnp.asarray(self.embedding, operand_dtype),
                      preferred_element_type=jnp.float32)


def check_relative_position_buckets(num_buckets: int, max_distance: int) -> None:
  """T5's bucketing keeps exact distances below num_buckets // 4 (bidirectional) or // 2 and spreads the rest
  logarithmically up to max_distance: with max_distance no larger than that, the log spacing divides by log(<= 1)
  (bucket -2^31, which the bias gathers as NaN), with max_distance 0 every far distance shares one bucket, and
  fewer than 4 buckets leave no exact ones (a ZeroDivisionError). T5Config and the bias module both check this."""
  if not (checks.is_count(num_buckets, 4) and checks.whole_number(max_distance) and max_distance > num_buckets // 2):
    raise ValueError(f"relative_attention_num_buckets={num_buckets!r}, relative_attention_max_distance="
                     f"{max_distance!r}: need at least 4 buckets and a max distance above num_buckets // 2 (T5: 32 "
                     "and 128), whole numbers.")


def relative_position_bucket(relative_position: Array, bidirectional: bool, num_buckets: int = 32,
                             max_distance: int = 128) -> Array:
  """T5's bucketing of `key_position - query_position` (Mesh TF / Hugging Face semantics).

  Half of the buckets (all of them if unidirectional) hold exact small distances, the rest grow logarithmically up
  to `max_distance`; bidirectional bucketing gives keys after the query (positive offsets) the upper half.
  Unidirectional bucketing folds keys after the query into bucket 0 (they are masked anyway).
  """
  check_relative_position_buckets(num_buckets, max_distance)
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


_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),  # tanh approximation = Hugging Face's gelu_new
    "relu": jax.nn.relu,
    "linear": lambda x: x,
}
_SQRT_2_OVER_PI = np.float32(np.sqrt(2 / np.pi))  # the tanh approximation's constant, as jax.nn.gelu's


def _gelu_and_slope(x: Array) -> tuple[Array, Array]:
  """jax.nn.gelu(x, approximate=True) and its derivative, in x's dtype (float32 here)."""
  t = jnp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x ** 3))
  cdf = 0.5 * (1.0 + t)
  return x * cdf, cdf + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)


@jax.custom_vjp
def gated_gelu(gate: Array, linear: Array) -> Array:
  """gelu(gate) * linear (T5 v1.1's gated GELU), computed in float32 and rounded to the inputs' dtype once.

  With bfloat16 activations autodiff's form rounds after every one of its ~10 elementwise ops, forward and
  backward, and XLA:CPU spends a pass on each rounding: the gated GELU of one T5-small encoder layer ([8, 512,
  1024], forward and backward) took 12.1 ms that way, 4.7 ms here (medians of 7), and the whole bfloat16 step 0.11
  s less (3.47 -> 3.33 s; one process, 8 rounds alternating which ran first, faster in all 8). It also lands closer
  to the float32 result (largest error 0.031 against 0.055-0.15 on unit-normal inputs), and XLA's GPU fusions keep
  such intermediates in float32 by default too (excess precision). The backward pass recomputes the GELU from the two
  saved inputs rather than saving float32 intermediates. float32 activations: autodiff's values up to rounding, and
  the same step time.
  """
  gelu, _ = _gelu_and_slope(gate.astype(jnp.float32))
  return (gelu * linear.astype(jnp.float32)).astype(gate.dtype)


def _gated_gelu_fwd(gate, linear):
  return gated_gelu(gate, linear), (gate, linear)


def _gated_gelu_bwd(residuals, g):
  gate, linear = residuals
  gelu, slope = _gelu_and_slope(gate.astype(jnp.float32))
  g = g.astype(jnp.float32)
  return (g * linear.astype(jnp.float32) * slope).astype(gate.dtype), (g * gelu).astype(linear.dtype)


gated_gelu.defvjp(_gated_gelu_fwd, _gated_gelu_bwd)


def activate(names: Sequence[str], projections: Sequence[Array]) -> Array:
  """The product of each projection's activation (MlpBlock's and the MoE experts' hidden layer)."""
  if tuple(names) == ("gelu", "linear"):
    return gated_gelu(*projections)
  hidden = None
  for name, h in zip(names, projections):
    h = _ACTIVATIONS[name](h)
    hidden = h if hidden is None else hidden * h
  return hidden


class MlpBlock(nn.Module):
  """Feed-forward block; with several activations their outputs multiply (('gelu', 'linear') = gated GELU)."""
  mlp_dim: int
  activations: Sequence[str] = ("gelu", "linear")
  dtype: DType = jnp.float32
  dropout_rate: float = 0.0
  dropout_broadcast_length: bool = False  # T5Config.dropout_broadcast_length

  @nn.compact
  def __call__(self, x_BxLxD: Array, deterministic: bool, dropout_scale: Array | float = 1.0) -> Array:
    projections = []
    for i, name in enumerate(self.activations):
      if name not in _ACTIVATIONS:
        raise ValueError(f"Unknown MLP activation {name!r}; choose from {sorted(_ACTIVATIONS)}.")
      dense_name = "wi" if len(self.activations) == 1 else f"wi_{i}"
      projections.append(
          DenseGeneral(self.mlp_dim, kernel_axes=("embed", "mlp"), dtype=self.dtype, name=dense_name)(x_BxLxD))
    hidden_BxLxF = activate(self.activations, projections)
    hidden_BxLxF = dropout(hidden_BxLxF, self.dropout_rate, deterministic, dropout_scale,
                           self.dropout_broadcast_length)
    hidden_BxLxF = nn.with_logical_constraint(hidden_BxLxF, ("batch", "length", "mlp"))
    out_BxLxD = DenseGeneral(x_BxLxD.shape[-1], kernel_axes=("mlp", "embed"), dtype=self.dtype, name="wo")(hidden_BxLxF)
    return nn.with_logical_constraint(out_BxLxD, ("batch", "length", "embed"))
