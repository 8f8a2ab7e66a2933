"""MoE <-> Hugging Face SwitchTransformersForConditionalGeneration: export (any layout, scanned included) and import
give logits equal to transformers' (float32, non-padding positions, capacities no token overflows), a round trip
gives the same parameters, and layouts that do not map are refused with the reason."""

import dataclasses

import jax
import numpy as np
import pytest

from interop_helpers import TINY_SWITCH, hf_logits, logits, make_batch, max_diff, random_params, sharpen_routers
from repeat_lm.interop import hf, hf_switch, load
from repeat_lm.models import moe, t5

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4  # max abs logit difference, float32


def experts_used(model, stack_block=1) -> int:
  """How many experts the first sparse encoder layer's router picks for random hidden states."""
  router = model.encoder.block[stack_block].layer[1].mlp.router
  with torch.no_grad():
    return len(set(router(torch.randn(1, 16, model.config.d_model))[0].argmax(-1).flatten().tolist()))


# Scanned layouts: the export unstacks `layers` / `layers/layers_j` (and shared groups) into per-layer tensors.
EXPORT_CASES = {
    "per-layer": TINY_SWITCH,
    "scan": dataclasses.replace(TINY_SWITCH, scan_layers=True),
    "scan-all-sparse": dataclasses.replace(TINY_SWITCH, scan_layers=True,
                                           moe=dataclasses.replace(TINY_SWITCH.moe, sparse_every=1)),
    "scan-shared": dataclasses.replace(TINY_SWITCH, scan_layers=True, param_share="all"),
    # Tied, scaled output logits as gin/models/switch_base_128.gin has them; a decoder shallower than the encoder.
    "tied-shallow-decoder": dataclasses.replace(TINY_SWITCH, logits_via_embedding=True, num_decoder_layers=2),
}


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_switch_export_matches_transformers(case, tmp_path):
  config = EXPORT_CASES[case]
  params = sharpen_routers(random_params(config))
  batch = make_batch(config.vocab_size, inputs=16, targets=8)
  hf.export_hf(params, config, tmp_path)
  model = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(tmp_path).eval()
  assert experts_used(model) > 1
  diff = max_diff(logits(config, params, batch), hf_logits(model, batch), batch)
  print(f"Switch export ({case}) max abs logit difference: {diff:.2e}")
  assert diff < TOLERANCE


@pytest.mark.parametrize("change, reason", [
    ({"num_selected_experts": 2}, "top-2 routing"),
    ({"sparse_first": True}, "sparse layers [0, 2]"),
    ({"expert_mlp_dim": 32}, "expert_mlp_dim 32 != mlp_dim 64"),
    ({"expert_activations": ("gelu", "linear")}, "one non-gated activation"),
])
def test_switch_export_explains_unmappable_layouts(change, reason, tmp_path):
  config = dataclasses.replace(TINY_SWITCH, moe=dataclasses.replace(TINY_SWITCH.moe, **change))
  with pytest.raises(ValueError, match="cannot be exported as SwitchTransformers") as e:
    hf.export_hf({}, config, tmp_path / "out")
  assert reason in str(e.value)
  assert not (tmp_path / "out").exists()  # refused before anything is written (it was left with only the mark)


def tiny_hf_switch(**changes):
  """A transformers config as small as TINY_SWITCH; expert_capacity 64 > any sequence here, so no token drops."""
  kwargs = dict(vocab_size=512, d_model=32, d_kv=16, d_ff=64, num_heads=2, num_layers=4, num_decoder_layers=4,
                num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, num_experts=4, expert_capacity=64,
                router_jitter_noise=0.0, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  return transformers.SwitchTransformersConfig(**{**kwargs, **changes})


IMPORT_CASES = {  # transformers' own initialisation; Switch's layout (odd layers sparse) or every layer sparse
    "tied-odd-sparse": {},
    "untied-all-sparse": {"tie_word_embeddings": False, "num_sparse_encoder_layers": 4, "num_sparse_decoder_layers": 4,
                          "dense_act_fn": "gelu_new"},
}


@pytest.mark.parametrize("case", IMPORT_CASES)
def test_import_transformers_initialised_switch(case, tmp_path):
  torch.manual_seed(0)
  model = transformers.SwitchTransformersForConditionalGeneration(tiny_hf_switch(**IMPORT_CASES[case])).eval()
  if case.startswith("untied"):
    with torch.no_grad():  # a distinct output layer, so a tie mix-up would show; one input embedding, as repeat_lm's
      model.lm_head.weight.copy_(torch.randn_like(model.shared.weight) * 0.05)
      model.encoder.embed_tokens.weight.copy_(model.shared.weight)
      model.decoder.embed_tokens.weight.copy_(model.shared.weight)
  assert experts_used(model, 1) > 1
  model.save_pretrained(tmp_path)
  batch = make_batch(512, inputs=16, targets=8)
  theirs = hf_logits(model, batch)
  for overrides in ({}, {"scan_layers": True}):
    config, params = hf.load_hf(tmp_path, **overrides)
    diff = max_diff(logits(config, params, batch), theirs, batch)
    print(f"Switch import ({case}, {overrides}) max abs logit difference: {diff:.2e}")
    assert diff < TOLERANCE
  all_sparse = case.endswith("all-sparse")
  assert (config.moe.num_experts, config.moe.sparse_every, config.moe.num_selected_experts) == (
      4, 1 if all_sparse else 2, 1)
  assert config.logits_via_embedding == (case.startswith("tied"))
  # INITIAL_CHECKPOINT_PATH's loader reads the same directory into a model of the matching gin.
  loaded = load.load_for_module(tmp_path, t5.Transformer(config))
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, loaded), params)
  _, live = hf.from_hf_model(model, scan_layers=True)  # the same from the live model, without files
  jax.tree.map(np.testing.assert_array_equal, live, params)


