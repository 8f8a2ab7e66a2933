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


@pytest.mark.parametrize("shape, dims, axes", [((130, 300), (0, 1), None), ((300, 130), (1, 0), None),
                                               ((3, 140, 150), (1, 2), (1, 2))])
def test_factored_mean_square_is_the_updates(shape, dims, axes):
  """The clip's mean square from grad^2 and the factors equals the one of the update they make (per block with
  `axes`), the row factor broadcast along d0 and the column factor along d1 as scale_by_factored_rms does."""
  d1, d0 = dims
  keys = jax.random.split(jax.random.key(3), 3)
  grad = jax.random.normal(keys[0], shape)
  row = jax.random.uniform(keys[1], shape[:d0] + shape[d0 + 1:], minval=0.5, maxval=2.0)
  col = jax.random.uniform(keys[2], shape[:d1] + shape[d1 + 1:], minval=0.5, maxval=2.0)
  update = grad * jnp.expand_dims(row, d0) * jnp.expand_dims(col, d1)
  want = jnp.mean(jnp.square(update), axis=axes, keepdims=axes is not None)
  got = adafactor.factored_mean_square(jnp.square(grad), row, col, dims, axes)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5)


def _update_sized_arrays(tx, shape) -> int:
  """Top-level arrays of `shape` in the compiled CPU update of one such parameter, its inputs left out."""
  params = {"w": jnp.ones(shape)}
  program = jax.jit(lambda g, s, p: tx.update(g, s, p)[0]).lower(params, tx.init(params), params).compile().as_text()
  lines = program[program.index("ENTRY"):].splitlines()[1:]
  return sum(1 for line in lines if " = " in line and line.split(" = ")[1].startswith(f"f32[{shape[0]},{shape[1]}]")
             and " parameter(" not in line)


def test_factored_clip_stores_no_update():
  """Clipped inside the factored stage, the update is computed once, into the new parameter's values: only grad^2
  and the result are stored. The separate clip stage's reduction made XLA:CPU store the update first."""
  shape = (130, 300)
  assert _update_sized_arrays(adafactor.adafactor(0.01), shape) <= 2
  separate = optax.chain(adafactor.scale_by_factored_rms(0.8), adafactor.clip_by_block_rms(1.0),  # the old chain
                         optax.scale_by_learning_rate(0.01, flip_sign=False), adafactor.scale_by_param_rms(),
                         optax.add_decayed_weights(0.0), optax.scale(-1))
  assert _update_sized_arrays(separate, shape) >= 3


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


def test_stacked_parameters_update_each_block_as_its_own_parameter():
  """T5X's factor rules make 'layers' and 'expert' BATCH axes: a scanned kernel [layers, embed, mlp] (or experts
  [expert, embed, mlp]) gets the updates its layers would get as separate parameters, per-layer parameter scale and
  update clipping included. Layers of very different scale make the whole-tensor RMS (optax's) visibly wrong."""
  scales = jnp.asarray([0.05, 1.0, 0.3])[:, None, None]
  stacked = {"w": jax.random.normal(jax.random.key(0), (3, 160, 140)) * scales, "s": jnp.ones((3, 140))}
  grads = {"w": jax.random.normal(jax.random.key(1), (3, 160, 140)),
           "s": jax.random.normal(jax.random.key(2), (3, 140))}
  names = {"w": ("layers", "embed", "mlp"), "s": ("layers", "embed")}
  tx = adafactor.adafactor(0.01)

  def update(params, grads, logical):
    with adafactor.logical_axes(logical):
      return tx.update(grads, tx.init(params), params)[0]

  together = jax.jit(lambda p, g: update(p, g, names))(stacked, grads)
  for i in range(3):
    alone = update({k: v[i] for k, v in stacked.items()}, {k: v[i] for k, v in grads.items()},
                   {"w": ("embed", "mlp"), "s": ("embed",)})
    for k in stacked:
      np.testing.assert_allclose(together[k][i], alone[k], rtol=1e-5, atol=1e-9, err_msg=f"{k}[{i}]")
  whole = jax.jit(lambda p, g: tx.update(g, tx.init(p), p)[0])(stacked, grads)  # no names: optax's whole-tensor RMS
  assert not np.allclose(whole["w"][0], together["w"][0], rtol=0.1)


