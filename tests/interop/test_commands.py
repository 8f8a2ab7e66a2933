"""`repeat-lm export hf` and `repeat-lm infer` on a MODEL_DIR (config.gin + Orbax checkpoint), and their errors."""

import dataclasses
import json

import numpy as np
import pytest

from interop_helpers import (TINY, TINY_SWITCH, hf_logits, init_params, logits, make_batch, max_diff, random_params,
                              sharpen_routers, write_model_dir)
from repeat_lm import cli
from repeat_lm.data import vocab
from repeat_lm.models import decoding, t5
from repeat_lm.train import inference


def test_export_hf_command(tiny_model_dir, tmp_path, capsys, fresh_gin):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  out = tmp_path / "hf"
  assert cli.main(["export", "hf", f"--checkpoint={tiny_model_dir}", f"--out={out}"]) == 0, capsys.readouterr().err
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"out": str(out), "tokenizer": True}
  model = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  text = "The capital of France is Paris."
  assert tokenizer(text).input_ids == [*vocab.default_vocabulary().encode(text), decoding.EOS_ID]
  batch = make_batch(TINY.vocab_size)
  with torch.no_grad():
    enc = torch.tensor(batch["encoder_input_tokens"], dtype=torch.long)
    theirs = model(input_ids=enc, attention_mask=(enc != 0).long(),
                   decoder_input_ids=torch.tensor(batch["decoder_input_tokens"], dtype=torch.long)).logits.numpy()
  real = batch["decoder_target_tokens"] > 0
  assert np.abs(theirs - logits(TINY, init_params(TINY), batch))[real].max() < 1e-4


def test_export_hf_command_scanned_moe(tmp_path, capsys, fresh_gin):
  """A Switch model trained with scan_layers=True (blocks stacked under `layers/layers_j`) exports as
  SwitchTransformers with the logits of the scanned model."""
  pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  # TINY's 8,192 ids: the MODEL_DIR's task (wiki, 8,100 ids) must fit the model, as the trainer requires, or the
  # export refuses its tokenizer.
  config = dataclasses.replace(TINY_SWITCH, scan_layers=True, vocab_size=TINY.vocab_size)
  params = sharpen_routers(random_params(config))
  model_dir = write_model_dir(tmp_path / "run", config, params)
  out = tmp_path / "hf"
  assert cli.main(["export", "hf", f"--checkpoint={model_dir}", f"--out={out}"]) == 0, capsys.readouterr().err
  model_config = inference.model_from_model_dir(model_dir)[0].module.config
  assert model_config.scan_layers and model_config.moe == config.moe
  model = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(out).eval()
  batch = make_batch(config.vocab_size, inputs=16, targets=8)
  diff = max_diff(logits(model_config, params, batch), hf_logits(model, batch), batch)
  print(f"export hf (scanned MoE MODEL_DIR) max abs logit difference: {diff:.2e}")
  assert diff < 1e-4


def test_infer_command(tiny_model_dir, tmp_path, capsys, fresh_gin):
  inputs = tmp_path / "inputs.txt"
  inputs.write_text("The capital of France is <extra_id_0>.\nA second line\n\nlast\n", encoding="utf-8")
  outputs = tmp_path / "outputs.txt"
  for method in ("beam", "sample"):  # greedy, the default, is what the other tests decode with
    code = cli.main(["infer", f"--checkpoint={tiny_model_dir}", f"--input_file={inputs}", f"--method={method}",
                     "--max_decode_length=6", "--num_beams=2", f"--output_file={outputs}"])
    assert code == 0, capsys.readouterr().err
    assert len(outputs.read_text(encoding="utf-8").splitlines()) == 4
  # The Python API gives what the command wrote.
  module = t5.Transformer(TINY)
  texts = inputs.read_text(encoding="utf-8").splitlines()
  expected = inference.predict_texts(module, init_params(TINY), vocab.default_vocabulary(), texts,
                                     decoding.DecodeConfig("sample", 6, num_beams=2))
  assert outputs.read_text(encoding="utf-8").splitlines() == [e.replace("\n", " ") for e in expected]


def test_infer_cuts_long_inputs_to_the_trained_length(tiny_model_dir, tmp_path, capsys, caplog, monkeypatch,
                                                       fresh_gin):
  # Uncapped, every row was padded to the longest line (rounded up to a power of two): one line of 8,542 tokens took
  # all 24 GB of a machine, for a model trained on 128.
  inputs = tmp_path / "inputs.txt"
  inputs.write_text("short\n" + " ".join(["word"] * 300) + "\n", encoding="utf-8")
  assert inference.trained_inputs_length(tiny_model_dir) == 32  # write_model_dir's TASK_FEATURE_LENGTHS
  rows = []
  monkeypatch.setattr(inference, "predict_tokens", lambda module, params, x, cfg, **kw: rows.append(x) or [[]] * len(x))
  for flag, length in (([], 32), (["--max_input_length=64"], 64)):
    assert cli.main(["infer", f"--checkpoint={tiny_model_dir}", f"--input_file={inputs}", *flag]) == 0, \
        capsys.readouterr().err
    assert rows[-1].shape == (2, length) and rows[-1][1, -1] == 1  # cut, ending with the EOS
    assert f"1 of 2 inputs are longer than {length} tokens" in caplog.text
  assert cli.main(["infer", f"--checkpoint={tiny_model_dir}", f"--input_file={inputs}", "--max_input_length=1"]) == 2
  assert "--max_input_length=1: inputs need at least 2 tokens" in capsys.readouterr().err


