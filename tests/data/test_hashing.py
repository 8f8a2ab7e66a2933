"""Counter-based randomness: pinned values (a change would silently change every run's data), uniformity."""

import numpy as np
import pytest

from repeat_lm.data import hashing


def test_values_are_pinned():
  # If these change, every task's document orders and masks change: bump the data version on purpose, not by accident.
  assert hashing.derive(0, 'documents', 3) == hashing.derive(0, 'documents', 3)
  assert hashing.derive(0, 'documents', 3) != hashing.derive(0, 'documents', 4) != hashing.derive(1, 'documents', 3)
  assert hashing.derive('1') != hashing.derive(1)  # types are part of the key
  assert hashing.derive(0, 'x') == 0xCC01549421984CF7
  assert hashing.bits(7, np.arange(3)).tolist() == [7191089600892374487, 309689372594955804, 16616101746815609346]


def test_bits_are_indexable():
  full = hashing.bits(5, np.arange(1000))
  assert hashing.bits(5, 637) == full[637]
  np.testing.assert_array_equal(hashing.bits(5, np.arange(600, 700)), full[600:700])


def test_uniform_and_choice():
  u = hashing.uniform(1, np.arange(200_000))
  assert 0 <= u.min() and u.max() < 1 and u.mean() == pytest.approx(0.5, abs=0.003)
  draws = hashing.choice(2, np.arange(200_000), [0.13] * 6 + [0.22])
  np.testing.assert_allclose(np.bincount(draws) / len(draws), [0.13] * 6 + [0.22], atol=0.004)
  # Weights that do not sum to 1 are normalised (1:3 is 25% / 75%), not cut off at 1.
  draws = hashing.choice(3, np.arange(200_000), [1.0, 3.0])
  assert np.bincount(draws, minlength=2)[0] / len(draws) == pytest.approx(0.25, abs=0.004)


def test_permutation():
  p = hashing.permutation(3, 1000)
  assert sorted(p.tolist()) == list(range(1000))
  assert not np.array_equal(p, hashing.permutation(4, 1000))
  np.testing.assert_array_equal(p, hashing.permutation(3, 1000))
  # Where element 0 lands is uniform over keys.
  firsts = [int(np.flatnonzero(hashing.permutation(k, 10) == 0)[0]) for k in range(4000)]
  np.testing.assert_allclose(np.bincount(firsts) / 4000, 0.1, atol=0.02)
