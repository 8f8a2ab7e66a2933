"""Decoding text with a trained model: `repeat-lm infer`, the Python API, and prediction-based evaluation on SeqIO
tasks (decode the validation examples, post-process, apply the task's metrics) used by fine-tuning.

Shapes: B batch, S input length, L max decode length.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import seqio
from jax.sharding import NamedSharding, PartitionSpec

from repeat_lm import checks, files
from repeat_lm.models import decoding, info

log = logging.getLogger(__name__)


DEFAULT_MAX_INPUT_LENGTH = 512  # T5's pre-training inputs length, where a run's gin binds no TASK_FEATURE_LENGTHS


def _bucket(length: int, minimum: int = 16) -> int:
  """Pad lengths to powers of two (at least `minimum`) so a few compiled shapes serve every input."""
  return max(minimum, 1 << (max(length, 1) - 1).bit_length())


def encode_texts(vocabulary: seqio.Vocabulary, texts: Sequence[str], length: int | None = None,
                 max_length: int | None = None) -> np.ndarray:
  """Token ids + EOS, right-padded with 0 to `length` (default: the longest, bucketed, at most `max_length`); longer
  inputs are cut, and with `max_length` a warning says how many."""
  ids = [list(vocabulary.encode(t)) for t in texts]
  longest = max((len(x) + 1 for x in ids), default=1)
  length = length or _bucket(longest)
  if max_length is not None and length > max_length:
    length = max_length
  if max_length is not None and longest > max_length == length:  # the cap, not a smaller fixed `length`, cuts
    # Uncapped, every row was padded to the longest line: one line of 8,542 tokens took 24 GB (the attention
    # logits grow with the square of the length) on a model trained on 128.
    long = sum(len(x) + 1 > max_length for x in ids)
    log.warning("%d of %d inputs are longer than %d tokens (the longest: %d): cut to %d, as T5X's infer trims them "
                "to TASK_FEATURE_LENGTHS; --max_input_length=N keeps more (memory grows with its square).", long,
                len(ids), max_length, longest, max_length)
  out = np.zeros((len(ids), length), np.int32)
  eos_id = eos_of(vocabulary)
  for row, x in enumerate(ids):
    x = x[:length - 1] + [eos_id]
    out[row, :len(x)] = x
  return out


def eos_of(vocabulary: seqio.Vocabulary) -> int:
  """The vocabulary's EOS id, as the training rows end with it (pipeline.get_batches), SeqIO's append_eos_after_trim
  and T5X's decoding use it: not every vocabulary's is T5's 1 (SentencePiece's own default is 2)."""
  eos_id = getattr(vocabulary, "eos_id", None)
  return decoding.EOS_ID if eos_id is None else int(eos_id)


def predict_tokens(module: Any, params: Any, inputs_BxS: np.ndarray, cfg: decoding.DecodeConfig, *,
                   batch_size: int = 32, partitioner: Any = None, rng: jax.Array | None = None) -> list[list[int]]:
  """Decoded ids of every row (up to, not including, EOS). Rows are decoded `batch_size` at a time, the last batch
  padded, so one compiled program serves all; with a partitioner the batch is split over its batch devices."""
  shards = getattr(partitioner, "batch_shards", getattr(partitioner, "data_size", 1)) if partitioner else 1
  batch_size = -(-max(batch_size, 1) // shards) * shards
  rng = jax.random.key(cfg.seed) if rng is None else rng
  out: list[list[int]] = []
  for start in range(0, len(inputs_BxS), batch_size):
    chunk = inputs_BxS[start:start + batch_size]
    padded = np.zeros((batch_size, inputs_BxS.shape[1]), np.int32)
    padded[:len(chunk)] = chunk
    padded[len(chunk):, 0] = cfg.eos_id  # filler rows: a lone EOS, never all padding
    if partitioner is not None:
      with partitioner.activate():
        tokens = decoding.decode(module, params, jax.device_put(padded, NamedSharding(partitioner.mesh,
                                                                                      PartitionSpec())),
                                 cfg, jax.random.fold_in(rng, start))
        # The rows come back split over the batch devices; on several hosts a process cannot read the others' rows
        # (device_get raises), so every device gathers the whole batch first.
        tokens = _replicate(tokens, partitioner.replicated())
    else:
      tokens = decoding.decode(module, params, padded, cfg, jax.random.fold_in(rng, start))
    tokens = np.asarray(jax.device_get(tokens))
    out.extend(decoding.trim_after_eos(t, cfg.eos_id) for t in tokens[:len(chunk)])
  return out


@functools.partial(jax.jit, static_argnums=1)
def _replicate(x: jax.Array, sharding: NamedSharding) -> jax.Array:
  return jax.lax.with_sharding_constraint(x, sharding)


def predict_texts(module: Any, params: Any, vocabulary: seqio.Vocabulary, texts: Sequence[str],
                  cfg: decoding.DecodeConfig = decoding.DecodeConfig(), *, inputs_length: int | None = None,
                  batch_size: int = 32, partitioner: Any = None, max_inputs_length: int | None = None) -> list[str]:
  """Decode one output text per input text (the Python API behind `repeat-lm infer`). Inputs are padded to
  `inputs_length`, else to the longest (bucketed) up to `max_inputs_length`; longer ones are cut."""
  # As `infer` checks a --vocabulary: called directly with a larger vocabulary, the ids past the embedding table were
  # clipped to its last row, and the outputs came back with no error.
  config = getattr(module, "config", None)
  if config is not None:
    check_vocabulary_fits(vocabulary, config.vocab_size)
  if not texts:
    return []
  cfg = dataclasses.replace(cfg, eos_id=eos_of(vocabulary))  # the EOS the inputs end with and the model learnt
  tokens = predict_tokens(module, params, encode_texts(vocabulary, texts, inputs_length, max_inputs_length), cfg,
                          batch_size=min(batch_size, _bucket(len(texts), 1)), partitioner=partitioner)
  return [vocabulary.decode(t) for t in tokens]


@dataclasses.dataclass
class PredictionEval:
  """Evaluation by decoding: for each task of a mixture (or the task), decode its `split`, post-process predictions
  and references with the task's `postprocess_fn`, and report its metric functions as 'eval/<prefix>_<metric>'
  (prefix from `downstream.metric_prefix`, e.g. eval/squad_em). Call as trainer.train's / evaluate's `eval_fn`."""
  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]
  split: str = "validation"
  batch_size: int = 32
  max_examples: int | None = None  # None: the whole split
  decode: decoding.DecodeConfig | None = None  # default: greedy, max_decode_length = the targets length

  def __post_init__(self):
    # `examples` takes the first max_examples only when it is truthy: 0 (meant as "decode none") decoded the whole
    # split, True (== 1) one example; 1.5 or '100' failed in tf.data naming no setting.
    if self.max_examples is not None and not checks.is_count(self.max_examples):
      raise ValueError(f"PredictionEval.max_examples={self.max_examples!r} (INFER_EVAL_MAX_EXAMPLES): decode the "
                       "first N >= 1 examples, a whole number, or None for the whole split.")

  def examples(self, task: seqio.Task) -> list[dict[str, Any]]:
    # One ordered pass; no in-memory caching (it would ask the source for its size, which TFDS mocks lack).
    # Inputs untrimmed, as T5X's infer_eval (task_feature_lengths=None): a long context keeps its answer.
    lengths = {**self.task_feature_lengths, "inputs": None}
    ds = task.get_dataset(sequence_length=lengths, split=self.split, shuffle=False,
                          num_epochs=1, use_cached=False, try_in_mem_cache=False)
    if self.max_examples:
      ds = ds.take(self.max_examples)
    return list(ds.as_numpy_iterator())

  def __call__(self, model: Any, params: Any, partitioner: Any = None) -> dict[str, float]:
    from repeat_lm.data import downstream  # pylint: disable=import-outside-toplevel
    module = getattr(model, "module", model)
    cfg = self.decode or decoding.DecodeConfig(max_decode_length=int(self.task_feature_lengths["targets"]))
    provider = seqio.get_mixture_or_task(self.mixture_or_task_name)
    tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    results: dict[str, float] = {}
    for task in tasks:
      metric_fns = list(task.predict_metric_fns)
      if not metric_fns:
        continue
      examples = self.examples(task)
      if not examples:
        log.warning("Task %s has no %s examples to evaluate.", task.name, self.split)
        continue
      width = max(int(self.task_feature_lengths["inputs"]), *(len(ex["inputs"]) for ex in examples))
      inputs_BxS = np.zeros((len(examples), width), np.int32)
      for row, ex in enumerate(examples):
        inputs_BxS[row, :len(ex["inputs"])] = ex["inputs"]
      vocabulary = task.output_features["targets"].vocabulary
      tokens = predict_tokens(module, params, inputs_BxS, dataclasses.replace(cfg, eos_id=eos_of(vocabulary)),
                              batch_size=self.batch_size, partitioner=partitioner)
      predictions = [task.postprocess_fn(vocabulary.decode(t), example=ex, is_target=False)
                     for t, ex in zip(tokens, examples)]
      targets = [task.postprocess_fn(_text(ex.get("targets_pretokenized", b"")), example=ex, is_target=True)
                 for ex in examples]
      prefix = downstream.metric_prefix(task.name)
      for fn in metric_fns:
        results.update({f"eval/{prefix}_{k}": float(v) for k, v in fn(targets, predictions).items()})
      log.info("Decoded %d %s examples of %s: %s", len(examples), self.split, task.name,
               {k: round(v, 2) for k, v in results.items() if k.startswith(f"eval/{prefix}_")})
    return results


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# ---- `repeat-lm infer` / `repeat-lm export`: a MODEL_DIR and its operative config ----

def model_from_model_dir(model_dir: str | Path, gin_files: Sequence[str] = (), bindings: Sequence[str] = (),
                         search_paths: Sequence[str] = ()):
  """(MODEL, MIXTURE_OR_TASK_NAME or None) from MODEL_DIR/config.gin (the trainer writes it), or from `gin_files`
  (their includes also looked up under `search_paths`, --gin_search_path)."""
  from repeat_lm import gin_utils  # pylint: disable=import-outside-toplevel
  gin_files, bindings = _gin_of(model_dir, gin_files, bindings)
  model = gin_utils.configured_macro(gin_files, bindings, "MODEL", search_paths)
  info.model_config(model)  # MODEL bound to no model (a T5Config): named here, not an AttributeError in infer / export
  try:
    task = gin_utils.configured_macro(gin_files, bindings, "MIXTURE_OR_TASK_NAME", search_paths)
  except gin_utils.GinConfigError:
    task = None
  return model, task if isinstance(task, str) else None


def trained_inputs_length(model_dir: str | Path, gin_files: Sequence[str] = (), bindings: Sequence[str] = (),
                          search_paths: Sequence[str] = ()) -> int | None:
  """TASK_FEATURE_LENGTHS['inputs'] of MODEL_DIR/config.gin (or of `gin_files`); None where it binds none."""
  from repeat_lm import gin_utils  # pylint: disable=import-outside-toplevel
  gin_files, bindings = _gin_of(model_dir, gin_files, bindings)
  try:
    lengths = gin_utils.configured_macro(gin_files, bindings, "TASK_FEATURE_LENGTHS", search_paths)
  except gin_utils.GinConfigError:
    return None
  inputs = lengths.get("inputs") if isinstance(lengths, Mapping) else None
  return inputs if checks.is_count(inputs) else None


def _gin_of(model_dir: str | Path, gin_files: Sequence[str], bindings: Sequence[str]) -> tuple[list[str], list[str]]:
  """The gin files and bindings that describe MODEL_DIR's run: `gin_files` as given, else MODEL_DIR/config.gin
  (bindings scoped as it scopes them)."""
  if not gin_files:
    config_gin = Path(model_dir) / "config.gin"
    if not config_gin.exists():
      raise FileNotFoundError(f"{config_gin} does not exist: point --checkpoint at a MODEL_DIR written by "
                              f"`repeat-lm train`{_step_dir_hint(model_dir)}, or pass the model's gin files with "
                              "--gin_file.")
    gin_files = [str(config_gin)]
    try:
      text = config_gin.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:  # its message names no file
      raise ValueError(f"{config_gin} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}): it is "
                       "damaged; pass the model's gin files with --gin_file instead.") from e
    bindings = scoped_like(text, bindings)
  return list(gin_files), list(bindings)


def _step_dir_hint(path: str | Path) -> str:
  """' (--checkpoint=MODEL_DIR --step=30)' for a path inside MODEL_DIR/checkpoints/30: a step is chosen by --step."""
  model_dir = files.model_dir_around(path)
  if model_dir is None:
    return ""
  path = Path(path)
  below = path.resolve().relative_to(model_dir / "checkpoints").parts
  # MODEL_DIR as the user spelt it where that is plain, else the resolved path.
  spelt = (path.parent.parent if len(below) == 1 and path.parent.name == "checkpoints" else
           path.parent if not below and path.name == "checkpoints" else model_dir)
  step = f" --step={below[0]}" if below and below[0].isdigit() else ""
  return f" (--checkpoint={spelt}{step})"


def scoped_like(config_text: str, bindings: Sequence[str]) -> list[str]:
  """`--gin.t5.T5Config.X=V` as `MODEL/t5.T5Config.X=V` where the saved config binds X under that scope: the trainer's
  config.gin scopes the model's parameters (MODEL/...), and gin lets a scoped binding win over an unscoped one, so the
  override would be silently ignored."""
  out = []
  for binding in bindings:
    key, sep, value = binding.partition("=")
    key = key.strip()
    scopes = {m.group(1) for m in re.finditer(rf"^([\w.]+)/{re.escape(key)}\s*=", config_text, re.M)} \
        if "/" not in key else set()
    out.append(f"{scopes.pop()}/{key}{sep}{value}" if len(scopes) == 1 else binding)
  return out


def vocabulary_of(task: str | None, sentencepiece_model: str | None = None) -> seqio.Vocabulary | None:
  """The task's output vocabulary, or a T5-style vocabulary over an explicit SentencePiece model."""
  if sentencepiece_model:
    from repeat_lm.data import vocab  # pylint: disable=import-outside-toplevel
    if "://" not in sentencepiece_model and not Path(sentencepiece_model).is_file():
      raise FileNotFoundError(f"--vocabulary={sentencepiece_model}: no such file; pass the SentencePiece model the "
                              "run was trained with, or leave --vocabulary out to use its task's.")
    vocabulary = vocab.t5_vocabulary(sentencepiece_model)
    try:
      vocabulary.vocab_size  # pylint: disable=pointless-statement  # SeqIO reads the file lazily, on first use
    except (ValueError, FileNotFoundError) as e:
      # The vocabulary's own fix sends the user to REPEAT_LM_T5_VOCAB and --vocab, which is not this flag: its
      # problem alone, with this flag's fix.
      raise ValueError(f"--vocabulary={sentencepiece_model} cannot be used ({getattr(e, 'problem', e)}): pass the "
                       "SentencePiece model (.model) the run was trained with, or leave --vocabulary out to use its "
                       "task's.") from e
    return vocabulary
  if task is None:
    return None
  from repeat_lm.data import pipeline  # pylint: disable=import-outside-toplevel
  return pipeline.vocabulary_for(task)


