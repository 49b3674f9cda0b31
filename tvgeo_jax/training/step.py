"""The jitted train and eval steps (global-view ``jax.jit`` over a device mesh).

The train state is a plain dict ``{"step", "trainable", "opt_state"}``; the frozen
partition (``partition.split``) is a separate, non-donated argument, so only the
trainable leaves are differentiated, carry optimizer state and change.
Both functions count their traces (``.traces``) so tests can check that each
bucket shape compiles exactly once.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tvgeo_jax.adapters import partition
from tvgeo_jax.models import apply as model_apply
from tvgeo_jax.models.config import EncoderConfig
from tvgeo_jax.core import sharding

TrainState = dict


def init_state(trainable: Mapping, optimizer: optax.GradientTransformation) -> TrainState:
  """Step 0: the trainable tree and fresh optimizer state."""
  return {"step": jnp.zeros((), jnp.int32), "trainable": trainable,
          "opt_state": optimizer.init(trainable)}


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


class _Counted:
  """A jitted function plus the number of times its Python body was traced."""

  def __init__(self, fn: Callable):
    self.traces = 0
    self._fn = fn

  def _bump(self):
    self.traces += 1

  def __call__(self, *args):
    return self._fn(*args)


def make_train_step(*, model_config: EncoderConfig,
                    optimizer: optax.GradientTransformation, mesh, is_regression: bool,
                    seed: int = 0, dtype: Any = jnp.float32,
                    class_weights: Optional[np.ndarray] = None,
                    prng_impl: Optional[str] = None) -> _Counted:
  """``step(state, frozen, batch) -> (state, metrics)``, compiled once per batch shape.

  ``state`` is donated. Dropout keys are ``fold_in(key(seed), step)``, so a resumed
  run draws the same masks as an uninterrupted one without saving an rng.
  ``prng_impl`` picks the dropout generator (``jax.random.key``'s ``impl``:
  ``"threefry2x32"`` by default; ``"rbg"`` measured no faster on an H100, and on the
  CPU 4.60 vs 4.80 s per roberta-base LoRA step, within that machine's noise).
  """
  cw = None if class_weights is None else jnp.asarray(class_weights, jnp.float32)
  rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)

  def step(state, frozen, batch):
    counted._bump()
    rng = jax.random.fold_in(jax.random.key(seed, impl=prng_impl), state["step"])

    def loss_of(trainable):
      params = partition.combine(trainable, frozen)
      out = model_apply(params, batch, config=model_config, train=True, rng=rng, dtype=dtype,
                        logits_only=True)
      return weighted_mean_loss(out["logits"], batch, is_regression, cw)

    loss, grads = jax.value_and_grad(loss_of)(state["trainable"])
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
    new_state = {"step": state["step"] + 1,
                 "trainable": optax.apply_updates(state["trainable"], updates),
                 "opt_state": opt_state}
    return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

  jitted = jax.jit(step, in_shardings=(rep, rep, data), out_shardings=(rep, rep),
                   donate_argnums=(0,))
  counted = _Counted(jitted)
  return counted


def make_eval_step(*, model_config: EncoderConfig, mesh, is_regression: bool,
                   dtype: Any = jnp.float32) -> _Counted:
  """``eval(params, batch) -> {"logits", "loss", "labels", "weights"}`` per row.

  The loss is per row and unweighted; labels and weights are passed through so
  the caller gets every global row (all hosts) in one place.
  """
  rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)

  def evaluate(params, batch):
    counted._bump()
    out = model_apply(params, batch, config=model_config, train=False, dtype=dtype,
                      logits_only=True)
    logits = out["logits"].astype(jnp.float32)
    return {"logits": logits,
            "loss": per_example_loss(logits, batch["labels"], is_regression),
            "labels": batch["labels"], "weights": batch["weights"]}

  counted = _Counted(jax.jit(evaluate, in_shardings=(rep, data), out_shardings=data))
  return counted
