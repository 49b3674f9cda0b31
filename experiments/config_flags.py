"""Command-line flags generated from ``TrainConfig``'s fields: one flag per field (its
name, type and help are the field's), default None meaning "the preset's value".

The one list of hyper-parameter flags: ``experiments.finetune`` and
``experiments.one_vs_rest`` define them with ``define_train_flags()`` and read them back
with ``train_overrides()``; a new TrainConfig field is a new flag with no edit here.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Tuple

from absl import flags

from tvgeo_jax.training.config import TrainConfig

# Fields with flags of their own (required or with entry-point-specific defaults).
SPECIAL = ("task", "method", "model")

_DEFINE = {"int": flags.DEFINE_integer, "float": flags.DEFINE_float,
           "bool": flags.DEFINE_bool, "str": flags.DEFINE_string,
           "Tuple[str, ...]": flags.DEFINE_list}


def _base_type(annotation: str) -> str:
  """``Optional[float]`` → ``float``; the others as written (TrainConfig's annotations are
  strings under ``from __future__ import annotations``)."""
  if annotation.startswith("Optional[") and annotation.endswith("]"):
    return annotation[len("Optional["):-1]
  return annotation


def train_fields() -> Tuple[dataclasses.Field, ...]:
  return tuple(f for f in dataclasses.fields(TrainConfig) if f.name not in SPECIAL)


def define_train_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """One flag per TrainConfig field (except ``SPECIAL``), default None."""
  for f in train_fields():
    kind = _base_type(str(f.type))
    if kind not in _DEFINE:
      raise TypeError(f"TrainConfig.{f.name}: no flag type for {f.type!r}; add it to "
                      "experiments/config_flags._DEFINE.")
    help_text = f.metadata.get("help")
    if not help_text:
      raise ValueError(f"TrainConfig.{f.name} has no help text; declare it with _field().")
    choices = f.metadata.get("choices")
    if choices:
      flags.DEFINE_enum(f.name, None, list(choices), help_text, flag_values=flag_values)
    else:
      _DEFINE[kind](f.name, None, help_text, flag_values=flag_values)


def train_overrides(flag_values: flags.FlagValues = flags.FLAGS) -> Dict[str, Any]:
  """``{field: value}`` of every training flag (None where unset: the preset decides)."""
  return {f.name: flag_values[f.name].value for f in train_fields()}
