"""Device prefetch: the batches of the next steps are assembled on the devices while the current step runs.

The host batches already come from a background thread (`pipeline.get_batches`); this moves the host -> device
transfer (`state.global_batch`) off the training loop too, so a step's inputs are resident before it is dispatched.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")

_POLL_S = 0.05  # how often a blocked producer looks at the stop flag


class _End:
  pass


class _Raised:
  def __init__(self, error: BaseException):
    self.error = error


class DevicePrefetcher(Generic[In, Out]):
  """Yields `transfer(item)` for each item of `source`, in order, produced in a daemon thread `depth` items ahead.

  `limit` caps how many items are read (the steps left), so nothing past the last step is read or transferred.

  Order is exactly the source's (one producer, a FIFO queue), so which batch goes with which step is unchanged.
  An error in `source` or `transfer` is raised by the `next()` that would have returned that item, after every item
  before it. `close()` (or leaving a `with` block, however it is left) stops and joins the thread and then closes
  `source`, so a generator source runs its `finally` (the data pipeline's own thread stops with it).
  """

  def __init__(self, source: Iterator[In], transfer: Callable[[In], Out], depth: int = 2, limit: int | None = None):
    if depth < 1:
      raise ValueError(f"Prefetch depth must be at least 1, got {depth}.")
    self._source = source
    self._transfer = transfer
    self._limit = limit
    # At most `depth` transferred items wait here, plus the one the producer is transferring.
    self._queue: queue.Queue = queue.Queue(depth)
    self._stop = threading.Event()
    self._done = False
    self._thread = threading.Thread(target=self._produce, daemon=True, name="repeat_lm-device-prefetch")
    self._thread.start()

  def _put(self, item) -> bool:
    # A bounded put that gives up once close() is called, so a full queue never keeps the thread alive.
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=_POLL_S)
        return True
      except queue.Full:
        continue
    return False

  def _produce(self) -> None:
    try:
      for item in itertools.islice(self._source, self._limit):
        if self._stop.is_set() or not self._put(self._transfer(item)):
          return
      self._put(_End())
    except BaseException as e:  # pylint: disable=broad-except  (re-raised in the consumer)
      self._put(_Raised(e))

  def __iter__(self) -> DevicePrefetcher[In, Out]:
    return self

  def __next__(self) -> Out:
    if self._done:
      raise StopIteration
    item = self._queue.get()
    if isinstance(item, _End):
      self.close()
      raise StopIteration
    if isinstance(item, _Raised):
      self.close()
      raise item.error
    return item

  def close(self, timeout_s: float = 10.0) -> None:
    """Stop the producer, wait for it, and close the source; safe to call more than once."""
    if self._done:
      return
    self._done = True
    self._stop.set()
    self._thread.join(timeout_s)
    if self._thread.is_alive():
      # The source is blocked inside next(); the thread is a daemon, so it cannot keep the process alive.
      logging.warning("Device prefetch thread still busy %.0fs after close(); leaving it behind.", timeout_s)
      return
    close_source = getattr(self._source, "close", None)
    if close_source is not None:
      close_source()

  def __enter__(self) -> DevicePrefetcher[In, Out]:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
