"""`repeat-lm bench accelerator`: T5 v1.1 Base training-step variants on a GPU/TPU, each in a fresh process.

Measures, on whatever accelerator the process sees: scanned vs unrolled layers, each remat policy, the einsum vs the
cuDNN attention kernel, then the fastest of those at twice the batch. The fastest variant is the measured choice of
scan/remat/attention for that device; docs/performance_accelerator.md (+ .json) records every run, failed ones
(out of memory, a kernel's restriction) with their error. Results are written after every variant, so a run cut
short by a time limit keeps what it measured.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from repeat_lm import bench, files, runtime
from repeat_lm.bench import report

MODEL_GIN = "gin/models/t5_1_1_base.gin"
# T5Config.remat_policy's names (models/t5.py REMAT_POLICIES), here without importing JAX: this process leaves the
# accelerator to the variants' processes.
REMAT_POLICIES = ("none", "minimal", "full")


@dataclasses.dataclass(frozen=True)
class Variant:
  scan: bool
  remat: str
  attention: str | None  # T5Config.attention_implementation: None = einsum
  batch_size: int
  # The library kernel gets the padding as a boolean mask (T5Config.attention_padding_lengths=False), not lengths.
  padding_mask: bool = False

  @property
  def name(self) -> str:
    mask = " (padding mask)" if self.padding_mask else ""
    return (f"{'scan' if self.scan else 'unrolled'}, remat {self.remat}, {self.attention or 'einsum'} attention"
            f"{mask}, batch {self.batch_size}")

  @classmethod
  def parse(cls, spec: str) -> "Variant":
    """'scan|unrolled:REMAT:einsum|xla|cudnn[-mask]:BATCH', e.g. 'unrolled:none:cudnn:128'."""
    try:
      layers, remat, attention, batch = spec.split(":")
      kernel, _, mask = attention.partition("-")
      batch_size = int(batch)
      if (layers not in ("scan", "unrolled") or kernel not in ("einsum", "xla", "cudnn")
          or mask not in ("", "mask") or (mask and kernel == "einsum") or remat not in REMAT_POLICIES
          or batch_size < 1):
        raise ValueError(spec)
    except ValueError as e:
      raise ValueError(f"--variant={spec!r}: expected 'scan|unrolled:REMAT:einsum|xla|cudnn[-mask]:BATCH' with "
                       f"REMAT one of {', '.join(REMAT_POLICIES)} and BATCH >= 1, e.g. 'unrolled:none:cudnn:128' "
                       "('-mask': the padding as a boolean mask).") from e
    return cls(layers == "scan", remat, None if kernel == "einsum" else kernel, batch_size, bool(mask))

  def args(self, steps: int, rounds: int, model_gin: str = MODEL_GIN) -> list[str]:
    attention = "None" if self.attention is None else repr(self.attention)
    return [f"--gin_file={model_gin}", f"--batch_size={self.batch_size}", f"--steps={steps}", f"--rounds={rounds}",
            f"--gin.SCAN_LAYERS={self.scan}", f"--gin.REMAT_POLICY={self.remat!r}",
            f"--gin.t5.T5Config.attention_implementation={attention}",
            f"--gin.t5.T5Config.attention_padding_lengths={not self.padding_mask}"]


def base_variants(batch_size: int) -> list[Variant]:
  """Most informative first, so a run cut short still answers the main questions (remat, attention, scan)."""
  # On an H200 (2026-11-30): gin/runs/accelerator.gin's unrolled + no remat + cuDNN first (fastest, 155.5 ms at batch
  # 128), then the fastest scanned setting (176.3 ms) and its peer with the padding as a mask ([B, H, Q, K] bias,
  # 191.1 ms); einsum attention was 35% slower than cuDNN scanned (2026-11-28). Unrolled variants take about 3 minutes
  # each (their init and step compile), scanned ones about 40 s.
  return [Variant(False, "none", "cudnn", batch_size), Variant(True, "minimal", "cudnn", batch_size),
          Variant(True, "minimal", "cudnn", batch_size, True), Variant(True, "none", "cudnn", batch_size),
          Variant(True, "full", "cudnn", batch_size), Variant(True, "minimal", None, batch_size),
          Variant(False, "none", None, batch_size)]


def fastest(results: Sequence[dict]) -> dict | None:
  """The successful run with the most tokens/s (None if every run failed)."""
  ok = [r for r in results if "error" not in r]
  return max(ok, key=lambda r: r["tokens_per_s"]) if ok else None


def sweep(run: Callable[[Variant], dict], variants: Sequence[Variant], *, deadline: float,
          save: Callable[[list[dict]], None], larger_batch: bool = True) -> list[dict]:
  """Run each variant (run raises on failure) until `deadline` (time.monotonic()); then the fastest at 2x batch."""
  results: list[dict] = []

  def one(variant: Variant) -> None:
    start = time.monotonic()
    try:
      r = run(variant)
    except Exception as e:  # pylint: disable=broad-except  # a failed variant is a result (OOM, kernel limits)
      r = {"error": str(e)[-1500:]}
    r.update(variant=dataclasses.asdict(variant), name=variant.name, wall_s=time.monotonic() - start)
    results.append(r)
    save(results)

  for variant in variants:
    if time.monotonic() > deadline:
      break
    one(variant)
  best = fastest(results)
  if larger_batch and best is not None and time.monotonic() < deadline:
    v = Variant(**best["variant"])
    one(dataclasses.replace(v, batch_size=2 * v.batch_size))
  return results


def measure(out: str | Path, *, batch_size: int = 128, steps: int = 10, rounds: int = 3,
            time_budget_s: float = 480.0, variant_timeout_s: float = 300.0, variants: Sequence[Variant] = (),
            previous: Sequence[dict] = (), model_gin: str = MODEL_GIN) -> dict:
  """Run the sweep with each variant in its own process, rewriting OUT (.md) and OUT.json after every variant.

  `variants` replaces the default list (and then no 2x-batch run is added); `previous` are results of an earlier
  invocation on the same device (its JSON's "results"), kept in the table before the new ones.
  """
  bench.require_positive_ints(batch_size=batch_size, steps=steps, rounds=rounds)
  check_out(out)
  if time_budget_s <= 0 or variant_timeout_s <= 0:
    raise ValueError(f"--time_budget_s={time_budget_s} and --variant_timeout_s={variant_timeout_s} must be "
                     "positive.")
  if model_gin == MODEL_GIN and not runtime.accelerator_plugin_installed():
    # Checked without starting JAX here: this process must leave the accelerator's memory to the variants' processes.
    raise RuntimeError("bench accelerator times T5 v1.1 Base at batch 128, but no JAX GPU/TPU plugin is installed "
                       "(CPU only): install jax[cuda12] or jax[tpu] (pip install -e '.[gpu]'), or pass --gin_file "
                       "with a small model (e.g. gin/models/t5_1_1_tiny.gin) to try the command on CPU.")
  deadline = time.monotonic() + time_budget_s
  meta = {"date": datetime.date.today().isoformat(), "model_gin": model_gin, "steps": steps, "rounds": rounds,
          "versions": report.library_versions()}

  def run(variant: Variant) -> dict:
    return report.run_bench(variant.args(steps, rounds, model_gin), timeout_s=variant_timeout_s)

  def save(results: list[dict]) -> None:
    write({**meta, "results": [*previous, *results]}, out)

  results = sweep(run, list(variants) or base_variants(batch_size), deadline=deadline, save=save,
                  larger_batch=not variants)
  return {**meta, "results": [*previous, *results]}


def kernel_table(xplane: str | Path, steps: int, variant: str, top: int = 20) -> dict:
  """Device time per kernel kind (`loop_add_fusion.12` -> `loop_add_fusion`; library kernels by name) of a trace of
  `steps` steps, e.g. the OUT_DIR/step.xplane.pb that launch/accelerator_checks.sh writes with PROFILE=1."""
  from repeat_lm.bench import profile  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  seconds = profile.op_seconds(jax.profiler.ProfileData.from_file(str(xplane)))
  kinds, counts = collections.Counter(), collections.Counter()
  for name, s in seconds.items():
    kind = profile.op_kind(name)
    kinds[kind] += s / steps
    counts[kind] += 1
  return {"variant": variant, "steps": steps, "total_s": sum(kinds.values()),
          "rows": [{"kind": k, "seconds": v, "ops": counts[k]} for k, v in kinds.most_common(top)]}


def short_error(error: str) -> str:
  """One table cell for a failed variant: the allocation that ran out, a time-out, or the error's last line."""
  oom = re.search(r"Out of memory while trying to allocate ([\d.]+ ?[KMGT]i?B)", error)
  if oom:
    return f"out of memory (an allocation of {oom.group(1)})"
  timeout = re.search(r"did not finish in (\d+) s", error)
  if timeout:
    return f"not finished within {timeout.group(1)} s (compile included)"
  lines = error.strip().splitlines()
  # The command line's own message ('repeat-lm: error: ...') names the cause; lines after it are hints.
  cause = [line for line in lines if line.startswith("repeat-lm: error: ")]
  return (cause[-1][len("repeat-lm: error: "):] if cause else lines[-1] if lines else "failed")[:160].replace("|", "/")


def read_json(path: str | Path, flag: str) -> dict:
  """An earlier run's OUT.json (for --from_json / --previous), with an error that says what to pass instead."""
  path = Path(path)
  try:
    m = json.loads(path.read_text())
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{flag}={path}: no such file; pass the .json written beside an earlier "
                            "`bench accelerator --out=...md`.") from e
  except (json.JSONDecodeError, UnicodeDecodeError) as e:  # corrupt bytes: the decode error named no file
    raise ValueError(f"{flag}={path} is not JSON ({e}); pass the .json that `bench accelerator` wrote.") from e
  if not isinstance(m, dict) or not isinstance(m.get("results"), list):
    raise ValueError(f"{flag}={path} has no 'results' list: it is not a `bench accelerator` JSON.")
  return m


