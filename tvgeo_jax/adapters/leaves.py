"""What a parameter path is: the tree predicates every package asks, in one place.

A path is a tuple of keys (``("encoder", "layer_0", "query", "lora_a")``). Heads are the
top-level ``classifier``, ``pooler`` and ``mlm_head``; LoRA factors are the ``lora_a``,
``lora_b`` and ``lora_scale`` leaves beside a frozen kernel; bottleneck adapters live
under ``attention_adapter`` / ``output_adapter``.
"""
from __future__ import annotations

from typing import Sequence

HEAD_MODULES = ("classifier", "pooler", "mlm_head")
LORA_LEAVES = ("lora_a", "lora_b", "lora_scale")
ADAPTER_NAMES = ("attention_adapter", "output_adapter")


def is_head(path: Sequence[str]) -> bool:
  """A leaf of a task head (never merged; replaced when the label count changes)."""
  return path[0] in HEAD_MODULES


def is_lora_leaf(path: Sequence[str]) -> bool:
  """A LoRA factor or its scale."""
  return path[-1] in LORA_LEAVES


def is_adapter_path(path: Sequence[str]) -> bool:
  """A leaf under ``attention_adapter`` / ``output_adapter``."""
  return any(p in ADAPTER_NAMES for p in path)
