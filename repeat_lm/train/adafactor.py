"""Adafactor as optax builds it (`optax.adafactor`, stage for stage, the same state, so checkpoints interchange;
the same values up to summation order), with three stages rewritten for speed (measured on the CPU step).

- `scale_by_factored_rms` keeps, per step, the mean of grad^2 over each of a matrix's two largest axes. XLA:CPU
  reduces a major axis into a wide minor one slowly: for the [512, 32128] logits kernel of T5 v1.1 small, the mean
  over the 512 rows took 24 ms of the 2.5 s training step. ones[512] @ grad^2 (YNNPACK's dot) sums the same: 30.5
  -> 5.9 ms in isolation with the elementwise work around it, -20 ms per step (the median difference over 12
  interleaved rounds of the whole step). Where the reduced axis is the longer one (the [32128, 512] embedding's
  mean over tokens) the reduce is the faster of the two and stays.
- The update clipping runs inside `scale_by_factored_rms`, where a factored update's RMS comes from grad^2 and the
  factors (`factored_mean_square`); an identity keeps the clip stage's place in the chain and its empty state.
- `scale_by_param_rms` drops optax's gradient-safe RMS (a second RMS of a `where`-selected copy of every
  parameter): -12 ms per step, measured the same way.

One behaviour is T5X's rather than optax's: the parameter scale and the update clipping take one RMS per block of a
stacked parameter, not one over the whole tensor, and the factored statistics never factor a block axis. T5X's
factor rules make the 'layers', 'stack' and 'expert' axes BATCH axes, left out of the RMS and the factoring, so a
scanned model (every kernel stacked over layers) and a Switch model (expert kernels stacked over experts) update each
layer and expert as if it were its own parameter, as the unscanned model does. The axes come from the parameters'
logical names, which the train state's init and step supply (`logical_axes`); without them (a plain optax call) the
RMS is over the whole tensor and any axis may be factored, as optax's.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from repeat_lm import checks


def factored_dims(shape: tuple[int, ...], min_dim_size_to_factor: int,
                  blocks: tuple[int, ...] = ()) -> tuple[int, int] | None:
  """(second largest axis, largest axis) when both are at least `min_dim_size_to_factor` long, else None (optax's
  rule, with its argsort for ties), among the axes not in `blocks`.

  `blocks` are the axes T5X's factor rules never factor (unfactored_axes). Block axes (layers, experts) are BATCH
  axes there, so each block keeps its own row and column statistics. Were they candidates, 256 experts of
  [128, 512] would be factored over experts x mlp, every expert sharing one column statistic, where each expert
  alone is factored over embed x mlp."""
  axes = [i for i in range(len(shape)) if i not in blocks]
  if len(axes) < 2:
    return None
  by_size = [axes[i] for i in np.argsort([shape[a] for a in axes])]
  if shape[by_size[-2]] < min_dim_size_to_factor:
    return None
  return int(by_size[-2]), int(by_size[-1])


def mean_over(x: jax.Array, axis: int) -> jax.Array:
  """jnp.mean(x, axis); on CPU a major axis shorter than the axes after it is summed by a matmul with ones."""
  after = math.prod(x.shape[axis + 1:])
  if jax.default_backend() != "cpu" or axis == x.ndim - 1 or x.shape[axis] >= after:
    return jnp.mean(x, axis=axis)
  ones = jnp.ones((x.shape[axis],), x.dtype)
  total = jnp.tensordot(ones, x, axes=((0,), (axis,)), preferred_element_type=jnp.float32)
  return (total / x.shape[axis]).astype(x.dtype)


def factored_mean_square(grad_sqr: jax.Array, row_factor: jax.Array, col_factor: jax.Array, dims: tuple[int, int],
                         axes: tuple[int, ...] | None) -> jax.Array:
  """mean(square(grad x row_factor x col_factor)) over `axes` (None: all, else kept as 1s), as products with grad^2.

  The factors are broadcast as in scale_by_factored_rms (the row factor along the largest axis d0, the column factor
  along d1); the sum contracts grad^2 with each factor squared (dots on CPU) rather than reducing the update."""
  d1, d0 = dims
  letters = "abcdefghijklmnopqrstuvwxyz"[:grad_sqr.ndim]
  kept = "" if axes is None else "".join(c for i, c in enumerate(letters) if i not in axes)
  without = lambda axis: letters[:axis] + letters[axis + 1:]
  total = jnp.einsum(f"{letters},{without(d0)},{without(d1)}->{kept}", grad_sqr, jnp.square(row_factor),
                     jnp.square(col_factor), preferred_element_type=jnp.float32)
  count = math.prod(grad_sqr.shape) if axes is None else math.prod(grad_sqr.shape[i] for i in axes)
  mean = total / count
  if axes is not None:
    mean = jnp.expand_dims(mean, tuple(axes))
  return mean.astype(grad_sqr.dtype)


def _decay_rate(count: jax.Array, exponent: float) -> jax.Array:
  """Adafactor's second-moment decay at step `count` (from 0): 1 - (count + 1)^-exponent."""
  return 1.0 - jnp.asarray(count + 1, jnp.float32) ** (-exponent)


