"""Trainable/frozen partition of a parameter tree, per fine-tuning method.

* ``full``: everything trains.
* ``lora``: LoRA factors (``lora_a``, ``lora_b``) and the classifier, as peft's
  ``modules_to_save`` does for sequence classification (``["classifier", "score"]``:
  BERT's pooler stays frozen in peft, so it does here; verified against
  ``get_nb_trainable_parameters()`` in tests/test_lora.py).
* ``bottleneck``: adapter weights, every LayerNorm and the head (Houlsby et al.).

``split``/``combine`` let a train step differentiate only the trainable part, so the
frozen weights get no gradient, no optimizer state and stay bit-identical.
"""
from __future__ import annotations

from typing import Mapping, Tuple

from tvgeo_jax.adapters.leaves import LORA_LEAVES, is_head
from tvgeo_jax.core import trees

METHODS = ("full", "lora", "bottleneck")
# Heads trained alongside LoRA factors: peft's modules_to_save for SEQ_CLS.
LORA_HEAD_MODULES = ("classifier",)


def is_trainable(path, method: str) -> bool:
  if method == "full":
    return True
  if method == "lora":
    return path[0] in LORA_HEAD_MODULES or path[-1] in LORA_LEAVES[:2]
  if method == "bottleneck":
    return (is_head(path) or any(p.endswith("_adapter") for p in path)
            or any(p.endswith("layer_norm") for p in path))
  raise ValueError(f"Unknown fine-tuning method {method!r}; choose one of {METHODS}.")


def trainable_mask(params: Mapping, method: str) -> dict:
  """A tree of bools, True where the leaf trains under ``method``."""
  return trees.map_with_path(lambda p, _: is_trainable(p, method), params)


def split(params: Mapping, method: str) -> Tuple[dict, dict]:
  """(trainable, frozen): two disjoint sub-trees whose union is ``params``."""
  flat = trees.flatten(params)
  train = {p: v for p, v in flat.items() if is_trainable(p, method)}
  frozen = {p: v for p, v in flat.items() if not is_trainable(p, method)}
  return trees.unflatten(train), trees.unflatten(frozen)


def combine(trainable: Mapping, frozen: Mapping) -> dict:
  """Inverse of ``split``: a recursive union of two disjoint trees."""
  out = dict(frozen)
  for k, v in trainable.items():
    out[k] = combine(v, out[k]) if k in out and isinstance(v, Mapping) else v
  return out


def count_parameters(params: Mapping, method: str) -> Tuple[int, int]:
  """(trainable, total) scalar counts; LoRA's ``lora_scale`` is a constant, not counted."""
  flat = {p: v for p, v in trees.flatten(params).items() if p[-1] != "lora_scale"}
  total = trees.count(trees.unflatten(flat))
  trainable = trees.count(trees.unflatten(
      {p: v for p, v in flat.items() if is_trainable(p, method)}))
  return trainable, total
