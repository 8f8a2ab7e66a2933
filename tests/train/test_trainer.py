"""The training loop end to end on the tiny model: exact resume, sharded == unsharded, SIGTERM and Ctrl-C, divergence,
and metrics read one step late equal to stepping the train step directly."""

import dataclasses
import json
import logging
import os
import shutil
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repeat_lm.data import pipeline
from repeat_lm.models import EncoderDecoderModel, T5Config, Transformer, moe
from repeat_lm.models.encoder_decoder import summarize
from repeat_lm.train import checkpoint, metrics as metrics_lib, optim, partitioning, state as state_lib, trainer

TASK = "repeat_lm.wiki_span_corruption"
LENGTHS = {"inputs": 64, "targets": 16}


def tiny_model(**overrides):
  cfg = T5Config(vocab_size=8192, dtype="float32", emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                 num_encoder_layers=2, num_decoder_layers=2, **overrides)
  return EncoderDecoderModel(module=Transformer(cfg))


TRAIN_CFG = pipeline.DatasetConfig(TASK, LENGTHS, batch_size=8, seed=3)


def run(model_dir, steps, *, mesh=(4, 2), devices=None, eval_=False, learning_rate=None, log_period=1, model=None,
        train_cfg=TRAIN_CFG, **kwargs):
  return trainer.train(
      model=model or tiny_model(), model_dir=str(model_dir), total_steps=steps, train_dataset_cfg=train_cfg,
      eval_dataset_cfg=pipeline.DatasetConfig(TASK, LENGTHS, split="validation", batch_size=8,
                                              shuffle=False) if eval_ else None,
      partitioner=partitioning.Partitioner(*mesh, devices=devices),
      learning_rate=learning_rate or optim.make_schedule(warmup_steps=2),
      checkpoint_cfg=checkpoint.CheckpointConfig(period=3, keep=None), log_period=log_period, eval_period=3,
      eval_steps=1,
      **kwargs)


def train_records(model_dir):
  records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r for r in records if "train/loss" in r}


def losses(model_dir):
  return {step: r["train/loss"] for step, r in train_records(model_dir).items()}


