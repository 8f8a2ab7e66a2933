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


def test_gradient_norm_clipping_clips_the_gradients_not_the_updates():
  # AdamW's first update is -lr * g / (|g| + eps) per element whatever g's scale: clipping the gradient to norm 1e-3
  # leaves it at lr, clipping the update would shrink it to norm 1e-3.
  tx = optim.make_optimizer("adamw", learning_rate=0.1, clip_gradient_norm=1e-3, eps=1e-12)
  params = {"w": jnp.zeros(4)}
  updates, _ = tx.update({"w": jnp.array([3.0, -4.0, 5.0, -6.0])}, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], [-0.1, 0.1, -0.1, 0.1], rtol=1e-4)
