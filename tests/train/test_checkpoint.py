"""Checkpoints: sharded round trip, retention, and a corrupt checkpoint that is reported, not deleted."""

import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from repeat_lm.train import checkpoint, partitioning


def _state():
  mesh = partitioning.make_mesh(4, 2)
  w = jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(mesh, P("data", "model")))
  return {"step": jnp.asarray(7, jnp.int32), "params": {"w": w}}


def test_round_trip_keeps_values_and_shardings(tmp_path):
  state = _state()
  ck = checkpoint.Checkpointer(tmp_path, checkpoint.CheckpointConfig(period=1, keep=2))
  for step in (1, 2, 3):
    ck.save(step, state, {"step": step, "tokens_seen": 10.0 * step})
  ck.wait()
  assert ck.all_steps() == [2, 3]
  restored, meta = ck.restore(checkpoint.abstract_like(state))
  ck.close()
  assert meta["tokens_seen"] == 30.0
  np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
  assert restored["params"]["w"].sharding == state["params"]["w"].sharding


def test_corrupt_checkpoint_names_the_fix_and_is_kept(tmp_path):
  state = _state()
  ck = checkpoint.Checkpointer(tmp_path, checkpoint.CheckpointConfig(period=1, keep=None))
  ck.save(1, state, {"step": 1})
  ck.save(2, state, {"step": 2})
  ck.close()
  # Damage every array file of step 2.
  for f in (tmp_path / "checkpoints" / "2" / "state").rglob("*"):
    if f.is_file() and f.name != "_METADATA":
      f.write_bytes(b"garbage")
  ck = checkpoint.Checkpointer(tmp_path)
  with pytest.raises(checkpoint.CheckpointError, match="resume from step 1"):
    ck.restore(checkpoint.abstract_like(state))
  assert (tmp_path / "checkpoints" / "2").exists()  # Never deleted behind the user's back.
  restored, _ = ck.restore(checkpoint.abstract_like(state), step=1)
  np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
  with pytest.raises(checkpoint.CheckpointError, match=r"No checkpoint of step 7 .*holds steps \[1, 2\]"):
    ck.restore(checkpoint.abstract_like(state), step=7)  # not a corrupt one: nothing to move aside
  with pytest.raises(checkpoint.CheckpointError, match="No checkpoint of step 7"):
    ck.restore_params(checkpoint.abstract_like(state)["params"], step=7)
  # Evaluation reads only the parameters: the same damage names the step it can read instead.
  with pytest.raises(checkpoint.CheckpointError, match=r"corrupt or truncated.*CHECKPOINT_STEP=1 evaluates"):
    ck.restore_params(checkpoint.abstract_like(state)["params"])
  assert (tmp_path / "checkpoints" / "2").exists()


def _saved_steps(tmp_path, *states):
  """A Checkpointer over tmp_path holding steps 1, 2, ... with these states, every save finished."""
  ck = checkpoint.Checkpointer(tmp_path, checkpoint.CheckpointConfig(period=1, keep=None))
  for step, state in enumerate(states, 1):
    ck.save(step, state, {"step": step})
  ck.wait()
  return ck


def test_a_checkpoint_holding_non_finite_values_is_damaged_not_a_divergence(tmp_path):
  # Bytes damaged on disk read back as NaN: restored without a word, the next step "diverged", and the error named
  # this step as the good one to resume from and blamed the learning rate.
  state = _state()
  ck = checkpoint.Checkpointer(tmp_path, checkpoint.CheckpointConfig(period=1, keep=None))
  ck.save(1, state, {"step": 1})
  ck.save(2, {**state, "params": {"w": state["params"]["w"].at[3, 5].set(jnp.nan)}}, {"step": 2})
  ck.wait()
  with pytest.raises(checkpoint.CheckpointError, match=r"2 holds non-finite values in params/w: it is damaged.*"
                     r"resume from step 1"):
    ck.restore(checkpoint.abstract_like(state))
  restored, _ = ck.restore(checkpoint.abstract_like(state), step=1)
  # Evaluation reads the parameters alone: they were evaluated as they were, a NaN eval loss for the step.
  with pytest.raises(checkpoint.CheckpointError, match=r"2 holds non-finite values in params/w: it is damaged.*"
                     r"CHECKPOINT_STEP=1 evaluates the step before it"):
    ck.restore_params(checkpoint.abstract_like(state)["params"])
  ck.close()
  np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
  assert (tmp_path / "checkpoints" / "2").exists()


