"""Schedules and optimizer construction."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from repeat_lm.train import optim


def test_rsqrt_schedule_is_t5s():
  s = optim.make_schedule()  # constant 1.0 * rsqrt_decay, 10k warm-up.
  assert float(s(0)) == pytest.approx(0.01)
  assert float(s(10_000)) == pytest.approx(0.01)
  assert float(s(40_000)) == pytest.approx(0.005)


def test_warmup_and_cosine():
  s = optim.make_schedule("constant * linear_warmup * cosine_decay", base_learning_rate=2.0, warmup_steps=10,
                          total_steps=110)
  assert float(s(5)) == pytest.approx(1.0)
  assert float(s(10)) == pytest.approx(2.0)
  assert float(s(60)) == pytest.approx(1.0, abs=1e-5)
  assert float(s(110)) == pytest.approx(0.0, abs=1e-6)


def test_linear_warmup_of_zero_steps_gives_the_full_rate_from_step_0():
  # No warm-up: step 0 (the first update) gets the full rate, as every later step; a factor of 0 / 1 wasted it.
  for factors in ("constant * linear_warmup", "constant * linear_warmup * cosine_decay"):
    s = optim.make_schedule(factors, base_learning_rate=2.0, warmup_steps=0, total_steps=100)
    assert float(s(0)) == pytest.approx(2.0)
    assert float(s(1)) == pytest.approx(2.0 if "cosine" not in factors else (1 + np.cos(np.pi / 100)), abs=1e-5)


def test_bad_schedule_names_the_problem():
  with pytest.raises(ValueError, match="Unknown learning-rate factor"):
    optim.make_schedule("constant * exponential")
  with pytest.raises(ValueError, match="total_steps"):
    optim.make_schedule("constant * cosine_decay")


def test_decay_that_would_end_before_warm_up_ends_is_refused():
  # The default 10k warm-up under a 5k-step cosine run held the rate constant at its base for every step.
  for factors in ("constant * cosine_decay", "constant * linear_warmup * linear_decay"):
    with pytest.raises(ValueError, match="warmup_steps"):
      optim.make_schedule(factors, total_steps=5000)
    with pytest.raises(ValueError, match="warmup_steps"):
      optim.make_schedule(factors, warmup_steps=1000, total_steps=1000)
  optim.make_schedule("constant * cosine_decay", warmup_steps=1000, total_steps=1001)


@pytest.mark.parametrize("name", ["adafactor", "adamw"])
def test_optimizers_reduce_a_quadratic(name):
  tx = optim.make_optimizer(name, learning_rate=0.1 if name == "adamw" else 0.5)
  params = {"w": jnp.full((4, 256), 3.0)}
  state = tx.init(params)
  loss = lambda p: jnp.sum((p["w"] - 1.0) ** 2)
  start = float(loss(params))
  for _ in range(20):
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert float(loss(params)) < start * 0.5


def test_adafactor_factors_large_matrices():
  tx = optim.make_optimizer("adafactor", learning_rate=0.01)
  state = tx.init({"w": jnp.zeros((256, 512))})
  shapes = {tuple(np.shape(x)) for x in jax.tree.leaves(state)}
  assert (256,) in shapes and (512,) in shapes and (256, 512) not in shapes


def test_unknown_optimizer():
  with pytest.raises(ValueError, match="adafactor"):
    optim.make_optimizer("sgd")


def test_linear_and_cosine_decay_end_at_the_given_fraction():
  # From 1 at the end of warm-up (step 10) to end_learning_rate_fraction (0.1) at total_steps (110), then flat:
  # linear halfway 0.1 + 0.9 * 0.5 = 0.55; cosine halfway the same, a quarter in 0.1 + 0.9 * (1 + cos(pi / 4)) / 2.
  kwargs = dict(base_learning_rate=2.0, warmup_steps=10, total_steps=110, end_learning_rate_fraction=0.1)
  linear = optim.make_schedule("constant * linear_decay", **kwargs)
  cosine = optim.make_schedule("constant * cosine_decay", **kwargs)
  for s in (linear, cosine):
    assert [float(s(t)) for t in (0, 10, 60, 110, 500)] == pytest.approx([2.0, 2.0, 1.1, 0.2, 0.2], abs=1e-5)
  assert float(linear(35)) == pytest.approx(2 * (0.1 + 0.9 * 0.75), abs=1e-5)
  assert float(cosine(35)) == pytest.approx(2 * (0.1 + 0.9 * (1 + np.cos(np.pi / 4)) / 2), abs=1e-5)


@pytest.mark.parametrize("kwargs", [{"weight_decay": -0.5}, {"weight_decay": float("nan")},
                                    {"clip_gradient_norm": -1.0}, {"learning_rate": -0.1},
                                    # Strings built the optimizer and failed at its first update with a TypeError.
                                    {"learning_rate": "1e-3"}, {"weight_decay": "0.1"}, {"clip_gradient_norm": "1.0"}])
def test_optimizer_settings_that_flip_or_poison_a_step_are_refused(kwargs):
  """WEIGHT_DECAY=-0.5 grew Adafactor's weights by half of themselves at a zero gradient, clip_gradient_norm=-1 turned
  AdamW's first step from -0.1 into +0.1 (gradient ascent), NaN made every parameter NaN; all without an error."""
  with pytest.raises(ValueError, match="must be a finite number >= 0"):
    optim.make_optimizer("adafactor", **{"learning_rate": 0.1, **kwargs})


