"""MoE layers: routing and its losses against hand computation, capacity, dispatch, scan, expert sharding, training."""

import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repeat_lm import cli
from repeat_lm.models import layers, moe, t5
from repeat_lm.models.encoder_decoder import EncoderDecoderModel
from repeat_lm.train import flops, partitioning

B, S, T = 8, 16, 8  # batch, encoder length, decoder length
MOE = moe.MoeConfig(num_experts=8, expert_mlp_dim=32, group_size=8, train_capacity_factor=1.0,
                    eval_capacity_factor=1.0, router_z_loss_weight=1e-3, sparse_every=2, dispatch="einsum")
TINY = t5.T5Config(vocab_size=64, dtype="float32", emb_dim=16, num_heads=2, head_dim=8, num_encoder_layers=4,
                   num_decoder_layers=2, mlp_dim=32, moe=MOE)


def make_batch(seed: int = 0) -> dict[str, jnp.ndarray]:
  rng = np.random.default_rng(seed)
  enc = rng.integers(1, TINY.vocab_size, (B, S))
  dec = rng.integers(1, TINY.vocab_size, (B, T))
  enc[:, S - 3:] = 0  # some padding, which must take no expert capacity
  dec[:2, T - 2:] = 0
  dec_in = np.concatenate([np.zeros((B, 1), int), dec[:, :-1]], axis=1)
  return dict(encoder_input_tokens=jnp.asarray(enc, jnp.int32), decoder_input_tokens=jnp.asarray(dec_in, jnp.int32),
              decoder_target_tokens=jnp.asarray(dec, jnp.int32))


@functools.cache
def init_params(cfg: t5.T5Config):
  return jax.jit(lambda key: EncoderDecoderModel(t5.Transformer(cfg)).init(key, make_batch()))(jax.random.key(0))


@functools.cache
def loss_fn(cfg: t5.T5Config):
  """Jitted (loss, metric sums) without dropout, shared by the tests that use the same config."""
  model = EncoderDecoderModel(t5.Transformer(cfg))
  return jax.jit(lambda params, batch: model.loss_and_metrics(params, batch))


# ---- routing, by hand ----

def test_load_balancing_and_z_loss_equal_their_formulas_by_hand():
  # Router logits of 4 real tokens over 2 experts, plus one padding token that must not count.
  l3, l4 = np.log(3.0), np.log(4.0)
  logits = jnp.asarray([[[l3, 0.0], [l3, 0.0], [l3, 0.0], [0.0, l4], [9.0, 0.0]]], jnp.float32)
  valid = jnp.asarray([[True, True, True, True, False]])
  r = moe.route_tokens(logits, valid, num_selected=1, capacity=8)
  # probabilities: [.75, .25] x 3 and [.2, .8]; top-1 experts 0, 0, 0, 1.
  fraction = np.array([3 / 4, 1 / 4])
  mean_prob = np.array([(3 * 0.75 + 0.2) / 4, (3 * 0.25 + 0.8) / 4])
  np.testing.assert_allclose(r.stats["load_balancing_loss"], 2 * np.sum(fraction * mean_prob), rtol=1e-6)
  np.testing.assert_allclose(r.stats["load_balancing_loss"], 1.1125, rtol=1e-6)
  np.testing.assert_allclose(r.stats["router_z_loss"], (3 * np.log(4.0) ** 2 + np.log(5.0) ** 2) / 4, rtol=1e-6)
  np.testing.assert_allclose(r.stats["router_confidence"], (3 * 0.75 + 0.8) / 4, rtol=1e-6)
  np.testing.assert_allclose([r.stats["expert_usage_min"], r.stats["expert_usage_max"]], [0.5, 1.5], rtol=1e-6)
  assert float(r.stats["fraction_dropped"]) == 0.0
  # Top-1 with nothing dropped: flaxformer's two statistics equal the two above.
  assert float(r.stats["fraction_left_behind"]) == 0.0
  np.testing.assert_allclose(r.stats["kept_router_confidence"], r.stats["router_confidence"], rtol=1e-6)
  np.testing.assert_array_equal(r.kept_GxSxK[0, :, 0], [True, True, True, True, False])


