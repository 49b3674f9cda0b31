"""Periodic actions of the training loop, kept out of it: progress bars, the loss check.

A hook sees the loop's events, never its state:
``epoch_start(epoch, position, num_batches)``, ``step_end(step, loss, grad_norm, record)``
(``record`` is the metrics record when the step was logged, else None) and
``epoch_end(record)``; ``close()`` runs however the run ends.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional



class Hook:
  def epoch_start(self, epoch: int, position: int, num_batches: int) -> None:
    pass

  def step_end(self, step: int, loss: float, grad_norm: float,
               record: Optional[Mapping[str, Any]]) -> None:
    pass

  def epoch_end(self, record: Mapping[str, Any]) -> None:
    pass

  def close(self) -> None:
    pass


class NonFiniteCheck(Hook):
  """Stops the run at the first step whose loss or gradient norm is NaN or inf:
  ``on_failure(step, loss, grad_norm)`` raises (it knows the run's checkpoints)."""

  def __init__(self, on_failure: Callable[[int, float, float], None]):
    self.on_failure = on_failure

  def step_end(self, step, loss, grad_norm, record):
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
      self.on_failure(step, loss, grad_norm)


class ProgressBar(Hook):
  """One tqdm bar per epoch with the last logged loss and throughput."""

  def __init__(self, num_epochs: int):
    self.num_epochs = num_epochs
    self.bar = None

  def epoch_start(self, epoch, position, num_batches):
    from tqdm import tqdm
    self.close()
    self.bar = tqdm(total=num_batches, initial=position, desc=f"epoch {epoch + 1}/"
                    f"{self.num_epochs}", leave=False, dynamic_ncols=True)

  def step_end(self, step, loss, grad_norm, record):
    if self.bar is None:
      return
    self.bar.update(1)
    if record is not None:
      self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}")

  def epoch_end(self, record):
    self.close()

  def close(self):
    if self.bar is not None:
      self.bar.close()
      self.bar = None
