"""Parameters from any supported checkpoint, in the model's layout and on its shardings.

Accepted paths (what `trainer.train(initial_checkpoint_path=...)` / INITIAL_CHECKPOINT_PATH takes):
  - a repeat_lm MODEL_DIR (its latest checkpoint), its `checkpoints/` dir, or one step dir `checkpoints/<step>` (or
    its `state/`);
  - a Hugging Face T5 or SwitchTransformers directory (config.json + safetensors or pytorch_model.bin), e.g. from
    `save_pretrained`;
  - a T5X checkpoint dir `checkpoint_<step>` (Orbax or msgpack + TensorStore), or a T5X MODEL_DIR (its latest), of
    the T5 v1.1 network or a flaxformer MoE one (see t5x.py); `step` picks a checkpoint_<step> of a T5X MODEL_DIR.
Only parameters are read; optimizer states are left behind. Either scan layout loads into either.
"""

from __future__ import annotations

import ast
import dataclasses
import logging
import re
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from repeat_lm import checks
from repeat_lm.interop import layout

log = logging.getLogger(__name__)


def _repeat_lm_step_dir(path: Path, step: int | None) -> Path | None:
  """The `checkpoints/<step>` dir for a repeat_lm path, or None if `path` is not one."""
  if path.name == "state" and path.parent.name.isdigit():  # the step's Orbax item: the step dir is the checkpoint
    path = path.parent
  if (path / "state").is_dir() and path.name.isdigit():
    if step is not None and step != int(path.name):  # never another step's parameters in place of those asked for
      raise FileNotFoundError(f"{path} is the checkpoint of step {path.name}, not of step {step}: point at its "
                              f"MODEL_DIR (or checkpoints/) to pick a step, or leave the step unset.")
    return path
  root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
  steps = sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit() and (p / "state").is_dir()) \
      if root.is_dir() else []
  if not steps:
    return None
  if step is not None:
    if step not in steps:
      raise FileNotFoundError(f"No checkpoint for step {step} under {root}; available: {steps}.")
    return root / str(step)
  return root / str(steps[-1])


