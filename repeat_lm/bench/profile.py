"""Where a compiled step's time goes: a JAX profiler trace summed per HLO op, named by the optimized HLO.

`repeat-lm bench train --profile_dir=DIR` writes the trace (open it in TensorBoard or Perfetto) and DIR/ops.md, the
ops by total time, each with its shape and the JAX source op it came from (e.g. `encoder/layers_3/mlp/wi_0/dot_general`),
and a second table with the layers merged. This is how the CPU fixes in runtime.py and layers.py were found.
`time_by_part` adds the time per part of the model (encoder MLP, cross-attention core, logits, ...) against the
part's floor, the time its model FLOPs take at the peak: how far each part is from what the multipliers allow.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable
from pathlib import Path

import jax

from repeat_lm import files

# Profiler events that are bookkeeping or Python spans ('$file.py:line fn', which would count the step again), not
# HLO ops.
# Runtime events, not HLO ops. The PjRt CPU client's waits and argument handling appear only on a mesh of several
# devices (`Wait: pending_threads=3/8`, rendezvous): counted as ops, they were 40-45 ms of a 150-190 ms tiny step.
_NOT_OPS = re.compile(r"^\$|ThunkExecutor|ThreadpoolListener|^end: |Await$|^Wait\b|[Rr]endezvous|^ParseArguments|"
                      r"LaunchOnDevice|^AllocateOutputBuffers")
_HLO_LINE = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_KERNEL_SUFFIX = re.compile(r"_(\d+)$")  # XLA:GPU names the kernel of fusion `f.12` `f_12`


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
  """{instruction name: (shape, JAX op_name)} from optimized HLO text."""
  ops = {}
  for line in hlo_text.splitlines():
    m = _HLO_LINE.match(line)
    if m and m.group(1) not in ops:
      source = _OP_NAME.search(line)
      ops[m.group(1)] = (m.group(2), source.group(1) if source else "")
  return ops


def op_kind(op: str) -> str:
  """The kind of an HLO op, its name without the instance number: `loop_add_fusion.12` -> `loop_add_fusion`."""
  return re.sub(r"\.\d+$", "", op)


# Which part of the model (train/flops.py's PARTS) an op's JAX source op belongs to, by the module path in it;
# unrolled stacks name their layers `encoder/layers_3/`, scanned ones `encoder/while/body/closed_call/layers/`.
# First match wins (projections before cores).
_ENCODER, _DECODER = (rf"/{stack}/(?:[^/]+/)*?layers(?:_\d+)?/" for stack in ("encoder", "decoder"))
_PROJECTION = r"/(?:query|key|value|out)/"
_PART_PATTERNS = tuple((re.compile(pattern), part) for pattern, part in (
    (_ENCODER + "attention" + _PROJECTION, "encoder attention projections"),
    (_ENCODER + "attention/", "encoder attention core"),
    (_ENCODER + "mlp/", "encoder mlp"),
    (_DECODER + "self_attention" + _PROJECTION, "decoder self-attention projections"),
    (_DECODER + "self_attention/", "decoder self-attention core"),
    (_DECODER + "encoder_decoder_attention" + _PROJECTION, "cross-attention projections"),
    (_DECODER + "encoder_decoder_attention/", "cross-attention core"),
    (_DECODER + "mlp/", "decoder mlp"),
    # Untied output layer, or the tied embedding's attend (logits_via_embedding: the Switch gins).
    (r"/(?:logits_dense|token_embedder\.attend)/", "logits"),
))
# Ops outside those modules: norms, embeddings, the position bias, the loss, the optimizer, layout copies XLA made
# without a source op. They do no model FLOPs.
OTHER_PART = "everything else"


def part_of(source: str) -> str:
  """The model part (flops.PARTS, or OTHER_PART) of an op from its JAX source op name."""
  for pattern, part in _PART_PATTERNS:
    if pattern.search(source):
      return part
  return OTHER_PART


def time_by_part(ops: list[dict], flops_by_part: dict[str, float], peak_flops: float) -> list[dict]:
  """Per model part: profiled seconds per step, model FLOPs per step, and `floor_s`, the seconds those FLOPs take at
  `peak_flops` (a part's time can go below its floor only where its dots beat the peak probe).

  `ops` rows as profile_steps' (seconds per step and source); the rows follow `flops_by_part`'s order, then
  OTHER_PART.
  """
  seconds = collections.Counter()
  for row in ops:
    seconds[part_of(row["source"])] += row["seconds"]
  parts = [*flops_by_part, OTHER_PART]
  return [{"part": part, "seconds": seconds[part], "model_flops": flops_by_part.get(part, 0),
           "floor_s": flops_by_part.get(part, 0) / peak_flops} for part in parts]


def _xspace_events(trace_dir: Path) -> collections.Counter:
  """Seconds per HLO op in the newest trace in `trace_dir` (see op_seconds)."""
  paths = sorted(trace_dir.glob("**/*.xplane.pb"), key=lambda p: p.stat().st_mtime)
  if not paths:
    raise RuntimeError(f"The profiler wrote no .xplane.pb under {trace_dir}.")
  return op_seconds(jax.profiler.ProfileData.from_file(str(paths[-1])))


def op_seconds(profile: jax.profiler.ProfileData) -> collections.Counter:
  """Seconds per HLO op of a trace.

  On a GPU or TPU only the device planes count (the host's events there are launches, not the work), and a kernel is
  named by its `hlo_op` statistic (the event itself has the CUDA kernel's name), except inside a CUDA graph: there
  `hlo_op` is the whole `command_buffer_N`, and the kernel's own name, `loop_add_fusion_12` for the HLO fusion
  `loop_add_fusion.12`, says more (library kernels, cuBLAS's and cuDNN's, keep their own names).

  On CPU the ops run on XLA's host threads (the Python thread's events are the caller's), and XLA runs independent
  ops at once: two dots side by side on two cores each take twice as long as alone. Summed durations would count
  that time twice (the T5 v1.1 small step's ops summed to 1.5x its wall time); `shared_seconds` splits it instead.
  """
  planes = list(profile.planes)
  devices = [p for p in planes if p.name.startswith(("/device:GPU", "/device:TPU"))]
  if not devices:
    return shared_seconds([[(e.start_ns, e.start_ns + e.duration_ns, e.name) for e in line.events
                            if e.name and not _NOT_OPS.search(e.name)]
                           for plane in planes for line in plane.lines if line.name != "python"])
  seconds = collections.Counter()
  for plane in devices:
    for line in plane.lines:
      for event in line.events:
        hlo_op = str(dict(event.stats).get("hlo_op", event.name))
        name = _KERNEL_SUFFIX.sub(r".\1", event.name) if hlo_op.startswith("command_buffer") else hlo_op
        if name and not _NOT_OPS.search(name):
          seconds[name] += event.duration_ns / 1e9
  return seconds


def shared_seconds(lines: list[list[tuple[float, float, str]]]) -> collections.Counter:
  """Seconds per op from (start_ns, end_ns, name) events on several threads: every instant is split evenly among the
  ops running then, so the ops sum to the time any of them ran. An event that encloses others on its own thread (a
  while loop around its body) is their parent, not an op of its own, and is left out."""
  leaves = []
  for events in lines:
    open_events, parents = [], set()
    ordered = sorted(range(len(events)), key=lambda i: (events[i][0], -events[i][1]))
    for i in ordered:
      while open_events and events[open_events[-1]][1] <= events[i][0]:
        open_events.pop()
      if open_events:
        parents.add(open_events[-1])
      open_events.append(i)
    leaves += [events[i] for i in range(len(events)) if i not in parents]
  boundaries = sorted([(start, 1, i) for i, (start, _, _) in enumerate(leaves)] +
                      [(end, -1, i) for i, (_, end, _) in enumerate(leaves)])
  seconds, running, last = collections.Counter(), set(), 0.0
  for t, step, i in boundaries:
    for j in running:
      seconds[leaves[j][2]] += (t - last) / len(running) / 1e9
    last = t
    if step > 0:
      running.add(i)
    else:
      running.discard(i)
  return seconds


def profile_steps(run: Callable[[int], float], steps: int, hlo_text: str, out_dir: str | Path) -> dict:
  """Trace `run(steps)` into out_dir and attribute the time to HLO ops; returns the tables (seconds per step)."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  jax.profiler.start_trace(str(out_dir))
  try:
    wall = run(steps)
  finally:
    jax.profiler.stop_trace()
  seconds = _xspace_events(out_dir)
  ops = hlo_ops(hlo_text)
  per_op = [{"op": name, "seconds": s / steps, "shape": ops.get(name, ("?", ""))[0],
             "source": ops.get(name, ("", ""))[1]} for name, s in seconds.most_common()]
  merged = collections.Counter()
  for row in per_op:  # one row per source op and kernel kind, the layers merged
    merged[(re.sub(r"layers_\d+", "layers_N", row["source"]), op_kind(row["op"]), row["shape"])] += row["seconds"]
  result = {"wall_s_per_step": wall / steps, "op_seconds_per_step": sum(seconds.values()) / steps,
            "ops": per_op,
            "merged": [{"source": k[0], "kind": k[1], "shape": k[2], "seconds": v} for k, v in merged.most_common()]}
  files.atomic_write_bytes(out_dir / "ops.md", to_markdown(result).encode())  # a kill mid-write keeps the earlier one
  return result


def to_markdown(result: dict, top: int = 40) -> str:
  lines = [f"Wall {result['wall_s_per_step']:.3f} s per step; ops sum to {result['op_seconds_per_step']:.3f} s.", "",
           "## Layers merged", "", "| ms/step | kernel | shape | source op |", "| --- | --- | --- | --- |"]
  lines += [f"| {1e3 * r['seconds']:.1f} | {r['kind']} | {r['shape']} | {r['source']} |" for r in result["merged"][:top]]
  lines += ["", "## Every op", "", "| ms/step | op | shape | source op |", "| --- | --- | --- | --- |"]
  lines += [f"| {1e3 * r['seconds']:.1f} | {r['op']} | {r['shape']} | {r['source']} |" for r in result["ops"][:top]]
  return "\n".join(lines) + "\n"
