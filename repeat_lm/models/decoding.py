"""Autoregressive decoding for the encoder-decoder: greedy, temperature sampling (optional top-k) and beam search.

Every method runs the decoder one token per step through its key/value cache, with T5X's calling convention:
  1. encoded = apply({'params'}, encoder_input_tokens, method='encode')
  2. cache   = apply({'params'}, encoded, inputs, tokens_BxL, tokens_BxL, decode=True, max_decode_length=L,
                     mutable=['cache'], method='decode')['cache']      (creates zeroed caches of length L)
  3. step    = apply({'params', 'cache'}, encoded, inputs, token_Bx1, token_Bx1, decode=True, mutable=['cache'],
                     method='decode')                                  (writes position i, returns logits [B, 1, V])
Decoding starts from token 0 (T5's BOS = pad) and stops at EOS (`eos_id`: the vocabulary's, T5's 1 by default);
positions after EOS hold 0. A module whose `scan_layers` is true stacks its cache on axis 0 ([layers, B, ...]), so
beam search reorders axis 1 there (parameter-shared stacks put their repeat axis after the batch axis, so the batch
stays there).

Shapes: B batch, K beams, S encoder length, L max decode length, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import unfreeze

from repeat_lm import checks

Array = jax.Array
BOS_ID, EOS_ID = 0, 1
METHODS = ("greedy", "sample", "beam")
# Log-probabilities of impossible candidates: finite, so sums stay comparable, but far below anything real.
NEG_INF = -1.0e7


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  method: str = "greedy"  # 'greedy' | 'sample' | 'beam'
  max_decode_length: int = 64  # L: tokens generated at most (EOS included)
  num_beams: int = 4  # beam search
  length_penalty_alpha: float = 0.6  # beam search: scores are log p / ((5 + length) / 6) ** alpha, as in T5/GNMT
  temperature: float = 1.0  # sampling
  topk: int = 0  # sampling: keep the k most likely tokens (0, or k >= the vocabulary: all)
  seed: int = 0  # sampling
  # The vocabulary's EOS: decoding stops at it. Training rows end with the task vocabulary's (pipeline.get_batches);
  # predict_texts sets it from the vocabulary it encodes with.
  eos_id: int = EOS_ID

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"Unknown decoding method {self.method!r}; choose from {METHODS}.")
    check_counts(self.max_decode_length, self.num_beams)
    # Checked here too, so a bad setting fails before a checkpoint is loaded; only sampling uses the temperature.
    check_sampling(self.temperature if self.method == "sample" else 1.0, self.topk)
    if self.method == "beam":
      check_length_penalty(self.length_penalty_alpha)


def check_counts(max_decode_length: int, num_beams: int = 1) -> None:
  """Both are array sizes: 64.0 or True passed a `< 1` test and failed in the decode loop with a shape TypeError (or
  decoded one token), and 0 beams with a ZeroDivisionError."""
  bad = {k: v for k, v in {"max_decode_length": max_decode_length, "num_beams": num_beams}.items()
         if not checks.is_count(v)}
  if bad:
    raise ValueError(f"{bad}: max_decode_length and num_beams must be whole numbers of at least 1.")


def _concrete_number(value: Any) -> bool:
  """A number known now: a Python or numpy real, or a 0-d array that is not traced. A traced one (sampling or beam
  search under jit with the setting an argument) has no value yet: comparing it raises TracerBoolConversionError.
  Not a bool (True == 1 to Python: temperature=True sampled at 1.0)."""
  if isinstance(value, (bool, np.bool_)):
    return False
  return isinstance(value, numbers.Real) or (np.ndim(value) == 0 and hasattr(value, "dtype")
                                             and not isinstance(value, jax.core.Tracer))


def check_sampling(temperature: float, topk: int) -> None:
  """The settings `sample` accepts: logits are divided by the temperature, and top-k keeps k tokens (0: all)."""
  # A traced temperature goes unchecked; anything else must be a positive number (not a gin string, which failed the
  # comparison with a TypeError). top-k is a shape: concrete.
  if not isinstance(temperature, jax.core.Tracer) and not (_concrete_number(temperature) and temperature > 0):
    raise ValueError(f"temperature={temperature}: sampling divides the logits by it, so it must be > 0 (use greedy "
                     "decoding for the argmax).")
  if not checks.is_count(topk, 0):
    raise ValueError(f"topk={topk!r}: keep k >= 1 most likely tokens, or 0 for all (a whole number: top-k's k is a "
                     "shape).")


def check_length_penalty(alpha: float) -> None:
  """Refuse a non-finite beam-search alpha: every score NaN (or all equal), beams came back arbitrary, no error."""
  # Only a traced alpha goes unchecked; a concrete 0-d array (np.array(nan), jnp.float32(nan)) has a value. Anything
  # else must be a number: a gin string ('0.6') passed DecodeConfig and failed in the first beam step, after the
  # checkpoint was loaded, with a bare TypeError.
  if not isinstance(alpha, jax.core.Tracer) and not (_concrete_number(alpha) and math.isfinite(float(alpha))):
    raise ValueError(f"length_penalty_alpha={alpha}: beam scores divide by ((5 + length) / 6) ** alpha, so it must "
                     "be finite (T5: 0.6; 0: no length penalty).")


def cache_batch_axis(module: nn.Module) -> int:
  """Axis of the batch in cache arrays: 1 under scan (layers first), else 0 (T5X's `cache_offset`)."""
  return 1 if getattr(module, "scan_layers", False) else 0


def map_cache(fn, cache: Any, default_axis: int = 0) -> Any:
  """fn(array, batch_axis) on every cache array except the `cache_index` counters (which have no batch axis).

  The batch axis is `default_axis` (cache_batch_axis) for every array, as T5X's decoding assumes: a shared group's
  repeat axis sits after it (stack.py).
  """
  flat = traverse_util.flatten_dict(unfreeze(cache))
  return traverse_util.unflatten_dict({k: v if k[-1] == "cache_index" else fn(v, default_axis)
                                       for k, v in flat.items()})


def repeat_batch(x: Array, k: int, axis: int = 0) -> Array:
  """[.., B, ..] -> [.., B * k, ..] with each row repeated k times in place (row b -> rows b*k .. b*k+k-1)."""
  return jnp.repeat(x, k, axis=axis)


class _Decoder:
  """Binds (module, params, encoder inputs) into `init_cache()` and `step(cache, token_Bx1) -> (logits_BxV, cache)`."""

  def __init__(self, module: nn.Module, params: Any, encoder_input_tokens_BxS: Array, max_decode_length: int):
    self.module, self.params, self.inputs, self.length = module, params, encoder_input_tokens_BxS, max_decode_length
    self.encoded = module.apply({"params": params}, encoder_input_tokens_BxS, enable_dropout=False, method="encode")

  def init_cache(self) -> Any:
    tokens_BxL = jnp.ones((self.inputs.shape[0], self.length), jnp.int32)
    _, variables = self.module.apply({"params": self.params}, self.encoded, self.inputs, tokens_BxL, tokens_BxL,
                                     enable_dropout=False, decode=True, max_decode_length=self.length,
                                     mutable=["cache"], method="decode")
    return variables["cache"]

  def step(self, cache: Any, token_Bx1: Array) -> tuple[Array, Any]:
    logits_Bx1xV, variables = self.module.apply(
        {"params": self.params, "cache": cache}, self.encoded, self.inputs, token_Bx1, token_Bx1,
        enable_dropout=False, decode=True, max_decode_length=self.length, mutable=["cache"], method="decode")
    return logits_Bx1xV[:, 0].astype(jnp.float32), variables["cache"]


def _sample_loop(module, params, encoder_input_tokens_BxS, max_decode_length, choose,
                 eos_id: int = EOS_ID) -> tuple[Array, Array]:
  """Shared loop of greedy and sampling: choose(logits_BxV, i) picks the next tokens [B]."""
  dec = _Decoder(module, params, encoder_input_tokens_BxS, max_decode_length)
  batch = encoder_input_tokens_BxS.shape[0]

  def cond(state):
    i, _, _, _, _, done_B = state
    return (i < max_decode_length) & ~jnp.all(done_B)

  def body(state):
    i, cache, token_B, out_BxL, logp_BxL, done_B = state
    logits_BxV, cache = dec.step(cache, token_B[:, None])
    next_B = jnp.where(done_B, 0, choose(logits_BxV, i)).astype(jnp.int32)
    logp_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BxV), next_B[:, None], axis=-1)[:, 0]
    out_BxL = out_BxL.at[:, i].set(next_B)
    logp_BxL = logp_BxL.at[:, i].set(jnp.where(done_B, 0.0, logp_B))
    return i + 1, cache, next_B, out_BxL, logp_BxL, done_B | (next_B == eos_id)

  state = (jnp.asarray(0), dec.init_cache(), jnp.full((batch,), BOS_ID, jnp.int32),
           jnp.zeros((batch, max_decode_length), jnp.int32), jnp.zeros((batch, max_decode_length), jnp.float32),
           jnp.zeros((batch,), bool))
  _, _, _, tokens_BxL, logp_BxL, _ = jax.lax.while_loop(cond, body, state)
  return tokens_BxL, logp_BxL