def test_load_balancing_loss_is_per_group_as_capacity_is():
  # Two groups of 4 tokens over 2 experts: group 0 sends every token to expert 0 (p = .9), group 1 to expert 1. Pooled
  # over groups that looks balanced (1.0, no gradient) though capacity 2 drops half the tokens; per group (Switch,
  # flaxformer) each group is fully imbalanced: 2 x (1 x .9 + 0 x .1) = 1.8.
  logits = np.zeros((2, 4, 2), np.float32)
  logits[0, :, 0] = logits[1, :, 1] = np.log(9.0)
  route = lambda x: moe.route_tokens(x, jnp.ones((2, 4), bool), num_selected=1, capacity=2)  # noqa: E731
  r = route(jnp.asarray(logits))
  np.testing.assert_allclose(r.stats["fraction_dropped"], 0.5)
  np.testing.assert_allclose(r.stats["load_balancing_loss"], 1.8, rtol=1e-6)
  grad = jax.grad(lambda x: route(x).stats["load_balancing_loss"])(jnp.asarray(logits))
  assert float(grad[0, 0, 0]) > 1e-3  # pushes group 0 away from expert 0
  # Groups weigh by their real tokens: group 1's two real tokens pick one expert each (balanced: 1.0), so the loss is
  # (4 x 1.8 + 2 x 1.0) / 6 (the unweighted mean would be 1.4, the pooled value 1.356).
  logits[1, 0] = [np.log(9.0), 0.0]
  valid = jnp.asarray([[True] * 4, [True, True, False, False]])
  r = moe.route_tokens(jnp.asarray(logits), valid, num_selected=1, capacity=2)
  np.testing.assert_allclose(r.stats["load_balancing_loss"], (4 * 1.8 + 2 * 1.0) / 6, rtol=1e-6)


def test_capacity_overflow_drops_exactly_the_later_tokens():
  # 6 tokens, 2 experts of capacity 2: tokens 0, 1, 2, 4 prefer expert 0, tokens 3, 5 expert 1.
  prefer = np.array([0, 0, 0, 1, 0, 1])
  confidence = np.array([1.0, 2.0, 3.0, 1.0, 4.0, 2.0])
  logits = np.zeros((1, 6, 2), np.float32)
  logits[0, np.arange(6), prefer] = confidence
  r = moe.route_tokens(jnp.asarray(logits), jnp.ones((1, 6), bool), num_selected=1, capacity=2)
  # In token order expert 0 takes tokens 0 and 1; tokens 2 and 4 overflow. Expert 1 takes 3 and 5.
  np.testing.assert_array_equal(r.kept_GxSxK[0, :, 0], [True, True, False, True, False, True])
  np.testing.assert_array_equal(r.position_GxSxK[0, :, 0][np.array([0, 1, 3, 5])], [0, 1, 0, 1])
  np.testing.assert_allclose(r.stats["fraction_dropped"], 2 / 6)
  np.testing.assert_array_equal(r.gate_GxSxK[0, [2, 4], 0], [0.0, 0.0])

  # Padding takes no slot wherever it lies: a group spans rows, so one row's padding precedes the next row's tokens.
  # Tokens 1 and 4 are expert 0's only real ones and both fit, though padding 0 and 2 chose it before them.
  valid = jnp.asarray([[False, True, False, True, True, True]])
  padded = moe.route_tokens(jnp.asarray(logits), valid, num_selected=1, capacity=2)
  np.testing.assert_array_equal(padded.kept_GxSxK[0, :, 0], [False, True, False, True, True, True])
  np.testing.assert_array_equal(padded.position_GxSxK[0, [1, 3, 4, 5], 0], [0, 0, 1, 1])
  assert float(padded.stats["fraction_dropped"]) == 0.0

  # Batch-prioritised routing: the most confident tokens of expert 0 (4 and 2) win its slots instead.
  bpr = moe.route_tokens(jnp.asarray(logits), jnp.ones((1, 6), bool), num_selected=1, capacity=2,
                         batch_prioritized=True)
  np.testing.assert_array_equal(bpr.kept_GxSxK[0, :, 0], [False, False, True, True, True, True])

  # Top-2, capacity 3: every first choice is placed before any second choice. Expert 0 is full after its first
  # choices (0, 1, 2; 4 overflows); expert 1 has one slot left after 3 and 5, taken by token 0's second choice.
  top2 = moe.route_tokens(jnp.asarray(logits), jnp.ones((1, 6), bool), num_selected=2, capacity=3)
  np.testing.assert_array_equal(top2.kept_GxSxK[0, :, 0], [True, True, True, True, False, True])
  np.testing.assert_array_equal(top2.kept_GxSxK[0, :, 1], [True, False, False, False, False, False])
  np.testing.assert_allclose(top2.stats["fraction_dropped"], 1 - 6 / 12)
  # flaxformer's (T5X's) definitions: only token 4 reached no expert; the kept assignments' mean router probability.
  np.testing.assert_allclose(top2.stats["fraction_left_behind"], 1 / 6, rtol=1e-6)
  probs = np.exp(logits[0]) / np.exp(logits[0]).sum(-1, keepdims=True)
  kept_probs = np.sort(probs, axis=-1)[:, ::-1][np.asarray(top2.kept_GxSxK[0])]
  np.testing.assert_allclose(top2.stats["kept_router_confidence"], kept_probs.mean(), rtol=1e-6)
  np.testing.assert_allclose(top2.stats["kept_router_confidence"], 0.7409, atol=1e-4)


