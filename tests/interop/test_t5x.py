"""Reading T5X checkpoints of the T5 v1.1 network and of flaxformer's MoE encoder-decoder (synthetic ones, written in
T5X's layout and naming)."""

import dataclasses
import re
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import serialization

from interop_helpers import TINY, init_params, logits, make_batch, random_params, sharpen_routers
from repeat_lm.interop import layout, load, t5x
from repeat_lm.models import moe, t5
from repeat_lm.train import partitioning

# T5X's names for layer 0 of t5x/examples/t5/network.py (2-D attention kernels; logits_dense inside the decoder).
T5X_LAYER0 = {
    "token_embedder/embedding", "encoder/relpos_bias/rel_embedding", "encoder/encoder_norm/scale",
    "encoder/layers_0/pre_attention_layer_norm/scale", "encoder/layers_0/attention/query/kernel",
    "encoder/layers_0/attention/key/kernel", "encoder/layers_0/attention/value/kernel",
    "encoder/layers_0/attention/out/kernel", "encoder/layers_0/pre_mlp_layer_norm/scale",
    "encoder/layers_0/mlp/wi_0/kernel", "encoder/layers_0/mlp/wi_1/kernel", "encoder/layers_0/mlp/wo/kernel",
    "decoder/relpos_bias/rel_embedding", "decoder/decoder_norm/scale", "decoder/logits_dense/kernel",
    "decoder/layers_0/pre_self_attention_layer_norm/scale", "decoder/layers_0/self_attention/query/kernel",
    "decoder/layers_0/self_attention/key/kernel", "decoder/layers_0/self_attention/value/kernel",
    "decoder/layers_0/self_attention/out/kernel", "decoder/layers_0/pre_cross_attention_layer_norm/scale",
    "decoder/layers_0/encoder_decoder_attention/query/kernel", "decoder/layers_0/encoder_decoder_attention/key/kernel",
    "decoder/layers_0/encoder_decoder_attention/value/kernel", "decoder/layers_0/encoder_decoder_attention/out/kernel",
    "decoder/layers_0/pre_mlp_layer_norm/scale", "decoder/layers_0/mlp/wi_0/kernel", "decoder/layers_0/mlp/wi_1/kernel",
    "decoder/layers_0/mlp/wo/kernel",
}


def t5x_target(params) -> dict:
  """A T5X 'target' tree for our parameters, written out by hand from T5X's module tree (not via t5x.RENAMES)."""
  flat = {k: np.asarray(v) for k, v in layout.flatten(params).items()}
  flat["decoder/logits_dense/kernel"] = flat.pop("logits_dense/kernel")
  return flat


@pytest.fixture(scope="module")
def t5x_model_dir(tmp_path_factory):
  """A T5X MODEL_DIR with one Orbax checkpoint: {'target': params, 'state': {'step', 'param_states'}}."""
  flat = t5x_target(init_params(TINY))
  assert {p for p in flat if "layers_1" not in p} == T5X_LAYER0
  target = layout.unflatten(flat)
  state = {"step": np.asarray(1000), "param_states": jax.tree.map(lambda x: {"v": np.zeros_like(x)}, target)}
  model_dir = tmp_path_factory.mktemp("t5x_run")
  ocp.PyTreeCheckpointer().save(str(model_dir / "checkpoint_1000"), {"target": target, "state": state})
  return model_dir


def test_reads_orbax_t5x_checkpoint(t5x_model_dir):
  assert load.checkpoint_kind(t5x_model_dir) == "t5x"
  params = t5x.load_t5x(t5x_model_dir)  # the MODEL_DIR: its latest checkpoint
  jax.tree.map(np.testing.assert_array_equal, params, jax.tree.map(np.asarray, init_params(TINY)))


def test_reads_a_relative_t5x_path(t5x_model_dir, monkeypatch):
  monkeypatch.chdir(t5x_model_dir.parent)
  params = t5x.load_t5x(t5x_model_dir.name)
  jax.tree.map(np.testing.assert_array_equal, params, jax.tree.map(np.asarray, init_params(TINY)))


