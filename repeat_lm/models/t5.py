"""T5 v1.1 encoder-decoder Transformer that fits T5X's module contract (`__call__`, `encode`, `decode`).

Math follows Hugging Face's `T5ForConditionalGeneration` (feed_forward_proj='gated-gelu') so checkpoints convert:
pre-norm RMSNorm blocks, one relative position bias table per stack (computed once, added in every self-attention
layer), gated-GELU MLP, untied output projection. Shape letters as in layers.py; layer stacks optionally run under
`scan` (parameters stacked on a 'layers' axis) and `remat`. `T5Config.moe` makes every k-th FFN a mixture of experts
(moe.py) and `T5Config.param_share` ties layers' parameters; stack.py runs the stacks (docs/models.md).
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

from repeat_lm import checks
from repeat_lm.models import attention as attention_lib
from repeat_lm.models import layers
from repeat_lm.models import moe as moe_lib
from repeat_lm.models import regularisation
from repeat_lm.models import stack

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

# Where dropout applies; each has a `<place>_dropout_rate` override in T5Config.
DROPOUT_PLACES = ("attention", "hidden", "mlp", "expert")


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
  dropout_rate: float = 0.0  # 0 in pre-training, 0.1 in fine-tuning (T5X defaults); every place below if None
  # Per-place overrides (see docs/regularisation.md); None takes dropout_rate, as T5X's single DROPOUT_RATE.
  attention_dropout_rate: float | None = None  # attention probabilities [B, H, Q, K]
  hidden_dropout_rate: float | None = None  # embeddings, residual-branch outputs, final-norm outputs [B, L, D]
  mlp_dropout_rate: float | None = None  # FFN activations [B, L, F]
  expert_dropout_rate: float | None = None  # MoE expert FFN activations; read with dropout_rate_for('expert')
  # True: every dropout mask is shared along the length axis (attention: along queries), as T5X / flaxformer's T5
  # (Dropout(broadcast_dims=(-2,)), broadcast_dropout=True); False: one draw per element, as Hugging Face's T5.
  dropout_broadcast_length: bool = False
  droppath_rate: float = 0.0  # stochastic depth: per-row drop of each residual branch
  droppath_depth_scaling: str = "constant"  # 'constant' | 'linear' (layer l of L: rate * (l + 1) / L)
  logits_via_embedding: bool = False  # tie output projection to the token embedding (then logits / sqrt(D))
  # False: logits_dense (or the tied embedding's attend) multiplies in the activation dtype, accumulating and returning
  # float32 (what T5X's float32 logits_dense computes on TPU at default precision; MaxText's default). True: exact
  # float32 operands.
  logits_dot_in_fp32: bool = False
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  float32_attention_logits: bool = True  # q.k logits and softmax in float32 even with bfloat16 activations
  # None: MultiHeadAttention's einsum path. 'xla' | 'cudnn': jax.nn.dot_product_attention with that backend ('cudnn':
  # fused flash attention on NVIDIA GPUs, restrictions in attention.cudnn_attention_restriction); both need attention
  # dropout 0 and always take float32 logits. Cached decoding runs the einsum path whatever this says.
  attention_implementation: str | None = None
  # With 'xla' | 'cudnn', unpacked (right-padded) rows reach the kernel as lengths, not a boolean mask: cuDNN then
  # gets the [1, H, Q, K] bias rather than a [B, H, Q, K] bias + mask (MultiHeadAttention). False keeps the mask.
  attention_padding_lengths: bool = True
  scan_layers: bool = False  # stack layers with nn.scan: faster compiles, params get a 'layers' axis
  remat_policy: str = "none"  # 'none' | 'minimal' | 'full', see REMAT_POLICIES
  moe: moe_lib.MoeConfig | None = None  # sparse (mixture-of-experts) FFNs, see moe.py; None = dense
  # ParamShare: 'none' | 'all' (one parameter set per stack) | k (consecutive groups of k layers share one set), see
  # stack.py. FLOPs stay those of the full depth.
  param_share: str | int = "none"

  def __post_init__(self):
    sizes = {k: getattr(self, k) for k in ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim",
                                           "num_encoder_layers", "num_decoder_layers",
                                           "relative_attention_num_buckets", "relative_attention_max_distance")}
    bad_sizes = {k: v for k, v in sizes.items() if not checks.is_count(v)}
    # Else a ZeroDivisionError or an out-of-range slice deep inside init; a float (emb_dim = 512. in gin) a shape
    # TypeError there.
    if bad_sizes:
      raise ValueError(f"T5Config sizes must be whole numbers of at least 1: {bad_sizes}.")
    # A misspelt or non-float dtype would otherwise surface as a bare TypeError when the model is first built.
    try:
      floating = jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating)
    except TypeError:
      floating = False
    if not floating:
      raise ValueError(f"T5Config.dtype={self.dtype!r} is not a floating-point dtype; use 'bfloat16' or 'float32'.")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy={self.remat_policy!r}; choose from {sorted(REMAT_POLICIES)}.")
    for n in (self.num_encoder_layers, self.num_decoder_layers):  # fail at config time, not deep inside init
      stack.share_group_size(self.param_share, n)
      moe_lib.sparse_layer_flags(n, self.moe)
    # gin passes lists as lists; keep the config hashable.
    object.__setattr__(self, "mlp_activations", tuple(self.mlp_activations))
    moe_lib.check_activations("T5Config.mlp_activations", self.mlp_activations)  # else a NoneType error in init
    rates = {"dropout_rate": self.dropout_rate, "droppath_rate": self.droppath_rate,
             **{f"{p}_dropout_rate": self.dropout_rate_for(p) for p in DROPOUT_PLACES}}
    # A string ('0.1') failed the comparison with a TypeError traceback.
    bad = {k: v for k, v in rates.items() if not regularisation.is_rate(v)}
    if bad:
      raise ValueError(f"Dropout and DropPath rates must lie in [0, 1): {bad}.")
    layers.check_relative_position_buckets(self.relative_attention_num_buckets,
                                           self.relative_attention_max_distance)
    regularisation.droppath_rates(self.droppath_rate, 1, self.droppath_depth_scaling)  # validates the name
    # A gin string 'False' is truthy: scan_layers='False' scanned the layers (another parameter layout) silently.
    checks.check_bools(self, ("dropout_broadcast_length", "logits_via_embedding", "logits_dot_in_fp32",
                              "float32_attention_logits", "attention_padding_lengths", "scan_layers"))
    self._check_attention_implementation()

  def _check_attention_implementation(self):
    """Fail at config time for what jax.nn.dot_product_attention cannot do; lengths are checked when traced."""
    impl = self.attention_implementation
    if impl not in attention_lib.ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"attention_implementation={impl!r}; choose from {attention_lib.ATTENTION_IMPLEMENTATIONS}.")
    if impl is not None and self.dropout_rate_for("attention") > 0.0:
      raise ValueError(f"attention_implementation={impl!r} (jax.nn.dot_product_attention) has no attention-"
                       f"probability dropout, but the attention dropout rate is {self.dropout_rate_for('attention')}: "
                       "set attention_dropout_rate=0 or attention_implementation=None.")
    if impl == "cudnn":
      reason = attention_lib.cudnn_attention_restriction(self.head_dim, self.activation_dtype)
      if reason is not None:
        raise ValueError(f"attention_implementation='cudnn': {reason}.")

  @property
  def activation_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  def padding_as_lengths(self, *segment_ids: Array | None) -> bool:
    """Whether attention gets the padding as lengths: a library kernel, attention_padding_lengths, and no packing
    (none of the given segment ids), so the masks are right padding only (MultiHeadAttention)."""
    return (self.attention_implementation is not None and self.attention_padding_lengths
            and all(s is None for s in segment_ids))

  def dropout_rate_for(self, place: str) -> float:
    """The configured rate of one of DROPOUT_PLACES: its override, or dropout_rate when that is None."""
    override = getattr(self, f"{place}_dropout_rate")
    return self.dropout_rate if override is None else override


class EncoderLayer(nn.Module):
  """Pre-norm self-attention + MLP (or MoE, when `sparse`) block. Returns (x, MoE statistics or None): the nn.scan
  (carry, output) convention, so statistics leave a scanned stack as scan outputs."""
  config: T5Config
  deterministic: bool
  sparse: bool = False

  @nn.compact
  def __call__(self, x_BxSxD: Array, bias_1xHxSxS: Array, mask_Bx1xSxS: Array,
               lengths: tuple[Array, Array] | None = None, dropout_scale: Array | float = 1.0,
               droppath_rate: Array | float = 0.0):
    cfg, dtype = self.config, self.config.activation_dtype
    norm = lambda name: layers.RMSNorm(cfg.layer_norm_epsilon, dtype, name=name)
    drop = _branch_regulariser(cfg, self.deterministic, dropout_scale, droppath_rate)

    h_BxSxD = norm("pre_attention_layer_norm")(x_BxSxD)
    h_BxSxD = attention_lib.MultiHeadAttention(cfg.num_heads, cfg.head_dim, dtype, cfg.dropout_rate_for("attention"),
                                               cfg.float32_attention_logits,
                                               implementation=cfg.attention_implementation,
                                               dropout_broadcast_length=cfg.dropout_broadcast_length,
                                               name="attention")(
        h_BxSxD, h_BxSxD, bias_1xHxSxS, mask_Bx1xSxS, self.deterministic, dropout_scale, lengths)
    x_BxSxD = x_BxSxD + drop(h_BxSxD)

    h_BxSxD = norm("pre_mlp_layer_norm")(x_BxSxD)
    h_BxSxD, stats = _feed_forward(cfg, self.sparse, self.deterministic, h_BxSxD, mask_Bx1xSxS, dropout_scale,
                                   batch_prioritized=True)
    x_BxSxD = nn.with_logical_constraint(x_BxSxD + drop(h_BxSxD), ("batch", "length", "embed"))
    return x_BxSxD, stats


class DecoderLayer(nn.Module):
  """Pre-norm causal self-attention (cached when decoding) + cross-attention + MLP (or MoE) block; returns (y, MoE
  statistics or None) like EncoderLayer."""
  config: T5Config
  deterministic: bool
  decode: bool = False
  decode_length: int | None = None
  sparse: bool = False

  @nn.compact
  def __call__(self, y_BxTxD: Array, encoded_BxSxD: Array, bias_1xHxTxL: Array, self_mask_Bx1xTxL: Array,
               cross_mask_Bx1xTxS: Array, self_lengths: tuple[Array, Array] | None = None,
               cross_lengths: tuple[Array, Array] | None = None, dropout_scale: Array | float = 1.0,
               droppath_rate: Array | float = 0.0):
    cfg, dtype = self.config, self.config.activation_dtype
    norm = lambda name: layers.RMSNorm(cfg.layer_norm_epsilon, dtype, name=name)
    drop = _branch_regulariser(cfg, self.deterministic, dropout_scale, droppath_rate)
    # While decoding, cross-attention too takes the einsum path: one query position (odd for cuDNN), nothing to fuse.
    attention = lambda name, decode: attention_lib.MultiHeadAttention(
        cfg.num_heads, cfg.head_dim, dtype, cfg.dropout_rate_for("attention"), cfg.float32_attention_logits,
        decode=decode, decode_length=self.decode_length,
        implementation=None if self.decode else cfg.attention_implementation, causal=name == "self_attention",
        dropout_broadcast_length=cfg.dropout_broadcast_length, name=name)

    h_BxTxD = norm("pre_self_attention_layer_norm")(y_BxTxD)
    h_BxTxD = attention("self_attention", self.decode)(h_BxTxD, h_BxTxD, bias_1xHxTxL, self_mask_Bx1xTxL,
                                                       self.deterministic, dropout_scale, self_lengths)
    y_BxTxD = y_BxTxD + drop(h_BxTxD)

    h_BxTxD = norm("pre_cross_attention_layer_norm")(y_BxTxD)
    h_BxTxD = attention("encoder_decoder_attention", False)(h_BxTxD, encoded_BxSxD, None, cross_mask_Bx1xTxS,
                                                            self.deterministic, dropout_scale, cross_lengths)
    y_BxTxD = y_BxTxD + drop(h_BxTxD)

    h_BxTxD = norm("pre_mlp_layer_norm")(y_BxTxD)
    h_BxTxD, stats = _feed_forward(cfg, self.sparse, self.deterministic, h_BxTxD, self_mask_Bx1xTxL, dropout_scale,
                                   batch_prioritized=False)
    y_BxTxD = nn.with_logical_constraint(y_BxTxD + drop(h_BxTxD), ("batch", "length", "embed"))
    return y_BxTxD, stats


def _feed_forward(cfg: T5Config, sparse: bool, deterministic: bool, h_BxLxD: Array, self_mask_Bx1xLxL: Array,
                  dropout_scale: Array | float, batch_prioritized: bool) -> tuple[Array, dict | None]:
  """The layer's FFN, named 'mlp': dense MlpBlock (stats None) or MoeBlock (routing statistics)."""
  dtype = cfg.activation_dtype
  if not sparse:
    return layers.MlpBlock(cfg.mlp_dim, cfg.mlp_activations, dtype, cfg.dropout_rate_for("mlp"),
                           cfg.dropout_broadcast_length, name="mlp")(
        h_BxLxD, deterministic, dropout_scale), None
  # A token attends to itself iff it is real, so the self-attention mask's diagonal marks the tokens to route (it is
  # square except for one cached decoding step, where the single query is real).
  mask_BxLxL = self_mask_Bx1xLxL[:, 0]
  valid_BxL = (jnp.diagonal(mask_BxLxL, axis1=-2, axis2=-1) if mask_BxLxL.shape[-2] == mask_BxLxL.shape[-1]
               else None)
  if valid_BxL is not None:
    valid_BxL = jnp.broadcast_to(valid_BxL, h_BxLxD.shape[:2])
  return moe_lib.MoeBlock(cfg.moe, dtype, cfg.dropout_rate_for("expert"),
                          batch_prioritized and cfg.moe.batch_prioritized_routing, cfg.dropout_broadcast_length,
                          name="mlp")(
      h_BxLxD, valid_BxL, deterministic, dropout_scale)


