"""Reading T5X checkpoints of the T5 v1.1 network (t5x/examples/t5/network.py) and of flaxformer's MoE encoder-decoder
(flaxformer/architectures/moe, trained with t5x/contrib/moe) into repeat_lm parameters.

T5X checkpoints hold the train state with the parameters under 'target' (`checkpoint_<step>/`). repeat_lm's module
tree was built to T5X's naming, so the read-side mapping is small:
  T5X 'decoder/logits_dense/kernel'  ->  repeat_lm 'logits_dense/kernel'
and every other path is the same ('token_embedder/embedding', 'encoder/relpos_bias/rel_embedding',
'encoder/layers_<i>/attention/{query,key,value,out}/kernel' with 2-D [in, out] kernels, 'encoder/layers_<i>/mlp/
{wi_0,wi_1,wo}/kernel', '.../pre_attention_layer_norm/scale', 'encoder/encoder_norm/scale', 'decoder/layers_<i>/
{self_attention,encoder_decoder_attention}/...', 'decoder/decoder_norm/scale', ...). Scanned checkpoints ('layers'
subtrees stacked on axis 1) are unstacked by `layout`.

flaxformer's MoE layers (moe_layers.MoeLayer) name their parameters differently from repeat_lm's MoeBlock:
  T5X '<stack>/layers_<i>/mlp/router/router_weights/w/kernel' [D, E]  ->  '<stack>/layers_<i>/mlp/router'
  T5X '<stack>/layers_<i>/mlp/expert/<wi|wi_0|wi_1|wo>/kernel' [E, ...] ->  '<stack>/layers_<i>/mlp/experts/<same>'
(the experts are one MlpBlock vmapped over E, so the kernels already have repeat_lm's [E, in, out] shape). Sparse
layers sit where moe_architecture's MIXED layout puts them (layer i sparse iff i % k == k - 1), which is repeat_lm's
sparse_every = k with sparse_first = False. Parts of flaxformer's MoE with no repeat_lm counterpart are refused by
name (UNSUPPORTED). Routing settings (top-k, batch-prioritised routing, capacity factors, group size) are not in a
checkpoint: the model gin must state them as the T5X gin did.

Two on-disk formats are read: Orbax PyTree checkpoints (what T5X writes since its move to Orbax, and what the tests
write), and the older msgpack `checkpoint` file whose large arrays are TensorStore specs relative to the directory.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from repeat_lm.interop import layout

# T5X path -> repeat_lm path, for the names that differ.
RENAMES = {"decoder/logits_dense/kernel": "logits_dense/kernel"}
# flaxformer MoE names (regex on the flat path -> replacement).
MOE_RENAMES = ((re.compile(r"^(.*/mlp)/router/router_weights/w/kernel$"), r"\1/router"),
               (re.compile(r"^(.*/mlp)/expert/(wi|wi_\d+|wo)/kernel$"), r"\1/experts/\2"))
# flaxformer parameters repeat_lm has no counterpart for: (pattern, why).
UNSUPPORTED = (
    (re.compile(r"^(encoder|decoder)/(encoder|decoder)/"),
     "it is a scanned flaxformer model (its stacks hold '<stack>/<stack>/...'): flaxformer gives every scanned layer "
     "its own relative position bias, while repeat_lm's stacks share one"),
    (re.compile(r"/mlp/router/router_weights/w/bias$"), "its routers have a bias (RouterWeights.use_bias=True); "
     "repeat_lm's router has none"),
    (re.compile(r"/mlp/expert/[^/]+/bias$"), "its experts have biases (MlpBlock.use_bias=True)"),
    (re.compile(r"/(extra_mlp|pre_extra_mlp_layer_norm)/"), "its sparse layers have ST-MoE's extra dense MLP "
     "(extra_mlp)"),
)
_STEP_DIR = re.compile(r"^checkpoint_(\d+)$")
_STATE_SUBDIR = "state"  # T5X's Orbax CheckpointManager item holding the train state
# Files only Orbax writes in a checkpoint: a directory with none of them is in T5X's legacy format, or no checkpoint.
_ORBAX_FILES = ("_METADATA", "manifest.ocdbt", "_CHECKPOINT_METADATA")


def latest_checkpoint_dir(path: str | Path, step: int | None = None) -> Path:
  """A T5X MODEL_DIR (holding checkpoint_<step>/ dirs) -> its latest checkpoint dir, or that of `step`; a checkpoint
  dir -> itself (if it is `step`'s). FileNotFoundError, naming the steps there, for a step that is not.

  T5X's Orbax CheckpointManager writes the train state one level down, in `checkpoint_<step>/state/` (beside
  `dataset/`); T5X's restore looks there first, and so does this.
  """
  path = Path(path)
  steps = sorted((int(m.group(1)), p) for p in path.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name)))
  if step is not None:
    # A step asked for is that step's parameters or an error: never another step's (the latest) in its place.
    name = path.parent.name if path.name == _STATE_SUBDIR else path.name  # checkpoint_<step>/ or its state/
    here = dict(steps) if steps else {int(m.group(1)): path} if (m := _STEP_DIR.match(name)) else {}
    if step not in here:
      raise FileNotFoundError(f"No T5X checkpoint of step {step} in {path}; steps here: {sorted(here)}.")
    path = here[step]
  else:
    path = steps[-1][1] if steps else path
  return path / _STATE_SUBDIR if (path / _STATE_SUBDIR).is_dir() else path


def is_t5x_checkpoint(path: str | Path) -> bool:
  path = Path(path)
  if not path.is_dir():
    return False
  if any(_STEP_DIR.match(p.name) for p in path.iterdir()):
    return True
  if (path / _STATE_SUBDIR).is_dir() and path.name != _STATE_SUBDIR:
    path = path / _STATE_SUBDIR
  return (path / "checkpoint").exists() or any((path / name).exists() for name in _ORBAX_FILES)


def _find_target(tree: dict[str, Any]) -> dict[str, Any]:
  """The parameter subtree: 'target' at the top (T5X) or below 'optimizer' (old flax.optim train states)."""
  for path in (("target",), ("optimizer", "target"), ("state", "target")):
    node = tree
    for key in path:
      node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict):
      return node
  if isinstance(tree, dict) and "token_embedder" in tree:  # a bare parameter tree
    return tree
  raise ValueError(f"No 'target' (parameters) in the T5X checkpoint; top-level keys: {sorted(tree)[:10]}.")


def _read_orbax(path: Path) -> dict[str, Any] | None:
  """The parameters of an Orbax checkpoint; None where `path` has none of Orbax's files (the caller tries the legacy
  format). Damaged Orbax files are a ValueError saying so: read as "no Orbax checkpoint", a cut copy was reported as
  neither format, and a failed array read surfaced as TensorStore's OUT_OF_RANGE naming no fix."""
  import jax  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from repeat_lm.train import checkpoint  # pylint: disable=import-outside-toplevel
  if not any((path / name).exists() for name in _ORBAX_FILES):
    return None
  path = path.absolute()  # Orbax finds no item metadata under a relative directory
  # The handler, not a Checkpointer: that one logs a failed metadata read as a warning and returns no tree.
  handler = ocp.PyTreeCheckpointHandler()
  try:
    with checkpoint.settled_reads():  # no read left running after a failed one: tracebacks after the message
      metadata = handler.metadata(path)
  except Exception as e:  # Orbax and TensorStore raise many types: all mean a damaged checkpoint here
    raise _unreadable(path, f"its metadata: {checkpoint.brief_error(e)}") from e
  finally:
    handler.close()
  tree = _to_dict(getattr(metadata, "item_metadata", metadata))
  if not isinstance(tree, dict):
    raise _unreadable(path, "no tree in its metadata")
  target = _find_target(tree)
  prefix = _prefix_of(tree, target)
  # Restore only the parameters (not the optimizer state), as host numpy arrays.
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), target)
  for key in reversed(prefix):
    abstract = {key: abstract}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract)
  with ocp.PyTreeCheckpointer() as checkpointer:
    try:
      with checkpoint.settled_reads():
        restored = checkpointer.restore(str(path), args=ocp.args.PyTreeRestore(
            item=abstract, restore_args=restore_args, partial_restore=True))
    except Exception as e:  # pylint: disable=broad-except
      raise _unreadable(path, checkpoint.brief_error(e)) from e
  for key in prefix:
    restored = restored[key]
  return restored


