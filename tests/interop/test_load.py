"""INITIAL_CHECKPOINT_PATH's loader: any checkpoint kind, into any layout, onto the mesh, with clear errors."""

import dataclasses
import json
import logging
import shutil

import jax
import numpy as np
import pytest

from interop_helpers import TINY, TINY_SWITCH, init_params, random_params, write_model_dir
from repeat_lm.interop import hf, hf_switch, layout, load
from repeat_lm.models import t5
from repeat_lm.train import partitioning


def sharded_abstract(config, partitioner):
  module = t5.Transformer(config)
  tokens = np.ones((8, 8), np.int32)
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), tokens, tokens, tokens, enable_dropout=False))
  shardings = partitioner.tree_shardings(partitioning.params_logical_axes(variables["params_axes"]))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), variables["params"],
                      shardings)


@pytest.mark.parametrize("scan", [False, True], ids=["same-layout", "into-scanned"])
def test_repeat_lm_model_dir_onto_the_mesh(tiny_model_dir, scan):
  config = dataclasses.replace(TINY, scan_layers=scan)
  abstract = sharded_abstract(config, partitioning.Partitioner(4, 2))
  assert load.checkpoint_kind(tiny_model_dir) == "repeat_lm"
  params = load.load_params(tiny_model_dir, abstract, config=config)
  jax.tree.map(lambda p, a: (p.shape == a.shape and p.sharding == a.sharding) or pytest.fail(str(a)), params, abstract)
  expected = layout.from_per_layer(layout.flatten(jax.tree.map(np.asarray, init_params(TINY))),
                                   layout.layouts_for(config))
  for path, value in layout.flatten(params).items():
    np.testing.assert_array_equal(np.asarray(value), expected[path], err_msg=path)


@pytest.mark.usefixtures("hf_libraries")
def test_hf_architecture_mismatch_is_named(tmp_path):
  hf.export_hf(init_params(TINY), TINY, tmp_path)
  relu = dataclasses.replace(TINY, mlp_activations=("relu",))
  with pytest.raises(ValueError, match=r"mlp_activations: checkpoint \('gelu', 'linear'\) vs model \('relu',\)"):
    load.load_for_module(tmp_path, t5.Transformer(relu))


@pytest.mark.usefixtures("hf_libraries")
def test_a_step_is_refused_for_a_hugging_face_directory(tmp_path):
  """Its weights are whichever step was exported: --step cannot be honoured, so it is not silently ignored."""
  hf.export_hf(random_params(TINY), TINY, tmp_path)
  with pytest.raises(ValueError, match="Hugging Face directory, which holds one set of weights.*step \\(3\\)"):
    load.load_for_module(tmp_path, t5.Transformer(TINY), step=3)


