"""Counter-based randomness: every draw is a pure function of (key, index), in numpy.

Why not numpy's Generator: its streams are not promised to stay the same across numpy versions, and a stream must be
consumed in order. Here the draw for example j of epoch e is `bits(derive(seed, 'what', e), j)` - computable for any
j directly, on any host, in any order, which is what makes resume O(1) and batches independent of the host count.

`bits` is SplitMix64 (Steele, Lea, Flood 2014): state = key + (i + 1) * golden ratio, output = its 64-bit finaliser.
`derive` hashes a tuple of ints/strings with BLAKE2b, so keys for different purposes never collide by arithmetic.
"""

from __future__ import annotations

import hashlib

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def derive(*parts: int | str) -> int:
  """A 64-bit key from a tuple of ints and strings, e.g. derive(seed, 'docs', epoch)."""
  text = '/'.join(f'{type(p).__name__[0]}{p}' for p in parts)
  return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), 'little')


def bits(key: int, index: np.ndarray | int) -> np.ndarray:
  """uint64 draws for each `index` (any shape) under `key`."""
  with np.errstate(over='ignore'):
    x = np.uint64(key) + (np.asarray(index, np.uint64) + np.uint64(1)) * _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def uniform(key: int, index: np.ndarray | int) -> np.ndarray:
  """float64 in [0, 1) with 53 random bits."""
  return (bits(key, index) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def permutation(key: int, n: int) -> np.ndarray:
  """A uniformly random permutation of range(n) (int64): sort by random 64-bit scores."""
  return np.argsort(bits(key, np.arange(n, dtype=np.uint64)), kind='stable')


def choice(key: int, index: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
  """For each index, a category drawn with the given probabilities (they are normalised here)."""
  cdf = np.cumsum(np.asarray(probabilities, np.float64))
  cdf /= cdf[-1]
  return np.minimum(np.searchsorted(cdf, uniform(key, index), side='right'), len(cdf) - 1)