@pytest.mark.parametrize("step", ["2", 2.0])
def test_a_step_that_is_no_int_is_named_not_called_missing_or_corrupt(tmp_path, step):
  # CHECKPOINT_STEP='2' said 'No checkpoint of step 2 ... it holds steps [1, 2]'; 2.0 blamed a corrupt checkpoint.
  state = _state()
  ck = _saved_steps(tmp_path, state, state)
  with pytest.raises(checkpoint.CheckpointError, match=r"step .*2.* is not a whole number.*\[1, 2\] as an int"):
    ck.restore_params(checkpoint.abstract_like(state)["params"], step=step)
  ck.close()


@pytest.mark.parametrize("meta", ["{}", "null"])
def test_a_checkpoint_whose_metadata_is_not_the_saved_record_is_damaged_not_a_traceback(tmp_path, meta):
  # Valid JSON of another shape in meta/metadata: a KeyError('step') or TypeError traceback from the trainer.
  state = _state()
  _saved_steps(tmp_path, state, state).close()
  (tmp_path / "checkpoints" / "2" / "meta" / "metadata").write_text(meta)
  ck = checkpoint.Checkpointer(tmp_path)
  with pytest.raises(checkpoint.CheckpointError, match=r"checkpoints/2 could not be restored.*resume from step 1"):
    ck.restore(checkpoint.abstract_like(state))
  ck.close()


def test_a_checkpoint_without_its_state_metadata_is_damaged_not_another_model(tmp_path):
  # An optimizer state holds tuples: without state/_METADATA Orbax guesses lists and reports a 'pytree structure
  # error', which must not be read as a configuration change (that message hides the step to resume from).
  state = dict(_state(), opt_state=(jnp.zeros(8), jnp.ones(8)))
  ck = checkpoint.Checkpointer(tmp_path, checkpoint.CheckpointConfig(period=1, keep=None))
  ck.save(1, state, {"step": 1})
  ck.save(2, state, {"step": 2})
  ck.close()
  (tmp_path / "checkpoints" / "2" / "state" / "_METADATA").unlink()  # e.g. an interrupted copy of MODEL_DIR
  ck = checkpoint.Checkpointer(tmp_path)
  with pytest.raises(checkpoint.CheckpointError, match="resume from step 1") as e:
    ck.restore(checkpoint.abstract_like(state))
  assert "different model" not in str(e.value)
  ck.close()


@pytest.mark.parametrize("params,names", [
    ({"w": jnp.zeros((4, 8))}, "params/w has shape (8, 8) in the checkpoint, (4, 8) configured"),
    ({"w": jnp.zeros((8, 8)), "b": jnp.zeros(8)}, "params/b is missing from the checkpoint"),
    ({}, "params/w is in the checkpoint but not in the configured state")])
def test_another_model_is_named_leaf_by_leaf_not_called_corrupt(tmp_path, params, names):
  ck = checkpoint.Checkpointer(tmp_path, checkpoint.CheckpointConfig(period=1, keep=None))
  ck.save(1, _state(), {"step": 1})
  ck.close()
  ck = checkpoint.Checkpointer(tmp_path)
  with pytest.raises(checkpoint.CheckpointError, match="holds a different model or optimizer state") as e:
    ck.restore(checkpoint.abstract_like({"step": jnp.asarray(7, jnp.int32), "params": params}))
  assert names in str(e.value) and "corrupt" not in str(e.value)
  assert (tmp_path / "checkpoints" / "1").exists()
  ck.close()


def test_a_relative_model_dir_is_checked_against_the_configured_model_as_an_absolute_one(tmp_path, monkeypatch):
  # Orbax reads the metadata of a relative directory as missing: the comparison was skipped, so `repeat-lm eval` with
  # MODEL_DIR='run' scored a smaller model on the checkpoint's first layers (a partial restore), and a resume with a
  # changed model was called a corrupt checkpoint to move aside.
  state = dict(_state(), params={"w": _state()["params"]["w"], "b": jnp.zeros(8)})
  _saved_steps(tmp_path / "run", state).close()
  monkeypatch.chdir(tmp_path)
  for model_dir in ("run", tmp_path / "run"):
    ck = checkpoint.Checkpointer(model_dir)
    with pytest.raises(checkpoint.CheckpointError, match="params/b is in the checkpoint but not in the configured"):
      ck.restore_params(checkpoint.abstract_like({"w": state["params"]["w"]}))
    with pytest.raises(checkpoint.CheckpointError, match="holds a different model") as e:
      ck.restore(checkpoint.abstract_like(dict(state, params={"w": jnp.zeros((4, 8)), "b": jnp.zeros(8)})))
    assert "params/w has shape (8, 8) in the checkpoint, (4, 8) configured" in str(e.value)
    assert "corrupt" not in str(e.value)
    ck.close()