def test_unknown_directory_is_refused(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a checkpoint repeat_lm can read"):
    load.checkpoint_kind(tmp_path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load.checkpoint_kind(tmp_path / "nowhere")
  # A run that has not saved yet is a MODEL_DIR, and was called "not a checkpoint repeat_lm can read".
  (tmp_path / "config.gin").write_text("")
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(FileNotFoundError, match="is a repeat_lm MODEL_DIR with no checkpoint saved yet"):
    load.checkpoint_kind(tmp_path)
  # A step directory without state/ (a damaged copy) was called "nothing in checkpoints: train it until its first
  # save".
  (tmp_path / "checkpoints" / "5").mkdir()
  (tmp_path / "checkpoints" / "5" / "junk").write_text("x")
  with pytest.raises(FileNotFoundError, match=r"holds no complete checkpoint: the step directories \['5'\] in .*"
                     r"have no state/ .*Copy the checkpoint again"):
    load.checkpoint_kind(tmp_path)


@pytest.mark.parametrize("scan", [False, True], ids=["same-layout", "into-scanned"])
def test_a_relative_model_dir_loads(tiny_model_dir, scan, monkeypatch):
  """`repeat-lm infer --checkpoint=run` and INITIAL_CHECKPOINT_PATH=run: Orbax sees nothing under a relative path."""
  monkeypatch.chdir(tiny_model_dir.parent)
  config = dataclasses.replace(TINY, scan_layers=scan)
  params = load.load_for_module(tiny_model_dir.name, t5.Transformer(config))
  expected = layout.from_per_layer(layout.flatten(jax.tree.map(np.asarray, init_params(TINY))),
                                   layout.layouts_for(config))
  for path, value in layout.flatten(params).items():
    np.testing.assert_array_equal(np.asarray(value), expected[path], err_msg=path)


def test_a_healthy_checkpoint_loads_without_warnings(tiny_model_dir, caplog):
  """Every load warned "Metadata file does not exist: .../state/_CHECKPOINT_METADATA", which reads as damage."""
  with caplog.at_level(logging.WARNING):
    load.load_for_module(tiny_model_dir, t5.Transformer(TINY))
  assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_corrupt_step_names_the_step_before_it(tiny_model_dir, tmp_path):
  """infer / export: damaged array files are named, with the step that can be read."""
  run = tmp_path / "run"
  shutil.copytree(tiny_model_dir, run)
  steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
  older = run / "checkpoints" / str(steps[-1] + 1)
  shutil.copytree(run / "checkpoints" / str(steps[-1]), older)  # a later step, then damaged
  for f in (older / "state").rglob("*"):
    if f.is_file() and "METADATA" not in f.name:
      f.write_bytes(b"garbage")
  with pytest.raises(ValueError, match=rf"could not be read .*corrupt or truncated.*--step={steps[-1]} reads"):
    load.load_for_module(run, t5.Transformer(TINY))
  load.load_for_module(run, t5.Transformer(TINY), step=steps[-1])


def test_a_step_holding_non_finite_values_is_damaged_not_loaded(tiny_model_dir, tmp_path):
  """Bytes damaged on disk that read back as NaN: a finetune from the step "diverged" at its first step and was told
  to lower its learning rate; infer and export read (and wrote) the NaN weights without a word."""
  from repeat_lm.train import checkpoint, optim
  run = tmp_path / "run"
  shutil.copytree(tiny_model_dir, run)
  steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
  params = init_params(TINY)
  leaves, tree = jax.tree.flatten(params)
  params = jax.tree.unflatten(tree, [leaves[0].at[(0,) * leaves[0].ndim].set(np.nan), *leaves[1:]])
  damaged = steps[-1] + 1
  ck = checkpoint.Checkpointer(run, checkpoint.CheckpointConfig(async_save=False, keep=None))
  ck.save(damaged, {"step": np.int32(damaged), "params": params, "opt_state": optim.make_optimizer().init(params)},
          {"step": damaged})
  ck.close()
  abstract = sharded_abstract(TINY, partitioning.Partitioner(4, 2))
  with pytest.raises(ValueError, match=rf"checkpoints/{damaged} could not be read \(it holds non-finite values in "
                     rf".*it is damaged.*INITIAL_CHECKPOINT_PATH='{run / 'checkpoints' / str(steps[-1])}' reads"):
    load.load_params(run, abstract, config=TINY)  # as trainer.train, same layout
  with pytest.raises(ValueError, match=r"holds non-finite values.*--step=\d+ reads the step before it"):
    load.load_for_module(run, t5.Transformer(dataclasses.replace(TINY, scan_layers=True)))  # infer, another layout
  load.load_params(run, abstract, config=TINY, step=steps[-1])


def test_a_damaged_step_for_initial_checkpoint_path_is_told_in_one_line_naming_that_setting(tiny_model_dir, tmp_path,
                                                                                            failing_reads):
  """`repeat-lm finetune` from a MODEL_DIR whose newest step is damaged: the message held Orbax's TensorStore spec,
  advised --step (which finetune does not have) and was followed by ~23 'Exception ignored in: <coroutine object
  _read_array_index_and_device_put>' tracebacks (1,500 lines) from the reads left running."""
  run = tmp_path / "run"
  shutil.copytree(tiny_model_dir, run)
  steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
  shutil.copytree(run / "checkpoints" / str(steps[-1]), run / "checkpoints" / str(steps[-1] + 1))
  with pytest.raises(ValueError, match=rf"checkpoints/{steps[-1] + 1} could not be read") as e:
    load.load_params(run, sharded_abstract(TINY, partitioning.Partitioner(4, 2)), config=TINY)  # as trainer.train
  message = str(e.value)
  assert f"INITIAL_CHECKPOINT_PATH='{run / 'checkpoints' / str(steps[-1])}' reads the step before it" in message
  assert '(ValueError: OUT_OF_RANGE: Error reading "params.w/0.0" in OCDBT database)' in message
  assert "--step" not in message and "TensorStore" not in message and "\n" not in message
  del e
  failing_reads.assert_none_left()


SHARED = dataclasses.replace(TINY, num_encoder_layers=4, num_decoder_layers=4, param_share=2)
SHARED_SWITCH = dataclasses.replace(TINY_SWITCH, param_share=4)  # one group of two dense/sparse blocks per stack


@pytest.mark.parametrize("config", [SHARED, SHARED_SWITCH], ids=["dense", "moe"])
@pytest.mark.parametrize("saved_scanned", [False, True], ids=["unscanned-into-scanned", "scanned-into-unscanned"])
def test_a_shared_model_loads_into_the_other_scan_layout(tmp_path, config, saved_scanned):
  """Sharing is invisible in a checkpoint's paths: its groups used to be read as distinct layers, so the same
  param_share model with the other scan setting refused them ('share parameters ... different weights')."""
  saved = dataclasses.replace(config, scan_layers=saved_scanned)
  target = dataclasses.replace(config, scan_layers=not saved_scanned)
  params = random_params(saved)
  write_model_dir(tmp_path / "run", saved, params)
  loaded = load.load_for_module(tmp_path / "run", t5.Transformer(target))
  per_layer = layout.to_per_layer(layout.flatten(params), layout.layouts_for(saved))
  expected = layout.from_per_layer(per_layer, layout.layouts_for(target))
  assert set(layout.flatten(loaded)) == set(expected)
  for path, value in layout.flatten(loaded).items():
    np.testing.assert_array_equal(np.asarray(value), expected[path], err_msg=path)


@pytest.mark.parametrize("config,saved_scanned", [(SHARED, False), (SHARED_SWITCH, True)],
                         ids=["dense-unscanned", "moe-scanned"])
def test_a_shared_model_loads_into_the_unshared_model_of_its_depth(tmp_path, config, saved_scanned):
  """Layer i of the unshared model takes the parameters its group used (as the shared model's export to Hugging Face
  copies them): the checkpoint's one set per group was read as that many distinct layers, half of them missing."""
  saved = dataclasses.replace(config, scan_layers=saved_scanned)
  target = dataclasses.replace(config, param_share="none")
  params = random_params(saved)
  write_model_dir(tmp_path / "run", saved, params)
  loaded = layout.flatten(load.load_for_module(tmp_path / "run", t5.Transformer(target)))
  expected = layout.to_per_layer(layout.flatten(params), layout.layouts_for(saved))
  assert set(loaded) == set(expected)
  for path, value in loaded.items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(expected[path]), err_msg=path)


def test_a_step_dir_is_not_read_for_another_step(tiny_model_dir):
  """Like T5X's checkpoint_<step>: a step asked for is that step's parameters or an error, never another step's."""
  step_dir = next(p for p in (tiny_model_dir / "checkpoints").iterdir() if p.name.isdigit())
  with pytest.raises(FileNotFoundError, match=rf"checkpoint of step {step_dir.name}, not of step 12345"):
    load.load_for_module(step_dir, t5.Transformer(TINY), step=12345)
  load.load_for_module(step_dir, t5.Transformer(TINY), step=int(step_dir.name))


@pytest.mark.parametrize("as_given", [str, float])
def test_a_step_that_is_no_whole_number_is_named(tiny_model_dir, as_given):
  # The Checkpointer refused these; load_params (restore_params, infer and export's loader) reported step '5' as
  # missing beside 'available: [5]', and 5.0 as a corrupt checkpoints/5.0.
  step = int(next(p for p in (tiny_model_dir / "checkpoints").iterdir() if p.name.isdigit()).name)
  with pytest.raises(ValueError, match=f"Checkpoint step {as_given(step)!r} is not a whole number"):
    load.load_for_module(tiny_model_dir, t5.Transformer(TINY), step=as_given(step))


@pytest.mark.parametrize("saved,target,kind", [(TINY, SHARED, "repeat_lm"), (SHARED, TINY, "repeat_lm"),
                                               (TINY, SHARED, "hf")], ids=["into-shared", "from-shared", "hf"])
def test_a_checkpoint_of_another_depth_is_refused_where_sharing_hides_it(tmp_path, saved, target, kind, request):
  """2 distinct layers and 4 layers with param_share=2 have the same parameter tree: either loaded silently into the
  other model (2 layers run as 4, or 4 as 2; other logits)."""
  params = random_params(saved)
  path = tmp_path / kind
  if kind == "hf":
    request.getfixturevalue("hf_libraries")
    hf.export_hf(params, saved, path)
  else:
    write_model_dir(path, saved, params)
  with pytest.raises(ValueError, match=rf"another depth.*checkpoint encoder {saved.num_encoder_layers} layers "
                                       rf".*vs model {target.num_encoder_layers}"):
    load.load_for_module(path, t5.Transformer(target))


def test_a_shared_model_built_in_python_loads_into_itself(tmp_path):
  """trainer.train with a model built in Python writes an empty config.gin: T5Config's defaults (12 layers, no
  sharing) are no record of its depth, and were compared with the very model that wrote the checkpoint."""
  params = random_params(SHARED)
  write_model_dir(tmp_path / "run", SHARED, params)
  (tmp_path / "run" / "config.gin").write_text("")
  loaded = load.load_params(tmp_path / "run", init_params(SHARED), config=SHARED)
  for path, value in layout.flatten(loaded).items():
    np.testing.assert_array_equal(np.asarray(value), layout.flatten(params)[path], err_msg=path)


def _hf_config_only(path, config_json):
  path.mkdir()
  (path / "config.json").write_text(json.dumps(config_json))
  return path


@pytest.mark.usefixtures("hf_libraries")
def test_hf_settings_that_shapes_do_not_show_are_checked(tmp_path):
  """Relative-position distance and the experts' activation leave every parameter shape as it is: a checkpoint of
  another one loads silently and computes other logits unless config.json is compared."""
  path = _hf_config_only(tmp_path / "dense", hf.hf_config_dict(TINY))
  with pytest.raises(ValueError, match=r"relative_attention_max_distance: checkpoint 128 vs model 20"):
    load._check_hf_config(path, dataclasses.replace(TINY, relative_attention_max_distance=20))  # noqa: SLF001
  with pytest.raises(ValueError, match=r"layer_norm_epsilon: checkpoint 1e-06 vs model 1e-05"):
    load._check_hf_config(path, dataclasses.replace(TINY, layer_norm_epsilon=1e-5))  # noqa: SLF001
  path = _hf_config_only(tmp_path / "switch", hf_switch.switch_config_dict(TINY_SWITCH))
  gelu_experts = dataclasses.replace(TINY_SWITCH,
                                     moe=dataclasses.replace(TINY_SWITCH.moe, expert_activations=("gelu",)))
  with pytest.raises(ValueError, match=r"moe.expert_activations: checkpoint \('relu',\) vs model \('gelu',\)"):
    load._check_hf_config(path, gelu_experts)  # noqa: SLF001


def test_a_step_dirs_state_dir_is_that_step(tiny_model_dir):
  # checkpoints/<step>/state holds the Orbax checkpoint; it was taken for a T5X checkpoint and refused ("no 'target'").
  state = next(p for p in (tiny_model_dir / "checkpoints").iterdir() if p.name.isdigit()) / "state"
  assert load.checkpoint_kind(state) == "repeat_lm"
  params = load.load_for_module(state, t5.Transformer(TINY))
  expected = jax.tree.map(np.asarray, init_params(TINY))
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params), expected)


