"""The sharded train state {'step', 'params', 'opt_state'} and the jitted train/eval steps.

Shapes: B global batch, S encoder length, T decoder length.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from repeat_lm.models.encoder_decoder import EncoderDecoderModel
from repeat_lm.train import adafactor, partitioning

# Purposes of the run seed, so that parameter init and dropout never share a stream.
PARAMS_PURPOSE, DROPOUT_PURPOSE = 0, 1


def purpose_key(seed: int, purpose: int) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), purpose)


@dataclasses.dataclass
class StateLayout:
  """Abstract state (shapes + shardings) and the shardings the jitted functions use."""
  abstract: Any
  shardings: Any
  batch_shardings: Any
  params_axes: Any


def batch_specs(feature_lengths: Mapping[str, int], batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  return {k: jax.ShapeDtypeStruct((batch_size, n), jnp.int32) for k, n in feature_lengths.items()}


def layout(model: EncoderDecoderModel, tx: optax.GradientTransformation, partitioner: partitioning.Partitioner,
           batch: Mapping[str, jax.ShapeDtypeStruct], seed: int) -> StateLayout:
  """Works out every sharding without allocating: params from their logical axes, optimizer state by propagation."""
  variables = jax.eval_shape(model.init, purpose_key(seed, PARAMS_PURPOSE), batch)
  if "params_axes" not in variables:
    raise ValueError("The model emits no 'params_axes' collection: create parameters with "
                     "flax.linen.partitioning.param_with_axes so they can be sharded (the T5X contract).")
  logical = partitioning.params_logical_axes(variables["params_axes"])
  param_shardings = partitioner.tree_shardings(logical)
  _check_divisible(variables["params"], param_shardings, logical, partitioner)
  for name, spec in batch.items():
    if spec.shape:
      partitioner.check_batch_size(f"Batch size {spec.shape[0]} ({name})", spec.shape[0],
                                   "the batch size (BATCH_SIZE, bench's --batch_size)")
  abstract_params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                 variables["params"], param_shardings)
  with adafactor.logical_axes(logical):  # stacked parameters' block axes are never factored (adafactor.factored_dims)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
  abstract_opt = optimizer_state_layout(abstract_opt, abstract_params, partitioner, logical)
  step_sharding = partitioner.replicated()
  abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=step_sharding), "params": abstract_params,
              "opt_state": abstract_opt}
  shardings = jax.tree.map(lambda s: s.sharding, abstract)
  batch_shardings = {k: partitioner.batch_sharding() for k in batch}
  return StateLayout(abstract, shardings, batch_shardings, logical)


def _check_divisible(params: Any, shardings: Any, logical: Any, partitioner: partitioning.Partitioner) -> None:
  """Every sharded parameter dimension must split evenly over its mesh axes; name the first that does not (else
  XLA's IndivisibleError names neither the model setting nor the mesh)."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    sharding = _leaf_at(shardings, path)
    names = tuple(_leaf_at(logical, path) or ()) + (None,) * len(leaf.shape)
    for dim, (size, axes) in enumerate(zip(leaf.shape, tuple(sharding.spec) + (None,) * len(leaf.shape))):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      split = math.prod(partitioner.mesh.shape[a] for a in axes)
      if size % split:
        where = "/".join(str(getattr(k, "key", k)) for k in path)
        raise ValueError(
            f"Parameter {where} has {size} along its '{names[dim]}' axis, which the mesh splits over "
            f"{' x '.join(f'{a}={partitioner.mesh.shape[a]}' for a in axes)} = {split} devices: it must divide it. "
            f"Change {_SIZE_SETTINGS.get(names[dim], 'the model size')} or the mesh "
            f"({' / '.join(_MESH_SETTINGS.get(a, a) for a in axes)}).")


# The setting behind each sharded logical axis, and behind each mesh axis, for _check_divisible's message (an expert
# hidden size that did not divide MODEL_PARALLEL was blamed on num_heads, mlp_dim, vocab_size and num_experts).
_SIZE_SETTINGS = {"heads": "t5.T5Config.num_heads", "joined_kv": "t5.T5Config.num_heads x head_dim",
                  "mlp": "t5.T5Config.mlp_dim", "vocab": "t5.T5Config.vocab_size",
                  "expert": "moe.MoeConfig.num_experts", "expert_mlp": "moe.MoeConfig.expert_mlp_dim",
                  "embed": "t5.T5Config.emb_dim"}
_MESH_SETTINGS = {"model": "MODEL_PARALLEL", "expert": "EXPERT_PARALLEL", "data": "DATA_PARALLEL"}


def _leaf_at(tree: Any, path: tuple) -> Any:
  for k in path:
    tree = tree[getattr(k, "key", getattr(k, "idx", k))]
  return tree


def optimizer_state_layout(abstract_opt: Any, abstract_params: Any, partitioner: partitioning.Partitioner,
                           logical: Any = None) -> Any:
  """Shard each optimizer-state leaf like the parameter it belongs to.

  Optimizer states hold copies of the parameter tree (Adam's moments: same shapes) or reductions of it
  (Adafactor's factored row/column statistics: one dimension dropped). A leaf is matched to its parameter by the
  trailing dict keys of its path; a dropped dimension drops its mesh axis. Anything else (step counts, scalars) is
  replicated. `logical` (the parameters' logical axis names, as the optimizer state was initialised under) says
  which axes Adafactor could not factor.
  """
  by_path = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params):
    blocks = adafactor.unfactored_axes(_leaf_at(logical, path)) if logical is not None else ()
    by_path[tuple(k.key for k in path)] = (leaf.shape, tuple(leaf.sharding.spec) + (None,) * len(leaf.shape), blocks)

  def leaf_sharding(path, leaf):
    keys = []
    for k in reversed(path):
      if not isinstance(k, jax.tree_util.DictKey):
        break
      keys.insert(0, k.key)
    match = by_path.get(tuple(keys))
    if match is None or not leaf.shape:
      return partitioner.replicated()
    shape, spec, blocks = match
    if tuple(leaf.shape) == tuple(shape):
      return NamedSharding(partitioner.mesh, PartitionSpec(*spec[:len(shape)]))
    # Factored statistics: the parameter's shape minus one dimension. Where two dimensions have the same length
    # (a square [768, 768] kernel) the shape alone does not say which was dropped: Adafactor's (and optax's) v_row
    # drops the largest dimension, v_col the second largest (factored_dims, argsort order for ties).
    candidates = [d for d in range(len(shape)) if tuple(shape[:d]) + tuple(shape[d + 1:]) == tuple(leaf.shape)]
    field = next((k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)
                  and k.name in ("v_row", "v_col")), None)
    if len(candidates) > 1 and field is not None:
      d1, d0 = adafactor.factored_dims(tuple(shape), 0, blocks)
      candidates = [d0 if field == "v_row" else d1]
    if candidates:
      dropped = candidates[0]
      return NamedSharding(partitioner.mesh, PartitionSpec(*(spec[:dropped] + spec[dropped + 1:len(shape)])))
    return partitioner.replicated()

  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf_sharding(path, leaf)),
      abstract_opt)


