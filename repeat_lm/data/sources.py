"""Local text sources: JSONL(.gz) corpora and the default Wikipedia corpus, read in a fixed document order.

A corpus is a fixed, ordered list of documents. Its last `max(1, round(validation_fraction * n))` documents are the
'validation' split and the rest 'train', so the two never share a document and every reader agrees on the split
(or a separate validation corpus is named). Bad input is cleaned by `clean_document` and counted in `ReadStats`:
empty and whitespace-only documents are skipped, invalid UTF-8 is replaced with U+FFFD, documents longer than
`MAX_DOCUMENT_CHARS` are truncated; a missing file, malformed JSON or a corrupt gzip is an error naming the file.
"""

from __future__ import annotations

import bz2
import codecs
import dataclasses
import functools
import gzip
import hashlib
import json
import logging
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import tensorflow as tf

from repeat_lm import checks, files

log = logging.getLogger(__name__)

_JSONL_SUFFIXES = ('.json', '.jsonl', '.json.gz', '.jsonl.gz')
# Bump when the Wikipedia extraction changes, so stale caches are not reused.
_WIKI_VERSION = 1
_WIKI_XML = 'enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2'
_WIKI_MIN_CHARS = 500  # pages shorter than this after cleaning are stubs or disambiguation lists
# 1 MiB of text (~250k tokens): far above real C4 pages or Wikipedia articles, far below what stalls a tokenizer.
MAX_DOCUMENT_CHARS = 1 << 20


def cache_dir() -> Path:
  """Where derived artefacts (default corpus, default vocabulary) live: $REPEAT_LM_CACHE or ~/.cache/repeat_lm."""
  return Path(os.environ.get('REPEAT_LM_CACHE') or Path.home() / '.cache' / 'repeat_lm').expanduser()


# ---------------------------------------------------------------------------------------------------- documents


@dataclasses.dataclass
class ReadStats:
  """What reading changed or dropped; every count is also logged, so nothing changes silently."""
  files: tuple[str, ...] = ()
  documents: int = 0  # kept
  skipped_empty: int = 0  # empty or whitespace-only text
  replaced_invalid_utf8: int = 0  # documents whose bytes were not valid UTF-8 (decoded with U+FFFD)
  truncated_long: int = 0  # documents cut to `max_document_chars`

  def as_dict(self) -> dict:
    return {k: v for k, v in dataclasses.asdict(self).items() if k != 'files'}

  def warn(self, what: str) -> None:
    if self.skipped_empty or self.replaced_invalid_utf8 or self.truncated_long:
      log.warning('%s: kept %d documents; skipped %d empty/whitespace-only, replaced invalid UTF-8 in %d, truncated '
                  '%d longer than the document limit.', what, self.documents, self.skipped_empty,
                  self.replaced_invalid_utf8, self.truncated_long)


_SURROGATE = re.compile('[\ud800-\udfff]')


def check_max_chars(max_chars: int) -> None:
  """The document limit is a whole number of characters >= 1: as a slice bound, -5 cut five characters off the end
  of every document, 0 kept every document as '' (counted as kept, not as empty) and True kept one character."""
  if not checks.is_count(max_chars):
    raise ValueError(f'max_document_chars={max_chars!r}: documents are truncated to a whole number of characters '
                     f'>= 1 (default {MAX_DOCUMENT_CHARS}).')


def clean_document(text: str | bytes, stats: ReadStats, max_chars: int = MAX_DOCUMENT_CHARS) -> str | None:
  """Valid UTF-8 text of at most `max_chars` characters, or None for an empty one; `stats` counts each change."""
  check_max_chars(max_chars)
  if isinstance(text, bytes):
    try:
      text = text.decode('utf-8')
    except UnicodeDecodeError:
      text, stats.replaced_invalid_utf8 = text.decode('utf-8', errors='replace'), stats.replaced_invalid_utf8 + 1
  elif _SURROGATE.search(text):  # lone "\udc80"-style escapes: not valid UTF-8, not storable in a tf.string
    text, stats.replaced_invalid_utf8 = _SURROGATE.sub('\ufffd', text), stats.replaced_invalid_utf8 + 1
  if not text.strip():
    stats.skipped_empty += 1
    return None
  if len(text) > max_chars:  # one gigantic document would stall tokenisation and dominate a small subset
    text, stats.truncated_long = text[:max_chars], stats.truncated_long + 1
  stats.documents += 1
  return text


