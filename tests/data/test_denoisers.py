"""Denoisers: raw lengths (reference.md section 4), masks, reconstruction, UL2 statistics and mode tokens."""

import numpy as np
import pytest

from repeat_lm.data import denoisers as D
from repeat_lm.data import objectives

V = 32100  # T5's vocabulary with 100 extra ids: <extra_id_0> = 32099
SPAN = D.span_corruption().denoisers[0]
BY_NAME = {d.name: d for d in D.UL2_DENOISERS}


@pytest.mark.parametrize('name, lengths, raw, targets', [
    ('R_mu3_r0.15', (512, 114), 568, 114), ('R_mu8_r0.15', (512, 512), 588, 100),
    ('X_mu64_r0.15', (512, 512), 600, 92), ('X_mu3_r0.5', (512, 512), 766, 512),
    ('X_mu8_r0.5', (512, 512), 908, 512), ('X_mu64_r0.5', (512, 512), 1006, 512)])
def test_raw_lengths_match_the_reference(name, lengths, raw, targets):
  d = BY_NAME[name]
  assert D.raw_length(d, *lengths) == raw
  assert D.max_lengths(d, raw) == (512, targets)


def test_raw_lengths_fit_both_feature_lengths_and_mode_tokens():
  assert D.raw_length(SPAN, 512, 114) == objectives.random_spans_lengths(512)[0] == 568
  assert D.raw_length(SPAN, 128, 32) == 141
  for d in D.UL2_DENOISERS:
    for lengths in [(512, 114), (512, 512), (128, 32)]:
      for mode in (0, 5):
        raw = D.raw_length(d, *lengths, mode)
        inputs, targets = D.max_lengths(d, raw, mode)
        assert inputs <= lengths[0] and targets <= lengths[1], (d.name, lengths)
        assert max(np.array(D.max_lengths(d, raw + 1, mode)) - lengths) > 0  # the longest that fits
  assert D.raw_length(BY_NAME['S_r0.25'], 512, 114) == 229  # the suffix (<= 113) bounds it: 2 * round(229 / 4) = 114


@pytest.mark.parametrize('length', [2, 3, 10, 141, 568, 1006])
def test_mask_counts_and_alternation(length):
  num_noise = min(max(round(length * 0.15), 1), length - 1)
  num_spans = min(max(1, round(num_noise / 3)), num_noise, length - num_noise)
  for key in range(5):
    m = D.noise_mask(length, 0.15, 3.0, key)
    starts = m & ~np.concatenate([[False], m[:-1]])
    assert m.sum() == num_noise and starts.sum() == num_spans
    assert not m[0] and m[-1]


@pytest.mark.parametrize('name', sorted(BY_NAME))
def test_examples_reconstruct_the_chunk(name):
  d = BY_NAME[name]
  rng = np.random.default_rng(0)
  for key in range(20):
    tokens = rng.integers(3, 32000, size=int(rng.integers(1, 1000))).astype(np.int32)
    inputs, targets = D.corrupt(tokens, d, key, V + 1000)  # room for the ~330 sentinels of mu 3 at r 0.5
    if d.prefix_lm:
      assert np.concatenate([inputs, targets]).tolist() == tokens.tolist()
      assert len(tokens) < 2 or 1 <= len(targets) < len(tokens)
    else:
      assert objectives.uncorrupt(inputs, targets, 32000) == tokens.tolist()
    raw, noise, spans = D.measure(inputs, targets, d, V + 1000)
    assert raw == len(tokens)


def test_same_key_same_example_and_sentinels_count_down():
  tokens = np.arange(3, 571, dtype=np.int32)
  a, b, c = D.corrupt(tokens, SPAN, 1, V), D.corrupt(tokens, SPAN, 1, V), D.corrupt(tokens, SPAN, 2, V)
  assert all(np.array_equal(x, y) for x, y in zip(a, b)) and not np.array_equal(a[0], c[0])
  inputs, targets = a
  assert len(inputs) + 1 == 512 and len(targets) + 1 == 114
  sentinels = inputs[inputs >= V - 100]
  np.testing.assert_array_equal(sentinels, 32099 - np.arange(len(sentinels)))
  np.testing.assert_array_equal(targets[targets >= V - 100], sentinels)
  assert targets[0] == 32099