def greedy(module: nn.Module, params: Any, encoder_input_tokens_BxS: Array,
           max_decode_length: int, eos_id: int = EOS_ID) -> tuple[Array, Array]:
  """Most likely next token at every step -> (tokens [B, L], log-probability of each chosen token [B, L])."""
  check_counts(max_decode_length)
  return _sample_loop(module, params, encoder_input_tokens_BxS, max_decode_length,
                      lambda logits_BxV, i: jnp.argmax(logits_BxV, axis=-1), eos_id)


def sample(module: nn.Module, params: Any, encoder_input_tokens_BxS: Array, max_decode_length: int, rng: Array, *,
           temperature: float = 1.0, topk: int = 0, eos_id: int = EOS_ID) -> tuple[Array, Array]:
  """Draw from softmax(logits / temperature), optionally restricted to the top-k tokens; step i uses fold_in(rng, i).

  Returns (tokens [B, L], log-probability of each token under the model, before temperature/top-k [B, L]).
  """
  check_counts(max_decode_length)
  check_sampling(temperature, topk)

  def choose(logits_BxV, i):
    logits_BxV = logits_BxV / temperature
    # k >= V keeps every token, as k = 0 does (lax.top_k refuses a k larger than the vocabulary).
    if 0 < topk < logits_BxV.shape[-1]:
      kth_B1 = jax.lax.top_k(logits_BxV, topk)[0][:, -1:]
      logits_BxV = jnp.where(logits_BxV < kth_B1, -jnp.inf, logits_BxV)
    return jax.random.categorical(jax.random.fold_in(rng, i), logits_BxV, axis=-1)

  return _sample_loop(module, params, encoder_input_tokens_BxS, max_decode_length, choose, eos_id)