def prefetch_threads():
  return [t for t in threading.enumerate() if t.name == "repeat_lm-device-prefetch" and t.is_alive()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  d = tmp_path_factory.mktemp("uninterrupted")
  last = run(d, 6, eval_=True)
  return d, last


def test_writes_metrics_config_and_checkpoints(uninterrupted):
  d, last = uninterrupted
  records = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
  train_keys = {"train/loss", "train/accuracy", "train/learning_rate", "train/grad_norm", "train/tokens_seen",
                "train/epochs", "train/step_time_s", "train/tokens_per_s", "train/mfu"}
  assert train_keys <= set(records[0])
  assert [r["step"] for r in records if "eval/loss" in r] == [3, 6]
  assert 0 <= last["eval/accuracy"] <= 1 and np.isfinite(last["eval/loss"])
  assert (d / "config.gin").exists()  # gin's config; empty here, where the model is built in Python (no gin)
  assert sorted(int(p.name) for p in (d / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6]
  tokens = [r["train/tokens_seen"] for r in records if "train/tokens_seen" in r]
  assert all(b > a for a, b in zip(tokens, tokens[1:]))
  # Step 1's window is that one step: its text rate x its time is the text it read; padding makes positions more.
  first = records[0]
  assert first["step"] == 1
  assert first["train/text_tokens_per_s"] * first["train/step_time_s"] == pytest.approx(first["train/tokens_seen"])
  assert 0 < first["train/text_tokens_per_s"] < first["train/tokens_per_s"]


def test_tensorboard_holds_every_logged_scalar_under_its_run(uninterrupted):
  # README's promise: TensorBoard event files under train/ and eval/, the records of metrics.jsonl, read back here
  # with TensorFlow's own event reader (what TensorBoard uses), not the library that wrote them.
  import tensorflow as tf  # noqa: PLC0415
  d, _ = uninterrupted
  logged = {}
  for run in ("train", "eval"):
    for path in sorted((d / run).glob("events.out.tfevents.*")):
      for event in tf.compat.v1.train.summary_iterator(str(path)):
        for value in event.summary.value:
          logged[(event.step, f"{run}/{value.tag}")] = float(tf.make_ndarray(value.tensor))
  expected = {(r["step"], k): v for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
              for k, v in r.items() if k != "step"}
  assert {k for k in expected if k[1] == "eval/loss"} == {(3, "eval/loss"), (6, "eval/loss")}
  assert logged.keys() == expected.keys()
  for key, value in expected.items():
    assert logged[key] == pytest.approx(value, rel=1e-6), key


def count_dispatches(monkeypatch) -> list:
  """A list that grows by one each time a train step built from now on is dispatched."""
  dispatched = []
  real_make = state_lib.make_train_step

  def counting_make(*args, **kwargs):
    step_fn = real_make(*args, **kwargs)
    return lambda state, batch: (dispatched.append(1), step_fn(state, batch))[1]

  monkeypatch.setattr(state_lib, "make_train_step", counting_make)
  return dispatched


def test_resume_reproduces_uninterrupted_losses(uninterrupted, tmp_path, monkeypatch):
  d, _ = uninterrupted
  run(tmp_path, 3)
  dispatched = count_dispatches(monkeypatch)
  run(tmp_path, 6)  # Resumes from the step-3 checkpoint, including the data position.
  # A run that ignored the checkpoint and started over (same seed) would log the same six losses: only 4..6 may run.
  assert len(dispatched) == 3
  assert losses(tmp_path) == losses(d)


def test_an_unseeded_run_draws_one_seed_and_resumes_on_it(uninterrupted, tmp_path, monkeypatch):
  # DatasetConfig(seed=None): one seed per run, kept in the checkpoints. The resumed half must not read the stream of
  # a new draw (99); drawing 3 (TRAIN_CFG's seed) first makes the run the uninterrupted fixture's.
  draws = iter([3, 99])
  monkeypatch.setattr(trainer, "_draw_seed", lambda: next(draws))
  unseeded = dataclasses.replace(TRAIN_CFG, seed=None)
  run(tmp_path, 3, train_cfg=unseeded)
  run(tmp_path, 6, train_cfg=unseeded)
  assert losses(tmp_path) == losses(uninterrupted[0])


def test_an_unseeded_run_counts_the_tokens_of_the_seed_it_resumes_on(tmp_path, monkeypatch):
  # UL2's layout (each example's denoiser, so its raw length) depends on the seed: after resuming on the checkpoint's
  # seed 3, tokens_seen must count seed 3's chunks, not those of the new draw (99) the run started with.
  from repeat_lm.data import tasks  # pylint: disable=import-outside-toplevel
  ul2 = tasks.repeated_task("wiki", objective="ul2", mode_tokens=False)
  draws = iter([3, 99])
  monkeypatch.setattr(trainer, "_draw_seed", lambda: next(draws))
  unseeded = pipeline.DatasetConfig(ul2, LENGTHS, batch_size=8, seed=None)
  run(tmp_path, 3, train_cfg=unseeded)
  run(tmp_path, 6, train_cfg=unseeded)
  count = pipeline.source_tokens_per_step(dataclasses.replace(unseeded, seed=3))
  expected = np.cumsum([count(s) for s in range(1, 7)]).tolist()
  assert count(4) != pipeline.source_tokens_per_step(dataclasses.replace(unseeded, seed=99))(4)  # the seeds differ
  assert [r["train/tokens_seen"] for _, r in sorted(train_records(tmp_path).items())] == expected


def test_an_unseeded_run_that_uses_all_its_seeds_batches_resumes(tmp_path, monkeypatch):
  # UL2's batch count depends on the seed: 12 at seed 9, 10 at seed 3. A run drawn at 9 may train 12 steps; resumed
  # with the new draw 3 it was refused ("holds 10 batches ... fewer than total_steps=12") before its seed 9 was read.
  name = "repeat_lm.wiki.wiki8k.ul2.dn1750.en2"
  counts = {s: pipeline.num_batches(pipeline.DatasetConfig(name, LENGTHS, batch_size=8, seed=s)) for s in (9, 3)}
  assert counts == {9: 12, 3: 10}
  draws = iter([9, 3])
  monkeypatch.setattr(trainer, "_draw_seed", lambda: next(draws))
  unseeded = pipeline.DatasetConfig(name, LENGTHS, batch_size=8, seed=None)
  monkeypatch.setattr(trainer._StopSignal, "agreed", lambda self: True)  # pylint: disable=protected-access
  run(tmp_path, 12, train_cfg=unseeded)  # a SIGTERM at once: saved at step 1
  run(tmp_path, 12, train_cfg=unseeded)  # resumes on seed 9 (and stops at step 2)
  meta = json.loads((tmp_path / "checkpoints" / "2" / "meta" / "metadata").read_text())
  assert meta["data"]["seed"] == 9 and sorted(losses(tmp_path)) == [1, 2]


def test_several_hosts_take_process_0s_seed(monkeypatch):
  # Each host's own draw would order its stream differently: rows of a global batch repeated and missed.
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(trainer.multihost_utils, "broadcast_one_to_all", lambda x: np.int32(1234))
  assert trainer._draw_seed() == 1234  # pylint: disable=protected-access


@pytest.mark.slow
def test_resume_with_dropout_reproduces_uninterrupted_losses(uninterrupted, tmp_path, monkeypatch):
  """Dropout at step s depends on (seed, s) only: a resumed run draws the masks the uninterrupted one drew."""
  model = tiny_model(dropout_rate=0.1)
  run(tmp_path / "whole", 6, model=model)
  run(tmp_path / "resumed", 3, model=model)
  dispatched = count_dispatches(monkeypatch)
  run(tmp_path / "resumed", 6, model=model)
  assert len(dispatched) == 3  # resumed at step 3, not started over
  assert losses(tmp_path / "resumed") == losses(tmp_path / "whole")
  assert losses(tmp_path / "whole") != losses(uninterrupted[0])  # dropout really was on


def sigterm_after_writing(at_step, signum=signal.SIGTERM, times=1):
  """MetricsWriter.write that sends this process SIGTERM (or `signum`, `times` times) once it has written step
  `at_step`'s record. Hooked on the metrics write, not the data: batches are read ahead in a thread, at no fixed
  step."""
  real_write = metrics_lib.MetricsWriter.write

  def write_then_sigterm(self, step, scalars):
    real_write(self, step, scalars)
    if step == at_step:
      for _ in range(times):
        os.kill(os.getpid(), signum)
  return write_then_sigterm


class CountingProgress:
  """metrics_lib.Progress that records where its bar starts and every move."""
  started, moved = [], []

  def __init__(self, start, total):
    del total
    CountingProgress.started.append(start)

  def update(self, n=1, **postfix):
    del postfix
    CountingProgress.moved.append(n)

  def close(self):
    pass


def test_resume_between_logged_steps_logs_what_an_uninterrupted_run_logs(tmp_path, monkeypatch):
  run(tmp_path / "whole", 6, log_period=4)
  with monkeypatch.context() as patch:
    # Step 1's record is read once step 2 is dispatched: stopped and saved at 2, inside the logging window 2..4.
    patch.setattr(metrics_lib.MetricsWriter, "write", sigterm_after_writing(1))
    run(tmp_path / "resumed", 6, log_period=4)
  assert sorted(int(p.name) for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == [2]
  monkeypatch.setattr(metrics_lib, "Progress", CountingProgress)
  CountingProgress.started, CountingProgress.moved = [], []
  run(tmp_path / "resumed", 6, log_period=4)
  # The progress bar starts at the restored step 2 and moves by the 4 steps this process ran (3..6), not also by the
  # restored window's step (it ended at 7 of 6).
  assert CountingProgress.started == [2] and sum(CountingProgress.moved) == 4
  whole, resumed = train_records(tmp_path / "whole"), train_records(tmp_path / "resumed")
  assert sorted(whole) == sorted(resumed) == [1, 4, 6]
  for step in whole:
    for key in ("train/loss", "train/accuracy", "train/grad_norm", "train/tokens_seen"):
      assert resumed[step][key] == pytest.approx(whole[step][key], rel=1e-6), (step, key)


def test_a_fresh_start_sets_an_earlier_attempts_records_aside(tmp_path):
  # An attempt that never reached a checkpoint (here: records written by hand) and one cut mid-write.
  (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 99.0}) + '\n{"step": 2, "tr')
  run(tmp_path, 3)
  assert losses(tmp_path)[1] != 99.0 and sorted(losses(tmp_path)) == [1, 2, 3]
  (aside,) = tmp_path.glob("metrics.jsonl.replaced-*")
  assert aside.read_text().startswith('{"step": 1, "train/loss": 99.0}')
  # Resuming drops a line cut by a crash rather than failing to parse it.
  with (tmp_path / "metrics.jsonl").open("a") as f:
    f.write('{"step": 4, "train/lo')
  run(tmp_path, 4)
  assert sorted(losses(tmp_path)) == [1, 2, 3, 4]


def test_a_rerun_with_another_model_keeps_the_checkpoints_config(tmp_path):
  run(tmp_path, 3)
  # What a gin-configured run leaves (its operative config); this test builds the model in Python, without gin.
  written = "t5.T5Config.mlp_dim = 64\n"
  (tmp_path / "config.gin").write_text(written)
  with pytest.raises(checkpoint.CheckpointError, match="holds a different model.*config.gin"):
    wider = EncoderDecoderModel(module=Transformer(dataclasses.replace(tiny_model().module.config, mlp_dim=128)))
    trainer.train(model=wider, model_dir=str(tmp_path), total_steps=6,
                  train_dataset_cfg=TRAIN_CFG, partitioner=partitioning.Partitioner(4, 2),
                  checkpoint_cfg=checkpoint.CheckpointConfig(period=3))
  assert (tmp_path / "config.gin").read_text() == written


@pytest.mark.slow
def test_sharded_equals_single_device(tmp_path):
  # A small rate keeps float32 reduction-order differences from being amplified across steps.
  run(tmp_path / "single", 3, mesh=(1, 1), devices=jax.devices()[:1], learning_rate=0.01)
  run(tmp_path / "sharded", 3, mesh=(4, 2), learning_rate=0.01)
  single, sharded = losses(tmp_path / "single"), losses(tmp_path / "sharded")
  assert single[3] < single[1]
  np.testing.assert_allclose(list(sharded.values()), list(single.values()), rtol=1e-5)


def test_sigterm_checkpoints_and_stops(tmp_path, monkeypatch):
  # Step 3's metrics are read at its periodic save, so the stop is seen once step 4 runs.
  monkeypatch.setattr(metrics_lib.MetricsWriter, "write", sigterm_after_writing(3))
  run(tmp_path, 50)
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [3, 4]  # 4 is off the period (3): saved because of the SIGTERM
  assert max(losses(tmp_path)) == 4
  assert not prefetch_threads()


def test_a_first_ctrl_c_checkpoints_and_stops_as_sigterm_does(tmp_path, monkeypatch, caplog):
  # It raised KeyboardInterrupt from inside jax: a traceback, and the steps since the last periodic save lost.
  monkeypatch.setattr(metrics_lib.MetricsWriter, "write", sigterm_after_writing(3, signal.SIGINT))
  outside = []  # the handler in place before train(): a first Ctrl-C must not reach it; it is back afterwards
  handler = lambda *_: outside.append(1)  # pylint: disable=unnecessary-lambda-assignment
  previous = signal.signal(signal.SIGINT, handler)
  try:
    with caplog.at_level("WARNING"):
      run(tmp_path, 50)
    assert signal.getsignal(signal.SIGINT) is handler
  finally:
    signal.signal(signal.SIGINT, previous)
  assert not outside
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [3, 4]  # 4 is off the period (3): saved because of the Ctrl-C
  assert "Stopped at step 4 after SIGINT" in caplog.text and "run the same command to resume" in caplog.text
  assert not prefetch_threads()


def test_a_second_ctrl_c_aborts_at_once(tmp_path, monkeypatch, caplog):
  # The first puts back the handler from before (Python's, which raises KeyboardInterrupt) for the second.
  monkeypatch.setattr(metrics_lib.MetricsWriter, "write", sigterm_after_writing(1, signal.SIGINT, times=2))
  sigterm_before = signal.getsignal(signal.SIGTERM)
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with caplog.at_level("WARNING"), pytest.raises(KeyboardInterrupt):
      run(tmp_path, 50)
    assert "SIGINT received: saving a checkpoint" in caplog.text  # the first was caught
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is sigterm_before
  finally:
    signal.signal(signal.SIGINT, previous)
  assert not prefetch_threads()


def test_a_ctrl_c_ignored_on_entry_stays_ignored():
  # A job a shell started in the background ignores SIGINT: Ctrl-C in that terminal is not for it.
  previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    stop = trainer._StopSignal()  # pylint: disable=protected-access
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    stop.restore()
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
  finally:
    signal.signal(signal.SIGINT, previous)


def slow_json_writes(patch, seconds=1.0, until: threading.Event | None = None):
  """Orbax writes a checkpoint's JSON in a background thread; on slow storage (GCS) that is seconds after save()
  returned, while training goes on. `until`: the write waits for that event instead (at most 60 s)."""
  import asyncio
  from orbax.checkpoint._src.handlers import json_checkpoint_handler as json_handler
  real = json_handler.JsonCheckpointHandler._save_fn

  async def slow(self, item, directory):
    if until is None:
      await asyncio.sleep(seconds)
    else:
      await asyncio.to_thread(until.wait, 60)
    return await real(self, item, directory)
  patch.setattr(json_handler.JsonCheckpointHandler, "_save_fn", slow)


def test_a_checkpoints_log_window_is_the_one_at_its_step_on_slow_storage(tmp_path, monkeypatch):
  # Saved at 3 inside the window 2..4, its JSON written only once the next save starts (at 5, after step 4 was
  # logged): the checkpoint must hold step 2 and 3's sums, not also step 4's.
  next_save = threading.Event()
  slow_json_writes(monkeypatch, until=next_save)
  real_save = checkpoint.Checkpointer.save

  def save(self, step, *args, **kwargs):
    if step > 3:
      next_save.set()
    real_save(self, step, *args, **kwargs)
  monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
  run(tmp_path, 5, log_period=4)
  meta = json.loads((tmp_path / "checkpoints" / "3" / "meta" / "metadata").read_text())
  window = meta["log_window"]
  assert window["steps"] == 2
  assert window["sums"]["text_tokens"] == meta["tokens_seen"] - train_records(tmp_path)[1]["train/tokens_seen"]


def test_sigterm_while_the_last_save_is_written_waits_for_it(tmp_path, monkeypatch):
  # A preemption notice that comes while the final checkpoint is still being written (asynchronously).
  slow_json_writes(monkeypatch)
  real_close = checkpoint.Checkpointer.close

  def sigterm_then_close(self):
    os.kill(os.getpid(), signal.SIGTERM)
    real_close(self)
  monkeypatch.setattr(checkpoint.Checkpointer, "close", sigterm_then_close)
  outside = []  # the handler in place before train(): it must not see the signal (the default one kills)
  previous = signal.signal(signal.SIGTERM, lambda *_: outside.append(1))
  try:
    run(tmp_path, 2)
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert not outside
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]


