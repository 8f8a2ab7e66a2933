"""adafactor.adafactor against optax.adafactor with the same settings: the same state tree (checkpoints
interchange) and the same parameters over several steps, for every factoring case."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from repeat_lm.train import adafactor, optim

# Factored wide (the matmul mean), factored tall (the reduce), 3-D with a small leading axis, square, too small to
# factor, and a vector.
SHAPES = {"wide": (130, 300), "tall": (300, 130), "experts": (3, 140, 150), "square": (128, 128),
          "small": (40, 300), "scale": (300,)}


def _params(key):
  keys = jax.random.split(key, len(SHAPES))
  return {name: jax.random.normal(k, shape) for (name, shape), k in zip(SHAPES.items(), keys)}


def _run(tx, steps=4):
  params = _params(jax.random.key(0))
  state = tx.init(params)
  for step in range(steps):
    grads = jax.tree.map(lambda p: p * 0.1 + jax.random.normal(jax.random.key(step + 1), p.shape), params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


@pytest.mark.parametrize("weight_decay", [0.0, 1e-3])
def test_equals_optax_adafactor(weight_decay):
  mask = lambda p: {k: k != "scale" for k in p}
  ours = adafactor.adafactor(0.01, decay_rate=0.8, weight_decay_rate=weight_decay, weight_decay_mask=mask)
  theirs = optax.adafactor(learning_rate=0.01, min_dim_size_to_factor=128, decay_rate=0.8, decay_offset=0,
                           multiply_by_parameter_scale=True, clipping_threshold=1.0, momentum=None, eps=1e-30,
                           factored=True, weight_decay_rate=weight_decay, weight_decay_mask=mask)
  init = _params(jax.random.key(0))
  assert jax.tree.structure(ours.init(init)) == jax.tree.structure(theirs.init(init))
  (p_ours, s_ours), (p_theirs, s_theirs) = _run(ours), _run(theirs)
  for got, want in zip(jax.tree.leaves((p_ours, s_ours)), jax.tree.leaves((p_theirs, s_theirs))):
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)


def test_make_optimizer_builds_it_with_t5x_settings(monkeypatch):
  calls = []
  build = adafactor.adafactor
  monkeypatch.setattr(adafactor, "adafactor", lambda *args, **kwargs: calls.append(kwargs) or build(*args, **kwargs))
  state = optim.make_optimizer("adafactor", learning_rate=0.01).init(_params(jax.random.key(0)))
  assert len(calls) == 1
  assert {k: calls[0][k] for k in ("decay_rate", "min_dim_size_to_factor", "clipping_threshold", "epsilon")} == {
      "decay_rate": 0.8, "min_dim_size_to_factor": 128, "clipping_threshold": 1.0, "epsilon": 1e-30}
  factored = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.FactoredState))
              if isinstance(s, optax.FactoredState)]
  assert len(factored) == 1 and factored[0].v_col["wide"].shape == (300,)


def test_wide_column_mean_is_a_matmul_on_cpu():
  """The major-axis mean of a wide matrix compiles to a dot (the point of the module); a tall one's to a reduce."""
  hlo = lambda shape: jax.jit(lambda x: adafactor.mean_over(x, 0)).lower(jnp.ones(shape)).as_text()
  assert "dot_general" in hlo((130, 300)) and "reduce" not in hlo((130, 300)).replace("reduce_precision", "")
  assert "dot_general" not in hlo((300, 130))
  x = jax.random.normal(jax.random.key(1), (130, 300))
  np.testing.assert_allclose(adafactor.mean_over(x, 0), jnp.mean(x, axis=0), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(adafactor.mean_over(x, 1), jnp.mean(x, axis=1), rtol=1e-6)


def test_param_rms_equals_optax_without_its_second_pass():
  """The same numbers as optax's scale_by_param_block_rms, the floor included, without its gradient-safe select."""
  params = {"big": jax.random.normal(jax.random.key(2), (64, 48)), "tiny": jnp.full((64,), 1e-5),
            "zero": jnp.zeros((8, 8))}
  updates = jax.tree.map(lambda p: jnp.full(p.shape, 0.5), params)
  ours, theirs = adafactor.scale_by_param_rms(1e-3), optax.scale_by_param_block_rms(1e-3)
  got = ours.update(updates, ours.init(params), params)[0]
  want = theirs.update(updates, theirs.init(params), params)[0]
  for name in params:
    np.testing.assert_array_equal(got[name], want[name])
  assert got["zero"][0, 0] == np.float32(0.5) * np.float32(1e-3)  # the floor
  lowered = lambda tx: jax.jit(lambda u, p: tx.update(u, tx.init(p), p)[0]).lower(updates, params).as_text()
  assert "select" in lowered(theirs) and "select" not in lowered(ours)
