"""profile.shared_seconds: overlapping host-thread ops split the time they share; enclosing events are parents.
profile.part_of / time_by_part: ops go to the model part named in their source op, unrolled or scanned."""

import os

import jax
import pytest

from repeat_lm.bench import profile

MS = 1e6  # ns


def test_overlapping_ops_split_their_common_time_and_sum_to_the_busy_time():
  thread_a = [(0, 10 * MS, "dot.1")]
  thread_b = [(5 * MS, 15 * MS, "dot.2"), (20 * MS, 21 * MS, "add.3")]
  seconds = profile.shared_seconds([thread_a, thread_b])
  assert seconds["dot.1"] == pytest.approx(0.0075)  # 5 ms alone + half of the 5 ms shared
  assert seconds["dot.2"] == pytest.approx(0.0075)
  assert seconds["add.3"] == pytest.approx(0.001)
  assert sum(seconds.values()) == pytest.approx(0.016)  # busy 0-15 and 20-21 ms


def test_an_event_enclosing_others_on_its_thread_is_their_parent():
  thread = [(0, 10 * MS, "while.1"), (1 * MS, 4 * MS, "dot.2"), (4 * MS, 9 * MS, "add.3"), (12 * MS, 13 * MS, "mul.4")]
  seconds = profile.shared_seconds([thread])
  assert "while.1" not in seconds
  assert seconds == pytest.approx({"dot.2": 0.003, "add.3": 0.005, "mul.4": 0.001})


STEP = "jit(step_fn)/transpose(jvp(Transformer))/"


@pytest.mark.parametrize("source,part", [
    (STEP + "Transformer.encode/encoder/layers_3/attention/key/dot_general", "encoder attention projections"),
    (STEP + "Transformer.encode/encoder/layers_3/attention/attention._einsum_attention/reduce_sum",
     "encoder attention core"),
    (STEP + "Transformer.encode/encoder/layers_3/pre_attention_layer_norm/reduce_sum", profile.OTHER_PART),
    (STEP + "Transformer.encode/encoder/layers_0/mlp/wi_1/dot_general", "encoder mlp"),
    # Scanned layers, and MoE units of layers inside the scan.
    (STEP + "Transformer.encode/encoder/while/body/closed_call/layers/attention/out/dot_general",
     "encoder attention projections"),
    (STEP + "Transformer.decode/decoder/while/body/closed_call/layers/layers_1/mlp/experts/dot_general", "decoder mlp"),
    (STEP + "Transformer.decode/decoder/layers_7/self_attention/query/dot_general",
     "decoder self-attention projections"),
    (STEP + "Transformer.decode/decoder/layers_7/self_attention/self_attention._einsum_attention/exp",
     "decoder self-attention core"),
    (STEP + "Transformer.decode/decoder/layers_2/encoder_decoder_attention/value/dot_general",
     "cross-attention projections"),
    (STEP + "Transformer.decode/decoder/layers_2/encoder_decoder_attention/encoder_decoder_attention._einsum_attention/"
     "dot_general", "cross-attention core"),
    (STEP + "Transformer.decode/logits_dense/dot_general", "logits"),
    # Tied output layer (logits_via_embedding, the Switch gins): the embedding's attend is the logits matmul.
    (STEP + "Transformer.decode/token_embedder.attend/btd,vd->btv/dot_general", "logits"),
    (STEP + "Transformer.encode/token_embedder/jit(_take)/scatter-add", profile.OTHER_PART),
    ("jit(step_fn)/mul", profile.OTHER_PART),  # the optimizer
    ("", profile.OTHER_PART),  # a copy XLA made
])
def test_ops_go_to_the_part_their_source_op_names(source, part):
  assert profile.part_of(source) == part


def test_time_by_part_sums_the_ops_and_puts_each_parts_flops_at_the_peak():
  ops = [{"seconds": 0.5, "source": "/encoder/layers_0/mlp/wo/dot_general"},
         {"seconds": 0.25, "source": "/encoder/layers_1/mlp/wi_0/dot_general"},
         {"seconds": 0.125, "source": "/logits_dense/dot_general"},
         {"seconds": 0.0625, "source": "add"}]
  rows = profile.time_by_part(ops, {"encoder mlp": 6e11, "logits": 1e11}, peak_flops=1e12)
  assert rows == [
      {"part": "encoder mlp", "seconds": 0.75, "model_flops": 6e11, "floor_s": 0.6},
      {"part": "logits", "seconds": 0.125, "model_flops": 1e11, "floor_s": 0.1},
      {"part": profile.OTHER_PART, "seconds": 0.0625, "model_flops": 0, "floor_s": 0.0}]


