"""Hugging Face export and import of dense T5: logits equal transformers' on the same inputs (float32, non-padding
positions), greedy decoding equals `generate`, and the tokenizer equals the SeqIO vocabulary. MoE: test_hf_switch.py."""

import dataclasses
import errno
import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest

from interop_helpers import SMALL, TINY, hf_logits, init_params, logits, make_batch, max_diff, random_params
from repeat_lm.interop import hf, layout, load
from repeat_lm.models import decoding, t5

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4  # max abs logit difference, float32


def _tiny_scanned():
  config = dataclasses.replace(TINY, scan_layers=True)
  per_layer = layout.flatten(init_params(TINY))
  return config, layout.unflatten(layout.from_per_layer(per_layer, layout.layouts_for(config)))


CASES = {
    "tiny": lambda: (TINY, init_params(TINY)),
    "tiny-scan": _tiny_scanned,
    "tiny-tied-relu": lambda: (c := dataclasses.replace(TINY, logits_via_embedding=True, mlp_activations=("relu",)),
                               random_params(c)),
    # One ungated GELU: repeat_lm's is the tanh approximation, which is Hugging Face's gelu_new, not its (erf) gelu.
    "tiny-gelu": lambda: (c := dataclasses.replace(TINY, mlp_activations=("gelu",)), random_params(c)),
    "small": lambda: (c := dataclasses.replace(SMALL, scan_layers=True), init_params(c)),
}


@pytest.mark.parametrize("case", CASES)
def test_export_matches_transformers(case, tmp_path):
  config, params = CASES[case]()
  batch = make_batch(config.vocab_size, inputs=16, targets=8)
  hf.export_hf(params, config, tmp_path)
  assert {"config.json", "model.safetensors", "generation_config.json"} <= {p.name for p in tmp_path.iterdir()}
  model = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
  diff = max_diff(logits(config, params, batch), hf_logits(model, batch), batch)
  print(f"max abs logit difference ({config.emb_dim}d, scan={config.scan_layers}): {diff:.2e}")
  assert diff < TOLERANCE


def test_export_matches_transformers_with_other_relative_position_buckets(tmp_path):
  """Non-default bucket settings reach the model and the export: 16 buckets up to distance 20 (T5: 32 up to 128).
  Inputs of 40 and targets of 24 tokens reach the logarithmic buckets of both stacks, where max_distance matters."""
  config = dataclasses.replace(TINY, relative_attention_num_buckets=16, relative_attention_max_distance=20)
  params = random_params(config)
  batch = make_batch(config.vocab_size, inputs=40, targets=24)
  hf.export_hf(params, config, tmp_path)
  model = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
  assert max_diff(logits(config, params, batch), hf_logits(model, batch), batch) < TOLERANCE
  assert hf.load_hf(tmp_path)[0] == config


def test_import_transformers_initialised_t5_v1_1(tmp_path):
  torch.manual_seed(0)
  hf_cfg = hf.hf_config(TINY)
  model = transformers.T5ForConditionalGeneration(hf_cfg).eval()
  with torch.no_grad():  # an untied output layer, as T5 v1.1 checkpoints have
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * 0.05)
  model.save_pretrained(tmp_path)
  batch = make_batch(TINY.vocab_size)
  for overrides in ({}, {"scan_layers": True}):
    config, params = hf.load_hf(tmp_path, **overrides)
    assert dataclasses.replace(config, dropout_rate=0.0, **{k: False for k in overrides}) == TINY
    diff = max_diff(logits(config, params, batch), hf_logits(model, batch), batch)
    print(f"import max abs logit difference ({overrides}): {diff:.2e}")
    assert diff < TOLERANCE
  _, live = hf.from_hf_model(model)  # the same from the live model, without files
  jax.tree.map(np.testing.assert_array_equal, live, hf.load_hf(tmp_path)[1])


