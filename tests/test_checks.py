"""The shared count check: what gin and flags may give as a size, a length, a step or a period."""

import numpy as np
import pytest

from repeat_lm import checks


@pytest.mark.parametrize("value", [0, 1, 512, -3, np.int32(7), np.int64(2**40)])
def test_ints_and_numpy_integers_are_whole_numbers(value):
  assert checks.whole_number(value)


@pytest.mark.parametrize("value", [True, False, 512.0, 1.5, "512", None, np.float32(2.0), [1]])
def test_bools_floats_and_strings_are_not(value):
  # True is 1 to Python and 512.0 == 512, but neither is a count a shape or a range may take.
  assert not checks.whole_number(value)


@pytest.mark.parametrize("value, minimum, expected", [(1, 1, True), (0, 1, False), (0, 0, True), (-1, 0, False),
                                                      (np.int16(3), 3, True), (True, 1, False), (2.0, 1, False)])
def test_counts_are_whole_numbers_of_at_least_the_minimum(value, minimum, expected):
  assert checks.is_count(value, minimum) is expected


@pytest.mark.parametrize("value, expected", [(0, True), (0.8, True), (np.float32(-2.5), True), (np.int64(3), True),
                                             (True, False), (float("nan"), False), (float("inf"), False),
                                             ("0.8", False), (None, False)])
def test_finite_numbers(value, expected):
  assert checks.finite_number(value) is expected


@pytest.mark.parametrize("value, expected", [(0, True), (0.8, True), (np.float32(2.5), True), (-1e-9, False),
                                             (np.float32(-2.5), False), (True, False), (float("nan"), False),
                                             (float("inf"), False), ("0.8", False), (None, False)])
def test_non_negative_numbers(value, expected):
  assert checks.non_negative_number(value) is expected


@pytest.mark.parametrize("value, expected", [(True, True), (False, True), (np.bool_(False), True), ("False", False),
                                             ("True", False), (0, False), (1, False), (None, False)])
def test_bools(value, expected):
  # A gin string 'False' is truthy, and 0 / 1 are not the flag a dataclass field declares.
  assert checks.is_bool(value) is expected
