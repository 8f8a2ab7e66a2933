"""T5 v1.1 encoder-decoder Transformer that fits T5X's module contract (`__call__`, `encode`, `decode`).

Math follows Hugging Face's `T5ForConditionalGeneration` (feed_forward_proj='gated-gelu') so checkpoints convert:
pre-norm RMSNorm blocks, one relative position bias table per stack (computed once, added in every self-attention
layer), gated-GELU MLP, untied output projection. Shape letters as in layers.py; layer stacks optionally run under
`scan` (parameters stacked on a 'layers' axis) and `remat`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import unfreeze
from flax.linen import partitioning as nn_partitioning

from repeat_lm.models import layers

Array = jax.Array

# Stacked (scanned) parameters carry the 'layers' axis at this position, e.g. wi_0 kernel [D, layers, F]; T5X uses
# the same position. Cache variables are stacked on axis 0 (cache_index is a scalar per layer).
PARAM_SCAN_AXIS = 1

# What each remat policy saves for the backward pass; everything else is recomputed.
REMAT_POLICIES = {
    "none": None,  # no remat at all
    # Save only matmul outputs without batch dimensions (the projections), recompute attention and elementwise ops.
    "minimal": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "full": jax.checkpoint_policies.nothing_saveable,  # save nothing but the layer inputs
}


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hyper-parameters of a T5 v1.1 model; the defaults are T5 v1.1 Base."""
  vocab_size: int = 32128  # 32,100 used by the T5 SentencePiece vocabulary, padded to a multiple of 128
  dtype: str = "bfloat16"  # activation dtype; parameters are always float32
  emb_dim: int = 768  # D, d_model
  num_heads: int = 12  # H
  num_encoder_layers: int = 12
  num_decoder_layers: int = 12
  head_dim: int = 64  # E, d_kv
  mlp_dim: int = 2048  # F, d_ff
  mlp_activations: tuple[str, ...] = ("gelu", "linear")  # gated GELU; ('relu',) for original T5
  dropout_rate: float = 0.0  # 0 in pre-training, 0.1 in fine-tuning (T5X defaults)
  logits_via_embedding: bool = False  # tie output projection to the token embedding (then logits / sqrt(D))
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  float32_attention_logits: bool = True  # q.k logits and softmax in float32 even with bfloat16 activations
  scan_layers: bool = False  # stack layers with nn.scan: faster compiles, params get a 'layers' axis
  remat_policy: str = "none"  # 'none' | 'minimal' | 'full', see REMAT_POLICIES

  def __post_init__(self):
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy={self.remat_policy!r}; choose from {sorted(REMAT_POLICIES)}.")
    # gin passes lists as lists; keep the config hashable.
    object.__setattr__(self, "mlp_activations", tuple(self.mlp_activations))

  @property
  def activation_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)


class EncoderLayer(nn.Module):
  """Pre-norm self-attention + MLP block. Returns (x, None) when `scanned` (the nn.scan carry convention)."""
  config: T5Config
  deterministic: bool
  scanned: bool = False

  @nn.compact
  def __call__(self, x_BxSxD: Array, bias_1xHxSxS: Array, mask_Bx1xSxS: Array):
    cfg, dtype = self.config, self.config.activation_dtype
    norm = lambda name: layers.RMSNorm(cfg.layer_norm_epsilon, dtype, name=name)
    drop = lambda h: layers.dropout(h, cfg.dropout_rate, self.deterministic)

    h_BxSxD = norm("pre_attention_layer_norm")(x_BxSxD)
    h_BxSxD = layers.MultiHeadAttention(cfg.num_heads, cfg.head_dim, dtype, cfg.dropout_rate,
                                        cfg.float32_attention_logits, name="attention")(
        h_BxSxD, h_BxSxD, bias_1xHxSxS, mask_Bx1xSxS, self.deterministic)
    x_BxSxD = x_BxSxD + drop(h_BxSxD)

    h_BxSxD = norm("pre_mlp_layer_norm")(x_BxSxD)
    h_BxSxD = layers.MlpBlock(cfg.mlp_dim, cfg.mlp_activations, dtype, cfg.dropout_rate, name="mlp")(
        h_BxSxD, self.deterministic)
    x_BxSxD = nn.with_logical_constraint(x_BxSxD + drop(h_BxSxD), ("batch", "length", "embed"))
    return (x_BxSxD, None) if self.scanned else x_BxSxD


