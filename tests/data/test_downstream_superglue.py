"""SuperGLUE ReCoRD and WSC (repeat_lm.data.downstream): T5's text-to-text formats on hand-built examples in the TFDS
feature layout (no TFDS data offline), their metrics on hand-made cases, and their registration."""

import numpy as np
import pytest
import seqio
import tensorflow as tf

from repeat_lm.data import downstream, text_metrics

RECORD = {
    "passage": "Storm Ida hit Oslo on Monday.\n@highlight\nNo one was hurt\n@highlight\nRoads closed!\n@highlight\n"
               "More rain is due",
    "query": "Officials in @placeholder said the roads would reopen.",
    "entities": ["Ida", "Oslo", "Norway"],
    "answers": ["Oslo", "Norway"],
    "idx": {"passage": np.int32(3), "query": np.int32(7)},
}
RECORD_INPUTS = ("record query: Officials in @placeholder said the roads would reopen. entities: Ida, Oslo, Norway "
                 "passage: Storm Ida hit Oslo on Monday. No one was hurt. Roads closed! More rain is due")

WSC = {
    "text": "Mitchell asked Tom if he could lend some money.",
    "span1_index": np.int32(2), "span2_index": np.int32(4), "span1_text": "Tom", "span2_text": "he",
    "label": np.int64(1), "idx": np.int32(5),
}


def run(preprocessor, example):
  return list(preprocessor(tf.data.Dataset.from_tensors(example)).as_numpy_iterator())


# ---- ReCoRD ----

def test_record_writes_one_example_per_answer():
  out = run(downstream._record_preprocessor, RECORD)
  assert [x["inputs"].decode() for x in out] == [RECORD_INPUTS, RECORD_INPUTS]
  assert [x["targets"].decode() for x in out] == ["Oslo", "Norway"]  # the entities that fill @placeholder
  for x in out:  # every copy carries all the answers and its query's group, for evaluation
    assert x["answers"].tolist() == [b"Oslo", b"Norway"] and x["group"].tolist() == [3, 7]


def test_record_query_without_answers_is_kept_once_as_unk():
  out = run(downstream._record_preprocessor, dict(RECORD, answers=tf.constant([], tf.string)))
  assert len(out) == 1 and out[0]["targets"] == b"<unk>" and out[0]["answers"].tolist() == []


def test_record_highlight_after_a_quote_gets_no_full_stop():
  # T5's rule: a bullet that already ends in . ? ! " or ' is joined with a space, any other one with '. '.
  passage = 'He said "No"\n@highlight\nIt\'s over\'\n@highlight\nDone'
  (out, _) = run(downstream._record_preprocessor, dict(RECORD, passage=passage))
  assert out["inputs"].decode().endswith("""passage: He said "No" It's over' Done""")


def test_record_postprocess_pairs_the_query_group():
  example = run(downstream._record_preprocessor, RECORD)[1]
  assert downstream._record_postprocess("Norway", example, is_target=True) == ((3, 7), ["Oslo", "Norway"])
  assert downstream._record_postprocess("oslo", example) == ((3, 7), "oslo")


def test_record_metric_is_max_over_answers_and_counts_each_query_once():
  q1, q2 = (3, 7), (3, 8)
  # Query 1 has two gold answers (so two examples); the prediction matches the second answer. Query 2 is half right.
  targets = [(q1, ["Oslo", "Norway"]), (q1, ["Oslo", "Norway"]), (q2, ["New York City"])]
  predictions = [(q1, "the Norway."), (q1, "the Norway."), (q2, "York")]
  result = text_metrics.record(targets, predictions)
  assert result["em"] == pytest.approx(50.0)  # (1 + 0) / 2 queries, not (1 + 1 + 0) / 3 examples
  assert result["f1"] == pytest.approx(100 * (1.0 + 0.5) / 2)  # 'york' vs 'new york city': P 1, R 1/3 -> F1 0.5
  # Copies of one query: only the first prediction counts (under greedy decoding they are all the same text).
  assert text_metrics.record([(q1, ["Oslo"]), (q1, ["Oslo"])], [(q1, "Oslo"), (q1, "Bergen")])["em"] == 100.0
  # Unlabeled (test) queries are not scored.
  assert text_metrics.record([(q1, ["Oslo"]), (q2, [])], [(q1, "Oslo"), (q2, "x")]) == {"em": 100.0, "f1": 100.0}


