"""Backward passes whose every matmul XLA:CPU's fast dot library takes: projections, MoE experts and the attention
core on CPU.

XLA:CPU hands a dot to YNNPACK only when its left operand contracts its minor (last) dimension. Autodiff's
backward pass has three kinds of dot that contract a major dimension instead: every weight gradient (x^T g,
contracting batch and length) and, in attention, the key and value gradients (ds^T q and p^T do, contracting
queries). Those fell to Eigen, whose threads then ran beside YNNPACK's on the same two cores; in the profile of the
T5 v1.1 small step (2 cores) YNNPACK's dots ran at about half their isolated speed while Eigen's were in flight.
Here each of them contracts a transposed copy instead (`transposed`: one pass over the operand, which
`optimization_barrier` keeps XLA from folding back into the dot), so all of the step's dots run in YNNPACK: 2.89 ->
2.44 s per step (`repeat-lm bench report`'s ablation, docs/performance.md).

Values are those of autodiff up to summation order (tests/models/test_cpu_layouts.py compares both). GPU and TPU
compilers choose operand layouts themselves, so `explicit_transposes()` is False there and the models keep plain
autodiff; REPEAT_LM_CPU_LAYOUTS=0 does the same on CPU (`repeat-lm bench report` measures the step both ways).
Shape letters as in layers.py; N is a flattened batch x length.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

Array = jax.Array
# Set to 0 to keep autodiff's backward passes on CPU too.
CPU_LAYOUTS_ENV = "REPEAT_LM_CPU_LAYOUTS"


def explicit_transposes() -> bool:
  """Whether the models use this module's backward passes: on the CPU backend (where traced), unless opted out."""
  return jax.default_backend() == "cpu" and os.environ.get(CPU_LAYOUTS_ENV, "1") != "0"


def transposed(x: Array) -> Array:
  """x with its last two axes swapped, materialised (the barrier stops XLA folding the swap into the consuming dot)."""
  return jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


@jax.custom_vjp
def matmul(x_NxI: Array, kernel_IxO: Array) -> Array:
  """x @ kernel over x's last axis (x may have any leading axes); the kernel gradient is transposed(x) @ g."""
  return x_NxI @ kernel_IxO


def _matmul_fwd(x_NxI, kernel_IxO):
  return x_NxI @ kernel_IxO, (x_NxI, kernel_IxO)


def _matmul_bwd(residuals, g_NxO):
  x_NxI, kernel_IxO = residuals
  x_2d = x_NxI.reshape(-1, x_NxI.shape[-1])
  g_2d = g_NxO.reshape(-1, g_NxO.shape[-1])
  dx = (g_NxO @ kernel_IxO.T).astype(x_NxI.dtype)  # contracts the kernel's minor axis: already YNNPACK's form
  dkernel = (transposed(x_2d) @ g_2d).astype(kernel_IxO.dtype)
  return dx, dkernel


matmul.defvjp(_matmul_fwd, _matmul_bwd)


@jax.custom_vjp
def expert_matmul(x_ExGxCxI: Array, kernel_ExIxO: Array) -> Array:
  """Each expert's tokens @ its kernel (MoE experts); the kernel gradients are transposed(x_e) @ g_e."""
  return jnp.einsum("egci,eio->egco", x_ExGxCxI, kernel_ExIxO)


def _expert_matmul_fwd(x_ExGxCxI, kernel_ExIxO):
  return expert_matmul(x_ExGxCxI, kernel_ExIxO), (x_ExGxCxI, kernel_ExIxO)


def _expert_matmul_bwd(residuals, g_ExGxCxO):
  x_ExGxCxI, kernel_ExIxO = residuals
  e = x_ExGxCxI.shape[0]
  x_ExNxI = x_ExGxCxI.reshape(e, -1, x_ExGxCxI.shape[-1])
  g_ExNxO = g_ExGxCxO.reshape(e, -1, g_ExGxCxO.shape[-1])
  dx = jnp.einsum("egco,eio->egci", g_ExGxCxO, kernel_ExIxO).astype(x_ExGxCxI.dtype)
  dkernel = jnp.einsum("ein,eno->eio", transposed(x_ExNxI), g_ExNxO).astype(kernel_ExIxO.dtype)
  return dx, dkernel


