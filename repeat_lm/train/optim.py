"""Optimizers and learning-rate schedules (T5X defaults: Adafactor with `constant * rsqrt_decay`)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from repeat_lm import checks
from repeat_lm.train import adafactor

_SCHEDULE_FACTORS = ("constant", "linear_warmup", "rsqrt_decay", "linear_decay", "cosine_decay")


def _check_non_negative(setting: str, value: Any) -> None:
  """A finite number >= 0 (the gin macros pass Python numbers; they are the only ones checked). A negative rate,
  weight decay or clipping norm flips the sign of a step (gradient ascent, or weights that grow) and NaN makes every
  parameter NaN, both silently until the loss shows it. A string (a quoted gin value, '1e-3') is no schedule either:
  it built the optimizer and failed at the first step with a TypeError that named no setting."""
  if isinstance(value, (int, float, np.number, str)) and not checks.non_negative_number(value):
    raise ValueError(f"{setting}={value!r} must be a finite number >= 0.")


def make_schedule(factors: str = "constant * rsqrt_decay", base_learning_rate: float = 1.0,
                  warmup_steps: int = 10_000, total_steps: int | None = None,
                  end_learning_rate_fraction: float = 0.0) -> optax.Schedule:
  """A product of named factors, as T5X's `create_learning_rate_scheduler`.

  constant: base_learning_rate. linear_warmup: min(1, step / warmup_steps), 1 when warmup_steps is 0. rsqrt_decay:
  1 / sqrt(max(step, warmup_steps)) (flat during warm-up, so with base 1.0 and 10k warm-up steps T5's rate is 0.01
  then decays).
  linear_decay / cosine_decay: from 1 at the end of warm-up to `end_learning_rate_fraction` at `total_steps`.
  """
  _check_non_negative("optim.make_schedule.base_learning_rate", base_learning_rate)
  _check_non_negative("optim.make_schedule.end_learning_rate_fraction", end_learning_rate_fraction)
  # A negative warm-up started the decay before step 0 (cosine at 0.98 of the rate on step 0), NaN made every rate NaN.
  if not checks.is_count(warmup_steps, 0):
    raise ValueError(f"optim.make_schedule.warmup_steps={warmup_steps!r} must be a whole number >= 0.")
  if total_steps is not None and not checks.is_count(total_steps, 0):
    raise ValueError(f"optim.make_schedule.total_steps={total_steps!r} must be a whole number (or None).")
  names = [f.strip() for f in factors.split("*")]
  unknown = [n for n in names if n not in _SCHEDULE_FACTORS]
  if unknown:
    raise ValueError(f"Unknown learning-rate factor(s) {unknown} in {factors!r}; known: {_SCHEDULE_FACTORS}.")
  if any(n in ("linear_decay", "cosine_decay") for n in names):
    if not total_steps:
      raise ValueError(f"Schedule {factors!r} decays to the end of training: set optim.make_schedule.total_steps.")
    # The decay starts where warm-up ends: with total_steps <= warmup_steps every step would train at the full rate
    # (e.g. the default 10k warm-up under a 5k-step cosine run), a constant schedule instead of the decay asked for.
    if total_steps <= warmup_steps:
      raise ValueError(f"Schedule {factors!r} decays from the end of warm-up (warmup_steps={warmup_steps}) to "
                       f"total_steps={total_steps}, which is not after it: lower optim.make_schedule.warmup_steps.")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    lr = jnp.asarray(1.0, jnp.float32)
    for name in names:
      if name == "constant":
        lr *= base_learning_rate
      elif name == "linear_warmup":
        if warmup_steps > 0:  # without warm-up the full rate from step 0 (step / 1 would make step 0's rate 0)
          lr *= jnp.minimum(1.0, step / warmup_steps)
      elif name == "rsqrt_decay":
        lr *= jnp.reciprocal(jnp.sqrt(jnp.maximum(step, max(warmup_steps, 1))))
      else:
        progress = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
        shape = 1.0 - progress if name == "linear_decay" else 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        lr *= end_learning_rate_fraction + (1.0 - end_learning_rate_fraction) * shape
    return lr

  return schedule


def _check_decay_embeddings(setting: str, value: Any) -> None:
  """A bool. The mask's embedding leaves are `decay_embeddings` itself: a gin string 'False' (truthy to optax) decayed
  the embeddings it was meant to spare, without a word, and None failed at the first step in a pytree structure error
  that named no setting."""
  if not checks.is_bool(value):
    raise ValueError(f"{setting}={value!r} must be True or False (no quotes): whether weight decay applies to the "
                     "token and relative-position embeddings.")


def default_weight_decay_mask(params: Any, decay_embeddings: bool = True) -> Any:
  """A tree of bools like `params`: True where weight decay applies.

  Never RMSNorm scales (leaves named 'scale': decaying them pulls every norm's gain towards 0); token and relative
  position embeddings ('embedding', 'rel_embedding') only if `decay_embeddings`; every other kernel always.
  """
  _check_decay_embeddings("optim.default_weight_decay_mask.decay_embeddings", decay_embeddings)
  def decays(path, _) -> bool:
    name = getattr(path[-1], "key", None) if path else None
    if name == "scale":
      return False
    if name in ("embedding", "rel_embedding"):
      return decay_embeddings
    return True

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(name: str = "adafactor", learning_rate: optax.Schedule | float | None = None,
                   weight_decay: float = 0.0, clip_gradient_norm: float | None = None,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   adafactor_decay_rate: float = 0.8, weight_decay_mask: Callable[[Any], Any] | Any | None = None,
                   decay_embeddings: bool = True) -> optax.GradientTransformation:
  """Adafactor with T5X's T5 v1.1 settings, or AdamW, with masked weight decay (docs/regularisation.md).

  Adafactor: factored second moments (dims >= 128), decay_rate 0.8 with no offset, update clipping at RMS 1.0,
  updates scaled by the parameter RMS (floored at 1e-3), no momentum, epsilon 1e-30. Its weight decay is optax's
  `weight_decay_rate`, per step and not scaled by the learning rate: p <- p - (lr * u + weight_decay * p).
  AdamW's is decoupled and scaled by the learning rate: p <- p - lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * p).
  `weight_decay_mask` (a tree of bools or a params -> tree function) replaces `default_weight_decay_mask`, whose
  `decay_embeddings` says whether embeddings decay.
  """
  _check_non_negative("optim.make_optimizer.learning_rate", learning_rate)  # a number; a schedule checks its own
  _check_non_negative("optim.make_optimizer.weight_decay (WEIGHT_DECAY)", weight_decay)
  if clip_gradient_norm is not None:  # 0 (like None) clips nothing
    _check_non_negative("optim.make_optimizer.clip_gradient_norm", clip_gradient_norm)
  _check_decay_embeddings("optim.make_optimizer.decay_embeddings", decay_embeddings)  # now, not at the first step
  lr = learning_rate if learning_rate is not None else make_schedule()
  mask = weight_decay_mask if weight_decay_mask is not None else functools.partial(
      default_weight_decay_mask, decay_embeddings=decay_embeddings)
  if name == "adafactor":
    # The decay stage is there even at 0, so the optimizer state (and checkpoint) has one layout per optimizer and
    # evaluation can restore a checkpoint whatever WEIGHT_DECAY it was trained with.
    tx = adafactor.adafactor(lr, decay_rate=adafactor_decay_rate, min_dim_size_to_factor=128,
                             clipping_threshold=1.0, epsilon=1e-30, weight_decay_rate=weight_decay,
                             weight_decay_mask=mask)
  elif name == "adamw":
    tx = optax.adamw(learning_rate=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)
  else:
    raise ValueError(f"Unknown optimizer {name!r}; use 'adafactor' or 'adamw'.")
  if clip_gradient_norm:
    tx = optax.chain(optax.clip_by_global_norm(clip_gradient_norm), tx)
  _RATES[id(tx)] = (tx, lr)
  while len(_RATES) > _MAX_RATES:  # a process builds a few (the trainer's, a test's): keep the newest
    del _RATES[next(iter(_RATES))]
  return tx


# The rate each optimizer make_optimizer built trains at, for the trainer's logged train/learning_rate: logged from
# the trainer's own `learning_rate`, a rate bound on the optimizer alone (optim.make_optimizer.learning_rate) was
# logged as pretrain.gin's schedule (0.316) while AdamW trained at 0.001. Keyed by id, the optimizer kept with its
# rate so an id is never reused while its entry stands.
_RATES: dict[int, tuple[optax.GradientTransformation, optax.Schedule | float]] = {}
_MAX_RATES = 64


def rate_of(tx: optax.GradientTransformation) -> optax.Schedule | float | None:
  """The learning rate (or schedule) `tx` was built with by make_optimizer; None for an optimizer built elsewhere."""
  entry = _RATES.get(id(tx))
  return entry[1] if entry is not None and entry[0] is tx else None


def learning_rate_at(learning_rate: optax.Schedule | float | None, step: int) -> float:
  """The rate an optimizer built by `make_optimizer(learning_rate=...)` uses at `step` (for logging)."""
  lr = learning_rate if learning_rate is not None else make_schedule()
  return float(lr(step)) if callable(lr) else float(lr)
