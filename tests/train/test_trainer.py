"""The training loop end to end on the tiny model: exact resume, sharded == unsharded, SIGTERM, divergence."""

import json
import os
import signal

import jax
import numpy as np
import pytest

from repeat_lm.data import pipeline
from repeat_lm.models import EncoderDecoderModel, T5Config, Transformer
from repeat_lm.train import checkpoint, optim, partitioning, trainer

TASK = "repeat_lm.wiki_span_corruption"
LENGTHS = {"inputs": 64, "targets": 16}


def tiny_model(**overrides):
  cfg = T5Config(vocab_size=8192, dtype="float32", emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                 num_encoder_layers=2, num_decoder_layers=2, **overrides)
  return EncoderDecoderModel(module=Transformer(cfg))


def run(model_dir, steps, *, mesh=(4, 2), devices=None, eval_=False, learning_rate=None, **kwargs):
  return trainer.train(
      model=tiny_model(), model_dir=str(model_dir), total_steps=steps,
      train_dataset_cfg=pipeline.DatasetConfig(TASK, LENGTHS, batch_size=8, seed=3),
      eval_dataset_cfg=pipeline.DatasetConfig(TASK, LENGTHS, split="validation", batch_size=8,
                                              shuffle=False) if eval_ else None,
      partitioner=partitioning.Partitioner(*mesh, devices=devices),
      learning_rate=learning_rate or optim.make_schedule(warmup_steps=2),
      checkpoint_cfg=checkpoint.CheckpointConfig(period=3, keep=None), log_period=1, eval_period=3, eval_steps=1,
      **kwargs)


def losses(model_dir):
  records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


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
  assert "t5.T5Config" in (d / "config.gin").read_text() or (d / "config.gin").exists()
  assert sorted(int(p.name) for p in (d / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6]
  tokens = [r["train/tokens_seen"] for r in records if "train/tokens_seen" in r]
  assert all(b > a for a, b in zip(tokens, tokens[1:]))


def test_resume_reproduces_uninterrupted_losses(uninterrupted, tmp_path):
  d, _ = uninterrupted
  run(tmp_path, 3)
  run(tmp_path, 6)  # Resumes from the step-3 checkpoint, including the data position.
  assert losses(tmp_path) == losses(d)


def test_sharded_equals_single_device(tmp_path):
  # A small rate keeps float32 reduction-order differences from being amplified across steps.
  run(tmp_path / "single", 3, mesh=(1, 1), devices=jax.devices()[:1], learning_rate=0.01)
  run(tmp_path / "sharded", 3, mesh=(4, 2), learning_rate=0.01)
  single, sharded = losses(tmp_path / "single"), losses(tmp_path / "sharded")
  assert single[3] < single[1]
  np.testing.assert_allclose(list(sharded.values()), list(single.values()), rtol=1e-5)


def test_sigterm_checkpoints_and_stops(tmp_path, monkeypatch):
  real = pipeline.get_batches

  def batches_then_sigterm(*args, **kwargs):
    for i, batch in enumerate(real(*args, **kwargs)):
      if i == 2:  # While step 2 trains, the job is told to stop.
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  monkeypatch.setattr(pipeline, "get_batches", batches_then_sigterm)
  run(tmp_path, 50)
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [3]
  assert max(losses(tmp_path)) == 3


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
