"""Real task data: the Hugging Face hub or a local copy in the hub's formats.

One code path serves both: a hub task is fetched with ``tvgeo_jax.core.hub.snapshot`` (which
fails fast offline) and then read from the snapshot's parquet files exactly like a
``--data_dir`` copy. Local copies may be

* parquet files per split, as on the hub (``qnli/train-00000-of-00001.parquet``,
  ``train.parquet``, ``train/0000.parquet``),
* arrow files per split (``train-*.arrow``, ``train/data-00000-of-00001.arrow``),
* a ``DatasetDict.save_to_disk`` directory (``dataset_dict.json`` + one folder per split).

``data_dir`` may be the task's folder itself, or a parent holding ``<task>/`` or
``<hub config>/`` (so a snapshot of ``nyu-mll/glue`` serves every GLUE task).

Split policy (paper A): GLUE's dev split (MNLI: ``validation_matched``) is our test set;
SNLI, YELP and IMDB keep their own test split; in both cases the train split is divided
90/10 into train/validation with a fixed seed. Rows with label -1 (SNLI's unlabelled
pairs, GLUE test rows) are dropped.
"""
from __future__ import annotations

import glob
import os
import re
from typing import Dict, List, Optional, Tuple

import numpy as np

from tvgeo_jax.core import hub
from tvgeo_jax.data.registry import VALIDATION_FRACTION, TaskSpec

Texts = List[Tuple[str, ...]]


class DataNotFoundError(FileNotFoundError):
  """A local copy lacks a split, a column, or is in no recognised format."""


def validation_rows(n: int, fraction: float = VALIDATION_FRACTION) -> int:
  """How many of ``n`` training rows ``split_train_validation`` gives to validation."""
  return max(1, int(round(fraction * n)))


def split_train_validation(n: int, seed: int,
                           fraction: float = VALIDATION_FRACTION) -> Tuple[np.ndarray, np.ndarray]:
  """Indices of a deterministic train/validation split of ``n`` rows (``fraction`` to validation).

  The permutation depends only on ``(n, seed)``; validation gets ``round(fraction * n)``
  rows (at least one when ``n >= 2``).
  """
  if n < 2:
    raise ValueError(f"Cannot split {n} training rows into train and validation.")
  n_val = validation_rows(n, fraction)
  perm = np.random.default_rng(np.random.SeedSequence([seed, n, 9010])).permutation(n)
  return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def resolve_task_dir(task: TaskSpec, data_dir: str) -> str:
  """The folder holding ``task``'s files inside ``data_dir`` (see the module docstring).

  ``data_dir/<task>/`` or ``data_dir/<hub config>/`` when present; else ``data_dir``
  itself, only when its own top level holds the train split (never the files of
  another task found further down).
  """
  if not os.path.isdir(data_dir):
    raise DataNotFoundError(f"--data_dir {data_dir!r} is not a directory.")
  for sub in (task.name, task.hub_config):
    if sub and os.path.isdir(os.path.join(data_dir, sub)):
      candidate = os.path.join(data_dir, sub)
      if _has_split(candidate, "train"):
        return candidate
  if _has_own_split(data_dir, "train"):
    return data_dir
  folders = sorted(d for d in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, d)))
  wanted = " or ".join(repr(f"{s}/") for s in dict.fromkeys((task.name, task.hub_config)) if s)
  raise DataNotFoundError(
      f"{task.name}: {data_dir!r} holds no {wanted} folder with a 'train' split and no train "
      f"files of its own (its folders: {folders}); point --data_dir at the task's own folder.")


def _has_own_split(directory: str, split: str) -> bool:
  """The split's files directly in ``directory`` (or in ``directory/<split>/``)."""
  if os.path.exists(os.path.join(directory, "dataset_dict.json")):
    return os.path.isdir(os.path.join(directory, split))
  pat = _split_pattern(split)
  return (any(pat.match(f) for f in os.listdir(directory))
          or (os.path.isdir(os.path.join(directory, split))
              and bool(_split_files(os.path.join(directory, split), split)[1])))


def _split_globs(split: str) -> List[str]:
  """allow_patterns of one split's files (relative to the config folder)."""
  return [f"{split}-*", f"{split}.*", f"{split}/*"]


def _split_pattern(split: str) -> re.Pattern:
  # "validation" must not match "validation_matched-00000-of-00001.parquet".
  return re.compile(rf"^{re.escape(split)}([-.][^/]*)?\.(parquet|arrow)$")


def _split_files(directory: str, split: str) -> Tuple[str, List[str]]:
  """(format, files) of ``split`` in ``directory``; format '' when absent."""
  pat = _split_pattern(split)
  found = {"parquet": [], "arrow": []}
  for path in sorted(glob.glob(os.path.join(directory, "**", "*"), recursive=True)):
    if not os.path.isfile(path):
      continue
    name, parent = os.path.basename(path), os.path.basename(os.path.dirname(path))
    ext = name.rsplit(".", 1)[-1]
    if ext not in found:
      continue
    if pat.match(name) or parent == split:
      found[ext].append(path)
  for fmt in ("parquet", "arrow"):
    if found[fmt]:
      homes = {os.path.dirname(f) for f in found[fmt]}
      homes = {os.path.dirname(h) if os.path.basename(h) == split else h for h in homes}
      if len(homes) > 1:
        raise DataNotFoundError(
            f"Several folders under {directory!r} hold a {split!r} split ({sorted(homes)}); "
            "point --data_dir at the task's own folder.")
      return fmt, found[fmt]
  return "", []


def _has_split(directory: str, split: str) -> bool:
  if os.path.exists(os.path.join(directory, "dataset_dict.json")):
    return os.path.isdir(os.path.join(directory, split))
  return bool(_split_files(directory, split)[1])


