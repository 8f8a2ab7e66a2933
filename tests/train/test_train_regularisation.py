"""Regularisation in training: masked weight decay, the dropout schedule (switches without recompiling), divergence
stops with the last good checkpoint intact, and every regulariser is a gin macro that works with smoke.gin."""

import dataclasses
import json
import re
from pathlib import Path

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from repeat_lm import cli, gin_utils
from repeat_lm.models import EncoderDecoderModel, T5Config, Transformer
from repeat_lm.train import checkpoint, dropout_schedule, optim, partitioning, state as state_lib, trainer

TINY = T5Config(vocab_size=64, dtype="float32", emb_dim=16, num_heads=2, head_dim=8, num_encoder_layers=1,
                num_decoder_layers=1, mlp_dim=32)
LENGTHS = {"encoder_input_tokens": 16, "decoder_input_tokens": 8, "decoder_target_tokens": 8}


# ---- weight decay ----

def test_weight_decay_mask_spares_norm_scales_and_optionally_embeddings():
  spec = state_lib.batch_specs(LENGTHS, 2)
  params = jax.eval_shape(EncoderDecoderModel(Transformer(TINY)).init, jax.random.key(0), spec)["params"]
  names = {path[-1] for path in traverse_util.flatten_dict(params)}
  assert {"scale", "embedding", "rel_embedding", "kernel"} <= names
  for decay_embeddings in (True, False):
    mask = traverse_util.flatten_dict(optim.default_weight_decay_mask(params, decay_embeddings))
    for path, decays in mask.items():
      expected = {"scale": False, "embedding": decay_embeddings, "rel_embedding": decay_embeddings}.get(path[-1], True)
      assert decays == expected, path


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_weight_decay_formula_and_mask(name):
  params = {"norm": {"scale": jnp.full((4,), 2.0)}, "token_embedder": {"embedding": jnp.full((8, 4), 2.0)},
            "dense": {"kernel": jnp.full((4, 4), 2.0)}}
  zero_grads = jax.tree.map(jnp.zeros_like, params)  # so the update is the decay alone
  lr, wd = 0.5, 0.1
  # AdamW's decay is decoupled but scaled by the learning rate; Adafactor's (optax weight_decay_rate) is not.
  shrunk = 2.0 * (1 - lr * wd if name == "adamw" else 1 - wd)
  for decay_embeddings, mask in ((True, None), (False, None), (True, lambda p: jax.tree.map(lambda _: False, p))):
    tx = optim.make_optimizer(name, learning_rate=lr, weight_decay=wd, decay_embeddings=decay_embeddings,
                              weight_decay_mask=mask)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    decayed = mask is None
    np.testing.assert_allclose(new["dense"]["kernel"], shrunk if decayed else 2.0, rtol=1e-6)
    np.testing.assert_allclose(new["norm"]["scale"], 2.0)
    np.testing.assert_allclose(new["token_embedder"]["embedding"],
                               shrunk if decayed and decay_embeddings else 2.0, rtol=1e-6)


def test_optimizer_state_layout_does_not_depend_on_weight_decay():
  # So `repeat-lm eval` (default optimizer bindings) restores checkpoints trained with any WEIGHT_DECAY.
  params = {"w": jnp.zeros((4, 256)), "norm": {"scale": jnp.ones((4,))}}
  for name in ("adafactor", "adamw"):
    structures = {jax.tree.structure(optim.make_optimizer(name, 0.1, weight_decay=wd).init(params))
                  for wd in (0.0, 0.01)}
    assert len(structures) == 1


# ---- dropout schedule ----

@pytest.mark.parametrize("spec,factors", [
    (None, [1, 1, 1, 1, 1]), ("constant", [1, 1, 1, 1, 1]), ("staged:2", [0, 0, 1, 1, 1]),
    ("linear:1:3", [0, 0, 0.5, 1, 1]), ("piecewise:1=0.5,3=1", [0, 0.5, 0.5, 1, 1]),
    ("linear:2:2", [0, 0, 1, 1, 1]),  # a ramp of no length is a switch at its step: 'staged:2'
    ("staged:0.5ep", [0, 0, 1, 1, 1]),  # 4 steps per epoch below
    ("staged:0.4ep", [0, 0, 1, 1, 1]), ("linear:0.4ep:0.9ep", [0, 0, 0, 0.5, 1]),  # nearest: 1.6 -> 2, 3.6 -> 4
])
def test_dropout_schedule_factors(spec, factors):
  schedule = dropout_schedule.resolve(spec, epoch_steps=4.0)
  np.testing.assert_allclose([float(schedule(s)) for s in range(5)], factors)


