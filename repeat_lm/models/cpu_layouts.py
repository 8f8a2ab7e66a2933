"""Backward passes whose every matmul XLA:CPU's fast dot library takes: projections, MoE experts and the attention
core on CPU; and the float32 RMS norm's, whose reductions are dots (`rms_norm`).

XLA:CPU hands a dot to YNNPACK only when its left operand contracts its minor (last) dimension. Autodiff's
backward pass has three kinds of dot that contract a major dimension instead: every weight gradient (x^T g,
contracting batch and length) and, in attention, the key and value gradients (ds^T q and p^T do, contracting
queries). Those fell to Eigen, whose threads then ran beside YNNPACK's on the same two cores; in the profile of the
T5 v1.1 small step (2 cores) YNNPACK's dots ran at about half their isolated speed while Eigen's were in flight.
Here each of them contracts a transposed copy instead (`transposed`: one pass over the operand, which
`optimization_barrier` keeps XLA from folding back into the dot), so all of the step's dots run in YNNPACK: 2.96
-> 2.36 s per step with everything below (`repeat-lm bench report`'s ablation, docs/performance.md). A weight
gradient transposes a `materialised` x, so that XLA does not redo x's elementwise producer inside the transpose:
-70 ms per step, the median difference over 30 interleaved rounds with and without it (a 2.89 s median step at
the time). Attention's key and value gradients transpose the small side instead (`transposed_product`): the
[Q, E] head vectors and the [E, K] product rather than the [Q, K] weights, -53 ms per step over 12 interleaved
rounds (2.67 s median step).

The attention core also runs in batch slices whose [B, H, Q, K] arrays fit the last-level cache
(`attention_batch_chunks`): T5-small's encoder layer makes 50 MB of logits for batch 8 against a 32 MB cache. In
four slices of two rows one layer's attention core (forward and backward, alone) took 46-47 ms against 50, and the
step 18 ms less (the median difference over 12 rounds alternating which ran first, 8 of them faster; 2.5 s steps);
one slice per row made the step 145 ms slower. On a family-25 EPYC host (half the multiply width, 4.9 s float32
steps) with the core as it is now, the slices are within the noise: 4.935 against 4.923 s without them in float32
(`bench report`'s ablation, one process each); in bfloat16 the whole batch was a median 6 ms faster over 8 rounds
in one process alternating which ran first, the slices faster in 4 of the 8. They stay for the hosts where they
were measured to pay (the 2.5 s steps above).

With bfloat16 activations (the gins' dtype) every dot here multiplies bfloat16 operands and accumulates in float32
(`wide_matmul`), and `transposed` hands its dot a row-major copy, so that XLA keeps the operands in bfloat16: on a
Zen 4 host with AVX512-BF16 the T5 v1.1 small bfloat16 step went from 5.27 to 3.4-3.8 s (float32: 4.9-5.1 s).

Values are those of autodiff up to summation order (tests/models/test_cpu_layouts.py compares both), except that
with bfloat16 operands the attention core keeps its weights and logits gradient in bfloat16 (`attention_weights`).
GPU and TPU compilers choose operand layouts themselves, so `explicit_transposes()` is False there and the models
keep plain autodiff; REPEAT_LM_CPU_LAYOUTS=0 does the same on CPU (`repeat-lm bench report` measures the step both
ways). Shape letters as in layers.py; in `matmul`, B stands for any leading batch axes and N for the axes between
them and the contracted one.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp

Array = jax.Array
# Set to 0 to keep autodiff's backward passes on CPU too.
CPU_LAYOUTS_ENV = "REPEAT_LM_CPU_LAYOUTS"
# Set to 0 to run the attention core over the whole batch at once on CPU.
ATTENTION_CHUNKS_ENV = "REPEAT_LM_CPU_ATTENTION_CHUNKS"
# The most batch slices the attention core runs in (attention_batch_chunks); 4 for T5-small at batch 8.
MAX_ATTENTION_CHUNKS = 8
# Where the kernel does not say (sysfs), the cache of the 2-core machines this was measured on.
DEFAULT_CACHE_BYTES = 32 * 2**20


def explicit_transposes() -> bool:
  """Whether the models use this module's backward passes: on the CPU backend (where traced), unless opted out."""
  return jax.default_backend() == "cpu" and os.environ.get(CPU_LAYOUTS_ENV, "1") != "0"


