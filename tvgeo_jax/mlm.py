"""Masked-language-model objective (BERT/RoBERTa style) as pure functions.

Used to pretrain the embedded base model on the synthetic corpus
(``tvgeo_jax.embedded``). Masking follows BERT: of the ``mask_prob`` selected
positions, 80% become ``<mask>``, 10% a random token, 10% stay unchanged.
"""
from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np


def mask_tokens(rng: jax.Array, input_ids: jax.Array, attention_mask: jax.Array, *,
                mask_token_id: int, vocab_size: int, special_ids: Tuple[int, ...],
                mask_prob: float = 0.15) -> Tuple[jax.Array, jax.Array]:
  """(masked input ids, target weights): targets are the original ``input_ids``."""
  k_sel, k_kind, k_tok = jax.random.split(rng, 3)
  candidate = attention_mask.astype(bool)
  for s in special_ids:
    candidate &= input_ids != s
  selected = candidate & (jax.random.uniform(k_sel, input_ids.shape) < mask_prob)
  kind = jax.random.uniform(k_kind, input_ids.shape)
  random_tokens = jax.random.randint(k_tok, input_ids.shape, 0, vocab_size)
  masked = jnp.where(selected & (kind < 0.8), mask_token_id, input_ids)
  masked = jnp.where(selected & (kind >= 0.8) & (kind < 0.9), random_tokens, masked)
  return masked, selected.astype(jnp.float32)


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