def test_import_tied_checkpoint_without_lm_head(tmp_path):
  """transformers 5 ties a freshly built T5 v1.1's output layer to the embedding and saves shared.weight only."""
  model = transformers.T5ForConditionalGeneration(hf.hf_config(TINY)).eval()
  model.save_pretrained(tmp_path)
  config, params = hf.load_hf(tmp_path)
  np.testing.assert_array_equal(params["logits_dense"]["kernel"], params["token_embedder"]["embedding"].T)
  batch = make_batch(TINY.vocab_size)
  assert max_diff(logits(config, params, batch), hf_logits(model, batch), batch) < TOLERANCE


def test_greedy_decoding_matches_generate(tmp_path):
  params = jax.tree.map(np.array, init_params(TINY))
  batch = make_batch(TINY.vocab_size, batch=4, seed=3)
  length = 10
  greedy = jax.jit(lambda p, e: decoding.greedy(t5.Transformer(TINY), p, e, length)[0])
  # Make EOS a little more likely than row 0's third token wherever that token is likely: rows stop early, which
  # checks the stopping and the padding after EOS too.
  token = int(greedy(params, batch["encoder_input_tokens"])[0, 2])
  params["logits_dense"]["kernel"][:, decoding.EOS_ID] = 1.01 * params["logits_dense"]["kernel"][:, token]
  hf.export_hf(params, TINY, tmp_path)
  model = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
  ours = greedy(params, batch["encoder_input_tokens"])
  enc = torch.tensor(batch["encoder_input_tokens"], dtype=torch.long)
  theirs = model.generate(input_ids=enc, attention_mask=(enc != 0).long(), max_new_tokens=length, num_beams=1,
                          do_sample=False).numpy()[:, 1:]  # drop the decoder start token 0
  theirs = np.pad(theirs, ((0, 0), (0, length - theirs.shape[1])))
  assert (np.asarray(ours) == decoding.EOS_ID).any(axis=1).sum() >= 1
  np.testing.assert_array_equal(np.asarray(ours), theirs)


def test_tokenizer_matches_seqio_vocabulary(tmp_path):
  from repeat_lm.data import vocab
  vocabulary = vocab.default_vocabulary()
  hf.export_hf(init_params(TINY), TINY, tmp_path, sentencepiece_model=vocabulary.sentencepiece_model_file)
  assert (tmp_path / "spiece.model").exists() and (tmp_path / "tokenizer_config.json").exists()
  tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
  for text in ["The capital of France is Paris.", "  spaces  and\nnewlines", "A <extra_id_0> sentinel"]:
    assert tokenizer(text).input_ids == [*vocabulary.encode(text), decoding.EOS_ID], text
  assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == vocabulary.vocab_size - 1
  assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)


def test_tokenizer_from_a_remote_vocabulary(tmp_path):
  """T5's default vocabulary lives on gs:// (SeqIO reads it through TensorFlow's file systems): the export copied it
  with local file functions and failed after writing the weights. TensorFlow's in-memory ram:// stands in for GCS."""
  import tensorflow as tf
  from repeat_lm.data import vocab
  remote = "ram://test_hf_vocab/spiece.model"
  tf.io.gfile.makedirs("ram://test_hf_vocab")
  tf.io.gfile.copy(vocab.default_vocabulary().sentencepiece_model_file, remote, overwrite=True)
  vocabulary = vocab.t5_vocabulary(remote)
  hf.export_hf(random_params(TINY), TINY, tmp_path, sentencepiece_model=vocabulary.sentencepiece_model_file)
  text = "The capital of France is Paris."
  tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
  assert tokenizer(text).input_ids == [*vocabulary.encode(text), decoding.EOS_ID]
  assert (tmp_path / "spiece.model").read_bytes() == tf.io.gfile.GFile(remote, "rb").read()


