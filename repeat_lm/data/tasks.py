"""SeqIO tasks over exact repeated subsets: registered by a function, or by name (the paper's grid).

A task trains on the first D tokens of a source (see `subset`) in E epochs, each epoch shuffled from (seed, epoch),
with span corruption or UL2 (see `denoisers`), masks re-drawn per epoch (dynamic) or fixed (static); see `plan`.
Its 'validation' split is the source's validation split (or a local corpus's held-out documents), capped at
`validation_tokens`, so evaluation never sees training text.

By function (gin: `MIXTURE_OR_TASK_NAME = @tasks.repeated_task()` plus `tasks.repeated_task.<arg> = ...`):
  repeated_task(source='c4', unique_tokens=2**27, epochs=2**8)   # or total_tokens=2**35 instead of epochs
  repeated_task(corpus='/data/my.jsonl.gz', vocabulary='/data/spm.model', unique_tokens=2**20, epochs=4)
By name (gin: `MIXTURE_OR_TASK_NAME = 'repeat_lm.c4.t5.span.d27.e8'`), registered on first use:
  repeat_lm.<source>.<vocab>.<objective>.<D>.<E>[.static][.nomode][.v<k>]
  source: c4 (TFDS c4/en:3.0.1), c4v310 (c4/en:3.1.0), wikipedia (TFDS wikipedia/20230601.en), wiki (the local
    default corpus), or a name added with `register_source`; vocab: t5, wiki8k (or `register_vocabulary`);
  objective: span (r 0.15, mu 3), span_r<r>_mu<mu> ('p' for the decimal point), ul2;
  D: d<k> = 2^k unique tokens, dn<n> = n tokens, dall = the whole train split;
  E: e<k> = 2^k epochs, en<n> = n epochs, einf = unbounded, t<k> / tn<n> = a total budget of 2^k / n tokens (E = T/D);
  .static: masks fixed across epochs; .nomode: UL2 without mode tokens; .v<k>: validation capped at 2^k tokens.
The fresh baseline of a budget is D = T: repeat_lm.c4.t5.span.d35.e0 against repeat_lm.c4.t5.span.d27.e8.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from repeat_lm import checks
from repeat_lm.data import denoisers as den_lib
from repeat_lm.data import hashing, plan, sources, subset, tfds_text, vocab as vocab_lib

log = logging.getLogger(__name__)

WIKI_TASK = 'repeat_lm.wiki_span_corruption'
DEFAULT_VALIDATION_TOKENS = 1 << 22  # ~7,400 examples of 568 tokens: 20 eval batches of 128 use a third of it

# Sources and vocabularies a task name can spell. Objects only: nothing is read or loaded until a task is used.
SOURCES: dict[str, subset.TextSource] = {
    'c4': tfds_text.TfdsText('c4/en:3.0.1'),
    'c4v310': tfds_text.TfdsText('c4/en:3.1.0'),
    'wikipedia': tfds_text.TfdsText('wikipedia/20230601.en', train_split='train[:99%]',
                                    validation_split='train[99%:]'),
    'wiki': sources.LocalText('wiki'),
}
VOCABULARIES: dict[str, Callable[[], seqio.Vocabulary]] = {
    't5': vocab_lib.t5_vocabulary,
    'wiki8k': vocab_lib.default_vocabulary,
}


@dataclasses.dataclass(frozen=True)
class RepeatedSpec:
  source: subset.TextSource
  source_name: str
  vocab_name: str
  objective: den_lib.Objective
  unique_tokens: int | None  # None: the whole train split
  epochs: int | None  # None: unbounded
  static_masks: bool = False
  validation_tokens: int = DEFAULT_VALIDATION_TOKENS
  vocabulary: seqio.Vocabulary = dataclasses.field(default=None, compare=False, repr=False)


_SPECS: dict[str, RepeatedSpec] = {}
_MIXTURES: dict[str, tuple[tuple[str, ...], tuple[float, ...]]] = {}
_LOCK = threading.RLock()


def register_source(name: str, source: subset.TextSource) -> None:
  """Makes `name` usable as the <source> of task names, e.g. a local C4 copy: register_source('c4local', ...)."""
  if not re.fullmatch(r'[A-Za-z0-9]+', name):
    raise ValueError(f'Source names are letters and digits, got {name!r}.')
  SOURCES[name] = source


def register_vocabulary(name: str, factory: Callable[[], seqio.Vocabulary]) -> None:
  if not re.fullmatch(r'[A-Za-z0-9]+', name):
    raise ValueError(f'Vocabulary names are letters and digits, got {name!r}.')
  VOCABULARIES[name] = factory


# ---------------------------------------------------------------------------------------------------- names


def _count(prefix: str, n: int | None, unbounded: str) -> str:
  if n is None:
    return f'{prefix}{unbounded}'
  return f'{prefix}{n.bit_length() - 1}' if n & (n - 1) == 0 else f'{prefix}n{n}'


def task_name(spec: RepeatedSpec) -> str:
  parts = ['repeat_lm', spec.source_name, spec.vocab_name, spec.objective.name,
           _count('d', spec.unique_tokens, 'all'), _count('e', spec.epochs, 'inf')]
  if spec.static_masks:
    parts.append('static')
  if any(d.mode for d in spec.objective.denoisers) and not spec.objective.mode_tokens:
    parts.append('nomode')
  if spec.validation_tokens != DEFAULT_VALIDATION_TOKENS:
    parts.append(_count('v', spec.validation_tokens, ''))
  return '.'.join(parts)


_NAME = re.compile(r'repeat_lm\.(?P<source>[A-Za-z0-9]+)\.(?P<vocab>[A-Za-z0-9]+)\.(?P<objective>\w+)'
                   r'\.d(?P<d>\d+|n\d+|all)\.(?P<e>e(\d+|n\d+|inf)|t(\d+|n\d+))(?P<flags>(\.(static|nomode|vn?\d+))*)')


def _parse_count(text: str) -> int | None:
  if text in ('all', 'inf'):
    return None
  return int(text[1:]) if text.startswith('n') else 1 << int(text)


def parse_name(name: str) -> dict | None:
  """The `repeated_task` arguments a task name spells, or None if it does not follow the scheme."""
  m = _NAME.fullmatch(name)
  if not m:
    return None
  flags = [f for f in m['flags'].split('.') if f]
  kwargs = {'source': m['source'], 'vocabulary': m['vocab'], 'objective': m['objective'],
            'unique_tokens': _parse_count(m['d']), 'static_masks': 'static' in flags,
            'mode_tokens': 'nomode' not in flags}
  kind, count = m['e'][0], _parse_count(m['e'][1:])
  kwargs['epochs' if kind == 'e' else 'total_tokens'] = count
  for f in flags:
    if f.startswith('v'):
      kwargs['validation_tokens'] = _parse_count(f[1:])
  return kwargs


def ensure_registered(name: str) -> str:
  """Registers `name` from the naming scheme if no task or mixture has that name yet."""
  with _LOCK:
    if name in seqio.TaskRegistry.names() or name in seqio.MixtureRegistry.names():
      return name
    kwargs = parse_name(name)
    if kwargs is None:
      # The fine-tuning tasks register on import, which the trainer's gin does; `data stats` and others reported
      # 'repeat_lm.squad_v1' as a name that does not exist.
      from repeat_lm.data import downstream  # pylint: disable=import-outside-toplevel,unused-import
      if name in seqio.TaskRegistry.names() or name in seqio.MixtureRegistry.names():
        return name
      raise ValueError(f'No SeqIO task or mixture named {name!r}, and the name does not follow repeat_lm\'s scheme '
                       "'repeat_lm.<source>.<vocab>.<objective>.d<k>.e<k>' (see docs/data.md).")
    kinds = [f if f in ('static', 'nomode') else 'v<k>' for f in _NAME.fullmatch(name)['flags'].split('.') if f]
    twice = sorted({k for k in kinds if kinds.count(k) > 1})
    if twice:  # '.static.static' or '.v10.v12' (which cap?) registered without a word; parse_name still reads them
      raise ValueError(f'Task name {name!r} gives the flag(s) {twice} more than once; give each at most once.')
    if kwargs['vocabulary'] not in VOCABULARIES:
      raise ValueError(f"Unknown vocabulary {kwargs['vocabulary']!r} in task name {name!r}; known: "
                       f'{sorted(VOCABULARIES)} (add one with tasks.register_vocabulary).')
    registered = repeated_task(**kwargs)
    if registered != name:  # e.g. 't35' is registered under its epochs; keep the spelling the user chose too
      repeated_task(**kwargs, name=name)
    return name


# ---------------------------------------------------------------------------------------------------- registration


def _vocab_tag(vocabulary: seqio.Vocabulary) -> str:
  if isinstance(vocabulary, vocab_lib._LazyDefaultVocabulary):  # pylint: disable=protected-access
    extra = '' if vocabulary.extra_ids == vocab_lib.EXTRA_IDS else f'x{vocabulary.extra_ids}'
    return f'wiki{vocab_lib.DEFAULT_VOCAB_PIECES // 1000}k{extra}'
  if isinstance(vocabulary, seqio.SentencePieceVocabulary):
    # The private attribute: the public property may build the file, and naming must stay cheap.
    path = vocabulary._sentencepiece_model_file  # pylint: disable=protected-access
    return f'{sources.LocalText.path_tag(path)}_x{vocabulary.extra_ids}'
  return f'{type(vocabulary).__name__}_x{vocabulary.extra_ids}'  # other kinds: pass `name` to tell them apart


def _vocabulary_key(s: RepeatedSpec) -> str:
  """Which vocabulary a task uses, without reading it (registering reads nothing): its model file and extra ids for
  SentencePiece ('t5' and T5's model path are the same), else its tag."""
  if isinstance(s.vocabulary, seqio.SentencePieceVocabulary):
    path = s.vocabulary._sentencepiece_model_file  # pylint: disable=protected-access  (the property may build it)
    return f'{path} + {s.vocabulary.extra_ids} extra ids'
  return s.vocab_name


def _resolve_vocabulary(vocabulary, source: subset.TextSource) -> tuple[str, seqio.Vocabulary]:
  if vocabulary is None:
    vocabulary = 'wiki8k' if isinstance(source, sources.LocalText) else 't5'
  if isinstance(vocabulary, str):
    if vocabulary in VOCABULARIES:
      return vocabulary, VOCABULARIES[vocabulary]()
    vocabulary = vocab_lib.t5_vocabulary(vocabulary)  # a SentencePiece model path
  return _vocab_tag(vocabulary), vocabulary


def _resolve_objective(objective, mode_tokens: bool, ul2_rates) -> den_lib.Objective:
  if isinstance(objective, den_lib.Objective):
    return objective
  if objective == 'ul2':
    return den_lib.ul2(tuple(ul2_rates) if ul2_rates is not None else den_lib.UL2_RATES, mode_tokens)
  # UL2's settings on another objective: ul2_rates used to turn it into UL2 (a gin that kept the rates bound while
  # switching `objective` to 'span' trained the MLM arm with UL2), and mode_tokens=False (`.nomode`) did nothing.
  for setting, given in (('ul2_rates', ul2_rates is not None),
                         (f'mode_tokens={mode_tokens!r} / .nomode', mode_tokens is not True)):
    if given:
      raise ValueError(f"{setting} applies to objective='ul2' only; got objective={objective!r}: set "
                       "objective='ul2' or leave it out.")
  if objective == 'span_corruption':
    objective = 'span'
  return den_lib.objective_named(objective)


def _check_count(what: str, n: int | None) -> int | None:
  # Whole-valued floats (2.0**27) pass, as before; a bool does not: True == 1, so epochs=True (meant as "repeat")
  # registered a single-epoch task without a word. NaN, infinity and strings failed in int() naming no setting.
  exact = checks.whole_number(n) or (isinstance(n, float) and n.is_integer())
  if n is not None and not (exact and n >= 1):
    raise ValueError(f'{what} must be a positive integer (or None), got {n!r}.')
  return None if n is None else int(n)


def repeated_task(source: str | subset.TextSource = 'wiki', *, corpus: str | None = None,
                  vocabulary: str | seqio.Vocabulary | None = None, objective: str | den_lib.Objective = 'span',
                  unique_tokens: int | None = None, epochs: int | None = None, total_tokens: int | None = None,
                  static_masks: bool = False, mode_tokens: bool = True, ul2_rates: Sequence[float] | None = None,
                  validation: float | str = 0.05, validation_tokens: int = DEFAULT_VALIDATION_TOKENS,
                  name: str | None = None) -> str:
  """Registers a repeated-subset task (splits 'train', 'validation'; features 'inputs', 'targets') -> its name.

  Args:
    source: a name in `SOURCES` ('c4', 'c4v310', 'wikipedia', 'wiki') or a text source object.
    corpus: instead of `source`, a local JSONL(.gz) file, directory or glob (checked now: missing -> error).
    vocabulary: 't5', 'wiki8k', a SentencePiece model path (T5-style, 100 extra ids) or a seqio.Vocabulary;
      None: 'wiki8k' for local corpora, 't5' for TFDS sources.
    objective: 'span' (T5: r 0.15, mu 3), 'span_r<r>_mu<mu>', 'ul2', or a `denoisers.Objective`.
    unique_tokens: D, the subset's size in tokens of `vocabulary`; None: the whole train split.
    epochs: E; None: unbounded (the stream never ends). Or give `total_tokens` T (a multiple of D): E = T / D.
    static_masks: False (default): noise and document order re-drawn every epoch; True: fixed examples, re-ordered.
    mode_tokens, ul2_rates: UL2 only: prepend '[NLU]'/'[NLG]'/'[S2S]'; denoiser rates (default 0.13 x 6, 0.22).
    validation: local corpora only: held-out fraction of documents, or a separate validation corpus path.
    validation_tokens: cap on the validation split's tokens (its first documents, in order).
    name: task name; None: derived by the naming scheme above.

  Registering again with the same arguments is a no-op; different arguments under an existing name replace it.
  """
  if corpus is not None:
    text_source = sources.LocalText('wiki' if corpus == 'wiki' else corpus, validation)
    source_name = text_source.tag
  elif validation != 0.05:
    raise ValueError('`validation` applies to corpus=PATH (named sources have a fixed validation split); use '
                     "corpus='wiki' for the default corpus with another split.")
  elif isinstance(source, str):
    if source not in SOURCES:
      raise ValueError(f'Unknown source {source!r}; known: {sorted(SOURCES)} (or pass corpus=PATH).')
    text_source, source_name = SOURCES[source], source
  else:
    text_source, source_name = source, source.tag
  vocab_name, vocabulary = _resolve_vocabulary(vocabulary, text_source)
  # bool() below turned a gin string 'False' into True: fixed masks without a word.
  if not checks.is_bool(static_masks):
    raise ValueError(f'static_masks={static_masks!r} must be True or False (no quotes).')
  unique_tokens = _check_count('unique_tokens', unique_tokens)
  epochs, total_tokens = _check_count('epochs', epochs), _check_count('total_tokens', total_tokens)
  if _check_count('validation_tokens', validation_tokens) is None:
    raise ValueError('validation_tokens must be a positive integer (the validation split needs tokens), got None.')
  if total_tokens is not None:
    if unique_tokens is None or total_tokens % unique_tokens:
      raise ValueError(f'total_tokens={total_tokens} must be a multiple of unique_tokens={unique_tokens} '
                       '(E = T / D whole epochs, so every document is seen equally often).')
    if epochs is not None and epochs * unique_tokens != total_tokens:
      raise ValueError(f'epochs={epochs} x unique_tokens={unique_tokens} != total_tokens={total_tokens}.')
    epochs = total_tokens // unique_tokens
  spec = RepeatedSpec(text_source, source_name, vocab_name, _resolve_objective(objective, mode_tokens, ul2_rates),
                      unique_tokens, epochs, bool(static_masks), int(validation_tokens), vocabulary)
  name = name or task_name(spec)
  with _LOCK:
    if name in seqio.TaskRegistry.names():
      if _SPECS.get(name) == spec:
        return name
      log.info('Replacing task %s with a new spec %s', name, spec)
      seqio.TaskRegistry.remove(name)
      for key in [k for k in _STREAMS if k[0] == name]:  # streams of the old spec must not be reused
        del _STREAMS[key]
    seqio.TaskRegistry.add(
        name,
        source=_IndexSource(),
        output_features={'inputs': seqio.Feature(vocabulary, add_eos=True),
                         'targets': seqio.Feature(vocabulary, add_eos=True)},
        preprocessors=[functools.partial(repeated_examples, task_name=name),
                       seqio.preprocessors.append_eos_after_trim],
        shuffle_buffer_size=None,  # the source orders examples itself; a shuffle buffer would undo exact resume
        metric_fns=[],
    )
    _SPECS[name] = spec
  return name


def span_corruption_task(name: str | None = None, corpus: str = 'wiki', vocabulary=None,
                         noise_density: float = 0.15, mean_noise_span_length: float = 3.0,
                         validation_fraction: float = 0.05) -> str:
  """T5 span corruption over a whole local corpus's train split, unbounded epochs (a `repeated_task` shorthand)."""
  return repeated_task(corpus=corpus, vocabulary=vocabulary,
                       objective=den_lib.span_corruption(noise_density, mean_noise_span_length),
                       validation=validation_fraction, name=name)


def repeated_mixture(tasks: Sequence[str], rates: Sequence[float], name: str | None = None) -> str:
  """A SeqIO mixture of repeated tasks; repeat_lm's pipeline interleaves it deterministically (`plan.MixtureStream`)."""
  tasks, rates = tuple(ensure_registered(t) for t in tasks), tuple(float(r) for r in rates)
  if len(tasks) != len(rates) or not tasks:
    raise ValueError(f'{len(tasks)} tasks but {len(rates)} rates.')
  den_lib.check_rates(rates, 'Mixture rates')  # as an objective's: the pipeline normalises them by their sum
  # SeqIO refuses such a mixture when it reads it, but repeat_lm's pipeline interleaves the tasks' ids itself: the
  # same id would mean different text, and the trainer checks the model's vocab_size against one task's vocabulary
  # only, so a larger vocabulary's ids (sentinels at 32,099) would index past an 8,192-row embedding.
  vocabularies = {t: _vocabulary_key(_SPECS[t]) for t in tasks if t in _SPECS}
  if len(set(vocabularies.values())) > 1:
    raise ValueError(f'The tasks of a mixture must share one vocabulary, as in SeqIO; got {vocabularies}.')
  name = name or f'repeat_lm.mix.{hashing.derive(*tasks, *map(str, rates)) & 0xFFFFFFFF:08x}'
  with _LOCK:
    if name in seqio.MixtureRegistry.names():
      if _MIXTURES.get(name) == (tasks, rates):
        return name
      seqio.MixtureRegistry.remove(name)
    seqio.MixtureRegistry.add(name, list(zip(tasks, rates)))
    _MIXTURES[name] = (tasks, rates)
  return name


def spec(name: str) -> RepeatedSpec | None:
  """The spec of a repeated task (registering it from its name if needed); None for other tasks."""
  if name not in _SPECS and parse_name(name):
    ensure_registered(name)
  return _SPECS.get(name)


def mixture(name: str) -> tuple[tuple[str, ...], tuple[float, ...]] | None:
  return _MIXTURES.get(name)


# ---------------------------------------------------------------------------------------------------- streams


def store(name: str, split: str) -> subset.TokenStore:
  s = _SPECS[name]
  if split == 'train':
    return subset.get_store(s.source, 'train', s.vocabulary, s.unique_tokens, exact=True)
  if split == 'validation':
    return subset.get_store(s.source, 'validation', s.vocabulary, s.validation_tokens, exact=False)
  raise ValueError(f"Unknown split {split!r}; repeated tasks have 'train' and 'validation'.")


def mode_ids(s: RepeatedSpec) -> list[np.ndarray] | None:
  if not s.objective.mode_tokens:
    return None
  return [np.asarray(s.vocabulary.encode(d.mode) if d.mode else [], np.int32) for d in s.objective.denoisers]


_STREAMS: dict[tuple, plan.Stream] = {}


def stream(name: str, split: str, feature_lengths: Mapping[str, int], seed: int, shuffle: bool = True,
           epochs: int | None | str = 'default') -> plan.Stream:
  """The example stream of a repeated task's split (memoised).

  epochs 'default': training split shuffled -> the task's E; validation shuffled -> unbounded; unshuffled -> 1.
  """
  s = spec(name)
  if s is None:
    raise ValueError(f'{name!r} is not a repeated task.')
  if epochs == 'default':
    epochs = (s.epochs if split == 'train' else None) if shuffle else 1
  key = (name, split, feature_lengths['inputs'], feature_lengths['targets'], int(seed), bool(shuffle), epochs)
  with _LOCK:
    if key not in _STREAMS:
      if len(_STREAMS) > 32:
        _STREAMS.pop(next(iter(_STREAMS)))
      _STREAMS[key] = plan.Stream(
          store(name, split), s.objective, feature_lengths['inputs'], feature_lengths['targets'],
          s.vocabulary.vocab_size, mode_ids(s), seed=seed, shuffle=shuffle, static_masks=s.static_masks,
          epochs=epochs)
      den_lib.warn_if_sentinels_overflow(s.objective, _STREAMS[key].raw_lengths,
                                         getattr(s.vocabulary, 'extra_ids', 0) or 0)
    return _STREAMS[key]


# ---------------------------------------------------------------------------------------------------- SeqIO glue


class _IndexSource(seqio.DataSource):
  """Yields global example indices (with the seed, split and shuffle flag); `repeated_examples` makes the examples.

  A SeqIO source never learns the feature lengths, and an example's extent depends on them, so the source can only
  count. Shard i of n gets indices i, i + n, ...
  """

  def __init__(self):
    super().__init__(splits=('train', 'validation'), caching_permitted=False, performs_internal_shuffling=True)

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def list_shards(self, split: str) -> Sequence[str]:
    return [split]

  def get_dataset(self, split: str = 'train', shuffle: bool = True, seed: int | None = None,
                  shard_info: seqio.ShardInfo | None = None, **unused_kwargs) -> tf.data.Dataset:
    seed = int.from_bytes(os.urandom(4), 'little') >> 1 if seed is None else int(seed)
    index, num = (shard_info.index, shard_info.num_shards) if shard_info else (0, 1)

    def with_context(g):
      return {'index': g, 'seed': tf.constant(seed, tf.int64), 'shuffle': tf.constant(shuffle),
              'split': tf.constant(split)}

    return tf.data.Dataset.range(index, 1 << 62, num).map(with_context)


def repeated_examples(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
                      output_features: Mapping[str, seqio.Feature], *, task_name: str) -> tf.data.Dataset:
  """SeqIO preprocessor: global example index -> {'inputs', 'targets'} (no EOS), ending where the stream ends."""
  del output_features
  if not sequence_length or not sequence_length.get('inputs') or not sequence_length.get('targets'):
    raise ValueError(f"Task {task_name!r} needs sequence_length with 'inputs' and 'targets' (its raw chunk lengths "
                     'are chosen to fit them).')
  lengths = {'inputs': int(sequence_length['inputs']), 'targets': int(sequence_length['targets'])}

  def fetch(g, seed, shuffle, split):
    s = stream(task_name, split.decode(), lengths, int(seed), bool(shuffle))
    if s.total_examples is not None and g >= s.total_examples:
      return np.zeros(0, np.int32), np.zeros(0, np.int32), False
    ex = s.example(int(g))
    return ex.inputs, ex.targets, True

  def to_example(ex):
    inputs, targets, ok = tf.numpy_function(fetch, [ex['index'], ex['seed'], ex['shuffle'], ex['split']],
                                            (tf.int32, tf.int32, tf.bool), stateful=False)
    inputs.set_shape([None])
    targets.set_shape([None])
    return {'inputs': inputs, 'targets': targets, 'ok': ok}

  def valid(ex):
    return ex['ok']

  def drop_flag(ex):
    return {'inputs': ex['inputs'], 'targets': ex['targets']}

  ds = dataset.map(to_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.take_while(valid).map(drop_flag)


# Registered at import; lazy, so importing reads no corpus and trains no vocabulary.
repeated_task('wiki', name=WIKI_TASK)
