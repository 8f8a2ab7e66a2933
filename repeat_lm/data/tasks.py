"""SeqIO task registration for span-corruption pre-training.

`span_corruption_task(...)` registers a task and returns its name, so gin can write
  from __gin__ import dynamic_registration
  from repeat_lm.data import tasks
  from repeat_lm.data import vocab
  MIXTURE_OR_TASK_NAME = @tasks.span_corruption_task()
  tasks.span_corruption_task.corpus = '/data/c4/c4-train.*.json.gz'
  tasks.span_corruption_task.vocabulary = @vocab.t5_vocabulary()

Pipeline per split: corpus documents ('train' / 'validation', disjoint) -> tokenize -> [cache point] -> concatenate
and cut into raw chunks -> span corruption -> EOS. SeqIO repeats epochs at the cache point, i.e. before chunking and
corruption, so every epoch re-draws document order, chunk boundaries and masks (see `objectives`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import re

import seqio

from repeat_lm.data import objectives, sources, vocab as vocab_lib

log = logging.getLogger(__name__)

WIKI_TASK = 'repeat_lm.wiki_span_corruption'


@dataclasses.dataclass(frozen=True)
class _Spec:
  corpus: str
  vocabulary: seqio.Vocabulary
  noise_density: float
  mean_noise_span_length: float
  validation_fraction: float


# name -> the spec it was registered with, to make re-registration idempotent.
_REGISTERED: dict[str, _Spec] = {}


def _tag(path: str) -> str:
  """'/data/c4/c4-train.*.json.gz' -> 'c4_train_<hash of the full path>': readable and unique."""
  stem = re.sub(r'(\.jsonl?)?(\.gz)?$', '', os.path.basename(path.rstrip('/'))) or 'corpus'
  digest = hashlib.sha1(path.encode()).hexdigest()[:8]
  return f"{re.sub(r'[^A-Za-z0-9]+', '_', stem).strip('_')}_{digest}"


def _vocab_tag(vocabulary: seqio.Vocabulary) -> str:
  if isinstance(vocabulary, vocab_lib._LazyDefaultVocabulary):  # pylint: disable=protected-access
    extra = '' if vocabulary.extra_ids == vocab_lib.EXTRA_IDS else f'_x{vocabulary.extra_ids}'
    return f'wiki{vocab_lib.DEFAULT_VOCAB_PIECES // 1000}k{extra}'
  if isinstance(vocabulary, seqio.SentencePieceVocabulary):
    # The private attribute: the public property may build the file, and naming must stay cheap.
    return f'{_tag(vocabulary._sentencepiece_model_file)}_x{vocabulary.extra_ids}'  # pylint: disable=protected-access
  return f'{type(vocabulary).__name__}_x{vocabulary.extra_ids}'  # other kinds: pass `name` to tell them apart


def task_name(spec: _Spec) -> str:
  corpus = 'wiki' if spec.corpus == 'wiki' else _tag(spec.corpus)
  name = (f'repeat_lm.span_corruption.{corpus}.{_vocab_tag(spec.vocabulary)}'
          f'.r{spec.noise_density:g}_mu{spec.mean_noise_span_length:g}')
  if spec.validation_fraction != 0.05:
    name += f'.val{spec.validation_fraction:g}'
  return name.replace('-', '_')


def span_corruption_task(name: str | None = None, corpus: str = 'wiki',
                         vocabulary: seqio.Vocabulary | str | None = None, noise_density: float = 0.15,
                         mean_noise_span_length: float = 3.0, validation_fraction: float = 0.05) -> str:
  """Registers a T5 span-corruption task (splits 'train', 'validation'; features 'inputs', 'targets') -> its name.

  Args:
    name: task name. If None it is derived from the arguments:
      `repeat_lm.span_corruption.<corpus>.<vocab>.r<noise_density>_mu<mean_noise_span_length>[.val<fraction>]`
      where <corpus> is 'wiki' or '<file stem>_<8 hex of sha1(absolute path or glob)>', <vocab> is 'wiki8k' for the
      default vocabulary, '<model file stem>_<8 hex of sha1(path)>_x<extra_ids>' for other SentencePiece models and
      '<class name>_x<extra_ids>' otherwise; '.val..' appears only when the fraction is not 0.05, and '-' becomes
      '_'. E.g. 'repeat_lm.span_corruption.wiki.wiki8k.r0.15_mu3'.
    corpus: 'wiki' (the default Wikipedia corpus) or a JSONL(.gz) file, directory or glob. Checked now: a missing
      path raises FileNotFoundError naming it.
    vocabulary: a seqio.Vocabulary, a SentencePiece model path (-> T5-style, 100 extra ids), or None for the default
      Wikipedia vocabulary (trained and cached on first use, not here).
    noise_density, mean_noise_span_length: span-corruption parameters (T5: 0.15, 3).
    validation_fraction: share of documents (the last ones, at least 1) held out as 'validation'.

  Registering again with the same arguments is a no-op; different arguments under an existing name replace it.
  """
  if corpus != 'wiki':
    corpus = corpus if '://' in corpus else os.path.abspath(os.path.expanduser(corpus))  # cwd may change later
    sources.resolve_paths(corpus)  # fail now, with the path, rather than deep inside tf.data
  if vocabulary is None:
    vocabulary = vocab_lib.default_vocabulary()
  elif isinstance(vocabulary, str):
    vocabulary = vocab_lib.t5_vocabulary(vocabulary)
  spec = _Spec(corpus, vocabulary, float(noise_density), float(mean_noise_span_length), float(validation_fraction))
  name = name or task_name(spec)
  if name in seqio.TaskRegistry.names():
    if _REGISTERED.get(name) == spec:
      return name
    log.info('Replacing task %s with a new spec %s', name, spec)
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name,
      source=sources.CorpusSource(corpus, validation_fraction),
      output_features={'inputs': seqio.Feature(vocabulary, add_eos=True),
                       'targets': seqio.Feature(vocabulary, add_eos=True)},
      preprocessors=[
          functools.partial(seqio.preprocessors.rekey, key_map={'targets': 'text'}),
          functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
          # Cacheable up to here (tokenised documents); everything random comes after, so it re-runs per epoch.
          seqio.CacheDatasetPlaceholder(),
          functools.partial(objectives.span_corruption, noise_density=noise_density,
                            mean_noise_span_length=mean_noise_span_length),
          seqio.preprocessors.append_eos_after_trim,
      ],
      metric_fns=[],
  )
  _REGISTERED[name] = spec
  return name


# Registered at import; lazy, so importing reads no corpus and trains no vocabulary.
span_corruption_task(name=WIKI_TASK)