# ---- WSC ----

@pytest.mark.parametrize("change, inputs", [
    ({}, "wsc: Mitchell asked Tom if *he* could lend some money."),
    # punctuation attached to the pronoun stays outside the marks
    ({"text": 'John laughed. "Good for him," he said.', "span2_index": np.int32(4), "span2_text": "him"},
     'wsc: John laughed. "Good for *him*," he said.'),
    # the pronoun at word 0; a later occurrence of the same word stays unmarked
    ({"text": "He said Tom knew he would win.", "span2_index": np.int32(0), "span2_text": "He"},
     "wsc: *He* said Tom knew he would win."),
    # the marked occurrence is the one at the index, not the first
    ({"text": "Tom told Bob that he knew he was right.", "span2_index": np.int32(6), "span2_text": "he"},
     "wsc: Tom told Bob that he knew *he* was right."),
    # an index pointing at a neighbouring word (as in a few WSC examples): the first whole-word occurrence
    ({"text": "They might want to use it , really.", "span2_index": np.int32(4), "span2_text": "it"},
     "wsc: They might want to use *it* , really."),
    # whole words only: with the index on 'her', 'he' is marked neither inside it nor inside 'Then'
    ({"text": "Then her friend said he was late.", "span2_index": np.int32(1), "span2_text": "he"},
     "wsc: Then her friend said *he* was late."),
    # ... nor at the end of a word ('she') when the fallback searches the text
    ({"text": "Then she said he was late.", "span2_index": np.int32(0), "span2_text": "he"},
     "wsc: Then she said *he* was late."),
])
def test_wsc_marks_the_pronoun_and_targets_span1(change, inputs):
  (out,) = run(downstream._wsc_preprocessor, dict(WSC, **change))
  assert out["inputs"].decode() == inputs
  assert out["targets"] == b"Tom" and out["label"] == 1 and out["idx"] == 5


def test_wsc_trains_on_label_1_only(monkeypatch):
  labels = np.array([1, 0, 1, 0], np.int64)

  def fake_tfds(self, split=None, *args, **kwargs):
    return tf.data.Dataset.from_tensor_slices({"label": labels, "idx": np.arange(4, dtype=np.int32)})

  monkeypatch.setattr(seqio.TfdsDataSource, "get_dataset", fake_tfds)
  source = seqio.get_mixture_or_task("repeat_lm.super_glue.wsc").source

  def idx(split):
    return [int(x["idx"]) for x in source.get_dataset(split=split, shuffle=False).as_numpy_iterator()]

  assert idx("train") == [0, 2]  # a label-0 example's target is the wrong referent
  assert idx("validation") == [0, 1, 2, 3]  # evaluation needs both labels
  assert idx("test") == [0, 1, 2, 3]  # only training filters (T5's correct_referent_only): predictions for every one


# Expected values are T5's `wsc_simple` on the same pairs (t5/data/postprocessors.py), so WSC scores compare with
# T5's: punctuation counts and 'its' is no determiner there.
@pytest.mark.parametrize("prediction, referent, match", [
    ("Tom", "Tom", 1),
    ("the dog", "The dog", 1),  # case and determiners do not matter
    ("his big dog", "the dog", 1),  # one word set contains the other
    ("dog", "the big dog", 1),
    ("  a  dog ", "dog", 1),
    ("cat", "the dog", 0),
    ("Bob", "Bob's hat", 0),  # a possessive names something else
    ("hat", "Bob's hat", 0),  # ... even where one word set contains the other
    ("the dog.", "The dog", 0),  # punctuation is kept, as in T5
    ("Tom.", "Tom", 0),
    ("its", "the trophy", 0),  # 'its' is a word in T5's rule, not a determiner
    ("dog", "the", 0),
    ("", "Tom", -1),  # an empty prediction matches no label
    ("the", "Tom", -1),
])
def test_wsc_referent_match(prediction, referent, match):
  assert text_metrics.wsc_referent_match(prediction, referent) == match