def test_group_count_and_capacity():
  assert moe.num_groups(128, 8) == 16
  assert moe.num_groups(64, 100, min_groups=8) == 8  # every batch shard holds whole groups
  assert moe.num_groups(96, 40, min_groups=2) == 4  # 3 groups would not split over 2 shards
  assert moe.expert_capacity(8192, 128, 1.25, 4) == 80
  assert moe.expert_capacity(64, 128, 1.25, 4) == 4  # the minimum
  assert moe.expert_capacity(2, 128, 1.25, 4) == 2  # never more slots than tokens


# ---- the MoE block ----

class _Both(nn.Module):
  """A dense MlpBlock and an MoeBlock side by side, for copying weights between them."""
  cfg: moe.MoeConfig

  @nn.compact
  def __call__(self, x, deterministic=True):
    dense = layers.MlpBlock(self.cfg.expert_mlp_dim, self.cfg.expert_activations, name="dense")(x, deterministic)
    sparse, stats = moe.MoeBlock(self.cfg, name="sparse")(x, None, deterministic)
    return dense, sparse, stats


@pytest.mark.parametrize("dispatch, top_k", [("einsum", 1), ("gather", 2)])  # both agree: see the next test
def test_identical_experts_equal_the_dense_ffn_scaled_by_the_gate(dispatch, top_k):
  cfg = moe.MoeConfig(num_experts=4, expert_mlp_dim=24, expert_activations=("gelu", "linear"), group_size=16,
                      num_selected_experts=top_k, eval_capacity_factor=4.0 * top_k, dispatch=dispatch)
  x = jax.random.normal(jax.random.key(1), (2, 16, 8))
  params = _Both(cfg).init(jax.random.key(0), x)["params"]
  params["sparse"]["router"] = 0.3 * jax.random.normal(jax.random.key(2), params["sparse"]["router"].shape)
  for name in ("wi_0", "wi_1", "wo"):  # every expert gets the dense block's weights
    params["sparse"]["experts"][name] = jnp.broadcast_to(params["dense"][name]["kernel"],
                                                         params["sparse"]["experts"][name].shape)
  dense, sparse, stats = _Both(cfg).apply({"params": params}, x)
  probs = jax.nn.softmax(x @ params["sparse"]["router"])
  gate = jnp.sum(jax.lax.top_k(probs, top_k)[0], axis=-1, keepdims=True)  # Switch: no renormalisation
  assert float(stats["fraction_dropped"]) == 0.0  # capacity = tokens per group: nothing overflows
  np.testing.assert_allclose(sparse, gate * dense, atol=1e-5, rtol=1e-5)


def test_router_jitter_only_in_training():
  """Switch's jitter (MoeConfig.jitter_noise): router inputs x U(1 - eps, 1 + eps) when training, never at eval."""
  cfg = moe.MoeConfig(num_experts=4, expert_mlp_dim=16, group_size=16, train_capacity_factor=4.0,
                      eval_capacity_factor=4.0)
  x = jax.random.normal(jax.random.key(1), (2, 16, 8))
  params = moe.MoeBlock(cfg).init(jax.random.key(0), x, None, True)["params"]
  rngs = {"dropout": jax.random.key(3)}

  def run(jitter, deterministic):
    block = moe.MoeBlock(dataclasses.replace(cfg, jitter_noise=jitter))
    return block.apply({"params": params}, x, None, deterministic, rngs=rngs)[1]["router_confidence"]

  assert float(run(0.5, True)) == float(run(0.0, True))  # evaluation: no noise
  assert float(run(0.5, False)) != float(run(0.0, False))  # training: the router sees jittered inputs


