"""Decoding with a partitioner: what predict_tokens reads back from the devices."""

import re
import types

import jax
import numpy as np
import pytest

from repeat_lm.models import decoding
from repeat_lm.train import inference, partitioning


def test_decoded_rows_are_gathered_before_they_are_read(monkeypatch):
  """On several hosts device_get cannot read rows held by another process's devices: the tokens, which the decoder
  returns split over 'data' like its batch, must be replicated on every device before they are fetched (else
  multi-host fine-tuning crashed at its first PredictionEval)."""
  partitioner = partitioning.Partitioner(4, 2)
  # The decoder's output layout, without compiling a decoder: rows split over the batch devices.
  monkeypatch.setattr(decoding, "decode", lambda module, params, x, cfg, rng: jax.device_put(
      np.asarray(x)[:, ::-1].copy(), partitioner.batch_sharding()))
  fetched = []
  device_get = jax.device_get

  def checked_device_get(x):
    fetched.append(x.is_fully_replicated)
    return device_get(x)

  monkeypatch.setattr(jax, "device_get", checked_device_get)
  inputs = np.arange(2, 18, dtype=np.int32).reshape(8, 2)
  tokens = inference.predict_tokens(None, None, inputs, decoding.DecodeConfig(), batch_size=8, partitioner=partitioner)
  assert fetched == [True]
  assert tokens == [row[::-1].tolist() for row in inputs]


def test_a_failed_output_write_keeps_the_earlier_outputs(tmp_path, monkeypatch):
  """The outputs were written in place: a write that failed part-way (here a file-size limit, as a full disk) left the
  earlier outputs.txt cut to a shorter file of whole-looking lines. Now the file is replaced whole or not at all."""
  resource = pytest.importorskip("resource")
  inputs, out = tmp_path / "in.txt", tmp_path / "outputs.txt"
  inputs.write_text("line\n" * 1000)
  out.write_text("earlier\n")
  # Everything but the write stubbed: 1000 outputs of 20 characters, more than the 4 KiB limit below.
  monkeypatch.setattr(inference, "model_from_model_dir", lambda *a, **k: (types.SimpleNamespace(module=None), "task"))
  monkeypatch.setattr(inference, "vocabulary_of", lambda *a, **k: object())
  monkeypatch.setattr(inference, "restore_params", lambda *a, **k: None)
  monkeypatch.setattr(inference, "trained_inputs_length", lambda *a, **k: None)
  monkeypatch.setattr(inference, "predict_texts", lambda module, params, vocabulary, texts, *a, **k: ["x" * 20] * len(
      texts))
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
  try:
    with pytest.raises(OSError):
      inference.infer(str(tmp_path / "run"), str(inputs), output_file=str(out))
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
  assert out.read_text() == "earlier\n"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "outputs.txt"]  # no temp file left behind
  inference.infer(str(tmp_path / "run"), str(inputs), output_file=str(out))
  assert out.read_text() == "x" * 20 + "\n" + ("x" * 20 + "\n") * 999


def test_inputs_and_outputs_end_with_the_vocabularys_eos(monkeypatch):
  """Training rows end with the task vocabulary's EOS (pipeline.get_batches; SentencePiece's own default is 2): infer
  appended id 1 (that vocabulary's <unk>) to the inputs and cut the outputs at the first 1, a text token there."""
  vocabulary = types.SimpleNamespace(eos_id=2, encode=lambda text: [5, 6], decode=list)
  seen = {}

  def decode(module, params, x, cfg, rng):
    seen.update(inputs=np.asarray(x), eos_id=getattr(cfg, "eos_id", decoding.EOS_ID))
    return np.tile(np.array([7, 1, 8, 2, 9, 0], np.int32), (len(x), 1))

  monkeypatch.setattr(decoding, "decode", decode)
  outputs = inference.predict_texts(None, None, vocabulary, ["a"], decoding.DecodeConfig())
  assert seen["inputs"][0, :3].tolist() == [5, 6, 2] and seen["eos_id"] == 2
  assert outputs == [[7, 1, 8]]


