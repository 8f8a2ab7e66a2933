"""MetricsWriter: metrics.jsonl stays one readable record per line after a crash cut its last line."""

import json

import pytest

from repeat_lm.experiments import collect
from repeat_lm.train import metrics as metrics_lib

TRAIN_4 = json.dumps({"step": 4, "train/loss": 3.0})


@pytest.mark.parametrize("cut", [TRAIN_4 + '\n{"step": 5, "train/lo', TRAIN_4], ids=["mid-record", "before-newline"])
def test_a_record_appended_after_a_cut_line_is_readable(tmp_path, cut):
  # A crash mid-write (or just before the newline) of the trainer; then `repeat-lm eval` appends its result.
  (tmp_path / "metrics.jsonl").write_text(cut)
  writer = metrics_lib.MetricsWriter(tmp_path, tensorboard=False)
  writer.write(4, {"eval/loss": 2.5})
  writer.write(5, {"eval/loss": 2.0})
  assert collect.read_metrics(tmp_path) == [{"step": 4, "train/loss": 3.0}, {"step": 4, "eval/loss": 2.5},
                                            {"step": 5, "eval/loss": 2.0}]


def test_resuming_after_a_cut_before_the_newline_keeps_every_record(tmp_path):
  (tmp_path / "metrics.jsonl").write_text(TRAIN_4)
  writer = metrics_lib.MetricsWriter(tmp_path, tensorboard=False)
  writer.truncate_after(4)
  writer.write(5, {"train/loss": 2.0})
  assert [r["step"] for r in collect.read_metrics(tmp_path)] == [4, 5]
