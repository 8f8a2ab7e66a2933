"""Scheduled ("staged") dropout: a factor of every configured dropout rate, as a jnp function of the step.

The train step evaluates the schedule at `state['step']` and passes the factor to the model as a traced scalar, so
changing it never recompiles. Specs (the DROPOUT_SCHEDULE gin macro):

  None or 'constant'          1 at every step (the configured rates throughout).
  'staged:K'                  0 for steps 0 .. K-1, then 1: dropout switched on after K steps.
  'linear:A:B'                0 before A, rising linearly to 1 at B, 1 after.
  'piecewise:S1=F1,S2=F2,...' F_i from step S_i on (S ascending), 0 before S1; factors >= 0.

Steps count optimizer updates: the update that turns `state['step']` s into s + 1 uses factor(s). Any step may be
given in epochs with an 'ep' suffix ('staged:4ep', 'linear:1ep:2.5ep'); `resolve` converts them with the
run's steps per epoch (see `steps_per_epoch`), rounding to the nearest step.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp

_NUMBER = r"(\d+(?:\.\d*)?)(ep)?"  # a step, or epochs with an 'ep' suffix


@dataclasses.dataclass(frozen=True)
class DropoutSchedule:
  """factor(step): 'constant' (1), 'linear' from steps[0] to steps[1], or 'piecewise' (values[i] from steps[i])."""
  kind: str = "constant"
  steps: tuple[int, ...] = ()
  values: tuple[float, ...] = ()

  def __call__(self, step: jax.Array | int) -> jax.Array:
    step = jnp.asarray(step, jnp.int32)
    if self.kind == "constant":
      return jnp.ones((), jnp.float32)
    if self.kind == "linear":
      start, end = self.steps
      if end <= start:
        return (step >= start).astype(jnp.float32)
      return jnp.clip((step - start).astype(jnp.float32) / (end - start), 0.0, 1.0)
    index = jnp.searchsorted(jnp.asarray(self.steps, jnp.int32), step, side="right")
    return jnp.asarray((0.0, *self.values), jnp.float32)[index]

  @property
  def max_factor(self) -> float:
    return max(self.values) if self.kind == "piecewise" else 1.0


def steps_per_epoch(source_tokens: int, batch_size: int, inputs_length: int, noise_density: float = 0.15,
                    mean_noise_span_length: float = 3.0) -> float:
  """Steps per pass over `source_tokens` tokens of text, for T5 span corruption.

  Each example is one chunk of the raw length whose corrupted inputs fill `inputs_length` (568 tokens for 512 at
  the T5 defaults), so packing puts one chunk in each row and a step consumes batch_size x raw_length tokens. For
  other objectives it is an estimate: the trainer counts a repeated task's steps per epoch from its stream
  (`pipeline.steps_per_epoch`) and uses this only where there is none, and its `train/epochs` metric counts the
  tokens actually consumed.
  """
  from repeat_lm.data import objectives  # imports TensorFlow: only when epochs are used
  raw_length, _ = objectives.random_spans_lengths(inputs_length, noise_density, mean_noise_span_length)
  return source_tokens / (batch_size * raw_length)


def _to_step(number: str, epochs: str | None, epoch_steps: float | None, spec: str) -> int:
  if not epochs:
    if float(number) != int(float(number)):
      raise ValueError(f"Dropout schedule {spec!r}: step {number} is not a whole number (epochs need 'ep').")
    return int(float(number))
  if epoch_steps is None:
    raise ValueError(f"Dropout schedule {spec!r} is given in epochs, but the number of steps per epoch is unknown "
                     "(the training source is not a local corpus): give the switch points in steps.")
  return int(round(float(number) * epoch_steps))


def resolve(spec: str | Callable[[jax.Array], jax.Array] | None,
            epoch_steps: float | None = None) -> Callable[[jax.Array], jax.Array]:
  """A schedule from a spec string (see the module docstring); callables (step -> factor) pass through."""
  if callable(spec):
    return spec
  if spec is not None and not isinstance(spec, str):  # 1000 or True ended in "'int' object has no attribute 'strip'"
    raise ValueError(f"DROPOUT_SCHEDULE={spec!r} must be a quoted string such as 'staged:1000' (on the command "
                     "line --gin.DROPOUT_SCHEDULE=\"'staged:1000'\"), or None.")
  if spec is None or spec.strip() == "constant":
    return DropoutSchedule()
  text = spec.replace(" ", "")
  kind, _, args = text.partition(":")
  step = lambda number, epochs: _to_step(number, epochs, epoch_steps, spec)
  if kind == "staged" and (m := re.fullmatch(_NUMBER, args)):
    return DropoutSchedule("piecewise", (step(*m.groups()),), (1.0,))
  if kind == "linear" and (m := re.fullmatch(f"{_NUMBER}:{_NUMBER}", args)):
    start, end = step(m.group(1), m.group(2)), step(m.group(3), m.group(4))
    if end < start:
      raise ValueError(f"Dropout schedule {spec!r}: the ramp ends (step {end}) before it starts (step {start}).")
    return DropoutSchedule("linear", (start, end))
  if kind == "piecewise" and args:
    pieces = [re.fullmatch(f"{_NUMBER}=(\\d+(?:\\.\\d*)?)", p) for p in args.split(",")]
    if all(pieces):
      steps = tuple(step(m.group(1), m.group(2)) for m in pieces)
      if list(steps) != sorted(set(steps)):
        raise ValueError(f"Dropout schedule {spec!r}: switch steps must increase, got {list(steps)}.")
      return DropoutSchedule("piecewise", steps, tuple(float(m.group(3)) for m in pieces))
  raise ValueError(f"Unknown dropout schedule {spec!r}: use None, 'constant', 'staged:STEP', 'linear:START:END' or "
                   "'piecewise:STEP=FACTOR,...' (steps may be epochs, e.g. 'staged:4ep').")


def uses_epochs(spec: str | Callable | None) -> bool:
  """Whether a spec gives any switch point in epochs (then the trainer works out the steps per epoch)."""
  return isinstance(spec, str) and re.search(r"[\d.]ep\b", spec.replace(" ", "")) is not None  # as `resolve` reads it


def max_factor(schedule: Callable[[jax.Array], jax.Array]) -> float:
  """The schedule's largest factor (for checking rate x factor < 1); 1 for callables of unknown range."""
  return schedule.max_factor if isinstance(schedule, DropoutSchedule) else 1.0

