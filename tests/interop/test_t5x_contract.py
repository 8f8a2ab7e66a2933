"""repeat_lm's modules under T5X's calling conventions (the test double in t5x_double.py), and the documented T5X
gin files (docs/t5x_example*.gin) parsed against repeat_lm's configurables with T5X's names stood in."""

import dataclasses
import functools
import shlex
from pathlib import Path

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import tensorflow as tf
from flax import traverse_util

import t5x_double
from interop_helpers import TINY, TINY_SWITCH
from repeat_lm.models import decoding, t5

DOCS = Path(__file__).resolve().parents[2] / "docs"
INPUTS, TARGETS = 16, 8


def converter_batch(vocab_size: int, pack: bool) -> dict[str, np.ndarray]:
  """One batch straight from seqio.EncDecFeatureConverter, so the keys are exactly those T5X feeds."""
  rng = np.random.default_rng(0)
  examples = [{"inputs": rng.integers(2, vocab_size, n).astype(np.int32),
               "targets": rng.integers(2, vocab_size, m).astype(np.int32)} for n, m in ((5, 3), (7, 4), (4, 2),
                                                                                       (9, 5))]
  ds = tf.data.Dataset.from_generator(lambda: iter(examples), output_signature={
      "inputs": tf.TensorSpec([None], tf.int32), "targets": tf.TensorSpec([None], tf.int32)})
  ds = seqio.EncDecFeatureConverter(pack=pack)(ds, {"inputs": INPUTS, "targets": TARGETS})
  return next(ds.batch(4 if not pack else 2).as_numpy_iterator())


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
def test_encoder_decoder_model_contract(scan):
  # Dropout rate 0 keeps compiles short; the rng plumbing of training (enable_dropout + rngs) is exercised all the same.
  config = dataclasses.replace(TINY, vocab_size=256, scan_layers=scan, num_encoder_layers=1, num_decoder_layers=1)
  model = t5x_double.EncoderDecoderModel(t5.Transformer(config))
  variables = model.get_initial_variables(jax.random.key(0), {"encoder_input_tokens": (2, INPUTS),
                                                              "decoder_input_tokens": (2, TARGETS)})
  params = variables["params"]
  packed = converter_batch(config.vocab_size, pack=True)
  assert set(t5x_double.PACKING_FEATURES) <= set(packed)
  loss, _ = model.loss_fn(params, packed, jax.random.key(1))  # a dropout rng, as in training
  assert np.isfinite(loss)
  unpacked = converter_batch(config.vocab_size, pack=False)
  assert set(unpacked) == set(t5x_double.ENC_DEC_FEATURES)
  # Decoding through T5X's cache plumbing, with every example repeated in place as beam search does (on cache axis
  # 1 when scanned): the same tokens as repeat_lm's own greedy decoding.
  tokens = model.predict_batch(params, unpacked, num_decodes=2)
  ours = jax.jit(lambda p, e: decoding.greedy(t5.Transformer(config), p, e, TARGETS)[0])(
      params, unpacked["encoder_input_tokens"])
  np.testing.assert_array_equal(tokens, np.asarray(ours))


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
def test_shared_parameters_decode_through_t5x_beam_expansion(scan):
  """param_share keeps one cache per application; T5X still finds the batch on axis `1 if scan_layers else 0`."""
  config = dataclasses.replace(TINY, vocab_size=256, scan_layers=scan, param_share="all")
  model = t5x_double.EncoderDecoderModel(t5.Transformer(config))
  params = model.get_initial_variables(jax.random.key(0), {"encoder_input_tokens": (2, INPUTS),
                                                           "decoder_input_tokens": (2, TARGETS)})["params"]
  unpacked = converter_batch(config.vocab_size, pack=False)
  ours = jax.jit(lambda p, e: decoding.greedy(t5.Transformer(config), p, e, TARGETS)[0])(
      params, unpacked["encoder_input_tokens"])
  np.testing.assert_array_equal(model.predict_batch(params, unpacked, num_decodes=3), np.asarray(ours))