@pytest.mark.parametrize("spec,message", [
    ("staged", "Unknown dropout schedule"), ("staged:1.5", "whole number"), ("linear:5:2", "ends"),
    ("piecewise:5=1,2=1", "must increase"), ("piecewise:2=1,2=0.5", "must increase"),
    ("cosine:3", "Unknown dropout schedule"),
    # Numbers and bools (gin values without quotes) ended in "'int' object has no attribute 'strip'".
    (1000, "DROPOUT_SCHEDULE=1000 must be a quoted string such as 'staged:1000'"), (True, "quoted string")])
def test_bad_dropout_schedule_says_what_is_accepted(spec, message):
  with pytest.raises(ValueError, match=message):
    dropout_schedule.resolve(spec)


def test_epochs_need_a_known_epoch_length():
  assert dropout_schedule.uses_epochs("linear:0:2.5ep") and not dropout_schedule.uses_epochs("staged:100")
  # resolve ignores spaces, so the trainer must see these epochs too (else it never works out the epoch length)
  assert dropout_schedule.uses_epochs("staged:4 ep") and dropout_schedule.uses_epochs("linear:0 : 2.5 ep")
  with pytest.raises(ValueError, match="give the switch points in steps"):
    dropout_schedule.resolve("staged:2ep", epoch_steps=None)
  # T5 span corruption: 512 input tokens hold a 568-token chunk of text, one chunk per row.
  assert dropout_schedule.steps_per_epoch(568 * 128 * 10, batch_size=128, inputs_length=512) == 10


def test_max_factor_is_the_largest_factor_a_schedule_reaches():
  # The trainer refuses rate x max_factor >= 1: a piecewise factor of 2 doubles every rate once step 10 is reached.
  assert dropout_schedule.max_factor(dropout_schedule.resolve("piecewise:0=0.5,10=2,20=1")) == 2.0
  assert dropout_schedule.max_factor(dropout_schedule.resolve("piecewise:0=0.25")) == 0.25
  for spec in (None, "staged:3", "linear:1:4"):
    assert dropout_schedule.max_factor(dropout_schedule.resolve(spec)) == 1.0


def test_scheduled_dropout_switches_at_its_step_without_recompiling():
  # Dropout in the two FFNs only: the schedule reaches every place alike, and fewer random draws compile faster.
  model = EncoderDecoderModel(Transformer(dataclasses.replace(TINY, mlp_dropout_rate=0.3)))
  tx = optim.make_optimizer("adafactor", learning_rate=0.0)  # parameters stay put: losses differ by dropout only
  partitioner = partitioning.Partitioner(devices=jax.devices()[:1])
  spec = state_lib.batch_specs(LENGTHS, 4)
  lay = state_lib.layout(model, tx, partitioner, spec, seed=0)
  state = state_lib.init_state(model, tx, lay, partitioner, spec, seed=0)
  rng = np.random.default_rng(0)
  batch = state_lib.global_batch({k: rng.integers(2, TINY.vocab_size, s.shape).astype(np.int32)
                                  for k, s in spec.items()}, lay.batch_shardings)
  step = state_lib.make_train_step(model, tx, lay, partitioner, seed=0,
                                   dropout_schedule=dropout_schedule.resolve("staged:2"))
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, duration, **kw: compiles.append(event) if "backend_compile" in event else None)
  losses, scales = [], []
  for i in range(4):
    if i == 1:
      compiles.clear()  # the first call compiles; none of the later ones may
    state, sums = step(state, batch)
    losses.append(float(sums["loss_sum"]))
    scales.append(float(sums["dropout_scale"]))
  assert scales == [0.0, 0.0, 1.0, 1.0]
  assert losses[0] == losses[1]  # before the switch dropout is an exact identity, whatever the rng
  assert abs(losses[2] - losses[0]) > 1e-3 and losses[3] != losses[2]  # on from step 2, new masks each step
  assert step.jitted._cache_size() == 1 and not compiles


# ---- divergence ----

class _FakeCheckpointer:
  directory = Path("/run/checkpoints")

  def wait(self):
    pass

  def latest_step(self):
    return 40