def checkpoint_kind(path: str | Path) -> str:
  """'repeat_lm', 'hf' or 't5x'; raises FileNotFoundError for anything else."""
  from repeat_lm.interop import t5x  # pylint: disable=import-outside-toplevel
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"Initial checkpoint {path} does not exist.")
  # A MODEL_DIR's own checkpoints come first: a config.json beside them is some other file, not the model.
  if _repeat_lm_step_dir(path, None) is not None:
    return "repeat_lm"
  if (path / "config.json").exists():
    return "hf"
  if t5x.is_t5x_checkpoint(path):
    return "t5x"
  if (path / "config.gin").exists():  # the trainer writes it before the first checkpoint
    root = path / "checkpoints"
    broken = sorted((p.name for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=int) \
        if root.is_dir() else []
    if broken:  # step directories without state/: called 'nothing in checkpoints', with a fix that did not apply
      raise FileNotFoundError(f"{path} holds no complete checkpoint: the step directories {broken} in {root} have no "
                              "state/ (a save cut short, or a damaged or partial copy). Copy the checkpoint again, or "
                              "point at a MODEL_DIR with a finished save.")
    raise FileNotFoundError(f"{path} is a repeat_lm MODEL_DIR with no checkpoint saved yet (nothing in "
                            f"{path / 'checkpoints'}): train it until its first save (checkpoint.CheckpointConfig."
                            "period), or point at a MODEL_DIR that has one.")
  raise FileNotFoundError(
      f"{path} is not a checkpoint repeat_lm can read: expected a repeat_lm MODEL_DIR (with checkpoints/), a Hugging "
      "Face directory (config.json + model.safetensors) or a T5X checkpoint_<step> directory.")


def _check_hf_config(path: Path, config: Any) -> None:
  """Hyper-parameters that leave no trace in parameter shapes must still agree."""
  from repeat_lm.interop import hf  # pylint: disable=import-outside-toplevel
  from repeat_lm.models import t5  # pylint: disable=import-outside-toplevel
  if not isinstance(config, t5.T5Config):
    return
  theirs = hf.t5_config_from_hf(hf.read_json(path / "config.json"))
  if (theirs.moe is None) != (config.moe is None):
    kind = lambda c: "dense (T5)" if c.moe is None else "MoE (Switch)"  # noqa: E731
    raise ValueError(f"The Hugging Face checkpoint {path} is a {kind(theirs)} model but the model gin builds a "
                     f"{kind(config)} one: use a model gin of the checkpoint's architecture.")
  diffs = hf.architecture_diffs(theirs, config)
  if diffs:
    raise ValueError(f"The Hugging Face checkpoint {path} was trained with a different architecture: "
                     + "; ".join(diffs) + ". Set these in the model gin (t5.T5Config, moe.MoeConfig).")


def read_flat(path: str | Path, config: Any = None, step: int | None = None, *,
              name_step: Callable[[Path], str] | None = None) -> tuple[str, dict[str, np.ndarray]]:
  """(kind, flat repeat_lm-named params as host arrays) from any supported checkpoint. `name_step`: as load_params'."""
  from repeat_lm.interop import hf, t5x  # pylint: disable=import-outside-toplevel
  path = Path(path)
  kind = checkpoint_kind(path)
  if kind == "hf":
    if step is not None:  # its weights are those of whichever step was exported, not necessarily this one
      raise ValueError(f"{path} is a Hugging Face directory, which holds one set of weights: a checkpoint step "
                       f"({step}) applies to repeat_lm and T5X checkpoints only; leave it unset.")
    if config is not None:
      _check_hf_config(path, config)
    hf_config = hf.t5_config_from_hf(hf.read_json(path / "config.json"))
    return kind, hf.from_hf_state_dict(hf.read_state_dict(path), hf_config)
  if kind == "t5x":
    return kind, t5x.to_repeat_lm(t5x.read_params(path, step))
  return kind, layout.flatten(_restore_repeat_lm(_repeat_lm_step_dir(path, step), None, name_step))


def _restore_repeat_lm(step_dir: Path, abstract_params: Any | None,
                       name_step: Callable[[Path], str] | None = None) -> Any:
  """Params only, from `checkpoints/<step>/state`; onto `abstract_params`' shardings if given, else numpy."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from repeat_lm.train import checkpoint  # pylint: disable=import-outside-toplevel
  if abstract_params is None:
    abstract_params = layout.unflatten({k: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype)
                                        for k, m in _metadata_params(step_dir, name_step).items()})
  restore_args = jax.tree.map(
      lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype)
      if getattr(a, "sharding", None) is not None else ocp.RestoreArgs(restore_type=np.ndarray), abstract_params)
  # Orbax reads relative directories as missing (metadata None): always hand it an absolute path.
  with ocp.PyTreeCheckpointer() as checkpointer:
    try:
      with checkpoint.settled_reads():  # no read left running after a failed one: tracebacks after the message
        restored = checkpointer.restore(str((step_dir / "state").absolute()), args=ocp.args.PyTreeRestore(
            item={"params": abstract_params}, restore_args={"params": restore_args}, partial_restore=True))
    except Exception as e:  # Orbax and TensorStore raise many types; all mean the same thing to the user
      raise _unreadable(step_dir, checkpoint.brief_error(e), name_step) from e
  # As a training restore's check: a finetune from a damaged step "diverged" at its first step (and was told to lower
  # its learning rate), and infer and export read or wrote NaN weights without a word.
  bad = checkpoint.non_finite_leaves(restored["params"])
  if bad:
    raise _unreadable(step_dir, f"it {checkpoint.damaged_text(bad)}", name_step)
  return restored["params"]


def step_flag(step_dir: Path) -> str:
  """How `repeat-lm infer` and `export hf` pick the checkpoint of `step_dir`."""
  return f"--step={step_dir.name}"


def initial_checkpoint_path(step_dir: Path) -> str:
  """How a finetune (`trainer.train`) picks the checkpoint of `step_dir`: it has no step setting of its own."""
  return f"INITIAL_CHECKPOINT_PATH='{step_dir}'"


def _unreadable(step_dir: Path, reason: str, name_step: Callable[[Path], str] | None = None) -> ValueError:
  """A damaged step of a repeat_lm MODEL_DIR: what failed, and the step before it, named as the caller picks one
  (`name_step`, INITIAL_CHECKPOINT_PATH by default: see load_params)."""
  from repeat_lm.train import checkpoint  # pylint: disable=import-outside-toplevel
  steps = sorted(int(p.name) for p in step_dir.parent.iterdir() if p.name.isdigit())
  older = checkpoint.step_before(steps, int(step_dir.name)) if step_dir.name.isdigit() else None
  name_step = name_step or initial_checkpoint_path
  other = f" {name_step(step_dir.parent / str(older))} reads the step before it." if older is not None else ""
  return ValueError(f"Checkpoint {step_dir} could not be read ({reason}); it may be corrupt or truncated (steps "
                    f"here: {steps}).{other} It was left untouched.")


def _plain(tree: Any) -> Any:
  return {k: _plain(v) for k, v in tree.items()} if hasattr(tree, "items") else tree


def _place(value: np.ndarray, target: Any) -> jax.Array:
  """A host array onto the target's sharding (each host supplies the slices of its own devices)."""
  sharding = getattr(target, "sharding", None)
  if sharding is None:
    return jnp.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def load_params(path: str | Path, abstract_params: Any, *, config: Any = None, step: int | None = None,
                name_step: Callable[[Path], str] | None = None) -> Any:
  """Parameters for a model whose own parameters look like `abstract_params` (arrays or ShapeDtypeStructs, with
  shardings to place them on). `config`: the module config, to check hyper-parameters that shapes cannot show.
  `name_step(step_dir)`: how the caller picks another step, for the error of a damaged one (`step_flag` for a command
  line); by default `initial_checkpoint_path`, as trainer.train reads INITIAL_CHECKPOINT_PATH (a finetune has no
  --step: its advice to use --step=20 was for a flag that does not exist)."""
  if step is not None and not checks.whole_number(step):
    # As the Checkpointer refuses it: '5' was reported missing beside 'available: [5]', and 5.0 as a corrupt
    # checkpoints/5.0.
    raise ValueError(f"Checkpoint step {step!r} is not a whole number: give the step as an int (e.g. 20), or None "
                     "for the latest.")
  path = Path(path)
  target_flat = layout.flatten(abstract_params)
  step_dir = _repeat_lm_step_dir(path, step) if path.exists() else None
  settings = _saved_settings(step_dir) if step_dir is not None else None
  saved = _depths(settings)
  if step_dir is not None and config is not None:
    _check_saved_model(step_dir, settings, config)
  if step_dir is not None:
    metadata = _metadata_params(step_dir, name_step)
    if {k: tuple(v.shape) for k, v in metadata.items()} == {k: tuple(v.shape) for k, v in target_flat.items()}:
      log.info("Loading parameters from repeat_lm checkpoint %s", step_dir)
      return _restore_repeat_lm(step_dir, abstract_params, name_step)  # same layout: straight onto the shardings
  kind, flat = read_flat(path, config, step, name_step=name_step)
  if kind != "repeat_lm" and config is not None:  # Hugging Face and T5X models share no parameters: one per layer
    _check_depths(f"{kind} checkpoint {path}", {name: (lay.num_layers, 1)
                                                for name, lay in layout.infer_layouts(flat).items()}, config)
  log.info("Loading parameters from %s checkpoint %s", kind, path)
  target_layouts = layout.layouts_for(config) if config is not None else None
  # A param_share model's checkpoint holds one set per group: its config.gin says how many layers use each.
  source_layouts = layout.saved_layouts(flat, saved) if kind == "repeat_lm" and saved is not None else None
  matched = layout.match_target(flat, target_flat, f"the {kind} checkpoint {path}", source_layouts=source_layouts,
                                target_layouts=target_layouts)
  return layout.unflatten({k: _place(v, target_flat[k]) for k, v in matched.items()})


# A T5Config setting of a MODEL_DIR's config.gin (possibly scoped, e.g. MODEL/t5.T5Config.param_share = 2).
_GIN_T5_SETTING = re.compile(r"^(?:[\w./]+/)?t5\.T5Config\.(\w+)\s*=\s*(.+?)\s*$", re.M)


def _saved_settings(step_dir: Path) -> dict[str, Any] | None:
  """T5Config's fields as the MODEL_DIR config.gin of the model that wrote `step_dir` had them (defaults where it
  binds none); None where that is not known (no config.gin beside checkpoints/, no T5Config setting in it). A field
  bound through a macro or reference, over several lines, or differently in several scopes is left out."""
  from repeat_lm.models import t5  # pylint: disable=import-outside-toplevel
  try:
    text = (step_dir.parent.parent / "config.gin").read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError):
    return None
  matches = list(_GIN_T5_SETTING.finditer(text))
  if not matches:
    # No T5Config setting at all: a model built in Python (the trainer's config.gin is then empty) or by other
    # configurables. T5Config's defaults are no evidence of its model; they refused the very model that wrote it.
    return None
  settings = {f.name: f.default for f in dataclasses.fields(t5.T5Config)}
  bound: dict[str, list[Any]] = {}
  for m in matches:
    try:
      bound.setdefault(m.group(1), []).append(ast.literal_eval(m.group(2)))
    except (ValueError, SyntaxError):  # %MACRO or @reference: not resolved here
      bound.setdefault(m.group(1), []).append(_UNKNOWN)
  for name, values in bound.items():
    if values[0] is _UNKNOWN or any(v != values[0] for v in values):  # which scope built the model is not known
      settings.pop(name, None)
    else:
      settings[name] = values[0]
  return settings