# ---- metrics read one step late ----

def _state_and_step(**step_kwargs):
  """The tiny model's layout, initial state and train step, built as `run` builds them."""
  model, partitioner = tiny_model(), partitioning.Partitioner(4, 2)
  tx = optim.make_optimizer(learning_rate=optim.make_schedule(warmup_steps=2))  # what `run` trains with
  spec = state_lib.batch_specs(pipeline.model_feature_lengths(TRAIN_CFG), TRAIN_CFG.batch_size)
  lay = state_lib.layout(model, tx, partitioner, spec, 0)
  state = state_lib.init_state(model, tx, lay, partitioner, spec, 0)
  return lay, state, state_lib.make_train_step(model, tx, lay, partitioner, 0, trainer._check_vocab(model, TASK),
                                               **step_kwargs)


@pytest.fixture(scope="module")
def direct_run():
  """6 steps from calling the train step directly and reading every step at once: per-step metric sums, and
  whether the first step's input state and batch buffers were deleted (donated) by the step."""
  lay, state, step_fn = _state_and_step()
  out, deleted = [], {}
  for _, host_batch in zip(range(6), pipeline.get_batches(TRAIN_CFG)):
    batch = state_lib.global_batch(host_batch, lay.batch_shardings)
    new_state, sums = step_fn(state, batch)
    if not deleted:
      deleted = {"state": [x.is_deleted() for x in jax.tree.leaves(state)],
                 "new state": [x.is_deleted() for x in jax.tree.leaves(new_state)],
                 "batch": [x.is_deleted() for x in jax.tree.leaves(batch)]}
    state = new_state
    out.append(jax.device_get(sums))
  return {"sums": out, "deleted": deleted}