def test_only_metadata_orbax_cannot_read_is_unknown(tmp_path, monkeypatch):
  # Missing or damaged metadata fails the restore too, which says so; metadata of a form this code does not expect
  # read as 'unknown' (None) skipped the comparison, and a partial restore then read a subset without complaint.
  _saved_steps(tmp_path, _state(), _state()).close()
  state_dir = tmp_path / "checkpoints" / "1" / "state"
  assert checkpoint.stored_shapes(state_dir) == {"params/w": (8, 8), "step": ()}
  (state_dir / "_METADATA").write_text("garbage")
  assert checkpoint.stored_shapes(state_dir) is None
  (state_dir / "_METADATA").unlink()
  assert checkpoint.stored_shapes(state_dir) is None
  monkeypatch.setattr(ocp.StandardCheckpointHandler, "metadata", lambda self, directory: object())
  with pytest.raises(AttributeError):
    checkpoint.stored_shapes(tmp_path / "checkpoints" / "2" / "state")


@pytest.mark.parametrize("params_only", [False, True], ids=["restore", "restore_params"])
def test_a_failed_read_leaves_no_read_running_and_is_told_in_one_line(tmp_path, failing_reads, params_only):
  # Orbax closed the restore's event loop as soon as one read failed: the others printed 'RuntimeError: Event loop is
  # closed' and 'Exception ignored in: <coroutine object _read_array_index_and_device_put>' tracebacks after the
  # message, which itself held Orbax's TensorStore spec (60 lines).
  state = _state()
  ck = _saved_steps(tmp_path, state, state)
  failing_reads.unsettle()
  with pytest.raises(checkpoint.CheckpointError, match="checkpoints/2 could not be restored") as e:
    if params_only:
      ck.restore_params(checkpoint.abstract_like(state["params"]))
    else:
      ck.restore(checkpoint.abstract_like(state))
  message = str(e.value)
  assert '(ValueError: OUT_OF_RANGE: Error reading "params.w/0.0" in OCDBT database)' in message
  assert "TensorStore" not in message and "\n" not in message
  del e
  failing_reads.assert_none_left()
  ck.close()


def test_an_optimizer_state_of_another_layout_is_not_blamed_on_the_configuration(tmp_path):
  # A >= 128-expert Switch run saved before Adafactor stopped factoring its router: the same configuration gives
  # another optimizer state, so "use the configuration it was written with" pointed at the one already in use.
  state = dict(_state(), opt_state={"v_row": jnp.zeros(8), "v": jnp.zeros(1)})
  ck = checkpoint.Checkpointer(tmp_path, checkpoint.CheckpointConfig(period=1, keep=None))
  ck.save(1, state, {"step": 1})
  ck.close()
  ck = checkpoint.Checkpointer(tmp_path)
  with pytest.raises(checkpoint.CheckpointError, match="only the optimizer state differs") as e:
    ck.restore(checkpoint.abstract_like(dict(state, opt_state={"v_row": jnp.zeros(1), "v": jnp.zeros((8, 8))})))
  assert f"INITIAL_CHECKPOINT_PATH = '{tmp_path}'" in str(e.value) and "Use the configuration" not in str(e.value)
  with pytest.raises(checkpoint.CheckpointError, match="Use the configuration it was written with") as e:
    ck.restore(checkpoint.abstract_like(dict(state, params={"w": jnp.zeros((4, 8))})))
  assert "only the optimizer state" not in str(e.value)
  ck.close()


def test_params_of_a_smaller_model_are_not_read_from_a_larger_checkpoint(tmp_path):
  # `repeat-lm eval` restores only the parameters (a partial restore): a model configured with fewer layers than
  # the checkpoint's must be refused, not evaluated on the subset of the parameters it names.
  state = dict(_state(), params={"w": _state()["params"]["w"], "b": jnp.zeros(8)})
  ck = checkpoint.Checkpointer(tmp_path, checkpoint.CheckpointConfig(period=1, keep=None))
  ck.save(1, dict(state, opt_state=jnp.zeros(3)), {"step": 1})
  ck.close()
  ck = checkpoint.Checkpointer(tmp_path)
  with pytest.raises(checkpoint.CheckpointError, match="params/b is in the checkpoint but not in the configured"):
    ck.restore_params(checkpoint.abstract_like({"w": state["params"]["w"]}))
  params, _ = ck.restore_params(checkpoint.abstract_like(state["params"]))  # the optimizer state is not compared
  np.testing.assert_array_equal(params["w"], state["params"]["w"])
  ck.close()


