"""A Flax (linen) BERT-family encoder: RoBERTa, DistilRoBERTa and BERT.

The parameters are a plain nested dict; ``Encoder(config, head).apply`` is pure.
Tree layout (Flax kernels are ``(in, out)``, i.e. the transpose of PyTorch's
``nn.Linear.weight``)::

  embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding
  embeddings/layer_norm/{scale,bias}
  encoder/layer_{i}/{query,key,value,attention_output,intermediate,output}/{kernel,bias}
  encoder/layer_{i}/{attention_layer_norm,output_layer_norm}/{scale,bias}
  pooler/{kernel,bias}                        (BERT only)
  classifier/{dense,out_proj}/{kernel,bias}   (RoBERTa style) | classifier/out_proj (BERT)
  mlm_head/{dense,layer_norm}/..., mlm_head/bias  (decoder tied to word_embeddings)

Parameter-tree transforms add leaves that this code picks up when present:

* ``lora_a (in, r)``, ``lora_b (r, out)``, ``lora_scale ()`` next to a ``kernel``
  (``tvgeo_jax.lora``): ``y = x·W + b + scale·(x·A)·B`` without forming W + ΔW.
* ``attention_adapter`` / ``output_adapter`` sub-dicts of a layer
  (``tvgeo_jax.adapters``): Houlsby bottleneck adapters.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
from jax.extend.random import threefry_2x32
import jax.numpy as jnp

from tvgeo_jax.models.config import EncoderConfig

HEADS = ("classification", "mlm", "none")
_HIGHEST = jax.lax.Precision.HIGHEST
_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@jax.custom_vjp
def gelu_exact(x):
  """``0.5·x·(1 + erf(x/√2))``, computed in float32, returned in ``x.dtype``.

  The backward pass saves only ``x`` and recomputes ``Φ(x) + x·φ(x)``: autodiff
  of the formula stores several activation-sized intermediates, and on a GPU
  these memory passes cost more than the arithmetic (BUILD_NOTES, GPU profile).
  """
  x32 = x.astype(jnp.float32)
  return (x32 * _normal_cdf(x32)).astype(x.dtype)


def _normal_cdf(x32):
  """Φ(x) = ½(1 + erf(x/√2))."""
  return 0.5 * (1.0 + jax.lax.erf(x32 * _SQRT_HALF))


def _gelu_fwd(x):
  return gelu_exact(x), x


def _gelu_bwd(x, g):
  x32 = x.astype(jnp.float32)
  cdf = _normal_cdf(x32)
  pdf = jnp.exp(-0.5 * x32 * x32) * _INV_SQRT_2PI
  return ((g.astype(jnp.float32) * (cdf + x32 * pdf)).astype(x.dtype),)


gelu_exact.defvjp(_gelu_fwd, _gelu_bwd)


def activation(name: str):
  if name == "gelu":
    return gelu_exact
  if name in ("gelu_new", "gelu_pytorch_tanh"):
    return lambda x: jax.nn.gelu(x, approximate=True)
  if name == "relu":
    return jax.nn.relu
  if name in ("swish", "silu"):
    return jax.nn.silu
  raise ValueError(f"Unknown activation {name!r}.")


class Dense(nn.Module):
  """``nn.Dense`` with an optional low-rank (LoRA) update read from the tree."""
  features: int
  dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.normal(0.02)

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    x = x.astype(self.dtype)
    y = jnp.dot(x, kernel.astype(self.dtype)) + bias.astype(self.dtype)
    params = self.variables.get("params", {})
    if "lora_a" in params:
      a, b = params["lora_a"], params["lora_b"]
      scale = params["lora_scale"]
      low = jnp.dot(x, a.astype(self.dtype))
      y = y + (scale * jnp.dot(low, b.astype(self.dtype))).astype(self.dtype)
    return y


def bottleneck_adapter(params, h, act: str, dtype):
  """Houlsby adapter ``h + up(act(down(h)))`` from a plain params dict."""
  down, up = params["down"], params["up"]
  z = jnp.dot(h, down["kernel"].astype(dtype)) + down["bias"].astype(dtype)
  z = activation(act)(z)
  return h + jnp.dot(z, up["kernel"].astype(dtype)) + up["bias"].astype(dtype)


def _ln_stats(x, eps):
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  rstd = jax.lax.rsqrt(jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True) + eps)
  return x32, mean, rstd


def _cpu_fusion_boundary(x):
  """``x``, materialised: on XLA:CPU a value its fusion pass cannot see through.

  XLA:CPU duplicates cheap elementwise producers into every fusible consumer.
  When the LayerNorm parameters are frozen (LoRA, bottleneck adapters) nothing
  but elementwise ops and row reductions consumes the residual-stream gradient,
  so each layer's backward fusion recomputes the LayerNorm backward of every
  layer above it: roberta-base's LoRA step had fusions of 200+ operands and
  spent ~1.4 s of busy time in them (BUILD_NOTES, CPU profile). An optimization
  barrier does not help (XLA:CPU removes them before fusion); a conditional on
  a runtime predicate does. Its other branch, taken only when the first
  element is NaN, fills the gradient with NaN (it is already poisoned) so that
  the branches differ and XLA keeps the conditional. Other platforms get ``x``
  unchanged: the GPU timings in BUILD_NOTES were measured without it, and on a
  GPU a conditional costs a host sync (whether XLA:GPU's fusion has the same
  problem is unchecked; see BUILD_NOTES).
  """
  def boundary(y):
    poisoned = jnp.isnan(y.reshape(-1)[0])
    return jax.lax.cond(poisoned, lambda z: jnp.full_like(z, jnp.nan), lambda z: z, y)
  return jax.lax.platform_dependent(x, cpu=boundary, default=lambda y: y)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x, scale, bias, eps: float, dtype):
  """LayerNorm over the last axis, statistics in float32, output in ``dtype``.

  The hand-written backward keeps ``x`` and two float32 numbers per row and
  computes ``dx = rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂))`` with ``ĝ = g·scale`` in one
  pass, where autodiff would materialise float32 activation-sized intermediates.
  On the CPU, ``dx`` is a fusion boundary (``_cpu_fusion_boundary``).
  """
  return _layer_norm_fwd(x, scale, bias, eps, dtype)[0]


def _layer_norm_fwd(x, scale, bias, eps, dtype):
  x32, mean, rstd = _ln_stats(x, eps)
  y = ((x32 - mean) * rstd * scale + bias).astype(dtype)
  return y, (x, scale, mean, rstd, bias)


def _layer_norm_bwd(eps, dtype, res, g):
  del eps, dtype
  x, scale, mean, rstd, bias = res
  xhat = (x.astype(jnp.float32) - mean) * rstd
  g32 = g.astype(jnp.float32)
  rows = tuple(range(g.ndim - 1))
  dbias = jnp.sum(g32, axis=rows).astype(bias.dtype)
  dscale = jnp.sum(g32 * xhat, axis=rows).astype(scale.dtype)
  gs = g32 * scale
  dx = rstd * (gs - jnp.mean(gs, axis=-1, keepdims=True)
               - xhat * jnp.mean(gs * xhat, axis=-1, keepdims=True))
  return _cpu_fusion_boundary(dx.astype(x.dtype)), dscale, dbias


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
  """LayerNorm with statistics in float32 whatever the compute dtype."""
  eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
    return layer_norm(x, scale, bias, self.eps, jnp.dtype(self.dtype))


def position_stable_bits(key: jax.Array, shape: Tuple[int, ...],
                         position_axes: Tuple[int, ...]) -> jax.Array:
  """16-bit random words of ``shape`` that do not depend on the length of
  ``position_axes``: the word at an index is Threefry-2x32 of the counter pair
  (positions packed 16 bits each, flat index over the other axes) under ``key``, so
  padding a batch to more tokens leaves every real token's word unchanged. As fast as
  ``jax.random.bits`` (one hash per word; BUILD_NOTES). Only for the default
  Threefry keys: other generators (``rbg``, a benchmark option) draw plain bits, whose
  masks depend on the padded length."""
  if not position_axes or str(jax.random.key_impl(key)) != "threefry2x32":
    return jax.random.bits(key, shape, jnp.uint16)
  index = jnp.indices(shape, sparse=True)
  hi = jnp.zeros((), jnp.uint32)
  for a in position_axes:
    hi = (hi << 16) | index[a].astype(jnp.uint32)
  lo = jnp.zeros((), jnp.uint32)
  for i, d in enumerate(shape):
    if i not in position_axes:
      lo = lo * jnp.uint32(d) + index[i].astype(jnp.uint32)
  hi, lo = jnp.broadcast_to(hi, shape).reshape(-1), jnp.broadcast_to(lo, shape).reshape(-1)
  words = threefry_2x32(jax.random.key_data(key), jnp.concatenate([hi, lo]))[:hi.size]
  return (words & 0xFFFF).astype(jnp.uint16).reshape(shape)


class Dropout(nn.Module):
  """Inverted dropout whose mask comes from 16-bit random words.

  ``nn.Dropout`` draws a 32-bit uniform per element and compares floats; here an
  element is dropped when its 16-bit word is below ``round(rate·65536)`` (the rate
  is exact to 1/65536) and kept ones are scaled by the exact inverse keep
  probability. On an H100 the 12 attention masks of a roberta-base step took
  1.87 ms instead of 1.97 ms (BUILD_NOTES).
  """
  rate: float
  # Axes indexed by token position: each position's words come from the module's key
  # folded with the position, so a token's mask does not depend on how far the batch is
  # padded (a concurrent group pads its members to a common length; tested).
  position_axes: Tuple[int, ...] = ()

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    if not 0.0 <= self.rate < 1.0:
      raise ValueError(f"Dropout rate must be in [0, 1), got {self.rate}.")
    threshold = int(round(self.rate * 65536))
    bits = position_stable_bits(self.make_rng("dropout"), x.shape, self.position_axes)
    keep = bits >= jnp.uint16(threshold)
    scale = jnp.asarray(65536.0 / (65536 - threshold), x.dtype)
    return jnp.where(keep, x * scale, jnp.zeros((), x.dtype))


class Embeddings(nn.Module):
  config: EncoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, token_type_ids, deterministic: bool):
    c = self.config
    init = nn.initializers.normal(0.02)
    word = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=init, name="word_embeddings")
    pos = nn.Embed(c.max_position_embeddings, c.hidden_size, embedding_init=init,
                   name="position_embeddings")
    typ = nn.Embed(c.type_vocab_size, c.hidden_size, embedding_init=init,
                   name="token_type_embeddings")
    if c.is_roberta:
      # RoBERTa numbers real tokens from padding_idx + 1; pads keep padding_idx.
      not_pad = (input_ids != c.pad_token_id).astype(jnp.int32)
      position_ids = jnp.cumsum(not_pad, axis=1) * not_pad + c.pad_token_id
    else:
      position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    h = word(input_ids) + pos(position_ids) + typ(token_type_ids)
    h = LayerNorm(c.layer_norm_eps, self.dtype, name="layer_norm")(h)
    return Dropout(c.hidden_dropout_prob, (1,))(h, deterministic=deterministic)


class Layer(nn.Module):
  """One post-LN transformer block."""
  config: EncoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, mask, deterministic: bool, first_token_only: bool = False):
    """``first_token_only``: keys and values from every token, but queries, the
    attention output, the FFN and the residual stream for the first token only:
    the output is ``[B, 1, H]``, all a classification head reads from the last layer."""
    c = self.config
    b, s, _ = h.shape
    n, d = c.num_attention_heads, c.head_dim
    if first_token_only:
      h_keys, h = h, h[:, :1]
    else:
      h_keys = h
    t = h.shape[1]
    q = Dense(c.hidden_size, self.dtype, name="query")(h).reshape(b, t, n, d)
    k = Dense(c.hidden_size, self.dtype, name="key")(h_keys).reshape(b, s, n, d)
    v = Dense(c.hidden_size, self.dtype, name="value")(h_keys).reshape(b, s, n, d)
    bool_mask = mask[:, None, None, :].astype(bool)  # (B, 1, 1, S) over keys
    if deterministic or c.attention_probs_dropout_prob == 0.0:
      ctx = jax.nn.dot_product_attention(q, k, v, mask=bool_mask)
    else:
      # Attention-probability dropout is not offered by the fused kernel.
      logits = jnp.einsum("btnd,bsnd->bnts", q, k) / jnp.sqrt(d).astype(q.dtype)
      logits = jnp.where(bool_mask, logits, jnp.finfo(logits.dtype).min)
      probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)
      probs = Dropout(c.attention_probs_dropout_prob, (2, 3))(probs, deterministic=False)
      ctx = jnp.einsum("bnts,bsnd->btnd", probs, v)
    ctx = ctx.reshape(b, t, n * d)
    a = Dense(c.hidden_size, self.dtype, name="attention_output")(ctx)
    a = Dropout(c.hidden_dropout_prob, (1,))(a, deterministic=deterministic)
    params = self.variables.get("params", {})
    if "attention_adapter" in params:
      a = bottleneck_adapter(params["attention_adapter"], a, "swish", self.dtype)
    h = LayerNorm(c.layer_norm_eps, self.dtype, name="attention_layer_norm")(a + h)
    f = Dense(c.intermediate_size, self.dtype, name="intermediate")(h)
    f = activation(c.hidden_act)(f)
    f = Dense(c.hidden_size, self.dtype, name="output")(f)
    f = Dropout(c.hidden_dropout_prob, (1,))(f, deterministic=deterministic)
    if "output_adapter" in params:
      f = bottleneck_adapter(params["output_adapter"], f, "swish", self.dtype)
    return LayerNorm(c.layer_norm_eps, self.dtype, name="output_layer_norm")(f + h)


class Transformer(nn.Module):
  """The stack of layers; returns the output of every layer."""
  config: EncoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, mask, deterministic: bool, first_token_only: bool = False):
    """``first_token_only``: the last layer runs for the first token only (see ``Layer``)."""
    states = []
    last = self.config.num_hidden_layers - 1
    for i in range(self.config.num_hidden_layers):
      h = Layer(self.config, self.dtype, name=f"layer_{i}")(
          h, mask, deterministic, first_token_only=first_token_only and i == last)
      states.append(h)
    return states


class ClassificationHead(nn.Module):
  """RoBERTa: dropout→dense→tanh→dropout→out_proj on the first token.
  BERT: the pooler (dense→tanh, a sibling module) then dropout→out_proj."""
  config: EncoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    c = self.config
    drop = Dropout(c.hidden_dropout_prob)
    if c.is_roberta:
      x = drop(x, deterministic=deterministic)
      x = jnp.tanh(Dense(c.hidden_size, self.dtype, name="dense")(x))
    x = drop(x, deterministic=deterministic)
    return Dense(c.num_labels, self.dtype, name="out_proj")(x).astype(jnp.float32)


class MLMHead(nn.Module):
  """dense→act→LayerNorm→decoder tied to the word embeddings, plus a bias."""
  config: EncoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, embedding_table):
    c = self.config
    x = Dense(c.hidden_size, self.dtype, name="dense")(h)
    x = LayerNorm(c.layer_norm_eps, self.dtype, name="layer_norm")(activation(c.hidden_act)(x))
    bias = self.param("bias", nn.initializers.zeros, (c.vocab_size,))
    logits = jnp.dot(x, embedding_table.T.astype(self.dtype)) + bias.astype(self.dtype)
    return logits.astype(jnp.float32)


class Encoder(nn.Module):
  """The full model: embeddings, ``num_hidden_layers`` blocks and one head.

  ``head``: ``"classification"`` (regression when ``num_labels == 1``),
  ``"mlm"`` (tied decoder) or ``"none"``. Returns a dict with ``logits``
  (absent for ``"none"``), ``last_hidden_state`` and, on request,
  ``hidden_states``: a tuple of ``num_hidden_layers + 1`` arrays
  (embeddings output first), as transformers returns them.

  ``logits_only`` (classification head): return ``{"logits"}`` alone and run the
  last layer for the first token only, the one the head reads. The logits are the
  same; the step does 1/L fewer query, attention-output and FFN products (for
  roberta-base at 128 tokens, 7% of a LoRA or full training step's FLOPs).
  """
  config: EncoderConfig
  head: str = "classification"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *,
               deterministic: bool = True, output_hidden_states: bool = False,
               mlm_positions=None, logits_only: bool = False):
    """``mlm_positions`` ([B, P] ints): compute MLM logits at these positions only."""
    c = self.config
    if self.head not in HEADS:
      raise ValueError(f"Unknown head {self.head!r}; choose one of {HEADS}.")
    if logits_only and (self.head != "classification" or output_hidden_states):
      raise ValueError("logits_only=True needs the classification head and "
                       "output_hidden_states=False: it skips the other tokens of the "
                       f"last layer (head {self.head!r}, output_hidden_states="
                       f"{output_hidden_states}).")
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    emb = Embeddings(c, self.dtype, name="embeddings")
    h0 = emb(input_ids, token_type_ids, deterministic)
    states = Transformer(c, self.dtype, name="encoder")(h0, attention_mask, deterministic,
                                                        first_token_only=logits_only)
    h = states[-1]
    out = {} if logits_only else {"last_hidden_state": h}
    if output_hidden_states:
      out["hidden_states"] = (h0, *states)
    if self.head == "classification":
      first = h[:, 0]
      if not c.is_roberta:
        first = jnp.tanh(Dense(c.hidden_size, self.dtype, name="pooler")(first))
      out["logits"] = ClassificationHead(c, self.dtype, name="classifier")(first, deterministic)
    elif self.head == "mlm":
      table = emb.variables["params"]["word_embeddings"]["embedding"]
      if mlm_positions is not None:
        h = jnp.take_along_axis(h, mlm_positions[..., None], axis=1)
      out["logits"] = MLMHead(c, self.dtype, name="mlm_head")(h, table)
    return out
