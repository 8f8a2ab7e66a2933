"""Reading T5X checkpoints of the T5 v1.1 network (synthetic ones, written in T5X's layout and naming)."""

import dataclasses

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import serialization

from interop_helpers import TINY, init_params, logits, make_batch
from repeat_lm.interop import layout, load, t5x
from repeat_lm.models import t5
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


def test_reads_legacy_msgpack_tensorstore_checkpoint(tmp_path):
  """T5X before Orbax: a msgpack `checkpoint` whose large arrays are TensorStore specs relative to the directory."""
  ts = pytest.importorskip("tensorstore")
  flat = t5x_target(init_params(TINY))
  stored = {}
  for path, value in flat.items():
    if value.ndim < 2:
      stored[path] = value  # small arrays sit in the msgpack itself
      continue
    name = "target." + path.replace("/", ".")
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": name},
            "metadata": {"shape": list(value.shape), "chunks": list(value.shape), "dtype": "<f4"}}
    ts.open({**spec, "kvstore": {"driver": "file", "path": str(tmp_path / name)}}, create=True).result().write(
        value).result()
    stored[path] = spec
  tree = {"target": layout.unflatten(stored), "state": {"step": 7}}
  (tmp_path / "checkpoint").write_bytes(serialization.msgpack_serialize(tree))
  params = t5x.load_t5x(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, params, jax.tree.map(np.asarray, init_params(TINY)))


def test_wrong_architecture_is_a_clear_error(t5x_model_dir):
  bigger = dataclasses.replace(TINY, num_encoder_layers=3)
  with pytest.raises(ValueError, match=r"do not fit the model[\s\S]*missing \(\d+\): encoder/layers_2/"):
    load.load_for_module(t5x_model_dir, t5.Transformer(bigger))
