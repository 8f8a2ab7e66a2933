"""`repeat-lm bench train`: time the compiled training step alone and report throughput and MFU.

The step is `state.make_train_step`, the very function the trainer runs. Data is synthetic, already on device;
nothing syncs with the host inside a timed round except the final block. Shapes: B batch, S / T encoder / decoder
lengths.
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from repeat_lm import bench
from repeat_lm.models import info
from repeat_lm.models.encoder_decoder import EncoderDecoderModel
from repeat_lm.train import flops, optim, partitioning, state as state_lib


# Activation dtypes a benchmark may request (T5Config.dtype); parameters stay float32.
ACTIVATION_DTYPES = ("float32", "bfloat16", "float16")
# The most warm-up steps `warm_up` runs while the process's peak memory still grows.
MAX_WARMUP_STEPS = 12


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  batch_size: int = 8
  inputs_length: int = 512
  targets_length: int = 114
  steps: int = 5            # Steps per timed round.
  rounds: int = 5           # Timed rounds; the median round gives the step time.
  warmup: int = 2           # Steps before the timed rounds at least; more while memory grows (warm_up).
  seed: int = 0

  def __post_init__(self):
    # Named as the command-line flags of `bench train` / `bench moe`, which set them one to one.
    bench.require_positive_ints(**{name: getattr(self, name)
                                   for name in ("batch_size", "inputs_length", "targets_length", "steps", "rounds")})
    if self.warmup < 0:
      raise ValueError(f"warmup={self.warmup}: must be >= 0.")


def synthetic_batch(cfg: BenchConfig, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Full-length, unpacked rows of random tokens (ids >= 2, so no padding or EOS)."""
  rng = np.random.default_rng(seed)
  b, s, t = cfg.batch_size, cfg.inputs_length, cfg.targets_length
  targets = rng.integers(2, vocab_size, size=(b, t), dtype=np.int32)
  return {
      "encoder_input_tokens": rng.integers(2, vocab_size, size=(b, s), dtype=np.int32),
      "decoder_target_tokens": targets,
      "decoder_input_tokens": np.concatenate([np.zeros((b, 1), np.int32), targets[:, :-1]], axis=1),
      "decoder_loss_weights": np.ones((b, t), np.int32),
  }


def peak_memory_bytes() -> tuple[int, str]:
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host peak RSS of the process"


class JaxStep:
  """A compiled repeat_lm train step with its state, ready to be timed in rounds."""

  def __init__(self, model: EncoderDecoderModel, cfg: BenchConfig, partitioner: partitioning.Partitioner,
               tx=None):
    self.model, self.cfg, self.partitioner = model, cfg, partitioner
    tx = tx or optim.make_optimizer(learning_rate=optim.make_schedule())
    host = synthetic_batch(cfg, model.vocab_size, cfg.seed)
    spec = {k: jax.ShapeDtypeStruct(v.shape, jnp.int32) for k, v in host.items()}
    self.layout = state_lib.layout(model, tx, partitioner, spec, cfg.seed)
    self.batch = state_lib.global_batch(host, self.layout.batch_shardings)
    self.state = state_lib.init_state(model, tx, self.layout, partitioner, spec, cfg.seed)
    self.step_fn = state_lib.make_train_step(model, tx, self.layout, partitioner, cfg.seed)
    start = time.perf_counter()
    with partitioner.activate():
      self.compiled = self.step_fn.jitted.lower(self.state, self.batch).compile()
    self.compile_time_s = time.perf_counter() - start
    self.last_metrics = None

  def run(self, steps: int) -> float:
    """Seconds for `steps` steps, blocking once at the end."""
    start = time.perf_counter()
    with self.partitioner.activate():
      for _ in range(steps):
        self.state, self.last_metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready(self.state)
    return time.perf_counter() - start