def resolve_paths(path_or_glob: str) -> list[str]:
  """A file, a directory (its JSONL files) or a glob -> sorted file list; raises FileNotFoundError if empty."""
  if tf.io.gfile.isdir(path_or_glob):
    names = sorted(tf.io.gfile.listdir(path_or_glob))
    paths = [os.path.join(path_or_glob, n) for n in names if n.endswith(_JSONL_SUFFIXES)]
  elif tf.io.gfile.exists(path_or_glob):
    paths = [path_or_glob]
  else:
    paths = sorted(tf.io.gfile.glob(path_or_glob)) if any(c in path_or_glob for c in '*?[') else []
  # A directory opens as an empty file under tf.io.gfile, so one matched by a glob (or a sub-directory named like
  # JSONL) would add no documents and no error: its files were dropped without a word. On remote storage, where
  # each test is a request (C4's 1,024 files), only names that do not look like corpus files are tested.
  folders = [p for p in paths if ('://' not in p or not p.endswith(_JSONL_SUFFIXES)) and tf.io.gfile.isdir(p)]
  if folders:
    raise ValueError(
        f'The corpus {path_or_glob!r} matches {len(folders)} director{"y" if len(folders) == 1 else "ies"} '
        f'({folders[0]!r}{", ..." if len(folders) > 1 else ""}); a corpus names JSONL/JSONL.gz files, one directory '
        'of them, or a glob of files: point the glob at the files, e.g. '
        f'{os.path.join(folders[0], "*.jsonl.gz")!r}, or give each directory as a corpus of its own.')
  if not paths:
    raise FileNotFoundError(
        f'No corpus files found at {path_or_glob!r} (a JSONL/JSONL.gz file, a directory of them, or a glob). '
        'Point the corpus at an existing path, e.g. `tasks.repeated_task.corpus = "/data/c4/*.json.gz"` '
        "in gin, or use corpus='wiki' for the built-in Wikipedia sample.")
  return paths


def _is_number(text: str) -> bool:
  try:
    float(text)
  except ValueError:
    return False
  return True


def iter_jsonl(paths: Sequence[str], stats: ReadStats, text_key: str = 'text',
               max_chars: int = MAX_DOCUMENT_CHARS) -> Iterator[str]:
  """`text_key` of every JSON line, in file order, cleaned. Malformed JSON or gzip raises ValueError naming the file."""
  for path in paths:
    with tf.io.gfile.GFile(path, 'rb') as raw_f:
      f = gzip.GzipFile(fileobj=raw_f) if path.endswith('.gz') else raw_f
      lineno = 0
      try:
        for lineno, raw in enumerate(f, start=1):
          if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]  # Windows tools start UTF-8 files with a byte-order mark (RFC 8259 §8.1)
          if not raw.strip():
            continue  # blank separator line, not a document
          line = raw.decode('utf-8', errors='replace')  # JSON syntax is ASCII; the text is re-checked below
          try:
            text = json.loads(line)[text_key]
            if not isinstance(text, str):
              raise TypeError(f'{text_key!r} is {type(text).__name__}')
          except (json.JSONDecodeError, KeyError, TypeError) as e:
            packed = _compression(raw) if lineno == 1 and f is raw_f else None
            if packed:  # compressed bytes hold NUL bytes too: name the format, not a text encoding
              raise ValueError(f'{path}: the file is {packed[0]}-compressed; JSON Lines corpora are read as plain '
                               f'text, or as gzip when the name ends in .gz: {packed[1]}') from e
            if b'\x00' in raw:  # UTF-8 text never holds NUL bytes; UTF-16 and UTF-32 ASCII does, in every character
              raise ValueError(f'{path}:{lineno}: the file looks UTF-16 or UTF-32 encoded (NUL bytes); JSON Lines '
                               'corpora must be UTF-8: re-encode it, e.g. `iconv -f UTF-16 -t UTF-8`') from e
            raise ValueError(f'{path}:{lineno}: expected a JSON object with a {text_key!r} string ({e!r})') from e
          if '\ufffd' in line and not _valid_utf8(raw):
            stats.replaced_invalid_utf8 += 1
          text = clean_document(text, stats, max_chars)
          if text is not None:
            yield text
      except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f'{path}: corrupt or truncated gzip after line {lineno} ({e!r})') from e


