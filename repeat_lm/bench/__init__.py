"""Benchmarks that ship with the library: the training step (`train.py`) and its Hugging Face peer (`hf.py`).

Here: flag checks and what every result says it ran on (`device_fields`), shared by the benchmark commands.
"""

import os
import platform

import jax

from repeat_lm import checks


def require_positive_ints(**flags) -> None:
  """Raise, naming the command-line flag, unless each value is an integer >= 1 (a bool is not a count)."""
  for name, value in flags.items():
    if not checks.is_count(value):
      raise ValueError(f"--{name}={value!r}: must be a positive integer.")


def usable_cpus() -> int:
  """The CPUs this process may run on (its affinity set: a cpuset or taskset can hold fewer than the host has)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def host_cpu(cpuinfo: str = "/proc/cpuinfo") -> str:
  """The host's processor as benchmarks report it: 'AMD EPYC (family 25, model 17), 2 CPUs, 32 MiB last-level cache'.

  CPU results hold only for the processor they ran on: this project's 2-core machines are drawn from hosts whose
  float32 matmul peak differs 2x (the same 'AMD EPYC' name, families 25 and 26), so every CPU number names it. The
  family and model come from /proc/cpuinfo (Linux; elsewhere `platform.processor()`), the count from the CPUs this
  process may run on, the cache from sysfs (left out where the kernel lists none).
  """
  from repeat_lm.models import cpu_layouts  # pylint: disable=import-outside-toplevel
  fields = {}
  try:
    with open(cpuinfo, encoding="utf-8", errors="replace") as f:
      for line in f:
        key, sep, value = line.partition(":")
        if not sep:
          if fields:  # the first processor's block is enough: a VM's CPUs are alike
            break
          continue
        fields.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  name = fields.get("model name") or platform.processor() or platform.machine() or "unknown processor"
  if "cpu family" in fields and "model" in fields:
    name += f" (family {fields['cpu family']}, model {fields['model']})"
  cpus = usable_cpus()
  described = f"{name}, {cpus} CPUs"
  caches = cpu_layouts.listed_cache_bytes()
  return described + (f", {max(caches) / 2**20:g} MiB last-level cache" if caches else "")


def device_fields() -> dict[str, str]:
  """What a benchmark result says it ran on: `device` ('1 x cpu', '8 x NVIDIA H100 80GB HBM3'), and on CPU `host`."""
  fields = {"device": f"{jax.device_count()} x {jax.devices()[0].device_kind}"}
  if jax.devices()[0].platform == "cpu":
    fields["host"] = host_cpu()
  return fields


def device_label(result: dict) -> str:
  """`device_fields` in one phrase for a report line: '1 x cpu (AMD EPYC (family 25, model 17), 2 CPUs, ...)'."""
  return result["device"] + (f" ({result['host']})" if "host" in result else "")


def paired_speedup_label(result: dict) -> str | None:
  """The round-by-round speed-up (train.paired_speedups) in one phrase, '1.23x (1.20-1.24)': the median and the
  range of the per-round ratios; None for a result without them (no --compare=hf, or from before they existed)."""
  if "speedup_vs_hf_paired" not in result:
    return None
  rounds = result["speedup_vs_hf_by_round"]
  return f"{result['speedup_vs_hf_paired']:.2f}x ({min(rounds):.2f}-{max(rounds):.2f})"