def restore_params(model_dir: str | Path, module: Any, step: int | None = None) -> Any:
  """Parameters of `module` from a MODEL_DIR's latest (or `step`) checkpoint, on one device."""
  from repeat_lm.interop import load  # pylint: disable=import-outside-toplevel
  return load.load_for_module(model_dir, module, step=step)


def read_lines(input_file: str) -> list[str]:
  """The lines of a UTF-8 text file, or an error that names the file and the fix."""
  path = Path(input_file)
  if not path.is_file():
    raise FileNotFoundError(f"--input_file={input_file}: no such file; pass a UTF-8 text file, one input per line.")
  try:
    # Lines end at '\n' (or '\r\n') only, as `wc -l` counts them: str.splitlines() would also split at form feeds,
    # '\x1c'-'\x1e', '\x85', U+2028/U+2029 and lone '\r' inside a line, giving more outputs than input lines.
    with open(path, encoding="utf-8", newline="") as f:
      text = f.read()
  except UnicodeDecodeError as e:
    raise ValueError(f"--input_file={input_file} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                     f"{e.start}); re-encode it as UTF-8 (e.g. iconv -t UTF-8).") from e
  lines = text.split("\n")
  if lines[-1] == "":  # the newline that ends the last line starts no further one
    lines.pop()
  return [line[:-1] if line.endswith("\r") else line for line in lines]