def test_moe_model_reads_the_sown_losses():
  config = dataclasses.replace(TINY_SWITCH, scan_layers=True, num_encoder_layers=1, num_decoder_layers=1,
                               moe=dataclasses.replace(TINY_SWITCH.moe, sparse_every=1))
  module = t5.Transformer(config)
  model = t5x_double.MoeEncoderDecoderModel(module, aux_loss_factor=0.5, router_z_loss_factor=0.1)
  variables = model.get_initial_variables(jax.random.key(0), {"encoder_input_tokens": (2, INPUTS),
                                                              "decoder_input_tokens": (2, TARGETS)})
  batch = converter_batch(config.vocab_size, pack=False)
  loss, metrics = model.loss_fn(variables["params"], batch, None)
  plain_loss = functools.partial(t5x_double.EncoderDecoderModel._loss, model)  # pylint: disable=protected-access
  without_aux, _ = jax.jit(plain_loss)(variables["params"], batch, None)
  expected = without_aux + 0.5 * metrics["experts/auxiliary_loss"] + 0.1 * metrics["experts/router_z_loss"]
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert 0.5 < float(metrics["experts/auxiliary_loss"]) < 4.0  # E x sum(f_e p_e): 1 when balanced


def test_a_module_without_params_axes_is_refused():
  import flax.linen as nn

  class Plain(nn.Module):
    @nn.compact
    def __call__(self, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens, **kwargs):
      return nn.Dense(4)(decoder_input_tokens.astype(jnp.float32)[..., None])

  with pytest.raises(ValueError, match="params_axes"):
    t5x_double.EncoderDecoderModel(Plain()).get_initial_variables(
        jax.random.key(0), {"encoder_input_tokens": (1, 4), "decoder_input_tokens": (1, 4)})


TINY_BINDINGS = """from __gin__ import dynamic_registration
from repeat_lm import gin_utils
from repeat_lm.models import t5
t5.T5Config.vocab_size = 256
t5.T5Config.dtype = 'float32'
t5.T5Config.emb_dim = 32
t5.T5Config.num_heads = 2
t5.T5Config.head_dim = 16
t5.T5Config.num_encoder_layers = 2
t5.T5Config.num_decoder_layers = 2
gin_utils.macro_value.value = %MODEL
"""


def _model_from_doc(text: str, tmp_path: Path, extra: str = ""):
  path = tmp_path / "model.gin"
  path.write_text(text)
  gin.parse_config_files_and_bindings([str(path)], [TINY_BINDINGS + extra], finalize_config=False,
                                      skip_unknown=False)
  from repeat_lm import gin_utils
  return gin.configurable(gin_utils.macro_value)()


@pytest.mark.parametrize("doc, model_cls, moe", [("t5x_example.gin", "EncoderDecoderModel", False),
                                                 ("t5x_example_moe.gin", "MoeEncoderDecoderModel", True)])
def test_documented_gin_parses_with_repeat_lm(doc, model_cls, moe, tmp_path, monkeypatch, fresh_gin):
  t5x_double.install_stand_ins(monkeypatch)
  extra = ("moe.MoeConfig.num_experts = 4\nmoe.MoeConfig.expert_mlp_dim = 32\nt5.T5Config.mlp_dim = 32\n"
           if moe else "t5.T5Config.mlp_dim = 64\n")
  model = _model_from_doc((DOCS / doc).read_text(), tmp_path,
                          "from repeat_lm.models import moe\n" + extra if moe else extra)
  assert type(model).__name__ == model_cls
  assert isinstance(model.module, t5.Transformer) and (model.module.config.moe is not None) == moe
  assert model.optimizer_def.logical_factor_rules == (t5x_double.MOE_FACTOR_RULES if moe
                                                      else t5x_double.FACTOR_RULES)
  assert isinstance(model.input_vocabulary, seqio.SentencePieceVocabulary)
  model.get_initial_variables(jax.random.key(0), {"encoder_input_tokens": (1, 8), "decoder_input_tokens": (1, 4)})
  assert gin.query_parameter("tasks.span_corruption_task.corpus").endswith(".json.gz")