def test_loads_onto_a_sharded_scanned_model(t5x_model_dir):
  config = dataclasses.replace(TINY, scan_layers=True)
  partitioner = partitioning.Partitioner(4, 2)
  module = t5.Transformer(config)
  tokens = np.ones((8, 8), np.int32)
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), tokens, tokens, tokens, enable_dropout=False))
  shardings = partitioner.tree_shardings(partitioning.params_logical_axes(variables["params_axes"]))
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), variables["params"],
                          shardings)
  params = load.load_params(t5x_model_dir / "checkpoint_1000", abstract, config=config)
  assert params["logits_dense"]["kernel"].sharding == shardings["logits_dense"]["kernel"]
  assert params["encoder"]["layers"]["mlp"]["wi_0"]["kernel"].shape == (32, 2, 64)
  batch = make_batch(TINY.vocab_size)
  np.testing.assert_allclose(logits(config, jax.device_get(params), batch), logits(TINY, init_params(TINY), batch),
                             atol=1e-5)


@pytest.mark.parametrize("kvstore", [{"driver": "file"}, {"driver": "gcs", "bucket": "t5-data"}])
def test_reads_legacy_msgpack_tensorstore_checkpoint(tmp_path, kvstore):
  """T5X before Orbax: a msgpack `checkpoint` whose large arrays are TensorStore specs relative to the directory.
  Written on GCS (Google's published checkpoints) they name the 'gcs' driver and a bucket; a local copy reads too."""
  ts = pytest.importorskip("tensorstore")
  flat = t5x_target(init_params(TINY))
  stored = {}
  for path, value in flat.items():
    if value.ndim < 2:
      stored[path] = value  # small arrays sit in the msgpack itself
      continue
    name = "target." + path.replace("/", ".")
    spec = {"driver": "zarr", "kvstore": {**kvstore, "path": name},
            "metadata": {"shape": list(value.shape), "chunks": list(value.shape), "dtype": "<f4"}}
    ts.open({**spec, "kvstore": {"driver": "file", "path": str(tmp_path / name)}}, create=True).result().write(
        value).result()
    stored[path] = spec
  tree = {"target": layout.unflatten(stored), "state": {"step": 7}}
  (tmp_path / "checkpoint").write_bytes(serialization.msgpack_serialize(tree))
  params = t5x.load_t5x(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, params, jax.tree.map(np.asarray, init_params(TINY)))


def test_a_step_of_a_t5x_model_dir_is_that_steps_parameters(t5x_model_dir, tmp_path):
  """infer / export --step on a T5X MODEL_DIR: that checkpoint_<step>, not the latest in its place."""
  shutil.copytree(t5x_model_dir / "checkpoint_1000", tmp_path / "checkpoint_1000")
  later = layout.unflatten(t5x_target(random_params(TINY, seed=1)))
  ocp.PyTreeCheckpointer().save(str(tmp_path / "checkpoint_2000"), {"target": later, "state": {"step": 2000}})
  wo = lambda params: np.asarray(params["encoder"]["layers_0"]["mlp"]["wo"]["kernel"])  # noqa: E731
  module = t5.Transformer(TINY)
  np.testing.assert_array_equal(wo(load.load_for_module(tmp_path, module, step=1000)), wo(init_params(TINY)))
  np.testing.assert_array_equal(wo(load.load_for_module(tmp_path, module)), wo(random_params(TINY, seed=1)))
  np.testing.assert_array_equal(wo(load.load_for_module(tmp_path / "checkpoint_1000", module, step=1000)),
                                wo(init_params(TINY)))
  with pytest.raises(FileNotFoundError, match=r"No T5X checkpoint of step 1500 .*steps here: \[1000, 2000\]"):
    load.load_for_module(tmp_path, module, step=1500)
  with pytest.raises(FileNotFoundError, match=r"step 2000 .*steps here: \[1000\]"):
    load.load_for_module(tmp_path / "checkpoint_1000", module, step=2000)


@pytest.mark.parametrize("damaged", ["d", "ocdbt.process_0/d"], ids=["metadata", "arrays"])
def test_a_damaged_orbax_checkpoint_is_called_corrupt_with_the_fix(t5x_model_dir, tmp_path, capfd, damaged):
  """A cut copy: its unreadable metadata was reported as "neither an Orbax checkpoint nor a T5X checkpoint", an
  unreadable array as TensorStore's bare OUT_OF_RANGE; neither said what was wrong nor what to do."""
  for step in (500, 1000):
    shutil.copytree(t5x_model_dir / "checkpoint_1000", tmp_path / f"checkpoint_{step}")
  for path in (tmp_path / "checkpoint_1000" / damaged).iterdir():
    path.write_bytes(path.read_bytes()[:10])
  match = (rf"T5X checkpoint .*checkpoint_1000 could not be read \(.*OUT_OF_RANGE.*\): it is corrupt or truncated.* "
           rf"Copy it again from its source, or read the checkpoint before it, "
           rf"{re.escape(str(tmp_path / 'checkpoint_500'))} \(steps here: \[500, 1000\]\)\.$")
  with pytest.raises(ValueError, match=match):
    load.load_for_module(tmp_path, t5.Transformer(TINY))
  assert "Traceback" not in capfd.readouterr().err  # no read left running past the error (settled_reads)