@pytest.mark.parametrize('name', sorted(BY_NAME))
def test_measured_density_and_span_length_match_the_denoiser(name):
  d = BY_NAME[name]
  raw = D.raw_length(d, 512, 512)
  totals = np.zeros(3)
  for key in range(300):
    inputs, targets = D.corrupt(np.arange(3, 3 + raw, dtype=np.int32), d, key, V + 1000)  # room for 128 sentinels
    totals += D.measure(inputs, targets, d, V + 1000)
  density, span = totals[1] / totals[0], totals[1] / totals[2]
  if d.prefix_lm:  # the suffix is uniform on [1, 2m - 1], m = round(raw * density): mean m
    assert density == pytest.approx(d.noise_density, abs=0.01)
    assert span == pytest.approx(round(raw * d.noise_density), rel=0.05)
  else:  # T5's arithmetic: round(raw * r) noise tokens in round(noise / mu) spans (e.g. mu 64 at 600 raw: 1 span)
    noise, spans = D.span_counts(raw, d.noise_density, d.mean_noise_span_length)
    assert density == pytest.approx(noise / raw) and density == pytest.approx(d.noise_density, abs=0.005)
    assert span == pytest.approx(noise / spans)
    if spans > 1:
      assert span == pytest.approx(d.mean_noise_span_length, rel=0.1)


def test_span_lengths_vary_and_noise_spreads():
  lengths, first_half, total = [], 0, 0
  for key in range(100):
    m = D.noise_mask(568, 0.15, 3.0, key)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], m.astype(int), [0]])))
    lengths += (edges[1::2] - edges[::2]).tolist()
    first_half, total = first_half + m[:284].sum(), total + m.sum()
  assert min(lengths) == 1 and max(lengths) > 6 and np.mean(lengths) == pytest.approx(3.0, abs=0.1)
  assert first_half / total == pytest.approx(0.5, abs=0.03)


def test_mode_tokens_are_prepended():
  mode = np.array([784, 567, 9138, 908], np.int32)  # '[NLU]' in the T5 vocabulary
  tokens = np.arange(3, 571, dtype=np.int32)
  inputs, targets = D.corrupt(tokens, BY_NAME['R_mu3_r0.15'], 3, V, mode)
  plain = D.corrupt(tokens, BY_NAME['R_mu3_r0.15'], 3, V)
  np.testing.assert_array_equal(inputs, np.concatenate([mode, plain[0]]))
  assert D.measure(inputs, targets, BY_NAME['R_mu3_r0.15'], V, 4)[0] == 568


def test_objectives_by_name():
  assert D.objective_named('span') == D.span_corruption()
  assert D.objective_named('span_r0p5_mu8') == D.span_corruption(0.5, 8) and D.span_corruption(0.5, 8).name == \
      'span_r0p5_mu8'
  ul2 = D.objective_named('ul2')
  assert ul2.rates == (0.13,) * 6 + (0.22,) and ul2.mode_tokens and len(ul2.denoisers) == 7
  assert [d.mode for d in ul2.denoisers] == ['[NLU]'] * 2 + ['[NLG]'] * 4 + ['[S2S]']
  assert D.ul2((1, 0, 0, 0, 0, 0, 1)).name.startswith('ul2_')
  with pytest.raises(ValueError, match='Unknown objective'):
    D.objective_named('mlm')
  for typo in ('span_rabc_mu3', 'span_r_mu3', 'span_r0p5_mu8_mu3'):  # were float's / unpacking's bare errors
    with pytest.raises(ValueError, match=f"Unknown objective '{typo}'.*span_r0p5_mu8"):
      D.objective_named(typo)
  with pytest.raises(ValueError, match='rates'):
    D.ul2((1, 2))
  with pytest.raises(ValueError, match='too short'):
    D.raw_length(SPAN, 2, 2)
  # Span parameters a task name can spell: a density outside (0, 1) or spans under a token are no objective.
  with pytest.raises(ValueError, match='noise_density=1.5 must lie strictly between 0 and 1'):
    D.objective_named('span_r1p5_mu3')
  with pytest.raises(ValueError, match='noise_density=0.0 must'):
    D.objective_named('span_r0_mu3')
  with pytest.raises(ValueError, match='mean_noise_span_length=0.0 must be at least 1'):
    D.objective_named('span_r0p15_mu0')


