"""The importers' layout plumbing: per-layer <-> scanned / MoE-block / shared layouts, and match_target's checks."""

import dataclasses

import numpy as np
import pytest

from interop_helpers import TINY_SWITCH
from repeat_lm.interop import layout, load
from repeat_lm.models import t5


def test_a_scanned_moe_checkpoint_reads_as_all_its_layers():
  # A scanned MoE stack stores 2 scan steps of 2-layer dense/sparse blocks ('layers/layers_0', 'layers/layers_1'):
  # 4 layers, as its model has; read as 2, a scanned MoE checkpoint would not load into an unscanned model.
  config = dataclasses.replace(TINY_SWITCH, scan_layers=True)
  flat = layout.flatten(load.abstract_params(t5.Transformer(config)))
  assert layout.infer_layouts(flat) == {name: layout.StackLayout(4, True, 2) for name in layout.STACKS}


def test_a_scan_stacks_the_layers_in_depth_order_past_ten():
  # Flat paths often come sorted as text (an Orbax tree): layers_10 before layers_2; scan index i is still layer i.
  flat = {f"encoder/layers_{i}/mlp/wo/kernel": np.full((3,), i, np.float32) for i in sorted(range(12), key=str)}
  stacked = layout.from_per_layer(flat, {"encoder": layout.StackLayout(12, scanned=True)})
  np.testing.assert_array_equal(stacked["encoder/layers/mlp/wo/kernel"], np.tile(np.arange(12.0), (3, 1)))
  back = layout.to_per_layer(stacked, {"encoder": layout.StackLayout(12, scanned=True)})
  assert all(np.all(back[f"encoder/layers_{i}/mlp/wo/kernel"] == i) for i in range(12))


def test_distinct_layers_do_not_load_into_one_shared_parameter_set():
  flat = {"encoder/layers_0/mlp/wo/kernel": np.zeros((2, 2)), "encoder/layers_1/mlp/wo/kernel": np.ones((2, 2))}
  shared = {"encoder": layout.StackLayout(2, share=2)}
  with pytest.raises(ValueError, match=r"encoder layers 0 and 1 share parameters .* different weights"):
    layout.from_per_layer(flat, shared)
  flat["encoder/layers_1/mlp/wo/kernel"] = np.zeros((2, 2))  # equal layers: one parameter set holds them
  assert set(layout.from_per_layer(flat, shared)) == {"encoder/layers_0/mlp/wo/kernel"}


def test_match_target_names_unexpected_and_mis_shaped_parameters():
  """A 2-layer checkpoint of other widths must not load into a 1-layer model (its layer 1 dropped, other shapes)."""
  target = {"token_embedder/embedding": np.zeros((8, 4), np.float32),
            "encoder/layers_0/mlp/wo/kernel": np.zeros((6, 4), np.float32)}
  checkpoint = {"token_embedder/embedding": np.zeros((8, 4), np.float32),
                "encoder/layers_0/mlp/wo/kernel": np.zeros((5, 4), np.float32),
                "encoder/layers_1/mlp/wo/kernel": np.zeros((6, 4), np.float32)}
  with pytest.raises(ValueError, match=r"unexpected \(1\): encoder/layers_1/mlp/wo/kernel[\s\S]*shape mismatch \(1\): "
                                       r"encoder/layers_0/mlp/wo/kernel: checkpoint \(5, 4\) vs model \(6, 4\)"):
    layout.match_target(checkpoint, target, "test")


def test_match_target_gives_the_models_dtype():
  # repeat_lm keeps parameters in float32 whatever the checkpoint stored (bfloat16 exports, float16 ones).
  target = {"token_embedder/embedding": np.zeros((8, 4), np.float32)}
  matched = layout.match_target({"token_embedder/embedding": np.ones((8, 4), np.float16)}, target, "test")
  assert matched["token_embedder/embedding"].dtype == np.float32