def check_out(out: str | Path) -> None:
  """Before measuring: OUT is the Markdown report and OUT.json beside it the results, both rewritten. A .json OUT
  would have its results overwritten by the report; an OUT.json of another kind (docs/performance.md's is `bench
  report`'s history of every host) would be replaced."""
  out = Path(out)
  if out.suffix == ".json":
    raise ValueError(f"--out={out} names the Markdown report, but its results are written to "
                     f"{out.with_suffix('.json')}: the report would overwrite them. Name a .md file, e.g. "
                     f"--out={out.with_suffix('.md')}.")
  # A directory (or a file where a folder should be) failed at the first variant's save, which stopped the sweep.
  files.check_writable_file(out, f"--out={out}")
  results = out.with_suffix(".json")
  files.check_writable_file(results, f"{results} (--out's results)")
  if results.exists():
    try:
      m = json.loads(results.read_text())
    except (OSError, ValueError):  # a directory, not UTF-8, not JSON
      m = None
    if not isinstance(m, dict) or not isinstance(m.get("results"), list):
      raise ValueError(f"--out={out} would replace {results}, which is not a `bench accelerator` JSON: choose another "
                       "--out (e.g. docs/performance_accelerator.md) or move that file aside.")


def write(m: dict, out: str | Path) -> None:
  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  # Each file is replaced whole: measure rewrites them after every variant, and a JSON cut by a kill (or a full disk)
  # mid-write would lose the rows measured so far, and stop the next run (check_out, --previous) until moved aside.
  files.atomic_write_bytes(out.with_suffix(".json"), json.dumps(m, indent=1, sort_keys=True).encode())
  files.atomic_write_bytes(out, to_markdown(m).encode())