def _length_penalty(length: Array, alpha: float) -> Array:
  return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


def beam_search(module: nn.Module, params: Any, encoder_input_tokens_BxS: Array, max_decode_length: int, *,
                num_beams: int = 4, alpha: float = 0.6, eos_id: int = EOS_ID) -> tuple[Array, Array]:
  """Beam search with GNMT length normalisation -> (best tokens [B, L], their scores [B]) .. and all beams: see
  `beam_search_all`."""
  tokens_BxKxL, scores_BxK = beam_search_all(module, params, encoder_input_tokens_BxS, max_decode_length,
                                             num_beams=num_beams, alpha=alpha, eos_id=eos_id)
  return tokens_BxKxL[:, 0], scores_BxK[:, 0]


def beam_search_all(module: nn.Module, params: Any, encoder_input_tokens_BxS: Array, max_decode_length: int, *,
                    num_beams: int = 4, alpha: float = 0.6, eos_id: int = EOS_ID) -> tuple[Array, Array]:
  """All K beams, best first: (tokens [B, K, L], length-normalised log-probabilities [B, K]).

  Each step extends the K alive beams by every token, keeps the 2K best extensions (so K of them can go on even if
  the others end), moves those ending in EOS to the finished set (scored log p / length penalty) and the best K
  others to the alive set. It stops when no alive beam can overtake the worst finished one, or after L tokens.
  """
  check_counts(max_decode_length, num_beams)
  check_length_penalty(alpha)  # checked here too, as `sample` checks its settings: callers need no DecodeConfig
  k, length = num_beams, max_decode_length
  batch = encoder_input_tokens_BxS.shape[0]
  axis = cache_batch_axis(module)
  # [el0, el0, el1, el1, ...]: beams of one example sit next to each other, as T5X's flat_batch_beam_expand.
  dec = _Decoder(module, params, repeat_batch(encoder_input_tokens_BxS, k), length)
  positions_L = jnp.arange(length)

  def gather_beams(x, beam_idx_BxK, batch_axis=0):
    """Pick beams per example along a flattened [B*K] (or [B, K]) axis."""
    shape = x.shape
    x = x.reshape(shape[:batch_axis] + (batch, k) + shape[batch_axis + 1:])
    idx = beam_idx_BxK.reshape((1,) * batch_axis + (batch, k) + (1,) * (x.ndim - batch_axis - 2))
    x = jnp.take_along_axis(x, idx, axis=batch_axis + 1)
    return x.reshape(shape)

  def cond(state):
    i, _, _, alive_logp_BxK, _, finished_scores_BxK, finished_BxK = state
    best_possible_B = alive_logp_BxK[:, 0] / _length_penalty(jnp.asarray(length), alpha)
    worst_finished_B = jnp.min(jnp.where(finished_BxK, finished_scores_BxK, jnp.inf), axis=1)
    can_improve = ~jnp.all(finished_BxK, axis=1) | (best_possible_B > worst_finished_B)
    return (i < length) & jnp.any(can_improve)

  def body(state):
    i, cache, alive_BxKxL, alive_logp_BxK, finished_seq_BxKxL, finished_scores_BxK, finished_BxK = state
    token_BK = jnp.where(i == 0, BOS_ID, alive_BxKxL[:, :, jnp.maximum(i - 1, 0)]).reshape(batch * k)
    logits_BKxV, cache = dec.step(cache, token_BK[:, None])
    vocab = logits_BKxV.shape[-1]
    logp_BxKxV = jax.nn.log_softmax(logits_BKxV).reshape(batch, k, vocab) + alive_logp_BxK[:, :, None]
    top_logp_Bx2K, top_idx_Bx2K = jax.lax.top_k(logp_BxKxV.reshape(batch, k * vocab), 2 * k)
    beam_Bx2K, token_Bx2K = top_idx_Bx2K // vocab, top_idx_Bx2K % vocab
    seq_Bx2KxL = jnp.take_along_axis(alive_BxKxL, beam_Bx2K[:, :, None], axis=1)
    seq_Bx2KxL = jnp.where(positions_L == i, token_Bx2K[:, :, None], seq_Bx2KxL)
    ends_Bx2K = token_Bx2K == eos_id

    # Alive: the best K extensions that did not end.
    alive_logp_Bx2K = jnp.where(ends_Bx2K, NEG_INF, top_logp_Bx2K)
    alive_logp_BxK, keep_BxK = jax.lax.top_k(alive_logp_Bx2K, k)
    alive_BxKxL = jnp.take_along_axis(seq_Bx2KxL, keep_BxK[:, :, None], axis=1)
    source_beam_BxK = jnp.take_along_axis(beam_Bx2K, keep_BxK, axis=1)
    cache = map_cache(lambda x, batch_axis: gather_beams(x, source_beam_BxK, batch_axis), cache, axis)

    # Finished: merge the ones that ended now into the K best so far.
    new_scores_Bx2K = jnp.where(ends_Bx2K, top_logp_Bx2K / _length_penalty(i + 1, alpha), NEG_INF)
    all_scores_Bx3K = jnp.concatenate([finished_scores_BxK, new_scores_Bx2K], axis=1)
    all_seq_Bx3KxL = jnp.concatenate([finished_seq_BxKxL, seq_Bx2KxL], axis=1)
    all_flags_Bx3K = jnp.concatenate([finished_BxK, ends_Bx2K], axis=1)
    finished_scores_BxK, pick_BxK = jax.lax.top_k(all_scores_Bx3K, k)
    finished_seq_BxKxL = jnp.take_along_axis(all_seq_Bx3KxL, pick_BxK[:, :, None], axis=1)
    finished_BxK = jnp.take_along_axis(all_flags_Bx3K, pick_BxK, axis=1)
    return i + 1, cache, alive_BxKxL, alive_logp_BxK, finished_seq_BxKxL, finished_scores_BxK, finished_BxK

  # Only the first beam starts alive, so the K copies of the same prefix do not fill the beam with duplicates.
  alive_logp_BxK = jnp.tile(jnp.asarray([0.0] + [NEG_INF] * (k - 1), jnp.float32), (batch, 1))
  state = (jnp.asarray(0), dec.init_cache(), jnp.zeros((batch, k, length), jnp.int32), alive_logp_BxK,
           jnp.zeros((batch, k, length), jnp.int32), jnp.full((batch, k), NEG_INF, jnp.float32),
           jnp.zeros((batch, k), bool))
  _, _, alive_BxKxL, alive_logp_BxK, finished_seq_BxKxL, finished_scores_BxK, finished_BxK = jax.lax.while_loop(
      cond, body, state)
  # Beams still alive after L tokens compete as they are (length L, no EOS): an example with fewer than K finished
  # beams fills up with them. Empty finished slots never win.
  alive_scores_BxK = alive_logp_BxK / _length_penalty(jnp.asarray(length), alpha)
  scores_Bx2K = jnp.concatenate([jnp.where(finished_BxK, finished_scores_BxK, 2 * NEG_INF), alive_scores_BxK], 1)
  scores_BxK, pick_BxK = jax.lax.top_k(scores_Bx2K, k)
  tokens_BxKxL = jnp.take_along_axis(jnp.concatenate([finished_seq_BxKxL, alive_BxKxL], 1), pick_BxK[:, :, None], 1)
  return tokens_BxKxL, scores_BxK