@pytest.mark.parametrize("doc", ["t5x_example.gin", "t5x_example_moe.gin"])
def test_documented_gin_drops_out_as_t5x_and_the_model_gins(doc, tmp_path, monkeypatch, fresh_gin):
  # T5X's T5 shares each dropout mask along the length axis (broadcast_dims=(-2,)), as gin/models/ does; the
  # documented gins left T5Config's per-element default, so fine-tuning under T5X at DROPOUT_RATE 0.1 dropped out
  # differently from both.
  t5x_double.install_stand_ins(monkeypatch)
  path = tmp_path / "model.gin"
  path.write_text((DOCS / doc).read_text())
  gin.parse_config_files_and_bindings([str(path)], ["from repeat_lm import gin_utils\n"
                                                    "gin_utils.macro_value.value = %MODEL"], finalize_config=False)
  from repeat_lm import gin_utils
  config = gin.configurable(gin_utils.macro_value)().module.config
  assert config.dropout_broadcast_length
  if doc == "t5x_example.gin":  # "repeat_lm's T5 v1.1 Base": the same network as gin/models/t5_1_1_base.gin
    assert config == gin_utils.configured_macro(["gin/models/t5_1_1_base.gin"], [], "MODEL").module.config
  else:  # "Switch-Base-style": gin/models/switch_base_128.gin's network (tied logits included), whose load-balancing
    # weight T5X replaces with its own AUX_LOSS_FACTOR.
    switch = gin_utils.configured_macro(["gin/models/switch_base_128.gin"], [], "MODEL").module.config
    # The experts' rate is named (EXPERT_DROPOUT_RATE, T5X's MoE macro) where the model gin leaves it to dropout_rate.
    assert config.dropout_rate_for("expert") == switch.dropout_rate_for("expert")
    assert config == dataclasses.replace(switch, expert_dropout_rate=config.expert_dropout_rate,
                                         moe=dataclasses.replace(switch.moe, load_balancing_loss_weight=0.0))


def test_documented_moe_gin_reads_t5xs_expert_dropout_macro(tmp_path, monkeypatch, fresh_gin):
  # T5X's MoE finetune.gin sets EXPERT_DROPOUT_RATE (ST-MoE fine-tunes the experts at 0.4 beside 0.1 elsewhere);
  # the documented gin never read it, so the experts dropped out at DROPOUT_RATE without a word.
  t5x_double.install_stand_ins(monkeypatch)
  path = tmp_path / "model.gin"
  path.write_text((DOCS / "t5x_example_moe.gin").read_text())
  gin.parse_config_files_and_bindings([str(path)], ["from repeat_lm import gin_utils\n"
                                                    "gin_utils.macro_value.value = %MODEL",
                                                    "DROPOUT_RATE = 0.1", "EXPERT_DROPOUT_RATE = 0.4"],
                                      finalize_config=False)
  from repeat_lm import gin_utils
  config = gin.configurable(gin_utils.macro_value)().module.config
  assert (config.dropout_rate_for("expert"), config.dropout_rate_for("mlp")) == (0.4, 0.1)


def _documented_gin_flags() -> list[str]:
  """The --gin.NAME=VALUE flags of docs/t5x_integration.md's command, as T5X's gin_utils turns them into bindings."""
  text = (DOCS / "t5x_integration.md").read_text()
  command = text.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
  return [arg[len("--gin."):] for arg in shlex.split(command) if arg.startswith("--gin.")]


def test_documented_command_line_parses_as_t5x_parses_it(tmp_path, monkeypatch, fresh_gin):
  # T5X parses the model gin, then each flag as a binding of its own, with no imports: a binding can name only what
  # a file named, so '@vocab.default_vocabulary()' on the command line failed as an unknown configurable.
  t5x_double.install_stand_ins(monkeypatch)
  path = tmp_path / "model.gin"
  path.write_text((DOCS / "t5x_example.gin").read_text())
  flags = _documented_gin_flags()
  assert "VOCABULARY=%DEFAULT_VOCABULARY" in flags
  gin.parse_config_files_and_bindings([str(path)], flags, finalize_config=False, skip_unknown=False)
  from repeat_lm import gin_utils
  from repeat_lm.data import vocab
  probe = gin.configurable(gin_utils.macro_value)  # registered here: run alone, no earlier test has done it
  gin.parse_config("from repeat_lm import gin_utils\ngin_utils.macro_value.value = %VOCABULARY")
  assert probe().vocab_size == vocab.default_vocabulary().vocab_size
  assert gin.query_parameter("t5.T5Config.vocab_size") == 8192
  assert gin.query_parameter("%MIXTURE_OR_TASK_NAME") == "repeat_lm.wiki_span_corruption"