_UNKNOWN = object()


def _depths(settings: dict[str, Any] | None) -> dict[str, tuple[int, int]] | None:
  """{stack: (layers, layers per parameter set)} of the model whose MODEL_DIR config.gin _saved_settings read;
  None where that is not known."""
  from repeat_lm.models import stack  # pylint: disable=import-outside-toplevel
  if settings is None or not {"num_encoder_layers", "num_decoder_layers", "param_share"} <= settings.keys():
    return None
  try:
    return {name: (n, stack.share_group_size(settings["param_share"], n))
            for name, n in (("encoder", settings["num_encoder_layers"]), ("decoder", settings["num_decoder_layers"]))}
  except (TypeError, ValueError):
    return None


def check_model_dir_config(step_dir: Path, config: Any) -> None:
  """ValueError where `config` is not the model whose MODEL_DIR config.gin wrote `step_dir` in what the checkpoint's
  shapes cannot show (for restores that compare shapes only): its depth under parameter sharing, and the settings
  that change what the same weights compute (hf.SHAPELESS_FIELDS; an MoE's routing is not read from config.gin)."""
  _check_saved_model(step_dir, _saved_settings(step_dir), config)


def _check_saved_model(step_dir: Path, settings: dict[str, Any] | None, config: Any) -> None:
  """check_model_dir_config on the settings _saved_settings read (config.gin read and parsed once)."""
  _check_depths(f"repeat_lm checkpoint {step_dir}", _depths(settings), config)
  _check_settings(step_dir, settings, config)