def test_wrong_architecture_is_a_clear_error(t5x_model_dir):
  bigger = dataclasses.replace(TINY, num_encoder_layers=3)
  with pytest.raises(ValueError, match=r"do not fit the model[\s\S]*missing \(\d+\): encoder/layers_2/"):
    load.load_for_module(t5x_model_dir, t5.Transformer(bigger))


# An MoE as flaxformer's moe.gin builds it (gated-GELU experts, MIXED layout: every second FFN sparse), with top-2
# routing and batch-prioritised routing in the encoder (tokens_choose gins); capacity no token overflows.
TINY_MOE = dataclasses.replace(TINY, num_encoder_layers=4, num_decoder_layers=4, moe=moe.MoeConfig(
    num_experts=4, expert_mlp_dim=48, expert_activations=("gelu", "linear"), num_selected_experts=2,
    batch_prioritized_routing=True, sparse_every=2, eval_capacity_factor=4.0, min_expert_capacity=64))
# flaxformer's names for sparse layer 1 (moe_layers.MoeLayer: routing.RouterWeights' DenseGeneral 'w', and one
# MlpBlock vmapped over the experts).
T5X_SPARSE_LAYER1 = {
    f"{stack}/layers_1/mlp/{name}" for stack in ("encoder", "decoder")
    for name in ("router/router_weights/w/kernel", "expert/wi_0/kernel", "expert/wi_1/kernel", "expert/wo/kernel")}


def t5x_moe_target(params) -> dict:
  """flaxformer's MoE names for our parameters, written out by hand (not via t5x.MOE_RENAMES)."""
  out = {}
  for path, value in t5x_target(params).items():
    head, _, tail = path.rpartition("/mlp/")
    if tail == "router":
      path = f"{head}/mlp/router/router_weights/w/kernel"
    elif tail.startswith("experts/"):
      path = f"{head}/mlp/expert/{tail.split('/')[1]}/kernel"
    out[path] = value
  return out


@pytest.fixture(scope="module")
def t5x_moe_checkpoint(tmp_path_factory):
  params = jax.tree.map(np.asarray, sharpen_routers(random_params(TINY_MOE)))
  flat = t5x_moe_target(params)
  assert {p for p in flat if "/router/" in p or "/expert/" in p} == \
      T5X_SPARSE_LAYER1 | {p.replace("layers_1", "layers_3") for p in T5X_SPARSE_LAYER1}
  target = layout.unflatten(flat)
  path = tmp_path_factory.mktemp("t5x_moe_run") / "checkpoint_500"
  ocp.PyTreeCheckpointer().save(str(path), {"target": target, "state": {"step": np.asarray(500)}})
  return path, params


@pytest.mark.parametrize("scan", [False, True], ids=["per-layer", "into-scanned"])
def test_reads_flaxformer_moe_checkpoint(t5x_moe_checkpoint, scan):
  path, params = t5x_moe_checkpoint
  assert load.checkpoint_kind(path) == "t5x"
  config = dataclasses.replace(TINY_MOE, scan_layers=scan)
  loaded = load.load_for_module(path, t5.Transformer(config))
  expected = layout.from_per_layer(layout.flatten(params), layout.layouts_for(config))
  for p, value in layout.flatten(loaded).items():
    np.testing.assert_array_equal(np.asarray(value), expected[p], err_msg=p)
  batch = make_batch(TINY_MOE.vocab_size)
  diff = np.abs(logits(config, loaded, batch) - logits(TINY_MOE, params, batch)).max()
  print(f"T5X MoE checkpoint (scan={scan}) max abs logit difference: {diff:.2e}")
  assert diff < 1e-5


@pytest.mark.parametrize("path, reason", [
    ("encoder/layers_1/mlp/router/router_weights/w/bias", "routers have a bias"),
    ("decoder/layers_1/mlp/expert/wo/bias", "experts have biases"),
    ("encoder/layers_1/extra_mlp/wi/kernel", "ST-MoE's extra dense MLP"),
    ("encoder/encoder/subblock_1/mlp/expert/wo/kernel", "scanned flaxformer model"),
])
def test_flaxformer_moe_parts_without_equivalent_are_named(path, reason):
  with pytest.raises(ValueError, match="no repeat_lm equivalent") as e:
    t5x.to_repeat_lm({"token_embedder/embedding": np.zeros((4, 2)), path: np.zeros((2, 2))})
  assert reason in str(e.value) and path in str(e.value)