def warm_up(run: Callable[[int], float], minimum: int, limit: int = MAX_WARMUP_STEPS,
            peak_memory: Callable[[], int] = lambda: peak_memory_bytes()[0], settled: int = 3) -> int:
  """Run `minimum` steps (none if 0), and more until `settled` steps in a row leave the peak memory where it was
  (`limit` steps in all at most, `minimum` if more); returns how many ran.

  The process's memory can keep growing after the first steps, and growing it costs. On a 2-core family-26 EPYC
  host, T5 v1.1 small's float32 step (batch 8; steps counted from 0) grew the heap by 0.1 GB in each of steps 1-3
  and by 2.3 GB in step 4 (the allocator's free blocks no longer fitting a request): 5.2 s of page faults (system
  time), a 5.2 s step against 2.4 s. Its bfloat16 step grew by 2 GB in step 1 and again in step 4, after two steps
  that grew nothing (3.9-4.1 s steps against 1.5 s; nothing more in steps 5-15 of that run). A fixed two-step
  warm-up put such a step in the first timed round of every run (4.1-4.3 s against 2.3-2.5 s for the others, in
  float32) and a slow round into every median; hence three steady steps. It narrows the slow rounds down rather
  than ruling them out: in some runs a step after the warm-up still grew the heap (one slow round of five).
  """
  if minimum == 0:  # no warm-up asked for
    return 0
  if minimum > settled:
    run(minimum - settled)
  steps, steady = max(minimum - settled, 0), 0
  while True:  # the last `settled` of the `minimum` steps are the first ones watched
    before = peak_memory()
    run(1)
    steps += 1
    steady = steady + 1 if peak_memory() <= before else 0
    if steps >= minimum and (steady >= settled or steps >= limit):
      return steps


def summarize_times(step_times: Sequence[float], cfg: BenchConfig, flops_per_step: float,
                    peak: float) -> dict[str, float]:
  median = statistics.median(step_times)
  tokens = cfg.batch_size * (cfg.inputs_length + cfg.targets_length)
  return {
      "step_time_s": median,
      "step_time_min_s": min(step_times),
      "step_time_max_s": max(step_times),
      "round_step_times_s": list(step_times),
      "sequences_per_s": cfg.batch_size / median,
      "encoder_tokens_per_s": cfg.batch_size * cfg.inputs_length / median,
      "decoder_tokens_per_s": cfg.batch_size * cfg.targets_length / median,
      "tokens_per_s": tokens / median,
      "model_tflops_per_s": flops_per_step / median / 1e12,
      "mfu": flops_per_step / median / peak,
  }


def paired_speedups(ours_times: Sequence[float], hf_times: Sequence[float]) -> dict:
  """The speed-up round by round (Hugging Face's step time over ours in the round that ran beside it) and its median.

  On a shared 2-core host the machine's speed drifts over minutes: T5-small's bfloat16 step, one process with
  nothing beside it, took between about 2.9 and 3.4 s in spells lasting one to several 5-step rounds, and a matmul
  probe between the rounds moved with it (0.39-0.42 TFLOP/s). A round and its peer run within ~40 s of each other,
  so their ratio cancels most of that drift, where the ratio of the two medians can pair one side's fast spell with
  the other's slow one. `speedup_vs_hf` stays the ratio of medians.
  """
  ratios = [hf / ours for ours, hf in zip(ours_times, hf_times)]
  return {"speedup_vs_hf_by_round": ratios, "speedup_vs_hf_paired": statistics.median(ratios)}