def listed_cache_bytes(cache_dir: str = "/sys/devices/system/cpu/cpu0/cache") -> list[int]:
  """The sizes of the caches the kernel lists for cpu0 (`index*/size`, e.g. '32768K'); [] where it lists none."""
  sizes = []
  for path in sorted(Path(cache_dir).glob("index*/size")):
    try:
      text = path.read_text(errors="replace").strip()
    except OSError:
      continue
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    digits = text[:-1] if scale > 1 else text
    if digits.isdigit():
      sizes.append(int(digits) * scale)
  return sizes


@functools.lru_cache(maxsize=None)
def last_level_cache_bytes(cache_dir: str = "/sys/devices/system/cpu/cpu0/cache") -> int:
  """The largest cache the kernel lists for cpu0, else DEFAULT_CACHE_BYTES."""
  return max(listed_cache_bytes(cache_dir), default=DEFAULT_CACHE_BYTES)


def attention_batch_chunks(batch: int, heads: int, q_len: int, k_len: int, itemsize: int = 4) -> int:
  """How many equal batch slices the CPU attention core runs in (asked on the `explicit_transposes()` path only);
  1 keeps the whole batch.

  A slice holds as many rows as keep its [rows, H, Q, K] logits within half the last-level cache (the weights and
  their gradients pass through the same cache), at least two: single-row slices were slower than none. Only
  without a device mesh to shard over (mesh size 1), where slicing the batch never moves data between devices, and
  for at most MAX_ATTENTION_CHUNKS slices (compile time grows with their number).
  """
  if os.environ.get(ATTENTION_CHUNKS_ENV, "1") == "0":
    return 1
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.size > 1:
    return 1
  budget, row_bytes = last_level_cache_bytes() // 2, heads * q_len * k_len * itemsize
  if batch * row_bytes <= budget:
    return 1
  fitting = [rows for rows in range(2, batch) if batch % rows == 0 and rows * row_bytes <= budget]
  chunks = batch // max(fitting) if fitting else 1
  # Each slice is its own copy of the core in the compiled step: T5-small's scanned step at batch 128 (64 slices)
  # compiled in 28.6 s against 7.2 s unsliced, and a batch of thousands did not finish compiling. Past the cap the
  # whole batch runs at once, as where no slice fits (the slices saved 18-38 ms of a 2.4-2.5 s step at batch 8).
  return chunks if chunks <= MAX_ATTENTION_CHUNKS else 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def batch_slices(x: Array, rows: int) -> tuple[Array, ...]:
  """x in consecutive slices of `rows` rows (its leading axis); their gradients are joined by one concatenation.

  Autodiff transposes each slice into a zero-padded full-size array and adds them up: in T5-small's bfloat16 step
  the four slices' query, key and value gradients of each encoder layer cost 5.6 ms per [4096, 384] result that way
  (every element read through four transposed, padded branches with a rounding after each add), 136 ms a step.
  Joined instead, the step took 0.29 s less in bfloat16 (3.88 against 4.14 s) and 0.10 s less in float32 (4.97
  against 5.06 s): medians of the per-round differences over 6 rounds alternating which ran first, one process.
  """
  return tuple(x[start:start + rows] for start in range(0, x.shape[0], rows))


def _batch_slices_fwd(x, rows):
  return batch_slices(x, rows), None


def _batch_slices_bwd(rows, _, gs):
  del rows
  return (jnp.concatenate(gs),)


batch_slices.defvjp(_batch_slices_fwd, _batch_slices_bwd)


def transposed(x: Array, axes: tuple[int, int] = (-1, -2)) -> Array:
  """x with two axes (the last two unless given) swapped, materialised (the barrier stops XLA folding the swap into
  the consuming dot).

  The unit axis makes the copy row-major before the dot sees it. Without it XLA gives the swap a column-major
  layout (a free relabelling), and its operand upcaster, which decides before layout assignment whether a
  bfloat16 dot may keep bfloat16 operands, turns a dot whose operand is not row-major into a float32 one:
  T5-small's [512, 4096] x [4096, 1024] weight gradient took 22 ms that way, 12.3 ms with the unit axis (float32
  operands: 21 ms either way).
  """
  return jax.lax.optimization_barrier(jnp.swapaxes(x, *axes)[..., None])[..., 0]