@pytest.mark.parametrize("kwargs", [{"base_learning_rate": -1.0}, {"base_learning_rate": float("nan")},
                                    {"end_learning_rate_fraction": -1.0}, {"warmup_steps": -100},
                                    {"warmup_steps": float("nan")}, {"warmup_steps": 0.5}, {"total_steps": 1000.5}])
def test_schedule_settings_that_are_not_rates_or_counts_are_refused(kwargs):
  # A base rate of -1 gave -0.01 at every step; a cosine to -1 ended at -1; a warm-up of -100 began decaying before
  # step 0; NaN gave NaN rates.
  with pytest.raises(ValueError, match="must be a"):
    optim.make_schedule("constant * linear_warmup * cosine_decay", **{"total_steps": 1000, **kwargs})


def test_gradient_norm_clipping_clips_the_gradients_not_the_updates():
  # AdamW's first update is -lr * g / (|g| + eps) per element whatever g's scale: clipping the gradient to norm 1e-3
  # leaves it at lr, clipping the update would shrink it to norm 1e-3.
  tx = optim.make_optimizer("adamw", learning_rate=0.1, clip_gradient_norm=1e-3, eps=1e-12)
  params = {"w": jnp.zeros(4)}
  updates, _ = tx.update({"w": jnp.array([3.0, -4.0, 5.0, -6.0])}, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], [-0.1, 0.1, -0.1, 0.1], rtol=1e-4)


def test_rsqrt_decay_without_warm_up_starts_at_the_base_rate():
  # 1 / sqrt(max(step, 1)): the first update (step 0) at the base rate, not 1 / sqrt(0) = inf.
  s = optim.make_schedule("constant * rsqrt_decay", base_learning_rate=2.0, warmup_steps=0)
  assert [float(s(t)) for t in (0, 1, 4, 100)] == pytest.approx([2.0, 2.0, 1.0, 0.2])


