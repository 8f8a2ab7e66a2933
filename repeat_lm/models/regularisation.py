"""Stochastic regularisers with rates that may be traced: dropout and DropPath (stochastic depth).

Both draw from the 'dropout' rng stream (the trainer folds the step into it, so masks depend on (seed, step) only)
and are identities when `deterministic`. The configured rate is static, so a rate of 0 removes the op from the
graph; a traced `scale` (the dropout schedule) or a traced per-layer rate (DropPath under `nn.scan`) changes the
mask without recompiling. A unit keeps its value with probability 1 - rate and is divided by 1 - rate, so the
expectation is unchanged; at an effective rate of exactly 0 every unit is kept and divided by 1, an exact identity.

Shape letters as in layers.py.
"""

from __future__ import annotations

import numbers

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

DROPPATH_DEPTH_SCALINGS = ("constant", "linear")


def is_rate(value) -> bool:
  """A configured dropout or DropPath rate: a number in [0, 1) (T5Config checks every rate it holds with this)."""
  return isinstance(value, numbers.Real) and 0.0 <= value < 1.0


def _keep_and_rescale(x: Array, keep: Array, rate: Array) -> Array:
  """x / (1 - rate) where `keep`, else 0; the division runs in float32 so bfloat16 keeps an unbiased rescale."""
  kept = (x.astype(jnp.float32) / (1.0 - rate)).astype(x.dtype)
  return jnp.where(keep, kept, jnp.zeros_like(x))


class Dropout(nn.Module):
  """Elementwise dropout at `rate * scale`; `scale` may be a traced scalar (the dropout schedule's factor)."""
  rate: float  # the configured rate; 0 means no op at all
  # Axes sharing one mask (T5X / flaxformer's T5 uses (-2,): one draw per feature for the whole sequence).
  broadcast_dims: tuple[int, ...] = ()

  @nn.compact
  def __call__(self, x: Array, deterministic: bool, scale: Array | float = 1.0) -> Array:
    # A rate a layer passes itself (layers.dropout) gets T5Config's check: at 1 every unit was zeroed with NaN
    # gradients (x / 0 under the mask), at NaN the same, and a negative rate scaled the activations by 1 / (1 - rate).
    # Only a concrete number is checked; the (possibly traced) schedule comes in `scale`.
    if isinstance(self.rate, numbers.Real) and not is_rate(self.rate):
      raise ValueError(f"Dropout rate {self.rate} must lie in [0, 1) (the share of units dropped).")
    if self.rate == 0.0 or deterministic:
      return x
    rate = self.rate * jnp.asarray(scale, jnp.float32)
    broadcast = {d % x.ndim for d in self.broadcast_dims}
    mask_shape = tuple(1 if i in broadcast else n for i, n in enumerate(x.shape))
    # uniform is in [0, 1): at rate 0 every unit is kept, whatever the draw.
    keep = jnp.broadcast_to(jax.random.uniform(self.make_rng("dropout"), mask_shape) >= rate, x.shape)
    return _keep_and_rescale(x, keep, rate)


class DropPath(nn.Module):
  """Stochastic depth: zero a residual branch for whole rows of the batch (one draw per row, axis 0)."""

  @nn.compact
  def __call__(self, branch: Array, rate: Array | float, deterministic: bool) -> Array:
    if deterministic:
      return branch
    rate = jnp.asarray(rate, jnp.float32)
    keep_B = jax.random.uniform(self.make_rng("dropout"), branch.shape[:1]) >= rate
    keep = keep_B.reshape(branch.shape[:1] + (1,) * (branch.ndim - 1))
    return _keep_and_rescale(branch, keep, rate)


def droppath_rates(rate: float, num_layers: int, depth_scaling: str = "constant") -> np.ndarray:
  """Per-layer DropPath rates [num_layers] of one stack.

  'constant': every layer `rate`. 'linear': layer l (0-based) gets rate * (l + 1) / num_layers, so the deepest layer
  gets `rate` and the first rate / num_layers (Huang et al. 2016's linear decay of the survival probability).
  """
  if depth_scaling not in DROPPATH_DEPTH_SCALINGS:
    raise ValueError(f"droppath_depth_scaling={depth_scaling!r}; choose from {DROPPATH_DEPTH_SCALINGS}.")
  if depth_scaling == "constant":
    return np.full((num_layers,), rate, np.float32)
  return (rate * np.arange(1, num_layers + 1) / num_layers).astype(np.float32)
