"""Index-based streams on a synthetic store whose every token is unique, so where each token went is checkable."""

import collections

import numpy as np
import pytest

from repeat_lm.data import denoisers as D
from repeat_lm.data import objectives, plan
from repeat_lm.data.subset import TokenStore

V = 40_000  # tokens are 3..~10,000: everything above is free for sentinels


def make_store(num_docs=60, seed=0):
  lengths = np.random.default_rng(seed).integers(1, 300, size=num_docs)
  offsets = np.concatenate([[0], np.cumsum(lengths)])
  return TokenStore(np.arange(3, 3 + offsets[-1]).astype(np.int32), offsets, {'fingerprint': 'synthetic'})


def stream(store, objective=None, **kwargs):
  kwargs = {'seed': 1, 'epochs': 3, **kwargs}
  return plan.Stream(store, objective or D.span_corruption(), 64, 16, V, None, **kwargs)


def epoch_tokens(s, epoch):
  r = s.examples_per_epoch
  return np.concatenate([s.raw(g) for g in range(epoch * r, (epoch + 1) * r)])


def test_layout_covers_the_stream_exactly(monkeypatch):
  monkeypatch.setattr(plan, '_BLOCK', 8)  # many blocks, so block boundaries are exercised
  for raw_lengths, rates in [([70], [1.0]), ([70, 13, 200], [0.5, 0.3, 0.2])]:
    layout = plan.Layout(5000, raw_lengths, rates, seed=3)
    examples = [layout.example(j) for j in range(layout.num_examples)]
    starts, ends = np.array([e[0] for e in examples]), np.array([e[1] for e in examples])
    assert starts[0] == 0 and ends[-1] == 5000 and (starts[1:] == ends[:-1]).all()
    lengths = np.asarray(raw_lengths)[[e[2] for e in examples]]
    assert ((ends - starts)[:-1] == lengths[:-1]).all() and 0 < ends[-1] - starts[-1] <= lengths[-1]
    with pytest.raises(IndexError):
      layout.example(layout.num_examples)


def test_layout_draws_each_denoiser_at_its_rate():
  # UL2's mixture (reference.md section 4): 0.13 for each R/X denoiser, 0.22 for S, one draw per example.
  layout = plan.Layout(2_000_000, [70, 13, 200, 90, 100, 120, 140], D.UL2_RATES, seed=3)
  draws = np.array([layout.example(j)[2] for j in range(layout.num_examples)])
  n = len(draws)
  assert n > 10_000
  rates = np.asarray(D.UL2_RATES) / sum(D.UL2_RATES)
  np.testing.assert_allclose(np.bincount(draws, minlength=7) / n, rates, atol=5 * np.sqrt(0.25 / n))


@pytest.mark.parametrize('objective', [D.span_corruption(), D.ul2(mode_tokens=False)])
def test_every_epoch_is_the_whole_subset_in_a_new_document_order(objective):
  store = make_store()
  s = stream(store, objective)
  orders = []
  for e in range(3):
    tokens = epoch_tokens(s, e)
    assert len(tokens) == store.num_tokens and sorted(tokens.tolist()) == store.tokens.tolist()
    docs = [d for g in range(e * s.examples_per_epoch, (e + 1) * s.examples_per_epoch) for d, _, _ in s.pieces(g)]
    order = list(dict.fromkeys(docs))  # documents in the order the epoch reads them
    assert sorted(order) == list(range(store.num_documents))
    np.testing.assert_array_equal(tokens, np.concatenate([store.document(d) for d in order]))
    orders.append(order)
  assert orders[0] != orders[1] != orders[2]
  assert s.total_examples == 3 * s.examples_per_epoch
  with pytest.raises(IndexError):
    s.example(s.total_examples)


def noise_by_token(s, g):
  """token id -> was it noise, for example g (tokens are unique, so ids are positions in the subset)."""
  ex = s.example(g)
  raw = s.raw(g)
  first = V - 100
  rebuilt = objectives.uncorrupt(ex.inputs, ex.targets, 10_000)
  assert rebuilt == raw.tolist() and first > 10_000
  clean = set(ex.inputs.tolist())
  return {t: t not in clean for t in raw.tolist()}


