"""What the trainer consumes: deterministic, resumable, host-local numpy batches from a SeqIO task or mixture.

The batch at step s is a pure function of (DatasetConfig, s, shard): every random draw in the pipeline (document
order, chunk masks, example shuffle) is seeded from `cfg.seed`, and resuming at step k skips the first k batches of
the same stream. TF runs on the CPU only, so it never takes accelerator memory from JAX.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterator, Mapping

import numpy as np
import seqio
import tensorflow as tf

from repeat_lm.data import sources
from repeat_lm.data import tasks  # noqa: F401  pylint: disable=unused-import  (registers the default task)


def _keep_tf_off_accelerators() -> None:
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TF already initialised its devices; nothing left to do safely
    pass


_keep_tf_off_accelerators()


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]  # e.g. {'inputs': 512, 'targets': 114}
  split: str = 'train'
  batch_size: int = 128  # GLOBAL batch size (all hosts)
  shuffle: bool = True  # True: training stream (repeats forever by default); False: one ordered pass
  seed: int | None = 0  # None: fresh randomness each call (not reproducible, not resumable)
  pack: bool = True  # pack several examples per row (segment ids / positions say which)
  use_cached: bool = False  # read the output of SeqIO's cache job instead of preprocessing on the fly


def _converter(cfg: DatasetConfig) -> seqio.EncDecFeatureConverter:
  return seqio.EncDecFeatureConverter(pack=cfg.pack)


def model_feature_lengths(cfg: DatasetConfig) -> dict[str, int]:
  """{'encoder_input_tokens': 512, 'decoder_input_tokens': 114, ...}: the row length of every batch key."""
  return dict(_converter(cfg).get_model_feature_lengths(dict(cfg.task_feature_lengths)))


def vocabulary_for(mixture_or_task_name: str) -> seqio.Vocabulary:
  """The output (targets) vocabulary of a registered task or mixture."""
  return seqio.get_mixture_or_task(mixture_or_task_name).output_features['targets'].vocabulary


def source_token_count(mixture_or_task_name: str, split: str) -> int | None:
  """Tokens (no EOS) in a split's documents, for counting epochs; None when the source is not a local corpus.

  Tokenises the whole split (under a second for the bundled corpora): call once per run, not per step.
  """
  provider = seqio.get_mixture_or_task(mixture_or_task_name)
  source = getattr(provider, 'source', None)
  if not isinstance(source, sources.CorpusSource):
    return None
  tokenizer = vocabulary_for(mixture_or_task_name).tokenizer
  return sum(len(ids) for ids in tokenizer.encode(list(source.load().split(split)), num_threads=os.cpu_count()))


def _shard_seed(seed: int | None, shard_id: int, num_shards: int) -> int | None:
  """One host keeps `seed`; with several, each shard gets its own, so hosts do not share mask and shuffle draws."""
  if seed is None or num_shards == 1:
    return seed
  digest = hashlib.sha256(f'{seed}/{shard_id}/{num_shards}'.encode()).digest()
  return int.from_bytes(digest[:4], 'little') >> 1  # SeqIO adds small offsets; stay well inside int32


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True  # parallel maps keep their order: the stream is reproducible
  # One pool of at most one thread per core for the whole pipeline (SeqIO asks for 256 parallel tokenizer calls),
  # and no op-level parallelism inside it, so TF leaves the cores to the training step.
  options.threading.private_threadpool_size = os.cpu_count() or 1
  options.threading.max_intra_op_parallelism = 1
  return options


def get_batches(cfg: DatasetConfig, *, start_step: int = 0, shard_id: int = 0, num_shards: int = 1,
                num_epochs: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Host-local int32 batches of `cfg.batch_size // num_shards` rows, from step `start_step` on.

  Keys: `model_feature_lengths(cfg)` (encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
  decoder_loss_weights, and with packing {encoder,decoder}_{segment_ids,positions}).

  num_epochs: None = the default for the kind of stream: forever when `cfg.shuffle` (training), one pass when not
    (evaluation). Give an int to override.
  Shards: host `shard_id` of `num_shards` reads every num_shards-th document of the split (seqio.ShardInfo), with
    its own seed derived from (cfg.seed, shard_id, num_shards).
  Resume: start_step=k yields exactly what the uninterrupted stream yields from step k (by skipping k batches).
  Finite streams: the final partial batch is padded with all-zero rows (loss weights 0, segment ids 0), never
  dropped, so every row-count is static. Note that in a multi-host evaluation hosts may see different numbers of
  batches.
  """
  if cfg.batch_size % num_shards:
    raise ValueError(f'Global batch size {cfg.batch_size} is not divisible by the {num_shards} data shards (hosts).')
  if not 0 <= shard_id < num_shards:
    raise ValueError(f'shard_id {shard_id} is not in [0, {num_shards}).')
  rows = cfg.batch_size // num_shards
  if num_epochs is None and not cfg.shuffle:
    num_epochs = 1
  ds = seqio.get_dataset(
      cfg.mixture_or_task_name,
      task_feature_lengths=dict(cfg.task_feature_lengths),
      feature_converter=_converter(cfg),
      dataset_split=cfg.split,
      use_cached=cfg.use_cached,
      shuffle=cfg.shuffle,
      num_epochs=num_epochs,
      shard_info=seqio.ShardInfo(index=shard_id, num_shards=num_shards),
      seed=_shard_seed(cfg.seed, shard_id, num_shards),
      verbose=False,
  )
  # An infinite stream never has a remainder; dropping it makes the static batch dimension known to tf.data.
  ds = ds.batch(rows, drop_remainder=num_epochs is None)
  ds = ds.skip(start_step).prefetch(tf.data.AUTOTUNE).with_options(_options())
  keys = model_feature_lengths(cfg)
  for batch in ds.as_numpy_iterator():
    out = {k: batch[k].astype(np.int32, copy=False) for k in keys}
    if len(out['encoder_input_tokens']) < rows:
      out = {k: np.pad(v, ((0, rows - len(v)), (0, 0))) for k, v in out.items()}
    yield out
