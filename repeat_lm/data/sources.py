"""Text corpora: JSONL(.gz) files, the default Wikipedia corpus, and a SeqIO source over them.

A corpus is a fixed, ordered list of documents. Its last `max(1, round(validation_fraction * n))` documents are the
'validation' split and the rest 'train', so the two never share a document and every reader agrees on the split.
"""

from __future__ import annotations

import bz2
import dataclasses
import functools
import gzip
import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import seqio
import tensorflow as tf

log = logging.getLogger(__name__)

_JSONL_SUFFIXES = ('.json', '.jsonl', '.json.gz', '.jsonl.gz')
# Bump when the Wikipedia extraction changes, so stale caches are not reused.
_WIKI_VERSION = 1
_WIKI_XML = 'enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2'
_WIKI_MIN_CHARS = 500  # pages shorter than this after cleaning are stubs or disambiguation lists


def cache_dir() -> Path:
  """Where derived artefacts (default corpus, default vocabulary) live: $REPEAT_LM_CACHE or ~/.cache/repeat_lm."""
  return Path(os.environ.get('REPEAT_LM_CACHE') or Path.home() / '.cache' / 'repeat_lm').expanduser()


def atomic_write_bytes(path: Path, data: bytes) -> None:
  """Writes via a temp file in the same directory + rename, so readers never see a partial file.

  Two racing writers each rename a complete file; the last rename wins and both leave a valid file behind.
  """
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache should be readable by others
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


# ---------------------------------------------------------------------------------------------------- JSONL reading


@dataclasses.dataclass(frozen=True)
class ReadStats:
  files: tuple[str, ...]
  documents: int = 0  # kept
  skipped_empty: int = 0  # empty or whitespace-only `text`
  replaced_invalid_utf8: int = 0  # documents whose bytes were not valid UTF-8 (decoded with U+FFFD)


def resolve_paths(path_or_glob: str) -> list[str]:
  """A file, a directory (its JSONL files) or a glob -> sorted file list; raises FileNotFoundError if empty."""
  if tf.io.gfile.isdir(path_or_glob):
    names = sorted(tf.io.gfile.listdir(path_or_glob))
    paths = [os.path.join(path_or_glob, n) for n in names if n.endswith(_JSONL_SUFFIXES)]
  elif tf.io.gfile.exists(path_or_glob):
    paths = [path_or_glob]
  else:
    paths = sorted(tf.io.gfile.glob(path_or_glob)) if any(c in path_or_glob for c in '*?[') else []
  if not paths:
    raise FileNotFoundError(
        f'No corpus files found at {path_or_glob!r} (a JSONL/JSONL.gz file, a directory of them, or a glob). '
        'Point the corpus at an existing path, e.g. `tasks.span_corruption_task.corpus = "/data/c4/*.json.gz"` '
        "in gin, or use corpus='wiki' for the built-in Wikipedia sample.")
  return paths


_SURROGATE = re.compile('[\ud800-\udfff]')


def _decode_line(raw: bytes) -> tuple[str, bool]:
  """UTF-8 decode; invalid bytes become U+FFFD. Returns (text, replaced)."""
  try:
    return raw.decode('utf-8'), False
  except UnicodeDecodeError:
    return raw.decode('utf-8', errors='replace'), True


def read_jsonl(paths: Sequence[str], text_key: str = 'text') -> tuple[list[str], ReadStats]:
  """Reads `text_key` of every JSON line, in file order. Malformed JSON raises ValueError naming file:line."""
  docs: list[str] = []
  empty = replaced = 0
  for path in paths:
    with tf.io.gfile.GFile(path, 'rb') as raw_f:
      f = gzip.GzipFile(fileobj=raw_f) if path.endswith('.gz') else raw_f
      for lineno, raw in enumerate(f, start=1):
        if not raw.strip():
          continue  # blank separator line, not a document
        line, bad_bytes = _decode_line(raw)
        try:
          text = json.loads(line)[text_key]
          if not isinstance(text, str):
            raise TypeError(f'{text_key!r} is {type(text).__name__}')
        except (json.JSONDecodeError, KeyError, TypeError) as e:
          raise ValueError(f'{path}:{lineno}: expected a JSON object with a {text_key!r} string ({e!r})') from e
        if _SURROGATE.search(text):  # lone "\udc80"-style escapes: not valid UTF-8, not storable in a tf.string
          text, bad_bytes = _SURROGATE.sub('\ufffd', text), True
        replaced += bad_bytes
        if not text.strip():
          empty += 1
          continue
        docs.append(text)
  stats = ReadStats(tuple(paths), len(docs), empty, replaced)
  if empty or replaced:
    log.warning('Read %d documents from %d file(s): skipped %d empty/whitespace-only, replaced invalid UTF-8 in %d.',
                len(docs), len(paths), empty, replaced)
  return docs, stats


