"""Where a run's metrics go: one ``write(record)`` interface, several destinations.

Records are the dicts of ``RUN/metrics.jsonl``: ``{"kind": "step", "step", "epoch", "loss",
"grad_norm", "learning_rate", "tokens_per_s"}`` every ``log_every`` steps and
``{"kind": "epoch", "step", "epoch", "validation_loss", "validation": {...}, ...}`` after
each validation.

- ``JsonLinesWriter``: the append-only ``metrics.jsonl``; on resume, the records after the
  restored step are dropped first, so the file reads as one uninterrupted run.
- ``TensorBoardWriter``: event files in ``RUN/tensorboard/`` through tensorboardX (no
  TensorFlow needed): ``train/{loss,grad_norm,learning_rate,tokens_per_s}`` and
  ``validation/<metric>``; on resume a purge marker at the restored step makes TensorBoard
  drop the interrupted session's later events.
Only process 0 writes (``make_writers``).
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from tvgeo_jax import io_utils

TENSORBOARD_DIR = "tensorboard"


class MetricWriter:
  """The interface: ``write(record)`` for each record, ``close()`` at the end."""

  def write(self, record: Mapping[str, Any]) -> None:
    raise NotImplementedError

  def close(self) -> None:
    pass


class JsonLinesWriter(MetricWriter):
  """Append-only JSON lines; records after ``keep_until_step`` are dropped on open."""

  def __init__(self, path: str, keep_until_step: Optional[int]):
    self.path = path
    if os.path.exists(path):
      with open(path) as f:
        lines = [l for l in f if l.strip()]
      keep = [l for l in lines if keep_until_step is not None
              and json.loads(l).get("step", 0) <= keep_until_step]
      io_utils.atomic_write_text(path, "".join(keep))

  def write(self, record: Mapping[str, Any]) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps(record, default=io_utils._json_default) + "\n")


def tensorboard_scalars(record: Mapping[str, Any]) -> Mapping[str, float]:
  """The TensorBoard tags and values of one metrics record."""
  if record.get("kind") == "step":
    return {f"train/{k}": float(record[k])
            for k in ("loss", "grad_norm", "learning_rate", "tokens_per_s") if k in record}
  if record.get("kind") == "epoch":
    return {f"validation/{k}": float(v) for k, v in record.get("validation", {}).items()
            if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)}
  return {}


class TensorBoardWriter(MetricWriter):
  """TensorBoard event files (tensorboardX), one scalar per tag and step."""

  def __init__(self, logdir: str, resumed_step: Optional[int]):
    from tensorboardX import SummaryWriter  # keeps start-up light for commands that never train
    purge = None if resumed_step is None else resumed_step + 1
    self._writer = SummaryWriter(logdir=logdir, purge_step=purge, flush_secs=30)

  def write(self, record: Mapping[str, Any]) -> None:
    for tag, value in tensorboard_scalars(record).items():
      self._writer.add_scalar(tag, value, global_step=int(record["step"]))

  def close(self) -> None:
    self._writer.close()


class MultiWriter(MetricWriter):
  def __init__(self, writers: Sequence[MetricWriter]):
    self.writers = list(writers)

  def write(self, record: Mapping[str, Any]) -> None:
    for w in self.writers:
      w.write(record)

  def close(self) -> None:
    for w in self.writers:
      w.close()


def make_writers(run_dir: str, metrics_log: str, resumed_step: Optional[int],
                 primary: bool) -> MetricWriter:
  """The run's writers: JSON lines and TensorBoard on process 0, nothing elsewhere."""
  if not primary:
    return MultiWriter([])
  return MultiWriter([JsonLinesWriter(os.path.join(run_dir, metrics_log), resumed_step),
                      TensorBoardWriter(os.path.join(run_dir, TENSORBOARD_DIR), resumed_step)])
