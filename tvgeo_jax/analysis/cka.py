"""Linear CKA between the layers of two models (Kornblith et al. 2019), all pairs at once.

CKA(X, Y) = HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L)) with linear Grams ``K = X Xᵀ``,
``L = Y Yᵀ`` of two representations of the same n examples. Given per-layer stacks
``x [L1, n, d1]`` and ``y [L2, n, d2]``, ``hsic_terms`` returns the HSIC of every layer
pair ``[L1, L2]`` and the self terms ``[L1]``, ``[L2]`` in one jitted call (Grams are
``[L, n, n]``; the cross terms are matrix products over the flattened Grams).

Estimators:

* ``"biased"``: HSIC_0 = tr(K H L H) / (n−1)². Biased upwards for finite n: two
  independent random representations with n not much larger than d score far from 0
  (≈0.7 at n=256, d=768).
* ``"unbiased"`` (default): Song et al. (2012)'s U-statistic HSIC_1 on Grams with
  zeroed diagonals::

    HSIC_1 = [tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1)/((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1] / (n(n−3))

  It needs n ≥ 4 rows. Independent features score ≈ 0.

Minibatch CKA (Nguyen et al. 2021): HSIC averaged over minibatches of a constant size,
then CKA = mean HSIC(x, y) / sqrt(mean HSIC(x, x) · mean HSIC(y, y)). With the unbiased
estimator every batch's HSIC_1 is an unbiased estimate of the same population quantity,
so the accumulated value estimates full-data CKA while memory stays O(batch²); thousands
of examples fit. ``CKAAccumulator`` streams batches; ``minibatch_cka`` splits arrays.

Numerics: features are column-centred (after subtracting the first row, so a large
offset shared by all examples — BERT's outlier dimensions — cancels before the mean is
taken) *before* the Gram is formed; centring a float32 Gram afterwards loses everything
when features share a large offset. Centred features make ``K = HKH``. Every product
runs at ``Precision.HIGHEST`` (full float32 on TPU/GPU, not bfloat16 passes).
"""
from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from tvgeo_jax.models import apply  # local: keep this module importable on its own

ESTIMATORS = ("unbiased", "biased")
TOKENS = ("first", "mean")
_HIGHEST = jax.lax.Precision.HIGHEST


def min_rows(estimator: str) -> int:
  """Fewest examples a (mini)batch may hold: 4 for the unbiased estimator, else 2."""
  _check_estimator(estimator)
  return 4 if estimator == "unbiased" else 2


def _check_estimator(estimator: str) -> None:
  if estimator not in ESTIMATORS:
    raise ValueError(f"Unknown CKA estimator {estimator!r}; choose one of {ESTIMATORS}.")


def centre_features(x: jax.Array) -> jax.Array:
  """Column-centre ``x [..., n, d]`` over the examples axis, robust to large offsets."""
  x = x.astype(jnp.float32)
  x = x - x[..., :1, :]
  return x - jnp.mean(x, axis=-2, keepdims=True)


def gram(x: jax.Array) -> jax.Array:
  """Linear Gram of column-centred features: ``[L, n, d] -> [L, n, n]``."""
  xc = centre_features(x)
  return jnp.einsum("lnd,lmd->lnm", xc, xc, precision=_HIGHEST)


def _hsic_from_parts(trace, sum_k, sum_l, cross, n: int, estimator: str):
  """HSIC from tr(KL), 1ᵀK1, 1ᵀL1 and 1ᵀKL1 (K, L with zeroed diagonal if unbiased)."""
  if estimator == "biased":
    return trace / (n - 1) ** 2
  return (trace + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 * cross / (n - 2)) / (n * (n - 3))


def _prepare(k: jax.Array, estimator: str) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """(Gram, its row sums, its total sum); diagonal zeroed for the unbiased estimator."""
  if estimator == "unbiased":
    n = k.shape[-1]
    k = k * (1.0 - jnp.eye(n, dtype=k.dtype))
  rows = jnp.sum(k, axis=-1)
  return k, rows, jnp.sum(rows, axis=-1)


def _hsic_terms(x: jax.Array, y: jax.Array, estimator: str):
  n = x.shape[-2]
  k, rk, sk = _prepare(gram(x), estimator)
  l, rl, sl = _prepare(gram(y), estimator)
  dot = functools.partial(jnp.einsum, precision=_HIGHEST)
  xy = _hsic_from_parts(dot("inm,jnm->ij", k, l), sk[:, None], sl[None, :],
                        dot("in,jn->ij", rk, rl), n, estimator)
  xx = _hsic_from_parts(dot("inm,inm->i", k, k), sk, sk, dot("in,in->i", rk, rk), n,
                        estimator)
  yy = _hsic_from_parts(dot("inm,inm->i", l, l), sl, sl, dot("in,in->i", rl, rl), n,
                        estimator)
  return xy, xx, yy