def test_a_config_json_beside_a_model_dirs_checkpoints_is_not_the_model(tmp_path):
  (tmp_path / "checkpoints" / "5" / "state").mkdir(parents=True)
  (tmp_path / "config.json").write_text("{}")  # some other tool's file
  assert load.checkpoint_kind(tmp_path) == "repeat_lm"


def test_saved_depths_read_scoped_bindings_and_give_up_on_conflicting_ones(tmp_path):
  """The operative config.gin of a MODEL_DIR binds the model's settings in gin scopes (MODEL/t5.T5Config...)."""
  step_dir = tmp_path / "checkpoints" / "5"
  step_dir.mkdir(parents=True)
  (tmp_path / "config.gin").write_text("MODEL/t5.T5Config.num_encoder_layers = 4\n"
                                       "MODEL/t5.T5Config.num_decoder_layers = 4\nMODEL/t5.T5Config.param_share = 2\n")
  assert load._depths(load._saved_settings(step_dir)) == {"encoder": (4, 2), "decoder": (4, 2)}  # noqa: SLF001
  (tmp_path / "config.gin").write_text("a/t5.T5Config.num_encoder_layers = 2\nb/t5.T5Config.num_encoder_layers = 4\n")
  # Which scope built the model is not known here.
  assert load._depths(load._saved_settings(step_dir)) is None  # noqa: SLF001


