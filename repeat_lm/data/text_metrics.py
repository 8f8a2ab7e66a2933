"""Metrics of decoded text for the downstream tasks (SQuAD, SuperGLUE), as SeqIO `metric_fns(targets, predictions)`.

Scores are percentages (0-100), as T5 reports them.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence
from typing import Any

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
  """The official SQuAD v1.1 normalisation: lowercase, drop punctuation, drop the articles a/an/the, and collapse
  whitespace (in that order)."""
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  text = _ARTICLES.sub(" ", text)
  return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
  return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
  """Harmonic mean of token precision and recall after normalisation (bag of words with multiplicity)."""
  pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
  common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(pred), common / len(ref)
  return 2 * precision * recall / (precision + recall)


def squad(targets: Sequence[Sequence[str]], predictions: Sequence[str]) -> dict[str, float]:
  """EM and F1, each the max over an example's reference answers, averaged over examples (x100)."""
  if len(targets) != len(predictions):
    raise ValueError(f"{len(targets)} reference lists for {len(predictions)} predictions.")
  if not predictions:
    return {"em": 0.0, "f1": 0.0}
  em = [max(exact_match(p, r) for r in refs) for refs, p in zip(targets, predictions)]
  f1 = [max(token_f1(p, r) for r in refs) for refs, p in zip(targets, predictions)]
  return {"em": 100.0 * float(np.mean(em)), "f1": 100.0 * float(np.mean(f1))}


def accuracy(targets: Sequence[Any], predictions: Sequence[Any]) -> dict[str, float]:
  return {"accuracy": 100.0 * float(np.mean([t == p for t, p in zip(targets, predictions)])) if targets else 0.0}


def _f1_for_class(targets: Sequence[int], predictions: Sequence[int], cls: int) -> float:
  tp = sum(t == cls and p == cls for t, p in zip(targets, predictions))
  fp = sum(t != cls and p == cls for t, p in zip(targets, predictions))
  fn = sum(t == cls and p != cls for t, p in zip(targets, predictions))
  return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def mean_3class_f1(targets: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
  """CB's metric: the unweighted mean of the per-class F1 of classes 0, 1, 2."""
  return {"mean_3class_f1": 100.0 * float(np.mean([_f1_for_class(targets, predictions, c) for c in range(3)]))}


def multirc(targets: Sequence[tuple[Any, int]], predictions: Sequence[tuple[Any, int]]) -> dict[str, float]:
  """MultiRC: F1 over all answer options ('f1a') and exact match of all options of a question ('em').

  targets / predictions: (question group, label) pairs; the group ids the answer options of one question.
  """
  labels = [t for _, t in targets]
  # T5's f1_score_with_invalid: a prediction that is no label (-1) is the wrong one, so it costs F1 whatever the
  # target (counted as a negative, it would be a free true negative on a False option), as it costs EM below.
  preds = [p if p in (0, 1) else 1 - t for (_, p), t in zip(predictions, labels)]
  groups: dict[Any, list[bool]] = collections.defaultdict(list)
  for (group, t), (_, p) in zip(targets, predictions):
    groups[group].append(t == p)
  em = float(np.mean([all(v) for v in groups.values()])) if groups else 0.0
  return {"f1a": 100.0 * _f1_for_class(labels, preds, 1), "em": 100.0 * em}


def record(targets: Sequence[tuple[Any, Sequence[str]]], predictions: Sequence[tuple[Any, str]]) -> dict[str, float]:
  """ReCoRD: SQuAD EM and F1 (max over a query's gold answers), averaged over queries (x100).

  targets / predictions: (query group, gold answers) / (query group, text) pairs. The task writes one example per
  gold answer, all with the same input, so only the first example of each group counts: a query with three answers
  weighs as much as one with one. Queries without gold answers (the unlabeled test split) are not scored.
  """
  if len(targets) != len(predictions):
    raise ValueError(f"{len(targets)} targets for {len(predictions)} predictions.")
  seen, references, replies = set(), [], []
  for (group, answers), (_, reply) in zip(targets, predictions):
    if group in seen or not answers:
      continue
    seen.add(group)
    references.append(list(answers))
    replies.append(reply)
  return squad(references, replies)


# T5's determiner list for WSC (t5.data.postprocessors.wsc_simple): 'the dog', 'his dog' and 'dog' name the same
# dog. 'its' is not in it, and nothing strips punctuation: scores stay comparable with T5's published WSC numbers.
_WSC_DETERMINERS = frozenset("a an few her his each every many much my our some that the their these this those "
                             "which whose your".split())


def _wsc_clean(text: str) -> str:
  return " ".join(w for w in text.strip().lower().split(" ") if w not in _WSC_DETERMINERS)


def wsc_referent_match(prediction: str, referent: str) -> int:
  """Whether a decoded noun phrase names `referent` (WSC's span1): 1 yes, 0 no, -1 for an empty prediction.

  T5's rule for 'wsc_simple', exactly: lowercase, split on spaces, drop the determiners; then the two name the same
  thing when one's set of words contains the other's ('the big dog' and 'dog' match, 'dog' and 'cat' do not), unless
  only one has an apostrophe ("Bob" names Bob, not "Bob's hat"). Punctuation is kept ('Tom.' is not 'Tom'), as in
  T5. -1 equals no label, so an empty or determiner-only prediction is always scored wrong.
  """
  pred, ref = _wsc_clean(prediction), _wsc_clean(referent)
  if not pred:
    return -1
  if ("'" in pred) != ("'" in ref):
    return 0
  pred_words, ref_words = set(pred.split(" ")), set(ref.split(" "))
  return int(pred_words <= ref_words or ref_words <= pred_words)