def _run_layers(layer_cls: type[nn.Module], cfg: T5Config, num_layers: int, x: Array, *broadcast_args: Array,
                use_remat: bool = True, dropout_scale: Array | float = 1.0,
                **layer_kwargs: Any) -> tuple[Array, dict | None]:
  """Apply `num_layers` layers to x, each getting the same `broadcast_args`, with cfg's remat, scan, MoE and
  parameter-sharing settings (stack.run_layers); returns (x, summed MoE statistics or None).

  Every layer also gets the dropout schedule's `dropout_scale` and its own DropPath rate (which depends on depth).
  Must be called from inside a compact method: the layers become children of that module ('layers_{i}', or
  'layers' with stacked parameters when scanned).
  """
  droppath_L = regularisation.droppath_rates(cfg.droppath_rate, num_layers, cfg.droppath_depth_scaling)
  dropout_scale = jnp.asarray(dropout_scale, jnp.float32)
  # One scan body serves every layer, so the DropPath rate is a per-layer (scanned) input rather than a constant.
  return stack.run_layers(layer_cls, cfg, num_layers, x, *broadcast_args, dropout_scale, per_layer_args=(droppath_L,),
                          sparse=moe_lib.sparse_layer_flags(num_layers, cfg.moe), use_remat=use_remat,
                          **layer_kwargs)