def test_params_of_an_earlier_step_are_that_steps(tmp_path):
  # `repeat-lm eval` with CHECKPOINT_STEP: the parameters must be the chosen step's, not the latest's in its place
  # (every other restore here reads steps whose values are all the same).
  state = _state()
  ck = _saved_steps(tmp_path, state, dict(state, params={"w": state["params"]["w"] + 1.0}))
  abstract = checkpoint.abstract_like(state["params"])
  for step, offset in ((1, 0.0), (2, 1.0), (None, 1.0)):
    params, restored_step = ck.restore_params(abstract, step=step)
    assert restored_step == (step or 2)
    np.testing.assert_array_equal(params["w"], state["params"]["w"] + offset)
  ck.close()


@pytest.mark.parametrize("kwargs,match", [({"period": 0}, "period=0: save every N >= 1"),
                                          ({"period": "10"}, "period='10': save every N >= 1 steps, a whole number"),
                                          ({"keep": 0}, "keep=0 would delete every checkpoint"),
                                          ({"keep": 2.5}, "keep=2.5: keep the newest N checkpoints, a whole number"),
                                          # a gin string, truthy: it saved asynchronously
                                          ({"async_save": "False"}, "True or False .no quotes.: {'async_save'")])
def test_config_rejects_settings_that_never_save_or_keep_nothing(kwargs, match):
  with pytest.raises(ValueError, match=match):
    checkpoint.CheckpointConfig(**kwargs)


def test_a_save_whose_directory_cannot_be_made_fails_at_once_and_keeps_the_last_good_one(tmp_path, monkeypatch):
  # A checkpoints directory turned read-only (or a full disk): the error must come from this save, not a period later,
  # and no background writer may be left waiting for the directory (the process lingered 300 s after the error).
  state = _state()
  ck = checkpoint.Checkpointer(tmp_path, checkpoint.CheckpointConfig(period=1, keep=1))
  ck.save(1, state, {"step": 1})
  ck.wait()
  real_mkdir = os.mkdir

  def read_only(path, *args, **kwargs):
    if os.path.basename(os.fspath(path)).startswith("2."):
      raise PermissionError(13, "Permission denied", os.fspath(path))
    return real_mkdir(path, *args, **kwargs)
  monkeypatch.setattr(os, "mkdir", read_only)
  before = set(threading.enumerate())
  with pytest.raises(checkpoint.CheckpointError, match=r"Saving checkpoint 2 under .* failed \(PermissionError: .*"
                     r"Permission denied.*\)\. The checkpoints up to step 1 are intact"):
    ck.save(2, state, {"step": 2})
  monkeypatch.undo()
  # (An event loop's idle executor worker, 'asyncio_N', ends with its loop.)
  left = [t.name for t in threading.enumerate()
          if t not in before and t.is_alive() and not t.name.startswith("asyncio_")]
  assert not left
  ck.close()
  ck = checkpoint.Checkpointer(tmp_path, checkpoint.CheckpointConfig(period=1, keep=1))
  assert ck.all_steps() == [1]  # keep=1: the only good checkpoint was not collected for the failed one
  restored, meta = ck.restore(checkpoint.abstract_like(state))
  ck.close()
  assert meta["step"] == 1
  np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])


def test_a_background_write_that_fails_names_its_step_and_what_is_kept(tmp_path, monkeypatch):
  # A full disk during an asynchronous save: a raw TensorStore error after ~1,400 lines of Orbax and asyncio
  # tracebacks, with no word that the earlier checkpoints were intact and a rerun resumes from them.
  state = _state()
  ck = checkpoint.Checkpointer(tmp_path, checkpoint.CheckpointConfig(period=1, keep=None))
  ck.save(1, state, {"step": 1})
  ck.wait()
  ck.save(2, state, {"step": 2})
  full = ValueError("RESOURCE_EXHAUSTED: Error writing local file: No space left on device [os_error_code='28']")
  monkeypatch.setattr(ck._manager, "wait_until_finished", lambda: (_ for _ in ()).throw(full))  # noqa: SLF001
  with pytest.raises(checkpoint.CheckpointError, match=r"Saving checkpoint 2 under .* failed \(ValueError: "
                     r"RESOURCE_EXHAUSTED: .*No space left on device.*\)\. The checkpoints up to step 1 are intact: "
                     r"free space .* resume from step 1\."):
    ck.close()
  monkeypatch.undo()
  ck.close()


