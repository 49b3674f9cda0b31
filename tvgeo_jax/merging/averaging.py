"""Averaging merges: weights, LoRA factors (paper A) and LoRA products.

* ``weight_average``: ``Σ_t w_t θ_t`` over the selected leaves (LoRA kernels are
  averaged as effective weights ``W + ΔW_t``, which is the product average).
* ``lora_factor_average``: paper A's merge ``(Σ w_t A_t, Σ w_t B_t)`` — with two
  models and w = ½ the factors ``(½(A1+A2), ½(B1+B2))``. Its update
  ``¼(B1+B2)(A1+A2)`` carries the cross terms ``B1A2 + B2A1``.
* ``lora_product_average``: ``W + Σ_t w_t ΔW_t`` (no cross terms), folded into the
  kernel, or re-factorised to rank r by a truncated SVD into new LoRA leaves.

All return a full tree: unselected leaves from the first model, the head from
``head_from`` (default: the first model's head — pass the task being scored first,
or use ``with_head``).
"""
from __future__ import annotations

from typing import List, Mapping, Optional, Sequence, Tuple

import jax.numpy as jnp
import numpy as np

from tvgeo_jax import lora, trees
from tvgeo_jax.merging import inputs
from tvgeo_jax.merging.inputs import HeadFrom, Modules, Path


def weight_average(models: Sequence[Mapping], weights: Optional[Sequence[float]] = None, *,
                   modules: Modules = None, head_from: HeadFrom = 0) -> dict:
  """``Σ_t w_t θ_t`` (uniform weights by default) over the selected non-head leaves."""
  what = "weight_average"
  models = inputs.check_inputs(models, None, what)
  w = inputs.check_weights(weights, len(models), what)
  paths = inputs.selected_paths(models, modules, what)
  replaced = {p: sum(float(w_t) * inputs.effective_leaf(m, p) for w_t, m in zip(w, models))
              for p in paths}
  return inputs.assemble(models[0], replaced, inputs.head_tree(models, head_from),
                         drop_lora=[p[:-1] for p in paths])


def _lora_module_paths(models, modules, what):
  carried = [inputs.lora_modules(m) for m in models]
  if not all(carried):
    bare = [i for i, c in enumerate(carried) if not c]
    raise ValueError(f"{what}: models {bare} carry no LoRA leaves; use weight_average or "
                     "task_arithmetic for plain trees.")
  return [p[:-1] for p in inputs.selected_paths(models, modules, what)]


def factor_modules(models: Sequence[Mapping], modules: Modules, what: str
                   ) -> List[Tuple[Path, List[Mapping]]]:
  """``[(module path, [each model's module dict])]`` for merges that act on the LoRA
  factors: LoRA on the same modules in every model, equal ranks, equal ``lora_scale``."""
  out = []
  for mp in _lora_module_paths(models, modules, what):
    mods = []
    for i, m in enumerate(models):
      mod = trees.get_path(m, mp)
      if "lora_a" not in mod:
        raise ValueError(f"{what}: model {i} has no LoRA on {trees.path_str(mp)} but model 0 "
                         "has; factor merges need the same LoRA modules in every model.")
      mods.append(mod)
    for leaf in ("lora_a", "lora_b"):
      shapes = [np.shape(mod[leaf]) for mod in mods]
      if len(set(shapes)) > 1:
        raise ValueError(f"{what}: {trees.path_str(mp)}/{leaf} shapes differ across models "
                         f"{shapes} (different ranks); factor merges need equal ranks — "
                         "use lora_product_average for mixed ranks.")
    scales = [float(mod["lora_scale"]) for mod in mods]
    if not np.allclose(scales, scales[0], rtol=1e-6, atol=0):
      raise ValueError(f"{what}: {trees.path_str(mp)} lora_scale differs across models "
                       f"{scales} (different alpha/r); merging factors would mix scales — "
                       "use lora_product_average.")
    out.append((mp, mods))
  return out