def test_config_json_states_untied_v1_1(tmp_path):
  hf.export_hf(init_params(TINY), TINY, tmp_path, dtype="bfloat16")
  cfg = json.loads((tmp_path / "config.json").read_text())
  assert cfg["feed_forward_proj"] == "gated-gelu" and cfg["tie_word_embeddings"] is False
  assert cfg["scale_decoder_outputs"] is False and cfg["dtype"] == "bfloat16"
  config, params = hf.load_hf(tmp_path)  # bfloat16 weights come back as float32 parameters
  assert jax.tree.leaves(params)[0].dtype == np.float32 and config.mlp_activations == ("gelu", "linear")


def test_an_export_replaces_the_weights_of_an_earlier_one(tmp_path):
  first, second = random_params(TINY), init_params(TINY)
  hf.export_hf(first, TINY, tmp_path, max_shard_bytes=2**16)  # sharded, with model.safetensors.index.json
  assert (tmp_path / hf.SAFETENSORS_INDEX).exists()
  hf.export_hf(second, TINY, tmp_path)  # one file: the shards and their index must not outlive it
  assert sorted(p.name for p in tmp_path.glob("*.safetensors*")) == ["model.safetensors"]
  assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o644  # safetensors wrote 0600: others can read
  _, loaded = hf.load_hf(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, second))


def test_an_export_says_when_it_replaces_model_files(tmp_path, caplog):
  """An earlier export (or, with --overwrite, another model) was replaced without a word: the log said only
  'Exported N tensors'."""
  hf.export_hf(init_params(TINY), TINY, tmp_path / "out")
  assert "Replacing" not in caplog.text  # a new directory: nothing to say
  with caplog.at_level("WARNING", logger=hf.__name__):
    hf.export_hf(init_params(TINY), TINY, tmp_path / "out")
  assert re.search(r"Replacing the model files in .*out \(an earlier repeat_lm export's: config.json, "
                   r"generation_config.json, model.safetensors\)", caplog.text)
  other = tmp_path / "other"
  other.mkdir()
  (other / "pytorch_model.bin").write_bytes(b"weights")
  caplog.clear()
  with caplog.at_level("WARNING", logger=hf.__name__):
    hf.export_hf(init_params(TINY), TINY, other, overwrite=True)
  assert "Replacing the model files in" in caplog.text and "unmarked (--overwrite): pytorch_model.bin" in caplog.text


def test_an_export_refuses_a_directory_of_files_it_did_not_write(tmp_path):
  # Another model's directory lost its config.json and pytorch_model.bin to an export pointed at it.
  other = tmp_path / "other"
  other.mkdir()
  (other / "config.json").write_text('{"model_type": "switch_transformers"}')
  (other / "pytorch_model.bin").write_bytes(b"weights")
  with pytest.raises(FileExistsError, match=r"holds model files this export would replace or delete \(config.json, "
                     r"pytorch_model.bin\).*pass --overwrite"):
    hf.export_hf(init_params(TINY), TINY, other)
  assert sorted(p.name for p in other.iterdir()) == ["config.json", "pytorch_model.bin"]
  assert (other / "pytorch_model.bin").read_bytes() == b"weights"
  hf.export_hf(init_params(TINY), TINY, other, overwrite=True)
  assert not (other / "pytorch_model.bin").exists() and (other / hf.EXPORT_MARK).exists()
  # A Hub clone (files the export leaves alone), and an earlier export with a file of the user's beside it.
  hub = tmp_path / "hub"
  (hub / ".git").mkdir(parents=True)
  (hub / "README.md").write_text("model card")
  for _ in range(2):
    hf.export_hf(init_params(TINY), TINY, hub)
    (hub / "notes.txt").write_text("mine")
  assert (hub / hf.EXPORT_MARK).exists() and (hub / "README.md").read_text() == "model card"


