"""Fine-tuning from a pre-trained checkpoint and evaluation by decoding: SQuAD EM/F1 (official normalisation), the
`repeat-lm finetune` / `eval` commands on a local SQuAD-format fixture, and the TFDS tasks under tfds mock data."""

import json
from pathlib import Path

import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf

from interop_helpers import TINY, init_params
from repeat_lm import cli, gin_utils
from repeat_lm.data import downstream, text_metrics
from repeat_lm.interop import hf, load
from repeat_lm.models import t5
from repeat_lm.train import inference

MODEL_GINS = sorted(str(p.relative_to(Path(__file__).resolve().parents[2]))
                    for p in (Path(__file__).resolve().parents[2] / "gin" / "models").glob("*.gin"))


@pytest.mark.parametrize("text, normalised", [
    ("The Eiffel  Tower!", "eiffel tower"),
    ("An apple a day", "apple day"),
    ("theatre then", "theatre then"),  # articles only as whole words
    ("A.B.C., U.S.A.", "abc usa"),  # punctuation removed, not replaced by spaces
    ("  Hello\tworld\n", "hello world"),
    ("¿Qué?", "¿qué"),  # only ASCII punctuation (string.punctuation), as the official script
])
def test_squad_normalisation_is_the_official_one(text, normalised):
  assert text_metrics.normalize_answer(text) == normalised


def test_squad_em_f1_take_the_best_reference():
  assert text_metrics.exact_match("Paris.", "paris") == 1.0
  assert text_metrics.token_f1("the cat sat", "cat sat on the mat") == pytest.approx(2 * 1.0 * 0.5 / 1.5)
  assert text_metrics.token_f1("a", "the") == 0.0  # both normalise to nothing
  # Bags of words with multiplicity (the official script's Counter intersection): 4 common tokens, P 1, R 4/5.
  assert text_metrics.token_f1("new york new york", "new york new york city") == pytest.approx(8 / 9)
  result = text_metrics.squad([["Paris", "City of Paris"], ["1854"]], ["paris city", "in 1854"])
  # F1: max(2/3 vs 'paris', 4/5 vs 'city of paris') = 0.8; 'in 1854' vs '1854' = 2/3. EM: none.
  assert result == {"em": 0.0, "f1": pytest.approx(100 * (0.8 + 2 / 3) / 2)}
  assert text_metrics.squad([["Denver Broncos"]], ["the Denver Broncos"])["em"] == 100.0


def test_superglue_metrics():
  assert text_metrics.accuracy([0, 1, 1], [0, 1, 0]) == {"accuracy": pytest.approx(200 / 3)}
  assert text_metrics.mean_3class_f1([0, 1, 2], [0, 1, 2]) == {"mean_3class_f1": 100.0}
  got = text_metrics.multirc([((0, 0), 1), ((0, 0), 0), ((0, 1), 1)], [((0, 0), 1), ((0, 0), 1), ((0, 1), 1)])
  assert got == {"f1a": pytest.approx(100 * 2 * 2 / (2 * 2 + 1)), "em": 50.0}
  # An answer that parses to no label (-1) is wrong either way, as in T5's f1_score_with_invalid: on the False
  # option it is a false positive (TP 2, FP 1, FN 0 below: F1a 80), never a free true negative.
  invalid = text_metrics.multirc([((0, 0), 1), ((0, 0), 0), ((0, 1), 1)], [((0, 0), 1), ((0, 0), -1), ((0, 1), 1)])
  assert invalid == {"f1a": pytest.approx(80.0), "em": 50.0}
  assert text_metrics.multirc([((0, 0), 1)], [((0, 0), -1)]) == {"f1a": 0.0, "em": 0.0}  # a false negative


def write_squad_fixture(directory: Path) -> Path:
  """A SQuAD-format JSONL fixture: question, context, answers (every answer a span of the context)."""
  capitals = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Austria", "Vienna"),
              ("Norway", "Oslo"), ("Portugal", "Lisbon"), ("Greece", "Athens"), ("Ireland", "Dublin")]
  directory.mkdir(parents=True, exist_ok=True)
  for split, rows in (("train", capitals * 2), ("validation", capitals[:5])):
    with (directory / f"{split}.jsonl").open("w") as f:
      for i, (country, city) in enumerate(rows):
        f.write(json.dumps({"id": f"{split}-{i}", "question": f"What is the capital of {country}?",
                            "context": f"The capital of {country} is {city}, a large city.",
                            "answers": [city, f"{city}, a large city"]}) + "\n")
  return directory


