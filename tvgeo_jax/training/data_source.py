"""Build the loop's ``TrainingData`` from ``tvgeo_jax.data``: a task, its tokenizer, batches.

Training batches are shuffled from ``(seed, epoch)`` (so a resumed run sees the same
order) and bucketed by length; each host yields only its slice of every global batch.
"""
from __future__ import annotations

from typing import Mapping, Sequence, Tuple

import jax
import numpy as np

from tvgeo_jax.training.config import TrainConfig
from tvgeo_jax.training.loop import TrainingData


def task_spec(name: str):
  """The task's spec; a ValueError lists the valid task names."""
  from tvgeo_jax import data
  return data.get_task(name)


def task_data(config: TrainConfig) -> TrainingData:
  """Load, tokenise and batch ``config.task`` for ``config.model``'s tokenizer."""
  from tvgeo_jax import data
  spec = task_spec(config.task)
  raw = data.load_task_data(spec.name, data_dir=config.data_dir, seed=config.seed,
                            scale=config.data_scale, revision=config.data_revision)
  return from_splits({s: raw[s] for s in data.SPLITS}, config,
                     num_labels=spec.num_labels, is_regression=spec.is_regression,
                     label_names=spec.label_names, metrics=spec.metrics,
                     main_metric=spec.main_metric)


def from_splits(splits: Mapping[str, Tuple[Sequence, np.ndarray]], config: TrainConfig, *,
                num_labels: int, is_regression: bool, label_names: Sequence[str],
                metrics: Sequence[str], main_metric: str) -> TrainingData:
  """``TrainingData`` from raw ``{split: (texts, labels)}`` (e.g. a derived binary task).

  Tokenised with ``config.model``'s tokenizer; training batches shuffled from
  (seed, epoch) and bucketed by length; each host yields only its slice.
  """
  from tvgeo_jax import data
  tokenizer = data.load_tokenizer(config.model)
  enc = {s: data.encode(tokenizer, *splits[s], max_length=config.max_seq_len)
         for s in data.SPLITS}
  hosts = dict(host_index=jax.process_index(), host_count=jax.process_count())
  train = data.Batches(enc["train"], config.batch_size, shuffle=True, seed=config.seed, **hosts)
  evals = {s: data.Batches(enc[s], config.eval_batch_size, **hosts)
           for s in ("validation", "test")}
  return TrainingData(
      num_labels=num_labels, is_regression=is_regression, label_names=tuple(label_names),
      metrics=tuple(metrics), main_metric=main_metric, train_batches=train.epoch,
      num_train_batches=len(train), eval_batches=lambda split: evals[split].epoch(0),
      train_labels=enc["train"].labels)