@pytest.mark.parametrize('static', [False, True])
def test_masks_per_epoch_dynamic_or_static(static):
  s = stream(make_store(), static_masks=static)
  r = s.examples_per_epoch
  epochs = [dict(collections.ChainMap(*[noise_by_token(s, g) for g in range(e * r, (e + 1) * r)])) for e in (0, 1)]
  assert epochs[0].keys() == epochs[1].keys()
  same = sum(epochs[0][t] == epochs[1][t] for t in epochs[0]) / len(epochs[0])
  if static:  # the same examples, masked once, in a new order
    assert same == 1.0
    assert [tuple(s.example(g).inputs) for g in range(r)] != [tuple(s.example(g).inputs) for g in range(r, 2 * r)]
    assert sorted(tuple(s.example(g).inputs) for g in range(r)) == sorted(tuple(s.example(g).inputs)
                                                                          for g in range(r, 2 * r))
  else:  # every token's noise is redrawn: agreement only by chance (0.85^2 + 0.15^2 = 0.745)
    assert same < 0.8


def test_dynamic_masks_are_redrawn_even_when_the_text_stays_in_place():
  # One document: every epoch's stream is the same text at the same offsets, so only the (seed, epoch, j) mask key
  # can redraw the masks; keyed by (seed, j) alone, dynamic masks were the static ones here.
  store = TokenStore(np.arange(3, 2003).astype(np.int32), np.array([0, 2000]), {'fingerprint': 'one document'})
  s = stream(store)
  r = s.examples_per_epoch
  epochs = [dict(collections.ChainMap(*[noise_by_token(s, g) for g in range(e * r, (e + 1) * r)])) for e in (0, 1)]
  assert sum(epochs[0][t] == epochs[1][t] for t in epochs[0]) / len(epochs[0]) < 0.8


def test_unshuffled_is_source_order_and_one_pass():
  store = make_store()
  s = stream(store, shuffle=False, epochs=1)
  np.testing.assert_array_equal(epoch_tokens(s, 0), store.tokens)


def test_same_seed_same_examples_other_seed_other_examples():
  store = make_store()
  a, b, c = stream(store), stream(store), stream(store, seed=2)
  for g in [0, 5, a.examples_per_epoch + 3]:
    assert np.array_equal(a.example(g).inputs, b.example(g).inputs)
  assert any(not np.array_equal(a.example(g).inputs, c.example(g).inputs) for g in range(5))


@pytest.mark.parametrize('kwargs', [{}, {'static_masks': True}, {'shuffle': False}])
def test_an_example_costs_no_pass_over_every_document(kwargs):
  # `doc_lengths` diffs all offsets: once per epoch order is fine, once per example piece is O(documents) each
  # (18 s per 128-row batch at 20M documents; the 2^35 baseline has ~70M).
  diffs = []

  class CountingStore(TokenStore):
    @property
    def doc_lengths(self):
      diffs.append(1)
      return super().doc_lengths

  base = make_store()
  s = stream(CountingStore(base.tokens, base.offsets, base.info), **kwargs)
  s.example(0)  # the epoch's orders, drawn once
  before = len(diffs)
  for g in range(1, s.examples_per_epoch):
    s.example(g)
  assert len(diffs) == before


def test_examples_fit_the_feature_lengths():
  s = plan.Stream(make_store(), D.ul2(), 64, 16, V, [np.array([5, 6, 7], np.int32)] * 7, seed=1, epochs=1)
  for g in range(s.total_examples):
    ex = s.example(g)
    assert len(ex.inputs) + 1 <= 64 and len(ex.targets) + 1 <= 16
    assert ex.inputs[:3].tolist() == [5, 6, 7]