def _unreadable(path: Path, reason: str) -> ValueError:
  """A damaged Orbax checkpoint `path` (checkpoint_<step>/ or its state/): what failed, and the fix, naming the
  checkpoint before it where its MODEL_DIR holds one."""
  from repeat_lm.train import checkpoint  # pylint: disable=import-outside-toplevel
  step_dir = path.parent if path.name == _STATE_SUBDIR else path
  m = _STEP_DIR.match(step_dir.name)
  steps = sorted(int(s.group(1)) for p in step_dir.parent.iterdir() if p.is_dir() and (s := _STEP_DIR.match(p.name)))
  older = checkpoint.step_before(steps, int(m.group(1))) if m else None
  other = f", or read the checkpoint before it, {step_dir.parent / f'checkpoint_{older}'}" if older is not None else ""
  listed = f" (steps here: {steps})" if m else ""
  return ValueError(f"T5X checkpoint {path} could not be read ({reason}): it is corrupt or truncated, as a cut copy or "
                    f"download leaves it. Copy it again from its source{other}{listed}.")


def _to_dict(tree: Any) -> Any:
  if hasattr(tree, "items"):
    return {k: _to_dict(v) for k, v in tree.items()}
  return tree


def _prefix_of(tree: dict[str, Any], target: dict[str, Any]) -> tuple[str, ...]:
  for path in (("target",), ("optimizer", "target"), ("state", "target")):
    node = tree
    for key in path:
      node = node.get(key) if isinstance(node, dict) else None
    if node is target:
      return path
  return ()


