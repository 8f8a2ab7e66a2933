"""One FLOP counter for everything shown to users (PaLM's model FLOPs, Chowdhery et al. 2022), and device peaks for MFU.

Model FLOPs: 2 per multiply-add, training = 3 x forward, no remat recomputation. Names: d = d_model,
a = heads x head_dim, f = d_ff, k = number of MLP input projections (3 for gated, 2 for plain ReLU: wi and wo
count as k matrices d x f), S_e / S_d = encoder / decoder lengths, V = vocabulary.

Sparse (MoE) layers replace the FFN term by the router (2 d E per token) plus the K chosen experts' FFNs; capacity
padding, dropped tokens and dispatch are not counted (model FLOPs, as MFU counts them). Parameter sharing changes no
FLOPs.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from repeat_lm import checks
from repeat_lm.models import cpu_layouts


def _dims(config) -> tuple[int, int, int, int, int]:
  d = config.emb_dim
  a = config.num_heads * config.head_dim
  f = config.mlp_dim
  k = len(config.mlp_activations) + 1
  return d, a, f, k, config.vocab_size


def ffn_flops_per_token(config, sparse: bool = False) -> int:
  """Forward FLOPs of one token through a dense FFN, or through a sparse layer's router and its K experts."""
  d, _, f, k, _ = _dims(config)
  if not sparse:
    return 2 * k * d * f
  moe_cfg = config.moe
  expert_k = len(moe_cfg.expert_activations) + 1
  return 2 * d * moe_cfg.num_experts + moe_cfg.num_selected_experts * 2 * expert_k * d * moe_cfg.expert_mlp_dim


# The parts of the model the counter (and `bench train --profile_dir`'s table of time per part) splits FLOPs into.
PARTS = ("encoder attention projections", "encoder attention core", "encoder mlp",
         "decoder self-attention projections", "decoder self-attention core",
         "cross-attention projections", "cross-attention core", "decoder mlp", "logits")


def encoder_layer_parts(config, s_e: int, sparse: bool = False) -> dict[str, int]:
  d, a, _, _, _ = _dims(config)
  return {"encoder attention projections": s_e * 8 * d * a, "encoder attention core": 4 * s_e * s_e * a,
          "encoder mlp": s_e * ffn_flops_per_token(config, sparse)}


def decoder_layer_parts(config, s_e: int, s_d: int, sparse: bool = False) -> dict[str, int]:
  d, a, _, _, _ = _dims(config)
  return {"decoder self-attention projections": s_d * 8 * d * a, "decoder self-attention core": 4 * s_d * s_d * a,
          # Q/O on decoder tokens, K/V over encoder tokens.
          "cross-attention projections": s_d * 4 * d * a + s_e * 4 * d * a,
          "cross-attention core": 4 * s_d * s_e * a,
          "decoder mlp": s_d * ffn_flops_per_token(config, sparse)}


def check_lengths(s_e: int, s_d: int) -> None:
  """Both lengths whole numbers >= 1 (`model-info` checks its flags with this): the terms are polynomials in the
  lengths, so a negative one still gave a positive count (-10 inputs: 5.6M FLOPs where 512 give 77M), a float a
  fractional count, True one token, and 0 + 0 a ZeroDivisionError in FLOPs per token."""
  if not (checks.is_count(s_e) and checks.is_count(s_d)):
    raise ValueError(f"inputs_length={s_e!r} and targets_length={s_d!r}: FLOPs per sequence need whole-number "
                     "lengths >= 1.")


def forward_flops_by_part(config, s_e: int, s_d: int) -> dict[str, int]:
  """Forward FLOPs of one sequence per part of the model (PARTS, in that order)."""
  check_lengths(s_e, s_d)
  from repeat_lm.models import moe  # noqa: PLC0415 (keeps this module importable without flax models)
  d, _, _, _, v = _dims(config)
  moe_cfg = getattr(config, "moe", None)
  parts = dict.fromkeys(PARTS, 0)
  layers = [encoder_layer_parts(config, s_e, sparse)
            for sparse in moe.sparse_layer_flags(config.num_encoder_layers, moe_cfg)]
  layers += [decoder_layer_parts(config, s_e, s_d, sparse)
             for sparse in moe.sparse_layer_flags(config.num_decoder_layers, moe_cfg)]
  for layer in layers:
    for name, n in layer.items():
      parts[name] += n
  parts["logits"] = 2 * s_d * d * v
  return parts


def forward_flops_per_sequence(config, s_e: int, s_d: int) -> int:
  return sum(forward_flops_by_part(config, s_e, s_d).values())


def train_flops_by_part(config, s_e: int, s_d: int) -> dict[str, int]:
  return {name: 3 * n for name, n in forward_flops_by_part(config, s_e, s_d).items()}


def train_flops_per_sequence(config, s_e: int, s_d: int) -> int:
  return 3 * forward_flops_per_sequence(config, s_e, s_d)


