"""Tasks and data: the registry, real (hub / local) and synthetic loaders, tokenizers, batches.

Typical use::

  from tvgeo_jax import data
  task_data = data.load_task_data("synth_qnli")            # or "qnli", data_dir=...
  tok = data.load_tokenizer("tiny")
  enc = data.encode(tok, *task_data["train"], max_length=128)
  for batch in data.Batches(enc, 32, shuffle=True, seed=0).epoch(0):
    ...
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from tvgeo_jax.data.hub_loading import (DataNotFoundError, hub_revision, load_real_splits,
                                        split_train_validation)
from tvgeo_jax.data.pipeline import Batches, EncodedSplit, bucket_lengths, encode
from tvgeo_jax.data.registry import (AUTHORSHIP_REFERENCE, AUTHORSHIP_WRITERS, PAPER_TASKS,
                                     SYNTH_PAPER_TASKS, TASKS, TaskSpec, get_task, list_tasks)
from tvgeo_jax.data.tokenizer import MAX_LENGTH, VOCAB_SIZE, load_tokenizer
from tvgeo_jax.core.hub import HubUnavailableError
from tvgeo_jax.data import synthetic

SPLITS = ("train", "validation", "test")


class SplitData(NamedTuple):
  """One split: ``texts`` (tuples of one or two strings) and ``labels``."""
  texts: List[Tuple[str, ...]]
  labels: np.ndarray


@dataclasses.dataclass
class TaskData:
  """A task's spec and its train / validation / test splits."""
  task: TaskSpec
  splits: Dict[str, SplitData]

  def __getitem__(self, split: str) -> SplitData:
    if split not in self.splits:
      raise KeyError(f"No split {split!r}; splits are {list(self.splits)}.")
    return self.splits[split]

  def sizes(self) -> Dict[str, int]:
    return {k: len(v.texts) for k, v in self.splits.items()}


def load_task_data(name: str, data_dir: Optional[str] = None, seed: int = 0,
                   scale: float = 1.0, revision: Optional[str] = None,
                   train_scale: float = 1.0) -> TaskData:
  """Load a task's train / validation / test splits.

  Args:
    name: a registered task (``list_tasks()``): real (``qnli``...) or ``synth_*``.
    data_dir: for real tasks, a local copy in the hub's formats instead of the hub.
    seed: seed of the 90/10 train/validation split (and of generation for synth tasks).
    scale: size multiplier of synthetic tasks (ignored for real tasks).
    train_scale: for synthetic tasks, a multiplier of the training examples alone: the
      validation and test splits stay those of ``train_scale=1`` (1 for real tasks).
    revision: for hub tasks, the dataset revision (branch, tag or commit).

  Raises:
    HubUnavailableError: a real task without ``data_dir`` while the hub is unreachable.
  """
  spec = get_task(name)
  if spec.is_synthetic:
    if data_dir is not None or revision is not None:
      flag = "--data_dir" if data_dir is not None else "--data_revision"
      raise ValueError(f"{spec.name} is generated offline; {flag} applies to real tasks "
                       f"only (did you mean --task={spec.counterpart}?).")
    gen = synthetic.generate(spec.name, seed=seed, scale=scale, train_scale=train_scale)
    texts, labels = gen["train"]
    tr, va = split_train_validation(len(texts), seed)
    extra_texts, extra_labels = gen.get("extra_train", ([], labels[:0]))
    raw = {"train": ([texts[i] for i in tr] + list(extra_texts),
                     np.concatenate([labels[tr], extra_labels])),
           "validation": ([texts[i] for i in va], labels[va]), "test": gen["test"]}
  else:
    if train_scale != 1:
      raise ValueError(f"train_scale applies to synthetic tasks only; {spec.name} is a real "
                       "task (drop --train_scale).")
    raw = load_real_splits(spec, data_dir=data_dir, seed=seed, revision=revision)
  return TaskData(spec, {k: SplitData(list(raw[k][0]), raw[k][1]) for k in SPLITS})


__all__ = [
    "AUTHORSHIP_REFERENCE", "AUTHORSHIP_WRITERS", "Batches", "DataNotFoundError",
    "EncodedSplit", "HubUnavailableError", "MAX_LENGTH", "PAPER_TASKS", "SPLITS",
    "SYNTH_PAPER_TASKS", "SplitData", "TASKS", "TaskData", "TaskSpec", "VOCAB_SIZE",
    "bucket_lengths", "encode", "get_task", "hub_revision", "list_tasks", "load_task_data",
    "load_tokenizer", "split_train_validation",
]