@pytest.mark.parametrize("keep", [None, 1])
def test_a_real_failed_background_write_is_one_error_and_one_log_line_each(tmp_path, monkeypatch, capsys, keep):
  # Orbax's own failure path: one array write fails at once (a full disk), the others are still being written. It
  # printed 'Event loop is closed' tracebacks from the writes left running, and logged each failure with its traceback.
  # keep=1: Orbax had already dropped step 1 (due for deletion) from its list, and the error said no earlier
  # checkpoint was written while step 1 was intact.
  import asyncio
  import logging
  from orbax.checkpoint._src.serialization import serialization  # pylint: disable=protected-access
  state = {"step": jnp.asarray(1, jnp.int32), "params": {f"w{i}": _state()["params"]["w"] + i for i in range(6)}}
  ck = checkpoint.Checkpointer(tmp_path, checkpoint.CheckpointConfig(period=1, keep=keep))
  ck.save(1, state, {"step": 1})
  ck.wait()
  real_write, calls = serialization.async_serialize_from_host, []

  async def write(*args, **kwargs):
    calls.append(1)
    if len(calls) == 1:
      raise ValueError("RESOURCE_EXHAUSTED: Error writing local file: No space left on device")
    await asyncio.sleep(0.2)
    return await real_write(*args, **kwargs)
  monkeypatch.setattr(serialization, "async_serialize_from_host", write)
  handler = logging.StreamHandler()  # what the command line's logging prints
  logging.getLogger().addHandler(handler)
  try:
    with pytest.raises(checkpoint.CheckpointError, match=r"Saving checkpoint 2 under .* failed \(ValueError: "
                       r"RESOURCE_EXHAUSTED.*\)\. The checkpoints up to step 1 are intact"):
      ck.save(2, state, {"step": 2})
      ck.close()
  finally:
    logging.getLogger().removeHandler(handler)
  err = capsys.readouterr().err
  assert len(calls) > 1 and "Traceback" not in err and "Event loop is closed" not in err, err
  monkeypatch.undo()
  ck = checkpoint.Checkpointer(tmp_path)
  assert ck.all_steps() == [1]
  ck.close()


def test_a_checkpoint_is_due_every_period_steps(tmp_path):
  ck = checkpoint.Checkpointer(tmp_path, checkpoint.CheckpointConfig(period=3))
  assert [s for s in range(1, 10) if ck.should_save(s)] == [3, 6, 9]
  ck.close()


def test_saving_a_saved_step_again_keeps_the_first(tmp_path):
  # The last step (or SIGTERM's) can also be a period's: its second save is no error and does not replace the first.
  state = _state()
  ck = checkpoint.Checkpointer(tmp_path, checkpoint.CheckpointConfig(period=1))
  ck.save(1, state, {"step": 1})
  ck.save(1, dict(state, params={"w": state["params"]["w"] + 1.0}), {"step": 1, "again": True})
  ck.wait()
  restored, meta = ck.restore(checkpoint.abstract_like(state))
  ck.close()
  assert meta == {"step": 1}
  np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])


def test_a_long_mismatch_says_how_many_differences_it_leaves_out():
  stored = {f"params/w{i}": (2,) for i in range(4)}
  message = checkpoint.stored_state_mismatch(stored, {"params": {}})
  assert message.count("is in the checkpoint but not in the configured state") == 3
  assert message.endswith(" (and 1 more)")


def test_a_tensorstore_error_is_told_without_its_spec():
  # A step missing its manifest: a one-line error of ~2,400 characters, TensorStore's whole spec pasted in.
  e = ValueError("NOT_FOUND: Error opening \"ocdbt\" driver: Manifest not found at /run/checkpoints/6/state/ "
                 "[tensorstore_spec='{\"base\":{\"driver\":\"file\",\"path\":\"/run\"}," + "x" * 2000 + "}']")
  assert checkpoint.brief_error(e) == ("ValueError: NOT_FOUND: Error opening \"ocdbt\" driver: Manifest not found at "
                                       "/run/checkpoints/6/state/")