def check_output_file(output_file: str, input_file: str | None = None, checkpoint: str | None = None) -> None:
  """Fail before any decoding when `output_file` cannot be written (a directory, or no directory to hold it), or
  when writing it would destroy the inputs or a file of the checkpoint (its config.gin, metrics.jsonl, weights)."""
  path = Path(output_file)
  if path.is_dir():
    raise ValueError(f"--output_file={output_file} is a directory; name a file, e.g. {path / 'outputs.txt'}.")
  if not path.parent.is_dir():
    raise FileNotFoundError(f"--output_file={output_file}: its directory {path.parent} does not exist; create it "
                            "or name a file in an existing directory.")
  # Found only after decoding every input, an unwritable place lost the outputs. write_outputs writes a temporary file
  # beside the output's real path and renames it there: that folder must be writable.
  if not os.access(path.resolve().parent, os.W_OK):
    raise PermissionError(f"--output_file={output_file} cannot be written here (a read-only file system or no "
                          "permission); name a file in a folder you can write.")
  # Under checkpoints/ (a step's folder, or checkpoints/ itself) a new file was accepted too, and the run deleted it
  # with the step's checkpoint when its checkpoints rotated.
  owner = files.model_dir_around(path.parent)
  if owner is not None:
    raise ValueError(f"--output_file={output_file} is inside the checkpoints of {owner}, whose step folders "
                     f"training deletes with their checkpoints; name a file elsewhere, e.g. {owner / 'outputs.txt'}.")
  if not path.exists():
    return
  if input_file is not None and Path(input_file).exists() and path.samefile(input_file):
    raise ValueError(f"--output_file={output_file} is the --input_file: the outputs would replace the inputs; name "
                     "another file.")
  # Earlier outputs (.txt) may be overwritten; the run's records and weights (config.gin, metrics.jsonl, anything
  # under checkpoints/, a Hugging Face model.safetensors) may not.
  root = Path(checkpoint).resolve() if checkpoint is not None else None
  if root is not None:  # a step directory (MODEL_DIR/checkpoints/20) or checkpoints/: the whole MODEL_DIR is the run's
    root = files.model_dir_around(root) or root
  target = path.resolve()
  if root is not None and root in target.parents and (target.parent != root or target.suffix != ".txt"):
    raise ValueError(f"--output_file={output_file} is a file of the checkpoint --checkpoint={checkpoint}; writing the "
                     f"outputs over it would lose it. Name a new file, e.g. {root / 'outputs.txt'}.")