def test_dispatch_methods_agree_under_overflow():
  cfg = moe.MoeConfig(num_experts=4, expert_mlp_dim=16, group_size=16, eval_capacity_factor=0.5, min_expert_capacity=1,
                      num_selected_experts=2)
  x = jax.random.normal(jax.random.key(1), (2, 16, 8))
  params = moe.MoeBlock(cfg).init(jax.random.key(0), x, None, True)["params"]
  params["router"] *= 50.0  # confident, unbalanced routing: many tokens overflow

  def run(method, p):
    y, stats = moe.MoeBlock(dataclasses.replace(cfg, dispatch=method)).apply({"params": p}, x, None, True)
    return jnp.sum(jnp.sin(y)), (y, stats)

  (_, (y_e, stats_e)), grads_e = jax.value_and_grad(lambda p: run("einsum", p), has_aux=True)(params)
  (_, (y_g, stats_g)), grads_g = jax.value_and_grad(lambda p: run("gather", p), has_aux=True)(params)
  assert float(stats_e["fraction_dropped"]) > 0.2
  np.testing.assert_allclose(y_g, y_e, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads_g, grads_e)
  jax.tree.map(np.testing.assert_allclose, stats_g, stats_e)


# ---- in the T5 stack ----

def stack_blocks(params: dict, block: int) -> dict:
  """Unscanned layers_{i} -> scanned 'layers' of blocks: layers/layers_{j} stacks layers j, j + block, ..."""
  out = dict(params)
  for stack_name in ("encoder", "decoder"):
    stack_params = params[stack_name]
    n = sum(k.startswith("layers_") for k in stack_params)
    blocks = {f"layers_{j}": jax.tree.map(lambda *xs: jnp.stack(xs, axis=t5.PARAM_SCAN_AXIS),
                                          *[stack_params[f"layers_{i}"] for i in range(j, n, block)])
              for j in range(block)}
    out[stack_name] = {k: v for k, v in stack_params.items() if not k.startswith("layers_")} | {"layers": blocks}
  return out


def test_sparse_layers_and_flops():
  params = init_params(TINY)["params"]
  assert "router" in params["encoder"]["layers_1"]["mlp"] and "router" in params["encoder"]["layers_3"]["mlp"]
  assert "wi_0" in params["encoder"]["layers_0"]["mlp"] and "router" in params["decoder"]["layers_1"]["mlp"]
  assert moe.sparse_layer_flags(4, dataclasses.replace(MOE, sparse_first=True)) == (True, False, True, False)
  # A sparse layer's FFN term is the router plus K experts (reference section 6).
  dense = dataclasses.replace(TINY, moe=None)
  d, e, f = TINY.emb_dim, MOE.num_experts, MOE.expert_mlp_dim
  sparse_minus_dense = (2 * d * e + 2 * 2 * d * f) - 2 * 3 * d * TINY.mlp_dim  # relu experts vs gated dense FFN
  assert (flops.forward_flops_per_sequence(TINY, S, T) - flops.forward_flops_per_sequence(dense, S, T) ==
          (2 * S + 1 * T) * sparse_minus_dense)


def test_scan_equals_no_scan_including_aux_losses():
  batch = make_batch()
  params = init_params(TINY)["params"]
  scan_cfg = dataclasses.replace(TINY, scan_layers=True)
  stacked = stack_blocks(params, MOE.sparse_every)
  expected_shapes = jax.eval_shape(lambda: init_params(scan_cfg))["params"]
  assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(jnp.shape, expected_shapes)
  loss, metrics = loss_fn(TINY)(params, batch)
  scan_loss, scan_metrics = loss_fn(scan_cfg)(stacked, batch)
  assert float(metrics["moe_load_balancing_loss_sum"]) > 0 and float(metrics["moe_router_z_loss_sum"]) > 0
  np.testing.assert_allclose(scan_loss, loss, rtol=1e-5)
  for k in metrics:
    np.testing.assert_allclose(scan_metrics[k], metrics[k], rtol=1e-5, atol=1e-6, err_msg=k)
  # The auxiliary losses are part of the loss: without them it is the plain cross-entropy.
  means = {k[len("moe_"):-len("_sum")]: v / metrics["weight_sum"] for k, v in metrics.items() if k.startswith("moe_")}
  np.testing.assert_allclose(loss - metrics["loss_sum"] / metrics["weight_sum"],
                             0.01 * means["load_balancing_loss"] + 1e-3 * means["router_z_loss"], rtol=1e-4)