def test_sentinel_overflow_is_named():
  ul2 = D.ul2()
  raws = [D.raw_length(d, 512, 512) for d in ul2.denoisers]
  assert D.warn_if_sentinels_overflow(ul2, raws, 100) == ['X_mu3_r0.5']  # 128 spans at 766 raw tokens
  assert D.warn_if_sentinels_overflow(ul2, [D.raw_length(d, 512, 114) for d in ul2.denoisers], 100) == []


@pytest.mark.parametrize('bad', [float('nan'), float('inf')])
def test_non_finite_rates_are_refused(bad):
  # Accepted before: every example then drew the first denoiser (NaN / inf CDF).
  with pytest.raises(ValueError, match='finite'):
    D.ul2((bad,) + (0.13,) * 5 + (0.22,))


@pytest.mark.parametrize('length, density, mu, noise, spans', [(8, 0.75, 1.0, 6, 2), (10, 0.9, 1.0, 9, 1)])
def test_dense_noise_keeps_a_clean_token_before_every_span(length, density, mu, noise, spans):
  # Alternation starting with clean needs a clean token per span: at most length - num_noise spans (section 4's
  # clamp), e.g. 6 noise tokens of 8 at mu 1 in 2 spans, not 6.
  assert D.span_counts(length, density, mu) == (noise, spans)
  for key in range(5):
    m = D.noise_mask(length, density, mu, key)
    starts = m & ~np.concatenate([[False], m[:-1]])
    assert len(m) == length and m.sum() == noise and starts.sum() == spans and not m[0] and m[-1]


def test_prefix_lm_lengths_by_hand():
  # A chunk of 100 split into a prefix and a suffix of 1..2 * round(100 * 0.25) - 1 = 49 tokens: the prefix is at
  # most 99 tokens, plus EOS 100; the suffix at most 49, plus EOS 50. So 100 raw tokens fit inputs of exactly 100.
  s = BY_NAME['S_r0.25']
  assert D.max_lengths(s, 100) == (100, 50) and D.max_lengths(s, 100, 4) == (104, 50)
  assert D.raw_length(s, 100, 512) == 100


def test_prefix_lm_above_half_density_keeps_its_mean():
  # m = round(512 * 0.75) = 384: clamping only the top of [1, 2m - 1] at 511 drew t on [1, 511], mean density 0.5 for
  # any density above 1/2. The range is [2m - 511, 511] = [257, 511] instead: mean 384, and the prefix is at most 255.
  s = D.Denoiser('S_r0.75', 0.75, None)
  lengths = [len(D.corrupt(np.arange(3, 515, dtype=np.int32), s, key, V)[1]) for key in range(2000)]
  assert min(lengths) >= 257 and max(lengths) <= 511
  assert np.mean(lengths) / 512 == pytest.approx(0.75, abs=0.01)
  assert D.max_lengths(s, 512) == (512 - 257 + 1, 512)


def test_prefix_lm_gets_its_mode_tokens_too():
  s, mode = BY_NAME['S_r0.25'], np.array([784, 567, 134, 908], np.int32)
  tokens = np.arange(3, 203, dtype=np.int32)
  inputs, targets = D.corrupt(tokens, s, 5, V, mode)
  plain = D.corrupt(tokens, s, 5, V)
  np.testing.assert_array_equal(inputs, np.concatenate([mode, plain[0]]))
  np.testing.assert_array_equal(targets, plain[1])
  assert D.measure(inputs, targets, s, V, 4)[0] == 200


def test_measure_ignores_eos_and_padding():
  for d in (SPAN, BY_NAME['S_r0.25']):
    tokens = np.arange(3, 103, dtype=np.int32)
    inputs, targets = D.corrupt(tokens, d, 7, V)
    want = D.measure(inputs, targets, d, V)
    pad = lambda x: np.concatenate([x, [1], np.zeros(5, np.int32)])  # EOS then padding, as fed to the model
    assert D.measure(pad(inputs), pad(targets), d, V) == want and want[0] == 100
  assert D.measure(np.array([5, 1, 0]), np.array([1, 0]), BY_NAME['S_r0.25'], V) == (1, 0, 0)  # nothing hidden


def test_noise_and_clean_spans_are_drawn_independently():
  # Half noise, so both segmentations split 30 tokens into 10 parts; with one draw for both every noise span would
  # be as long as the clean span before it.
  same = []
  for key in range(10):
    m = D.noise_mask(60, 0.5, 3.0, key)
    runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[-1], m.astype(int), [-1]]))))
    same.append(np.array_equal(runs[0::2], runs[1::2]))
  assert not all(same)