@dataclasses.dataclass
class _Leaf:
  """One parameter's update and statistics; not a pytree node, so jax.tree.map stops at it."""
  update: jax.Array | None
  v_row: jax.Array
  v_col: jax.Array
  v: jax.Array


def _state(count: jax.Array, leaves) -> optax.FactoredState:
  return optax.FactoredState(count=count, v_row=jax.tree.map(lambda o: o.v_row, leaves),
                             v_col=jax.tree.map(lambda o: o.v_col, leaves), v=jax.tree.map(lambda o: o.v, leaves))


def scale_by_factored_rms(decay_rate: float = 0.8, step_offset: int = 0, min_dim_size_to_factor: int = 128,
                          epsilon: float = 1e-30,
                          clipping_threshold: float | None = None) -> optax.GradientTransformation:
  """grad / sqrt(second moment), the moment factored into row and column means for matrices (optax's, factored).

  With `clipping_threshold`, each update is then clipped as `clip_by_block_rms` clips it (one RMS per block), here
  where the factors are at hand: a factored update's mean square is sum(grad^2 x row_factor^2 x col_factor^2), on CPU
  two dots with grad^2, which the moment's means have stored already. Reduced from the update itself, as the clip
  stage does, it made XLA:CPU store every update (its library reductions take no broadcast factors) and read it
  twice more: T5-small's float32 step 3.409 -> 3.393 s (medians of 8 rounds in one process alternating which ran
  first, faster in 7; median difference 9.5 ms).
  """
  # decay_rate is the exponent of 1 - (step + 1)^-decay_rate. Hugging Face's Adafactor writes the same T5 setting
  # as -0.8: taken here, the decay goes negative from the second step, the moment with it, and updates are NaN.
  if not checks.non_negative_number(decay_rate):
    raise ValueError(f"Adafactor decay_rate={decay_rate!r} must be a finite number >= 0 (T5: 0.8; Hugging Face "
                     "writes it as -0.8).")

  def init_fn(params):
    def init_leaf(param, blocks):
      one = jnp.zeros((1,), param.dtype)
      dims = factored_dims(param.shape, min_dim_size_to_factor, blocks)
      if dims is None:
        return _Leaf(None, one, one, jnp.zeros_like(param))
      d1, d0 = dims
      without = lambda axis: jnp.zeros(param.shape[:axis] + param.shape[axis + 1:], param.dtype)
      return _Leaf(None, without(d0), without(d1), one)

    unfactored = _block_axes(params, UNFACTORED_AXIS_NAMES)
    return _state(jnp.zeros([], jnp.int32), jax.tree.map(init_leaf, params, unfactored))

  def update_fn(grads, state, params=None):
    if params is None:
      raise ValueError("scale_by_factored_rms needs the parameters: tx.update(grads, state, params).")
    rate = _decay_rate(state.count - step_offset, decay_rate)

    def update_leaf(grad, v_row, v_col, v, param, blocks, rms_axes):
      # The unused statistics are [1] placeholders, as optax's; passed through rather than rebuilt, so where the
      # train step donates its state (GPU and TPU) those buffers are reused for them too.
      grad_sqr = jnp.square(grad)  # parameters are real
      dims = factored_dims(param.shape, min_dim_size_to_factor, blocks)
      expected = (1,) if dims is None else param.shape[:dims[1]] + param.shape[dims[1] + 1:]
      if v_row.shape != expected:  # else a [1] placeholder would broadcast silently into a full-size statistic
        raise ValueError(f"Adafactor state of a {param.shape} parameter has v_row {v_row.shape}, {expected} expected: "
                         "initialise it (tx.init) inside the same adafactor.logical_axes block as the update.")
      if dims is None:
        new_v = (rate * v + (1.0 - rate) * (grad_sqr + epsilon)).astype(param.dtype)
        return _Leaf(clipped(grad * new_v ** -0.5, rms_axes), v_row, v_col, new_v)
      d1, d0 = dims
      # mean(grad^2 + eps) as mean(grad^2) + eps (the same up to rounding): grad^2 itself serves the clip below.
      new_v_row = (rate * v_row + (1.0 - rate) * (mean_over(grad_sqr, d0) + epsilon)).astype(param.dtype)
      new_v_col = (rate * v_col + (1.0 - rate) * (mean_over(grad_sqr, d1) + epsilon)).astype(param.dtype)
      d1_in_v_row = d1 - 1 if d1 > d0 else d1
      row_factor = (new_v_row / jnp.mean(new_v_row, axis=d1_in_v_row, keepdims=True)) ** -0.5
      col_factor = new_v_col ** -0.5
      update = grad * jnp.expand_dims(row_factor, d0) * jnp.expand_dims(col_factor, d1)
      mean_square = None
      if clipping_threshold is not None and jax.default_backend() == "cpu":
        mean_square = factored_mean_square(grad_sqr, row_factor, col_factor, dims, rms_axes)
      return _Leaf(clipped(update, rms_axes, mean_square), new_v_row, new_v_col, v)

    def clipped(update, rms_axes, mean_square=None):
      return update if clipping_threshold is None else _clip(update, clipping_threshold, rms_axes, mean_square)

    leaves = jax.tree.map(update_leaf, grads, state.v_row, state.v_col, state.v, params,
                          _block_axes(params, UNFACTORED_AXIS_NAMES), _rms_axes(params))
    return jax.tree.map(lambda o: o.update, leaves), _state(optax.safe_increment(state.count), leaves)

  return optax.GradientTransformation(init_fn, update_fn)