def _check_settings(step_dir: Path, saved: dict[str, Any] | None, config: Any) -> None:
  """A resume, evaluation or INITIAL_CHECKPOINT_PATH read the weights of ('gelu', 'linear') MLPs as ('relu', 'linear')
  ones (or another position bias, norm epsilon, logits projection) without a word, and a resume then overwrote the
  config.gin that recorded the original. Compared as the Hugging Face loader compares a config.json's
  (hf.architecture_diffs), on the model with the checkpoint's values of those fields (a gin tuple written as a list
  becomes one, as in T5Config itself)."""
  from repeat_lm.interop import hf  # pylint: disable=import-outside-toplevel
  from repeat_lm.models import t5  # pylint: disable=import-outside-toplevel
  if saved is None or not isinstance(config, t5.T5Config):
    return
  theirs = dataclasses.replace(config, **{f: saved[f] for f in hf.SHAPELESS_FIELDS if f in saved})
  diffs = hf.architecture_diffs(theirs, config)
  if diffs:
    raise ValueError(f"The repeat_lm checkpoint {step_dir} was written by a model with other settings, which its "
                     "parameter shapes do not show: " + "; ".join(diffs) + ". Set them in the model gin as "
                     f"{step_dir.parent.parent / 'config.gin'} has them, or train into a fresh MODEL_DIR.")