def test_adamw_second_update_is_the_bias_corrected_adam_formula():
  # Kingma & Ba by hand: m_t = b1 m + (1 - b1) g, v_t = b2 v + (1 - b2) g^2, update -lr m_t / (1 - b1^t) /
  # (sqrt(v_t / (1 - b2^t)) + eps). The first update is lr * sign(g) whatever b1 and b2; the second tells them apart,
  # and its gradients of norm 6 and 60 would be rescaled by any gradient clipping (none by default).
  b1, b2, lr = 0.9, 0.999, 0.1
  tx = optim.make_optimizer("adamw", learning_rate=lr)
  params = {"w": jnp.zeros(4)}
  g1, g2 = np.array([3.0, -3.0, 3.0, 3.0]), np.array([30.0, 30.0, -30.0, 30.0])
  state = tx.init(params)
  for g in (g1, g2):
    updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
  m = b1 * (1 - b1) * g1 + (1 - b1) * g2
  v = b2 * (1 - b2) * g1**2 + (1 - b2) * g2**2
  expected = -lr * (m / (1 - b1**2)) / (np.sqrt(v / (1 - b2**2)) + 1e-8)
  np.testing.assert_allclose(updates["w"], expected, rtol=1e-4)  # float32 bias corrections


def test_adafactor_decay_rate_sets_the_second_moment_decay():
  # Adafactor's beta2 at update t (from 1) is 1 - t^-c: after two updates of a (too small to factor) vector
  # v = (1 - 2^-c) g1^2 + 2^-c g2^2 (+ epsilon 1e-30), with c = adafactor_decay_rate.
  c = 0.5
  tx = optim.make_optimizer("adafactor", learning_rate=0.01, adafactor_decay_rate=c)
  params = {"w": jnp.ones(4)}
  g1, g2 = np.array([1.0, 2.0, 3.0, 4.0]), np.array([4.0, 3.0, 2.0, 1.0])
  state = tx.init(params)
  for g in (g1, g2):
    _, state = tx.update({"w": jnp.asarray(g)}, state, params)
  v = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.FactoredState))
       if isinstance(s, optax.FactoredState)][0].v["w"]
  np.testing.assert_allclose(v, (1 - 2**-c) * g1**2 + 2**-c * g2**2, rtol=1e-6)


def test_learning_rate_at_reads_the_schedule_at_that_step():
  s = optim.make_schedule("constant * linear_warmup", base_learning_rate=2.0, warmup_steps=10)
  assert [optim.learning_rate_at(s, t) for t in (0, 5, 20)] == pytest.approx([0.0, 1.0, 2.0])
  assert optim.learning_rate_at(None, 40_000) == pytest.approx(0.005)  # T5's default rsqrt schedule
  assert optim.learning_rate_at(0.3, 7) == pytest.approx(0.3)


def test_weight_decay_by_default_decays_embeddings_and_spares_norm_scales():
  # docs/regularisation.md: decay_embeddings=True is the default; RMSNorm scales never decay. AdamW's decay at
  # lr 0.1, weight_decay 0.5 on a zero gradient: p <- p - lr * wd * p = 0.95 p.
  params = {"token_embedder": {"embedding": jnp.full((2, 3), 2.0)}, "norm": {"scale": jnp.full((3,), 2.0)},
            "wo": {"kernel": jnp.full((3, 3), 2.0)}}
  tx = optim.make_optimizer("adamw", learning_rate=0.1, weight_decay=0.5)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["token_embedder"]["embedding"], 1.9, rtol=1e-6)
  np.testing.assert_allclose(new["wo"]["kernel"], 1.9, rtol=1e-6)
  np.testing.assert_allclose(new["norm"]["scale"], 2.0, rtol=1e-6)


@pytest.mark.parametrize("value", ["False", None, 0])
def test_decay_embeddings_that_is_no_bool_is_refused(value):
  # The default mask's embedding leaves are decay_embeddings itself: the gin string 'False' decayed the embeddings it
  # was meant to spare (optax takes a non-empty string as True), and None failed at the first step with a pytree
  # structure error that named no setting.
  with pytest.raises(ValueError, match=r"optim.make_optimizer.decay_embeddings=.* must be True or False"):
    optim.make_optimizer("adamw", learning_rate=0.1, weight_decay=0.5, decay_embeddings=value)
  with pytest.raises(ValueError, match=r"default_weight_decay_mask.decay_embeddings=.* must be True or False"):
    optim.default_weight_decay_mask({"token_embedder": {"embedding": jnp.ones((2, 3))}}, value)