# Logical axis names that are T5X factor-rule BATCH axes (t5x.adafactor.standard_logical_factor_rules, and 'expert' in
# T5X's MoE configs): one RMS per index along them.
BLOCK_AXIS_NAMES = frozenset({"layers", "stack", "expert"})
# Names T5X's factor rules give FactorDim.NONE: never factored either (T5X factors only a ROW and a COLUMN axis), so
# the router kernel ('embed', 'unmodeled') of a model with >= 128 experts keeps its whole second moment, as in T5X.
UNFACTORED_AXIS_NAMES = frozenset({"unmodeled", "relpos_buckets"})
_logical_axes: contextvars.ContextVar = contextvars.ContextVar("adafactor_logical_axes", default=None)


@contextlib.contextmanager
def logical_axes(tree: Any):
  """While an init or update is traced inside the block: the parameters' logical axis names (a tree of tuples
  matching the parameters, as partitioning.params_logical_axes gives), so the RMS stages leave BLOCK_AXIS_NAMES out
  and the factored statistics never factor them. Initialise and update inside the same names."""
  token = _logical_axes.set(tree)
  try:
    yield
  finally:
    _logical_axes.reset(token)


def block_axes(names: tuple[str, ...] | None, also: frozenset[str] = frozenset()) -> tuple[int, ...]:
  """The positions of BLOCK_AXIS_NAMES (and of the names in `also`) in one parameter's logical axis names."""
  return tuple(i for i, n in enumerate(tuple(names or ())) if n in BLOCK_AXIS_NAMES or n in also)