def test_settings_the_shapes_do_not_show_are_compared_with_the_model_dirs_config(tiny_model_dir, tmp_path):
  # A resume, evaluation or INITIAL_CHECKPOINT_PATH read ('gelu', 'linear') MLP weights as ('relu', 'linear') ones
  # (or under another position bias or norm epsilon) without a word: the same shapes, another function.
  other = dataclasses.replace(TINY, mlp_activations=("relu", "linear"), layer_norm_epsilon=1e-5)
  with pytest.raises(ValueError, match=r"written by a model with other settings, which its parameter shapes do not "
                     r"show: mlp_activations: checkpoint \('gelu', 'linear'\) vs model \('relu', 'linear'\); "
                     r"layer_norm_epsilon: .*Set them in the model gin as .*config.gin has them"):
    load.load_params(tiny_model_dir, sharded_abstract(TINY, partitioning.Partitioner(4, 2)), config=other)
  step_dir = tmp_path / "checkpoints" / "5"
  step_dir.mkdir(parents=True)
  # A value through a macro, or bound differently in two scopes, is not known here: not compared (nor refused).
  (tmp_path / "config.gin").write_text("MODEL/t5.T5Config.mlp_activations = %ACTS\n"
                                       "a/t5.T5Config.layer_norm_epsilon = 1e-6\n"
                                       "b/t5.T5Config.layer_norm_epsilon = 1e-5\n"
                                       "t5.T5Config.relative_attention_num_buckets = 32\n")
  load.check_model_dir_config(step_dir, other)
  with pytest.raises(ValueError, match=r"relative_attention_num_buckets: checkpoint 32 vs model 16"):
    load.check_model_dir_config(step_dir, dataclasses.replace(other, relative_attention_num_buckets=16))
