"""profile.shared_seconds: overlapping host-thread ops split the time they share; enclosing events are parents."""

import pytest

from repeat_lm.bench import profile

MS = 1e6  # ns


def test_overlapping_ops_split_their_common_time_and_sum_to_the_busy_time():
  thread_a = [(0, 10 * MS, "dot.1")]
  thread_b = [(5 * MS, 15 * MS, "dot.2"), (20 * MS, 21 * MS, "add.3")]
  seconds = profile.shared_seconds([thread_a, thread_b])
  assert seconds["dot.1"] == pytest.approx(0.0075)  # 5 ms alone + half of the 5 ms shared
  assert seconds["dot.2"] == pytest.approx(0.0075)
  assert seconds["add.3"] == pytest.approx(0.001)
  assert sum(seconds.values()) == pytest.approx(0.016)  # busy 0-15 and 20-21 ms


def test_an_event_enclosing_others_on_its_thread_is_their_parent():
  thread = [(0, 10 * MS, "while.1"), (1 * MS, 4 * MS, "dot.2"), (4 * MS, 9 * MS, "add.3"), (12 * MS, 13 * MS, "mul.4")]
  seconds = profile.shared_seconds([thread])
  assert "while.1" not in seconds
  assert seconds == pytest.approx({"dot.2": 0.003, "add.3": 0.005, "mul.4": 0.001})
