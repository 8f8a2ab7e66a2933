"""The one check of a configured count (a size, a length, a step, a period), shared by every layer of the package,
and of a finite number (a rate, a decay).

Counts arrive from gin bindings and command-line flags, where a typo gives a value Python would accept as a number
but an array shape or a loop would not: 512. (a float), '512' (a string), True (a bool, which Python counts as 1).
Each failed far from the typo (a shape TypeError at model init, a silent batch of one), so every config refuses them
where it is built, with these predicates.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np


def whole_number(value: Any) -> bool:
  """An int or a numpy integer (anything with __index__), not a bool, a float or a string."""
  try:
    operator.index(value)
  except TypeError:
    return False
  return not isinstance(value, bool)


def is_count(value: Any, minimum: int = 1) -> bool:
  """A whole number of at least `minimum`."""
  return whole_number(value) and bool(value >= minimum)


def real_number(value: Any) -> bool:
  """An int, float or numpy number, infinities and NaN included: not a bool (True == 1) or a string."""
  return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def finite_number(value: Any) -> bool:
  """A finite int, float or numpy number: not a bool, a string, NaN or an infinity."""
  return real_number(value) and math.isfinite(value)


def non_negative_number(value: Any) -> bool:
  """A finite number >= 0 (a rate, a weight, a decay): as finite_number, and not negative."""
  return finite_number(value) and bool(value >= 0)


def is_bool(value: Any) -> bool:
  """True or False (a Python or numpy bool): not the string 'False' (truthy, so it meant True), nor 0 / 1."""
  return isinstance(value, (bool, np.bool_))


def check_bools(owner: Any, names: tuple[str, ...]) -> None:
  """ValueError naming each of `owner`'s flags in `names` that is no bool (a gin string 'False' silently meant True)."""
  bad = {n: getattr(owner, n) for n in names if not is_bool(getattr(owner, n))}
  if bad:
    raise ValueError(f"{type(owner).__name__} flags must be True or False (no quotes): {bad}.")
