"""Small helpers on parameter trees (nested dicts): string paths, get/set, masks.

Paths are tuples of keys, e.g. ``("encoder", "layer_3", "query", "kernel")``;
``path_str`` joins them with "/" for messages and file keys.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Tuple

import jax
import numpy as np

Path = Tuple[str, ...]


def path_str(path: Path) -> str:
  return "/".join(path)


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def flatten(tree: Mapping) -> Dict[Path, Any]:
  """{path: leaf} in a deterministic (sorted-key) order."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(_key_name(k) for k in p): v for p, v in leaves}


def unflatten(flat: Mapping[Path, Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    set_path(out, path, v)
  return out


def get_path(tree: Mapping, path: Path) -> Any:
  for k in path:
    tree = tree[k]
  return tree


def set_path(tree: dict, path: Path, value: Any) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def map_with_path(fn: Callable[[Path, Any], Any], tree: Mapping) -> dict:
  """Like ``jax.tree.map`` but ``fn(path, leaf)``; returns plain dicts."""
  return unflatten({p: fn(p, v) for p, v in flatten(tree).items()})


def layer_indices(params: Mapping) -> list:
  """Sorted layer numbers of ``params['encoder']`` (keys ``layer_{i}``)."""
  return sorted(int(k.split("_")[1]) for k in params["encoder"])


def count(tree: Mapping, mask: Mapping = None) -> int:
  """Number of scalars in the tree (only where ``mask`` is True, if given)."""
  flat = flatten(tree)
  if mask is None:
    return int(sum(np.size(v) for v in flat.values()))
  fm = flatten(mask)
  return int(sum(np.size(v) for p, v in flat.items() if fm[p]))


def to_numpy(tree: Mapping) -> dict:
  return jax.tree.map(np.asarray, tree)
