"""``TrainConfig``: every hyper-parameter of a fine-tuning run, in one frozen dataclass.

The config is written to the run directory at start; a resumed run must carry
the same values for every field except those in ``RESUME_IGNORED`` (book-keeping
that does not change the result).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple

from tvgeo_jax.adapters import partition

DTYPES = ("float32", "bfloat16")

# Fields that may differ between an interrupted run and its resumption.
RESUME_IGNORED = ("checkpoint_every", "log_every", "eval_batch_size", "progress",
                  "stop_after_steps")
# Fields a resumed run may change on purpose (``--resume_with``, e.g. after a non-finite
# loss): they change how the optimizer steps from the restored state on, not its layout.
RESUME_CHANGEABLE = ("learning_rate", "max_grad_norm", "weight_decay", "adam_eps", "dtype")


def _field(default, help: str, **metadata):
  """A TrainConfig field with its command-line help (flags are generated from these)."""
  return dataclasses.field(default=default, metadata=dict(help=help, **metadata))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Hyper-parameters of one fine-tuning run (see ``presets`` for the named defaults).

  Every field but task, method and model is also a flag of ``experiments.finetune``
  (generated from these fields by ``experiments.config_flags``; unset flags take the
  preset's value).
  """
  task: str = "synth_sst2"
  method: str = "lora"
  model: str = "tiny"
  seed: int = _field(0, "Seed (model head, adapters/LoRA init, data order, dropout).")
  # Optimisation.
  learning_rate: float = _field(1e-4, "Peak learning rate.")
  batch_size: int = _field(20, "Global training batch size.")
  epochs: int = _field(20, "Maximum number of epochs.")
  patience: int = _field(5, "Early-stopping patience in epochs (0: never stop).")
  weight_decay: float = _field(0.01, "AdamW weight decay (not on biases/LayerNorm).")
  warmup_ratio: float = _field(0.06, "Share of steps with linear warm-up.")
  max_grad_norm: float = _field(1.0, "Global gradient-norm clip (0: off).")
  adam_b1: float = _field(0.9, "AdamW beta1.")
  adam_b2: float = _field(0.999, "AdamW beta2.")
  adam_eps: float = _field(1e-8, "AdamW epsilon.")
  fast_modules: Tuple[str, ...] = _field(
      (), "Modules trained at the peak learning rate with the head when other_lr_scale < 1 "
      "(e.g. query,value).")
  other_lr_scale: float = _field(
      1.0, "Learning-rate factor of every trainable weight outside the head and "
      "fast_modules (discriminative rates; 1: one rate for all).")
  class_weights: bool = _field(False, "Balanced class weights in the loss (paper D).")
  dtype: str = _field("float32", "Compute dtype.", choices=DTYPES)
  dropout: Optional[float] = _field(
      None, "Override the encoder's dropout probabilities (hidden and attention).")
  # LoRA.
  lora_rank: int = _field(8, "LoRA rank r.")
  lora_alpha: float = _field(16.0, "LoRA alpha (scale alpha / r).")
  lora_targets: Tuple[str, ...] = _field(("query", "value"), "Modules that get LoRA factors.")
  # Bottleneck adapters: a size, or hidden_size // reduction_factor when size is 0.
  bottleneck_size: int = _field(0, "Adapter bottleneck width (0: use the factor).")
  bottleneck_reduction_factor: int = _field(16, "hidden_size / bottleneck width.")
  # Data.
  max_seq_len: int = _field(128, "Maximum tokens per example.")
  data_scale: float = _field(1.0, "Size multiplier of synthetic tasks.")
  train_scale: float = _field(
      1.0, "Multiplier of a synthetic task's training examples alone (>= 1): more fresh "
      "training pairs, the same validation and test sets as at 1.")
  data_dir: Optional[str] = _field(None, "Local copy of a real task's data (instead of the hub).")
  data_revision: Optional[str] = _field(
      None, "Hub dataset revision (branch, tag or commit) of a real task; default branch if unset.")
  # Book-keeping (RESUME_IGNORED).
  eval_batch_size: int = _field(64, "Evaluation batch size.")
  checkpoint_every: int = _field(200, "Save the latest state every N steps.")
  log_every: int = _field(10, "Log the training loss every N steps.")
  progress: bool = _field(True, "Show a progress bar.")
  stop_after_steps: int = _field(
      0, "Stop (as if killed) after this many steps; for testing resumption.")

  def __post_init__(self):
    object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
    object.__setattr__(self, "fast_modules", tuple(self.fast_modules))
    self.validate()

  def validate(self) -> None:
    """Raise ValueError naming each bad value and how to fix it."""
    if self.method not in partition.METHODS:
      raise ValueError(f"Unknown fine-tuning method {self.method!r}; valid methods: "
                       f"{', '.join(partition.METHODS)}.")
    positive = {"learning_rate": self.learning_rate, "batch_size": self.batch_size,
                "epochs": self.epochs, "eval_batch_size": self.eval_batch_size,
                "max_seq_len": self.max_seq_len, "data_scale": self.data_scale,
                "checkpoint_every": self.checkpoint_every, "log_every": self.log_every,
                "other_lr_scale": self.other_lr_scale}
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
    if not self.train_scale >= 1:
      raise ValueError(f"train_scale must be >= 1, got {self.train_scale!r}; pass "
                       "--train_scale=1 for the task's own training set.")
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
    d["fast_modules"] = list(self.fast_modules)
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def config_differences(saved: Mapping[str, Any], current: "TrainConfig") -> Dict[str, Tuple]:
  """{field: (saved, current)} for fields that matter to the result and differ. A field
  the saved config lacks (written before the field existed) counts as its default."""
  now = current.to_dict()
  defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
  out = {}
  for k in sorted(set(saved) | set(now)):
    if k in RESUME_IGNORED:
      continue
    a, b = saved.get(k, defaults.get(k)), now.get(k)
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