@pytest.mark.parametrize("dispatch", ["einsum", "gather"])
def test_expert_sharded_equals_unsharded(dispatch):
  cfg = dataclasses.replace(TINY, moe=dataclasses.replace(MOE, dispatch=dispatch))
  batch = make_batch()
  variables = init_params(TINY)
  expected = loss_fn(cfg)(variables["params"], batch)

  # Experts over 4 of the 8 devices ('expert' axis), the batch over all 8 (data x expert).
  partitioner = partitioning.Partitioner(data_parallel=2, model_parallel=1, expert_parallel=4)
  shardings = partitioner.tree_shardings(partitioning.params_logical_axes(variables["params_axes"]))
  params = jax.device_put(variables["params"], shardings)
  wi = params["encoder"]["layers_1"]["mlp"]["experts"]["wi"]
  assert wi.sharding.spec[0] == "expert" and len(wi.addressable_shards[0].data) == MOE.num_experts // 4
  batch = jax.device_put(batch, partitioner.batch_sharding())
  assert partitioner.batch_shards == 8
  with partitioner.activate():
    actual = loss_fn(cfg)(params, batch)
  assert float(expected[1]["moe_fraction_dropped_sum"]) > 0  # capacity binds, so grouping must match exactly
  jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6), actual, expected)


@pytest.mark.slow
def test_tiny_moe_trains_through_the_cli_with_routing_metrics(tmp_path):
  model_dir = tmp_path / "run"
  code = cli.main(["train", "--gin_file=gin/runs/smoke.gin", "--gin_file=gin/models/switch_tiny.gin",
                   f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=8", "--gin.BATCH_SIZE=8",
                   "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}", "--gin.trainer.train.log_period=1",
                   "--gin.trainer.train.eval_period=8", "--gin.DATA_PARALLEL=2", "--gin.EXPERT_PARALLEL=2",
                   "--gin.MODEL_PARALLEL=2", "--gin.optim.make_schedule.warmup_steps=2"])
  assert code == 0
  records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in records if "train/loss" in r]
  for key in ("train/moe_load_balancing_loss", "train/moe_router_z_loss", "train/moe_fraction_dropped",
              "train/moe_fraction_left_behind", "train/moe_router_confidence", "train/moe_kept_router_confidence",
              "train/moe_expert_usage_min", "train/moe_expert_usage_max"):
    assert all(np.isfinite(r[key]) for r in train), key
  assert 0.9 < train[-1]["train/moe_load_balancing_loss"] < 4.0  # 1 = perfectly balanced, E = 4 at worst
  assert train[-1]["train/loss"] < train[0]["train/loss"] - 0.5
  assert any("eval/moe_fraction_dropped" in r for r in records)
  assert "moe.MoeConfig" in (model_dir / "config.gin").read_text()


@pytest.mark.parametrize("kwargs,match", [({"group_size": 0}, "group_size=0 must be >= 1"),
                                          ({"group_size": 4096.0}, "group_size=4096.0 must be >= 1, a whole number"),
                                          ({"sparse_every": 2.0}, "sparse_every=2.0 must be >= 1, a whole number"),
                                          ({"num_selected_experts": 1.0}, "num_selected_experts=1.0 must be a whole"),
                                          ({"train_capacity_factor": 0.0}, "capacity factors must be positive"),
                                          # Passed `<= 0`; training failed: "cannot convert float NaN to integer".
                                          ({"train_capacity_factor": float("nan")}, "finite, got train nan"),
                                          ({"eval_capacity_factor": float("inf")}, "finite, got .* eval inf")])
