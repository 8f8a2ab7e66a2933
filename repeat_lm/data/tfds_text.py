"""TFDS text sources (C4 `c4/en` 3.0.1 / 3.1.0, Wikipedia), read in a fixed document order.

The order is TFDS's stored order: files in order (`shuffle_files=False`), one file at a time
(`interleave_cycle_length=1`), records in order. So "the first D tokens of C4" is the same text on every machine
and every run. The data must already be prepared in `data_dir` (C4 needs an Apache Beam job; T5's `c4/en:3.0.1` is
read from its prepared files, e.g. `gs://tfds-data/datasets` or a local copy); nothing is downloaded here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator

from repeat_lm.data import sources

_DOC_BATCH = 256  # records per TF->numpy batch: amortises per-element overhead
_PREPARE_HINT = ('Prepare it there first (C4 needs Apache Beam: https://www.tensorflow.org/datasets/catalog/c4), or '
                 'point `data_dir` / $TFDS_DATA_DIR at a copy of the prepared files.')


def _buildable_versions(dataset: str, config: str) -> list[str] | None:
  """The versions of TFDS `dataset` (its `config`) the installed TFDS code can prepare; None where that is not known."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  try:
    cls = tfds.builder_cls(dataset)
    configs = [c for c in getattr(cls, 'BUILDER_CONFIGS', []) if c.name == config]
    main, others = ((configs[0].version, configs[0].supported_versions) if configs and configs[0].version
                    else (cls.VERSION, cls.SUPPORTED_VERSIONS))
    return [str(v) for v in (main, *others) if v is not None]
  except Exception:  # pylint: disable=broad-except  (a hint only: the error it adds to must still be raised)
    return None


def _prepare_hint(name: str) -> str:
  """How to get `name` ('c4/en:3.0.1') into data_dir. T5's c4/en:3.0.1 is older than the pinned TFDS's C4 code, which
  can only read it: telling a user to prepare it sent them to a Beam job that cannot make that version."""
  full, _, version = name.partition(':')
  dataset, _, config = full.partition('/')
  versions = _buildable_versions(dataset, config) if version else None
  if not versions or version in versions:
    return _PREPARE_HINT
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  c4 = dataset == 'c4'
  return (f'tensorflow-datasets {tfds.__version__} cannot prepare version {version} (its code prepares '
          f'{", ".join(versions)}): point `data_dir` / $TFDS_DATA_DIR at a copy of files prepared elsewhere, laid '
          f'out as DATA_DIR/{full}/{version}/' + (f' (copy gs://tfds-data/datasets/{full}/{version})' if c4 else '')
          + ', or use a version it prepares' + (' (the `c4v310` source reads c4/en:3.1.0).' if c4 else '.'))


@dataclasses.dataclass(frozen=True)
class TfdsText:
  """A TFDS dataset's text feature as 'train' / 'validation' document streams.

  name: 'c4/en:3.0.1', 'wikipedia/20230601.en', ... (with a version, so the text cannot change under a run).
  train_split / validation_split: TFDS split strings; slices keep them disjoint for datasets with a single split,
    e.g. 'train[:99%]' and 'train[99%:]' for Wikipedia.
  data_dir: None = TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets).
  """
  name: str
  train_split: str = 'train'
  validation_split: str = 'validation'
  text_key: str = 'text'
  data_dir: str | None = None
  max_document_chars: int = sources.MAX_DOCUMENT_CHARS

  def __post_init__(self):
    sources.check_max_chars(self.max_document_chars)  # when the source is configured, not when its text is read

  @property
  def tag(self) -> str:
    """'c4_en_v3p0p1' (+ what else selects the text, as LocalText's tag does): two readings of one dataset (other
    splits, another text feature) must not name the same task, or registering the second replaces the first. Not
    data_dir: that is where a copy lives, not which text it is."""
    tag = self.name.replace('/', '_').replace(':', '_v').replace('.', 'p').replace('-', '_')
    reading = (self.train_split, self.validation_split, self.text_key)
    if reading != ('train', 'validation', 'text'):
      tag += '_' + hashlib.sha1(json.dumps(reading).encode()).hexdigest()[:8]
    if self.max_document_chars != sources.MAX_DOCUMENT_CHARS:
      tag += f'_max{self.max_document_chars}'
    return tag

  def fingerprint(self) -> str:
    return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()

  def _builder(self):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel  (heavy; only when reading)
    try:
      return tfds.builder(self.name, data_dir=self.data_dir)
    except Exception as e:  # TFDS raises several kinds for a missing dataset/version
      where = self.data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'
      raise FileNotFoundError(f'TFDS dataset {self.name!r} could not be loaded from {where!r} '
                              f'({type(e).__name__}: {e}). {_prepare_hint(self.name)}') from e

  def documents(self, split: str, stats: sources.ReadStats) -> Iterator[str]:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    tfds_split = {'train': self.train_split, 'validation': self.validation_split}.get(split)
    if tfds_split is None:
      raise ValueError(f"Unknown split {split!r}; text sources have 'train' and 'validation'.")
    builder = self._builder()
    read_config = tfds.ReadConfig(interleave_cycle_length=1, try_autocache=False)
    try:
      ds = builder.as_dataset(split=tfds_split, shuffle_files=False, read_config=read_config)
    except Exception as e:
      # A builder whose code knows the version (c4/en:3.1.0) constructs without data; the failure comes here, and
      # TFDS's own message suggests downloading, which this module never does.
      raise FileNotFoundError(f'TFDS dataset {self.name!r} split {tfds_split!r} is not readable from '
                              f'{builder.data_dir!r} ({type(e).__name__}: {e}). {_prepare_hint(self.name)}') from e
    stats.files = (f'tfds:{self.name}[{tfds_split}]',)
    for batch in ds.map(lambda ex: ex[self.text_key]).batch(_DOC_BATCH).as_numpy_iterator():
      for raw in batch:
        text = sources.clean_document(raw, stats, self.max_document_chars)
        if text is not None:
          yield text