def _read_legacy(path: Path) -> dict[str, Any]:
  """msgpack `checkpoint` + TensorStore arrays (T5X before Orbax)."""
  from flax import serialization  # pylint: disable=import-outside-toplevel
  checkpoint_file = path / "checkpoint"
  if not checkpoint_file.exists():
    raise FileNotFoundError(f"{path} is neither an Orbax checkpoint nor a T5X checkpoint directory with a "
                            "'checkpoint' file.")
  tree = _find_target(serialization.msgpack_restore(checkpoint_file.read_bytes()))

  def read(leaf):
    if isinstance(leaf, dict) and "kvstore" in leaf:
      import tensorstore as ts  # pylint: disable=import-outside-toplevel
      spec = dict(leaf)
      kvstore = dict(spec["kvstore"])
      if "path" not in kvstore and "path" in spec:  # tensorstore < 0.1.14 kept the path outside the kvstore
        kvstore["path"] = spec.pop("path")
      if kvstore.get("driver") not in ("file", "gfile", "gcs"):
        raise ValueError(f"Cannot read a {kvstore.get('driver')!r} TensorStore array locally: copy the checkpoint to "
                         "a local directory first (gsutil -m cp -r ...).")
      # The array's path is relative to the checkpoint directory whatever it was written to: a checkpoint written
      # on GCS (Google's published T5X checkpoints) names driver 'gcs' and its bucket, and reads from a local copy
      # with the 'file' driver, as T5X's own restore does.
      spec["kvstore"] = {"driver": "file", "path": str(path / kvstore["path"])}
      return np.asarray(ts.open(spec).result().read().result())
    return np.asarray(leaf)

  return _map_leaves(read, tree)


def _map_leaves(fn, tree):
  if isinstance(tree, dict) and "kvstore" not in tree:
    return {k: _map_leaves(fn, v) for k, v in tree.items()}
  return fn(tree)


def read_params(path: str | Path, step: int | None = None) -> dict[str, np.ndarray]:
  """Flat T5X parameter paths -> numpy arrays, from a checkpoint dir or a MODEL_DIR (its latest checkpoint, or
  `step`'s)."""
  path = latest_checkpoint_dir(path, step)
  try:
    tree = _read_orbax(path)
  except ValueError as damaged:
    if not (path / "checkpoint").exists():
      raise
    try:  # Orbax files beside a legacy 'checkpoint' file: perhaps one T5X wrote before Orbax
      tree = _read_legacy(path)
    except Exception:  # pylint: disable=broad-except
      raise damaged from None
  if tree is None:
    tree = _read_legacy(path)
  return {k: np.asarray(v) for k, v in layout.flatten(tree).items()}


def to_repeat_lm(t5x_flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """T5X names -> repeat_lm names (flat paths; scanned or not, as stored). ValueError for flaxformer MoE parts that
  repeat_lm cannot represent, naming them."""
  reasons = {why: path for path in t5x_flat for pattern, why in UNSUPPORTED if pattern.search(path)}
  if reasons:
    raise ValueError("This T5X checkpoint has no repeat_lm equivalent: "
                     + "; ".join(f"{why} (e.g. {path})" for why, path in reasons.items()) + ".")
  out = {}
  for path, value in t5x_flat.items():
    path = RENAMES.get(path, path)
    for pattern, replacement in MOE_RENAMES:
      path = pattern.sub(replacement, path)
    out[path] = value
  return out


def load_t5x(path: str | Path) -> dict[str, Any]:
  """repeat_lm params (nested, per-layer layout unless the checkpoint was scanned) from a T5X checkpoint."""
  return layout.unflatten(to_repeat_lm(read_params(path)))