@pytest.mark.parametrize("scan", [False, True], ids=["per-layer", "scan"])
def test_switch_round_trip_gives_identical_params(scan, tmp_path):
  config = dataclasses.replace(TINY_SWITCH, scan_layers=scan)
  params = jax.tree.map(np.asarray, random_params(config, seed=1))
  hf.export_hf(params, config, tmp_path)
  imported_config, imported = hf.load_hf(tmp_path, scan_layers=scan)
  assert jax.tree.structure(imported) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, imported, params)
  same_architecture = dataclasses.replace(imported_config, moe=dataclasses.replace(
      imported_config.moe, **{f: getattr(config.moe, f) for f in ("eval_capacity_factor", "min_expert_capacity",
                                                                   "jitter_noise", "load_balancing_loss_weight",
                                                                   "router_z_loss_weight")}))
  assert same_architecture == config


@pytest.mark.parametrize("changes, reason", [
    ({"num_layers": 6, "num_decoder_layers": 6}, "sparse layers at encoder [1, 4] of 6"),  # step 3: the middle layer
    ({"num_sparse_decoder_layers": 5}, "decoder [] of 4"),  # step 0: a dense decoder under a sparse encoder
    ({"router_bias": True}, "router with a bias"),
    ({"dense_act_fn": "silu"}, "activation 'silu'"),
])
def test_switch_import_explains_unmappable_layouts(changes, reason):
  with pytest.raises(ValueError, match="SwitchTransformers checkpoint has no repeat_lm equivalent") as e:
    hf.t5_config_from_hf(tiny_hf_switch(**changes).to_dict())
  assert reason in str(e.value)


def test_untied_input_embeddings_are_refused(tmp_path):
  """transformers 5 unties the stacks' input embeddings from `shared` too when tie_word_embeddings=False."""
  model = transformers.SwitchTransformersForConditionalGeneration(tiny_hf_switch(tie_word_embeddings=False))
  model.save_pretrained(tmp_path)
  with pytest.raises(ValueError, match=r"encoder.embed_tokens.weight differs from shared.weight"):
    hf.load_hf(tmp_path)


def test_loading_a_switch_checkpoint_into_a_dense_model_is_explained(tmp_path):
  config = TINY_SWITCH
  hf.export_hf(random_params(config), config, tmp_path)
  with pytest.raises(ValueError, match=r"is a MoE \(Switch\) model but the model gin builds a dense \(T5\) one"):
    load.load_for_module(tmp_path, t5.Transformer(dataclasses.replace(config, moe=None)))
  top2 = dataclasses.replace(config, moe=dataclasses.replace(config.moe, num_selected_experts=2))
  with pytest.raises(ValueError, match=r"moe.num_selected_experts: checkpoint 1 vs model 2"):
    load.load_for_module(tmp_path, t5.Transformer(top2))


