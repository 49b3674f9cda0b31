"""The compiled eval step, predictions over a split and the split's metrics.

What a run's validation, its results.json, the merge study and one-vs-rest all score
with, so their numbers agree.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from tvgeo_jax.core import metrics as metrics_lib
from tvgeo_jax.core import sharding
from tvgeo_jax.evaluation import losses
from tvgeo_jax.evaluation.task_data import Batch, TaskData
from tvgeo_jax.models import apply as model_apply
from tvgeo_jax.models.config import EncoderConfig


def make_eval_step(*, model_config: EncoderConfig, mesh, is_regression: bool,
                   dtype: Any = jnp.float32):
  """``eval(params, batch) -> {"logits", "loss", "labels", "weights"}`` per row, jitted
  over ``mesh`` (compiled once per batch shape).

  The loss is per row and unweighted; labels and weights are passed through so
  the caller gets every global row (all hosts) in one place.
  """
  rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)

  def evaluate(params, batch):
    out = model_apply(params, batch, config=model_config, train=False, dtype=dtype,
                      logits_only=True)
    logits = out["logits"].astype(jnp.float32)
    return {"logits": logits,
            "loss": losses.per_example_loss(logits, batch["labels"], is_regression),
            "labels": batch["labels"], "weights": batch["weights"]}

  return jax.jit(evaluate, in_shardings=(rep, data), out_shardings=data)


def predict(eval_step, params, batches: Iterator[Batch], mesh) -> Dict[str, np.ndarray]:
  """Logits, per-row loss, labels and weights of every real example (weight > 0)."""
  out: Dict[str, List[np.ndarray]] = {"logits": [], "loss": [], "labels": [], "weights": []}
  for batch in batches:
    res = {k: sharding.to_host(v) for k, v in
           eval_step(params, sharding.shard_batch(batch, mesh)).items()}
    keep = res["weights"] > 0
    for k in out:
      out[k].append(res[k][keep])
  return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in out.items()}


def class_weights(use_class_weights: bool, data: TaskData) -> Optional[np.ndarray]:
  """The balanced class weights a run with ``use_class_weights`` trains and reports its
  loss with (None for regression or when off)."""
  if not use_class_weights or data.is_regression:
    return None
  if data.train_labels is None:
    raise ValueError("class_weights needs the training labels (TaskData.train_labels).")
  return losses.balanced_class_weights(data.train_labels, data.num_labels)


def split_metrics(pred: Mapping[str, np.ndarray], data: TaskData,
                  class_weights: Optional[np.ndarray]) -> Dict[str, Any]:
  """The task's metrics of ``pred`` (as in results.json), its mean loss and count."""
  logits = pred["logits"]
  values = logits[:, 0] if data.is_regression else logits
  res = metrics_lib.compute_metrics(list(data.metrics), values, pred["labels"],
                                    label_names=list(data.label_names) or None,
                                    main=data.main_metric)
  res = dict(res)
  res["loss"] = losses.mean_loss(pred, class_weights)
  res["num_examples"] = int(pred["labels"].shape[0])
  return res
