"""The device prefetcher: the source's items in the source's order, bounded read-ahead, and a thread that always
stops (source exhausted, source or transfer raising, consumer leaving early)."""

import itertools
import threading
import time

import numpy as np
import pytest

from repeat_lm.train import partitioning, prefetch, state as state_lib

THREAD = "repeat_lm-device-prefetch"


def prefetch_threads():
  return [t for t in threading.enumerate() if t.name == THREAD and t.is_alive()]


def host_batches(n):
  rng = np.random.default_rng(0)
  return [{"encoder_input_tokens": rng.integers(0, 100, (8, 4), dtype=np.int32),
           "decoder_target_tokens": np.full((8, 2), i, np.int32)} for i in range(n)]


def test_same_batches_in_the_same_order_as_direct_iteration():
  shardings = {k: partitioning.Partitioner(4, 2).batch_sharding() for k in ("encoder_input_tokens",
                                                                            "decoder_target_tokens")}
  batches = host_batches(7)
  source = iter(batches)
  with prefetch.DevicePrefetcher(source, lambda b: state_lib.global_batch(b, shardings), limit=5) as it:
    got = list(it)
  assert len(got) == 5
  for want, have in zip(batches, got):
    for k, v in want.items():
      assert have[k].sharding == shardings[k]
      np.testing.assert_array_equal(np.asarray(have[k]), v)
  assert next(source) is batches[5]  # `limit` read nothing past the last item it yielded
  assert not prefetch_threads()


def test_reads_ahead_at_most_depth_plus_one():
  transferred = []

  def transfer(x):
    transferred.append(x)
    return x

  with prefetch.DevicePrefetcher(itertools.count(), transfer, depth=2) as it:
    assert next(it) == 0
    deadline = time.monotonic() + 10
    while len(transferred) < 4 and time.monotonic() < deadline:
      time.sleep(0.01)
    time.sleep(0.2)
    # Item 0 taken, 1 and 2 queued, 3 transferred and waiting for room: never more.
    assert transferred == [0, 1, 2, 3]
    assert [next(it) for _ in range(3)] == [1, 2, 3]
  assert not prefetch_threads()


def test_source_error_comes_after_the_items_before_it_and_stops_the_thread():
  def source():
    yield from range(3)
    raise ValueError("corrupt shard")

  it = prefetch.DevicePrefetcher(source(), lambda x: x * 10)
  assert [next(it) for _ in range(3)] == [0, 10, 20]
  with pytest.raises(ValueError, match="corrupt shard"):
    next(it)
  assert not prefetch_threads()
  with pytest.raises(StopIteration):
    next(it)


def test_transfer_error_is_raised_in_the_consumer():
  def transfer(x):
    if x == 2:
      raise RuntimeError("device out of memory")
    return x

  with pytest.raises(RuntimeError, match="out of memory"):
    with prefetch.DevicePrefetcher(iter(range(10)), transfer) as it:
      assert list(it) == [0, 1]  # raises at the third item
  assert not prefetch_threads()


def test_consumer_error_stops_the_thread_and_closes_the_source():
  closed = threading.Event()

  def source():
    try:
      yield from itertools.count()  # endless: the producer is blocked on a full queue when the consumer fails
    finally:
      closed.set()

  with pytest.raises(KeyError):
    with prefetch.DevicePrefetcher(source(), lambda x: x) as it:
      next(it)
      time.sleep(0.1)
      raise KeyError("the train step failed")
  assert closed.is_set()  # the data pipeline's own thread stops when its generator closes
  assert not prefetch_threads()


def test_a_depth_below_one_is_refused():
  # queue.Queue(0) has no bound: the producer would read and transfer the whole stream onto the devices.
  with pytest.raises(ValueError, match="at least 1"):
    prefetch.DevicePrefetcher(iter([]), lambda x: x, depth=0)
  assert not prefetch_threads()
