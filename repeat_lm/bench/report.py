"""`repeat-lm bench report`: regenerate docs/performance.md from measurements (never typed by hand)."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import tempfile
from pathlib import Path

from repeat_lm import bench, files, runtime
from repeat_lm.bench.profile import OTHER_PART

ZOO = ("small", "base", "large", "xl", "xxl")
# The speed-up over Hugging Face's step that repeat_lm's CPU step is held to (its performance issue): the report
# works out what step time, and how much time above the matmuls' floor, that allows.
TARGET_SPEEDUP_VS_HF = 1.25


# Each process-level setting of runtime.py switched off in turn (same command, same machine, one after another).
ABLATIONS = (
    ("as shipped", {}),
    # GLIBC_TUNABLES is inherited from this process (the CLI set it), so it is removed, not just not set.
    ("without the host allocator settings", {"REPEAT_LM_HOST_MALLOC": "0", "GLIBC_TUNABLES": None}),
    ("with YNNPACK fusions for dots only (XLA's tree reductions)",
     {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}),
    ("with YNNPACK fusions for dots, elementwise ops and reductions",
     {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=+dot,+eltwise,+reduce"}),
    ("with the attention core over the whole batch (no cache-sized slices)",
     {"REPEAT_LM_CPU_ATTENTION_CHUNKS": "0"}),
    ("with autodiff's backward layouts (models/cpu_layouts.py off)", {"REPEAT_LM_CPU_LAYOUTS": "0"}),
)


def merged_xla_flags(inherited: str, extra: str) -> str:
  """`inherited` XLA flags with `extra`'s added, each of `extra` replacing an inherited flag of the same name."""
  name = lambda flag: flag.split("=", 1)[0]  # noqa: E731
  added = extra.split()
  kept = [f for f in inherited.split() if name(f) not in {name(a) for a in added}]
  return " ".join(kept + added)