@pytest.fixture(scope="module")
def direct_sums(direct_run):
  return direct_run["sums"]


def test_train_step_keeps_the_state_it_replaces_on_cpu(direct_run):
  """On CPU the step does not donate (XLA:CPU would copy every donated parameter, state.make_train_step)."""
  deleted = direct_run["deleted"]
  assert len(deleted["state"]) > 100
  assert not any(deleted["state"]) and not any(deleted["new state"]) and not any(deleted["batch"])


def test_train_step_donates_the_state_it_replaces_when_asked():
  """donate=True (the default on GPU and TPU): the input state's buffers are reused for the new state, one state's
  memory, not two; the batch is not donated."""
  lay, state, step_fn = _state_and_step(donate=True)
  batch = state_lib.global_batch(next(iter(pipeline.get_batches(TRAIN_CFG))), lay.batch_shardings)
  new_state, _ = step_fn(state, batch)
  assert all(x.is_deleted() for x in jax.tree.leaves(state)) and len(jax.tree.leaves(state)) > 100
  assert not any(x.is_deleted() for x in jax.tree.leaves(new_state) + jax.tree.leaves(batch))


def expected_records(sums_per_step, logged_steps):
  """What the trainer should log at `logged_steps` (window ends) from per-step sums (step s is index s-1)."""
  out, tokens, start = {}, 0.0, 0
  for end in logged_steps:
    window = {}
    for sums in sums_per_step[start:end]:
      for k, v in sums.items():
        window[k] = window.get(k, 0.0) + float(v) if k not in ("grad_norm", "param_norm") else float(v)
      tokens += float(sums["source_tokens"])
    avg = summarize(window)
    out[end] = {"train/loss": avg["loss"], "train/accuracy": avg["accuracy"], "train/z_loss": avg["z_loss"],
                "train/grad_norm": window["grad_norm"], "train/param_norm": window["param_norm"],
                "train/tokens_seen": tokens}
    start = end
  return out


def test_metrics_read_late_equal_direct_stepping(uninterrupted, direct_sums, tmp_path):
  # log_period=1: one record per step; the checkpoint and evaluation at step 3 and 6 read their step at once.
  d, _ = uninterrupted
  for model_dir, logged in ((d, [1, 2, 3, 4, 5, 6]), (tmp_path, [1, 4, 6])):
    if model_dir == tmp_path:
      run(tmp_path, 6, log_period=4)  # windows of 1, 3 (across the step-3 checkpoint) and 2 (the last) steps
    got = train_records(model_dir)
    assert sorted(got) == logged
    for step, want in expected_records(direct_sums, logged).items():
      assert {k: got[step][k] for k in want} == want, step
  assert not prefetch_threads()


def test_divergence_read_late_keeps_a_pre_divergence_checkpoint(uninterrupted, tmp_path, monkeypatch):
  # A NaN rate from the 5th update on: step 5's parameters are NaN. Its metrics are read only once step 6 (a
  # checkpoint step, run from those NaN parameters) is dispatched, so step 6 must not be saved either.
  dispatched = count_dispatches(monkeypatch)
  schedule = optim.make_schedule(warmup_steps=2)
  with pytest.raises(trainer.TrainingDivergedError, match=r"diverged at step 5\b.*last good checkpoint is step 3"):
    run(tmp_path, 6, learning_rate=lambda count: jnp.where(count >= 4, jnp.nan, schedule(count)))
  assert len(dispatched) == 6  # the lag: step 6 ran before step 5 was read
  monkeypatch.undo()
  ckpt = checkpoint.Checkpointer(tmp_path)
  assert ckpt.all_steps() == [3]
  ckpt.close()
  assert sorted(losses(tmp_path)) == [1, 2, 3, 4]  # nothing of step 5 or 6 was logged
  assert not prefetch_threads()
  # The kept checkpoint is the uninterrupted run's step 3: resuming from it with a good rate reproduces that run.
  d, _ = uninterrupted
  dispatched = count_dispatches(monkeypatch)
  run(tmp_path, 6)
  assert len(dispatched) == 3  # from the kept checkpoint: starting over would log the same losses
  assert losses(tmp_path) == losses(d)