def decode(module: nn.Module, params: Any, encoder_input_tokens_BxS: Array, cfg: DecodeConfig = DecodeConfig(),
           rng: Array | None = None) -> Array:
  """Tokens [B, L] with `cfg`'s method (inputs padded with 0). Compiled once per (module, config, shapes); the
  sampling key is an argument (default: key(cfg.seed)), so new seeds do not recompile."""
  rng = jax.random.key(cfg.seed) if rng is None else rng
  return _decode(module, params, encoder_input_tokens_BxS, dataclasses.replace(cfg, seed=0), rng)


@functools.partial(jax.jit, static_argnames=("module", "cfg"))
def _decode(module: nn.Module, params: Any, encoder_input_tokens_BxS: Array, cfg: DecodeConfig,
            rng: Array) -> Array:
  if cfg.method == "greedy":
    return greedy(module, params, encoder_input_tokens_BxS, cfg.max_decode_length, cfg.eos_id)[0]
  if cfg.method == "sample":
    return sample(module, params, encoder_input_tokens_BxS, cfg.max_decode_length, rng, temperature=cfg.temperature,
                  topk=cfg.topk, eos_id=cfg.eos_id)[0]
  return beam_search(module, params, encoder_input_tokens_BxS, cfg.max_decode_length, num_beams=cfg.num_beams,
                     alpha=cfg.length_penalty_alpha, eos_id=cfg.eos_id)[0]


def trim_after_eos(tokens_L: np.ndarray, eos_id: int = EOS_ID) -> list[int]:
  """Token ids up to (not including) the first EOS, without padding."""
  tokens = [int(t) for t in np.asarray(tokens_L)]
  if eos_id in tokens:
    tokens = tokens[:tokens.index(eos_id)]
  return [t for t in tokens if t != 0]