@jax.custom_vjp
def swapped_heads(x: Array) -> Array:
  """[B, L, H, E] <-> [B, H, L, E] (axes 1 and 2 swapped), a row-major copy in the forward and the backward pass.

  The attention core's dots take heads-major operands. A plain swap is a free relabelling to XLA, which then hands
  the dot a column-major operand, and the bfloat16 operand upcaster (see `transposed`) makes that dot float32: in
  the bfloat16 T5-small step the q.k, weights @ v, dp and dq dots all ran with float32 operands. Autodiff's
  backward of a swap is another swap, so the gradients arriving in the core were column-major too; here both
  directions are copies. One [2, 6, 512, 512] slice of the encoder's attention core (forward and backward,
  bfloat16): 18.2 -> 13.6 ms (medians of 9); the whole bfloat16 step 3.90 -> 3.52 s (one process, 6 rounds
  alternating which ran first, the new one faster in 5, median difference 0.28 s). float32: the same values, and
  the step within the noise (5.23 against 5.24 s, median difference 0.07 s in the new one's favour).
  """
  return transposed(x, (1, 2))


swapped_heads.defvjp(lambda x: (transposed(x, (1, 2)), None), lambda _, g: (transposed(g, (1, 2)),))


def materialised(x: Array) -> Array:
  """x, read from memory by its consumers instead of recomputed inside them.

  XLA:CPU fuses a cheap elementwise producer into each of its consumers, a transpose included, and a transpose with
  fused arithmetic is ~10x slower than a plain one (strided reads, no tiling): transposing T5-small's [4096, 512]
  MLP input took 3.1 ms with the RMSNorm scaling fused in, 0.3 ms without. A conditional is a fusion boundary
  XLA keeps, since its predicate depends on the data (x == x is false only for NaN). Both branches return x; the
  second is spelled `y * 1` because XLA removes a conditional whose branches are the same computation.
  """
  first = x[(0,) * x.ndim]
  return jax.lax.cond(first == first, lambda y: y, lambda y: y * 1, x)


def transposed_product(a_BxNxM: Array, b_BxNxP: Array) -> Array:
  """a^T @ b ([*B, M, P] in float32, contracting N) computed as (b^T @ a)^T, for an `a` much bigger than b.

  Both forms are YNNPACK's; this one moves N x P + P x M values through transposes instead of a's N x M: in
  attention a is the [Q, K] weights (or logits gradient) and b the [Q, E] head vectors, 2 x 32K values against 256K
  per head of T5-small's encoder. The barrier stops XLA folding the last swap into the dot, which would then
  contract a's major axis again (and leave YNNPACK).
  """
  product_BxPxM = jax.lax.optimization_barrier(wide_matmul(transposed(b_BxNxP), a_BxNxM))
  return jnp.swapaxes(product_BxPxM, -1, -2)


def batch_sum(x_BxHxQxK: Array) -> Array:
  """x summed over its leading batch axis, kept as [1, H, Q, K] and accumulated in float32: a matmul with a ones
  vector rather than a reduce over the major axis, which XLA:CPU merged across layers into one strided pass
  (attention.add_shared_bias)."""
  ones_B = jnp.ones((x_BxHxQxK.shape[0],), x_BxHxQxK.dtype)
  return wide_einsum("b,bhqk->hqk", ones_B, x_BxHxQxK)[None]


def _contract_last(a: Array, b: Array, b_axis: int, batch: int) -> Array:
  """a's last axis contracted with b's axis `b_axis`, the first `batch` axes of both batch axes (no reshapes, so the
  forward pass shards as an einsum would); accumulated in float32, returned in a's dtype."""
  dims = (((a.ndim - 1,), (b_axis,)), (tuple(range(batch)), tuple(range(batch))))
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32).astype(a.dtype)


def wide_matmul(a: Array, b: Array) -> Array:
  """jnp.matmul accumulated (and returned) in float32.

  YNNPACK's bfloat16 kernels write float32: a dot asked for a bfloat16 result fell to a slower kernel, 0.13-0.20
  TFLOP/s against 0.26-0.41 with a float32 result on a Zen 4 host with AVX512-BF16 (T5-small's projection,
  attention, weight-gradient and logits shapes; float32 operands: 0.15-0.22). Every dot of this module therefore
  accumulates in float32, which is also what T5X's bfloat16 activations get from the TPU's MXU; the caller rounds
  the result to the activation dtype where the next op takes that. float32 operands are unaffected.
  """
  return jnp.matmul(a, b, preferred_element_type=jnp.float32)