class DecoderLayer(nn.Module):
  """Pre-norm causal self-attention (cached when decoding) + cross-attention + MLP block."""
  config: T5Config
  deterministic: bool
  decode: bool = False
  decode_length: int | None = None
  scanned: bool = False

  @nn.compact
  def __call__(self, y_BxTxD: Array, encoded_BxSxD: Array, bias_1xHxTxL: Array, self_mask_Bx1xTxL: Array,
               cross_mask_Bx1xTxS: Array):
    cfg, dtype = self.config, self.config.activation_dtype
    norm = lambda name: layers.RMSNorm(cfg.layer_norm_epsilon, dtype, name=name)
    drop = lambda h: layers.dropout(h, cfg.dropout_rate, self.deterministic)
    attention = lambda name, decode: layers.MultiHeadAttention(
        cfg.num_heads, cfg.head_dim, dtype, cfg.dropout_rate, cfg.float32_attention_logits, decode=decode,
        decode_length=self.decode_length, name=name)

    h_BxTxD = norm("pre_self_attention_layer_norm")(y_BxTxD)
    h_BxTxD = attention("self_attention", self.decode)(h_BxTxD, h_BxTxD, bias_1xHxTxL, self_mask_Bx1xTxL,
                                                       self.deterministic)
    y_BxTxD = y_BxTxD + drop(h_BxTxD)

    h_BxTxD = norm("pre_cross_attention_layer_norm")(y_BxTxD)
    h_BxTxD = attention("encoder_decoder_attention", False)(h_BxTxD, encoded_BxSxD, None, cross_mask_Bx1xTxS,
                                                            self.deterministic)
    y_BxTxD = y_BxTxD + drop(h_BxTxD)

    h_BxTxD = norm("pre_mlp_layer_norm")(y_BxTxD)
    h_BxTxD = layers.MlpBlock(cfg.mlp_dim, cfg.mlp_activations, dtype, cfg.dropout_rate, name="mlp")(
        h_BxTxD, self.deterministic)
    y_BxTxD = nn.with_logical_constraint(y_BxTxD + drop(h_BxTxD), ("batch", "length", "embed"))
    return (y_BxTxD, None) if self.scanned else y_BxTxD


def _run_layers(layer_cls: type[nn.Module], cfg: T5Config, num_layers: int, x: Array, *broadcast_args: Array,
                use_remat: bool = True, **layer_kwargs: Any) -> Array:
  """Apply `num_layers` layers to x, each getting the same `broadcast_args`, with cfg's remat and scan settings.

  Must be called from inside a compact method: the layers become children of that module ('layers_{i}', or
  'layers' with stacked parameters when scanned).
  """
  policy = REMAT_POLICIES[cfg.remat_policy]
  if cfg.remat_policy != "none" and use_remat:
    # prevent_cse is only needed outside scan (inside, the loop already keeps XLA from merging recomputation).
    layer_cls = nn.remat(layer_cls, policy=policy, prevent_cse=not cfg.scan_layers)
  if not cfg.scan_layers:
    for i in range(num_layers):
      x = layer_cls(config=cfg, name=f"layers_{i}", **layer_kwargs)(x, *broadcast_args)
    return x
  scanned_cls = nn_partitioning.scan_with_axes(
      layer_cls,
      variable_axes={"params": PARAM_SCAN_AXIS, "cache": 0},
      split_rngs={"params": True, "dropout": True},  # different init and dropout masks per layer
      in_axes=(nn.broadcast,) * len(broadcast_args),
      length=num_layers,
      axis_name="layers")
  x, _ = scanned_cls(config=cfg, scanned=True, name="layers", **layer_kwargs)(x, *broadcast_args)
  return x