def test_export_refuses_a_model_dir_and_an_unknown_dtype(tmp_path):
  with pytest.raises(ValueError, match="dtype='float16': choose 'float32'"):
    hf.export_hf(init_params(TINY), TINY, tmp_path / "out", dtype="float16")
  # module.init's variables: 50 parameters reported missing read as the wrong config.
  with pytest.raises(ValueError, match=r"holds collections \(params, params_axes\): pass variables\['params'\]"):
    hf.export_hf({"params": init_params(TINY), "params_axes": {}}, TINY, tmp_path / "out")
  assert not (tmp_path / "out").exists()
  (tmp_path / "run" / "checkpoints").mkdir(parents=True)
  with pytest.raises(ValueError, match="is a repeat_lm MODEL_DIR .*--out=MODEL_DIR/hf"):
    hf.export_hf(init_params(TINY), TINY, tmp_path / "run")
  assert not (tmp_path / "run" / "config.json").exists()
  # Inside a MODEL_DIR's checkpoints/: a later save with `keep` deleted checkpoints/<step> and the export in it.
  (tmp_path / "run" / "config.gin").write_text("")
  for out in ("checkpoints", "checkpoints/20", "checkpoints/20/hf"):
    with pytest.raises(ValueError, match="inside the checkpoints of the MODEL_DIR .*--out=.*run/hf"):
      hf.export_hf(init_params(TINY), TINY, tmp_path / "run" / out)
    assert not (tmp_path / "run" / out / "config.json").exists()


@pytest.mark.parametrize("changes, named", [
    ({"dropout_rate": 0.0, "hidden_dropout_rate": 0.1}, "hidden_dropout_rate=0.1 differs from dropout_rate=0.0"),
    ({"dropout_rate": 0.1, "attention_dropout_rate": 0.0}, "attention_dropout_rate=0.0 differs from dropout_rate=0.1"),
    ({"droppath_rate": 0.1}, "droppath_rate=0.1"),
])
def test_export_refuses_regularisation_hugging_face_cannot_state(tmp_path, changes, named):
  """Hugging Face's T5 has one dropout_rate for every place and no DropPath: config.json said dropout_rate=0.0 for a
  model trained with hidden dropout 0.1 (0.1 for one whose attention dropout was 0), without a word."""
  config = dataclasses.replace(TINY, **changes)
  with pytest.raises(ValueError, match=re.escape(named) + ".*Nothing was exported.*droppath_rate=0.0"):
    hf.export_hf(init_params(TINY), config, tmp_path / "out")
  assert not (tmp_path / "out").exists()
  # Rates bound equal to dropout_rate (or left None) are what Hugging Face states: exported as before.
  same = dataclasses.replace(TINY, dropout_rate=0.1, attention_dropout_rate=0.1, mlp_dropout_rate=None)
  hf.export_hf(init_params(TINY), same, tmp_path / "ok")
  assert json.loads((tmp_path / "ok" / "config.json").read_text())["dropout_rate"] == 0.1


def test_export_judges_where_the_files_land_not_how_the_path_is_spelt(tmp_path):
  run = tmp_path / "run"
  (run / "checkpoints" / "20").mkdir(parents=True)
  (run / "config.gin").write_text("")
  # A symlink into checkpoints/20: the export was written there, and deleted with the step's checkpoint.
  (tmp_path / "snap").symlink_to(run / "checkpoints" / "20")
  with pytest.raises(ValueError, match="inside the checkpoints of the MODEL_DIR"):
    hf.export_hf(init_params(TINY), TINY, tmp_path / "snap" / "hf")
  assert not (run / "checkpoints" / "20" / "hf").exists()
  # checkpoints/../hf is MODEL_DIR/hf, the very directory the refusal suggested.
  hf.export_hf(init_params(TINY), TINY, run / "checkpoints" / ".." / "hf")
  assert (run / "hf" / "config.json").exists()


