"""A task tokenised and batched for a model: what training and every evaluation read.

Training batches are shuffled from ``(seed, epoch)`` (so a resumed run sees the same
order) and bucketed by length; each host yields only its slice of every global batch.
The config argument is anything with a ``TrainConfig``'s data fields (task, model, seed,
data_scale, train_scale, data_dir, data_revision, max_seq_len, batch_size,
eval_batch_size).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np

from tvgeo_jax import data

Batch = Dict[str, np.ndarray]


@dataclasses.dataclass
class TaskData:
  """A task's batches in the batch format (host-local) and its label metadata.

  Attributes:
    num_labels, is_regression, label_names, metrics, main_metric: the task.
    train_batches: ``fn(epoch) -> iterator`` of this host's training batches; the
      order must be a deterministic function of (seed, epoch).
    num_train_batches: batches per epoch.
    eval_batches: ``fn(split) -> iterator`` for "validation" / "test", every example
      once (padding rows have weight 0).
    train_labels: all training labels (for balanced class weights).
  """
  num_labels: int
  is_regression: bool
  label_names: Sequence[str]
  metrics: Sequence[str]
  main_metric: str
  train_batches: Callable[[int], Iterator[Batch]]
  num_train_batches: int
  eval_batches: Callable[[str], Iterator[Batch]]
  train_labels: Optional[np.ndarray] = None


def task_spec(name: str):
  """The task's spec; a ValueError lists the valid task names."""
  return data.get_task(name)


def build(config: Any) -> TaskData:
  """Load, tokenise and batch ``config.task`` for ``config.model``'s tokenizer."""
  spec = task_spec(config.task)
  raw = data.load_task_data(spec.name, data_dir=config.data_dir, seed=config.seed,
                            scale=config.data_scale, revision=config.data_revision,
                            train_scale=config.train_scale)
  return from_splits({s: raw[s] for s in data.SPLITS}, config,
                     num_labels=spec.num_labels, is_regression=spec.is_regression,
                     label_names=spec.label_names, metrics=spec.metrics,
                     main_metric=spec.main_metric)


def from_splits(splits: Mapping[str, Tuple[Sequence, np.ndarray]], config: Any, *,
                num_labels: int, is_regression: bool, label_names: Sequence[str],
                metrics: Sequence[str], main_metric: str) -> TaskData:
  """``TaskData`` from raw ``{split: (texts, labels)}`` (e.g. a derived binary task).

  Tokenised with ``config.model``'s tokenizer; training batches shuffled from
  (seed, epoch) and bucketed by length; each host yields only its slice.
  """
  tokenizer = data.load_tokenizer(config.model)
  enc = {s: data.encode(tokenizer, *splits[s], max_length=config.max_seq_len)
         for s in data.SPLITS}
  hosts = dict(host_index=jax.process_index(), host_count=jax.process_count())
  train = data.Batches(enc["train"], config.batch_size, shuffle=True, seed=config.seed, **hosts)
  evals = {s: data.Batches(enc[s], config.eval_batch_size, **hosts)
           for s in ("validation", "test")}
  return TaskData(
      num_labels=num_labels, is_regression=is_regression, label_names=tuple(label_names),
      metrics=tuple(metrics), main_metric=main_metric, train_batches=train.epoch,
      num_train_batches=len(train), eval_batches=lambda split: evals[split].epoch(0),
      train_labels=enc["train"].labels)
