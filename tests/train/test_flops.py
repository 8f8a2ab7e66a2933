"""The FLOP counter against reference section 6 and a hand expansion of its formula."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from repeat_lm.models import moe
from repeat_lm.train import flops


@dataclasses.dataclass
class Dims:  # The T5Config fields the counter reads.
  emb_dim: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  num_encoder_layers: int
  num_decoder_layers: int
  vocab_size: int = 32128
  mlp_activations: tuple = ("gelu", "linear")


BASE = Dims(768, 12, 64, 2048, 12, 12)


def test_t5_base_matches_published_425_9_gflop():
  got = flops.train_flops_per_sequence(BASE, 512, 114)
  assert got == pytest.approx(425.9e9, rel=0.01)


def test_formula_expanded_by_hand():
  d, a, f, v, se, sd = 768, 768, 2048, 32128, 512, 114
  enc = se * 8 * d * a + 4 * se**2 * a + se * 2 * 3 * d * f
  dec = sd * 8 * d * a + 4 * sd**2 * a + sd * 4 * d * a + se * 4 * d * a + 4 * sd * se * a + sd * 2 * 3 * d * f
  expected = 3 * (12 * enc + 12 * dec + 2 * sd * d * v)
  assert flops.train_flops_per_sequence(BASE, 512, 114) == expected


@pytest.mark.parametrize("lengths", [(-10, 114), (512.5, 114), (True, 114), (0, 0), (512, 0)])
def test_lengths_that_are_not_counts_are_refused(lengths):
  """model-info refused these flags, but model_info and the counter took them: -10 inputs counted 5.6M FLOPs, a
  float a fractional count, True one token, and (0, 0) raised ZeroDivisionError in FLOPs per token."""
  from repeat_lm.models import info, t5
  with pytest.raises(ValueError, match="whole-number lengths >= 1"):
    flops.train_flops_per_sequence(BASE, *lengths)
  with pytest.raises(ValueError, match="whole-number lengths >= 1"):
    info.model_info(t5.T5Config(vocab_size=128, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32), *lengths)


def test_relu_mlp_counts_two_matrices():
  gated = sum(flops.encoder_layer_parts(BASE, 512).values())
  relu = sum(flops.encoder_layer_parts(dataclasses.replace(BASE, mlp_activations=("relu",)), 512).values())
  assert gated - relu == 512 * 2 * 768 * 2048


def test_parts_add_up_to_the_total_each_by_its_own_term():
  d, a, f, v, se, sd, layers = 768, 768, 2048, 32128, 512, 114, 12
  parts = flops.train_flops_by_part(BASE, se, sd)
  assert tuple(parts) == flops.PARTS
  assert sum(parts.values()) == flops.train_flops_per_sequence(BASE, se, sd)
  assert parts["logits"] == 3 * 2 * sd * d * v
  assert parts["encoder attention core"] == 3 * layers * 4 * se * se * a
  assert parts["cross-attention projections"] == 3 * layers * (sd + se) * 4 * d * a
  assert parts["decoder mlp"] == 3 * layers * sd * 2 * 3 * d * f


def test_peak_table_prefers_longest_name():
  class Dev:
    device_kind = "TPU v5 lite"
  assert flops.known_peak_flops(Dev()) == 197e12
  Dev.device_kind = "NVIDIA H100 80GB HBM3"
  assert flops.known_peak_flops(Dev()) == 989e12
  for kind in ("NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200 NVL"):  # not the SXM part the table's 989 TFLOP/s is for
    Dev.device_kind = kind
    assert flops.known_peak_flops(Dev()) is None
  Dev.device_kind = "cpu"
  assert flops.known_peak_flops(Dev()) is None


def test_peak_table_names_match_whole_model_numbers():
  class Dev:
    device_kind = "NVIDIA A100-SXM4-80GB"
  assert flops.known_peak_flops(Dev()) == 312e12
  Dev.device_kind = "NVIDIA GH200 480GB"  # Grace Hopper's GPU: H200 (or H100) class, 989 TFLOP/s dense bf16
  assert flops.known_peak_flops(Dev()) == 989e12
  for kind in ("NVIDIA RTX A1000 Laptop GPU", "NVIDIA RTX A1000"):  # a small workstation card, not an A100
    Dev.device_kind = kind
    assert flops.known_peak_flops(Dev()) is None


def test_an_accelerator_missing_from_the_table_counts_every_chip(monkeypatch):
  class Chip:
    platform, device_kind = "gpu", "NVIDIA B200"
  monkeypatch.setattr(jax, "devices", lambda: [Chip()] * 8)
  monkeypatch.setattr(jax, "device_count", lambda: 8)
  monkeypatch.setattr(jax, "process_count", lambda: 1)
  monkeypatch.setattr(flops, "measured_matmul_peak", lambda quick, dtype: 2e15)
  peak, source = flops.peak_flops_total()
  assert peak == 8 * 2e15 and source == "measured float32 matmul on 1 of 8 x NVIDIA B200"


def test_reprobed_peak_keeps_the_best_probe_on_cpu_and_the_table_elsewhere(monkeypatch):
  dtypes = []
  monkeypatch.setattr(flops, "matmul_rate", lambda dtype="float32", repeats=8: dtypes.append(dtype) or 5e11)
  assert flops.reprobed_peak(4e11) == 5e11  # a probe in a slow spell (4e11) is replaced by a faster one
  assert flops.reprobed_peak(6e11, "bfloat16") == 6e11  # and never lowers the peak
  assert dtypes == ["float32", "bfloat16"]  # the probe multiplies the model's activation dtype
  monkeypatch.setattr(flops, "known_peak_flops", lambda device: 989e12)
  monkeypatch.setattr(flops, "matmul_rate", lambda **kw: pytest.fail("a table peak is not probed"))
  assert flops.reprobed_peak(989e12) == 989e12


def test_trainer_takes_the_quick_probe_and_benchmarks_the_full_one(monkeypatch):
  probes = []
  monkeypatch.setattr(flops, "matmul_rate", lambda **kw: probes.append(kw) or 4e11)
  flops.measured_matmul_peak.cache_clear()
  try:
    quick, quick_source = flops.peak_flops_total(quick=True)
    full, full_source = flops.peak_flops_total()
    flops.peak_flops_total(quick=True)  # measured once per process
    _, bf16_source = flops.peak_flops_total(quick=True, dtype="bfloat16")  # and once per activation dtype
  finally:
    flops.measured_matmul_peak.cache_clear()  # the fake rate must not serve later tests
  assert probes == [{"sizes": (2048,), "repeats": 3, "dtype": "float32"}, {"dtype": "float32"},
                    {"sizes": (2048,), "repeats": 3, "dtype": "bfloat16"}]
  assert quick == full == 4e11 * jax.process_count()
  assert "(quick probe)" in quick_source and "quick" not in full_source
  assert "measured float32 matmul" in full_source and "measured bfloat16 matmul" in bf16_source


def test_matmul_probe_multiplies_the_given_dtype_and_accumulates_in_float32():
  assert flops.matmul_rate(sizes=(64,), dtype="bfloat16", repeats=1) > 0
  # The form every CPU dot of the models takes (cpu_layouts.wide_matmul); a bfloat16 result runs a slower kernel.
  product = flops.probe_product(jnp.ones((8, 8), jnp.bfloat16))
  assert product.dtype == jnp.float32 and float(product[0, 0]) == 8.0


def test_top_k_routing_counts_k_experts():
  # Reference section 6: a sparse layer costs the router (2 d E per token) plus the K chosen experts' FFNs.
  cfg = dataclasses.replace(BASE, mlp_activations=("relu",))
  cfg.moe = moe.MoeConfig(num_experts=8, expert_mlp_dim=1024, expert_activations=("relu",), num_selected_experts=2)
  assert flops.ffn_flops_per_token(cfg, sparse=True) == 2 * 768 * 8 + 2 * (2 * 2 * 768 * 1024)


def test_moe_model_counts_router_and_experts_in_its_sparse_layers_only():
  # Every other FFN sparse (the second of each pair), in both stacks; dense FFNs gated GELU (k = 3), experts ReLU
  # (k = 2), top-2 of 4: a sparse FFN costs 2 d E + K x 2 x 2 d F_e per token, a dense one 2 x 3 d f.
  d, a, f, v, se, sd, e, fe = 768, 768, 2048, 32128, 16, 8, 4, 512
  cfg = dataclasses.replace(BASE, num_encoder_layers=2, num_decoder_layers=2)
  cfg.moe = moe.MoeConfig(num_experts=e, expert_mlp_dim=fe, expert_activations=("relu",), num_selected_experts=2)
  dense, sparse = 2 * 3 * d * f, 2 * d * e + 2 * (2 * 2 * d * fe)
  enc = se * 8 * d * a + 4 * se**2 * a
  dec = sd * 8 * d * a + 4 * sd**2 * a + (sd + se) * 4 * d * a + 4 * sd * se * a
  expected = 2 * enc + se * (dense + sparse) + 2 * dec + sd * (dense + sparse) + 2 * sd * d * v
  assert flops.forward_flops_per_sequence(cfg, se, sd) == expected


def test_peak_table_is_the_reference_dense_bf16_peaks():
  # Reference section 6, per chip as JAX names it: v5e and v6e report 'lite', v5p reports 'TPU v5'.
  class Dev:
    device_kind = ""
  for kind, peak in (("NVIDIA A100-SXM4-40GB", 312e12), ("NVIDIA H100 80GB HBM3", 989e12), ("TPU v4", 275e12),
                     ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12), ("TPU v5p", 459e12),
                     ("TPU v6 lite", 918e12), ("TPU v6e", 918e12)):
    Dev.device_kind = kind
    assert flops.known_peak_flops(Dev()) == peak, kind


def test_matmul_rate_counts_2n_cubed_flops_and_keeps_the_fastest_run(monkeypatch):
  # An n x n by n x n product is n^3 multiply-adds, 2 n^3 FLOPs. Fake clock: run times 2, 1, 4 s at n = 8, then
  # 4, 8, 16 s at n = 16; the fastest is 2 x 16^3 / 4 = 2048 FLOP/s (n = 8's best is 1024), not the last run.
  ticks = iter(t for d in (2, 1, 4, 4, 8, 16) for t in (0.0, float(d)))
  monkeypatch.setattr(flops.time, "perf_counter", lambda: next(ticks))
  assert flops.matmul_rate(sizes=(8, 16), repeats=3) == 2048.0
