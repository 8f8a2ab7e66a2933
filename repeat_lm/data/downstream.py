"""SeqIO tasks for fine-tuning and evaluation: SQuAD v1.1 and SuperGLUE (over TFDS), and SQuAD-format JSONL files.

Text-to-text formats as in T5: SQuAD 'question: <q> context: <c>' -> the first answer (metrics take every reference
answer); SuperGLUE '<task> <field>: <value> ...' -> the label's name. Registering touches no data: TFDS sources load
on first use (`tfds_data_dir`, default ~/tensorflow_datasets; download them beforehand on machines without network).

Registered at import with the default vocabulary (tasks below); for another vocabulary call the functions, e.g. in gin
  from repeat_lm.data import downstream
  MIXTURE_OR_TASK_NAME = @downstream.squad_task()
  downstream.squad_task.vocabulary = @vocab.t5_vocabulary()
Each task knows its metric prefix (`metric_prefix`): evaluation writes e.g. eval/squad_em, eval/squad_f1.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import seqio
import tensorflow as tf

from repeat_lm.data import text_metrics, vocab as vocab_lib

SQUAD_TASK = "repeat_lm.squad_v1"
SUPER_GLUE_MIXTURE = "repeat_lm.super_glue"
SQUAD_TFDS = "squad/v1.1:3.0.0"
SUPER_GLUE_VERSION = "1.0.2"

# task name -> short name used in metric keys (eval/<prefix>_<metric>).
_METRIC_PREFIX: dict[str, str] = {}


def metric_prefix(task_name: str) -> str:
  return _METRIC_PREFIX.get(task_name, task_name.rsplit(".", 1)[-1])


def _output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  return {"inputs": seqio.Feature(vocabulary, add_eos=True), "targets": seqio.Feature(vocabulary, add_eos=True)}


def _add(name: str, source: seqio.DataSource, preprocessor: Callable, vocabulary: seqio.Vocabulary,
         postprocess_fn: Callable, metric_fns: Sequence[Callable], prefix: str) -> str:
  """Register (or re-register, replacing) a text-to-text task."""
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name, source=source, output_features=_output_features(vocabulary),
      preprocessors=[preprocessor, seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                     seqio.preprocessors.append_eos_after_trim],
      postprocess_fn=postprocess_fn, metric_fns=list(metric_fns))
  _METRIC_PREFIX[name] = prefix
  return name


def _vocabulary(vocabulary: seqio.Vocabulary | str | None) -> seqio.Vocabulary:
  if vocabulary is None:
    return vocab_lib.default_vocabulary()
  return vocab_lib.t5_vocabulary(vocabulary) if isinstance(vocabulary, str) else vocabulary


def _join(*parts: Any) -> tf.Tensor:
  return tf.strings.regex_replace(tf.strings.join(list(parts), separator=" "), r"\s+", " ")


# ---- SQuAD ----

def _squad_example(question: tf.Tensor, context: tf.Tensor, answers: tf.Tensor, example_id: tf.Tensor) -> dict:
  return {"inputs": tf.strings.strip(_join("question:", question, "context:", context)),
          "targets": answers[0], "answers": answers, "id": example_id}


def _squad_tfds_preprocessor(ds: tf.data.Dataset) -> tf.data.Dataset:
  return ds.map(lambda x: _squad_example(x["question"], x["context"], x["answers"]["text"], x["id"]),
                num_parallel_calls=tf.data.AUTOTUNE)


def _squad_jsonl_preprocessor(ds: tf.data.Dataset) -> tf.data.Dataset:
  return ds.map(lambda x: _squad_example(x["question"], x["context"], x["answers"], x["id"]),
                num_parallel_calls=tf.data.AUTOTUNE)


def _squad_postprocess(output: str, example: Mapping[str, Any] | None = None, is_target: bool = False):
  """Targets become every reference answer (from the example), predictions stay text."""
  if is_target and example is not None:
    return [a.decode("utf-8") if isinstance(a, bytes) else str(a) for a in example["answers"]]
  return output


def squad_task(name: str = SQUAD_TASK, vocabulary: seqio.Vocabulary | str | None = None,
               tfds_data_dir: str | None = None) -> str:
  """SQuAD v1.1 from TFDS (splits 'train', 'validation'); metrics eval/squad_em, eval/squad_f1. Returns the name."""
  return _add(name, seqio.TfdsDataSource(SQUAD_TFDS, tfds_data_dir=tfds_data_dir), _squad_tfds_preprocessor,
              _vocabulary(vocabulary), _squad_postprocess, [text_metrics.squad], "squad")


def _read_squad_jsonl(path: str) -> list[dict[str, Any]]:
  rows = []
  with tf.io.gfile.GFile(path) as f:
    for n, line in enumerate(f):
      if not line.strip():
        continue
      row = json.loads(line)
      answers = row.get("answers")
      if isinstance(answers, Mapping):  # the TFDS / official layout {'text': [...], 'answer_start': [...]}
        answers = answers.get("text")
      if isinstance(answers, str):
        answers = [answers]
      if not answers or "question" not in row or "context" not in row:
        raise ValueError(f"{path}:{n + 1}: a SQuAD-format line needs 'question', 'context' and a non-empty "
                         "'answers' (a list of strings, or {'text': [...]}).")
      rows.append({"id": str(row.get("id", f"{os.path.basename(path)}:{n}")), "question": row["question"],
                   "context": row["context"], "answers": [str(a) for a in answers]})
  return rows


def squad_jsonl_task(files: Mapping[str, str] | str, name: str | None = None,
                     vocabulary: seqio.Vocabulary | str | None = None) -> str:
  """A SQuAD-format task over local JSONL files (one {'question', 'context', 'answers': [...], 'id'?} per line).

  files: {'train': path, 'validation': path}, or a directory holding train.jsonl and validation.jsonl. The name
  defaults to 'repeat_lm.squad_jsonl.<8 hex of the paths>'. Metrics as `squad_task` (eval/squad_em, eval/squad_f1).
  """
  if isinstance(files, str):
    files = {split: os.path.join(files, f"{split}.jsonl") for split in ("train", "validation")
             if tf.io.gfile.exists(os.path.join(files, f"{split}.jsonl"))}
  files = {k: os.path.abspath(v) if "://" not in v else v for k, v in files.items()}
  for split, path in files.items():
    if not tf.io.gfile.exists(path):
      raise FileNotFoundError(f"SQuAD-format {split} file {path} does not exist.")
  if not files:
    raise FileNotFoundError("No SQuAD-format JSONL files given (expected train.jsonl / validation.jsonl).")
  name = name or "repeat_lm.squad_jsonl." + hashlib.sha1(json.dumps(sorted(files.items())).encode()).hexdigest()[:8]

  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    del shuffle_files, seed  # one file per split: nothing to shuffle at the file level
    rows = _read_squad_jsonl(files[split])
    signature = {"id": tf.TensorSpec([], tf.string), "question": tf.TensorSpec([], tf.string),
                 "context": tf.TensorSpec([], tf.string), "answers": tf.TensorSpec([None], tf.string)}
    return tf.data.Dataset.from_generator(lambda: iter(rows), output_signature=signature)

  source = seqio.FunctionDataSource(dataset_fn, splits=list(files))
  return _add(name, source, _squad_jsonl_preprocessor, _vocabulary(vocabulary), _squad_postprocess,
              [text_metrics.squad], "squad")


# ---- SuperGLUE ----

_SUPER_GLUE: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[Callable, ...]]] = {
    # task: (input fields in order, label names, metrics)
    "boolq": (("question", "passage"), ("False", "True"), (text_metrics.accuracy,)),
    "cb": (("hypothesis", "premise"), ("entailment", "contradiction", "neutral"),
           (text_metrics.accuracy, text_metrics.mean_3class_f1)),
    "copa": (("choice1", "choice2", "premise", "question"), ("choice1", "choice2"), (text_metrics.accuracy,)),
    "multirc": (("question", "answer", "paragraph"), ("False", "True"), (text_metrics.multirc,)),
    "rte": (("hypothesis", "premise"), ("entailment", "not_entailment"), (text_metrics.accuracy,)),
    "wic": (("sentence1", "sentence2", "word"), ("False", "True"), (text_metrics.accuracy,)),
}


def _glue_preprocessor(ds: tf.data.Dataset, benchmark: str, fields: Sequence[str],
                       label_names: Sequence[str]) -> tf.data.Dataset:
  names = tf.constant(list(label_names))

  def fn(x):
    parts = [benchmark] + [p for f in fields for p in (f"{f}:", x[f])]
    # Test splits are unlabeled (-1): their target is a placeholder that no metric reads.
    target = tf.where(x["label"] >= 0, names[tf.maximum(tf.cast(x["label"], tf.int32), 0)], "<unk>")
    out = {"inputs": _join(*parts), "targets": target, "label": tf.cast(x["label"], tf.int32)}
    if "idx" in x and isinstance(x["idx"], Mapping):  # MultiRC groups answer options by (paragraph, question)
      out["group"] = tf.stack([tf.cast(x["idx"]["paragraph"], tf.int32), tf.cast(x["idx"]["question"], tf.int32)])
    return out

  return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def _label_postprocess(output: str, example: Mapping[str, Any] | None = None, is_target: bool = False, *,
                       label_names: Sequence[str], grouped: bool):
  """Text -> class index (-1 for text that is no label name); targets come from the example's label."""
  if is_target and example is not None:
    label = int(example["label"])
  else:
    label = list(label_names).index(output.strip()) if output.strip() in label_names else -1
  if grouped:
    group = tuple(int(g) for g in example["group"]) if example is not None else None
    return group, label
  return label