expert_matmul.defvjp(_expert_matmul_fwd, _expert_matmul_bwd)


@jax.custom_vjp
def attention_weights(q_BxHxQxE: Array, k_BxHxKxE: Array, bias_1xHxQxK: Array | None,
                      additive_mask_Bx1xQxK: Array | None) -> Array:
  """softmax(q.k + bias + mask) over keys, in float32 (heads-major operands); the bias gradient is the batch sum.

  The mask is additive (0 or NEG_INF) and gets no gradient.
  """
  return _attention_weights_fwd(q_BxHxQxE, k_BxHxKxE, bias_1xHxQxK, additive_mask_Bx1xQxK)[0]


def _attention_weights_fwd(q_BxHxQxE, k_BxHxKxE, bias_1xHxQxK, additive_mask_Bx1xQxK):
  logits_BxHxQxK = jnp.einsum("bhqe,bhke->bhqk", q_BxHxQxE, k_BxHxKxE)
  if bias_1xHxQxK is not None:
    logits_BxHxQxK = logits_BxHxQxK + bias_1xHxQxK
  if additive_mask_Bx1xQxK is not None:
    logits_BxHxQxK = logits_BxHxQxK + additive_mask_Bx1xQxK
  p_BxHxQxK = jax.nn.softmax(logits_BxHxQxK.astype(jnp.float32), axis=-1)
  # The bias rides along only for its dtype and presence (None stays None); it is not copied.
  return p_BxHxQxK, (q_BxHxQxE, k_BxHxKxE, bias_1xHxQxK, p_BxHxQxK)


def _attention_weights_bwd(residuals, dp_BxHxQxK):
  q_BxHxQxE, k_BxHxKxE, bias_1xHxQxK, p_BxHxQxK = residuals
  ds_BxHxQxK = p_BxHxQxK * (dp_BxHxQxK - jnp.sum(dp_BxHxQxK * p_BxHxQxK, axis=-1, keepdims=True))
  ds = ds_BxHxQxK.astype(q_BxHxQxE.dtype)
  dq = jnp.einsum("bhqk,bhke->bhqe", ds, k_BxHxKxE)
  dk = jnp.einsum("bhkq,bhqe->bhke", transposed(ds), q_BxHxQxE)
  dbias = None
  if bias_1xHxQxK is not None:  # a matmul with ones, not a reduction over the major batch axis (see add_shared_bias)
    ones_B = jnp.ones((ds_BxHxQxK.shape[0],), ds_BxHxQxK.dtype)
    dbias = jnp.einsum("b,bhqk->hqk", ones_B, ds_BxHxQxK)[None].astype(bias_1xHxQxK.dtype)
  return dq.astype(q_BxHxQxE.dtype), dk.astype(k_BxHxKxE.dtype), dbias, None


attention_weights.defvjp(_attention_weights_fwd, _attention_weights_bwd)


@jax.custom_vjp
def weighted_values(weights_BxHxQxK: Array, v_BxHxKxE: Array) -> Array:
  """weights @ v per batch and head: [B, H, Q, E]."""
  return jnp.einsum("bhqk,bhke->bhqe", weights_BxHxQxK, v_BxHxKxE)


def _weighted_values_fwd(weights_BxHxQxK, v_BxHxKxE):
  return weighted_values(weights_BxHxQxK, v_BxHxKxE), (weights_BxHxQxK, v_BxHxKxE)


def _weighted_values_bwd(residuals, do_BxHxQxE):
  weights_BxHxQxK, v_BxHxKxE = residuals
  dweights = jnp.einsum("bhqe,bhke->bhqk", do_BxHxQxE, v_BxHxKxE).astype(weights_BxHxQxK.dtype)
  dv = jnp.einsum("bhkq,bhqe->bhke", transposed(weights_BxHxQxK), do_BxHxQxE).astype(v_BxHxKxE.dtype)
  return dweights, dv


weighted_values.defvjp(_weighted_values_fwd, _weighted_values_bwd)