def test_predict_texts_refuses_a_vocabulary_larger_than_the_model(monkeypatch):
  """`infer --vocabulary` checked the vocabulary against the model, the Python API (docs/interop.md) did not: T5's
  32,000-id vocabulary on a 128-row model decoded ids such as 8774 as row 127, and returned outputs without a word."""
  monkeypatch.setattr(decoding, "decode", lambda module, params, x, cfg, rng: np.full_like(x, 5))  # no compile
  module = types.SimpleNamespace(config=types.SimpleNamespace(vocab_size=128))
  vocabulary = types.SimpleNamespace(vocab_size=32000, encode=lambda text: [8774, 296], decode=str)
  with pytest.raises(ValueError, match="32000 ids but the model's vocab_size is 128"):
    inference.predict_texts(module, None, vocabulary, ["Hello world"])


@pytest.mark.parametrize("given,hint", [("run/checkpoints/30", "--checkpoint=run --step=30"),
                                        ("run/checkpoints", "--checkpoint=run)"),
                                        ("run/checkpoints/30/state", "--checkpoint=MODEL_DIR --step=30")])
def test_a_step_directory_as_checkpoint_says_which_flags_name_it(tmp_path, monkeypatch, given, hint):
  # Said only "config.gin does not exist: point --checkpoint at a MODEL_DIR".
  (tmp_path / "run" / "checkpoints" / "30" / "state").mkdir(parents=True)
  (tmp_path / "run" / "config.gin").write_text("")
  monkeypatch.chdir(tmp_path)
  hint = hint.replace("MODEL_DIR", str(tmp_path.resolve() / "run"))
  with pytest.raises(FileNotFoundError, match=re.escape(f"`repeat-lm train` ({hint}")):
    inference.model_from_model_dir(given)
  with pytest.raises(FileNotFoundError, match=r"train`, or pass"):  # no hint outside a MODEL_DIR
    inference.model_from_model_dir(tmp_path)


def test_encode_texts_warns_only_where_its_cap_cuts(caplog):
  from repeat_lm.data import vocab
  v = vocab.default_vocabulary()
  texts = ["short", " ".join(["word"] * 100)]
  with caplog.at_level("WARNING"):
    assert inference.encode_texts(v, texts, max_length=32).shape == (2, 32)
  assert "1 of 2 inputs are longer than 32 tokens" in caplog.text
  caplog.clear()
  with caplog.at_level("WARNING"):  # a fixed length below the cap cuts them, as it always did: no word of the cap
    assert inference.encode_texts(v, texts, 16, max_length=32).shape == (2, 16)
    assert inference.encode_texts(v, texts[:1], max_length=32).shape == (1, 16)  # nothing to cut
  assert not caplog.text


def test_an_output_file_is_refused_where_it_would_be_deleted_or_cannot_be_written(tmp_path, monkeypatch):
  # Under a run's checkpoints/ (a step's folder) a new file was accepted, and deleted with the step's checkpoint
  # when the run's checkpoints rotated; an unwritable folder was found only after decoding every input.
  run = tmp_path / "run"
  (run / "checkpoints" / "6").mkdir(parents=True)
  (run / "config.gin").write_text("")
  for inside in (run / "checkpoints" / "6" / "preds.txt", run / "checkpoints" / "preds.txt"):
    with pytest.raises(ValueError, match="inside the checkpoints of .*run, whose step folders training deletes"):
      inference.check_output_file(str(inside))
  inference.check_output_file(str(run / "preds.txt"))  # beside the run's files: fine
  monkeypatch.setattr(inference.os, "access", lambda path, mode: False)
  with pytest.raises(PermissionError, match="cannot be written here"):
    inference.check_output_file(str(tmp_path / "preds.txt"))


def test_an_unreadable_vocabulary_flag_names_the_flag(tmp_path):
  """--vocabulary=<not a SentencePiece model> (export hf, infer) was answered 'Point REPEAT_LM_T5_VOCAB (or
  vocab.t5_vocabulary.path in gin, or --vocab)', none of which is the flag that was given."""
  notes = tmp_path / "notes.model"
  notes.write_text("not a SentencePiece model")
  with pytest.raises(ValueError, match=r"--vocabulary=.*notes.model cannot be used \(.*is not a SentencePiece model "
                     r"\(.*\)\): pass the SentencePiece model \(.model\) the run was trained with") as e:
    inference.vocabulary_of(None, str(notes))
  assert "REPEAT_LM_T5_VOCAB" not in str(e.value)