def test_switch_round_trip_keeps_router_settings(tmp_path):
  """Jitter reaches config.json (Hugging Face applies it in training, as repeat_lm), and the no-drop capacity the export
  writes does not come back as a minimum capacity (every expert would get a whole routing group)."""
  import json
  moe = dataclasses.replace(TINY_SWITCH.moe, jitter_noise=0.01, min_expert_capacity=4)
  config = dataclasses.replace(TINY_SWITCH, moe=moe)
  hf.export_hf(random_params(config), config, tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["router_jitter_noise"] == 0.01
  back = hf.load_hf(tmp_path, moe={"eval_capacity_factor": moe.eval_capacity_factor})[0].moe
  assert back.jitter_noise == 0.01 and back.min_expert_capacity == 4


def test_describe_mapping_names_switch_tensors():
  names = dict(hf.describe_mapping(TINY_SWITCH))
  assert names["encoder/layers_1/mlp/router"] == "encoder.block.1.layer.1.mlp.router.classifier.weight"
  assert names["decoder/layers_1/mlp/experts/wi"] == "decoder.block.1.layer.2.mlp.experts.expert_<e>.wi.weight"
  assert names["encoder/layers_0/mlp/wi/kernel"] == "encoder.block.0.layer.1.mlp.wi.weight"


def test_switch_config_names_each_router_loss_as_transformers_does():
  # router_aux_loss_coef weighs Switch's load-balancing loss, router_z_loss_coef the router z-loss.
  config = dataclasses.replace(TINY_SWITCH, moe=dataclasses.replace(TINY_SWITCH.moe, load_balancing_loss_weight=0.01,
                                                                    router_z_loss_weight=1e-4))
  d = hf_switch.switch_config_dict(config)
  assert (d["router_aux_loss_coef"], d["router_z_loss_coef"]) == (0.01, 1e-4)
  back = hf.t5_config_from_hf(d).moe
  assert (back.load_balancing_loss_weight, back.router_z_loss_weight) == (0.01, 1e-4)


def test_gelu_experts_export_as_transformers_tanh_gelu():
  # repeat_lm's 'gelu' is the tanh approximation: transformers' gelu_new, not its (erf) 'gelu'.
  config = dataclasses.replace(TINY_SWITCH, mlp_activations=("gelu",),
                               moe=dataclasses.replace(TINY_SWITCH.moe, expert_activations=("gelu",)))
  d = hf_switch.switch_config_dict(config)
  assert d["dense_act_fn"] == "gelu_new"
  assert hf.t5_config_from_hf(d).moe.expert_activations == ("gelu",)


def test_a_switch_config_json_that_leaves_fields_out_reads_with_transformers_defaults():
  """What SwitchTransformersConfig takes for the fields a config.json leaves out: 8 experts, 3 sparse layers a stack,
  ReLU, jitter 0.01, both router loss weights 0.001, expert capacity 64."""
  sizes = {"vocab_size": 100, "d_model": 8, "d_kv": 4, "d_ff": 16, "num_layers": 6, "num_heads": 2}
  defaults = transformers.SwitchTransformersConfig(**sizes)
  got = hf.t5_config_from_hf({"model_type": "switch_transformers", **sizes})
  m = got.moe
  assert m.num_experts == defaults.num_experts and got.mlp_activations == (defaults.dense_act_fn,) == ("relu",)
  assert (m.jitter_noise, m.load_balancing_loss_weight, m.router_z_loss_weight) == (
      defaults.router_jitter_noise, defaults.router_aux_loss_coef, defaults.router_z_loss_coef)
  assert m.min_expert_capacity == defaults.expert_capacity
  model = transformers.SwitchTransformersForConditionalGeneration(defaults)  # layers 1, 3, 5 sparse (step 2)
  theirs = tuple(hasattr(b.layer[1].mlp, "router") for b in model.encoder.block)
  assert moe.sparse_layer_flags(6, m) == theirs == (False, True) * 3


@pytest.fixture(scope="module")
def switch_state():
  return hf_switch.to_switch_state_dict(random_params(TINY_SWITCH), TINY_SWITCH)


def test_router_biases_in_the_weights_are_refused(switch_state):
  # transformers' router is a Linear with a bias when router_bias=True; repeat_lm's has none to put it in.
  state = {**switch_state, "encoder.block.1.layer.1.mlp.router.classifier.bias": np.zeros(4, np.float32)}
  with pytest.raises(ValueError, match="routers have a bias"):
    hf_switch.from_switch_state_dict(state, TINY_SWITCH)


def test_missing_expert_weights_are_named(switch_state):
  state = {k: v for k, v in switch_state.items() if k != "decoder.block.3.layer.2.mlp.experts.expert_2.wo.weight"}
  with pytest.raises(ValueError, match=r"lacks 1 expert tensors of this 4-expert model.*expert_2\.wo"):
    hf_switch.from_switch_state_dict(state, TINY_SWITCH)