@pytest.mark.slow
def test_the_train_step_of_a_scanned_model_updates_like_the_unscanned_one():
  """The train step hands Adafactor the parameters' logical names: scanning the layers changes nothing."""
  import dataclasses
  from repeat_lm.models import t5
  from repeat_lm.models.encoder_decoder import EncoderDecoderModel
  from repeat_lm.interop import layout
  from repeat_lm.train import partitioning, state
  config = t5.T5Config(vocab_size=256, dtype="float32", emb_dim=32, num_heads=2, head_dim=16, mlp_dim=160,
                       num_encoder_layers=2, num_decoder_layers=2)
  lengths = {"encoder_input_tokens": 16, "decoder_input_tokens": 8, "decoder_target_tokens": 8}
  rng = np.random.default_rng(0)
  batch = {k: rng.integers(2, 256, size=(2, n)).astype(np.int32) for k, n in lengths.items()}
  batch["decoder_input_tokens"][:, 0] = 0
  partitioner = partitioning.Partitioner(1, 1, devices=jax.devices()[:1])
  tx = optim.make_optimizer(learning_rate=0.01)
  stepped = {}
  for scan in (False, True):
    model = EncoderDecoderModel(module=t5.Transformer(dataclasses.replace(config, scan_layers=scan)))
    lay = state.layout(model, tx, partitioner, state.batch_specs(lengths, 2), 0)
    init = state.init_state(model, tx, lay, partitioner, state.batch_specs(lengths, 2), 0)
    if scan:  # the unscanned model's initial values, stacked as the scan stores them
      scanned = layout.layouts_for(model.module.config)
      params = layout.unflatten(layout.from_per_layer(layout.flatten(stepped["init"]), scanned))
      init = {"step": init["step"], "params": params, "opt_state": tx.init(params)}
      init = jax.tree.map(lambda x: jnp.array(x, copy=True), init)  # the step donates: no shared buffers
    else:
      stepped["init"] = jax.tree.map(np.asarray, init["params"])
    step = state.make_train_step(model, tx, lay, partitioner, 0)
    stepped[scan] = jax.tree.map(np.asarray, step(init, state.global_batch(batch, lay.batch_shardings))[0]["params"])
  expected = layout.from_per_layer(layout.flatten(stepped[False]), layout.layouts_for(model.module.config))
  for path, value in layout.flatten(stepped[True]).items():
    np.testing.assert_allclose(value, expected[path], rtol=2e-5, atol=1e-7, err_msg=path)



def test_more_experts_than_rows_are_never_factored_over():
  """The heuristic picks the two largest axes; with 12 experts of [8, 10] over all three it factored experts x mlp
  (one column statistic shared by every expert). T5X's 'expert' is a BATCH axis: each expert is factored over its
  own embed x mlp, as it would be alone (min_dim_size_to_factor 8 stands in for 128 with 256 experts of [128, 512])."""
  tx = adafactor.adafactor(0.01, min_dim_size_to_factor=8)
  kernels = jax.random.normal(jax.random.key(0), (12, 8, 10))
  grads = [jax.random.normal(jax.random.key(i), (12, 8, 10)) * (1.0 + 3.0 * i) for i in (1, 2)]

  def train(params, grads, names):
    with adafactor.logical_axes(names):
      state = tx.init(params)
      for g in grads:
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state[0]

  together, stats = train({"w": kernels}, [{"w": g} for g in grads], {"w": ("expert", "embed", "expert_mlp")})
  assert stats.v_row["w"].shape == (12, 8) and stats.v_col["w"].shape == (12, 10)
  for e in range(12):
    alone, _ = train({"w": kernels[e]}, [{"w": g[e]} for g in grads], {"w": ("embed", "expert_mlp")})
    np.testing.assert_allclose(together["w"][e], alone["w"], rtol=1e-5, atol=1e-7, err_msg=f"expert {e}")


