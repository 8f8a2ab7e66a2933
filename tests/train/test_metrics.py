"""MetricsWriter: metrics.jsonl stays one readable record per line after a crash cut its last line."""

import json

import pytest

from repeat_lm.analysis import results
from repeat_lm.train import metrics as metrics_lib

TRAIN_4 = json.dumps({"step": 4, "train/loss": 3.0})


@pytest.mark.parametrize("cut", [TRAIN_4 + '\n{"step": 5, "train/lo', TRAIN_4], ids=["mid-record", "before-newline"])
def test_a_record_appended_after_a_cut_line_is_readable(tmp_path, cut):
  # A crash mid-write (or just before the newline) of the trainer; then `repeat-lm eval` appends its result.
  (tmp_path / "metrics.jsonl").write_text(cut)
  writer = metrics_lib.MetricsWriter(tmp_path, tensorboard=False)
  writer.write(4, {"eval/loss": 2.5})
  writer.write(5, {"eval/loss": 2.0})
  assert results.read_metrics(tmp_path) == [{"step": 4, "train/loss": 3.0}, {"step": 4, "eval/loss": 2.5},
                                            {"step": 5, "eval/loss": 2.0}]


def test_resuming_after_a_cut_before_the_newline_keeps_every_record(tmp_path):
  (tmp_path / "metrics.jsonl").write_text(TRAIN_4)
  writer = metrics_lib.MetricsWriter(tmp_path, tensorboard=False)
  writer.truncate_after(4)
  writer.write(5, {"train/loss": 2.0})
  assert [r["step"] for r in results.read_metrics(tmp_path)] == [4, 5]


def test_resuming_drops_a_line_cut_mid_record(tmp_path):
  (tmp_path / "metrics.jsonl").write_text(TRAIN_4 + '\n{"step": 5, "train/lo')
  metrics_lib.MetricsWriter(tmp_path, tensorboard=False).truncate_after(4)
  assert (tmp_path / "metrics.jsonl").read_text() == TRAIN_4 + "\n"


@pytest.mark.parametrize("damage", [b"\xff\xfe garbage", b'{"step": null, "x": 1}', b'{"step": "3"}', b'{"x": 1}',
                                    b"[1, 2]", b"5", b'{"step": NaN}', b'{"step": true}'])
def test_resuming_drops_damaged_lines_with_a_warning_and_keeps_every_record(tmp_path, caplog, damage):
  # Corrupt bytes failed the resume with a UnicodeDecodeError naming no file; a null step with a TypeError.
  path = tmp_path / "metrics.jsonl"
  path.write_bytes(TRAIN_4.encode() + b"\n" + damage + b"\n" + json.dumps({"step": 5, "eval/loss": 2.0}).encode()
                   + b"\n" + json.dumps({"step": 6, "train/loss": 1.0}).encode() + b"\n")
  with caplog.at_level("WARNING"):
    metrics_lib.MetricsWriter(tmp_path, tensorboard=False).truncate_after(5)
  assert [r["step"] for r in results.read_metrics(tmp_path)] == [4, 5]
  assert path.read_bytes().decode().splitlines() == [TRAIN_4, json.dumps({"step": 5, "eval/loss": 2.0})]
  assert f"{path}: dropping 1 unreadable lines" in caplog.text


def test_a_fresh_start_sets_aside_a_file_of_corrupt_bytes(tmp_path):
  (tmp_path / "metrics.jsonl").write_bytes(b"\xff\xfe garbage\n")
  aside = metrics_lib.MetricsWriter(tmp_path, tensorboard=False).set_aside()
  assert aside.read_bytes() == b"\xff\xfe garbage\n" and not (tmp_path / "metrics.jsonl").exists()


def test_non_finite_values_are_written_as_strict_json(tmp_path):
  # RFC 8259 JSON has no NaN or Infinity (jq, JavaScript and pandas' strict readers reject them): strings instead.
  metrics_lib.MetricsWriter(tmp_path, tensorboard=False).write(1, {"train/loss": float("nan"), "x": float("-inf")})
  line = (tmp_path / "metrics.jsonl").read_text()
  record = json.loads(line, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
  assert record == {"step": 1, "train/loss": "nan", "x": "-inf"}


def test_set_aside_keeps_every_earlier_attempt(tmp_path, monkeypatch):
  monkeypatch.setattr(metrics_lib.time, "strftime", lambda fmt: "20240101-000000")  # restarts within one second
  path = tmp_path / "metrics.jsonl"
  writer = metrics_lib.MetricsWriter(tmp_path, tensorboard=False)
  path.write_text("")
  assert writer.set_aside() is None and path.exists()  # nothing to keep: an empty file stays where it is
  for attempt in ("first", "second", "third"):
    path.write_text(json.dumps({"step": 1, "attempt": attempt}) + "\n")
    writer.set_aside()
  assert not path.exists()
  kept = sorted(p.read_text() for p in tmp_path.glob("metrics.jsonl.replaced-*"))
  assert [json.loads(t)["attempt"] for t in kept] == ["first", "second", "third"]


def tensorboard_scalars(directory):
  """(run, tag, value, step) of every scalar in the event files under `directory`, read with TensorFlow's reader."""
  import tensorflow as tf  # noqa: PLC0415
  found = []
  for path in sorted(directory.glob("*/events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        assert value.metadata.plugin_data.plugin_name == "scalars"  # what TensorBoard's scalar dashboard reads
        found.append((path.parent.name, value.tag, float(tf.make_ndarray(value.tensor)), event.step))
  return found


def test_only_process_0_writes_and_unprefixed_scalars_go_to_the_train_run(tmp_path, monkeypatch):
  writer = metrics_lib.MetricsWriter(tmp_path)
  writer.write(3, {"loss": 1.0, "eval/accuracy": 0.5})
  writer.close()
  assert sorted(tensorboard_scalars(tmp_path)) == [("eval", "accuracy", 0.5, 3), ("train", "loss", 1.0, 3)]
  monkeypatch.setattr(metrics_lib.jax, "process_index", lambda: 1)
  other = metrics_lib.MetricsWriter(tmp_path / "other")
  other.write(3, {"loss": 1.0})
  other.close()
  assert not (tmp_path / "other").exists()


def test_a_tensorboard_folder_that_cannot_be_written_is_an_os_error_with_the_fix(tmp_path, monkeypatch):
  # TensorFlow's writer raises its own OpError, not an OSError: it reached the command line as a bare traceback.
  import tensorflow as tf  # noqa: PLC0415

  def refuse(logdir, **kwargs):
    raise tf.errors.PermissionDeniedError(None, None, f"{logdir}; Permission denied")
  monkeypatch.setattr(tf.summary, "create_file_writer", refuse)
  with pytest.raises(PermissionError, match=r"TensorBoard's event files cannot be written under .*train .*Permission "
                     r"denied.*give the run a folder it can write"):
    metrics_lib.MetricsWriter(tmp_path).write(1, {"loss": 1.0})