def test_wsc_accuracy_scores_naming_span1_against_the_label():
  positive, negative = dict(WSC, label=np.int64(1)), dict(WSC, label=np.int64(0))
  examples = [run(downstream._wsc_preprocessor, e)[0] for e in (positive, negative, positive, negative)]
  for ex in examples:  # what seqio's tokenize adds and the postprocessor reads
    ex["targets_pretokenized"] = ex["targets"]
  replies = ["tom", "Mitchell", "Mitchell", "Tom"]  # right, right, wrong, wrong
  targets = [downstream._wsc_postprocess("", ex, is_target=True) for ex in examples]
  predictions = [downstream._wsc_postprocess(r, ex) for r, ex in zip(replies, examples)]
  assert targets == [1, 0, 1, 0] and predictions == [1, 0, 0, 1]
  assert text_metrics.accuracy(targets, predictions) == {"accuracy": 50.0}
  assert downstream._wsc_postprocess("", examples[1]) == -1  # empty: wrong whatever the label


def test_cb_mean_f1_averages_all_three_classes():
  # CB's F1 is the unweighted mean over entailment, contradiction and neutral: missing the one neutral example costs
  # its class's F1 (0) in the mean. Per class (TP, FP, FN): 0 (1, 1, 0) F1 2/3; 1 (1, 0, 0) F1 1; 2 (0, 0, 1) F1 0.
  got = text_metrics.mean_3class_f1([0, 1, 2], [0, 1, 0])
  assert got == {"mean_3class_f1": pytest.approx(100 * (2 / 3 + 1 + 0) / 3)}


# ---- registration ----

@pytest.mark.parametrize("task, tfds_name, metric_fns, example, reply, post_target, post_reply", [
    ("record", "super_glue/record:1.0.2", [text_metrics.record],
     {"group": np.array([3, 7]), "answers": np.array([b"Oslo", b"Norway"])}, "Oslo",
     ((3, 7), ["Oslo", "Norway"]), ((3, 7), "Oslo")),
    ("wsc", "super_glue/wsc.fixed:1.0.2", [text_metrics.accuracy],
     {"label": np.int32(0), "targets_pretokenized": b"Tom"}, "tom", 0, 1),
])
def test_tasks_are_registered_and_wired(task, tfds_name, metric_fns, example, reply, post_target, post_reply):
  name = f"{downstream.SUPER_GLUE_MIXTURE}.{task}"
  registered = seqio.get_mixture_or_task(name)
  assert registered.source.tfds_dataset.name == tfds_name
  assert set(registered.output_features) == {"inputs", "targets"}
  assert all(f.add_eos for f in registered.output_features.values())
  assert registered.predict_metric_fns == metric_fns and downstream.metric_prefix(name) == task
  # The SeqIO postprocessor signature (output, example=, is_target=), as inference.PredictionEval calls it.
  assert registered.postprocess_fn("ignored", example=example, is_target=True) == post_target
  assert registered.postprocess_fn(reply, example=example, is_target=False) == post_reply
  mixture = seqio.get_mixture_or_task(downstream.SUPER_GLUE_MIXTURE)
  assert name in [t.name for t in mixture.tasks]


def test_mixture_holds_every_supported_task():
  mixture = seqio.get_mixture_or_task(downstream.SUPER_GLUE_MIXTURE)
  assert sorted(t.name.rsplit(".", 1)[-1] for t in mixture.tasks) == list(downstream.SUPER_GLUE_TASKS) == [
      "boolq", "cb", "copa", "multirc", "record", "rte", "wic", "wsc"]


def test_unknown_task_lists_the_supported_ones():
  with pytest.raises(ValueError, match="'axb' is not supported; choose from boolq, cb, copa, multirc, record, rte, "
                                       "wic, wsc"):
    downstream.super_glue_task("axb")


def test_record_through_the_task_preprocessors():
  """The registered chain (format, tokenize, EOS) keeps the fields the postprocessor and metric read."""
  task = seqio.get_mixture_or_task("repeat_lm.super_glue.record")
  ds = task.preprocess_precache(tf.data.Dataset.from_tensors(RECORD))
  out = list(task.preprocess_postcache(ds, sequence_length={"inputs": 256, "targets": 8}).as_numpy_iterator())
  vocabulary = task.output_features["targets"].vocabulary
  assert [vocabulary.decode(x["targets"].tolist()) for x in out] == ["Oslo", "Norway"]
  assert out[0]["inputs_pretokenized"].decode() == RECORD_INPUTS and out[0]["targets"][-1] == vocabulary.eos_id
  targets = [task.postprocess_fn("", example=x, is_target=True) for x in out]
  predictions = [task.postprocess_fn("Norway", example=x) for x in out]
  assert text_metrics.record(targets, predictions) == {"em": 100.0, "f1": 100.0}