def wide_einsum(spec: str, a: Array, b: Array) -> Array:
  """jnp.einsum accumulated (and returned) in float32, as `wide_matmul`."""
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


@jax.custom_vjp
def matmul(x_BxNxI: Array, kernel_BxIxO: Array) -> Array:
  """x @ kernel over x's last axis, per leading batch axis of the kernel: [*B, ..., I] @ [*B, I, O] -> [*B, ..., O].

  A projection has no batch axes (kernel [I, O], x [..., I]); MoE experts batch over experts (x [E, G, C, I]).
  The kernel gradient is transposed(x) @ g, x's middle axes flattened.
  """
  return _contract_last(x_BxNxI, kernel_BxIxO, kernel_BxIxO.ndim - 2, kernel_BxIxO.ndim - 2)


def _matmul_fwd(x_BxNxI, kernel_BxIxO):
  return matmul(x_BxNxI, kernel_BxIxO), (x_BxNxI, kernel_BxIxO)


def _kernel_gradient(x_BxNxI: Array, g_BxNxO: Array, batch: int) -> Array:
  """x^T @ g over x's middle axes, per leading batch axis (`batch` of them): [*B, I, O] in float32.

  With float32 operands and an input at least twice as wide as its gradient, it is (g^T @ x)^T instead
  (`transposed_product`), when that moves fewer values through transposes (N x O + O x I against N x I): the MLP's
  output projection, whose [4096, 1024] input is twice its [4096, 512] gradient in T5-small's encoder. Its float32
  step: 19 ms less (the median of the per-round differences over 8 rounds in one process alternating which ran
  first, 6 of them faster). The width rule is measured too: the query, key and value projections share one
  transposed input, and taking their three [4096, 384] gradients' transposes instead made the step 11 ms slower
  (slower in 7 of 8 rounds). bfloat16 operands keep x^T @ g: the output projection's other form made that step
  12 ms slower (2 of 8 faster).
  """
  flat = lambda a: a.reshape(*a.shape[:batch], -1, a.shape[-1])  # [*B, ..., I] -> [*B, N, I]
  x_BxNxI, g_BxNxO = flat(x_BxNxI), flat(g_BxNxO)
  n, i, o = x_BxNxI.shape[-2], x_BxNxI.shape[-1], g_BxNxO.shape[-1]
  if x_BxNxI.dtype == jnp.float32 and 2 * o <= i and n * o + o * i < n * i:
    return transposed_product(x_BxNxI, g_BxNxO)
  # x is often the RMSNorm's or the gated GELU's output: materialised, so its transpose is a plain copy.
  return wide_matmul(transposed(materialised(x_BxNxI)), g_BxNxO)


def _matmul_bwd(residuals, g_BxNxO):
  x_BxNxI, kernel_BxIxO = residuals
  batch = kernel_BxIxO.ndim - 2
  # g's last axis against the kernel's minor one: already YNNPACK's form.
  dx = _contract_last(g_BxNxO, kernel_BxIxO, kernel_BxIxO.ndim - 1, batch).astype(x_BxNxI.dtype)
  return dx, _kernel_gradient(x_BxNxI, g_BxNxO, batch).astype(kernel_BxIxO.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x_NxD: Array, scale_D: Array, epsilon: float) -> Array:
  """x / RMS(x) * scale over the last axis, float32 throughout (layers.RMSNorm's float32 form), with a backward pass
  whose two reductions are matrix-vector products.

  The norm's gradients need two sums of g * x: over D per row (for the input gradient) and over the rows, weighted by
  each row's 1 / RMS (for the scale). Autodiff reduces broadcast products (g * scale * x, g * x / RMS), and XLA:CPU's
  library reductions take no broadcast, so it stored the scale and the row statistic broadcast to x's shape, and
  x / RMS besides, for every norm (three [8, 512, 512] arrays per encoder norm of T5-small besides the input
  gradient). Here both sums are dots with g * x (YNNPACK's), which take the row statistic and the scale as vectors:
  T5-small's float32 step 3.435 -> 3.366 s (medians of 8 rounds in one process alternating which ran first, faster
  in all 8; median difference 64 ms). Values are autodiff's up to summation order (tests/models/test_cpu_layouts.py).
  bfloat16 norms keep autodiff (layers.RMSNorm): their rounded product g * scale does not factor out of the sum.
  """
  return _rms_norm_fwd(x_NxD, scale_D, epsilon)[0]