def test_experts_of_one_activation_are_renamed():
  # flaxformer's MlpBlock names its input kernel 'wi' for one activation (Switch's ReLU experts), 'wi_<i>' if gated.
  got = t5x.to_repeat_lm({"encoder/layers_1/mlp/router/router_weights/w/kernel": np.zeros((8, 4)),
                          "encoder/layers_1/mlp/expert/wi/kernel": np.zeros((4, 8, 16)),
                          "encoder/layers_1/mlp/expert/wo/kernel": np.zeros((4, 16, 8))})
  assert set(got) == {"encoder/layers_1/mlp/router", *(f"encoder/layers_1/mlp/experts/{n}" for n in ("wi", "wo"))}


def test_reads_t5x_checkpoint_manager_layout(tmp_path):
  """T5X's Orbax CheckpointManager puts the train state in checkpoint_<step>/state/ (beside dataset/)."""
  flat = t5x_target(init_params(TINY))
  target = layout.unflatten(flat)
  manager = ocp.CheckpointManager(tmp_path, item_names=("state",),
                                  options=ocp.CheckpointManagerOptions(step_prefix="checkpoint"))
  manager.save(1000, args=ocp.args.Composite(state=ocp.args.PyTreeSave({"target": target, "state": {"step": 1000}})))
  manager.wait_until_finished()
  assert (tmp_path / "checkpoint_1000" / "state").is_dir()
  for path in (tmp_path, tmp_path / "checkpoint_1000"):
    assert load.checkpoint_kind(path) == "t5x"
    jax.tree.map(np.testing.assert_array_equal, t5x.load_t5x(path), jax.tree.map(np.asarray, init_params(TINY)))


def test_reads_legacy_specs_with_the_path_outside_the_kvstore(tmp_path):
  """TensorStore < 0.1.14 wrote specs as {'kvstore': {'driver', 'bucket'}, 'path': name}; T5X still reads them."""
  ts = pytest.importorskip("tensorstore")
  stored = {}
  for path, value in t5x_target(init_params(TINY)).items():
    name = "target." + path.replace("/", ".")
    meta = {"shape": list(value.shape), "chunks": list(value.shape), "dtype": "<f4"}
    ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(tmp_path / name)}, "metadata": meta},
            create=True).result().write(value).result()
    stored[path] = {"driver": "zarr", "kvstore": {"driver": "gcs", "bucket": "t5x-dummy-bucket"}, "path": name,
                    "metadata": meta}
  (tmp_path / "checkpoint").write_bytes(serialization.msgpack_serialize({"target": layout.unflatten(stored)}))
  jax.tree.map(np.testing.assert_array_equal, t5x.load_t5x(tmp_path), jax.tree.map(np.asarray, init_params(TINY)))


def test_the_latest_checkpoint_is_the_highest_step_not_the_last_name(tmp_path):
  # As T5X's latest step: checkpoint_1000 is later than checkpoint_900, though '900' sorts after '1000' as text.
  for step in (900, 1000):
    (tmp_path / f"checkpoint_{step}").mkdir()
  assert t5x.latest_checkpoint_dir(tmp_path) == tmp_path / "checkpoint_1000"


def test_a_step_asked_of_a_checkpoint_managers_state_dir_is_that_step(tmp_path):
  # checkpoint_<step>/state/ (T5X's Orbax CheckpointManager) is the checkpoint of that step.
  state = tmp_path / "checkpoint_1000" / "state"
  state.mkdir(parents=True)
  assert t5x.latest_checkpoint_dir(state, step=1000) == state
  with pytest.raises(FileNotFoundError, match=r"steps here: \[1000\]"):
    t5x.latest_checkpoint_dir(state, step=2000)


def test_an_ocdbt_checkpoint_is_recognised_by_its_manifest(tmp_path):
  # Orbax's OCDBT format keeps its arrays' index in manifest.ocdbt at the checkpoint's root.
  (tmp_path / "manifest.ocdbt").write_bytes(b"")
  assert t5x.is_t5x_checkpoint(tmp_path)


def test_the_parameters_are_found_in_old_optimizer_states_and_bare_trees():
  params = {"token_embedder": {"embedding": np.zeros((4, 2))}}
  assert t5x._find_target({"optimizer": {"target": params, "state": {"step": 1}}}) is params  # noqa: SLF001
  assert t5x._find_target(params) is params  # noqa: SLF001