class Encoder(nn.Module):
  """Embedded tokens -> encoded [B, S, D]: dropout, layers sharing one bidirectional bias, final norm, dropout."""
  config: T5Config

  @nn.compact
  def __call__(self, x_BxSxD: Array, mask_Bx1xSxS: Array, deterministic: bool) -> Array:
    cfg = self.config
    positions_S = jnp.arange(x_BxSxD.shape[1])  # array indices; the segment mask makes them right for packing
    bias_1xHxSxS = layers.RelativePositionBias(cfg.num_heads, cfg.relative_attention_num_buckets,
                                               cfg.relative_attention_max_distance, name="relpos_bias")(
        positions_S, positions_S, bidirectional=True)
    x_BxSxD = nn.with_logical_constraint(layers.dropout(x_BxSxD, cfg.dropout_rate, deterministic),
                                         ("batch", "length", "embed"))
    x_BxSxD = _run_layers(EncoderLayer, cfg, cfg.num_encoder_layers, x_BxSxD, bias_1xHxSxS, mask_Bx1xSxS,
                          deterministic=deterministic)
    x_BxSxD = layers.RMSNorm(cfg.layer_norm_epsilon, cfg.activation_dtype, name="encoder_norm")(x_BxSxD)
    return layers.dropout(x_BxSxD, cfg.dropout_rate, deterministic)


class Decoder(nn.Module):
  """Embedded decoder inputs -> normed hidden states [B, T, D]; owns decoder positions, masks and the cache."""
  config: T5Config

  @nn.compact
  def __call__(self, y_BxTxD: Array, encoded_BxSxD: Array, decoder_target_tokens_BxT: Array,
               encoder_input_tokens_BxS: Array, decoder_segment_ids_BxT: Array | None,
               encoder_segment_ids_BxS: Array | None, deterministic: bool, decode: bool,
               max_decode_length: int | None) -> Array:
    cfg = self.config
    length = y_BxTxD.shape[1]
    cache_state = self._cache_state() if decode else None
    if cache_state is None:  # training / scoring, or the init call that creates the cache
      query_positions_T = key_positions_L = jnp.arange(length)
      # While decoding, targets are the fed tokens and may be 0 (BOS = pad id): only mask padding otherwise.
      query_valid_BxT = (jnp.ones_like(decoder_target_tokens_BxT, bool) if decode
                         else decoder_target_tokens_BxT > 0)
      self_mask_Bx1xTxL = layers.make_causal_mask(length) & layers.make_attention_mask(query_valid_BxT,
                                                                                       query_valid_BxT)
      if decoder_segment_ids_BxT is not None:
        self_mask_Bx1xTxL &= layers.make_segment_mask(decoder_segment_ids_BxT, decoder_segment_ids_BxT)
    else:  # one cached step: the query sits at cache_index and sees cache positions <= it
      cache_index, cache_length = cache_state
      query_positions_T, key_positions_L = cache_index[None], jnp.arange(cache_length)
      query_valid_BxT = jnp.ones_like(decoder_target_tokens_BxT, bool)
      self_mask_Bx1xTxL = (key_positions_L <= cache_index)[None, None, None, :]

    cross_mask_Bx1xTxS = layers.make_attention_mask(query_valid_BxT, encoder_input_tokens_BxS > 0)
    if decoder_segment_ids_BxT is not None and encoder_segment_ids_BxS is not None and cache_state is None:
      cross_mask_Bx1xTxS &= layers.make_segment_mask(decoder_segment_ids_BxT, encoder_segment_ids_BxS)
    bias_1xHxTxL = layers.RelativePositionBias(cfg.num_heads, cfg.relative_attention_num_buckets,
                                               cfg.relative_attention_max_distance, name="relpos_bias")(
        query_positions_T, key_positions_L, bidirectional=False)

    y_BxTxD = nn.with_logical_constraint(layers.dropout(y_BxTxD, cfg.dropout_rate, deterministic),
                                         ("batch", "length", "embed"))
    # remat only pays off when gradients are taken, never while decoding.
    y_BxTxD = _run_layers(DecoderLayer, cfg, cfg.num_decoder_layers, y_BxTxD, encoded_BxSxD, bias_1xHxTxL,
                          self_mask_Bx1xTxL, cross_mask_Bx1xTxS, use_remat=not decode, deterministic=deterministic,
                          decode=decode, decode_length=max_decode_length)
    y_BxTxD = layers.RMSNorm(cfg.layer_norm_epsilon, cfg.activation_dtype, name="decoder_norm")(y_BxTxD)
    return layers.dropout(y_BxTxD, cfg.dropout_rate, deterministic)

  def _cache_state(self) -> tuple[Array, int] | None:
    """(cache_index, cache length L) read from the layers' self-attention cache, or None before it exists.

    All layers advance together, so any layer's index is the decoder's position. With scan the cache has a leading
    layer axis; the length is axis -3 of cached_key [..., B, L, H, E] either way.
    """
    if not self.has_variable("cache", "layers") and not self.has_variable("cache", "layers_0"):
      return None
    flat = traverse_util.flatten_dict(unfreeze(self.variables["cache"]))
    cached_key = next(v for k, v in flat.items() if k[-1] == "cached_key")
    cache_index = next(v for k, v in flat.items() if k[-1] == "cache_index")
    return jnp.reshape(cache_index, (-1,))[0], cached_key.shape[-3]


