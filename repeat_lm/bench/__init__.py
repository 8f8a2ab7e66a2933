"""Benchmarks that ship with the library: the training step (`train.py`) and its Hugging Face peer (`hf.py`)."""

import numpy as np


def require_positive_ints(**flags) -> None:
  """Raise, naming the command-line flag, unless each value is an integer >= 1 (a bool is not a count)."""
  for name, value in flags.items():
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"--{name}={value!r}: must be a positive integer.")