def _branch_regulariser(cfg: T5Config, deterministic: bool, dropout_scale: Array | float,
                        droppath_rate: Array | float):
  """h -> DropPath(dropout(h)) for a residual branch's output; call inside a compact method (makes submodules)."""
  def regularise(h: Array) -> Array:
    h = layers.dropout(h, cfg.dropout_rate_for("hidden"), deterministic, dropout_scale, cfg.dropout_broadcast_length)
    if cfg.droppath_rate > 0.0:  # static: no DropPath op at all when it is off
      h = regularisation.DropPath()(h, droppath_rate, deterministic)
    return h
  return regularise


class Encoder(nn.Module):
  """Embedded tokens -> encoded [B, S, D]: dropout, layers sharing one bidirectional bias, final norm, dropout."""
  config: T5Config

  @nn.compact
  def __call__(self, x_BxSxD: Array, mask_Bx1xSxS: Array, deterministic: bool,
               dropout_scale: Array | float = 1.0, lengths_B: Array | None = None) -> Array:
    """`lengths_B`: the rows' lengths when the mask is nothing but right padding (see MultiHeadAttention)."""
    cfg = self.config
    hidden_rate = cfg.dropout_rate_for("hidden")
    length = x_BxSxD.shape[1]  # positions are array indices; the segment mask makes them right for packing
    bias_1xHxSxS = layers.RelativePositionBias(cfg.num_heads, cfg.relative_attention_num_buckets,
                                               cfg.relative_attention_max_distance, name="relpos_bias")(
        length, length, bidirectional=True)
    x_BxSxD = nn.with_logical_constraint(layers.dropout(x_BxSxD, hidden_rate, deterministic, dropout_scale,
                                                        cfg.dropout_broadcast_length),
                                         ("batch", "length", "embed"))
    lengths = None if lengths_B is None else (lengths_B, lengths_B)
    x_BxSxD, moe_stats = _run_layers(EncoderLayer, cfg, cfg.num_encoder_layers, x_BxSxD, bias_1xHxSxS,
                                     mask_Bx1xSxS, lengths, dropout_scale=dropout_scale, deterministic=deterministic)
    if moe_stats is not None:  # once per stack, outside any scan: EncoderDecoderModel adds the auxiliary losses
      moe_lib.sow_stats(self, moe_stats)
    x_BxSxD = layers.RMSNorm(cfg.layer_norm_epsilon, cfg.activation_dtype, name="encoder_norm")(x_BxSxD)
    return layers.dropout(x_BxSxD, hidden_rate, deterministic, dropout_scale, cfg.dropout_broadcast_length)


