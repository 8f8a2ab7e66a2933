"""Dropout and DropPath: measured rates match the configured ones, evaluation is an identity, and the T5 model puts
each configured rate in its place (also under scan, where DropPath rates are scanned inputs)."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repeat_lm.models import layers, moe, regularisation, t5

B, S, T = 4, 8, 6
TINY = t5.T5Config(vocab_size=64, dtype="float32", emb_dim=16, num_heads=2, head_dim=8, num_encoder_layers=2,
                   num_decoder_layers=1, mlp_dim=32)  # 2 encoder layers: enough to see rates grow with depth


def within_sampling_error(measured: float, rate: float, n: int) -> bool:
  return abs(measured - rate) <= 5 * np.sqrt(rate * (1 - rate) / n) + 1e-9  # 5 sigma: flakes ~1 in 10^6


def batch():
  rng = np.random.default_rng(0)
  tokens = lambda n: jnp.asarray(rng.integers(1, TINY.vocab_size, (B, n)), jnp.int32)
  return dict(encoder_input_tokens=tokens(S), decoder_input_tokens=tokens(T), decoder_target_tokens=tokens(T))


@pytest.mark.parametrize("rate,scale", [(0.1, 1.0), (0.5, 1.0), (0.4, 0.5)])
def test_dropout_measured_rate_and_rescale(rate, scale):
  x = jnp.ones((256, 1024), jnp.float32)
  y = np.asarray(regularisation.Dropout(rate).apply({}, x, False, scale, rngs={"dropout": jax.random.key(0)}))
  effective = rate * scale
  assert within_sampling_error(np.mean(y == 0), effective, y.size)
  np.testing.assert_allclose(y[y != 0], 1 / (1 - effective), rtol=1e-6)


def test_dropout_is_identity_at_evaluation_and_at_scale_zero():
  x = jax.random.normal(jax.random.key(1), (64, 128), jnp.bfloat16)
  drop = regularisation.Dropout(0.3)
  rngs = {"dropout": jax.random.key(2)}
  assert drop.apply({}, x, True, rngs=rngs) is x
  # A traced factor of 0 (a staged schedule before its switch) keeps every unit and divides by exactly 1.
  y = jax.jit(lambda s: drop.apply({}, x, False, s, rngs=rngs))(0.0)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


@pytest.mark.parametrize("rate", [1.0, float("nan"), -0.2])
def test_dropout_refuses_a_rate_t5config_refuses(rate):
  # layers.dropout (docs/regularisation.md: what any layer that adds dropout calls) took it: at 1 or NaN every unit
  # came out 0 with NaN gradients, at -0.2 every unit was scaled by 1 / 1.2 (0.833) without a word.
  class Layer(nn.Module):
    @nn.compact
    def __call__(self, x):
      return layers.dropout(x, rate, deterministic=False)

  with pytest.raises(ValueError, match=r"Dropout rate .* must lie in \[0, 1\)"):
    Layer().apply({}, jnp.ones((2, 3)), rngs={"dropout": jax.random.key(0)})


def test_bfloat16_kept_units_are_the_rounded_exact_rescale_and_rate_zero_is_no_op():
  # 1 / (1 - 0.15) = 1.17647 rounds to bfloat16 1.1796875; dividing by a bfloat16-rounded 0.85 (0.8515625) would
  # give 1.171875, a rescale biased 0.4% low at every kept unit.
  x = jnp.ones((8, 128), jnp.bfloat16)
  y = np.asarray(regularisation.Dropout(0.15).apply({}, x, False, rngs={"dropout": jax.random.key(0)}), np.float32)
  assert np.all((y == 0) | (y == float(jnp.asarray(1 / 0.85, jnp.bfloat16))))
  assert regularisation.Dropout(0.0).apply({}, x, False) is x  # no op at all: not even a 'dropout' rng is needed


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_droppath_drops_whole_rows_at_the_measured_rate(rate):
  x = jnp.ones((20_000, 3, 4), jnp.float32)
  y = np.asarray(regularisation.DropPath().apply({}, x, rate, False, rngs={"dropout": jax.random.key(3)}))
  dropped_rows = np.all(y == 0, axis=(1, 2))
  assert np.all(dropped_rows | np.all(y != 0, axis=(1, 2)))  # one decision per row (example)
  assert within_sampling_error(dropped_rows.mean(), rate, len(dropped_rows))
  np.testing.assert_allclose(y[~dropped_rows], 1 / (1 - rate), rtol=1e-6)
  assert regularisation.DropPath().apply({}, x, rate, True) is x


def test_droppath_rates_over_depth():
  np.testing.assert_allclose(regularisation.droppath_rates(0.2, 3, "constant"), [0.2, 0.2, 0.2])
  np.testing.assert_allclose(regularisation.droppath_rates(0.3, 3, "linear"), [0.1, 0.2, 0.3], rtol=1e-6)
  with pytest.raises(ValueError, match="droppath_depth_scaling"):
    regularisation.droppath_rates(0.1, 2, "quadratic")


def test_config_resolves_and_checks_rates():
  cfg = t5.T5Config(dropout_rate=0.1, attention_dropout_rate=0.0, mlp_dropout_rate=0.3)
  assert [cfg.dropout_rate_for(p) for p in t5.DROPOUT_PLACES] == [0.0, 0.1, 0.3, 0.1]
  with pytest.raises(ValueError, match=r"\[0, 1\)"):
    t5.T5Config(hidden_dropout_rate=1.0)
  with pytest.raises(ValueError, match="droppath_depth_scaling"):
    t5.T5Config(droppath_depth_scaling="exponential")


@functools.lru_cache(maxsize=None)
def params_for(scan: bool):
  """Parameters of TINY (the regularisers add none), initialised once per layout."""
  model = t5.Transformer(dataclasses.replace(TINY, scan_layers=scan))
  return jax.jit(lambda key: model.init({"params": key}, **batch(), enable_dropout=False))(jax.random.key(0))["params"]


def record_rates(cfg, params=None, **apply_kwargs):
  """Run the model with dropout on; return {class name: [(module path, effective rate)]} of Dropout and DropPath.

  Rates are read at run time (jax.debug.callback), so traced rates inside a scan are seen as executed.
  """
  calls = {"Dropout": [], "DropPath": []}

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, (regularisation.Dropout, regularisation.DropPath)) and context.method_name == "__call__":
      if isinstance(module, regularisation.Dropout):
        rate = module.rate * jnp.asarray(args[2] if len(args) > 2 else kwargs.get("scale", 1.0))
      else:
        rate = jnp.asarray(args[1])
      entries, path = calls[type(module).__name__], "/".join(module.scope.path)
      # The input rides along so a loop-invariant rate is not hoisted out of the scan (and recorded once more).
      jax.debug.callback(lambda r, _, entries=entries, path=path: entries.append((path, round(float(r), 6))),
                         rate, args[0])
    return next_fun(*args, **kwargs)

  model = t5.Transformer(cfg)
  with nn.intercept_methods(interceptor):
    run = jax.jit(lambda p: model.apply({"params": p}, **batch(), enable_dropout=True,
                                        rngs={"dropout": jax.random.key(1)}, **apply_kwargs))
    jax.block_until_ready(run(params_for(cfg.scan_layers) if params is None else params))
  return calls


@pytest.mark.parametrize("scan", [False, True])
def test_each_place_gets_its_rate_and_droppath_grows_with_depth(scan):
  cfg = dataclasses.replace(TINY, attention_dropout_rate=0.1, hidden_dropout_rate=0.2, mlp_dropout_rate=0.3,
                            droppath_rate=0.4, droppath_depth_scaling="linear", scan_layers=scan)
  calls = record_rates(cfg, dropout_scale=0.5)
  place = lambda path: "attention" if "attention" in path else "mlp" if "/mlp" in path else "hidden"
  by_place = {}
  for path, rate in calls["Dropout"]:
    by_place.setdefault(place(path), set()).add(rate)
  assert by_place == {"attention": {0.05}, "hidden": {0.1}, "mlp": {0.15}}  # rates x the schedule's 0.5
  counts = {p: sum(1 for path, _ in calls["Dropout"] if place(path) == p) for p in by_place}
  # Encoder: embeddings, 2 branches per layer (2 layers), final norm; decoder: embeddings, 3 branches, final norm.
  assert counts == {"hidden": (1 + 2 * 2 + 1) + (1 + 3 + 1), "attention": 2 + 2, "mlp": 2 + 1}

  # DropPath is not scheduled; under scan its per-layer rate is a scanned input. Layer l of L: 0.4 * (l + 1) / L.
  encoder = sorted(r for p, r in calls["DropPath"] if p.startswith("encoder"))
  decoder = sorted(r for p, r in calls["DropPath"] if p.startswith("decoder"))
  assert encoder == [0.2] * 2 + [0.4] * 2  # 2 residual branches per encoder layer
  assert decoder == [0.4] * 3  # one layer, 3 branches



@pytest.mark.parametrize("scan", [False, True])
def test_moe_experts_get_the_expert_rate_and_dense_ffns_the_mlp_rate(scan):
  # docs/regularisation.md: expert dropout (Switch's) on the experts' FFN activations at expert_dropout_rate, the dense
  # FFNs of the same model at mlp_dropout_rate; under scan the stack scans over dense/sparse blocks.
  cfg = dataclasses.replace(TINY, num_decoder_layers=2, moe=moe.MoeConfig(num_experts=4, expert_mlp_dim=16,
                                                                          group_size=16, sparse_every=2),
                            hidden_dropout_rate=0.2, mlp_dropout_rate=0.3, expert_dropout_rate=0.4, scan_layers=scan)
  model = t5.Transformer(cfg)
  params = jax.jit(lambda key: model.init({"params": key}, **batch(), enable_dropout=False))(jax.random.key(0))
  calls = record_rates(cfg, params["params"], dropout_scale=0.5)
  ffn = {}
  for path, rate in calls["Dropout"]:
    if "/mlp" in path:
      ffn.setdefault("expert" if "/experts" in path else "mlp", set()).add(rate)
  assert ffn == {"mlp": {0.15}, "expert": {0.2}}  # rates x the schedule's 0.5, one sparse FFN per stack

def test_regularised_model_is_deterministic_at_evaluation():
  plain = dataclasses.replace(TINY, scan_layers=True)  # the harder layout: DropPath rates are scanned inputs
  regularised = dataclasses.replace(plain, dropout_rate=0.3, droppath_rate=0.2, droppath_depth_scaling="linear")
  apply = lambda cfg: np.asarray(jax.jit(lambda p: t5.Transformer(cfg).apply(
      {"params": p}, **batch(), enable_dropout=False, rngs={"dropout": jax.random.key(1)}))(params_for(True)))
  np.testing.assert_array_equal(apply(regularised), apply(plain))


def test_dropout_can_share_its_mask_along_length_as_t5x():
  # T5X / flaxformer's T5: Dropout(broadcast_dims=(-2,)) for hidden and MLP activations, broadcast_dropout=True
  # for attention weights: one draw per (batch, feature) for every position of the sequence.
  x = jnp.ones((64, 32, 256), jnp.float32)
  y = np.asarray(regularisation.Dropout(0.3, (-2,)).apply({}, x, False, rngs={"dropout": jax.random.key(0)}))
  assert np.all(y == y[:, :1, :])  # one mask for every position
  assert within_sampling_error(np.mean(y[:, 0, :] == 0), 0.3, 64 * 256)
  cfg = dataclasses.replace(TINY, dropout_rate=0.3, dropout_broadcast_length=True)
  masks = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, regularisation.Dropout) and context.method_name == "__call__":
      # (dropped, kept) where the input is non-zero (masked attention weights are 0 either way).
      jax.debug.callback(lambda d, k: masks.append((np.asarray(d), np.asarray(k))), (out == 0) & (args[0] != 0),
                         (out != 0) & (args[0] != 0))
    return out

  with nn.intercept_methods(interceptor):
    jax.block_until_ready(jax.jit(lambda p: t5.Transformer(cfg).apply(
        {"params": p}, **batch(), enable_dropout=True, rngs={"dropout": jax.random.key(1)}))(params_for(False)))
  # hidden, attention, mlp places (as test_each_place_gets_its_rate_and_droppath_grows_with_depth counts them)
  assert len(masks) == 11 + 4 + 3
  for dropped, kept in masks:  # no feature (key) is dropped at one position (query) and kept at another
    assert not np.any(dropped.any(axis=-2) & kept.any(axis=-2))
    assert dropped.any()