def test_an_export_without_tokenizer_removes_an_earlier_exports_tokenizer(tmp_path):
  """A tokenizer left by an earlier export would load beside the new weights as theirs."""
  from repeat_lm.data import vocab
  spm = vocab.default_vocabulary().sentencepiece_model_file
  hf.export_hf(random_params(TINY), TINY, tmp_path, sentencepiece_model=spm)
  (tmp_path / "README.md").write_text("mine")
  other = dataclasses.replace(TINY, vocab_size=32128)
  hf.export_hf(random_params(other), other, tmp_path)
  assert not any((tmp_path / name).exists() for name in hf.TOKENIZER_FILES)
  assert (tmp_path / "README.md").read_text() == "mine"


def test_an_export_with_an_unreadable_vocabulary_leaves_an_earlier_export_whole(tmp_path):
  """The tokenizer was converted after the weights and config.json were replaced: a file transformers could not read
  failed the export (as a missing `tiktoken` package) with the new weights beside the earlier export's tokenizer."""
  from repeat_lm.data import vocab
  out = tmp_path / "hf"
  hf.export_hf(random_params(TINY), TINY, out, sentencepiece_model=vocab.default_vocabulary().sentencepiece_model_file)
  before = {p.name: p.read_bytes() for p in out.iterdir()}
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"not a sentencepiece model" * 10)
  other = dataclasses.replace(TINY, vocab_size=32128)
  with pytest.raises(ValueError, match="no SentencePiece model"):
    hf.export_hf(random_params(other), other, out, sentencepiece_model=bad)
  assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no staging folder left either


@pytest.mark.parametrize("vocabulary", [False, True], ids=["no-tokenizer", "tokenizer"])
def test_an_export_that_fails_writing_config_json_leaves_an_earlier_export_whole(tmp_path, monkeypatch, vocabulary):
  """config.json and generation_config.json were written in place after the new weights had replaced the earlier
  export's: a full disk there left the new weights beside the earlier model's config.json, or half of one."""
  from repeat_lm.data import vocab
  spm = vocab.default_vocabulary().sentencepiece_model_file if vocabulary else None
  out = tmp_path / "hf"
  hf.export_hf(random_params(TINY), TINY, out, sentencepiece_model=spm)
  before = {p.name: p.read_bytes() for p in out.iterdir()}
  for method in ("write_text", "write_bytes"):
    def full(path, data, *args, real=getattr(Path, method), **kwargs):
      if path.name == "config.json":
        raise OSError(errno.ENOSPC, "No space left on device")
      return real(path, data, *args, **kwargs)
    monkeypatch.setattr(Path, method, full)
  other = dataclasses.replace(TINY, vocab_size=32128)
  with pytest.raises(OSError, match="No space left"):
    hf.export_hf(random_params(other), other, out, sentencepiece_model=spm)
  assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no staging folder left either


def test_an_export_cut_short_while_its_files_move_in_leaves_no_config_json_beside_other_weights(tmp_path, monkeypatch):
  """A kill between moving in the new weights and the new config.json: no config.json (readers refuse the directory)
  rather than the earlier model's, which loaded the new weights as another architecture; the export run again completes
  it."""
  out = tmp_path / "hf"
  hf.export_hf(random_params(TINY), TINY, out)
  real = Path.replace

  def killed_after_the_weights(path, target):
    moved = real(path, target)
    if Path(target).name == "model.safetensors":
      raise KeyboardInterrupt
    return moved
  monkeypatch.setattr(Path, "replace", killed_after_the_weights)
  other = dataclasses.replace(TINY, vocab_size=32128)
  with pytest.raises(KeyboardInterrupt):
    hf.export_hf(random_params(other), other, out)
  monkeypatch.setattr(Path, "replace", real)
  with pytest.raises(FileNotFoundError, match="has no config.json"):
    hf.load_hf(out)
  hf.export_hf(random_params(other), other, out)
  config, loaded = hf.load_hf(out)
  assert config.vocab_size == 32128
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, random_params(other)))