def test_model_vocabulary_too_small_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="vocab_size"):
    trainer.train(model=EncoderDecoderModel(module=Transformer(T5Config(vocab_size=128, num_encoder_layers=1,
                                                                        num_decoder_layers=1))),
                  model_dir=str(tmp_path), total_steps=1,
                  train_dataset_cfg=pipeline.DatasetConfig(TASK, LENGTHS, batch_size=8))


def test_batch_not_divisible_by_data_axis(tmp_path):
  with pytest.raises(ValueError, match="not divisible"):
    trainer.train(model=tiny_model(), model_dir=str(tmp_path), total_steps=1,
                  train_dataset_cfg=pipeline.DatasetConfig(TASK, LENGTHS, batch_size=6),
                  partitioner=partitioning.Partitioner(4, 2))


def test_evaluate_checkpoint_reproduces_training_eval(uninterrupted):
  d, last = uninterrupted
  result = trainer.evaluate(
      model=tiny_model(), model_dir=str(d),
      eval_dataset_cfg=pipeline.DatasetConfig(TASK, LENGTHS, split="validation", batch_size=8, shuffle=False),
      partitioner=partitioning.Partitioner(4, 2), optimizer=optim.make_optimizer("adamw"), eval_steps=1)
  assert result["step"] == 6
  assert result["eval/loss"] == pytest.approx(last["eval/loss"], rel=1e-6)
  assert result["eval/accuracy"] == pytest.approx(last["eval/accuracy"], rel=1e-6)


def test_evaluate_an_earlier_checkpoint_reproduces_its_training_eval(uninterrupted, tmp_path):
  # CHECKPOINT_STEP: step 3's parameters, not the latest's under step 3's name (the two evaluations differ).
  d, _ = uninterrupted
  shutil.copytree(d / "checkpoints", tmp_path / "checkpoints")  # evaluate appends to metrics.jsonl: not the shared run
  at_3 = next(r for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
              if r["step"] == 3 and "eval/loss" in r)
  result = trainer.evaluate(
      model=tiny_model(), model_dir=str(tmp_path),
      eval_dataset_cfg=pipeline.DatasetConfig(TASK, LENGTHS, split="validation", batch_size=8, shuffle=False),
      partitioner=partitioning.Partitioner(4, 2), eval_steps=1, checkpoint_step=3)
  assert result["step"] == 3
  assert result["eval/loss"] == pytest.approx(at_3["eval/loss"], rel=1e-6)
  assert at_3["eval/loss"] != pytest.approx(uninterrupted[1]["eval/loss"], rel=1e-4)


def test_a_model_of_another_depth_hidden_by_sharing_is_neither_evaluated_nor_resumed(uninterrupted, tmp_path):
  # 2 distinct layers and 4 layers with param_share=2 hold the same parameter tree: `repeat-lm eval` scored the
  # 2-layer checkpoint as the 4-layer model (eval/loss 9.62 for 9.69) and a resume trained on as the other model.
  d, _ = uninterrupted
  shutil.copytree(d / "checkpoints", tmp_path / "checkpoints")
  # As a gin-built run's config.gin records its model (this run's was built in Python: its config.gin is empty).
  (tmp_path / "config.gin").write_text("t5.T5Config.num_encoder_layers = 2\nt5.T5Config.num_decoder_layers = 2\n")
  deeper = EncoderDecoderModel(module=Transformer(dataclasses.replace(
      tiny_model().module.config, num_encoder_layers=4, num_decoder_layers=4, param_share=2)))
  with pytest.raises(ValueError, match="another depth.*encoder 2 layers .* vs model 4"):
    trainer.evaluate(model=deeper, model_dir=str(tmp_path), partitioner=partitioning.Partitioner(4, 2), eval_steps=1,
                     eval_dataset_cfg=pipeline.DatasetConfig(TASK, LENGTHS, split="validation", batch_size=8))
  with pytest.raises(ValueError, match="another depth.*encoder 2 layers .* vs model 4"):
    run(tmp_path, 9, model=deeper)
  # Nor one computing another function with the same weights (another MLP activation), and its config.gin stays.
  written = (tmp_path / "config.gin").read_text()
  with pytest.raises(ValueError, match=r"other settings.*mlp_activations: checkpoint \('gelu', 'linear'\) vs model "
                     r"\('relu', 'linear'\)"):
    run(tmp_path, 9, model=tiny_model(mlp_activations=("relu", "linear")))
  assert (tmp_path / "config.gin").read_text() == written
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]


def test_checkpoints_without_their_config_gin_get_none_written_before_the_restore(uninterrupted, tmp_path, caplog):
  # Only checkpoints/ copied: train wrote the configured model's config.gin first, so the depth check compared the
  # model with itself, and a failed restore left that file behind as the checkpoints' record (infer and export build
  # their model from it).
  d, _ = uninterrupted
  shutil.copytree(d / "checkpoints", tmp_path / "checkpoints")
  with caplog.at_level(logging.WARNING), pytest.raises(checkpoint.CheckpointError, match="holds a different model"):
    run(tmp_path, 9, model=tiny_model(relative_attention_num_buckets=16))
  assert not (tmp_path / "config.gin").exists()
  assert "holds checkpoints but no config.gin" in caplog.text


def test_unseeded_evaluation_rows_of_all_hosts_make_one_stream(monkeypatch):
  """An evaluation set with seed=None: each host drew its own seed (os.urandom in get_batches), so its rows came from
  another stream (masks, and a UL2 layout with its batch count); every host must use the one broadcast draw."""
  class Host:
    def __init__(self, shard):
      self.shard = shard

    def check_batch_size(self, *unused):
      pass

    def data_layout(self, batch_size):
      return self.shard, 2

  monkeypatch.setattr(trainer, "_draw_seed", lambda: 7)  # what process 0 broadcasts
  cfg = pipeline.DatasetConfig(TASK, LENGTHS, split="validation", batch_size=8, shuffle=False, seed=None)
  hosts = [trainer._eval_batches(cfg, 2, Host(h)) for h in (0, 1)]  # pylint: disable=protected-access
  whole = list(pipeline.get_batches(dataclasses.replace(cfg, seed=7)))[:2]
  for step, batch in enumerate(whole):
    for k, v in batch.items():
      np.testing.assert_array_equal(np.concatenate([hosts[0][step][k], hosts[1][step][k]]), v, err_msg=k)


@pytest.mark.parametrize("seen,agreed", [([6, 6], 6), ([-1, -1], None), ([6, 3], "process 1: 3"),
                                         ([6, -1], "process 1: none")])
