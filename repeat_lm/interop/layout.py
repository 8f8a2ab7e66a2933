"""Parameter-tree plumbing shared by the importers and exporters.

Converters work on flat '/'-joined paths in the *per-layer* layout: every layer i of a stack owns
'<stack>/layers_<i>/...' ('encoder/layers_3/mlp/wi_0/kernel'). A model stores its layers differently when it scans
them or shares parameters (see models/stack.py); `StackLayout.location(i)` says where layer i lives:
  unscanned, unshared          layers_<i>
  scanned                      layers[, u] (stacked on t5.PARAM_SCAN_AXIS), or layers/layers_<j>[, u] for MoE blocks
  shared groups of k layers    layers_<u> (unscanned) or layers[, u] (scanned), u = i // k (one copy per group)
`to_per_layer` / `from_per_layer` translate, so a checkpoint of any layout loads into a model of any layout (loading
distinct per-layer weights into a parameter-shared model is refused).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util
from flax.core import unfreeze

from repeat_lm.models import t5

STACKS = ("encoder", "decoder")
_LAYER = re.compile(r"^layers_(\d+)$")


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  tree = unfreeze(tree) if hasattr(tree, "unfreeze") else tree
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


@dataclasses.dataclass(frozen=True)
class StackLayout:
  """How one stack stores its layers' parameters."""
  num_layers: int
  scanned: bool = False
  block: int = 1  # layers per scan step / shared sub-block (MoE: sparse_every)
  share: int = 1  # consecutive layers sharing one parameter set (T5Config.param_share)

  def location(self, i: int) -> tuple[str, int | None]:
    """(path of layer i's subtree below the stack, index on the scan axis or None)."""
    if not self.scanned and self.share == 1:
      return f"layers_{i}", None
    unit = i // max(self.share, self.block)
    sub = f"/layers_{i % self.block}" if self.block > 1 else ""
    return ("layers" + sub, unit) if self.scanned else (f"layers_{unit}" + sub, None)


def layouts_for(config: Any) -> dict[str, StackLayout]:
  """The layouts of a T5Config (scan_layers, MoE blocks, param_share)."""
  from repeat_lm.models import stack  # pylint: disable=import-outside-toplevel
  moe = getattr(config, "moe", None)
  block = moe.sparse_every if moe is not None else 1
  out = {}
  for name, n in (("encoder", config.num_encoder_layers), ("decoder", config.num_decoder_layers)):
    share = stack.share_group_size(getattr(config, "param_share", "none"), n)
    out[name] = StackLayout(n, bool(config.scan_layers), block, share)
  return out


def infer_layouts(flat: Mapping[str, Any]) -> dict[str, StackLayout]:
  """Layouts read off the paths and shapes alone (parameter sharing cannot be seen; it is assumed absent)."""
  out = {}
  for name in STACKS:
    parts = [p.split("/") for p in flat if p.startswith(f"{name}/layers")]
    scanned = [q for q in parts if q[1] == "layers"]
    if scanned:
      block = _block_size(scanned)
      steps = np.shape(flat["/".join(scanned[0])])[t5.PARAM_SCAN_AXIS]
      out[name] = StackLayout(steps * block, True, block)
    else:
      indices = {int(m.group(1)) for q in parts if (m := _LAYER.match(q[1]))}
      out[name] = StackLayout(len(indices))
  return out


def _block_size(parts: list[list[str]]) -> int:
  """Layers per stored unit ('layers' or 'layers_<u>'): an MoE block keeps its layers one level down ('layers_<j>')."""
  subs = {q[2] for q in parts if len(q) > 3 and _LAYER.match(q[2])}
  return len(subs) if subs and all(len(q) > 3 and _LAYER.match(q[2]) for q in parts) else 1


def saved_layouts(flat: Mapping[str, Any], depths: Mapping[str, tuple[int, int]]) -> dict[str, StackLayout]:
  """The layouts of `flat`, a checkpoint of a model whose stacks had {stack: (layers, layers per parameter set)}.

  Where its own config says a stack shared parameters, each stored set is read as the layers that used it, so the
  checkpoint loads into a model that shares them differently or not at all (`shared_like` can only guess from the
  target model, which need not share).
  """
  out = infer_layouts(flat)
  for name, (num_layers, share) in depths.items():
    if share > 1 and name in out:
      block = _block_size([p.split("/") for p in flat if p.startswith(f"{name}/layers")])
      out[name] = StackLayout(num_layers, out[name].scanned, block, share)
  return out