_hsic_terms_jit = jax.jit(_hsic_terms, static_argnames="estimator")


def _as_stack(x, name: str) -> jax.Array:
  x = jnp.asarray(x)
  if x.ndim == 2:
    x = x[None]
  if x.ndim != 3:
    raise ValueError(f"{name} must be [layers, n, d] or [n, d]; got shape {x.shape}.")
  return x


def hsic_terms(x, y, estimator: str = "unbiased") -> Tuple[jax.Array, jax.Array, jax.Array]:
  """HSIC of every layer pair and the self terms, in one compiled call.

  Args:
    x: ``[L1, n, d1]`` (or ``[n, d1]``) representations of n examples.
    y: ``[L2, n, d2]`` (or ``[n, d2]``) of the same examples, in the same order.
    estimator: ``"unbiased"`` (needs n ≥ 4) or ``"biased"`` (n ≥ 2).

  Returns:
    ``(hsic_xy [L1, L2], hsic_xx [L1], hsic_yy [L2])``.
  """
  _check_estimator(estimator)
  x, y = _as_stack(x, "x"), _as_stack(y, "y")
  if x.shape[1] != y.shape[1]:
    raise ValueError(f"x and y must hold the same examples: n={x.shape[1]} vs "
                     f"n={y.shape[1]}.")
  if x.shape[1] < min_rows(estimator):
    raise ValueError(f"The {estimator} HSIC needs at least {min_rows(estimator)} examples "
                     f"per batch; got {x.shape[1]}. Merge small batches into larger ones.")
  return _hsic_terms_jit(x, y, estimator=estimator)


def _cka_from_terms(xy, xx, yy) -> np.ndarray:
  xy, xx, yy = (np.asarray(a, np.float64) for a in (xy, xx, yy))
  denom = np.sqrt(np.clip(np.outer(xx, yy), 0.0, None))
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(denom > 0, xy / denom, np.nan)


def _squeeze(out: np.ndarray, x, y):
  if np.ndim(x) == 2 and np.ndim(y) == 2:
    return float(out[0, 0])
  if np.ndim(x) == 2:
    return out[0]
  if np.ndim(y) == 2:
    return out[:, 0]
  return out


def cka(x, y, estimator: str = "unbiased"):
  """Full-batch linear CKA: ``[L1, n, d1] x [L2, n, d2] -> [L1, L2]`` (numpy float64).

  A 2-D input counts as one layer and its axis is dropped from the result (two 2-D
  inputs give a float). A pair whose self-HSIC is ≤ 0 (constant features) gives NaN.
  """
  return _squeeze(_cka_from_terms(*hsic_terms(x, y, estimator)), x, y)


class CKAAccumulator:
  """Minibatch CKA: sums per-batch HSIC terms; ``result()`` gives ``[L1, L2]``.

  Feed batches of the same examples for both models (``update(x_b, y_b)`` with
  ``[L1, b, d1]`` and ``[L2, b, d2]``). Keep ``b`` constant to compile once; every
  batch counts equally (Nguyen et al. 2021). Batches smaller than ``min_rows``
  raise: merge them into a neighbour (``minibatch_cka`` does this for you).
  """

  def __init__(self, estimator: str = "unbiased"):
    _check_estimator(estimator)
    self.estimator = estimator
    self.num_batches = 0
    self.num_examples = 0
    self._xy = self._xx = self._yy = None

  def update(self, x_batch, y_batch) -> None:
    xy, xx, yy = hsic_terms(x_batch, y_batch, self.estimator)
    if self._xy is None:
      self._xy, self._xx, self._yy = xy, xx, yy
    else:
      if xy.shape != self._xy.shape:
        raise ValueError(f"Layer counts changed between batches: {self._xy.shape} then "
                         f"{xy.shape}.")
      self._xy, self._xx, self._yy = self._xy + xy, self._xx + xx, self._yy + yy
    self.num_batches += 1
    self.num_examples += int(np.shape(x_batch)[-2])

  def result(self) -> np.ndarray:
    if self._xy is None:
      raise ValueError("No batch was added; call update() first.")
    return _cka_from_terms(self._xy, self._xx, self._yy)