def run_benchmark(model: EncoderDecoderModel, cfg: BenchConfig, *, compare_hf: bool = False,
                  partitioner: partitioning.Partitioner | None = None, profile_dir: str | None = None) -> dict:
  """Benchmark repeat_lm's step (and, interleaved round by round, Hugging Face's) on the same shapes.

  With `profile_dir`, one more round of repeat_lm's step runs under the JAX profiler after the timed rounds (so the
  tracing never slows a timed one) and its time is attributed to HLO ops (profile.py).
  """
  partitioner = partitioner or partitioning.Partitioner()
  mcfg = model.module.config
  if compare_hf:
    from repeat_lm.bench import hf as hf_lib
    hf_lib.check_comparable(mcfg)  # before anything is compiled or timed
    hf_lib.require_torch()  # likewise: the peer's process would only find torch missing after the compile
  flops_per_step = flops.train_flops_per_sequence(mcfg, cfg.inputs_length, cfg.targets_length) * cfg.batch_size
  peak, peak_source = flops.peak_flops_total(dtype=mcfg.dtype)
  if flops.known_peak_flops(jax.devices()[0]) is None:
    peak_source += f", the best of {cfg.rounds + 1} probes (before and between the timed rounds)"
  ours = JaxStep(model, cfg, partitioner)
  hf = None
  if compare_hf:
    hf = hf_lib.HfStep(mcfg, cfg)
  ours_times, hf_times, hf_peak = [], [], 0.0
  try:
    warmup_steps = warm_up(ours.run, cfg.warmup)
    if hf:
      hf.run(cfg.warmup)
      hf_peak = hf.matmul_rate(flops.PROBE_SIZES, 8)  # as repeat_lm's first probe (flops.matmul_rate)
    for _ in range(cfg.rounds):  # Interleaved, so both see the same machine conditions.
      ours_times.append(ours.run(cfg.steps) / cfg.steps)
      if hf:
        hf_times.append(hf.run(cfg.steps) / cfg.steps)
      peak = flops.reprobed_peak(peak, mcfg.dtype)
      if hf:  # the best of its probes too, as repeat_lm's peak
        hf_peak = max(hf_peak, hf.matmul_rate(flops.PROBE_SIZES, 3))
  finally:
    if hf:
      hf.close()
  profiled = None
  if profile_dir:
    from repeat_lm.bench import profile  # pylint: disable=import-outside-toplevel
    profiled = profile.profile_steps(ours.run, cfg.steps, ours.compiled.as_text(), profile_dir)
  memory, memory_source = peak_memory_bytes()
  result = {
      **bench.device_fields(),
      "mesh": dict(partitioner.mesh.shape),
      "dtype": mcfg.dtype,
      "batch_size": cfg.batch_size, "inputs_length": cfg.inputs_length, "targets_length": cfg.targets_length,
      "scan_layers": mcfg.scan_layers, "remat_policy": mcfg.remat_policy,
      "compile_time_s": ours.compile_time_s, "warmup_steps": warmup_steps,
      "model_flops_per_step": flops_per_step,
      "peak_flops": peak, "peak_flops_source": peak_source,
      "peak_memory_bytes": memory, "peak_memory_source": memory_source,
      "loss": float(ours.last_metrics["loss_sum"] / ours.last_metrics["weight_sum"]),
      **summarize_times(ours_times, cfg, flops_per_step, peak),
  }
  if profiled:
    flops_by_part = {part: n * cfg.batch_size
                     for part, n in flops.train_flops_by_part(mcfg, cfg.inputs_length, cfg.targets_length).items()}
    result["profile"] = {"dir": str(profile_dir), "wall_s_per_step": profiled["wall_s_per_step"],
                         "op_seconds_per_step": profiled["op_seconds_per_step"], "top": profiled["merged"][:15],
                         "parts": profile.time_by_part(profiled["ops"], flops_by_part, peak)}
  if hf:
    hf_summary = summarize_times(hf_times, cfg, flops_per_step, peak)
    result["hf"] = {k: hf_summary[k] for k in ("step_time_s", "step_time_min_s", "step_time_max_s",
                                               "round_step_times_s", "tokens_per_s", "mfu")}
    result["hf"]["torch_threads"] = hf.threads
    # Its own matmul peak (torch.matmul, the probe's sizes, in the dtype its matmuls run in) and its step's share of
    # it: the speed-up is the product of the two frameworks' matmul rates and of how close each step comes to its own.
    result["hf"]["matmul_peak_flops"] = hf_peak
    result["hf"]["mfu_of_own_peak"] = flops_per_step / hf_summary["step_time_s"] / hf_peak
    result["hf"]["autocast"] = hf_lib.AUTOCAST_DTYPES.get(mcfg.dtype)  # None: float32 throughout
    result["speedup_vs_hf"] = result["tokens_per_s"] / hf_summary["tokens_per_s"]
    result.update(paired_speedups(ours_times, hf_times))
  return result


def with_dtype(model: EncoderDecoderModel, dtype: str) -> EncoderDecoderModel:
  """'auto': float32 activations on CPU, else as is.

  float32 on CPU because that is the precision the issue's comparison (and the published one, docs/performance.md)
  is in, and every CPU runs it; the gins' bfloat16 is `--dtype=bfloat16`, fast where the CPU has bfloat16 dot
  instructions (AVX512-BF16, AMX), and then compared with Hugging Face under torch.autocast.
  """
  info.model_config(model)  # a gin binding MODEL to something else (a T5Config, a module) is named
  if dtype != "auto" and dtype not in ACTIVATION_DTYPES:
    raise ValueError(f"--dtype={dtype!r}: choose 'auto' or one of {', '.join(ACTIVATION_DTYPES)}.")
  if dtype == "auto":
    dtype = "float32" if jax.devices()[0].platform == "cpu" else model.module.config.dtype
  config = dataclasses.replace(model.module.config, dtype=dtype)
  return dataclasses.replace(model, module=model.module.clone(config=config))