@pytest.mark.parametrize('name, match', [('span_r1_mu3', 'noise_density=1.0 must'),
                                         ('span_r0p15_mu0p5', 'mean_noise_span_length=0.5 must be at least 1')])
def test_boundary_span_parameters_are_refused(name, match):
  with pytest.raises(ValueError, match=match):
    D.objective_named(name)


@pytest.mark.parametrize('density, mean_span, match', [
    (0.15, True, 'mean_noise_span_length=True must be at least 1 token, a number'),
    (0.15, '3', "mean_noise_span_length='3' must be at least 1 token, a number"),
    ('0.15', 3.0, "noise_density='0.15' must lie strictly between 0 and 1, a number"),
    (True, 3.0, 'noise_density=True must lie strictly between 0 and 1, a number')])
def test_span_parameters_of_the_wrong_type_are_refused(density, mean_span, match):
  """mean_noise_span_length=True (1 to Python) trained spans of mean 1 without a word; strings failed a comparison
  with a bare TypeError."""
  with pytest.raises(ValueError, match=match):
    D.Denoiser('d', density, mean_span)
  assert D.Denoiser('d', np.float32(0.15), np.int64(3)).mean_noise_span_length == 3


@pytest.mark.parametrize('flag', ['False', 0, 1])
def test_mode_tokens_must_be_a_bool(flag):
  """mode_tokens='False' (a gin string, truthy) prepended UL2's mode tokens."""
  with pytest.raises(ValueError, match="True or False .no quotes.: {'mode_tokens'"):
    D.ul2(mode_tokens=flag)


def test_prefix_lm_suffix_reaches_both_ends_of_its_range():
  # By hand: 20 tokens at density 0.25 -> m = 5, suffix uniform on [1, 2m - 1] = [1, 9]; 400 draws miss a value with
  # probability about 9 * (8/9)^400. A modulus one short never drew the longest suffix (mean m - 1/2, not m).
  s = D.Denoiser('S', 0.25, None)
  lengths = {len(D.corrupt(np.arange(3, 23, dtype=np.int32), s, key, V)[1]) for key in range(400)}
  assert lengths == set(range(1, 10))


def test_sentinel_overflow_starts_past_the_last_extra_id():
  # 2000 raw tokens at (mu 3, r 0.15): 300 noise tokens in 100 spans, sentinels 32099..32000, all extra ids: no
  # overflow. 2020 raw: 303 noise tokens, 101 spans, the last sentinel 31999 is an ordinary token.
  span = D.span_corruption()
  assert D.span_counts(2000, 0.15, 3.0) == (300, 100) and D.span_counts(2020, 0.15, 3.0) == (303, 101)
  assert D.warn_if_sentinels_overflow(span, [2000], 100) == []
  assert D.warn_if_sentinels_overflow(span, [2020], 100) == ['span']


def test_rates_must_have_a_positive_sum():
  # All zero rates leave no distribution to draw from (the normalised CDF is NaN and every draw fell on the first).
  with pytest.raises(ValueError, match='positive sum'):
    D.ul2((0.0,) * 7)


def test_single_token_spans_are_a_valid_mean():
  # "at least 1 token": mean span 1 (every noise token its own span, as in BERT-style masking) is allowed.
  assert D.Denoiser('mu1', 0.15, 1.0).mean_noise_span_length == 1.0
  assert D.objective_named('span_r0p15_mu1') == D.span_corruption(0.15, 1.0)


def test_ul2_name_depends_on_which_denoiser_gets_which_rate():
  # The same multiset of rates on other denoisers is another objective (here S at 0.13, R_mu3 at 0.22): not 'ul2'.
  assert D.ul2((0.22,) + (0.13,) * 6).name != 'ul2'
  assert D.ul2(tuple(D.UL2_RATES)).name == 'ul2'


def test_only_span_r_names_parse_as_span_objectives():
  with pytest.raises(ValueError, match="Unknown objective 'span_q0p5_mu8'"):
    D.objective_named('span_q0p5_mu8')


def test_one_token_chunk_keeps_its_mode_tokens():
  # Nothing to hide in a 1-token chunk, but the inputs still start with the denoiser's mode, as every other example.
  mode = np.array([784, 567, 9138, 908], np.int32)
  inputs, targets = D.corrupt(np.array([7], np.int32), SPAN, 0, V, mode)
  assert inputs.tolist() == [784, 567, 9138, 908, 7] and targets.tolist() == []