def _read_split(directory: str, split: str, task: TaskSpec):
  """A ``datasets.Dataset`` of one split of a local copy."""
  import datasets
  if os.path.exists(os.path.join(directory, "dataset_dict.json")):
    dd = datasets.load_from_disk(directory)
    if split not in dd:
      raise DataNotFoundError(f"{task.name}: the save_to_disk DatasetDict at {directory!r} has "
                              f"splits {sorted(dd)}, not {split!r}.")
    return dd[split]
  fmt, files = _split_files(directory, split)
  if not files:
    raise DataNotFoundError(
        f"{task.name}: no {split!r} split under {directory!r}. Expected parquet or arrow "
        f"files named like '{split}-00000-of-00001.parquet' / '{split}.parquet' / "
        f"'{split}/0000.parquet', or a DatasetDict saved with save_to_disk.")
  return datasets.load_dataset(fmt, data_files={split: files}, split=split)


def _to_texts_labels(ds, task: TaskSpec, where: str) -> Tuple[Texts, np.ndarray]:
  missing = [c for c in task.text_fields + ("label",) if c not in ds.column_names]
  if missing:
    raise DataNotFoundError(f"{task.name}: {where} lacks columns {missing}; it has "
                            f"{ds.column_names}; expected {list(task.text_fields)} + ['label'].")
  cols = [list(ds[c]) for c in task.text_fields]
  labels = np.asarray(ds["label"], dtype=np.float32 if task.is_regression else np.int64)
  keep = labels >= 0 if not task.is_regression else np.ones(len(labels), bool)
  texts = [tuple(str(c[i]) for c in cols) for i in np.flatnonzero(keep)]
  labels = labels[keep]
  if not task.is_regression:
    labels = labels.astype(np.int32)
    if labels.size and labels.max() >= task.num_labels:
      raise DataNotFoundError(f"{task.name}: {where} has label {labels.max()} but the task has "
                              f"{task.num_labels} classes {task.label_names}.")
  return texts, labels


def load_real_splits(task: TaskSpec, data_dir: Optional[str] = None, seed: int = 0,
                     revision: Optional[str] = None) -> Dict[str, Tuple[Texts, np.ndarray]]:
  """``{'train', 'validation', 'test'} -> (texts, labels)`` of a real task.

  Args:
    task: a non-synthetic TaskSpec.
    data_dir: a local copy (see the module docstring); None fetches from the hub.
    seed: seed of the 90/10 train/validation split.
    revision: hub dataset revision (branch, tag or commit; None: the default branch).

  Raises:
    tvgeo_jax.core.hub.HubUnavailableError: no ``data_dir`` and the hub is unreachable.
    DataNotFoundError: the local copy lacks a split or a column.
  """
  if task.is_synthetic:
    raise ValueError(f"{task.name} is synthetic: use tvgeo_jax.data.synthetic.")
  if data_dir is None:
    directory = fetch_from_hub(task, revision)
  elif revision is not None:
    raise ValueError(f"--data_revision={revision!r} selects a hub revision; it does not apply "
                     f"to --data_dir={data_dir!r} (drop one of them).")
  else:
    directory = resolve_task_dir(task, data_dir)
  train_ds = _read_split(directory, "train", task)
  test_ds = _read_split(directory, task.test_split, task)
  train_texts, train_labels = _to_texts_labels(train_ds, task, f"{directory!r} split 'train'")
  test = _to_texts_labels(test_ds, task, f"{directory!r} split {task.test_split!r}")
  tr, va = split_train_validation(len(train_texts), seed)
  return {
      "train": ([train_texts[i] for i in tr], train_labels[tr]),
      "validation": ([train_texts[i] for i in va], train_labels[va]),
      "test": test,
  }


def fetch_from_hub(task: TaskSpec, revision: Optional[str] = None) -> str:
  """Local folder ``<hub config>/`` of ``task``'s parquet files from the hub, at ``revision``.

  Only the splits the task reads (train and its test split) are downloaded; a
  cached snapshot counts only if it holds that folder with both splits, so a cache
  filled for another config never stands in for this one. Fails within seconds
  offline (``HF_HUB_OFFLINE=1`` or no network) with a ``HubUnavailableError`` that
  names the task, the missing folder and the alternatives.
  """
  splits = ("train", task.test_split)
  patterns = [f"{task.hub_config}/{g}" for s in splits for g in _split_globs(s)]

  def missing(root: str) -> Optional[str]:
    folder = os.path.join(root, task.hub_config)
    if not os.path.isdir(folder):
      return f"the folder {task.hub_config + '/'!r}"
    lacking = [s for s in splits if not _has_split(folder, s)]
    return (f"the split(s) {lacking} in {task.hub_config + '/'!r}" if lacking else None)

  try:
    root = hub.snapshot(task.hub_path, kind="dataset", allow_patterns=patterns,
                        revision=revision, missing=missing)
  except hub.HubUnavailableError as e:
    raise hub.HubUnavailableError(
        f"Task {task.name!r} needs the Hugging Face dataset {task.hub_path!r} "
        f"(config {task.hub_config!r}), but the hub is unreachable: {e} "
        f"Either pass --data_dir=DIR pointing at a local copy (parquet/arrow files per split "
        f"or a save_to_disk DatasetDict, e.g. DIR/{task.hub_config}/train-*.parquet), or use "
        f"the offline synthetic counterpart --task={task.counterpart}.") from e
  return os.path.join(root, task.hub_config)


def hub_revision(task: TaskSpec, revision: Optional[str] = None) -> Optional[str]:
  """The commit of the snapshot ``fetch_from_hub(task, revision)`` reads (cached: no network)."""
  return hub.snapshot_revision(os.path.dirname(fetch_from_hub(task, revision)))