@pytest.mark.usefixtures("hf_libraries")
@pytest.mark.slow
def test_finetune_and_eval_end_to_end(tmp_path, capsys, fresh_gin):
  squad_dir = write_squad_fixture(tmp_path / "squad")
  initial = tmp_path / "pretrained_hf"
  initial_params = init_params(TINY)
  hf.export_hf(initial_params, TINY, initial)
  model_dir = tmp_path / "finetuned"
  args = ["--gin_file=gin/models/t5_1_1_tiny.gin", "--gin_file=gin/runs/finetune.gin",
          f"--gin.MODEL_DIR='{model_dir}'", f"--gin.INITIAL_CHECKPOINT_PATH='{initial}'",
          "--gin.MIXTURE_OR_TASK_NAME=@downstream.squad_jsonl_task()",
          f"--gin.downstream.squad_jsonl_task.files='{squad_dir}'",
          "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=8",
          "--gin.EVAL_BATCH_SIZE=8", "--gin.EVAL_PERIOD=2", "--gin.DATA_PARALLEL=8",
          "--gin.trainer.train.log_period=1", "--gin.trainer.evaluate.eval_steps=1",
          # teacher-forced evaluation is the trainer's own business (tests/train); here only `repeat-lm eval` runs it
          "--gin.trainer.train.eval_dataset_cfg=None",
          # the tiny gin's model at TINY's dimensions (what the initial checkpoint holds)
          "--gin.t5.T5Config.emb_dim=32", "--gin.t5.T5Config.num_heads=2", "--gin.t5.T5Config.mlp_dim=64",
          # dropout 0 only to keep this CPU test's compile short; fine-tuning proper uses the gin's 0.1
          "--gin.DROPOUT_RATE=0.0"]
  assert cli.main(["finetune", *args]) == 0, capsys.readouterr().err
  records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
  final = [r for r in records if "eval/squad_em" in r]
  assert [r["step"] for r in final] == [2] and 0 <= final[0]["eval/squad_f1"] <= 100
  # Started from the initial checkpoint: two steps at rate 1e-3 move the parameters by well under 1%.
  tuned = load.load_for_module(model_dir, t5.Transformer(TINY))
  embedding, start = np.asarray(tuned["token_embedder"]["embedding"]), np.asarray(
      initial_params["token_embedder"]["embedding"])
  assert np.abs(embedding - start).max() < 0.01 * np.abs(start).max()

  # The scores come from the project's SQuAD metric (the task's predict metric) on the decoded validation split.
  task = seqio.get_mixture_or_task(downstream.squad_jsonl_task(str(squad_dir)))  # the name the run registered
  assert task.predict_metric_fns == [text_metrics.squad] and downstream.metric_prefix(task.name) == "squad"

  # `repeat-lm eval` with the same files and bindings: teacher-forced metrics and the decoded ones, for step 2.
  capsys.readouterr()
  assert cli.main(["eval", *args]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["step"] == 2 and "eval/loss" in result
  assert (result["eval/squad_em"], result["eval/squad_f1"]) == pytest.approx(
      (final[0]["eval/squad_em"], final[0]["eval/squad_f1"]))


def test_prediction_eval_scores_the_decoded_text(tmp_path, monkeypatch):
  """Decoded ids -> text -> the task's post-processing -> SQuAD EM/F1 against every reference answer."""
  task = seqio.get_mixture_or_task(downstream.squad_jsonl_task(str(write_squad_fixture(tmp_path / "squad"))))
  vocabulary = task.output_features["targets"].vocabulary
  replies = ["Paris", "the city of Rome", "Madrid, a large city", "vienna!", "Bergen"]  # the last one is wrong

  def fake_predict_tokens(module, params, inputs_BxS, cfg, **kwargs):
    assert inputs_BxS.shape == (5, 32) and cfg.max_decode_length == 8
    return [list(vocabulary.encode(r)) for r in replies]

  monkeypatch.setattr(inference, "predict_tokens", fake_predict_tokens)
  result = inference.PredictionEval(task.name, {"inputs": 32, "targets": 8})(t5.Transformer(TINY), params=None)
  references = [["Paris", "Paris, a large city"], ["Rome", "Rome, a large city"], ["Madrid", "Madrid, a large city"],
                ["Vienna", "Vienna, a large city"], ["Oslo", "Oslo, a large city"]]
  assert result == pytest.approx({f"eval/squad_{k}": v for k, v in text_metrics.squad(references, replies).items()})
  assert result["eval/squad_em"] == pytest.approx(60.0)  # 'the city of Rome' and 'Bergen' miss


def test_finetune_needs_an_initial_checkpoint(tmp_path, capsys, fresh_gin):
  code = cli.main(["finetune", "--gin_file=gin/models/t5_1_1_tiny.gin", "--gin_file=gin/runs/pretrain.gin",
                   f"--gin.MODEL_DIR='{tmp_path}'", "--gin.TRAIN_STEPS=1",
                   "--gin.MIXTURE_OR_TASK_NAME='repeat_lm.wiki_span_corruption'",
                   "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}"])
  assert code == 2 and "INITIAL_CHECKPOINT_PATH" in capsys.readouterr().err


@pytest.mark.parametrize("model_gin", MODEL_GINS)
def test_finetune_gin_parses(model_gin, fresh_gin):
  gin_utils.parse([model_gin, "gin/runs/finetune.gin"], [])
  assert gin.query_parameter("%DROPOUT_RATE") == 0.1 and gin.query_parameter("%LEARNING_RATE") == 0.001
  assert "gin.REQUIRED" in repr(gin.query_parameter("%INITIAL_CHECKPOINT_PATH"))


def test_tfds_tasks_under_mock_data(fresh_gin):
  """SQuAD v1.1 and SuperGLUE through TFDS, with tfds.testing.mock_data (random examples, no download)."""
  tfds = pytest.importorskip("tensorflow_datasets")
  module = t5.Transformer(TINY)
  params = init_params(TINY)
  # USE_CODE: examples generated from the builders' feature specs, no metadata files or downloads needed.
  with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
    results = inference.PredictionEval(downstream.SQUAD_TASK, {"inputs": 32, "targets": 4}, batch_size=4)(
        module, params)
    results.update(inference.PredictionEval(downstream.SUPER_GLUE_MIXTURE, {"inputs": 32, "targets": 4},
                                            batch_size=4)(module, params))
    example = next(seqio.get_mixture_or_task("repeat_lm.super_glue.cb").get_dataset(
        {"inputs": 32, "targets": 4}, split="validation", shuffle=False, try_in_mem_cache=False).as_numpy_iterator())
  assert example["inputs_pretokenized"].decode().startswith("cb hypothesis: ")
  assert example["targets_pretokenized"].decode() in ("entailment", "contradiction", "neutral")
  assert {"eval/squad_em", "eval/squad_f1", "eval/boolq_accuracy", "eval/cb_accuracy", "eval/cb_mean_3class_f1",
          "eval/copa_accuracy", "eval/multirc_f1a", "eval/multirc_em", "eval/record_em", "eval/record_f1",
          "eval/rte_accuracy", "eval/wic_accuracy", "eval/wsc_accuracy"} == set(results)
  assert all(0.0 <= v <= 100.0 for v in results.values())


def test_squad_format_spaces_punctuation_as_t5():
  """T5's squad preprocessor spaces the punctuation of question, context and answers; the spaced answers are the
  references, so partial matches score as in T5 ('3-1 win' vs '3-1': F1 0.8, not the unspaced 0.67)."""
  example = {"id": "q1", "question": "Who won, the U.S.?", "context": "The U.S. won 3-1 (at home).",
             "answers": {"text": ["3-1", "U.S."], "answer_start": [13, 4]}}
  (out,) = downstream._squad_tfds_preprocessor(tf.data.Dataset.from_tensors(example)).as_numpy_iterator()
  assert out["inputs"].decode() == "question: Who won , the U . S . ? context: The U . S . won 3 - 1 ( at home ) ."
  assert out["targets"].decode() == "3 - 1" and out["answers"].tolist() == [b"3 - 1", b"U . S ."]
  references = downstream._squad_postprocess("", out, is_target=True)
  assert text_metrics.squad([references], ["3 - 1 win"]) == {"em": 0.0, "f1": pytest.approx(80.0)}


def test_squad_jsonl_reads_the_official_answer_layout(tmp_path):
  """SQuAD's own JSON gives answers as [{'text', 'answer_start'}, ...]: the texts are the references, not the
  dicts' repr."""
  path = tmp_path / "validation.jsonl"
  path.write_text(json.dumps({"id": "q1", "question": "Who won?", "context": "The Denver Broncos won.",
                              "answers": [{"text": "Denver Broncos", "answer_start": 4},
                                          {"text": "The Denver Broncos", "answer_start": 0}]}) + "\n")
  assert downstream._read_squad_jsonl(str(path))[0]["answers"] == ["Denver Broncos", "The Denver Broncos"]
  # TFDS's layout {'text': [...], 'answer_start': [...]}: its texts, not the dict's keys ('text', 'answer_start').
  path.write_text(json.dumps({"question": "Who won?", "context": "The Denver Broncos won.",
                              "answers": {"text": ["Denver Broncos"], "answer_start": [4]}}) + "\n")
  assert downstream._read_squad_jsonl(str(path))[0]["answers"] == ["Denver Broncos"]
  path.write_text(json.dumps({"question": "q", "context": "c", "answers": [{"answer_start": 4}]}) + "\n")
  with pytest.raises(ValueError, match="non-empty 'answers'"):
    downstream._read_squad_jsonl(str(path))


@pytest.mark.parametrize("content, match", [
    (b'{"question": "q", "context": "c", "answers": ["a"]}\n{bad json\n', r"validation.jsonl:2: malformed JSON"),
    (b'["q", "c", "a"]\n', r"validation.jsonl:1: expected a JSON object, got list"),
    (b'{"question": "q\xff", "context": "c", "answers": ["a"]}\n', r"validation.jsonl:1: not valid UTF-8"),
    (b'{"question": null, "context": "c", "answers": ["a"]}\n', r"validation.jsonl:1: .*'context' strings"),
    (b"\n", r"validation.jsonl: no SQuAD-format examples"),
])
def test_squad_jsonl_bad_lines_name_the_file_and_line(tmp_path, content, match):
  """A bad line is a ValueError naming file and line, not a bare JSON/Unicode error or a TensorFlow error at the
  first read; an empty file is an error, not a split that scores EM = F1 = 0."""
  path = tmp_path / "validation.jsonl"
  path.write_bytes(content)
  with pytest.raises(ValueError, match=match):
    downstream._read_squad_jsonl(str(path))


def test_squad_jsonl_missing_split_names_the_file(tmp_path):
  """A directory without validation.jsonl registers a train-only task; evaluating it says which file is missing
  (it was a bare KeyError: 'validation')."""
  (tmp_path / "train.jsonl").write_text(json.dumps({"question": "q?", "context": "c.", "answers": ["c"]}) + "\n")
  name = downstream.squad_jsonl_task(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no 'validation' split.*validation.jsonl"):
    inference.PredictionEval(name, {"inputs": 32, "targets": 8}).examples(seqio.get_mixture_or_task(name))


@pytest.mark.parametrize("max_examples", [0, True, 1.5, "100"])
def test_prediction_eval_refuses_a_max_examples_that_is_not_a_count(max_examples):
  """`examples` takes max_examples only when truthy: 0 (meant as "none") decoded the whole split, True one example."""
  with pytest.raises(ValueError, match="max_examples=.*INFER_EVAL_MAX_EXAMPLES"):
    inference.PredictionEval("any", {"inputs": 32, "targets": 8}, max_examples=max_examples)


def test_prediction_eval_keeps_long_inputs_whole(tmp_path):
  """T5X's infer_eval decodes untrimmed inputs (task_feature_lengths=None): a context past the training length keeps
  its answer."""
  context = "Filler sentence about nothing in particular. " * 20 + "The capital of France is Paris."
  for split in ("train", "validation"):
    (tmp_path / f"{split}.jsonl").write_text(json.dumps(
        {"id": "x", "question": "What is the capital of France?", "context": context, "answers": ["Paris"]}) + "\n")
  name = downstream.squad_jsonl_task(str(tmp_path))
  task = seqio.get_mixture_or_task(name)
  example = inference.PredictionEval(name, {"inputs": 32, "targets": 8}).examples(task)[0]
  vocabulary = task.output_features["inputs"].vocabulary
  assert len(example["inputs"]) > 32 and "Paris" in vocabulary.decode(example["inputs"].tolist())
