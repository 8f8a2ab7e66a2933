"""`repeat-lm bench moe`: an MoE model's training step against its dense twin.

The dense twin is the same model with every FFN dense (T5Config.moe = None): for Switch layouts, whose experts have
the dense FFN's shape and take one per token, the two differ in model FLOPs only by the router (2 d E per token), so
the step-time ratio measures what routing, dispatch, combine and capacity padding cost. Other layouts are not
FLOP-matched (MoE-Base's top-2 experts of 9/8 the dense d_ff do 2.25x the dense FFN's FLOPs, Switch-Tiny's ReLU
experts 2/3 of its gated FFN's), so every row also gives its model FLOPs against the twin's. The FFN sublayer timed
alone is always matched: its dense reference is one FFN with the experts' activations and K x their d_ff. Each MoE
variant (dispatch method x group size) is a separate compiled step; all are timed in interleaved rounds so they see
the same machine conditions. Uses `bench.train.JaxStep`, the trainer's own step.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from repeat_lm import bench
from repeat_lm.bench import train as bench_train
from repeat_lm.models import layers, moe
from repeat_lm.models.encoder_decoder import EncoderDecoderModel
from repeat_lm.train import flops, partitioning


def with_config(model: EncoderDecoderModel, **changes) -> EncoderDecoderModel:
  config = dataclasses.replace(model.module.config, **changes)
  return dataclasses.replace(model, module=model.module.clone(config=config))


def variants(model: EncoderDecoderModel, dispatch: Sequence[str],
             group_sizes: Sequence[int]) -> dict[str, EncoderDecoderModel]:
  """{'dense': twin, 'moe_<dispatch>_g<group size>': model, ...}."""
  cfg = model.module.config
  if cfg.moe is None:
    raise ValueError("bench moe needs an MoE model gin (T5Config.moe set), e.g. gin/models/switch_base_8.gin.")
  out = {"dense": with_config(model, moe=None)}
  for method in dispatch:
    for size in group_sizes or [cfg.moe.group_size]:
      out[f"moe_{method}_g{size}"] = with_config(
          model, moe=dataclasses.replace(cfg.moe, dispatch=method, group_size=size))
  return out


def matched_dense_ffn(moe_cfg: moe.MoeConfig, dtype) -> layers.MlpBlock:
  """A dense FFN with the forward FLOPs of a sparse layer's K experts, router aside: their activations, K x their
  d_ff. For Switch layouts it is the dense twin's own FFN; the twin's FFN in general is not (MoE-Base: 1 / 2.25)."""
  return layers.MlpBlock(moe_cfg.num_selected_experts * moe_cfg.expert_mlp_dim, moe_cfg.expert_activations, dtype)


def _layer_step(model: EncoderDecoderModel, tokens: int, moe_cfg: moe.MoeConfig):
  """Forward + backward of one FFN sublayer on `tokens` tokens, jitted: the MoE block of an MoE model, or for the dense
  twin the dense FFN FLOP-matched to the experts of `moe_cfg`."""
  cfg = model.module.config
  dtype = cfg.activation_dtype
  x = jax.random.normal(jax.random.key(0), (1, tokens, cfg.emb_dim), dtype)
  if cfg.moe is None:
    block = matched_dense_ffn(moe_cfg, dtype)
    apply = lambda p, x: block.apply({"params": p}, x, True)
  else:
    block = moe.MoeBlock(cfg.moe, dtype)
    # Training capacity; router jitter (MoeConfig.jitter_noise > 0) draws from the 'dropout' stream when training.
    apply = lambda p, x: block.apply({"params": p}, x, None, False, rngs={"dropout": jax.random.key(2)})[0]
  params = jax.jit(lambda k: block.init(k, x, *(() if cfg.moe is None else (None,)), True)["params"])(
      jax.random.key(1))
  grad = jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.square(apply(p, x).astype(jnp.float32))), argnums=(0, 1)))
  jax.block_until_ready(grad(params, x))  # compile

  def run(steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
      out = grad(params, x)
    jax.block_until_ready(out)
    return time.perf_counter() - start

  return run


def run_moe_benchmark(model: EncoderDecoderModel, cfg: bench_train.BenchConfig, *, dispatch: Sequence[str],
                      group_sizes: Sequence[int] = (),
                      partitioner: partitioning.Partitioner | None = None) -> dict:
  partitioner = partitioner or partitioning.Partitioner()
  models = variants(model, dispatch, group_sizes)
  steps = {name: bench_train.JaxStep(m, cfg, partitioner) for name, m in models.items()}
  for step in steps.values():
    bench_train.warm_up(step.run, cfg.warmup)
  times: dict[str, list[float]] = {name: [] for name in steps}
  for _ in range(cfg.rounds):
    for name, step in steps.items():
      times[name].append(step.run(cfg.steps) / cfg.steps)
  # The FFN sublayer alone, on one batch of encoder tokens: the dispatch overhead without attention and logits.
  layer_runs = {name: _layer_step(m, cfg.batch_size * cfg.inputs_length, model.module.config.moe)
                for name, m in models.items()}
  layer_times: dict[str, list[float]] = {name: [] for name in layer_runs}
  for _ in range(cfg.rounds):
    for name, run in layer_runs.items():
      layer_times[name].append(run(cfg.steps) / cfg.steps)
  tokens = cfg.batch_size * (cfg.inputs_length + cfg.targets_length)
  dense_time, dense_min = statistics.median(times["dense"]), min(times["dense"])
  model_flops = {name: flops.train_flops_per_sequence(m.module.config, cfg.inputs_length, cfg.targets_length) *
                 cfg.batch_size for name, m in models.items()}
  layer_dense_min = min(layer_times["dense"])
  result = {
      **bench.device_fields(),
      "mesh": dict(partitioner.mesh.shape),
      "dtype": model.module.config.dtype,
      "batch_size": cfg.batch_size, "inputs_length": cfg.inputs_length, "targets_length": cfg.targets_length,
      "tokens_per_step": tokens, "variants": {},
  }
  for name, step in steps.items():
    mcfg = models[name].module.config
    median = statistics.median(times[name])
    row = {
        "step_time_s": median, "step_time_min_s": min(times[name]), "step_time_max_s": max(times[name]),
        "tokens_per_s": tokens / median, "compile_time_s": step.compile_time_s,
        "model_flops_per_step": model_flops[name],
        # ~1 (the router) only where the experts have the dense FFN's FLOPs; else the step times differ by this too.
        "model_flops_vs_dense": model_flops[name] / model_flops["dense"],
        "step_time_vs_dense": median / dense_time,
        "step_time_min_vs_dense": min(times[name]) / dense_min,  # robust to other load on a shared machine
        "loss": float(step.last_metrics["loss_sum"] / step.last_metrics["weight_sum"]),
        "ffn_layer_time_min_s": min(layer_times[name]),
        "ffn_layer_time_min_vs_dense": min(layer_times[name]) / layer_dense_min,
    }
    if mcfg.moe is not None:
      tokens_per_layer = {"encoder": cfg.batch_size * cfg.inputs_length, "decoder": cfg.batch_size *
                          cfg.targets_length}
      row["groups"], row["capacity"] = {}, {}
      shards = partitioner.batch_shards
      for stack, n in tokens_per_layer.items():
        g = moe.num_groups(n, mcfg.moe.group_size, shards)
        row["groups"][stack] = g
        row["capacity"][stack] = moe.expert_capacity(n // g, mcfg.moe.num_experts, mcfg.moe.train_capacity_factor,
                                                     mcfg.moe.min_expert_capacity)
      sums = step.last_metrics
      row["fraction_dropped"] = float(sums["moe_fraction_dropped_sum"] / sums["weight_sum"])
    result["variants"][name] = row
  return result


def format_report(r: dict) -> str:
  lines = [f"device {bench.device_label(r)}, mesh {r['mesh']}, {r['dtype']}, batch {r['batch_size']}, "
           f"{r['inputs_length']}/{r['targets_length']}"]
  for name, v in r["variants"].items():
    extra = ""
    if "groups" in v:
      extra = (f"; groups enc/dec {v['groups']['encoder']}/{v['groups']['decoder']}, capacity "
               f"{v['capacity']['encoder']}/{v['capacity']['decoder']}, dropped {100 * v['fraction_dropped']:.1f}%")
    lines.append(f"{name:>24}: step {v['step_time_s'] * 1e3:8.1f} ms (min {v['step_time_min_s'] * 1e3:.1f}, max "
                 f"{v['step_time_max_s'] * 1e3:.1f}) = {v['step_time_vs_dense']:.2f}x dense (min: "
                 f"{v['step_time_min_vs_dense']:.2f}x); FFN sublayer fwd+bwd "
                 f"{v['ffn_layer_time_min_s'] * 1e3:.1f} ms = "
                 f"{v['ffn_layer_time_min_vs_dense']:.2f}x dense (min); "
                 f"{v['model_flops_per_step'] / 1e9:.1f} GFLOP/step = {v['model_flops_vs_dense']:.3f}x dense{extra}")
  return "\n".join(lines)
