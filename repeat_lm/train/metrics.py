"""Metric sinks: MODEL_DIR/metrics.jsonl (one JSON object per line, keyed by `step`), TensorBoard, progress bar."""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax

from repeat_lm import checks, files


def _step_of(line: bytes) -> float | None:
  """The step of a metrics.jsonl line; None for a line that is no record: blank, cut by a crash mid-write, or damaged
  (not UTF-8, not a JSON object, or without a numeric step, which every reader keys by: analysis.results skips it)."""
  try:
    record = json.loads(line.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError):
    return None
  step = record.get("step") if isinstance(record, dict) else None
  return step if checks.finite_number(step) else None


class MetricsWriter:
  """Writes scalars from process 0 only; every record also goes to TensorBoard (train/ and eval/ runs)."""

  def __init__(self, model_dir: str | Path, *, tensorboard: bool = True):
    self.path = Path(model_dir) / "metrics.jsonl"
    self.enabled = jax.process_index() == 0
    self._tb: dict[str, Any] = {}
    self._tb_root = Path(model_dir) if tensorboard else None
    self._line_start_checked = False

  def truncate_after(self, step: int) -> None:
    """On resume, drop records past the restored step: the resumed run writes them again, identically. A line that
    is no record is dropped too, with a warning: one cut by a crash mid-write (the next record would be appended to
    it) or damaged; every readable record up to the step is kept."""
    if not self.enabled or not self.path.exists():
      return
    # Bytes, decoded line by line: one line of corrupt bytes failed the whole read with a UnicodeDecodeError that
    # named no file, and stopped the resume.
    lines = self.path.read_bytes().splitlines()
    steps = [_step_of(line) for line in lines]
    kept = [line for line, s in zip(lines, steps) if s is not None and s <= step]
    later = sum(s is not None and s > step for s in steps)
    unreadable = sum(s is None and bool(line.strip()) for line, s in zip(lines, steps))
    if later:
      logging.info("metrics.jsonl: dropping %d records after restored step %d", later, step)
    if unreadable:
      logging.warning("%s: dropping %d unreadable lines (cut by a crash mid-write, or damaged: not UTF-8 JSON "
                      "objects with a numeric step); its readable records are kept", self.path, unreadable)
    if len(kept) != len(lines):
      files.atomic_write_bytes(self.path, b"".join(line + b"\n" for line in kept))

  def set_aside(self) -> Path | None:
    """A run starting from step 0 (no checkpoint yet): move an earlier attempt's records out of its way, to
    metrics.jsonl.replaced-TIME. Its steps would otherwise mix with the new ones (say, a run that diverged before
    its first checkpoint, rerun with a lower learning rate); they are kept, not deleted."""
    # Bytes: a file with corrupt bytes is set aside too, not a UnicodeDecodeError that stops the run.
    if not self.enabled or not self.path.exists() or not self.path.read_bytes().strip():
      return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = self.path.with_name(f"{self.path.name}.replaced-{stamp}")
    n = 1
    while aside.exists():  # two restarts within a second
      n += 1
      aside = self.path.with_name(f"{self.path.name}.replaced-{stamp}-{n}")
    self.path.replace(aside)
    logging.warning("metrics.jsonl: no checkpoint to resume from, so this run starts at step 0; the earlier "
                    "attempt's records were moved to %s", aside)
    return aside

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in scalars.items()}
    # A file left by a crash mid-write may end inside a line: appended to it, this record would be unreadable too
    # (`repeat-lm eval` appends without the trainer's truncate_after). Start on a line of its own.
    lead = "" if self._line_start_checked or self._ends_a_line() else "\n"
    self._line_start_checked = True
    with self.path.open("a") as f:
      f.write(lead + json.dumps({"step": int(step), **clean}, sort_keys=True) + "\n")
    if self._tb_root is not None:
      self._write_tensorboard(step, scalars)

  def _ends_a_line(self) -> bool:
    """Whether metrics.jsonl is absent, empty or ends with a newline."""
    try:
      with self.path.open("rb") as f:
        f.seek(0, 2)
        if f.tell() == 0:
          return True
        f.seek(-1, 2)
        return f.read(1) == b"\n"
    except FileNotFoundError:
      return True

  def prepare(self, *runs: str) -> None:
    """Open the TensorBoard writers of `runs` now (a first writer also starts TensorFlow's eager runtime)."""
    if self.enabled and self._tb_root is not None:
      for run in runs:
        self._writer(run)

  def _writer(self, run: str):
    if run not in self._tb:
      self._tb[run] = open_tensorboard(self._tb_root / run)
    return self._tb[run]

  def _write_tensorboard(self, step: int, scalars: dict[str, float]) -> None:
    import tensorflow as tf  # noqa: PLC0415  (imported already: the data pipeline runs on it)
    by_run: dict[str, dict[str, float]] = {}
    for key, value in scalars.items():
      run, _, name = key.partition("/")
      if not name:
        run, name = "train", key
      by_run.setdefault(run, {})[name] = float(value)
    for run, values in by_run.items():
      with self._writer(run).as_default(step=int(step)):
        for name, value in values.items():
          tf.summary.write(name, tf.constant(value, tf.float32), metadata=_scalar_metadata())

  def flush(self) -> None:
    for writer in self._tb.values():
      writer.flush()

  def close(self) -> None:
    for writer in self._tb.values():
      writer.close()
    self._tb = {}


def open_tensorboard(directory: Path):
  """A TensorBoard event-file writer for `directory`: TensorFlow's own, which the data pipeline has imported already.

  tensorboardX, used before, imported PyTorch wherever that was installed: 1.6 s more at the start of every run.
  tf.summary.scalar would need the tensorboard package; the scalars are written as TensorBoard's scalar plugin writes
  them instead (a float32 tensor tagged with the plugin's metadata, _scalar_metadata)."""
  import tensorflow as tf  # noqa: PLC0415
  try:
    return tf.summary.create_file_writer(str(directory))
  except tf.errors.OpError as e:  # not an OSError: it reached the command line as a bare traceback
    raise PermissionError(f"TensorBoard's event files cannot be written under {directory} ({e.message}); give the "
                          "run a folder it can write.") from e


@functools.cache
def _scalar_metadata() -> bytes:
  from tensorflow.core.framework import summary_pb2  # noqa: PLC0415
  return summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
                                     data_class=summary_pb2.DATA_CLASS_SCALAR).SerializeToString()


class Progress:
  """A tqdm bar when stderr is a terminal; silent otherwise (log lines carry the numbers)."""

  def __init__(self, start: int, total: int):
    self._bar = None
    if sys.stderr.isatty() and jax.process_index() == 0:
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

  def update(self, n: int = 1, **postfix: float) -> None:
    if self._bar is not None:
      self._bar.update(n)
      if postfix:
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