def _rms_norm_fwd(x_NxD, scale_D, epsilon):
  rsqrt_Nx1 = jax.lax.rsqrt(jnp.mean(jnp.square(x_NxD), axis=-1, keepdims=True) + epsilon)
  return x_NxD * rsqrt_Nx1 * scale_D, (x_NxD, scale_D, rsqrt_Nx1)


def _rms_norm_bwd(epsilon, residuals, g_NxD):
  del epsilon
  x_NxD, scale_D, rsqrt_Nx1 = residuals
  gx_NxD = g_NxD * x_NxD
  # d/dx of x * r(x), r = (mean(x^2) + eps)^-1/2: r g scale - x r^3 mean(g scale x).
  row_Nx1 = jnp.einsum("...d,d->...", gx_NxD, scale_D)[..., None]
  dx = g_NxD * scale_D * rsqrt_Nx1 - x_NxD * (rsqrt_Nx1 ** 3 * row_Nx1 / x_NxD.shape[-1])
  dscale = jnp.einsum("...,...d->d", rsqrt_Nx1[..., 0], gx_NxD)
  return dx, dscale


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def rounded_matmul(x_NxI: Array, kernel: Array, operand_dtype: jnp.dtype, kernel_out_major: bool = False) -> Array:
  """[..., I] @ [I, O] with both operands rounded to `operand_dtype`, accumulated and returned in float32; the
  kernel's gradient stays float32. With `kernel_out_major` the kernel is stored [O, I] (the tied embedding table,
  `Embed.attend`) and its gradient comes back [O, I] too.

  The output logits of a bfloat16 model (layers.DenseGeneral's `operand_dtype`): T5X's float32 `logits_dense` at
  XLA's default precision, which on TPU is this product (one bfloat16 pass, float32 accumulation) forward and
  backward. On CPU a float32 dot is exact and runs at half the bfloat16 rate: T5-small's logits dots took 0.44 s of a
  3.2 s bfloat16 step, and this form made the step 0.27 s faster (3.20 -> 2.93 s, medians over 6 rounds in one
  process alternating which ran first, faster in all 6). The float32 gradient arriving is rounded once, as the TPU
  rounds it inside each dot.

  An [O, I] table must not be passed as its transpose: XLA then folds the transpose of the [I, O] gradient into
  the weight-gradient dot, whose output layout XLA:CPU's fallback dot cannot write from bfloat16 operands
  ("Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32", on one device).
  """
  dims = (((x_NxI.ndim - 1,), (1 if kernel_out_major else 0,)), ((), ()))
  return jax.lax.dot_general(x_NxI.astype(operand_dtype), kernel.astype(operand_dtype), dims,
                             preferred_element_type=jnp.float32)


def _rounded_matmul_fwd(x_NxI, kernel, operand_dtype, kernel_out_major):
  return rounded_matmul(x_NxI, kernel, operand_dtype, kernel_out_major), (x_NxI, kernel)


def _rounded_matmul_bwd(operand_dtype, kernel_out_major, residuals, g_NxO):
  x_NxI, kernel = residuals
  x_r, kernel_r, g_r = (a.astype(operand_dtype) for a in (x_NxI, kernel, g_NxO))
  dx = _contract_last(g_r, kernel_r, 0 if kernel_out_major else 1, 0).astype(x_NxI.dtype)
  # float32, not rounded again; [O, I] as g^T @ x, [I, O] as x^T @ g.
  dkernel = _kernel_gradient(g_r, x_r, 0) if kernel_out_major else _kernel_gradient(x_r, g_r, 0)
  return dx, dkernel.astype(kernel.dtype)


rounded_matmul.defvjp(_rounded_matmul_fwd, _rounded_matmul_bwd)