class Transformer(nn.Module):
  """T5 v1.1 encoder-decoder with T5X's module interface; returns float32 logits [B, T, V]."""
  config: T5Config

  def setup(self):
    cfg = self.config
    self.token_embedder = layers.Embed(cfg.vocab_size, cfg.emb_dim, cfg.activation_dtype)  # shared by both stacks
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    if not cfg.logits_via_embedding:
      self.logits_dense = layers.DenseGeneral(cfg.vocab_size, kernel_axes=("embed", "vocab"), dtype=jnp.float32)

  @property
  def scan_layers(self) -> bool:
    """T5X's decoding reads this to find the batch axis of a scanned cache ([layers, B, ...], cache_offset=1)."""
    return self.config.scan_layers

  def encode(self, encoder_input_tokens, encoder_segment_ids=None, enable_dropout=True):
    """Encoder tokens [B, S] -> encoded [B, S, D]. Positions are array indices (segment masks handle packing)."""
    valid_BxS = encoder_input_tokens > 0
    mask_Bx1xSxS = layers.make_attention_mask(valid_BxS, valid_BxS)
    if encoder_segment_ids is not None:
      mask_Bx1xSxS &= layers.make_segment_mask(encoder_segment_ids, encoder_segment_ids)
    x_BxSxD = self.token_embedder(encoder_input_tokens)
    return self.encoder(x_BxSxD, mask_Bx1xSxS, deterministic=not enable_dropout)

  def decode(self, encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
             encoder_segment_ids=None, decoder_segment_ids=None, decoder_positions=None, enable_dropout=True,
             decode=False, max_decode_length=None):
    """Decoder logits [B, T, V] float32 given the encoded inputs.

    With decode=True (and mutable=['cache']): the first call with full-length inputs [B, L] creates the cache
    (length max_decode_length, else L); later calls take one token [B, 1] each. `decoder_positions` is accepted
    for T5X compatibility but unused: relative positions come from array indices or the cache index.
    """
    del decoder_positions
    y_BxTxD = self.token_embedder(decoder_input_tokens)
    y_BxTxD = self.decoder(y_BxTxD, encoded, decoder_target_tokens, encoder_input_tokens, decoder_segment_ids,
                           encoder_segment_ids, deterministic=not enable_dropout, decode=decode,
                           max_decode_length=max_decode_length)
    if self.config.logits_via_embedding:
      # Tied embeddings: rescale like Mesh TF T5 / Hugging Face so logits do not grow with sqrt(D).
      logits_BxTxV = self.token_embedder.attend(y_BxTxD) / np.sqrt(self.config.emb_dim)
    else:
      logits_BxTxV = self.logits_dense(y_BxTxD)
    return nn.with_logical_constraint(logits_BxTxV.astype(jnp.float32), ("batch", "length", "vocab"))

  def __call__(self, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens, encoder_segment_ids=None,
               decoder_segment_ids=None, encoder_positions=None, decoder_positions=None, *, enable_dropout=True,
               decode=False):
    """Teacher-forced logits [B, T, V]; see `decode` for the cache. Positions are unused (array indices)."""
    del encoder_positions
    encoded_BxSxD = self.encode(encoder_input_tokens, encoder_segment_ids, enable_dropout=enable_dropout)
    return self.decode(encoded_BxSxD, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                       encoder_segment_ids, decoder_segment_ids, decoder_positions, enable_dropout=enable_dropout,
                       decode=decode)


def param_count(params: Any) -> int:
  """Number of parameters in a tree of arrays or ShapeDtypeStructs (e.g. from jax.eval_shape)."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
