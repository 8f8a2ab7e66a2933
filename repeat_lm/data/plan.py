"""Index-based example streams: the example at global index g is a pure function of (store, objective, seed, g).

An epoch is the store's T tokens (the exact subset) as one token stream, cut into examples:
- Layout: example j of an epoch covers stream[o_j, o_j + L(d_j)) (the last one cut at T), where d_j is its denoiser,
  drawn from (seed, j) with the objective's rates, and L(d) the denoiser's raw length for the feature lengths. The
  layout is the same in every epoch, so every epoch has the same number R of examples and global index g is simply
  (epoch g // R, example g % R): finding any step's data is O(1), whatever the epoch.
- Dynamic masks (default): epoch e's stream is the documents in a random order drawn from (seed, e), and example j's
  noise is drawn from (seed, e, j): every epoch re-cuts and re-masks the text.
- Static masks: the stream is the documents in source order, cut and masked once (noise from (seed, j)), and epoch e
  visits those R examples in a random order drawn from (seed, e) - what a cached SeqIO task gives.
- shuffle=False (evaluation): source order, masks from (seed, j), no reordering.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Sequence

import numpy as np

from repeat_lm import checks
from repeat_lm.data import denoisers as den_lib
from repeat_lm.data import hashing
from repeat_lm.data.subset import TokenStore

_BLOCK = 4096  # examples per layout block: offsets are kept per block and expanded on demand


class _Lru:
  """A small thread-safe LRU of computed arrays (epoch orders, layout blocks)."""

  def __init__(self, size: int, make):
    self._size, self._make, self._items = size, make, collections.OrderedDict()
    self._lock = threading.Lock()

  def __call__(self, key):
    with self._lock:
      if key in self._items:
        self._items.move_to_end(key)
        return self._items[key]
    value = self._make(key)
    with self._lock:
      self._items[key] = value
      if len(self._items) > self._size:
        self._items.popitem(last=False)
    return value


class Layout:
  """Where each example of an epoch starts in the epoch's token stream, and which denoiser it uses."""

  def __init__(self, num_tokens: int, raw_lengths: Sequence[int], rates: Sequence[float], seed: int):
    self.num_tokens = num_tokens
    self.raw_lengths = np.asarray(raw_lengths, np.int64)
    self.rates = np.asarray(rates, np.float64)
    self._key = hashing.derive(seed, 'denoiser')
    self._single = len(self.raw_lengths) == 1
    self._blocks = _Lru(8, self._block)
    if self._single:
      self.num_examples = -(-num_tokens // int(self.raw_lengths[0]))
      return
    # Stream offset of each block's first example, block by block until the stream is covered: O(R) once.
    starts = [0]
    while starts[-1] < num_tokens:
      starts.append(starts[-1] + int(self.raw_lengths[self._draws(len(starts) - 1)].sum()))
    self._block_starts = np.asarray(starts, np.int64)
    last = len(starts) - 2
    offsets, _ = self._blocks(last)
    self.num_examples = last * _BLOCK + int(np.searchsorted(offsets, num_tokens, side='left'))

  def _draws(self, block: int) -> np.ndarray:
    j = np.arange(block * _BLOCK, (block + 1) * _BLOCK, dtype=np.uint64)
    return hashing.choice(self._key, j, self.rates)

  def _block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
    draws = self._draws(block)
    lengths = self.raw_lengths[draws]
    return self._block_starts[block] + np.cumsum(lengths) - lengths, draws

  def example(self, j: int) -> tuple[int, int, int]:
    """(start, end, denoiser index) of example j in the epoch's stream."""
    if not 0 <= j < self.num_examples:
      raise IndexError(f'example {j} of an epoch with {self.num_examples}')
    if self._single:
      length = int(self.raw_lengths[0])
      return j * length, min((j + 1) * length, self.num_tokens), 0
    offsets, draws = self._blocks(j // _BLOCK)
    start, d = int(offsets[j % _BLOCK]), int(draws[j % _BLOCK])
    return start, min(start + int(self.raw_lengths[d]), self.num_tokens), d


@dataclasses.dataclass(frozen=True)
class Example:
  inputs: np.ndarray  # int32, no EOS
  targets: np.ndarray  # int32, no EOS
  denoiser: int  # index into the objective's denoisers
  epoch: int
  index: int  # example index within the epoch (position in the epoch's order)


class Stream:
  """Global example index g -> example, for one store, objective and seed."""

  def __init__(self, store: TokenStore, objective: den_lib.Objective, inputs_length: int, targets_length: int,
               vocab_size: int, mode_ids: Sequence[np.ndarray] | None, *, seed: int, shuffle: bool = True,
               static_masks: bool = False, epochs: int | None = None):
    self.store, self.objective, self.vocab_size = store, objective, vocab_size
    self.seed, self.shuffle, self.static_masks, self.epochs = int(seed), shuffle, static_masks, epochs
    n = len(objective.denoisers)
    self.mode_ids = [np.asarray(m, np.int32) for m in mode_ids] if mode_ids else [np.zeros(0, np.int32)] * n
    self.raw_lengths = [den_lib.raw_length(d, inputs_length, targets_length, len(m))
                        for d, m in zip(objective.denoisers, self.mode_ids)]
    self.layout = Layout(store.num_tokens, self.raw_lengths, objective.rates, self.seed)
    self.examples_per_epoch = self.layout.num_examples
    self._doc_orders = _Lru(2, self._doc_order)
    self._example_orders = _Lru(2, self._example_order)
    self._source_ends = store.offsets[1:]

  @property
  def total_examples(self) -> int | None:
    return None if self.epochs is None else self.epochs * self.examples_per_epoch

  def locate(self, g: int) -> tuple[int, int]:
    """(epoch, position in the epoch's order) of global example g."""
    if g < 0 or (self.total_examples is not None and g >= self.total_examples):
      raise IndexError(f'example {g} is outside the {self.total_examples} examples of this stream')
    return divmod(int(g), self.examples_per_epoch)

  def _doc_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(documents in epoch order, end offset of each in the epoch's stream)."""
    order = hashing.permutation(hashing.derive(self.seed, 'documents', epoch), self.store.num_documents)
    return order, np.cumsum(self.store.doc_lengths[order])

  def _example_order(self, epoch: int) -> np.ndarray:
    return hashing.permutation(hashing.derive(self.seed, 'examples', epoch), self.examples_per_epoch)

  def _source(self, g: int) -> tuple[int, int, int, int, np.ndarray | None, np.ndarray]:
    """(epoch, index, layout example, mask key, doc order or None for source order, stream ends)."""
    epoch, j = self.locate(g)
    if not self.shuffle:
      return epoch, j, j, hashing.derive(self.seed, 'mask', j), None, self._source_ends
    if self.static_masks:
      k = int(self._example_orders(epoch)[j])
      return epoch, j, k, hashing.derive(self.seed, 'mask', k), None, self._source_ends
    order, ends = self._doc_orders(epoch)
    return epoch, j, j, hashing.derive(self.seed, 'mask', epoch, j), order, ends

  def pieces(self, g: int) -> list[tuple[int, int, int]]:
    """The document pieces example g is cut from, in order: (document, start, end) in document coordinates."""
    _, _, k, _, order, ends = self._source(g)
    start, end, _ = self.layout.example(k)
    out = []
    i = int(np.searchsorted(ends, start, side='right'))
    while start < end:
      doc = i if order is None else int(order[i])
      # This document's length from its two offsets: `store.doc_lengths` diffs every offset (O(documents) per piece,
      # tens of seconds per batch at the 2^35 baseline's ~70M documents).
      offsets = self.store.offsets
      doc_start = int(ends[i]) - (int(offsets[doc + 1]) - int(offsets[doc]))
      piece_end = min(end, int(ends[i]))
      out.append((doc, start - doc_start, piece_end - doc_start))
      start, i = piece_end, i + 1
    return out

  def raw_length(self, g: int) -> int:
    """Source tokens example g covers (its raw chunk's length), without building the example."""
    _, _, k, _, _, _ = self._source(g)
    start, end, _ = self.layout.example(k)
    return end - start

  def raw(self, g: int) -> np.ndarray:
    """The raw (uncorrupted) tokens of example g."""
    parts = [self.store.tokens[self.store.offsets[d] + a:self.store.offsets[d] + b] for d, a, b in self.pieces(g)]
    return np.concatenate(parts).astype(np.int32)

  def example(self, g: int) -> Example:
    epoch, j, k, key, _, _ = self._source(g)
    d = self.layout.example(k)[2]
    inputs, targets = den_lib.corrupt(self.raw(g), self.objective.denoisers[d], key, self.vocab_size,
                                      self.mode_ids[d])
    return Example(inputs, targets, d, epoch, j)


class MixtureStream:
  """Several streams interleaved in blocks of `block` rows with fixed per-block quotas, so g -> (stream, index) is O(1).

  Quotas are the rates x block rounded by largest remainder (exact to 1/block); each block's order is a permutation
  drawn from (seed, block). The mixture ends where its first finite stream ends.
  """

  def __init__(self, streams: Sequence[Stream], rates: Sequence[float], seed: int, block: int = 1024):
    # repeated_mixture checks its rates with this; built directly, a negative or NaN rate (or a zero sum) failed
    # with numpy's 'repeats may not contain negative values', block 0 with a ZeroDivisionError.
    den_lib.check_rates(tuple(rates), 'Mixture rates')
    if len(rates) != len(streams) or not checks.is_count(block):
      raise ValueError(f'A mixture of {len(streams)} streams needs as many rates (got {len(rates)}) and a block of '
                       f'a whole number >= 1 rows (got {block!r}).')
    self.streams, self.block = list(streams), block
    rates = np.asarray(rates, np.float64) / np.sum(rates)
    quotas = np.floor(rates * block).astype(np.int64)
    quotas[np.argsort(-(rates * block - quotas), kind='stable')[:block - quotas.sum()]] += 1
    self.quotas = quotas
    self._pattern = np.repeat(np.arange(len(quotas)), quotas)
    self._key = hashing.derive(seed, 'mixture')
    self._blocks = _Lru(4, self._block)
    ends = []
    for t, s in enumerate(self.streams):
      if s.total_examples is not None and quotas[t] > 0:
        b, r = divmod(s.total_examples, int(quotas[t]))
        tasks, _ = self._blocks(b)
        ends.append(b * block + int(np.flatnonzero(tasks == t)[r]))
    self.total_examples = min(ends) if ends else None

  def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
    tasks = self._pattern[hashing.permutation(hashing.derive(self._key, b), self.block)]
    ranks = np.zeros(self.block, np.int64)
    for t in range(len(self.quotas)):
      ranks[tasks == t] = np.arange(self.quotas[t])
    return tasks, ranks

  def locate(self, g: int) -> tuple[int, int]:
    if g < 0 or (self.total_examples is not None and g >= self.total_examples):
      raise IndexError(f'example {g} is outside the {self.total_examples} examples of this mixture')
    b, r = divmod(int(g), self.block)
    tasks, ranks = self._blocks(b)
    t = int(tasks[r])
    return t, b * int(self.quotas[t]) + int(ranks[r])

  def example(self, g: int) -> Example:
    t, i = self.locate(g)
    return self.streams[t].example(i)

  def raw_length(self, g: int) -> int:
    t, i = self.locate(g)
    return self.streams[t].raw_length(i)