def check_vocabulary_fits(vocabulary: seqio.Vocabulary, model_vocab_size: int) -> None:
  """A vocabulary with more ids than the model's embedding rows decodes nonsense (ids past the table are clipped)."""
  if vocabulary.vocab_size > model_vocab_size:
    raise ValueError(f"The vocabulary has {vocabulary.vocab_size} ids but the model's vocab_size is "
                     f"{model_vocab_size}: it is not the vocabulary this model was trained with. Drop --vocabulary "
                     "(the MODEL_DIR's task gives the right one) or pass the SentencePiece model it was trained on.")


def infer(checkpoint: str, input_file: str, *, output_file: str | None = None,
          decode: decoding.DecodeConfig = decoding.DecodeConfig(), step: int | None = None,
          gin_files: Sequence[str] = (), bindings: Sequence[str] = (), sentencepiece_model: str | None = None,
          batch_size: int = 32, gin_search_paths: Sequence[str] = (), max_input_length: int | None = None) -> list[str]:
  """Decode every line of `input_file` with the model of MODEL_DIR `checkpoint`; one output line per input line.

  Inputs longer than `max_input_length` tokens (default: the run's TASK_FEATURE_LENGTHS['inputs'], else
  DEFAULT_MAX_INPUT_LENGTH) are cut, with a warning, as T5X's infer trims them.
  """
  if batch_size < 1:
    raise ValueError(f"--batch_size={batch_size}: decode at least one input at a time.")
  if max_input_length is not None and not (checks.is_count(max_input_length) and max_input_length >= 2):
    raise ValueError(f"--max_input_length={max_input_length}: inputs need at least 2 tokens (one and the EOS).")
  texts = read_lines(input_file)
  if output_file:
    check_output_file(output_file, input_file, checkpoint)
  model, task = model_from_model_dir(checkpoint, gin_files, bindings, gin_search_paths)
  vocabulary = vocabulary_of(task, sentencepiece_model)
  if vocabulary is None:
    raise ValueError("The gin configuration names no MIXTURE_OR_TASK_NAME, so the vocabulary is unknown: pass "
                     "--vocabulary=PATH (a SentencePiece model).")
  if sentencepiece_model:  # a task's vocabulary was checked against the model when it trained
    check_vocabulary_fits(vocabulary, model.module.config.vocab_size)
  params = restore_params(checkpoint, model.module, step)
  if max_input_length is None:
    max_input_length = (trained_inputs_length(checkpoint, gin_files, bindings, gin_search_paths)
                        or DEFAULT_MAX_INPUT_LENGTH)
  outputs = predict_texts(model.module, params, vocabulary, texts, decode, batch_size=batch_size,
                          max_inputs_length=max_input_length)
  if output_file:
    write_outputs(output_file, outputs)
  return outputs


def write_outputs(output_file: str, outputs: Sequence[str]) -> None:
  """One output per line. A file is replaced whole (temp file + rename): a write that fails part-way (a full disk,
  a file-size limit, a kill) used to leave the earlier outputs truncated and a shorter file of whole-looking lines.
  A target that is not a regular file (/dev/stdout, a pipe) is written in place: it cannot be renamed over."""
  data = "".join(o.replace("\n", " ") + "\n" for o in outputs).encode("utf-8")
  path = Path(output_file)
  if path.exists() and not path.is_file():
    path.write_bytes(data)
    return
  files.atomic_write_bytes(path.resolve(), data)  # resolved: a symlinked output keeps its link
