"""LoRA as parameter-tree transforms (see tvgeo_jax.models.encoder for the leaves)."""
from __future__ import annotations

import jax


def has_lora(params) -> bool:
  """True if any leaf of the tree is a LoRA factor."""
  return any(getattr(p[-1], "key", None) == "lora_a"
             for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])