def test_an_export_refuses_a_vocabulary_larger_than_the_model(tmp_path):
  """`export hf --vocabulary` checked the vocabulary against the model, export_hf (docs/interop.md) did not: T5's
  32,100 ids beside an 8,192-row model exported, and transformers' model failed on the tokenizer's first ids (8774)
  with 'IndexError: index out of range in self'."""
  from repeat_lm.data import vocab
  spm = vocab.default_vocabulary().sentencepiece_model_file  # 8,000 pieces: 8,100 ids
  small = dataclasses.replace(TINY, vocab_size=4096)
  with pytest.raises(ValueError, match="8100 ids .* but the model's vocab_size is 4096"):
    hf.export_hf(random_params(small), small, tmp_path / "hf", sentencepiece_model=spm)
  assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("overrides", [{"logits_via_embedding": True}, {"relative_attention_max_distance": 64},
                                       {"layer_norm_epsilon": 1e-2}])
def test_load_hf_refuses_overrides_that_change_the_architecture(tmp_path, overrides):
  """load_params refuses a model gin whose settings of this kind differ from config.json; load_hf took them as
  overrides and returned weights that compute another function (logits off by 6.5, 0.07 and 0.04 here)."""
  hf.export_hf(random_params(TINY), TINY, tmp_path)
  name = next(iter(overrides))
  with pytest.raises(ValueError, match=f"overrides change the architecture .*{name}: checkpoint"):
    hf.load_hf(tmp_path, **overrides)
  assert hf.load_hf(tmp_path, dtype="bfloat16", dropout_rate=0.1)[0].dropout_rate == 0.1  # the others still apply


def test_config_fields_survive_the_round_trip():
  """Every field config.json carries comes back, non-defaults included (transformers' own defaults are dropout 0.1,
  epsilon 1e-6, as many decoder as encoder layers); a transformers 4 file may leave out dense_act_fn, epsilon and
  tie_word_embeddings (then True: original T5's tied, scaled output layer)."""
  config = dataclasses.replace(TINY, num_decoder_layers=3, dropout_rate=0.05, layer_norm_epsilon=1e-5,
                               relative_attention_num_buckets=16, relative_attention_max_distance=20)
  assert hf.t5_config_from_hf(json.loads(json.dumps(hf.hf_config_dict(config)))) == config
  old = {"model_type": "t5", "vocab_size": 100, "d_model": 8, "d_kv": 4, "d_ff": 16, "num_layers": 1,
         "num_heads": 2, "feed_forward_proj": "gated-gelu"}
  got = hf.t5_config_from_hf(old)
  assert got.mlp_activations == ("gelu", "linear") and got.layer_norm_epsilon == 1e-6 and got.logits_via_embedding