def unfactored_axes(names: tuple[str, ...] | None) -> tuple[int, ...]:
  """The axes of one parameter that its factored second moment never factors: block and FactorDim.NONE axes."""
  return block_axes(names, UNFACTORED_AXIS_NAMES)


def _block_axes(params: Any, also: frozenset[str] = frozenset()) -> Any:
  """Per parameter, its block axes (a tuple, () for none), from the logical names in `logical_axes`."""
  names_tree = _logical_axes.get()
  if names_tree is None:
    return jax.tree.map(lambda p: (), params)
  return jax.tree.map(lambda names, p: block_axes(names, also), names_tree, params,
                      is_leaf=lambda x: x is None or isinstance(x, tuple))


def _rms_axes(params: Any) -> Any:
  """Per parameter, the axes its RMS averages over (None: all), from the logical names in `logical_axes`."""
  return jax.tree.map(lambda p, blocks: tuple(i for i in range(p.ndim) if i not in blocks) if blocks else None,
                      params, _block_axes(params))


def _rms(x: jax.Array, axes: tuple[int, ...] | None) -> jax.Array:
  return jnp.sqrt(jnp.mean(jnp.square(x), axis=axes, keepdims=axes is not None))


def _clip(update: jax.Array, threshold: float, axes: tuple[int, ...] | None,
          mean_square: jax.Array | None = None) -> jax.Array:
  """update / max(1, RMS / threshold), the RMS over `axes` (as _rms) or the root of a given mean square."""
  rms = _rms(update, axes) if mean_square is None else jnp.sqrt(mean_square)
  return update / jnp.maximum(1.0, rms / threshold)


def clip_by_block_rms(threshold: float) -> optax.GradientTransformation:
  """optax.clip_by_block_rms (update / max(1, RMS / threshold)), the RMS per block of a stacked parameter."""

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, axes: _clip(u, threshold, axes), updates,
                        _rms_axes(updates), is_leaf=lambda x: x is None or isinstance(x, tuple)), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def scale_by_param_rms(min_scale: float = 1e-3) -> optax.GradientTransformation:
  """Each update times its parameter's RMS, floored at `min_scale`: optax's `scale_by_param_block_rms`, same values.

  optax computes the RMS with `safe_root_mean_squares`, which keeps its gradient finite at 0 by taking a second RMS
  of a `where`-selected copy of the parameter: a full-size select and another pass over every parameter. Nothing
  differentiates an optimizer update, so this is max(rms, min_scale), the same number.
  """

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("scale_by_param_rms needs the parameters: tx.update(grads, state, params).")
    return jax.tree.map(lambda u, p, axes: u * jnp.maximum(_rms(p, axes), min_scale), updates, params,
                        _rms_axes(params)), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def adafactor(learning_rate: optax.ScalarOrSchedule, decay_rate: float = 0.8, min_dim_size_to_factor: int = 128,
              clipping_threshold: float | None = 1.0, epsilon: float = 1e-30, weight_decay_rate: float = 0.0,
              weight_decay_mask=None) -> optax.GradientTransformation:
  """optax.adafactor(learning_rate, min_dim_size_to_factor, decay_rate, decay_offset=0,
  multiply_by_parameter_scale=True, clipping_threshold, momentum=None, eps=epsilon, factored=True,
  weight_decay_rate, weight_decay_mask), stage for stage, with this module's stages."""
  # The clip runs inside the first stage (where a factored update's RMS is cheap); optax's clip stage has an empty
  # state, so an identity in its place keeps the state tree, and checkpoints, as optax's.
  stages = [scale_by_factored_rms(decay_rate, 0, min_dim_size_to_factor, epsilon, clipping_threshold)]
  if clipping_threshold is not None:
    stages.append(optax.identity())
  stages += [optax.scale_by_learning_rate(learning_rate, flip_sign=False), scale_by_param_rms(),
             optax.add_decayed_weights(weight_decay_rate, mask=weight_decay_mask), optax.scale(-1)]
  return optax.chain(*stages)