def lora_factor_average(models: Sequence[Mapping], weights: Optional[Sequence[float]] = None,
                        *, modules: Modules = None, head_from: HeadFrom = 0) -> dict:
  """Paper A's LoRA merge: average the factors, ``A = Σ w_t A_t``, ``B = Σ w_t B_t``.

  Requires LoRA on the same modules in every model, equal ranks, equal
  ``lora_scale`` and the same frozen base. Returns a LoRA tree.
  """
  what = "lora_factor_average"
  models = inputs.check_inputs(models, None, what)
  w = inputs.check_weights(weights, len(models), what)
  replaced = {}
  for mp, mods in factor_modules(models, modules, what):
    for leaf in ("lora_a", "lora_b"):
      replaced[mp + (leaf,)] = sum(float(w_t) * jnp.asarray(mod[leaf], jnp.float32)
                                   for w_t, mod in zip(w, mods))
  return inputs.assemble(models[0], replaced, inputs.head_tree(models, head_from))


def lora_product_average(models: Sequence[Mapping], refactor_rank: Optional[int] = None,
                         weights: Optional[Sequence[float]] = None, *,
                         modules: Modules = None, head_from: HeadFrom = 0) -> dict:
  """Average the LoRA updates, ``ΔW = Σ w_t scale_t·A_t·B_t`` (any ranks).

  ``refactor_rank=None``: fold into the kernel (``W + ΔW``, LoRA leaves dropped on
  the merged modules). ``refactor_rank=r``: keep ``W`` and store the best rank-r
  approximation of ``ΔW`` (truncated SVD ``U S Vᵀ``) as new factors split evenly,
  ``lora_a = U_r·sqrt(S_r/s)``, ``lora_b = sqrt(S_r/s)·V_rᵀ``, with ``s`` the
  models' common ``lora_scale`` (1.0 if they differ), so ``s·A·B`` is the
  truncated ``ΔW``.
  """
  what = "lora_product_average"
  models = inputs.check_inputs(models, None, what)
  w = inputs.check_weights(weights, len(models), what)
  module_paths = _lora_module_paths(models, modules, what)
  if refactor_rank is not None and (isinstance(refactor_rank, bool)
                                    or not isinstance(refactor_rank, (int, np.integer))
                                    or refactor_rank < 1):
    raise ValueError(f"{what}: refactor_rank must be None or a positive int, "
                     f"got {refactor_rank!r}.")
  replaced = {}
  for mp in module_paths:
    kernel = jnp.asarray(trees.get_path(models[0], mp + ("kernel",)), jnp.float32)
    mods = [trees.get_path(m, mp) for m in models]
    delta = sum(float(w_t) * lora.delta_kernel(mod) for w_t, mod in zip(w, mods)
                if "lora_a" in mod)
    if refactor_rank is None:
      replaced[mp + ("kernel",)] = kernel + delta
      continue
    if refactor_rank > min(kernel.shape):
      raise ValueError(f"{what}: refactor_rank={refactor_rank} exceeds min{kernel.shape} of "
                       f"{trees.path_str(mp)}/kernel.")
    scales = [float(mod["lora_scale"]) for mod in mods if "lora_a" in mod]
    scale = scales[0] if np.allclose(scales, scales[0], rtol=1e-6, atol=0) else 1.0
    u, s, vt = jnp.linalg.svd(delta, full_matrices=False)
    root = jnp.sqrt(s[:refactor_rank] / scale)
    replaced[mp + ("lora_a",)] = u[:, :refactor_rank] * root[None, :]
    replaced[mp + ("lora_b",)] = root[:, None] * vt[:refactor_rank]
    replaced[mp + ("lora_scale",)] = jnp.asarray(scale, jnp.float32)
  return inputs.assemble(models[0], replaced, inputs.head_tree(models, head_from),
                         drop_lora=module_paths if refactor_rank is None else ())