def format_report(r: dict) -> str:
  lines = [
      f"device {bench.device_label(r)}, mesh {r['mesh']}, {r['dtype']}, batch {r['batch_size']}, "
      f"{r['inputs_length']}/{r['targets_length']}, scan={r['scan_layers']}, remat={r['remat_policy']}",
      f"compile {r['compile_time_s']:.1f}s; step {r['step_time_s'] * 1e3:.1f} ms "
      f"(min {r['step_time_min_s'] * 1e3:.1f}, max {r['step_time_max_s'] * 1e3:.1f}); "
      f"{r['tokens_per_s']:.0f} tokens/s; {r['model_tflops_per_s']:.3f} TFLOP/s; MFU {100 * r['mfu']:.1f}% of "
      f"{r['peak_flops'] / 1e12:.3f} TFLOP/s ({r['peak_flops_source']}); peak memory "
      f"{r['peak_memory_bytes'] / 2**30:.2f} GiB",
  ]
  if "hf" in r:
    autocast = f", torch.autocast {r['hf']['autocast']}" if r["hf"].get("autocast") else ""
    paired = bench.paired_speedup_label(r)
    lines.append(f"Hugging Face (PyTorch, {r['hf']['torch_threads']} threads{autocast}): step "
                 f"{r['hf']['step_time_s'] * 1e3:.1f} ms, {r['hf']['tokens_per_s']:.0f} tokens/s, "
                 f"MFU {100 * r['hf']['mfu']:.1f}%" + _own_peak_label(r["hf"]) +
                 f"; repeat_lm / HF = {r['speedup_vs_hf']:.2f}x"
                 + (f"; round by round {paired}" if paired else ""))
  if "profile" in r:
    p = r["profile"]
    lines.append(f"profile ({p['dir']}/ops.md, trace beside it): ops sum to {p['op_seconds_per_step']:.3f} s of "
                 f"{p['wall_s_per_step']:.3f} s per step; the largest, layers merged:")
    lines += [f"  {1e3 * t['seconds']:8.1f} ms  {t['kind']:<24} {t['shape']:<28} {t['source'][-90:]}"
              for t in p["top"][:10]]
    lines.append("per part of the model, against the time its model FLOPs take at the peak:")
    lines += [f"  {1e3 * row['seconds']:8.1f} ms  {row['part']:<36} floor {1e3 * row['floor_s']:8.1f} ms"
              for row in p.get("parts", [])]
  return "\n".join(lines)


def _own_peak_label(hf: dict) -> str:
  """' (X% of its own matmul probe, Y TFLOP/s)' where the result has the peer's probe (results from before it had
  none)."""
  if "matmul_peak_flops" not in hf:
    return ""
  return (f" ({100 * hf['mfu_of_own_peak']:.1f}% of its own torch.matmul probe, "
          f"{hf['matmul_peak_flops'] / 1e12:.3f} TFLOP/s)")


def compile_only(model: EncoderDecoderModel, cfg: BenchConfig,
                 partitioner: partitioning.Partitioner | None = None) -> dict:
  """Lower and compile the training step from abstract shapes (nothing allocated): the compile time of a size."""
  partitioner = partitioner or partitioning.Partitioner()
  tx = optim.make_optimizer(learning_rate=optim.make_schedule())
  spec = {k: jax.ShapeDtypeStruct(v.shape, jnp.int32)
          for k, v in synthetic_batch(dataclasses.replace(cfg, batch_size=1), model.vocab_size).items()}
  spec = {k: jax.ShapeDtypeStruct((cfg.batch_size, v.shape[1]), v.dtype) for k, v in spec.items()}
  start = time.perf_counter()
  layout = state_lib.layout(model, tx, partitioner, spec, cfg.seed)
  step_fn = state_lib.make_train_step(model, tx, layout, partitioner, cfg.seed)
  abstract_batch = {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=layout.batch_shardings[k])
                    for k, s in spec.items()}
  with partitioner.activate():
    lowered = step_fn.jitted.lower(layout.abstract, abstract_batch)
  lower_s = time.perf_counter() - start
  lowered.compile()
  mcfg = model.module.config
  return {"compile_time_s": time.perf_counter() - start, "lower_time_s": lower_s,
          "scan_layers": mcfg.scan_layers, "remat_policy": mcfg.remat_policy,
          "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(layout.abstract["params"]))),
          "batch_size": cfg.batch_size, "inputs_length": cfg.inputs_length, "targets_length": cfg.targets_length}