def test_non_finite_step_names_the_step_and_the_last_good_checkpoint():
  finite = {"loss_sum": 3.0, "grad_norm": 1.0, "param_norm": 10.0}
  trainer._check_finite(finite, 41, _FakeCheckpointer())
  for key, bad in (("loss_sum", np.nan), ("grad_norm", np.inf), ("param_norm", np.inf)):
    with pytest.raises(trainer.TrainingDivergedError, match=r"diverged at step 41.*last good checkpoint is step 40"):
      trainer._check_finite(dict(finite, **{key: bad}), 41, _FakeCheckpointer())


def _cli_train(model_dir, *bindings):
  return cli.main(["train", "--gin_file=gin/runs/smoke.gin", f"--gin.MODEL_DIR='{model_dir}'",
                   "--gin.trainer.train.log_period=1", "--gin.trainer.train.eval_dataset_cfg=None", *bindings])


def test_divergent_weight_decay_stops_with_an_intact_checkpoint(tmp_path, capsys):
  # Adafactor's per-step decay of 1e6 multiplies the parameters by -999999 each step: they overflow in a few.
  code = _cli_train(tmp_path, "--gin.TRAIN_STEPS=8", "--gin.WEIGHT_DECAY=1e6",
                    "--gin.checkpoint.CheckpointConfig.period=1")
  err = capsys.readouterr().err
  assert code != 0
  match = re.search(r"TrainingDivergedError: Training diverged at step (\d+).*last good checkpoint is step (\d+)", err)
  assert match, err
  bad, good = int(match.group(1)), int(match.group(2))
  assert good == bad - 1
  ckpt = checkpoint.Checkpointer(tmp_path)
  assert ckpt.all_steps() == list(range(1, bad))  # nothing of the divergent step was written
  # Restored the way `repeat-lm eval` does: smoke.gin's model, the default optimizer (no weight decay bound).
  model = gin_utils.configured_macro(["gin/runs/smoke.gin"], [], "MODEL")
  lengths = {"encoder_input_tokens": 128, "decoder_input_tokens": 32, "decoder_target_tokens": 32}
  lay = state_lib.layout(model, optim.make_optimizer(), partitioning.Partitioner(4, 2),
                         state_lib.batch_specs(lengths, 16), seed=0)
  state, meta = ckpt.restore(lay.abstract, good)
  ckpt.close()
  assert meta["step"] == good
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state["params"]))


# ---- gin ----

MACROS = {"DROPOUT_RATE": 0.2, "DROPPATH_RATE": 0.1, "LABEL_SMOOTHING": 0.1, "WEIGHT_DECAY": 0.01,
          "DROPOUT_SCHEDULE": "staged:5"}


@pytest.mark.parametrize("name", MACROS)
def test_each_regulariser_is_a_smoke_gin_macro(name):
  value = MACROS[name]
  model = gin_utils.configured_macro(["gin/runs/smoke.gin"], [f"{name}={value!r}"], "MODEL")
  assert gin.query_parameter(f"%{name}") == value
  if name in ("WEIGHT_DECAY", "DROPOUT_SCHEDULE"):  # run macros: bound where the trainer reads them
    parameter = {"WEIGHT_DECAY": "optim.make_optimizer.weight_decay",
                 "DROPOUT_SCHEDULE": "trainer.train.dropout_schedule"}[name]
    assert repr(gin.query_parameter(parameter)) == f"%{name}"
  else:  # model macros: in the MODEL that smoke.gin builds
    got = {"DROPOUT_RATE": model.module.config.dropout_rate, "DROPPATH_RATE": model.module.config.droppath_rate,
           "LABEL_SMOOTHING": model.label_smoothing}[name]
    assert got == value


def test_smoke_run_with_staged_dropout_and_scanned_droppath(tmp_path):
  code = _cli_train(tmp_path, "--gin.TRAIN_STEPS=3", "--gin.DROPOUT_RATE=0.1", "--gin.DROPOUT_SCHEDULE='staged:2'",
                    "--gin.DROPPATH_RATE=0.1", "--gin.t5.T5Config.droppath_depth_scaling='linear'",
                    "--gin.SCAN_LAYERS=True", "--gin.LABEL_SMOOTHING=0.1", "--gin.WEIGHT_DECAY=1e-4")
  assert code == 0
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  # Logged after steps 1, 2, 3, which ran with state['step'] 0, 1, 2: dropout comes on at the third.
  assert [r["train/dropout_rate"] for r in records] == [0.0, 0.0, 0.1]
  assert all(np.isfinite(r["train/loss"]) for r in records)
  assert "DROPOUT_SCHEDULE = 'staged:2'" in (tmp_path / "config.gin").read_text()  # the operative config