def test_import_sharded_pytorch_bin_checkpoint(tmp_path):
  """Hub checkpoints saved before safetensors come as pytorch_model-*-of-*.bin shards plus their index."""
  model = transformers.T5ForConditionalGeneration(hf.hf_config(TINY)).eval()
  state = {k: v.clone() for k, v in model.state_dict().items()}
  names = sorted(state)
  shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
  for shard, keys in shards.items():
    torch.save({k: state[k] for k in keys}, tmp_path / shard)
  weight_map = {k: shard for shard, keys in shards.items() for k in keys}
  (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
  (tmp_path / "config.json").write_text(model.config.to_json_string())
  config, params = hf.load_hf(tmp_path)
  batch = make_batch(TINY.vocab_size)
  assert max_diff(logits(config, params, batch), hf_logits(model, batch), batch) < TOLERANCE


@pytest.mark.parametrize("size", [0, 5, 500, -10], ids=["empty", "in-magic", "in-header", "in-data"])
def test_a_truncated_weights_file_is_named_with_the_fix(tmp_path, size):
  """A cut download or copy: a ValueError naming the file (cli shows it as a message), not SafetensorError or
  torch's zip/pickle errors, which name no file and which cli.main showed as a traceback."""
  from safetensors.numpy import save_file
  save_file({"shared.weight": np.ones((64, 32), np.float32)}, str(tmp_path / "model.safetensors"))
  (tmp_path / "bin").mkdir()
  torch.save({"shared.weight": torch.ones(64, 32)}, tmp_path / "bin" / "pytorch_model.bin")
  for path in (tmp_path / "model.safetensors", tmp_path / "bin" / "pytorch_model.bin"):
    data = path.read_bytes()
    path.write_bytes(data[:size])
    match = re.escape(str(path)) + " is not a readable .* truncated or corrupt.*re-download"
    with pytest.raises(ValueError, match=match):
      hf.read_state_dict(path.parent)


@pytest.mark.parametrize("name", ["config.json", hf.SAFETENSORS_INDEX])
def test_a_truncated_json_file_is_named_with_the_fix(tmp_path, name):
  """A cut config.json failed load_hf and INITIAL_CHECKPOINT_PATH with a bare 'JSONDecodeError: Unterminated string
  starting at: line 1 column 36 (char 35)', naming no file."""
  hf.export_hf(random_params(TINY), TINY, tmp_path, max_shard_bytes=2**16)  # sharded: with an index
  path = tmp_path / name
  path.write_bytes(path.read_bytes()[:35])
  match = (re.escape(str(path)) + r" is not a readable JSON file, it is truncated or corrupt "
           r"\(JSONDecodeError: .*\)\. Re-export it .* or re-download it")
  with pytest.raises(ValueError, match=match):
    hf.load_hf(tmp_path)
  if name == "config.json":  # as INITIAL_CHECKPOINT_PATH reads it (load_params)
    with pytest.raises(ValueError, match=match):
      load.load_for_module(tmp_path, t5.Transformer(TINY))


def test_a_config_json_of_another_tool_is_explained():
  """A config.json without model_type reads as T5; one that is no T5 config says so, not KeyError('vocab_size')."""
  with pytest.raises(ValueError, match=r"not a Hugging Face T5 .* lacks \['vocab_size'"):
    hf.t5_config_from_hf({"learning_rate": 0.1})


def test_a_config_json_that_leaves_fields_out_reads_with_transformers_defaults():
  """Original T5's config.json files (t5-small on the Hub) predate feed_forward_proj and
  relative_attention_max_distance: they mean what transformers' T5Config takes when they are absent."""
  defaults = transformers.T5Config()
  got = hf.t5_config_from_hf({"model_type": "t5", "vocab_size": 100, "d_model": 8, "d_kv": 4, "d_ff": 16,
                              "num_layers": 1, "num_heads": 2})
  assert got.mlp_activations == (defaults.feed_forward_proj,) == ("relu",)
  assert got.relative_attention_num_buckets == defaults.relative_attention_num_buckets
  assert got.relative_attention_max_distance == defaults.relative_attention_max_distance


def test_an_export_stops_generation_at_the_vocabularys_eos(tmp_path):
  """The model learnt to end with its vocabulary's EOS (the pipeline's rows end with it): with a SentencePiece model
  whose EOS is 2 (SentencePiece's default), config.json and generation_config.json said 1, another token there, so
  generate() stopped at it and ran past the real end."""
  import sentencepiece  # pylint: disable=import-outside-toplevel
  words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa"]
  lines = [" ".join(words[(i + j) % len(words)] for j in range(5)) for i in range(200)]
  prefix = tmp_path / "eos2"
  sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=24,
                                           pad_id=0, unk_id=1, eos_id=2, bos_id=-1, minloglevel=2)
  hf.export_hf(random_params(TINY), TINY, tmp_path / "out", sentencepiece_model=f"{prefix}.model")
  config = json.loads((tmp_path / "out" / "config.json").read_text())
  generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
  assert config["eos_token_id"] == generation["eos_token_id"] == 2
  hf.export_hf(random_params(TINY), TINY, tmp_path / "t5")  # no vocabulary: T5's
  assert json.loads((tmp_path / "t5" / "generation_config.json").read_text())["eos_token_id"] == 1
