"""Denoising objectives in numpy: T5 span corruption, UL2's mixture of denoisers (R, X, S), mode tokens.

One raw chunk of source tokens -> (inputs, targets), both without EOS. Span corruption (T5, Raffel et al. 2020):
num_noise = round(L * density) (clamped to [1, L-1]) tokens in num_spans = round(num_noise / mean_span) spans
(clamped to [1, min(num_noise, L - num_noise)]); clean and noise spans alternate starting with clean; each noise span
becomes one sentinel in the inputs (sentinels count down from vocab_size - 1), the targets are each sentinel
followed by its span. Prefix LM (UL2's S): the chunk is split in two, inputs = prefix, targets = suffix; the suffix
length t is uniform on [1, 2m - 1] with m = round(L * density), so the mean noise density is `density` (above 1/2,
where 2m - 1 would pass L - 1, on [2m - L + 1, L - 1]: still centred on m).

All randomness comes from `hashing` keyed by a per-example key, so an example is a pure function of (tokens, key).
With mode tokens on, the denoiser's mode (plain text, e.g. '[NLU]') is tokenised and prepended to the inputs.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import numpy as np

from repeat_lm import checks
from repeat_lm.data import hashing

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Denoiser:
  name: str
  noise_density: float
  mean_noise_span_length: float | None = 3.0  # None: prefix LM (one span: the suffix)
  mode: str = ''  # UL2 paradigm token, prepended as text when the objective's mode tokens are on

  def __post_init__(self):
    check_noise(self.noise_density, self.mean_noise_span_length, f'Denoiser {self.name!r}')

  @property
  def prefix_lm(self) -> bool:
    return self.mean_noise_span_length is None


def check_noise(noise_density: float, mean_noise_span_length: float | None, what: str) -> None:
  """The span settings a Denoiser accepts, also checked by the SeqIO span-corruption functions (objectives.py) that
  take them as plain numbers: a density of 1 made `random_spans_lengths` loop forever, a negative one or a negative
  mean span gave chunk lengths of another objective without a word, and a mean span of 0 a ZeroDivisionError. Numbers
  only (an infinite mean span is one span): a string failed the comparison with a bare TypeError, and True passed
  as a mean span of 1 token."""
  if not checks.real_number(noise_density) or not 0 < noise_density < 1:
    raise ValueError(f'{what}: noise_density={noise_density!r} must lie strictly between 0 and 1, a number (the '
                     'share of tokens hidden; T5 uses 0.15).')
  span = mean_noise_span_length
  if span is not None and not (checks.real_number(span) and span >= 1):
    raise ValueError(f'{what}: mean_noise_span_length={mean_noise_span_length!r} must be at least 1 token, a number '
                     '(T5 uses 3), or None for a prefix LM.')


@dataclasses.dataclass(frozen=True)
class Objective:
  """A set of denoisers and the probability of each (one is drawn per example)."""
  name: str
  denoisers: tuple[Denoiser, ...]
  rates: tuple[float, ...] = (1.0,)
  mode_tokens: bool = False

  def __post_init__(self):
    if len(self.denoisers) != len(self.rates) or not self.denoisers:
      raise ValueError(f'{len(self.denoisers)} denoisers but {len(self.rates)} rates.')
    check_rates(self.rates)
    # A gin string 'False' is truthy: mode_tokens='False' prepended the UL2 mode tokens.
    checks.check_bools(self, ('mode_tokens',))


def check_rates(rates: tuple[float, ...], what: str = 'Rates') -> None:
  """Sampling rates (an objective's denoisers, a mixture's tasks) are normalised by their sum: a NaN, infinite or
  negative rate, or a zero sum, leaves no distribution (a mixture with such rates was registered and failed at its
  first batch with numpy's 'repeats may not contain negative values'; rates (-1, -1) trained as (0.5, 0.5))."""
  if not all(np.isfinite(r) and r >= 0 for r in rates) or sum(rates) <= 0:
    raise ValueError(f'{what} must be finite and >= 0 with a positive sum, got {rates}.')


def span_corruption(noise_density: float = 0.15, mean_noise_span_length: float = 3.0) -> Objective:
  name = 'span' if (noise_density, mean_noise_span_length) == (0.15, 3.0) else \
      f'span_r{noise_density:g}_mu{mean_noise_span_length:g}'.replace('.', 'p')
  return Objective(name, (Denoiser('span', noise_density, mean_noise_span_length),))


# UL2 (Tay et al. 2022): R = regular span corruption, X = extreme (long spans or high density), S = prefix LM.
UL2_DENOISERS = (
    Denoiser('R_mu3_r0.15', 0.15, 3.0, '[NLU]'),
    Denoiser('R_mu8_r0.15', 0.15, 8.0, '[NLU]'),
    Denoiser('X_mu3_r0.5', 0.5, 3.0, '[NLG]'),
    Denoiser('X_mu8_r0.5', 0.5, 8.0, '[NLG]'),
    Denoiser('X_mu64_r0.15', 0.15, 64.0, '[NLG]'),
    Denoiser('X_mu64_r0.5', 0.5, 64.0, '[NLG]'),
    Denoiser('S_r0.25', 0.25, None, '[S2S]'),
)
UL2_RATES = (0.13,) * 6 + (0.22,)


def ul2(rates: tuple[float, ...] = UL2_RATES, mode_tokens: bool = True) -> Objective:
  rates = tuple(float(r) for r in rates)
  name = 'ul2' if rates == UL2_RATES else f'ul2_{hashing.derive(*map(str, rates)) & 0xFFFFFFFF:08x}'
  return Objective(name, UL2_DENOISERS, rates, mode_tokens)


def objective_named(name: str) -> Objective:
  """'span', 'span_r0p5_mu8', 'ul2': the objectives a task name can spell (custom UL2 rates need `ul2()`)."""
  if name == 'ul2':
    return ul2()
  if name == 'span':
    return span_corruption()
  if name.startswith('span_r') and '_mu' in name:
    try:  # 'span_rabc_mu3': float's own error ("could not convert string to float: 'abc'") named no objective
      values = [float(x.replace('p', '.')) for x in name[len('span_r'):].split('_mu')]
    except ValueError:
      values = []
    if len(values) == 2:  # not 'span_r0p5_mu8_mu3'
      return span_corruption(*values)
  raise ValueError(f"Unknown objective {name!r}: use 'span', 'span_r<density>_mu<mean span>' (p for the decimal "
                   "point, e.g. span_r0p5_mu8) or 'ul2'.")


# ---------------------------------------------------------------------------------------------------- lengths


def span_counts(length: int, density: float, mean_span: float) -> tuple[int, int]:
  """(num_noise, num_spans) for a chunk of `length` tokens; Python rounds half to even, as numpy does below."""
  if length < 2:
    return 0, 0
  num_noise = min(max(int(round(length * density)), 1), length - 1)
  num_spans = min(max(int(round(num_noise / mean_span)), 1), num_noise, length - num_noise)
  return num_noise, num_spans


def _prefix_targets(length: int, density: float) -> tuple[int, int]:
  """(shortest, longest) suffix a prefix-LM chunk of `length` tokens draws: a range centred on m = round(L * density).

  Clamping only the top at L - 1 would pull the mean down to L / 2 for any density above 1/2, so the bottom rises
  with it."""
  if length < 2:
    return 0, 0
  m = min(max(int(round(length * density)), 1), length - 1)
  longest = min(2 * m - 1, length - 1)
  return 2 * m - longest, longest


def max_lengths(d: Denoiser, raw_length: int, mode_length: int = 0) -> tuple[int, int]:
  """(inputs, targets) lengths, each with one EOS, of the longest example a raw chunk of `raw_length` can give."""
  if d.prefix_lm:
    shortest, longest = _prefix_targets(raw_length, d.noise_density)
    return mode_length + raw_length - shortest + 1, longest + 1
  num_noise, num_spans = span_counts(raw_length, d.noise_density, d.mean_noise_span_length)
  return mode_length + raw_length - num_noise + num_spans + 1, num_noise + num_spans + 1


@functools.lru_cache(maxsize=256)
def raw_length(d: Denoiser, inputs_length: int, targets_length: int, mode_length: int = 0) -> int:
  """The longest raw chunk whose example fits both feature lengths (EOS and mode tokens included).

  Span corruption at 512/114 -> 568 (T5); at 512/512 the UL2 X denoisers give 766, 908, 1006 and (mu 64, r 0.15)
  600, as T5's arithmetic gives. Shorter chunks always fit too (both lengths are non-decreasing in the raw
  length), so the last, shorter chunk of an epoch needs no special case.
  """
  best, n = 0, 1
  while True:  # the lengths that fit are a prefix 1..best, since both lengths only grow with n
    inputs, targets = max_lengths(d, n, mode_length)
    if inputs > inputs_length or targets > targets_length:
      break
    best, n = n, n + 1
  if best < 2:
    raise ValueError(f'Feature lengths inputs={inputs_length}, targets={targets_length} are too short for denoiser '
                     f'{d.name} (with {mode_length} mode tokens): no chunk of 2+ tokens fits.')
  return best


def warn_if_sentinels_overflow(objective: Objective, raw_lengths, extra_ids: int) -> list[str]:
  """Logs (and returns) the denoisers whose full chunk has more noise spans than `extra_ids`: their later sentinels
  count on down into ordinary token ids, as in T5 (e.g. mu 3, r 0.5 at 512/512: 127-128 spans, 100 extra ids)."""
  over = []
  for d, raw in zip(objective.denoisers, raw_lengths):
    if d.prefix_lm:
      continue
    spans = span_counts(int(raw), d.noise_density, d.mean_noise_span_length)[1]
    if spans > extra_ids:
      over.append(d.name)
      log.warning('Denoiser %s: %d noise spans per %d-token chunk but only %d extra ids: the last %d sentinels reuse '
                  'ordinary token ids.', d.name, spans, raw, extra_ids, spans - extra_ids)
  return over


# ---------------------------------------------------------------------------------------------------- corruption


def _segment_lengths(num_items: int, num_segments: int, key: int) -> np.ndarray:
  """A uniformly random composition of `num_items` into `num_segments` positive parts."""
  if num_segments <= 1:
    return np.array([num_items], np.int64)
  scores = hashing.bits(key, np.arange(num_items - 1))
  cuts = np.sort(np.argpartition(scores, num_segments - 2)[:num_segments - 1]) + 1
  return np.diff(np.concatenate([[0], cuts, [num_items]]))


def noise_mask(length: int, noise_density: float, mean_noise_span_length: float, key: int) -> np.ndarray:
  """bool [length], True on noise; clean and noise spans alternate starting with clean (so it ends with noise)."""
  num_noise, num_spans = span_counts(length, noise_density, mean_noise_span_length)
  if num_noise == 0:
    return np.zeros(length, bool)
  noise = _segment_lengths(num_noise, num_spans, hashing.derive(key, 'noise'))
  clean = _segment_lengths(length - num_noise, num_spans, hashing.derive(key, 'clean'))
  spans = np.stack([clean, noise], axis=1).reshape(-1)
  return np.repeat(np.tile([False, True], num_spans), spans)


def _replace_runs(tokens: np.ndarray, runs: np.ndarray, vocab_size: int) -> np.ndarray:
  """Each run of True in `runs` -> one sentinel (vocab_size - 1, vocab_size - 2, ...); other tokens kept."""
  first = runs & ~np.concatenate([[False], runs[:-1]])
  sentinels = vocab_size - np.cumsum(first)
  return np.where(first, sentinels, tokens)[~runs | first].astype(tokens.dtype)


def corrupt(tokens: np.ndarray, d: Denoiser, key: int, vocab_size: int,
            mode_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Raw chunk -> (inputs, targets), int32, no EOS. The same (tokens, d, key) always gives the same example."""
  tokens = np.asarray(tokens, np.int32)
  mode_ids = np.zeros([0], np.int32) if mode_ids is None else np.asarray(mode_ids, np.int32)
  n = len(tokens)
  if d.prefix_lm:
    lo, hi = _prefix_targets(n, d.noise_density)
    t = 0 if hi == 0 else lo + int(hashing.bits(hashing.derive(key, 'split'), 0) % np.uint64(hi - lo + 1))
    return np.concatenate([mode_ids, tokens[:n - t]]), tokens[n - t:]
  noise = noise_mask(n, d.noise_density, d.mean_noise_span_length, key)
  if not noise.any():  # a 1-token chunk: nothing to hide
    return np.concatenate([mode_ids, tokens]), tokens[:0]
  inputs = _replace_runs(tokens, noise, vocab_size)
  targets = _replace_runs(tokens, ~noise, vocab_size)
  return np.concatenate([mode_ids, inputs]), targets


def measure(inputs: np.ndarray, targets: np.ndarray, d: Denoiser, vocab_size: int,
            mode_length: int = 0, strip: bool = True) -> tuple[int, int, int]:
  """(raw tokens, noise tokens, noise spans) read back from an example.

  strip: drop T5's padding (0) and EOS (1) first, as in a model row; False for an example as `corrupt` makes it (no
  EOS, no padding), whose vocabulary may use ids 0 and 1 for text (SentencePiece's own default has unk 0 or 1).
  """
  inputs, targets = np.asarray(inputs)[mode_length:], np.asarray(targets)
  if strip:
    inputs, targets = inputs[inputs > 1], targets[targets > 1]
  if d.prefix_lm:
    return len(inputs) + len(targets), len(targets), int(len(targets) > 0)
  spans, expected = 0, vocab_size - 1
  for t in targets.tolist():  # sentinels appear in order, so a sentinel is exactly the next expected id
    if t == expected:
      spans, expected = spans + 1, expected - 1
  noise = len(targets) - spans
  return len(inputs) - spans + noise, noise, spans
