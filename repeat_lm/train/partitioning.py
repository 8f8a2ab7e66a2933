"""Device mesh and logical-axis sharding (T5X-compatible logical names).

Parameters and activations are annotated with *logical* axis names ('embed', 'mlp', 'heads', ...). A list of
logical axis rules maps each logical name to a mesh axis ('data' or 'model') or to None (replicated). The same
rules drive `nn.with_logical_constraint` inside the model and the `NamedSharding` of parameters, optimizer state
and batches here, so changing the mesh never changes the model code.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax.linen import partitioning as nn_partitioning
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LogicalRules = Sequence[tuple[str, str | None]]

# Mesh axes, in order. 'data' shards the batch (and, with FSDP-style rules, parameters); 'model' shards heads and
# MLP hidden units (Megatron-style tensor parallelism).
MESH_AXES = ("data", "model")


def standard_logical_axis_rules(*, fsdp: bool = False) -> list[tuple[str, str | None]]:
  """T5X's standard rules: 1D tensor parallelism on 'model', batch on 'data'.

  With `fsdp=True` the 'embed' dimension is also sharded over 'data' (ZeRO-3 style, T5X's "2D parameter
  partitioning"). Activations annotated ('batch', 'length', 'embed') then cannot use 'data' twice; flax resolves the
  conflict by leaving the later name ('embed') unsharded, which is what we want.
  """
  rules: list[tuple[str, str | None]] = [
      ("batch", "data"),
      ("vocab", "model"),
      ("mlp", "model"),
      ("heads", "model"),
      ("kv", None),
      ("joined_kv", "model"),
      ("embed", None),
      ("relpos_buckets", None),
      ("length", None),
      ("layers", None),
      ("stack", None),
      ("mlp_activations", None),
      # MoE names (T5X's MoE partitioner); experts go to 'model' until an 'expert' mesh axis exists.
      ("expert", None),
      ("expert_mlp", "model"),
      ("expert_replicas", None),
      ("unmodeled", None),
  ]
  if fsdp:
    rules = [(k, "data") if k == "embed" else (k, v) for k, v in rules]
  return rules


def make_mesh(data: int = -1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'model') mesh; -1 on one axis means 'all remaining devices'."""
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  dims = [data, model]
  if dims.count(-1) > 1:
    raise ValueError(f"Mesh shape data={data}, model={model}: at most one axis may be -1.")
  known = math.prod(d for d in dims if d != -1)
  if known <= 0 or n % known:
    raise ValueError(
        f"Mesh shape data={data}, model={model} does not divide the {n} available devices; choose sizes whose "
        f"product divides {n} (use -1 for one axis to take the rest).")
  dims = [n // known if d == -1 else d for d in dims]
  if math.prod(dims) != n:
    raise ValueError(f"Mesh shape {dims} uses {math.prod(dims)} devices but {n} are available; use -1 for one axis.")
  try:
    device_array = mesh_utils.create_device_mesh(dims, devices=devices)
  except Exception:  # CPU / odd topologies: plain row-major order is fine.
    device_array = np.asarray(devices).reshape(dims)
  return Mesh(device_array, MESH_AXES)


class Partitioner:
  """Owns the mesh and the logical axis rules; turns logical annotations into shardings."""

  def __init__(self, data_parallel: int = -1, model_parallel: int = 1, fsdp: bool = False,
               logical_axis_rules: LogicalRules | None = None, devices: Sequence[jax.Device] | None = None):
    self.mesh = make_mesh(data_parallel, model_parallel, devices)
    self.rules = list(logical_axis_rules) if logical_axis_rules is not None else standard_logical_axis_rules(
        fsdp=fsdp)

  @property
  def data_size(self) -> int:
    return self.mesh.shape["data"]

  def axis_rules(self):
    """Context manager under which `nn.with_logical_constraint` resolves names with these rules."""
    return nn_partitioning.axis_rules(self.rules)

  @contextlib.contextmanager
  def activate(self):
    """Mesh + rules for tracing the model. `jax.set_mesh` is what makes flax's logical activation constraints
    real; the legacy `with mesh:` alone lets flax skip them silently."""
    with jax.set_mesh(self.mesh), self.axis_rules():
      yield

  def logical_to_spec(self, logical_axes: Sequence[str | None] | None) -> PartitionSpec:
    if logical_axes is None:
      return PartitionSpec()
    return nn.logical_to_mesh_axes(logical_axes, self.rules)

  def sharding(self, logical_axes: Sequence[str | None] | None) -> NamedSharding:
    return NamedSharding(self.mesh, self.logical_to_spec(logical_axes))

  def tree_shardings(self, logical_axes_tree: Any) -> Any:
    """Map a tree of logical axis tuples (e.g. from `params_axes`) to a tree of NamedShardings."""
    return jax.tree.map(
        lambda axes: self.sharding(tuple(axes)),
        logical_axes_tree,
        is_leaf=lambda x: isinstance(x, (tuple, PartitionSpec, nn_partitioning.AxisMetadata)) or x is None)

  def batch_sharding(self) -> NamedSharding:
    """Batches are split over 'data' on their leading dimension, replicated over 'model'."""
    return NamedSharding(self.mesh, PartitionSpec("data"))

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())


def params_logical_axes(params_axes: Any) -> Any:
  """Turn a `params_axes` collection (from `param_with_axes`) into a tree of tuples matching `params`.

  `param_with_axes` stores, for a parameter `kernel`, an `AxisMetadata(names=...)` under the key `kernel_axes`.
  """
  params_axes = flax_unfreeze(params_axes)

  def strip(tree):
    if isinstance(tree, dict):
      out = {}
      for k, v in tree.items():
        key = k[: -len("_axes")] if k.endswith("_axes") else k
        out[key] = strip(v)
      return out
    if isinstance(tree, nn_partitioning.AxisMetadata):
      return tuple(tree.names)
    return tree

  return strip(params_axes)


def flax_unfreeze(tree: Any) -> Any:
  from flax.core import unfreeze
  return unfreeze(tree) if hasattr(tree, "unfreeze") else tree