def test_op_kind_drops_only_the_instance_number():
  assert profile.op_kind("loop_add_fusion.12") == "loop_add_fusion"
  # Library kernels keep their names, digits included (accelerator.kernel_table groups by kind).
  assert profile.op_kind("nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT") == "nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT"
  assert profile.op_kind("cutlass_80_tensorop_s1688gemm_256x128_16x3") == "cutlass_80_tensorop_s1688gemm_256x128_16x3"


TPU_TRACE = """
planes {
  name: "/device:TPU:0"
  lines {
    name: "XLA Ops"
    events { metadata_id: 1 duration_ps: 2000000000 }
    events { metadata_id: 2 offset_ps: 2000000000 duration_ps: 1000000000 }
  }
  event_metadata { key: 1 value { id: 1 name: "fusion.3" } }
  event_metadata { key: 2 value { id: 2 name: "convolution.7" } }
}
planes {
  name: "/host:CPU"
  lines { name: "tf_XLATpuHostLaunch" events { metadata_id: 1 duration_ps: 9000000000 } }
  event_metadata { key: 1 value { id: 1 name: "fusion.3" } }
}
"""

CPU_TRACE = """
planes {
  name: "/host:CPU"
  lines { name: "python" events { metadata_id: 1 duration_ps: 9000000000 } }
  lines {
    name: "XLA thread"
    events { metadata_id: 2 offset_ps: 1000000000 duration_ps: 2000000000 }
    events { metadata_id: 3 offset_ps: 3000000000 duration_ps: 1000000000 }
  }
  lines {
    name: "PjRt runtime"
    events { metadata_id: 4 offset_ps: 5000000000 duration_ps: 1000000000 }
    events { metadata_id: 5 offset_ps: 6000000000 duration_ps: 1000000000 }
    events { metadata_id: 6 offset_ps: 7000000000 duration_ps: 1000000000 }
  }
  event_metadata { key: 1 value { id: 1 name: "PjitFunction(step_fn)" } }
  event_metadata { key: 2 value { id: 2 name: "dot.1" } }
  event_metadata { key: 3 value { id: 3 name: "add.2" } }
  event_metadata { key: 4 value { id: 4 name: "Wait: pending_threads=3/8" } }
  event_metadata { key: 5 value { id: 5 name: "Wait for rendezvous callback" } }
  event_metadata { key: 6 value { id: 6 name: "ParseArguments" } }
}
"""


def test_a_tpu_trace_counts_its_device_ops_not_the_hosts_launches():
  seconds = profile.op_seconds(jax.profiler.ProfileData.from_text_proto(TPU_TRACE))
  assert dict(seconds) == pytest.approx({"fusion.3": 2e-3, "convolution.7": 1e-3})


def test_a_cpu_trace_counts_xlas_threads_not_the_python_caller_nor_the_runtimes_waits():
  seconds = profile.op_seconds(jax.profiler.ProfileData.from_text_proto(CPU_TRACE))
  assert dict(seconds) == pytest.approx({"dot.1": 2e-3, "add.2": 1e-3})


def test_the_newest_trace_in_a_reused_directory_is_read(tmp_path):
  old, new = tmp_path / "b" / "host.xplane.pb", tmp_path / "a" / "host.xplane.pb"
  for path, trace in ((old, CPU_TRACE), (new, TPU_TRACE)):
    path.parent.mkdir()
    path.write_bytes(jax.profiler.ProfileData.text_proto_to_serialized_xspace(trace))
  os.utime(old, (1e9, 1e9))  # an earlier profile left in the directory, its path sorting after the new one's
  os.utime(new, (2e9, 2e9))
  assert set(profile._xspace_events(tmp_path)) == {"fusion.3", "convolution.7"}  # pylint: disable=protected-access


def test_ops_md_written_again_replaces_the_earlier_one_whole(tmp_path, monkeypatch):
  """ops.md was rewritten in place: a kill mid-write left half of the earlier table. Replaced whole, a reader that had
  the earlier one open still reads all of it."""
  monkeypatch.setattr(jax.profiler, "start_trace", lambda _: None)  # the trace: CPU_TRACE, written here
  monkeypatch.setattr(jax.profiler, "stop_trace", lambda: None)
  (tmp_path / "host.xplane.pb").write_bytes(jax.profiler.ProfileData.text_proto_to_serialized_xspace(CPU_TRACE))
  profile.profile_steps(lambda steps: 1.0, 1, "", tmp_path)
  before = (tmp_path / "ops.md").read_text()
  with (tmp_path / "ops.md").open() as reader:
    profile.profile_steps(lambda steps: 2.0, 1, "", tmp_path)
    assert reader.read() == before
  assert (tmp_path / "ops.md").read_text().startswith("Wall 2.000 s per step")