def test_every_process_resumes_from_the_same_step_or_none_does(tmp_path, monkeypatch, seen, agreed):
  # Each host lists the checkpoints itself: one behind a cached listing restored another step (or a fresh state)
  # beside the others', a mixed state with nothing failing.
  class Listing:
    directory = tmp_path / "checkpoints"

    def latest_step(self):
      return None if seen[0] < 0 else seen[0]  # this process is process 0
  monkeypatch.setattr(trainer.jax, "process_count", lambda: 2)
  monkeypatch.setattr(trainer.multihost_utils, "process_allgather", lambda x: np.asarray(seen))
  if isinstance(agreed, str):
    with pytest.raises(checkpoint.CheckpointError, match=rf"different newest checkpoints .*process 0: 6, {agreed}\)"
                       r".*cached listing"):
      trainer._agreed_latest_step(Listing())  # pylint: disable=protected-access
  else:
    assert trainer._agreed_latest_step(Listing()) == agreed  # pylint: disable=protected-access


def test_evaluate_a_directory_without_checkpoints_creates_nothing(tmp_path):
  typo = tmp_path / "rnu"
  with pytest.raises(FileNotFoundError, match="No checkpoints directory under MODEL_DIR"):
    trainer.evaluate(model=tiny_model(), model_dir=str(typo),
                     eval_dataset_cfg=pipeline.DatasetConfig(TASK, LENGTHS, split="validation", batch_size=8))
  assert not typo.exists()


@pytest.mark.parametrize("kwargs,match", [({"log_period": 0}, r"trainer.train.log_period=0: must be >= 1"),
                                          ({"eval_period": 0}, r"trainer.train.eval_period=0"),
                                          ({"eval_steps": 0}, r"trainer.train.eval_steps=0"),
                                          ({"total_steps": -1}, r"TRAIN_STEPS \(trainer.train.total_steps\)=-1"),
                                          # a TypeError traceback; islice's 'Stop argument' error after setup
                                          ({"total_steps": "4"}, r"total_steps\)='4': must be >= 0, a whole number"),
                                          ({"total_steps": 2.5}, r"total_steps\)=2.5: must be >= 0, a whole number")])
def test_bad_counts_are_clear_errors_before_anything_is_written(tmp_path, kwargs, match):
  args = dict(model=tiny_model(), model_dir=str(tmp_path / "run"), train_dataset_cfg=TRAIN_CFG, total_steps=4)
  with pytest.raises(ValueError, match=match):
    trainer.train(**{**args, **kwargs})
  assert not (tmp_path / "run").exists()


def test_a_model_dir_that_is_a_file_or_inside_another_runs_checkpoints_is_refused(tmp_path):
  # A file: a bare FileExistsError. Inside another run's step folder (T5X's checkpoint_<step> habit): that run deleted
  # this one, checkpoints, records and all, when its checkpoints rotated.
  (tmp_path / "afile").write_text("")
  with pytest.raises(ValueError, match="afile is a file, not a directory"):
    trainer.train(model=tiny_model(), model_dir=str(tmp_path / "afile"), train_dataset_cfg=TRAIN_CFG, total_steps=4)
  (tmp_path / "outer" / "checkpoints" / "6").mkdir(parents=True)
  (tmp_path / "outer" / "config.gin").write_text("")
  nested = tmp_path / "outer" / "checkpoints" / "6" / "run"
  with pytest.raises(ValueError, match="inside the checkpoints of the run .*outer, whose step directories training "
                     "deletes"):
    trainer.train(model=tiny_model(), model_dir=str(nested), train_dataset_cfg=TRAIN_CFG, total_steps=4)
  assert not nested.exists()


def test_a_missing_initial_checkpoint_fails_before_the_run_is_made(tmp_path):
  # It failed after the step compiled, leaving config.gin and an empty checkpoints/ in MODEL_DIR.
  with pytest.raises(FileNotFoundError, match="Initial checkpoint .*base does not exist"):
    trainer.train(model=tiny_model(), model_dir=str(tmp_path / "run"), train_dataset_cfg=TRAIN_CFG, total_steps=4,
                  initial_checkpoint_path=str(tmp_path / "base"))
  assert not (tmp_path / "run").exists()


def test_an_empty_model_dir_is_an_error_not_the_current_directory(tmp_path, monkeypatch):
  # --gin.MODEL_DIR="'$MODEL_DIR'" with the variable unset: the run wrote (or resumed) checkpoints where it started.
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match="MODEL_DIR is empty"):
    trainer.train(model=tiny_model(), model_dir="", train_dataset_cfg=TRAIN_CFG, total_steps=4)
  with pytest.raises(ValueError, match="MODEL_DIR is empty"):
    trainer.evaluate(model=tiny_model(), model_dir=" ", eval_dataset_cfg=TRAIN_CFG)
  with pytest.raises(ValueError, match="MODEL_DIR=20261130 is not a path"):  # unquoted in gin: a TypeError traceback
    trainer.train(model=tiny_model(), model_dir=20261130, train_dataset_cfg=TRAIN_CFG, total_steps=4)
  assert not list(tmp_path.iterdir())


def test_first_logs_one_time_costs_are_not_step_time(tmp_path, monkeypatch):
  # Opening the first TensorBoard writer (then importing tensorboardX, ~1 s) and tracing the schedule happened while
  # logging step 1, so read-to-read time charged them to step 2's window: smoke.gin's step-10 step_time_s was 2.8x the
  # rest. A 1 s sleep stands in for a slow first writer.
  original = metrics_lib.open_tensorboard

  def slow_open(directory):
    time.sleep(1.0)
    return original(directory)

  monkeypatch.setattr(metrics_lib, "open_tensorboard", slow_open)
  run(tmp_path, 3)
  assert train_records(tmp_path)[2]["train/step_time_s"] < 0.5


