"""Task vectors ``τ_t = θ_t − θ_0`` and the merges that add them to the base.

For LoRA models the task vector of a LoRA-carrying kernel is its update
``ΔW = scale·A·B`` (Flax layout ``(in, out)``, the transpose of the paper's
``B·A``); all other leaves are frozen, so their task vector is zero and they are
not part of it. Task-vector merges (task arithmetic, TIES, ``sparsify``,
``spectral``) therefore act on the products ``ΔW`` and return plain trees with the
merged update folded into the kernels: ``θ = θ_0 + λ·τ_merged`` on the selected
leaves, the base elsewhere, and the head of ``head_from``.
"""
from __future__ import annotations

from typing import List, Mapping, Optional, Sequence

import jax.numpy as jnp

from tvgeo_jax import trees
from tvgeo_jax.merging import inputs
from tvgeo_jax.merging.inputs import HeadFrom, Modules, Path


class TaskVectors:
  """The selected task-vector leaves of several models, computed on demand.

  Holds no copy: ``leaf(t, path)`` forms ``τ_t`` at one leaf, ``stack(path)`` the
  ``[T, ...]`` stack of one leaf, so memory stays at one leaf stack at a time.
  """

  def __init__(self, base: Mapping, models: Sequence[Mapping], modules: Modules, what: str):
    self.models = inputs.check_inputs(models, base, what)
    self.base = base
    self.paths: List[Path] = inputs.selected_paths(self.models, modules, what)

  def __len__(self) -> int:
    return len(self.models)

  def base_leaf(self, path: Path) -> jnp.ndarray:
    return jnp.asarray(trees.get_path(self.base, path), jnp.float32)

  def leaf(self, t: int, path: Path) -> jnp.ndarray:
    return inputs.effective_leaf(self.models[t], path) - self.base_leaf(path)

  def stack(self, path: Path) -> jnp.ndarray:
    return jnp.stack([self.leaf(t, path) for t in range(len(self.models))])

  def tree(self, t: int) -> dict:
    return trees.unflatten({p: self.leaf(t, p) for p in self.paths})

  def merged(self, replaced_delta: Mapping[Path, jnp.ndarray], models: Sequence[Mapping],
             head_from: HeadFrom) -> dict:
    """``θ_0 + delta`` on the given leaves, the base elsewhere, the chosen head."""
    replaced = {p: self.base_leaf(p) + d for p, d in replaced_delta.items()}
    return inputs.assemble(self.base, replaced, inputs.head_tree(models, head_from))


def task_vectors(base: Mapping, models: Sequence[Mapping], *, modules: Modules = None
                 ) -> List[dict]:
  """``[τ_t]``: each a tree of the selected leaves (the same leaves for every model)."""
  tv = TaskVectors(base, models, modules, "task_vectors")
  return [tv.tree(t) for t in range(len(tv))]


def task_vector(base: Mapping, model: Mapping, *, modules: Modules = None) -> dict:
  """``τ = θ − θ_0`` on the selected leaves (LoRA kernels: ``ΔW = scale·A·B``)."""
  return task_vectors(base, [model], modules=modules)[0]


def apply_task_vector(base: Mapping, tau: Mapping, lam: float = 1.0, *,
                      head_from: Optional[Mapping] = None) -> dict:
  """``θ_0 + λ·τ`` on τ's leaves; the head of ``head_from`` (default: the base's)."""
  base_flat = trees.flatten(base)
  replaced = {}
  for p, v in trees.flatten(tau).items():
    if p not in base_flat or inputs.is_head(p):
      raise ValueError(f"apply_task_vector: {trees.path_str(p)} is not a body leaf of the base.")
    if jnp.shape(v) != jnp.shape(base_flat[p]):
      raise ValueError(f"apply_task_vector: {trees.path_str(p)} has shape {jnp.shape(v)} in "
                       f"the task vector but {jnp.shape(base_flat[p])} in the base.")
    replaced[p] = jnp.asarray(base_flat[p], jnp.float32) + float(lam) * jnp.asarray(v)
  head = inputs.head_tree([base], 0 if head_from is None else head_from)
  return inputs.assemble(base, replaced, head)


def task_arithmetic(base: Mapping, models: Sequence[Mapping], lam=1.0, *,
                    modules: Modules = None, head_from: HeadFrom = 0) -> dict:
  """Task arithmetic: ``θ_0 + Σ_t λ_t τ_t`` (``lam`` a number or one per model)."""
  what = "task_arithmetic"
  tv = TaskVectors(base, models, modules, what)
  lam = inputs.check_lam(lam, len(tv), what)
  delta = {p: sum(float(l) * tv.leaf(t, p) for t, l in enumerate(lam)) for p in tv.paths}
  return tv.merged(delta, tv.models, head_from)

