"""Mesh construction and logical-axis shardings."""

import dataclasses
import itertools

import jax
import pytest
from jax.sharding import PartitionSpec as P

from repeat_lm.models import moe
from repeat_lm.train import partitioning


def test_mesh_uses_all_devices():
  assert jax.device_count() == 8
  mesh = partitioning.make_mesh(-1, 2)
  assert dict(mesh.shape) == {"data": 4, "model": 2}
  assert dict(partitioning.make_mesh(8, -1).shape) == {"data": 8, "model": 1}


@pytest.mark.parametrize("data,model", [(3, -1), (-1, -1), (2, 2), (16, 1), (-2, -4), (0, 8)])
def test_impossible_mesh_is_a_clear_error(data, model):
  with pytest.raises(ValueError, match="Mesh shape|at most one axis"):
    partitioning.make_mesh(data, model)


def test_both_mesh_size_errors_give_the_rule_that_fixes_them():
  # "choose sizes whose product divides 8", followed without a -1 (2 x 2), led straight to "uses 4 devices but 8".
  for data, model in ((3, 1), (2, 2)):
    with pytest.raises(ValueError, match=r"Mesh shape data=\d, model=\d .*choose sizes whose product is 8, or set "
                       r"one axis to -1"):
      partitioning.make_mesh(data, model)


@pytest.mark.parametrize("kwargs", [dict(data=-1, model=True), dict(data=-1, model=2, expert=True),
                                    dict(data=-1, model="2"), dict(data=2.0, model=4)])
def test_a_mesh_axis_that_is_not_a_whole_number_is_refused(kwargs):
  """model=True (True == 1) built a model axis of 1 and expert=True an expert axis of 1 without a word."""
  with pytest.raises(ValueError, match="every axis size must be a whole number"):
    partitioning.make_mesh(**kwargs)


def test_logical_rules_map_t5x_names():
  p = partitioning.Partitioner(data_parallel=4, model_parallel=2)
  assert p.logical_to_spec(("embed", "mlp")) == P(None, "model")
  assert p.logical_to_spec(("batch", "length", "embed")) == P("data", None, None)
  assert p.logical_to_spec(("vocab", "embed")) == P("model", None)
  fsdp = partitioning.Partitioner(data_parallel=4, model_parallel=2, fsdp=True)
  assert fsdp.logical_to_spec(("embed", "mlp")) == P("data", "model")


def test_params_axes_become_tuples():
  from flax.linen import partitioning as nnp
  axes = {"dense": {"kernel_axes": nnp.AxisMetadata(names=("embed", "mlp"))}}
  assert partitioning.params_logical_axes(axes) == {"dense": {"kernel": ("embed", "mlp")}}


@pytest.mark.parametrize("overrides, batch, message", [
    ({"num_heads": 3}, 8, r"relpos_bias/rel_embedding has 3 along its 'heads' axis, which the mesh splits over "
                          r"model=2 = 2 devices.*Change t5.T5Config.num_heads or the mesh \(MODEL_PARALLEL\)"),
    ({"mlp_dim": 63}, 8, r"has 63 along its 'mlp' axis.*Change t5.T5Config.mlp_dim"),
    # An expert hidden size was blamed on num_heads, mlp_dim, vocab_size and num_experts.
    ({"moe": moe.MoeConfig(num_experts=2, sparse_every=1, expert_mlp_dim=63)}, 8,
     r"experts/wi.* has 63 along its 'expert_mlp' axis.*Change moe.MoeConfig.expert_mlp_dim or the mesh "
     r"\(MODEL_PARALLEL\)"),
    ({}, 6, r"Batch size 6 \(encoder_input_tokens\) is not divisible by the 4 devices"),
])
def test_shapes_the_mesh_cannot_split_are_named_before_compiling(overrides, batch, message):
  from repeat_lm.models import t5
  from repeat_lm.models.encoder_decoder import EncoderDecoderModel
  from repeat_lm.train import optim, state
  config = t5.T5Config(**{**dict(vocab_size=256, dtype="float32", emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
                              num_encoder_layers=1, num_decoder_layers=1), **overrides})
  spec = state.batch_specs({"encoder_input_tokens": 16, "decoder_input_tokens": 8, "decoder_target_tokens": 8}, batch)
  with pytest.raises(ValueError, match=message):
    state.layout(EncoderDecoderModel(module=t5.Transformer(config)), optim.make_optimizer(),
                 partitioning.Partitioner(4, 2), spec, 0)