def test_a_resumed_runs_first_step_is_not_step_time(uninterrupted, tmp_path, monkeypatch):
  # The first step after a resume also traces and compiles the step (here a 4 s sleep stands in): read-to-read time
  # charged it to the window 4..5, which logged step_time_s (and MFU) several times off (1.07 s for 0.13 s on CPU).
  d, _ = uninterrupted
  shutil.copytree(d / "checkpoints" / "3", tmp_path / "checkpoints" / "3")
  real = state_lib.make_train_step

  def slow_first_call(*args, **kwargs):
    step_fn, calls = real(*args, **kwargs), []

    def slow(*a):
      if not calls:
        time.sleep(4.0)
      calls.append(1)
      return step_fn(*a)
    return slow
  monkeypatch.setattr(state_lib, "make_train_step", slow_first_call)
  run(tmp_path, 6, log_period=5)  # resumes at 3: steps 4 (the first) and 5 in one window
  got, whole = train_records(tmp_path), train_records(d)
  assert sorted(got) == [5, 6] and got[5]["train/tokens_seen"] == whole[5]["train/tokens_seen"]
  assert got[5]["train/step_time_s"] < 1.5  # charged the sleep: at least (4 + two steps) / 2
  # Step 5 alone was timed: its text rate x its time is the text step 5 read.
  step5_text = whole[5]["train/tokens_seen"] - whole[4]["train/tokens_seen"]
  assert got[5]["train/text_tokens_per_s"] * got[5]["train/step_time_s"] == pytest.approx(step5_text)


def test_a_config_rewrite_cut_short_leaves_the_previous_config(tmp_path, monkeypatch):
  written = "t5.T5Config.mlp_dim = 64\n"
  (tmp_path / "config.gin").write_text(written)
  monkeypatch.setattr(trainer.gin, "config_str", lambda: "t5.T5Config.emb_dim = 32\nt5.T5Config.mlp_dim = 128\n")

  def killed_before_the_rename(src, dst):
    del src, dst
    raise KeyboardInterrupt  # the process dies with the new text written beside config.gin, not over it
  monkeypatch.setattr(os, "replace", killed_before_the_rename)
  with pytest.raises(KeyboardInterrupt):
    trainer._write_config(tmp_path, operative=False)
  assert (tmp_path / "config.gin").read_text() == written
  assert [p.name for p in tmp_path.iterdir()] == ["config.gin"]  # no temporary file left beside it


def test_a_dropout_schedule_that_reaches_rate_1_is_refused():
  # A rate of 1 drops every activation (the model sees zeros): rate 0.5 doubled from step 0 is exactly that.
  model = tiny_model(dropout_rate=0.5)
  with pytest.raises(ValueError, match="must stay below 1"):
    trainer._dropout_schedule("piecewise:0=2", model, TRAIN_CFG, None, 10)  # pylint: disable=protected-access
  schedule = trainer._dropout_schedule("piecewise:0=1.9", model, TRAIN_CFG, None, 10)  # pylint: disable=W0212
  assert float(schedule(0)) == pytest.approx(1.9)


@pytest.mark.parametrize("spec, warns", [("staged:1000", True), ("staged:10", True), ("staged:9", False),
                                         ("linear:9:20", True), ("linear:8:20", False),
                                         ("piecewise:2=0,50=1", True), ("piecewise:2=0,5=1", False)])
def test_a_dropout_schedule_that_stays_off_through_the_run_warns(spec, warns, caplog):
  # staged:50ep on a 2-step run trained a 'staged dropout' arm exactly as the no-dropout one, without a word. Updates
  # are steps 0..9 of a 10-step run: staged:9 switches on for the last one, linear:9:20 first rises after it.
  with caplog.at_level("WARNING"):
    trainer._dropout_schedule(spec, tiny_model(dropout_rate=0.1), TRAIN_CFG, None, 10)  # pylint: disable=W0212
  assert ("keeps dropout off through TRAIN_STEPS=10" in caplog.text) is warns


def test_a_dropout_schedule_without_dropout_warns_once(caplog):
  with caplog.at_level("WARNING"):
    trainer._dropout_schedule("staged:1000", tiny_model(dropout_rate=0.0), TRAIN_CFG, None, 10)  # pylint: disable=W0212
  assert "has no effect: every dropout rate of the model is 0" in caplog.text and "keeps dropout off" not in caplog.text


def test_a_window_logs_the_schedules_last_factor_and_the_last_step_is_logged(tmp_path):
  # log_period=3 over 4 steps: step 1 alone, steps 2-3 as one window, and step 4, the last, though 4 % 3 != 0. The
  # schedule holds DROPOUT_RATE 0.1 at half (0.05) throughout: a window of two steps still logs 0.5, not their sum.
  run(tmp_path, 4, model=tiny_model(dropout_rate=0.1), log_period=3, dropout_schedule="piecewise:0=0.5")
  records = train_records(tmp_path)
  assert sorted(records) == [1, 3, 4]
  assert [records[s]["train/dropout_scale"] for s in (1, 3, 4)] == [0.5, 0.5, 0.5]
  assert records[3]["train/dropout_rate"] == pytest.approx(0.05)


def test_the_logged_dropout_rate_is_the_largest_the_model_applies():
  # train/dropout_rate read DROPOUT_RATE alone: with DROPOUT_RATE 0 and a per-place override it logged 0 while
  # dropout ran at every step. Places the model does not have (a dense model's experts) do not count.
  rate = trainer._dropout_rate  # pylint: disable=protected-access
  assert rate(tiny_model(dropout_rate=0.1)) == pytest.approx(0.1)
  assert rate(tiny_model(dropout_rate=0.1, attention_dropout_rate=0.0)) == pytest.approx(0.1)
  assert rate(tiny_model(dropout_rate=0.0, hidden_dropout_rate=0.2)) == pytest.approx(0.2)
  assert rate(tiny_model(dropout_rate=0.0, expert_dropout_rate=0.3)) == 0.0  # dense: no experts to drop in
  switch = moe.MoeConfig(num_experts=4, expert_mlp_dim=16)
  assert rate(tiny_model(dropout_rate=0.0, expert_dropout_rate=0.3, moe=switch)) == pytest.approx(0.3)
  # Every FFN sparse: mlp_dropout_rate reaches no layer.
  every = dataclasses.replace(switch, sparse_every=1)
  assert rate(tiny_model(dropout_rate=0.1, mlp_dropout_rate=0.4, moe=every)) == pytest.approx(0.1)


def test_evaluate_refuses_a_run_it_cannot_record_in_before_evaluating(uninterrupted, monkeypatch):
  # A read-only MODEL_DIR (an archived run): the whole evaluation ran, then the append to metrics.jsonl failed, with
  # a "free space" hint, and the numbers were lost.
  d, _ = uninterrupted
  monkeypatch.setattr(trainer.os, "access", lambda path, mode: False)
  monkeypatch.setattr(trainer, "_run_eval", lambda *a, **k: pytest.fail("evaluated before checking"))
  with pytest.raises(PermissionError, match="metrics.jsonl cannot be written .* evaluate the copy"):
    trainer.evaluate(model=tiny_model(), model_dir=str(d), eval_steps=1,
                     eval_dataset_cfg=pipeline.DatasetConfig(TASK, LENGTHS, split="validation", batch_size=8))


