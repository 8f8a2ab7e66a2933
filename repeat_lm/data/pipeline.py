"""What the trainer consumes: deterministic, resumable, host-local numpy batches from a SeqIO task or mixture.

The GLOBAL batch at step s is examples [s * B, (s + 1) * B) of the task's example stream (`plan`), one example per
row, and host h of n takes rows [h * B / n, (h + 1) * B / n) of it. Every example is a pure function of
(task, seed, index), so:
- the batch at step s depends on (DatasetConfig, s) only, not on how many hosts there are or what ran before;
- resuming at step k costs O(1): nothing is replayed (the epoch's document order is drawn once, O(documents));
- each host computes only its own rows.
Tasks that are not repeat_lm's (any other SeqIO task or mixture) fall back to SeqIO: every host reads the whole global
stream and keeps its rows, and resume replays k batches. TF never runs on an accelerator here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import operator
import os
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import seqio
import tensorflow as tf

from repeat_lm import checks
from repeat_lm.data import plan, tasks


def _keep_tf_off_accelerators() -> None:
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TF already initialised its devices; nothing left to do safely
    pass


_keep_tf_off_accelerators()

EOS = 1
_PREFETCH = 4  # host batches made ahead by a background thread


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]  # e.g. {'inputs': 512, 'targets': 114}
  split: str = 'train'
  batch_size: int = 128  # GLOBAL batch size (all hosts)
  shuffle: bool = True  # True: training stream (the task's epochs, each reordered); False: one ordered pass
  # None: in training, a seed drawn once per run (trainer._draw_seed; kept in its checkpoints); elsewhere fresh
  # randomness each call
  seed: int | None = 0
  pack: bool = True  # packed-format rows (segment ids / positions); repeat_lm tasks put one example per row
  use_cached: bool = False  # other SeqIO tasks only: read the output of SeqIO's cache job

  def __post_init__(self):
    # None or a number failed only at the first task lookup, as a TypeError from inside the name's regex.
    if not isinstance(self.mixture_or_task_name, str):
      raise ValueError(f"DatasetConfig.mixture_or_task_name={self.mixture_or_task_name!r}: give a task or mixture "
                       "name in quotes, e.g. MIXTURE_OR_TASK_NAME = 'repeat_lm.wiki_span_corruption'.")
    if not checks.whole_number(self.batch_size):  # 16.5 or '16': not "at least one example", which it is
      raise ValueError(f"DatasetConfig.batch_size={self.batch_size!r}: the global batch size must be a whole number "
                       "(no quotes), e.g. BATCH_SIZE = 128.")
    if not checks.is_count(self.batch_size):
      raise ValueError(f"DatasetConfig.batch_size={self.batch_size!r}: the global batch must hold at least one "
                       "example.")
    if not isinstance(self.task_feature_lengths, Mapping):  # a list ([512, 114]) failed in dict() with a TypeError
      raise ValueError(f"DatasetConfig.task_feature_lengths={self.task_feature_lengths!r}: give a dict of lengths by "
                       "feature, e.g. {'inputs': 512, 'targets': 114}.")
    missing = [k for k in ("inputs", "targets") if k not in dict(self.task_feature_lengths)]
    if missing:  # an encoder-decoder needs both
      raise ValueError(f"DatasetConfig.task_feature_lengths {dict(self.task_feature_lengths)} has no "
                       f"{' or '.join(repr(k) for k in missing)}: give both, e.g. {{'inputs': 512, 'targets': 114}}.")
    # The encoder-decoder converter reads these two only: another length ('extra': 5) was silently ignored.
    unknown = sorted(str(k) for k in dict(self.task_feature_lengths) if k not in ("inputs", "targets"))
    if unknown:
      raise ValueError(f"DatasetConfig.task_feature_lengths {dict(self.task_feature_lengths)} has "
                       f"{', '.join(repr(k) for k in unknown)}, which no model here reads: give only 'inputs' and "
                       "'targets'.")
    bad = {k: v for k, v in dict(self.task_feature_lengths).items() if not checks.is_count(v)}
    if bad:
      raise ValueError(f"DatasetConfig.task_feature_lengths {bad}: every feature length must be a positive "
                       "integer (e.g. {'inputs': 512, 'targets': 114}).")
    # Numpy integers are accepted above, but data_state copies these fields into the checkpoint's JSON metadata,
    # which cannot hold them: the first save of a run would fail. Plain ints from here on.
    object.__setattr__(self, 'batch_size', operator.index(self.batch_size))
    object.__setattr__(self, 'task_feature_lengths',
                       {k: operator.index(v) for k, v in dict(self.task_feature_lengths).items()})
    # int() would truncate: seed 0.9 read the stream of seed 0 (and True that of 1), a "different seed" that was not.
    if self.seed is not None and not checks.whole_number(self.seed):
      raise ValueError(f'DatasetConfig.seed={self.seed!r}: a whole number (no quotes), or None for a drawn seed.')
    if self.seed is not None:
      object.__setattr__(self, 'seed', int(self.seed))  # as _seed reads it
    # A gin string 'False' is truthy: shuffle='False' trained on a shuffled stream, pack='False' packed.
    checks.check_bools(self, ('shuffle', 'pack', 'use_cached'))


def _converter(cfg: DatasetConfig) -> seqio.EncDecFeatureConverter:
  return seqio.EncDecFeatureConverter(pack=cfg.pack)


def model_feature_lengths(cfg: DatasetConfig) -> dict[str, int]:
  """{'encoder_input_tokens': 512, 'decoder_input_tokens': 114, ...}: the row length of every batch key."""
  return dict(_converter(cfg).get_model_feature_lengths(dict(cfg.task_feature_lengths)))


def vocabulary_for(mixture_or_task_name: str) -> seqio.Vocabulary:
  """The output (targets) vocabulary of a registered task or mixture (repeat_lm names register on first use)."""
  tasks.ensure_registered(mixture_or_task_name)
  return seqio.get_mixture_or_task(mixture_or_task_name).output_features['targets'].vocabulary


def source_token_count(mixture_or_task_name: str, split: str) -> int | None:
  """Unique source tokens of a split (D for a repeated task's 'train'), for counting epochs; None if unknown."""
  tasks.ensure_registered(mixture_or_task_name)
  mix = tasks.mixture(mixture_or_task_name)
  names = mix[0] if mix else (mixture_or_task_name,)
  if not all(tasks.spec(n) for n in names):
    return None
  # A task's subset is the first D tokens of its source split in its vocabulary, and a mixture's tasks share one
  # vocabulary (tasks.repeated_mixture refuses others), so the subsets of its tasks on one source (another objective,
  # another D) are prefixes of one text: their union is the largest.
  largest: dict[str, int] = {}
  for n in names:
    key = tasks.spec(n).source.fingerprint()
    largest[key] = max(largest.get(key, 0), tasks.store(n, split).num_tokens)
  return sum(largest.values())


def _seed(cfg: DatasetConfig) -> int:
  return int.from_bytes(os.urandom(4), 'little') >> 1 if cfg.seed is None else int(cfg.seed)


def example_stream(cfg: DatasetConfig, num_epochs: int | None | str = 'default', seed: int | None = None
                   ) -> plan.Stream | plan.MixtureStream | None:
  """The index-addressable example stream behind `cfg`; None for tasks that are not repeat_lm's."""
  name = tasks.ensure_registered(cfg.mixture_or_task_name)
  seed = _seed(cfg) if seed is None else seed
  lengths = dict(cfg.task_feature_lengths)
  mix = tasks.mixture(name)
  if mix:
    if not all(tasks.spec(t) for t in mix[0]):
      return None
    streams = [tasks.stream(t, cfg.split, lengths, seed, cfg.shuffle, num_epochs) for t in mix[0]]
    return plan.MixtureStream(streams, mix[1], seed)
  if tasks.spec(name) is None:
    return None
  return tasks.stream(name, cfg.split, lengths, seed, cfg.shuffle, num_epochs)


def steps_per_epoch(cfg: DatasetConfig) -> float | None:
  """Global batches per pass over a repeated task's unique tokens, counted from its stream (any objective: UL2's
  denoisers cut chunks of other lengths than span corruption's); None where the stream is not one task's."""
  stream = example_stream(cfg, seed=cfg.seed) if cfg.seed is not None else None
  return stream.examples_per_epoch / cfg.batch_size if isinstance(stream, plan.Stream) else None


def source_tokens_per_step(cfg: DatasetConfig) -> Callable[[int], int] | None:
  """step s (1-based) -> the source-text tokens of global batch s-1, exactly (the raw chunks' lengths: no mode tokens,
  sentinels, EOS or padding); None where the stream is not repeat_lm's or its seed is None. The device can only count
  ids, and UL2's mode tokens and the sentinels past the extra ids (128 spans at mu 3, r 0.5, 512 inputs) are
  ordinary ids."""
  stream = example_stream(cfg, seed=cfg.seed) if cfg.seed is not None else None
  if stream is None:
    return None
  total = stream.total_examples

  def count(step: int) -> int:
    lo, hi = (step - 1) * cfg.batch_size, step * cfg.batch_size
    return sum(stream.raw_length(g) for g in range(lo, hi if total is None else min(hi, total)))

  return count


def num_batches(cfg: DatasetConfig) -> int | None:
  """Global batches in the stream (the last one may be padded); None when it never ends or is not repeat_lm's."""
  stream = example_stream(cfg)
  total = None if stream is None else stream.total_examples
  return None if total is None else -(-total // cfg.batch_size)


def fill_row(batch: dict[str, np.ndarray], r: int, inputs: np.ndarray, targets: np.ndarray,
             eos_id: int = EOS) -> None:
  """Writes one example (EOS appended) into row r, as seqio.EncDecFeatureConverter lays out a one-example row."""
  n_in, n_tgt = batch['encoder_input_tokens'].shape[1], batch['decoder_target_tokens'].shape[1]
  inputs = np.append(inputs[:n_in - 1], eos_id)  # by construction they fit; trim like append_eos_after_trim if not
  targets = np.append(targets[:n_tgt - 1], eos_id)
  a, b = len(inputs), len(targets)
  batch['encoder_input_tokens'][r, :a] = inputs
  batch['decoder_target_tokens'][r, :b] = targets
  # Shifted right, 0 first. Packed rows end the segment at its EOS (seqio zeroes the shift into another segment);
  # unpacked rows shift the whole padded row, so the EOS lands after the targets when the row is not full.
  shifted = targets if 'encoder_segment_ids' not in batch else targets[:-1]
  batch['decoder_input_tokens'][r, 1:1 + len(shifted)] = shifted[:n_tgt - 1]
  batch['decoder_loss_weights'][r, :b] = 1
  if 'encoder_segment_ids' in batch:
    batch['encoder_segment_ids'][r, :a] = 1
    batch['encoder_positions'][r, :a] = np.arange(a)
    batch['decoder_segment_ids'][r, :b] = 1
    batch['decoder_positions'][r, :b] = np.arange(b)


def _indexed_batches(stream, cfg: DatasetConfig, start_step: int, shard_id: int, num_shards: int,
                     eos_id: int = EOS) -> Iterator[dict[str, np.ndarray]]:
  rows = cfg.batch_size // num_shards
  lengths = model_feature_lengths(cfg)
  total = stream.total_examples
  step = start_step
  while total is None or step * cfg.batch_size < total:
    batch = {k: np.zeros((rows, n), np.int32) for k, n in lengths.items()}
    first = step * cfg.batch_size + shard_id * rows
    for r in range(rows):
      if total is not None and first + r >= total:
        break  # the final partial global batch: the rest stay all-zero rows (loss weight 0)
      ex = stream.example(first + r)
      fill_row(batch, r, ex.inputs, ex.targets, eos_id)
    yield batch
    step += 1


def _seqio_batches(cfg: DatasetConfig, seed: int, num_epochs: int | None, start_step: int, shard_id: int,
                   num_shards: int) -> Iterator[dict[str, np.ndarray]]:
  """Other SeqIO tasks: the global stream on every host, this host's rows kept; resume replays k batches."""
  rows = cfg.batch_size // num_shards
  ds = seqio.get_dataset(cfg.mixture_or_task_name, task_feature_lengths=dict(cfg.task_feature_lengths),
                         feature_converter=_converter(cfg), dataset_split=cfg.split, use_cached=cfg.use_cached,
                         shuffle=cfg.shuffle, num_epochs=num_epochs, seed=seed, verbose=False)
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = os.cpu_count() or 1
  options.threading.max_intra_op_parallelism = 1
  ds = ds.batch(cfg.batch_size).skip(start_step).prefetch(2).with_options(options)
  keys = model_feature_lengths(cfg)
  for batch in ds.as_numpy_iterator():
    out = {k: batch[k].astype(np.int32, copy=False) for k in keys}
    out = {k: np.pad(v, ((0, cfg.batch_size - len(v)), (0, 0))) for k, v in out.items()}
    yield {k: v[shard_id * rows:(shard_id + 1) * rows] for k, v in out.items()}


class _End:
  pass


def _prefetch(make: Callable[[], Iterator[Any]], depth: int = _PREFETCH) -> Iterator[Any]:
  """Runs an iterator in a daemon thread, `depth` items ahead; errors surface in the consumer."""
  items: queue.Queue = queue.Queue(depth)
  stop = threading.Event()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        items.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def work():
    try:
      for item in make():
        if not put(item):
          return
      put(_End())
    except BaseException as e:  # pylint: disable=broad-except  (re-raised in the consumer)
      put(e)

  threading.Thread(target=work, daemon=True, name='repeat_lm-data').start()
  try:
    while True:
      item = items.get()
      if isinstance(item, _End):
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()


def get_batches(cfg: DatasetConfig, *, start_step: int = 0, shard_id: int = 0, num_shards: int = 1,
                num_epochs: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Host-local int32 batches of `cfg.batch_size // num_shards` rows, from step `start_step` on.

  Keys: `model_feature_lengths(cfg)` (encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
  decoder_loss_weights, and with packing {encoder,decoder}_{segment_ids,positions}).

  num_epochs: None = the default for the stream: a training stream has the task's epochs (unbounded tasks never
    end), an unshuffled stream (evaluation) one pass. An int overrides it.
  Shards: host `shard_id` of `num_shards` gets its contiguous block of each global batch's rows, so the hosts'
    rows, concatenated in order, are exactly the single-host global batch.
  Resume: start_step=k yields exactly what the uninterrupted stream yields from step k.
  Finite streams: the final partial global batch is padded with all-zero rows (loss weights 0, segment ids 0), never
    dropped, so every row-count is static and every document is seen equally often.
  """
  # Counts as the configs check theirs (a repeated task's epochs, the batch size): num_epochs 0 or -1 (tf.data's
  # 'forever') gave an empty stream without a word, start_step 2.5 batches shifted by half a batch, and num_shards 0
  # a ZeroDivisionError.
  counts = {'start_step': (start_step, 0), 'shard_id': (shard_id, 0), 'num_shards': (num_shards, 1),
            **({} if num_epochs is None else {'num_epochs': (num_epochs, 1)})}
  bad = {k: v for k, (v, minimum) in counts.items() if not checks.is_count(v, minimum)}
  if bad:
    raise ValueError(f'get_batches {bad}: start_step and shard_id must be whole numbers >= 0, num_shards and '
                     'num_epochs (None: the stream\'s own) >= 1.')
  if cfg.batch_size % num_shards:
    raise ValueError(f'Global batch size {cfg.batch_size} is not divisible by the {num_shards} data shards (hosts).')
  if not 0 <= shard_id < num_shards:
    raise ValueError(f'shard_id {shard_id} is not in [0, {num_shards}).')
  seed = _seed(cfg)
  epochs = 'default' if num_epochs is None else num_epochs
  stream = example_stream(cfg, epochs, seed)  # built here, so errors (missing files, bad budgets) raise now
  if stream is None:
    epochs = (None if cfg.shuffle else 1) if num_epochs is None else num_epochs
    return _prefetch(lambda: _seqio_batches(cfg, seed, epochs, start_step, shard_id, num_shards))
  # The vocabulary's EOS, as SeqIO's append_eos_after_trim (and T5X's decoding) use it: not every vocabulary is T5's
  # (SentencePiece's own default is eos 2).
  eos_id = vocabulary_for(cfg.mixture_or_task_name).eos_id
  eos_id = EOS if eos_id is None else int(eos_id)
  return _prefetch(lambda: _indexed_batches(stream, cfg, start_step, shard_id, num_shards, eos_id))


# ---------------------------------------------------------------------------------------------------- checkpoints

_MUST_MATCH = ('mixture_or_task_name', 'split', 'seed', 'batch_size', 'shuffle', 'pack', 'task_feature_lengths',
               'store_content', 'examples_per_epoch', 'static_masks', 'stream_definition')


def _definition(stream: plan.Stream | plan.MixtureStream, by_content: bool = True) -> dict[str, Any]:
  """What decides a stream's examples besides the config's own fields: each task's subset, objective (denoisers,
  rates, mode tokens), static masks and layout, and a mixture's quotas. A task name alone does not pin these (a
  custom `name=`, a mixture named by hand, a corpus file changed under the same path)."""
  if isinstance(stream, plan.MixtureStream):
    return {'quotas': [int(q) for q in stream.quotas], 'block': stream.block,
            'tasks': [_definition(s, by_content) for s in stream.streams]}
  # The subset's content, not its cache key: the key changes with a corpus file's path and mtime (a copy on another
  # host, a `touch`), which must not stop an identical stream from resuming.
  store = stream.store.info.get('content') if by_content else stream.store.info.get('fingerprint')
  return {'store': store, 'vocab_size': int(stream.vocab_size),
          'denoisers': [dataclasses.asdict(d) for d in stream.objective.denoisers],
          'rates': [float(r) for r in stream.objective.rates], 'mode_ids': [m.tolist() for m in stream.mode_ids],
          'raw_lengths': [int(n) for n in stream.raw_lengths], 'static_masks': bool(stream.static_masks)}


def _definition_hash(stream: plan.Stream | plan.MixtureStream, by_content: bool = True) -> str:
  return hashlib.sha256(json.dumps(_definition(stream, by_content), sort_keys=True).encode()).hexdigest()[:32]


def data_state(cfg: DatasetConfig, step: int, by_content: bool = True) -> dict[str, Any]:
  """What a checkpoint records about the data at `step`: the config that defines the stream, and where step is.

  Resuming needs only `step` (the batch at step s is a function of the config and s); the rest lets a restart check
  that the stream is the same one (`check_resume`) and lets a person see where the run is (epoch, example).
  """
  state: dict[str, Any] = {'mixture_or_task_name': cfg.mixture_or_task_name, 'split': cfg.split, 'seed': cfg.seed,
                           'batch_size': cfg.batch_size, 'shuffle': cfg.shuffle, 'pack': cfg.pack,
                           'task_feature_lengths': dict(cfg.task_feature_lengths),
                           'examples_consumed': step * cfg.batch_size}
  stream = example_stream(cfg, seed=cfg.seed) if cfg.seed is not None else None
  if isinstance(stream, plan.Stream):
    epoch, index = divmod(step * cfg.batch_size, stream.examples_per_epoch)
    state.update({'epoch': epoch, 'example_in_epoch': index, 'examples_per_epoch': stream.examples_per_epoch,
                  'epochs': stream.epochs, 'unique_tokens': stream.store.num_tokens,
                  'static_masks': stream.static_masks, 'store_fingerprint': stream.store.info.get('fingerprint'),
                  'store_content': stream.store.info.get('content')})
  if stream is not None:
    state['stream_definition'] = _definition_hash(stream, by_content)
    if by_content:
      state['stream_definition_by'] = 'content'
  return state


def check_resume(cfg: DatasetConfig, saved: Mapping[str, Any] | None) -> None:
  """Raises if a checkpoint's data state was written for a different stream than `cfg` gives now."""
  if not saved:
    return
  # Checkpoints written before 'store_content' identified the subset by its cache key.
  by_content = saved.get('stream_definition_by') == 'content'
  now = data_state(cfg, 0, by_content)
  for key in _MUST_MATCH + (() if by_content else ('store_fingerprint',)):
    if key in saved and key in now and saved[key] != now[key]:
      raise ValueError(f'The checkpoint was trained on a different data stream: {key} was {saved[key]!r}, now '
                       f'{now[key]!r}. Resuming would not reproduce the uninterrupted run; restore the data config '
                       'or start a new MODEL_DIR.')
