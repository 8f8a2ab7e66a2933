"""Running a stack of T5 layers: dense or sparse FFNs, parameter sharing, scan and remat, MoE statistics.

Every layer is called as `layer(x, *broadcast_args, *its per-layer args) -> (x, stats)`, stats being a dict of
routing statistics for a sparse (MoE) layer and None for a dense one. The stack returns the summed statistics: out
of a Python loop, or as the stacked per-iteration outputs of `nn.scan` (not through `sow`, which T5X/flaxformer
cannot combine with scan).

Units of repetition:
- block: `MoeConfig.sparse_every` consecutive layers with one sparse FFN (1 layer for a dense model). A scanned stack
  scans over blocks, so each scan step has the same structure.
- parameter sharing (`T5Config.param_share`): 'none'; an int k: layers i and j share parameters iff i // k == j // k
  (consecutive groups of k layers, each group one parameter set used k times); 'all': k = number of layers. With MoE,
  k must be a multiple of the block, so groups share whole blocks. A shared group runs as an inner `nn.scan` with the
  parameters broadcast (one copy), separate dropout draws and separate decoding caches per application.

Parameter names: without sharing, unscanned layers are `layers_{i}` and scanned ones `layers` (stacked on axis 1),
exactly as in the dense model; a scanned block holds its layers as `layers/layers_{j}`. With sharing, `layers_{u}`
(unscanned) or `layers` (scanned, stacked over groups) holds the parameters of group u.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import partitioning as nn_partitioning

from repeat_lm import checks
from repeat_lm.models import moe

Array = jax.Array


def share_group_size(param_share: str | int, num_layers: int) -> int:
  """Layers per parameter set: 'none' -> 1, 'all' -> num_layers, k -> k."""
  if param_share in ("none", None):
    return 1
  if param_share == "all":
    return num_layers
  # A count, not a bool: True == 1, so param_share=True (meant as sharing) read as k = 1 and silently shared nothing.
  if checks.is_count(param_share):
    if num_layers % param_share:
      raise ValueError(f"param_share={param_share} does not divide a stack of {num_layers} layers.")
    return int(param_share)
  raise ValueError(f"param_share={param_share!r}; use 'none', 'all' or a positive int k (groups of k consecutive "
                   "layers share one set of parameters).")


class _Block(nn.Module):
  """Consecutive layers run as one unit (a scan step or a shared group); returns (x, summed stats).

  The last `num_per_layer` call arguments hold one entry per layer of the block (e.g. DropPath rates [b]).
  """
  layer_cls: Any
  config: Any
  sparse: tuple[bool, ...]
  num_per_layer: int = 0
  layer_kwargs: Any = None

  @nn.compact
  def __call__(self, x: Array, *args: Array):
    split = len(args) - self.num_per_layer
    shared_args, per_layer = args[:split], args[split:]
    stats = None
    for j, sparse in enumerate(self.sparse):
      layer = self.layer_cls(config=self.config, sparse=sparse, name=f"layers_{j}", **(self.layer_kwargs or {}))
      x, aux = layer(x, *shared_args, *(a[j] for a in per_layer))
      stats = moe.add_stats(stats, aux)
    return x, stats


def _total(stats: dict | None) -> dict | None:
  """Every statistic is one scalar per layer application; scans stack them ([steps] or [groups, repeats])."""
  return None if stats is None else jax.tree.map(jnp.sum, stats)


def run_layers(layer_cls: type[nn.Module], cfg: Any, num_layers: int, x: Array, *broadcast_args: Any,
               per_layer_args: Sequence[np.ndarray] = (), sparse: Sequence[bool], use_remat: bool = True,
               **layer_kwargs: Any) -> tuple[Array, dict | None]:
  """Apply `num_layers` layers (layer i sparse iff sparse[i]) with cfg's scan, remat and param_share settings.

  Layer i is called as layer(x, *broadcast_args, *(a[i] for a in per_layer_args)); per-layer arguments are numpy
  arrays [num_layers] (Python scalars in an unrolled stack, scanned inputs in a scan). Must be called from inside a
  compact method: the layers become children of that module.
  """
  from repeat_lm.models import t5  # noqa: PLC0415 (t5 imports this module)
  sparse = tuple(sparse)
  per_layer_args = tuple(np.asarray(a) for a in per_layer_args)
  if cfg.remat_policy != "none" and use_remat:
    # prevent_cse is only needed outside scan (inside, the loop already keeps XLA from merging recomputation).
    layer_cls = nn.remat(layer_cls, policy=t5.REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
  block = cfg.moe.sparse_every if any(sparse) else 1
  group = share_group_size(cfg.param_share, num_layers)
  if group > 1 and group % block:
    raise ValueError(f"param_share={cfg.param_share!r} splits the {block}-layer dense/sparse blocks of the MoE "
                     f"layout; use a multiple of MoeConfig.sparse_every={block} (or 'all').")
  if block > 1 and group == block:  # one dense/sparse block per group: its dense and sparse layers cannot share
    raise ValueError(f"param_share={cfg.param_share!r} makes groups of {group} layers, one dense/sparse block of "
                     f"MoeConfig.sparse_every={block} each, so no two layers of this {num_layers}-layer stack would "
                     f"share parameters; use a multiple of {2 * block} layers (blocks share whole).")
  per_axes = (nn.broadcast,) * len(broadcast_args) + (0,) * len(per_layer_args)

  if group == 1 and not cfg.scan_layers:
    stats = None
    for i in range(num_layers):
      layer = layer_cls(config=cfg, sparse=sparse[i], name=f"layers_{i}", **layer_kwargs)
      x, aux = layer(x, *broadcast_args, *(a[i].item() for a in per_layer_args))
      stats = moe.add_stats(stats, aux)
    return x, stats

  # The unit of one outer step: a shared group (repeats x block layers), else one block; per-layer arguments are
  # reshaped to [steps, repeats, block] accordingly, dropping the axes of size-1 structure.
  repeats, steps = group // block, num_layers // max(group, block)
  shape = (steps,) + ((repeats,) if repeats > 1 else ()) + ((block,) if block > 1 else ())
  per_layer_args = tuple(jnp.asarray(a.reshape(shape)) for a in per_layer_args)
  if block == 1:  # a single layer is its own unit (keeps the dense parameter layout)
    unit_cls, unit_kwargs = layer_cls, dict(config=cfg, sparse=sparse[0], **layer_kwargs)
  else:
    unit_cls, unit_kwargs = _Block, dict(layer_cls=layer_cls, config=cfg, sparse=sparse[:block],
                                         num_per_layer=len(per_layer_args), layer_kwargs=layer_kwargs)
  if repeats > 1:
    unit_cls = _repeat_shared(unit_cls, repeats, per_axes)

  if not cfg.scan_layers:
    stats = None
    for u in range(steps):
      x, aux = unit_cls(name=f"layers_{u}", **unit_kwargs)(x, *broadcast_args, *(a[u] for a in per_layer_args))
      stats = moe.add_stats(stats, aux)
    return x, _total(stats)
  scanned_cls = nn_partitioning.scan_with_axes(
      unit_cls,
      variable_axes={"params": t5.PARAM_SCAN_AXIS, "cache": 0},
      split_rngs={"params": True, "dropout": True},  # different init and dropout masks per step
      in_axes=per_axes,
      length=steps,
      axis_name="layers")
  x, stats = scanned_cls(name="layers", **unit_kwargs)(x, *broadcast_args, *per_layer_args)
  return x, _total(stats)


def _swap_repeats_and_batch(cache: Any) -> Any:
  """[repeats, B, L, H, E] <-> [B, repeats, L, H, E] on keys and values; the counters ([repeats]) stay."""
  return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1) if x.ndim >= 5 else x, cache)


def _repeat_shared(unit_cls, repeats: int, in_axes):
  """unit applied `repeats` times with one set of parameters: a scan that broadcasts 'params'.

  Each application keeps its own decoding cache; keys and values store the repeat axis after the batch axis, so the
  batch sits where T5X's beam search and sampling look for it (axis 0, or 1 under the stack's layer scan).
  """
  scanned = nn_partitioning.scan_with_axes(
      unit_cls,
      variable_broadcast="params",
      variable_axes={"cache": 0},
      split_rngs={"params": False, "dropout": True},
      in_axes=in_axes,
      length=repeats,
      axis_name="repeats")
  return nn.map_variables(scanned, "cache", trans_in_fn=_swap_repeats_and_batch,
                          trans_out_fn=_swap_repeats_and_batch, mutable=True)