@pytest.mark.usefixtures("hf_libraries")
def test_export_into_another_model_s_directory_needs_overwrite(tiny_model_dir, tmp_path, capsys, fresh_gin):
  other = tmp_path / "other"
  other.mkdir()
  (other / "pytorch_model.bin").write_bytes(b"weights")
  args = ["export", "hf", f"--checkpoint={tiny_model_dir}", f"--out={other}"]
  assert cli.main(args) == 2
  err = capsys.readouterr().err
  assert "(pytorch_model.bin)" in err and "pass --overwrite" in err and "Check the paths" not in err  # no OS hint
  assert cli.main([*args, "--overwrite"]) == 0, capsys.readouterr().err
  assert not (other / "pytorch_model.bin").exists() and (other / "config.json").exists()


def test_commands_explain_a_missing_checkpoint(tmp_path, capsys, fresh_gin):
  (tmp_path / "in.txt").write_text("x\n")
  assert cli.main(["infer", f"--checkpoint={tmp_path / 'nowhere'}", f"--input_file={tmp_path / 'in.txt'}"]) == 2
  assert "config.gin" in capsys.readouterr().err
  assert cli.main(["export", "hf", f"--checkpoint={tmp_path / 'nowhere'}", f"--out={tmp_path / 'o'}"]) == 2
  assert "does not exist" in capsys.readouterr().err


def test_infer_names_a_missing_or_non_utf8_input_file(tmp_path, capsys, fresh_gin):
  (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
  assert cli.main(["infer", f"--checkpoint={tmp_path}", f"--input_file={tmp_path / 'latin1.txt'}"]) == 2
  assert "is not UTF-8 text (byte 0xe9 at offset 3); re-encode it as UTF-8" in capsys.readouterr().err
  assert cli.main(["infer", f"--checkpoint={tmp_path}", f"--input_file={tmp_path / 'none.txt'}"]) == 2
  assert "none.txt: no such file" in capsys.readouterr().err


def test_an_unreadable_vocabulary_names_the_file_and_the_fix(tmp_path):
  from repeat_lm.data import subset
  missing = vocab.t5_vocabulary(str(tmp_path / "missing.model"))
  with pytest.raises(FileNotFoundError, match=r"missing.model.*Point REPEAT_LM_T5_VOCAB"):
    missing.encode("hello")
  with pytest.raises(FileNotFoundError, match=r"missing.model.*Point REPEAT_LM_T5_VOCAB"):
    subset.vocabulary_fingerprint(missing)
  (tmp_path / "notes.model").write_text("not a SentencePiece model")  # the wrong file, or a truncated copy
  with pytest.raises(ValueError, match=r"notes.model' is not a SentencePiece model.*Point REPEAT_LM_T5_VOCAB"):
    vocab.t5_vocabulary(str(tmp_path / "notes.model")).encode("hello")


def test_a_binding_overrides_the_scoped_model_settings_of_config_gin(tiny_model_dir, tmp_path, fresh_gin):
  """The trainer's operative config.gin binds the model under MODEL/ (gin's scoped bindings win over unscoped ones):
  --gin.t5.T5Config.X must still change X, as it does on the model gin."""
  import shutil
  run = tmp_path / "run"
  shutil.copytree(tiny_model_dir, run)
  text = (run / "config.gin").read_text()
  (run / "config.gin").write_text(text.replace("\nt5.T5Config.", "\nMODEL/t5.T5Config."))
  assert "MODEL/t5.T5Config.dropout_rate" in (run / "config.gin").read_text()
  model, _ = inference.model_from_model_dir(run, bindings=["t5.T5Config.dropout_rate = 0.3"])
  assert model.module.config.dropout_rate == 0.3
  assert inference.scoped_like("MODEL/t5.T5Config.x = 1\nA/b.c = 2\nB/b.c = 3\n",
                               ["t5.T5Config.x=2", "b.c = 4", "MODEL/t5.T5Config.x=5", "d.e=6"]) == \
      ["MODEL/t5.T5Config.x=2", "b.c = 4", "MODEL/t5.T5Config.x=5", "d.e=6"]  # b.c: two scopes, left as given
