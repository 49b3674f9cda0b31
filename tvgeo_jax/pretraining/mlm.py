"""Masked-language-model objective (BERT/RoBERTa style) as pure functions.

Used to pretrain the embedded base model on the synthetic corpus
(``tvgeo_jax.pretraining.embedded``). Masking follows BERT: of the ``mask_prob`` selected
positions, 80% become ``<mask>``, 10% a random token, 10% stay unchanged.
"""
from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np


def mask_tokens(rng: jax.Array, input_ids: jax.Array, attention_mask: jax.Array, *,
                mask_token_id: int, vocab_size: int, special_ids: Tuple[int, ...],
                mask_prob: float = 0.15) -> Tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Select ``P = ceil(mask_prob·T)`` positions per row (uniformly among real, non-special
  tokens) and corrupt them BERT-style.

  A fixed count per row keeps shapes static, so the MLM head runs on ``[B, P]`` positions
  instead of all ``[B, T]`` (the vocabulary projection dominates a tiny model's cost).

  Returns (masked ids [B, T], positions [B, P], targets [B, P], weights [B, P]); a weight
  is 0 where a row had fewer than P candidate tokens.
  """
  k_sel, k_kind, k_tok = jax.random.split(rng, 3)
  b, t = input_ids.shape
  p = max(1, int(np.ceil(mask_prob * t)))
  candidate = attention_mask.astype(bool)
  for s in special_ids:
    candidate &= input_ids != s
  scores = jnp.where(candidate, jax.random.uniform(k_sel, (b, t)), -1.0)
  top, positions = jax.lax.top_k(scores, p)
  weights = (top >= 0).astype(jnp.float32)
  targets = jnp.take_along_axis(input_ids, positions, axis=1)
  kind = jax.random.uniform(k_kind, (b, p))
  replacement = jnp.where(kind < 0.8, mask_token_id,
                          jnp.where(kind < 0.9, jax.random.randint(k_tok, (b, p), 0, vocab_size),
                                    targets))
  replacement = jnp.where(weights > 0, replacement, targets)
  rows = jnp.arange(b)[:, None]
  masked = jnp.asarray(input_ids).at[rows, positions].set(replacement.astype(input_ids.dtype))
  return masked, positions, targets, weights


def mlm_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean cross-entropy (nats) over the selected positions."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def unigram_baseline(token_id_rows, special_ids: Tuple[int, ...]) -> float:
  """Cross-entropy (nats) of predicting a masked token by corpus unigram frequencies.

  This is the entropy of the unigram distribution over non-special tokens: the loss
  of a model that ignores context. An MLM that learned anything beats it.
  """
  flat = np.concatenate([np.asarray(r).ravel() for r in token_id_rows])
  flat = flat[~np.isin(flat, np.asarray(special_ids))]
  _, counts = np.unique(flat, return_counts=True)
  p = counts / counts.sum()
  return float(-(p * np.log(p)).sum())
