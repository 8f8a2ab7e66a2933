"""Decoding with the cache equals the uncached forward pass; greedy, sampling and beam search agree where they must."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repeat_lm.models import decoding, moe, t5

B, S, L = 3, 10, 8  # batch, encoder length, max decode length
# One layer per stack keeps compiles short; the scanned variants loop over it with nn.scan all the same.
DENSE = t5.T5Config(vocab_size=128, dtype="float32", emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                    num_encoder_layers=1, num_decoder_layers=1)
CONFIGS = {
    "dense": DENSE,
    "scanned": dataclasses.replace(DENSE, scan_layers=True),
    # Capacity that never binds, so one cached token routes as it does inside the full sequence.
    "moe-scanned": dataclasses.replace(DENSE, scan_layers=True, moe=moe.MoeConfig(
        num_experts=4, expert_mlp_dim=32, sparse_every=1, eval_capacity_factor=4.0, min_expert_capacity=32)),
}


@functools.cache
def setup(name: str):
  """(module, params with EOS made likely enough that some rows stop early, encoder inputs with padding)."""
  config = CONFIGS[name]
  module = t5.Transformer(config)
  rng = np.random.default_rng(0)
  inputs = rng.integers(2, config.vocab_size, (B, S)).astype(np.int32)
  inputs[0, 6:] = 0
  tokens = jnp.ones((1, 4), jnp.int32)
  params = jax.tree.map(np.array, jax.jit(lambda: module.init(jax.random.key(0), tokens, tokens, tokens,
                                                              enable_dropout=False)["params"])())
  # EOS slightly above the token a random-init model predicts most often, wherever that token would win.
  random_decoder_inputs = rng.integers(2, config.vocab_size, (B, L)).astype(np.int32)
  favourite = np.bincount(full_forward_log_probs(module, params, inputs, random_decoder_inputs).argmax(-1).ravel(),
                          minlength=config.vocab_size).argmax()
  kernel = params["logits_dense"]["kernel"]
  kernel[:, decoding.EOS_ID] = 1.01 * kernel[:, favourite]
  return module, params, inputs


def full_forward_log_probs(module, params, inputs, tokens_BxL):
  """log softmax of the teacher-forced logits when the decoder reads BOS + tokens[:-1] (no cache)."""
  decoder_inputs = np.concatenate([np.zeros((len(tokens_BxL), 1), np.int32), tokens_BxL[:, :-1]], axis=1)
  return np.asarray(_forward(module)(params, inputs, decoder_inputs))


@functools.cache
def _forward(module):
  return jax.jit(lambda p, x, y: jax.nn.log_softmax(module.apply({"params": p}, x, y, jnp.ones_like(y),
                                                                 enable_dropout=False)))


def valid_positions(tokens_BxL):
  """Positions up to and including the first EOS (afterwards the output is padding)."""
  ended = np.cumsum(tokens_BxL == decoding.EOS_ID, axis=1)
  return (ended == 0) | ((ended == 1) & (tokens_BxL == decoding.EOS_ID))


@functools.cache
def _greedy(module):
  return jax.jit(lambda p, x: decoding.greedy(module, p, x, L))


# The scanned dense cache is exercised by the beam search test below (and tests/interop's T5X contract).
@pytest.mark.parametrize("name", ["dense", "moe-scanned"])
def test_cached_greedy_equals_full_forward(name):
  module, params, inputs = setup(name)
  tokens, log_probs = _greedy(module)(params, inputs)
  tokens, log_probs = np.asarray(tokens), np.asarray(log_probs)
  full = full_forward_log_probs(module, params, inputs, tokens)
  valid = valid_positions(tokens)
  np.testing.assert_array_equal(np.argmax(full, -1)[valid], tokens[valid])
  chosen = np.take_along_axis(full, tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(log_probs[valid], chosen[valid], atol=1e-5)
  assert (tokens[~valid] == 0).all() and (log_probs[~valid] == 0).all()
  if name == "dense":
    assert (~valid).any() and valid[:, 0].all()  # some row stopped early; padding follows its EOS


@functools.cache
def _beams(module):
  return jax.jit(lambda p, x: decoding.beam_search_all(module, p, x, L, num_beams=3, alpha=0.6))


def test_beam_search():
  module, params, inputs = setup("dense")
  beams, scores = _beams(module)(params, inputs)
  beams, scores = np.asarray(beams), np.asarray(scores)
  assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
  # Each beam's score is its full-forward log-probability over its length (EOS included), length-normalised.
  for b in range(B):
    full = full_forward_log_probs(module, params, inputs[b:b + 1].repeat(3, 0), beams[b])
    valid = valid_positions(beams[b])
    log_p = (np.take_along_axis(full, beams[b][..., None], -1)[..., 0] * valid).sum(-1)
    expected = log_p / ((5.0 + valid.sum(-1)) / 6.0) ** 0.6
    np.testing.assert_allclose(scores[b], expected, atol=1e-4)
  greedy, greedy_log_probs = map(np.asarray, _greedy(module)(params, inputs))
  greedy_score = greedy_log_probs.sum(-1) / ((5.0 + valid_positions(greedy).sum(-1)) / 6.0) ** 0.6
  assert (scores[:, 0] >= greedy_score - 1e-4).all()  # beam search finds at least the greedy sequence


def test_beam_search_scanned_equals_unscanned():
  """The scanned cache is [layers, B, ...]: beams are reordered on axis 1 there."""
  module, params, inputs = setup("dense")
  from repeat_lm.interop import layout  # pylint: disable=import-outside-toplevel
  stacked = layout.unflatten(layout.from_per_layer(layout.flatten(params), layout.layouts_for(CONFIGS["scanned"])))
  for got, want in zip(_beams(t5.Transformer(CONFIGS["scanned"]))(stacked, inputs), _beams(module)(params, inputs)):
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_sampling():
  module, params, inputs = setup("dense")
  greedy = _greedy(module)(params, inputs)[0]
  top1 = decoding.decode(module, params, inputs, decoding.DecodeConfig("sample", L, topk=1, seed=3))
  np.testing.assert_array_equal(top1, greedy)
  # The temperature divides the logits: near 0 every draw is the most likely token (at 1 a random-init model's
  # near-uniform distribution over 128 tokens is not), with every token still allowed.
  for seed in (0, 1):
    cold = decoding.decode(module, params, inputs, decoding.DecodeConfig("sample", L, temperature=1e-4, seed=seed))
    np.testing.assert_array_equal(cold, greedy)
  assert not np.array_equal(decoding.decode(module, params, inputs, decoding.DecodeConfig("sample", L, seed=0)),
                            greedy)
  hot = [np.asarray(decoding.decode(module, params, inputs, decoding.DecodeConfig("sample", L, temperature=5.0,
                                                                                  topk=4, seed=s))) for s in (0, 1)]
  assert not np.array_equal(hot[0], hot[1])  # the seed matters
  same = decoding.decode(module, params, inputs, decoding.DecodeConfig("sample", L, temperature=5.0, topk=4, seed=0))
  np.testing.assert_array_equal(same, hot[0])  # and only the seed
  for tokens in hot:  # every draw is among the 4 most likely tokens at its step
    full = full_forward_log_probs(module, params, inputs, tokens)
    top4 = np.argsort(-full, -1)[..., :4]
    valid = valid_positions(tokens)
    assert (top4 == tokens[..., None]).any(-1)[valid].all()


def test_topk_beyond_the_vocabulary_keeps_every_token():
  """`--topk` at or above the vocabulary size keeps all tokens, as 0 does (lax.top_k raised a ValueError for k > V,
  after infer had loaded the checkpoint)."""
  module, params, inputs = setup("dense")
  cfg = decoding.DecodeConfig("sample", L, temperature=5.0, seed=2)
  everything = decoding.decode(module, params, inputs, cfg)
  np.testing.assert_array_equal(decoding.decode(module, params, inputs, dataclasses.replace(
      cfg, topk=DENSE.vocab_size + 1)), everything)


def test_decode_config_is_checked():
  with pytest.raises(ValueError, match="method"):
    decoding.DecodeConfig(method="nucleus")
  with pytest.raises(ValueError, match="temperature=0.0: sampling divides the logits by it"):
    decoding.DecodeConfig(method="sample", temperature=0.0)
  with pytest.raises(ValueError, match="topk=-1"):
    decoding.DecodeConfig(method="sample", topk=-1)
  with pytest.raises(ValueError, match="temperature=0.7: sampling divides"):  # a string: a gin binding's quotes
    decoding.DecodeConfig(method="sample", temperature="0.7")
  assert decoding.DecodeConfig(method="greedy", temperature=0.0)  # unused by greedy decoding
  # NaN: every beam's score NaN, and infer printed empty outputs with exit code 0.
  with pytest.raises(ValueError, match="length_penalty_alpha=nan: .* must be finite"):
    decoding.DecodeConfig(method="beam", length_penalty_alpha=float("nan"))


@pytest.mark.parametrize("kwargs", [dict(method="beam", length_penalty_alpha="0.6"),
                                    dict(method="beam", length_penalty_alpha=True),
                                    dict(method="sample", temperature=True)])
def test_decode_config_refuses_a_string_or_bool_for_a_number(kwargs):
  """The string passed DecodeConfig (a string temperature was refused) and failed only in the first beam step, after
  the checkpoint was loaded; True == 1 decoded with alpha or temperature 1.0."""
  with pytest.raises(ValueError, match="length_penalty_alpha=|temperature="):
    decoding.DecodeConfig(**kwargs)


def test_beam_search_called_directly_refuses_a_non_finite_length_penalty():
  # DecodeConfig refused a NaN alpha, but beam_search (public, docs/interop.md) returned arbitrary beams scored NaN.
  module, params, inputs = setup("dense")
  with pytest.raises(ValueError, match="length_penalty_alpha=nan: .* must be finite"):
    decoding.beam_search(module, params, inputs, L, num_beams=3, alpha=float("nan"))


@pytest.mark.parametrize("alpha", [np.array(np.nan), jnp.float32(np.inf)], ids=["numpy-0d", "jax-scalar"])
def test_beam_search_refuses_a_non_finite_length_penalty_given_as_an_array(alpha):
  # Concrete values with no place among numbers.Real: beam search returned NaN scores without a word. Only a traced
  # alpha has no value to check (see test_beam_search_takes_a_traced_length_penalty).
  module, params, inputs = setup("dense")
  with pytest.raises(ValueError, match="length_penalty_alpha=.*must be finite"):
    decoding.beam_search(module, params, inputs, L, num_beams=3, alpha=alpha)


def test_beam_search_takes_a_traced_length_penalty():
  module, params, inputs = setup("dense")
  scores = jax.jit(lambda p, x, a: decoding.beam_search(module, p, x, L, num_beams=2, alpha=a)[1])(params, inputs, 0.6)
  assert np.isfinite(np.asarray(scores)).all()


@pytest.mark.parametrize("kwargs", [dict(max_decode_length=64.0), dict(max_decode_length=True),
                                    dict(method="beam", num_beams=4.0), dict(method="sample", topk=40.0)])
def test_decode_config_refuses_counts_that_are_no_whole_numbers(kwargs):
  # Each passed the `< 1` / `< 0` tests and failed in the decode loop with a shape TypeError (True: one token).
  with pytest.raises(ValueError, match="whole number"):
    decoding.DecodeConfig(**kwargs)


def test_decoding_functions_called_directly_check_their_counts():
  # The public functions took what DecodeConfig refuses: 0 beams raised a ZeroDivisionError inside beam search, a
  # float top-k or length a shape TypeError. Refused before anything is traced.
  module, params, inputs = setup("dense")
  with pytest.raises(ValueError, match="num_beams"):
    decoding.beam_search(module, params, inputs, L, num_beams=0)
  with pytest.raises(ValueError, match="topk=2.0"):
    decoding.sample(module, params, inputs, L, jax.random.key(0), topk=2.0)
  with pytest.raises(ValueError, match="max_decode_length"):
    decoding.greedy(module, params, inputs, float(L))


def test_sample_takes_a_traced_temperature():
  """Only a concrete temperature is checked, as beam search's alpha: under jit with the temperature an argument the
  check raised a TracerBoolConversionError."""
  module, params, inputs = setup("dense")
  key = jax.random.key(7)
  tokens = jax.jit(lambda p, x, t: decoding.sample(module, p, x, L, key, temperature=t)[0])(params, inputs, 5.0)
  assert np.asarray(tokens).shape == (B, L)


def test_sampling_step_i_draws_with_the_key_folded_with_i():
  """`sample` draws step i from categorical(fold_in(rng, i), logits / temperature): the same draws from the uncached
  forward pass's log-probabilities (softmax is shift-invariant). One key for every step would reuse the same Gumbel
  noise, so a near-uniform model repeats one token."""
  module, params, inputs = setup("dense")
  key, temperature = jax.random.key(7), 5.0  # test_topk_beyond_the_vocabulary_keeps_every_token's program
  tokens = np.asarray(decoding.decode(module, params, inputs, decoding.DecodeConfig("sample", L, temperature=5.0),
                                      rng=key))
  full = full_forward_log_probs(module, params, inputs, tokens)
  want = np.stack([jax.random.categorical(jax.random.fold_in(key, i), full[:, i] / temperature) for i in range(L)], 1)
  valid = valid_positions(tokens)
  assert valid.sum() > B * L // 2
  np.testing.assert_array_equal(tokens[valid], want[valid])


@pytest.mark.parametrize("method", ["greedy", "sample"])
def test_decoding_stops_at_the_configured_eos(method):
  # A vocabulary whose EOS is not 1 (SentencePiece's default is 2): its rows end there, not at id 1.
  module, params, inputs = setup("dense")
  run = lambda eos: np.asarray(decoding.decode(module, params, inputs, decoding.DecodeConfig(  # noqa: E731
      method=method, max_decode_length=L, eos_id=eos)))
  first = run(decoding.EOS_ID)[0, 0]
  assert first != decoding.EOS_ID
  stopped = run(int(first))
  assert stopped[0, 0] == first and not stopped[0, 1:].any()  # ended at its first token, padding after it
  assert decoding.trim_after_eos(np.array([5, 1, 6, 2, 7]), eos_id=2) == [5, 1, 6]


def test_trim_after_eos_drops_eos_and_what_follows():
  # predict_tokens' contract: the ids up to, not including, the first EOS, without padding.
  assert decoding.trim_after_eos(np.array([5, 0, 6, decoding.EOS_ID, 7, decoding.EOS_ID, 0])) == [5, 6]
  assert decoding.trim_after_eos(np.array([5, 6, 0, 0])) == [5, 6]
  assert decoding.trim_after_eos(np.array([decoding.EOS_ID, 3])) == []


def test_beams_of_one_example_are_distinct():
  """The K beams are K different hypotheses: only the first starts alive (T5X's beam search starts the others at
  -inf), else the K copies of the empty prefix extend alike and fill every beam with one sequence."""
  module, params, inputs = setup("dense")
  beams = np.asarray(_beams(module)(params, inputs)[0])
  for b in range(B):
    assert len({tuple(beam) for beam in beams[b]}) == 3, beams[b]
