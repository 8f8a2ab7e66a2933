"""`repeat-lm bench moe`: an MoE model's step timed against its dense twin, through the command line."""

import json

import jax
import jax.numpy as jnp
import pytest

from repeat_lm import bench, cli
from repeat_lm.bench import moe as bench_moe
from repeat_lm.models import moe, t5
from repeat_lm.models.encoder_decoder import EncoderDecoderModel
from repeat_lm.train import flops

TINY = ["--gin_file=gin/models/switch_tiny.gin", "--batch_size=8", "--inputs_length=32", "--targets_length=8",
        "--steps=1", "--rounds=1"]


@pytest.mark.slow
def test_bench_moe_times_each_variant_against_the_dense_twin(capsys):
  assert cli.main(["bench", "moe", *TINY, "--dispatch=gather", "--json"]) == 0
  r = json.loads(capsys.readouterr().out)
  assert r["device"] == "8 x cpu" and r["host"] == bench.host_cpu()
  assert set(r["variants"]) == {"dense", "moe_gather_g256"}
  dense, sparse = r["variants"]["dense"], r["variants"]["moe_gather_g256"]
  assert dense["step_time_vs_dense"] == 1.0
  assert sparse["step_time_vs_dense"] == sparse["step_time_s"] / dense["step_time_s"]
  assert r["tokens_per_step"] == 8 * 40 and sparse["tokens_per_s"] == 320 / sparse["step_time_s"]
  # Groups and capacity as the layer computes them: 256 encoder tokens (8 x 32) on 8 data shards, 64 decoder.
  assert sparse["groups"] == {"encoder": moe.num_groups(256, 256, 8), "decoder": moe.num_groups(64, 256, 8)}
  assert sparse["capacity"]["encoder"] == moe.expert_capacity(256 // sparse["groups"]["encoder"], 4, 1.25, 4)
  assert sparse["capacity"]["decoder"] == moe.expert_capacity(64 // sparse["groups"]["decoder"], 4, 1.25, 4)
  assert 0.0 <= sparse["fraction_dropped"] <= 1.0 and "groups" not in dense
  # Switch-Tiny's ReLU experts do 2/3 of its gated dense FFN's FLOPs: the twin is not FLOP-matched, and the row says so.
  assert sparse["model_flops_vs_dense"] == sparse["model_flops_per_step"] / dense["model_flops_per_step"] < 0.99
  lines = bench_moe.format_report(r).splitlines()
  assert lines[0].startswith(f"device 8 x cpu ({r['host']}), mesh") and len(lines) == 3
  assert lines[2].lstrip().startswith("moe_gather_g256: step") and "dropped" in lines[2]
  assert f"GFLOP/step = {sparse['model_flops_vs_dense']:.3f}x dense" in lines[2]


def test_bench_moe_refuses_a_dense_model_with_the_fix(capsys):
  assert cli.main(["bench", "moe", *TINY[1:], "--gin_file=gin/models/t5_1_1_tiny.gin"]) == 2
  assert "bench moe needs an MoE model gin (T5Config.moe set)" in capsys.readouterr().err


def test_ffn_layer_timing_runs_with_router_jitter():
  """The FFN sublayer runs with training capacity, where jitter_noise > 0 needs a 'dropout' rng."""
  cfg = t5.T5Config(vocab_size=64, dtype="float32", emb_dim=16, num_heads=2, head_dim=8, num_encoder_layers=2,
                    num_decoder_layers=2, mlp_dim=32, moe=moe.MoeConfig(num_experts=4, expert_mlp_dim=32,
                                                                       jitter_noise=0.01))
  run = bench_moe._layer_step(EncoderDecoderModel(t5.Transformer(cfg)), 64, cfg.moe)  # pylint: disable=protected-access
  assert run(1) > 0.0


def test_ffn_sublayer_reference_does_the_experts_flops():
  """The dense FFN timed against the sparse sublayer does the K experts' FLOPs, not the twin's FFN: with MoE-Base's
  layout (top-2 gated experts of d_ff 9/8 the dense one's) the twin's FFN does 1 / 2.25 of them."""
  cfg = t5.T5Config(vocab_size=64, dtype="float32", emb_dim=64, num_heads=2, head_dim=8, num_encoder_layers=2,
                    num_decoder_layers=2, mlp_dim=32, mlp_activations=("gelu", "linear"),
                    moe=moe.MoeConfig(num_experts=4, expert_mlp_dim=36, expert_activations=("gelu", "linear"),
                                      num_selected_experts=2))
  tokens = 64
  x = jnp.ones((1, tokens, cfg.emb_dim), jnp.float32)
  block = bench_moe.matched_dense_ffn(cfg.moe, jnp.float32)
  params = block.init(jax.random.key(0), x, True)["params"]
  cost = jax.jit(lambda p, x: block.apply({"params": p}, x, True)).lower(params, x).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  experts = tokens * (flops.ffn_flops_per_token(cfg, sparse=True) - 2 * cfg.emb_dim * cfg.moe.num_experts)
  assert abs(cost["flops"] / experts - 1.0) < 0.05, (cost["flops"], experts)  # + GELU's elementwise ops


def test_ratios_to_the_dense_twin_divide_medians_and_minima(monkeypatch):
  """With the steps' and the FFN sublayers' rounds scripted: the step ratio divides the medians, the 'min' ratios the
  fastest rounds (what other load on a shared machine leaves alone)."""
  cfg = t5.T5Config(vocab_size=64, dtype="float32", emb_dim=16, num_heads=2, head_dim=8, num_encoder_layers=2,
                    num_decoder_layers=2, mlp_dim=32, moe=moe.MoeConfig(num_experts=4, expert_mlp_dim=32))
  # Seconds of each 1-step round after a three-step warm-up (the memory below never grows): dense 1, 3, 2 (median 2,
  # min 1); MoE 5, 3, 4 (median 4, min 3).
  steps = {True: iter([0.0] * 3 + [1.0, 3.0, 2.0]), False: iter([0.0] * 3 + [5.0, 3.0, 4.0])}
  # The FFN sublayer alone: dense 2, 1, 4 (min 1); MoE 6, 9, 3 (min 3).
  layers = {True: iter([2.0, 1.0, 4.0]), False: iter([6.0, 9.0, 3.0])}

  class FakeStep:
    compile_time_s = 1.0
    last_metrics = {"loss_sum": 8.0, "weight_sum": 4.0, "moe_fraction_dropped_sum": 1.0}

    def __init__(self, model, *args):
      del args
      self.rounds = steps[model.module.config.moe is None]

    def run(self, n):
      del n
      return next(self.rounds)

  monkeypatch.setattr(bench_moe.bench_train, "JaxStep", FakeStep)
  monkeypatch.setattr(bench_moe.bench_train, "peak_memory_bytes", lambda: (1, "unchanging"))
  monkeypatch.setattr(bench_moe, "_layer_step", lambda model, tokens, moe_cfg: (
      lambda n, rounds=layers[model.module.config.moe is None]: next(rounds)))
  bench_cfg = bench_moe.bench_train.BenchConfig(batch_size=8, inputs_length=32, targets_length=8, steps=1, rounds=3,
                                                warmup=1)
  r = bench_moe.run_moe_benchmark(EncoderDecoderModel(t5.Transformer(cfg)), bench_cfg, dispatch=["gather"])
  dense, sparse = r["variants"]["dense"], r["variants"]["moe_gather_g8192"]
  assert (dense["step_time_s"], sparse["step_time_s"]) == (2.0, 4.0)
  assert sparse["step_time_vs_dense"] == 2.0 and sparse["step_time_min_vs_dense"] == 3.0
  assert sparse["ffn_layer_time_min_s"] == 3.0 and sparse["ffn_layer_time_min_vs_dense"] == 3.0
  assert dense["step_time_min_vs_dense"] == dense["ffn_layer_time_min_vs_dense"] == 1.0
  assert sparse["fraction_dropped"] == 0.25 and sparse["tokens_per_s"] == 8 * 40 / 4.0
