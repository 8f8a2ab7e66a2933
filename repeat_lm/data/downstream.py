"""SeqIO tasks for fine-tuning and evaluation: SQuAD v1.1 and SuperGLUE (over TFDS), and SQuAD-format JSONL files.

Text-to-text formats as in T5: SQuAD 'question: <q> context: <c>' -> the first answer (metrics take every reference
answer), punctuation spaced in all three as T5 does ('U . S .'); SuperGLUE '<task> <field>: <value> ...' -> the
label's name, except ReCoRD ('record query: <q> entities: <e, ...> passage: <p>' -> an answer entity, one example per
answer) and WSC (T5's 'wsc_simple': 'wsc: <text with the pronoun *marked*>' -> the candidate referent, span1).
Registering touches no data: TFDS sources load on first use (`tfds_data_dir`, default ~/tensorflow_datasets; download
them beforehand on machines without network).

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

def _space_punctuation(text: tf.Tensor) -> tf.Tensor:
  """Every ASCII punctuation mark as a word of its own ('U.S.' -> 'U . S .'), whitespace collapsed."""
  return tf.strings.strip(tf.strings.regex_replace(tf.strings.regex_replace(text, r"([[:punct:]])", r" \1 "),
                                                   r"\s+", " "))


def _squad_example(question: tf.Tensor, context: tf.Tensor, answers: tf.Tensor, example_id: tf.Tensor) -> dict:
  # T5's squad preprocessor spaces the punctuation of question, context and answers alike: the model reads and
  # writes 'U . S .', and the references the metric scores against are the spaced answers (T5's `qa` postprocessor),
  # so EM/F1 compare with T5's and the paper's SQuAD numbers ('3-1 win' vs '3-1' is F1 0.8 there, 0.67 unspaced).
  answers = _space_punctuation(answers)
  return {"inputs": tf.strings.strip(_join("question:", _space_punctuation(question), "context:",
                                           _space_punctuation(context))),
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
  with tf.io.gfile.GFile(path, "rb") as f:
    for n, raw in enumerate(f):
      if not raw.strip():
        continue
      # Bad lines name the file and line, as corpora do, instead of a bare decoder error (or TensorFlow's
      # "Unsupported object type" when the dataset is first read).
      try:
        row = json.loads(raw.decode("utf-8"))
      except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{n + 1}: not valid UTF-8 ({e}); SQuAD-format files must be UTF-8.") from e
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n + 1}: malformed JSON ({e}).") from e
      if not isinstance(row, Mapping):
        raise ValueError(f"{path}:{n + 1}: expected a JSON object, got {type(row).__name__}.")
      answers = row.get("answers")
      if isinstance(answers, Mapping):  # the TFDS / official layout {'text': [...], 'answer_start': [...]}
        answers = answers.get("text")
      if isinstance(answers, str):
        answers = [answers]
      if isinstance(answers, list):  # the official SQuAD JSON layout: [{'text': ..., 'answer_start': ...}, ...]
        answers = [a.get("text") if isinstance(a, Mapping) else a for a in answers]
      if (not answers or not all(isinstance(a, (str, int, float)) for a in answers)
          or not isinstance(row.get("question"), str) or not isinstance(row.get("context"), str)):
        raise ValueError(f"{path}:{n + 1}: a SQuAD-format line needs 'question' and 'context' strings and a "
                         "non-empty 'answers' (a list of strings, {'text': [...]} or [{'text': ...}, ...]).")
      rows.append({"id": str(row.get("id", f"{os.path.basename(path)}:{n}")), "question": row["question"],
                   "context": row["context"], "answers": [str(a) for a in answers]})
  if not rows:  # an empty split would evaluate to EM = F1 = 0 (or train on nothing) without a word
    raise ValueError(f"{path}: no SQuAD-format examples (the file is empty).")
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
    if split not in files:  # e.g. a directory without validation.jsonl, read by evaluation (a bare KeyError before)
      raise FileNotFoundError(f"SQuAD-format task {name!r} has no {split!r} split: its files are {dict(files)}; add "
                              f"{split}.jsonl to the directory or a {split!r} entry to `files`.")
    rows = _read_squad_jsonl(files[split])
    signature = {"id": tf.TensorSpec([], tf.string), "question": tf.TensorSpec([], tf.string),
                 "context": tf.TensorSpec([], tf.string), "answers": tf.TensorSpec([None], tf.string)}
    return tf.data.Dataset.from_generator(lambda: iter(rows), output_signature=signature)

  source = seqio.FunctionDataSource(dataset_fn, splits=list(files))
  return _add(name, source, _squad_jsonl_preprocessor, _vocabulary(vocabulary), _squad_postprocess,
              [text_metrics.squad], "squad")


# ---- SuperGLUE ----

_SUPER_GLUE: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[Callable, ...]]] = {
    # task: (input fields in order, label names, metrics). The order is T5's: sorted field names, except MultiRC and
    # WiC, whose order T5 gives explicitly ('boolq passage: ... question: ...').
    "boolq": (("passage", "question"), ("False", "True"), (text_metrics.accuracy,)),
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
    if benchmark == "multirc":  # T5 strips MultiRC's HTML ('<b>Sent 1: </b>...<br>'): '<' is no T5 vocabulary piece
      parts = [tf.strings.regex_replace(tf.strings.regex_replace(p, "<br>", " "), "<(/)?b>", "") for p in parts]
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


# ---- SuperGLUE ReCoRD and WSC: the answer is a span of text, not a label ----

def _record_preprocessor(ds: tf.data.Dataset) -> tf.data.Dataset:
  """'record query: <q> entities: <e1, e2, ...> passage: <p>' -> the entity that fills the query's @placeholder.

  One example per gold answer, as T5 (each is a correct target to train on); every copy carries all the answers and
  the query's group (idx passage, query) so that evaluation can count each query once.
  """

  def fn(x):
    # The passage's '@highlight' bullet lines become sentences (no second full stop after one that ends in one).
    passage = tf.strings.regex_replace(x["passage"], r"([.?!\"'])\n@highlight\n", r"\1 ")
    passage = tf.strings.regex_replace(passage, r"\n@highlight\n", ". ")
    inputs = _join("record query:", x["query"], "entities:", tf.strings.reduce_join(x["entities"], separator=", "),
                   "passage:", passage)
    answers = x["answers"]
    # A query without answers (only the unlabeled test split has them) is kept once with T5's placeholder target
    # '<unk>' rather than dropped, so that predictions can still be written for every test query; no metric reads it.
    targets = tf.cond(tf.size(answers) > 0, lambda: answers, lambda: tf.constant(["<unk>"]))
    n = tf.size(targets)
    group = tf.stack([tf.cast(x["idx"]["passage"], tf.int32), tf.cast(x["idx"]["query"], tf.int32)])
    return {"inputs": tf.fill([n], inputs), "targets": targets, "answers": tf.tile(answers[None], [n, 1]),
            "group": tf.tile(group[None], [n, 1])}

  return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def _record_postprocess(output: str, example: Mapping[str, Any] | None = None, is_target: bool = False):
  """(query group, every gold answer) for targets, (query group, text) for predictions."""
  group = tuple(int(g) for g in example["group"]) if example is not None else None
  if is_target and example is not None:
    return group, [_decode(a) for a in example["answers"]]
  return group, output


def _regex_escape(text: tf.Tensor) -> tf.Tensor:
  return tf.strings.regex_replace(text, r"([\\.^$|?*+()\[\]{}-])", r"\\\1")


def _mark_pronoun(text: tf.Tensor, pronoun: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
  """Wrap the pronoun in asterisks: the one starting at (space-separated) word `index`, else its first whole-word
  occurrence (a few WSC examples carry an index that points at a neighbouring word)."""
  word = tf.strings.join(["(", _regex_escape(pronoun), r")(\W|$)"])
  at_index = tf.strings.join([r"^((?:\S+\s+){", tf.strings.as_string(index), "})", word])
  marked = tf.strings.regex_replace(text, at_index, r"\1*\2*\3", replace_global=False)
  first = tf.strings.join([r"(^|\W)", word])
  return tf.cond(tf.equal(marked, text),
                 lambda: tf.strings.regex_replace(text, first, r"\1*\2*\3", replace_global=False),
                 lambda: marked)


def _wsc_preprocessor(ds: tf.data.Dataset) -> tf.data.Dataset:
  """T5's 'wsc_simple': 'wsc: <text with the pronoun (span2) marked *like this*>' -> the candidate referent (span1).

  The target is span1 whatever the label, so validation keeps both labels (the metric checks whether the prediction
  names span1 for label 1 and not for label 0); training keeps only label 1 (`_WscTrainSource`), where span1 is the
  right answer.
  """

  def fn(x):
    text = _mark_pronoun(x["text"], x["span2_text"], tf.cast(x["span2_index"], tf.int32))
    return {"inputs": _join("wsc:", text), "targets": x["span1_text"], "label": tf.cast(x["label"], tf.int32),
            "idx": tf.cast(x["idx"], tf.int32)}

  return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


class _WscTrainSource(seqio.TfdsDataSource):
  """WSC from TFDS whose 'train' split holds only the label-1 examples: a label-0 example's target (span1) is the
  wrong referent, so training on it would teach the wrong answer. A source, not a preprocessor, because
  preprocessors do not see the split."""

  def get_dataset(self, split: str | None = None, *args, **kwargs) -> tf.data.Dataset:
    ds = super().get_dataset(split, *args, **kwargs)
    return ds.filter(lambda x: tf.equal(x["label"], 1)) if split == "train" else ds


def _wsc_postprocess(output: str, example: Mapping[str, Any] | None = None, is_target: bool = False) -> int:
  """Targets: the label. Predictions: 1 if the text names the example's referent (its target, span1), 0 if it names
  something else, -1 if empty or without the example (never equal to a label, so always wrong)."""
  if example is None:
    return -1
  if is_target:
    return int(example["label"])
  return text_metrics.wsc_referent_match(output, _decode(example["targets_pretokenized"]))


def _decode(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# task: (TFDS config, source class, preprocessor, postprocessor, metrics)
_SUPER_GLUE_SPAN: dict[str, tuple[str, type, Callable, Callable, tuple[Callable, ...]]] = {
    "record": ("record", seqio.TfdsDataSource, _record_preprocessor, _record_postprocess, (text_metrics.record,)),
    "wsc": ("wsc.fixed", _WscTrainSource, _wsc_preprocessor, _wsc_postprocess, (text_metrics.accuracy,)),
}
SUPER_GLUE_TASKS = tuple(sorted([*_SUPER_GLUE, *_SUPER_GLUE_SPAN]))


def super_glue_task(task: str, name: str | None = None, vocabulary: seqio.Vocabulary | str | None = None,
                    tfds_data_dir: str | None = None) -> str:
  """One SuperGLUE task over TFDS super_glue/<task> (boolq, cb, copa, multirc, record, rte, wic, wsc; wsc reads
  wsc.fixed). Metrics: accuracy; cb also mean 3-class F1; multirc F1a and per-question EM; record per-query EM and F1
  (max over the gold answers); wsc accuracy of 'names span1' against the label. Returns the name."""
  name = name or f"{SUPER_GLUE_MIXTURE}.{task}"
  if task in _SUPER_GLUE_SPAN:
    config, source_cls, preprocessor, postprocess, metrics = _SUPER_GLUE_SPAN[task]
    source = source_cls(f"super_glue/{config}:{SUPER_GLUE_VERSION}", tfds_data_dir=tfds_data_dir)
    return _add(name, source, preprocessor, _vocabulary(vocabulary), postprocess, metrics, task)
  if task not in _SUPER_GLUE:
    raise ValueError(f"SuperGLUE task {task!r} is not supported; choose from {', '.join(SUPER_GLUE_TASKS)}.")
  fields, label_names, metrics = _SUPER_GLUE[task]
  preprocessor = functools.partial(_glue_preprocessor, benchmark=task, fields=fields, label_names=label_names)
  postprocess = functools.partial(_label_postprocess, label_names=label_names, grouped=task == "multirc")
  return _add(name, seqio.TfdsDataSource(f"super_glue/{task}:{SUPER_GLUE_VERSION}", tfds_data_dir=tfds_data_dir),
              preprocessor, _vocabulary(vocabulary), postprocess, metrics, task)


def super_glue_mixture(name: str = SUPER_GLUE_MIXTURE, vocabulary: seqio.Vocabulary | str | None = None,
                       tfds_data_dir: str | None = None, tasks: Sequence[str] = SUPER_GLUE_TASKS) -> str:
  """The SuperGLUE tasks as one mixture (equal rates), each task named '<name>.<task>'. Returns the mixture name."""
  names = [super_glue_task(t, f"{name}.{t}", vocabulary, tfds_data_dir) for t in tasks]
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, names, default_rate=1.0)
  return name


# Registered at import, lazily (no data is read and the default vocabulary is built on first use).
squad_task()
super_glue_mixture()
