"""`model-info`: parameter counts of the zoo against published numbers, FLOP ratios, the docs table, the CLI."""

import dataclasses
import json
from pathlib import Path

import pytest

from repeat_lm import cli
from repeat_lm.models import info
from repeat_lm.train import flops

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def zoo():
  return {row["model"]: row for row in info.zoo(512, 114, gin_dir=str(REPO_ROOT / "gin" / "models"))}


@pytest.mark.parametrize("name, published, tolerance", [
    ("t5_1_1_base", 247.6e6, 0.005), ("t5_1_1_large", 783.2e6, 0.005), ("t5_1_1_xl", 2.85e9, 0.005),
    # Reference section 2 (Switch paper) and the paper's RQ4 MoE models.
    ("switch_base_128", 7.4e9, 0.01), ("switch_large_128", 26.3e9, 0.01),
    ("moe_base", 701e6, 0.05), ("moe_large", 2.4e9, 0.05),
])
def test_parameter_counts_match_published(zoo, name, published, tolerance):
  assert abs(zoo[name]["params_total"] - published) / published < tolerance


def test_flop_ratios_of_the_paper_pairs(zoo):
  # Paper: MoE-Base 0.39x Dense Large, MoE-Large 0.32x Dense XL (layouts unpublished; ours are documented).
  assert zoo["moe_base"]["reference"] == "t5_1_1_large" and zoo["moe_large"]["reference"] == "t5_1_1_xl"
  assert abs(zoo["moe_base"]["flops_ratio_to_reference"] - 0.39) < 0.02
  assert abs(zoo["moe_large"]["flops_ratio_to_reference"] - 0.32) < 0.05
  # Switch: many parameters at dense FLOPs; ParamShare: few parameters at full FLOPs.
  assert abs(zoo["switch_base_8"]["flops_ratio_to_reference"] - 1.0) < 0.01
  assert zoo["paramshare_base"]["flops_ratio_to_reference"] == 1.0
  assert zoo["paramshare_base"]["params_ratio_to_reference"] < 0.3


def test_params_per_token_and_embedding(zoo):
  for name in ("switch_base_8", "switch_base_128", "moe_base"):
    row = zoo[name]
    used = row["moe"]["top_k"] / row["moe"]["num_experts"]
    assert row["params_per_token"] == round(row["params_total"] - row["params_experts"] * (1 - used))
  # Dense: every parameter is used; embedding = token embedding + untied logits (2 x V x D); Switch ties them.
  base = zoo["t5_1_1_base"]
  assert base["params_per_token"] == base["params_total"] and base["params_embedding"] == 2 * 32128 * 768
  assert zoo["switch_base_8"]["params_embedding"] == 32128 * 768
  assert base["train_flops_per_sequence"] == pytest.approx(425.9e9, rel=0.01)
  assert base["train_flops_per_token"] == base["train_flops_per_sequence"] / (512 + 114)


def test_docs_table_is_the_generated_one(zoo):
  doc = (REPO_ROOT / "docs" / "models.md").read_text()
  table = info.zoo_markdown([zoo[name] for name, _ in info.ZOO])
  assert f"{info.DOC_BEGIN}\n{table}{info.DOC_END}" in doc, (
      "docs/models.md is stale: run `repeat-lm model-info --zoo --update_doc docs/models.md`")


def test_cli_prints_one_json_object(capsys):
  code = cli.main(["model-info", "--gin_file=gin/models/switch_base_8.gin", "--gin.moe.MoeConfig.num_experts=16",
                   "--inputs_length", "256", "--targets_length", "64",
                   "--dense_reference=gin/models/t5_1_1_base.gin"])
  assert code == 0
  out = json.loads(capsys.readouterr().out)
  for key in ("params_total", "params_per_token", "params_embedding", "train_flops_per_sequence",
              "train_flops_per_token", "flops_ratio_to_reference"):
    assert key in out
  assert out["moe"]["num_experts"] == 16  # the binding applies to the model, not the reference
  reference = info.load_config("gin/models/t5_1_1_base.gin")
  assert out["flops_ratio_to_reference"] == out["train_flops_per_sequence"] / flops.train_flops_per_sequence(
      reference, 256, 64)


def test_cli_needs_a_model(capsys):
  assert cli.main(["model-info"]) == 2
  assert "--gin_file" in capsys.readouterr().err
  assert cli.main(["model-info", "--zoo", "--inputs_length=0"]) == 2
  assert "--inputs_length=0 and --targets_length=114: FLOPs per sequence need lengths >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("share, distinct", [(4, 6), (12, 2), ("all", 2)])
def test_distinct_layers_of_a_shared_moe_count_whole_blocks(share, distinct):
  # A shared group of k MoE layers is one dense/sparse block (sparse_every = 2 layers) applied k / 2 times: its
  # distinct layers are the block's two, as the expert weights (one sparse layer per block) show.
  config = info.load_config(str(REPO_ROOT / "gin" / "models" / "switch_tiny.gin"))
  config = dataclasses.replace(config, num_encoder_layers=12, num_decoder_layers=12, param_share=share)
  row = info.model_info(config, 16, 8)
  assert row["distinct_layers"] == [distinct, distinct]
  m = config.moe
  per_sparse_layer = m.num_experts * (len(m.expert_activations) + 1) * config.emb_dim * m.expert_mlp_dim
  assert row["params_experts"] == 2 * (distinct // m.sparse_every) * per_sparse_layer


@pytest.mark.parametrize("argv, message", [
    (["--gin_file=gin/models/t5_1_1_tiny.gin", "--update_doc=unchanged.md"], "--markdown and --update_doc need --zoo"),
    (["--gin_file=gin/models/t5_1_1_tiny.gin", "--markdown"], "--markdown and --update_doc need --zoo"),
    (["--zoo", "--gin.moe.MoeConfig.num_experts=16"], "model-info --zoo takes no --gin.KEY=VALUE"),
    (["--zoo", "--dense_reference=gin/models/t5_1_1_xl.gin"], "model-info --zoo takes no --dense_reference"),
])
def test_cli_refuses_flags_it_would_ignore(argv, message, capsys, tmp_path):
  doc = tmp_path / "unchanged.md"
  doc.write_text(f"{info.DOC_BEGIN}\nold\n{info.DOC_END}\n")
  argv = [a.replace("unchanged.md", str(doc)) for a in argv]
  assert cli.main(["model-info", *argv]) == 2
  assert message in capsys.readouterr().err
  assert "old" in doc.read_text()


def test_an_asymmetric_model_reports_each_stack_as_its_own():
  # Every zoo model has as many decoder as encoder layers, so the per-stack lists could read one stack twice (or
  # swap them) unseen. 6 encoder and 2 decoder layers, one FFN in every 2 sparse: 3 and 1 sparse layers.
  config = info.load_config(str(REPO_ROOT / "gin" / "models" / "switch_tiny.gin"))
  config = dataclasses.replace(config, num_encoder_layers=6, num_decoder_layers=2)
  row = info.model_info(config, 16, 8)
  assert row["layers"] == [6, 2] and row["distinct_layers"] == [6, 2] and row["sparse_layers"] == [3, 1]
  m = config.moe
  per_sparse_layer = m.num_experts * (len(m.expert_activations) + 1) * config.emb_dim * m.expert_mlp_dim
  assert row["params_experts"] == (3 + 1) * per_sparse_layer
