"""Early stopping on validation loss: a pure, serialisable state machine."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
  """Tracks the best validation loss; ``stop`` once ``patience`` epochs fail to improve.

  ``patience=0`` disables stopping (train every epoch, still keep the best).
  ``min_delta``: an improvement must lower the loss by more than this.
  """
  patience: int
  min_delta: float = 0.0
  best_loss: float = math.inf
  best_epoch: int = -1
  bad_epochs: int = 0
  stop: bool = False

  def update(self, epoch: int, loss: float) -> "EarlyStopping":
    """The state after an epoch with validation ``loss`` (NaN never improves)."""
    if loss < self.best_loss - self.min_delta:
      return dataclasses.replace(self, best_loss=float(loss), best_epoch=epoch,
                                 bad_epochs=0, stop=False)
    bad = self.bad_epochs + 1
    return dataclasses.replace(self, bad_epochs=bad,
                               stop=self.patience > 0 and bad >= self.patience)

  @property
  def improved_last(self) -> bool:
    """True if the last ``update`` set a new best."""
    return self.bad_epochs == 0 and self.best_epoch >= 0

  def to_dict(self) -> Dict[str, Any]:
    d = dataclasses.asdict(self)
    d["best_loss"] = None if math.isinf(self.best_loss) else self.best_loss
    return d

  @classmethod
  def from_dict(cls, d: Dict[str, Any]) -> "EarlyStopping":
    d = dict(d)
    d["best_loss"] = math.inf if d.get("best_loss") is None else d["best_loss"]
    return cls(**d)