@jax.custom_vjp
def attention_weights(q_BxHxQxE: Array, k_BxHxKxE: Array, bias_1xHxQxK: Array | None,
                      additive_mask_Bx1xQxK: Array | None) -> Array:
  """softmax(q.k + bias + mask) over keys (heads-major operands); the bias gradient is the batch sum.

  The logits and softmax are float32; the weights come back, and are kept for the backward pass, in the operands'
  dtype, and so is the logits gradient the backward pass makes of them (before its float32 batch sum). With
  bfloat16 operands that halves the two [B, H, Q, K] arrays the backward pass reads and writes, as Megatron-LM's
  fused softmax keeps its half-precision output for its backward; the weights are rounded to bfloat16 before
  weights @ v anyway, and the logits gradient before its two dots. T5-small's bfloat16 step: 38 ms less (median of
  12 rounds alternating which ran first in one process, 11 of them faster; 2.9 s steps, family-25 EPYC host), with
  the gradients as close to float32's as before (test_bfloat16_attention_core_is_close_to_float32). float32
  operands: unchanged. The mask is additive (0 or NEG_INF) and gets no gradient.
  """
  return _attention_weights_fwd(q_BxHxQxE, k_BxHxKxE, bias_1xHxQxK, additive_mask_Bx1xQxK)[0]


def _attention_weights_fwd(q_BxHxQxE, k_BxHxKxE, bias_1xHxQxK, additive_mask_Bx1xQxK):
  logits_BxHxQxK = wide_einsum("bhqe,bhke->bhqk", q_BxHxQxE, k_BxHxKxE)
  # The bias and the mask joined first: the library fusion of q.k and the softmax takes no broadcast, so XLA stores
  # what it adds at full [B, H, Q, K] size, and every layer's join is the same (one stack's bias and mask), which
  # XLA computes once. Added one by one, each layer's fusion read two such arrays: T5-small's float32 step 16 ms
  # slower (median difference over 8 rounds in one process alternating which ran first, 6 of them slower). The
  # unmasked logits are the same values (the mask adds 0 there).
  additive = [a for a in (bias_1xHxQxK, additive_mask_Bx1xQxK) if a is not None]
  if additive:
    logits_BxHxQxK = logits_BxHxQxK + functools.reduce(jnp.add, additive)
  p_BxHxQxK = jax.nn.softmax(logits_BxHxQxK.astype(jnp.float32), axis=-1).astype(q_BxHxQxE.dtype)
  # The bias rides along only for its dtype and presence (None stays None); it is not copied.
  return p_BxHxQxK, (q_BxHxQxE, k_BxHxKxE, bias_1xHxQxK, p_BxHxQxK)


def _attention_weights_bwd(residuals, dp_BxHxQxK):
  q_BxHxQxE, k_BxHxKxE, bias_1xHxQxK, p_BxHxQxK = residuals
  p, dp = p_BxHxQxK.astype(jnp.float32), dp_BxHxQxK.astype(jnp.float32)
  ds_BxHxQxK = (p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True))).astype(q_BxHxQxE.dtype)
  dq = wide_einsum("bhqk,bhke->bhqe", ds_BxHxQxK, k_BxHxKxE)
  dk = transposed_product(ds_BxHxQxK, q_BxHxQxE)  # ds^T q
  dbias = None
  if bias_1xHxQxK is not None:
    dbias = batch_sum(ds_BxHxQxK).astype(bias_1xHxQxK.dtype)
  return dq.astype(q_BxHxQxE.dtype), dk.astype(k_BxHxKxE.dtype), dbias, None


attention_weights.defvjp(_attention_weights_fwd, _attention_weights_bwd)


@jax.custom_vjp
def attention_values(weights_BxHxQxK: Array, v_BxHxKxE: Array) -> Array:
  """weights @ values per batch row and head: [B, H, Q, K] @ [B, H, K, E] -> [B, H, Q, E] in float32 (the caller
  rounds it once it has moved it)."""
  return wide_matmul(weights_BxHxQxK, v_BxHxKxE)


def _attention_values_fwd(weights_BxHxQxK, v_BxHxKxE):
  return attention_values(weights_BxHxQxK, v_BxHxKxE), (weights_BxHxQxK, v_BxHxKxE)


def _attention_values_bwd(residuals, g_BxHxQxE):
  weights_BxHxQxK, v_BxHxKxE = residuals
  g_BxHxQxE = g_BxHxQxE.astype(v_BxHxKxE.dtype)  # the float32 output's gradient, back in the operands' dtype
  dweights = wide_einsum("bhqe,bhke->bhqk", g_BxHxQxE, v_BxHxKxE)
  dv = transposed_product(weights_BxHxQxK, g_BxHxQxE)  # weights^T g
  return dweights.astype(weights_BxHxQxK.dtype), dv.astype(v_BxHxKxE.dtype)


attention_values.defvjp(_attention_values_fwd, _attention_values_bwd)