@pytest.mark.parametrize("data,model,expected", [
    (8, 1, [(0, 2)] * 4 + [(1, 2)] * 4),  # each host holds half the batch
    (2, 4, [(0, 2)] * 4 + [(1, 2)] * 4),
    (1, 8, [(0, 1)] * 8),  # 'model' spans both hosts: they read the same (whole) batch
])
def test_data_layout_follows_the_mesh_not_the_process_count(data, model, expected):
  """T5X's get_data_layout: a host's data shard is the block of rows its devices hold. Two pretend hosts of 4 CPU
  devices each (devices 0-3 and 4-7)."""
  devices = jax.devices()[:8]
  p = partitioning.Partitioner(data, model, devices=devices)
  host = {d: i // 4 for i, d in enumerate(devices)}
  for host_id in (0, 1):
    want = expected[4 * host_id]
    assert p.data_layout(16, process_index=host_id, process_of=host.__getitem__) == want


@dataclasses.dataclass(frozen=True)
class FakeTpuV4:
  id: int
  process_index: int
  coords: tuple[int, int, int]
  core_on_chip: int = 0
  platform: str = "tpu"
  device_kind: str = "TPU v4"


@pytest.mark.parametrize("data,model", [(-1, 1), (4, 2), (1, 8)])
def test_each_pod_host_holds_one_block_of_rows(data, model):
  """A v4-16 slice: a 2x2x2 torus whose two hosts each own a 2x2x1 block (z = host). The topology-aware order
  alternates the hosts along 'data'; the input pipeline gives each host one contiguous block of rows, so the mesh
  must keep each host's devices adjacent (else the default DATA_PARALLEL=-1 could not start on a pod)."""
  devices = [FakeTpuV4(i, z, (x, y, z)) for i, (z, y, x) in enumerate(itertools.product(range(2), repeat=3))]
  p = partitioning.Partitioner(data, model, devices=devices)
  blocks = [p.data_layout(16, process_index=host) for host in (0, 1)]
  assert blocks == ([(0, 1)] * 2 if data == 1 else [(0, 2), (1, 2)])


def test_a_process_whose_rows_straddle_two_blocks_is_refused():
  """3 hosts of 4 devices with model 3: host 1 holds batch rows [3, 9) of 12, which is no block of an even split.
  lo // size named block 0 (rows [0, 6), host 0's too): its devices got rows 0-5 where the mesh puts rows 3-8, and
  the model shards of rows 3-5 saw different tokens on hosts 0 and 1."""
  devices = [FakeTpuV4(i, i // 4, (i, 0, 0)) for i in range(12)]
  p = partitioning.Partitioner(4, 3, devices=devices)
  assert p.data_layout(12, process_index=0) == (0, 2) and p.data_layout(12, process_index=2) == (1, 2)
  with pytest.raises(ValueError, match=r"rows \[3, 4, 5, 6, 7, 8\] of 12: not one block of an even split"):
    p.data_layout(12, process_index=1)


def test_factored_statistics_of_a_square_kernel_follow_their_own_axis():
  """Adafactor's v_row keeps the parameter's rows (drops its largest axis, the last of a square kernel), v_col its
  columns: each is sharded like the axis it keeps, even when both axes have the same length (T5 v1.1 base's
  [768, 12 x 64] attention kernels). Sharded like the other axis, every step all-gathers them."""
  from repeat_lm.models import t5
  from repeat_lm.models.encoder_decoder import EncoderDecoderModel
  from repeat_lm.train import optim, state
  config = t5.T5Config(vocab_size=512, dtype="float32", emb_dim=128, num_heads=2, head_dim=64, mlp_dim=256,
                       num_encoder_layers=1, num_decoder_layers=1)
  spec = state.batch_specs({"encoder_input_tokens": 16, "decoder_input_tokens": 8, "decoder_target_tokens": 8}, 8)
  lay = state.layout(EncoderDecoderModel(module=t5.Transformer(config)), optim.make_optimizer(),
                     partitioning.Partitioner(4, 2), spec, 0)
  factored = lay.abstract["opt_state"][0]
  attention = lambda tree: tree["encoder"]["layers_0"]["attention"]
  params = attention(lay.abstract["params"])
  for name in ("query", "out"):
    kernel_spec = params[name]["kernel"].sharding.spec  # (None, 'model') and ('model', None)
    assert params[name]["kernel"].shape == (128, 128)
    assert attention(factored.v_row)[name]["kernel"].sharding.spec == P(kernel_spec[0])
    assert attention(factored.v_col)[name]["kernel"].sharding.spec == P(kernel_spec[1])


def test_an_evaluation_batch_the_mesh_cannot_split_is_named():
  """train() lays out the state for the training batch only; the evaluation batch is split by its own size."""
  from repeat_lm.data import pipeline
  from repeat_lm.train import trainer
  cfg = pipeline.DatasetConfig("repeat_lm.wiki_span_corruption", {"inputs": 64, "targets": 16}, split="validation",
                               batch_size=6, shuffle=False)
  with pytest.raises(ValueError, match=r"Evaluation batch size 6 is not divisible by the 4 devices.*EVAL_BATCH_SIZE"):
    trainer._eval_batches(cfg, 1, partitioning.Partitioner(4, 2))


def test_expert_parallel_batches_split_over_data_and_expert():
  """Between MoE layers every device of data x expert holds other tokens, so the batch must split over both."""
  p = partitioning.Partitioner(2, 1, expert_parallel=4)
  assert p.batch_shards == 8
  with pytest.raises(ValueError, match="Batch size 12 is not divisible by the 8 devices"):
    p.check_batch_size("Batch size 12", 12, "BATCH_SIZE")


def test_a_process_holding_rows_at_both_ends_is_refused():
  """Rows {0, 1, 6, 7} of 8 span [0, 8), a block of the right size and start: it is still no block, and reading
  the whole batch would give rows 2-5 to devices the mesh gives rows 6-7."""
  devices = jax.devices()[:8]
  p = partitioning.Partitioner(8, 1, devices=devices)
  host = {d: 0 if i in (0, 1, 6, 7) else 1 for i, d in enumerate(devices)}
  with pytest.raises(ValueError, match=r"rows \[0, 1, 6, 7\] of 8: not one block"):
    p.data_layout(8, process_index=0, process_of=host.__getitem__)