# Dense bf16 peaks in FLOP/s per chip (the vendors' data sheets), matched against `device.device_kind`. The H100's 989
# is the SXM part's; the PCIe and NVL cards run slower clocks, so they are listed as unknown (a measured peak) rather
# than given SXM's number.
PEAK_FLOPS: dict[str, float | None] = {
    "A100": 312e12,
    "H100 PCIe": None,
    "H100 NVL": None,
    "H100": 989e12,
    "H200 NVL": None,  # 1671 TFLOP/s with sparsity on NVIDIA's sheet, ~836 dense: not the SXM part's 989
    "H200": 989e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def known_peak_flops(device: jax.Device) -> float | None:
  kind = device.device_kind.lower()
  for name in sorted(PEAK_FLOPS, key=len, reverse=True):  # Longest match first: 'TPU v5 lite' before 'TPU v5'.
    # The name must end where a word of the kind ends: 'NVIDIA RTX A1000' is a small workstation card, not an A100.
    if re.search(re.escape(name.lower()) + r"(?![0-9a-z])", kind):
      return PEAK_FLOPS[name]
  return None


def probe_product(a: jax.Array) -> jax.Array:
  """a @ a in the form every CPU dot of the models takes (cpu_layouts.wide_matmul, float32 accumulation): a bfloat16
  product returned in bfloat16 runs a slower kernel there and would understate the peak."""
  return cpu_layouts.wide_matmul(a, a)


# The square sizes of the CPU peak probe (and of the Hugging Face peer's probe of torch.matmul, bench/hf.py).
PROBE_SIZES = (2048, 3072)


def matmul_rate(sizes: tuple[int, ...] = PROBE_SIZES, dtype: str = "float32", repeats: int = 8) -> float:
  """FLOP/s of large square matmuls on the first device: the CPU's practical peak, where no table entry exists.

  The best over sizes and runs: other load on the machine only ever slows a run down, and on the 2-core test
  machine probes read anywhere between 0.37 and 0.51 TFLOP/s from one process to the next. `dtype` is the
  operands' (the model's activation dtype): CPUs with bfloat16 dot instructions multiply bfloat16 about twice as fast.
  """
  def product_of(n):
    x = jax.random.uniform(jax.random.key(0), (n, n), dtype)
    f = jax.jit(probe_product)
    return lambda: f(x).block_until_ready()
  return fastest_square_product(product_of, sizes, repeats)


def fastest_square_product(product_of: Callable[[int], Callable[[], object]], sizes: tuple[int, ...],
                           repeats: int) -> float:
  """FLOP/s (2 n^3 per n x n by n x n product) of the fastest of `repeats` timed runs at each size, after one
  untimed run per size (compilation, allocation, the kernel's choice). `product_of(n)` returns a function that runs
  one product to completion: this module's JAX probe and the Hugging Face peer's torch.matmul probe (bench/hf.py)."""
  best_rate = 0.0
  for n in sizes:
    product = product_of(n)
    product()
    for _ in range(repeats):
      start = time.perf_counter()
      product()
      best_rate = max(best_rate, 2 * n**3 / (time.perf_counter() - start))
  return best_rate


# The trainer's probe, for the MFU it logs: of the full probe's two sizes the one that reads higher on the 2-core
# hosts, three runs. 0.4 s there against the full probe's 4.3 s, which every CPU training process paid once (a smoke
# run, the demo, each run of a sweep).
QUICK_PROBE = {"sizes": (2048,), "repeats": 3}


@functools.lru_cache(maxsize=None)
def measured_matmul_peak(quick: bool = False, dtype: str = "float32") -> float:
  """matmul_rate() of `dtype` operands measured once per process; `quick` (the trainer) probes one size three
  times instead. Benchmarks take the full probe and probe again beside their rounds."""
  return matmul_rate(**QUICK_PROBE, dtype=dtype) if quick else matmul_rate(dtype=dtype)


def peak_flops_total(quick: bool = False, dtype: str = "float32") -> tuple[float, str]:
  """(peak FLOP/s of all devices of the job, where the number came from).

  Accelerators: the table's per-chip peak times the chip count. CPU: the measured matmul rate of `dtype` operands
  (the model's activation dtype), once per host, because forced host-platform "devices"
  (XLA_FLAGS=--xla_force_host_platform_device_count) share the same cores; `quick` for a number that is logged, not
  reported (measured_matmul_peak).
  """
  device = jax.devices()[0]
  peak = known_peak_flops(device)
  if peak is not None:
    return peak * jax.device_count(), f"table: {jax.device_count()} x {device.device_kind}"
  dtype = jnp.dtype(dtype).name
  copies, where = _probe_copies(device)
  return (measured_matmul_peak(quick, dtype) * copies,
          f"measured {dtype} matmul{' (quick probe)' if quick else ''} on {where}")


def _probe_copies(device: jax.Device) -> tuple[int, str]:
  """How many times the job holds what one matmul probe measured, and how to say so. CPU: one probe per host, whose
  forced "devices" share its cores. An accelerator missing from the table: the probe ran on one chip, and the job
  has jax.device_count() of them."""
  if device.platform == "cpu":
    return jax.process_count(), f"{jax.process_count()} x {device.device_kind} host(s)"
  return jax.device_count(), f"1 of {jax.device_count()} x {device.device_kind}"


def reprobed_peak(peak: float, dtype: str = "float32") -> float:
  """A measured (CPU) peak raised to a fresh, shorter probe of `dtype` operands where that is faster; a table peak
  is returned as is.

  The CPU's speed drifts over minutes (shared machines), so a benchmark probes beside each of its timed rounds and
  keeps the best: the MFU it reports is then never inflated by one probe taken in a slow spell.
  """
  device = jax.devices()[0]
  if known_peak_flops(device) is not None:
    return peak
  copies, _ = _probe_copies(device)
  return max(peak, matmul_rate(dtype=jnp.dtype(dtype).name, repeats=3) * copies)