def test_evaluate_with_no_steps_is_a_clear_error(tmp_path):
  # Not "the evaluation split gave no full batch; lower the eval batch size", which would send the user elsewhere.
  with pytest.raises(ValueError, match=r"trainer.evaluate.eval_steps=0: must be >= 1"):
    trainer.evaluate(model=tiny_model(), model_dir=str(tmp_path), eval_steps=0,
                     eval_dataset_cfg=pipeline.DatasetConfig(TASK, LENGTHS, split="validation", batch_size=8))


def test_a_seeded_run_longer_than_its_task_is_refused_before_training(tmp_path, monkeypatch):
  # 10 batches of 8 at seed 3 (the test above): an 11th step would run out of data mid-run, after its checkpoints.
  cfg = pipeline.DatasetConfig("repeat_lm.wiki.wiki8k.ul2.dn1750.en2", LENGTHS, batch_size=8, seed=3)
  monkeypatch.setattr(state_lib, "init_state", lambda *a, **k: pytest.fail("trained past the task's batches"))
  with pytest.raises(ValueError, match="holds 10 batches of 8 .*fewer than total_steps=11.*in a new MODEL_DIR where "
                     "this one holds checkpoints"):
    run(tmp_path, 11, train_cfg=cfg)


def test_a_relative_model_dir_of_another_model_is_refused_as_an_absolute_one_and_records_nothing(
    uninterrupted, tmp_path, monkeypatch):
  # Orbax read a relative directory's metadata as missing, which skipped the shape check: `repeat-lm eval` with
  # MODEL_DIR='run' scored a 1+1-layer model on the first layers of this 2+2-layer checkpoint (a partial restore) and
  # appended that to metrics.jsonl as the run's latest evaluation.
  d, _ = uninterrupted
  shutil.copytree(d, tmp_path / "run")
  before = (tmp_path / "run" / "metrics.jsonl").read_text()
  shallower = EncoderDecoderModel(module=Transformer(dataclasses.replace(
      tiny_model().module.config, num_encoder_layers=1, num_decoder_layers=1)))
  monkeypatch.chdir(tmp_path)
  messages = []
  for model_dir in ("run", str(tmp_path / "run")):
    with pytest.raises(checkpoint.CheckpointError, match="different model.*layers_1.* is in the checkpoint") as e:
      trainer.evaluate(model=shallower, model_dir=model_dir, partitioner=partitioning.Partitioner(4, 2), eval_steps=1,
                       eval_dataset_cfg=pipeline.DatasetConfig(TASK, LENGTHS, split="validation", batch_size=8))
    messages.append(str(e.value).replace(str(tmp_path / "run"), "run"))
  assert messages[0] == messages[1]
  assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_an_moe_resume_on_another_batch_split_warns_that_routing_groups_change(caplog):
  # A 4x2 -> 8x1 resume of switch_tiny continued silently, matching neither uninterrupted run: the routing groups
  # follow the batch split (moe.num_groups), so capacity and dropped tokens changed.
  import types
  from repeat_lm.models import moe
  model = types.SimpleNamespace(module=types.SimpleNamespace(config=types.SimpleNamespace(
      moe=moe.MoeConfig(num_experts=4, group_size=256))))
  cfg = pipeline.DatasetConfig("any", {"inputs": 64, "targets": 16}, batch_size=16)
  lengths = {"encoder_input_tokens": 64, "decoder_input_tokens": 16}
  with caplog.at_level("WARNING"):
    trainer._warn_if_routing_groups_change(model, cfg, lengths, 4, 8)  # encoder 4 -> 8 groups, decoder 4 -> 8
  assert "split over 4 devices, this run over 8: the MoE layers now route in [8, 8] groups" in caplog.text
  assert "resume with DATA_PARALLEL x EXPERT_PARALLEL = 4" in caplog.text
  caplog.clear()
  with caplog.at_level("WARNING"):
    model.module.config.moe = moe.MoeConfig(num_experts=4, group_size=64)  # 16 and 4 groups on 2 or 4: exact
    trainer._warn_if_routing_groups_change(model, cfg, lengths, 2, 4)
    trainer._warn_if_routing_groups_change(model, cfg, lengths, None, 8)  # a checkpoint from before it was saved
    model.module.config.moe = None  # dense: no routing
    trainer._warn_if_routing_groups_change(model, cfg, lengths, 4, 8)
  assert not caplog.text


def test_the_logged_learning_rate_is_the_optimizer_s(caplog):
  # optim.make_optimizer.learning_rate=0.001 (AdamW) trained at 0.001 while train/learning_rate logged pretrain.gin's
  # schedule, 0.316, from the trainer's own learning_rate.
  tx = optim.make_optimizer("adamw", learning_rate=0.001)
  with caplog.at_level("WARNING"):
    rate = trainer._logged_rate(tx, optim.make_schedule(), False, (0, 10))
  assert optim.learning_rate_at(rate, 5) == pytest.approx(0.001)
  assert "trainer.train.learning_rate (0.01 at step 0) is not the optimizer's (0.001" in caplog.text
  caplog.clear()
  with caplog.at_level("WARNING"):  # the same rate both ways (LEARNING_RATE binds both): no warning
    assert optim.learning_rate_at(trainer._logged_rate(tx, 0.001, False, (0, 10)), 3) == pytest.approx(0.001)
  assert not caplog.text
  import optax
  # Schedules that agree at the first and last steps and differ between them (a warm-up 10x too high).
  caplog.clear()
  peak = lambda top: (lambda s: top * np.minimum(s, 100 - s) / 50)  # noqa: E731
  with caplog.at_level("WARNING"):
    trainer._logged_rate(optim.make_optimizer(learning_rate=peak(0.01)), peak(0.1), False, (0, 100))
  assert "(0.002 at step 1) is not the optimizer's (0.0002," in caplog.text
  custom = optax.sgd(0.5)  # built elsewhere: only the trainer's rate can be logged
  assert trainer._logged_rate(custom, None, False, (0, 10)) is None
  assert trainer._logged_rate(custom, 0.5, False, (0, 10)) == 0.5