# ---------------------------------------------------------------------------------------------------- Corpus


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Documents in a fixed order, split deterministically into disjoint train / validation slices."""
  name: str
  documents: tuple[str, ...]
  validation_fraction: float = 0.05
  stats: ReadStats | None = None

  def __post_init__(self):
    if not 0.0 <= self.validation_fraction < 1.0:
      raise ValueError(f'validation_fraction must be in [0, 1), got {self.validation_fraction}')
    if len(self.documents) < 2:
      raise ValueError(f'Corpus {self.name!r} has {len(self.documents)} non-empty document(s); need at least 2 '
                       'to hold out a validation document.')

  @property
  def num_validation(self) -> int:
    n = len(self.documents)
    return min(n - 1, max(1, round(self.validation_fraction * n)))  # both splits keep at least one document

  def split(self, name: str) -> tuple[str, ...]:
    cut = len(self.documents) - self.num_validation
    if name == 'train':
      return self.documents[:cut]
    if name == 'validation':
      return self.documents[cut:]
    raise ValueError(f"Unknown split {name!r}; corpora have 'train' and 'validation'.")


@functools.lru_cache(maxsize=8)
def _load_cached(paths: tuple[str, ...], validation_fraction: float) -> Corpus:
  docs, stats = read_jsonl(paths)
  return Corpus(name=','.join(paths), documents=tuple(docs), validation_fraction=validation_fraction, stats=stats)


def load_corpus(path_or_glob: str, validation_fraction: float = 0.05) -> Corpus:
  """Reads a JSONL corpus ('wiki' = the default Wikipedia corpus). Memoised: tasks call this on every get_dataset."""
  if path_or_glob == 'wiki':
    path_or_glob = str(default_wiki_path())
  return _load_cached(tuple(resolve_paths(path_or_glob)), float(validation_fraction))


# ---------------------------------------------------------------------------------------------------- default corpus


def _wiki_xml_path() -> Path:
  import gensim  # pylint: disable=import-outside-toplevel  (heavy; only needed to build the cache once)
  path = Path(gensim.__file__).parent / 'test' / 'test_data' / _WIKI_XML
  if not path.exists():
    raise FileNotFoundError(f'{path} is missing; the default corpus needs the gensim wheel '
                            '(pip install gensim==4.4.0).')
  return path


_SECTION_END = re.compile(r'^=+\s*(References|Notes|External links|Further reading|See also|Bibliography|Sources|'
                          r'Citations|Footnotes)\s*=+\s*$', re.MULTILINE | re.IGNORECASE)


def clean_wiki_text(text: str) -> str:
  """What gensim's `filter_wiki` leaves, tidied: bold/italic quotes, heading marks, list bullets, blank runs.

  Case and punctuation are kept. Reference/link sections at the end are dropped (lists of citations, not prose).
  """
  from gensim.corpora import wikicorpus  # pylint: disable=import-outside-toplevel
  text = wikicorpus.filter_wiki(text)
  end = _SECTION_END.search(text)
  text = text[:end.start()] if end else text
  text = re.sub(r"'{2,}", '', text)
  lines = []
  for line in text.splitlines():
    line = re.sub(r'^=+\s*(.*?)\s*=+$', r'\1', line.strip())  # "==History==" -> "History"
    line = re.sub(r'^[*#:;]+\s*', '', line)  # list / indent markers
    line = re.sub(r'[ \t\xa0]{2,}', ' ', line).strip()
    lines.append(line)
  return re.sub(r'\n{3,}', '\n\n', '\n'.join(lines)).strip()


def extract_wiki_documents(xml_bz2: Path) -> list[dict]:
  """Article pages (namespace 0) of a MediaWiki dump, markup stripped; redirects and stubs skipped."""
  from gensim.corpora import wikicorpus  # pylint: disable=import-outside-toplevel
  out = []
  with bz2.open(xml_bz2) as f:
    for title, raw, page_id in wikicorpus.extract_pages(f, filter_namespaces=('0',)):
      if raw.lstrip()[:9].upper() == '#REDIRECT':
        continue
      text = clean_wiki_text(raw)
      if len(text) >= _WIKI_MIN_CHARS:
        out.append({'text': text, 'title': title, 'id': page_id})
  return out


def default_wiki_path() -> Path:
  """Extracts gensim's Wikipedia sample to `<cache_dir>/corpora/` once (atomic write) and returns the JSONL.gz path."""
  path = cache_dir() / 'corpora' / f'enwiki_gensim_v{_WIKI_VERSION}.jsonl.gz'
  if not path.exists():
    docs = extract_wiki_documents(_wiki_xml_path())
    payload = ''.join(json.dumps(d, ensure_ascii=False) + '\n' for d in docs).encode('utf-8')
    # mtime=0: identical bytes on every machine, so the cache file itself is reproducible.
    atomic_write_bytes(path, gzip.compress(payload, mtime=0))
    log.info('Wrote %d Wikipedia articles to %s', len(docs), path)
  return path


# ---------------------------------------------------------------------------------------------------- SeqIO source


class CorpusSource(seqio.DataSource):
  """SeqIO source of {'text': ...} examples from a lazily loaded `Corpus`.

  Nothing is read until `get_dataset`, so registering a task costs nothing. Sharding is by document
  (`documents[index::num_shards]`), applied before shuffling so hosts never share a document. Shuffling reorders
  documents with `reshuffle_each_iteration=True`: SeqIO repeats the source per epoch, so each epoch (deterministically,
  given the seed) sees a new document order.
  """

  def __init__(self, corpus: str, validation_fraction: float = 0.05):
    super().__init__(splits=('train', 'validation'))
    self.corpus = corpus
    self.validation_fraction = validation_fraction

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def list_shards(self, split: str) -> Sequence[str]:
    return [split]

  def load(self) -> Corpus:
    return load_corpus(self.corpus, self.validation_fraction)

  def get_dataset(self, split: str = 'train', shuffle: bool = True, seed: int | None = None,
                  shard_info: seqio.ShardInfo | None = None, **unused_kwargs) -> tf.data.Dataset:
    docs = self.load().split(split)
    if shard_info is not None:
      docs = docs[shard_info.index::shard_info.num_shards]
    ds = tf.data.Dataset.from_tensor_slices({'text': tf.constant(list(docs) or [''], tf.string)})
    if not docs:
      ds = ds.take(0)  # a shard with no documents: keep the element spec, yield nothing
    if shuffle:
      ds = ds.shuffle(max(1, len(docs)), seed=seed, reshuffle_each_iteration=True)
    return ds

  def __repr__(self):
    return f'CorpusSource(corpus={self.corpus!r}, validation_fraction={self.validation_fraction})'