def to_markdown(m: dict) -> str:
  ok = [r for r in m["results"] if "error" not in r]
  device = ok[0]["device"] if ok else "(no successful run)"
  dtype = ok[0]["dtype"] if ok else "?"
  lines = [
      "# Performance on an accelerator", "",
      f"Generated by `repeat-lm bench accelerator --out=docs/performance_accelerator.md` on {m['date']} "
      f"({', '.join(f'{k} {v}' for k, v in sorted(m['versions'].items()))}); {m['model_gin']}, "
      f"512/114 tokens, {dtype} activations, float32 parameters, Adafactor; the training step alone, "
      f"{m['rounds']} rounds of {m['steps']} steps after warm-up (median round). Device: **{device}**."
      + report.unpinned_note(m["versions"]), "",
      "| variant | batch | step time (ms) | tokens/s | model TFLOP/s | MFU | peak memory (GiB) | compile (s) |",
      "| --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  for r in m["results"]:
    if "error" in r:
      lines.append(f"| {r['name']} | {r['variant']['batch_size']} | failed: {short_error(r['error'])} | | | | | |")
      continue
    lines.append(
        f"| {r['name']} | {r['batch_size']} | {1e3 * r['step_time_s']:.1f} ({1e3 * r['step_time_min_s']:.1f}-"
        f"{1e3 * r['step_time_max_s']:.1f}) | {r['tokens_per_s']:,.0f} | {r['model_tflops_per_s']:.1f} | "
        f"{100 * r['mfu']:.1f}% | {r['peak_memory_bytes'] / 2**30:.1f} | {r['compile_time_s']:.1f} |")
  best = fastest(m["results"])
  if best is not None:
    lines += ["", f"Peak for MFU: {best['peak_flops'] / 1e12:.0f} TFLOP/s ({best['peak_flops_source']}). "
              f"Fastest: **{best['name']}** at batch {best['batch_size']}, {100 * best['mfu']:.1f}% MFU."]
  if "profile" in m:
    k = m["profile"]
    lines += ["", f"## Where the device time goes ({k['variant']})", "",
              # Which variant is in the heading: accelerator_checks.sh's PROFILE=1 has traced different ones over
              # time, so naming the script here credited a trace to a command that now makes another.
              f"A JAX profiler trace of {k['steps']} steps of that variant (`bench train --profile_dir`, read by "
              f"`bench accelerator --profile_xplane`); device time per step by kernel kind, "
              f"{1e3 * k['total_s']:.1f} ms in all:", "",
              "| ms/step | kernel kind | distinct ops |", "| --- | --- | --- |"]
    lines += [f"| {1e3 * r['seconds']:.2f} | `{r['kind'][:110]}` | {r['ops']} |" for r in k["rows"]]
  lines += ["", f"Each row is `repeat-lm bench train --gin_file={m['model_gin']} --batch_size=B "
            "--gin.SCAN_LAYERS=... --gin.REMAT_POLICY=... --gin.t5.T5Config.attention_implementation=... "
            "--gin.t5.T5Config.attention_padding_lengths=...` in a fresh process "
            "(`--variant=scan|unrolled:REMAT:einsum|xla|cudnn[-mask]:BATCH` picks rows; without it, the "
            "fastest of the default rows is repeated at twice the batch; `--previous=JSON` keeps the rows of an "
            "earlier run on the same device).", ""]
  return "\n".join(lines)