# Magic bytes of the compressed formats corpora ship in (Pile / SlimPajama .jsonl.zst, .bz2, .xz, a .zip), and gzip
# under a name without .gz: what to do about each.
_COMPRESSED = (
    (b'\x1f\x8b', 'gzip', 'give the file a name ending in .gz'),
    (b'BZh', 'bzip2', 'decompress it (bzip2 -d) or re-compress it with gzip'),
    (b'\xfd7zXZ\x00', 'xz', 'decompress it (xz -d) or re-compress it with gzip'),
    (b'\x28\xb5\x2f\xfd', 'zstd', 'decompress it (zstd -d) or re-compress it with gzip'),
    (b'PK\x03\x04', 'zip', 'extract it (unzip) and point the corpus at the JSONL files'),
)


def _compression(head: bytes) -> tuple[str, str] | None:
  """(format, fix) when `head`, a file's first bytes, starts like a compressed file."""
  for magic, kind, fix in _COMPRESSED:
    if head.startswith(magic):
      return kind, fix
  return None


def _valid_utf8(raw: bytes) -> bool:
  try:
    raw.decode('utf-8')
    return True
  except UnicodeDecodeError:
    return False


def read_jsonl(paths: Sequence[str], text_key: str = 'text',
               max_chars: int = MAX_DOCUMENT_CHARS) -> tuple[list[str], ReadStats]:
  """All documents of `paths` in order, and what cleaning did to them (also logged)."""
  stats = ReadStats(tuple(paths))
  docs = list(iter_jsonl(paths, stats, text_key, max_chars))
  stats.warn(f'Read {len(paths)} file(s)')
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
def _load_cached(paths: tuple[str, ...], validation_fraction: float, max_chars: int) -> Corpus:
  docs, stats = read_jsonl(paths, max_chars=max_chars)
  return Corpus(name=','.join(paths), documents=tuple(docs), validation_fraction=validation_fraction, stats=stats)


def load_corpus(path_or_glob: str, validation_fraction: float = 0.05,
                max_document_chars: int = MAX_DOCUMENT_CHARS) -> Corpus:
  """Reads a JSONL corpus ('wiki' = the default Wikipedia corpus). Memoised: tasks call this on every get_dataset."""
  check_max_chars(max_document_chars)  # before int() below, which would make 10.5 a limit of 10
  if path_or_glob == 'wiki':
    path_or_glob = str(default_wiki_path())
  return _load_cached(tuple(resolve_paths(path_or_glob)), float(validation_fraction), int(max_document_chars))


