"""The objective every train and eval step shares: per-example loss, class weights, rows."""
from __future__ import annotations

from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np


def balanced_class_weights(labels: np.ndarray, num_labels: int) -> np.ndarray:
  """``n / (k · count_c)`` per class (scikit-learn's "balanced"); absent classes get 0."""
  counts = np.bincount(np.asarray(labels, np.int64), minlength=num_labels).astype(np.float64)
  w = np.where(counts > 0, counts.sum() / (num_labels * np.maximum(counts, 1)), 0.0)
  return w.astype(np.float32)


def per_example_loss(logits: jax.Array, labels: jax.Array, is_regression: bool) -> jax.Array:
  """Cross-entropy per row (classification) or squared error (regression, one output)."""
  logits = logits.astype(jnp.float32)
  if is_regression:
    return jnp.square(logits[:, 0] - labels.astype(jnp.float32))
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(logp, labels.astype(jnp.int32)[:, None], axis=-1)[:, 0]


def row_weights(batch: Mapping, is_regression: bool,
                class_weights: Optional[jax.Array]) -> jax.Array:
  """Example weight (0 for padding rows) times the class weight of its label."""
  w = batch["weights"].astype(jnp.float32)
  if class_weights is not None and not is_regression:
    w = w * class_weights[batch["labels"].astype(jnp.int32)]
  return w


def weighted_mean_loss(logits, batch, is_regression, class_weights=None):
  """Σ wᵢ·lossᵢ / Σ wᵢ — torch's CrossEntropyLoss(weight=...) normalisation."""
  per = per_example_loss(logits, batch["labels"], is_regression)
  w = row_weights(batch, is_regression, class_weights)
  return jnp.sum(w * per) / jnp.maximum(jnp.sum(w), 1e-12)


def mean_loss(pred: Mapping[str, np.ndarray], class_weights: Optional[np.ndarray]) -> float:
  """The training objective on predictions of an eval split (class-weighted if training
  was), in float64 on the host."""
  w = pred["weights"].astype(np.float64)
  if class_weights is not None:
    w = w * class_weights[pred["labels"].astype(np.int64)]
  return float(np.sum(w * pred["loss"]) / max(np.sum(w), 1e-12))