def run_bench(args: list[str], env: dict[str, str | None] | None = None, timeout_s: float | None = None) -> dict:
  """`bench train --json ARGS` in a fresh process, so each measurement starts from the same state; `env` entries
  set (or, when None, remove) environment variables; an XLA_FLAGS entry adds its flags to the inherited ones (each
  replacing one of the same name), so every row runs on the same devices: replaced whole, an inherited
  --xla_force_host_platform_device_count=8 was dropped from the YNNPACK rows alone, which ran on 1 device where the
  others ran on 8, and the table credited the difference to the setting. Raises RuntimeError with the end of stderr
  on failure."""
  env = dict(env or {})
  if env.get("XLA_FLAGS") is not None:
    env["XLA_FLAGS"] = merged_xla_flags(os.environ.get("XLA_FLAGS", ""), env["XLA_FLAGS"])
  environ = {k: v for k, v in {**runtime.child_env(), **env}.items() if v is not None}
  try:
    out = subprocess.run(runtime.cli_command("bench", "train", "--json", *args),
                         capture_output=True, text=True, check=False, env=environ, timeout=timeout_s)
  except subprocess.TimeoutExpired as e:
    raise RuntimeError(f"bench {' '.join(args)} did not finish in {timeout_s:.0f} s") from e
  if out.returncode:
    raise RuntimeError(f"bench {' '.join(args)} failed:\n{out.stderr[-2000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def library_versions() -> dict[str, str]:
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  versions = {}
  for name in ("jax", "jaxlib", "flax"):
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return versions


def pinned_versions() -> dict[str, str]:
  """The versions pyproject.toml pins for library_versions()' libraries ({} where the package is not installed)."""
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  try:
    requires = metadata.requires("repeat_lm") or []
  except metadata.PackageNotFoundError:
    return {}
  pins = (r.split(";")[0].strip().split("==") for r in requires if "extra ==" not in r)
  return {p[0]: p[1] for p in pins if len(p) == 2 and p[0] in ("jax", "jaxlib", "flax")}


def unpinned_note(versions: dict[str, str]) -> str:
  """A sentence where measured versions are not the pinned ones (a device machine's preinstalled libraries); ''."""
  pins = pinned_versions()
  off = {k: v for k, v in sorted(versions.items()) if k in pins and pins[k] != v}
  if not off:
    return ""
  return (" These are not the versions the project pins (" + ", ".join(f"{k}=={pins[k]}" for k in off) + "): the "
          "numbers hold for the versions measured; the pinned ones were not measured here.")


def measure(compare_hf: bool = True, steps: int = 3, rounds: int = 5) -> dict:
  small = ["--gin_file=gin/models/t5_1_1_small.gin", "--batch_size=8", f"--steps={steps}", f"--rounds={rounds}"]
  hf = ["--compare=hf"] if compare_hf else []
  with tempfile.TemporaryDirectory() as trace_dir:  # the trace itself is large; the table keeps what matters
    train = [run_bench(small + hf + [f"--profile_dir={trace_dir}"])]
  # The gins' own activation dtype, against Hugging Face under torch.autocast; MFU against a bfloat16 probe.
  train.append(run_bench(small + hf + ["--dtype=bfloat16"]))
  # Every row the same command in its own process, the shipped settings included: the timed rounds of train[0] ran
  # interleaved with Hugging Face's peer (a second process, its rounds between ours), which these do not.
  ablations = [(name, run_bench(small, env)) for name, env in ABLATIONS]
  compiles = [(size, run_bench([f"--gin_file=gin/models/t5_1_1_{size}.gin", "--gin.SCAN_LAYERS=True", "--compile_only",
                             "--batch_size=8"])) for size in ZOO]
  return {"train": train, "ablations": ablations, "compile": compiles, "steps": steps, "rounds": rounds}


def peak_runs(m: dict) -> dict[str, dict]:
  """Per activation dtype, the run whose process measured the highest peak (or had the table's): every row's MFU is
  against its dtype's peak, so rows measured in separate processes compare, and a probe caught in a slow spell never
  inflates one. (A bfloat16 probe multiplies about twice as fast as a float32 one on CPUs with bfloat16 dots.)"""
  best = {}
  for r in [*m["train"], *(r for _, r in m.get("ablations", []))]:
    if r["dtype"] not in best or r["peak_flops"] > best[r["dtype"]]["peak_flops"]:
      best[r["dtype"]] = r
  return best


def row_mfu(r: dict, peaks: dict[str, dict]) -> float:
  """A row's MFU against its dtype's peak (peak_runs), the MFU the tables print."""
  return r["model_flops_per_step"] / r["step_time_s"] / peaks[r["dtype"]]["peak_flops"]


def history_path(out: str | Path) -> Path:
  """Where the report at `out` keeps the training-step rows of every host it was generated on
  (docs/performance.md -> docs/performance.json): the project's CPU machines come with more than one processor
  model, and a report generated on one keeps the rows last measured on the others."""
  return Path(out).with_suffix(".json")


# What every history row must hold (numbers): the table of other hosts prints them.
HISTORY_ROW_KEYS = ("step_time_s", "step_time_min_s", "step_time_max_s", "tokens_per_s", "mfu")


# The other fields the table of other hosts prints, each with what it may hold (None: absent).
HISTORY_ROW_FIELDS = {
    "dtype": lambda v: isinstance(v, str),
    "hf_tokens_per_s": lambda v: v is None or isinstance(v, (int, float)),
    "speedup_vs_hf": lambda v: v is None or isinstance(v, (int, float)),
    "vs_hf_round_by_round": lambda v: v is None or isinstance(v, str),
    "hf_matmul_tflops": lambda v: v is None or isinstance(v, (int, float)),
    "hf_mfu_of_own_peak": lambda v: v is None or isinstance(v, (int, float)),
}


def read_history(path: Path) -> dict[str, dict]:
  """The host history at `path` ({host: {"date", "train": [rows]}}); {} where there is none yet."""
  if not path.exists():
    return {}
  try:
    hosts = json.loads(path.read_text())["hosts"]
    for host, entry in hosts.items():  # checked before measuring: the table of other hosts prints these
      rows = entry["train"]
      if not isinstance(rows, list):
        raise ValueError(f"no list of training rows for {host!r}")
      missing = sorted({k for r in rows for k in HISTORY_ROW_KEYS if not isinstance(r.get(k), (int, float))})
      if missing:
        raise ValueError(f"the training rows of {host!r} have no numbers for {missing}")
      # The other fields the table prints: a hand edit that breaks one would otherwise crash the report after it
      # has measured, and lose the measurements.
      if not isinstance(entry.get("date", ""), str):
        raise ValueError(f"the date of {host!r} is not a string")
      wrong = sorted({k for r in rows for k, ok in HISTORY_ROW_FIELDS.items() if not ok(r.get(k))})
      if wrong:
        raise ValueError(f"the training rows of {host!r} have unreadable {wrong}")
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise ValueError(f"{path}: not the host history `repeat-lm bench report` writes ({type(e).__name__}: {e}). "
                     "It was left as it is: restore it (e.g. `git checkout` it) or move it aside to start a new "
                     "one, then run the report again") from e
  return hosts


def history_entry(m: dict) -> dict:
  """This report's training-step rows as the history keeps them: what the table prints, MFU included."""
  peaks = peak_runs(m)
  keep = ("device", "dtype", "batch_size", "inputs_length", "targets_length", "step_time_s", "step_time_min_s",
          "step_time_max_s", "tokens_per_s", "model_tflops_per_s", "speedup_vs_hf")
  rows = [{**{k: r[k] for k in keep if k in r}, "mfu": row_mfu(r, peaks),
           "hf_tokens_per_s": r.get("hf", {}).get("tokens_per_s"),
           "vs_hf_round_by_round": bench.paired_speedup_label(r),
           "hf_matmul_tflops": hf_probe_tflops(r), "hf_mfu_of_own_peak": r.get("hf", {}).get("mfu_of_own_peak")}
          for r in m["train"]]
  return {"date": datetime.date.today().isoformat(), "versions": library_versions(), "train": rows}


def hf_probe_tflops(r: dict) -> float | None:
  """The Hugging Face peer's own matmul probe in TFLOP/s (bench/hf.torch_matmul_rate); None where not measured."""
  rate = r.get("hf", {}).get("matmul_peak_flops")
  return None if rate is None else rate / 1e12


def history_peak_tflops(r: dict) -> float | None:
  """The peak a history row's MFU was against, in TFLOP/s (its model FLOP/s over its MFU); None where the row
  cannot say."""
  rate, mfu = r.get("model_tflops_per_s"), r["mfu"]
  return rate / mfu if isinstance(rate, (int, float)) and mfu > 0 else None


def probes_cell(ours_tflops: float | None, hf_tflops: float | None, hf_share: float | None) -> str:
  """'repeat_lm's probe / Hugging Face's (TFLOP/s) | Hugging Face's step against its own probe' table cells; '-'
  for what was not measured."""
  number = lambda v, fmt: "-" if v is None else format(v, fmt)
  return (f"{number(ours_tflops, '.3f')} / {number(hf_tflops, '.3f')} | "
          f"{'-' if hf_share is None else f'{100 * hf_share:.1f}%'} |")


def host_of(m: dict) -> str:
  first = m["train"][0]
  return first.get("host", first["device"])


def other_hosts_lines(others: dict[str, dict]) -> list[str]:
  """The training-step rows last measured on other hosts (history entries), newest first."""
  if not others:
    return []
  lines = ["## On other hosts", "",
           "The same command's rows from the last report generated on each other processor model (kept in "
           "`performance.json` beside this file); each MFU is against that host's own measured peak.", "",
           "| host | date | dtype | step time (s) | tokens/s | MFU | HF tokens/s | vs HF | vs HF, round by round | "
           "matmul probe, repeat_lm / HF (TFLOP/s) | HF step of its own probe |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  nan = float("nan")
  for host, entry in sorted(others.items(), key=lambda item: item[1].get("date", ""), reverse=True):
    for r in entry["train"]:
      hf_rate = r.get("hf_tokens_per_s")
      lines.append(
          f"| {host} | {entry.get('date', '?')} | {r['dtype']} | {r['step_time_s']:.3f} "
          f"({r['step_time_min_s']:.3f}-{r['step_time_max_s']:.3f}) | {r['tokens_per_s']:.0f} | "
          f"{100 * r['mfu']:.1f}% | {nan if hf_rate is None else hf_rate:.0f} | "
          f"{nan if r.get('speedup_vs_hf') is None else r['speedup_vs_hf']:.2f}x | "
          f"{r.get('vs_hf_round_by_round') or '-'} | "
          + probes_cell(history_peak_tflops(r), r.get("hf_matmul_tflops"), r.get("hf_mfu_of_own_peak")))
  return lines + [""]


def parts_lines(r: dict, peak: float) -> list[str]:
  """The profiled step's time per model part against its floor (its model FLOPs at `peak`), and what the step
  would have to take to reach TARGET_SPEEDUP_VS_HF against the Hugging Face run beside it."""
  parts = r.get("profile", {}).get("parts")
  if not parts:
    return []
  lines = [f"The profiled {r['dtype']} step (below) per part of the model, against the part's floor: the time its "
           f"model FLOPs (`train/flops.py`) take at the peak, {peak / 1e12:.3f} TFLOP/s. \"{OTHER_PART}\" "
           "does no model FLOPs: norms, embeddings, the position bias, the loss, the optimizer and the layout copies "
           "XLA made without a source op.", "",
           "| part | ms/step | model GFLOP/step | floor (ms) | above the floor (ms) |", "| --- | --- | --- | --- | --- |"]
  for p in parts:
    floor = p["model_flops"] / peak
    lines.append(f"| {p['part']} | {1e3 * p['seconds']:.1f} | {p['model_flops'] / 1e9:.1f} | {1e3 * floor:.1f} | "
                 f"{1e3 * (p['seconds'] - floor):.1f} |")
  seconds, model_flops = sum(p["seconds"] for p in parts), sum(p["model_flops"] for p in parts)
  floor = model_flops / peak
  lines += [f"| all | {1e3 * seconds:.1f} | {model_flops / 1e9:.1f} | {1e3 * floor:.1f} | "
            f"{1e3 * (seconds - floor):.1f} |", ""]
  if "hf" in r:
    target = r["batch_size"] * (r["inputs_length"] + r["targets_length"]) / (
        TARGET_SPEEDUP_VS_HF * r["hf"]["tokens_per_s"])
    lines += [f"At {TARGET_SPEEDUP_VS_HF}x the tokens/s of Hugging Face's step in this run the step would take "
              f"{target:.3f} s, {100 * floor / target:.1f}% MFU: its matmuls at the peak take {floor:.3f} s of that, "
              f"which leaves {target - floor:.3f} s for everything above the floor, against "
              f"{seconds - floor:.3f} s in the profile.", ""]
  return lines


def to_markdown(m: dict, others: dict[str, dict] | None = None) -> str:
  """The report; `others` are the history entries of other hosts (read_history), tabled after this host's rows."""
  today = datetime.date.today().isoformat()
  peaks = peak_runs(m)
  best = peaks.get("float32") or next(iter(peaks.values()))
  mfu = lambda r: row_mfu(r, peaks)
  lines = [
      "# Performance", "",
      f"Generated by `repeat-lm bench report --out=docs/performance.md` on {today}; every number below was measured "
      "by that command (the training step alone, after warm-up, data on device; MFU from `train/flops.py`).", "",
      "## Training step", "",
      "| model | batch | device | dtype | step time (s) | tokens/s | model TFLOP/s | MFU | HF tokens/s | vs HF | "
      "vs HF, round by round | matmul probe, repeat_lm / HF (TFLOP/s) | HF step of its own probe |",
      "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  for r in m["train"]:
    hf = r.get("hf", {})
    lines.append(
        f"| T5 v1.1 small | {r['batch_size']} | {r['device']} | {r['dtype']} | {r['step_time_s']:.3f} "
        f"({r['step_time_min_s']:.3f}-{r['step_time_max_s']:.3f}) | {r['tokens_per_s']:.0f} | "
        f"{r['model_tflops_per_s']:.3f} | {100 * mfu(r):.1f}% | "
        f"{hf.get('tokens_per_s', float('nan')):.0f} | {r.get('speedup_vs_hf', float('nan')):.2f}x | "
        f"{bench.paired_speedup_label(r) or '-'} | "
        + probes_cell(peaks[r["dtype"]]["peak_flops"] / 1e12, hf_probe_tflops(r), hf.get("mfu_of_own_peak")))
  lines.append("")
  for dtype, r in peaks.items():
    lines += [f"Peak ({dtype} rows): {r['peak_flops'] / 1e12:.3f} TFLOP/s ({r['peak_flops_source']}; the highest "
              f"of the {dtype} processes here, so every {dtype} MFU is against the same peak).", ""]
  if any(hf_probe_tflops(r) is not None for r in m["train"]):
    lines += ["The matmul probes multiply square matrices of the same sizes in each framework's own process, in "
              "the dtype its step multiplies in: XLA's dot for repeat_lm (its peak above), `torch.matmul` for "
              "Hugging Face (the best of its probes beside the same rounds). The speed-up is the ratio of the two "
              "probes times the ratio of the two steps' shares of their own probe; the libraries behind the probes "
              "(YNNPACK in XLA; MKL's sgemm for PyTorch's float32, oneDNN for its bfloat16) run at different "
              "rates on different processors.", ""]
  if any(r.get("hf", {}).get("autocast") for r in m["train"]):
    lines += ["Hugging Face runs a bfloat16 row's activations under `torch.autocast` (float32 parameters and "
              "optimizer, matmuls in bfloat16), the mixed precision repeat_lm's bfloat16 runs.", ""]
  if "host" in best:
    lines += [f"Host: {best['host']}. CPU numbers hold for that processor only: the project's 2-core machines "
              "come with more than one processor model, whose float32 matmul peaks differ about 2x, and the share "
              "of the step spent waiting on memory rather than on the multipliers differs with it."
              + (" The rows last measured on other processor models are under \"On other hosts\"." if others else ""),
              ""]
  if all(r["device"].endswith("cpu") for r in m["train"]):
    lines += ["This file is measured on the CPU. Accelerator step times and MFU (T5 v1.1 Base on an H200: scan, "
              "remat and attention variants, where the device time goes) are in "
              "[performance_accelerator.md](performance_accelerator.md), written by `repeat-lm bench accelerator` "
              "on the GPU (`launch/accelerator_checks.sh` runs it with the GPU-only tests).", ""]
  if any("speedup_vs_hf_paired" in r for r in m["train"]):
    lines += ["\"vs HF\" divides the two median step rates; \"round by round\" is the median (and range) of Hugging "
              "Face's step time over repeat_lm's in each pair of rounds that ran one after the other, which cancels "
              "the host's drift between fast and slow spells (train.paired_speedups).", ""]
  timing = "".join(f" --{k}={m[k]}" for k in ("steps", "rounds") if k in m)  # what measure() ran, not the defaults
  # `bench report --no_hf` runs the rows without the peer: the command says so.
  compared = any("hf" in r for r in m["train"])
  lines += [f"Command: `repeat-lm bench train --gin_file=gin/models/t5_1_1_small.gin --batch_size=8{timing}"
            f"{' --compare=hf' if compared else ''}` (the bfloat16 row: `--dtype=bfloat16`"
            f"{'; the CPU-settings rows: without `--compare=hf`' if compared else ''})", ""]
  lines += other_hosts_lines(others or {})
  lines += ["## Where the time goes", ""]
  for r in m["train"][:1]:
    lines += parts_lines(r, peaks[r["dtype"]]["peak_flops"])
  lines += ["One more round of the step above under the JAX profiler (`--profile_dir`), time per HLO op with the "
            "layers merged, largest first:", "",
            "| ms/step | kernel | shape | source op |", "| --- | --- | --- | --- |"]
  for r in m["train"][:1]:
    profile = r.get("profile", {})
    lines += [f"| {1e3 * t['seconds']:.1f} | {t['kind']} | `{t['shape']}` | `{t['source']}` |"
              for t in profile.get("top", [])]
    if profile:
      lines += ["", f"The ops account for {profile['op_seconds_per_step']:.3f} s of a "
                f"{profile['wall_s_per_step']:.3f} s profiled step; where XLA ran two ops at once, each is given half "
                "of that time.", ""]
  lines += ["## What the CPU settings are worth", "",
            "The same T5 v1.1 small float32 step with each CPU setting (`repeat_lm/runtime.py`, "
            "`repeat_lm/models/cpu_layouts.py`) undone, one process each:", "",
            "| variant | step time (s) | tokens/s | MFU |", "| --- | --- | --- | --- |"]
  for name, r in m.get("ablations", []):
    lines.append(f"| {name} | {r['step_time_s']:.3f} ({r['step_time_min_s']:.3f}-{r['step_time_max_s']:.3f}) | "
                 f"{r['tokens_per_s']:.0f} | {100 * mfu(r):.1f}% |")
  lines += ["", "Variants: `REPEAT_LM_HOST_MALLOC=0` keeps glibc's default allocator; "
            "`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=...` replaces runtime.py's `+dot,+reduce` (added "
            "to XLA's default list; a list without signs replaces that list); "
            "`REPEAT_LM_CPU_ATTENTION_CHUNKS=0` runs the attention core over the whole batch instead of slices that "
            "fit the last-level cache; "
            "`REPEAT_LM_CPU_LAYOUTS=0` keeps autodiff's backward passes (slices included), whose weight and attention "
            "gradients XLA:CPU runs with Eigen instead of YNNPACK.", "",
            "## Compile time of the scanned training step (abstract shapes, nothing allocated)", "",
            "| model | parameters | lower (s) | lower + compile (s) |", "| --- | --- | --- | --- |"]
  for size, r in m["compile"]:
    lines.append(f"| T5 v1.1 {size} | {r['params']:,} | {r['lower_time_s']:.1f} | {r['compile_time_s']:.1f} |")
  lines += ["", "Command: `repeat-lm bench train --gin_file=gin/models/t5_1_1_SIZE.gin --gin.SCAN_LAYERS=True "
            "--compile_only --batch_size=8`", ""]
  return "\n".join(lines)


def check_out(out: str | Path) -> None:
  """Before measuring (half an hour): the report `out` and its history beside it (history_path) can be written. A
  directory, or a file where a folder should be, failed only after the measurement and lost it; a .json `out` is
  its own history path, and the history overwrote the report."""
  if Path(out).suffix == ".json":
    raise ValueError(f"--out={out} names the Markdown report, but the history of every host is written to "
                     f"{history_path(out)}: it would overwrite the report. Name a .md file, e.g. "
                     f"--out={Path(out).with_suffix('.md')}.")
  files.check_writable_file(out, f"--out={out}")
  files.check_writable_file(history_path(out), f"{history_path(out)} (--out's history of every host)")


def write(out: str | Path, compare_hf: bool = True) -> dict:
  """Measure, then write the report to `out` and this host's rows into its history (history_path)."""
  check_out(out)
  path = history_path(out)
  history = read_history(path)  # before measuring: a damaged history stops the run before its half hour, not after
  m = measure(compare_hf=compare_hf)
  host = host_of(m)
  others = {h: entry for h, entry in history.items() if h != host}
  files.atomic_write_bytes(Path(out), to_markdown(m, others).encode())
  # Replaced whole, so an interrupted write never loses the other hosts' rows.
  files.atomic_write_bytes(Path(path), (json.dumps({"hosts": {host: history_entry(m), **others}}, indent=1) +
                                        "\n").encode())
  return m