# ---- the label tasks: T5's glue() text formats ----

@pytest.mark.parametrize("task, example, inputs", [
    # fields in T5's order: sorted names for BoolQ (T5 passes no feature_names for it)
    ("boolq", {"question": "is the sky blue", "passage": "The sky is blue.", "label": np.int32(1), "idx": np.int32(0)},
     "boolq passage: The sky is blue. question: is the sky blue"),
    # MultiRC's paragraphs carry HTML, which T5 removes ('<' is not in the T5 vocabulary: it would be <unk>)
    ("multirc", {"question": "Who ran?", "answer": "The dog",
                 "paragraph": "<b>Sent 1: </b>The dog ran.<br><b>Sent 2: </b>It was fast.",
                 "label": np.int32(1), "idx": {"paragraph": np.int32(0), "question": np.int32(0),
                                               "answer": np.int32(0)}},
     "multirc question: Who ran? answer: The dog paragraph: Sent 1: The dog ran. Sent 2: It was fast."),
    ("cb", {"hypothesis": "h.", "premise": "p.", "label": np.int32(2), "idx": np.int32(0)},
     "cb hypothesis: h. premise: p."),
])
def test_label_task_inputs_follow_t5(task, example, inputs):
  (out,) = run(lambda ds: seqio.get_mixture_or_task(f"repeat_lm.super_glue.{task}").preprocessors[0](ds), example)
  assert out["inputs"].decode() == inputs


# Label names in TFDS super_glue's ClassLabel order (label i -> name i), fields in T5's glue() order: sorted names for
# COPA (T5 passes no feature_names), ('sentence1', 'sentence2', 'word') for WiC as T5 gives them.
@pytest.mark.parametrize("task, example, inputs, target", [
    ("rte", {"hypothesis": "h.", "premise": "p.", "label": np.int32(0), "idx": np.int32(0)},
     "rte hypothesis: h. premise: p.", "entailment"),
    ("rte", {"hypothesis": "h.", "premise": "p.", "label": np.int32(1), "idx": np.int32(0)},
     "rte hypothesis: h. premise: p.", "not_entailment"),
    ("boolq", {"question": "q", "passage": "p.", "label": np.int32(0), "idx": np.int32(0)},
     "boolq passage: p. question: q", "False"),
    ("cb", {"hypothesis": "h.", "premise": "p.", "label": np.int32(2), "idx": np.int32(0)},
     "cb hypothesis: h. premise: p.", "neutral"),
    ("copa", {"premise": "The man fell.", "question": "cause", "choice1": "He slipped.", "choice2": "He sang.",
              "label": np.int32(0), "idx": np.int32(0)},
     "copa choice1: He slipped. choice2: He sang. premise: The man fell. question: cause", "choice1"),
    ("wic", {"word": "bank", "sentence1": "A river bank.", "sentence2": "A savings bank.", "label": np.int32(0),
             "idx": np.int32(0), "start1": np.int32(8), "start2": np.int32(10), "end1": np.int32(12),
             "end2": np.int32(14)},
     "wic sentence1: A river bank. sentence2: A savings bank. word: bank", "False"),
])
def test_label_task_targets_are_the_label_names_in_tfds_order(task, example, inputs, target):
  registered = seqio.get_mixture_or_task(f"repeat_lm.super_glue.{task}")
  (out,) = run(registered.preprocessors[0], example)
  assert out["inputs"].decode() == inputs and out["targets"].decode() == target
  assert registered.postprocess_fn(target) == int(example["label"])  # the decoded name maps back to the label


def test_multirc_predictions_carry_their_question_group():
  # MultiRC's EM is per question: the postprocessor pairs each label with (paragraph, question).
  registered = seqio.get_mixture_or_task("repeat_lm.super_glue.multirc")
  example = {"group": np.array([4, 2]), "label": np.int32(1)}
  assert registered.postprocess_fn("True", example=example) == ((4, 2), 1)
  assert registered.postprocess_fn("", example=example, is_target=True) == ((4, 2), 1)