@pytest.mark.parametrize("scan, activations", [(False, ("relu",)), (True, ("relu",)), (False, ("gelu", "linear"))],
                         ids=["unscanned", "scanned", "gated"])
def test_documented_moe_gin_shards_the_experts_factored_moments(scan, activations, tmp_path, monkeypatch, fresh_gin):
  # T5X's MoE partitioner puts 'expert' before the axes of the optimizer-state leaves its filter matches; a factored
  # Adafactor's v_row and v_col carry no names otherwise. Its default filter is written for flaxformer's
  # '.../expert/wi/kernel' and matched none of repeat_lm's, so every device held all experts' moments.
  t5x_double.install_stand_ins(monkeypatch)
  path = tmp_path / "model.gin"
  path.write_text((DOCS / "t5x_example_moe.gin").read_text())
  gin.parse_config_files_and_bindings([str(path)], [], finalize_config=False)
  state_filter = gin.get_configurable(t5x_double.MoePjitPartitioner)().state_filter_fn
  config = dataclasses.replace(TINY_SWITCH, scan_layers=scan,
                               moe=dataclasses.replace(TINY_SWITCH.moe, expert_activations=activations))
  tokens = jnp.ones((1, 8), jnp.int32)
  variables = jax.eval_shape(lambda: t5.Transformer(config).init(jax.random.key(0), tokens, tokens, tokens,
                                                                 enable_dropout=False))
  params = {"/".join(k): v for k, v in traverse_util.flatten_dict(variables["params"]).items()}
  axes = {"/".join(k): v for k, v in t5x_double.logical_axes(variables).items()}
  names = {f"{p}/{m}" for p, v in params.items() for m in (("v_row", "v_col") if v.ndim > 1 else ("v",))}
  expected = {f"{p}/{m}" for p in params if "expert" in axes[p] for m in ("v_row", "v_col")}
  assert expected and {name for name in names if state_filter(name)} == expected
  assert not any(map(t5x_double.match_fn(t5x_double.DEFAULT_EXPERT_STATE_PREFIX), names))


@pytest.mark.parametrize("typo", [("emb_dim = 768", "emb_dimm = 768"), ("@t5.Transformer()", "@t5.Transformr()"),
                                  ("from repeat_lm.models import t5", "from repeat_lm.model import t5")])
def test_documented_gin_with_a_wrong_repeat_lm_name_fails(typo, tmp_path, monkeypatch, fresh_gin):
  t5x_double.install_stand_ins(monkeypatch)
  text = (DOCS / "t5x_example.gin").read_text()
  assert typo[0] in text
  with pytest.raises(Exception):
    _model_from_doc(text.replace(typo[0], typo[1]), tmp_path, "t5.T5Config.mlp_dim = 64\n")


def test_params_use_only_t5x_logical_axes():
  for config, axes in ((TINY, t5x_double.STANDARD_AXES), (TINY_SWITCH, t5x_double.MOE_AXES)):
    tokens = jnp.ones((2, 8), jnp.int32)
    variables = jax.eval_shape(lambda c=config: t5.Transformer(c).init(jax.random.key(0), tokens, tokens, tokens,
                                                                       enable_dropout=False))
    names = {n for v in t5x_double.logical_axes(variables).values() for n in v}
    assert names <= axes, names - axes


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
def test_initial_variables_from_float_tokens_as_t5x_eval(scan):
  # t5x/eval.py builds its train state without input_types, so T5X's get_initial_variables initialises the module
  # with float32 ones as tokens (T5X's own network casts them to int32); the embedding lookup refused them.
  config = dataclasses.replace(TINY, vocab_size=256, scan_layers=scan, num_encoder_layers=1, num_decoder_layers=1)
  model = t5x_double.EncoderDecoderModel(t5.Transformer(config))
  shapes = {"encoder_input_tokens": (2, INPUTS), "decoder_input_tokens": (2, TARGETS)}
  variables = jax.eval_shape(lambda: model.get_initial_variables(jax.random.key(0), shapes))
  ints = jax.eval_shape(lambda: model.get_initial_variables(jax.random.key(0), shapes, {k: jnp.int32 for k in shapes}))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), variables["params"]) == jax.tree.map(
      lambda x: (x.shape, x.dtype), ints["params"])