def test_moe_config_rejects_empty_groups_and_capacity(kwargs, match):
  with pytest.raises(ValueError, match=match):
    moe.MoeConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [({"expert_mlp_dim": 0}, "expert_mlp_dim"),
                                          ({"num_experts": 2.5, "num_selected_experts": 1}, "num_experts"),
                                          ({"expert_activations": ()}, "expert_activations"),
                                          ({"expert_activations": ("swish",)}, "expert_activations"),
                                          ({"min_expert_capacity": 0}, "min_expert_capacity"),
                                          ({"jitter_noise": 1.5}, "jitter_noise")])
def test_moe_config_rejects_impossible_experts(kwargs, match):
  """Each used to pass the config and fail (or, for jitter >= 1, flip router inputs' sign) only inside the model."""
  with pytest.raises(ValueError, match=match):
    moe.MoeConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [{"router_z_loss_weight": True}, {"load_balancing_loss_weight": -0.01},
                                    {"load_balancing_loss_weight": float("nan")}, {"router_z_loss_weight": "1e-4"}])
def test_moe_config_refuses_a_loss_weight_that_is_not_a_finite_number_at_least_zero(kwargs):
  """All were accepted: True (meant as "on") weighted the z-loss 1.0, -0.01 rewarded unbalanced routing, NaN made
  every loss NaN, and the string failed only at the first training step."""
  with pytest.raises(ValueError, match="MoeConfig loss weights"):
    moe.MoeConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [({"sparse_first": "False"}, "True or False .no quotes.: {'sparse_first'"),
                                          ({"batch_prioritized_routing": 1}, "True or False .no quotes."),
                                          ({"jitter_noise": "0.01"}, "jitter_noise='0.01' must lie in .0, 1., a"),
                                          ({"jitter_noise": True}, "jitter_noise=True must lie in .0, 1., a number"),
                                          ({"train_capacity_factor": "1.25"}, "capacity factors must be positive"),
                                          ({"eval_capacity_factor": True}, "capacity factors must be positive")])
def test_moe_config_refuses_settings_of_the_wrong_type(kwargs, match):
  """sparse_first='False' (a gin string, truthy) made the first FFN of each k sparse and True passed as a capacity
  factor of 1, silently; the strings failed in a comparison with a bare TypeError."""
  with pytest.raises(ValueError, match=match):
    moe.MoeConfig(**kwargs)
  assert moe.MoeConfig(sparse_first=np.bool_(True), jitter_noise=0, eval_capacity_factor=np.float32(2.0))


def test_t5x_names_carry_flaxformer_definitions():
  """t5x.contrib.moe logs the sown leaves as experts/<name>; each must be flaxformer's statistic of that name."""
  summed = {name: jnp.asarray(float(i + 1)) for i, name in enumerate(moe.STAT_NAMES)}
  summed["num_sparse_layers"] = jnp.asarray(2.0)

  class Stack(nn.Module):
    def __call__(self):
      moe.sow_stats(self, summed)

  _, state = Stack().apply({}, mutable=["intermediates"])
  sown = {k: float(v[0]) for k, v in state["intermediates"].items() if k != moe.SOW_NAME}
  means = {k: float(v) / 2 for k, v in summed.items()}
  assert sown == {"auxiliary_loss": means["load_balancing_loss"], "router_z_loss": means["router_z_loss"],
                  "fraction_tokens_left_behind": means["fraction_left_behind"],
                  "router_confidence": means["kept_router_confidence"], "expert_usage": means["expert_usage_min"]}