class Decoder(nn.Module):
  """Embedded decoder inputs -> normed hidden states [B, T, D]; owns decoder positions, masks and the cache."""
  config: T5Config

  @nn.compact
  def __call__(self, y_BxTxD: Array, encoded_BxSxD: Array, decoder_target_tokens_BxT: Array,
               encoder_input_tokens_BxS: Array, decoder_segment_ids_BxT: Array | None,
               encoder_segment_ids_BxS: Array | None, deterministic: bool, decode: bool,
               max_decode_length: int | None, dropout_scale: Array | float = 1.0) -> Array:
    cfg = self.config
    length = y_BxTxD.shape[1]
    cache_state = self._cache_state() if decode else None
    if cache_state is None:  # training / scoring, or the init call that creates the cache
      query_positions_T = key_positions_L = length  # positions 0..length-1
      # While decoding, targets are the fed tokens and may be 0 (BOS = pad id): only mask padding otherwise.
      query_valid_BxT = (jnp.ones_like(decoder_target_tokens_BxT, bool) if decode
                         else decoder_target_tokens_BxT > 0)
      self_mask_Bx1xTxL = (attention_lib.make_causal_mask(length) &
                           attention_lib.make_attention_mask(query_valid_BxT, query_valid_BxT))
      if decoder_segment_ids_BxT is not None:
        self_mask_Bx1xTxL &= attention_lib.make_segment_mask(decoder_segment_ids_BxT, decoder_segment_ids_BxT)
    else:  # one cached step: the query sits at cache_index and sees cache positions <= it
      cache_index, cache_length = cache_state
      query_positions_T, key_positions_L = cache_index[None], jnp.arange(cache_length)
      query_valid_BxT = jnp.ones_like(decoder_target_tokens_BxT, bool)
      self_mask_Bx1xTxL = (key_positions_L <= cache_index)[None, None, None, :]

    encoder_valid_BxS = encoder_input_tokens_BxS > 0
    # Unpacked rows: both masks are right padding only (and causality), which lengths describe for the library kernels.
    self_lengths = cross_lengths = None
    if not decode and cfg.padding_as_lengths(decoder_segment_ids_BxT, encoder_segment_ids_BxS):
      query_lengths_B = attention_lib.padding_lengths(query_valid_BxT)
      self_lengths = (query_lengths_B, query_lengths_B)
      cross_lengths = (query_lengths_B, attention_lib.padding_lengths(encoder_valid_BxS))
    cross_mask_Bx1xTxS = attention_lib.make_attention_mask(query_valid_BxT, encoder_valid_BxS)
    if decoder_segment_ids_BxT is not None and encoder_segment_ids_BxS is not None and cache_state is None:
      cross_mask_Bx1xTxS &= attention_lib.make_segment_mask(decoder_segment_ids_BxT, encoder_segment_ids_BxS)
    bias_1xHxTxL = layers.RelativePositionBias(cfg.num_heads, cfg.relative_attention_num_buckets,
                                               cfg.relative_attention_max_distance, name="relpos_bias")(
        query_positions_T, key_positions_L, bidirectional=False)

    hidden_rate = cfg.dropout_rate_for("hidden")
    y_BxTxD = nn.with_logical_constraint(layers.dropout(y_BxTxD, hidden_rate, deterministic, dropout_scale,
                                                        cfg.dropout_broadcast_length),
                                         ("batch", "length", "embed"))
    # remat only pays off when gradients are taken, never while decoding.
    y_BxTxD, moe_stats = _run_layers(DecoderLayer, cfg, cfg.num_decoder_layers, y_BxTxD, encoded_BxSxD,
                                     bias_1xHxTxL, self_mask_Bx1xTxL, cross_mask_Bx1xTxS, self_lengths, cross_lengths,
                                     use_remat=not decode, dropout_scale=dropout_scale, deterministic=deterministic,
                                     decode=decode, decode_length=max_decode_length)
    if moe_stats is not None:
      moe_lib.sow_stats(self, moe_stats)
    y_BxTxD = layers.RMSNorm(cfg.layer_norm_epsilon, cfg.activation_dtype, name="decoder_norm")(y_BxTxD)
    return layers.dropout(y_BxTxD, hidden_rate, deterministic, dropout_scale, cfg.dropout_broadcast_length)

  def _cache_state(self) -> tuple[Array, int] | None:
    """(cache_index, cache length L) read from the layers' self-attention cache, or None before it exists.

    All layers advance together, so any layer's index is the decoder's position. With scan the cache has a leading
    layer axis (and a shared group a repeat axis after the batch); the length is axis -3 of cached_key
    [..., L, H, E] either way.
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
    self.token_embedder = layers.Embed(cfg.vocab_size, cfg.emb_dim, cfg.activation_dtype,  # shared by both stacks
                                       attend_dtype=jnp.float32 if cfg.logits_dot_in_fp32 else None)
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    if not cfg.logits_via_embedding:
      self.logits_dense = layers.DenseGeneral(
          cfg.vocab_size, kernel_axes=("embed", "vocab"), dtype=jnp.float32,
          operand_dtype=None if cfg.logits_dot_in_fp32 else cfg.activation_dtype)

  @property
  def scan_layers(self) -> bool:
    """T5X's decoding reads this to find the batch axis of a scanned cache ([layers, B, ...], cache_offset=1)."""
    return self.config.scan_layers

  def encode(self, encoder_input_tokens, encoder_segment_ids=None, enable_dropout=True, dropout_scale=1.0):
    """Encoder tokens [B, S] -> encoded [B, S, D]. Positions are array indices (segment masks handle packing).

    `dropout_scale` (a scalar, may be traced) multiplies every dropout rate: the dropout schedule's factor.
    """
    # T5X's get_initial_variables passes float32 tokens when it has no input types (t5x/eval.py): ids, as T5X's T5.
    encoder_input_tokens = jnp.asarray(encoder_input_tokens).astype(jnp.int32)
    valid_BxS = encoder_input_tokens > 0
    mask_Bx1xSxS = attention_lib.make_attention_mask(valid_BxS, valid_BxS)
    if encoder_segment_ids is not None:
      mask_Bx1xSxS &= attention_lib.make_segment_mask(encoder_segment_ids, encoder_segment_ids)
    # Unpacked rows are right-padded: the library kernels take their lengths instead of the mask.
    lengths_B = (attention_lib.padding_lengths(valid_BxS) if self.config.padding_as_lengths(encoder_segment_ids)
                 else None)
    x_BxSxD = self.token_embedder(encoder_input_tokens)
    return self.encoder(x_BxSxD, mask_Bx1xSxS, deterministic=not enable_dropout, dropout_scale=dropout_scale,
                        lengths_B=lengths_B)

  def decode(self, encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
             encoder_segment_ids=None, decoder_segment_ids=None, decoder_positions=None, enable_dropout=True,
             decode=False, max_decode_length=None, dropout_scale=1.0):
    """Decoder logits [B, T, V] float32 given the encoded inputs.

    With decode=True (and mutable=['cache']): the first call with full-length inputs [B, L] creates the cache
    (length max_decode_length, else L); later calls take one token [B, 1] each. `decoder_positions` is accepted
    for T5X compatibility but unused: relative positions come from array indices or the cache index.
    """
    del decoder_positions
    y_BxTxD = self.token_embedder(jnp.asarray(decoder_input_tokens).astype(jnp.int32))  # float32 from T5X's init
    y_BxTxD = self.decoder(y_BxTxD, encoded, decoder_target_tokens, encoder_input_tokens, decoder_segment_ids,
                           encoder_segment_ids, deterministic=not enable_dropout, decode=decode,
                           max_decode_length=max_decode_length, dropout_scale=dropout_scale)
    if self.config.logits_via_embedding:
      # Tied embeddings: rescale like Mesh TF T5 / Hugging Face so logits do not grow with sqrt(D).
      logits_BxTxV = self.token_embedder.attend(y_BxTxD) / np.sqrt(self.config.emb_dim)
    else:
      logits_BxTxV = self.logits_dense(y_BxTxD)
    return nn.with_logical_constraint(logits_BxTxV.astype(jnp.float32), ("batch", "length", "vocab"))

  def __call__(self, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens, encoder_segment_ids=None,
               decoder_segment_ids=None, encoder_positions=None, decoder_positions=None, *, enable_dropout=True,
               decode=False, dropout_scale=1.0):
    """Teacher-forced logits [B, T, V]; see `decode` for the cache. Positions are unused (array indices).

    `dropout_scale` multiplies every dropout rate (the dropout schedule); a traced scalar does not recompile.
    """
    del encoder_positions
    encoded_BxSxD = self.encode(encoder_input_tokens, encoder_segment_ids, enable_dropout=enable_dropout,
                                dropout_scale=dropout_scale)
    return self.decode(encoded_BxSxD, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                       encoder_segment_ids, decoder_segment_ids, decoder_positions, enable_dropout=enable_dropout,
                       decode=decode, dropout_scale=dropout_scale)


def param_count(params: Any) -> int:
  """Number of parameters in a tree of arrays or ShapeDtypeStructs (e.g. from jax.eval_shape)."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