def test_factor_rule_none_axes_are_never_factored():
  """T5X factors only a ROW and a COLUMN axis: the router kernel ('embed', 'unmodeled') of a model with >= 128 experts
  and a relative-position table this large keep their whole second moment (optax's size rule factored them)."""
  tx = adafactor.adafactor(0.01)
  params = {"router": jnp.ones((768, 128)), "relpos": jnp.ones((128, 128)), "wi": jnp.ones((768, 2048))}
  names = {"router": ("embed", "unmodeled"), "relpos": ("heads", "relpos_buckets"), "wi": ("embed", "mlp")}
  with adafactor.logical_axes(names):
    state = tx.init(params)
    updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  stats = state[0]
  for name in ("router", "relpos"):
    assert stats.v[name].shape == params[name].shape and stats.v_row[name].shape == (1,), name
  assert stats.v_row["wi"].shape == (768,) and stats.v["wi"].shape == (1,)
  assert all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(updates))


def test_a_state_initialised_without_the_names_is_refused():
  """Initialised without the logical names the expert axis counts as a factoring axis; updated with them the
  statistics no longer fit (the [1] placeholder of an unfactored parameter would even broadcast silently)."""
  tx = adafactor.adafactor(0.01, min_dim_size_to_factor=8)
  params = {"w": jnp.ones((12, 8, 10))}
  state = tx.init(params)
  names = {"w": ("expert", "embed", "expert_mlp")}
  with adafactor.logical_axes(names), pytest.raises(ValueError, match="logical_axes"):
    tx.update(params, state, params)


@pytest.mark.parametrize("decay_rate", [-0.8, float("nan")])
def test_a_decay_rate_that_is_no_exponent_is_refused(decay_rate):
  # Hugging Face's sign (-0.8) made the second moment -17 after six steps and every other update NaN.
  with pytest.raises(ValueError, match="decay_rate"):
    optim.make_optimizer("adafactor", learning_rate=0.01, adafactor_decay_rate=decay_rate)


def test_first_update_by_hand_floor_and_zero_gradients():
  """Step 0 by hand (Adafactor with T5X's epsilon1 1e-30 and epsilon2 1e-3): v = g^2 + 1e-30, so a unit gradient's
  update is lr x max(RMS(param), 1e-3); a zero gradient (a vocabulary row no token of the batch used) updates
  nothing, where g^2 alone would give 0 / sqrt(0) = NaN."""
  tx = adafactor.adafactor(0.5, min_dim_size_to_factor=4)
  params = {"zero": jnp.zeros(3), "frozen": jnp.full((3,), 3.0), "emb": jnp.ones((6, 8))}
  grads = {"zero": jnp.ones(3), "frozen": jnp.zeros(3), "emb": jnp.ones((6, 8)).at[:2].set(0.0)}  # emb factored
  updates = jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(grads, params)
  np.testing.assert_allclose(updates["zero"], -0.5 * 1e-3, rtol=1e-6)  # the parameter-scale floor
  np.testing.assert_array_equal(updates["frozen"], np.zeros(3))
  assert bool(jnp.isfinite(updates["emb"]).all())
  np.testing.assert_array_equal(updates["emb"][:2], np.zeros((2, 8)))


def test_parameter_scale_averages_over_all_but_the_block_axes():
  """T5X's parameter scale is the RMS over every axis but its BATCH ones ('layers', 'stack'); FactorDim.NONE axes
  ('unmodeled') are averaged over like any other. Unit gradients at step 0 give unit normalised updates, so the
  update is -lr x that RMS: per block of a 'stack' axis, over the whole router kernel."""
  tx = adafactor.adafactor(1.0)
  columns = jnp.asarray([1.0, 2.0, 3.0, 4.0])
  params = {"router": jnp.ones((8, 4)) * columns, "stacked": jnp.ones((2, 8)) * jnp.asarray([[1.0], [3.0]])}
  names = {"router": ("embed", "unmodeled"), "stacked": ("stack", "embed")}
  with adafactor.logical_axes(names):
    updates = jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(jax.tree.map(jnp.ones_like, params), params)
  np.testing.assert_allclose(updates["router"], np.full((8, 4), -np.sqrt(7.5)), rtol=1e-6)  # sqrt(mean(1,4,9,16))
  np.testing.assert_allclose(updates["stacked"], [[-1.0] * 8, [-3.0] * 8], rtol=1e-6)