def test_decoder_padding_takes_no_routing_part():
  """Decoder positions whose target is padding are no tokens: the router must not see them, as the encoder's padding
  (moe.py). Unpacked, causality alone hides them from the real positions, so only the decoder's padding mask keeps
  them out of the routing; changing their input tokens must change no loss or routing statistic."""
  batch, params = make_batch(), init_params(TINY)["params"]
  padding = np.asarray(batch["decoder_target_tokens"]) == 0
  assert padding.any()
  other = dict(batch, decoder_input_tokens=jnp.where(padding, 7, batch["decoder_input_tokens"]))
  (loss, metrics), (other_loss, other_metrics) = loss_fn(TINY)(params, batch), loss_fn(TINY)(params, other)
  np.testing.assert_allclose(other_loss, loss, rtol=1e-6)
  for k in metrics:
    np.testing.assert_allclose(other_metrics[k], metrics[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_batch_prioritized_routing_keeps_the_decoder_causal():
  """batch_prioritized_routing reorders by router confidence in the encoder only (moe.MoeConfig): in the decoder a
  later token could take an earlier one's expert slot, so a position's logits would depend on the tokens after it.
  One expert slot per group (a decoder row here) makes the overflow that would show it."""
  moe_cfg = dataclasses.replace(MOE, batch_prioritized_routing=True, min_expert_capacity=1, eval_capacity_factor=0.5)
  cfg = dataclasses.replace(TINY, moe=moe_cfg)
  batch, params = make_batch(), init_params(TINY)["params"]
  apply = jax.jit(lambda b: t5.Transformer(cfg).apply({"params": params}, **b, enable_dropout=False))
  t = T // 2  # change every decoder input from position t on
  later = np.asarray(batch["decoder_input_tokens"]).copy()
  later[:, t:] = (later[:, t:] + 1) % TINY.vocab_size + (later[:, t:] == TINY.vocab_size - 1)
  logits, other = apply(batch), apply(dict(batch, decoder_input_tokens=jnp.asarray(later)))
  np.testing.assert_allclose(other[:, :t], logits[:, :t], rtol=1e-6, atol=1e-6)
  # ... and in the encoder the option takes effect: by confidence, not position, the kept tokens change.
  plain = jax.jit(lambda b: t5.Transformer(dataclasses.replace(cfg, moe=dataclasses.replace(
      moe_cfg, batch_prioritized_routing=False))).apply({"params": params}, **b, enable_dropout=False))(batch)
  assert np.abs(np.asarray(plain) - np.asarray(logits)).max() > 1e-4


def _reference_routing(probs, valid, k, capacity, batch_prioritized):
  """Plain-loop token-choice routing: (experts, kept, gates) for one group of router probabilities [S, E]."""
  group_len, num_experts = probs.shape
  experts = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
  kept, gates, filled = np.zeros((group_len, k), bool), np.zeros((group_len, k)), np.zeros(num_experts, int)
  order = sorted(range(group_len), key=lambda s: -probs[s].max()) if batch_prioritized else range(group_len)
  for choice in range(k):  # every first choice before any second choice
    for s in order:
      if valid[s]:
        e = experts[s, choice]
        kept[s, choice], gates[s, choice] = filled[e] < capacity, probs[s, e] if filled[e] < capacity else 0.0
        filled[e] += 1
  return experts, kept, gates


def test_routing_equals_a_plain_loop_reference_on_random_inputs():
  """Random groups, padding, K, capacities and batch-prioritised order: slots, gates and both losses match loops."""
  rng = np.random.default_rng(0)
  for _ in range(6):  # each new shape compiles (~2 s a case on the CI host): few cases keep it quick
    groups, group_len, num_experts = rng.integers(1, 4), rng.integers(1, 10), rng.integers(2, 6)
    k, capacity = int(rng.integers(1, min(num_experts, 3) + 1)), int(rng.integers(1, group_len + 1))
    bpr = bool(rng.integers(2))
    logits = (2 * rng.normal(size=(groups, group_len, num_experts))).astype(np.float32)
    valid = rng.random((groups, group_len)) < 0.8
    valid[0, 0] = True
    r = moe.route_tokens(jnp.asarray(logits), jnp.asarray(valid), num_selected=k, capacity=capacity,
                         batch_prioritized=bpr)
    probs = np.exp(logits.astype(np.float64))
    probs /= probs.sum(-1, keepdims=True)
    balance = 0.0
    for g in range(groups):
      experts, kept, gates = _reference_routing(probs[g], valid[g], k, capacity, bpr)
      np.testing.assert_array_equal(r.expert_GxSxK[g], experts)
      np.testing.assert_array_equal(r.kept_GxSxK[g], kept)
      np.testing.assert_allclose(r.gate_GxSxK[g], gates, rtol=1e-5, atol=1e-7)
      n = valid[g].sum()
      if n:
        fraction = np.bincount(experts[valid[g]].ravel(), minlength=num_experts) / n
        balance += n * num_experts * np.sum(fraction * probs[g][valid[g]].mean(0))
    np.testing.assert_allclose(r.stats["load_balancing_loss"], balance / valid.sum(), rtol=1e-5)
    log_z = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    np.testing.assert_allclose(r.stats["router_z_loss"], (log_z ** 2)[valid].mean(), rtol=1e-5)