def _check_depths(source: str, saved: dict[str, tuple[int, int]] | None, config: Any) -> None:
  """Parameter sharing hides a stack's depth from its parameters: 2 distinct layers and 4 layers with param_share=2
  hold the same tree, so either loaded silently into the other model (another depth, other logits)."""
  from repeat_lm.models import t5  # pylint: disable=import-outside-toplevel
  if saved is None or not isinstance(config, t5.T5Config):
    return
  target = layout.layouts_for(config)
  diffs = [f"{name} {n} layers ({share} per parameter set) vs model {target[name].num_layers} "
           f"({target[name].share} per parameter set)" for name, (n, share) in saved.items()
           if n != target[name].num_layers and max(share, target[name].share) > 1]
  if diffs:
    raise ValueError(f"The {source} is of a model of another depth, which parameter sharing (param_share) hides from "
                     "its parameter shapes: checkpoint " + "; ".join(diffs) + ". Set num_encoder_layers, "
                     "num_decoder_layers and param_share (t5.T5Config) in the model gin as the checkpoint's model had "
                     "them.")


def _metadata_params(step_dir: Path, name_step: Callable[[Path], str] | None = None) -> dict[str, Any]:
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from repeat_lm.train import checkpoint  # pylint: disable=import-outside-toplevel
  # The handler, not a Checkpointer: that one also looks for a step's _CHECKPOINT_METADATA inside state/, where
  # there is none, and warned "Metadata file does not exist" on every load of a healthy checkpoint.
  handler = ocp.PyTreeCheckpointHandler()
  try:
    # Settled: the metadata of a damaged step fails one array's read while others are in flight (as a restore does).
    with checkpoint.settled_reads():
      metadata = handler.metadata((step_dir / "state").absolute())
  except Exception as e:  # pylint: disable=broad-except
    raise _unreadable(step_dir, f"its metadata: {checkpoint.brief_error(e)}", name_step) from e
  finally:
    handler.close()
  metadata = getattr(metadata, "item_metadata", metadata)
  if metadata is None or "params" not in metadata:
    raise _unreadable(step_dir, "no parameter metadata in state/", name_step)
  return layout.flatten(_plain(metadata["params"]))


def abstract_params(module: Any, seed: int = 0) -> Any:
  """ShapeDtypeStructs of a module's parameters (no allocation)."""
  tokens = jnp.ones((1, 8), jnp.int32)
  variables = jax.eval_shape(lambda: module.init(jax.random.key(seed), tokens, tokens, tokens, enable_dropout=False))
  return variables["params"]


def load_for_module(path: str | Path, module: Any, *, step: int | None = None) -> Any:
  """Host-local parameters for `module` (single device): for inference, export and tests."""
  return load_params(path, abstract_params(module), config=getattr(module, "config", None), step=step,
                     name_step=step_flag)