def test_mixture_interleaves_exactly():
  store = make_store()
  a, b = stream(store, epochs=2), stream(store, seed=5, epochs=None)
  m = plan.MixtureStream([a, b], [0.25, 0.75], seed=0, block=64)
  assert m.quotas.tolist() == [16, 48]
  # Largest remainder: 0.3 x 64 = 19.2 and 0.7 x 64 = 44.8 round to 19 and 45 (the spare row goes to the larger
  # remainder); 64 / 3 = 21.33 each gives the one spare row to the first.
  assert plan.MixtureStream([a, b], [0.3, 0.7], seed=0, block=64).quotas.tolist() == [19, 45]
  assert plan.MixtureStream([a, b, a], [1, 1, 1], seed=0, block=64).quotas.tolist() == [22, 21, 21]
  seen = collections.defaultdict(list)
  for g in range(640):
    t, i = m.locate(g)
    seen[t].append(i)
  assert seen[0] == list(range(160)) and seen[1] == list(range(480))  # each stream read in order, nothing skipped
  # It ends where the finite stream ends: the next row would be a's example past its last.
  counts = collections.Counter(m.locate(g)[0] for g in range(m.total_examples))
  assert counts[0] == a.total_examples
  with pytest.raises(IndexError):
    m.locate(m.total_examples)


def test_a_stream_ending_on_an_example_boundary_has_no_empty_example():
  # Cut the stream exactly where example 10 starts: the same draws (same seed) give exactly examples 0..9, the last
  # ending at the cut; counting the boundary offset as an example added an 11th, empty one.
  cut = plan.Layout(5000, [70, 13, 200], [0.5, 0.3, 0.2], seed=3).example(10)[0]
  layout = plan.Layout(cut, [70, 13, 200], [0.5, 0.3, 0.2], seed=3)
  assert layout.num_examples == 10 and layout.example(9)[1] == cut


def test_negative_indices_are_refused():
  s = stream(make_store())
  m = plan.MixtureStream([s, stream(make_store(), epochs=None)], [1, 1], seed=0, block=64)
  for locate in (s.locate, m.locate):
    with pytest.raises(IndexError):
      locate(-1)


@pytest.mark.parametrize('static', [False, True])
def test_pieces_are_never_empty(static):
  # The documents an example is cut from (stats lists them): an example starting exactly at a document's end does
  # not touch that document.
  s = stream(make_store(), static_masks=static)
  for g in range(2 * s.examples_per_epoch):
    pieces = s.pieces(g)
    assert all(a < b for _, a, b in pieces) and sum(b - a for _, a, b in pieces) == len(s.raw(g))


def test_a_zero_rate_finite_stream_does_not_end_the_mixture():
  # A stream with no rows in the mixture never runs out; the mixture is as long as its other (unbounded) stream.
  m = plan.MixtureStream([stream(make_store(), epochs=1), stream(make_store(), epochs=None)], [0, 1], seed=0, block=64)
  assert m.quotas.tolist() == [0, 64] and m.total_examples is None


@pytest.mark.parametrize('rates, block', [([1.0, -0.5], 64), ([1.0, float('nan')], 64), ([0, 0], 64), ([1.0], 64),
                                          ([1, 1], 0), ([1, 1], 10.5)])
def test_a_mixture_refuses_rates_and_blocks_repeated_mixture_would(rates, block):
  # Rates (1, -0.5), (1, NaN) and (0, 0) failed with numpy's 'repeats may not contain negative values', block 0 with
  # a ZeroDivisionError, 10.5 with a slice TypeError.
  streams = [stream(make_store(), epochs=None), stream(make_store(), seed=5, epochs=None)]
  with pytest.raises(ValueError, match='rates|block'):
    plan.MixtureStream(streams, rates, seed=0, block=block)


def test_raw_length_is_the_example_s_own_chunk_with_static_masks():
  # Static masks visit the layout's examples in a new order each epoch: raw_length(g) must follow that order (the
  # per-step token count), not the example's position in it. UL2's raw lengths differ per denoiser.
  s = stream(make_store(), D.ul2(mode_tokens=False), static_masks=True, epochs=2)
  assert all(s.raw_length(g) == len(s.raw(g)) for g in range(s.total_examples))


def test_unshuffled_passes_repeat_the_same_examples():
  # Evaluation (shuffle=False): source order and masks from (seed, j), so a second pass is the first one again.
  s = stream(make_store(), shuffle=False, epochs=2)
  r = s.examples_per_epoch
  for g in range(r):
    a, b = s.example(g), s.example(g + r)
    assert np.array_equal(a.inputs, b.inputs) and np.array_equal(a.targets, b.targets)
