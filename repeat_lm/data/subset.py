"""The exact token subset a task trains on: the first D tokens of a split, in the source's document order.

Documents are tokenised (no EOS) in order until D tokens are reached; the document that crosses the boundary is cut so
the subset holds exactly D tokens, and documents that tokenise to nothing are skipped and counted. A source with
fewer than D tokens is an error, never a smaller budget. The result is a `TokenStore`: one flat token array (the
documents back to back) and document offsets. Stores of 2^22+ tokens are also written under
`<cache_dir>/subsets/<fingerprint>/` (fingerprint = source files/version, split, vocabulary file, D) and memory-mapped
by later runs, so the tokenisation happens once per machine.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import numpy as np
import seqio
import tensorflow as tf

from repeat_lm import checks
from repeat_lm.data import sources, vocab as vocab_lib

log = logging.getLogger(__name__)

_VERSION = 1  # bump when the way a store is built changes, so stale caches are not reused
_DISK_CACHE_MIN_TOKENS = 1 << 22  # smaller stores re-tokenise in about a second: not worth a cache entry
_BATCH_DOCS = 256


class TextSource(Protocol):
  """What a store is built from (`sources.LocalText`, `tfds_text.TfdsText`)."""

  @property
  def tag(self) -> str: ...

  def fingerprint(self) -> str: ...

  def documents(self, split: str, stats: sources.ReadStats) -> Iterator[str]: ...


@dataclasses.dataclass(frozen=True, eq=False)
class TokenStore:
  tokens: np.ndarray  # [T] uint16 (vocabularies up to 65,536 ids) or int32: documents back to back
  offsets: np.ndarray  # [N + 1] int64: document i is tokens[offsets[i]:offsets[i + 1]]
  info: Mapping[str, Any]  # how it was built: source, split, budget, what reading and cutting changed

  @property
  def num_documents(self) -> int:
    return len(self.offsets) - 1

  @property
  def num_tokens(self) -> int:
    return int(self.offsets[-1])

  @property
  def doc_lengths(self) -> np.ndarray:
    return np.diff(self.offsets)

  def document(self, i: int) -> np.ndarray:
    return np.asarray(self.tokens[self.offsets[i]:self.offsets[i + 1]], np.int32)


def vocabulary_fingerprint(vocabulary: seqio.Vocabulary) -> str:
  if isinstance(vocabulary, seqio.SentencePieceVocabulary):
    path = vocabulary.sentencepiece_model_file
    try:
      with tf.io.gfile.GFile(path, 'rb') as f:  # local or gs://
        model = hashlib.sha256(f.read()).hexdigest()
    except vocab_lib.UNREADABLE as e:
      raise vocab_lib.unreadable_model_error(path, e) from e
    return f'spm:{model}:{vocabulary.extra_ids}'
  return f'{type(vocabulary).__name__}:{vocabulary.vocab_size}:{getattr(vocabulary, "extra_ids", 0)}'


def _encoder(vocabulary: seqio.Vocabulary):
  tokenizer = getattr(vocabulary, 'tokenizer', None)
  if tokenizer is not None and hasattr(tokenizer, 'encode'):  # SentencePiece: batched, multi-threaded
    return lambda docs: tokenizer.encode(docs, num_threads=os.cpu_count() or 1)
  return lambda docs: [vocabulary.encode(d) for d in docs]


def _encoded(docs: Iterator[str], encode) -> Iterator[list[int]]:
  """Token ids per document, in order, tokenised in batches."""
  batch = []
  for doc in docs:
    batch.append(doc)
    if len(batch) == _BATCH_DOCS:
      yield from encode(batch)
      batch = []
  if batch:
    yield from encode(batch)


def build_store(source: TextSource, split: str, vocabulary: seqio.Vocabulary, max_tokens: int | None,
                exact: bool = True) -> TokenStore:
  """Tokenises `split` in order up to `max_tokens` (None: all of it). exact: fewer tokens than that is an error."""
  if max_tokens is not None and not checks.is_count(max_tokens):
    # As repeated_task checks its token budgets: 0 built a store of no tokens, -5 read the whole source and cut each
    # document short (11,593 tokens of the C4 sample), True kept 1 token and 2.5 failed on a slice.
    raise ValueError(f'{source.tag} {split!r}: max_tokens={max_tokens!r} must be a whole number of at least 1 (None: '
                     'the whole split).')
  start = time.time()
  stats = sources.ReadStats()
  dtype = np.uint16 if vocabulary.vocab_size <= 1 << 16 else np.int32
  pieces, lengths, total, no_tokens, cut = [], [], 0, 0, 0
  docs = source.documents(split, stats)
  for ids in _encoded(docs, _encoder(vocabulary)):
    if not ids:
      no_tokens += 1
      continue
    if max_tokens is not None and total + len(ids) >= max_tokens:
      cut, ids = total + len(ids) - max_tokens, ids[:max_tokens - total]
    pieces.append(np.asarray(ids, dtype))
    lengths.append(len(ids))
    total += len(ids)
    if total == max_tokens:
      break
  if hasattr(docs, 'close'):  # stop reading the source (a TFDS split is large); a plain iterator has nothing to close
    docs.close()
  if exact and max_tokens is not None and total < max_tokens:
    raise ValueError(f'{source.tag} {split!r} has only {total:,} tokens with this vocabulary, fewer than the '
                     f'{max_tokens:,} unique tokens requested; lower the budget or use a bigger source.')
  if not lengths:
    raise ValueError(f'{source.tag} {split!r} has no document with any tokens.')
  stats.warn(f'{source.tag} {split!r}')
  info = {'source': source.tag, 'split': split, 'tokens': total, 'documents': len(lengths),
          'budget': max_tokens, 'boundary_tokens_cut': cut, 'skipped_no_tokens': no_tokens,
          **{f'read_{k}': v for k, v in stats.as_dict().items()}}
  if no_tokens:
    log.warning('%s %r: skipped %d documents that tokenise to nothing.', source.tag, split, no_tokens)
  log.info('Tokenised %s tokens in %d documents of %s %r in %.1fs', f'{total:,}', len(lengths), source.tag, split,
           time.time() - start)
  offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
  tokens = np.concatenate(pieces)
  info['content'] = content_hash(tokens, offsets)
  return TokenStore(tokens, offsets, info)


def content_hash(tokens: np.ndarray, offsets: np.ndarray) -> str:
  """What the subset holds (token ids and document boundaries), independent of file paths, mtimes and the cache:
  the same text gives the same hash on every host and after a copy, a different text a different one."""
  h = hashlib.blake2b(digest_size=16)
  h.update(np.asarray(offsets, np.int64).tobytes())
  h.update(str(np.dtype(tokens.dtype)).encode())
  step = 1 << 26
  for i in range(0, len(tokens), step):  # a memory-mapped store is hashed in pieces (~1 s per GiB, once per build)
    h.update(np.ascontiguousarray(tokens[i:i + step]).tobytes())
  return h.hexdigest()


def _fingerprint(source: TextSource, split: str, vocabulary: seqio.Vocabulary, max_tokens: int | None,
                 exact: bool) -> str:
  key = [_VERSION, source.fingerprint(), split, vocabulary_fingerprint(vocabulary), max_tokens, exact]
  return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]


def _load(path: str) -> TokenStore:
  with open(os.path.join(path, 'info.json')) as f:
    info = json.load(f)
  tokens, offsets = np.load(os.path.join(path, 'tokens.npy'), mmap_mode='r'), np.load(os.path.join(path, 'offsets.npy'))
  if 'content' not in info:  # written before the content hash existed
    info['content'] = content_hash(tokens, offsets)
  return TokenStore(tokens, offsets, info)


def _save(store: TokenStore, path: str) -> None:
  """Written to a temp directory, then renamed: readers never see a partial store; a racing writer's copy wins."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = tempfile.mkdtemp(dir=os.path.dirname(path), prefix='.tmp-')
  try:
    np.save(os.path.join(tmp, 'tokens.npy'), store.tokens)
    np.save(os.path.join(tmp, 'offsets.npy'), store.offsets)
    with open(os.path.join(tmp, 'info.json'), 'w') as f:
      json.dump(dict(store.info), f, indent=1)
    os.rename(tmp, path)
  except OSError:
    if not os.path.isdir(path):
      raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


_MEMO: collections.OrderedDict[str, TokenStore] = collections.OrderedDict()
_MEMO_SIZE = 16
_LOCK = threading.Lock()  # prefetch threads and the main thread may ask for the same store


def get_store(source: TextSource, split: str, vocabulary: seqio.Vocabulary, max_tokens: int | None,
              exact: bool = True) -> TokenStore:
  """`build_store`, memoised in the process and (for big stores) on disk."""
  fingerprint = _fingerprint(source, split, vocabulary, max_tokens, exact)
  with _LOCK:
    if fingerprint in _MEMO:
      _MEMO.move_to_end(fingerprint)
      return _MEMO[fingerprint]
    path = os.path.join(sources.cache_dir(), 'subsets', fingerprint)
    if os.path.isdir(path):
      store = _load(path)
    else:
      store = build_store(source, split, vocabulary, max_tokens, exact)
      store = dataclasses.replace(store, info={**store.info, 'fingerprint': fingerprint})
      if store.num_tokens >= _DISK_CACHE_MIN_TOKENS:
        _save(store, path)
    _MEMO[fingerprint] = store
    if len(_MEMO) > _MEMO_SIZE:
      _MEMO.popitem(last=False)
    return store