def init_state(model: EncoderDecoderModel, tx: optax.GradientTransformation, lay: StateLayout,
               partitioner: partitioning.Partitioner, batch: Mapping[str, jax.ShapeDtypeStruct], seed: int):
  def init_fn(key):
    params = model.init(key, batch)["params"]
    with adafactor.logical_axes(lay.params_axes):  # the names the train step updates under
      return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

  with partitioner.activate():
    return jax.jit(init_fn, out_shardings=lay.shardings)(purpose_key(seed, PARAMS_PURPOSE))


def count_source_tokens(tokens_BxL: jax.Array, first_sentinel_id: int | None) -> jax.Array:
  """Tokens of the original text in a span-corrupted example: not padding (0), EOS (1) or a sentinel.

  Every source token lands in exactly one of inputs or targets, so inputs + targets counts the text consumed. The
  trainer uses it only for tasks that are not repeat_lm's (their chunk lengths are not known on the host): UL2's mode
  tokens, and sentinels past the vocabulary's extra ids, are ordinary ids and count as text here.
  """
  real = tokens_BxL > 1
  if first_sentinel_id is not None:
    real &= tokens_BxL < first_sentinel_id
  return jnp.sum(real.astype(jnp.float32))


def make_train_step(model: EncoderDecoderModel, tx: optax.GradientTransformation, lay: StateLayout,
                    partitioner: partitioning.Partitioner, seed: int, first_sentinel_id: int | None = None,
                    dropout_schedule: Callable[[jax.Array], jax.Array] | None = None,
                    donate: bool | None = None):
  """state, batch -> (state, metric sums); the state buffers are donated (`donate`; default: on GPU and TPU).

  XLA:CPU copies every donated parameter at the start of the step instead of updating it in place (187 copies,
  one per parameter of T5 v1.1 small, in its compiled step; none without donation), and T5-small's float32 step
  took 64 and 49 ms longer with donation (medians of the per-round differences in two runs of 8 rounds in one
  process alternating which ran first, slower in 8 and 7 of the 8; bfloat16: 13 ms, 5 of 8). So on CPU the new
  state gets new buffers, and the old one is freed when the caller drops it: one more state in memory during the
  step. Accelerators update donated buffers in place and keep one state's memory.

  `dropout_schedule` (step -> factor of every dropout rate, see dropout_schedule.py) is evaluated on the traced
  step inside the jitted function, so a change of rate is data, not a new program; the factor is returned as the
  'dropout_scale' metric.
  """
  dropout_key = purpose_key(seed, DROPOUT_PURPOSE)
  if donate is None:
    donate = jax.default_backend() != "cpu"

  def step_fn(state, batch):
    rng = jax.random.fold_in(dropout_key, state["step"])  # Dropout at step s depends on (seed, s) only.
    scale = dropout_schedule(state["step"]) if dropout_schedule is not None else None
    grad_fn = jax.value_and_grad(lambda p: model.loss_and_metrics(p, batch, dropout_rng=rng, dropout_scale=scale),
                                 has_aux=True)
    (_, sums), grads = grad_fn(state["params"])
    with adafactor.logical_axes(lay.params_axes):  # T5X's per-layer / per-expert RMS for stacked parameters
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    if scale is not None:
      sums = dict(sums, dropout_scale=scale)
    sums = dict(sums, grad_norm=optax.global_norm(grads), param_norm=optax.global_norm(params),
                source_tokens=count_source_tokens(batch["encoder_input_tokens"], first_sentinel_id) +
                count_source_tokens(batch["decoder_target_tokens"], first_sentinel_id))
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, sums

  jitted = jax.jit(step_fn, in_shardings=(lay.shardings, lay.batch_shardings),
                   out_shardings=(lay.shardings, partitioner.replicated()),
                   donate_argnums=(0,) if donate else ())

  def run(state, batch):
    with partitioner.activate():
      return jitted(state, batch)

  run.jitted = jitted
  return run