def batch_bounds(n: int, batch_size: int, estimator: str = "unbiased",
                 remainder: str = "merge") -> list:
  """(start, stop) of each minibatch of ``n`` examples.

  ``remainder="merge"`` (default) appends the last ``n mod batch_size`` rows to the
  final full batch, so every example counts and no batch is too small for the
  estimator (one extra compile for that shape); ``"drop"`` leaves them out. When
  ``n < batch_size`` there is one batch of all ``n`` rows.
  """
  if batch_size < min_rows(estimator):
    raise ValueError(f"batch_size={batch_size} is below the {min_rows(estimator)} rows the "
                     f"{estimator} estimator needs.")
  if remainder not in ("merge", "drop"):
    raise ValueError(f"remainder must be 'merge' or 'drop', got {remainder!r}.")
  if n < min_rows(estimator):
    raise ValueError(f"{n} examples are too few for the {estimator} CKA "
                     f"(needs {min_rows(estimator)}).")
  full = n // batch_size
  if full == 0:
    return [(0, n)]
  bounds = [(i * batch_size, (i + 1) * batch_size) for i in range(full)]
  if n % batch_size and remainder == "merge":
    bounds[-1] = (bounds[-1][0], n)
  return bounds


def minibatch_cka(x, y, batch_size: Optional[int] = None, estimator: str = "unbiased",
                  remainder: str = "merge"):
  """CKA of ``x [L1, n, d1]`` and ``y [L2, n, d2]`` accumulated over minibatches.

  ``batch_size=None`` uses one batch (the full-batch estimate). Examples are taken
  in the given order; shuffle beforehand if the order carries structure.
  See ``batch_bounds`` for the remainder rule.
  """
  xs, ys = np.asarray(x), np.asarray(y)
  if xs.ndim not in (2, 3) or ys.ndim not in (2, 3):
    raise ValueError(f"x and y must be [layers, n, d] or [n, d]; got {xs.shape}, {ys.shape}.")
  n = xs.shape[-2]
  if ys.shape[-2] != n:
    raise ValueError(f"x and y must hold the same examples: n={n} vs n={ys.shape[-2]}.")
  acc = CKAAccumulator(estimator)
  for lo, hi in batch_bounds(n, batch_size or n, estimator, remainder):
    acc.update(xs[..., lo:hi, :], ys[..., lo:hi, :])
  return _squeeze(acc.result(), xs, ys)


def pairwise_cka(representations: Mapping[str, Any], batch_size: Optional[int] = None,
                 estimator: str = "unbiased") -> dict:
  """CKA matrices for every ordered pair of models (``(a, b)`` with a ≤ b in key order).

  ``representations`` maps a model name to its ``[L, n, d]`` stack (same examples).
  Returns ``{(a, b): [L_a, L_b]}`` including each model against itself.
  """
  names = list(representations)
  out = {}
  for i, a in enumerate(names):
    for b in names[i:]:
      out[(a, b)] = minibatch_cka(representations[a], representations[b], batch_size,
                                  estimator)
  return out


# --- representations of our encoder -----------------------------------------

@functools.partial(jax.jit, static_argnames=("config", "token", "dtype_name"))
def _pooled_states(params, input_ids, attention_mask, token_type_ids, *, config, token,
                   dtype_name):
  batch = {"input_ids": input_ids, "attention_mask": attention_mask,
           "token_type_ids": token_type_ids}
  out = apply(params, batch, config=config, head="none", dtype=jnp.dtype(dtype_name),
              output_hidden_states=True)
  states = jnp.stack(out["hidden_states"]).astype(jnp.float32)  # [L+1, B, T, d]
  if token == "first":
    return states[:, :, 0]
  mask = attention_mask.astype(jnp.float32)[None, :, :, None]
  return jnp.sum(states * mask, axis=2) / jnp.maximum(jnp.sum(mask, axis=2), 1.0)


def layer_representations(params: Mapping, config, batches: Iterable[Mapping[str, Any]],
                          token: str = "first", dtype: Any = jnp.float32) -> np.ndarray:
  """Per-layer sentence representations of our encoder: ``[L + 1, n, hidden]`` float32.

  Index 0 is the embeddings output, index i the output of layer i (1-indexed, as
  transformers' ``hidden_states``). ``token="first"`` takes the first token
  (<s> / [CLS]); ``"mean"`` averages the tokens where ``attention_mask`` is 1.
  Rows whose batch ``weights`` are 0 (padding of a final partial batch) are dropped.
  Works on base, LoRA, adapter and merged trees alike (the head is not run).
  """
  if token not in TOKENS:
    raise ValueError(f"Unknown token choice {token!r}; choose one of {TOKENS}.")
  chunks = []
  for batch in batches:
    ids = np.asarray(batch["input_ids"])
    mask = np.asarray(batch.get("attention_mask", np.ones_like(ids)))
    types = np.asarray(batch.get("token_type_ids", np.zeros_like(ids)))
    pooled = np.asarray(_pooled_states(params, ids, mask, types, config=config, token=token,
                                       dtype_name=jnp.dtype(dtype).name))
    if "weights" in batch:
      pooled = pooled[:, np.asarray(batch["weights"]) != 0]
    chunks.append(pooled)
  if not chunks:
    raise ValueError("No batches given to layer_representations.")
  return np.concatenate(chunks, axis=1)
