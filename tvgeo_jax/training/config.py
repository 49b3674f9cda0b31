"""``TrainConfig``: every hyper-parameter of a fine-tuning run, in one frozen dataclass.

The config is written to the run directory at start; a resumed run must carry
the same values for every field except those in ``RESUME_IGNORED`` (book-keeping
that does not change the result).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple

from tvgeo_jax import partition

DTYPES = ("float32", "bfloat16")

# Fields that may differ between an interrupted run and its resumption.
RESUME_IGNORED = ("checkpoint_every", "log_every", "eval_batch_size", "progress",
                  "stop_after_steps")
# Fields a resumed run may change on purpose (``--resume_with``, e.g. after a non-finite
# loss): they change how the optimizer steps from the restored state on, not its layout.
RESUME_CHANGEABLE = ("learning_rate", "max_grad_norm", "weight_decay", "adam_eps", "dtype")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Hyper-parameters of one fine-tuning run (see ``presets`` for defaults)."""
  task: str = "synth_sst2"
  method: str = "lora"
  model: str = "tiny"
  seed: int = 0
  # Optimisation.
  learning_rate: float = 1e-4
  batch_size: int = 20
  epochs: int = 20
  patience: int = 5
  weight_decay: float = 0.01
  warmup_ratio: float = 0.06
  max_grad_norm: float = 1.0
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  adam_eps: float = 1e-8
  class_weights: bool = False
  dtype: str = "float32"
  # Dropout of the encoder (hidden and attention probabilities); None keeps the model's.
  dropout: Optional[float] = None
  # LoRA.
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_targets: Tuple[str, ...] = ("query", "value")
  # Bottleneck adapters: a size, or hidden_size // reduction_factor when size is 0.
  bottleneck_size: int = 0
  bottleneck_reduction_factor: int = 16
  # Data.
  max_seq_len: int = 128
  data_scale: float = 1.0
  data_dir: Optional[str] = None
  # Hub dataset revision (branch, tag or commit) of a real task; None: the default branch.
  data_revision: Optional[str] = None
  # Book-keeping (RESUME_IGNORED).
  eval_batch_size: int = 64
  checkpoint_every: int = 200
  log_every: int = 10
  progress: bool = True
  stop_after_steps: int = 0

  def __post_init__(self):
    object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
    self.validate()

  def validate(self) -> None:
    """Raise ValueError naming each bad value and how to fix it."""
    if self.method not in partition.METHODS:
      raise ValueError(f"Unknown fine-tuning method {self.method!r}; valid methods: "
                       f"{', '.join(partition.METHODS)}.")
    positive = {"learning_rate": self.learning_rate, "batch_size": self.batch_size,
                "epochs": self.epochs, "eval_batch_size": self.eval_batch_size,
                "max_seq_len": self.max_seq_len, "data_scale": self.data_scale,
                "checkpoint_every": self.checkpoint_every, "log_every": self.log_every}
    if self.method == "lora":
      positive.update(lora_rank=self.lora_rank, lora_alpha=self.lora_alpha)
    if self.method == "bottleneck" and not self.bottleneck_size:
      positive["bottleneck_reduction_factor"] = self.bottleneck_reduction_factor
    for name, value in positive.items():
      if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}; pass --{name}=<positive value>.")
    non_negative = {"patience": self.patience, "weight_decay": self.weight_decay,
                    "max_grad_norm": self.max_grad_norm, "bottleneck_size": self.bottleneck_size,
                    "stop_after_steps": self.stop_after_steps}
    for name, value in non_negative.items():
      if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}.")
    if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}.")
    if not 0.0 <= self.warmup_ratio < 1.0:
      raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}.")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}.")
    if self.method == "lora" and not self.lora_targets:
      raise ValueError("lora_targets is empty; name modules, e.g. --lora_targets=query,value.")

  def replace(self, **changes) -> "TrainConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> Dict[str, Any]:
    d = dataclasses.asdict(self)
    d["lora_targets"] = list(self.lora_targets)
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def config_differences(saved: Mapping[str, Any], current: "TrainConfig") -> Dict[str, Tuple]:
  """{field: (saved, current)} for fields that matter to the result and differ."""
  now = current.to_dict()
  out = {}
  for k in sorted(set(saved) | set(now)):
    if k in RESUME_IGNORED:
      continue
    a, b = saved.get(k), now.get(k)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
      a, b = list(a), list(b)
    if a != b:
      out[k] = (a, b)
  return out


def check_resume_changes(changes: Mapping[str, Any]) -> None:
  """Raise ValueError unless every field of ``changes`` may change on resumption."""
  bad = sorted(set(changes) - set(RESUME_CHANGEABLE))
  if bad:
    raise ValueError(f"--resume_with cannot change {', '.join(bad)} (only "
                     f"{', '.join(RESUME_CHANGEABLE)}); start afresh with --overwrite instead.")


def parse_resume_with(items) -> Dict[str, Any]:
  """``["learning_rate=1e-4", "dtype=float32"]`` → typed values of TrainConfig's fields."""
  types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
  out: Dict[str, Any] = {}
  for item in items or ():
    name, sep, value = item.partition("=")
    name = name.strip()
    if not sep or not value.strip():
      raise ValueError(f"--resume_with takes field=value pairs, got {item!r} "
                       "(e.g. --resume_with=learning_rate=1e-4).")
    if name not in types:
      raise ValueError(f"--resume_with: unknown field {name!r}; fields: "
                       f"{', '.join(RESUME_CHANGEABLE)}.")
    kind = types[name]
    try:
      out[name] = float(value) if kind in ("float", float) else value.strip()
    except ValueError:
      raise ValueError(f"--resume_with: {name} takes a number, got {value!r}.") from None
  check_resume_changes(out)
  return out