def shared_like(flat: Mapping[str, Any], target: Mapping[str, StackLayout]) -> dict[str, StackLayout]:
  """The source layouts of `flat`, reading parameter sharing off the target model where it fits.

  Sharing leaves no trace in the paths, so `infer_layouts` takes one parameter set per layer: a checkpoint of a
  param_share model (layers_<u> or a 'layers' scan over groups) would then look like fewer, distinct layers, and
  loading it into the same model with the other scan setting refused its groups as unequal weights. A stack whose
  group count is exactly what the target's sharing gives is read with the target's sharing (and MoE blocks).
  """
  out = infer_layouts(flat)
  for name, lay in target.items():
    if lay.share == 1 or name not in out:
      continue
    groups = lay.num_layers // max(lay.share, lay.block)
    scanned = out[name].scanned
    if scanned:
      first = next(p for p in flat if p.startswith(f"{name}/layers/"))
      fits = np.shape(flat[first])[t5.PARAM_SCAN_AXIS] == groups
    else:
      fits = {int(m.group(1)) for p in flat if p.startswith(f"{name}/layers_")
              if (m := _LAYER.match(p.split("/")[1]))} == set(range(groups))
    if fits:
      out[name] = dataclasses.replace(lay, scanned=scanned)
  return out


def to_per_layer(flat: Mapping[str, Any], layouts: Mapping[str, StackLayout]) -> dict[str, Any]:
  """Any layout -> '<stack>/layers_<i>/...' (shared parameters are copied into every layer that uses them)."""
  out = {p: v for p, v in flat.items() if not _is_layer_path(p)}
  for name, lay in layouts.items():
    for i in range(lay.num_layers):
      loc, index = lay.location(i)
      prefix = f"{name}/{loc}/"
      for path, value in flat.items():
        if path.startswith(prefix):
          value = value if index is None else np.take(np.asarray(value), index, axis=t5.PARAM_SCAN_AXIS)
          out[f"{name}/layers_{i}/{path[len(prefix):]}"] = value
  return out


def from_per_layer(flat: Mapping[str, Any], layouts: Mapping[str, StackLayout]) -> dict[str, Any]:
  """'<stack>/layers_<i>/...' -> the given layouts. Layers sharing a parameter set must hold equal weights."""
  out = {p: v for p, v in flat.items() if not _is_layer_path(p)}
  for name, lay in layouts.items():
    slots: dict[str, dict[int | None, tuple[int, Any]]] = {}
    for path, value in flat.items():
      m = _LAYER.match(path.split("/")[1]) if path.startswith(f"{name}/layers_") else None
      if not m:
        continue
      i = int(m.group(1))
      loc, index = lay.location(i)
      key = f"{name}/{loc}/{path.split('/', 2)[2]}"
      slot = slots.setdefault(key, {})
      if index in slot:
        first, kept = slot[index]
        if not np.array_equal(np.asarray(kept), np.asarray(value)):
          raise ValueError(f"{name} layers {first} and {i} share parameters in this model (param_share) but the "
                           f"checkpoint holds different weights for them ({path}).")
      else:
        slot[index] = (i, value)
    for key, slot in slots.items():
      if None in slot:
        out[key] = slot[None][1]
      else:
        out[key] = np.stack([np.asarray(slot[u][1]) for u in sorted(slot)], axis=t5.PARAM_SCAN_AXIS)
  return out


def _is_layer_path(path: str) -> bool:
  parts = path.split("/")
  return len(parts) > 2 and parts[0] in STACKS and (parts[1] == "layers" or bool(_LAYER.match(parts[1])))


def match_target(flat: Mapping[str, Any], target_flat: Mapping[str, Any], source: str, *,
                 source_layouts: Mapping[str, StackLayout] | None = None,
                 target_layouts: Mapping[str, StackLayout] | None = None) -> dict[str, np.ndarray]:
  """Bring converted parameters (any layout) into the target's layout and check names and shapes.

  target_flat: the model's own parameters (arrays or ShapeDtypeStructs) as flat paths. Raises ValueError naming
  the missing, unexpected and mis-shaped parameters, so a wrong model gin is obvious.
  """
  if source_layouts is None:
    source_layouts = shared_like(flat, target_layouts) if target_layouts else infer_layouts(flat)
  per_layer = to_per_layer(flat, source_layouts)
  converted = from_per_layer(per_layer, target_layouts or infer_layouts(target_flat))
  missing = sorted(set(target_flat) - set(converted))
  unexpected = sorted(set(converted) - set(target_flat))
  wrong_shape = [f"{p}: checkpoint {tuple(np.shape(converted[p]))} vs model {tuple(target_flat[p].shape)}"
                 for p in sorted(set(converted) & set(target_flat))
                 if tuple(np.shape(converted[p])) != tuple(target_flat[p].shape)]
  if missing or unexpected or wrong_shape:
    lines = [f"The parameters of {source} do not fit the model (check that the model gin matches the checkpoint's "
             "architecture: sizes, layers, vocabulary, MLP activations, MoE layout, tied embeddings)."]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong_shape)):
      if items:
        lines.append(f"  {title} ({len(items)}): " + "; ".join(items[:8]) + (" ..." if len(items) > 8 else ""))
    raise ValueError("\n".join(lines))
  return {p: np.asarray(converted[p], dtype=np.dtype(target_flat[p].dtype)) for p in target_flat}