def make_eval_step(model: EncoderDecoderModel, lay: StateLayout, partitioner: partitioning.Partitioner):
  """params, batch -> metric sums (no dropout).

  The batch may hold other features than the training batch `lay` was made for (an evaluation set packed or not
  independently of the training set): one batch sharding is the prefix of any batch dict.
  """
  jitted = jax.jit(lambda params, batch: model.loss_and_metrics(params, batch)[1],
                   in_shardings=(lay.shardings["params"], partitioner.batch_sharding()),
                   out_shardings=partitioner.replicated())

  def run(params, batch):
    with partitioner.activate():
      return jitted(params, batch)

  return run


def global_batch(host_batch: Mapping[str, Any], shardings: Mapping[str, NamedSharding]) -> dict[str, jax.Array]:
  """Assemble each host's rows into one global array per feature, sharded over 'data'.

  A host holds 1/num_shards of the batch, num_shards being the number of row blocks the processes' devices hold
  (Partitioner.data_layout): the global shape is given, not inferred from the host's rows.
  """
  return {k: jax.make_array_from_process_local_data(
              shardings[k], v, (v.shape[0] * _row_blocks(shardings[k]), *v.shape[1:]))
          for k, v in host_batch.items() if k in shardings}


@functools.lru_cache
def _row_blocks(sharding: NamedSharding) -> int:
  """How many row blocks `sharding` splits a batch into across processes; once per sharding, not per step (the
  mesh's size is a length every batch sharding divides)."""
  return partitioning.row_block(sharding, sharding.mesh.size, jax.process_index())[1]
