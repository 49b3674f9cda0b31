"""The model names the project accepts, in one place.

* ``tiny`` / ``embedded``: the tiny RoBERTa the project pretrains itself (MLM on the
  synthetic corpus; built or found by ``tvgeo_jax.pretraining``, which is what loads it).
* ``tiny-random`` / ``tiny-bert-random``: the same-sized architectures at random init, for
  tests and smoke runs (LoRA cannot learn a compositional task on them: nothing to adapt).
* anything else: a local Hugging Face directory or a hub id.

All built-in names share the synthetic tokenizer.
"""
from __future__ import annotations

import os
from typing import Dict, Tuple

EMBEDDED_NAMES: Tuple[str, ...] = ("tiny", "embedded")
RANDOM_MODELS: Dict[str, str] = {"tiny-random": "roberta", "tiny-bert-random": "bert"}
BUILTIN_NAMES: Tuple[str, ...] = EMBEDDED_NAMES + tuple(RANDOM_MODELS)


def is_embedded(name: str) -> bool:
  """The pretrained tiny base (``tiny`` / ``embedded``)."""
  return str(name) in EMBEDDED_NAMES


def is_random(name: str) -> bool:
  return str(name) in RANDOM_MODELS


def is_builtin(name: str) -> bool:
  """One of the built-in names (they use the synthetic tokenizer and the tiny presets)."""
  return str(name) in BUILTIN_NAMES


def check(name: str) -> str:
  """``name`` unchanged, or a ValueError for a ``tiny*`` name that is neither built in nor
  a directory (a misspelt built-in would otherwise be sent to the hub)."""
  name = str(name)
  if name.startswith("tiny") and not is_builtin(name) and not os.path.isdir(name):
    raise ValueError(f"Unknown built-in model {name!r}; built-in models are "
                     f"{', '.join(BUILTIN_NAMES)}.")
  return name