@dataclasses.dataclass(frozen=True)
class LocalText:
  """A local JSONL corpus as a text source: 'train' and 'validation' document streams in a fixed order.

  validation: a fraction -> the corpus's last documents (at least one) are held out and the rest is 'train' (the
    corpus is read into memory once); a path or glob -> that corpus is 'validation' and the 'train' files are
    streamed, so a subset of a large corpus reads only the documents it needs.
  """
  corpus: str  # 'wiki', a JSONL(.gz) file, a directory of them or a glob
  validation: float | str = 0.05
  max_document_chars: int = MAX_DOCUMENT_CHARS

  def __post_init__(self):
    check_max_chars(self.max_document_chars)  # when the source is configured, not when its text is first read
    corpus_files: list[str] = []  # wiki: not fetched here
    if self.corpus != 'wiki':
      given = self.corpus
      object.__setattr__(self, 'corpus', _absolute(given))
      corpus_files = _resolve_as_given(given)  # fail now, naming the path, rather than deep inside a pipeline
    if isinstance(self.validation, str):
      if _is_number(self.validation) and not tf.io.gfile.exists(self.validation):
        raise ValueError(f'validation={self.validation!r} is a string, read as a path, and no such file exists; for '
                         f'a held-out fraction give the number without quotes (validation={self.validation}).')
      given = self.validation
      object.__setattr__(self, 'validation', _absolute(given))
      shared = set(_resolve_as_given(given)) & set(corpus_files)
      if shared:  # validation documents that are also trained on measure memorisation, not generalisation
        raise ValueError(f'LocalText: the validation files are also training files ({sorted(shared)[:3]}); give '
                         'validation a path outside the corpus, or a fraction (e.g. 0.05) to hold documents out.')
    else:
      # Checked here, when the task is configured: a fraction out of range failed at the first read, and a negative
      # one as an invalid SeqIO task name ('_val-0p5').
      if not (checks.real_number(self.validation) and 0.0 <= self.validation < 1.0):
        raise ValueError(f'validation={self.validation!r}: a held-out fraction of the documents must be a number in '
                         '[0, 1) (e.g. 0.05), or a path to a validation corpus.')
      object.__setattr__(self, 'validation', float(self.validation))

  @property
  def tag(self) -> str:
    """A short readable name for task names: 'wiki' or '<file stem>_<8 hex of the path>' (+ a non-default split)."""
    tag = 'wiki' if self.corpus == 'wiki' else self.path_tag(self.corpus)
    if self.validation != 0.05:
      tag += f'_val{self.validation:g}'.replace('.', 'p') if isinstance(self.validation, float) else \
          f'_val{self.path_tag(self.validation)}'
    if self.max_document_chars != MAX_DOCUMENT_CHARS:
      tag += f'_max{self.max_document_chars}'
    return tag

  @staticmethod
  def path_tag(path: str) -> str:
    """'/data/c4/c4-train.*.json.gz' -> 'c4_train_<8 hex of sha1(path)>': readable and unique."""
    stem = re.sub(r'(\.jsonl?)?(\.gz)?$', '', os.path.basename(path.rstrip('/'))) or 'corpus'
    return f"{re.sub(r'[^A-Za-z0-9]+', '_', stem).strip('_')}_{hashlib.sha1(path.encode()).hexdigest()[:8]}"

  def _paths(self, which: str) -> list[str]:
    path = self.corpus if which == 'train' else self.validation
    return resolve_paths(str(default_wiki_path()) if path == 'wiki' else path)

  def fingerprint(self) -> str:
    """Changes when a file's path, size or modification time changes."""
    files = self._paths('train') + (self._paths('validation') if isinstance(self.validation, str) else [])
    parts = [f'{p}:{tf.io.gfile.stat(p).length}:{tf.io.gfile.stat(p).mtime_nsec}' for p in files]
    return hashlib.sha256(json.dumps([parts, self.validation, self.max_document_chars]).encode()).hexdigest()

  def documents(self, split: str, stats: ReadStats) -> Iterator[str]:
    if split not in ('train', 'validation'):
      raise ValueError(f"Unknown split {split!r}; corpora have 'train' and 'validation'.")
    if isinstance(self.validation, str):
      stats.files = tuple(self._paths(split))
      yield from iter_jsonl(stats.files, stats, max_chars=self.max_document_chars)
      return
    corpus = load_corpus(self.corpus, self.validation, self.max_document_chars)
    # The whole corpus was read and cleaned once; every count reports that reading, the kept documents too (counted
    # as they were yielded, they gave a subset's store the tokeniser's batch, 256 of the C4 sample's 1,000).
    stats.files, stats.documents, stats.skipped_empty, stats.replaced_invalid_utf8, stats.truncated_long = (
        corpus.stats.files, corpus.stats.documents, corpus.stats.skipped_empty, corpus.stats.replaced_invalid_utf8,
        corpus.stats.truncated_long)
    yield from corpus.split(split)


def _absolute(path: str) -> str:
  return path if '://' in path or path == 'wiki' else os.path.abspath(os.path.expanduser(path))  # cwd may change


def _resolve_as_given(given: str) -> list[str]:
  """resolve_paths(_absolute(given)); a relative `given` that matches nothing says which directory it was read from
  (an experiment gin's '../shared/...' run from elsewhere named only the absolute path)."""
  path = _absolute(given)
  try:
    return resolve_paths(path)
  except FileNotFoundError as e:
    # A path that exists (a folder without corpus files) was read from the right place: the message says enough.
    if '://' in given or os.path.isabs(os.path.expanduser(given)) or tf.io.gfile.exists(path):
      raise
    raise FileNotFoundError(f'{e} It was given as the relative path {given!r}, read from the current directory '
                            f'{os.getcwd()}: run from the directory it is relative to (the repository root for the '
                            'paths in its gin files), or give an absolute path.') from None


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
    files.atomic_write_bytes(path, gzip.compress(payload, mtime=0))
    log.info('Wrote %d Wikipedia articles to %s', len(docs), path)
  return path