def super_glue_task(task: str, name: str | None = None, vocabulary: seqio.Vocabulary | str | None = None,
                    tfds_data_dir: str | None = None) -> str:
  """One SuperGLUE task over TFDS super_glue/<task> (boolq, cb, copa, multirc, rte, wic). Returns the name."""
  if task not in _SUPER_GLUE:
    raise ValueError(f"SuperGLUE task {task!r} is not supported; choose from {sorted(_SUPER_GLUE)} (ReCoRD and WSC "
                     "need span-based formats that are not implemented).")
  fields, label_names, metrics = _SUPER_GLUE[task]
  preprocessor = functools.partial(_glue_preprocessor, benchmark=task, fields=fields, label_names=label_names)
  postprocess = functools.partial(_label_postprocess, label_names=label_names, grouped=task == "multirc")
  return _add(name or f"{SUPER_GLUE_MIXTURE}.{task}",
              seqio.TfdsDataSource(f"super_glue/{task}:{SUPER_GLUE_VERSION}", tfds_data_dir=tfds_data_dir),
              preprocessor, _vocabulary(vocabulary), postprocess, metrics, task)


def super_glue_mixture(name: str = SUPER_GLUE_MIXTURE, vocabulary: seqio.Vocabulary | str | None = None,
                       tfds_data_dir: str | None = None, tasks: Sequence[str] = tuple(_SUPER_GLUE)) -> str:
  """The SuperGLUE tasks as one mixture (equal rates), each task named '<name>.<task>'. Returns the mixture name."""
  names = [super_glue_task(t, f"{name}.{t}", vocabulary, tfds_data_dir) for t in tasks]
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, names, default_rate=1.0)
  return name


# Registered at import, lazily (no data is read and the default vocabulary is built on first use).
squad_task()
super_glue_mixture()
